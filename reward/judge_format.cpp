#include "reward/judge_format.h"

#include <algorithm>

#include "common/error.h"

namespace rlhf {

namespace {

// Splits a judge output into (reasoning, last line). The last line follows the last newline;
// an output without one is all last line and no reasoning.
std::pair<std::string, std::string_view> split_last_line(std::string_view output) {
  const size_t newline = output.rfind('\n');
  if (newline == std::string_view::npos) return {std::string(), output};
  return {std::string(output.substr(0, newline)), output.substr(newline + 1)};
}

// A score as the score line writes it: 1..10, no sign, no leading zero, nothing else.
std::optional<int> score_number(std::string_view number) {
  if (number == "10") return 10;
  if (number.size() == 1 && number[0] >= '1' && number[0] <= '9') return number[0] - '0';
  return std::nullopt;
}

}  // namespace

const char* verdict_name(Verdict verdict) {
  switch (verdict) {
    case Verdict::kA: return "A";
    case Verdict::kB: return "B";
    case Verdict::kTie: return "tie";
  }
  return "?";
}

std::string escape_judged_text(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else {
      out += c;
    }
  }
  return out;
}

std::string judge_column(std::string_view text, int width, bool right_aligned) {
  RLHF_CHECK(width > 0 && width <= kMaxJudgeColumns, "judge column width {} out of 1..{}", width,
             kMaxJudgeColumns);
  const std::string escaped = escape_judged_text(text);
  const size_t w = size_t(width);
  if (escaped.size() <= w) {
    const std::string padding(w - escaped.size(), '.');
    return right_aligned ? padding + escaped : escaped + padding;
  }
  // Cut: '<' and the last w - 1 characters, or the first w - 1 characters and '>'.
  std::string cut(w, '<');
  if (right_aligned) {
    escaped.copy(cut.data() + 1, w - 1, escaped.size() - (w - 1));
  } else {
    escaped.copy(cut.data(), w - 1, 0);
    cut[w - 1] = '>';
  }
  return cut;
}

std::string interleaved_columns(std::string_view reference, std::string_view response,
                                int width, bool right_aligned) {
  const std::string ref = judge_column(reference, width, right_aligned);
  const std::string got = judge_column(response, width, right_aligned);
  std::string line;
  line.reserve(2 * size_t(width));
  for (size_t i = 0; i < size_t(width); ++i) {
    line += ref[i];
    line += got[i];
  }
  return line;
}

bool is_tagged_layout(int layout) {
  return layout == kJudgeTaggedLayout || layout == kJudgeSplitPairLayout;
}

void check_judge_layout(int layout) {
  RLHF_CHECK(is_tagged_layout(layout) || (layout >= 0 && layout <= kMaxJudgeColumns),
             "judge prompt layout {} is not one of judge_format.h", layout);
}

AlignedPairs aligned_pairs(std::string_view expected, std::string_view got) {
  const size_t length = std::max(expected.size(), got.size());
  auto at = [length](std::string_view text, size_t i, bool pad_left) -> int {
    const size_t pad = length - text.size();
    if (pad_left) return i < pad ? kMissingChar : static_cast<unsigned char>(text[i - pad]);
    return i < text.size() ? static_cast<unsigned char>(text[i]) : kMissingChar;
  };
  auto equal_positions = [&](bool pad_left) {
    size_t n = 0;
    for (size_t i = 0; i < length; ++i) {
      const int e = at(expected, i, pad_left);
      n += e != kMissingChar && e == at(got, i, pad_left);
    }
    return n;
  };
  AlignedPairs out;
  out.right_aligned = equal_positions(true) >= equal_positions(false);
  for (size_t i = 0; i < length; ++i) {
    const int e = at(expected, i, out.right_aligned), g = at(got, i, out.right_aligned);
    if (e == ' ' && g == ' ') continue;
    out.pairs.emplace_back(e, g);
  }
  return out;
}

char aligned_shown(int c, bool tagged) {
  if (c == kMissingChar) return '.';
  if (c == ' ') return '_';
  if (tagged && c >= 'A' && c <= 'Z') return '?';
  return char(c);
}

