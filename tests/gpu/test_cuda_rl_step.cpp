// One RL step's loss and gradients (learner/rl_gradients.h, what RlTrainer::train_on runs
// between the services) on CudaOps<float> against CpuOps<float>: the same policy, reference,
// rollouts, advantages and actor logprobs; the loss, the per-token statistics, the gradient
// norm and the whole gradient compared. Skips when no CUDA device is present.
//
// Setup: a small MoE policy (init_std 0.3, so the distributions are not flat) generates 4
// samples for each of 3 prompts on the CPU; GRPO advantages come from fixed rewards; the
// reference is the policy before a small perturbation of every weight, so the KL term is
// neither zero nor dominant; the actor logprobs are the generator's own shifted by fixed
// offsets of 0, +-0.15 and +-0.3 nats, so the ratios sit near 1, 0.86, 0.74, 1.16 and 1.35:
// some on the clipped pieces (clip_eps 0.2: [0.8, 1.2]), none within 0.03 of a clip boundary.
// max_batch 5 makes chunks of 5, 5 and 2 rollouts of different lengths (padding).
//
// Tolerances:
//  - Per-token log p: the logits agree to 1e-5 of max|logit| (test_cuda_model's bound, measured
//    3.5e-7), here ~1e-6 absolute, so log p within ~1e-5 per token.
//  - The loss, kLossTol = 5e-5 absolute: each token's term moves with log p at the rate of its
//    weight, |w| <= rho |A| + kl_coef |1 - exp(delta)| <= ~2.5 here (|A| <= 1.8, rho <= 1.35),
//    so 1e-5 per token bounds the mean's error by 2.5e-5 even with every error aligned. A wrong
//    logits row moves the loss by 1e-2 and more.
//  - The mean KL, entropy and |log p - log p_actor|: means of smooth functions of log p, within
//    1e-5 absolute each.
//  - Clipped tokens: the same count (no ratio within 0.03 of a boundary, rounding is 1e-5).
//  - Gradients, kGradTol = 1e-4 relative (the gradient norm, and ||g_gpu - g_cpu|| / ||g_cpu||
//    over all parameters): test_cuda_model bounds a plain training step's gradient tensors by
//    1e-5 (measured 6e-7). The RL weights add their own ~1e-5 relative error, and the weights
//    of positive and negative advantages cancel in the sum, which magnifies relative errors by
//    the ratio of the sum of |terms| to |sum|; 10x covers that here. A wrong weight or row gives
//    an O(1) relative error.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <memory>
#include <vector>

#include "common/rng.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cuda/cuda_ops.h"
#include "learner/optimizer.h"
#include "learner/rl_gradients.h"
#include "learner/rl_objective.h"
#include "model/generate.h"
#include "model/tokenizer.h"
#include "model/transformer.h"
#include "tests/gpu/gpu_test_support.h"
#include "tests/test_support.h"

namespace rlhf {
namespace {

constexpr double kLossTol = 5e-5;
constexpr double kStatTol = 1e-5;
constexpr double kGradTol = 1e-4;

ModelConfig small_config() {
  ModelConfig c = small_moe_config();
  c.seq_balance_loss = 0.01;  // the balance loss's gradient is part of the step too
  return c;
}

// The reference is init_random(7); the policy is the same plus 2% Gaussian noise on every
// weight.
void init_policy(Transformer<float>& policy) {
  policy.init_random(7);
  std::vector<float> params(size_t(policy.layout().total()));
  policy.ops().copy_to_host(params.data(), policy.params(), sizeof(float) * params.size());
  Rng rng(8);
  for (float& p : params) p += float(0.02 * std::abs(p) * rng.normal());
  policy.ops().copy_from_host(policy.params(), params.data(), sizeof(float) * params.size());
  policy.params_changed();
}

struct StepResult {
  RlGradientStats stats;
  double grad_norm = 0;
  std::vector<float> grads;
};

class CudaRlStepTest : public testing::Test {
 protected:
  static constexpr int kMaxBatch = 5;
  static constexpr int kSamples = 4;  // per prompt (the GRPO group)

  void SetUp() override {
    SKIP_WITHOUT_GPU();
    gpu_ = std::make_unique<CudaOps<float>>();
  }

