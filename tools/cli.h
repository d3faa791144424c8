#pragma once
// Shared pieces of the `rlhf` subcommands: options every command takes, the embedded demo
// config, and the machine-readable summary line that --json prints last.
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "learner/run_config.h"

namespace rlhf {
struct SftSummary;
}

namespace rlhf::cli {

struct CommonOptions {
  std::string config;  // path; empty = the embedded demo config
  bool json = false;
};

void add_common_options(CLI::App& command, CommonOptions& options);
// --device cpu|cuda (default cpu): the backend of a command that takes no --config, as
// runtime.device is for those that do (kernels/backend.h).
void add_device_option(CLI::App& command, std::string& device);
// The config named by --config, or the embedded configs/demo.yaml when none is given.
RunConfig load_config(const CommonOptions& options);
// The embedded copies of configs/demo.yaml and configs/stability.yaml.
const char* embedded_demo_config();
const char* embedded_stability_config();
// The embedded configs/demo-grm.yaml and configs/rl.yaml (the demo's judge and RL stages).
const char* embedded_grm_config();
const char* embedded_rl_config();

// Prints `summary` as one line on stdout when --json was given (always the last line).
void print_json(const CommonOptions& options, const nlohmann::json& summary);

// The SFT result table (stdout) and its JSON form; shared by `sft` and `demo`.
void print_sft_summary(const rlhf::SftSummary& summary);
nlohmann::json sft_summary_json(const rlhf::SftSummary& summary, double wall_s);
// Trains (or resumes) in `workdir`, evaluates, prints the table and, with --json, the summary
// merged with `extra` (the command name and so on). Shared by `sft` and `demo`.
void run_sft_and_report(RunConfig config, const std::string& workdir, bool resume,
                        const CommonOptions& common, nlohmann::json extra);

void register_sft(CLI::App& app);
void register_generate(CLI::App& app);
void register_bench(CLI::App& app);
void register_inspect(CLI::App& app);
void register_logits(CLI::App& app);  // logits for fixed sequences (parity checks)
void register_demo(CLI::App& app);
void register_exp(CLI::App& app);
void register_serve(CLI::App& app);
void register_grm(CLI::App& app);  // train-grm
// Subcommands of `rlhf eval`: grm (tools/cmd_grm.cpp), winrate and ratings (tools/cmd_eval.cpp).
void register_eval_grm(CLI::App& eval);
void register_eval_winrate(CLI::App& eval);
void register_up(CLI::App& app);
void register_collect(CLI::App& app);
void register_plot(CLI::App& app);
// `serve learner`, added to the `serve` command by register_serve.
void register_serve_learner(CLI::App& serve);
void register_db(CLI::App& app);

}  // namespace rlhf::cli
