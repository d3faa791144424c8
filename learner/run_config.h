#pragma once
// A run's whole configuration, as one YAML file (configs/demo.yaml is the embedded default):
//   model:    architecture (model/config.h)
//   tasks:    the built-in task suite (rollout/task_suite.h)
//   sft:      supervised training (steps, batch, optimizer, evaluation, checkpoints)
//   sampling: sampling for the sampled held-out evaluation
//   fp4:      FP4 expert format and quantization-aware training
//   stability: spike detection and anticipatory routing (learner/stability.h)
//   runtime:  threads
// Every section is read strictly: an unknown key or a bad value is an error naming its path.
#include <cstdint>
#include <string>

#include "kernels/fp4/fp4.h"
#include "learner/optimizer.h"
#include "learner/stability.h"
#include "model/config.h"
#include "rollout/task_suite.h"

namespace rlhf {

struct SftConfig {
  int64_t steps = 600;
  int batch_size = 32;
  uint64_t seed = 1;            // initialization and data order
  int eval_examples = 256;      // held-out prompts in the final evaluation
  int eval_batch = 64;          // prompts decoded together
  int checkpoint_every = 200;   // steps; the final step is always saved
  int length_buckets = 2;       // micro-batches of similar length per step (less padding)
  OptimizerConfig optimizer;
};

struct SamplingConfig {
  double temperature = 1.0;
  int top_k = 0;
  double top_p = 1.0;
  int max_new_tokens = 24;
  uint64_t seed = 7;
};

struct Fp4TrainConfig {
  Fp4Format format = Fp4Format::mxfp4;
  int64_t qat_start_step = -1;  // from this (0-based) step on, experts train through QAT; -1 off
  bool clipped_ste = false;     // ste: clipped (no gradient where a weight saturated) | plain
  bool enabled() const { return qat_start_step >= 0; }
};

struct RuntimeConfig {
  int threads = 0;  // 0: every core
};

struct RunConfig {
  ModelConfig model;
  TaskSuiteConfig tasks;
  SftConfig sft;
  SamplingConfig sampling;
  Fp4TrainConfig fp4;
  StabilityConfig stability;
  RuntimeConfig runtime;
  std::string source;  // the YAML text it was read from

  // Reads and validates; vocab_size is filled in from the tokenizer.
  static RunConfig load_file(const std::string& path);
  static RunConfig load_string(const std::string& yaml, const std::string& what);
};

}  // namespace rlhf
