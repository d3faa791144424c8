// Offline arrangement of packed FP4 experts for the Hopper grouped MoE GEMM (fp4_moe_layout.h has
// the layout). Block multipliers come from fp4_block_multiplier, so the kernel's weights are
// fp4_dequantize's values exactly; every conversion is checked by rebuilding the bf16 value the
// kernel will build and comparing it with the exact target.
#include "kernels/cuda/fp4_moe_layout.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "common/error.h"

namespace rlhf {
namespace {

constexpr uint32_t kNvMultiplierBias = 235;  // nvfp4: bf16 exponent field = f / 8 + 235
constexpr int kNvMultiplierShift = 117;      // nvfp4: bf16 multiplier = E4M3 value * 2^117
constexpr int kE2m1RawShift = 126;           // bit-shifted E2M1 nibble = its value * 2^-126

uint8_t nibble_at(const Fp4Tensor& w, int64_t row, int64_t col) {
  const uint8_t byte = w.codes[static_cast<size_t>(row * (w.cols / 2) + col / 2)];
  return (col & 1) != 0 ? byte >> 4 : byte & 15u;
}

// True if any code of block `block` of `row` is nonzero in magnitude.
bool block_has_nonzero(const Fp4Tensor& w, int64_t row, int64_t block) {
  const int size = fp4_block_size(w.format);
  for (int i = 0; i < size; ++i) {
    if ((nibble_at(w, row, block * size + i) & 7u) != 0) return true;
  }
  return false;
}

// The bits of one E2M1 code (s e1 e0 m) in a layout word: A register r, half 0 (even column)
// or 1 (see fp4_moe_layout.h).
uint32_t placed_pair_bits(uint8_t code, int r, int half) {
  const int sign_at = (15 + 16 * half + kFp4MoeSignRotation[r]) % 32;
  const int mag_at = (6 + 16 * half + kFp4MoeMagRotation[r]) % 32;  // m, then e0, e1 above
  uint32_t bits = uint32_t{(code >> 3) & 1u} << sign_at;
  for (int i = 0; i < 3; ++i) bits |= uint32_t{(code >> i) & 1u} << ((mag_at + i) % 32);
  return bits;
}

float bf16_bits_to_float(uint32_t bits) { return fp4_float_from_bits(bits << 16); }

// mxfp4: the E8M0 exponent B_e that keeps every multiplier 2^(e - 1 - B_e) <= 2^127.
int mx_expert_shift(const Fp4Tensor& w, std::string_view name) {
  const int64_t blocks = w.cols / kFp4MxBlock;
  int max_e = -1, min_e = 256;
  for (int64_t r = 0; r < w.rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int e = w.scales[static_cast<size_t>(r * blocks + b)];
      if (e == 0xff) {
        fail("fp4_moe_layout_pack: expert '{}' holds the NaN E8M0 scale 0xff at row {}, block {}",
             name, r, b);
      }
      if (!block_has_nonzero(w, r, b)) continue;
      max_e = std::max(max_e, e);
      min_e = std::min(min_e, e);
    }
  }
  if (max_e < 0) return 0;  // all codes zero
  const int shift = std::max(0, max_e - 128);
  // Products code * 2^(e - 127 - shift) are exact in bf16 down to 2^-133: e >= shift - 5.
  if (min_e < shift - 5) {
    fail("fp4_moe_layout_pack: expert '{}' has nonzero MXFP4 blocks with scales from 2^{} to 2^{}; "
         "the FP4 MoE kernel holds weights in bf16 and needs them within 2^133 of each other",
         name, min_e - 127, max_e - 127);
  }
  return shift;
}

// nvfp4: refuses NaN and negative block scales (the quantizer makes neither), before the parallel
// loop, so that no error is thrown inside it.
void nv_check_scales(const Fp4Tensor& w, std::string_view name) {
  const int64_t blocks = w.cols / kFp4NvBlock;
  for (int64_t r = 0; r < w.rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t code = w.scales[static_cast<size_t>(r * blocks + b)];
      if ((code & 0x7fu) == 0x7fu) {
        fail("fp4_moe_layout_pack: expert '{}' holds the NaN E4M3 scale {:#x} at row {}, block {}",
             name, code, r, b);
      }
      if ((code & 0x80u) != 0 && code != 0x80u) {
        fail("fp4_moe_layout_pack: expert '{}' holds the negative NVFP4 block scale {:#x} at row "
             "{}, block {}; the quantizer never makes one",
             name, code, r, b);
      }
    }
  }
}

