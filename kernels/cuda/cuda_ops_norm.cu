// Embedding, RMSNorm and RoPE kernels of the CUDA backend. The parameter-gradient reductions
// (embedding and RMSNorm weight) give each output column to one thread that walks the rows in
// order: no atomics, and the embedding's sums run in exactly the CPU's order.
#include "kernels/cuda/cuda_ops_device.cuh"
#include "kernels/cuda/cuda_ops_kernels.cuh"

namespace rlhf::cuda {

namespace {

__global__ void embedding_forward_kernel(float* out, const int32_t* tokens, const float* table,
                                         int N, int D) {
  const int64_t n = int64_t(N) * D;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / D, c = i % D;
    out[i] = table[int64_t(tokens[row]) * D + c];
  }
}

// One thread per column: tokens are added in order 0..N-1, as on the CPU.
__global__ void embedding_backward_kernel(float* dtable, const float* dout,
                                          const int32_t* tokens, int N, int D) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= D) return;
  for (int i = 0; i < N; ++i) dtable[int64_t(tokens[i]) * D + c] += dout[int64_t(i) * D + c];
}

__global__ void rmsnorm_forward_kernel(float* out, float* rstd, const float* in,
                                       const float* weight, int D, float eps) {
  __shared__ float shared[32];
  const int64_t row = blockIdx.x;
  rmsnorm_row(out + row * D, rstd + row, in + row * D, weight, D, eps, shared);
}

// y = x r w  =>  dx += r (dy w) - x r^3 mean(dy w x)
__global__ void rmsnorm_backward_rows_kernel(float* din, const float* dout, const float* in,
                                             const float* weight, const float* rstd, int D) {
  __shared__ float shared[32];
  const int64_t row = blockIdx.x;
  const float* x = in + row * D;
  const float* dy = dout + row * D;
  float* dx = din + row * D;
  const float r = rstd[row];
  float dot = 0;
  for (int c = threadIdx.x; c < D; c += blockDim.x) dot += dy[c] * weight[c] * x[c];
  dot = block_sum(dot, shared);
  const float coef = dot * r * r * r / float(D);
  for (int c = threadIdx.x; c < D; c += blockDim.x) dx[c] += dy[c] * weight[c] * r - x[c] * coef;
}

// dweight[c] += sum_i dy[i,c] x[i,c] r[i], one thread per column walking the rows in order.
__global__ void rmsnorm_backward_weight_kernel(float* dweight, const float* dout,
                                               const float* in, const float* rstd, int N,
                                               int D) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= D) return;
  float sum = 0;
  for (int i = 0; i < N; ++i) sum += dout[int64_t(i) * D + c] * in[int64_t(i) * D + c] * rstd[i];
  dweight[c] += sum;
}

// The angle in double (as the CPU's table). x0 [N, H0, hd], then x1 [N, H1, hd] (H1 = 0: none),
// in one launch.
__global__ void rope_kernel(float* x0, int H0, float* x1, int H1, const int32_t* positions,
                            int N, int hd, double theta, float sign) {
  // One thread per (token, head, pair): the angle is recomputed per head rather than looped
  // over the heads, because at decode sizes (one token per sequence) a loop left the GPU with a
  // few thousand threads each waiting on H serial load-stores. Same formula, same values.
  const int half = hd / 2;
  const int64_t n0 = int64_t(N) * H0 * half, n = n0 + int64_t(N) * H1 * half;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const bool first = i < n0;
    float* x = first ? x0 : x1;
    const int H = first ? H0 : H1;
    const int64_t idx = first ? i : i - n0;
    const int64_t row = idx / half;  // token i, head h: row i * H + h
    const int p = int(idx % half);
    const double angle = double(positions[row / H]) * pow(theta, -2.0 * p / hd);
    const float c = float(cos(angle)), s = sign * float(sin(angle));
    float* v = x + row * hd;
    const float a = v[2 * p], b = v[2 * p + 1];
    v[2 * p] = a * c - b * s;
    v[2 * p + 1] = a * s + b * c;
  }
}

}  // namespace

void embedding_forward(float* out, const int32_t* tokens, const float* table, int N, int D,
                       cudaStream_t stream) {
  if (int64_t(N) * D == 0) return;
  embedding_forward_kernel<<<grid_for(int64_t(N) * D), kThreads, 0, stream>>>(out, tokens, table,
                                                                              N, D);
  CUDA_CHECK_LAUNCH();
}

void embedding_backward(float* dtable, const float* dout, const int32_t* tokens, int N, int D,
                        cudaStream_t stream) {
  if (N == 0 || D == 0) return;
  embedding_backward_kernel<<<(D + 127) / 128, 128, 0, stream>>>(dtable, dout, tokens, N, D);
  CUDA_CHECK_LAUNCH();
}

void rmsnorm_forward(float* out, float* rstd, const float* in, const float* weight, int N, int D,
                     float eps, cudaStream_t stream) {
  if (N == 0) return;
  rmsnorm_forward_kernel<<<N, kThreads, 0, stream>>>(out, rstd, in, weight, D, eps);
  CUDA_CHECK_LAUNCH();
}

void rmsnorm_backward(float* din, float* dweight, const float* dout, const float* in,
                      const float* weight, const float* rstd, int N, int D, cudaStream_t stream) {
  if (N == 0) return;
  rmsnorm_backward_rows_kernel<<<N, kThreads, 0, stream>>>(din, dout, in, weight, rstd, D);
  CUDA_CHECK_LAUNCH();
  rmsnorm_backward_weight_kernel<<<(D + 127) / 128, 128, 0, stream>>>(dweight, dout, in, rstd, N,
                                                                      D);
  CUDA_CHECK_LAUNCH();
}

void rope(float* x, const int32_t* positions, int N, int H, int hd, double theta, float sign,
          cudaStream_t stream) {
  rope_pair(x, H, nullptr, 0, positions, N, hd, theta, sign, stream);
}

void rope_pair(float* x0, int H0, float* x1, int H1, const int32_t* positions, int N, int hd,
               double theta, float sign, cudaStream_t stream) {
  const int64_t n = int64_t(N) * (H0 + H1) * (hd / 2);
  if (n == 0) return;
  rope_kernel<<<grid_for(n), kThreads, 0, stream>>>(x0, H0, x1, H1, positions, N, hd, theta,
                                                    sign);
  CUDA_CHECK_LAUNCH();
}

}  // namespace rlhf::cuda
