#pragma once
// Scored data: what a generative reward model is trained on, as JSONL, one record per line.
//
//   pointwise: {"prompt": str, "response": str, "reasoning": str, "score": int 1..10,
//               "reference": str (optional)}
//   pairwise:  {"prompt": str, "response_a": str, "response_b": str, "reasoning": str,
//               "verdict": "A" | "B" | "tie", "reference": str (optional)}
//
// A record is pairwise exactly when it has "response_a". Unknown keys, wrong types, empty
// prompts or responses, and a reasoning that ends with a newline are errors naming the file,
// the line and the key. `reasoning` may be empty (a judge trained to answer without reasoning).
//
// build_judge_data makes such records from the task suite: responses of graded quality (the
// policy's own samples, good and flawed, the reference, and corrupted references), each with a
// reasoning that works the task out (names the expected answer), compares the response with it
// and says what is wrong, then the score the task's grader gives.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "model/generate.h"
#include "reward/judge_format.h"
#include "rollout/task_suite.h"

namespace rlhf {

struct ScoredExample {
  std::string prompt;
  std::string response;
  std::optional<std::string> reference;
  std::string reasoning;
  int score = 1;  // 1..10
};

struct PairwiseExample {
  std::string prompt;
  std::string response_a;
  std::string response_b;
  std::optional<std::string> reference;
  std::string reasoning;
  Verdict verdict = Verdict::kTie;
};

struct ScoredData {
  std::vector<ScoredExample> pointwise;
  std::vector<PairwiseExample> pairwise;
};

ScoredData read_scored_jsonl(const std::string& path);
// Atomic (temp file + rename).
void write_scored_jsonl(const std::string& path, const ScoredData& data);

// A grader's 0..10 score on the judge's 1..10 scale: rounded, 0 becomes 1.
int judge_score_from_grade(double grade_score);

// The reasoning for one response: "expected <reference>; got <response>; <comparison>", the
// comparison from the grader ("1 of 2 digits right, sign right", "off by 1", "exact").
// position_marks(expected, got): one character per position of the longer string, '=' where
// both have the same character there, 'x' elsewhere ("63" vs "65": "=x"). Written after the
// quote, each mark sits at a fixed distance from the two characters it compares, which a
// small model attends to far more easily than it compares two whole strings.
std::string position_marks(std::string_view expected, std::string_view got);
std::string grade_reasoning(const TaskExample& example, std::string_view response,
                            const Grade& grade,
                            bool position_marks = false);

// aligned_comparison(expected, got): the two answers side by side, one triple per position:
// the expected character, the response's character, then '=' or 'x' ("63" vs "93":
// "69x 33="), and after the triples the number of 'x' marks, capped at 9 ("69x 33= 1"). Each
// mark comes right after the two characters it compares, wherever the answers' lengths put
// them. The answers are lined up at the end where more characters agree, and the shorter one is
// padded with '.' at the other end (on a tie they line up at the right end, as the units of two
// sums do; the graders of sort and reverse also count from whichever end matches better). A
// position where both answers have a space is left out; a space facing any other character
// shows as '_' ("1 7 9" vs "1 79": "11= 77= _9x 9.x 2").
std::string aligned_comparison(std::string_view expected, std::string_view got);
// The aligned reasoning for one response: "expected <reference>; <aligned_comparison> <score>"
// ("expected 63; 69x 33= 1 6"), the score being the one on the score line after it. A pairwise
// reasoning writes the same comparison and score for each side: "expected 63; A 69x 33= 1 6;
// B 66= 33= 0 10", so its verdict compares two nearby scores. With quote_response each side
// quotes the response (escaped, as the judge sees it) before its triples: "expected 63; got 93;
// 69x 33= 1 6", pairwise "expected 63; A got 93; 69x 33= 1 6; B got 63; 66= 33= 0 10", so the
// response's characters in the triples can be copied from the judge's own recent output, as the
// expected ones are, instead of from the prompt. With prompt_labels (and quote_response) the
// quotes repeat the judge prompt's own labels, "reference: 63; response: 93; 69x 33= 1 6" and
// "reference: 63; A: 93; 69x 33= 1 6; B: 63; 66= 33= 0 10", so each quote starts with the
// characters that precede its source line in the prompt.
std::string aligned_reasoning(const TaskExample& example, std::string_view response,
                              const Grade& grade, bool quote_response = false,
                              bool prompt_labels = false);
// The pairwise form: "expected 63; A <side a>; B <side b>", each side as in aligned_reasoning.
std::string aligned_pair_reasoning(const TaskExample& example, std::string_view response_a,
                                   const Grade& grade_a, std::string_view response_b,
                                   const Grade& grade_b, bool quote_response = false,
                                   bool prompt_labels = false);

// column_mismatches(reference, response, width, right_aligned): the positions of the column
// layout (judge_format.h) where the two columns differ, padding facing padding not counted
// ("63" vs "93": 1 either way; "maml" vs "aml": 1 right-aligned, 4 left-aligned).
int column_mismatches(std::string_view reference, std::string_view response, int width,
                      bool right_aligned);
// The column reasoning (grm.columns): the mismatches right-aligned and left-aligned (each at
// most 9), then the score: "1 1 6". Pairwise, each side's: "A 1 1 6; B 0 0 10". The judge
// counts marks it does not write: each mismatch is two neighbouring tokens of its prompt.
std::string column_reasoning(const TaskExample& example, std::string_view response,
                             const Grade& grade, int width);
std::string column_pair_reasoning(const TaskExample& example, std::string_view response_a,
                                  const Grade& grade_a, std::string_view response_b,
                                  const Grade& grade_b, int width);

// The tagged reasoning (grm.tagged, judge_format.h): for each position the prompt shows, its
// two tags and characters as there and the mark, then the number of 'x' marks over all
// positions (at most 9) and the score: "C6I9x D3J3= 1 6" for reference 63, response 93. Each
// mark compares the characters written one and three tokens before it. Pairwise: "A C6I9x
// D3J3= 1 6; B O6U6= P3V3= 0 10".
std::string tagged_reasoning(const TaskExample& example, std::string_view response,
                             const Grade& grade, char first_tag);
std::string tagged_pair_reasoning(const TaskExample& example, std::string_view response_a,
                                  const Grade& grade_a, std::string_view response_b,
                                  const Grade& grade_b);

// The reference with each digit or lower-case letter redrawn (same class) with probability 1/2,
// at least one changed; a reference without such characters gets a "0" appended.
std::string scramble_response(std::string_view reference, Rng& rng);

// The reference with two of its characters exchanged: two digits or lower-case letters that
// differ, at any distance, drawn uniformly among such pairs. Every character of the response is
// then one the expected answer has, only in another place, which is where a judge that writes
// the expected character instead of copying the response's goes wrong. nullopt when no two
// such characters differ ("7", "5 5").
std::optional<std::string> swap_response(std::string_view reference, Rng& rng);

struct JudgeDataOptions {
  int prompts = 2000;              // task-suite prompts (training split, from first_index on)
  uint64_t first_index = 0;
  int policy_samples = 2;          // samples per prompt from the policy (0: none)
  double pairwise_fraction = 0.5;  // share of prompts that also yield pairwise records
  // Pairwise records such a prompt yields (each of two different responses, no pair twice).
  int pairs_per_prompt = 1;
  // Corrupted references judged per prompt: more flawed responses beside the reference and the
  // policy's samples (which are mostly right), so the judge sees more mistakes to name.
  int corrupted_per_prompt = 1;
  // Each pairwise record also in the other order (B first, the verdict mirrored), so the data
  // itself says that the order does not matter.
  bool mirror_pairs = false;
  // Share of prompts that also yield a pair of two identical responses with the verdict tie:
  // without them a judge never sees a tie to give, and names a position instead.
  double tie_pair_fraction = 0.0;
  bool reasoning = true;           // false: empty reasoning (the no-reasoning ablation)
  bool with_reference = false;     // put the reference answer into the judge prompt
  // Reasoning with position marks (position_marks below) after each quoted response.
  bool position_marks = false;
  // Reasoning as aligned comparisons (aligned_reasoning above) instead of the grader's words
  // (position_marks is then not used; the config refuses both together).
  bool aligned_marks = false;
  // With aligned_marks: each side quotes the response before its triples (aligned_reasoning
  // above). Not used without aligned_marks (the config refuses it there).
  bool quote_response = false;
  // With quote_response: the quotes take the prompt's labels (aligned_reasoning above).
  bool prompt_labels = false;
  // The judge prompt layout (judge_format.h) and its reasoning: kJudgeLinesLayout (the
  // reasoning styles above), a width W > 0 (column_reasoning) or a tagged layout
  // (is_tagged_layout: tagged_reasoning; the split pair layout differs only in how a pairwise
  // record becomes a training sequence, learner/grm.h). The last two need with_reference and no other reasoning style (the
  // config checks both).
  int layout = kJudgeLinesLayout;
  // Scrambled references judged per prompt (scramble_response): responses whose characters a
  // judge cannot guess from the expected answer, so that copying them pays.
  int scrambled_per_prompt = 0;
  // Swapped references judged per prompt (swap_response), where the reference has two different
  // characters to exchange.
  int swapped_per_prompt = 0;
  uint64_t seed = 1;
};

// `policy` may be null (then only references and corrupted references are judged).
ScoredData build_judge_data(const TaskSuite& suite, Split split, Generator* policy,
                            const JudgeDataOptions& options);

}  // namespace rlhf
