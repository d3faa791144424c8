#pragma once
// The RL learner (`rlhf serve learner`, `rlhf up`, `rlhf demo`). One step, policy version v:
//
//   prompts (task suite, train split)  --RolloutSampler::generate-->  n samples each, version v
//   --RolloutScorer::score-->  the judge's score and reasoning per rollout
//   --RolloutStore::write_step-->  one WriteBatch in RocksDB (prompts, rollouts, judgments)
//   --> GRPO advantages --> PPO-clipped token loss + k3 KL to the frozen start policy
//       (learner/rl_objective.h), importance ratios against the actor's own logprobs; its
//       value and gradient come from rl_accumulate_gradients (learner/rl_gradients.h)
//   --> AdamW (QAT as configured) --> version v + 1 --RolloutSampler::publish--> every actor
//
// The policy and the reference run on runtime.device (kernels/backend.h).
//
// Nothing is lost or done twice across a crash: the checkpoint (weights, moments, step) is
// written atomically and the store's cursor right after it; a restarted learner continues
// from the checkpoint, and a step whose scored rollouts are already in the store (the crash
// came after the store write) is trained from the store instead of sampling again.
//
// Work directory:
//   DIR/config.yaml              the run's config
//   DIR/checkpoint.safetensors   latest training checkpoint (step = policy version)
//   DIR/policy.safetensors       the final policy (float master weights)
//   DIR/metrics.jsonl            one JSON object per step
//   DIR/store/                   the RolloutStore (RocksDB), unless another path is given
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "actor/weight_transfer.h"
#include "kernels/ops.h"
#include "learner/collector.h"
#include "learner/optimizer.h"
#include "learner/run_config.h"
#include "learner/sft.h"
#include "model/tokenizer.h"
#include "model/transformer.h"
#include "rlhf/v1/actor.pb.h"
#include "rlhf/v1/reward.pb.h"
#include "rollout/rollout_store.h"
#include "rollout/task_suite.h"

namespace rlhf {

// One step's numbers (the metrics.jsonl line has them all).
struct RlStepMetrics {
  int64_t step = 0;               // 1-based: the step just completed (= the new version)
  double reward_mean = 0, reward_std = 0;
  double ground_truth_mean = 0;   // the grader's score, 0..10, of this step's rollouts
  double judge_invalid_rate = 0;  // rollouts without a reward (INVALID judgment, empty response)
  // The judge against the grader, over the step's rollouts with a valid judgment (whatever the
  // reward): its mean score and the Pearson correlation of its scores with the grader's.
  double judge_mean = 0;
  double judge_gt_correlation = 0;
  double kl = 0;                  // mean k3 estimate against the reference over response tokens
  double clip_fraction = 0;       // response tokens on a clipped piece of the surrogate
  double entropy = 0;             // mean policy entropy over response tokens (nats)
  double response_tokens = 0;     // mean response length
  double logprob_mismatch = 0;    // mean |log p_learner - log p_actor| before the update
  double logprob_mismatch_max = 0;
  int64_t stale_skipped = 0;      // rollouts older than max_lag versions, not trained on
  bool from_store = false;        // the step's rollouts were read back from the store
  double loss = 0;
  double grad_norm = 0;
  double generate_s = 0, score_s = 0, store_s = 0, train_s = 0, publish_s = 0;
  double actor_tokens_per_s = 0;  // generated tokens / generate_s
};

struct RlSummary {
  std::string run_id;
  int64_t steps = 0;
  int eval_examples = 0;
  PolicyEvaluation before;  // the start (SFT) policy, greedy, held-out
  PolicyEvaluation after;   // the RL policy, same prompts
  // Standard error of the mean score difference over the evaluation prompts (paired), a
  // yardstick for whether after - before is more than noise.
  double mean_score_diff_stderr = 0;
  // The same at the sampling temperature (1): how the policy behaves when it samples, which
  // is what RL trains.
  PolicyEvaluation before_sampled, after_sampled;
  double sampled_mean_score_diff_stderr = 0;
  std::string policy_path;
  std::string store_path;
  uint64_t rollouts_stored = 0;
  double train_s = 0;
};

// A read-only view of the learner for LearnerService.Status.
struct RlStatus {
  std::string run_id;
  int64_t step = 0;
  int64_t total_steps = 0;
  uint64_t rollouts_stored = 0;
  double last_reward_mean = 0;
  std::string state;  // "running", "stopping", "done"
};

class RlTrainer {
 public:
  // `resume`: continue DIR/checkpoint.safetensors; without it a workdir holding a checkpoint
  // is an error. `store_path` "" means DIR/store.
  RlTrainer(RunConfig config, std::string workdir, bool resume, RolloutSampler& sampler,
            RolloutScorer& scorer, std::string store_path = "");
  ~RlTrainer();

  // Runs steps until config.rl.steps or until stop() was called; checkpoints every
  // rl.checkpoint_every steps and at the end. Publishes the policy to the actors first, so
  // actors that are behind (a resumed run) catch up.
  void train();
  RlStepMetrics step();
  // Held-out evaluation of the start policy and the current one; writes policy.safetensors.
  RlSummary finish();

  // Thread-safe, for LearnerService (called from gRPC threads while train() runs).
  RlStatus status() const;
  // The current policy version's weights as sent to the actors.
  std::shared_ptr<const WeightPayload> current_weights() const;
  // Asks train() to checkpoint after the current step; blocks until written; returns its path.
  std::string request_checkpoint();
  // Asks train() to finish the current step, checkpoint and return.
  void stop();

  int64_t steps_done() const { return step_; }
  const std::string& run_id() const { return run_id_; }
  RolloutStore& store() { return *store_; }
  Transformer<float>& policy() { return *policy_; }

 private:
  void train_on(const std::vector<v1::ScoredRollout>& scored, RlStepMetrics& metrics);
  void publish_current(RlStepMetrics* metrics);
  void save_checkpoint();
  void write_metrics(const RlStepMetrics& metrics);

  RunConfig config_;
  std::string workdir_;
  std::string run_id_;
  RolloutSampler& sampler_;
  RolloutScorer& scorer_;
  std::unique_ptr<Ops<float>> ops_;  // runtime.device's; before the models, which free through it
  std::unique_ptr<Tokenizer> tokenizer_;
  TaskSuite suite_;
  std::unique_ptr<Transformer<float>> policy_;
  std::unique_ptr<Transformer<float>> reference_;  // frozen: the start policy (KL anchor)
  std::unique_ptr<AdamW<float>> optimizer_;
  std::unique_ptr<RolloutStore> store_;
  std::unique_ptr<Collector> collector_;
  std::string store_path_;
  int64_t step_ = 0;
  int max_batch_ = 0;
  double train_s_ = 0;

  mutable std::mutex mutex_;  // guards what status()/current_weights() read
  std::shared_ptr<const WeightPayload> weights_;
  uint64_t rollouts_stored_ = 0;
  double last_reward_mean_ = 0;
  std::string state_ = "running";
  std::atomic<bool> stop_requested_{false};
  bool checkpoint_requested_ = false;
  std::string last_checkpoint_;
  int64_t checkpoint_generation_ = 0;
  std::condition_variable checkpoint_done_;
};

}  // namespace rlhf
