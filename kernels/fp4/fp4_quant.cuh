#pragma once
// CUDA implementation of the FP4 quantizer (kernels/fp4/fp4.h has the rules and the CPU side).
// Codes, scales and the NVFP4 global scale are bit-identical to fp4_quantize's: both run the
// same inline functions of fp4.h, and the tensor amax is an integer max (order-free), so the
// result does not depend on the launch shape. Plain C++ header: .cpp files may include it.
//
// All pointers are device memory; layouts are those of Fp4Tensor:
//   x, out        [rows, cols] float, row-major
//   codes         [rows, cols / 2] two E2M1 codes per byte, element 2i in the low nibble
//   scales        [rows, cols / block] E8M0 (mxfp4) or E4M3FN (nvfp4) bits
//   global_scale  [1] float: NVFP4's per-tensor scale, 1 for MXFP4
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string_view>

#include "kernels/fp4/fp4.h"

namespace rlhf {

// Quantizes x. Throws rlhf::Error (naming `name`) on cols not a multiple of the block size and
// on any NaN or Inf in x. It waits once on `stream`, after the amax pass, to read that check;
// the quantize kernel is then queued and the call returns without waiting for it.
void fp4_quantize_cuda(const float* x, int64_t rows, int64_t cols, Fp4Format format,
                       std::string_view name, uint8_t* codes, uint8_t* scales,
                       float* global_scale, cudaStream_t stream = nullptr);

// out = the values (codes, scales, global_scale) encode. Asynchronous on `stream`.
void fp4_dequantize_cuda(const uint8_t* codes, const uint8_t* scales, const float* global_scale,
                         int64_t rows, int64_t cols, Fp4Format format, float* out,
                         cudaStream_t stream = nullptr);

}  // namespace rlhf
