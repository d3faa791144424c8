// Matrix products with few rows per weight matrix: the expert GEMMs of a decode step (each
// expert sees a handful of a batch's tokens) and the dense products of a small batch. cuBLAS's
// kernels are tiled for large M: at 16 rows per expert its grouped SGEMM runs 128 x 128 tiles
// that are mostly padding and reads the weights at a few percent of HBM bandwidth
// (docs/perf.md). These kernels stream each weight tile once from HBM through a cp.async ring
// and multiply it with every row that needs it. The grouped kernel reads each group's row range
// from the device offsets, so the host never waits for the router's counts. The dense kernel
// splits k across blocks (one matrix alone would give too few blocks) and a second kernel adds
// the splits in order; from 1 to 4 rows a GEMV (a warp per output column, no shared memory,
// one launch) takes the dense products instead. The FP4 variant streams packed expert weights (codes and block scales,
// fp4.h's layout) and decodes each chunk into shared memory with fp4.h's functions, so a
// packed model's decode reads 4.25 or 4.5 bits per weight and keeps no full-precision copy.
//
// Block (x: a tile of 64 output columns of one of the launch's products, y: a group, z: a
// slice of the group's 32-row tiles), 8 warps. A 4-stage cp.async ring brings 64-value chunks
// of the 64 weight rows and of the 32 x rows into shared memory. Two ways to multiply a chunk:
// - FP32 fmas (a handful of rows): warp w takes the rows w%4, w%4 + 4, ..., w%4 + 28 and half
//   w/4 of every chunk; lane l computes columns l and l + 32. The layout maximizes the
//   multiply-adds per shared-memory load (32 per 6 loads).
// - 3xTF32 tensor cores (from 8 rows per matrix): warp w takes k step w (8 values) of every
//   chunk against all 64 columns and all rows (see multiply_chunk_mma).
// The warps' partial sums (two k halves, or eight k steps) are added at the end of a row tile in
// a fixed order. Every output is a sum in
// an order fixed by the shape (for the dense kernel also by the multiprocessor count, which
// sets its k splits), so results repeat bit for bit on one GPU; several products in one launch
// each run their blocks as a launch of their own would, so sharing a launch changes no bit.
#include <algorithm>
#include <span>
#include <type_traits>

#include "kernels/cuda/cuda_ops_device.cuh"
#include "kernels/cuda/cuda_ops_kernels.cuh"
#include "kernels/fp4/fp4.h"

namespace rlhf::cuda {
namespace {

constexpr int kColsPerBlock = 64;
constexpr int kRowsPerTile = 32;
constexpr int kChunk = 64;           // k values per pipeline stage
constexpr int kStages = 4;
constexpr int kPitch = kChunk + 4;   // floats per smem row: 16-byte aligned, banks shifted by 4
constexpr int kFewRowsThreads = 256;
constexpr int kRowGroups = 4;                                // warps sharing a k half
constexpr int kKHalves = kFewRowsThreads / 32 / kRowGroups;  // 2
constexpr int kRowsPerWarp = kRowsPerTile / kRowGroups;      // 8
constexpr int kColsPerLane = kColsPerBlock / 32;             // 2
constexpr int kHalfChunk = kChunk / kKHalves;                // 32

using WeightTile = float[kColsPerBlock][kPitch];
using RowTile = float[kRowsPerTile][kPitch];

__device__ __forceinline__ void copy16_async(void* smem, const void* global, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;  // 0: the 16 bytes are zero-filled, nothing is read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global),
               "r"(src_bytes));
}
__device__ __forceinline__ void commit_async() { asm volatile("cp.async.commit_group;\n" ::); }
template <int Pending>
__device__ __forceinline__ void wait_async() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
}

// Queues chunk `chunk` of `rows_valid` rows of a row-major float matrix (rows `ld` apart, k_len
// values in use) into tile. Rows past rows_valid and k past k_len are zero-filled.
template <int Rows>
__device__ __forceinline__ void load_float_chunk(float (*tile)[kPitch], const float* src,
                                                 int rows_valid, int k_len, int64_t ld,
                                                 int chunk) {
  const int k0 = chunk * kChunk;
  constexpr int kSegments = kChunk / 4;  // 16-byte segments per row chunk
#pragma unroll
  for (int s = threadIdx.x; s < Rows * kSegments; s += kFewRowsThreads) {
    const int r = s / kSegments, k = k0 + (s % kSegments) * 4;
    const bool valid = r < rows_valid && k < k_len;
    copy16_async(&tile[r][k - k0], valid ? src + r * ld + k : src, valid);
  }
}

// Float weights: a ring of weight tiles beside the ring of row tiles. `w` points at the block's
// first weight row; rows are `ld` floats apart.
struct FloatWeights {
  static constexpr bool kExactInTf32 = false;  // see multiply_chunk_mma
  struct Shared {
    WeightTile w[kStages];
  };
  Shared& smem;
  const float* w;
  int n_valid, k_len;
  int64_t ld;

  __device__ void load(int chunk, int stage) {
    load_float_chunk<kColsPerBlock>(smem.w[stage], w, n_valid, k_len, ld, chunk);
  }
  __device__ void prepare_block() {}
  __device__ const WeightTile& ready(int /*chunk*/, int stage) { return smem.w[stage]; }
};

// Packed FP4 weights (fp4.h's layout: codes [rows, K / 2], two values a byte, low nibble
// first; one scale code per block of 16 or 32 values along k). The codes come through a ring;
// the block's scales for the whole k range are read once per block; ready() decodes a chunk
// into one float tile that every warp then reads.
template <Fp4Format Format>
struct Fp4Weights {
  static constexpr int kBlock = fp4_block_size(Format);
  // MXFP4 values are E2M1 (two significant bits) times a power of two, so they are exact in
  // TF32 (multiply_chunk_mma). NVFP4's multiplier carries the FP32 global scale: not exact.
  static constexpr bool kExactInTf32 = Format == Fp4Format::mxfp4;
  struct Shared {
    WeightTile decoded;
    uint8_t codes[kStages][kColsPerBlock][kChunk / 2];
  };
  Shared& smem;
  uint8_t* scales_smem;  // [kColsPerBlock][K / kBlock], after Shared
  const uint8_t* codes;  // the block's first weight row
  const uint8_t* scales;
  float global_scale;
  int n_valid, K;

