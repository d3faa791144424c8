#pragma once
// The one FP4 quantizer (DESIGN.md "FP4"; the exact rules are in docs/fp4.md).
//
// Values are E2M1 codes (+-{0, 0.5, 1, 1.5, 2, 3, 4, 6}) in blocks along the contiguous (last,
// reduction) dimension of a row-major [rows, cols] matrix:
//  - MXFP4: 32 values share an E8M0 power-of-two scale (4.25 bits/value).
//  - NVFP4: 16 values share an FP8 E4M3FN scale, times one FP32 scale per tensor (4.5 bits/value).
//
// Every rounding decision lives in the inline scalar functions below. They are
// __host__ __device__ under nvcc, so the CPU implementation (fp4.cpp) and the CUDA one
// (fp4_quant.cu) run the same source and agree bit for bit. They use only integer operations,
// comparisons and single IEEE-rounded multiplies/divides (no fused or approximate math); that
// identity needs denormals kept (no FTZ/DAZ, no fast-math) on both sides.
#include <cstdint>
#include <cstring>
#include <string_view>
#include <vector>

#if defined(__CUDACC__)
#define RLHF_FP4_HD __host__ __device__ __forceinline__
#else
#define RLHF_FP4_HD inline
#endif

namespace rlhf {

enum class Fp4Format : uint8_t {
  mxfp4,  // 32-value blocks, E8M0 scale
  nvfp4,  // 16-value blocks, E4M3FN scale, FP32 per-tensor scale
};

// A quantized row-major [rows, cols] matrix.
struct Fp4Tensor {
  Fp4Format format = Fp4Format::mxfp4;
  int64_t rows = 0;
  int64_t cols = 0;              // a multiple of fp4_block_size(format)
  std::vector<uint8_t> codes;    // [rows, cols / 2] element 2i in the low nibble, 2i+1 in the high
  std::vector<uint8_t> scales;   // [rows, cols / block] E8M0 (mxfp4) or E4M3FN (nvfp4) bits
  float global_scale = 1.0f;     // nvfp4: per-tensor FP32 scale; mxfp4: always 1
};

// ---- Tensor-level API (fp4.cpp). Errors (rlhf::Error) name the tensor. ----

// Quantizes x [rows, cols]. Throws on cols not a multiple of the block size, and on any NaN or
// Inf (FP4 has neither; silently encoding one would hide a broken weight).
Fp4Tensor fp4_quantize(const float* x, int64_t rows, int64_t cols, Fp4Format format,
                       std::string_view name);

// out [rows, cols] = the values t encodes. Throws if t's buffers disagree with its shape.
void fp4_dequantize(const Fp4Tensor& t, float* out);

// out [rows, cols] = dequantize(quantize(x)) bit for bit, in one pass and without the packed
// buffers (the QAT forward). Same errors as fp4_quantize. out may equal x.
void fp4_fake_quantize(const float* x, float* out, int64_t rows, int64_t cols, Fp4Format format,
                       std::string_view name);

// out [cols] = row `row` of t, decoded (for blocked matmuls over packed weights).
void fp4_dequantize_row(const Fp4Tensor& t, int64_t row, float* out);

// out [n] = n values decoded from packed storage that starts at a block boundary: codes [n / 2],
// scales [n / block]; n a multiple of the block size. The primitive under fp4_dequantize_row,
// for kernels that walk a slice of a row.
void fp4_dequantize_blocks(Fp4Format format, const uint8_t* codes, const uint8_t* scales,
                           float global_scale, int64_t n, float* out);

// "mxfp4" | "nvfp4"; anything else throws rlhf::Error.
Fp4Format fp4_format_from_name(std::string_view name);
const char* fp4_format_name(Fp4Format format);
double fp4_bits_per_value(Fp4Format format);  // 4.25 | 4.5 (the per-tensor FP32 not counted)

// Input checks shared by the CPU and CUDA quantizers, so both raise the same rlhf::Error.
// `op` names the calling function in the message.
void fp4_check_shape(const char* op, std::string_view name, int64_t rows, int64_t cols,
                     Fp4Format format);
[[noreturn]] void fp4_fail_nonfinite(const char* op, std::string_view name, float value,
                                     int64_t flat_index, int64_t cols);

inline constexpr int kFp4MxBlock = 32;
inline constexpr int kFp4NvBlock = 16;
inline constexpr float kFp4E2m1Max = 6.0f;
inline constexpr float kFp4E4m3Max = 448.0f;

RLHF_FP4_HD constexpr int fp4_block_size(Fp4Format format) {
  return format == Fp4Format::mxfp4 ? kFp4MxBlock : kFp4NvBlock;
}

// ---- Scalar rules, shared by the CPU and CUDA implementations. ----

RLHF_FP4_HD uint32_t fp4_float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

RLHF_FP4_HD float fp4_float_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// One correctly rounded multiply / divide. On the device the _rn intrinsics keep nvcc from
// fusing or approximating them whatever -fmad / -prec-div say.
RLHF_FP4_HD float fp4_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

RLHF_FP4_HD float fp4_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// |x| as float bits. For non-NaN floats, integer order of these bits is numeric order, so the
// amax of a block is an integer max: exact, order-free and blind to FTZ. A result
// >= 0x7f800000 means the block holds a NaN or an Inf.
RLHF_FP4_HD uint32_t fp4_abs_bits(float x) { return fp4_float_bits(x) & 0x7fffffffu; }

inline constexpr uint32_t kFp4NonFiniteBits = 0x7f800000u;

// E2M1: code = s e1 e0 m (sign in bit 3). Magnitude index (e << 1 | m) 0..7 is
// {0, 0.5, 1, 1.5, 2, 3, 4, 6}: e == 0 is subnormal (m * 0.5), else (1 + m / 2) * 2^(e - 1).
RLHF_FP4_HD float fp4_e2m1_decode(uint8_t code) {
  const uint32_t e = (code >> 1) & 3u;
  const uint32_t m = code & 1u;
  uint32_t bits = e != 0 ? ((e + 126u) << 23) | (m << 22) : (m != 0 ? 0x3f000000u : 0u);
  bits |= static_cast<uint32_t>(code & 8u) << 28;
  return fp4_float_from_bits(bits);
}

// Round to nearest, ties to the neighbour whose mantissa bit m is 0 (even magnitude index):
// 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4. Saturates: |x| > 6 (and Inf) -> 6.
// The sign is kept, also for zero results: -0 and -0.1 encode as 0x8 (negative zero), which
// decodes to -0.0f. NaN encodes as a signed zero (the tensor API refuses NaN before this).
// Crossing a threshold into an odd index needs '>', into an even one '>=': that is the tie rule.
RLHF_FP4_HD uint8_t fp4_e2m1_encode(float x) {
  const uint32_t u = fp4_float_bits(x);
  const float a = fp4_float_from_bits(u & 0x7fffffffu);
  const uint32_t index = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) +
                         (a > 2.5f) + (a >= 3.5f) + (a > 5.0f);
  return static_cast<uint8_t>(((u >> 28) & 8u) | index);
}

