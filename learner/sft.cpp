#include "learner/sft.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>

#include <fmt/core.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "common/error.h"
#include "common/progress.h"
#include "kernels/backend.h"
#include "model/checkpoint.h"
#include "model/generate.h"

namespace rlhf {

namespace fs = std::filesystem;

std::vector<TokenBatch> sft_make_batches(const TaskSuite& suite, const Tokenizer& tokenizer,
                                         const std::vector<uint64_t>& example_indices,
                                         int max_seq_len, int buckets) {
  const DemonstrationSource source(suite, tokenizer);
  return sft_make_batches(source, tokenizer, example_indices, max_seq_len, buckets);
}

TrainingSequence DemonstrationSource::sequence(uint64_t index) const {
  const Demonstration demo = suite_.demonstration(index);
  return format_example(tokenizer_, demo.example.prompt, demo.response);
}

std::string DemonstrationSource::describe(uint64_t index) const {
  return "demonstration " + std::to_string(index) + " ('" +
         suite_.demonstration(index).example.prompt + "')";
}

std::vector<TokenBatch> sft_make_batches(const SftDataSource& source, const Tokenizer& tokenizer,
                                         const std::vector<uint64_t>& example_indices,
                                         int max_seq_len, int buckets) {
  std::vector<TrainingSequence> sequences;
  sequences.reserve(example_indices.size());
  int64_t targets = 0;
  for (uint64_t index : example_indices) {
    TrainingSequence seq = source.sequence(index);
    if (int(seq.tokens.size()) > max_seq_len + 1) {
      fail("{} is {} tokens long; model.max_seq_len is {}", source.describe(index),
           seq.tokens.size(), max_seq_len);
    }
    for (size_t i = 1; i < seq.tokens.size(); ++i) targets += seq.loss_mask[i];
    sequences.push_back(std::move(seq));
  }
  std::stable_sort(sequences.begin(), sequences.end(), [](const auto& a, const auto& b) {
    return a.tokens.size() < b.tokens.size();
  });
  const int32_t pad = tokenizer.special(SpecialToken::kPad);
  const float weight = targets > 0 ? 1.0f / float(targets) : 0.0f;
  const int n = int(sequences.size());
  buckets = std::max(1, std::min(buckets, n));
  std::vector<TokenBatch> batches;
  for (int k = 0; k < buckets; ++k) {
    const int first = n * k / buckets, last = n * (k + 1) / buckets;
    TokenBatch batch;
    batch.batch = last - first;
    batch.seq_len = int(sequences[last - 1].tokens.size()) - 1;  // sorted: the last is longest
    for (int s = first; s < last; ++s) {
      const TrainingSequence& seq = sequences[s];
      // Position i reads tokens[i] and predicts tokens[i + 1].
      const int len = int(seq.tokens.size()) - 1;
      for (int i = 0; i < batch.seq_len; ++i) {
        const bool real = i < len;
        batch.tokens.push_back(real ? seq.tokens[i] : pad);
        batch.targets.push_back(real ? seq.tokens[i + 1] : pad);
        batch.weights.push_back(real && seq.loss_mask[i + 1] ? weight : 0.0f);
      }
    }
    batches.push_back(std::move(batch));
  }
  return batches;
}

PolicyEvaluation evaluate_policy(Transformer<float>& model, const Tokenizer& tokenizer,
                                 const TaskSuite& suite, int examples, int batch,
                                 const SamplingConfig& sampling, bool greedy,
                                 std::vector<double>* scores) {
  Generator generator(model, tokenizer, batch);
  SamplingParams params;
  params.temperature = greedy ? 0.0 : sampling.temperature;
  params.top_k = sampling.top_k;
  params.top_p = sampling.top_p;
  params.max_new_tokens = sampling.max_new_tokens;
  params.seed = sampling.seed;
  std::vector<TaskExample> prompts_ex;
  std::vector<std::string> prompts;
  if (scores) scores->clear();
  for (int i = 0; i < examples; ++i) {
    prompts_ex.push_back(suite.example(Split::kHeldOut, uint64_t(i)));
    prompts.push_back(prompts_ex.back().prompt);
  }
  const std::vector<Generation> outputs = generator.generate_text(prompts, params);
  PolicyEvaluation eval;
  eval.examples = examples;
  std::map<std::string, PolicyEvaluation::PerTask> per_task;
  for (int i = 0; i < examples; ++i) {
    const Grade grade = suite.grade(prompts_ex[i], outputs[i].text);
    if (scores) scores->push_back(grade.score);
    eval.accuracy += grade.correct ? 1 : 0;
    eval.mean_score += grade.score;
    auto& task = per_task[prompts_ex[i].task];
    task.task = prompts_ex[i].task;
    task.examples += 1;
    task.accuracy += grade.correct ? 1 : 0;
    task.mean_score += grade.score;
    if (i < 8) {
      eval.sample_lines.push_back(fmt::format("{:<16} -> {:<12} ({:g}/10)", prompts_ex[i].prompt,
                                              outputs[i].text, grade.score));
    }
  }
  eval.accuracy /= examples;
  eval.mean_score /= examples;
  for (auto& [name, task] : per_task) {
    task.accuracy /= task.examples;
    task.mean_score /= task.examples;
    eval.per_task.push_back(task);
  }
  return eval;
}

SftTrainer::SftTrainer(RunConfig config, std::string workdir, bool resume, SftOptions options)
    : config_(std::move(config)), workdir_(std::move(workdir)),
      ops_(make_float_ops(config_.runtime.device)),
      tokenizer_(make_tokenizer(config_.model.tokenizer)), suite_(config_.tasks),
      spike_detector_(config_.stability.spike), routing_(config_.stability.anticipatory) {
  cpu_set_threads(config_.runtime.threads);
  const fs::path dir(workdir_);
  const fs::path checkpoint = dir / "checkpoint.safetensors";
  if (!resume && fs::exists(checkpoint)) {
    fail("workdir '{}' already holds a checkpoint; pass --resume to continue it, or choose an "
         "empty workdir",
         workdir_);
  }
  if (resume && !fs::exists(checkpoint)) {
    fail("--resume: '{}' does not exist", checkpoint.string());
  }
  fs::create_directories(dir);
  // Activations sized for both training batches and the evaluation's decode batches.
  model_ = std::make_unique<Transformer<float>>(
      *ops_, config_.model, std::max(config_.sft.batch_size, config_.sft.eval_batch),
      config_.model.max_seq_len);
  optimizer_ = std::make_unique<AdamW<float>>(*ops_, model_->layout(), config_.sft.optimizer);
  data_ = options.data ? options.data
                       : std::make_shared<DemonstrationSource>(suite_, *tokenizer_);
  checkpoint_annotations_ = options.checkpoint_annotations;
  data_rng_.reseed(mix_seed(config_.sft.seed, 0xDA7A));
  if (resume) {
    const TrainingState state =
        resume_training(checkpoint.string(), config_.source, (dir / "config.yaml").string(),
                        *model_, *optimizer_, *ops_);
    step_ = state.step;
    data_position_ = state.data_position;
    data_rng_.deserialize(state.rng_state);
    truncate_metrics_after((dir / "metrics.jsonl").string(), step_);
    spdlog::info("resumed from {} at step {}", checkpoint.string(), step_);
  } else if (!options.init_from.empty()) {
    // Fine-tuning: every tensor of the starting checkpoint must fit this model exactly
    // (model.max_seq_len may differ: it only sizes activations).
    const CheckpointContents start = checkpoint_read_info(options.init_from);
    if (start.expert_format) {
      fail("'{}' holds packed FP4 experts; start from a float checkpoint", options.init_from);
    }
    checkpoint_load_weights(options.init_from, *model_);
    spdlog::info("starting from the weights of {}", options.init_from);
    std::ofstream(dir / "config.yaml") << config_.source;
    std::ofstream(dir / "metrics.jsonl", std::ios::trunc);
  } else {
    model_->init_random(mix_seed(config_.sft.seed, 0x1417));
    std::ofstream(dir / "config.yaml") << config_.source;
    std::ofstream(dir / "metrics.jsonl", std::ios::trunc);
  }
}

SftTrainer::~SftTrainer() = default;

TrainingState resume_training(const std::string& checkpoint, const std::string& config_source,
                              const std::string& config_copy, Transformer<float>& model,
                              AdamW<float>& optimizer, Ops<float>& ops) {
  const CheckpointContents info = checkpoint_read_info(checkpoint);
  if (!info.training) fail("'{}' is not a training checkpoint", checkpoint);
  if (info.training->run_config != config_source) {
    fail("'{}' was written by a run with a different config; resume with the config the run "
         "started with (a copy is in {})",
         checkpoint, config_copy);
  }
  checkpoint_load_weights(checkpoint, model);
  checkpoint_load_moments(checkpoint, model.layout(), optimizer.first_moment(),
                          optimizer.second_moment(), ops);
  model.params_changed();
  return *info.training;
}

void truncate_metrics_after(const std::string& path, int64_t step) {
  std::ifstream in(path);
  std::string kept, line;
  while (std::getline(in, line)) {
    const auto row = nlohmann::json::parse(line, nullptr, false);
    if (!row.is_discarded() && row.contains("step") && row["step"].is_number_integer() &&
        row["step"].get<int64_t>() <= step) {
      kept += line + "\n";
    }
  }
  in.close();
  const std::string tmp = path + ".tmp";
  std::ofstream(tmp, std::ios::trunc) << kept;
  fs::rename(tmp, path);
}

void SftTrainer::save_checkpoint() {
  TrainingState state{step_, data_position_, data_rng_.serialize(), config_.source};
  checkpoint_save((fs::path(workdir_) / "checkpoint.safetensors").string(), *model_,
                  tokenizer_->name(), optimizer_->first_moment(), optimizer_->second_moment(),
                  &state, checkpoint_annotations_);
}

std::vector<double> SftTrainer::train(int64_t stop_at_step) {
  const int64_t total = config_.sft.steps;
  const int64_t stop = stop_at_step < 0 ? total : std::min(stop_at_step, total);
  std::ofstream metrics(fs::path(workdir_) / "metrics.jsonl", std::ios::app);
  ProgressMeter progress("sft", total);
  std::vector<double> losses;
  const auto start = std::chrono::steady_clock::now();
  while (step_ < stop) {
    std::vector<uint64_t> indices(config_.sft.batch_size);
    // 40-bit demonstration indices: the stream never repeats an example in practice.
    for (auto& index : indices) index = data_rng_.next_u64() >> 24;
    data_position_ += config_.sft.batch_size;
    const std::vector<TokenBatch> batches = sft_make_batches(
        *data_, *tokenizer_, indices, config_.model.max_seq_len, config_.sft.length_buckets);
    if (config_.fp4.enabled() && step_ >= config_.fp4.qat_start_step && !model_->qat_format()) {
      model_->set_qat(config_.fp4.format, config_.fp4.clipped_ste);
      spdlog::info("step {}: quantization-aware training on ({} experts, {} STE)", step_,
                   fp4_format_name(config_.fp4.format),
                   config_.fp4.clipped_ste ? "clipped" : "plain");
    }
    const StressConfig& stress = config_.stability.stress;
    if (std::find(stress.outlier_steps.begin(), stress.outlier_steps.end(), step_) !=
        stress.outlier_steps.end()) {
      const std::vector<int> experts = inject_expert_outlier(
          *model_, stress.outlier_scale, mix_seed(config_.sft.seed, uint64_t(step_)));
      spdlog::warn("step {}: stress test: gate/up weights of expert {} (per MoE layer) x{}",
                   step_ + 1, fmt::join(experts, ","), stress.outlier_scale);
    }
    const auto step_start = std::chrono::steady_clock::now();
    const bool anticipatory = routing_.begin_step(*model_, step_);
    model_->zero_grads();
    double loss = 0;
    int64_t tokens = 0;  // processed, padding included: it is computed like any other position
    const int n_moe = config_.model.n_moe_layers();
    std::vector<ClampCounts> clamp(config_.model.n_layers);
    std::vector<int64_t> load(size_t(n_moe) * config_.model.n_routed_experts, 0);
    int64_t flips = 0;
    for (const TokenBatch& batch : batches) {
      loss += model_->forward_backward(batch);
      tokens += int64_t(batch.batch) * batch.seq_len;
      const ForwardStats& stats = model_->last_stats();
      for (size_t l = 0; l < clamp.size(); ++l) {
        clamp[l].gate += stats.clamp[l].gate;
        clamp[l].linear += stats.clamp[l].linear;
        clamp[l].total += stats.clamp[l].total;
      }
      for (int m = 0; m < n_moe; ++m) {
        for (int e = 0; e < config_.model.n_routed_experts; ++e) {
          load[size_t(m) * config_.model.n_routed_experts + e] += stats.expert_load[m][e];
        }
      }
      for (int64_t f : stats.router_flips) flips += f;
    }
    const double grad_norm = optimizer_->grad_norm(model_->grads());
    const SpikeCheck spike = spike_detector_.observe(loss, grad_norm);
    if (spike.spike) {
      routing_.on_spike(step_);
      spdlog::warn("step {}: {} spike (loss {:.4g}, z {:.1f}; grad norm {:.4g}, z {:.1f}){}{}",
                   step_ + 1, spike.loss_spike ? "loss" : "gradient-norm", loss, spike.loss_z,
                   grad_norm, spike.grad_z, spike.skip_update ? "; update skipped" : "",
                   config_.stability.anticipatory.mode == AnticipatoryMode::kOnSpike
                       ? fmt::format("; anticipatory routing on through step {}",
                                     step_ + 1 + config_.stability.anticipatory.window)
                       : "");
    }
    // A non-finite loss applied as an update would leave nothing worth training on.
    const bool diverged = !std::isfinite(loss) && !spike.skip_update;
    OptimizerStepInfo info{grad_norm, learning_rate_at(config_.sft.optimizer, step_, total)};
    if (!spike.skip_update && !diverged) {
      info = optimizer_->step(model_->params(), model_->grads(), step_, total, grad_norm);
      model_->params_changed();
      model_->update_router_bias();
    }
    ++step_;
    const double step_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - step_start).count();
    losses.push_back(loss);
    recent_losses_.push_back(loss);
    if (recent_losses_.size() > 20) recent_losses_.erase(recent_losses_.begin());
    train_tokens_ += tokens;

    // Expert load as min/max share of the mean, over MoE layers (1.0 = perfectly balanced).
    double load_min = 1, load_max = 1;  // stays 1 (balanced) for a model without MoE layers
    for (int m = 0; m < n_moe; ++m) {
      const int E = config_.model.n_routed_experts;
      double mean = 0;
      for (int e = 0; e < E; ++e) mean += double(load[size_t(m) * E + e]) / E;
      for (int e = 0; e < E; ++e) {
        const double share = mean > 0 ? double(load[size_t(m) * E + e]) / mean : 1.0;
        load_min = m == 0 && e == 0 ? share : std::min(load_min, share);
        load_max = m == 0 && e == 0 ? share : std::max(load_max, share);
      }
    }
    int64_t clamped_gate = 0, clamped_linear = 0, units = 0;
    nlohmann::json gate_per_layer = nlohmann::json::array(),
                   linear_per_layer = nlohmann::json::array();
    for (const ClampCounts& c : clamp) {
      clamped_gate += c.gate;
      clamped_linear += c.linear;
      units += c.total;
      gate_per_layer.push_back(c.total ? double(c.gate) / double(c.total) : 0.0);
      linear_per_layer.push_back(c.total ? double(c.linear) / double(c.total) : 0.0);
    }
    const double flip_rate =
        anticipatory && n_moe > 0 ? double(flips) / double(tokens * n_moe) : 0.0;
    history_.push_back(TrainStep{step_, loss, grad_norm, spike.spike, spike.skip_update,
                                 anticipatory, flip_rate, step_s});
    nlohmann::json row = {{"step", step_},
                          {"loss", loss},
                          {"grad_norm", grad_norm},
                          {"lr", info.lr},
                          {"tokens", tokens},
                          {"step_s", step_s},
                          {"spike", spike.spike},
                          {"loss_z", spike.loss_z},
                          {"grad_z", spike.grad_z},
                          {"update_skipped", spike.skip_update},
                          {"anticipatory", anticipatory},
                          {"router_flip_rate", flip_rate},
                          {"expert_load_min", load_min},
                          {"expert_load_max", load_max},
                          {"clamped_gate_fraction", units ? double(clamped_gate) / units : 0.0},
                          {"clamped_linear_fraction", units ? double(clamped_linear) / units : 0.0},
                          {"clamped_gate_per_layer", gate_per_layer},
                          {"clamped_linear_per_layer", linear_per_layer},
                          {"qat", model_->qat_format().has_value()}};
    metrics << row.dump() << '\n';
    if (diverged) {
      diverged_at_ = step_;
      spdlog::error("step {}: the loss is not finite; training stopped (the last checkpoint is "
                    "the one before this step)",
                    step_);
      break;
    }
    progress.update(step_, loss, tokens,
                    fmt::format("gnorm {:.2f} lr {:.2e} load {:.2f}-{:.2f}{}", grad_norm,
                                info.lr, load_min, load_max, anticipatory ? " AR" : ""));
    if (step_ % config_.sft.checkpoint_every == 0 || step_ == total) save_checkpoint();
  }
  train_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return losses;
}

