// Grouped MoE GEMM on packed FP4 experts for Hopper (sm_90a): device code, launcher, heuristic
// and checked entry point of sm90_fp4_bf16_moe_grouped.cuh. The layout of the weights is
// fp4_moe_layout.h's; docs/fp4.md ("CUDA grouped MoE GEMM") has the design and the numbers.
//
// Both kernels compute the transposed tile Y^T [weight rows, tokens] = W X^T, so the weights are
// the MMA's A operand, which both mma.sync and wgmma take from registers: each lane reads its own
// 16 bytes of codes per 16x64 sub-tile chunk from shared memory and turns them into its A
// fragment with rotations, masks and (except mxfp4 decode) one bf16x2 multiply per pair.
// Activations (B) sit in shared memory in the 128-byte swizzle that ldmatrix and wgmma both read
// without bank conflicts. Decode streams weights and x with cp.async (each warp its own ring);
// prefill with the copy engine (a tensor map for x, bulk copies for the weights) on mbarriers.
#include "kernels/cuda/sm90_fp4_bf16_moe_grouped.cuh"

#include <cuda.h>  // CUtensorMap (types only; the encoder is fetched from the driver)
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <algorithm>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/fp4_moe_layout.h"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ != 900 || !defined(__CUDA_ARCH_FEAT_SM90_ALL))
#error "sm90_fp4_bf16_moe_grouped.cu is built for sm_90a only (wgmma)"
#endif

namespace rlhf {
namespace {

constexpr int kThreads = 256;  // both kernels: 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kTilesPerRowTile = kFp4MoeSubTiles;  // a row tile: 64 rows, 4 sub-tiles of 16
constexpr int kRowTileRows = kFp4MoeRowTileRows;
constexpr int kXRowBytes = kFp4MoeChunkCols * 2;  // one chunk of one x row in bf16: 128 bytes
constexpr int kPrefillHalfTokens = 128;           // prefill: tokens per wgmma (its N)
constexpr int kSwizzleAlign = 1024;  // wgmma's 128-byte swizzle repeats every 8 rows of 128 B

// What a kernel needs, device side. Built by the launcher from Sm90Fp4MoeParams and the config.
struct MoeKernelParams {
  const uint8_t* weights;       // [E, n/64, k/64, 4, chunk_bytes], fp4_moe_layout.h
  const float* expert_factors;  // [E] factor applied to each FP32 result
  const __nv_bfloat16* x;       // [total_rows, k]
  const int32_t* offsets;       // [E + 1] row ranges of the experts
  void* y;                      // [total_rows, n], bf16 or f32 (out_f32)
  int64_t expert_bytes;         // bytes of one expert in `weights`
  int32_t experts;              // E
  int32_t n;                    // rows of W_e, multiple of 64
  int32_t k;                    // columns of W_e, multiple of 64
  int32_t k_chunks;             // k / 64
  int32_t tokens_per_tile;      // rows of x per tile: 8 | 16 (decode), 128 | 256 (prefill)
  int32_t row_tiles;            // n / 64
  int32_t row_tiles_per_block;  // 64-row tiles per block: decode 1..8, prefill 2
  int32_t row_blocks;           // ceil(row_tiles / row_tiles_per_block)
  int32_t out_f32;              // 1: y is float; 0: y is bf16
};

// One block's share of the work: an m-tile of one expert's rows times a block of row tiles.
struct MoeTile {
  int32_t expert;     // -1: past the last tile, the block is done
  int32_t row0;       // first row of x and y
  int32_t rows;       // rows of x and y in the tile, 1..tokens_per_tile
  int32_t row_block;  // which block of row_tiles_per_block row tiles
  int32_t units;      // units of the whole launch (m-tiles times row blocks), from moe_find_tile
};

// ---- PTX wrappers ----

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Weights are read once per launch: no L1 allocation.
__device__ __forceinline__ uint4 ld_stream_v4(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}
__device__ __forceinline__ uint32_t ld_stream_u32(const void* p) {
  uint32_t v;
  asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 ld_stream_v2(const void* p) {
  uint2 v;
  asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

// 16 bytes global -> shared; zero-filled (nothing read) when !valid.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a b for one m16n8k16 step: a the A fragment (weights), b0 b1 the B fragment (tokens).
__device__ __forceinline__ void mma_bf16_m16n8k16(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}
// Keeps the compiler from moving accumulator registers across an asynchronous wgmma.
template <int kN>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Shared-memory matrix descriptor of a [rows][64] bf16 tile, K-major, 128-byte swizzle, rows of
// 128 bytes, 8-row groups 1024 bytes apart (stride byte offset), base 1024-aligned.
__device__ __forceinline__ uint64_t wgmma_desc_sw128(uint32_t smem_addr) {
  return static_cast<uint64_t>((smem_addr & 0x3ffffu) >> 4) | (uint64_t{1} << 16) |
         (uint64_t{kSwizzleAlign >> 4} << 32) | (uint64_t{1} << 62);
}

// d [64 weight rows, 128 tokens] += a [64, 16] (registers) b [16, 128] (shared, descriptor).
// Accumulator fragment (both shapes): d[4 j + i] is row g + 8 (i / 2), token 8 j + 2 c + i % 2.
__device__ __forceinline__ void wgmma_m64n128k16_rs(float (&d)[64], const uint32_t (&a)[4],
                                                    uint64_t b_desc) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "
      "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, "
      "%37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, "
      "%55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, 1, 1, 1, 0;"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
        "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
        "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),
        "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
        "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),
        "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]),
        "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc));
}

// d [64 weight rows, 256 tokens] += a [64, 16] (registers) b [16, 256] (shared, descriptor).
__device__ __forceinline__ void wgmma_m64n256k16_rs(float (&d)[128], const uint32_t (&a)[4],
                                                    uint64_t b_desc) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "
      "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "
      "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "
      "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, "
      "%70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, "
      "%87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, "
      "%103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, "
      "%117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "{%128, %129, %130, %131}, %132, 1, 1, 1, 0;"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
        "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
        "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),
        "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
        "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),
        "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]),
        "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]),
        "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]),
        "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]),
        "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]),
        "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]),
        "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]),
        "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]),
        "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]),
        "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc));
}

// ---- FP4 -> bf16 ----

// Rotate right: result bit i is bit (i + n) mod 32 of q (one SHF.R.W).
__device__ __forceinline__ uint32_t rotr(uint32_t q, int n) { return __funnelshift_r(q, q, n); }

constexpr uint32_t kSignBits = 0x80008000u;  // bf16x2 sign bits
constexpr uint32_t kMagBits = 0x01c001c0u;   // bf16x2 bits 8..6: e1 e0 m of an E2M1 code

// Pair r of a layout word as a bf16x2 of its two E2M1 values times 2^-126 (fp4_moe_layout.h):
// sign to bit 15, e1 e0 m to the low exponent bits and the top mantissa bit. Exact for every
// code, the subnormal 0.5 included (a bf16 subnormal here).
template <int kR>
__device__ __forceinline__ uint32_t e2m1x2_raw(uint32_t q) {
  constexpr int kSign = kFp4MoeSignRotation[kR], kMag = kFp4MoeMagRotation[kR];
  if constexpr (kSign == kMag) {
    return rotr(q, kSign) & (kSignBits | kMagBits);
  } else if constexpr (kSign == 0) {
    return (q & kSignBits) | (rotr(q, kMag) & kMagBits);
  } else {
    return (rotr(q, kSign) & kSignBits) | (rotr(q, kMag) & kMagBits);
  }
}

__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// bf16x2 (both halves) of the multiplier code in byte `i` of w (fp4_moe_layout.h).
template <Fp4Format F>
__device__ __forceinline__ uint32_t multiplier_bf16x2(uint32_t w, int i) {
  const uint32_t f = __byte_perm(w, 0u, 0x4040u | static_cast<uint32_t>(i) * 0x101u);
  if constexpr (F == Fp4Format::mxfp4) {
    return f << 7;
  } else {
    return f * 16u + 0x75807580u;  // 235 << 7 in each half
  }
}

// One lane's share of one 16x64 chunk: its code word for each k16 step, its rows' multipliers.
template <Fp4Format F>
struct ChunkRegs;
template <>
struct ChunkRegs<Fp4Format::mxfp4> {
  uint4 codes;      // word s: step s
  uint32_t scales;  // row g blocks 0, 1; row g+8 blocks 0, 1
};
template <>
struct ChunkRegs<Fp4Format::nvfp4> {
  uint4 codes;
  uint2 scales;  // x: row g blocks 0..3; y: row g+8 blocks 0..3
};

template <Fp4Format F>
__device__ __forceinline__ void load_chunk(const uint8_t* chunk, int lane, ChunkRegs<F>& r) {
  r.codes = ld_stream_v4(chunk + lane * 16);
  if constexpr (F == Fp4Format::mxfp4) {
    r.scales = ld_stream_u32(chunk + kFp4MoeChunkCodeBytes + (lane >> 2) * 4);
  } else {
    r.scales = ld_stream_v2(chunk + kFp4MoeChunkCodeBytes + (lane >> 2) * 8);
  }
}

// The A fragment of one k16 step (m16n8k16 and wgmma share it): code word q, bf16x2 multipliers
// of rows g (lo) and g+8 (hi).
__device__ __forceinline__ void dequant_step(uint32_t q, uint32_t lo, uint32_t hi,
                                             uint32_t (&a)[4]) {
  a[0] = bf16x2_mul(e2m1x2_raw<0>(q), lo);  // row g,   k 2c, 2c+1
  a[1] = bf16x2_mul(e2m1x2_raw<1>(q), hi);  // row g+8, k 2c, 2c+1
  a[2] = bf16x2_mul(e2m1x2_raw<2>(q), lo);  // row g,   k 2c+8, 2c+9
  a[3] = bf16x2_mul(e2m1x2_raw<3>(q), hi);  // row g+8, k 2c+8, 2c+9
}

template <Fp4Format F>
__device__ __forceinline__ void dequant_chunk(const ChunkRegs<F>& r, uint32_t (&a)[4][4]) {
  const uint32_t words[4] = {r.codes.x, r.codes.y, r.codes.z, r.codes.w};
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    uint32_t lo, hi;
    if constexpr (F == Fp4Format::mxfp4) {  // 32-column blocks: steps 0, 1 -> 0; 2, 3 -> 1
      lo = multiplier_bf16x2<F>(r.scales, s >> 1);
      hi = multiplier_bf16x2<F>(r.scales, 2 + (s >> 1));
    } else {  // 16-column blocks: step s -> block s
      lo = multiplier_bf16x2<F>(r.scales.x, s);
      hi = multiplier_bf16x2<F>(r.scales.y, s);
    }
    dequant_step(words[s], lo, hi, a[s]);
  }
}

// ---- tile scheduler ----

__device__ __forceinline__ int moe_tiles_of(int rows, int tokens_per_tile) {
  return rows > 0 ? (rows + tokens_per_tile - 1) / tokens_per_tile : 0;
}

// The tile of block `unit`, by one whole warp, from the offsets in shared memory. Units run
// expert by expert, then row block, then m-tile, so the blocks that share an expert's weights run
// close together. Experts with no rows have no units. Each lane sums the m-tiles of E / 32
// experts; a warp scan finds the expert.
// One lane's share of a whole-warp scan of the experts' m-tiles: lane L sums the m-tiles of
// its run of E / 32 experts [e_begin, e_end); `inclusive` is the warp's inclusive prefix sum of
// those counts (lane 31: all m-tiles).
struct LaneMtiles {
  int e_begin, e_end, count, inclusive;
};
__device__ __forceinline__ LaneMtiles scan_lane_mtiles(const MoeKernelParams& p,
                                                       const int32_t* offsets) {
  const int lane = threadIdx.x & 31;
  const int per_lane = (p.experts + 31) / 32;
  LaneMtiles m;
  m.e_begin = min(p.experts, lane * per_lane);
  m.e_end = min(p.experts, m.e_begin + per_lane);
  m.count = 0;
  for (int e = m.e_begin; e < m.e_end; ++e) {
    m.count += moe_tiles_of(offsets[e + 1] - offsets[e], p.tokens_per_tile);
  }
  m.inclusive = m.count;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, m.inclusive, o);
    if (lane >= o) m.inclusive += v;
  }
  return m;
}