// FP8 E4M3FN: s eeee mmm, bias 7, no Inf, NaN = 0x7f / 0xff, max 448, subnormals m * 2^-9.
RLHF_FP4_HD float fp4_e4m3_decode(uint8_t code) {
  const uint32_t sign = static_cast<uint32_t>(code & 0x80u) << 24;
  const uint32_t e = (code >> 3) & 15u;
  const uint32_t m = code & 7u;
  if ((code & 0x7fu) == 0x7fu) return fp4_float_from_bits(sign | 0x7fc00000u);
  if (e != 0) return fp4_float_from_bits(sign | ((e + 120u) << 23) | (m << 20));
  // m * 2^-9 with m < 8: exact in float.
  return fp4_float_from_bits(sign | fp4_float_bits(static_cast<float>(m) * 0x1p-9f));
}

// Round to nearest, ties to even, saturating: |x| >= 448 (and Inf) -> 448. NaN -> 0x7f | sign.
// The sign is kept (-0 -> 0x80).
RLHF_FP4_HD uint8_t fp4_e4m3_encode(float x) {
  const uint32_t u = fp4_float_bits(x);
  const uint32_t sign = (u >> 24) & 0x80u;
  const uint32_t a = u & 0x7fffffffu;
  if (a > kFp4NonFiniteBits) return static_cast<uint8_t>(sign | 0x7fu);
  if (a >= 0x43e00000u) return static_cast<uint8_t>(sign | 0x7eu);  // 448
  // a = sig * 2^(exp - 150) with sig the 24-bit significand (float subnormals: exp_field 0,
  // no hidden bit, same scale as exp_field 1).
  const int32_t exp_field = static_cast<int32_t>(a >> 23);
  const uint32_t sig = exp_field != 0 ? (a & 0x7fffffu) | 0x800000u : a;
  const int32_t exp = exp_field != 0 ? exp_field - 127 : -126;
  // The E4M3 quantum at this magnitude: 2^(e - 3) for normals (e >= -6), 2^-9 below.
  const int32_t quantum_exp = (exp >= -6 ? exp : -6) - 3;
  int32_t shift = quantum_exp - (exp - 23);  // >= 20
  if (shift > 31) shift = 31;                // sig < 2^24 <= half a quantum: rounds to 0
  const uint32_t half = 1u << (shift - 1);
  const uint32_t rest = sig & ((half << 1) - 1u);
  uint32_t units = sig >> shift;  // |x| in quanta, rounded down
  if (rest > half || (rest == half && (units & 1u) != 0)) ++units;
  // Normals: code = (biased exponent << 3) + units - 8; a carry to units == 16 lands on the next
  // exponent. Subnormals: code = units (units == 8 is the smallest normal, 2^-6).
  const uint32_t code = exp >= -6 ? ((static_cast<uint32_t>(exp + 7) << 3) + units - 8u) : units;
  return static_cast<uint8_t>(sign | code);
}

