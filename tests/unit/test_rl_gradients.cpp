// The model half of an RL step (learner/rl_gradients.h) on the CPU: its loss and statistics
// against the objective recomputed rollout by rollout from plain forwards, its independence of
// the chunking, and its refusal of malformed rollouts.
//
// Tolerances. A chunk runs its rollouts as one padded batch, whose GEMMs have other shapes than
// a lone sequence's, so the logits differ by float rounding (~1e-6 on logits of size ~3,
// test_generate.cpp measures 3.3e-6 on logprobs). The loss is a mean of terms that move with
// log p at the rate of their weight (|w| <= ~2.5 here), so 1e-5 per token bounds the loss's
// difference by 2.5e-5; we allow 5e-5. Gradients: rel 1e-4, the same rounding through the
// backward (test_gradients.cpp) plus the cancellation between positive and negative advantages.
// Measured (OpenBLAS, 2 threads): |dloss| 4.3e-8, gradient 9.4e-7 relative. Reading the wrong
// logits row moves the loss by 1e-2 and more.
#include <cmath>
#include <cstdio>
#include <vector>

#include <gtest/gtest.h>

#include "common/rng.h"
#include "kernels/cpu/cpu_ops.h"
#include "learner/rl_gradients.h"
#include "learner/rl_objective.h"
#include "model/tokenizer.h"
#include "model/transformer.h"
#include "tests/test_support.h"

namespace rlhf {
namespace {

constexpr double kLossTol = 5e-5;
constexpr double kGradTol = 1e-4;

ModelConfig small_config() {
  ModelConfig c = small_moe_config();
  c.n_layers = 2;  // one dense layer, one MoE layer
  return c;
}

// Rollouts of random tokens with actor logprobs near -5.6 (log 1/262) and advantages of both
// signs; lengths differ so chunks are padded, and one has no response at all.
struct Rollouts {
  std::vector<std::vector<int32_t>> prompts, responses;
  std::vector<std::vector<float>> logprobs;
  std::vector<RlRollout> views;

  Rollouts() {
    Rng rng(11);
    const int prompt_len[] = {3, 7, 1, 5, 9, 4, 6};
    const int response_len[] = {6, 2, 9, 0, 4, 11, 5};
    for (int i = 0; i < 7; ++i) {
      std::vector<int32_t> p(static_cast<size_t>(prompt_len[i]));
      std::vector<int32_t> r(static_cast<size_t>(response_len[i]));
      for (auto& t : p) t = int32_t(rng.uniform_int(0, 255));
      for (auto& t : r) t = int32_t(rng.uniform_int(0, 255));
      std::vector<float> lp;
      for (size_t j = 0; j < r.size(); ++j) lp.push_back(float(-5.6 + 0.4 * rng.normal()));
      prompts.push_back(std::move(p));
      responses.push_back(std::move(r));
      logprobs.push_back(std::move(lp));
    }
    const double advantage[] = {1.2, -0.7, 0.4, 1.0, -1.5, 0.9, -0.3};
    for (int i = 0; i < 7; ++i) {
      views.push_back({prompts[i], responses[i], logprobs[i], advantage[i]});
    }
  }
};

class RlGradientsTest : public testing::Test {
 protected:
  RlGradientsTest()
      : policy(ops, small_config(), 4, small_config().max_seq_len),
        reference(ops, small_config(), 4, small_config().max_seq_len) {
    // The reference is the policy before 2% Gaussian noise on every weight: a KL term of the
    // size RL sees, neither zero nor dominant.
    reference.init_random(1);
    policy.init_random(1);
    float* params = policy.params();
    Rng rng(2);
    for (int64_t i = 0; i < policy.layout().total(); ++i) {
      params[i] += float(0.02 * std::abs(params[i]) * rng.normal());
    }
    policy.params_changed();
  }

  std::vector<float> grads() {
    return std::vector<float>(policy.grads(), policy.grads() + policy.layout().total());
  }