  __device__ void load(int chunk, int stage) {
    // 64 rows x 32 bytes: two 16-byte segments a row, threads 0..127.
    constexpr int kSegments = kChunk / 32;
    const int s = threadIdx.x;
    if (s < kColsPerBlock * kSegments) {
      const int n = s / kSegments, k = chunk * kChunk + (s % kSegments) * 32;
      const bool valid = n < n_valid && k < K;
      copy16_async(&smem.codes[stage][n][(s % kSegments) * 16],
                   valid ? codes + int64_t(n) * (K / 2) + k / 2 : codes, valid);
    }
  }
  // Once per block, before its first chunk: the block's scale codes (rows past n_valid read 0),
  // which every row tile of the block reuses. Plain loads: scale rows are K / kBlock bytes, too
  // short and unaligned for cp.async chunks.
  __device__ void prepare_block() {
    const int per_row = K / kBlock;
    for (int i = threadIdx.x; i < kColsPerBlock * per_row; i += kFewRowsThreads) {
      const int n = i / per_row;
      scales_smem[i] = n < n_valid ? scales[int64_t(n) * per_row + i % per_row] : uint8_t(0);
    }
  }
  // Thread t decodes values 16 (t % 4) .. +15 of row t / 4 of the chunk. Past K the codes
  // were zero-filled and the scale is taken as 0: the values are zeros.
  __device__ const WeightTile& ready(int chunk, int stage) {
    const int n = threadIdx.x / 4, quarter = threadIdx.x % 4;
    const int k = chunk * kChunk + quarter * 16;
    const int per_row = K / kBlock;
    const uint8_t scale_code = k < K ? scales_smem[n * per_row + k / kBlock] : uint8_t(0);
    const float multiplier =
        k < K ? fp4_block_multiplier(Format, scale_code, global_scale) : 0.0f;
    const uint2 packed = *reinterpret_cast<const uint2*>(&smem.codes[stage][n][quarter * 8]);
    float* dst = &smem.decoded[n][quarter * 16];
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      dst[i] = fp4_decode_nibble_scaled(i < 8 ? packed.x : packed.y, i % 8, multiplier);
    }
    __syncthreads();  // the decoded chunk is complete before any warp reads it
    return smem.decoded;
  }
};

// acc[i][j] += x[row_group + 4i][k] w[lane + 32j][k] over this warp's half of a chunk, for the
// first Rows of the warp's rows.
template <int Rows>
__device__ __forceinline__ void multiply_chunk(float (&acc)[kRowsPerWarp][kColsPerLane],
                                               const WeightTile& w, const RowTile& x,
                                               int row_group, int lane, int k_begin) {
#pragma unroll
  for (int kk = 0; kk < kHalfChunk; kk += 4) {
    const int k = k_begin + kk;
    float4 wv[kColsPerLane];
#pragma unroll
    for (int j = 0; j < kColsPerLane; ++j) {
      wv[j] = *reinterpret_cast<const float4*>(&w[lane + 32 * j][k]);
    }
#pragma unroll
    for (int i = 0; i < Rows; ++i) {
      const float4 xv = *reinterpret_cast<const float4*>(&x[row_group + kRowGroups * i][k]);
#pragma unroll
      for (int j = 0; j < kColsPerLane; ++j) {
        acc[i][j] = fmaf(xv.x, wv[j].x, acc[i][j]);
        acc[i][j] = fmaf(xv.y, wv[j].y, acc[i][j]);
        acc[i][j] = fmaf(xv.z, wv[j].z, acc[i][j]);
        acc[i][j] = fmaf(xv.w, wv[j].w, acc[i][j]);
      }
    }
  }
}

