// Matrix products with few rows per weight matrix: the expert GEMMs of a decode step (each
// expert sees a handful of a batch's tokens) and the dense products of a small batch. cuBLAS's
// kernels are tiled for large M: at 16 rows per expert its grouped SGEMM runs 128 x 128 tiles
// that are mostly padding and reads the weights at a few percent of HBM bandwidth
// (docs/perf.md). These kernels stream each weight tile once from HBM through a cp.async ring
// and multiply it with every row that needs it. The grouped kernel reads each group's row range
// from the device offsets, so the host never waits for the router's counts. The dense kernel
// splits k across blocks (one matrix alone would give too few blocks) and a second kernel adds
// the splits in order.
//
// Block (x: a tile of 64 output columns, y: a group, z: a slice of the group's 32-row tiles),
// 8 warps. A 3-stage cp.async ring brings 64-value chunks of the 64 weight rows and of the 32
// x rows into shared memory. Warp w takes the rows w%4, w%4 + 4, ..., w%4 + 28 and half w/4 of
// every chunk; lane l computes columns l and l + 32. At 16 rows per expert (decode at batch 64)
// the kernel is bound by instruction issue as much as by HBM, so the layout maximizes the
// multiply-adds per shared-memory load (32 per 6 loads). The two k halves are added at the end
// of a row tile in a fixed order: every output is a sum in an order fixed by K alone, so results
// repeat bit for bit and do not depend on the grid.
#include <algorithm>

#include "kernels/cuda/cuda_ops_device.cuh"
#include "kernels/cuda/cuda_ops_kernels.cuh"

