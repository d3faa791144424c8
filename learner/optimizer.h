#pragma once
// AdamW over the model's flat parameter allocation, with global-norm gradient clipping and a
// linear-warmup + cosine learning-rate schedule. The two moments mirror the parameter layout,
// and weight decay applies only to tensors the layout marks (matrices, not norms/embeddings).
#include <cstdint>
#include <string>

#include "kernels/buffer.h"
#include "kernels/ops.h"
#include "model/param_layout.h"

namespace rlhf {

class YamlSection;

struct OptimizerConfig {
  double lr = 3e-3;            // peak learning rate
  double min_lr_ratio = 0.1;   // the cosine decays to lr * min_lr_ratio
  int warmup_steps = 50;
  double weight_decay = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double grad_clip = 1.0;      // global L2 norm; 0 disables clipping

  void validate(const std::string& path) const;
  // Keys absent from the section keep the values of `defaults`.
  static OptimizerConfig read(YamlSection& section, const OptimizerConfig& defaults);
  static OptimizerConfig read(YamlSection& section);
};

// Learning rate at 0-based `step` of `total_steps`.
double learning_rate_at(const OptimizerConfig& config, int64_t step, int64_t total_steps);

struct OptimizerStepInfo {
  double grad_norm = 0;  // before clipping
  double lr = 0;
};

template <typename T>
class AdamW {
 public:
  AdamW(Ops<T>& ops, const ParamLayout& layout, const OptimizerConfig& config);

  // Global L2 norm of the gradients (what step() clips against).
  double grad_norm(const T* grads) const;
  // Clips grads in place, then updates params. `step` is 0-based; moments are bias-corrected
  // with step + 1. `known_grad_norm` (>= 0) saves recomputing grad_norm(grads).
  OptimizerStepInfo step(T* params, T* grads, int64_t step, int64_t total_steps,
                         double known_grad_norm = -1);

  T* first_moment() { return m_.data(); }
  T* second_moment() { return v_.data(); }
  const OptimizerConfig& config() const { return config_; }

 private:
  Ops<T>& ops_;
  const ParamLayout& layout_;
  OptimizerConfig config_;
  Buffer<T, Ops<T>> m_, v_;
};

}  // namespace rlhf