TaggedPositions tagged_positions(std::string_view reference, std::string_view response) {
  TaggedPositions shown;
  shown.aligned = aligned_pairs(escape_judged_text(reference), escape_judged_text(response));
  const size_t n = shown.aligned.pairs.size();
  const size_t count = std::min<size_t>(n, kMaxTaggedPositions);
  shown.first = shown.aligned.right_aligned ? n - count : 0;
  shown.end = shown.first + count;
  return shown;
}

std::string tagged_pair(char first_tag, size_t k, int expected, int got) {
  // Every character after a tag of its own: the reference's, then the response's.
  return {char(first_tag + int(k)), aligned_shown(expected, true),
          char(first_tag + kMaxTaggedPositions + int(k)), aligned_shown(got, true)};
}

std::string tagged_line(std::string_view reference, std::string_view response, char first_tag) {
  const TaggedPositions shown = tagged_positions(reference, response);
  std::string line = shown.first > 0 ? "+" : "";
  for (size_t i = shown.first; i < shown.end; ++i) {
    const auto [e, g] = shown.aligned.pairs[i];
    line += tagged_pair(first_tag, i - shown.first, e, g);
  }
  if (shown.end < shown.aligned.pairs.size()) line += "+";
  return line;
}

namespace {

// "<label>right: <2W>\n<label>left: <2W>" for one response.
std::string column_lines(const std::string& label, std::string_view reference,
                         std::string_view response, int width) {
  return "\n" + label + "right: " + interleaved_columns(reference, response, width, true) + "\n" +
         label + "left: " + interleaved_columns(reference, response, width, false);
}

}  // namespace

std::string pointwise_judge_prompt(std::string_view prompt, std::string_view response,
                                   const std::optional<std::string>& reference, int layout) {
  check_judge_layout(layout);
  if (is_tagged_layout(layout) && reference) {
    return "task: " + escape_judged_text(prompt) + "\npairs: " +
           tagged_line(*reference, response, kFirstTagA);
  }
  if (layout > 0 && reference) {
    return "task: " + escape_judged_text(prompt) + column_lines("", *reference, response, layout);
  }
  std::string text = "task: " + escape_judged_text(prompt) +
                     "\nresponse: " + escape_judged_text(response);
  if (reference) text += "\nreference: " + escape_judged_text(*reference);
  return text;
}

std::string pairwise_judge_prompt(std::string_view prompt, std::string_view response_a,
                                  std::string_view response_b,
                                  const std::optional<std::string>& reference, int layout) {
  check_judge_layout(layout);
  RLHF_CHECK(layout != kJudgeSplitPairLayout || !reference,
             "a split pair judgment has two turns: split_pair_turns, not pairwise_judge_prompt");
  if (layout == kJudgeTaggedLayout && reference) {
    return "task: " + escape_judged_text(prompt) + "\nA: " +
           tagged_line(*reference, response_a, kFirstTagA) + "\nB: " +
           tagged_line(*reference, response_b, kFirstTagB);
  }
  if (layout > 0 && reference) {
    return "task: " + escape_judged_text(prompt) +
           column_lines("A ", *reference, response_a, layout) +
           column_lines("B ", *reference, response_b, layout);
  }
  std::string text = "task: " + escape_judged_text(prompt) + "\nA: " +
                     escape_judged_text(response_a) + "\nB: " + escape_judged_text(response_b);
  if (reference) text += "\nreference: " + escape_judged_text(*reference);
  return text;
}

SplitPairTurns split_pair_turns(std::string_view prompt, std::string_view response_a,
                                std::string_view response_b, const std::string& reference) {
  return {"task: " + escape_judged_text(prompt) + "\nA: " +
              tagged_line(reference, response_a, kFirstTagA),
          "B: " + tagged_line(reference, response_b, kFirstTagB) + "\n"};
}