// ---- The tensor-core variant: 3xTF32 ----
// At a few dozen rows per weight tile the multiply-adds above bound the kernel (a 64-row decode
// step is compute-bound on the FP32 cores: 32 FLOP per weight byte against the H100's ~20 at
// HBM speed). The tensor cores take TF32 (10 mantissa bits), too coarse alone: each float is
// split into big = tf32(v) and small = tf32(v - big), and a b is summed as a_small b_big +
// a_big b_small + a_big b_big in FP32. What is dropped (a_small b_small and the rounding of the
// small parts) is about 2^-21 of |a b|, against 2^-24 for an FP32 fma: the result stays well
// inside the float reordering tolerance the tests use (test_cuda_ops.cpp, kReduction). An
// infinite input gives NaN here (inf - inf in the split); weights and activations are finite.
__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
  return r;
}
__device__ __forceinline__ void split_tf32(float v, uint32_t& big, uint32_t& small) {
  big = to_tf32(v);
  small = to_tf32(v - __uint_as_float(big));
}
// c += a b for one m16n8k8 tile (PTX fragment layouts: a row-major 16 x 8, b column-major 8 x 8).
__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The MMA computes the transposed tile out^T = W x^T: the weight tile's 64 columns are the m
// dimension (four 16-column tiles), the rows are n (four 8-row tiles), k is k. Warp w takes k
// step w of every chunk (its 8 values 8 w .. 8 w + 7) against all four column tiles and the
// first RowTiles row tiles, so every weight and every x value of a chunk is split into its TF32
// parts by exactly one warp, and each split weight fragment meets every row tile in registers.
// (The layout before this one, warps of 16 columns and half the chunk, split each x value in
// all four warps sharing it: 1.3 to 1.6 times the splits and MMAs per chunk at 1 to 4 row
// tiles; docs/perf.md has the measurement.) acc[ct][j] is the accumulator fragment of column tile ct and row tile j:
// element c holds column 16 ct + lane / 4 + 8 (c / 2), row 8 j + 2 (lane % 4) + c % 2.
// With ExactWeights the weights are exact in TF32 (MXFP4), so their small part is zero and its
// MMA, which would only add exact zeros, is left out.
constexpr int kMmaRowTiles = kRowsPerTile / 8;
constexpr int kMmaColumnTiles = kColsPerBlock / 16;
constexpr int kMmaWarps = kFewRowsThreads / 32;
static_assert(kMmaWarps * 8 == kChunk, "one 8-value k step of a chunk per warp");
// Row and column (within the tile) of element c of row tile j's accumulator fragment.
__device__ __forceinline__ int mma_fragment_row(int j, int c, int lane) {
  return 8 * j + 2 * (lane & 3) + c % 2;
}
__device__ __forceinline__ int mma_fragment_column(int ct, int c, int lane) {
  return 16 * ct + (lane >> 2) + 8 * (c / 2);
}
template <int RowTiles, bool ExactWeights>
__device__ __forceinline__ void multiply_chunk_mma(
    float (&acc)[kMmaColumnTiles][kMmaRowTiles][4], const WeightTile& w, const RowTile& x,
    int lane, int k_step) {
  const int g = lane >> 2, t = lane & 3;
  const int k = 8 * k_step + t;
  // Fragment reads: with the 68-float pitch, lane (g, t) hits bank 4 g + t: no conflicts.
  uint32_t b_big[RowTiles][2], b_small[RowTiles][2];
#pragma unroll
  for (int j = 0; j < RowTiles; ++j) {
    split_tf32(x[8 * j + g][k], b_big[j][0], b_small[j][0]);
    split_tf32(x[8 * j + g][k + 4], b_big[j][1], b_small[j][1]);
  }
#pragma unroll
  for (int ct = 0; ct < kMmaColumnTiles; ++ct) {
    const int col = 16 * ct + g;
    const float a[4] = {w[col][k], w[col + 8][k], w[col][k + 4], w[col + 8][k + 4]};
    uint32_t a_big[4], a_small[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (ExactWeights) {
        a_big[i] = __float_as_uint(a[i]);
      } else {
        split_tf32(a[i], a_big[i], a_small[i]);
      }
    }
#pragma unroll
    for (int j = 0; j < RowTiles; ++j) {
      // Small terms first: they are added to the running sum before the large one.
      if constexpr (!ExactWeights) mma_tf32(acc[ct][j], a_small, b_big[j]);
      mma_tf32(acc[ct][j], a_big, b_small[j]);
      mma_tf32(acc[ct][j], a_big, b_big[j]);
    }
  }
}

