#pragma once
// The parameter layout: every trainable tensor of the model as a named view into ONE flat
// allocation. Gradients and both AdamW moments use the same layout, so "tensor i of the
// gradients" is the same offset as "tensor i of the weights". Non-trainable state (the router's
// balancing bias) has a second, smaller layout of its own.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "model/config.h"

namespace rlhf {

struct TensorSpec {
  std::string name;            // e.g. "layers.3.experts.w_gate"
  std::vector<int64_t> shape;  // row-major
  int64_t offset = 0;          // in elements, from the start of the allocation
  int64_t numel = 0;
  bool weight_decay = false;   // matrices decay; norms and embeddings do not
};

class ParamLayout {
 public:
  // Trainable parameters of a model with this config.
  static ParamLayout parameters(const ModelConfig& config);
  // Non-trainable buffers (router bias per MoE layer).
  static ParamLayout buffers(const ModelConfig& config);

  const std::vector<TensorSpec>& tensors() const { return tensors_; }
  int64_t total() const { return total_; }
  // Throws rlhf::Error if there is no tensor of that name.
  const TensorSpec& find(std::string_view name) const;
  const TensorSpec* find_or_null(std::string_view name) const;

  void add(std::string name, std::vector<int64_t> shape, bool weight_decay);

 private:
  std::vector<TensorSpec> tensors_;
  int64_t total_ = 0;
};

}  // namespace rlhf
