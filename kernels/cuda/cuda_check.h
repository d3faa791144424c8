#pragma once
// CUDA_CHECK: a failing CUDA runtime call is fatal, reported with the expression, the error
// string, and file:line. CUDA errors here are programming or device faults, not bad input
// (STYLE.md: "programming and CUDA errors are fatal through check macros"). No fmt, so .cu files
// include it too (fmt's headers do not compile under nvcc 13).
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>

namespace rlhf {

// The one exit of every failed CUDA check.
[[noreturn]] inline void cuda_check_failed(const char* expr, const char* why, const char* file,
                                           int line) {
  std::fprintf(stderr, "rlhf: CUDA check failed: %s (%s) at %s:%d\n", expr, why, file, line);
  std::abort();
}

}  // namespace rlhf

// expr is a cudaError_t-valued call.
#define CUDA_CHECK(expr)                                                                   \
  do {                                                                                     \
    const cudaError_t rlhf_cuda_status_ = (expr);                                          \
    if (rlhf_cuda_status_ != cudaSuccess) {                                                \
      ::rlhf::cuda_check_failed(#expr, cudaGetErrorString(rlhf_cuda_status_), __FILE__,    \
                                __LINE__);                                                 \
    }                                                                                      \
  } while (0)

// An invariant of host-side CUDA code (a bad launch configuration, a null device pointer).
#define CUDA_REQUIRE(cond, why)                                                            \
  do {                                                                                     \
    if (!(cond)) ::rlhf::cuda_check_failed(#cond, (why), __FILE__, __LINE__);              \
  } while (0)
