// Task family `add`: "37+85=" -> "122", "14-91=" -> "-77".
#include <algorithm>
#include <string>

#include <fmt/core.h>

#include "rollout/task_family.h"

namespace rlhf::task_detail {
namespace {

struct AddPrompt {
  int64_t a = 0;
  int64_t b = 0;
  bool subtract = false;
  int64_t result() const { return subtract ? a - b : a + b; }
};

bool parse_operand(std::string_view text, int64_t* value) {
  if (text.empty() || static_cast<int>(text.size()) > kMaxParsedOperandDigits ||
      !all_of_chars(text, is_digit)) {
    return false;
  }
  *value = 0;
  for (char c : text) *value = *value * 10 + (c - '0');
  return true;
}

AddPrompt parse_add(std::string_view prompt) {
  AddPrompt parsed;
  const size_t op = prompt.find_first_of("+-");
  const bool ok = op != std::string_view::npos && !prompt.empty() && prompt.back() == '=' &&
                  parse_operand(prompt.substr(0, op), &parsed.a) &&
                  parse_operand(prompt.substr(op + 1, prompt.size() - op - 2), &parsed.b);
  if (!ok) {
    fail(
        "task 'add': prompt '{}' does not parse: expected '<a>+<b>=' or '<a>-<b>=' with 1 to {} "
        "digits per number",
        prompt, kMaxParsedOperandDigits);
  }
  parsed.subtract = prompt[op] == '-';
  return parsed;
}

std::string add_reference(std::string_view prompt) {
  return std::to_string(parse_add(prompt).result());
}

// An operand with exactly `digits` digits (no leading zero, except the number 0 itself).
int64_t random_operand(Rng& rng, int digits) {
  int64_t low = 1;
  for (int i = 1; i < digits; ++i) low *= 10;
  if (digits == 1) return rng.uniform_int(0, 9);
  return rng.uniform_int(low, low * 10 - 1);
}

std::string add_generate(const TaskSuiteConfig& config, Rng& rng) {
  const AddTaskConfig& c = config.add;
  const int64_t a =
      random_operand(rng, static_cast<int>(rng.uniform_int(c.min_digits, c.max_digits)));
  const int64_t b =
      random_operand(rng, static_cast<int>(rng.uniform_int(c.min_digits, c.max_digits)));
  const char op = rng.uniform() < c.subtract_fraction ? '-' : '+';
  return fmt::format("{}{}{}=", a, op, b);
}

// Credit per right-aligned digit (units against units, tens against tens: how people check a
// sum), 9 points for the digits and 1 for the sign. A longer or shorter answer counts its
// missing/extra digits as wrong. An answer with no digit right gets nothing, whatever its sign.
Grade add_grade(std::string_view prompt, const std::string& reference, std::string_view response) {
  if (response.empty()) return make_grade(0, fmt::format("expected {}; empty response", reference));
  const bool response_negative = response.front() == '-';
  const std::string_view response_digits = response.substr(response_negative ? 1 : 0);
  if (response_digits.empty() || !all_of_chars(response_digits, is_digit)) {
    return make_grade(0, fmt::format("expected {}; response is not an integer", reference));
  }
  const bool truth_negative = reference.front() == '-';
  const std::string_view truth_digits = std::string_view(reference).substr(truth_negative ? 1 : 0);
  const size_t length = std::max(truth_digits.size(), response_digits.size());
  size_t matches = 0;
  for (size_t i = 0; i < std::min(truth_digits.size(), response_digits.size()); ++i) {
    matches += truth_digits[truth_digits.size() - 1 - i] ==
               response_digits[response_digits.size() - 1 - i];
  }
  if (matches == 0) return make_grade(0, fmt::format("expected {}; no digit right", reference));
  const bool sign_right = truth_negative == response_negative;
  const double score =
      9.0 * static_cast<double>(matches) / static_cast<double>(length) + (sign_right ? 1.0 : 0.0);
  if (score == 10.0) return make_grade(score, "exact");
  return make_grade(score, fmt::format("expected {}; {} of {} digits right, sign {}", reference,
                                       matches, length, sign_right ? "right" : "wrong"));
}

std::string add_corrupt(std::string_view prompt, const std::string& reference, Rng& rng,
                        std::string* flaw_name) {
  const AddPrompt parsed = parse_add(prompt);
  const int64_t truth = parsed.result();
  // A sign error is only realistic (and only a change) for a nonzero difference.
  const bool can_flip_sign = parsed.subtract && truth != 0;
  const int64_t kind = rng.uniform_int(0, can_flip_sign ? 2 : 1);
  if (kind == 0) {
    *flaw_name = "wrong_digit";
    const bool negative = truth < 0;
    std::string digits = std::to_string(negative ? -truth : truth);
    const size_t pos = random_index(rng, digits.size());
    // A leading zero would be an implausible slip; the leading digit is replaced by 1..9.
    const int64_t lowest = (pos == 0 && digits.size() > 1) ? 1 : 0;
    char digit = static_cast<char>('0' + rng.uniform_int(lowest, 8));
    if (digit >= digits[pos]) ++digit;  // skip the right digit: 8 or 9 wrong choices, uniform
    digits[pos] = digit;
    return negative ? "-" + digits : digits;
  }
  if (kind == 1) {
    *flaw_name = "off_by_one";  // a dropped or extra carry in the units
    return std::to_string(truth + (rng.uniform_int(0, 1) == 0 ? -1 : 1));
  }
  *flaw_name = "sign_error";
  return std::to_string(-truth);
}

}  // namespace

const TaskFamily& add_task_family() {
  static const TaskFamily family{"add", add_reference, add_generate, add_grade, add_corrupt};
  return family;
}

}  // namespace rlhf::task_detail