void SftTrainer::fail_if_diverged() const {
  if (diverged_at_ < 0) return;
  fail("training diverged: the loss of step {} is not finite (see {}/metrics.jsonl); lower "
       "sft.optimizer.lr, or set stability.spike.skip_update_z to skip such updates",
       diverged_at_, workdir_);
}

SftSummary SftTrainer::finish() {
  SftSummary summary;
  summary.steps = step_;
  for (double l : recent_losses_) summary.final_loss += l / double(recent_losses_.size());
  summary.train_s = train_s_;
  summary.train_tokens_per_s = train_s_ > 0 ? double(train_tokens_) / train_s_ : 0;
  summary.policy_path = (fs::path(workdir_) / "policy.safetensors").string();
  checkpoint_save(summary.policy_path, *model_, tokenizer_->name(), nullptr, nullptr, nullptr,
                  checkpoint_annotations_);
  spdlog::info("evaluating on {} held-out prompts (greedy and sampled)", config_.sft.eval_examples);
  summary.greedy = evaluate_policy(*model_, *tokenizer_, suite_, config_.sft.eval_examples,
                                   config_.sft.eval_batch, config_.sampling, true);
  summary.sampled = evaluate_policy(*model_, *tokenizer_, suite_, config_.sft.eval_examples,
                                    config_.sft.eval_batch, config_.sampling, false);
  if (config_.fp4.enabled()) summary.packed = evaluate_packed_export();
  return summary;
}

