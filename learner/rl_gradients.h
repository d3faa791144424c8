#pragma once
// The model half of one RL step (RlTrainer::train_on): the objective of learner/rl_objective.h
// over a batch of rollouts, its value and its gradient in the policy's grads(), on whichever
// backend the two models run on. Per chunk of at most max_batch rollouts:
//
//   reference forward -> log p_ref of every response token
//   policy forward    -> log p_theta, entropy -> rl_token_term per token -> its weight
//   policy forward_backward with those weights (the weighted cross-entropy with the same
//   gradient as the objective; rl_objective.h says why)
//
// The logits stay in the backend's memory; what the per-token terms need crosses to the host
// as one copy per rollout and forward (its response rows, [response tokens, V]), never per
// token. Kept apart from RlTrainer, which needs the services, so that a test can run exactly
// this on two backends.
#include <cstdint>
#include <span>

#include "learner/rl_objective.h"
#include "model/transformer.h"

namespace rlhf {

// One rollout to train on: the model reads prompt + response without its last token, and
// response token j is predicted at position prompt.size() - 1 + j.
struct RlRollout {
  std::span<const int32_t> prompt;          // at least one token
  std::span<const int32_t> response;        // the sampled tokens
  std::span<const float> actor_logprobs;    // [response.size()] the actor's log p of each
  double advantage = 0;
};

struct RlGradientStats {
  double loss = 0;          // sum over response tokens of term.loss / tokens
  int64_t tokens = 0;       // response tokens
  int64_t clipped = 0;      // tokens on a clipped piece of the surrogate
  double kl_sum = 0;        // sums over tokens: the k3 estimate, the policy's entropy,
  double entropy_sum = 0;   //   |log p_theta - log p_actor|
  double mismatch_sum = 0;
  double mismatch_max = 0;
};

// Zeroes policy.grads(), then adds the gradient of the objective (mean over all response
// tokens of `rollouts`) to them. `reference` is the frozen KL anchor, of the same config.
// Rollouts without response tokens contribute nothing; with no response token at all the
// gradients stay zero and the stats are zero. `pad` fills the rows of shorter rollouts.
RlGradientStats rl_accumulate_gradients(Transformer<float>& policy,
                                        Transformer<float>& reference,
                                        std::span<const RlRollout> rollouts, int max_batch,
                                        int32_t pad, const RlObjectiveConfig& objective);

}  // namespace rlhf
