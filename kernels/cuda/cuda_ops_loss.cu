// Cross-entropy, log-softmax gather and the FP4 helpers (saturation mask, packed-row decode)
// of the CUDA backend. The FP4 kernels run fp4.h's inline rules, as the CPU does, so their
// values are bit-identical to the CPU's.
#include "kernels/cuda/cuda_ops_device.cuh"
#include "kernels/cuda/cuda_ops_kernels.cuh"
#include "kernels/fp4/fp4.h"

namespace rlhf::cuda {

namespace {

// One block per row. dlogits may alias logits: every thread reads and then writes only its
// own columns, and the target logit is read by all before any write (block_max's barriers).
__global__ void cross_entropy_kernel(float* dlogits, double* row_loss, const float* logits,
                                     const int32_t* targets, const float* weights, int V) {
  __shared__ float red[32];
  const int64_t i = blockIdx.x;
  const float* l = logits + i * V;
  float* d = dlogits + i * V;
  const float w = weights[i];
  if (w == 0.0f) {
    for (int c = threadIdx.x; c < V; c += blockDim.x) d[c] = 0;
    if (threadIdx.x == 0) row_loss[i] = 0;
    return;
  }
  const int target = targets[i];
  const float target_logit = l[target];
  float max_logit = -INFINITY;
  for (int c = threadIdx.x; c < V; c += blockDim.x) max_logit = fmaxf(max_logit, l[c]);
  max_logit = block_max(max_logit, red);
  float sum = 0;
  for (int c = threadIdx.x; c < V; c += blockDim.x) sum += expf(l[c] - max_logit);
  sum = block_sum(sum, red);
  const float log_sum = logf(sum);
  if (threadIdx.x == 0) row_loss[i] = double(w) * double(max_logit + log_sum - target_logit);
  const float inv = 1.0f / sum;
  for (int c = threadIdx.x; c < V; c += blockDim.x) {
    float g = w * expf(l[c] - max_logit) * inv;
    if (c == target) g -= w;
    d[c] = g;
  }
}

__global__ void log_softmax_gather_kernel(float* logprobs, const float* logits,
                                          const int32_t* targets, int V, float inv_temp) {
  __shared__ float red[32];
  const int64_t i = blockIdx.x;
  const float* l = logits + i * V;
  float max_logit = -INFINITY;
  for (int c = threadIdx.x; c < V; c += blockDim.x) max_logit = fmaxf(max_logit, l[c] * inv_temp);
  max_logit = block_max(max_logit, red);
  float sum = 0;
  for (int c = threadIdx.x; c < V; c += blockDim.x) sum += expf(l[c] * inv_temp - max_logit);
  sum = block_sum(sum, red);
  if (threadIdx.x == 0) logprobs[i] = l[targets[i]] * inv_temp - max_logit - logf(sum);
}

// One thread per block of values: the quantizer's own scale rule, so "beyond the largest code"
// is decided exactly as the quantizer decided it.
__global__ void fp4_saturated_kernel(uint8_t* saturated, const float* in, int64_t n_blocks,
                                     Fp4Format format, const float* global_scale) {
  const int block = fp4_block_size(format);
  const float global = format == Fp4Format::nvfp4 ? *global_scale : 1.0f;
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < n_blocks;
       b += int64_t(gridDim.x) * blockDim.x) {
    const float* xb = in + b * block;
    uint32_t amax = 0;
    for (int i = 0; i < block; ++i) amax = max(amax, fp4_abs_bits(xb[i]));
    const float limit = fp4_mul(
        kFp4E2m1Max, fp4_block_multiplier(format, fp4_block_scale_code(format, amax, global), global));
    for (int i = 0; i < block; ++i) saturated[b * block + i] = fabsf(xb[i]) > limit ? 1 : 0;
  }
}

// One thread per code byte (two values).
__global__ void fp4_dequantize_rows_kernel(float* out, const uint8_t* codes,
                                           const uint8_t* scales, float global_scale,
                                           int64_t n_bytes, Fp4Format format) {
  const int block = fp4_block_size(format);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n_bytes;
       i += int64_t(gridDim.x) * blockDim.x) {
    // Rows hold whole blocks, so value 2i's block index is its flat index / block.
    const float multiplier = fp4_block_multiplier(format, scales[2 * i / block], global_scale);
    const uint8_t code = codes[i];
    out[2 * i] = fp4_decode_scaled(static_cast<uint8_t>(code & 15u), multiplier);
    out[2 * i + 1] = fp4_decode_scaled(static_cast<uint8_t>(code >> 4), multiplier);
  }
}

}  // namespace

void cross_entropy(float* dlogits, double* row_loss, const float* logits, const int32_t* targets,
                   const float* weights, int N, int V, cudaStream_t stream) {
  if (N == 0) return;
  cross_entropy_kernel<<<N, kThreads, 0, stream>>>(dlogits, row_loss, logits, targets, weights, V);
  CUDA_CHECK_LAUNCH();
}

void log_softmax_gather(float* logprobs, const float* logits, const int32_t* targets, int N,
                        int V, float inv_temperature, cudaStream_t stream) {
  if (N == 0) return;
  log_softmax_gather_kernel<<<N, kThreads, 0, stream>>>(logprobs, logits, targets, V,
                                                        inv_temperature);
  CUDA_CHECK_LAUNCH();
}

void fp4_saturated(uint8_t* saturated, const float* in, int64_t rows, int64_t cols,
                   Fp4Format format, const float* global_scale, cudaStream_t stream) {
  const int64_t n_blocks = rows * cols / fp4_block_size(format);
  if (n_blocks == 0) return;
  fp4_saturated_kernel<<<grid_for(n_blocks), kThreads, 0, stream>>>(saturated, in, n_blocks,
                                                                    format, global_scale);
  CUDA_CHECK_LAUNCH();
}

void fp4_dequantize_rows(float* out, const uint8_t* codes, const uint8_t* scales,
                         float global_scale, int64_t rows, int64_t cols, Fp4Format format,
                         cudaStream_t stream) {
  const int64_t n_bytes = rows * cols / 2;
  if (n_bytes == 0) return;
  fp4_dequantize_rows_kernel<<<grid_for(n_bytes), kThreads, 0, stream>>>(
      out, codes, scales, global_scale, n_bytes, format);
  CUDA_CHECK_LAUNCH();
}

}  // namespace rlhf::cuda