// The multiplier code f of one block (see fp4_moe_layout.h), checked against the exact target.
// Runs inside the parallel loop: input errors were raised before it.
uint8_t multiplier_code(const Fp4Tensor& w, int mx_shift, int64_t row, int64_t block) {
  const int64_t blocks = w.cols / fp4_block_size(w.format);
  const uint8_t code = w.scales[static_cast<size_t>(row * blocks + block)];
  const float multiplier = fp4_block_multiplier(w.format, code, 1.0f);
  if (w.format == Fp4Format::mxfp4) {
    if (!block_has_nonzero(w, row, block)) return 127;  // any finite multiplier: 0 * x = 0
    const float target = std::ldexp(multiplier, kE2m1RawShift - mx_shift);  // a power of two
    const uint32_t bits = fp4_float_bits(target);
    const uint32_t f = bits >> 23;
    RLHF_CHECK(f >= 1 && f <= 254 && (bits & 0x7fffffu) == 0 &&
                   bf16_bits_to_float(f << 7) == target,
               "mxfp4 multiplier of scale {} with shift {}", code, mx_shift);
    return static_cast<uint8_t>(f);
  }
  RLHF_CHECK((code & 0x7fu) != 0x7fu && ((code & 0x80u) == 0 || code == 0x80u),
             "nv_check_scales passes no NaN or negative scale");
  if (multiplier == 0.0f) return 0;  // every code of a zero-scale block is a signed zero
  const float target = std::ldexp(multiplier, kNvMultiplierShift);
  const uint32_t bits = fp4_float_bits(target);
  const uint32_t exponent = bits >> 23;
  const uint32_t f = ((exponent - kNvMultiplierBias) << 3) | ((bits >> 20) & 7u);
  RLHF_CHECK(exponent >= kNvMultiplierBias && exponent - kNvMultiplierBias < 32 &&
                 (bits & 0xfffffu) == 0 &&
                 bf16_bits_to_float(16 * f + (kNvMultiplierBias << 7)) == target,
             "nvfp4 multiplier of scale {:#x}", code);
  return static_cast<uint8_t>(f);
}

}  // namespace

int64_t fp4_moe_expert_bytes(Fp4Format format, int64_t n, int64_t k) {
  return (n / kFp4MoeTileRows) * (k / kFp4MoeChunkCols) * fp4_moe_chunk_bytes(format);
}

void fp4_moe_check_shape(const char* op, Fp4Format format, int64_t experts, int64_t n,
                         int64_t k) {
  if (experts < 1 || experts > kFp4MoeMaxExperts) {
    fail("{}: {} experts; the FP4 MoE kernel takes 1 to {}", op, experts, kFp4MoeMaxExperts);
  }
  if (n <= 0 || n % kFp4MoeRowTileRows != 0) {
    fail("{}: expert weights have {} rows (output features); the FP4 MoE kernel needs a positive "
         "multiple of {}",
         op, n, kFp4MoeRowTileRows);
  }
  if (k <= 0 || k % kFp4MoeChunkCols != 0) {
    fail("{}: expert weights have {} columns (the reduction dimension); the FP4 MoE kernel needs "
         "a positive multiple of {} ({} blocks of {})",
         op, k, kFp4MoeChunkCols, kFp4MoeChunkCols / fp4_block_size(format),
         fp4_block_size(format));
  }
}

void fp4_moe_check_rows(const char* op, int64_t total_rows) {
  if (total_rows < 0 || total_rows > INT32_MAX) {
    fail("{}: {} rows of activations; the FP4 MoE kernel takes 0 to {}", op, total_rows,
         INT32_MAX);
  }
}

