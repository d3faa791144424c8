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
bool is_expert_weight(std::string_view name) {
  return name.find(".experts.") != std::string_view::npos ||
         name.find(".shared.") != std::string_view::npos;
}

std::vector<ExpertMatrixSpec> ParamLayout::expert_matrices(const ModelConfig& config) {
  std::vector<ExpertMatrixSpec> out;
  const ParamLayout layout = parameters(config);
  for (const TensorSpec& t : layout.tensors()) {
    if (!is_expert_weight(t.name)) continue;
    // The last dimension is the reduction dimension of every weight ([out, in] convention).
    out.push_back(ExpertMatrixSpec{t.name, t.numel / t.shape.back(), t.shape.back()});
  }
  return out;
}

ParamLayout ParamLayout::parameters(const ModelConfig& c, bool experts_packed) {
  const int64_t d = c.d_model, v = c.vocab_size;
  const int64_t e = c.n_routed_experts, fe = c.d_expert;
  const int64_t shared = static_cast<int64_t>(c.n_shared_experts) * fe;
  ParamLayout layout;
  auto add = [&](std::string name, std::vector<int64_t> shape, bool decay) {
    if (experts_packed && is_expert_weight(name)) return;
    layout.add(std::move(name), std::move(shape), decay);
  };
  add("embed", {v, d}, false);
  for (int i = 0; i < c.n_layers; ++i) {
    const std::string p = fmt::format("layers.{}.", i);
    add(p + "attn_norm", {d}, false);
    add(p + "wq", {c.q_dim(), d}, true);
    add(p + "wk", {c.kv_dim(), d}, true);
    add(p + "wv", {c.kv_dim(), d}, true);
    add(p + "wo", {d, c.q_dim()}, true);
    add(p + "ffn_norm", {d}, false);
    if (!c.is_moe_layer(i)) {
      add(p + "ffn.w_gate", {c.d_ff, d}, true);
      add(p + "ffn.w_up", {c.d_ff, d}, true);
      add(p + "ffn.w_down", {d, c.d_ff}, true);
      continue;
    }
    add(p + "router", {e, d}, true);
    // The shared experts are always on and all see every token, so they are stored (and
    // computed) as one SwiGLU of width n_shared_experts * d_expert: the same function as the
    // sum of the separate experts, in one GEMM instead of several.
    if (shared > 0) {
      add(p + "shared.w_gate", {shared, d}, true);
      add(p + "shared.w_up", {shared, d}, true);
      add(p + "shared.w_down", {d, shared}, true);
    }
    add(p + "experts.w_gate", {e, fe, d}, true);
    add(p + "experts.w_up", {e, fe, d}, true);
    add(p + "experts.w_down", {e, d, fe}, true);
  }
  add("final_norm", {d}, false);
  add("lm_head", {v, d}, true);
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
