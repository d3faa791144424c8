#pragma once
// Internal to rollout/: the interface each task family implements (one file per family:
// task_add.cpp, task_sort.cpp, task_reverse.cpp, task_count.cpp) and the small text helpers
// they share. Public users go through rollout/task_suite.h.
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/error.h"
#include "common/rng.h"
#include "rollout/task_suite.h"

namespace rlhf::task_detail {

struct TaskFamily {
  const char* name;
  // The reference answer for a prompt; throws rlhf::Error saying why if the prompt does not
  // parse for this family. The one place that defines the truth.
  std::string (*reference)(std::string_view prompt);
  // A fresh prompt within the configured difficulty range.
  std::string (*generate)(const TaskSuiteConfig& config, Rng& rng);
  // Grades a trimmed response. The prompt is known to parse and `reference` to agree with it.
  Grade (*grade)(std::string_view prompt, const std::string& reference, std::string_view response);
  // The reference with one realistic mistake; must differ from the reference.
  std::string (*corrupt)(std::string_view prompt, const std::string& reference, Rng& rng,
                         std::string* flaw_name);
};

const TaskFamily& add_task_family();
const TaskFamily& sort_task_family();
const TaskFamily& reverse_task_family();
const TaskFamily& count_task_family();

// Limits on what a prompt may contain when it is parsed (imported prompts may be harder than
// the generator's configured range, but stay bounded). The config caps are tighter: they keep
// generated prompts under 24 bytes.
inline constexpr int kMaxParsedOperandDigits = 18;  // |a +- b| < 2 * 10^18 fits in int64
inline constexpr int kMaxParsedItems = 32;          // sort: digits in the list
inline constexpr int kMaxParsedWordLen = 64;        // reverse and count: letters in the word

inline bool is_digit(char c) { return c >= '0' && c <= '9'; }
inline bool is_lower(char c) { return c >= 'a' && c <= 'z'; }
inline bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

inline bool all_of_chars(std::string_view text, bool (*pred)(char)) {
  for (char c : text) {
    if (!pred(c)) return false;
  }
  return true;
}

// Models emit stray spaces and newlines around an answer; those are not graded.
inline std::string_view trim_space(std::string_view text) {
  while (!text.empty() && is_space(text.front())) text.remove_prefix(1);
  while (!text.empty() && is_space(text.back())) text.remove_suffix(1);
  return text;
}

// Strips `prefix` from `text`; false if `text` does not start with it.
inline bool consume_prefix(std::string_view& text, std::string_view prefix) {
  if (text.substr(0, prefix.size()) != prefix) return false;
  text.remove_prefix(prefix.size());
  return true;
}

// A lowercase word of length 1..kMaxParsedWordLen, or a one-line error naming the family.
inline void require_word(std::string_view word, std::string_view family, std::string_view prompt) {
  if (word.empty() || static_cast<int>(word.size()) > kMaxParsedWordLen ||
      !all_of_chars(word, is_lower)) {
    fail("task '{}': prompt '{}' does not parse: expected a word of 1 to {} lowercase letters",
         family, prompt, kMaxParsedWordLen);
  }
}

// Uniform in [0, n); n must be positive.
inline size_t random_index(Rng& rng, size_t n) {
  return static_cast<size_t>(rng.uniform_int(0, static_cast<int64_t>(n) - 1));
}

inline std::string random_word(Rng& rng, int length) {
  std::string word(static_cast<size_t>(length), 'a');
  for (char& c : word) c = static_cast<char>('a' + rng.uniform_int(0, 25));
  return word;
}

// One realistic slip in writing out a sequence (the digits of a sorted list, the letters of a
// reversed word): two neighbours swapped, an item dropped, or an item written twice. Only kinds
// that change the sequence are drawn: a swap needs two different neighbours, a drop must leave
// an item. `items` must not be empty.
inline std::string apply_sequence_flaw(std::string items, Rng& rng, std::string* flaw_name) {
  std::vector<size_t> swappable;  // i such that items[i] != items[i + 1]
  for (size_t i = 0; i + 1 < items.size(); ++i) {
    if (items[i] != items[i + 1]) swappable.push_back(i);
  }
  std::vector<const char*> kinds = {"duplicate"};
  if (!swappable.empty()) kinds.push_back("swap");
  if (items.size() >= 2) kinds.push_back("drop");
  const std::string kind = kinds[random_index(rng, kinds.size())];
  if (kind == "swap") {
    const size_t at = swappable[random_index(rng, swappable.size())];
    std::swap(items[at], items[at + 1]);
  } else {
    const size_t pos = random_index(rng, items.size());
    if (kind == "drop") {
      items.erase(pos, 1);
    } else {
      items.insert(pos, 1, items[pos]);
    }
  }
  *flaw_name = kind;
  return items;
}

inline Grade make_grade(double score, std::string reason) {
  score = score < 0.0 ? 0.0 : (score > 10.0 ? 10.0 : score);
  return Grade{score, score == 10.0, std::move(reason)};
}

}  // namespace rlhf::task_detail
