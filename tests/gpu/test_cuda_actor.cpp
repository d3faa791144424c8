// The actor on the GPU: an ActorEngine with device "cuda" (what `rlhf serve actor --device cuda`
// and the win-rate eval's actors build) behind an ActorServer, answering Generate over loopback
// gRPC and taking a weight update, against the same engine on the CPU. The engine packs the
// float checkpoint into MXFP4 at load (the default), so this also runs the GPU's weight
// serialization (device -> host), the FP4 packing and the packed model on the device. Skips
// when no CUDA device is present.
//
// What must agree, and why (test_cuda_generate.cpp has the reasoning in full):
//  - The first kExactSteps tokens of every rollout: a flip needs a near-tie, ~1e-5 per token.
//  - The logprobs of the tokens both backends generated, within kLogprobTol = 1e-4: both are
//    the sampler's double log-softmax of logits that agree to ~1e-6.
//  - Routing traces where the whole rollout agrees: exact.
//  - A weight payload serialized from a model on the GPU: byte-identical to the one from the
//    same weights on the CPU (the float parameters are copied, not computed).
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "actor/actor_client.h"
#include "actor/actor_engine.h"
#include "actor/actor_service.h"
#include "actor/weight_transfer.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cuda/cuda_ops.h"
#include "model/checkpoint.h"
#include "model/tokenizer.h"
#include "model/transformer.h"
#include "tests/gpu/gpu_test_support.h"
#include "tests/test_support.h"

namespace rlhf {
namespace {

namespace fs = std::filesystem;

constexpr int kExactSteps = 4;
constexpr double kLogprobTol = 1e-4;

ModelConfig policy_config() {
  return actor_policy_config();  // as in test_actor_service.cpp
}

v1::GenerateRequest request(uint64_t expect_version) {
  v1::GenerateRequest r;
  auto* a = r.add_prompts();
  a->set_prompt_index(5);
  a->set_text("add 2 and 3");
  auto* b = r.add_prompts();
  b->set_prompt_index(9);
  b->set_text("reverse abc");
  r.set_n(3);
  r.set_temperature(1.0);
  r.set_max_new_tokens(8);
  r.set_seed(1234);
  r.set_want_routing(true);
  r.set_expect_version(expect_version);
  return r;
}

// Compares every rollout of the GPU's responses with the CPU's.
void expect_same_rollouts(const std::vector<v1::GenerateResponse>& gpu,
                          const std::vector<v1::GenerateResponse>& cpu, uint64_t version,
                          double* worst) {
  ASSERT_EQ(gpu.size(), cpu.size());
  for (size_t p = 0; p < cpu.size(); ++p) {
    EXPECT_EQ(gpu[p].prompt_index(), cpu[p].prompt_index());
    ASSERT_EQ(gpu[p].rollouts_size(), cpu[p].rollouts_size());
    for (int s = 0; s < cpu[p].rollouts_size(); ++s) {
      SCOPED_TRACE("prompt " + std::to_string(p) + " sample " + std::to_string(s));
      const v1::Rollout& g = gpu[p].rollouts(s);
      const v1::Rollout& c = cpu[p].rollouts(s);
      EXPECT_EQ(g.policy_version(), version);
      EXPECT_EQ(c.policy_version(), version);
      ASSERT_EQ(g.logprobs_size(), g.response_tokens_size());
      ASSERT_GT(g.response_tokens_size(), 0);
      int same = 0;
      while (same < c.response_tokens_size() && same < g.response_tokens_size() &&
             c.response_tokens(same) == g.response_tokens(same))
        ++same;
      EXPECT_GE(same, std::min(kExactSteps, c.response_tokens_size())) << "first tokens differ";
      for (int j = 0; j < same; ++j) {
        const double d = std::abs(double(g.logprobs(j)) - double(c.logprobs(j)));
        EXPECT_LE(d, kLogprobTol) << "token " << j;
        *worst = std::max(*worst, std::isnan(d) ? INFINITY : d);
      }
      if (same == c.response_tokens_size() && same == g.response_tokens_size()) {
        EXPECT_EQ(g.text(), c.text());
        EXPECT_EQ(g.finished(), c.finished());
        EXPECT_EQ(g.routing().n_tokens(), c.routing().n_tokens());
        EXPECT_TRUE(std::equal(g.routing().expert_ids().begin(), g.routing().expert_ids().end(),
                               c.routing().expert_ids().begin(), c.routing().expert_ids().end()))
            << "routing";
      }
    }
  }
}

TEST(CudaActor, ServesGenerateAndWeightUpdatesLikeTheCpuActor) {
  SKIP_WITHOUT_GPU();
  const ModelConfig config = policy_config();
  const fs::path dir =
      fs::temp_directory_path() / ("rlhf_cuda_actor_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string checkpoint = (dir / "policy.safetensors").string();
  {
    CpuOps<float> ops;
    Transformer<float> model(ops, config, 1, config.max_seq_len);
    model.init_random(21);
    checkpoint_save(checkpoint, model, "byte");
  }

  ActorEngineOptions options;
  options.max_batch = 4;
  options.device = "cuda";
  ActorEngine gpu_engine(checkpoint, options);
  options.device = "cpu";
  ActorEngine cpu_engine(checkpoint, options);
  fs::remove_all(dir);
  EXPECT_EQ(gpu_engine.expert_format_name(), "mxfp4");

  ActorServer server(gpu_engine, "127.0.0.1:0");
  ActorClient client("127.0.0.1:" + std::to_string(server.port()));
  double worst = 0;
  expect_same_rollouts(client.generate(request(0)), cpu_engine.generate(request(0)), 0, &worst);

  // Version 1 comes from a model on the GPU (as from a learner on `device: cuda`); the CPU
  // engine gets the same weights serialized on the CPU.
  std::string gpu_bytes, cpu_bytes;
  {
    CudaOps<float> ops;
    Transformer<float> model(ops, config, 1, config.max_seq_len);
    model.init_random(22);
    gpu_bytes = serialize_policy(model, "byte", std::nullopt);
  }
  {
    CpuOps<float> ops;
    Transformer<float> model(ops, config, 1, config.max_seq_len);
    model.init_random(22);
    cpu_bytes = serialize_policy(model, "byte", std::nullopt);
  }
  EXPECT_TRUE(gpu_bytes == cpu_bytes) << "the GPU model's payload differs from the CPU's";
  WeightPayload update;
  update.version = 1;
  update.bytes = gpu_bytes;
  EXPECT_EQ(client.update_weights(update), 1u);
  update.bytes = cpu_bytes;
  EXPECT_EQ(cpu_engine.apply_weights(update), 1u);
  const std::vector<v1::GenerateResponse> gpu_v1 = client.generate(request(1));
  expect_same_rollouts(gpu_v1, cpu_engine.generate(request(1)), 1, &worst);

  const v1::ActorStatus status = client.status();
  EXPECT_EQ(status.version(), 1u);
  EXPECT_EQ(status.requests_served(), 2u);
  EXPECT_EQ(status.weight_updates_applied(), 1u);
  std::printf("  max |dlogprob| on identical tokens %.3g\n", worst);
  server.shutdown();
}

}  // namespace
}  // namespace rlhf
