// Task family `sort`: "sort 5 2 9 1" -> "1 2 5 9" (single digits, repeats allowed).
#include <algorithm>
#include <string>

#include <fmt/core.h>

#include "rollout/task_family.h"

namespace rlhf::task_detail {
namespace {

std::string join_digits(const std::string& digits) {
  std::string text;
  for (char d : digits) {
    if (!text.empty()) text += ' ';
    text += d;
  }
  return text;
}

// The digits of the prompt's list, in prompt order.
std::string parse_sort(std::string_view prompt) {
  std::string_view rest = prompt;
  std::string digits;
  bool ok = consume_prefix(rest, "sort");
  while (ok && !rest.empty()) {
    ok = rest.size() >= 2 && rest[0] == ' ' && is_digit(rest[1]);
    if (ok) digits += rest[1];
    rest.remove_prefix(std::min<size_t>(2, rest.size()));
  }
  if (!ok || digits.empty() || static_cast<int>(digits.size()) > kMaxParsedItems) {
    fail(
        "task 'sort': prompt '{}' does not parse: expected 'sort' then 1 to {} single digits, "
        "each after one space",
        prompt, kMaxParsedItems);
  }
  return digits;
}

std::string sort_reference(std::string_view prompt) {
  std::string digits = parse_sort(prompt);
  std::sort(digits.begin(), digits.end());
  return join_digits(digits);
}

std::string sort_generate(const TaskSuiteConfig& config, Rng& rng) {
  const int64_t length = rng.uniform_int(config.sort.min_len, config.sort.max_len);
  std::string prompt = "sort";
  for (int64_t i = 0; i < length; ++i) {
    prompt += ' ';
    prompt += static_cast<char>('0' + rng.uniform_int(0, 9));
  }
  return prompt;
}

// 8 points for digits in the right position (share of the longer list; positions counted from
// whichever end lines up better, so a dropped or doubled item costs only the items on one side
// of it), 2 for answering with exactly the input's digits (a permutation that is merely
// mis-ordered beats invented or lost items), minus 1 when the spacing is not "d d d".
Grade sort_grade(std::string_view prompt, const std::string& reference, std::string_view response) {
  if (response.empty()) return make_grade(0, fmt::format("expected {}; empty response", reference));
  std::string digits;
  for (char c : response) {
    if (c == ' ') continue;
    if (!is_digit(c)) {
      return make_grade(0, fmt::format("expected {}; response is not a list of digits", reference));
    }
    digits += c;
  }
  std::string truth = parse_sort(prompt);
  std::sort(truth.begin(), truth.end());
  const size_t length = std::max(truth.size(), digits.size());
  size_t from_left = 0;
  size_t from_right = 0;
  for (size_t i = 0; i < std::min(truth.size(), digits.size()); ++i) {
    from_left += truth[i] == digits[i];
    from_right += truth[truth.size() - 1 - i] == digits[digits.size() - 1 - i];
  }
  const size_t in_place = std::max(from_left, from_right);
  std::string response_sorted = digits;
  std::sort(response_sorted.begin(), response_sorted.end());
  const bool same_items = response_sorted == truth;
  const bool canonical_spacing = join_digits(digits) == response;
  const double score = 8.0 * static_cast<double>(in_place) / static_cast<double>(length) +
                       (same_items ? 2.0 : 0.0) - (canonical_spacing ? 0.0 : 1.0);
  if (score == 10.0) return make_grade(score, "exact");
  return make_grade(
      score, fmt::format("expected {}; {} of {} positions right, {}{}", reference, in_place, length,
                         same_items ? "same items as the input" : "not the items of the input",
                         canonical_spacing ? "" : ", spacing wrong"));
}

std::string sort_corrupt(std::string_view prompt, const std::string& reference, Rng& rng,
                         std::string* flaw_name) {
  std::string digits = parse_sort(prompt);
  std::sort(digits.begin(), digits.end());
  return join_digits(apply_sequence_flaw(digits, rng, flaw_name));
}

}  // namespace

const TaskFamily& sort_task_family() {
  static const TaskFamily family{"sort", sort_reference, sort_generate, sort_grade, sort_corrupt};
  return family;
}

}  // namespace rlhf::task_detail