PackedPolicyReport SftTrainer::evaluate_packed_export() {
  PackedPolicyReport report;
  report.format = fp4_format_name(config_.fp4.format);
  report.path = (fs::path(workdir_) / "policy-fp4.safetensors").string();
  checkpoint_save_packed(report.path, *model_, tokenizer_->name(), config_.fp4.format);
  const auto packed = checkpoint_load_model(report.path, *ops_, config_.sft.eval_batch);
  spdlog::info("evaluating the packed {} export {}", report.format, report.path);
  report.greedy = evaluate_policy(*packed, *tokenizer_, suite_, config_.sft.eval_examples,
                                  config_.sft.eval_batch, config_.sampling, true);
  // The mismatch is measured on responses the QAT model samples, as an actor would produce.
  Generator generator(*model_, *tokenizer_, config_.sft.eval_batch);
  SamplingParams params;
  params.temperature = config_.sampling.temperature;
  params.max_new_tokens = config_.sampling.max_new_tokens;
  params.seed = config_.sampling.seed;
  std::vector<std::string> prompts;
  for (int i = 0; i < config_.sft.eval_examples; ++i) {
    prompts.push_back(suite_.example(Split::kHeldOut, uint64_t(i)).prompt);
  }
  std::vector<std::vector<int32_t>> sequences;
  std::vector<int> first_target;
  for (const Generation& g : generator.generate_text(prompts, params)) {
    std::vector<int32_t> seq = g.prompt_tokens;
    seq.insert(seq.end(), g.tokens.begin(), g.tokens.end());
    first_target.push_back(int(g.prompt_tokens.size()));
    sequences.push_back(std::move(seq));
  }
  report.mismatch = logprob_mismatch(*model_, *packed, sequences, first_target);
  int64_t params_count = 0;
  for (const ExpertMatrixSpec& m : model_->expert_matrices()) params_count += m.rows * m.cols;
  const int64_t block = fp4_block_size(config_.fp4.format);
  report.expert_bits_per_param =
      8.0 * double(params_count / 2 + params_count / block +
                   4 * int64_t(model_->expert_matrices().size())) /
      double(params_count);
  return report;
}