// The block's work for one weight tile: out[r, n] = sum over k < k_len of in[r, k] w[n, k] for
// rows r in [row_begin, row_end) (taking every gridDim.z-th 32-row tile from blockIdx.z) and
// the block's columns. in rows are ld floats apart, out rows ld_out; out already points at the
// block's first column. x_ring is kStages row tiles of shared memory. kTensorCores picks the
// 3xTF32 MMA (for tiles of many rows) over the FP32 fma (for a handful).
template <bool kTensorCores, typename Weights>
__device__ __forceinline__ void multiply_tiles(Weights& weights, RowTile* x_ring,
                                               float* __restrict__ out, int64_t ld_out,
                                               const float* __restrict__ in, int row_begin,
                                               int row_end, int n_valid, int k_len, int64_t ld) {
  // After a tile's last chunk the row ring is free: the upper k half's partial sums go there.
  auto* halves = reinterpret_cast<float(*)[kColsPerBlock + 1]>(x_ring);
  static_assert(sizeof(float) * kRowsPerTile * (kColsPerBlock + 1) <= sizeof(RowTile) * kStages);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row_group = warp % kRowGroups, k_half = warp / kRowGroups;
  const int chunks = (k_len + kChunk - 1) / kChunk;

  const int first_tile = row_begin + int(blockIdx.z) * kRowsPerTile;
  for (int t0 = first_tile; t0 < row_end; t0 += int(gridDim.z) * kRowsPerTile) {
    const int rows_valid = min(kRowsPerTile, row_end - t0);
    const float* x_tile = in + t0 * ld;
    // Rows this warp owns that exist: a warp-uniform bound, so warps past the tile's rows skip
    // the multiply-adds (decode tiles are mostly short).
    const int my_rows =
        rows_valid > row_group ? (rows_valid - row_group + kRowGroups - 1) / kRowGroups : 0;
    // The MMA's 8-row tiles that hold rows (block-uniform).
    const int mma_row_tiles = (rows_valid + 7) / 8;
    // Each variant's accumulators; the compiler drops the unused one.
    float acc[kRowsPerWarp][kColsPerLane] = {};
    float acc_mma[kMmaColumnTiles][kMmaRowTiles][4] = {};

    for (int c = 0; c < kStages - 1; ++c) {
      if (c < chunks) {
        weights.load(c, c);
        load_float_chunk<kRowsPerTile>(x_ring[c], x_tile, rows_valid, k_len, ld, c);
      }
      commit_async();
    }
    // After the first tile's prologue is queued, so the loads overlap; a block without rows
    // never gets here.
    if (t0 == first_tile) weights.prepare_block();
    for (int c = 0; c < chunks; ++c) {
      wait_async<kStages - 2>();
      __syncthreads();  // chunk c is visible to all; the stage refilled below is free
      const int next = c + kStages - 1;
      if (next < chunks) {
        weights.load(next, next % kStages);
        load_float_chunk<kRowsPerTile>(x_ring[next % kStages], x_tile, rows_valid, k_len, ld,
                                       next);
      }
      commit_async();
      const WeightTile& w = weights.ready(c, c % kStages);
      const RowTile& x = x_ring[c % kStages];
      const int k_begin = k_half * kHalfChunk;
      if constexpr (kTensorCores) {
        constexpr bool kExact = Weights::kExactInTf32;
        switch (mma_row_tiles) {
          case 4: multiply_chunk_mma<4, kExact>(acc_mma, w, x, lane, warp); break;
          case 3: multiply_chunk_mma<3, kExact>(acc_mma, w, x, lane, warp); break;
          case 2: multiply_chunk_mma<2, kExact>(acc_mma, w, x, lane, warp); break;
          case 1: multiply_chunk_mma<1, kExact>(acc_mma, w, x, lane, warp); break;
          default: break;
        }
      } else {
        // A real branch on the warp-uniform row count: with a runtime bound inside the unrolled
        // loop the compiler predicates, and the skipped rows' instructions are issued anyway
        // (measured: about twice the instructions at 4 rows of 8).
        switch (my_rows) {
          case 8: multiply_chunk<8>(acc, w, x, row_group, lane, k_begin); break;
          case 7: multiply_chunk<7>(acc, w, x, row_group, lane, k_begin); break;
          case 6: multiply_chunk<6>(acc, w, x, row_group, lane, k_begin); break;
          case 5: multiply_chunk<5>(acc, w, x, row_group, lane, k_begin); break;
          case 4: multiply_chunk<4>(acc, w, x, row_group, lane, k_begin); break;
          case 3: multiply_chunk<3>(acc, w, x, row_group, lane, k_begin); break;
          case 2: multiply_chunk<2>(acc, w, x, row_group, lane, k_begin); break;
          case 1: multiply_chunk<1>(acc, w, x, row_group, lane, k_begin); break;
          default: break;
        }
      }
    }
    wait_async<0>();
    __syncthreads();  // every warp is done with the rings: the row ring takes the partial sums
    if constexpr (kTensorCores) {
      // The eight warps' partial tiles (one per k step), added in a fixed order through four
      // fragment-order slots in the row ring: (((w0 + w4) + (w1 + w5)) + (w2 + w6)) + (w3 + w7).
      using Slot = float[kMmaColumnTiles][kMmaRowTiles][4][32];
      static_assert(sizeof(Slot) * 4 <= sizeof(RowTile) * kStages);
      Slot* slots = reinterpret_cast<Slot*>(x_ring);
      const auto store = [&](Slot& slot) {
#pragma unroll
        for (int ct = 0; ct < kMmaColumnTiles; ++ct) {
#pragma unroll
          for (int j = 0; j < kMmaRowTiles; ++j) {
            if (j >= mma_row_tiles) break;
#pragma unroll
            for (int c = 0; c < 4; ++c) slot[ct][j][c][lane] = acc_mma[ct][j][c];
          }
        }
      };
      if (warp >= 4) store(slots[warp - 4]);
      __syncthreads();
      if (warp < 4) {
#pragma unroll
        for (int ct = 0; ct < kMmaColumnTiles; ++ct) {
#pragma unroll
          for (int j = 0; j < kMmaRowTiles; ++j) {
            if (j >= mma_row_tiles) break;
#pragma unroll
            for (int c = 0; c < 4; ++c) acc_mma[ct][j][c] += slots[warp][ct][j][c][lane];
          }
        }
      }
      __syncthreads();
      if (warp < 4) store(slots[warp]);
      __syncthreads();
      // Warp w writes column tile w % 4 of row tiles w / 4 and w / 4 + 2.
      const int ct = warp % 4;
#pragma unroll
      for (int j = warp / 4; j < kMmaRowTiles; j += 2) {
        if (j >= mma_row_tiles) break;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int m = mma_fragment_row(j, c, lane), n = mma_fragment_column(ct, c, lane);
          float sum = slots[0][ct][j][c][lane] + slots[1][ct][j][c][lane];
          sum += slots[2][ct][j][c][lane];
          sum += slots[3][ct][j][c][lane];
          if (m < rows_valid && n < n_valid) out[(t0 + m) * ld_out + n] = sum;
        }
      }
      __syncthreads();  // the slots are read before the next row tile refills the ring
      continue;
    }
    if (k_half == 1) {
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        if (i >= my_rows) break;
#pragma unroll
        for (int j = 0; j < kColsPerLane; ++j) {
          halves[row_group + kRowGroups * i][lane + 32 * j] = acc[i][j];
        }
      }
    }
    __syncthreads();
    if (k_half == 0) {
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        if (i >= my_rows) break;
        const int m = row_group + kRowGroups * i;
        float* out_row = out + (t0 + m) * ld_out;
#pragma unroll
        for (int j = 0; j < kColsPerLane; ++j) {
          const int n = lane + 32 * j;
          if (n < n_valid) out_row[n] = acc[i][j] + halves[m][n];
        }
      }
    }
    __syncthreads();  // the halves are read before the next row tile refills the ring
  }
}

// Dynamic shared memory: the row ring first, then the weights' Shared (then, for FP4, the
// scale codes).
extern __shared__ __align__(16) unsigned char few_rows_smem[];

template <typename Weights>
__device__ __forceinline__ typename Weights::Shared& weights_smem() {
  return *reinterpret_cast<typename Weights::Shared*>(few_rows_smem + sizeof(RowTile) * kStages);
}
__device__ __forceinline__ RowTile* row_ring() { return reinterpret_cast<RowTile*>(few_rows_smem); }

template <typename Weights>
constexpr size_t smem_bytes() {
  return sizeof(RowTile) * kStages + sizeof(typename Weights::Shared);
}

// Up to kFewRowsMaxGroupedProducts grouped products of one input and one routing, with weight
// sets of the same shape (a MoE layer's gate and up): block x covers product x / column tiles.
template <typename Product>
struct GroupedLaunch {
  Product product[kFewRowsMaxGroupedProducts];
};

