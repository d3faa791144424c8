#include "reward/preference_stats.h"

#include <algorithm>
#include <cmath>
#include <tuple>

#include "common/error.h"
#include "common/rng.h"

namespace rlhf {

namespace {

double rate_of(int wins, int ties, int losses) {
  const int valid = wins + ties + losses;
  return valid == 0 ? 0.5 : (wins + 0.5 * ties) / double(valid);
}

}  // namespace

double sign_test_p_value(int wins, int losses) {
  const int n = wins + losses;
  if (n == 0) return 1.0;
  const int k = std::max(wins, losses);
  // P(X >= k) for X ~ Binomial(n, 1/2), summed in log space so large n does not overflow.
  double tail = 0;
  for (int x = k; x <= n; ++x)
    tail += std::exp(std::lgamma(n + 1.0) - std::lgamma(x + 1.0) - std::lgamma(n - x + 1.0) -
                     n * std::log(2.0));
  // Two-sided: both tails; an exactly even split has p = 1.
  return std::min(1.0, 2 * tail);
}

std::pair<double, double> percentile_interval(std::vector<double> values, double confidence) {
  if (values.empty()) fail("percentile_interval: no values");
  std::sort(values.begin(), values.end());
  const double alpha = (1 - confidence) / 2;
  // Linear interpolation between order statistics.
  auto quantile = [&](double q) {
    const double pos = q * double(values.size() - 1);
    const size_t lo = size_t(std::floor(pos));
    const size_t hi = std::min(values.size() - 1, lo + 1);
    return values[lo] + (pos - double(lo)) * (values[hi] - values[lo]);
  };
  return {quantile(alpha), quantile(1 - alpha)};
}

WinRate win_rate(const std::vector<PairOutcome>& outcomes, int resamples, uint64_t seed,
                 double confidence) {
  if (resamples < 1) fail("win_rate: resamples must be >= 1, got {}", resamples);
  if (!(confidence > 0 && confidence < 1))
    fail("win_rate: confidence must be in (0, 1), got {}", confidence);
  WinRate r;
  for (PairOutcome o : outcomes) {
    r.wins += o == PairOutcome::kWinA;
    r.ties += o == PairOutcome::kTie;
    r.losses += o == PairOutcome::kLossA;
    r.invalid += o == PairOutcome::kInvalid;
  }
  r.win_rate = rate_of(r.wins, r.ties, r.losses);
  r.p_value = sign_test_p_value(r.wins, r.losses);
  if (outcomes.empty()) return r;
  Rng rng(seed);
  std::vector<double> rates(static_cast<size_t>(resamples));
  const int64_t n = int64_t(outcomes.size());
  for (double& rate : rates) {
    int w = 0, t = 0, l = 0;
    for (int64_t i = 0; i < n; ++i) {
      const PairOutcome o = outcomes[size_t(rng.uniform_int(0, n - 1))];
      w += o == PairOutcome::kWinA;
      t += o == PairOutcome::kTie;
      l += o == PairOutcome::kLossA;
    }
    rate = rate_of(w, t, l);
  }
  std::tie(r.ci_low, r.ci_high) = percentile_interval(std::move(rates), confidence);
  return r;
}

std::vector<double> bradley_terry(int n_models, const std::vector<PairwiseResult>& results,
                                  double prior, int max_iterations, double tolerance) {
  if (n_models < 1) fail("bradley_terry: need at least one model");
  std::vector<double> wins(size_t(n_models), 0.0);
  std::vector<std::vector<double>> games(size_t(n_models),
                                         std::vector<double>(size_t(n_models), 0.0));
  for (const PairwiseResult& r : results) {
    if (r.i < 0 || r.j < 0 || r.i >= n_models || r.j >= n_models || r.i == r.j)
      fail("bradley_terry: comparison between models {} and {} of {}", r.i, r.j, n_models);
    if (!(r.score_i >= 0 && r.score_i <= 1))
      fail("bradley_terry: score {} is not in [0, 1]", r.score_i);
    wins[size_t(r.i)] += r.score_i;
    wins[size_t(r.j)] += 1 - r.score_i;
    games[size_t(r.i)][size_t(r.j)] += 1;
    games[size_t(r.j)][size_t(r.i)] += 1;
  }
  // MM update (Hunter 2004): p_i <- W_i / sum_j n_ij / (p_i + p_j), with the prior as
  // `prior` games won half against an opponent of strength 1 (the geometric mean).
  std::vector<double> p(size_t(n_models), 1.0);
  for (int iteration = 0; iteration < max_iterations; ++iteration) {
    std::vector<double> next(static_cast<size_t>(n_models));
    for (int i = 0; i < n_models; ++i) {
      double denominator = 2 * prior / (p[size_t(i)] + 1.0);
      for (int j = 0; j < n_models; ++j)
        if (games[size_t(i)][size_t(j)] > 0)
          denominator += games[size_t(i)][size_t(j)] / (p[size_t(i)] + p[size_t(j)]);
      if (denominator == 0) fail("bradley_terry: model {} has no comparison", i);
      next[size_t(i)] = (wins[size_t(i)] + prior) / denominator;
    }
    // Renormalize to geometric mean 1 so the prior's opponent stays the average model.
    double log_mean = 0;
    for (double v : next) log_mean += std::log(v);
    log_mean /= n_models;
    double change = 0;
    for (int i = 0; i < n_models; ++i) {
      next[size_t(i)] /= std::exp(log_mean);
      change = std::max(change, std::abs(std::log(next[size_t(i)]) - std::log(p[size_t(i)])));
    }
    p = next;
    if (change < tolerance) break;
  }
  std::vector<double> theta(static_cast<size_t>(n_models));
  for (int i = 0; i < n_models; ++i) theta[size_t(i)] = std::log(p[size_t(i)]);
  return theta;
}

double length_controlled_win_rate(const std::vector<double>& preference,
                                  const std::vector<double>& length_difference) {
  if (preference.size() != length_difference.size())
    fail("length_controlled_win_rate: {} preferences but {} length differences",
         preference.size(), length_difference.size());
  if (preference.empty()) return 0.5;
  // Newton's method on the two-parameter logistic log-likelihood with fractional targets.
  double a = 0, b = 0;
  for (int iteration = 0; iteration < 100; ++iteration) {
    double g0 = 0, g1 = 0, h00 = 0, h01 = 0, h11 = 0;
    for (size_t k = 0; k < preference.size(); ++k) {
      const double x = length_difference[k];
      const double p = 1 / (1 + std::exp(-(a + b * x)));
      const double residual = preference[k] - p;
      const double w = p * (1 - p);
      g0 += residual;
      g1 += residual * x;
      h00 += w;
      h01 += w * x;
      h11 += w * x * x;
    }
    // A tiny ridge keeps the step defined when every length difference is 0 (then b stays 0)
    // or the data separate perfectly.
    h00 += 1e-9;
    h11 += 1e-9;
    const double det = h00 * h11 - h01 * h01;
    const double da = (h11 * g0 - h01 * g1) / det;
    const double db = (h00 * g1 - h01 * g0) / det;
    a += da;
    b += db;
    if (std::abs(da) + std::abs(db) < 1e-12) break;
  }
  return 1 / (1 + std::exp(-a));
}

}  // namespace rlhf
