#pragma once
// The generative reward model's contract: what a judge is shown and what it must write.
//
// A judge prompt is a judge turn (format_prompt with SpecialToken::kJudge) whose body is one
// field per line; every judged text is escaped so that it stays on its own line:
//
//   pointwise:  task: <prompt>\nresponse: <response>[\nreference: <reference>]
//   pairwise:   task: <prompt>\nA: <response A>\nB: <response B>[\nreference: <reference>]
//
// The judge answers with its reasoning (any number of lines, possibly none), then a last line
//
//   pointwise:  Score: N        N in 1..10, no sign, no leading zero
//   pairwise:   Verdict: A      or B, or tie
//
// and nothing after it. The parsers accept exactly that; everything else is INVALID, never a
// default score or a tie. Because judged texts are escaped (a newline inside a response becomes
// the two characters '\' 'n'), a response cannot put a "Score:" line into the judge prompt, and
// the parser reads only the judge's own last line.
#include <optional>
#include <string>
#include <string_view>

namespace rlhf {

enum class Verdict { kA, kB, kTie };
const char* verdict_name(Verdict verdict);  // "A", "B", "tie"

// Backslash -> "\\", newline -> "\n", carriage return -> "\r"; everything else unchanged.
std::string escape_judged_text(std::string_view text);

// The column layout (a judge trained with grm.columns = W > 0; only with a reference). The
// reference comes right after the task and every answer is a column of exactly W characters:
// escaped, right-aligned, padded with '.' on the left; a longer answer shows '<' and its last
// W - 1 characters.
//
//   pointwise:  task: <prompt>\nreference: <W>\nresponse: <W>
//   pairwise:   task: <prompt>\nreference: <W>\nA: <W>\nB: <W>
//
// Character i of every column is then a fixed number of tokens before the judge's i-th
// comparison mark (column_marks), whatever the answers' lengths: a small model compares by
// attending to fixed offsets instead of copying the answers (docs/grm.md says why).
constexpr int kMaxJudgeColumns = 64;
std::string judge_column(std::string_view text, int width);  // the column of one answer

// columns: 0 for the line layout above, else the column width (used only with a reference).
std::string pointwise_judge_prompt(std::string_view prompt, std::string_view response,
                                   const std::optional<std::string>& reference = std::nullopt,
                                   int columns = 0);
std::string pairwise_judge_prompt(std::string_view prompt, std::string_view response_a,
                                  std::string_view response_b,
                                  const std::optional<std::string>& reference = std::nullopt,
                                  int columns = 0);

// What the judge is trained to write. `reasoning` may be empty (the no-reasoning ablation);
// it must not end with a newline.
std::string pointwise_judge_output(std::string_view reasoning, int score);
std::string pairwise_judge_output(std::string_view reasoning, Verdict verdict);

struct ParsedScore {
  bool valid = false;
  int score = 0;          // 1..10 when valid
  std::string reasoning;  // everything before the last line
  std::string error;      // why it is INVALID
};

struct ParsedVerdict {
  bool valid = false;
  Verdict verdict = Verdict::kTie;
  std::string reasoning;
  std::string error;
};

ParsedScore parse_pointwise(std::string_view output);
ParsedVerdict parse_pairwise(std::string_view output);

}  // namespace rlhf
