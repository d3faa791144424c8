// rlhf sft: supervised training on the task suite, then held-out evaluation.
#include <chrono>
#include <iostream>

#include <fmt/core.h>
#include <spdlog/spdlog.h>

#include "learner/sft.h"
#include "tools/cli.h"

namespace rlhf::cli {

namespace {

nlohmann::json evaluation_json(const PolicyEvaluation& e) {
  nlohmann::json per_task = nlohmann::json::object();
  for (const auto& t : e.per_task) {
    per_task[t.task] = {{"accuracy", t.accuracy}, {"mean_score", t.mean_score}, {"n", t.examples}};
  }
  return {{"accuracy", e.accuracy}, {"mean_score", e.mean_score}, {"per_task", per_task}};
}

}  // namespace

void print_sft_summary(const SftSummary& s) {
  std::cout << fmt::format("\n{:<10} {:>9} {:>11}\n", "held-out", "accuracy", "mean score");
  for (const auto* eval : {&s.greedy, &s.sampled}) {
    const char* name = eval == &s.greedy ? "greedy" : "sampled";
    std::cout << fmt::format("{:<10} {:>9.3f} {:>11.2f}\n", name, eval->accuracy, eval->mean_score);
  }
  std::cout << fmt::format("\n{:<10} {:>9} {:>11}   (greedy)\n", "task", "accuracy", "mean score");
  for (const auto& t : s.greedy.per_task) {
    std::cout << fmt::format("{:<10} {:>9.3f} {:>11.2f}\n", t.task, t.accuracy, t.mean_score);
  }
  std::cout << "\nsample greedy answers:\n";
  for (const auto& line : s.greedy.sample_lines) std::cout << "  " << line << "\n";
  std::cout << fmt::format("\n{} steps, final loss {:.4f}, {:.0f} tokens/s, policy at {}\n",
                           s.steps, s.final_loss, s.train_tokens_per_s, s.policy_path);
  if (s.packed) {
    const PackedPolicyReport& p = *s.packed;
    std::cout << fmt::format(
        "packed {} policy at {}: greedy accuracy {:.3f}, mean score {:.2f}, {:.3f} bits per "
        "expert parameter; |logprob(QAT) - logprob(packed)| max {:.2e}, mean {:.2e} over {} "
        "sampled tokens\n",
        p.format, p.path, p.greedy.accuracy, p.greedy.mean_score, p.expert_bits_per_param,
        p.mismatch.max_abs, p.mismatch.mean_abs, p.mismatch.tokens);
  }
}

nlohmann::json sft_summary_json(const SftSummary& s, double wall_s) {
  nlohmann::json out = {{"steps", s.steps},
          {"final_loss", s.final_loss},
          {"heldout_accuracy", s.greedy.accuracy},
          {"heldout_mean_score", s.greedy.mean_score},
          {"heldout_sampled_accuracy", s.sampled.accuracy},
          {"heldout_sampled_mean_score", s.sampled.mean_score},
          {"heldout_examples", s.greedy.examples},
          {"greedy", evaluation_json(s.greedy)},
          {"sampled", evaluation_json(s.sampled)},
          {"train_tokens_per_s", s.train_tokens_per_s},
          {"train_s", s.train_s},
          {"policy", s.policy_path},
          {"wall_s", wall_s}};
  if (s.packed) {
    const PackedPolicyReport& p = *s.packed;
    out["fp4"] = {{"format", p.format},
                  {"packed_policy", p.path},
                  {"packed_heldout_accuracy", p.greedy.accuracy},
                  {"packed_heldout_mean_score", p.greedy.mean_score},
                  {"expert_bits_per_param", p.expert_bits_per_param},
                  {"logprob_mismatch_max", p.mismatch.max_abs},
                  {"logprob_mismatch_mean", p.mismatch.mean_abs},
                  {"logprob_mismatch_tokens", p.mismatch.tokens}};
  }
  return out;
}

void run_sft_and_report(RunConfig config, const std::string& workdir, bool resume,
                        const CommonOptions& common, nlohmann::json extra) {
  const auto start = std::chrono::steady_clock::now();
  SftTrainer trainer(std::move(config), workdir, resume);
  trainer.train();
  trainer.fail_if_diverged();
  const SftSummary summary = trainer.finish();
  const double wall =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  print_sft_summary(summary);
  nlohmann::json out = sft_summary_json(summary, wall);
  out.update(extra);
  print_json(common, out);
}

void register_sft(CLI::App& app) {
  struct Options {
    CommonOptions common;
    std::string workdir;
    bool resume = false;
  };
  auto options = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand("sft", "train a policy on the task suite's demonstrations");
  add_common_options(*cmd, options->common);
  cmd->add_option("--workdir", options->workdir, "directory for checkpoints and metrics")
      ->required();
  cmd->add_flag("--resume", options->resume, "continue from WORKDIR/checkpoint.safetensors");
  cmd->callback([options] {
    run_sft_and_report(load_config(options->common), options->workdir, options->resume,
                       options->common, {{"command", "sft"}});
  });
}

}  // namespace rlhf::cli
