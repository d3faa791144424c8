#include "learner/stability.h"

#include <algorithm>
#include <cmath>

#include "common/error.h"
#include "common/rng.h"
#include "common/yaml_reader.h"

namespace rlhf {

const char* anticipatory_mode_name(AnticipatoryMode mode) {
  switch (mode) {
    case AnticipatoryMode::kOff: return "off";
    case AnticipatoryMode::kAlways: return "always";
    case AnticipatoryMode::kOnSpike: return "on_spike";
  }
  return "?";
}

AnticipatoryMode anticipatory_mode_from_name(const std::string& name) {
  if (name == "off") return AnticipatoryMode::kOff;
  if (name == "always") return AnticipatoryMode::kAlways;
  if (name == "on_spike") return AnticipatoryMode::kOnSpike;
  fail("must be off, always or on_spike, got '{}'", name);
}

StabilityConfig StabilityConfig::read(YamlSection& s) {
  StabilityConfig c;
  YamlSection ar = s.section("anticipatory_routing");
  const std::string mode = ar.get<std::string>("mode", "off");
  try {
    c.anticipatory.mode = anticipatory_mode_from_name(mode);
  } catch (const Error& e) {
    fail("{}: {}", ar.key_path("mode"), e.what());
  }
  c.anticipatory.lag = ar.get("lag", c.anticipatory.lag);
  c.anticipatory.window = ar.get("window", c.anticipatory.window);
  ar.finish();
  if (c.anticipatory.lag < 0 || c.anticipatory.lag > 10000) {
    fail("{}: must be in 0..10000, got {}", ar.key_path("lag"), c.anticipatory.lag);
  }
  if (c.anticipatory.window < 1) {
    fail("{}: must be >= 1, got {}", ar.key_path("window"), c.anticipatory.window);
  }

  YamlSection sp = s.section("spike");
  SpikeDetectorConfig& d = c.spike;
  d.warmup = sp.get("warmup", d.warmup);
  d.decay = sp.get("decay", d.decay);
  d.loss_z = sp.get("loss_z", d.loss_z);
  d.grad_z = sp.get("grad_z", d.grad_z);
  d.min_rise = sp.get("min_rise", d.min_rise);
  d.skip_update_z = sp.get("skip_update_z", d.skip_update_z);
  sp.finish();
  if (d.warmup < 2) fail("{}: must be >= 2, got {}", sp.key_path("warmup"), d.warmup);
  if (!(d.decay > 0 && d.decay < 1)) {
    fail("{}: must be in (0, 1), got {}", sp.key_path("decay"), d.decay);
  }
  if (!(d.loss_z > 0)) fail("{}: must be > 0, got {}", sp.key_path("loss_z"), d.loss_z);
  if (!(d.grad_z > 0)) fail("{}: must be > 0, got {}", sp.key_path("grad_z"), d.grad_z);
  if (!(d.min_rise >= 0)) fail("{}: must be >= 0, got {}", sp.key_path("min_rise"), d.min_rise);
  if (!(d.skip_update_z >= 0)) {
    fail("{}: must be >= 0 (0 is off), got {}", sp.key_path("skip_update_z"), d.skip_update_z);
  }

  YamlSection st = s.section("stress");
  c.stress.outlier_steps = st.get("outlier_steps", c.stress.outlier_steps);
  c.stress.outlier_scale = st.get("outlier_scale", c.stress.outlier_scale);
  st.finish();
  for (int64_t step : c.stress.outlier_steps) {
    if (step < 0) fail("{}: steps must be >= 0, got {}", st.key_path("outlier_steps"), step);
  }
  if (!(c.stress.outlier_scale > 0) || !std::isfinite(c.stress.outlier_scale)) {
    fail("{}: must be a positive number, got {}", st.key_path("outlier_scale"),
         c.stress.outlier_scale);
  }
  s.finish();
  return c;
}

// ------------------------------------------------------------------ spike detector

double SpikeDetector::Running::std() const { return std::sqrt(std::max(var, 0.0)); }

double SpikeDetector::Running::z(double x) const {
  const double s = std();
  return s > 0 ? (x - mean) / s : (x > mean ? 1e9 : 0.0);
}

void SpikeDetector::Running::add(double x, double decay, bool first) {
  if (first) {
    mean = x;
    var = 0;
    return;
  }
  const double delta = x - mean;
  mean += (1 - decay) * delta;
  var = decay * (var + (1 - decay) * delta * delta);
}

SpikeCheck SpikeDetector::observe(double loss, double grad_norm) {
  SpikeCheck check;
  if (!std::isfinite(loss) || !std::isfinite(grad_norm)) {
    // Nothing to learn from; the statistics stay as they were.
    check.spike = check.loss_spike = true;
    check.skip_update = config_.skip_update_z > 0;
    ++spikes_;
    return check;
  }
  const double log_grad = std::log(std::max(grad_norm, 1e-30));
  const bool armed = seen_ >= config_.warmup;
  check.loss_z = seen_ > 1 ? loss_.z(loss) : 0;
  check.grad_z = seen_ > 1 ? log_grad_.z(log_grad) : 0;
  if (armed) {
    check.loss_spike = check.loss_z > config_.loss_z &&
                       loss > loss_.mean + config_.min_rise * std::abs(loss_.mean);
    // min_rise on the gradient norm itself: log(1 + min_rise) in log space.
    check.grad_spike = check.grad_z > config_.grad_z &&
                       log_grad > log_grad_.mean + std::log1p(config_.min_rise);
    check.spike = check.loss_spike || check.grad_spike;
    check.skip_update = config_.skip_update_z > 0 && check.grad_z > config_.skip_update_z;
  }
  if (check.spike) ++spikes_;
  // A spike enters the statistics clipped to its threshold.
  const double loss_in = check.loss_spike ? loss_.mean + config_.loss_z * loss_.std() : loss;
  const double grad_in =
      check.grad_spike ? log_grad_.mean + config_.grad_z * log_grad_.std() : log_grad;
  loss_.add(loss_in, config_.decay, seen_ == 0);
  log_grad_.add(grad_in, config_.decay, seen_ == 0);
  ++seen_;
  return check;
}

// ------------------------------------------------------------------ stress injection

template <typename T>
std::vector<int> inject_expert_outlier(Transformer<T>& model, double scale, uint64_t seed) {
  const ModelConfig& c = model.config();
  if (model.packed_format()) fail("cannot perturb a model whose experts are packed in FP4");
  const int64_t rows = int64_t(c.d_expert) * c.d_model;  // one expert's [Fe, D] matrix
  std::vector<T> host(size_t(rows), T(0));
  std::vector<int> chosen;
  Rng rng(seed);
  for (int l = c.n_dense_layers; l < c.n_layers; ++l) {
    const int expert = int(rng.uniform_int(0, c.n_routed_experts - 1));
    chosen.push_back(expert);
    const LayerWeights<T>& w = model.weights().layers[l];
    for (T* matrix : {w.expert_gate, w.expert_up}) {
      T* block = matrix + int64_t(expert) * rows;
      model.ops().copy_to_host(host.data(), block, sizeof(T) * size_t(rows));
      for (T& x : host) x = T(double(x) * scale);
      model.ops().copy_from_host(block, host.data(), sizeof(T) * size_t(rows));
    }
  }
  model.params_changed();
  return chosen;
}

template std::vector<int> inject_expert_outlier(Transformer<float>&, double, uint64_t);
template std::vector<int> inject_expert_outlier(Transformer<double>&, double, uint64_t);

// ------------------------------------------------------------------ anticipatory routing

template <typename T>
bool AnticipatoryRouting<T>::on_at(int64_t step) const {
  switch (config_.mode) {
    case AnticipatoryMode::kOff: return false;
    case AnticipatoryMode::kAlways: return true;
    case AnticipatoryMode::kOnSpike: return step >= on_from_ && step <= on_until_;
  }
  return false;
}

template <typename T>
void AnticipatoryRouting<T>::on_spike(int64_t step) {
  if (config_.mode != AnticipatoryMode::kOnSpike) return;
  // A spike inside an open window extends it; the spiking step itself has already run.
  if (!on_at(step)) on_from_ = step + 1;
  on_until_ = step + config_.window;
}

template <typename T>
bool AnticipatoryRouting<T>::begin_step(Transformer<T>& model, int64_t step) {
  if (config_.mode == AnticipatoryMode::kOff) {
    model.clear_selection_router();
    return false;
  }
  // Kept even while off (on_spike), so a window opens with a router that is already lag old.
  history_.push_back(model.router_state());
  while (int64_t(history_.size()) > int64_t(config_.lag) + 1) history_.pop_front();
  const bool on = on_at(step);
  if (on) {
    model.set_selection_router(history_.front());
  } else {
    model.clear_selection_router();
  }
  return on;
}

template class AnticipatoryRouting<float>;
template class AnticipatoryRouting<double>;

}  // namespace rlhf
