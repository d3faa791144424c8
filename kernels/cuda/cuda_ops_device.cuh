#pragma once
// Device helpers shared by the cuda_ops_*.cu kernels: grid sizing, the launch check, and block
// reductions whose order depends only on the block size (so results repeat bit for bit).
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/cuda_check.h"

// After every launch: a bad configuration is reported at the launch, not at a later call.
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

namespace rlhf::cuda {

inline constexpr int kThreads = 256;  // threads of a 1-D elementwise or row block

// Blocks for a grid-stride loop over n elements: enough to fill the GPU, never zero.
inline unsigned grid_for(int64_t n, int threads = kThreads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 * 8 ? 65535 * 8 : blocks));
}

template <typename V>
__device__ __forceinline__ V warp_sum(V x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `shared` holds 32 values. Ends with a barrier, so `shared` may be reused right after.
template <typename V>
__device__ V block_sum(V x, V* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  x = warp_sum(x);
  __syncthreads();
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  V total = lane < warps ? shared[lane] : V(0);
  total = warp_sum(total);
  __syncthreads();
  return total;
}

__device__ inline float block_max(float x, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  x = warp_max(x);
  __syncthreads();
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  float m = lane < warps ? shared[lane] : -INFINITY;
  m = warp_max(m);
  __syncthreads();
  return m;
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

// One row of RMSNorm by a block: y = x * r * weight, *rstd = r = 1 / sqrt(mean(x^2) + eps).
// Thread t reads columns t, t + blockDim.x, ...: a kernel that has just written those columns
// of x itself (the fused residual-and-norm kernels) reads back its own writes, and every caller
// gets the bits of rmsnorm_forward for the same block size.
__device__ inline void rmsnorm_row(float* y, float* rstd, const float* x, const float* weight,
                                   int D, float eps, float* shared) {
  float sum = 0;
  for (int c = threadIdx.x; c < D; c += blockDim.x) sum += x[c] * x[c];
  sum = block_sum(sum, shared);
  const float r = 1.0f / sqrtf(sum / float(D) + eps);
  for (int c = threadIdx.x; c < D; c += blockDim.x) y[c] = x[c] * r * weight[c];
  if (threadIdx.x == 0) *rstd = r;
}

}  // namespace rlhf::cuda