// E8M0: 2^(e - 127); e == 0 is 2^-127 (a float subnormal); 0xff is NaN.
RLHF_FP4_HD float fp4_e8m0_decode(uint8_t e) {
  if (e == 0xffu) return fp4_float_from_bits(0x7fc00000u);
  return fp4_float_from_bits(e != 0 ? static_cast<uint32_t>(e) << 23 : 0x00400000u);
}

// MXFP4 block scale (OCP MX v1.0): exponent floor(log2(amax)) - 2 (2 = emax of E2M1), clamped
// to E8M0's [-127, 127]. Blocks with amax < 2^-125, all-zero ones included, get 2^-127 (code 0).
RLHF_FP4_HD uint8_t fp4_mx_scale_code(uint32_t amax_bits) {
  if (amax_bits == 0) return 0;
  const int32_t exp_field = static_cast<int32_t>(amax_bits >> 23);
  // Subnormal amax: the top set bit of its mantissa (converted exactly, < 2^23) gives log2.
  const int32_t floor_log2 =
      exp_field != 0
          ? exp_field - 127
          : static_cast<int32_t>(fp4_float_bits(static_cast<float>(amax_bits)) >> 23) - 127 - 149;
  int32_t e = floor_log2 - 2;
  if (e < -127) e = -127;
  if (e > 127) e = 127;  // unreachable for finite amax (max 125), kept for the range's sake
  return static_cast<uint8_t>(e + 127);
}

// NVFP4 per-tensor scale: amax / (6 * 448), so the largest block scale lands near E4M3's max.
// 1 for an all-zero tensor. Kept at least 2^-126 (the smallest normal float) so it is never 0
// or subnormal; this only touches tensors with amax < ~3.2e-35.
RLHF_FP4_HD float fp4_nv_global_scale(uint32_t tensor_amax_bits) {
  if (tensor_amax_bits == 0) return 1.0f;
  const float g = fp4_div(fp4_float_from_bits(tensor_amax_bits), kFp4E2m1Max * kFp4E4m3Max);
  return g < 0x1p-126f ? 0x1p-126f : g;
}

