#pragma once
// `rlhf exp stability`: does SwiGLU clamping and anticipatory routing make training more stable?
// Four arms train from the same seed on the same data under the config's stress setting
// (stability.stress, a high learning rate, no gradient clipping): baseline (neither), clamping
// only, anticipatory routing only, both. Each arm is an ordinary SFT run in its own work
// directory (config.yaml, metrics.jsonl, checkpoint), so any arm can be inspected or rerun.
#include <cstdint>
#include <string>
#include <vector>

#include "learner/run_config.h"

namespace rlhf {

struct StabilityArmResult {
  std::string name;
  bool clamping = false;
  bool anticipatory = false;   // the arm runs anticipatory routing (in the config's mode)
  int64_t steps = 0;           // steps run (fewer than configured if it diverged)
  int64_t spikes = 0;          // spike detector firings
  double max_excursion = 0;    // largest loss_t - median(loss of the 20 steps before t)
  bool diverged = false;       // a non-finite loss
  double final_loss = 0;       // mean loss of the last 50 steps run
  int64_t anticipatory_steps = 0;  // steps with anticipatory routing on
  double mean_flip_rate = 0;       // router flip rate over those steps
  double step_s_on = 0;   // mean step time with anticipatory routing on (0: never on)
  double step_s_off = 0;  // mean step time with it off
  std::vector<double> losses;
  std::string workdir;
};

// Step time of the same model and batches under three routing settings, interleaved step by
// step so machine noise hits all three alike: no anticipatory routing at all (the baseline);
// on_spike mode outside a window (keeps router snapshots, routes normally); always on.
struct AnticipatoryOverhead {
  int rounds = 0;
  double baseline_step_s = 0;  // mean step times
  double off_step_s = 0;
  double on_step_s = 0;
  double overhead_off = 0;     // median over rounds of (step time / baseline step time) - 1
  double overhead_on = 0;
};

struct StabilityReport {
  std::vector<StabilityArmResult> arms;
  AnticipatoryOverhead overhead;
  std::vector<int64_t> outlier_steps;
  double outlier_scale = 0;
  std::string anticipatory_mode;
  int lag = 0;
};

// Runs the four arms in subfolders of `workdir` (which must not already hold them), then the
// overhead measurement with `overhead_rounds` rounds.
StabilityReport run_stability_experiment(const RunConfig& config, const std::string& workdir,
                                         int overhead_rounds);

AnticipatoryOverhead measure_anticipatory_overhead(const RunConfig& config, int rounds);

// The largest rise of a loss above the median of the `window` losses before it (finite losses
// only: a divergence is reported separately).
double max_loss_excursion(const std::vector<double>& losses, int window = 20);

// The report as a Markdown table and as an SVG plot of the four loss curves.
std::string stability_table_markdown(const StabilityReport& report);
std::string stability_loss_plot_svg(const StabilityReport& report);

}  // namespace rlhf