__device__ MoeTile moe_find_tile(const MoeKernelParams& p, const int32_t* offsets, int unit) {
  const int lane = threadIdx.x & 31;
  const LaneMtiles lm = scan_lane_mtiles(p, offsets);
  const int key = unit / p.row_blocks;  // which m-tile, counted over all experts
  const unsigned owners = __ballot_sync(0xffffffffu, key >= lm.inclusive - lm.count && key < lm.inclusive);
  MoeTile tile{-1, 0, 0, 0, __shfl_sync(0xffffffffu, lm.inclusive, 31) * p.row_blocks};
  if (owners == 0) return tile;
  const int owner = __ffs(owners) - 1;
  if (lane == owner) {
    int run = lm.inclusive - lm.count;
    for (int e = lm.e_begin; e < lm.e_end; ++e) {
      const int row_begin = offsets[e];
      const int rows = offsets[e + 1] - row_begin;
      const int tiles = moe_tiles_of(rows, p.tokens_per_tile);
      if (key < run + tiles) {
        const int local = unit - run * p.row_blocks;
        const int m_tile = local % tiles;
        tile.expert = e;
        tile.row_block = local / tiles;
        tile.row0 = row_begin + m_tile * p.tokens_per_tile;
        tile.rows = min(p.tokens_per_tile, rows - m_tile * p.tokens_per_tile);
        break;
      }
      run += tiles;
    }
  }
  tile.expert = __shfl_sync(0xffffffffu, tile.expert, owner);
  tile.row0 = __shfl_sync(0xffffffffu, tile.row0, owner);
  tile.rows = __shfl_sync(0xffffffffu, tile.rows, owner);
  tile.row_block = __shfl_sync(0xffffffffu, tile.row_block, owner);
  return tile;
}

// Shared-memory state of the tile scheduler.
struct MoeSchedule {
  int32_t offsets[kFp4MoeMaxExperts + 1];  // copy of p.offsets [E + 1]
  MoeTile tile[2];                         // the current unit's tile, by the unit's parity
};

// All threads copy the offsets with independent loads: one memory round trip (a lane walking
// its experts in global memory took several).
__device__ __forceinline__ void moe_load_offsets(const MoeKernelParams& p, int32_t* offsets) {
  constexpr int kPerThread = (kFp4MoeMaxExperts + 1 + kThreads - 1) / kThreads;
  int32_t v[kPerThread];
#pragma unroll
  for (int u = 0; u < kPerThread; ++u) {
    const int i = static_cast<int>(threadIdx.x) + u * kThreads;
    v[u] = i <= p.experts ? p.offsets[i] : 0;
  }
#pragma unroll
  for (int u = 0; u < kPerThread; ++u) {
    const int i = static_cast<int>(threadIdx.x) + u * kThreads;
    if (i <= p.experts) offsets[i] = v[u];
  }
  __syncthreads();
}

// The tile of `unit`, found by warp 0, for the whole block; `iteration` counts the block's units
// from 0. The grid is persistent (at most one block per multiprocessor): block b takes units b,
// b + gridDim.x, ... until one is past the last tile. Consecutive units of a block use the two
// tile slots in turn: a warp may still be about to read unit i's slot when warp 0 writes unit
// i + 1's (a unit's work need not pass a block barrier), but not unit i + 2's, whose barrier
// waits for every warp to come back from unit i.
__device__ __forceinline__ MoeTile moe_next_tile(const MoeKernelParams& p, MoeSchedule& s,
                                                 int unit, int iteration) {
  const int slot = iteration & 1;
  if (threadIdx.x < 32) {
    const MoeTile t = moe_find_tile(p, s.offsets, unit);
    if (threadIdx.x == 0) s.tile[slot] = t;
  }
  __syncthreads();
  return s.tile[slot];
}

// Copies x chunks (64 columns of the tile's rows) into a [kRows][128 B] tile in shared memory,
// 16-byte piece c of row r at piece c ^ (r % 8) (the 128-byte swizzle of ldmatrix and wgmma),
// by kThreadsHere threads; rows past the tile are zero-filled. Addresses are set up once per
// tile: thread t always copies piece t % 8 of rows t / 8 + i * (kThreadsHere / 8).
template <int kRows, int kThreadsHere>
struct XLoader {
  static constexpr int kPieces = kRows * (kXRowBytes / 16) / kThreadsHere;  // per thread
  static constexpr int kRowStep = kThreadsHere / 8;
  static_assert(kPieces >= 1 && kPieces <= 32 && kThreadsHere % 8 == 0, "whole rows per pass");

  const __nv_bfloat16* src;   // piece 0 of chunk 0 (its row may be past the tile)
  const __nv_bfloat16* safe;  // the tile's first row: the address of a zero-filled piece
  int64_t row_step;           // elements between piece i and piece i + 1
  int row, piece;             // row and 16-byte piece of this thread's piece 0
  uint32_t valid;             // bit i: piece i's row is in the tile

  __device__ __forceinline__ XLoader(const MoeKernelParams& p, const MoeTile& tile, int thread)
      : row(thread / 8), piece(thread % 8) {
    safe = p.x + static_cast<int64_t>(tile.row0) * p.k;
    src = safe + static_cast<int64_t>(row) * p.k + piece * 8;
    row_step = static_cast<int64_t>(kRowStep) * p.k;
    valid = 0;
#pragma unroll
    for (int i = 0; i < kPieces; ++i) valid |= (row + i * kRowStep < tile.rows ? 1u : 0u) << i;
  }

  __device__ __forceinline__ void load(int chunk, uint32_t tile_base) const {
    const int64_t col = static_cast<int64_t>(chunk) * kFp4MoeChunkCols;
#pragma unroll
    for (int i = 0; i < kPieces; ++i) {
      const bool ok = (valid >> i) & 1u;
      const int r = row + i * kRowStep;
      cp_async_16(tile_base + r * kXRowBytes + ((piece ^ (r & 7)) << 4),
                  ok ? src + col + i * row_step : safe, ok);
    }
  }
};

