#pragma once
// Supervised training of a policy on the task suite's demonstrations (`rlhf sft`).
//
// Work directory layout:
//   DIR/config.yaml              the run's config, as given
//   DIR/checkpoint.safetensors   latest training checkpoint (weights, moments, step, data
//                                position, RNG); rewritten atomically every checkpoint_every
//   DIR/policy.safetensors       the final weights (no optimizer state), for generate/eval
//   DIR/policy-fp4.safetensors   with QAT on: the same policy with its experts packed in FP4
//   DIR/metrics.jsonl            one JSON object per step (cut back to the checkpoint on resume)
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "learner/optimizer.h"
#include "learner/run_config.h"
#include "learner/stability.h"
#include "model/checkpoint.h"
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

// How far two models' log-probabilities of the same tokens are apart (e.g. the QAT model and
// its packed FP4 export, which must compute the same function).
struct LogprobMismatch {
  int64_t tokens = 0;
  double max_abs = 0;
  double mean_abs = 0;
};

// Runs both models over each sequence and compares log p(token[i] | tokens < i) for every i
// >= first_target[s] (the response tokens).
LogprobMismatch logprob_mismatch(Transformer<float>& reference, Transformer<float>& other,
                                 const std::vector<std::vector<int32_t>>& sequences,
                                 const std::vector<int>& first_target);

// The packed FP4 export of a QAT run, and how it compares with the QAT model it came from.
struct PackedPolicyReport {
  std::string path;
  std::string format;
  PolicyEvaluation greedy;        // held-out, decoded on the packed experts
  LogprobMismatch mismatch;       // QAT model vs packed model on sampled held-out responses
  double expert_bits_per_param = 0;
};

struct SftSummary {
  int64_t steps = 0;
  double final_loss = 0;   // mean of the last 20 steps' losses
  double train_tokens_per_s = 0;
  double train_s = 0;
  PolicyEvaluation greedy;
  PolicyEvaluation sampled;
  std::string policy_path;
  std::optional<PackedPolicyReport> packed;  // runs with QAT (fp4.qat_start_step >= 0)
};

// Where training sequences come from: an index (40-bit, drawn by the trainer's RNG) maps to
// one formatted sequence with its loss mask. Deterministic in the index, so a resumed run
// sees the same data.
class SftDataSource {
 public:
  virtual ~SftDataSource() = default;
  virtual TrainingSequence sequence(uint64_t index) const = 0;
  // Names the example in errors ("demonstration 17 ('12+5=')").
  virtual std::string describe(uint64_t index) const = 0;
};

// The task suite's demonstrations (the default data of `rlhf sft`).
class DemonstrationSource : public SftDataSource {
 public:
  DemonstrationSource(const TaskSuite& suite, const Tokenizer& tokenizer)
      : suite_(suite), tokenizer_(tokenizer) {}
  TrainingSequence sequence(uint64_t index) const override;
  std::string describe(uint64_t index) const override;

 private:
  const TaskSuite& suite_;
  const Tokenizer& tokenizer_;
};

// Batches from any source (see the overload below for the layout).
std::vector<TokenBatch> sft_make_batches(const SftDataSource& source, const Tokenizer& tokenizer,
                                         const std::vector<uint64_t>& example_indices,
                                         int max_seq_len, int buckets);

// One optimizer step's data: the demonstrations at `example_indices`, each sequence prompt +
// response with the next token as target. Sequences are sorted by length and cut into
// `buckets` micro-batches, so short ones are not padded to the step's longest (with the default
// tasks that saves about a fifth of the compute). The loss weight is 1 / (target tokens in the
// whole step) on response and eos targets, 0 on prompt and padding, so the micro-batches'
// losses and gradients add up to the whole step's.
std::vector<TokenBatch> sft_make_batches(const TaskSuite& suite, const Tokenizer& tokenizer,
                                         const std::vector<uint64_t>& example_indices,
                                         int max_seq_len, int buckets);

