// CUDA FP4 quantizer: kernels, launchers and the checked entry points of fp4_quant.cuh.
// Every rounding decision is an inline function of fp4.h shared with the CPU implementation;
// the device side of those uses the _rn intrinsics (no FMA contraction, no approximate
// division). Subnormal blocks need denormals, so this file refuses fast-math.
#include "kernels/fp4/fp4_quant.cuh"

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#if defined(__USE_FAST_MATH__)
#error "fp4_quant.cu must be built without --use_fast_math: FTZ would change codes of tiny blocks"
#endif

namespace rlhf {
namespace {

// common/error.h's check_failed, minus fmt: fmt 9's headers do not compile under nvcc 13.
[[noreturn]] void fp4_cuda_fatal(const char* expr, const char* file, int line, const char* why) {
  std::fprintf(stderr, "rlhf: internal check failed: %s (%s) at %s:%d\n", expr, why, file, line);
  std::abort();
}

#define FP4_CUDA_CHECK(expr)                                                         \
  do {                                                                               \
    const cudaError_t fp4_status_ = (expr);                                          \
    if (fp4_status_ != cudaSuccess)                                                  \
      fp4_cuda_fatal(#expr, __FILE__, __LINE__, cudaGetErrorString(fp4_status_));    \
  } while (0)

constexpr int kFp4Threads = 256;
// Grid-stride loops: enough blocks to fill an H100 (132 SMs) several times over.
constexpr int64_t kFp4MaxGrid = 4096;

int fp4_grid(int64_t work_items) {
  const int64_t blocks = (work_items + kFp4Threads - 1) / kFp4Threads;
  return static_cast<int>(blocks < kFp4MaxGrid ? (blocks > 0 ? blocks : 1) : kFp4MaxGrid);
}

struct Fp4QuantizeParams {
  const float* x;             // [rows, cols]
  uint8_t* codes;             // [rows, cols / 2]
  uint8_t* scales;            // [rows, cols / block], one per scale block, row-major
  float* global_scale;        // [1] written once
  int64_t n_blocks;           // rows * cols / block
  uint32_t tensor_amax_bits;  // max |x| as float bits, from fp4_amax_bits_kernel
};

struct Fp4DequantizeParams {
  const uint8_t* codes;        // [rows, cols / 2]
  const uint8_t* scales;       // [rows, cols / block]
  const float* global_scale;   // [1]
  float* out;                  // [rows, cols]
  int64_t n_blocks;            // rows * cols / block
};

// *amax_bits = max over x [n] of |x| as float bits (>= 0x7f800000 if any NaN/Inf). Integer max:
// the same result in any order, so the reduction is deterministic. *amax_bits starts at 0.
__global__ void fp4_amax_bits_kernel(uint32_t* amax_bits, const float* __restrict__ x, int64_t n) {
  uint32_t amax = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    amax = max(amax, fp4_abs_bits(x[i]));
  }
  amax = __reduce_max_sync(0xffffffffu, amax);
  if ((threadIdx.x & 31) == 0) atomicMax(amax_bits, amax);
}

// *first = the smallest index of a NaN/Inf in x [n] (error path only). *first starts at ~0.
__global__ void fp4_first_nonfinite_kernel(unsigned long long* first, const float* __restrict__ x,
                                           int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (fp4_abs_bits(x[i]) >= kFp4NonFiniteBits) {
      atomicMin(first, static_cast<unsigned long long>(i));
    }
  }
}

// One thread per scale block, through the same fp4_quantize_block as the CPU.
template <Fp4Format kFormat>
__global__ void fp4_quantize_kernel(Fp4QuantizeParams p) {
  constexpr int kBlock = fp4_block_size(kFormat);
  const float global_scale =
      kFormat == Fp4Format::nvfp4 ? fp4_nv_global_scale(p.tensor_amax_bits) : 1.0f;
  if (blockIdx.x == 0 && threadIdx.x == 0) *p.global_scale = global_scale;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < p.n_blocks;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p.scales[b] = fp4_quantize_block(kFormat, p.x + b * kBlock, global_scale,
                                     p.codes + b * (kBlock / 2));
  }
}

// One thread per scale block; each code byte becomes two floats.
template <Fp4Format kFormat>
__global__ void fp4_dequantize_kernel(Fp4DequantizeParams p) {
  constexpr int kBlock = fp4_block_size(kFormat);
  const float global_scale = kFormat == Fp4Format::nvfp4 ? *p.global_scale : 1.0f;
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < p.n_blocks;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float multiplier = fp4_block_multiplier(kFormat, p.scales[b], global_scale);
    const uint8_t* codes = p.codes + b * (kBlock / 2);
    float* out = p.out + b * kBlock;
#pragma unroll
    for (int j = 0; j < kBlock / 2; ++j) {
      const uint8_t byte = codes[j];
      out[2 * j] = fp4_decode_scaled(byte & 15u, multiplier);
      out[2 * j + 1] = fp4_decode_scaled(byte >> 4, multiplier);
    }
  }
}