__device__ __forceinline__ void store_y(const MoeKernelParams& p, int row, int col, float v) {
  const int64_t i = static_cast<int64_t>(row) * p.n + col;
  if (p.out_f32) {
    static_cast<float*>(p.y)[i] = v;
  } else {
    static_cast<__nv_bfloat16*>(p.y)[i] = __float2bfloat16_rn(v);
  }
}

// ---- decode: mma.sync, one warp = 64 weight rows x one k slice ----

// A warp's accumulators for one row tile: [sub-tile][8-token group][4], mma.sync's C layout.
template <int kGroups>
using RowTileAcc = float[kTilesPerRowTile][kGroups][4];

template <int kGroups>
__device__ __forceinline__ void zero_acc(RowTileAcc<kGroups>& acc) {
#pragma unroll
  for (int t = 0; t < kTilesPerRowTile; ++t) {
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[t][g][i] = 0.0f;
    }
  }
}

// Calls f(row, token, value) for each of this lane's accumulators: lane = 4 * g8 + c4 holds rows
// g8 and g8 + 8 of each 16-row sub-tile, tokens 2 c4 and 2 c4 + 1 of each 8-token group.
template <int kGroups, typename F>
__device__ __forceinline__ void for_each_acc(const RowTileAcc<kGroups>& acc, F&& f) {
  const int lane = threadIdx.x & 31, g8 = lane >> 2, c4 = lane & 3;
#pragma unroll
  for (int t = 0; t < kTilesPerRowTile; ++t) {
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        f(t * kFp4MoeTileRows + g8 + 8 * (i >> 1), g * 8 + 2 * c4 + (i & 1), acc[t][g][i]);
      }
    }
  }
}

// Decode ring: per warp, kStages slots of [row-tile chunk of weights][x chunk, swizzled], kStages
// - 1 of them in flight. Both arrive by cp.async, so the depth costs shared memory, not
// registers. 8-token tiles: 3 stages, two blocks may share a multiprocessor (128 registers).
// 16-token tiles need more registers than that allows without spilling: 6 stages, one block
// per multiprocessor. Both measured best among 3 / 4 / 6 stages on the H100 (docs/perf.md).
template <int kGroups>
__host__ __device__ constexpr int decode_stages() {
  return kGroups == 1 ? 3 : 6;
}
// The warp schedule's ring (each warp streams a whole row tile): 3 stages for 8-token tiles as
// above (4 and 6 measured slower); 4 for 16-token tiles, 3 to 4% faster than 6 (docs/perf.md).
template <int kGroups>
__host__ __device__ constexpr int decode_warp_stages() {
  return kGroups == 1 ? 3 : 4;
}
// Programmatic dependent launch (see the launcher) for 8-token tiles only: 0.2 to 0.5 us per
// launch faster there; with it the 16-token kernel ran 2% slower (docs/perf.md).
template <int kGroups>
__host__ __device__ constexpr bool decode_programmatic() {
  return kGroups == 1;
}
// First thing in a decode kernel. 8-token tiles are launched as programmatic dependents (see
// the launcher): everything the previous kernel wrote is visible after the wait, and nothing
// global is touched before it; the next launch may start at once.
template <int kGroups>
__device__ __forceinline__ void decode_programmatic_start() {
  if constexpr (decode_programmatic<kGroups>()) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  }
}
template <Fp4Format F, int kGroups>
__host__ __device__ constexpr int decode_slot_bytes() {
  return kFp4MoeSubTiles * fp4_moe_chunk_bytes(F) + 8 * kGroups * kXRowBytes;
}

__device__ __forceinline__ void cp_async_16_stream(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ uint4 lds_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr));
  return v;
}
__device__ __forceinline__ uint32_t lds_u32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint2 lds_v2(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
}

// One row-tile chunk of weights (contiguous in the layout) -> shared memory, by one warp.
template <Fp4Format F>
__device__ __forceinline__ void load_w_chunk(const uint8_t* src, uint32_t dst, int lane) {
  constexpr int kPieces = kFp4MoeSubTiles * fp4_moe_chunk_bytes(F) / 16;  // 136 | 144
#pragma unroll
  for (int i = 0; i < (kPieces + 31) / 32; ++i) {
    const int piece = lane + 32 * i;
    if (piece < kPieces) cp_async_16_stream(dst + piece * 16, src + piece * 16);
  }
}

// Sub-tile t's share of lane `lane` from a weight chunk in shared memory.
template <Fp4Format F>
__device__ __forceinline__ void lds_chunk(uint32_t chunk, int lane, ChunkRegs<F>& r) {
  r.codes = lds_v4(chunk + lane * 16);
  if constexpr (F == Fp4Format::mxfp4) {
    r.scales = lds_u32(chunk + kFp4MoeChunkCodeBytes + (lane >> 2) * 4);
  } else {
    r.scales = lds_v2(chunk + kFp4MoeChunkCodeBytes + (lane >> 2) * 8);
  }
}

// mxfp4, one chunk of a warp's row tile. The block scales are powers of two, so they are applied
// to the FP32 partial sum of each 32-column block instead of to every weight: the MMA takes the
// placed E2M1 bits as they are (values times 2^-126; the code 0.5 a bf16 subnormal) and x times
// 2^64 (exact), and each block's partial is scaled by 2^(f - 191) = 2^(e - 1 - B - 64), which
// undoes both offsets. Saves the bf16x2 multiply of every weight pair; used for 8-token tiles
// (decode_warp says why not for 16).
constexpr uint32_t kXBias = 0x5f805f80u;  // bf16x2 (2^64, 2^64)

__device__ __forceinline__ float mx_block_multiplier(uint32_t scales, int i) {
  const uint32_t f = __byte_perm(scales, 0u, 0x4440u | static_cast<uint32_t>(i));
  return __uint_as_float((f - 64u) << 23);  // f >= 121 for blocks with nonzero codes, else 127
}

template <int kGroups>
__device__ __forceinline__ void decode_chunk_mx(uint32_t slot, int lane,
                                                uint32_t (&b)[kGroups][2][4],
                                                RowTileAcc<kGroups>& acc) {
  constexpr int kChunkBytes = fp4_moe_chunk_bytes(Fp4Format::mxfp4);
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int i = 0; i < 4; ++i) b[g][h][i] = bf16x2_mul(b[g][h][i], kXBias);
    }
  }
#pragma unroll
  for (int t = 0; t < kTilesPerRowTile; ++t) {
    ChunkRegs<Fp4Format::mxfp4> w;
    lds_chunk<Fp4Format::mxfp4>(slot + t * kChunkBytes, lane, w);
    const uint32_t words[4] = {w.codes.x, w.codes.y, w.codes.z, w.codes.w};
#pragma unroll
    for (int blk = 0; blk < 2; ++blk) {  // steps 2 blk, 2 blk + 1
      float part[kGroups][4];
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
#pragma unroll
        for (int i = 0; i < 4; ++i) part[g][i] = 0.0f;
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t q = words[2 * blk + h];
        const uint32_t a[4] = {e2m1x2_raw<0>(q), e2m1x2_raw<1>(q), e2m1x2_raw<2>(q),
                               e2m1x2_raw<3>(q)};
#pragma unroll
        for (int g = 0; g < kGroups; ++g) {
          mma_bf16_m16n8k16(part[g], a, b[g][blk][2 * h], b[g][blk][2 * h + 1]);
        }
      }
      const float lo = mx_block_multiplier(w.scales, blk);      // row g
      const float hi = mx_block_multiplier(w.scales, 2 + blk);  // row g + 8
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        acc[t][g][0] = fmaf(part[g][0], lo, acc[t][g][0]);
        acc[t][g][1] = fmaf(part[g][1], lo, acc[t][g][1]);
        acc[t][g][2] = fmaf(part[g][2], hi, acc[t][g][2]);
        acc[t][g][3] = fmaf(part[g][3], hi, acc[t][g][3]);
      }
    }
  }
}

