#pragma once
// The RL objective of the learner, as plain functions over numbers (no model, no services), so
// every piece is unit-tested on its own:
//
//   GRPO advantages   A_i = (r_i - mean(r_group)) / (std(r_group) + eps), per prompt group
//   PPO surrogate     rho = pi_theta / pi_actor (per token), clipped to [1 - eps, 1 + eps];
//                     for A < 0 additionally bounded below by tis_cap * A (dual clip), which is
//                     the truncation of the importance weight against the actor's logprobs
//   KL penalty        k3(theta || ref) = exp(ref - theta) - (ref - theta) - 1, times kl_coef
//
// The model trains on a weighted cross-entropy (Transformer::forward_backward: loss = sum of
// weight * -log p). Any per-token loss L(log p_theta) has the same gradient as that weighted
// cross-entropy with weight = -dL/d(log p_theta), evaluated at the current parameters. So the
// learner first runs a forward to get log p_theta, turns each token's loss into such a weight
// here, and then runs forward_backward with those weights: one code path for SFT and RL.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace rlhf {

struct RlObjectiveConfig {
  double clip_eps = 0.2;   // PPO clipping of rho to [1 - clip_eps, 1 + clip_eps]
  double tis_cap = 3.0;    // dual clip: for A < 0 the surrogate never goes below tis_cap * A
  double kl_coef = 0.02;   // weight of the k3 KL estimate against the frozen reference
  double adv_eps = 1e-6;   // added to the group's std in the advantage normalization

  void validate(const std::string& path) const;  // rlhf::Error naming the bad key
};

// Group-normalized advantages: rewards come in groups of `group_size` consecutive entries (the
// samples of one prompt). A group whose rewards are all equal carries no preference: its
// advantages are 0 (the formula gives 0/eps = 0 as well; stated for clarity).
std::vector<double> grpo_advantages(std::span<const double> rewards, int group_size,
                                    double adv_eps);

// One response token's share of the loss and its gradient weight.
struct RlTokenTerm {
  double loss = 0;        // -surrogate + kl_coef * k3, before normalization
  double weight = 0;      // -d loss / d log p_theta: the cross-entropy weight with the same gradient
  double ratio = 1;       // rho = exp(logp_theta - logp_actor)
  bool clipped = false;   // the surrogate is on a flat (clipped) piece: no policy gradient
  double kl = 0;          // k3 estimate at this token
};

RlTokenTerm rl_token_term(double advantage, double logp_theta, double logp_actor,
                          double logp_ref, const RlObjectiveConfig& config);

// log softmax(row)[token] and the entropy of softmax(row), in double precision.
struct TokenLogprob {
  double logprob = 0;
  double entropy = 0;
};
template <typename T>
TokenLogprob token_logprob(std::span<const T> logits_row, int32_t token) {
  double max_logit = -INFINITY;
  for (T v : logits_row) max_logit = std::max(max_logit, double(v));
  double sum = 0, weighted = 0;
  for (T v : logits_row) {
    const double e = std::exp(double(v) - max_logit);
    sum += e;
    weighted += e * (double(v) - max_logit);
  }
  const double log_z = std::log(sum);
  return {double(logits_row[size_t(token)]) - max_logit - log_z, log_z - weighted / sum};
}

}  // namespace rlhf