namespace rlhf::cuda {
namespace {

constexpr int kColsPerBlock = 64;
constexpr int kRowsPerTile = 32;
constexpr int kChunk = 64;           // k values per pipeline stage
constexpr int kStages = 3;
constexpr int kPitch = kChunk + 4;   // floats per smem row: 16-byte aligned, banks shifted by 4
constexpr int kFewRowsThreads = 256;
constexpr int kRowGroups = 4;                            // warps sharing a k half
constexpr int kKHalves = kFewRowsThreads / 32 / kRowGroups;  // 2
constexpr int kRowsPerWarp = kRowsPerTile / kRowGroups;  // 8
constexpr int kColsPerLane = kColsPerBlock / 32;         // 2
constexpr int kHalfChunk = kChunk / kKHalves;            // 32

__device__ __forceinline__ void copy16_async(float* smem, const float* global, bool valid) {
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

struct StageTiles {
  float w[kColsPerBlock][kPitch];
  float x[kRowsPerTile][kPitch];
};

// Queues chunk `chunk` of the weight tile (kColsPerBlock rows of w) and of the row tile (rows
// of x) into `stage`. Both have rows `ld` floats apart and k_len values in use. Rows past the
// matrix and k past k_len are zero-filled, so they add nothing.
__device__ __forceinline__ void load_chunk(StageTiles& stage, const float* w, const float* x,
                                           int n_valid, int rows_valid, int k_len, int64_t ld,
                                           int chunk) {
  const int k0 = chunk * kChunk;
  constexpr int kSegments = kChunk / 4;  // 16-byte segments per row chunk
#pragma unroll
  for (int s = threadIdx.x; s < kColsPerBlock * kSegments; s += kFewRowsThreads) {
    const int n = s / kSegments, k = k0 + (s % kSegments) * 4;
    const bool valid = n < n_valid && k < k_len;
    copy16_async(&stage.w[n][k - k0], valid ? w + n * ld + k : w, valid);
  }
#pragma unroll
  for (int s = threadIdx.x; s < kRowsPerTile * kSegments; s += kFewRowsThreads) {
    const int m = s / kSegments, k = k0 + (s % kSegments) * 4;
    const bool valid = m < rows_valid && k < k_len;
    copy16_async(&stage.x[m][k - k0], valid ? x + m * ld + k : x, valid);
  }
}

// acc[i][j] += x[row_group + 4i][k] w[lane + 32j][k] over this warp's half of a chunk, for the
// first Rows of the warp's rows.
template <int Rows>
__device__ __forceinline__ void multiply_chunk(float (&acc)[kRowsPerWarp][kColsPerLane],
                                               const StageTiles& s, int row_group, int lane,
                                               int k_begin) {
#pragma unroll
  for (int kk = 0; kk < kHalfChunk; kk += 4) {
    const int k = k_begin + kk;
    float4 wv[kColsPerLane];
#pragma unroll
    for (int j = 0; j < kColsPerLane; ++j) {
      wv[j] = *reinterpret_cast<const float4*>(&s.w[lane + 32 * j][k]);
    }
#pragma unroll
    for (int i = 0; i < Rows; ++i) {
      const float4 xv = *reinterpret_cast<const float4*>(&s.x[row_group + kRowGroups * i][k]);
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

// The block's work for one weight tile: out[r, n] = sum over k < k_len of in[r, k] w[n, k] for
// rows r in [row_begin, row_end) (taking every gridDim.z-th 32-row tile from blockIdx.z) and
// the block's n_valid columns. in and w rows are ld floats apart, out rows ld_out; w and out
// already point at the block's first column.
__device__ __forceinline__ void multiply_tiles(float* __restrict__ out, int64_t ld_out,
                                               const float* __restrict__ in,
                                               const float* __restrict__ w, int row_begin,
                                               int row_end, int n_valid, int k_len, int64_t ld) {
  extern __shared__ __align__(16) unsigned char stage_bytes[];
  StageTiles* stages = reinterpret_cast<StageTiles*>(stage_bytes);
  // After a tile's last chunk the ring is free: the upper k half's partial sums go there.
  auto* halves = reinterpret_cast<float(*)[kColsPerBlock + 1]>(stage_bytes);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row_group = warp % kRowGroups, k_half = warp / kRowGroups;
  const int chunks = (k_len + kChunk - 1) / kChunk;

  for (int t0 = row_begin + int(blockIdx.z) * kRowsPerTile; t0 < row_end;
       t0 += int(gridDim.z) * kRowsPerTile) {
    const int rows_valid = min(kRowsPerTile, row_end - t0);
    const float* x_tile = in + t0 * ld;
    // Rows this warp owns that exist: a warp-uniform bound, so warps past the tile's rows skip
    // the multiply-adds (decode tiles are mostly short).
    const int my_rows =
        rows_valid > row_group ? (rows_valid - row_group + kRowGroups - 1) / kRowGroups : 0;
    float acc[kRowsPerWarp][kColsPerLane] = {};

    for (int c = 0; c < kStages - 1; ++c) {
      if (c < chunks) load_chunk(stages[c], w, x_tile, n_valid, rows_valid, k_len, ld, c);
      commit_async();
    }
    for (int c = 0; c < chunks; ++c) {
      wait_async<kStages - 2>();
      __syncthreads();  // chunk c is visible to all; the stage refilled below is free
      const int next = c + kStages - 1;
      if (next < chunks) {
        load_chunk(stages[next % kStages], w, x_tile, n_valid, rows_valid, k_len, ld, next);
      }
      commit_async();
      const StageTiles& s = stages[c % kStages];
      const int k_begin = k_half * kHalfChunk;
      // A real branch on the warp-uniform row count: with a runtime bound inside the unrolled
      // loop the compiler predicates, and the skipped rows' instructions are issued anyway
      // (measured: about twice the instructions at 4 rows of 8).
      switch (my_rows) {
        case 8: multiply_chunk<8>(acc, s, row_group, lane, k_begin); break;
        case 7: multiply_chunk<7>(acc, s, row_group, lane, k_begin); break;
        case 6: multiply_chunk<6>(acc, s, row_group, lane, k_begin); break;
        case 5: multiply_chunk<5>(acc, s, row_group, lane, k_begin); break;
        case 4: multiply_chunk<4>(acc, s, row_group, lane, k_begin); break;
        case 3: multiply_chunk<3>(acc, s, row_group, lane, k_begin); break;
        case 2: multiply_chunk<2>(acc, s, row_group, lane, k_begin); break;
        case 1: multiply_chunk<1>(acc, s, row_group, lane, k_begin); break;
        default: break;
      }
    }
    wait_async<0>();
    __syncthreads();  // every warp is done with the ring: it now holds the upper halves
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

// Grouped: block (column tile, group g, row slice). Rows offsets[g]..offsets[g+1]-1 of in
// against w_g = w[g] ([N, K]).
__global__ void __launch_bounds__(kFewRowsThreads, 2)
    few_rows_grouped_kernel(float* __restrict__ out, const float* __restrict__ in,
                            const float* __restrict__ w, const int32_t* __restrict__ offsets,
                            int N, int K) {
  const int group = blockIdx.y, n0 = blockIdx.x * kColsPerBlock;
  multiply_tiles(out + n0, N, in, w + (int64_t(group) * N + n0) * K, offsets[group],
                 offsets[group + 1], min(kColsPerBlock, N - n0), K, K);
}

// Dense, k split across blocks: block (column tile, split s, row tile) writes the sum over its
// k range [s * k_split, (s + 1) * k_split) to partial[s] ([M, N]); reduce_splits adds them.
__global__ void __launch_bounds__(kFewRowsThreads, 2)
    few_rows_split_kernel(float* __restrict__ partial, const float* __restrict__ in,
                          const float* __restrict__ w, int M, int N, int K, int k_split) {
  const int split = blockIdx.y, n0 = blockIdx.x * kColsPerBlock;
  const int k0 = split * k_split;
  multiply_tiles(partial + int64_t(split) * M * N + n0, N, in + k0, w + int64_t(n0) * K + k0, 0,
                 M, min(kColsPerBlock, N - n0), min(k_split, K - k0), K);
}

// out[i] (+)= partial[0][i] + partial[1][i] + ... in split order: deterministic.
__global__ void reduce_splits_kernel(float* __restrict__ out, const float* __restrict__ partial,
                                     int64_t n, int splits, bool accumulate) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s) sum += partial[s * n + i];
    out[i] = accumulate ? out[i] + sum : sum;
  }
}

constexpr size_t kSmemBytes = sizeof(StageTiles) * kStages;  // above the 48 KB static limit
static_assert(sizeof(float) * kRowsPerTile * (kColsPerBlock + 1) <= kSmemBytes);

template <typename Kernel>
void allow_large_smem(Kernel kernel) {
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  int(kSmemBytes)));
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

}  // namespace

void few_rows_matmul(float* out, const float* in, const float* w, const int32_t* offsets,
                     int n_groups, int rows, int N, int K, cudaStream_t stream) {
  if (rows <= 0 || N <= 0) return;
  static const bool ready = (allow_large_smem(few_rows_grouped_kernel), true);
  (void)ready;
  // Row-tile slices per group: enough that an average group's tiles run side by side; a group
  // with more rows than that loops, re-reading its weight tile from L2.
  const int tiles = (rows + kRowsPerTile - 1) / kRowsPerTile;
  const int slices = std::max(1, std::min(tiles, (tiles + n_groups - 1) / n_groups));
  const dim3 grid((N + kColsPerBlock - 1) / kColsPerBlock, n_groups, slices);
  few_rows_grouped_kernel<<<grid, kFewRowsThreads, kSmemBytes, stream>>>(out, in, w, offsets, N,
                                                                         K);
  CUDA_CHECK_LAUNCH();
}

int64_t few_rows_dense_scratch_floats(int M, int N, int K) {
  return int64_t(few_rows_dense_splits(M, N, K)) * M * N;
}

int few_rows_dense_splits(int M, int N, int K) {
  // Enough blocks for two per multiprocessor, each split keeping at least 4 chunks of k.
  const int64_t tiles = int64_t((M + kRowsPerTile - 1) / kRowsPerTile) *
                        ((N + kColsPerBlock - 1) / kColsPerBlock);
  const int64_t wanted = (2 * multiprocessors() + tiles - 1) / tiles;
  const int64_t most = std::max(1, K / (4 * kChunk));
  return int(std::clamp<int64_t>(wanted, 1, most));
}

void few_rows_dense_matmul(float* out, const float* in, const float* w, int M, int N, int K,
                           bool accumulate, float* partial, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return;
  static const bool ready = (allow_large_smem(few_rows_split_kernel), true);
  (void)ready;
  const int splits = few_rows_dense_splits(M, N, K);
  // Splits of whole chunks, so every block but the last streams full 16-byte segments.
  const int k_split = ((K + splits - 1) / splits + kChunk - 1) / kChunk * kChunk;
  const int used = (K + k_split - 1) / k_split;
  const dim3 grid((N + kColsPerBlock - 1) / kColsPerBlock, used,
                  (M + kRowsPerTile - 1) / kRowsPerTile);
  few_rows_split_kernel<<<grid, kFewRowsThreads, kSmemBytes, stream>>>(partial, in, w, M, N, K,
                                                                       k_split);
  CUDA_CHECK_LAUNCH();
  const int64_t n = int64_t(M) * N;
  reduce_splits_kernel<<<grid_for(n), kThreads, 0, stream>>>(out, partial, n, used, accumulate);
  CUDA_CHECK_LAUNCH();
}

}  // namespace rlhf::cuda
