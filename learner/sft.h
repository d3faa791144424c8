#pragma once
// Supervised training of a policy on the task suite's demonstrations (`rlhf sft`).
//
// Work directory layout:
//   DIR/config.yaml              the run's config, as given
//   DIR/checkpoint.safetensors   latest training checkpoint (weights, moments, step, data
//                                position, RNG); rewritten atomically every checkpoint_every
//   DIR/policy.safetensors       the final weights (no optimizer state), for generate/eval
//   DIR/metrics.jsonl            one JSON object per step
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "learner/optimizer.h"
#include "learner/run_config.h"
#include "model/tokenizer.h"
#include "model/transformer.h"
#include "rollout/task_suite.h"

namespace rlhf {

struct PolicyEvaluation {
  int examples = 0;
  double accuracy = 0;    // share of responses graded exactly correct
  double mean_score = 0;  // mean grade, 0..10
  struct PerTask {
    std::string task;
    int examples = 0;
    double accuracy = 0;
    double mean_score = 0;
  };
  std::vector<PerTask> per_task;
  std::vector<std::string> sample_lines;  // a few "prompt -> response (score)" lines
};

struct SftSummary {
  int64_t steps = 0;
  double final_loss = 0;   // mean of the last 20 steps' losses
  double train_tokens_per_s = 0;
  double train_s = 0;
  PolicyEvaluation greedy;
  PolicyEvaluation sampled;
  std::string policy_path;
};

// Builds the batch of demonstrations [first, first + count) of the data stream: each
// sequence is prompt + response, targets are the next tokens, and the loss weight is 1 / (number
// of target tokens in the batch) on response and eos targets, 0 elsewhere (prompt, padding).
TokenBatch sft_make_batch(const TaskSuite& suite, const Tokenizer& tokenizer,
                          const std::vector<uint64_t>& example_indices, int max_seq_len);

// Greedy (temperature 0) or sampled evaluation of a model on held-out prompts.
PolicyEvaluation evaluate_policy(Transformer<float>& model, const Tokenizer& tokenizer,
                                 const TaskSuite& suite, int examples, int batch,
                                 const SamplingConfig& sampling, bool greedy);

class SftTrainer {
 public:
  // `resume`: continue from DIR/checkpoint.safetensors. Without it, a workdir that already
  // holds a checkpoint is an error (so no earlier run is overwritten by accident).
  SftTrainer(RunConfig config, std::string workdir, bool resume);
  ~SftTrainer();

  // Trains up to `stop_at_step` (default: config.sft.steps), checkpointing on the way. Returns
  // the per-step losses of this call.
  std::vector<double> train(int64_t stop_at_step = -1);
  // Writes policy.safetensors and evaluates on held-out prompts.
  SftSummary finish();

  int64_t step() const { return step_; }
  Transformer<float>& model() { return *model_; }

 private:
  void save_checkpoint();
  void truncate_metrics_after(int64_t step);

  RunConfig config_;
  std::string workdir_;
  CpuOps<float> ops_;
  std::unique_ptr<Tokenizer> tokenizer_;
  TaskSuite suite_;
  std::unique_ptr<Transformer<float>> model_;
  std::unique_ptr<AdamW<float>> optimizer_;
  Rng data_rng_;
  int64_t step_ = 0;
  int64_t data_position_ = 0;
  std::vector<double> recent_losses_;
  double train_s_ = 0;
  int64_t train_tokens_ = 0;
};

}  // namespace rlhf
