// The statistics of win-rate evaluation (reward/preference_stats.h) against cases computed by
// hand. Tolerances: exact arithmetic cases to 1e-12; iterative fits (MM, Newton) to 1e-6, far
// above their convergence tolerance and far below any difference that would matter.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "common/error.h"
#include "common/rng.h"
#include "reward/preference_stats.h"

namespace rlhf {
namespace {

using O = PairOutcome;

TEST(SignTest, MatchesTheBinomialByHand) {
  // 8 wins, 2 losses: P(X >= 8 | n = 10) = (45 + 10 + 1) / 1024; two-sided doubles it.
  EXPECT_NEAR(sign_test_p_value(8, 2), 112.0 / 1024.0, 1e-12);
  EXPECT_NEAR(sign_test_p_value(2, 8), 112.0 / 1024.0, 1e-12);
  // 10 of 10: 2 / 1024.
  EXPECT_NEAR(sign_test_p_value(10, 0), 2.0 / 1024.0, 1e-12);
  // An even split, or nothing at all, is no evidence.
  EXPECT_EQ(sign_test_p_value(5, 5), 1.0);
  EXPECT_EQ(sign_test_p_value(0, 0), 1.0);
}

TEST(WinRate, CountsTiesAsHalfAndLeavesInvalidOut) {
  const std::vector<O> outcomes = {O::kWinA, O::kWinA, O::kTie, O::kLossA, O::kInvalid, O::kInvalid};
  const WinRate r = win_rate(outcomes, 1000, 1);
  EXPECT_EQ(r.wins, 2);
  EXPECT_EQ(r.ties, 1);
  EXPECT_EQ(r.losses, 1);
  EXPECT_EQ(r.invalid, 2);
  EXPECT_NEAR(r.win_rate, 2.5 / 4.0, 1e-12);  // the invalid pairs change nothing
  EXPECT_NEAR(r.p_value, sign_test_p_value(2, 1), 1e-12);
  EXPECT_LE(r.ci_low, r.win_rate);
  EXPECT_GE(r.ci_high, r.win_rate);
}

TEST(WinRate, BootstrapIntervalBehaves) {
  // All wins: every resample is all wins, so the interval is the single point 1.
  const WinRate all = win_rate(std::vector<O>(20, O::kWinA), 1000, 3);
  EXPECT_EQ(all.ci_low, 1.0);
  EXPECT_EQ(all.ci_high, 1.0);
  // A policy against itself: 100 wins and 100 losses; the interval contains 0.5 and its width
  // is about 2 * 1.96 * sqrt(0.25 / 200) = 0.139.
  std::vector<O> even(100, O::kWinA);
  even.insert(even.end(), 100, O::kLossA);
  const WinRate e = win_rate(even, 2000, 5);
  EXPECT_LT(e.ci_low, 0.5);
  EXPECT_GT(e.ci_high, 0.5);
  EXPECT_NEAR(e.ci_high - e.ci_low, 0.139, 0.02);
  // 140 wins of 200: the interval sits above 0.5.
  std::vector<O> better(140, O::kWinA);
  better.insert(better.end(), 60, O::kLossA);
  EXPECT_GT(win_rate(better, 2000, 5).ci_low, 0.5);
  // Deterministic for a seed.
  EXPECT_EQ(win_rate(even, 1000, 9).ci_low, win_rate(even, 1000, 9).ci_low);
  EXPECT_THROW(win_rate(even, 0, 1), Error);
}

TEST(BradleyTerry, TwoModelsGiveTheOddsSeen) {
  // A beats B 3 times of 4: the MLE (no prior) has exp(theta_A - theta_B) = 3.
  const std::vector<PairwiseResult> results = {{0, 1, 1}, {0, 1, 1}, {0, 1, 1}, {0, 1, 0}};
  const std::vector<double> theta = bradley_terry(2, results, 0.0);
  EXPECT_NEAR(theta[0] - theta[1], std::log(3.0), 1e-6);
  EXPECT_NEAR(theta[0] + theta[1], 0.0, 1e-9);
  // Ties count half: 2 ties and 1 win for A -> 2 : 1.
  const std::vector<double> tied = bradley_terry(2, {{0, 1, 0.5}, {0, 1, 0.5}, {0, 1, 1}}, 0.0);
  EXPECT_NEAR(tied[0] - tied[1], std::log(2.0), 1e-6);
}

TEST(BradleyTerry, RecoversAnOrderingAndStaysFiniteForAPerfectRecord) {
  // Three models with strengths 0, 1, 2 (log scale): sample many games, fit, compare.
  const double truth[3] = {0.0, 1.0, 2.0};
  Rng rng(11);
  std::vector<PairwiseResult> results;
  for (int g = 0; g < 6000; ++g) {
    const int i = int(rng.uniform_int(0, 2));
    const int j = (i + 1 + int(rng.uniform_int(0, 1))) % 3;
    const double p = 1 / (1 + std::exp(truth[j] - truth[i]));
    results.push_back({i, j, rng.uniform() < p ? 1.0 : 0.0});
  }
  const std::vector<double> theta = bradley_terry(3, results, 0.0);
  EXPECT_NEAR(theta[1] - theta[0], 1.0, 0.15);
  EXPECT_NEAR(theta[2] - theta[1], 1.0, 0.15);
  // A model that won every game: finite with the prior, and ranked first.
  const std::vector<double> perfect = bradley_terry(2, {{0, 1, 1}, {0, 1, 1}}, 0.5);
  EXPECT_TRUE(std::isfinite(perfect[0]));
  EXPECT_GT(perfect[0], perfect[1]);
  EXPECT_THROW(bradley_terry(2, {{0, 0, 1}}), Error);
}

TEST(LengthControlledWinRate, EqualsThePlainRateWithoutLengthDifferences) {
  const std::vector<double> pref = {1, 1, 0.5, 0, 1};
  const std::vector<double> zero(pref.size(), 0.0);
  EXPECT_NEAR(length_controlled_win_rate(pref, zero), 3.5 / 5.0, 1e-6);
}

TEST(LengthControlledWinRate, RemovesAPreferenceThatIsOnlyAboutLength) {
  // The judge prefers the longer answer and nothing else: P(A) = sigmoid(0.5 * dlen). A's
  // answers are longer on average, so its raw win rate is high; at equal length it is 0.5.
  Rng rng(4);
  std::vector<double> pref, dlen;
  double raw = 0;
  for (int k = 0; k < 4000; ++k) {
    const double d = std::round(rng.normal() * 3 + 2);
    const double p = 1 / (1 + std::exp(-0.5 * d));
    pref.push_back(rng.uniform() < p ? 1.0 : 0.0);
    dlen.push_back(d);
    raw += pref.back();
  }
  raw /= double(pref.size());
  EXPECT_GT(raw, 0.6);
  EXPECT_NEAR(length_controlled_win_rate(pref, dlen), 0.5, 0.04);
  EXPECT_THROW(length_controlled_win_rate({1}, {}), Error);
}

}  // namespace
}  // namespace rlhf
