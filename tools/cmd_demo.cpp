// rlhf demo: the main job on the embedded default config. The RL loop (actor, reward and
// learner services) comes with its own issue; until then the demo runs the part that exists:
// train a policy on the task suite from scratch, evaluate it on held-out prompts, and sample
// from it.
#include <filesystem>
#include <iostream>

#include <spdlog/spdlog.h>

#include "learner/sft.h"
#include "tools/cli.h"

namespace rlhf::cli {

void register_demo(CLI::App& app) {
  struct Options {
    CommonOptions common;
    std::string workdir = "runs/demo";
    bool resume = false;
  };
  auto o = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "demo", "the main job: train a policy from scratch on the task suite, evaluate, sample");
  add_common_options(*cmd, o->common);
  cmd->add_option("--workdir", o->workdir, "directory for checkpoints and metrics")
      ->capture_default_str();
  cmd->add_flag("--resume", o->resume, "continue an interrupted demo in the same workdir");
  cmd->callback([o] {
    spdlog::info("rlhf demo: supervised stage only for now (the RL services come next); "
                 "workdir {}", o->workdir);
    // The config is read (and validated) before anything in the workdir is touched.
    RunConfig config = load_config(o->common);
    if (!o->resume) {
      // A demo always starts from nothing; clearing only its own files keeps anything else.
      for (const char* f : {"checkpoint.safetensors", "policy.safetensors", "policy-fp4.safetensors",
                            "metrics.jsonl"}) {
        std::filesystem::remove(std::filesystem::path(o->workdir) / f);
      }
    }
    run_sft_and_report(std::move(config), o->workdir, o->resume, o->common,
                       {{"command", "demo"}, {"stages", {"sft", "eval"}}});
  });
}

}  // namespace rlhf::cli