// Grouped: block (product and column tile, group g, row slice). Rows offsets[g]..offsets[g+1]-1
// of in against w_g = w[g] ([N, K]).
template <bool kTensorCores>
__global__ void __launch_bounds__(kFewRowsThreads, 2)
    few_rows_grouped_kernel(const GroupedLaunch<FewRowsGroupedProduct> launch,
                            const float* __restrict__ in, const int32_t* __restrict__ offsets,
                            int N, int K) {
  const int column_tiles = (N + kColsPerBlock - 1) / kColsPerBlock;
  const FewRowsGroupedProduct& p = launch.product[blockIdx.x / column_tiles];
  const int group = blockIdx.y, n0 = (blockIdx.x % column_tiles) * kColsPerBlock;
  const int n_valid = min(kColsPerBlock, N - n0);
  FloatWeights weights{weights_smem<FloatWeights>(), p.w + (int64_t(group) * N + n0) * K,
                       n_valid, K, K};
  multiply_tiles<kTensorCores>(weights, row_ring(), p.out + n0, N, in, offsets[group],
                               offsets[group + 1], n_valid, K, K);
}

// Grouped on packed FP4 weights: as above, w_g = the rows g * N .. g * N + N - 1 of the packed
// matrix.
template <Fp4Format Format, bool kTensorCores>
__global__ void __launch_bounds__(kFewRowsThreads, 2)
    few_rows_fp4_grouped_kernel(const GroupedLaunch<FewRowsFp4GroupedProduct> launch,
                                const float* __restrict__ in,
                                const int32_t* __restrict__ offsets, int N, int K) {
  using Weights = Fp4Weights<Format>;
  const int column_tiles = (N + kColsPerBlock - 1) / kColsPerBlock;
  const FewRowsFp4GroupedProduct& p = launch.product[blockIdx.x / column_tiles];
  const int group = blockIdx.y, n0 = (blockIdx.x % column_tiles) * kColsPerBlock;
  const int n_valid = min(kColsPerBlock, N - n0);
  const int64_t first_row = int64_t(group) * N + n0;
  auto& shared = weights_smem<Weights>();
  Weights weights{shared,
                  reinterpret_cast<uint8_t*>(&shared + 1),
                  p.codes + first_row * (K / 2),
                  p.scales + first_row * (K / Weights::kBlock),
                  p.global_scale,
                  n_valid,
                  K};
  multiply_tiles<kTensorCores>(weights, row_ring(), p.out + n0, N, in, offsets[group],
                               offsets[group + 1], n_valid, K, K);
}

// Dense, k split across blocks, for up to kFewRowsMaxProducts weight matrices against one
// input. Block x runs unit x of a product's (column tile, split s) units, the products' units
// one after another (first_unit); block z is a row tile. It writes the sum over its k range
// [s * k_split, (s + 1) * k_split) to the product's partial[s] ([M, N]); reduce_splits adds
// them. A product's blocks do exactly what they would in a launch of their own, so every output
// has the same bits whichever products share the launch.
struct DenseUnits {
  float* out;
  float* partial;
  const float* w;
  int N, k_split, splits;
  int first_unit;      // its first block x
  int64_t first_out;   // its first element in the products' outputs taken one after another
};
struct DenseLaunch {
  DenseUnits product[kFewRowsMaxProducts];
  int count;
};

template <bool kTensorCores>
__global__ void __launch_bounds__(kFewRowsThreads, 2)
    few_rows_split_kernel(const DenseLaunch launch, const float* __restrict__ in, int M, int K) {
  int i = 0;
  while (i + 1 < launch.count && int(blockIdx.x) >= launch.product[i + 1].first_unit) ++i;
  const DenseUnits& p = launch.product[i];
  const int unit = int(blockIdx.x) - p.first_unit;
  const int column_tiles = (p.N + kColsPerBlock - 1) / kColsPerBlock;
  const int split = unit / column_tiles, n0 = (unit % column_tiles) * kColsPerBlock;
  const int k0 = split * p.k_split, k_len = min(p.k_split, K - k0);
  const int n_valid = min(kColsPerBlock, p.N - n0);
  FloatWeights weights{weights_smem<FloatWeights>(), p.w + int64_t(n0) * K + k0, n_valid, k_len,
                       K};
  multiply_tiles<kTensorCores>(weights, row_ring(), p.partial + int64_t(split) * M * p.N + n0,
                               p.N, in + k0, 0, M, n_valid, k_len, K);
}

// partial[0][at] + partial[1][at] + ... of one product, in split order (deterministic): the sum
// of both reduction kernels, so they give the same bits.
__device__ __forceinline__ float split_sum(const DenseUnits& p, int M, int64_t at) {
  const int64_t n = int64_t(M) * p.N;
  float sum = 0.0f;
  for (int s = 0; s < p.splits; ++s) sum += p.partial[s * n + at];
  return sum;
}

// out[i] (+)= partial[0][i] + partial[1][i] + ... in split order, for every element of every
// product: element e of the products' outputs taken one after another.
__global__ void reduce_splits_kernel(const DenseLaunch launch, int M, int64_t total,
                                     bool accumulate) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    int i = 0;
    while (i + 1 < launch.count && e >= launch.product[i + 1].first_out) ++i;
    const DenseUnits& p = launch.product[i];
    const int64_t at = e - p.first_out;
    const float sum = split_sum(p, M, at);
    p.out[at] = accumulate ? p.out[at] + sum : sum;
  }
}

// Row m of one product: x = residual + (partial[0] + partial[1] + ...), in reduce_splits_kernel's
// order, to x and after.copy; then the row's RMSNorm. One block of kThreads per row.
__global__ void reduce_splits_rmsnorm_kernel(const DenseUnits p, int M,
                                             const float* residual, NormAfterArgs after) {
  __shared__ float shared[32];
  const int64_t m = blockIdx.x;
  for (int c = threadIdx.x; c < p.N; c += blockDim.x) {
    const int64_t at = m * p.N + c;
    const float x = residual[at] + split_sum(p, M, at);
    p.out[at] = x;
    if (after.copy) after.copy[at] = x;
  }
  rmsnorm_row(after.normed + m * p.N, after.rstd + m, p.out + m * p.N, after.weight, p.N,
              after.eps, shared);
}

