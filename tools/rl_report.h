#pragma once
// The RL result table (stdout) and its JSON form; shared by `serve learner` (and so `up`) and
// `demo`.
#include <nlohmann/json.hpp>

#include "learner/rl_trainer.h"

namespace rlhf::cli {

void print_rl_summary(const RlSummary& summary);
// Keys: run_id, steps, eval_examples, sft_mean_score, rl_mean_score, sft_accuracy,
// rl_accuracy, mean_score_gain, mean_score_gain_stderr, per_task, rollouts_stored, store,
// policy, train_s.
nlohmann::json rl_summary_json(const RlSummary& summary);

}  // namespace rlhf::cli
