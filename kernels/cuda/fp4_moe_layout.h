#pragma once
// Offline pre-arrangement of packed FP4 experts for sm90_fp4_bf16_moe_grouped (docs/fp4.md,
// "CUDA grouped MoE GEMM"). Plain C++: built on the host, no CUDA needed.
//
// Each expert W_e [n, k] (rows = output features, k = the reduction dimension) is cut into
// 64-row tiles and 64-column chunks; a (row tile, chunk) is four 16-row sub-tiles, each
// kFp4MoeChunkCodeBytes of codes plus its block scales. A row tile's chunks follow each other
// in k order, so a warp that streams one row tile along k reads one contiguous run of memory:
//
//   bytes [E][n / 64][k / 64][4][chunk_bytes]     chunk_bytes = 512 + 32 (mxfp4) | 512 + 64 (nvfp4)
//
// Within one 16-row sub-tile of one chunk ("row g" is row g of the sub-tile):
//
// Codes: lane L = 4g + c of a warp (g = L / 4, c = L % 4) owns bytes [16 L, 16 L + 16), four
// little-endian words, one per 16-column step s. Word s holds exactly the eight values lane L
// needs as the A operand of an m16n8k16 (or wgmma) step, with kb = 64 chunk + 16 s + 2 c: A
// register r holds the pair (row, kb + col0) | (row, kb + col0 + 1) of
//
//   r = 0: row g, col0 0    r = 1: row g+8, col0 0    r = 2: row g, col0 8    r = 3: row g+8, col0 8
//
// The bits of a pair are placed so that rotating the word right by kFp4MoeSignRotation[r] puts
// the two signs at bits 15 and 31 and rotating it by kFp4MoeMagRotation[r] puts the two
// magnitudes e1 e0 m at bits 8..6 and 24..22 (even column low): a bf16x2 of the values times
// 2^-126 after one or two rotations and one or two masks (11 integer operations per word; plain
// nibbles take 15). Every one of the 32 bits is used once.
inline constexpr int kFp4MoeSignRotation[4] = {0, 15, 5, 4};
inline constexpr int kFp4MoeMagRotation[4] = {2, 15, 5, 10};

// Scales: one byte per block, but not the E8M0 / E4M3 code itself: a "bf16 multiplier code" f
// from which the kernel builds, with one shift (mxfp4) or one multiply-add (nvfp4), the bf16
// value that turns the placed E2M1 bits (the value times 2^-126) into the exact dequantized
// weight up to a per-expert power of two (expert_factors, applied once to the FP32 result):
//   mxfp4: bf16 bits = f << 7,             value = 2^(e - 127) * 2^126 * 2^-B_e
//   nvfp4: bf16 bits = 16 f + (235 << 7),  value = E4M3(s) * 2^117
// Every product code * value is exact in bf16, so the kernel's weights are exactly
// fp4_dequantize's (times the expert's factor). Scale bytes of a sub-tile chunk, lane group g:
//   mxfp4: 4 bytes at 512 + 4 g: row g blocks 2 chunk, 2 chunk + 1; row g+8 the same
//   nvfp4: 8 bytes at 512 + 8 g: row g blocks 4 chunk .. 4 chunk + 3; row g+8 the same
#include <cstdint>
#include <string_view>
#include <vector>

#include "kernels/fp4/fp4.h"

namespace rlhf {

inline constexpr int kFp4MoeTileRows = 16;         // rows of a sub-tile (the MMA's M)
inline constexpr int kFp4MoeChunkCols = 64;        // columns (k) per chunk
inline constexpr int kFp4MoeChunkCodeBytes = 512;  // 16 x 64 codes, 4 bits each
inline constexpr int kFp4MoeRowTileRows = 64;      // rows per row tile; n is a multiple
inline constexpr int kFp4MoeSubTiles = kFp4MoeRowTileRows / kFp4MoeTileRows;  // 4
inline constexpr int kFp4MoeMaxExperts = 1024;     // the kernel's tile scheduler bound

// Scale bytes per chunk: 16 rows x (64 / block) blocks.
RLHF_FP4_HD constexpr int fp4_moe_chunk_scale_bytes(Fp4Format format) {
  return kFp4MoeTileRows * kFp4MoeChunkCols / fp4_block_size(format);
}
RLHF_FP4_HD constexpr int fp4_moe_chunk_bytes(Fp4Format format) {
  return kFp4MoeChunkCodeBytes + fp4_moe_chunk_scale_bytes(format);
}
// Bytes of one expert [n, k] in the layout (codes + scales; n, k already checked).
int64_t fp4_moe_expert_bytes(Fp4Format format, int64_t n, int64_t k);

// Throws rlhf::Error, naming `op`, unless 1 <= experts <= kFp4MoeMaxExperts, n > 0 and a multiple
// of 64, k > 0 and a multiple of 64.
void fp4_moe_check_shape(const char* op, Fp4Format format, int64_t experts, int64_t n, int64_t k);

// Throws rlhf::Error, naming `op`, unless 0 <= total_rows < 2^31 (the kernel's row indices).
void fp4_moe_check_rows(const char* op, int64_t total_rows);

// The pre-arranged weights of E experts, as the kernel reads them.
struct Fp4MoeLayout {
  Fp4Format format = Fp4Format::mxfp4;
  int64_t experts = 0;
  int64_t n = 0;                       // rows of each W_e
  int64_t k = 0;                       // columns of each W_e (the reduction dimension)
  std::vector<uint8_t> bytes;          // [experts, fp4_moe_expert_bytes(format, n, k)]
  std::vector<float> expert_factors;   // [experts]: mxfp4 2^B_e; nvfp4 global_scale * 2^9
};

// Arranges one expert into `out` [fp4_moe_expert_bytes] and returns its factor. Throws
// rlhf::Error (naming `name`) if w's buffers disagree with its shape, if the shape is not
// supported, on a NaN scale code or a negative NVFP4 scale (the quantizer makes neither), and if
// an MXFP4 expert's nonzero blocks span more than 2^133 in scale (bf16 could not hold every
// product exactly; real weights span far less).
float fp4_moe_layout_pack_expert(const Fp4Tensor& w, std::string_view name, uint8_t* out);

// All experts at once; they must share format and shape. Errors as above, naming expert i.
Fp4MoeLayout fp4_moe_layout_pack(const std::vector<Fp4Tensor>& experts);

}  // namespace rlhf
