// Task family `reverse`: "rev hello" -> "olleh".
#include <algorithm>
#include <string>

#include <fmt/core.h>

#include "rollout/task_family.h"

namespace rlhf::task_detail {
namespace {

std::string_view parse_reverse(std::string_view prompt) {
  std::string_view word = prompt;
  if (!consume_prefix(word, "rev ")) {
    fail("task 'reverse': prompt '{}' does not parse: expected 'rev <word>'", prompt);
  }
  require_word(word, "reverse", prompt);
  return word;
}

std::string reverse_reference(std::string_view prompt) {
  const std::string_view word = parse_reverse(prompt);
  return std::string(word.rbegin(), word.rend());
}

std::string reverse_generate(const TaskSuiteConfig& config, Rng& rng) {
  const auto length =
      static_cast<int>(rng.uniform_int(config.reverse.min_len, config.reverse.max_len));
  return "rev " + random_word(rng, length);
}

// Letters in place, counted from whichever end lines up better (so one dropped or doubled
// letter costs the letters on one side of it, not the whole word), over the longer of the two
// lengths (so a length mismatch always costs).
Grade reverse_grade(std::string_view prompt, const std::string& reference,
                    std::string_view response) {
  if (response.empty()) return make_grade(0, fmt::format("expected {}; empty response", reference));
  if (!all_of_chars(response, is_lower)) {
    return make_grade(0, fmt::format("expected {}; response is not a lowercase word", reference));
  }
  const size_t shorter = std::min(reference.size(), response.size());
  const size_t length = std::max(reference.size(), response.size());
  size_t from_left = 0;
  size_t from_right = 0;
  for (size_t i = 0; i < shorter; ++i) {
    from_left += reference[i] == response[i];
    from_right += reference[reference.size() - 1 - i] == response[response.size() - 1 - i];
  }
  const size_t in_place = std::max(from_left, from_right);
  const double score = 10.0 * static_cast<double>(in_place) / static_cast<double>(length);
  if (score == 10.0) return make_grade(score, "exact");
  std::string reason =
      fmt::format("expected {}; {} of {} letters in place", reference, in_place, length);
  if (response.size() != reference.size()) {
    reason += fmt::format(", length {} instead of {}", response.size(), reference.size());
  }
  return make_grade(score, std::move(reason));
}

std::string reverse_corrupt(std::string_view prompt, const std::string& reference, Rng& rng,
                            std::string* flaw_name) {
  return apply_sequence_flaw(reference, rng, flaw_name);
}

}  // namespace

const TaskFamily& reverse_task_family() {
  static const TaskFamily family{"reverse", reverse_reference, reverse_generate, reverse_grade,
                                 reverse_corrupt};
  return family;
}

}  // namespace rlhf::task_detail