template <Fp4Format F, int kGroups, int kS = decode_stages<kGroups>()>
__device__ __forceinline__ void decode_warp(const MoeKernelParams& p, const MoeTile& tile,
                                            int row_tile, int c_begin, int c_end, uint32_t ring,
                                            RowTileAcc<kGroups>& acc) {
  constexpr int kSlotBytes = decode_slot_bytes<F, kGroups>();
  constexpr int kChunkBytes = fp4_moe_chunk_bytes(F);
  constexpr int kRowChunkBytes = kFp4MoeSubTiles * kChunkBytes;  // one chunk of a row tile
  const int lane = threadIdx.x & 31;
  const uint8_t* w0 = p.weights + tile.expert * p.expert_bytes +
                      static_cast<int64_t>(row_tile) * p.k_chunks * kRowChunkBytes;
  const XLoader<8 * kGroups, 32> x_loader(p, tile, lane);
  auto fetch = [&](int chunk, int slot) {
    const uint32_t dst = ring + slot * kSlotBytes;
    load_w_chunk<F>(w0 + static_cast<int64_t>(chunk) * kRowChunkBytes, dst, lane);
    x_loader.load(chunk, dst + kRowChunkBytes);
  };

#pragma unroll
  for (int d = 0; d < kS - 1; ++d) {
    if (c_begin + d < c_end) fetch(c_begin + d, d);
    cp_async_commit();
  }
  for (int j0 = c_begin; j0 < c_end; j0 += kS) {
#pragma unroll
    for (int d = 0; d < kS; ++d) {
      const int j = j0 + d;         // chunk of this step, in ring slot d
      const int next = j + kS - 1;  // chunk to fetch now, into slot (d + kS - 1) % kS
      if (next < c_end) fetch(next, (d + kS - 1) % kS);
      cp_async_commit();
      if (j < c_end) {
        cp_async_wait<kS - 1>();
        __syncwarp();
        const uint32_t slot = ring + d * kSlotBytes;
        const uint32_t xs = slot + kRowChunkBytes;
        // B fragments of the 4 k16 steps: ldmatrix x4 covers 8 tokens x 32 columns.
        uint32_t b[kGroups][2][4];
#pragma unroll
        for (int g = 0; g < kGroups; ++g) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = g * 8 + (lane & 7);
            const int c = h * 4 + (lane >> 3);
            ldmatrix_x4(xs + r * kXRowBytes + ((c ^ (r & 7)) << 4), b[g][h]);
          }
        }
        // MXFP4 with 8-token tiles scales the partial sums (decode_chunk_mx); 16-token tiles
        // scale the weights as NVFP4 does: two token groups double the partials' zeroing and
        // fmas but not the weight multiplies, and this measured 1 to 2% faster (docs/perf.md).
        if constexpr (F == Fp4Format::mxfp4 && kGroups == 1) {
          decode_chunk_mx<kGroups>(slot, lane, b, acc);
        } else {
#pragma unroll
          for (int t = 0; t < kTilesPerRowTile; ++t) {
            ChunkRegs<F> w;
            lds_chunk<F>(slot + t * kChunkBytes, lane, w);
            uint32_t a[4][4];
            dequant_chunk<F>(w, a);
#pragma unroll
            for (int s = 0; s < 4; ++s) {
#pragma unroll
              for (int g = 0; g < kGroups; ++g) {
                mma_bf16_m16n8k16(acc[t][g], a[s], b[g][s >> 1][(s & 1) * 2],
                                  b[g][s >> 1][(s & 1) * 2 + 1]);
              }
            }
          }
        }
      }
      __syncwarp();  // every lane is done with slot d before it is refilled
    }
  }
  cp_async_wait<0>();
}

// Barrier `id` (1..15; 0 is __syncthreads) of `threads` threads of the block.
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// One unit: an m-tile of kTokens rows times row_tiles_per_block (R) row tiles. Warp w takes row
// tile w % R and k slice w / R of warps / R (rounded down; warps past the last whole slice
// idle). The warps of one row tile (its group: w % R equal) sum their slices in shared memory in
// a fixed order (deterministic), meeting at a named barrier of their own, so a group stores its
// row tile as soon as its own slices are done, whatever the other groups do.
template <Fp4Format F, int kGroups>
__device__ __forceinline__ void decode_unit(const MoeKernelParams& p, const MoeTile& tile,
                                            uint8_t* smem) {
  constexpr int kTokens = 8 * kGroups;
  constexpr int kRingBytes = decode_stages<kGroups>() * decode_slot_bytes<F, kGroups>();
  // With R >= 2 a group has at most 4 slices, whose partials fit in one warp's ring; with R = 1
  // the group is the whole block and may use every ring.
  static_assert(4 * kTokens * kRowTileRows * sizeof(float) <= kRingBytes,
                "a group's partials fit in the ring of its first warp");
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int r_per_block = p.row_tiles_per_block;
  const int slices = kWarps / r_per_block;
  const int group = warp % r_per_block;
  const int row_tile = tile.row_block * r_per_block + group;
  const int slice = warp / r_per_block;
  if (slice >= slices) return;  // past the last whole slice: idle
  const int c_begin = slice * p.k_chunks / slices;
  const int c_end = (slice + 1) * p.k_chunks / slices;

  RowTileAcc<kGroups> acc;
  zero_acc<kGroups>(acc);
  if (row_tile < p.row_tiles && c_begin < c_end) {
    decode_warp<F, kGroups>(p, tile, row_tile, c_begin, c_end,
                            smem_u32(smem) + warp * kRingBytes, acc);
  }
  const int group_threads = slices * 32;
  named_barrier(1 + group, group_threads);  // the group's rings are free: they take the partials

  // [slices][kTokens][64 rows] in the ring of the group's first warp (warp `group`)
  float* partial = reinterpret_cast<float*>(smem + group * kRingBytes);
  for_each_acc<kGroups>(acc, [&](int row, int token, float v) {
    partial[(slice * kTokens + token) * kRowTileRows + row] = v;
  });
  named_barrier(1 + group, group_threads);

  if (row_tile >= p.row_tiles) return;
  const float factor = p.expert_factors[tile.expert];
  for (int idx = slice * 32 + lane; idx < kTokens * kRowTileRows; idx += group_threads) {
    const int token = idx / kRowTileRows, row = idx % kRowTileRows;
    if (token >= tile.rows) continue;
    float sum = 0.0f;
    for (int s = 0; s < slices; ++s) sum += partial[(s * kTokens + token) * kRowTileRows + row];
    store_y(p, tile.row0 + token, row_tile * kRowTileRows + row, sum * factor);
  }
}

template <Fp4Format F, int kGroups>
__global__ void __launch_bounds__(kThreads, kGroups == 1 ? 2 : 1)
    sm90_fp4_moe_decode_kernel(const MoeKernelParams p) {
  // ring [warps][decode_stages][decode_slot_bytes], reused for the partials of decode_unit
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ MoeSchedule schedule;
  decode_programmatic_start<kGroups>();
  moe_load_offsets(p, schedule.offsets);
  for (int unit = blockIdx.x, iteration = 0;; unit += gridDim.x, ++iteration) {
    const MoeTile tile = moe_next_tile(p, schedule, unit, iteration);
    if (tile.expert < 0) return;
    decode_unit<F, kGroups>(p, tile, smem);
    // Leave without another scan and barrier when no unit is left for this block: 0.3 to 0.9
    // us per launch on the H100 (docs/perf.md).
    if (unit + static_cast<int>(gridDim.x) >= tile.units) return;
  }
}

// ---- decode, warp schedule: each warp owns whole row tiles (Sm90Fp4MoeSchedule::warp) ----
//
// Where the block schedule would give every warp a whole row tile anyway (one k slice), its
// per-unit scan, barriers and shared-memory epilogue buy nothing. Here the warps run on their
// own after the start: a "column" is one (m-tile, row tile); warp w of block b takes columns
// b * 8 + w, then that plus 8 * gridDim.x, ..., each over all of k, and stores its y from its
// accumulator fragments. Same products, same order within k as the block schedule with one
// slice.

// Shared memory of the warp schedule: the offsets, and where each expert's m-tiles start in the
// count over all experts.
struct WarpSchedule {
  int32_t offsets[kFp4MoeMaxExperts + 1];
  int32_t mtile_begin[kFp4MoeMaxExperts + 1];  // [e]: m-tiles of experts before e; [E]: all
};

// Warp 0 counts the m-tiles of every expert (each lane a run of E / 32 experts) and scans them.
__device__ __forceinline__ void warp_schedule_count_mtiles(const MoeKernelParams& p,
                                                           WarpSchedule& s) {
  const LaneMtiles lm = scan_lane_mtiles(p, s.offsets);
  int run = lm.inclusive - lm.count;
  for (int e = lm.e_begin; e < lm.e_end; ++e) {
    s.mtile_begin[e] = run;
    run += moe_tiles_of(s.offsets[e + 1] - s.offsets[e], p.tokens_per_tile);
  }
  if ((threadIdx.x & 31) == 31) s.mtile_begin[p.experts] = lm.inclusive;
}

// The rows of m-tile `mtile` (counted over all experts): the expert e with mtile_begin[e] <=
// mtile < mtile_begin[e + 1] (experts without rows have an empty range), by binary search. Every
// lane searches the same entries (shared-memory broadcasts).
__device__ __forceinline__ MoeTile warp_schedule_find_mtile(const MoeKernelParams& p,
                                                            const WarpSchedule& s, int mtile) {
  int lo = 0, hi = p.experts;  // mtile_begin[lo] <= mtile < mtile_begin[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (s.mtile_begin[mid] <= mtile) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const int m = mtile - s.mtile_begin[lo];
  const int rows = s.offsets[lo + 1] - s.offsets[lo];
  return MoeTile{lo, s.offsets[lo] + m * p.tokens_per_tile,
                 min(p.tokens_per_tile, rows - m * p.tokens_per_tile), 0, 0};
}