std::optional<std::string> side_turn(std::string_view pointwise_line, bool side_b) {
  if (pointwise_line.size() < 2 || pointwise_line.back() != '\n' ||
      pointwise_line.find('\n') != pointwise_line.size() - 1) {
    return std::nullopt;
  }
  std::string out = side_b ? "B " : "A ";
  // Capitals in a tagged reasoning are only tags: the tagged line shows a capital letter of an
  // answer as '?' (aligned_shown).
  const int shift = side_b ? kFirstTagB - kFirstTagA : 0;
  for (char c : pointwise_line) {
    out += c >= kFirstTagA && c < kFirstTagB ? char(c + shift) : c;
  }
  return out;
}

std::optional<int> reading_score(std::string_view line) {
  if (!line.empty() && line.back() == '\n') line.remove_suffix(1);
  const size_t space = line.rfind(' ');
  if (space == std::string_view::npos) return std::nullopt;
  return score_number(line.substr(space + 1));
}

std::optional<Verdict> verdict_from_readings(std::string_view a_part, std::string_view b_part) {
  const std::optional<int> a = reading_score(a_part), b = reading_score(b_part);
  if (!a || !b || *a == *b) return std::nullopt;
  return *a > *b ? Verdict::kA : Verdict::kB;
}

std::optional<SplitPairOutput> split_pair_output(std::string_view reasoning, Verdict verdict) {
  constexpr std::string_view kSideB = "; B ";
  const size_t at = reasoning.find(kSideB);
  // The first turn ends at its first newline, so side A's part must not hold one.
  if (reasoning.substr(0, 2) != "A " || at == std::string_view::npos ||
      reasoning.substr(0, at).find('\n') != std::string_view::npos) {
    return std::nullopt;
  }
  SplitPairOutput out;
  out.a_turn = std::string(reasoning.substr(0, at)) + "\n";
  out.b_turn = pairwise_judge_output(reasoning.substr(at + 2), verdict);
  return out;
}

std::string pointwise_judge_output(std::string_view reasoning, int score) {
  RLHF_CHECK(score >= 1 && score <= 10, "judge score {} outside 1..10", score);
  RLHF_CHECK(reasoning.empty() || reasoning.back() != '\n', "reasoning ends with a newline");
  std::string out(reasoning);
  if (!out.empty()) out += '\n';
  return out + "Score: " + std::to_string(score);
}

std::string pairwise_judge_output(std::string_view reasoning, Verdict verdict) {
  RLHF_CHECK(reasoning.empty() || reasoning.back() != '\n', "reasoning ends with a newline");
  std::string out(reasoning);
  if (!out.empty()) out += '\n';
  return out + "Verdict: " + verdict_name(verdict);
}

ParsedScore parse_pointwise(std::string_view output) {
  ParsedScore parsed;
  auto [reasoning, last] = split_last_line(output);
  constexpr std::string_view kPrefix = "Score: ";
  if (last.substr(0, kPrefix.size()) != kPrefix) {
    parsed.error = last.empty() ? "empty last line" : "last line does not start with 'Score: '";
    return parsed;
  }
  const std::optional<int> score = score_number(last.substr(kPrefix.size()));
  if (!score) {
    parsed.error = "score is not an integer in 1..10";
    return parsed;
  }
  parsed.valid = true;
  parsed.score = *score;
  parsed.reasoning = std::move(reasoning);
  return parsed;
}

ParsedVerdict parse_pairwise(std::string_view output) {
  ParsedVerdict parsed;
  auto [reasoning, last] = split_last_line(output);
  if (last == "Verdict: A") {
    parsed.verdict = Verdict::kA;
  } else if (last == "Verdict: B") {
    parsed.verdict = Verdict::kB;
  } else if (last == "Verdict: tie") {
    parsed.verdict = Verdict::kTie;
  } else {
    parsed.error = last.substr(0, 9) == "Verdict: " ? "verdict is not A, B or tie"
                                                    : "last line does not start with 'Verdict: '";
    return parsed;
  }
  parsed.valid = true;
  parsed.reasoning = std::move(reasoning);
  return parsed;
}

}  // namespace rlhf
