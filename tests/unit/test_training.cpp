// Training machinery: checkpoints round-trip bit-exactly, a resumed run reproduces the
// uninterrupted run's losses exactly, the router's bias balancing evens out a skewed load,
// and bad configs and checkpoints give clear errors.
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include <gtest/gtest.h>

#include "common/error.h"
#include "common/rng.h"
#include "kernels/cpu/cpu_ops.h"
#include "learner/run_config.h"
#include "learner/sft.h"
#include "model/checkpoint.h"
#include "model/transformer.h"

namespace rlhf {
namespace {

namespace fs = std::filesystem;

fs::path fresh_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("rlhf_test_training_" + name + "_" +
                                                    std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// A small but complete run config: dense + MoE layers, a few steps.
const char* kTinyRun = R"(
model:
  d_model: 32
  n_layers: 3
  n_heads: 4
  n_kv_heads: 2
  head_dim: 8
  max_seq_len: 40
  n_dense_layers: 1
  d_ff: 64
  n_routed_experts: 4
  n_shared_experts: 1
  top_k: 2
  d_expert: 32
  bias_update_rate: 0.01
  seq_balance_loss: 0.01
tasks:
  seed: 3
sft:
  steps: 8
  batch_size: 8
  eval_examples: 8
  eval_batch: 8
  checkpoint_every: 4
  optimizer: {lr: 0.003, warmup_steps: 2}
runtime:
  threads: 2
)";

bool bit_equal(const float* a, const float* b, int64_t n) {
  return std::memcmp(a, b, sizeof(float) * size_t(n)) == 0;
}

TEST(Checkpoint, RoundTripIsBitExact) {
  const RunConfig run = RunConfig::load_string(kTinyRun, "tiny");
  CpuOps<float> ops;
  Transformer<float> a(ops, run.model, 2, 16), b(ops, run.model, 2, 16);
  a.init_random(1);
  b.init_random(2);
  for (int64_t i = 0; i < a.buffer_layout().total(); ++i) a.buffers()[i] = 0.01f * float(i);
  const fs::path dir = fresh_dir("roundtrip");
  const std::string path = (dir / "ckpt.safetensors").string();
  checkpoint_save(path, a, "byte");
  const CheckpointContents info = checkpoint_read_info(path);
  EXPECT_EQ(info.config.to_yaml(), run.model.to_yaml());
  EXPECT_EQ(info.tokenizer, "byte");
  EXPECT_FALSE(info.training.has_value());
  ASSERT_FALSE(bit_equal(a.params(), b.params(), a.layout().total()));
  checkpoint_load_weights(path, b);
  EXPECT_TRUE(bit_equal(a.params(), b.params(), a.layout().total()));
  EXPECT_TRUE(bit_equal(a.buffers(), b.buffers(), a.buffer_layout().total()));
  const std::vector<int32_t> tokens = {256, 259, 65, 66, 67, 260, 68, 257};
  const float* la = a.forward(tokens.data(), 1, 8);
  std::vector<float> logits_a(la, la + 8 * run.model.vocab_size);
  const float* lb = b.forward(tokens.data(), 1, 8);
  EXPECT_TRUE(bit_equal(logits_a.data(), lb, int64_t(logits_a.size())));
}

TEST(Checkpoint, TruncatedAndWrongShapeAreClearErrors) {
  const RunConfig run = RunConfig::load_string(kTinyRun, "tiny");
  CpuOps<float> ops;
  Transformer<float> model(ops, run.model, 1, 8);
  model.init_random(1);
  const fs::path dir = fresh_dir("bad");
  const std::string path = (dir / "ckpt.safetensors").string();
  checkpoint_save(path, model, "byte");

  // Truncated: cut the file in half.
  const std::string truncated = (dir / "truncated.safetensors").string();
  fs::copy_file(path, truncated);
  fs::resize_file(truncated, fs::file_size(path) / 2);
  try {
    checkpoint_load_weights(truncated, model);
    FAIL() << "a truncated checkpoint must not load";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos) << e.what();
  }

  // Wrong shape: a model with a different width reading this file.
  ModelConfig wider = run.model;
  wider.d_model = 48;
  Transformer<float> other(ops, wider, 1, 8);
  try {
    checkpoint_load_weights(path, other);
    FAIL() << "a checkpoint of another shape must not load";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("shape"), std::string::npos) << e.what();
  }

