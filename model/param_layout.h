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

// An expert weight matrix as FP4 sees it: `rows` output units, each a row of `cols` values
// along the reduction dimension (stacked experts are one matrix of E x N rows).
struct ExpertMatrixSpec {
  std::string name;  // the tensor's name in the parameter layout
  int64_t rows = 0;
  int64_t cols = 0;
};

// True for the tensors FP4 applies to: routed and shared expert weights.
bool is_expert_weight(std::string_view name);

class ParamLayout {
 public:
  // Trainable parameters of a model with this config. With `experts_packed`, the expert
  // weights are left out: a model with packed FP4 experts keeps them in FP4 only.
  static ParamLayout parameters(const ModelConfig& config, bool experts_packed = false);
  // Every expert weight matrix, in layout order.
  static std::vector<ExpertMatrixSpec> expert_matrices(const ModelConfig& config);
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