  StepResult run_step(Ops<float>& ops, const std::vector<RlRollout>& rollouts) {
    const ModelConfig config = small_config();
    Transformer<float> policy(ops, config, kMaxBatch, config.max_seq_len);
    Transformer<float> reference(ops, config, kMaxBatch, config.max_seq_len);
    reference.init_random(7);
    init_policy(policy);
    StepResult r;
    r.stats = rl_accumulate_gradients(policy, reference, rollouts, kMaxBatch,
                                      ByteTokenizer::kPad, RlObjectiveConfig{});
    const AdamW<float> optimizer(ops, policy.layout(), OptimizerConfig{});
    r.grad_norm = optimizer.grad_norm(policy.grads());
    r.grads.resize(size_t(policy.layout().total()));
    ops.copy_to_host(r.grads.data(), policy.grads(), sizeof(float) * r.grads.size());
    return r;
  }

  CpuOps<float> cpu_;
  std::unique_ptr<CudaOps<float>> gpu_;
};

TEST_F(CudaRlStepTest, LossAndGradientsMatchCpu) {
  // Rollouts from the policy itself, on the CPU: prompts, responses, logprobs.
  const ModelConfig config = small_config();
  Transformer<float> policy(cpu_, config, kMaxBatch, config.max_seq_len);
  init_policy(policy);
  ByteTokenizer tokenizer;
  Generator generator(policy, tokenizer, kMaxBatch);
  SamplingParams params;
  params.seed = 5;
  params.max_new_tokens = 10;
  std::vector<std::vector<int32_t>> prompts;
  Rng rng(3);
  for (int n : {4, 9, 15}) {
    std::vector<int32_t> p(static_cast<size_t>(n));
    for (auto& t : p) t = int32_t(rng.uniform_int(0, 255));
    for (int s = 0; s < kSamples; ++s) prompts.push_back(p);
  }
  const std::vector<Generation> gens = generator.generate(prompts, params);
  const std::vector<double> rewards = {1, 0, 0, 1, 3, 1, 2, 0, 0, 0, 5, 1};
  const std::vector<double> advantages = grpo_advantages(rewards, kSamples, 1e-6);
  std::vector<std::vector<float>> actor_logprobs(gens.size());
  std::vector<RlRollout> rollouts;
  int64_t tokens = 0;
  for (size_t i = 0; i < gens.size(); ++i) {
    for (size_t j = 0; j < gens[i].logprobs.size(); ++j) {
      const double offset = 0.15 * double(int((i * 7 + j * 3) % 5) - 2);
      actor_logprobs[i].push_back(float(gens[i].logprobs[j] + offset));
    }
    tokens += int64_t(gens[i].tokens.size());
  }
  for (size_t i = 0; i < gens.size(); ++i) {
    rollouts.push_back({gens[i].prompt_tokens, gens[i].tokens, actor_logprobs[i], advantages[i]});
  }

  const StepResult c = run_step(cpu_, rollouts);
  const StepResult g = run_step(*gpu_, rollouts);
  ASSERT_EQ(c.stats.tokens, tokens);
  ASSERT_EQ(g.stats.tokens, tokens);
  ASSERT_GT(c.stats.clipped, 0) << "the setup should put some tokens on a clipped piece";
  ASSERT_LT(c.stats.clipped, tokens);
  ASSERT_GT(c.grad_norm, 0);

  EXPECT_NEAR(g.stats.loss, c.stats.loss, kLossTol);
  const double n = double(tokens);
  EXPECT_NEAR(g.stats.kl_sum / n, c.stats.kl_sum / n, kStatTol) << "mean KL";
  EXPECT_NEAR(g.stats.entropy_sum / n, c.stats.entropy_sum / n, kStatTol) << "mean entropy";
  EXPECT_NEAR(g.stats.mismatch_sum / n, c.stats.mismatch_sum / n, kStatTol) << "mean mismatch";
  EXPECT_EQ(g.stats.clipped, c.stats.clipped);
  EXPECT_NEAR(g.grad_norm, c.grad_norm, kGradTol * c.grad_norm);
  double diff = 0, norm = 0;
  for (size_t i = 0; i < c.grads.size(); ++i) {
    const double d = double(g.grads[i]) - double(c.grads[i]);
    diff += d * d;
    norm += double(c.grads[i]) * double(c.grads[i]);
  }
  const double rel = std::sqrt(diff / norm);
  EXPECT_LT(rel, kGradTol) << "||g_gpu - g_cpu|| / ||g_cpu||";  // NaN fails too
  std::printf("  %lld tokens, %lld clipped; loss %.9g vs %.9g; mean kl %.6g; grad norm %.9g vs "
              "%.9g; gradient rel error %.3g\n",
              (long long)tokens, (long long)c.stats.clipped, g.stats.loss, c.stats.loss,
              c.stats.kl_sum / n, g.grad_norm, c.grad_norm, rel);
}

}  // namespace
}  // namespace rlhf
