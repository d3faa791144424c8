// FP4 experts in the model: the QAT forward and the packed-FP4 forward compute the same
// function, the straight-through gradient reaches the master weights, packed checkpoints hold
// ~4.25 bits per expert parameter, and bad packed data is refused.
#include <cmath>
#include <cstring>
#include <filesystem>

#include <gtest/gtest.h>

#include "common/error.h"
#include "common/rng.h"
#include "kernels/cpu/cpu_ops.h"
#include "learner/run_config.h"
#include "learner/sft.h"
#include "model/checkpoint.h"
#include "model/safetensors.h"
#include "model/transformer.h"

namespace rlhf {
namespace {

namespace fs = std::filesystem;

ModelConfig fp4_config() {
  ModelConfig c;
  c.vocab_size = 262;
  c.d_model = 64;
  c.n_layers = 3;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 16;
  c.max_seq_len = 24;
  c.n_dense_layers = 1;
  c.d_ff = 96;
  c.n_routed_experts = 4;
  c.n_shared_experts = 1;
  c.top_k = 2;
  c.d_expert = 64;
  c.init_std = 0.1;  // weights large enough that quantization visibly changes the function
  return c;
}

std::string temp_path(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("rlhf_fp4_model_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  return (dir / name).string();
}

std::vector<std::vector<int32_t>> random_sequences(int count, int length, uint64_t seed) {
  Rng rng(seed);
  std::vector<std::vector<int32_t>> out(count);
  for (auto& seq : out) {
    for (int i = 0; i < length; ++i) seq.push_back(int32_t(rng.uniform_int(0, 255)));
  }
  return out;
}

class Fp4Model : public ::testing::TestWithParam<Fp4Format> {};

TEST_P(Fp4Model, PackedForwardEqualsQatForward) {
  const Fp4Format format = GetParam();
  CpuOps<float> ops;
  Transformer<float> model(ops, fp4_config(), 4, 24);
  model.init_random(3);
  const std::string path = temp_path(std::string("packed_") + fp4_format_name(format) + ".safetensors");
  checkpoint_save_packed(path, model, "byte", format);
  const auto packed = checkpoint_load_model(path, ops, 4);
  ASSERT_EQ(packed->packed_format(), format);

  const auto sequences = random_sequences(6, 20, 9);
  const std::vector<int> first(sequences.size(), 1);
  // Float model vs packed: quantization error, clearly visible.
  const LogprobMismatch unquantized = logprob_mismatch(model, *packed, sequences, first);
  // QAT model vs packed: the same dequantized values, only float summation order differs
  // (the packed path multiplies 64-row tiles, QAT whole matrices). 1e-4 is the bound;
  // we measured ~1e-6.
  model.set_qat(format, false);
  const LogprobMismatch qat = logprob_mismatch(model, *packed, sequences, first);
  EXPECT_EQ(qat.tokens, 6 * 19);
  EXPECT_LE(qat.max_abs, 1e-4) << "mean " << qat.mean_abs;
  EXPECT_GT(unquantized.max_abs, 100 * std::max(qat.max_abs, 1e-7))
      << "the check must be able to fail: quantization has to matter for this model";
}

TEST_P(Fp4Model, QatGradientIsStraightThroughToTheMasterWeights) {
  const Fp4Format format = GetParam();
  CpuOps<float> ops;
  const ModelConfig config = fp4_config();
  Transformer<float> qat(ops, config, 2, 24), reference(ops, config, 2, 24);
  qat.init_random(5);
  // The reference is a float model whose expert weights ARE the fake-quantized values.
  std::memcpy(reference.params(), qat.params(), sizeof(float) * qat.layout().total());
  for (const ExpertMatrixSpec& m : qat.expert_matrices()) {
    const TensorSpec& t = qat.layout().find(m.name);
    ops.fp4_fake_quantize(reference.params() + t.offset, nullptr, qat.params() + t.offset, m.rows,
                          m.cols, format);
  }
  reference.params_changed();
  qat.set_qat(format, false);
  TokenBatch batch;
  batch.batch = 2;
  batch.seq_len = 12;
  Rng rng(2);
  for (int i = 0; i < 24; ++i) {
    batch.tokens.push_back(int32_t(rng.uniform_int(0, 255)));
    batch.targets.push_back(int32_t(rng.uniform_int(0, 255)));
    batch.weights.push_back(1.0f / 24);
  }
  qat.zero_grads();
  reference.zero_grads();
  const double loss_qat = qat.forward_backward(batch);
  const double loss_ref = reference.forward_backward(batch);
  EXPECT_EQ(loss_qat, loss_ref);
  // Identical computation, so identical gradients, and they land on the master weights.
  EXPECT_EQ(std::memcmp(qat.grads(), reference.grads(), sizeof(float) * qat.layout().total()), 0);

  // The clipped estimator zeroes exactly the saturated weights' gradients. Scale one expert
  // row up so some of its weights saturate their block.
  const TensorSpec& gate = qat.layout().find("layers.1.experts.w_gate");
  float* row = qat.params() + gate.offset;
  for (int i = 0; i < config.d_model; i += 5) row[i] *= 40.0f;
  qat.params_changed();
  qat.set_qat(format, true);
  qat.zero_grads();
  qat.forward_backward(batch);
  std::vector<uint8_t> saturated(size_t(gate.numel));
  std::vector<float> scratch(size_t(gate.numel));
  ops.fp4_fake_quantize(scratch.data(), saturated.data(), qat.params() + gate.offset,
                        gate.numel / config.d_model, config.d_model, format);
  int64_t n_saturated = 0;
  for (int64_t i = 0; i < gate.numel; ++i) {
    if (!saturated[i]) continue;
    ++n_saturated;
    EXPECT_EQ(qat.grads()[gate.offset + i], 0.0f) << "saturated weight " << i;
  }
  EXPECT_GT(n_saturated, 0);
}

INSTANTIATE_TEST_SUITE_P(Formats, Fp4Model, ::testing::Values(Fp4Format::mxfp4, Fp4Format::nvfp4),
                         [](const auto& test_info) { return fp4_format_name(test_info.param); });

TEST(Fp4Checkpoint, PackedPolicyTakesUnder4Point6BitsPerExpertParameter) {
  CpuOps<float> ops;
  Transformer<float> model(ops, fp4_config(), 1, 24);
  model.init_random(1);
  const std::string path = temp_path("bits.safetensors");
  checkpoint_save_packed(path, model, "byte", Fp4Format::mxfp4);
  const SafetensorsReader reader(path);
  int64_t params = 0;
  uint64_t bytes = 0;
  for (const ExpertMatrixSpec& m : model.expert_matrices()) {
    params += m.rows * m.cols;
    for (const char* part : {".codes", ".scales", ".global_scale"}) bytes += reader.bytes("fp4." + m.name + part);
    EXPECT_FALSE(reader.has("model." + m.name)) << "no float copy of " << m.name;
  }
  const double bits = 8.0 * double(bytes) / double(params);
  EXPECT_GT(bits, 4.25);
  EXPECT_LE(bits, 4.6);
}

TEST(Fp4Checkpoint, PackedModelIsInferenceOnlyAndBadPackedDataIsRefused) {
  CpuOps<float> ops;
  Transformer<float> model(ops, fp4_config(), 1, 24);
  model.init_random(1);
  const std::string path = temp_path("refuse.safetensors");
  checkpoint_save_packed(path, model, "byte", Fp4Format::mxfp4);
  const auto packed = checkpoint_load_model(path, ops, 1);
  TokenBatch batch{1, 2, {1, 2}, {2, 3}, {0.5f, 0.5f}};
  EXPECT_THROW(packed->forward_backward(batch), Error);

  // A float model cannot read the packed file, and vice versa.
  EXPECT_THROW(checkpoint_load_weights(path, model), Error);

  // A NaN block scale is refused with the matrix named.
  Fp4Tensor bad;
  bad.format = Fp4Format::mxfp4;
  const ExpertMatrixSpec& m = packed->expert_matrices().front();
  bad.rows = m.rows;
  bad.cols = m.cols;
  bad.codes.assign(size_t(m.rows * m.cols / 2), 0);
  bad.scales.assign(size_t(m.rows * m.cols / 32), 127);
  bad.scales[3] = 0xff;
  try {
    packed->set_packed_expert(m.name, bad);
    FAIL() << "a NaN scale must be refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(m.name), std::string::npos) << e.what();
  }
  bad.cols /= 2;  // wrong shape
  EXPECT_THROW(packed->set_packed_expert(m.name, bad), Error);
}

TEST(Fp4Config, QatKeysAreValidated) {
  auto error_of = [](const std::string& yaml) -> std::string {
    try {
      RunConfig::load_string(yaml, "test");
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(error_of("fp4: {format: fp5}").find("fp4.format"), std::string::npos);
  EXPECT_NE(error_of("fp4: {ste: wobbly}").find("fp4.ste"), std::string::npos);
  EXPECT_NE(error_of("sft: {steps: 10}\nfp4: {qat_start_step: 10}").find("fp4.qat_start_step"),
            std::string::npos);
  EXPECT_EQ(error_of("sft: {steps: 10}\nfp4: {format: nvfp4, qat_start_step: 7, ste: clipped}"), "");
}

}  // namespace
}  // namespace rlhf
