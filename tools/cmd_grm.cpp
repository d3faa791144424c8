// rlhf train-grm: train the generative reward model (learner/grm.h).
// rlhf eval grm: measure a judge on held-out prompts (reward/grm_eval.h).
#include <chrono>
#include <iostream>
#include <optional>

#include <fmt/core.h>
#include <spdlog/spdlog.h>

#include "common/error.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_ops.h"
#include "learner/grm.h"
#include "model/checkpoint.h"
#include "reward/grm_eval.h"
#include "reward/judge.h"
#include "tools/cli.h"
#include "tools/export_sink.h"

namespace rlhf::cli {

namespace {

using Clock = std::chrono::steady_clock;

struct TrainGrmOptions {
  CommonOptions common;
  std::string workdir;
  std::string policy;  // overrides grm.policy
  std::string data;    // overrides grm.data
  bool resume = false;
};

void train_grm(const TrainGrmOptions& o) {
  const auto start = Clock::now();
  RunConfig config = load_config(o.common);
  if (!o.policy.empty()) config.grm.policy = o.policy;
  if (!o.data.empty()) config.grm.data = o.data;
  const GrmRunSummary s = run_train_grm(config, o.workdir, o.resume);
  print_sft_summary(s.sft);
  std::cout << fmt::format("judge data {}: {} pointwise, {} pairwise records ({} too long, left "
                           "out)\n",
                           s.data_path, s.pointwise_records, s.pairwise_records,
                           s.too_long_records);
  nlohmann::json out = sft_summary_json(
      s.sft, std::chrono::duration<double>(Clock::now() - start).count());
  out["command"] = "train-grm";
  out["judge"] = s.sft.policy_path;
  out["scored_data"] = s.data_path;
  out["pointwise_records"] = s.pointwise_records;
  out["pairwise_records"] = s.pairwise_records;
  out["too_long_records"] = s.too_long_records;
  print_json(o.common, out);
}

struct EvalGrmOptions {
  CommonOptions common;  // --config: the task suite the held-out prompts come from
  std::string judge;
  std::string ablation;  // a second judge (e.g. trained without reasoning), evaluated alike
  GrmEvalOptions eval;
  int threads = 0;
  std::string records;  // JSONL of every judgment, or empty
};

nlohmann::json eval_json(const GrmEvalResult& r) {
  return {{"pairwise_accuracy", r.pairwise_accuracy},
          {"pairwise_accuracy_vote_k", r.pairwise_accuracy_vote_k},
          {"pairwise_accuracy_from_scores", r.pairwise_accuracy_from_scores},
          {"k", r.k},
          {"swap_consistency", r.swap_consistency},
          {"spearman", r.spearman},
          {"invalid_rate", r.invalid_rate},
          {"judge_samples", r.judge_samples},
          {"invalid_samples", r.invalid_samples},
          {"retries", r.retries},
          {"pairs", r.pairs},
          {"pointwise_items", r.pointwise_items},
          {"prompts", r.prompts},
          {"pair_judging", r.pair_judging}};
}

GrmEvalResult evaluate_checkpoint(const std::string& path, const TaskSuite& suite,
                                  const GrmEvalOptions& options, const std::string& device) {
  const CheckpointContents info = checkpoint_read_info(path);
  const auto tokenizer = make_tokenizer(info.tokenizer);
  const std::unique_ptr<Ops<float>> ops = make_float_ops(device);
  const auto model = checkpoint_load_model(path, *ops, options.max_batch);
  GrmEvalOptions with_layout = options;
  with_layout.layout = judge_layout_of(info, path);  // the layout this judge was trained with
  return evaluate_grm(*model, *tokenizer, suite, with_layout);
}

void print_eval(const std::string& name, const std::string& path, const GrmEvalResult& r) {
  std::cout << fmt::format(
      "{} ({}): {} held-out prompts, {} pairs ({}), {} pointwise items\n"
      "  pairwise accuracy   Voting@1 {:.3f}   Voting@{} {:.3f}   from pointwise scores {:.3f}\n"
      "  swap consistency    {:.3f}\n"
      "  spearman            {:.3f}\n"
      "  invalid rate        {:.4f} ({} of {} samples, {} retries)\n",
      name, path, r.prompts, r.pairs, r.pair_judging, r.pointwise_items, r.pairwise_accuracy, r.k,
      r.pairwise_accuracy_vote_k, r.pairwise_accuracy_from_scores, r.swap_consistency, r.spearman, r.invalid_rate,
      r.invalid_samples, r.judge_samples, r.retries);
  for (const std::string& line : r.examples) std::cout << "    " << line << "\n";
}

nlohmann::json pairwise_json(const PairwiseJudgment& j) {
  nlohmann::json votes = nlohmann::json::array();
  for (Verdict v : j.votes) votes.push_back(verdict_name(v));
  return {{"valid", j.valid},
          {"verdict", j.valid ? nlohmann::json(verdict_name(j.verdict)) : nlohmann::json()},
          {"preference_a", j.preference_a},
          {"votes", votes},
          {"reasoning", j.reasoning},
          {"invalid_samples", j.invalid_samples},
          {"retries", j.retries}};
}

// One line per greedy pointwise judgment, then one per pair: what the judge wrote, beside the
// grader's scores, so that its mistakes can be read (and counted) without rerunning it. A judge
// writes bytes, not always UTF-8; invalid bytes show as U+FFFD, as in the scored data.
void write_records(std::ostream& out, const std::string& which, const GrmEvalResult& r) {
  auto write = [&](const nlohmann::json& line) {
    out << line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  };
  auto score_or_null = [](const PointwiseJudgment& j) {
    return j.valid ? nlohmann::json(j.score) : nlohmann::json();
  };
  for (const GrmEvalPointwiseItem& p : r.pointwise_judgments) {
    nlohmann::json line = {{"judge", which},
                           {"kind", "pointwise"},
                           {"prompt", p.prompt},
                           {"response", p.response},
                           {"truth", p.truth},
                           {"valid", p.judgment.valid},
                           {"score", score_or_null(p.judgment)},
                           {"reasoning", p.judgment.reasoning},
                           {"retries", p.judgment.retries}};
    if (p.reference) line["reference"] = *p.reference;
    write(line);
  }
  for (const GrmEvalPairItem& p : r.pair_judgments) {
    const PointwiseJudgment& a = r.pointwise_judgments[p.pointwise_a].judgment;
    const PointwiseJudgment& b = r.pointwise_judgments[p.pointwise_b].judgment;
    nlohmann::json line = {{"judge", which},
                           {"kind", "pairwise"},
                           {"prompt", p.prompt},
                           {"response_a", p.response_a},
                           {"response_b", p.response_b},
                           {"truth_a", p.truth_a},
                           {"truth_b", p.truth_b},
                           {"better", p.truth_a > p.truth_b ? "A" : "B"},
                           {"pointwise_score_a", score_or_null(a)},
                           {"pointwise_score_b", score_or_null(b)},
                           {"forward", pairwise_json(p.forward)},
                           {"backward", pairwise_json(p.backward)},
                           {"vote_k", pairwise_json(p.voted)}};
    if (const auto& ref = r.pointwise_judgments[p.pointwise_a].reference) line["reference"] = *ref;
    write(line);
  }
}

void eval_grm(const EvalGrmOptions& o) {
  const auto start = Clock::now();
  const RunConfig config = load_config(o.common);
  check_float_backend(config.runtime.device);
  cpu_set_threads(o.threads > 0 ? o.threads : config.runtime.threads);
  const TaskSuite suite(config.tasks);
  if (o.records == "-") fail("--records: needs a file (stdout carries the report)");
  // Opened before the evaluation, so that a path that cannot be written fails at once.
  std::optional<ExportSink> records;
  if (!o.records.empty()) records.emplace(o.records, "--records");
  const GrmEvalResult judge = evaluate_checkpoint(o.judge, suite, o.eval, config.runtime.device);
  if (records) write_records(records->stream(), "judge", judge);
  print_eval("judge", o.judge, judge);
  nlohmann::json out = eval_json(judge);
  out["command"] = "eval grm";
  out["judge"] = o.judge;
  out["with_reference"] = o.eval.with_reference;
  out["voting_k_beats_voting_1"] = judge.pairwise_accuracy_vote_k > judge.pairwise_accuracy;
  if (!o.ablation.empty()) {
    const GrmEvalResult ablation =
        evaluate_checkpoint(o.ablation, suite, o.eval, config.runtime.device);
    print_eval("ablation", o.ablation, ablation);
    out["ablation"] = eval_json(ablation);
    out["ablation"]["judge"] = o.ablation;
    if (records) write_records(records->stream(), "ablation", ablation);
    out["reasoning_beats_ablation"] = judge.pairwise_accuracy > ablation.pairwise_accuracy;
    std::cout << fmt::format("judge vs ablation pairwise accuracy: {:.3f} vs {:.3f}\n",
                             judge.pairwise_accuracy, ablation.pairwise_accuracy);
  }
  if (records) {
    records->commit();
    out["records"] = o.records;
  }
  out["wall_s"] = std::chrono::duration<double>(Clock::now() - start).count();
  print_json(o.common, out);
}

}  // namespace

void register_grm(CLI::App& app) {
  auto t = std::make_shared<TrainGrmOptions>();
  CLI::App* train = app.add_subcommand(
      "train-grm", "train one model that generates and judges (generative reward model)");
  add_common_options(*train, t->common);
  train->add_option("--workdir", t->workdir, "directory for data, checkpoints and metrics")
      ->required();
  train->add_option("--policy", t->policy,
                    "SFT policy checkpoint to start from and to sample judged responses with "
                    "(overrides grm.policy)");
  train->add_option("--data", t->data, "scored data JSONL to train on (overrides grm.data)");
  train->add_flag("--resume", t->resume, "continue from WORKDIR/checkpoint.safetensors");
  train->callback([t] { train_grm(*t); });
}

void register_eval_grm(CLI::App& eval) {
  auto e = std::make_shared<EvalGrmOptions>();
  CLI::App* grm = eval.add_subcommand("grm", "judge quality on held-out prompts");
  add_common_options(*grm, e->common);
  grm->add_option("--judge", e->judge, "judge checkpoint")->required();
  grm->add_option("--ablation", e->ablation,
                  "a second judge to compare with (e.g. trained with grm.reasoning: false)");
  grm->add_option("--prompts", e->eval.prompts, "held-out prompts")
      ->check(CLI::Range(1, 100000))
      ->capture_default_str();
  grm->add_option("--k", e->eval.k, "votes for Voting@k")
      ->check(CLI::Range(1, 32))
      ->capture_default_str();
  grm->add_option("--temperature", e->eval.temperature, "temperature of the Voting@k samples")
      ->check(CLI::Range(0.0, 10.0))
      ->capture_default_str();
  grm->add_option("--max-new-tokens", e->eval.max_new_tokens, "token budget of one judge output")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  grm->add_flag("--with-reference", e->eval.with_reference,
                "show the judge the reference answer");
  grm->add_flag("--two-turns{false}", e->eval.separate_sides,
                "split pair judges: judge a pair in the two turns, B's reasoning after A's, "
                "instead of reading each side alone");
  grm->add_flag("--verdict-turn{false}", e->eval.verdict_from_scores,
                "separate sides: the judge writes every verdict, also where its two readings' "
                "scores differ (by default those decide it)");
  grm->add_option("--threads", e->threads, "CPU threads (default: runtime.threads)");
  grm->add_option("--records", e->records,
                  "write every judgment (reasoning, verdict, the grader's scores) to this JSONL "
                  "file");
  grm->callback([e] { eval_grm(*e); });
}

}  // namespace rlhf::cli
