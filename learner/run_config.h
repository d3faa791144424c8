#pragma once
// A run's whole configuration, as one YAML file (configs/demo.yaml is the embedded default):
//   model:    architecture (model/config.h)
//   tasks:    the built-in task suite (rollout/task_suite.h)
//   sft:      supervised training (steps, batch, optimizer, evaluation, checkpoints)
//   sampling: sampling for the sampled held-out evaluation
//   fp4:      FP4 expert format and quantization-aware training
//   stability: spike detection and anticipatory routing (learner/stability.h)
//   grm:      generative reward model training data (`rlhf train-grm`, learner/grm.h)
//   rl:       the RL loop (learner/rl_trainer.h)
//   runtime:  threads and device
//   demo:     the other stages' configs when this file is `rlhf demo --config`
// Every section is read strictly: an unknown key or a bad value is an error naming its path.
#include <cstdint>
#include <string>

#include "kernels/fp4/fp4.h"
#include "learner/optimizer.h"
#include "learner/rl_objective.h"
#include "learner/stability.h"
#include "model/config.h"
#include "reward/judge_format.h"
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

// `rlhf train-grm`: the judge's training data and where the judge starts from.
struct GrmConfig {
  std::string policy;              // SFT policy to start from and sample responses with; "" = none
  std::string data;                // user scored data (JSONL); "" = build from the task suite
  int prompts = 3000;              // training-split prompts the built data covers
  int policy_samples = 2;          // policy samples judged per prompt
  double pairwise_fraction = 0.5;  // share of prompts that also give pairwise records
  int pairs_per_prompt = 1;        // pairwise records such a prompt gives
  int corrupted_per_prompt = 1;    // corrupted references judged per prompt
  bool mirror_pairs = false;       // each pairwise record in both orders (scored_data.h)
  double tie_pair_fraction = 0.0;  // share of prompts that also give an identical pair, tie
  double judge_fraction = 0.6;     // share of training sequences that are judge examples
  bool reasoning = true;           // false: train to give the verdict without reasoning
  bool with_reference = false;     // show the reference answer in judge prompts
  bool position_marks = false;     // reasoning marks each position equal or not (scored_data.h)
  bool aligned_marks = false;      // reasoning interleaves the answers, marks each pair (same)
  bool quote_response = false;     // aligned reasoning quotes each response first (same)
  bool prompt_labels = false;      // the quotes take the judge prompt's labels (same)
  int columns = 0;                 // > 0: column layout and reasoning of this width (same)
  int scrambled_per_prompt = 0;    // scrambled references judged per prompt (scored_data.h)
  int swapped_per_prompt = 0;      // references with two characters exchanged (same)
  bool tagged = false;             // tagged layout and reasoning (judge_format.h)
  bool split_pairs = false;        // tagged: a pairwise judgment in two turns (judge_format.h)
  // The judge prompt layout (judge_format.h): split pair, tagged, columns or the lines.
  int layout() const {
    if (!tagged) return columns;
    return split_pairs ? kJudgeSplitPairLayout : kJudgeTaggedLayout;
  }
  uint64_t seed = 11;
};

// `rl:` the RL loop (learner/rl_trainer.h): GRPO against the generative judge.
struct RlConfig {
  std::string policy;              // the SFT policy RL starts from; also the frozen KL reference
  std::string judge;               // the judge checkpoint `rlhf up` starts the reward service with
  int64_t steps = 60;              // learner steps (policy versions)
  int prompts_per_step = 16;       // prompts sent out per step
  int samples_per_prompt = 4;      // n: one GRPO group per prompt
  std::string reward = "judge";    // judge: the reward service's score | ground_truth: the grader's
  bool judge_rollouts = true;      // with reward ground_truth: still judge (and store) every rollout
  int judge_k = 1;                 // judge samples (votes) per rollout
  double judge_temperature = 0.0;  // 0: greedy judging
  bool judge_with_reference = true;  // show the task's reference answer to the judge
  RlObjectiveConfig objective;     // clip_eps, tis_cap, kl_coef, adv_eps (flat in the section)
  int64_t max_lag = 1;             // rollouts older than version - max_lag are skipped
  int checkpoint_every = 10;       // steps; the final step is always saved
  int eval_examples = 512;         // held-out prompts of the before/after evaluation
  uint64_t seed = 5;               // prompt order and sampling seeds
  OptimizerConfig optimizer;
};

struct RuntimeConfig {
  int threads = 0;             // 0: every core
  std::string device = "cpu";  // the backend: cpu, or cuda (kernels/backend.h)
};

// `demo:` the judge and RL stages' configs of `rlhf demo` when this file is its --config, so one
// file names a whole demo (configs/demo-gpu.yaml). Relative paths are resolved against the
// directory of the file they appear in; "" = the embedded stage config.
struct DemoConfig {
  std::string grm_config;
  std::string rl_config;
};

struct RunConfig {
  ModelConfig model;
  TaskSuiteConfig tasks;
  SftConfig sft;
  SamplingConfig sampling;
  Fp4TrainConfig fp4;
  StabilityConfig stability;
  GrmConfig grm;
  RlConfig rl;
  RuntimeConfig runtime;
  DemoConfig demo;
  std::string source;  // the YAML text it was read from

  // Reads and validates; vocab_size is filled in from the tokenizer.
  static RunConfig load_file(const std::string& path);
  static RunConfig load_string(const std::string& yaml, const std::string& what);
};

}  // namespace rlhf
