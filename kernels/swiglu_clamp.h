#pragma once
// SwiGLU clamping settings: an argument of the swiglu ops and a key of the model config. It
// lives with the kernels so the op interface does not depend on the model layer.

namespace rlhf {

struct SwigluClampConfig {
  bool enabled = true;
  double gate_max = 10.0;      // gate pre-activation is clamped to at most this (upper only)
  double linear_limit = 10.0;  // linear ("up") path is clamped to [-limit, limit]
};

}  // namespace rlhf
