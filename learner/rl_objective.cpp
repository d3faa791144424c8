#include "learner/rl_objective.h"

#include <algorithm>
#include <cmath>

#include "common/error.h"

namespace rlhf {

void RlObjectiveConfig::validate(const std::string& path) const {
  if (!(clip_eps > 0 && clip_eps < 1))
    fail("{}.clip_eps: must be in (0, 1), got {}", path, clip_eps);
  if (!(tis_cap > 1 + clip_eps))
    fail("{}.tis_cap: must be above 1 + clip_eps ({}), got {}", path, 1 + clip_eps, tis_cap);
  if (!(kl_coef >= 0) || !std::isfinite(kl_coef))
    fail("{}.kl_coef: must be finite and >= 0, got {}", path, kl_coef);
  if (!(adv_eps > 0)) fail("{}.adv_eps: must be > 0, got {}", path, adv_eps);
}

std::vector<double> grpo_advantages(std::span<const double> rewards, int group_size,
                                    double adv_eps) {
  if (group_size < 1 || rewards.size() % size_t(group_size) != 0)
    fail("grpo_advantages: {} rewards do not split into groups of {}", rewards.size(),
         group_size);
  std::vector<double> advantages(rewards.size(), 0.0);
  for (size_t g = 0; g < rewards.size(); g += size_t(group_size)) {
    double mean = 0;
    for (int i = 0; i < group_size; ++i) mean += rewards[g + i];
    mean /= group_size;
    double var = 0;
    for (int i = 0; i < group_size; ++i) var += (rewards[g + i] - mean) * (rewards[g + i] - mean);
    // Population std: the group is all the samples there are of this prompt.
    const double std_dev = std::sqrt(var / group_size);
    if (std_dev == 0) continue;
    for (int i = 0; i < group_size; ++i)
      advantages[g + i] = (rewards[g + i] - mean) / (std_dev + adv_eps);
  }
  return advantages;
}

RlTokenTerm rl_token_term(double advantage, double logp_theta, double logp_actor,
                          double logp_ref, const RlObjectiveConfig& config) {
  RlTokenTerm term;
  term.ratio = std::exp(logp_theta - logp_actor);
  const double clipped_ratio =
      std::clamp(term.ratio, 1.0 - config.clip_eps, 1.0 + config.clip_eps);
  const double unclipped = term.ratio * advantage;
  double surrogate = std::min(unclipped, clipped_ratio * advantage);
  // The surrogate's gradient with respect to log p_theta is rho * A on the unclipped piece
  // and 0 on the flat ones.
  bool on_unclipped = unclipped <= clipped_ratio * advantage;
  if (advantage < 0 && surrogate < config.tis_cap * advantage) {
    surrogate = config.tis_cap * advantage;  // dual clip: a stale or mismatched token with a
    on_unclipped = false;                    // huge ratio cannot dominate the step
  }
  term.clipped = !on_unclipped && advantage != 0;
  const double delta = logp_ref - logp_theta;
  term.kl = std::exp(delta) - delta - 1.0;
  term.loss = -surrogate + config.kl_coef * term.kl;
  // d(-surrogate)/d logp = -rho * A on the unclipped piece; d k3 / d logp = 1 - exp(delta).
  const double dloss = (on_unclipped ? -term.ratio * advantage : 0.0) +
                       config.kl_coef * (1.0 - std::exp(delta));
  term.weight = -dloss;
  return term;
}

}  // namespace rlhf
