#include "tools/rl_report.h"

#include <iostream>
#include <map>

#include <fmt/core.h>

namespace rlhf::cli {

namespace {

// Accuracy and mean score of the start and the RL policy on the same prompts, and the gain.
void print_before_after(const std::string& title, const PolicyEvaluation& before,
                        const PolicyEvaluation& after, double mean_score_diff_stderr) {
  std::cout << fmt::format("{:<31} accuracy  mean score\n", title);
  std::cout << fmt::format("  start policy (SFT)            {:>8.3f}  {:>10.3f}\n",
                           before.accuracy, before.mean_score);
  std::cout << fmt::format("  RL policy                     {:>8.3f}  {:>10.3f}\n", after.accuracy,
                           after.mean_score);
  std::cout << fmt::format("  gain                          {:>+8.3f}  {:>+10.3f} (paired std. error "
                           "{:.3f})\n",
                           after.accuracy - before.accuracy, after.mean_score - before.mean_score,
                           mean_score_diff_stderr);
}

}  // namespace

void print_rl_summary(const RlSummary& s) {
  std::cout << fmt::format("RL run '{}': {} steps, {} scored rollouts in {}\n", s.run_id, s.steps,
                           s.rollouts_stored, s.store_path);
  print_before_after(fmt::format("held-out ({} prompts, greedy)", s.eval_examples), s.before,
                     s.after, s.mean_score_diff_stderr);
  print_before_after("held-out, sampled (T = 1)", s.before_sampled, s.after_sampled,
                     s.sampled_mean_score_diff_stderr);
  std::cout << "task        SFT score  RL score   (greedy)\n";
  std::map<std::string, double> before;
  for (const auto& t : s.before.per_task) before[t.task] = t.mean_score;
  for (const auto& t : s.after.per_task)
    std::cout << fmt::format("{:<10} {:>10.2f} {:>9.2f}\n", t.task, before[t.task], t.mean_score);
  std::cout << fmt::format("policy: {}\n", s.policy_path);
}

nlohmann::json rl_summary_json(const RlSummary& s) {
  nlohmann::json per_task = nlohmann::json::object();
  for (const auto& t : s.before.per_task) per_task[t.task]["sft_mean_score"] = t.mean_score;
  for (const auto& t : s.after.per_task) per_task[t.task]["rl_mean_score"] = t.mean_score;
  return {{"run_id", s.run_id},
          {"steps", s.steps},
          {"eval_examples", s.eval_examples},
          {"sft_mean_score", s.before.mean_score},
          {"rl_mean_score", s.after.mean_score},
          {"sft_accuracy", s.before.accuracy},
          {"rl_accuracy", s.after.accuracy},
          {"mean_score_gain", s.after.mean_score - s.before.mean_score},
          {"mean_score_gain_stderr", s.mean_score_diff_stderr},
          {"per_task", per_task},
          {"sft_sampled_mean_score", s.before_sampled.mean_score},
          {"rl_sampled_mean_score", s.after_sampled.mean_score},
          {"sampled_mean_score_gain", s.after_sampled.mean_score - s.before_sampled.mean_score},
          {"sampled_mean_score_gain_stderr", s.sampled_mean_score_diff_stderr},
          {"rollouts_stored", s.rollouts_stored},
          {"store", s.store_path},
          {"policy", s.policy_path},
          {"train_s", s.train_s}};
}

}  // namespace rlhf::cli