  // Not a checkpoint at all.
  const std::string junk = (dir / "junk.safetensors").string();
  std::ofstream(junk) << "this is not a checkpoint";
  EXPECT_THROW(checkpoint_read_info(junk), Error);
}

TEST(SftTrainer, ResumeReproducesTheUninterruptedLossTrajectoryExactly) {
  const RunConfig run = RunConfig::load_string(kTinyRun, "tiny");
  const fs::path straight = fresh_dir("straight"), split = fresh_dir("split");
  std::vector<double> uninterrupted;
  {
    SftTrainer trainer(run, straight.string(), false);
    uninterrupted = trainer.train();
  }
  ASSERT_EQ(uninterrupted.size(), 8u);
  std::vector<double> resumed;
  {
    SftTrainer first(run, split.string(), false);
    resumed = first.train(4);  // checkpoint_every = 4: the checkpoint holds step 4
  }
  {
    SftTrainer second(run, split.string(), true);
    EXPECT_EQ(second.step(), 4);
    const std::vector<double> rest = second.train();
    resumed.insert(resumed.end(), rest.begin(), rest.end());
  }
  ASSERT_EQ(resumed.size(), uninterrupted.size());
  for (size_t i = 0; i < resumed.size(); ++i) {
    EXPECT_EQ(resumed[i], uninterrupted[i]) << "step " << i + 1;  // bit-exact, not approximate
  }
  // The losses went down: the run trains at all.
  EXPECT_LT(uninterrupted.back(), uninterrupted.front());
}

TEST(SftTrainer, RefusesToOverwriteAnExistingRunWithoutResume) {
  const RunConfig run = RunConfig::load_string(kTinyRun, "tiny");
  const fs::path dir = fresh_dir("overwrite");
  {
    SftTrainer trainer(run, dir.string(), false);
    trainer.train(4);
  }
  const auto size_before = fs::file_size(dir / "checkpoint.safetensors");
  EXPECT_THROW(SftTrainer(run, dir.string(), false), Error);
  EXPECT_EQ(fs::file_size(dir / "checkpoint.safetensors"), size_before);
}

TEST(RouterBias, BalancingMovesASkewedLoadTowardUniform) {
  RunConfig run = RunConfig::load_string(kTinyRun, "tiny");
  run.model.bias_update_rate = 0.01;
  CpuOps<float> ops;
  Transformer<float> model(ops, run.model, 8, 32);
  model.init_random(5);
  // Skewed input: every embedding shares a large component along dimension 0, and the router
  // rows of experts 0 and 1 read that dimension, so most tokens prefer those two. The other
  // dimensions and router weights are random, so tokens still differ in their preferences.
  const int D = run.model.d_model, E = run.model.n_routed_experts;
  Rng init(6);
  float* embed = model.params() + model.layout().find("embed").offset;
  for (int v = 0; v < run.model.vocab_size; ++v) {
    for (int c = 0; c < D; ++c) embed[v * D + c] = c == 0 ? 3.0f : float(init.normal());
  }
  for (int l = run.model.n_dense_layers; l < run.model.n_layers; ++l) {
    float* router = model.params() + model.layout().find("layers." + std::to_string(l) + ".router").offset;
    for (int i = 0; i < E * D; ++i) router[i] = float(0.3 * init.normal());
    router[0 * D] = router[1 * D] = 1.0f;
  }
  Rng rng(8);
  std::vector<int32_t> tokens(8 * 32);
  for (auto& t : tokens) t = int32_t(rng.uniform_int(0, 255));
  auto imbalance = [&] {  // max load / mean load over MoE layers
    double worst = 0;
    for (const auto& layer : model.last_stats().expert_load) {
      double mean = 0, max = 0;
      for (int64_t x : layer) {
        mean += double(x) / E;
        max = std::max(max, double(x));
      }
      worst = std::max(worst, max / mean);
    }
    return worst;
  };
  model.forward(tokens.data(), 8, 32);
  const double before = imbalance();
  for (int i = 0; i < 300; ++i) {
    model.forward(tokens.data(), 8, 32);
    model.update_router_bias();
  }
  model.forward(tokens.data(), 8, 32);
  const double after = imbalance();
  EXPECT_GT(before, 1.8) << "the input must start skewed (2 of 4 experts take nearly all)";
  EXPECT_LT(after, 1.3) << "balancing should bring every expert near the mean load";
}