// ---- Dense products of 1 to kGemvMaxRows rows (decode at batch 1 to 4) ----
// The split kernel above stages 64-column tiles through shared memory and needs a second
// kernel for its k splits: at one row most of its time is that pipeline and launch. Here a
// warp computes one output column for all rows: its lanes load the column's weight row
// (lane l: values 4 l + 128 j .. +3) straight from global memory, all of a row's loads in
// flight at once, multiply them with the rows of x (small, from L1/L2) in k order per lane,
// and add the lanes' sums by a fixed butterfly. One launch, no scratch, a fixed order.
constexpr int kGemvMaxRows = 4;
constexpr int kGemvWarps = 8;  // columns per block

// The write of one GEMV output (lane 0 after the butterfly): residual + sum where a residual
// is given, else out + sum when accumulating, else sum.
__device__ __forceinline__ void store_gemv_output(float* out, float sum, bool accumulate,
                                                  const float* residual) {
  *out = residual ? *residual + sum : accumulate ? *out + sum : sum;
}

template <int Rows>
__global__ void __launch_bounds__(kGemvWarps * 32)
    gemv_kernel(const DenseLaunch launch, const float* __restrict__ in, int K, bool accumulate,
                const float* residual) {
  const int lane = threadIdx.x & 31;
  const int64_t column = int64_t(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5);
  int i = 0;
  while (i + 1 < launch.count && column >= launch.product[i + 1].first_out) ++i;
  const DenseUnits& p = launch.product[i];
  const int64_t n = column - p.first_out;  // here first_out is the product's first column
  if (n >= p.N) return;  // the last block's spare warps
  const float* w = p.w + n * K;
  float acc[Rows] = {};
#pragma unroll 8
  for (int k = 4 * lane; k < K; k += 128) {
    const float4 wv = *reinterpret_cast<const float4*>(w + k);
#pragma unroll
    for (int r = 0; r < Rows; ++r) {
      const float4 xv = *reinterpret_cast<const float4*>(in + int64_t(r) * K + k);
      acc[r] = fmaf(wv.x, xv.x, acc[r]);
      acc[r] = fmaf(wv.y, xv.y, acc[r]);
      acc[r] = fmaf(wv.z, xv.z, acc[r]);
      acc[r] = fmaf(wv.w, xv.w, acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < Rows; ++r) {
    const float sum = warp_sum(acc[r]);
    const int64_t at = int64_t(r) * p.N + n;
    if (lane == 0) {
      store_gemv_output(p.out + at, sum, accumulate, residual ? residual + at : nullptr);
    }
  }
}

// The products' columns, one after another, one warp each; `residual` (one product only):
// out = residual + sum.
void launch_gemv(std::span<const FewRowsDenseProduct> products, const float* in, int M, int K,
                 bool accumulate, const float* residual, cudaStream_t stream) {
  DenseLaunch launch{};
  int64_t columns = 0;
  for (const FewRowsDenseProduct& product : products) {
    if (product.N <= 0) continue;
    DenseUnits& p = launch.product[launch.count++];
    p = {product.out, nullptr, product.w, product.N, 0, 0, 0, columns};
    columns += product.N;
  }
  if (launch.count == 0) return;
  const unsigned blocks = unsigned((columns + kGemvWarps - 1) / kGemvWarps);
  const auto go = [&](auto kernel) {
    kernel<<<blocks, kGemvWarps * 32, 0, stream>>>(launch, in, K, accumulate, residual);
    CUDA_CHECK_LAUNCH();
  };
  switch (M) {
    case 1: go(gemv_kernel<1>); break;
    case 2: go(gemv_kernel<2>); break;
    case 3: go(gemv_kernel<3>); break;
    default: go(gemv_kernel<4>); break;
  }
}

// The GEMV on a packed FP4 matrix (a packed model's shared experts): lane l of a column's warp
// takes the 32 values 32 l + 1024 j .. +31 (16 bytes of codes, one MXFP4 or two NVFP4 block
// scales), decodes them with fp4_decode_nibble_scaled (fp4.h's values, exact) and multiplies
// them with the rows of x in k order; the lanes' sums are added by a fixed butterfly.
template <Fp4Format Format, int Rows>
__global__ void __launch_bounds__(kGemvWarps * 32)
    fp4_gemv_kernel(float* __restrict__ out, const float* __restrict__ in,
                    const uint8_t* __restrict__ codes, const uint8_t* __restrict__ scales,
                    float global_scale, int N, int K, bool accumulate) {
  constexpr int kBlock = fp4_block_size(Format);
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5);
  if (n >= N) return;
  const uint8_t* row_codes = codes + n * (K / 2);
  const uint8_t* row_scales = scales + n * (K / kBlock);
  float acc[Rows] = {};
  for (int k0 = 32 * lane; k0 < K; k0 += 1024) {
    const uint4 packed = *reinterpret_cast<const uint4*>(row_codes + k0 / 2);
    const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // 8 values per word
      const int k = k0 + 8 * q;
      const float multiplier =
          fp4_block_multiplier(Format, row_scales[k / kBlock], global_scale);
      float w[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) w[i] = fp4_decode_nibble_scaled(words[q], i, multiplier);
#pragma unroll
      for (int r = 0; r < Rows; ++r) {
        const float4 x0 = *reinterpret_cast<const float4*>(in + int64_t(r) * K + k);
        const float4 x1 = *reinterpret_cast<const float4*>(in + int64_t(r) * K + k + 4);
        acc[r] = fmaf(w[0], x0.x, acc[r]);
        acc[r] = fmaf(w[1], x0.y, acc[r]);
        acc[r] = fmaf(w[2], x0.z, acc[r]);
        acc[r] = fmaf(w[3], x0.w, acc[r]);
        acc[r] = fmaf(w[4], x1.x, acc[r]);
        acc[r] = fmaf(w[5], x1.y, acc[r]);
        acc[r] = fmaf(w[6], x1.z, acc[r]);
        acc[r] = fmaf(w[7], x1.w, acc[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < Rows; ++r) {
    const float sum = warp_sum(acc[r]);
    if (lane == 0) store_gemv_output(out + int64_t(r) * N + n, sum, accumulate, nullptr);
  }
}

template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  int(bytes)));
}

int multiprocessors() {
  static const int count = [] {
    int device = 0, n = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    return n;
  }();
  return count;
}

// Row-tile slices per group: enough that an average group's tiles run side by side; a group
// with more rows than that loops, re-reading its weight tile from L2.
dim3 grouped_grid(int products, int n_groups, int rows, int N) {
  const int tiles = (rows + kRowsPerTile - 1) / kRowsPerTile;
  const int slices = std::max(1, std::min(tiles, (tiles + n_groups - 1) / n_groups));
  return dim3(products * ((N + kColsPerBlock - 1) / kColsPerBlock), n_groups, slices);
}

template <typename Product>
GroupedLaunch<Product> grouped_launch(std::span<const Product> products) {
  CUDA_REQUIRE(!products.empty() && products.size() <= size_t(kFewRowsMaxGroupedProducts),
               "a grouped few-rows launch takes one or two products");
  GroupedLaunch<Product> launch{};
  std::copy(products.begin(), products.end(), launch.product);
  return launch;
}

// The FP4 kernel keeps a block's scale codes for all of k in shared memory.
constexpr size_t kFp4MaxScaleBytes = 48 * 1024;

template <Fp4Format Format>
size_t fp4_smem_bytes(int K) {
  const size_t scale_bytes = size_t(kColsPerBlock) * (K / fp4_block_size(Format));
  return smem_bytes<Fp4Weights<Format>>() + (scale_bytes + 15) / 16 * 16;
}

template <Fp4Format Format, bool kTensorCores>
void launch_fp4_grouped(std::span<const FewRowsFp4GroupedProduct> products, const float* in,
                        const int32_t* offsets, int n_groups, int rows, int N, int K,
                        cudaStream_t stream) {
  static const bool ready =
      (allow_smem(few_rows_fp4_grouped_kernel<Format, kTensorCores>,
                  smem_bytes<Fp4Weights<Format>>() + kFp4MaxScaleBytes),
       true);
  (void)ready;
  few_rows_fp4_grouped_kernel<Format, kTensorCores>
      <<<grouped_grid(int(products.size()), n_groups, rows, N), kFewRowsThreads,
         fp4_smem_bytes<Format>(K), stream>>>(grouped_launch(products), in, offsets, N, K);
  CUDA_CHECK_LAUNCH();
}

template <bool kTensorCores>
void launch_grouped(std::span<const FewRowsGroupedProduct> products, const float* in,
                    const int32_t* offsets, int n_groups, int rows, int N, int K,
                    cudaStream_t stream) {
  constexpr size_t kBytes = smem_bytes<FloatWeights>();  // above the 48 KB static limit
  static const bool ready = (allow_smem(few_rows_grouped_kernel<kTensorCores>, kBytes), true);
  (void)ready;
  few_rows_grouped_kernel<kTensorCores>
      <<<grouped_grid(int(products.size()), n_groups, rows, N), kFewRowsThreads, kBytes,
         stream>>>(grouped_launch(products), in, offsets, N, K);
  CUDA_CHECK_LAUNCH();
}

template <bool kTensorCores>
void launch_split(const DenseLaunch& launch, const float* in, int M, int K, dim3 grid,
                  cudaStream_t stream) {
  constexpr size_t kBytes = smem_bytes<FloatWeights>();
  static const bool ready = (allow_smem(few_rows_split_kernel<kTensorCores>, kBytes), true);
  (void)ready;
  few_rows_split_kernel<kTensorCores><<<grid, kFewRowsThreads, kBytes, stream>>>(launch, in, M, K);
  CUDA_CHECK_LAUNCH();
}

int few_rows_dense_splits(int M, int N, int K) {
  // Enough blocks for two per multiprocessor, each split keeping at least 4 chunks of k.
  const int64_t tiles = int64_t((M + kRowsPerTile - 1) / kRowsPerTile) *
                        ((N + kColsPerBlock - 1) / kColsPerBlock);
  const int64_t wanted = (2 * multiprocessors() + tiles - 1) / tiles;
  const int64_t most = std::max(1, K / (4 * kChunk));
  return int(std::clamp<int64_t>(wanted, 1, most));
}

}  // namespace