// Resumes a training run from its checkpoint: checks that it is a training checkpoint written
// by a run with exactly `config_source` (resuming under another config would silently change
// the schedule, the data or the model), loads weights and AdamW moments into `model` /
// `optimizer`, and returns the training state. Errors name the file (and where the run's
// config copy is, `config_copy`).
TrainingState resume_training(const std::string& checkpoint, const std::string& config_source,
                              const std::string& config_copy, Transformer<float>& model,
                              AdamW<float>& optimizer, Ops<float>& ops);

// Drops the lines of a metrics.jsonl whose "step" is above `step`: after a resume those steps
// run again, and the file keeps one line per step.
void truncate_metrics_after(const std::string& path, int64_t step);

// Greedy (temperature 0) or sampled evaluation of a model on held-out prompts.
// `scores`, when given, receives each prompt's grade (0..10) in prompt order, for paired
// comparisons of two policies on the same prompts.
PolicyEvaluation evaluate_policy(Transformer<float>& model, const Tokenizer& tokenizer,
                                 const TaskSuite& suite, int examples, int batch,
                                 const SamplingConfig& sampling, bool greedy,
                                 std::vector<double>* scores = nullptr);

// What one training step did (the metrics.jsonl line has more).
struct TrainStep {
  int64_t step = 0;  // 1-based: the step just completed
  double loss = 0;
  double grad_norm = 0;  // before clipping
  bool spike = false;
  bool update_skipped = false;
  bool anticipatory = false;    // anticipatory routing was on for this step
  double router_flip_rate = 0;  // share of (token, MoE layer) pairs routed differently
  double step_s = 0;            // wall time of the step (data preparation excluded)
};

struct SftOptions {
  // The training data; null: the task suite's demonstrations.
  std::shared_ptr<const SftDataSource> data;
  // A fresh run starts from this checkpoint's weights instead of a random initialization.
  std::string init_from;
  // Extra string metadata for every checkpoint the run writes (checkpoint_save's annotations).
  std::map<std::string, std::string> checkpoint_annotations;
};

class SftTrainer {
 public:
  // `resume`: continue from DIR/checkpoint.safetensors. Without it, a workdir that already
  // holds a checkpoint is an error (so no earlier run is overwritten by accident).
  SftTrainer(RunConfig config, std::string workdir, bool resume, SftOptions options = {});
  ~SftTrainer();

  // Trains up to `stop_at_step` (default: config.sft.steps), checkpointing on the way. Returns
  // the per-step losses of this call. Stops early if the loss becomes non-finite (see
  // diverged_at()); the update of that step is not applied.
  std::vector<double> train(int64_t stop_at_step = -1);
  // Writes policy.safetensors and evaluates on held-out prompts.
  SftSummary finish();

  int64_t step() const { return step_; }
  // The (1-based) step whose loss was not finite, or -1.
  int64_t diverged_at() const { return diverged_at_; }
  // After train(): an rlhf::Error naming the diverged step, if there was one.
  void fail_if_diverged() const;
  // Every step this trainer ran (not those before a resume).
  const std::vector<TrainStep>& history() const { return history_; }
  Transformer<float>& model() { return *model_; }

 private:
  void save_checkpoint();
  PackedPolicyReport evaluate_packed_export();

  RunConfig config_;
  std::string workdir_;
  std::unique_ptr<Ops<float>> ops_;  // runtime.device (kernels/backend.h)
  std::unique_ptr<Tokenizer> tokenizer_;
  TaskSuite suite_;
  std::unique_ptr<Transformer<float>> model_;
  std::unique_ptr<AdamW<float>> optimizer_;
  std::shared_ptr<const SftDataSource> data_;
  std::map<std::string, std::string> checkpoint_annotations_;
  Rng data_rng_;
  int64_t step_ = 0;
  int64_t diverged_at_ = -1;
  int64_t data_position_ = 0;
  std::vector<double> recent_losses_;
  // Not part of a checkpoint: after --resume the detector warms up again and the router
  // history starts over (so with anticipatory routing on, a resumed run routes differently
  // for the first `lag` steps than an uninterrupted one).
  SpikeDetector spike_detector_;
  AnticipatoryRouting<float> routing_;
  std::vector<TrainStep> history_;
  double train_s_ = 0;
  int64_t train_tokens_ = 0;
};

}  // namespace rlhf
