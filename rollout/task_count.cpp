// Task family `count`: "count a banana" -> "3" (how often the letter occurs in the word).
#include <algorithm>
#include <string>

#include <fmt/core.h>

#include "rollout/task_family.h"

namespace rlhf::task_detail {
namespace {

// With uniform letters a 4..8-letter word would lack the asked letter about 79% of the time, and
// a model could score well by always answering "0". Planting the letter at each position with
// this probability makes the mean count about 2, spread over 0..5.
constexpr double kPlantedLetterRate = 0.3;

struct CountPrompt {
  char letter = 'a';
  std::string_view word;
  int64_t count() const { return std::count(word.begin(), word.end(), letter); }
};

CountPrompt parse_count(std::string_view prompt) {
  std::string_view rest = prompt;
  if (!consume_prefix(rest, "count ") || rest.size() < 2 || !is_lower(rest[0]) || rest[1] != ' ') {
    fail("task 'count': prompt '{}' does not parse: expected 'count <letter> <word>'", prompt);
  }
  CountPrompt parsed{rest[0], rest.substr(2)};
  require_word(parsed.word, "count", prompt);
  return parsed;
}

std::string count_reference(std::string_view prompt) {
  return std::to_string(parse_count(prompt).count());
}

std::string count_generate(const TaskSuiteConfig& config, Rng& rng) {
  const char letter = static_cast<char>('a' + rng.uniform_int(0, 25));
  const auto length = static_cast<int>(rng.uniform_int(config.count.min_len, config.count.max_len));
  std::string word = random_word(rng, length);
  for (char& c : word) {
    if (rng.uniform() < kPlantedLetterRate) c = letter;
  }
  return fmt::format("count {} {}", letter, word);
}

// Exact 10; off by one 4 (the model counted, and slipped once); anything else 0.
Grade count_grade(std::string_view prompt, const std::string& reference,
                  std::string_view response) {
  if (response.empty()) return make_grade(0, fmt::format("expected {}; empty response", reference));
  // A count has no sign and no leading zero; 6 digits is far beyond any word we parse.
  if (response.size() > 6 || !all_of_chars(response, is_digit) ||
      (response.size() > 1 && response[0] == '0')) {
    return make_grade(0, fmt::format("expected {}; response is not a plain count", reference));
  }
  const int64_t truth = parse_count(prompt).count();
  const int64_t answer = std::stoll(std::string(response));
  const int64_t off = answer > truth ? answer - truth : truth - answer;
  if (off == 0) return make_grade(10, "exact");
  return make_grade(off == 1 ? 4 : 0, fmt::format("expected {}; off by {}", reference, off));
}

std::string count_corrupt(std::string_view prompt, const std::string& reference, Rng& rng,
                          std::string* flaw_name) {
  const int64_t truth = parse_count(prompt).count();
  *flaw_name = "off_by_one";
  const bool lower = truth > 0 && rng.uniform_int(0, 1) == 0;
  return std::to_string(lower ? truth - 1 : truth + 1);
}

}  // namespace

const TaskFamily& count_task_family() {
  static const TaskFamily family{"count", count_reference, count_generate, count_grade,
                                 count_corrupt};
  return family;
}

}  // namespace rlhf::task_detail
