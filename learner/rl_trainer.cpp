#include "learner/rl_trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "common/error.h"
#include "common/progress.h"
#include "common/rng.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_ops.h"
#include "learner/rl_gradients.h"
#include "learner/rl_objective.h"
#include "model/checkpoint.h"

namespace rlhf {

namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace

RlTrainer::RlTrainer(RunConfig config, std::string workdir, bool resume,
                     RolloutSampler& sampler, RolloutScorer& scorer, std::string store_path)
    : config_(std::move(config)), workdir_(std::move(workdir)), sampler_(sampler),
      scorer_(scorer), ops_(make_float_ops(config_.runtime.device)),
      tokenizer_(make_tokenizer(config_.model.tokenizer)), suite_(config_.tasks) {
  cpu_set_threads(config_.runtime.threads);
  const RlConfig& rl = config_.rl;
  if (rl.policy.empty()) fail("rl.policy: required: the SFT policy checkpoint RL starts from");
  // The objective's ratios compare log softmax(logits) of the learner with the actor's
  // logprobs, which are taken at the sampling temperature; they are the same distribution
  // only at temperature 1.
  if (config_.sampling.temperature != 1.0 || config_.sampling.top_k != 0 ||
      config_.sampling.top_p != 1.0) {
    fail("sampling: RL samples from the policy itself: temperature must be 1, top_k 0 and top_p "
         "1 (got {}, {}, {})",
         config_.sampling.temperature, config_.sampling.top_k, config_.sampling.top_p);
  }
  const fs::path dir(workdir_);
  run_id_ = fs::absolute(dir).lexically_normal().filename().string();
  if (run_id_.empty()) run_id_ = "rl";
  const fs::path checkpoint = dir / "checkpoint.safetensors";
  if (!resume && fs::exists(checkpoint)) {
    fail("workdir '{}' already holds a checkpoint; pass --resume to continue it, or choose an "
         "empty workdir",
         workdir_);
  }
  if (resume && !fs::exists(checkpoint)) fail("--resume: '{}' does not exist", checkpoint.string());
  fs::create_directories(dir);

  // The policy is the start checkpoint's model: its architecture (context length included) is
  // what the actors serve, and a weight update must match it exactly.
  const CheckpointContents start = checkpoint_read_info(rl.policy);
  if (start.expert_format) {
    fail("rl.policy '{}' holds packed FP4 experts; RL trains float master weights, so start "
         "from a float checkpoint",
         rl.policy);
  }
  if (start.tokenizer != config_.model.tokenizer) {
    fail("rl.policy '{}' uses tokenizer '{}', the config's model.tokenizer is '{}'", rl.policy,
         start.tokenizer, config_.model.tokenizer);
  }
  config_.model = start.config;
  const int rollouts_per_step = rl.prompts_per_step * rl.samples_per_prompt;
  max_batch_ = std::min(rollouts_per_step, 128);
  const int model_batch = std::max(max_batch_, config_.sft.eval_batch);
  policy_ = std::make_unique<Transformer<float>>(*ops_, config_.model, model_batch,
                                                 config_.model.max_seq_len);
  reference_ = std::make_unique<Transformer<float>>(*ops_, config_.model, model_batch,
                                                    config_.model.max_seq_len);
  checkpoint_load_weights(rl.policy, *reference_);
  checkpoint_load_weights(rl.policy, *policy_);
  if (config_.fp4.enabled()) {
    // The actors run the packed FP4 experts; the learner computes the same function through
    // QAT, so their logprobs agree and the importance ratios measure staleness, not
    // quantization.
    policy_->set_qat(config_.fp4.format, config_.fp4.clipped_ste);
    reference_->set_qat(config_.fp4.format, config_.fp4.clipped_ste);
  }
  optimizer_ = std::make_unique<AdamW<float>>(*ops_, policy_->layout(), rl.optimizer);

  store_path_ = store_path.empty() ? (dir / "store").string() : store_path;
  store_ = RolloutStore::open(store_path_, RolloutStore::Mode::kReadWrite);
  const std::optional<v1::LearnerCursor> cursor = store_->cursor(run_id_);

  if (resume) {
    step_ = resume_training(checkpoint.string(), config_.source, (dir / "config.yaml").string(),
                            *policy_, *optimizer_, *ops_)
                .step;
    // The cursor is written right after the checkpoint; a crash between the two leaves it one
    // checkpoint behind, never ahead.
    if (cursor && int64_t(cursor->step()) > step_) {
      fail("store '{}' has run '{}' at step {}, ahead of its checkpoint (step {}): the "
           "checkpoint is not the one this store belongs to",
           store_path_, run_id_, cursor->step(), step_);
    }
    truncate_metrics_after((dir / "metrics.jsonl").string(), step_);
    spdlog::info("resumed run '{}' from {} at step {}", run_id_, checkpoint.string(), step_);
  } else {
    if (cursor) {
      fail("store '{}' already holds run '{}' (at step {}); resume it with --resume or use "
           "another workdir",
           store_path_, run_id_, cursor->step());
    }
    std::ofstream(dir / "config.yaml") << config_.source;
    std::ofstream(dir / "metrics.jsonl", std::ios::trunc);
  }
  uint64_t stored = 0;
  store_->for_each_scored(run_id_, [&](const v1::ScoredRollout&) { ++stored; });
  rollouts_stored_ = stored;
  collector_ = std::make_unique<Collector>(config_, run_id_, suite_, sampler_, scorer_, *store_);
}

RlTrainer::~RlTrainer() = default;

void RlTrainer::train_on(const std::vector<v1::ScoredRollout>& scored, RlStepMetrics& m) {
  const RlConfig& rl = config_.rl;
  const int n = rl.samples_per_prompt;

  // Rewards and advantages, group by group, over the members that have a reward and are
  // fresh enough; the others get no weight at all.
  std::vector<double> advantage(scored.size(), 0.0);
  std::vector<bool> trainable(scored.size(), false);
  double reward_sum = 0, reward_sq = 0, gt_sum = 0, length_sum = 0;
  int rewarded = 0, invalid = 0, gt_count = 0;
  for (size_t g = 0; g < scored.size(); g += size_t(n)) {
    std::vector<double> rewards;
    std::vector<size_t> members;
    for (size_t i = g; i < g + size_t(n); ++i) {
      const v1::Rollout& r = scored[i].rollout();
      length_sum += r.response_tokens_size();
      if (scored[i].has_ground_truth_score()) {
        gt_sum += scored[i].ground_truth_score();
        ++gt_count;
      }
      if (int64_t(r.policy_version()) + rl.max_lag < step_) {
        ++m.stale_skipped;
        continue;
      }
      const std::optional<double> reward = rollout_reward(scored[i], rl.reward);
      if (!reward) {
        ++invalid;
        continue;
      }
      rewards.push_back(*reward);
      members.push_back(i);
      reward_sum += *reward;
      reward_sq += *reward * *reward;
      ++rewarded;
    }
    if (members.size() < 2) continue;  // nothing to compare within this prompt
    const std::vector<double> adv =
        grpo_advantages(rewards, int(rewards.size()), rl.objective.adv_eps);
    for (size_t j = 0; j < members.size(); ++j) {
      advantage[members[j]] = adv[j];
      trainable[members[j]] = true;
    }
  }
  {
    double n_j = 0, sj = 0, sg = 0, sjj = 0, sgg = 0, sjg = 0;
    for (const v1::ScoredRollout& s : scored) {
      if (!s.judgment().valid() || !s.has_ground_truth_score()) continue;
      const double j = s.judgment().score(), g = s.ground_truth_score();
      n_j += 1;
      sj += j;
      sg += g;
      sjj += j * j;
      sgg += g * g;
      sjg += j * g;
    }
    if (n_j > 0) {
      m.judge_mean = sj / n_j;
      const double cov = sjg / n_j - (sj / n_j) * (sg / n_j);
      const double var_j = sjj / n_j - (sj / n_j) * (sj / n_j);
      const double var_g = sgg / n_j - (sg / n_j) * (sg / n_j);
      m.judge_gt_correlation = var_j > 1e-12 && var_g > 1e-12 ? cov / std::sqrt(var_j * var_g) : 0;
    }
  }
  m.reward_mean = rewarded ? reward_sum / rewarded : 0;
  m.reward_std = rewarded ? std::sqrt(std::max(0.0, reward_sq / rewarded - m.reward_mean * m.reward_mean)) : 0;
  m.ground_truth_mean = gt_count ? gt_sum / gt_count : 0;
  m.judge_invalid_rate = scored.empty() ? 0 : double(invalid) / double(scored.size());
  m.response_tokens = scored.empty() ? 0 : length_sum / double(scored.size());

  // The trainable rollouts, as views into `scored`.
  std::vector<RlRollout> rollouts;
  for (size_t i = 0; i < scored.size(); ++i) {
    if (!trainable[i]) continue;
    const v1::Rollout& ro = scored[i].rollout();
    rollouts.push_back(
        {std::span<const int32_t>(ro.prompt_tokens().data(), size_t(ro.prompt_tokens_size())),
         std::span<const int32_t>(ro.response_tokens().data(), size_t(ro.response_tokens_size())),
         std::span<const float>(ro.logprobs().data(), size_t(ro.logprobs_size())), advantage[i]});
  }
  const auto t0 = Clock::now();
  const RlGradientStats g =
      rl_accumulate_gradients(*policy_, *reference_, rollouts, max_batch_,
                              tokenizer_->special(SpecialToken::kPad), rl.objective);
  if (g.tokens > 0) {
    const double tokens = double(g.tokens);
    m.loss = g.loss;
    m.kl = g.kl_sum / tokens;
    m.entropy = g.entropy_sum / tokens;
    m.logprob_mismatch = g.mismatch_sum / tokens;
    m.logprob_mismatch_max = g.mismatch_max;
    m.clip_fraction = double(g.clipped) / tokens;
    m.grad_norm = optimizer_->grad_norm(policy_->grads());
    if (!std::isfinite(m.loss) || !std::isfinite(m.grad_norm)) {
      fail("RL diverged: step {} has a non-finite loss ({}) or gradient norm ({}); the update "
           "was not applied (last checkpoint: {})",
           step_ + 1, m.loss, m.grad_norm,
           (fs::path(workdir_) / "checkpoint.safetensors").string());
    }
    optimizer_->step(policy_->params(), policy_->grads(), step_, rl.steps, m.grad_norm);
    policy_->params_changed();
    policy_->update_router_bias();
  } else {
    // Every group agreed (or had no reward): there is no preference to learn from, and the
    // policy stays as it is. The version still advances, so versions count steps.
    spdlog::warn("step {}: no trainable rollouts (all groups tied or invalid); no update",
                 step_ + 1);
  }
  m.train_s = seconds_since(t0);
}

void RlTrainer::publish_current(RlStepMetrics* m) {
  const auto t0 = Clock::now();
  auto payload = std::make_shared<WeightPayload>();
  payload->version = uint64_t(step_);
  payload->bytes = serialize_policy(
      *policy_, tokenizer_->name(),
      config_.fp4.enabled() ? std::optional<Fp4Format>(config_.fp4.format) : std::nullopt);
  {
    std::lock_guard lock(mutex_);
    weights_ = payload;
  }
  sampler_.publish(*payload);
  if (m) m->publish_s = seconds_since(t0);
}

void RlTrainer::save_checkpoint() {
  const fs::path path = fs::path(workdir_) / "checkpoint.safetensors";
  const uint64_t next_prompt = uint64_t(step_) * uint64_t(config_.rl.prompts_per_step);
  TrainingState state{step_, int64_t(next_prompt), "", config_.source};
  checkpoint_save(path.string(), *policy_, tokenizer_->name(), optimizer_->first_moment(),
                  optimizer_->second_moment(), &state);
  // After the checkpoint, never before: a cursor must not point past what a restart can load.
  v1::LearnerCursor cursor;
  cursor.set_run_id(run_id_);
  cursor.set_step(uint64_t(step_));
  cursor.set_next_prompt_index(next_prompt);
  cursor.set_checkpoint(path.string());
  store_->put_cursor(cursor);
  std::lock_guard lock(mutex_);
  last_checkpoint_ = path.string();
  ++checkpoint_generation_;
  checkpoint_done_.notify_all();
}

void RlTrainer::write_metrics(const RlStepMetrics& m) {
  nlohmann::json row = {{"step", m.step},
                        {"reward_mean", m.reward_mean},
                        {"reward_std", m.reward_std},
                        {"ground_truth_mean", m.ground_truth_mean},
                        {"judge_invalid_rate", m.judge_invalid_rate},
                        {"judge_mean", m.judge_mean},
                        {"judge_gt_correlation", m.judge_gt_correlation},
                        {"kl", m.kl},
                        {"clip_fraction", m.clip_fraction},
                        {"entropy", m.entropy},
                        {"response_tokens", m.response_tokens},
                        {"logprob_mismatch", m.logprob_mismatch},
                        {"logprob_mismatch_max", m.logprob_mismatch_max},
                        {"stale_skipped", m.stale_skipped},
                        {"from_store", m.from_store},
                        {"loss", m.loss},
                        {"grad_norm", m.grad_norm},
                        {"actor_tokens_per_s", m.actor_tokens_per_s},
                        {"time_s", {{"generate", m.generate_s},
                                    {"score", m.score_s},
                                    {"store", m.store_s},
                                    {"train", m.train_s},
                                    {"publish", m.publish_s}}}};
  const ForwardStats& stats = policy_->last_stats();
  row["expert_load"] = stats.expert_load;
  std::ofstream(fs::path(workdir_) / "metrics.jsonl", std::ios::app) << row.dump() << "\n";
}

RlStepMetrics RlTrainer::step() {
  RlStepMetrics m;
  CollectStats c;
  // Version step_ exactly; read back from the store if a previous life of this run stored it.
  const std::vector<v1::ScoredRollout> scored =
      collector_->collect(step_, uint64_t(step_), true, c);
  m.from_store = c.from_store;
  m.generate_s = c.generate_s;
  m.score_s = c.score_s;
  m.store_s = c.store_s;
  m.actor_tokens_per_s = c.actor_tokens_per_s;
  if (!c.from_store) {
    std::lock_guard lock(mutex_);
    rollouts_stored_ += scored.size();
  }
  train_on(scored, m);
  {
    std::lock_guard lock(mutex_);  // status() reads step_ from gRPC threads
    ++step_;
  }
  m.step = step_;
  publish_current(&m);
  std::lock_guard lock(mutex_);
  last_reward_mean_ = m.reward_mean;
  return m;
}

void RlTrainer::train() {
  const auto start = Clock::now();
  const RlConfig& rl = config_.rl;
  // Actors that are behind (a resumed run, a restarted actor) catch up before sampling.
  publish_current(nullptr);
  ProgressMeter progress("rl", rl.steps);
  while (step_ < rl.steps && !stop_requested_) {
    const RlStepMetrics m = step();
    write_metrics(m);
    progress.update(step_, m.loss, int64_t(m.response_tokens * rl.prompts_per_step * rl.samples_per_prompt),
                    fmt::format("reward {:.2f} gt {:.2f} kl {:.4f} clip {:.3f} mismatch {:.1e}{}",
                                m.reward_mean, m.ground_truth_mean, m.kl, m.clip_fraction,
                                m.logprob_mismatch, m.from_store ? " (from store)" : ""));
    bool requested = false;
    {
      std::lock_guard lock(mutex_);
      requested = checkpoint_requested_;
      checkpoint_requested_ = false;
    }
    if (requested || step_ % rl.checkpoint_every == 0 || step_ == rl.steps) save_checkpoint();
  }
  if (stop_requested_) save_checkpoint();
  train_s_ += seconds_since(start);
  std::lock_guard lock(mutex_);
  state_ = "done";
  checkpoint_done_.notify_all();
}

RlSummary RlTrainer::finish() {
  RlSummary s;
  s.run_id = run_id_;
  s.steps = step_;
  s.eval_examples = config_.rl.eval_examples;
  const fs::path policy_path = fs::path(workdir_) / "policy.safetensors";
  checkpoint_save(policy_path.string(), *policy_, tokenizer_->name());
  s.policy_path = policy_path.string();
  s.store_path = store_path_;
  // Paired standard error of the mean difference: both policies answer the same prompts.
  auto paired_stderr = [](const std::vector<double>& before, const std::vector<double>& after) {
    const size_t count = std::min(before.size(), after.size());
    if (count < 2) return 0.0;
    double mean = 0, sq = 0;
    for (size_t i = 0; i < count; ++i) mean += after[i] - before[i];
    mean /= double(count);
    for (size_t i = 0; i < count; ++i) sq += (after[i] - before[i] - mean) * (after[i] - before[i] - mean);
    return std::sqrt(sq / double(count - 1) / double(count));
  };
  spdlog::info("evaluating the start policy and the RL policy on {} held-out prompts (greedy "
               "and sampled)",
               s.eval_examples);
  std::vector<double> before_scores, after_scores;
  s.before = evaluate_policy(*reference_, *tokenizer_, suite_, s.eval_examples,
                             config_.sft.eval_batch, config_.sampling, true, &before_scores);
  s.after = evaluate_policy(*policy_, *tokenizer_, suite_, s.eval_examples,
                            config_.sft.eval_batch, config_.sampling, true, &after_scores);
  s.mean_score_diff_stderr = paired_stderr(before_scores, after_scores);
  s.before_sampled = evaluate_policy(*reference_, *tokenizer_, suite_, s.eval_examples,
                                     config_.sft.eval_batch, config_.sampling, false, &before_scores);
  s.after_sampled = evaluate_policy(*policy_, *tokenizer_, suite_, s.eval_examples,
                                    config_.sft.eval_batch, config_.sampling, false, &after_scores);
  s.sampled_mean_score_diff_stderr = paired_stderr(before_scores, after_scores);
  std::lock_guard lock(mutex_);
  s.rollouts_stored = rollouts_stored_;
  s.train_s = train_s_;
  return s;
}

RlStatus RlTrainer::status() const {
  std::lock_guard lock(mutex_);
  RlStatus s;
  s.run_id = run_id_;
  s.step = step_;
  s.total_steps = config_.rl.steps;
  s.rollouts_stored = rollouts_stored_;
  s.last_reward_mean = last_reward_mean_;
  s.state = stop_requested_ && state_ == "running" ? "stopping" : state_;
  return s;
}

std::shared_ptr<const WeightPayload> RlTrainer::current_weights() const {
  std::lock_guard lock(mutex_);
  return weights_;
}

std::string RlTrainer::request_checkpoint() {
  std::unique_lock lock(mutex_);
  if (state_ == "done") return last_checkpoint_;
  const int64_t generation = checkpoint_generation_;
  checkpoint_requested_ = true;
  checkpoint_done_.wait(lock, [&] { return checkpoint_generation_ != generation || state_ == "done"; });
  return last_checkpoint_;
}

void RlTrainer::stop() { stop_requested_ = true; }

}  // namespace rlhf
