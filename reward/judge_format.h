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
// reference and each response are lined up as columns of W characters: escaped, padded with
// '.', at the right end (as the units of two sums line up) and, on a second line, at the left
// end; a longer answer is cut to W - 1 characters and marked '<' (right) or '>' (left). A
// line shows the two columns interleaved, the reference's character first at every position:
// "60+3=", reference 63, response 93, W = 4: right "....6933", left "6933....".
//
//   pointwise:  task: <prompt>\nright: <2W>\nleft: <2W>
//   pairwise:   task: <prompt>\nA right: <2W>\nA left: <2W>\nB right: <2W>\nB left: <2W>
//
// So the two characters a judge compares are neighbours in its prompt, and the judge need not
// copy an answer's characters from far back in the prompt, which is where the line layout's
// judges fail. Measured on the demo model it did not help: the judge did not learn to compare
// even neighbouring tokens (docs/grm.md), so it is off by default.
constexpr int kMaxJudgeColumns = 64;
// The column of one answer: right-aligned or left-aligned.
std::string judge_column(std::string_view text, int width, bool right_aligned);
// The interleaved line of a reference and a response: 2 * width characters.
std::string interleaved_columns(std::string_view reference, std::string_view response,
                                int width, bool right_aligned);

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
