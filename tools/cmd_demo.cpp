// rlhf demo: the main job, from nothing, on the embedded configs:
//   1. SFT     a policy trained from scratch on the task suite (configs/demo.yaml)
//   2. GRM     that policy fine-tuned on scored data into one model that generates and judges
//              (configs/demo-grm.yaml)
//   3. RL      the reward service (the judge: that model, frozen) and actor(s) started as
//              processes on loopback, and the learner run here against them: GRPO with every
//              scored rollout stored in RocksDB (configs/rl.yaml)
//   4. report  held-out ground-truth scores of the RL policy against its start policy, and the
//              win rate of the RL policy over its start policy (`rlhf eval winrate`), judged by
//              the demo's judge in both orders and, for calibration, by the task graders
//
// Work directory: DIR/ (stage 1, as `rlhf sft`), DIR/grm/ (stage 2, as `rlhf train-grm`),
// DIR/rl/ (stage 3: checkpoint, metrics.jsonl, store/), DIR/eval/ (win rates: store/, reports).
#include <chrono>
#include <filesystem>
#include <iostream>

#include <fmt/core.h>
#include <spdlog/spdlog.h>

#include "common/error.h"
#include "learner/grm.h"
#include "learner/sft.h"
#include "tools/cli.h"
#include "tools/eval_commands.h"
#include "tools/rl_commands.h"
#include "tools/rl_report.h"

