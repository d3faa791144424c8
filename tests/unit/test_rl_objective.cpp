// The RL objective (learner/rl_objective.h): GRPO advantages, the clipped surrogate with its
// dual clip and the k3 KL term, and the identity the learner relies on: a weighted
// cross-entropy with weight = -dL/d(log p) has the gradient of the RL loss L, through the whole
// model.
//
// Tolerances: the per-token derivative is checked by central differences in double with
// h = 1e-6 (error ~1e-9 relative to terms of order 1; we allow 1e-6). The model-level check
// uses the double model and the same 1e-5 relative tolerance as tests/unit/test_gradients.cpp,
// for the same reasons (truncation O(h^2), rounding O(eps / h)).
#include <cmath>
#include <vector>

#include <gtest/gtest.h>

#include "common/error.h"
#include "common/rng.h"
#include "kernels/cpu/cpu_ops.h"
#include "learner/rl_objective.h"
#include "model/transformer.h"

namespace rlhf {
namespace {

TEST(GrpoAdvantages, NormalizesEachGroupOnItsOwn) {
  const std::vector<double> rewards = {1, 2, 3, 4, 10, 10, 10, 10, 0, 0, 0, 8};
  const std::vector<double> adv = grpo_advantages(rewards, 4, 1e-6);
  ASSERT_EQ(adv.size(), rewards.size());
  // Group 1: mean 2.5, population std sqrt(1.25).
  const double s = std::sqrt(1.25);
  EXPECT_NEAR(adv[0], -1.5 / s, 1e-5);
  EXPECT_NEAR(adv[3], 1.5 / s, 1e-5);
  // Group 2: all equal -> no preference.
  for (int i = 4; i < 8; ++i) EXPECT_EQ(adv[size_t(i)], 0.0);
  // Group 3: one good sample among four: it alone gets a positive advantage.
  EXPECT_GT(adv[11], 0);
  for (int i = 8; i < 11; ++i) EXPECT_LT(adv[size_t(i)], 0);
  for (int g = 0; g < 3; ++g) {
    double sum = 0;
    for (int i = 0; i < 4; ++i) sum += adv[size_t(g * 4 + i)];
    EXPECT_NEAR(sum, 0.0, 1e-9);
  }
  EXPECT_THROW(grpo_advantages(rewards, 5, 1e-6), Error);
  EXPECT_THROW(grpo_advantages(rewards, 0, 1e-6), Error);
}

TEST(RlTokenTerm, WeightIsMinusTheLossDerivative) {
  RlObjectiveConfig config;
  config.kl_coef = 0.1;
  Rng rng(3);
  int checked = 0;
  for (int trial = 0; trial < 400; ++trial) {
    const double adv = rng.normal();
    const double actor = -3.0 * rng.uniform();
    const double theta = actor + 0.4 * rng.normal();
    const double ref = theta + 0.5 * rng.normal();
    const RlTokenTerm term = rl_token_term(adv, theta, actor, ref, config);
    const double h = 1e-6;
    const double up = rl_token_term(adv, theta + h, actor, ref, config).loss;
    const double down = rl_token_term(adv, theta - h, actor, ref, config).loss;
    // Skip points within h of a clip boundary, where the loss has a kink.
    if (rl_token_term(adv, theta + h, actor, ref, config).clipped !=
        rl_token_term(adv, theta - h, actor, ref, config).clipped)
      continue;
    EXPECT_NEAR(term.weight, -(up - down) / (2 * h), 1e-6 * std::max(1.0, std::abs(term.weight)))
        << "adv " << adv << " theta " << theta << " actor " << actor << " ref " << ref;
    ++checked;
  }
  EXPECT_GT(checked, 350);
}

TEST(RlTokenTerm, ClippingAndDualClip) {
  RlObjectiveConfig config;
  config.kl_coef = 0;  // isolate the surrogate
  // On-policy (rho = 1): the weight is the advantage itself, nothing clipped.
  RlTokenTerm t = rl_token_term(0.7, -1.0, -1.0, -1.0, config);
  EXPECT_NEAR(t.weight, 0.7, 1e-12);
  EXPECT_FALSE(t.clipped);
  EXPECT_NEAR(t.kl, 0.0, 1e-12);
  // A > 0 and rho above 1 + eps: the update would overshoot, so no gradient.
  t = rl_token_term(1.0, std::log(1.5), 0.0, 0.0, config);
  EXPECT_TRUE(t.clipped);
  EXPECT_EQ(t.weight, 0.0);
  // A > 0 and rho below 1 - eps: still pushed up (the min picks the unclipped term).
  t = rl_token_term(1.0, std::log(0.5), 0.0, 0.0, config);
  EXPECT_FALSE(t.clipped);
  EXPECT_NEAR(t.weight, 0.5, 1e-12);
  // A < 0 and rho below 1 - eps: already pushed down far enough.
  t = rl_token_term(-1.0, std::log(0.5), 0.0, 0.0, config);
  EXPECT_TRUE(t.clipped);
  EXPECT_EQ(t.weight, 0.0);
  // A < 0 and rho = 2 (< tis_cap 3): unclipped, weight rho * A.
  t = rl_token_term(-1.0, std::log(2.0), 0.0, 0.0, config);
  EXPECT_FALSE(t.clipped);
  EXPECT_NEAR(t.weight, -2.0, 1e-12);
  // A < 0 and rho = 10: the dual clip bounds the loss at tis_cap * |A| and stops the gradient.
  t = rl_token_term(-1.0, std::log(10.0), 0.0, 0.0, config);
  EXPECT_TRUE(t.clipped);
  EXPECT_EQ(t.weight, 0.0);
  EXPECT_NEAR(t.loss, 3.0, 1e-12);
  // The KL term alone pulls log p toward the reference: weight > 0 when theta < ref.
  config.kl_coef = 0.5;
  t = rl_token_term(0.0, -2.0, -2.0, -1.0, config);
  EXPECT_GT(t.weight, 0);
  EXPECT_NEAR(t.kl, std::exp(1.0) - 1.0 - 1.0, 1e-12);
}

TEST(RlObjectiveConfig, RejectsBadValues) {
  RlObjectiveConfig c;
  c.clip_eps = 0;
  EXPECT_THROW(c.validate("rl"), Error);
  c = {};
  c.tis_cap = 1.1;
  EXPECT_THROW(c.validate("rl"), Error);
  c = {};
  c.kl_coef = -1;
  EXPECT_THROW(c.validate("rl"), Error);
  c = {};
  EXPECT_NO_THROW(c.validate("rl"));
}

TEST(TokenLogprob, MatchesDirectSoftmax) {
  const std::vector<float> row = {1.0f, -2.0f, 0.5f, 3.0f};
  double z = 0;
  for (float v : row) z += std::exp(double(v));
  const TokenLogprob lp = token_logprob(std::span<const float>(row), 2);
  EXPECT_NEAR(lp.logprob, 0.5 - std::log(z), 1e-12);
  double entropy = 0;
  for (float v : row) {
    const double p = std::exp(double(v)) / z;
    entropy -= p * std::log(p);
  }
  EXPECT_NEAR(lp.entropy, entropy, 1e-12);
}

// The learner's identity, end to end through the double-precision model: the gradient of the
// RL loss (mean over response tokens of rl_token_term(...).loss) equals the gradient that
// forward_backward computes with weights rl_token_term(...).weight / tokens.
TEST(RlObjectiveThroughModel, WeightedCrossEntropyHasTheRlGradient) {
  ModelConfig c;
  c.vocab_size = 11;
  c.d_model = 8;
  c.n_layers = 2;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.head_dim = 4;
  c.max_seq_len = 8;
  c.n_dense_layers = 1;
  c.d_ff = 12;
  c.n_routed_experts = 4;
  c.n_shared_experts = 1;
  c.top_k = 2;
  c.d_expert = 6;
  CpuOps<double> ops;
  Transformer<double> model(ops, c, 2, 8);
  model.init_random(5);
  Rng rng(17);
  const int B = 2, T = 8, V = c.vocab_size;
  TokenBatch batch;
  batch.batch = B;
  batch.seq_len = T;
  for (int i = 0; i < B * T; ++i) {
    batch.tokens.push_back(int32_t(rng.uniform_int(0, V - 1)));
    batch.targets.push_back(int32_t(rng.uniform_int(0, V - 1)));
  }
  const std::vector<double> advantage = {0.8, -1.3};
  // Positions 3.. of each sequence are the "response".
  auto is_response = [](int pos) { return pos >= 3; };
  const int n_tokens = B * (T - 3);
  RlObjectiveConfig config;
  config.kl_coef = 0.05;
  std::vector<double> actor(B * T), ref(B * T);
  RoutingTrace trace;
  const double* logits = model.forward(batch.tokens.data(), B, T, nullptr, nullptr, &trace);
  for (int i = 0; i < B * T; ++i) {
    const double lp =
        token_logprob(std::span<const double>(logits + size_t(i) * V, size_t(V)), batch.targets[i])
            .logprob;
    actor[size_t(i)] = lp + 0.15 * rng.normal();  // a slightly different behaviour policy
    ref[size_t(i)] = lp + 0.3 * rng.normal();
  }
  auto rl_loss = [&]() {
    const double* l = model.forward(batch.tokens.data(), B, T, nullptr, nullptr, nullptr, &trace);
    double loss = 0;
    for (int i = 0; i < B * T; ++i) {
      if (!is_response(i % T)) continue;
      const double lp =
          token_logprob(std::span<const double>(l + size_t(i) * V, size_t(V)), batch.targets[i])
              .logprob;
      loss += rl_token_term(advantage[size_t(i / T)], lp, actor[size_t(i)], ref[size_t(i)], config).loss;
    }
    return loss / n_tokens;
  };
  // Weights at the current parameters.
  logits = model.forward(batch.tokens.data(), B, T, nullptr, nullptr, nullptr, &trace);
  batch.weights.assign(size_t(B * T), 0.0f);
  int clipped = 0;
  for (int i = 0; i < B * T; ++i) {
    if (!is_response(i % T)) continue;
    const double lp =
        token_logprob(std::span<const double>(logits + size_t(i) * V, size_t(V)), batch.targets[i])
            .logprob;
    const RlTokenTerm term =
        rl_token_term(advantage[size_t(i / T)], lp, actor[size_t(i)], ref[size_t(i)], config);
    batch.weights[size_t(i)] = float(term.weight / n_tokens);
    clipped += term.clipped;
  }
  // Float weights lose ~1e-8 relative: far inside the tolerance below.
  model.zero_grads();
  model.forward_backward(batch, &trace);
  const int64_t n = model.layout().total();
  const std::vector<double> analytic(model.grads(), model.grads() + n);
  double scale = 1e-3;
  for (double g : analytic) scale = std::max(scale, std::abs(g));
  int compared = 0;
  for (int64_t i = 0; i < n; i += std::max<int64_t>(1, n / 60)) {
    const double saved = model.params()[i];
    const double h = 1e-6;
    model.params()[i] = saved + h;
    const double up = rl_loss();
    model.params()[i] = saved - h;
    const double down = rl_loss();
    model.params()[i] = saved;
    EXPECT_NEAR(analytic[size_t(i)], (up - down) / (2 * h), 1e-5 * scale) << "parameter " << i;
    ++compared;
  }
  EXPECT_GT(compared, 50);
  EXPECT_GT(scale, 1e-3) << "the gradient must not vanish, or the check proves nothing";
}

}  // namespace
}  // namespace rlhf