// NVFP4 block scale: E4M3(round-to-nearest-even(amax / 6 / global)), saturating at 448.
RLHF_FP4_HD uint8_t fp4_nv_scale_code(uint32_t amax_bits, float global_scale) {
  return fp4_e4m3_encode(
      fp4_div(fp4_div(fp4_float_from_bits(amax_bits), kFp4E2m1Max), global_scale));
}

RLHF_FP4_HD uint8_t fp4_block_scale_code(Fp4Format format, uint32_t amax_bits,
                                         float global_scale) {
  return format == Fp4Format::mxfp4 ? fp4_mx_scale_code(amax_bits)
                                    : fp4_nv_scale_code(amax_bits, global_scale);
}

// What one block's codes are multiplied by on decode: 2^(e - 127), or E4M3 scale * global.
RLHF_FP4_HD float fp4_block_multiplier(Fp4Format format, uint8_t scale_code, float global_scale) {
  return format == Fp4Format::mxfp4 ? fp4_e8m0_decode(scale_code)
                                    : fp4_mul(fp4_e4m3_decode(scale_code), global_scale);
}

// One value of a block: E2M1(x / multiplier). A zero multiplier (an NVFP4 block scale that
// rounded to 0, or an all-zero block) makes every code a signed zero.
RLHF_FP4_HD uint8_t fp4_encode_scaled(float x, float multiplier) {
  if (multiplier == 0.0f) return static_cast<uint8_t>((fp4_float_bits(x) >> 28) & 8u);
  return fp4_e2m1_encode(fp4_div(x, multiplier));
}

RLHF_FP4_HD float fp4_decode_scaled(uint8_t code, float multiplier) {
  return fp4_mul(fp4_e2m1_decode(code), multiplier);
}

// fp4_decode_scaled of nibble i (0..7, lowest first: the codes of bytes b = i / 2 of a
// little-endian word, low nibble first) of `word`, with fewer instructions, for kernels that
// decode whole chunks. E2M1's exponent and mantissa bits go straight into a float's lowest
// exponent bits and top mantissa bit, where they read as the E2M1 magnitude times 2^-126
// (0.5 lands on the subnormal 2^-127, also exact), and the sign into the sign bit; two
// multiplies, by 2^126 and by the multiplier, give fp4_decode_scaled's bits: the first is exact,
// so the second is fp4_decode_scaled's own multiply (tested for every code against every MXFP4
// scale and every NVFP4 scale at several global scales). Needs subnormals kept (no flush to
// zero), as the project builds.
RLHF_FP4_HD float fp4_decode_nibble_scaled(uint32_t word, int i, float multiplier) {
  const uint32_t nibble = word >> (4 * i);
  const uint32_t bits = ((nibble & 7u) << 22) | ((nibble & 8u) << 28);
  return fp4_mul(fp4_mul(fp4_float_from_bits(bits), 0x1p126f), multiplier);
}

// Quantizes one block x [block] into codes [block / 2] and returns its scale code. The CPU and
// CUDA quantizers both call this.
RLHF_FP4_HD uint8_t fp4_quantize_block(Fp4Format format, const float* x, float global_scale,
                                       uint8_t* codes) {
  const int block = fp4_block_size(format);
  uint32_t amax = 0;
  for (int i = 0; i < block; ++i) {
    const uint32_t a = fp4_abs_bits(x[i]);
    amax = a > amax ? a : amax;
  }
  const uint8_t scale = fp4_block_scale_code(format, amax, global_scale);
  const float multiplier = fp4_block_multiplier(format, scale, global_scale);
  for (int i = 0; i < block; i += 2) {
    codes[i / 2] = static_cast<uint8_t>(fp4_encode_scaled(x[i], multiplier) |
                                        (fp4_encode_scaled(x[i + 1], multiplier) << 4));
  }
  return scale;
}

}  // namespace rlhf