// y for the rows of `tile` and row tile `row_tile`, straight from the accumulators.
template <int kGroups>
__device__ __forceinline__ void store_y_fragments(const MoeKernelParams& p, const MoeTile& tile,
                                                  int row_tile, const RowTileAcc<kGroups>& acc) {
  const float factor = p.expert_factors[tile.expert];
  for_each_acc<kGroups>(acc, [&](int row, int token, float v) {
    if (token < tile.rows) store_y(p, tile.row0 + token, row_tile * kRowTileRows + row, v * factor);
  });
}

template <Fp4Format F, int kGroups>
__global__ void __launch_bounds__(kThreads, kGroups == 1 ? 2 : 1)
    sm90_fp4_moe_decode_warp_kernel(const MoeKernelParams p) {
  constexpr int kS = decode_warp_stages<kGroups>();
  extern __shared__ __align__(128) uint8_t smem[];  // per warp: its ring
  __shared__ WarpSchedule schedule;
  decode_programmatic_start<kGroups>();
  moe_load_offsets(p, schedule.offsets);
  if (threadIdx.x < 32) warp_schedule_count_mtiles(p, schedule);
  __syncthreads();

  const int warp = threadIdx.x / 32;
  const uint32_t ring = smem_u32(smem) + warp * kS * decode_slot_bytes<F, kGroups>();
  const int columns = schedule.mtile_begin[p.experts] * p.row_tiles;
  // Consecutive warps of a block take consecutive row tiles of one m-tile: they share x.
  for (int column = blockIdx.x * kWarps + warp; column < columns;
       column += gridDim.x * kWarps) {
    const MoeTile tile = warp_schedule_find_mtile(p, schedule, column / p.row_tiles);
    const int row_tile = column % p.row_tiles;
    RowTileAcc<kGroups> acc;
    zero_acc<kGroups>(acc);
    decode_warp<F, kGroups, kS>(p, tile, row_tile, 0, p.k_chunks, ring, acc);
    store_y_fragments<kGroups>(p, tile, row_tile, acc);
  }
}

// ---- prefill: wgmma, warpgroup w = 64 weight rows x 128 or 256 tokens, A from registers ----

// One stage of the prefill ring: an x chunk [tokens][128 B] (1024-aligned, swizzled), then the
// next chunk's weights of both warpgroups' row tiles.
template <Fp4Format F, int kHalves>
struct PrefillShape {
  static constexpr int kTokens = kHalves * kPrefillHalfTokens;
  static constexpr int kXBytes = kTokens * kXRowBytes;
  static constexpr int kWgWBytes = kFp4MoeSubTiles * fp4_moe_chunk_bytes(F);  // a row-tile chunk
  static constexpr int kStageBytes =
      (kXBytes + 2 * kWgWBytes + kSwizzleAlign - 1) / kSwizzleAlign * kSwizzleAlign;
  static constexpr int kStages = kHalves == 1 ? 6 : 5;  // as many as fit beside the epilogue
  // After the ring: each consumer warpgroup's bf16 y tile of one epilogue pass,
  // [kPassTokens][64 weight rows], 16-byte pieces swizzled by token % 8.
  static constexpr int kPassTokens = kPrefillHalfTokens;
  static constexpr int kEpilogueWgBytes = kPassTokens * kRowTileRows * 2;
  static constexpr int kSmemBytes = kStages * kStageBytes + 2 * kEpilogueWgBytes + kSwizzleAlign;
};

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_fence_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t phase) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(bar), "r"(phase)
        : "memory");
  } while (done == 0);
}
// `bytes` (a multiple of 16; both addresses 16-aligned) global -> shared by the copy engine,
// counted on mbarrier `bar`.
__device__ __forceinline__ void bulk_copy_g2s(uint32_t dst, const void* src, uint32_t bytes,
                                              uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}
// A box of the 2D tensor map (column c0, row c1) -> shared memory, in the map's swizzle.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1,
                                            uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, "
      "{%2, %3}], [%4];" ::"r"(dst),
      "l"(map), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}

// The same box delivered by one copy to the same shared-memory offset in every block of the
// cluster named in `cta_mask`, each block's mbarrier at offset `bar` counting its bytes.
__device__ __forceinline__ void tma_load_2d_multicast(uint32_t dst, const CUtensorMap* map, int c0,
                                                      int c1, uint32_t bar, uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::"
      "cluster [%0], [%1, {%2, %3}], [%4], %5;" ::"r"(dst),
      "l"(map), "r"(c0), "r"(c1), "r"(bar), "h"(cta_mask)
      : "memory");
}
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
__device__ __forceinline__ uint32_t cluster_index() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%clusterid.x;" : "=r"(r));
  return r;
}
__device__ __forceinline__ uint32_t cluster_count() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%nclusterid.x;" : "=r"(r));
  return r;
}
// Every thread of every block of the cluster; what each wrote before is visible to all after.
__device__ __forceinline__ void cluster_sync() {
  asm volatile(
      "barrier.cluster.arrive.release.aligned;\n"
      "barrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// One arrival on the mbarrier at offset `bar` in block `rank` of the cluster (this one or
// another).
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t bar, uint32_t rank) {
  asm volatile(
      "{\n .reg .b32 remote;\n mapa.shared::cluster.u32 remote, %0, %1;\n"
      " mbarrier.arrive.shared::cluster.b64 _, [remote];\n}" ::"r"(bar),
      "r"(rank)
      : "memory");
}

// One arrival on this block's mbarrier at `bar`.
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

// The prefill pipeline is warp-specialized: warps 0-7 (two warpgroups) consume, the first thread
// of warp 8 produces (warps 8-11 form the producer warpgroup).
// Stage s of the ring holds an x chunk and the next chunk's weights; `full` + 8 s completes when
// their bytes have landed, `empty` + 8 s when every consumer warp is done with them (one arrival
// per warp: kPrefillConsumerWarps, or twice that with multicast, where the stage also receives
// the peer block's half of x and so must be free in both blocks before either refills it).
// Every warp finds its own units (moe_find_tile), so no block barrier follows the start: the
// producer runs up to kStages chunks ahead, across unit boundaries, while the consumers finish
// a unit's wgmmas and store its y.
constexpr int kPrefillConsumerWarps = kWarps;
// The producer is a whole warpgroup (warp 8 issues, 9 to 11 idle): registers are handed out per
// warpgroup, and setmaxnreg moves them from the producer's to the consumers' (which hold a
// 64 x 256 FP32 accumulator fragment, 128 registers, plus two A buffers).
constexpr int kPrefillThreads = kThreads + 128;
constexpr int kPrefillProducerRegs = 40, kPrefillConsumerRegs = 232;  // 128 x 40 + 256 x 232 <= 64K

template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegs));
}

// The producer (lane 0 of warp 8) for one unit: x chunk c and weight chunk c + 1 into stage
// c % kStages, for c = 0 .. k_chunks - 1 (chunk 0's weights the consumers read from global
// memory). With multicast, x rows [rank * T / 2, (rank + 1) * T / 2) into both blocks.
// empty_parity: bit s is the parity of stage s's next "done" phase; filled: bit s, stage s has
// been filled before (its first fill waits for nothing).
template <Fp4Format F, int kHalves, bool kMulticast>
__device__ __forceinline__ void prefill_produce(const MoeKernelParams& p, const CUtensorMap* x_map,
                                                const MoeTile& tile, uint32_t ring, uint32_t full,
                                                uint32_t empty, uint32_t rank,
                                                uint32_t& empty_parity, uint32_t& filled) {
  using Shape = PrefillShape<F, kHalves>;
  const int kc = p.k_chunks;
  const uint8_t* w_expert = p.weights + tile.expert * p.expert_bytes;
  const int64_t w_row_tile_bytes = static_cast<int64_t>(kc) * Shape::kWgWBytes;
  // 0 for the second block of a pair past the last row tile: it only fetches its half of x.
  const int row_tiles = max(0, min(2, p.row_tiles - tile.row_block * 2));
  for (int c = 0; c < kc; ++c) {
    const int stage = c % Shape::kStages;
    if ((filled >> stage) & 1u) {
      mbar_wait(empty + 8 * stage, (empty_parity >> stage) & 1u);
      empty_parity ^= 1u << stage;
    }
    filled |= 1u << stage;
    const uint32_t base = ring + stage * Shape::kStageBytes, bar = full + 8 * stage;
    const bool weights = c + 1 < kc;
    mbar_arrive_expect_tx(bar, Shape::kXBytes + (weights ? row_tiles * Shape::kWgWBytes : 0));
    if constexpr (kMulticast) {
      constexpr int kHalfRows = Shape::kTokens / 2;
      tma_load_2d_multicast(base + rank * (Shape::kXBytes / 2), x_map, c * kFp4MoeChunkCols,
                            tile.row0 + static_cast<int>(rank) * kHalfRows, bar, 0x3);
    } else {
      tma_load_2d(base, x_map, c * kFp4MoeChunkCols, tile.row0, bar);
    }
    if (weights) {
      for (int w = 0; w < row_tiles; ++w) {
        bulk_copy_g2s(base + Shape::kXBytes + w * Shape::kWgWBytes,
                      w_expert + (tile.row_block * 2 + w) * w_row_tile_bytes +
                          static_cast<int64_t>(c + 1) * Shape::kWgWBytes,
                      Shape::kWgWBytes, bar);
      }
    }
  }
}

