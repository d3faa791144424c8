// Elementwise ops and reductions of the CUDA backend: fill, scale, sum of squares, AdamW,
// zero_where, SwiGLU with clamping. Grid-stride loops; the one float reduction (sum of
// squares) accumulates in double over fixed chunks.
#include "kernels/cuda/cuda_ops_device.cuh"
#include "kernels/cuda/cuda_ops_kernels.cuh"

namespace rlhf::cuda {

namespace {

__global__ void fill_kernel(float* x, float value, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    x[i] = value;
  }
}

__global__ void scale_kernel(float* x, float s, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    x[i] *= s;
  }
}

// Block b sums chunk b of x ([b * chunk, (b + 1) * chunk) clipped to n).
__global__ void sum_squares_kernel(double* partials, const float* x, int64_t n, int64_t chunk) {
  __shared__ double shared[32];
  const int64_t begin = blockIdx.x * chunk;
  const int64_t end = begin + chunk < n ? begin + chunk : n;
  double s = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const double v = x[i];
    s += v * v;
  }
  s = block_sum(s, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

__global__ void adamw_kernel(float* param, const float* grad, float* m, float* v, int64_t n,
                             AdamWScalars h) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float g = grad[i];
    const float mi = h.beta1 * m[i] + (1.0f - h.beta1) * g;
    const float vi = h.beta2 * v[i] + (1.0f - h.beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    const float m_hat = mi / h.correction1;
    const float v_hat = vi / h.correction2;
    param[i] -= h.lr * (m_hat / (sqrtf(v_hat) + h.eps) + h.weight_decay * param[i]);
  }
}

__global__ void zero_where_kernel(float* grad, const uint8_t* mask, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    if (mask[i]) grad[i] = 0.0f;
  }
}

// With clamping off the limits are +inf, so one kernel serves both (as on the CPU).
__global__ void swiglu_forward_kernel(float* h, const float* gate, const float* up, int64_t n,
                                      float gmax, float lim, unsigned long long* counts) {
  __shared__ unsigned long long shared[32];
  unsigned long long gate_clamped = 0, linear_clamped = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float graw = gate[i], uraw = up[i];
    const float g = graw > gmax ? gmax : graw;
    float u = uraw > lim ? lim : uraw;
    u = u < -lim ? -lim : u;
    gate_clamped += graw > gmax ? 1 : 0;
    linear_clamped += (uraw > lim ? 1 : 0) + (uraw < -lim ? 1 : 0);
    h[i] = g * sigmoidf(g) * u;
  }
  if (!counts) return;  // uniform over the block: no thread is left waiting at a barrier
  gate_clamped = block_sum(gate_clamped, shared);
  linear_clamped = block_sum(linear_clamped, shared);
  if (threadIdx.x == 0) {
    atomicAdd(counts, gate_clamped);
    atomicAdd(counts + 1, linear_clamped);
  }
}

__global__ void swiglu_backward_kernel(float* dgate, float* dup, const float* dh,
                                       const float* gate, const float* up, int64_t n, float gmax,
                                       float lim) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float graw = gate[i], uraw = up[i];
    const float g = graw > gmax ? gmax : graw;
    float u = uraw > lim ? lim : uraw;
    u = u < -lim ? -lim : u;
    const float sg = sigmoidf(g);
    // Zero gradient where the input was clamped: the clamp's derivative there is 0.
    const float gate_pass = graw > gmax ? 0.0f : 1.0f;
    const float linear_pass = (uraw > lim ? 0.0f : 1.0f) * (uraw < -lim ? 0.0f : 1.0f);
    dgate[i] = gate_pass * dh[i] * u * sg * (1.0f + g * (1.0f - sg));
    dup[i] = linear_pass * dh[i] * g * sg;
  }
}

}  // namespace

void fill(float* x, float value, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  fill_kernel<<<grid_for(n), kThreads, 0, stream>>>(x, value, n);
  CUDA_CHECK_LAUNCH();
}

void scale(float* x, float s, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  scale_kernel<<<grid_for(n), kThreads, 0, stream>>>(x, s, n);
  CUDA_CHECK_LAUNCH();
}

void sum_squares_partials(double* partials, const float* x, int64_t n, cudaStream_t stream) {
  const int64_t chunk = (n + kSumSquaresBlocks - 1) / kSumSquaresBlocks;
  sum_squares_kernel<<<kSumSquaresBlocks, kThreads, 0, stream>>>(partials, x, n, chunk);
  CUDA_CHECK_LAUNCH();
}

void adamw(float* param, const float* grad, float* m, float* v, int64_t n, AdamWScalars h,
           cudaStream_t stream) {
  if (n == 0) return;
  adamw_kernel<<<grid_for(n), kThreads, 0, stream>>>(param, grad, m, v, n, h);
  CUDA_CHECK_LAUNCH();
}

void zero_where(float* grad, const uint8_t* mask, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  zero_where_kernel<<<grid_for(n), kThreads, 0, stream>>>(grad, mask, n);
  CUDA_CHECK_LAUNCH();
}

void swiglu_forward(float* h, const float* gate, const float* up, int64_t n, float gate_max,
                    float limit, unsigned long long* counts, cudaStream_t stream) {
  if (n == 0) return;
  swiglu_forward_kernel<<<grid_for(n), kThreads, 0, stream>>>(h, gate, up, n, gate_max, limit,
                                                              counts);
  CUDA_CHECK_LAUNCH();
}

void swiglu_backward(float* dgate, float* dup, const float* dh, const float* gate,
                     const float* up, int64_t n, float gate_max, float limit,
                     cudaStream_t stream) {
  if (n == 0) return;
  swiglu_backward_kernel<<<grid_for(n), kThreads, 0, stream>>>(dgate, dup, dh, gate, up, n,
                                                               gate_max, limit);
  CUDA_CHECK_LAUNCH();
}

}  // namespace rlhf::cuda
