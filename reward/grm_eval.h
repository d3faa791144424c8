#pragma once
// `rlhf eval grm`: how good a judge is, on held-out prompts (the task suite's held-out split:
// its own seed stream and a part of the prompt space training never draws from).
//
// For every prompt the judged responses have graded quality: the reference (10), two corrupted
// references (realistic single mistakes) and one sample of the judge model itself acting as the
// policy. Ground truth is the task's grader. Reported:
//   pairwise_accuracy   pairs of responses with different ground truth, judged once greedily
//                       with the pairwise template (Voting@1): share where the verdict names the
//                       better response (a tie or an INVALID judgment counts as wrong)
//   pairwise_accuracy_vote_k   the same with k sampled votes, order swapped on every other vote
//   pairwise_accuracy_from_scores   the same pairs decided by the two responses' greedy
//                       pointwise scores (equal scores or an INVALID score count as wrong)
//   swap_consistency    share of pairs (both judgments valid) whose greedy verdict is the same
//                       with the two responses in either order
//   spearman            rank correlation of greedy pointwise scores with ground truth
//   invalid_rate        INVALID judge samples / all judge samples (after retries)
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "model/transformer.h"
#include "model/tokenizer.h"
#include "reward/judge.h"
#include "rollout/task_suite.h"

namespace rlhf {

struct GrmEvalOptions {
  int prompts = 200;
  int pairs_per_prompt = 2;
  int k = 5;                   // votes for Voting@k
  double temperature = 1.0;    // of the Voting@k samples
  bool with_reference = false;
  int max_batch = 64;
  int max_new_tokens = 96;     // per judge output
  bool separate_sides = true;  // VotingParams::separate_sides (split pair judges)
  bool verdict_from_scores = true;  // VotingParams::verdict_from_scores (with separate sides)
  int layout = 0;              // the judge's prompt layout (judge_layout_of)
  uint64_t seed = 3;
};

// Every judgment the evaluation made, for reading the judge's mistakes (`eval grm --records`).
struct GrmEvalPointwiseItem {
  std::string prompt, response;
  std::optional<std::string> reference;  // when the judge was shown it
  double truth = 0;  // the grader's score, 0..10
  PointwiseJudgment judgment;  // greedy
};

struct GrmEvalPairItem {
  std::string prompt, response_a, response_b;
  double truth_a = 0, truth_b = 0;
  size_t pointwise_a = 0, pointwise_b = 0;  // the two responses' pointwise_judgments entries
  PairwiseJudgment forward;   // greedy, A first
  PairwiseJudgment backward;  // greedy, B first (its verdict in that order's names)
  PairwiseJudgment voted;     // Voting@k
};

struct GrmEvalResult {
  int prompts = 0;
  int64_t pointwise_items = 0;
  int64_t pairs = 0;
  double pairwise_accuracy = 0;
  double pairwise_accuracy_vote_k = 0;
  double pairwise_accuracy_from_scores = 0;
  double swap_consistency = 0;
  double spearman = 0;
  double invalid_rate = 0;
  int64_t judge_samples = 0;
  int64_t invalid_samples = 0;
  int64_t retries = 0;
  int k = 0;
  std::string pair_judging;  // pair_judging_name (reward/judge.h)
  std::vector<std::string> examples;  // a few judged items with their reasoning, for reading
  std::vector<GrmEvalPointwiseItem> pointwise_judgments;  // in the order they were judged
  std::vector<GrmEvalPairItem> pair_judgments;
};

GrmEvalResult evaluate_grm(Transformer<float>& judge_model, const Tokenizer& tokenizer,
                           const TaskSuite& suite, const GrmEvalOptions& options);

// Spearman rank correlation (average ranks for ties); 0 when either side is constant.
double spearman_correlation(const std::vector<double>& x, const std::vector<double>& y);

}  // namespace rlhf