TEST(RunConfig, BadValuesAndUnknownKeysNameTheKey) {
  auto error_of = [](const std::string& yaml) -> std::string {
    try {
      RunConfig::load_string(yaml, "test");
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(error_of("sft: {steps: 0}").find("sft.steps"), std::string::npos);
  EXPECT_NE(error_of("sft: {optimizer: {lr: -1}}").find("sft.optimizer.lr"), std::string::npos);
  EXPECT_NE(error_of("model: {n_heads: 3}").find("model.n_heads"), std::string::npos);
  EXPECT_NE(error_of("sampling: {top_p: 0}").find("sampling.top_p"), std::string::npos);
  EXPECT_NE(error_of("sft: {stepz: 10}").find("sft.stepz"), std::string::npos);
  EXPECT_NE(error_of("nonsense: 1").find("nonsense"), std::string::npos);
  EXPECT_NE(error_of("model: {d_model: abc}").find("model.d_model"), std::string::npos);
  EXPECT_NE(error_of("model: [1, 2").find("YAML"), std::string::npos);
  EXPECT_EQ(error_of(kTinyRun), "");
  EXPECT_NE(error_of("demo: {grm: x.yaml}").find("demo.grm"), std::string::npos);
  // A key given twice, at the top (a second `model:` section) or inside a section: YAML would
  // keep the first and drop the other without a word.
  const std::string twice_at_top = std::string(kTinyRun) + "\nmodel:\n  n_layers: 2\n";
  EXPECT_NE(error_of(twice_at_top).find("model: the key is given twice"), std::string::npos);
  const std::string twice_inside = "sft:\n  steps: 10\n  steps: 20\n";
  EXPECT_NE(error_of(twice_inside).find("sft.steps: the key is given twice"), std::string::npos);
}

// `demo:` names the other stages' configs relative to the file it is in, so
// `rlhf demo --config configs/demo-gpu.yaml` finds them from any working directory; absolute
// paths stay as they are, and a config without the section leaves both empty.
TEST(RunConfig, DemoStageConfigsResolveAgainstTheFilesDirectory) {
  const fs::path dir = fresh_dir("demo_section");
  fs::create_directories(dir / "configs");
  const fs::path file = dir / "configs" / "demo-x.yaml";
  std::ofstream(file) << kTinyRun << "\ndemo: {grm_config: stage/grm.yaml, rl_config: /abs/rl.yaml}\n";
  const RunConfig run = RunConfig::load_file(file.string());
  EXPECT_EQ(run.demo.grm_config, (dir / "configs" / "stage" / "grm.yaml").string());
  EXPECT_EQ(run.demo.rl_config, "/abs/rl.yaml");
  const RunConfig plain = RunConfig::load_string(kTinyRun, "tiny");
  EXPECT_EQ(plain.demo.grm_config, "");
  EXPECT_EQ(plain.demo.rl_config, "");
}

// Every config the project ships loads, and the stage configs a `demo:` section names exist: a
// shipped config that stops parsing (a renamed key, a value out of range) would otherwise show
// only when someone runs the command that reads it.
TEST(RunConfig, EveryShippedConfigLoads) {
  const fs::path configs = fs::path(RLHF_SOURCE_DIR) / "configs";
  int loaded = 0;
  for (const fs::directory_entry& entry : fs::directory_iterator(configs)) {
    if (entry.path().extension() != ".yaml") continue;
    SCOPED_TRACE(entry.path().filename().string());
    try {
      const RunConfig run = RunConfig::load_file(entry.path().string());
      for (const std::string& stage : {run.demo.grm_config, run.demo.rl_config}) {
        if (!stage.empty()) {
          EXPECT_TRUE(fs::exists(stage)) << "demo stage config " << stage;
        }
      }
      ++loaded;
    } catch (const Error& e) {
      ADD_FAILURE() << e.what();
    }
  }
  EXPECT_GE(loaded, 11) << "configs/ holds 11 configs; fewer were found in " << configs;
}

}  // namespace
}  // namespace rlhf