// Four 8x8 b16 matrices in mma.sync's fragment layout (lane l: row l / 4, columns 2 (l % 4) and
// 2 (l % 4) + 1), stored transposed: lane L gives the address of row L % 8 of matrix L / 8, and
// that row receives column L % 8 of the fragment.
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t addr, uint32_t m0, uint32_t m1,
                                                  uint32_t m2, uint32_t m3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(
                   addr),
               "r"(m0), "r"(m1), "r"(m2), "r"(m3)
               : "memory");
}
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // lo in the low half
  return *reinterpret_cast<const uint32_t*>(&v);
}

// A consumer warpgroup's y tile (64 weight rows x the unit's tokens) in bf16: through shared
// memory, so that global memory sees whole 128-byte rows of y instead of scattered 2-byte
// stores (which took about a fifth of the down shape's time at 512 tokens on the H100). Per pass
// of kPassTokens tokens: stmatrix writes the fragments transposed ([token][row], pieces swizzled
// by token % 8, conflict-free), the warpgroup meets at its named barrier, then each thread
// copies 16-byte pieces of whole token rows to y. acc holds acc_i = y^T[row g8 + 8 h][token
// 8 q + 2 (lane % 4) + e] at i = 4 q + 2 h + e (wgmma's accumulator layout).
template <int kHalves>
__device__ __forceinline__ void prefill_store_bf16(const MoeKernelParams& p, const MoeTile& tile,
                                                   int row_tile, const float (&acc)[kHalves * 64],
                                                   float factor, uint32_t buf) {
  constexpr int kPassTokens = kPrefillHalfTokens, kPassGroups = kPassTokens / 8;
  const int lane = threadIdx.x & 31, sub_tile = (threadIdx.x / 32) % 4;
  const int wg_thread = threadIdx.x % 128, barrier_id = 1 + static_cast<int>(threadIdx.x / 128);
  const int matrix = lane >> 3, matrix_row = lane & 7;
  __nv_bfloat16* y = static_cast<__nv_bfloat16*>(p.y);
#pragma unroll
  for (int pass = 0; pass < kHalves; ++pass) {
    if (pass * kPassTokens >= tile.rows) break;  // the same for the whole warpgroup
    named_barrier(barrier_id, 128);  // the buffer's previous copy-out is done
#pragma unroll
    for (int g = 0; g < kPassGroups; g += 2) {  // token groups g, g + 1 of the pass
      const int i = 4 * (pass * kPassGroups + g);
      const int token = 8 * (g + (matrix >> 1)) + matrix_row;
      const int piece = 2 * sub_tile + (matrix & 1);  // 8 weight rows: 16 bytes
      stmatrix_x4_trans(buf + token * 128 + ((piece ^ (token & 7)) << 4),
                        pack_bf16x2(acc[i] * factor, acc[i + 1] * factor),
                        pack_bf16x2(acc[i + 2] * factor, acc[i + 3] * factor),
                        pack_bf16x2(acc[i + 4] * factor, acc[i + 5] * factor),
                        pack_bf16x2(acc[i + 6] * factor, acc[i + 7] * factor));
    }
    named_barrier(barrier_id, 128);
#pragma unroll
    for (int m = 0; m < kPassTokens * 8 / 128; ++m) {
      const int idx = wg_thread + m * 128, token = idx >> 3, piece = idx & 7;
      const int t = pass * kPassTokens + token;
      if (t < tile.rows) {
        const uint4 v = lds_v4(buf + token * 128 + ((piece ^ (token & 7)) << 4));
        *reinterpret_cast<uint4*>(y + static_cast<int64_t>(tile.row0 + t) * p.n +
                                  row_tile * kRowTileRows + piece * 8) = v;
      }
    }
  }
}

// The consumers for one unit: an m-tile of 128 * kHalves rows times 128 weight rows (warpgroup
// w: row tile 2 * row_block + w). Per chunk j: wait for stage j, issue its wgmmas, wait for chunk
// j - 1's (so stage j - 1 is done: release it), then dequantize chunk j + 1's weights from stage j
// into the other A buffer while chunk j's wgmmas run. full_parity: bit s is the parity of stage
// s's next "full" phase.
template <Fp4Format F, int kHalves, bool kMulticast>
__device__ __forceinline__ void prefill_consume(const MoeKernelParams& p, const MoeTile& tile,
                                                uint32_t ring, uint32_t full, uint32_t empty,
                                                uint32_t& full_parity) {
  using Shape = PrefillShape<F, kHalves>;
  constexpr int kS = Shape::kStages;
  constexpr int kChunkBytes = fp4_moe_chunk_bytes(F);
  // Unrolled so that stage (j % kS) and A buffer (j % 2) are compile-time indices.
  constexpr int kUnroll = kS % 2 == 0 ? kS : 2 * kS;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int wg = warp / 4, sub_tile = warp % 4;
  const int row_tile = tile.row_block * 2 + wg;
  const bool active = row_tile < p.row_tiles;
  const int kc = p.k_chunks;
  const uint32_t w_off = Shape::kXBytes + wg * Shape::kWgWBytes;  // this warpgroup's weights
  auto release = [&](int stage) {  // this warp is done with `stage`
    if (lane == 0) {
      if constexpr (kMulticast) {
        for (uint32_t r = 0; r < 2; ++r) mbar_arrive_cluster(empty + 8 * stage, r);
      } else {
        mbar_arrive(empty + 8 * stage);
      }
    }
  };

  float acc[kHalves * 64];  // wgmma accumulator fragment: 8-token groups in order
#pragma unroll
  for (int i = 0; i < kHalves * 64; ++i) acc[i] = 0.0f;
  uint32_t a[2][4][4];
  if (active) {  // chunk 0's weights straight from global memory
    const uint8_t* wsrc = p.weights + tile.expert * p.expert_bytes +
                          row_tile * static_cast<int64_t>(kc) * Shape::kWgWBytes;
    ChunkRegs<F> w;
    load_chunk<F>(wsrc + sub_tile * kChunkBytes, lane, w);
    dequant_chunk<F>(w, a[0]);
  }
  wgmma_fence_operands(acc);
  for (int j0 = 0; j0 < kc; j0 += kUnroll) {
#pragma unroll
    for (int d = 0; d < kUnroll; ++d) {
      const int j = j0 + d;  // stage d % kS, A registers a[d % 2]
      if (j < kc) {
        mbar_wait(full + 8 * (d % kS), (full_parity >> (d % kS)) & 1u);
        full_parity ^= 1u << (d % kS);
        const uint32_t stage = ring + (d % kS) * Shape::kStageBytes;
        if (active) {
          wgmma_fence();
          const uint64_t desc = wgmma_desc_sw128(stage);
#pragma unroll
          for (int s = 0; s < 4; ++s) {  // +32 bytes per k16 step
            if constexpr (kHalves == 1) {
              wgmma_m64n128k16_rs(acc, a[d % 2][s], desc + 2 * s);
            } else {
              wgmma_m64n256k16_rs(acc, a[d % 2][s], desc + 2 * s);
            }
          }
          wgmma_commit();
          wgmma_wait<1>();  // chunk j - 1 done: a[(d + 1) % 2] is free
        }
        // Stage j - 1: its x was read by chunk j - 1's wgmmas, its weights (chunk j) went into
        // the A registers chunk j's wgmmas took.
        if (j >= 1) release((d + kS - 1) % kS);
        if (active && j + 1 < kc) {
          ChunkRegs<F> w;
          lds_chunk<F>(stage + w_off + sub_tile * kChunkBytes, lane, w);
          dequant_chunk<F>(w, a[(d + 1) % 2]);
        }
      }
    }
  }
  wgmma_wait<0>();
  wgmma_fence_operands(acc);
  __syncwarp();
  release((kc - 1) % kS);
  if (!active) return;

  const float factor = p.expert_factors[tile.expert];
  if (!p.out_f32) {
    prefill_store_bf16<kHalves>(p, tile, row_tile, acc, factor,
                                ring + Shape::kStages * Shape::kStageBytes +
                                    wg * Shape::kEpilogueWgBytes);
    return;
  }
  const int g8 = lane >> 2, c4 = lane & 3;
  const int row_base = row_tile * kRowTileRows + sub_tile * kFp4MoeTileRows + g8;
#pragma unroll
  for (int i = 0; i < kHalves * 64; ++i) {
    const int token = (i >> 2) * 8 + 2 * c4 + (i & 1);
    if (token < tile.rows) {
      store_y(p, tile.row0 + token, row_base + 8 * ((i >> 1) & 1), acc[i] * factor);
    }
  }
}

