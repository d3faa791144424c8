#include "learner/optimizer.h"

#include <cmath>

#include "common/error.h"
#include "common/yaml_reader.h"

namespace rlhf {

void OptimizerConfig::validate(const std::string& path) const {
  auto key = [&](const char* k) { return path.empty() ? std::string(k) : path + "." + k; };
  if (!(lr > 0) || !std::isfinite(lr)) fail("{}: must be a positive number, got {}", key("lr"), lr);
  if (!(min_lr_ratio >= 0 && min_lr_ratio <= 1)) {
    fail("{}: must be in [0, 1], got {}", key("min_lr_ratio"), min_lr_ratio);
  }
  if (warmup_steps < 0) fail("{}: must be >= 0, got {}", key("warmup_steps"), warmup_steps);
  if (!(weight_decay >= 0)) fail("{}: must be >= 0, got {}", key("weight_decay"), weight_decay);
  if (!(beta1 >= 0 && beta1 < 1)) fail("{}: must be in [0, 1), got {}", key("beta1"), beta1);
  if (!(beta2 >= 0 && beta2 < 1)) fail("{}: must be in [0, 1), got {}", key("beta2"), beta2);
  if (!(eps > 0)) fail("{}: must be > 0, got {}", key("eps"), eps);
  if (!(grad_clip >= 0)) fail("{}: must be >= 0 (0 disables), got {}", key("grad_clip"), grad_clip);
}

OptimizerConfig OptimizerConfig::read(YamlSection& s) { return read(s, OptimizerConfig{}); }

OptimizerConfig OptimizerConfig::read(YamlSection& s, const OptimizerConfig& defaults) {
  OptimizerConfig c = defaults;
  c.lr = s.get("lr", c.lr);
  c.min_lr_ratio = s.get("min_lr_ratio", c.min_lr_ratio);
  c.warmup_steps = s.get("warmup_steps", c.warmup_steps);
  c.weight_decay = s.get("weight_decay", c.weight_decay);
  c.beta1 = s.get("beta1", c.beta1);
  c.beta2 = s.get("beta2", c.beta2);
  c.eps = s.get("eps", c.eps);
  c.grad_clip = s.get("grad_clip", c.grad_clip);
  s.finish();
  c.validate(s.path());
  return c;
}

double learning_rate_at(const OptimizerConfig& c, int64_t step, int64_t total_steps) {
  if (step < c.warmup_steps) return c.lr * double(step + 1) / double(c.warmup_steps);
  const double span = std::max<double>(1.0, double(total_steps - c.warmup_steps));
  const double progress = std::min(1.0, double(step - c.warmup_steps) / span);
  const double cosine = 0.5 * (1.0 + std::cos(M_PI * progress));
  return c.lr * (c.min_lr_ratio + (1.0 - c.min_lr_ratio) * cosine);
}

template <typename T>
AdamW<T>::AdamW(Ops<T>& ops, const ParamLayout& layout, const OptimizerConfig& config)
    : ops_(ops), layout_(layout), config_(config), m_(ops, layout.total()),
      v_(ops, layout.total()) {
  ops_.fill(m_.data(), T(0), m_.size());
  ops_.fill(v_.data(), T(0), v_.size());
}

template <typename T>
double AdamW<T>::grad_norm(const T* grads) const {
  return std::sqrt(ops_.sum_squares(grads, layout_.total()));
}

template <typename T>
OptimizerStepInfo AdamW<T>::step(T* params, T* grads, int64_t step, int64_t total_steps,
                                 double known_grad_norm) {
  OptimizerStepInfo info;
  info.grad_norm = known_grad_norm >= 0 ? known_grad_norm : grad_norm(grads);
  info.lr = learning_rate_at(config_, step, total_steps);
  if (config_.grad_clip > 0 && info.grad_norm > config_.grad_clip) {
    ops_.scale_inplace(grads, config_.grad_clip / info.grad_norm, layout_.total());
  }
  AdamWHyper hyper{info.lr, config_.beta1, config_.beta2, config_.eps, 0.0, step + 1};
  for (const TensorSpec& t : layout_.tensors()) {
    hyper.weight_decay = t.weight_decay ? config_.weight_decay : 0.0;
    ops_.adamw_step(params + t.offset, grads + t.offset, m_.data() + t.offset,
                    v_.data() + t.offset, t.numel, hyper);
  }
  return info;
}

template class AdamW<float>;
template class AdamW<double>;

}  // namespace rlhf
