#pragma once
// `rlhf eval winrate` and `rlhf eval ratings` (tools/cmd_eval.cpp), also used by `rlhf demo`.
// The policies are served by actors and the judge by a reward service, each started in this
// process on a free loopback port; the evaluation talks to them through their gRPC clients
// (reward/winrate_eval.h).
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "learner/run_config.h"

namespace rlhf::cli {

// What both commands take besides the checkpoints.
struct WinrateSettings {
  std::string judge;          // judge checkpoint, or "ground_truth"
  int prompts = 0;            // 0: 256 held-out prompts of the config's task suite
  std::string prompts_file;   // JSONL instead (prompt_jsonl.h); --prompts then caps the count
  int k = 1;                  // judge votes per order
  double judge_temperature = 0;
  bool with_reference = false;
  // The policies' sampling; unset fields come from the config's `sampling:` section.
  std::optional<double> temperature, top_p;
  std::optional<int> top_k, max_new_tokens;
  std::optional<uint64_t> seed;
  std::string expert_format = "mxfp4";  // what the actors serve: mxfp4, nvfp4 or none
  int round_prompts = 32;
  int resamples = 2000;
  std::string workdir = "runs/eval";    // store (WORKDIR/store unless --db) and report files
  std::string db;
  std::string eval_id;                  // empty: derived from the settings
  int threads = 0;                      // 0: runtime.threads of the config
};

// Runs (or resumes) one evaluation of A against B, prints the table, writes WORKDIR/<id>.json
// and WORKDIR/<id>.svg, and returns the JSON summary (keys wins, ties, losses, invalid,
// win_rate, ci_low, ci_high, p_value, swap_consistency, lc_win_rate, ...).
nlohmann::json run_winrate_eval(const RunConfig& config, const std::string& checkpoint_a,
                                const std::string& checkpoint_b,
                                const WinrateSettings& settings);

}  // namespace rlhf::cli