// kMulticast: the grid is clusters of two blocks; the pair takes (m-tile, pair of row blocks)
// units in turn, block `rank` the row block 2 * pair + rank, and both blocks walk the same units,
// so that their chunks stay in step. Without it, blocks take (m-tile, row block) units in turn.
template <Fp4Format F, int kHalves, bool kMulticast>
__global__ void __launch_bounds__(kPrefillThreads, 1)
    sm90_fp4_moe_prefill_kernel(const MoeKernelParams p, const __grid_constant__ CUtensorMap x_map) {
  using Shape = PrefillShape<F, kHalves>;
  extern __shared__ uint8_t smem_raw[];  // Shape::kStages stages, 1024-aligned
  __shared__ int32_t offsets[kFp4MoeMaxExperts + 1];
  __shared__ __align__(8) uint64_t full_bars[Shape::kStages];
  __shared__ __align__(8) uint64_t empty_bars[Shape::kStages];
  const uint32_t ring = (smem_u32(smem_raw) + kSwizzleAlign - 1) & ~uint32_t{kSwizzleAlign - 1};
  const uint32_t full = smem_u32(&full_bars[0]), empty = smem_u32(&empty_bars[0]);
  if (threadIdx.x == 0) {
    for (int s = 0; s < Shape::kStages; ++s) {
      mbar_init(full + 8 * s, 1);
      mbar_init(empty + 8 * s, kMulticast ? 2 * kPrefillConsumerWarps : kPrefillConsumerWarps);
    }
    mbar_fence_init();
  }
  MoeKernelParams units = p;
  int unit = static_cast<int>(blockIdx.x), unit_step = static_cast<int>(gridDim.x);
  uint32_t rank = 0;
  if constexpr (kMulticast) {
    rank = cluster_rank();
    units.row_blocks = (p.row_blocks + 1) / 2;
    unit = static_cast<int>(cluster_index());
    unit_step = static_cast<int>(cluster_count());
  }
  moe_load_offsets(p, offsets);  // its barrier also publishes the mbarrier initialization
  if constexpr (kMulticast) cluster_sync();  // ... to the peer, before its copies and arrivals
  // The tile of `unit` for this block (with multicast: its row block of the pair's two), by a
  // whole warp; expert < 0 past the last unit.
  const auto tile_of = [&](int u) {
    MoeTile tile = moe_find_tile(units, offsets, u);
    if constexpr (kMulticast) tile.row_block = 2 * tile.row_block + static_cast<int>(rank);
    return tile;
  };
  // Two separate loops over the same units, so that each role's code runs under its own
  // register budget.
  const int warp = threadIdx.x / 32;
  if (warp >= kPrefillConsumerWarps) {
    setmaxnreg_dec<kPrefillProducerRegs>();
    if (warp == kPrefillConsumerWarps) {
      uint32_t empty_parity = 0, filled = 0;
      for (MoeTile tile = tile_of(unit); tile.expert >= 0; tile = tile_of(unit += unit_step)) {
        if ((threadIdx.x & 31) == 0) {
          prefill_produce<F, kHalves, kMulticast>(p, &x_map, tile, ring, full, empty, rank,
                                                  empty_parity, filled);
        }
        __syncwarp();
      }
    }
  } else {
    setmaxnreg_inc<kPrefillConsumerRegs>();
    uint32_t full_parity = 0;
    for (MoeTile tile = tile_of(unit); tile.expert >= 0; tile = tile_of(unit += unit_step)) {
      prefill_consume<F, kHalves, kMulticast>(p, tile, ring, full, empty, full_parity);
    }
  }
  // The peer may still copy into or arrive on this block's shared memory: stay until both are
  // done.
  if constexpr (kMulticast) cluster_sync();
}

// ---- launch ----

template <Fp4Format F, int kGroups>
constexpr int decode_smem_bytes() {
  constexpr int ring = kWarps * decode_stages<kGroups>() * decode_slot_bytes<F, kGroups>();
  constexpr int partials = kWarps * 8 * kGroups * kRowTileRows * static_cast<int>(sizeof(float));
  return ring > partials ? ring : partials;
}

// The warp schedule's rings (it sums no slices, so no partials).
template <Fp4Format F, int kGroups>
constexpr int decode_warp_smem_bytes() {
  return kWarps * decode_warp_stages<kGroups>() * decode_slot_bytes<F, kGroups>();
}

using DecodeKernelFn = void (*)(MoeKernelParams);
using PrefillKernelFn = void (*)(MoeKernelParams, CUtensorMap);

DecodeKernelFn decode_kernel_for(Fp4Format format, int tokens, Sm90Fp4MoeSchedule schedule) {
  const bool mx = format == Fp4Format::mxfp4;
  if (schedule == Sm90Fp4MoeSchedule::warp) {
    if (tokens == 8) {
      return mx ? sm90_fp4_moe_decode_warp_kernel<Fp4Format::mxfp4, 1>
                : sm90_fp4_moe_decode_warp_kernel<Fp4Format::nvfp4, 1>;
    }
    return mx ? sm90_fp4_moe_decode_warp_kernel<Fp4Format::mxfp4, 2>
              : sm90_fp4_moe_decode_warp_kernel<Fp4Format::nvfp4, 2>;
  }
  if (tokens == 8) {
    return mx ? sm90_fp4_moe_decode_kernel<Fp4Format::mxfp4, 1>
              : sm90_fp4_moe_decode_kernel<Fp4Format::nvfp4, 1>;
  }
  return mx ? sm90_fp4_moe_decode_kernel<Fp4Format::mxfp4, 2>
            : sm90_fp4_moe_decode_kernel<Fp4Format::nvfp4, 2>;
}

template <Fp4Format F>
PrefillKernelFn prefill_kernel_for(int tokens, bool multicast) {
  if (tokens == kPrefillHalfTokens) {
    return multicast ? sm90_fp4_moe_prefill_kernel<F, 1, true>
                     : sm90_fp4_moe_prefill_kernel<F, 1, false>;
  }
  return multicast ? sm90_fp4_moe_prefill_kernel<F, 2, true>
                   : sm90_fp4_moe_prefill_kernel<F, 2, false>;
}
PrefillKernelFn prefill_kernel_for(Fp4Format format, int tokens, bool multicast) {
  return format == Fp4Format::mxfp4 ? prefill_kernel_for<Fp4Format::mxfp4>(tokens, multicast)
                                    : prefill_kernel_for<Fp4Format::nvfp4>(tokens, multicast);
}

// x [total_rows, k] bf16 as a 2D tensor map: boxes of 64 columns x `tokens` rows, written in
// the 128-byte swizzle, rows past the end read as zeros. The encoder comes from the driver
// (no link against libcuda), looked up once.
CUtensorMap make_x_map(const Sm90Fp4MoeParams& p, int tokens) {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                cudaEnableDefault, &found));
    CUDA_REQUIRE(found == cudaDriverEntryPointSuccess && fn != nullptr,
                 "the driver provides cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(p.k), static_cast<cuuint64_t>(p.total_rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(p.k) * 2};  // bytes between rows
  const cuuint32_t box[2] = {kFp4MoeChunkCols, static_cast<cuuint32_t>(tokens)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2,
                            const_cast<__nv_bfloat16*>(p.x), dims, strides, box, element_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  CUDA_REQUIRE(r == CUDA_SUCCESS, "cuTensorMapEncodeTiled accepts x");
  return map;
}

int moe_smem_bytes(Fp4Format format, const Sm90Fp4MoeConfig& config) {
  const bool mx = format == Fp4Format::mxfp4;
  if (config.kernel == Sm90Fp4MoeKernel::prefill) {
    if (config.tokens_per_tile == kPrefillHalfTokens) {
      return mx ? PrefillShape<Fp4Format::mxfp4, 1>::kSmemBytes
                : PrefillShape<Fp4Format::nvfp4, 1>::kSmemBytes;
    }
    return mx ? PrefillShape<Fp4Format::mxfp4, 2>::kSmemBytes
              : PrefillShape<Fp4Format::nvfp4, 2>::kSmemBytes;
  }
  if (config.schedule == Sm90Fp4MoeSchedule::warp) {
    if (config.tokens_per_tile == 8) {
      return mx ? decode_warp_smem_bytes<Fp4Format::mxfp4, 1>()
                : decode_warp_smem_bytes<Fp4Format::nvfp4, 1>();
    }
    return mx ? decode_warp_smem_bytes<Fp4Format::mxfp4, 2>()
              : decode_warp_smem_bytes<Fp4Format::nvfp4, 2>();
  }
  if (config.tokens_per_tile == 8) {
    return mx ? decode_smem_bytes<Fp4Format::mxfp4, 1>() : decode_smem_bytes<Fp4Format::nvfp4, 1>();
  }
  return mx ? decode_smem_bytes<Fp4Format::mxfp4, 2>() : decode_smem_bytes<Fp4Format::nvfp4, 2>();
}

void check_config(const Sm90Fp4MoeConfig& c) {
  if (c.kernel == Sm90Fp4MoeKernel::prefill) {
    CUDA_REQUIRE((c.tokens_per_tile == 128 || c.tokens_per_tile == 256) &&
                     c.row_tiles_per_block == 2,
                 "prefill config is 128 or 256 tokens x 2 row tiles");
  } else {
    CUDA_REQUIRE(c.tokens_per_tile == 8 || c.tokens_per_tile == 16,
                 "decode config takes 8 or 16 tokens per tile");
    const int r = c.row_tiles_per_block;
    CUDA_REQUIRE(r >= 1 && r <= 8, "decode config takes 1 to 8 row tiles per block");
    CUDA_REQUIRE(!c.x_multicast, "x multicast is a prefill option");
  }
}

// Upper bound of the m-tiles: sum_e ceil(rows_e / T) <= total_rows / T + (experts with rows).
int64_t mtiles_bound(const Sm90Fp4MoeParams& p, int tokens_per_tile) {
  return p.total_rows / tokens_per_tile + std::min<int64_t>(p.experts, p.total_rows);
}

void check_params(const char* op, const Sm90Fp4MoeParams& p) {
  fp4_moe_check_shape(op, p.format, p.experts, p.n, p.k);
  fp4_moe_check_rows(op, p.total_rows);
  CUDA_REQUIRE(p.weights != nullptr && p.expert_factors != nullptr && p.offsets != nullptr,
               "weights, expert_factors and offsets are device pointers");
  CUDA_REQUIRE(p.total_rows == 0 || (p.x != nullptr && p.y != nullptr),
               "x and y are device pointers");
  CUDA_REQUIRE(reinterpret_cast<uintptr_t>(p.weights) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(p.x) % 16 == 0,
               "weights and x are 16-byte aligned (the copy units)");
}

}  // namespace

