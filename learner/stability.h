#pragma once
// Training stability for MoE models (the `stability:` config section): a loss / gradient-norm
// spike detector and anticipatory routing, the DeepSeek V4 remedy for the router feedback loop
// behind loss spikes. SwiGLU clamping, the other remedy, lives in the model (model.clamp).
//
// Anticipatory routing: at step t every MoE layer picks its top-k experts with the router as
// it was `lag` steps earlier (theta_{t-lag}), while the gates and the experts use the latest
// parameters, so the router keeps learning but a router update cannot immediately re-route the
// tokens that produced it. Modes: off, always, on_spike (on for `window` steps after a spike).
// The lagged routers come from a ring of the last lag + 1 router snapshots (routers are small:
// E x (D + 1) values per MoE layer), refreshed every step.
#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include "model/transformer.h"

namespace rlhf {

class YamlSection;

enum class AnticipatoryMode { kOff, kAlways, kOnSpike };
const char* anticipatory_mode_name(AnticipatoryMode mode);
AnticipatoryMode anticipatory_mode_from_name(const std::string& name);  // throws on unknown

struct AnticipatoryRoutingConfig {
  AnticipatoryMode mode = AnticipatoryMode::kOff;
  int lag = 8;       // steps between the selection router and the latest one; 0 = no lag
  int window = 100;  // on_spike: steps it stays on after the last spike
};

struct SpikeDetectorConfig {
  int warmup = 50;            // steps observed before the detector may fire
  double decay = 0.95;        // of the running mean and variance (exponential moving averages)
  double loss_z = 4.0;        // a loss this many running deviations above the mean is a spike
  double grad_z = 6.0;        // the same for log(gradient norm)
  double min_rise = 0.1;      // and it must also exceed the running mean by this fraction
  double skip_update_z = 0;   // > 0: skip updates whose log grad-norm z-score exceeds this
};

// An injected perturbation for stability experiments (`rlhf exp stability`); off unless steps
// are listed. Before each listed step the gate and up projections of one routed expert per MoE
// layer are multiplied by `scale`: a weight outlier standing in for a bad update, which makes
// that expert's activations extreme until training repairs it.
struct StressConfig {
  std::vector<int64_t> outlier_steps;  // 0-based steps
  double outlier_scale = 20.0;
};

struct StabilityConfig {
  AnticipatoryRoutingConfig anticipatory;
  SpikeDetectorConfig spike;
  StressConfig stress;
  static StabilityConfig read(YamlSection& section);
};

// One step's verdict.
struct SpikeCheck {
  bool spike = false;        // loss or gradient norm spiked (or the loss is not finite)
  bool loss_spike = false;
  bool grad_spike = false;
  bool skip_update = false;  // the gradient norm is too far out to apply (skip_update_z)
  double loss_z = 0;         // z-scores against the running statistics before this step
  double grad_z = 0;
};

// Loss and gradient norm against their running mean and deviation. The gradient norm is
// tracked in log space: it is positive and heavy-tailed, and a spike is a ratio. A spiking value
// enters the running statistics only up to the threshold, so one spike does not hide the next.
class SpikeDetector {
 public:
  explicit SpikeDetector(const SpikeDetectorConfig& config) : config_(config) {}
  SpikeCheck observe(double loss, double grad_norm);
  int64_t spikes() const { return spikes_; }

 private:
  struct Running {
    double mean = 0, var = 0;
    double std() const;
    double z(double x) const;  // (x - mean) / std
    void add(double x, double decay, bool first);
  };
  SpikeDetectorConfig config_;
  Running loss_, log_grad_;
  int64_t seen_ = 0;
  int64_t spikes_ = 0;
};

// Drives a model's selection router step by step.
// The StressConfig perturbation: scales the gate and up rows of expert (seed-chosen) in every
// MoE layer of `model`. Returns the expert chosen per MoE layer.
template <typename T>
std::vector<int> inject_expert_outlier(Transformer<T>& model, double scale, uint64_t seed);

template <typename T>
class AnticipatoryRouting {
 public:
  explicit AnticipatoryRouting(const AnticipatoryRoutingConfig& config) : config_(config) {}

  // Before step `step`'s forward: snapshots the current router and, when anticipatory routing
  // is on for this step, gives the model the router of `lag` steps ago (or the oldest one kept,
  // early in a run) to select experts with. Returns whether it is on.
  bool begin_step(Transformer<T>& model, int64_t step);
  // A spike at `step`: in on_spike mode, on for steps step + 1 .. step + window.
  void on_spike(int64_t step);
  bool on_at(int64_t step) const;
  const AnticipatoryRoutingConfig& config() const { return config_; }

 private:
  AnticipatoryRoutingConfig config_;
  std::deque<std::vector<T>> history_;  // router states at the start of recent steps, oldest first
  int64_t on_from_ = 0, on_until_ = -1;  // on_spike: the current window's steps
};

}  // namespace rlhf
