#pragma once
// The statistics of preference evaluation (win rates), as plain functions over outcomes, so
// each is checked against hand-computed cases (tests/unit/test_preference_stats.cpp).
// `rlhf eval winrate` and `rlhf eval ratings` (reward/winrate_eval.h) are built on them.
//
// Conventions: an outcome is A's result against B on one prompt, after judging both orders
// (a pair whose two orders disagree is a tie). INVALID judgments are counted and left out of
// every rate, never turned into a loss or a tie.
#include <cstdint>
#include <utility>
#include <vector>

namespace rlhf {

enum class PairOutcome { kWinA, kTie, kLossA, kInvalid };

struct WinRate {
  int wins = 0, ties = 0, losses = 0, invalid = 0;
  double win_rate = 0.5;  // (wins + ties / 2) / (wins + ties + losses); 0.5 with no valid pair
  double ci_low = 0, ci_high = 1;  // paired bootstrap percentile interval over prompts
  double p_value = 1;              // two-sided exact sign test on wins vs losses (ties dropped)
};

// Counts, the win rate, its bootstrap interval (`resamples` >= 1000 in reports; resampling the
// prompts with replacement, invalid ones included so the valid count varies as it would) at
// `confidence`, and the sign test. Deterministic for a seed.
WinRate win_rate(const std::vector<PairOutcome>& outcomes, int resamples, uint64_t seed,
                 double confidence = 0.95);

// The central `confidence` interval of bootstrap statistics: the (1-c)/2 and (1+c)/2 quantiles,
// interpolating linearly between order statistics. rlhf::Error when `values` is empty.
std::pair<double, double> percentile_interval(std::vector<double> values, double confidence);

// Two-sided exact binomial test of wins against losses under p = 1/2: the probability of a
// split at least as uneven as the one seen. 1 when both are 0.
double sign_test_p_value(int wins, int losses);

// One comparison between models i and j: score 1 when i won, 0.5 for a tie, 0 when j won.
struct PairwiseResult {
  int i = 0, j = 0;
  double score_i = 0.5;
};

// Bradley-Terry log-strengths (P(i beats j) = 1 / (1 + exp(theta_j - theta_i))) by the MM
// algorithm, normalized to mean 0. A tie counts as half a win for each side. Every model needs
// at least one comparison; a model that won (or lost) everything has no finite MLE, so a
// pseudo-count of `prior` half-wins against a virtual average opponent keeps it finite.
std::vector<double> bradley_terry(int n_models, const std::vector<PairwiseResult>& results,
                                  double prior = 0.5, int max_iterations = 10000,
                                  double tolerance = 1e-10);

// Length-controlled win rate: a logistic model of A's preference (1 win, 0.5 tie, 0 loss) on
// the length difference (A's response length minus B's, in tokens), fitted by Newton's method
// on the (fractional) log-likelihood; the rate is the model's prediction at equal length,
// sigmoid(intercept). With no length difference at all it equals the plain win rate.
double length_controlled_win_rate(const std::vector<double>& preference,
                                  const std::vector<double>& length_difference);

}  // namespace rlhf