bool few_rows_take_tensor_cores(int rows, int n_groups) {
  // From 8 rows per weight matrix on average: one full MMA row tile. Below that the fma
  // variant issues fewer instructions (it skips the rows a tile does not have one by one).
  return rows >= 8 * n_groups;
}

void few_rows_matmul(std::span<const FewRowsGroupedProduct> products, const float* in,
                     const int32_t* offsets, int n_groups, int rows, int N, int K,
                     bool tensor_cores, cudaStream_t stream) {
  if (rows <= 0 || N <= 0) return;
  if (tensor_cores) {
    launch_grouped<true>(products, in, offsets, n_groups, rows, N, K, stream);
  } else {
    launch_grouped<false>(products, in, offsets, n_groups, rows, N, K, stream);
  }
}

bool few_rows_fp4_fits(Fp4Format format, int K) {
  const size_t scale_bytes = size_t(kColsPerBlock) * (K / fp4_block_size(format));
  return K % 32 == 0 && scale_bytes <= kFp4MaxScaleBytes;
}

void few_rows_fp4_matmul(std::span<const FewRowsFp4GroupedProduct> products, const float* in,
                         Fp4Format format, const int32_t* offsets, int n_groups, int rows,
                         int N, int K, bool tensor_cores, cudaStream_t stream) {
  if (rows <= 0 || N <= 0) return;
  const auto launch = [&](auto format_tag, auto tensor_cores_tag) {
    launch_fp4_grouped<decltype(format_tag)::value, decltype(tensor_cores_tag)::value>(
        products, in, offsets, n_groups, rows, N, K, stream);
  };
  using Mx = std::integral_constant<Fp4Format, Fp4Format::mxfp4>;
  using Nv = std::integral_constant<Fp4Format, Fp4Format::nvfp4>;
  if (format == Fp4Format::mxfp4) {
    tensor_cores ? launch(Mx{}, std::true_type{}) : launch(Mx{}, std::false_type{});
  } else {
    tensor_cores ? launch(Nv{}, std::true_type{}) : launch(Nv{}, std::false_type{});
  }
}

