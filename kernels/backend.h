#pragma once
// Choosing the backend a run computes on (config `runtime.device`): "cpu", the reference, or
// "cuda", CudaOps<float> (kernels/cuda/cuda_ops.h) in builds with the CUDA backend. Code that
// owns a model asks here instead of naming a backend, so one config key moves it to the GPU.
#include <memory>
#include <string>

#include "kernels/ops.h"

namespace rlhf {

// True when this binary was built with the CUDA backend (RLHF_CUDA found nvcc).
bool cuda_backend_built();

// The float backend named `device`. rlhf::Error, naming `device` and the reason, for an
// unknown name, for "cuda" in a build without the CUDA backend, and for "cuda" on a machine
// where no CUDA device is visible.
std::unique_ptr<Ops<float>> make_float_ops(const std::string& device);

// make_float_ops' checks alone, creating nothing: for a command that builds its models later
// and should stop before it has done anything else.
void check_float_backend(const std::string& device);

}  // namespace rlhf
