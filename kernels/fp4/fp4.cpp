// CPU implementation of the FP4 quantizer. The rounding and scale rules are the shared inline
// functions of fp4.h; this file adds validation, the tensor amax and the loops.
#include "kernels/fp4/fp4.h"

#include <algorithm>

#include "common/error.h"

namespace rlhf {
namespace {

// Below this many values an OpenMP fork costs more than the loop.
constexpr int64_t kFp4ParallelMinValues = int64_t{1} << 16;

// Max |x| of the tensor as float bits. Throws on the first NaN or Inf, naming where it is.
uint32_t fp4_tensor_amax_bits(const char* op, std::string_view name, const float* x, int64_t rows,
                              int64_t cols) {
  const int64_t n = rows * cols;
  uint32_t amax = 0;
#pragma omp parallel for reduction(max : amax) if (n >= kFp4ParallelMinValues)
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, fp4_abs_bits(x[i]));
  if (amax < kFp4NonFiniteBits) return amax;
  for (int64_t i = 0; i < n; ++i) {
    if (fp4_abs_bits(x[i]) >= kFp4NonFiniteBits) {
      fp4_fail_nonfinite(op, name, x[i], i, cols);
    }
  }
  return amax;  // unreachable: some value had non-finite bits
}

float fp4_global_scale_for(Fp4Format format, uint32_t tensor_amax_bits) {
  return format == Fp4Format::nvfp4 ? fp4_nv_global_scale(tensor_amax_bits) : 1.0f;
}

// out [block] = dequantize(quantize(x [block])), without the codes. out may equal x.
void fp4_fake_quantize_block(Fp4Format format, const float* x, float global_scale, float* out) {
  const int block = fp4_block_size(format);
  uint32_t amax = 0;
  for (int i = 0; i < block; ++i) amax = std::max(amax, fp4_abs_bits(x[i]));
  const float multiplier =
      fp4_block_multiplier(format, fp4_block_scale_code(format, amax, global_scale), global_scale);
  for (int i = 0; i < block; ++i) {
    out[i] = fp4_decode_scaled(fp4_encode_scaled(x[i], multiplier), multiplier);
  }
}

}  // namespace

void fp4_check_shape(const char* op, std::string_view name, int64_t rows, int64_t cols,
                     Fp4Format format) {
  if (rows < 0 || cols < 0) {
    fail("{}: tensor '{}' has a negative shape [{}, {}]", op, name, rows, cols);
  }
  const int block = fp4_block_size(format);
  if (cols % block != 0) {
    fail("{}: tensor '{}' has {} columns, not a multiple of the {} block size {}", op, name, cols,
         fp4_format_name(format), block);
  }
}

void fp4_fail_nonfinite(const char* op, std::string_view name, float value, int64_t flat_index,
                        int64_t cols) {
  fail("{}: tensor '{}' holds {} at [{}, {}] (flat index {}); FP4 has no NaN or Inf, so the "
       "tensor is refused rather than encoded",
       op, name, value, flat_index / cols, flat_index % cols, flat_index);
}

Fp4Tensor fp4_quantize(const float* x, int64_t rows, int64_t cols, Fp4Format format,
                       std::string_view name) {
  fp4_check_shape("fp4_quantize", name, rows, cols, format);
  const uint32_t amax = fp4_tensor_amax_bits("fp4_quantize", name, x, rows, cols);
  const int block = fp4_block_size(format);
  const int64_t n_blocks = rows * cols / block;
  Fp4Tensor t;
  t.format = format;
  t.rows = rows;
  t.cols = cols;
  t.codes.resize(static_cast<size_t>(rows * cols / 2));
  t.scales.resize(static_cast<size_t>(n_blocks));
  t.global_scale = fp4_global_scale_for(format, amax);
  uint8_t* codes = t.codes.data();
  uint8_t* scales = t.scales.data();
  const float global_scale = t.global_scale;
#pragma omp parallel for if (rows * cols >= kFp4ParallelMinValues)
  for (int64_t b = 0; b < n_blocks; ++b) {
    scales[b] = fp4_quantize_block(format, x + b * block, global_scale, codes + b * block / 2);
  }
  return t;
}