  CpuOps<float> ops;
  Transformer<float> policy, reference;
  Rollouts data;
  const RlObjectiveConfig objective;
};

TEST_F(RlGradientsTest, LossAndStatsAreTheObjectiveOverEveryResponseToken) {
  const RlGradientStats stats = rl_accumulate_gradients(policy, reference, data.views, 4,
                                                        ByteTokenizer::kPad, objective);
  // The same objective, one rollout at a time through plain forwards of prompt + response.
  const int V = small_config().vocab_size;
  int64_t tokens = 0;
  for (const RlRollout& ro : data.views) tokens += int64_t(ro.response.size());
  double loss = 0, kl = 0, entropy = 0;
  int64_t clipped = 0;
  for (const RlRollout& ro : data.views) {
    if (ro.response.empty()) continue;
    std::vector<int32_t> seq(ro.prompt.begin(), ro.prompt.end());
    seq.insert(seq.end(), ro.response.begin(), ro.response.end() - 1);
    const int n = int(seq.size());
    const float* ref = reference.forward(seq.data(), 1, n);
    const std::vector<float> ref_logits(ref, ref + size_t(n) * V);
    const float* pol = policy.forward(seq.data(), 1, n);
    for (size_t j = 0; j < ro.response.size(); ++j) {
      const size_t pos = ro.prompt.size() - 1 + j;
      const auto row = [&](const float* l) {
        return std::span<const float>(l + pos * V, size_t(V));
      };
      const double ref_lp = token_logprob(row(ref_logits.data()), ro.response[j]).logprob;
      const TokenLogprob lp = token_logprob(row(pol), ro.response[j]);
      const RlTokenTerm term =
          rl_token_term(ro.advantage, lp.logprob, ro.actor_logprobs[j], ref_lp, objective);
      loss += term.loss / double(tokens);
      kl += term.kl;
      entropy += lp.entropy;
      clipped += term.clipped;
    }
  }
  EXPECT_EQ(stats.tokens, tokens);
  EXPECT_NEAR(stats.loss, loss, kLossTol);
  EXPECT_NEAR(stats.kl_sum / double(tokens), kl / double(tokens), 1e-5);
  EXPECT_NEAR(stats.entropy_sum / double(tokens), entropy / double(tokens), 1e-5);
  EXPECT_EQ(stats.clipped, clipped);
  // The objective is not trivially small here, or the tolerance above would prove nothing.
  EXPECT_GT(std::abs(loss), 100 * kLossTol);
  std::printf("measured: loss %.9g, batched vs alone |dloss| %.3g; %lld tokens, %lld clipped\n",
              loss, std::abs(stats.loss - loss), (long long)tokens, (long long)clipped);
}

TEST_F(RlGradientsTest, ChunkingChangesOnlyRounding) {
  const RlGradientStats one_chunk = rl_accumulate_gradients(policy, reference, data.views, 4,
                                                            ByteTokenizer::kPad, objective);
  const std::vector<float> g4 = grads();
  // Zeroes the gradients first: a second call does not add to the first.
  const RlGradientStats alone = rl_accumulate_gradients(policy, reference, data.views, 1,
                                                        ByteTokenizer::kPad, objective);
  const std::vector<float> g1 = grads();
  EXPECT_NEAR(alone.loss, one_chunk.loss, kLossTol);
  EXPECT_EQ(alone.clipped, one_chunk.clipped);
  double diff = 0, norm = 0;
  for (size_t i = 0; i < g1.size(); ++i) {
    diff += (double(g1[i]) - double(g4[i])) * (double(g1[i]) - double(g4[i]));
    norm += double(g4[i]) * double(g4[i]);
  }
  ASSERT_GT(norm, 0);
  EXPECT_LT(std::sqrt(diff / norm), kGradTol);
  std::printf("measured: chunks of 4 vs 1: |dloss| %.3g, gradient rel %.3g\n",
              std::abs(alone.loss - one_chunk.loss), std::sqrt(diff / norm));
}

TEST_F(RlGradientsTest, NoResponseTokensLeavesZeroGradients) {
  rl_accumulate_gradients(policy, reference, data.views, 4, ByteTokenizer::kPad, objective);
  const RlRollout empty[] = {data.views[3]};  // a prompt without a response
  const RlGradientStats stats =
      rl_accumulate_gradients(policy, reference, empty, 4, ByteTokenizer::kPad, objective);
  EXPECT_EQ(stats.tokens, 0);
  EXPECT_EQ(stats.loss, 0.0);
  for (float g : grads()) ASSERT_EQ(g, 0.0f);
}

TEST_F(RlGradientsTest, MalformedRolloutsAreAClearError) {
  std::vector<RlRollout> rollouts = data.views;
  rollouts[2].actor_logprobs = rollouts[2].actor_logprobs.first(3);
  std::string error = error_of([&] {
    rl_accumulate_gradients(policy, reference, rollouts, 4, ByteTokenizer::kPad, objective);
  });
  EXPECT_NE(error.find("rollout 2"), std::string::npos) << error;
  EXPECT_NE(error.find("3 logprobs"), std::string::npos) << error;
  rollouts = data.views;
  rollouts[5].prompt = {};
  error = error_of([&] {
    rl_accumulate_gradients(policy, reference, rollouts, 4, ByteTokenizer::kPad, objective);
  });
  EXPECT_NE(error.find("rollout 5"), std::string::npos) << error;
}

}  // namespace
}  // namespace rlhf