namespace rlhf::cli {

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Held-out prompts of the demo's win-rate evaluation: the interval's half-width is about
// 0.03 at this size, and judging them in both orders takes about a minute on 2 cores.
constexpr int kWinratePrompts = 256;

struct DemoOptions {
  CommonOptions common;  // --config: the SFT stage's config
  std::string grm_config;
  std::string rl_config;
  std::string workdir = "runs/demo";
  int actors = 1;
  bool resume = false;
};

RunConfig load_stage_config(const std::string& path, const char* embedded, const char* what) {
  return path.empty() ? RunConfig::load_string(embedded, what) : RunConfig::load_file(path);
}

void run_demo(const DemoOptions& o) {
  const StopSignals stop_signals;  // first: before any thread exists
  gpr_set_log_function(log_grpc_through_spdlog);
  const auto start = Clock::now();
  // Every config is read (and validated) before anything in the workdir is touched.
  RunConfig sft_config = load_config(o.common);
  // A stage's config: the command line's, else the one the SFT config's `demo:` section names,
  // else the embedded default.
  RunConfig grm_config = load_stage_config(
      o.grm_config.empty() ? sft_config.demo.grm_config : o.grm_config, embedded_grm_config(),
      "embedded configs/demo-grm.yaml");
  RunConfig rl_config = load_stage_config(
      o.rl_config.empty() ? sft_config.demo.rl_config : o.rl_config, embedded_rl_config(),
      "embedded configs/rl.yaml");
  const fs::path dir(o.workdir);
  const fs::path grm_dir = dir / "grm";
  const fs::path rl_dir = dir / "rl";
  if (!o.resume) {
    // A demo always starts from nothing; clearing only its own files keeps anything else.
    for (const char* f : {"checkpoint.safetensors", "policy.safetensors",
                          "policy-fp4.safetensors", "metrics.jsonl"})
      fs::remove(dir / f);
    fs::remove_all(grm_dir);
    fs::remove_all(rl_dir);
    fs::remove_all(dir / "eval");
  }

  spdlog::info("demo stage 1/4: SFT from scratch ({} steps) in {}", sft_config.sft.steps,
               o.workdir);
  auto t0 = Clock::now();
  const bool sft_resume = o.resume && fs::exists(dir / "checkpoint.safetensors");
  SftTrainer sft(sft_config, o.workdir, sft_resume);
  sft.train();
  sft.fail_if_diverged();
  const SftSummary sft_summary = sft.finish();
  const double sft_s = seconds_since(t0);
  print_sft_summary(sft_summary);

  spdlog::info("demo stage 2/4: one model that generates and judges ({} steps) in {}",
               grm_config.sft.steps, grm_dir.string());
  t0 = Clock::now();
  grm_config.grm.policy = sft_summary.policy_path;
  const bool grm_resume = o.resume && fs::exists(grm_dir / "checkpoint.safetensors");
  const GrmRunSummary grm = run_train_grm(grm_config, grm_dir.string(), grm_resume);
  const double grm_s = seconds_since(t0);
  std::cout << fmt::format("judge + policy: {} ({} pointwise, {} pairwise judge records)\n",
                           grm.sft.policy_path, grm.pointwise_records, grm.pairwise_records);

  spdlog::info("demo stage 3/4: RL ({} steps) with {} actor(s) and the reward service on "
               "loopback, in {}",
               rl_config.rl.steps, o.actors, rl_dir.string());
  t0 = Clock::now();
  rl_config.rl.policy = grm.sft.policy_path;
  rl_config.rl.judge = grm.sft.policy_path;
  const bool rl_resume = o.resume && fs::exists(rl_dir / "checkpoint.safetensors");
  RlServiceProcesses services =
      start_rl_services(rl_config, rl_config.rl.policy, rl_config.rl.judge, o.actors);
  std::optional<RlSummary> rl;
  try {
    rl = run_learner(rl_config, rl_dir.string(), rl_resume, services.actor_addresses,
                     services.reward_address, "127.0.0.1:0", "", stop_signals);
  } catch (...) {
    services.stop();
    throw;
  }
  services.stop();
  if (!rl) fail("the demo was stopped during RL; continue it with `rlhf demo --resume`");
  const double rl_s = seconds_since(t0);
  print_rl_summary(*rl);

  spdlog::info("demo stage 4/4: win rate of the RL policy over its start policy on {} held-out "
               "prompts",
               kWinratePrompts);
  t0 = Clock::now();
  WinrateSettings winrate;
  winrate.prompts = kWinratePrompts;
  winrate.with_reference = rl_config.rl.judge_with_reference;
  winrate.workdir = (dir / "eval").string();
  winrate.judge = grm.sft.policy_path;
  const nlohmann::json judged = run_winrate_eval(rl_config, rl->policy_path, rl_config.rl.policy,
                                                 winrate);
  winrate.judge = "ground_truth";
  const nlohmann::json graded = run_winrate_eval(rl_config, rl->policy_path, rl_config.rl.policy,
                                                 winrate);
  const double eval_s = seconds_since(t0);

  const double wall = seconds_since(start);
  std::cout << fmt::format(
      "demo: SFT {:.0f} s, judge {:.0f} s, RL {:.0f} s, win rates {:.0f} s, total {:.0f} s; "
      "held-out mean score {:.3f} -> {:.3f} ({:+.3f} +- {:.3f}); win rate of RL over its start "
      "{:.3f} [{:.3f}, {:.3f}] by the judge ({} invalid), {:.3f} [{:.3f}, {:.3f}] by the graders\n",
      sft_s, grm_s, rl_s, eval_s, wall, rl->before.mean_score, rl->after.mean_score,
      rl->after.mean_score - rl->before.mean_score, rl->mean_score_diff_stderr,
      judged["win_rate"].get<double>(), judged["ci_low"].get<double>(),
      judged["ci_high"].get<double>(), judged["invalid"].get<int>(),
      graded["win_rate"].get<double>(), graded["ci_low"].get<double>(),
      graded["ci_high"].get<double>());
  nlohmann::json out = rl_summary_json(*rl);
  out["command"] = "demo";
  out["stages"] = {"sft", "grm", "rl", "eval"};
  out["sft_only_mean_score"] = sft_summary.greedy.mean_score;
  out["sft_only_accuracy"] = sft_summary.greedy.accuracy;
  out["judge"] = grm.sft.policy_path;
  // The win rate of the RL policy over its start policy: the judge's, then the graders'.
  out["win_rate"] = judged["win_rate"];
  out["win_rate_ci"] = {judged["ci_low"], judged["ci_high"]};
  out["win_rate_invalid"] = judged["invalid"];
  out["win_rate_p_value"] = judged["p_value"];
  out["win_rate_swap_consistency"] = judged["swap_consistency"];
  out["win_rate_ground_truth"] = graded["win_rate"];
  out["win_rate_ground_truth_ci"] = {graded["ci_low"], graded["ci_high"]};
  out["winrate"] = {{"judge", judged}, {"ground_truth", graded}};
  out["stage_s"] = {{"sft", sft_s}, {"grm", grm_s}, {"rl", rl_s}, {"eval", eval_s}};
  out["wall_s"] = wall;
  print_json(o.common, out);
}

}  // namespace

void register_demo(CLI::App& app) {
  auto o = std::make_shared<DemoOptions>();
  CLI::App* cmd = app.add_subcommand(
      "demo", "the main job: SFT from scratch, one model that generates and judges, RL "
              "through the services, held-out evaluation");
  add_common_options(*cmd, o->common);
  cmd->add_option("--grm-config", o->grm_config,
                  "config of the judge stage (default: the --config file's "
                  "demo.grm_config, else the embedded configs/demo-grm.yaml)");
  cmd->add_option("--rl-config", o->rl_config,
                  "config of the RL stage (default: the --config file's "
                  "demo.rl_config, else the embedded configs/rl.yaml)");
  cmd->add_option("--workdir", o->workdir, "directory for all stages' files")
      ->capture_default_str();
  cmd->add_option("--actors", o->actors, "actor processes in the RL stage")
      ->check(CLI::Range(1, 16))
      ->capture_default_str();
  cmd->add_flag("--resume", o->resume, "continue an interrupted demo in the same workdir");
  cmd->callback([o] { run_demo(*o); });
}

}  // namespace rlhf::cli