Sm90Fp4MoeConfig sm90_fp4_moe_choose_config(const Sm90Fp4MoeParams& p, int sm_count) {
  const int64_t active = std::max<int64_t>(
      1, std::min<int64_t>(p.active_experts_hint > 0 ? p.active_experts_hint : p.experts,
                           p.total_rows));
  const int64_t rows_per_expert = (p.total_rows + active - 1) / active;
  Sm90Fp4MoeConfig c;
  if (rows_per_expert > 16) {
    c.kernel = Sm90Fp4MoeKernel::prefill;
    c.tokens_per_tile = rows_per_expert > kPrefillHalfTokens ? 2 * kPrefillHalfTokens
                                                             : kPrefillHalfTokens;
    c.row_tiles_per_block = 2;
    return c;
  }
  c.kernel = Sm90Fp4MoeKernel::decode;
  c.tokens_per_tile = rows_per_expert <= 8 ? 8 : 16;
  // Fewer, longer weight streams beat many short ones (measured on the H100, docs/perf.md): the
  // fewest row tiles per block (the most k slices per row tile) that still give at most one
  // block per multiprocessor. Larger problems take 8 row tiles per block and loop.
  // 8-token tiles take any R up to 8, 16-token tiles powers of two (R = 7 measured 1% faster for
  // MXFP4 but 5% slower for NVFP4 there, docs/perf.md).
  const int64_t row_tiles = p.n / kRowTileRows, k_chunks = p.k / kFp4MoeChunkCols;
  const auto grow = [&](int r) { return c.tokens_per_tile == 8 ? r + 1 : 2 * r; };
  int r = 1;
  while (r < kWarps && active * ((row_tiles + r - 1) / r) > sm_count) r = grow(r);
  while (r < kWarps && k_chunks < 2 * (kWarps / r)) r = grow(r);  // at least 2 chunks per slice
  c.row_tiles_per_block = r;
  // One k slice per row tile (8 / R == 1): every warp would own a whole row tile, so let the
  // warps run on their own, without the block's epilogue. For the down shape (R = 7 with 8
  // tokens, 8 with 16) 9 to 20% less time on the H100 (docs/perf.md).
  if (kWarps / r == 1) {
    c.schedule = Sm90Fp4MoeSchedule::warp;
    c.row_tiles_per_block = 1;
  }
  return c;
}

void sm90_fp4_moe_grouped_launch(const Sm90Fp4MoeParams& p, const Sm90Fp4MoeConfig& config,
                                 cudaStream_t stream) {
  check_params("sm90_fp4_moe_grouped_launch", p);
  check_config(config);
  if (p.total_rows == 0) return;
  MoeKernelParams kp{};
  kp.weights = p.weights;
  kp.expert_factors = p.expert_factors;
  kp.x = p.x;
  kp.offsets = p.offsets;
  kp.y = p.y;
  kp.expert_bytes = fp4_moe_expert_bytes(p.format, p.n, p.k);
  kp.experts = p.experts;
  kp.n = static_cast<int32_t>(p.n);
  kp.k = static_cast<int32_t>(p.k);
  kp.k_chunks = static_cast<int32_t>(p.k / kFp4MoeChunkCols);
  kp.tokens_per_tile = config.tokens_per_tile;
  kp.row_tiles = static_cast<int32_t>(p.n / kRowTileRows);
  kp.row_tiles_per_block = config.row_tiles_per_block;
  kp.row_blocks = (kp.row_tiles + kp.row_tiles_per_block - 1) / kp.row_tiles_per_block;
  kp.out_f32 = p.out_type == MoeOutType::f32 ? 1 : 0;

  const bool warp_schedule = config.kernel == Sm90Fp4MoeKernel::decode &&
                             config.schedule == Sm90Fp4MoeSchedule::warp;
  const int64_t tiles = mtiles_bound(p, config.tokens_per_tile);
  const int smem = moe_smem_bytes(p.format, config);
  // Persistent grid: at most one block per multiprocessor (prefill: one fits; decode: the
  // heuristic sizes the work so, and with two resident per multiprocessor the hardware may put
  // the working blocks in pairs on half the multiprocessors, measured 1.5x slower), blocks loop
  // over the units; and no more than the units' upper bound.
  int device = 0, sm_count = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  // Blocks: the warp schedule needs no more than one warp per (m-tile, row tile).
  const int64_t units =
      warp_schedule ? (tiles * kp.row_tiles + kWarps - 1) / kWarps : tiles * kp.row_blocks;
  const auto grid = static_cast<unsigned>(std::min<int64_t>(units, sm_count));
  if (config.kernel == Sm90Fp4MoeKernel::prefill) {
    const PrefillKernelFn kernel =
        prefill_kernel_for(p.format, config.tokens_per_tile, config.x_multicast);
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const CUtensorMap x_map =
        make_x_map(p, config.x_multicast ? config.tokens_per_tile / 2 : config.tokens_per_tile);
    if (!config.x_multicast) {
      kernel<<<grid, kPrefillThreads, smem, stream>>>(kp, x_map);
    } else {
      // Pairs of blocks as clusters of two; as many pairs as can be resident at once (the
      // multiprocessors of a pair share a GPC, so an odd one out per GPC may stay idle), but
      // no more than the units of pairs of row blocks.
      cudaLaunchConfig_t launch{};
      launch.blockDim = dim3(kPrefillThreads);
      launch.dynamicSmemBytes = static_cast<size_t>(smem);
      launch.stream = stream;
      cudaLaunchAttribute attr{};
      attr.id = cudaLaunchAttributeClusterDimension;
      attr.val.clusterDim.x = 2;
      attr.val.clusterDim.y = 1;
      attr.val.clusterDim.z = 1;
      launch.attrs = &attr;
      launch.numAttrs = 1;
      launch.gridDim = dim3(static_cast<unsigned>(2 * (sm_count / 2)));
      int resident_pairs = 0;
      CUDA_CHECK(cudaOccupancyMaxActiveClusters(&resident_pairs, kernel, &launch));
      CUDA_REQUIRE(resident_pairs > 0, "one cluster of two prefill blocks fits the device");
      const int64_t pair_units = tiles * ((kp.row_blocks + 1) / 2);
      launch.gridDim =
          dim3(static_cast<unsigned>(2 * std::min<int64_t>(pair_units, resident_pairs)));
      CUDA_CHECK(cudaLaunchKernelEx(&launch, kernel, kp, x_map));
    }
  } else {
    const DecodeKernelFn kernel =
        decode_kernel_for(p.format, config.tokens_per_tile, config.schedule);
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    // Programmatic dependent launch (8-token tiles): the kernel waits for the previous kernel in
    // the stream (griddepcontrol.wait) before its first global access and lets the next one
    // launch right away, so launch latency and block start overlap the previous kernel.
    cudaLaunchConfig_t launch{};
    launch.gridDim = dim3(grid);
    launch.blockDim = dim3(kThreads);
    launch.dynamicSmemBytes = static_cast<size_t>(smem);
    launch.stream = stream;
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    launch.attrs = &attr;
    const bool programmatic = config.tokens_per_tile == 8 ? decode_programmatic<1>()
                                                          : decode_programmatic<2>();
    launch.numAttrs = p.programmatic_launch && programmatic ? 1 : 0;
    CUDA_CHECK(cudaLaunchKernelEx(&launch, kernel, kp));
  }
  CUDA_CHECK(cudaGetLastError());
}

void sm90_fp4_moe_grouped(const Sm90Fp4MoeParams& p, cudaStream_t stream) {
  check_params("sm90_fp4_moe_grouped", p);
  if (p.total_rows == 0) return;
  int device = 0, sm_count = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  sm90_fp4_moe_grouped_launch(p, sm90_fp4_moe_choose_config(p, sm_count), stream);
}

}  // namespace rlhf
