// The whole model on CudaOps<float> against the same model on CpuOps<float>: the same weights
// (init_random with one seed), the same batch; logits, the loss, the routing trace and every
// parameter gradient compared. Skips when no CUDA device is present.
//
// Tolerances. Each op agrees with the CPU to a few float ulps (test_cuda_ops.cpp); through the
// model those differences pass through ~40 ops (3 layers forward and backward). Bounds: logits
// max|gpu - cpu| / max|cpu| under 1e-5, the loss rel 1e-6, and each gradient tensor's
// ||gpu - cpu|| / ||cpu|| under 1e-5. Measured on an H100 (2026-11-23): logits 3.5e-7, loss
// 1e-8, worst gradient tensor 5.9e-7, so the bounds leave a margin of ~20x. The routing must be
// identical: router scores differ by ~1e-7 while the gaps between experts' scores at this init
// are ~1e-2, so a flipped choice would mean a bug, not rounding.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "common/rng.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cuda/cuda_ops.h"
#include "model/checkpoint.h"
#include "model/transformer.h"
#include "tests/gpu/gpu_test_support.h"

namespace rlhf {
namespace {

ModelConfig small_moe_config() {
  ModelConfig c;
  c.vocab_size = 61;
  c.d_model = 64;
  c.n_layers = 3;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 16;
  c.max_seq_len = 64;
  c.n_dense_layers = 1;
  c.d_ff = 96;
  c.n_routed_experts = 8;
  c.n_shared_experts = 1;
  c.top_k = 2;
  c.d_expert = 32;
  c.seq_balance_loss = 0.01;
  return c;
}

TokenBatch random_batch(int batch, int seq_len, int vocab, uint64_t seed) {
  Rng rng(seed);
  TokenBatch b;
  b.batch = batch;
  b.seq_len = seq_len;
  for (int i = 0; i < batch * seq_len; ++i) {
    b.tokens.push_back(int32_t(rng.uniform_int(0, vocab - 1)));
    b.targets.push_back(int32_t(rng.uniform_int(0, vocab - 1)));
    b.weights.push_back(i % 7 == 3 ? 0.0f : 1.0f);
  }
  return b;
}

std::vector<float> host_copy(Ops<float>& ops, const float* p, size_t n) {
  std::vector<float> h(n);
  ops.copy_to_host(h.data(), p, sizeof(float) * n);
  return h;
}

// Largest |a - b| over max|b|.
double max_error_over_max(const std::vector<float>& a, const std::vector<float>& b) {
  double err = 0, ref = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(double(a[i]) - double(b[i]));
    err = std::isnan(d) || d > err ? (std::isnan(d) ? INFINITY : d) : err;
    ref = std::max(ref, std::fabs(double(b[i])));
  }
  return err / ref;
}

class CudaModelTest : public testing::Test {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_GPU();
    gpu_ = std::make_unique<CudaOps<float>>();
  }
  // Forward (recording the routing) and forward+backward on both backends; compares all.
  void compare_training_step(const ModelConfig& config, std::optional<Fp4Format> qat) {
    const int B = 3, T = 17;
    Transformer<float> cpu_model(cpu_, config, B, T), gpu_model(*gpu_, config, B, T);
    cpu_model.init_random(42);
    gpu_model.init_random(42);
    cpu_model.set_qat(qat, true);
    gpu_model.set_qat(qat, true);
    const TokenBatch batch = random_batch(B, T, config.vocab_size, 7);
    const size_t n_logits = size_t(B) * T * config.vocab_size;

    RoutingTrace cpu_trace, gpu_trace;
    const std::vector<float> cpu_logits =
        host_copy(cpu_, cpu_model.forward(batch.tokens.data(), B, T, nullptr, nullptr, &cpu_trace),
                  n_logits);
    const std::vector<float> gpu_logits = host_copy(
        *gpu_, gpu_model.forward(batch.tokens.data(), B, T, nullptr, nullptr, &gpu_trace),
        n_logits);
    EXPECT_EQ(gpu_trace.expert_ids, cpu_trace.expert_ids) << "routing differs";
    const double logit_error = max_error_over_max(gpu_logits, cpu_logits);
    EXPECT_LT(logit_error, 1e-5) << "logits";
    const auto& cs = cpu_model.last_stats();
    const auto& gs = gpu_model.last_stats();
    EXPECT_EQ(gs.expert_load, cs.expert_load);
    for (size_t l = 0; l < cs.clamp.size(); ++l) {
      EXPECT_EQ(gs.clamp[l].gate, cs.clamp[l].gate);
      EXPECT_EQ(gs.clamp[l].linear, cs.clamp[l].linear);
      EXPECT_EQ(gs.clamp[l].total, cs.clamp[l].total);
    }

    cpu_model.zero_grads();
    gpu_model.zero_grads();
    const double cpu_loss = cpu_model.forward_backward(batch);
    const double gpu_loss = gpu_model.forward_backward(batch);
    EXPECT_NEAR(gpu_loss, cpu_loss, 1e-6 * std::fabs(cpu_loss));
    const std::vector<float> cpu_grads =
        host_copy(cpu_, cpu_model.grads(), size_t(cpu_model.layout().total()));
    const std::vector<float> gpu_grads =
        host_copy(*gpu_, gpu_model.grads(), size_t(gpu_model.layout().total()));
    double worst = 0;
    std::string worst_name;
    for (const TensorSpec& t : cpu_model.layout().tensors()) {
      double diff = 0, norm = 0;
      for (int64_t i = t.offset; i < t.offset + t.numel; ++i) {
        const double d = double(gpu_grads[i]) - double(cpu_grads[i]);
        diff += d * d;
        norm += double(cpu_grads[i]) * double(cpu_grads[i]);
      }
      ASSERT_GT(norm, 0) << t.name << " has no gradient on the CPU";
      const double rel = std::sqrt(diff / norm);
      EXPECT_LT(rel, 1e-5) << t.name;
      if (!(rel <= worst)) {
        worst = rel;
        worst_name = t.name;
      }
    }
    // Run to run on the GPU: the same bits (no float atomics, fixed reduction orders).
    gpu_model.zero_grads();
    EXPECT_EQ(gpu_model.forward_backward(batch), gpu_loss);
    EXPECT_EQ(host_copy(*gpu_, gpu_model.grads(), gpu_grads.size()), gpu_grads)
        << "a second GPU step gave different gradients";
    std::printf("  logits max error / max|logit| %.3g; loss %.9g vs %.9g; worst gradient %s "
                "rel %.3g\n",
                logit_error, gpu_loss, cpu_loss, worst_name.c_str(), worst);
  }