LogprobMismatch logprob_mismatch(Transformer<float>& reference, Transformer<float>& other,
                                 const std::vector<std::vector<int32_t>>& sequences,
                                 const std::vector<int>& first_target) {
  LogprobMismatch m;
  std::vector<float> a, b;
  for (size_t s = 0; s < sequences.size(); ++s) {
    const std::vector<int32_t>& seq = sequences[s];
    const int n = int(seq.size()) - 1;  // position i predicts seq[i + 1]
    const int first = first_target[s] - 1;
    if (n <= first || n <= 0) continue;
    const std::span<const int32_t> targets(seq.data() + 1, size_t(n));
    for (int side = 0; side < 2; ++side) {
      Transformer<float>& model = side == 0 ? reference : other;
      const float* logits = model.forward(seq.data(), 1, n);
      (side == 0 ? a : b) =
          gather_logprobs(model.ops(), logits, targets, model.config().vocab_size);
    }
    for (int i = first; i < n; ++i) {
      const double d = std::abs(double(a[i]) - double(b[i]));
      m.max_abs = std::max(m.max_abs, d);
      m.mean_abs += d;
      ++m.tokens;
    }
  }
  if (m.tokens) m.mean_abs /= double(m.tokens);
  return m;
}

}  // namespace rlhf
