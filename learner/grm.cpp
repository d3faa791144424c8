#include "learner/grm.h"

#include <filesystem>

#include <spdlog/spdlog.h>

#include "common/error.h"
#include "common/rng.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_ops.h"
#include "model/checkpoint.h"
#include "model/generate.h"
#include "reward/judge.h"

namespace rlhf {

namespace fs = std::filesystem;

TrainingSequence split_pair_example(const Tokenizer& tokenizer, const PairwiseExample& e,
                                    size_t index) {
  RLHF_CHECK(e.reference.has_value(), "a split pair example needs a reference");
  const std::optional<SplitPairOutput> out = split_pair_output(e.reasoning, e.verdict);
  if (!out) {
    fail("pairwise record {} (task '{}'): the split pair layout (grm.split_pairs) needs "
         "reasoning of the form 'A <about A>; B <about B>' with no newline in side A's part, "
         "got '{}'",
         index, e.prompt, e.reasoning);
  }
  const SplitPairTurns turns = split_pair_turns(e.prompt, e.response_a, e.response_b, *e.reference);
  // Trained: the judge's two turns and the final eos. Given: the prompt and side B's line.
  TrainingSequence seq;
  seq.tokens = format_prompt(tokenizer, turns.prompt, SpecialToken::kJudge);
  seq.loss_mask.assign(seq.tokens.size(), 0);
  auto append = [&](const std::string& text, uint8_t trained) {
    const std::vector<int32_t> body = tokenizer.encode(text);
    seq.tokens.insert(seq.tokens.end(), body.begin(), body.end());
    seq.loss_mask.insert(seq.loss_mask.end(), body.size(), trained);
  };
  append(out->a_turn, 1);
  append(turns.b_line, 0);
  append(out->b_turn, 1);
  seq.tokens.push_back(tokenizer.special(SpecialToken::kEos));
  seq.loss_mask.push_back(1);
  return seq;
}

JudgeMixSource::JudgeMixSource(const ScoredData& data, const TaskSuite& suite,
                               const Tokenizer& tokenizer, double judge_fraction,
                               int max_seq_len, int layout)
    : demonstrations_(suite, tokenizer), judge_fraction_(judge_fraction) {
  auto add = [&](TrainingSequence seq, const std::string& prompt) {
    if (int(seq.tokens.size()) > max_seq_len + 1) {
      ++too_long_;
      return;
    }
    judge_.push_back(std::move(seq));
    judge_prompts_.push_back(prompt);
  };
  for (const ScoredExample& e : data.pointwise) {
    add(format_example(tokenizer,
                       pointwise_judge_prompt(e.prompt, e.response, e.reference, layout),
                       pointwise_judge_output(e.reasoning, e.score), SpecialToken::kJudge),
        e.prompt);
  }
  for (size_t i = 0; i < data.pairwise.size(); ++i) {
    const PairwiseExample& e = data.pairwise[i];
    if (layout == kJudgeSplitPairLayout && e.reference) {
      add(split_pair_example(tokenizer, e, i), e.prompt);
      continue;
    }
    add(format_example(tokenizer,
                       pairwise_judge_prompt(e.prompt, e.response_a, e.response_b, e.reference,
                                             layout),
                       pairwise_judge_output(e.reasoning, e.verdict), SpecialToken::kJudge),
        e.prompt);
  }
  if (judge_.empty()) {
    fail("none of the {} judge records fits model.max_seq_len {}", too_long_, max_seq_len);
  }
}

bool JudgeMixSource::is_judge(uint64_t index) const {
  return double(mix_seed(index, 0x6A0D) % 1000000) < judge_fraction_ * 1e6;
}

TrainingSequence JudgeMixSource::sequence(uint64_t index) const {
  if (!is_judge(index)) return demonstrations_.sequence(index);
  return judge_[index % judge_.size()];
}

std::string JudgeMixSource::describe(uint64_t index) const {
  if (!is_judge(index)) return demonstrations_.describe(index);
  const size_t i = index % judge_.size();
  return "judge example " + std::to_string(i) + " (task '" + judge_prompts_[i] + "')";
}

ScoredData make_grm_data(const RunConfig& config) {
  const GrmConfig& g = config.grm;
  if (!g.data.empty()) {
    ScoredData data = read_scored_jsonl(g.data);
    spdlog::info("judge data from {}: {} pointwise, {} pairwise records", g.data,
                 data.pointwise.size(), data.pairwise.size());
    return data;
  }
  const TaskSuite suite(config.tasks);
  JudgeDataOptions options;
  options.prompts = g.prompts;
  // An index range of its own (demonstrations draw 40-bit indices), so the judged examples are
  // not the demonstrations the policy was trained on.
  options.first_index = uint64_t(1) << 41;
  options.policy_samples = g.policy.empty() ? 0 : g.policy_samples;
  options.pairwise_fraction = g.pairwise_fraction;
  options.pairs_per_prompt = g.pairs_per_prompt;
  options.corrupted_per_prompt = g.corrupted_per_prompt;
  options.mirror_pairs = g.mirror_pairs;
  options.tie_pair_fraction = g.tie_pair_fraction;
  options.reasoning = g.reasoning;
  options.with_reference = g.with_reference;
  options.position_marks = g.position_marks;
  options.aligned_marks = g.aligned_marks;
  options.quote_response = g.quote_response;
  options.prompt_labels = g.prompt_labels;
  options.layout = g.layout();
  options.scrambled_per_prompt = g.scrambled_per_prompt;
  options.swapped_per_prompt = g.swapped_per_prompt;
  options.seed = g.seed;
  std::unique_ptr<Ops<float>> ops;  // before the policy, which frees its buffers through it
  std::unique_ptr<Transformer<float>> policy;
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<Generator> generator;
  if (!g.policy.empty() && options.policy_samples > 0) {
    const CheckpointContents info = checkpoint_read_info(g.policy);
    tokenizer = make_tokenizer(info.tokenizer);
    ops = make_float_ops(config.runtime.device);
    policy = checkpoint_load_model(g.policy, *ops, config.sft.eval_batch);
    generator = std::make_unique<Generator>(*policy, *tokenizer, config.sft.eval_batch);
    spdlog::info("sampling {} responses per prompt from {} for {} prompts",
                 options.policy_samples, g.policy, options.prompts);
  }
  ScoredData data = build_judge_data(suite, Split::kTrain, generator.get(), options);
  spdlog::info("built judge data: {} pointwise, {} pairwise records", data.pointwise.size(),
               data.pairwise.size());
  return data;
}

GrmRunSummary run_train_grm(const RunConfig& config, const std::string& workdir, bool resume) {
  // Sampling the judge data and training both run on runtime.device: a device that cannot run
  // stops the command before either starts.
  check_float_backend(config.runtime.device);
  GrmRunSummary summary;
  const fs::path dir(workdir);
  summary.data_path = (dir / "scored.jsonl").string();
  ScoredData data;
  if (resume) {
    data = read_scored_jsonl(summary.data_path);
  } else {
    if (fs::exists(dir / "checkpoint.safetensors")) {
      fail("workdir '{}' already holds a checkpoint; pass --resume to continue it, or choose an "
           "empty workdir",
           workdir);
    }
    data = make_grm_data(config);
    fs::create_directories(dir);
    write_scored_jsonl(summary.data_path, data);
  }
  summary.pointwise_records = int64_t(data.pointwise.size());
  summary.pairwise_records = int64_t(data.pairwise.size());
  cpu_set_threads(config.runtime.threads);
  const TaskSuite suite(config.tasks);
  const auto tokenizer = make_tokenizer(config.model.tokenizer);
  auto source = std::make_shared<JudgeMixSource>(data, suite, *tokenizer,
                                                 config.grm.judge_fraction,
                                                 config.model.max_seq_len, config.grm.layout());
  summary.too_long_records = int64_t(source->too_long());
  if (source->too_long() > 0) {
    spdlog::warn("{} of {} judge records are longer than model.max_seq_len {} and are left out",
                 source->too_long(), data.pointwise.size() + data.pairwise.size(),
                 config.model.max_seq_len);
  }
  SftOptions options;
  options.data = source;
  options.init_from = config.grm.policy;
  // The prompt layout travels with the judge (reward/judge.h).
  options.checkpoint_annotations = judge_layout_annotations(config.grm.layout());
  SftTrainer trainer(config, workdir, resume, options);
  trainer.train();
  trainer.fail_if_diverged();
  summary.sft = trainer.finish();
  return summary;
}

}  // namespace rlhf