  CpuOps<float> cpu_;
  std::unique_ptr<CudaOps<float>> gpu_;
};

TEST_F(CudaModelTest, TrainingStepMatchesCpu) {
  compare_training_step(small_moe_config(), std::nullopt);
}

TEST_F(CudaModelTest, QatTrainingStepMatchesCpu) {
  // MXFP4 fake-quantized experts (bit-identical on both backends) with the clipped estimator.
  compare_training_step(small_moe_config(), Fp4Format::mxfp4);
}

TEST_F(CudaModelTest, CachedDecodeMatchesCpu) {
  const ModelConfig config = small_moe_config();
  const int B = 2, prompt = 9, capacity = 24;
  Transformer<float> cpu_model(cpu_, config, B, prompt), gpu_model(*gpu_, config, B, prompt);
  cpu_model.init_random(3);
  gpu_model.init_random(3);
  KvCache<float> cpu_cache(cpu_, config, B, capacity), gpu_cache(*gpu_, config, B, capacity);
  const TokenBatch batch = random_batch(B, prompt, config.vocab_size, 11);
  // Both prefills start at 0 (a position never written holds whatever the allocation held,
  // which differs between backends); the decode then puts the sequences at different positions.
  const std::vector<int32_t> start = {0, 0};
  const size_t V = size_t(config.vocab_size);
  const std::vector<float> cpu_prefill = host_copy(
      cpu_, cpu_model.forward(batch.tokens.data(), B, prompt, &cpu_cache, start.data()),
      B * prompt * V);
  const std::vector<float> gpu_prefill = host_copy(
      *gpu_, gpu_model.forward(batch.tokens.data(), B, prompt, &gpu_cache, start.data()),
      B * prompt * V);
  EXPECT_LT(max_error_over_max(gpu_prefill, cpu_prefill), 1e-5) << "prefill";
  std::vector<int32_t> next = {5, 17};
  std::vector<int32_t> pos = {prompt, 5};  // sequence 1 rewrites its cache from position 5
  for (int step = 0; step < 4; ++step) {
    const std::vector<float> c =
        host_copy(cpu_, cpu_model.forward(next.data(), B, 1, &cpu_cache, pos.data()), B * V);
    const std::vector<float> g =
        host_copy(*gpu_, gpu_model.forward(next.data(), B, 1, &gpu_cache, pos.data()), B * V);
    EXPECT_LT(max_error_over_max(g, c), 1e-5) << "decode step " << step;
    for (int b = 0; b < B; ++b) {
      next[b] = (next[b] * 7 + step) % config.vocab_size;
      ++pos[b];
    }
  }
}

TEST_F(CudaModelTest, PackedFp4InferenceMatchesCpu) {
  // A packed policy (experts only in FP4, decoded inside fp4_matmul_forward and
  // fp4_grouped_matmul_forward) loaded from one checkpoint onto each backend.
  const ModelConfig config = small_moe_config();  // expert widths 64 and 32: whole FP4 blocks
  for (const Fp4Format format : {Fp4Format::mxfp4, Fp4Format::nvfp4}) {
    SCOPED_TRACE(fp4_format_name(format));
    Transformer<float> source(cpu_, config, 1, 8);
    source.init_random(5);
    const std::filesystem::path path =
        std::filesystem::temp_directory_path() /
        ("rlhf_cuda_model_" + std::to_string(::getpid()) + "_" + fp4_format_name(format) +
         ".safetensors");
    checkpoint_save_packed(path.string(), source, "byte", format);
    const auto cpu_model = checkpoint_load_model(path.string(), cpu_, 2);
    const auto gpu_model = checkpoint_load_model(path.string(), *gpu_, 2);
    std::filesystem::remove(path);
    ASSERT_EQ(gpu_model->packed_format(), format);
    const int B = 2, T = 13;
    const TokenBatch batch = random_batch(B, T, config.vocab_size, 13);
    const size_t n = size_t(B) * T * config.vocab_size;
    const std::vector<float> c = host_copy(cpu_, cpu_model->forward(batch.tokens.data(), B, T), n);
    const std::vector<float> g =
        host_copy(*gpu_, gpu_model->forward(batch.tokens.data(), B, T), n);
    EXPECT_LT(max_error_over_max(g, c), 1e-5);
    EXPECT_EQ(gpu_model->last_stats().expert_load, cpu_model->last_stats().expert_load);
  }
}

}  // namespace
}  // namespace rlhf