void fp4_quantize_launch(Fp4Format format, const Fp4QuantizeParams& p, cudaStream_t stream) {
  if (format == Fp4Format::mxfp4) {
    fp4_quantize_kernel<Fp4Format::mxfp4><<<fp4_grid(p.n_blocks), kFp4Threads, 0, stream>>>(p);
  } else {
    fp4_quantize_kernel<Fp4Format::nvfp4><<<fp4_grid(p.n_blocks), kFp4Threads, 0, stream>>>(p);
  }
  FP4_CUDA_CHECK(cudaGetLastError());
}

void fp4_dequantize_launch(Fp4Format format, const Fp4DequantizeParams& p, cudaStream_t stream) {
  if (format == Fp4Format::mxfp4) {
    fp4_dequantize_kernel<Fp4Format::mxfp4><<<fp4_grid(p.n_blocks), kFp4Threads, 0, stream>>>(p);
  } else {
    fp4_dequantize_kernel<Fp4Format::nvfp4><<<fp4_grid(p.n_blocks), kFp4Threads, 0, stream>>>(p);
  }
  FP4_CUDA_CHECK(cudaGetLastError());
}

// Device scratch of the quantizer: the amax word and the first-bad-index word.
struct Fp4Scratch {
  unsigned long long first_nonfinite;
  uint32_t amax_bits;
};

// Throws the rlhf::Error for a non-finite value somewhere in x [n] (called once amax showed one).
[[noreturn]] void fp4_cuda_fail_nonfinite(std::string_view name, const float* x, int64_t n,
                                          int64_t cols, Fp4Scratch* scratch,
                                          cudaStream_t stream) {
  unsigned long long* d_first = &scratch->first_nonfinite;
  FP4_CUDA_CHECK(cudaMemsetAsync(d_first, 0xff, sizeof *d_first, stream));
  fp4_first_nonfinite_kernel<<<fp4_grid(n), kFp4Threads, 0, stream>>>(d_first, x, n);
  FP4_CUDA_CHECK(cudaGetLastError());
  unsigned long long first = 0;
  FP4_CUDA_CHECK(cudaMemcpyAsync(&first, d_first, sizeof first,
                                 cudaMemcpyDeviceToHost, stream));
  FP4_CUDA_CHECK(cudaStreamSynchronize(stream));
  const auto i = static_cast<int64_t>(first);
  if (i < 0 || i >= n) {
    fp4_cuda_fatal("i < n", __FILE__, __LINE__,
                   "the amax pass saw a NaN or Inf that the index search missed");
  }
  float value = 0.0f;
  FP4_CUDA_CHECK(cudaMemcpy(&value, x + i, sizeof value, cudaMemcpyDeviceToHost));
  FP4_CUDA_CHECK(cudaFreeAsync(scratch, stream));
  fp4_fail_nonfinite("fp4_quantize_cuda", name, value, i, cols);
}

}  // namespace

void fp4_quantize_cuda(const float* x, int64_t rows, int64_t cols, Fp4Format format,
                       std::string_view name, uint8_t* codes, uint8_t* scales,
                       float* global_scale, cudaStream_t stream) {
  fp4_check_shape("fp4_quantize_cuda", name, rows, cols, format);
  const int64_t n = rows * cols;
  Fp4Scratch* scratch = nullptr;
  FP4_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&scratch), sizeof(Fp4Scratch), stream));
  FP4_CUDA_CHECK(cudaMemsetAsync(&scratch->amax_bits, 0, sizeof(uint32_t), stream));
  if (n > 0) {
    fp4_amax_bits_kernel<<<fp4_grid(n), kFp4Threads, 0, stream>>>(&scratch->amax_bits, x, n);
    FP4_CUDA_CHECK(cudaGetLastError());
  }
  uint32_t amax_bits = 0;
  FP4_CUDA_CHECK(cudaMemcpyAsync(&amax_bits, &scratch->amax_bits, sizeof amax_bits,
                                 cudaMemcpyDeviceToHost, stream));
  FP4_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (amax_bits >= kFp4NonFiniteBits) fp4_cuda_fail_nonfinite(name, x, n, cols, scratch, stream);
  FP4_CUDA_CHECK(cudaFreeAsync(scratch, stream));

  Fp4QuantizeParams p{};
  p.x = x;
  p.codes = codes;
  p.scales = scales;
  p.global_scale = global_scale;
  p.n_blocks = n / fp4_block_size(format);
  p.tensor_amax_bits = amax_bits;
  fp4_quantize_launch(format, p, stream);
}

void fp4_dequantize_cuda(const uint8_t* codes, const uint8_t* scales, const float* global_scale,
                         int64_t rows, int64_t cols, Fp4Format format, float* out,
                         cudaStream_t stream) {
  fp4_check_shape("fp4_dequantize_cuda", "(packed)", rows, cols, format);
  Fp4DequantizeParams p{};
  p.codes = codes;
  p.scales = scales;
  p.global_scale = global_scale;
  p.out = out;
  p.n_blocks = rows * cols / fp4_block_size(format);
  if (p.n_blocks == 0) return;
  fp4_dequantize_launch(format, p, stream);
}

}  // namespace rlhf