float fp4_moe_layout_pack_expert(const Fp4Tensor& w, std::string_view name, uint8_t* out) {
  fp4_moe_check_shape("fp4_moe_layout_pack", w.format, 1, w.rows, w.cols);
  const int block = fp4_block_size(w.format);
  if (w.codes.size() != static_cast<size_t>(w.rows * w.cols / 2) ||
      w.scales.size() != static_cast<size_t>(w.rows * w.cols / block)) {
    fail("fp4_moe_layout_pack: expert '{}' [{}, {}] has {} code bytes and {} scales; its shape "
         "needs {} and {}",
         name, w.rows, w.cols, w.codes.size(), w.scales.size(), w.rows * w.cols / 2,
         w.rows * w.cols / block);
  }
  const int mx_shift = w.format == Fp4Format::mxfp4 ? mx_expert_shift(w, name) : 0;
  if (w.format == Fp4Format::nvfp4) nv_check_scales(w, name);
  const int64_t tiles = w.rows / kFp4MoeTileRows;
  const int64_t chunks = w.cols / kFp4MoeChunkCols;
  const int chunk_bytes = fp4_moe_chunk_bytes(w.format);
  const int blocks_per_chunk = kFp4MoeChunkCols / block;  // 2 (mxfp4) or 4 (nvfp4)

#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    for (int64_t j = 0; j < chunks; ++j) {
      // sub-tile t % 4 of row tile t / 4, chunk j
      uint8_t* chunk =
          out + (((t / kFp4MoeSubTiles) * chunks + j) * kFp4MoeSubTiles + t % kFp4MoeSubTiles) *
                    chunk_bytes;
      for (int lane = 0; lane < 32; ++lane) {
        const int64_t g = lane / 4, c = lane % 4;
        const int64_t row_lo = t * kFp4MoeTileRows + g, row_hi = row_lo + 8;
        for (int s = 0; s < 4; ++s) {
          const int64_t kb = j * kFp4MoeChunkCols + 16 * s + 2 * c;
          uint32_t word = 0;
          for (int r = 0; r < 4; ++r) {
            const int64_t row = (r & 1) != 0 ? row_hi : row_lo;
            const int64_t col = kb + ((r & 2) != 0 ? 8 : 0);
            for (int half = 0; half < 2; ++half) {  // half 0: column col, bits 0..15 after rotating
              word |= placed_pair_bits(nibble_at(w, row, col + half), r, half);
            }
          }
          uint8_t* dst = chunk + lane * 16 + s * 4;
          for (int b = 0; b < 4; ++b) dst[b] = static_cast<uint8_t>(word >> (8 * b));
        }
      }
      for (int64_t g = 0; g < 8; ++g) {
        uint8_t* dst = chunk + kFp4MoeChunkCodeBytes + g * 2 * blocks_per_chunk;
        for (int half = 0; half < 2; ++half) {
          const int64_t row = t * kFp4MoeTileRows + g + 8 * half;
          for (int b = 0; b < blocks_per_chunk; ++b) {
            dst[half * blocks_per_chunk + b] =
                multiplier_code(w, mx_shift, row, j * blocks_per_chunk + b);
          }
        }
      }
    }
  }
  if (w.format == Fp4Format::mxfp4) return std::ldexp(1.0f, mx_shift);
  return fp4_mul(w.global_scale, 512.0f);  // 2^(126 - 117): the nvfp4 multiplier's offset
}

Fp4MoeLayout fp4_moe_layout_pack(const std::vector<Fp4Tensor>& experts) {
  if (experts.empty()) fail("fp4_moe_layout_pack: no experts");
  const Fp4Tensor& first = experts.front();
  Fp4MoeLayout layout;
  layout.format = first.format;
  layout.experts = static_cast<int64_t>(experts.size());
  layout.n = first.rows;
  layout.k = first.cols;
  fp4_moe_check_shape("fp4_moe_layout_pack", layout.format, layout.experts, layout.n, layout.k);
  const int64_t expert_bytes = fp4_moe_expert_bytes(layout.format, layout.n, layout.k);
  layout.bytes.resize(static_cast<size_t>(layout.experts * expert_bytes));
  layout.expert_factors.resize(static_cast<size_t>(layout.experts));
  for (size_t i = 0; i < experts.size(); ++i) {
    const Fp4Tensor& w = experts[i];
    const std::string name = "expert " + std::to_string(i);
    if (w.format != layout.format || w.rows != layout.n || w.cols != layout.k) {
      fail("fp4_moe_layout_pack: {} is {} [{}, {}], expert 0 is {} [{}, {}]; all experts of a "
           "layer share format and shape",
           name, fp4_format_name(w.format), w.rows, w.cols, fp4_format_name(layout.format),
           layout.n, layout.k);
    }
    layout.expert_factors[i] =
        fp4_moe_layout_pack_expert(w, name, layout.bytes.data() + i * expert_bytes);
  }
  return layout;
}

}  // namespace rlhf
