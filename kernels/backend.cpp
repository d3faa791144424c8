#include "kernels/backend.h"

#include "common/error.h"
#include "kernels/cpu/cpu_ops.h"

#if RLHF_HAVE_CUDA
#include <cuda_runtime.h>

#include "kernels/cuda/cuda_ops.h"
#endif

namespace rlhf {

bool cuda_backend_built() { return RLHF_HAVE_CUDA != 0; }

void check_float_backend(const std::string& device) {
  if (device == "cpu") return;
  if (device != "cuda") fail("runtime.device: '{}' is not a backend (cpu or cuda)", device);
#if RLHF_HAVE_CUDA
  // CudaOps' constructor treats a missing device as fatal; ask first, so a machine without a
  // GPU gets an error that says so.
  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  if (status != cudaSuccess || devices == 0) {
    fail("runtime.device: cuda, but no CUDA device is visible ({})",
         status != cudaSuccess ? cudaGetErrorString(status) : "0 devices");
  }
#else
  fail("runtime.device: cuda, but this binary was built without the CUDA backend (configure "
       "with -DRLHF_CUDA=ON on a machine with the CUDA toolkit)");
#endif
}

std::unique_ptr<Ops<float>> make_float_ops(const std::string& device) {
  check_float_backend(device);  // past it, a CPU-only build has device == "cpu"
#if RLHF_HAVE_CUDA
  if (device == "cuda") return std::make_unique<CudaOps<float>>();
#endif
  return std::make_unique<CpuOps<float>>();
}

}  // namespace rlhf