void fp4_fake_quantize(const float* x, float* out, int64_t rows, int64_t cols, Fp4Format format,
                       std::string_view name) {
  fp4_check_shape("fp4_fake_quantize", name, rows, cols, format);
  const uint32_t amax = fp4_tensor_amax_bits("fp4_fake_quantize", name, x, rows, cols);
  const float global_scale = fp4_global_scale_for(format, amax);
  const int block = fp4_block_size(format);
  const int64_t n_blocks = rows * cols / block;
#pragma omp parallel for if (rows * cols >= kFp4ParallelMinValues)
  for (int64_t b = 0; b < n_blocks; ++b) {
    fp4_fake_quantize_block(format, x + b * block, global_scale, out + b * block);
  }
}

void fp4_dequantize_blocks(Fp4Format format, const uint8_t* codes, const uint8_t* scales,
                           float global_scale, int64_t n, float* out) {
  const int block = fp4_block_size(format);
  RLHF_CHECK(n % block == 0, "{} values are not whole {} blocks", n, fp4_format_name(format));
  for (int64_t b = 0; b < n / block; ++b) {
    // All 16 codes of this block decoded once: the same fp4_decode_scaled as the fake quantizer,
    // so the table holds exactly its values.
    const float multiplier = fp4_block_multiplier(format, scales[b], global_scale);
    float table[16];
    for (int c = 0; c < 16; ++c) table[c] = fp4_decode_scaled(static_cast<uint8_t>(c), multiplier);
    const uint8_t* block_codes = codes + b * block / 2;
    float* block_out = out + b * block;
    for (int j = 0; j < block / 2; ++j) {
      block_out[2 * j] = table[block_codes[j] & 15u];
      block_out[2 * j + 1] = table[block_codes[j] >> 4];
    }
  }
}

void fp4_dequantize(const Fp4Tensor& t, float* out) {
  fp4_check_shape("fp4_dequantize", "(packed)", t.rows, t.cols, t.format);
  const int block = fp4_block_size(t.format);
  const auto want_codes = static_cast<size_t>(t.rows * t.cols / 2);
  const auto want_scales = static_cast<size_t>(t.rows * t.cols / block);
  if (t.codes.size() != want_codes || t.scales.size() != want_scales) {
    fail("fp4_dequantize: packed {} tensor [{}, {}] has {} code bytes and {} scales; its shape "
         "needs {} and {}",
         fp4_format_name(t.format), t.rows, t.cols, t.codes.size(), t.scales.size(), want_codes,
         want_scales);
  }
  const int64_t rows = t.rows;
  const int64_t cols = t.cols;
#pragma omp parallel for if (rows * cols >= kFp4ParallelMinValues)
  for (int64_t r = 0; r < rows; ++r) fp4_dequantize_row(t, r, out + r * cols);
}

void fp4_dequantize_row(const Fp4Tensor& t, int64_t row, float* out) {
  RLHF_CHECK(row >= 0 && row < t.rows, "row {} of a [{}, {}] tensor", row, t.rows, t.cols);
  const int block = fp4_block_size(t.format);
  fp4_dequantize_blocks(t.format, t.codes.data() + row * t.cols / 2,
                        t.scales.data() + row * t.cols / block, t.global_scale, t.cols, out);
}

Fp4Format fp4_format_from_name(std::string_view name) {
  if (name == "mxfp4") return Fp4Format::mxfp4;
  if (name == "nvfp4") return Fp4Format::nvfp4;
  fail("unknown FP4 format '{}' (expected mxfp4 or nvfp4)", name);
}

const char* fp4_format_name(Fp4Format format) {
  return format == Fp4Format::mxfp4 ? "mxfp4" : "nvfp4";
}

double fp4_bits_per_value(Fp4Format format) {
  return 4.0 + 8.0 / fp4_block_size(format);  // one 8-bit scale per block
}

}  // namespace rlhf