bool fp4_gemv_fits(int M, int K) { return M >= 1 && M <= kGemvMaxRows && K % 32 == 0; }

void fp4_gemv(float* out, const float* in, const uint8_t* codes, const uint8_t* scales,
              float global_scale, Fp4Format format, int M, int N, int K, bool accumulate,
              cudaStream_t stream) {
  CUDA_REQUIRE(fp4_gemv_fits(M, K), "the FP4 GEMV takes 1 to 4 rows and k in blocks of 32");
  if (N <= 0) return;
  const unsigned blocks = unsigned((int64_t(N) + kGemvWarps - 1) / kGemvWarps);
  const auto go = [&](auto kernel) {
    kernel<<<blocks, kGemvWarps * 32, 0, stream>>>(out, in, codes, scales, global_scale, N, K,
                                                   accumulate);
    CUDA_CHECK_LAUNCH();
  };
  const auto rows = [&](auto format_tag) {
    constexpr Fp4Format F = decltype(format_tag)::value;
    switch (M) {
      case 1: go(fp4_gemv_kernel<F, 1>); break;
      case 2: go(fp4_gemv_kernel<F, 2>); break;
      case 3: go(fp4_gemv_kernel<F, 3>); break;
      default: go(fp4_gemv_kernel<F, 4>); break;
    }
  };
  if (format == Fp4Format::mxfp4) {
    rows(std::integral_constant<Fp4Format, Fp4Format::mxfp4>{});
  } else {
    rows(std::integral_constant<Fp4Format, Fp4Format::nvfp4>{});
  }
}

int64_t few_rows_dense_scratch_floats(int M, std::span<const FewRowsDenseProduct> products,
                                      int K) {
  if (M <= kGemvMaxRows) return 0;  // the GEMV needs none
  int64_t floats = 0;
  for (const FewRowsDenseProduct& p : products) {
    floats += int64_t(few_rows_dense_splits(M, p.N, K)) * M * p.N;
  }
  return floats;
}

namespace {

// Queues the split kernel for `products` (their partial sums into `partial`) and returns its
// launch description; the caller queues the reduction.
DenseLaunch launch_dense_splits(std::span<const FewRowsDenseProduct> products, const float* in,
                                int M, int K, float* partial, bool tensor_cores,
                                cudaStream_t stream) {
  DenseLaunch launch{};
  int units = 0;
  int64_t outputs = 0;
  for (const FewRowsDenseProduct& product : products) {
    if (product.N <= 0) continue;
    const int splits = few_rows_dense_splits(M, product.N, K);
    // Splits of whole chunks, so every block but the last streams full 16-byte segments.
    const int k_split = ((K + splits - 1) / splits + kChunk - 1) / kChunk * kChunk;
    DenseUnits& p = launch.product[launch.count++];
    p = {product.out, partial, product.w, product.N, k_split, (K + k_split - 1) / k_split,
         units, outputs};
    units += p.splits * ((product.N + kColsPerBlock - 1) / kColsPerBlock);
    outputs += int64_t(M) * product.N;
    partial += int64_t(p.splits) * M * product.N;
  }
  if (launch.count == 0) return launch;
  const dim3 grid(units, 1, (M + kRowsPerTile - 1) / kRowsPerTile);
  if (tensor_cores) {
    launch_split<true>(launch, in, M, K, grid, stream);
  } else {
    launch_split<false>(launch, in, M, K, grid, stream);
  }
  return launch;
}

}  // namespace

void few_rows_dense_matmul(std::span<const FewRowsDenseProduct> products, const float* in,
                           int M, int K, bool accumulate, float* partial, bool tensor_cores,
                           cudaStream_t stream) {
  CUDA_REQUIRE(products.size() <= size_t(kFewRowsMaxProducts),
               "more products than one few-rows launch takes");
  if (M <= 0) return;
  if (M <= kGemvMaxRows) {
    launch_gemv(products, in, M, K, accumulate, nullptr, stream);
    return;
  }
  const DenseLaunch launch = launch_dense_splits(products, in, M, K, partial, tensor_cores, stream);
  if (launch.count == 0) return;
  const DenseUnits& last = launch.product[launch.count - 1];
  const int64_t outputs = last.first_out + int64_t(M) * last.N;
  reduce_splits_kernel<<<grid_for(outputs), kThreads, 0, stream>>>(launch, M, outputs,
                                                                    accumulate);
  CUDA_CHECK_LAUNCH();
}

void few_rows_dense_matmul_rmsnorm(const FewRowsDenseProduct& product, const float* residual,
                                   const float* in, int M, int K, float* partial,
                                   bool tensor_cores, const NormAfterArgs& after,
                                   cudaStream_t stream) {
  if (M <= 0 || product.N <= 0) return;
  if (M <= kGemvMaxRows) {
    // The GEMV writes x = residual + the product, then the norm and the copy as their own
    // launches: at these row counts a GEMV and a norm beat the split kernel and a fused
    // reduction.
    launch_gemv(std::span(&product, 1), in, M, K, false, residual, stream);
    rmsnorm_forward(after.normed, after.rstd, product.out, after.weight, M, product.N,
                    after.eps, stream);
    if (after.copy) {
      CUDA_CHECK(cudaMemcpyAsync(after.copy, product.out, sizeof(float) * size_t(M) * product.N,
                                 cudaMemcpyDeviceToDevice, stream));
    }
    return;
  }
  const DenseLaunch launch =
      launch_dense_splits(std::span(&product, 1), in, M, K, partial, tensor_cores, stream);
  reduce_splits_rmsnorm_kernel<<<M, kThreads, 0, stream>>>(launch.product[0], M, residual,
                                                           after);
  CUDA_CHECK_LAUNCH();
}

}  // namespace rlhf::cuda
