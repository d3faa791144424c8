#include "model/param_layout.h"

#include <fmt/core.h>

#include "common/error.h"

namespace rlhf {

void ParamLayout::add(std::string name, std::vector<int64_t> shape, bool weight_decay) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  tensors_.push_back(TensorSpec{std::move(name), std::move(shape), total_, numel, weight_decay});
  total_ += numel;
}

const TensorSpec* ParamLayout::find_or_null(std::string_view name) const {
  for (const auto& t : tensors_) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

const TensorSpec& ParamLayout::find(std::string_view name) const {
  const TensorSpec* t = find_or_null(name);
  if (!t) fail("no tensor named '{}' in the parameter layout", name);
  return *t;
}

// Weight matrices are [out, in] (PyTorch's nn.Linear convention), so y = x W^T and the
// reduction dimension is contiguous in every matrix; FP4 blocks later run along it.
ParamLayout ParamLayout::parameters(const ModelConfig& c) {
  const int64_t d = c.d_model, v = c.vocab_size;
  const int64_t e = c.n_routed_experts, fe = c.d_expert;
  const int64_t shared = static_cast<int64_t>(c.n_shared_experts) * fe;
  ParamLayout layout;
  layout.add("embed", {v, d}, false);
  for (int i = 0; i < c.n_layers; ++i) {
    const std::string p = fmt::format("layers.{}.", i);
    layout.add(p + "attn_norm", {d}, false);
    layout.add(p + "wq", {c.q_dim(), d}, true);
    layout.add(p + "wk", {c.kv_dim(), d}, true);
    layout.add(p + "wv", {c.kv_dim(), d}, true);
    layout.add(p + "wo", {d, c.q_dim()}, true);
    layout.add(p + "ffn_norm", {d}, false);
    if (!c.is_moe_layer(i)) {
      layout.add(p + "ffn.w_gate", {c.d_ff, d}, true);
      layout.add(p + "ffn.w_up", {c.d_ff, d}, true);
      layout.add(p + "ffn.w_down", {d, c.d_ff}, true);
      continue;
    }
    layout.add(p + "router", {e, d}, true);
    // The shared experts are always on and all see every token, so they are stored (and
    // computed) as one SwiGLU of width n_shared_experts * d_expert: the same function as the
    // sum of the separate experts, in one GEMM instead of several.
    if (shared > 0) {
      layout.add(p + "shared.w_gate", {shared, d}, true);
      layout.add(p + "shared.w_up", {shared, d}, true);
      layout.add(p + "shared.w_down", {d, shared}, true);
    }
    layout.add(p + "experts.w_gate", {e, fe, d}, true);
    layout.add(p + "experts.w_up", {e, fe, d}, true);
    layout.add(p + "experts.w_down", {e, d, fe}, true);
  }
  layout.add("final_norm", {d}, false);
  layout.add("lm_head", {v, d}, true);
  return layout;
}

ParamLayout ParamLayout::buffers(const ModelConfig& c) {
  ParamLayout layout;
  for (int i = c.n_dense_layers; i < c.n_layers; ++i) {
    layout.add(fmt::format("layers.{}.router_bias", i), {c.n_routed_experts}, false);
  }
  return layout;
}

}  // namespace rlhf
