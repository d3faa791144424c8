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
#include <utility>
#include <vector>

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

// The tagged layout (a judge trained with grm.tagged; only with a reference). The reference and
// the response are lined up (aligned_pairs) and shown as one line in which every character
// follows a tag of its own, a capital letter: for reference 63 and response 93, "C6I9D3J3" (C, D
// the reference's positions, I, J the response's). A pointwise prompt and side A of a pair take
// C..H and I..N, side B O..T and U..Z, so every tag occurs once in the prompt; a character that
// is a capital letter shows as '?', and at most kMaxTaggedPositions positions at the aligned
// end are shown ('+' marks the cut end). The judge writes each tag and the character after it
// (its reasoning is "C6I9x D3J3= 1 6", scored_data.h): a copy that a small transformer makes
// with an induction head (find the earlier occurrence of the current token, copy the token
// after it), where the line layout asks it to fetch the i-th character of a string.
//
//   pointwise:  task: <prompt>\npairs: <tagged line>
//   pairwise:   task: <prompt>\nA: <tagged line, C..N>\nB: <tagged line, O..Z>
inline constexpr int kMaxTaggedPositions = 6;
inline constexpr char kFirstTagA = 'C';
inline constexpr char kFirstTagB = 'O';
inline constexpr int kMissingChar = -1;  // a position one answer does not reach
// Two answers lined up at the end where more characters agree (the right end on a tie), the
// shorter padded with kMissingChar; positions where both have a space are left out.
struct AlignedPairs {
  std::vector<std::pair<int, int>> pairs;  // (expected, got)
  bool right_aligned = true;
};
AlignedPairs aligned_pairs(std::string_view expected, std::string_view got);
// How a character of an aligned pair shows: '.' missing, '_' a space, and in the tagged layout
// '?' a capital letter (capitals are its tags).
char aligned_shown(int c, bool tagged);
// The positions a tagged line shows: pairs [first, end) of `aligned`, at most
// kMaxTaggedPositions at the aligned end. Both answers are escaped before they are lined up.
struct TaggedPositions {
  AlignedPairs aligned;
  size_t first = 0;
  size_t end = 0;
};
TaggedPositions tagged_positions(std::string_view reference, std::string_view response);
// "C6I9": shown position k (counted from `first`) with its two tags, as the tagged line and the
// tagged reasoning (scored_data.h) both write it.
std::string tagged_pair(char first_tag, size_t k, int expected, int got);
// The tagged line of one response (escaped first); first_tag is kFirstTagA or kFirstTagB.
std::string tagged_line(std::string_view reference, std::string_view response, char first_tag);

// A judge's prompt layout is one int: kJudgeLinesLayout (the lines at the top of this file), a
// width W in 1..kMaxJudgeColumns (the column layout), kJudgeTaggedLayout or
// kJudgeSplitPairLayout. The column, tagged and split pair layouts apply only with a reference;
// without one a judge is shown the lines.
inline constexpr int kJudgeLinesLayout = 0;
inline constexpr int kJudgeTaggedLayout = -1;
// The split pair layout (a judge trained with grm.split_pairs; only with a reference): the tagged
// layout, except that a pairwise judgment takes two turns. The judge sees side A's tagged line
// alone and writes its reasoning about A, which ends with a newline; side B's line is then
// appended to its context as given text, and the judge writes its reasoning about B and the
// verdict line (one generation, two turns; Judge::compare runs them):
//
//   prompt: task: <prompt>\nA: <tagged line, C..N>      the judge writes: A <reasoning>\n
//   given:  B: <tagged line, O..Z>\n                     the judge writes: B <reasoning>\nVerdict: X
//
// The output the parser reads is the two turns joined, "A ...\nB ...\nVerdict: X". Why: a small
// judge finds a tagged position by its place in the line just before its output, so with both
// lines in one prompt it copies each side far worse than alone (docs/grm.md, "the split pair").
// By default the judge writes only the verdict in these turns: each side's reasoning is its
// pointwise reading, made alone and given (separate sides, side_turn below).
// Pointwise prompts are the tagged layout's.
inline constexpr int kJudgeSplitPairLayout = -2;
// kJudgeTaggedLayout or kJudgeSplitPairLayout: the layouts whose pointwise prompt is the tagged one.
bool is_tagged_layout(int layout);
// A failed internal check unless `layout` is one of the above: layouts come from a checked config
// or from checkpoint metadata that judge_layout_of (reward/judge.h) has checked.
void check_judge_layout(int layout);

// layout: as above (check_judge_layout). A pairwise prompt of the split pair layout with a
// reference is two turns (split_pair_turns): pairwise_judge_prompt fails an internal check.
std::string pointwise_judge_prompt(std::string_view prompt, std::string_view response,
                                   const std::optional<std::string>& reference = std::nullopt,
                                   int layout = kJudgeLinesLayout);
std::string pairwise_judge_prompt(std::string_view prompt, std::string_view response_a,
                                  std::string_view response_b,
                                  const std::optional<std::string>& reference = std::nullopt,
                                  int layout = kJudgeLinesLayout);

// The split pair layout's two turns of given text (the judge prompt body and side B's line).
struct SplitPairTurns {
  std::string prompt;  // "task: <prompt>\nA: <tagged line>", for format_prompt
  std::string b_line;  // "B: <tagged line>\n", appended after the judge's first turn
};
SplitPairTurns split_pair_turns(std::string_view prompt, std::string_view response_a,
                                std::string_view response_b, const std::string& reference);
// Separate sides (VotingParams::separate_sides): each side is read alone, as a pointwise
// judgment of the tagged layout, whose first line is the reasoning ("C6I9x D3J3= 1 6"); that
// line is then given as the side's part of the split pair's turns, and the judge writes only the
// verdict. So neither side's reasoning depends on the order of the pair or on the other side.
// side_turn makes the part: "A <line>\n", or for side B "B <line>\n" with A's tags C..N renamed
// to B's O..Z; nullopt unless `pointwise_line` is one line ending with its newline.
std::optional<std::string> side_turn(std::string_view pointwise_line, bool side_b);
// The score a tagged reasoning line ends with ("C6I9x D3J3= 1 6" -> 6; the line may end with its
// newline, and may be a side's part, "A ..." or "B ..."): its last field, written as the score
// line writes a score (1..10, no sign, no leading zero). nullopt for anything else.
std::optional<int> reading_score(std::string_view line);
// Separate sides with the verdict from the scores (VotingParams::verdict_from_scores): the verdict
// two sides' parts give by their scores, the higher score winning; nullopt when the scores are
// equal or either does not parse, which leaves the verdict to the judge.
std::optional<Verdict> verdict_from_readings(std::string_view a_part, std::string_view b_part);
// What a split pair judge is trained to write in its two turns, from a pairwise reasoning of
// the form "A <about A>; B <about B>" (what the tagged layout's data builder writes): a_turn =
// "A <about A>\n", b_turn = "B <about B>\nVerdict: X". nullopt if the reasoning is not of
// that form: it needs a part for each side, and side A's part cannot hold a newline (the
// judge's first turn ends at its first newline).
struct SplitPairOutput {
  std::string a_turn;
  std::string b_turn;
};
std::optional<SplitPairOutput> split_pair_output(std::string_view reasoning, Verdict verdict);

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
