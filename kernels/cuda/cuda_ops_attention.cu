// Causal grouped-query attention for the CUDA backend, FP32 on the CUDA cores (no tensor cores,
// no T x S matrix in memory).
//
// Tiled kernels (head_dim 16, 32, 64, 128; 128 threads = 4 warps, tiles of kTile = 32):
// - Rows. The query rows of one (b, kv head) are taken together over the group's heads,
//   r = t * group + g (query head kvh * group + g), so a K/V tile staged once serves every
//   head that reads it. Row r sees cache positions 0 .. start[b] + t.
// - Forward: a block owns 32 rows of one (b, kvh), 8 per warp (a decode step's 4 or 8 rows of
//   a group on a wide grid: 1 or 2 per warp), and streams the keys its last row sees in tiles
//   of 32, K and V loaded coalesced (thread i takes element i of the tile)
//   into shared memory. Scores: lane = key, each lane dots its K row (padded to HD + 1 floats,
//   so the 32 lanes hit 32 banks) with the warp's 8 Q rows (broadcast reads). Online softmax
//   per row with warp shuffles; then lane = column for acc += p v, p passed by shuffle.
//   When the grid would be small (decode, small batches: under kForwardTargetBlocks blocks),
//   the keys are split into fixed ranges of keys_per_split (grid.y), each split writes its
//   (acc, m, l) to scratch, and attention_combine_kernel merges the splits in split order.
// - dq: the same tiling, recomputing p = exp(s - lse) and ds = p (dp - delta) scale per key
//   tile; the block also writes delta = dout . out of its rows.
// - dk, dv: a block owns 32 cache positions of one (b, kvh), 8 per warp, and streams the group
//   rows that see them (from row (j0 - start) * group on) in tiles of 32, Q and dout padded
//   (lane = row for the dot products).
// Determinism: each output element is accumulated by one thread, over keys (or rows) in
// ascending order; the warp reductions are fixed butterflies; the split count and ranges
// depend only on the shape (never on the device), and the combine walks the splits in order.
// No atomics, so results repeat bit for bit.
// Shared memory (dynamic, opted in above 48 KB): forward 32 (3 HD + 1) floats, dq
// 32 (4 HD + 2), dk/dv 32 (4 HD + 4): at HD = 128, 49 280, 65 792 and 66 048 bytes; at HD = 64
// about half. Registers (ptxas, sm_90a, CUDA 13): at most 136 per thread (dq, HD 128); dk/dv at
// HD 64 and 128 spill 4 bytes (8 bytes loaded), nothing else spills.
//
// Other head_dims (up to kAttnMaxHeadDim = 256) use the row kernels: one block of kAttnThreads
// threads per query row (forward, dq) or per key row (dk, dv) walks the other side in chunks of
// kAttnThreads, each thread owning head-dim columns tid and tid + kAttnThreads; same online
// softmax and recomputation, same determinism.
#include <algorithm>
#include <type_traits>

#include "kernels/cuda/cuda_ops_device.cuh"
#include "kernels/cuda/cuda_ops_kernels.cuh"

namespace rlhf::cuda {

namespace {

constexpr int kAttnThreads = 128;
constexpr int kAttnMaxHeadDim = 2 * kAttnThreads;

__device__ __forceinline__ float dot_shared(const float* shared_vec, const float* row, int hd) {
  float s = 0;
  for (int c = 0; c < hd; ++c) s += shared_vec[c] * row[c];
  return s;
}

// cache0 <- kv0, then (when cache1 is given) cache1 <- kv1, in one launch.
__global__ void kv_cache_write_kernel(float* cache0, const float* kv0, float* cache1,
                                      const float* kv1, AttentionShape s) {
  const int64_t row = int64_t(s.n_kv_heads) * s.head_dim;
  const int64_t n0 = int64_t(s.batch) * s.n_new * row, n = cache1 ? 2 * n0 : n0;
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < n;
       j += int64_t(gridDim.x) * blockDim.x) {
    const bool first = j < n0;
    float* cache = first ? cache0 : cache1;
    const float* kv = first ? kv0 : kv1;
    const int64_t i = first ? j : j - n0;
    const int64_t c = i % row, bt = i / row;
    const int64_t b = bt / s.n_new, t = bt % s.n_new;
    const int64_t pos = int64_t(s.start[b]) + t;
    // The caller checked the bounds on its host copy of start[]; never write past this row.
    if (pos >= 0 && pos < s.capacity) cache[(b * s.capacity + pos) * row + c] = kv[i];
  }
}

// grid (T, Hq, B): query t of head h of sequence b.
__global__ void attention_forward_kernel(float* out, float* lse, const float* q, const float* k,
                                         const float* v, AttentionShape s, float scale) {
  __shared__ float q_sh[kAttnMaxHeadDim];
  __shared__ float p_sh[kAttnThreads];
  __shared__ float red[32];
  const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const int hd = s.head_dim, kvh = h / (s.n_heads / s.n_kv_heads);
  const int64_t q_row = int64_t(s.n_heads) * hd, kv_row = int64_t(s.n_kv_heads) * hd;
  const int64_t qi = (int64_t(b) * s.n_new + t) * q_row + int64_t(h) * hd;
  const float* kb = k + int64_t(b) * s.capacity * kv_row + int64_t(kvh) * hd;
  const float* vb = v + int64_t(b) * s.capacity * kv_row + int64_t(kvh) * hd;
  for (int c = tid; c < hd; c += kAttnThreads) q_sh[c] = q[qi + c];
  __syncthreads();
  const int last = s.start[b] + t;  // attends to 0..last
  float m = -INFINITY, l = 0;
  float acc0 = 0, acc1 = 0;
  for (int j0 = 0; j0 <= last; j0 += kAttnThreads) {
    const int j = j0 + tid;
    const float score = j <= last ? dot_shared(q_sh, kb + int64_t(j) * kv_row, hd) * scale
                                  : -INFINITY;
    const float new_m = fmaxf(m, block_max(score, red));
    const float p = j <= last ? expf(score - new_m) : 0.0f;
    p_sh[tid] = p;
    const float chunk_sum = block_sum(p, red);  // its barriers publish p_sh
    const float correction = expf(m - new_m);   // 0 on the first chunk (m = -inf)
    l = l * correction + chunk_sum;
    const int count = min(kAttnThreads, last + 1 - j0);
    acc0 *= correction;
    acc1 *= correction;
    for (int jj = 0; jj < count; ++jj) {
      const float* vj = vb + int64_t(j0 + jj) * kv_row;
      const float pj = p_sh[jj];
      if (tid < hd) acc0 += pj * vj[tid];
      if (tid + kAttnThreads < hd) acc1 += pj * vj[tid + kAttnThreads];
    }
    m = new_m;
    __syncthreads();  // p_sh is rewritten by the next chunk
  }
  const float inv = 1.0f / l;
  if (tid < hd) out[qi + tid] = acc0 * inv;
  if (tid + kAttnThreads < hd) out[qi + tid + kAttnThreads] = acc1 * inv;
  if (lse && tid == 0) lse[(int64_t(b) * s.n_heads + h) * s.n_new + t] = m + logf(l);
}

// grid (T, Hq, B): dq of one query row, and delta = dout . out for the key-side kernel.
__global__ void attention_backward_dq_kernel(float* dq, float* delta, const float* dout,
                                             const float* out, const float* lse, const float* q,
                                             const float* k, const float* v, AttentionShape s,
                                             float scale) {
  __shared__ float q_sh[kAttnMaxHeadDim];
  __shared__ float do_sh[kAttnMaxHeadDim];
  __shared__ float ds_sh[kAttnThreads];
  __shared__ float red[32];
  const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const int hd = s.head_dim, kvh = h / (s.n_heads / s.n_kv_heads);
  const int64_t q_row = int64_t(s.n_heads) * hd, kv_row = int64_t(s.n_kv_heads) * hd;
  const int64_t qi = (int64_t(b) * s.n_new + t) * q_row + int64_t(h) * hd;
  const float* kb = k + int64_t(b) * s.capacity * kv_row + int64_t(kvh) * hd;
  const float* vb = v + int64_t(b) * s.capacity * kv_row + int64_t(kvh) * hd;
  float d = 0;
  for (int c = tid; c < hd; c += kAttnThreads) {
    q_sh[c] = q[qi + c];
    do_sh[c] = dout[qi + c];
    d += dout[qi + c] * out[qi + c];
  }
  d = block_sum(d, red);  // its barriers publish q_sh, do_sh
  const int64_t row_index = (int64_t(b) * s.n_heads + h) * s.n_new + t;
  if (tid == 0) delta[row_index] = d;
  const float l = lse[row_index];
  const int last = s.start[b] + t;
  float acc0 = 0, acc1 = 0;
  for (int j0 = 0; j0 <= last; j0 += kAttnThreads) {
    const int j = j0 + tid;
    float ds = 0;
    if (j <= last) {
      const float score = dot_shared(q_sh, kb + int64_t(j) * kv_row, hd);
      const float dp = dot_shared(do_sh, vb + int64_t(j) * kv_row, hd);
      ds = expf(score * scale - l) * (dp - d) * scale;
    }
    ds_sh[tid] = ds;
    __syncthreads();
    const int count = min(kAttnThreads, last + 1 - j0);
    for (int jj = 0; jj < count; ++jj) {
      const float* kj = kb + int64_t(j0 + jj) * kv_row;
      if (tid < hd) acc0 += ds_sh[jj] * kj[tid];
      if (tid + kAttnThreads < hd) acc1 += ds_sh[jj] * kj[tid + kAttnThreads];
    }
    __syncthreads();
  }
  if (tid < hd) dq[qi + tid] = acc0;
  if (tid + kAttnThreads < hd) dq[qi + tid + kAttnThreads] = acc1;
}

// grid (S, Hkv, B): dk and dv of cache position j, summed over the group's query heads and the
// queries that see j (start[b] + t >= j), heads outer and queries inner as on the CPU.
__global__ void attention_backward_dkv_kernel(float* dk, float* dv, const float* dout,
                                              const float* delta, const float* lse,
                                              const float* q, const float* k, const float* v,
                                              AttentionShape s, float scale) {
  __shared__ float k_sh[kAttnMaxHeadDim];
  __shared__ float v_sh[kAttnMaxHeadDim];
  __shared__ float p_sh[kAttnThreads];
  __shared__ float ds_sh[kAttnThreads];
  const int j = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const int hd = s.head_dim, group = s.n_heads / s.n_kv_heads;
  const int64_t q_row = int64_t(s.n_heads) * hd, kv_row = int64_t(s.n_kv_heads) * hd;
  const int64_t kj = (int64_t(b) * s.capacity + j) * kv_row + int64_t(kvh) * hd;
  for (int c = tid; c < hd; c += kAttnThreads) {
    k_sh[c] = k[kj + c];
    v_sh[c] = v[kj + c];
  }
  __syncthreads();
  const int first_t = max(0, j - s.start[b]);  // queries before it do not see j
  float dk0 = 0, dk1 = 0, dv0 = 0, dv1 = 0;
  for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
    for (int t0 = first_t; t0 < s.n_new; t0 += kAttnThreads) {
      const int t = t0 + tid;
      float p = 0, ds = 0;
      if (t < s.n_new) {
        const int64_t qi = (int64_t(b) * s.n_new + t) * q_row + int64_t(h) * hd;
        const int64_t row_index = (int64_t(b) * s.n_heads + h) * s.n_new + t;
        const float score = dot_shared(k_sh, q + qi, hd);
        const float dp = dot_shared(v_sh, dout + qi, hd);
        p = expf(score * scale - lse[row_index]);
        ds = p * (dp - delta[row_index]) * scale;
      }
      p_sh[tid] = p;
      ds_sh[tid] = ds;
      __syncthreads();
      const int count = min(kAttnThreads, s.n_new - t0);
      for (int tt = 0; tt < count; ++tt) {
        const int64_t qi = (int64_t(b) * s.n_new + t0 + tt) * q_row + int64_t(h) * hd;
        if (tid < hd) {
          dv0 += p_sh[tt] * dout[qi + tid];
          dk0 += ds_sh[tt] * q[qi + tid];
        }
        if (tid + kAttnThreads < hd) {
          dv1 += p_sh[tt] * dout[qi + tid + kAttnThreads];
          dk1 += ds_sh[tt] * q[qi + tid + kAttnThreads];
        }
      }
      __syncthreads();
    }
  }
  if (tid < hd) {
    dk[kj + tid] = dk0;
    dv[kj + tid] = dv0;
  }
  if (tid + kAttnThreads < hd) {
    dk[kj + tid + kAttnThreads] = dk1;
    dv[kj + tid + kAttnThreads] = dv1;
  }
}

// ---- Tiled kernels (head_dim 16, 32, 64, 128) ----

constexpr int kTile = 32;                       // query rows or keys per tile (one per lane)
constexpr int kTileWarps = 4;                   // warps per block
constexpr int kTileThreads = 32 * kTileWarps;   // 128
constexpr int kRowsPerWarp = kTile / kTileWarps;  // 8 rows (or keys) of the tile per warp
// Blocks the forward aims for before it splits the keys (decode: few query rows).
constexpr int kForwardTargetBlocks = 256;
constexpr int kForwardMinSplitKeys = 128;  // no split gets fewer keys than this

// Query row r of kv head kvh's group: r = t * group + g, query head h = kvh * group + g. Rows
// past the last (R = T * group) are clamped to it, computed and never written, so no row of a
// tile is empty (no -inf - -inf).
struct GroupRow {
  int t, h;
  int64_t q_offset;  // of q[b, t, h, 0]
  int64_t row_index;  // (b * Hq + h) * T + t: lse, delta
};

__device__ __forceinline__ GroupRow group_row(const AttentionShape& s, int b, int kvh, int r) {
  const int group = s.n_heads / s.n_kv_heads;
  r = min(r, s.n_new * group - 1);
  GroupRow row;
  row.t = r / group;
  row.h = kvh * group + r % group;
  row.q_offset = ((int64_t(b) * s.n_new + row.t) * s.n_heads + row.h) * s.head_dim;
  row.row_index = (int64_t(b) * s.n_heads + row.h) * s.n_new + row.t;
  return row;
}

// Rows query rows (starting at row r0 of the group) into dst[Rows][stride], coalesced: a
// group's heads are adjacent in q, so consecutive rows of one t are one contiguous run.
template <int HD, int Rows = kTile>
__device__ __forceinline__ void load_query_tile(float* dst, int stride, const float* src,
                                                const AttentionShape& s, int b, int kvh, int r0) {
  for (int e = threadIdx.x; e < Rows * HD; e += kTileThreads) {
    const int i = e / HD, c = e % HD;
    dst[i * stride + c] = src[group_row(s, b, kvh, r0 + i).q_offset + c];
  }
}

// kTile cache rows j0.. of (b, kvh) into dst[kTile][stride]; rows at or past end are zeros.
template <int HD>
__device__ __forceinline__ void load_key_tile(float* dst, int stride, const float* src,
                                              const AttentionShape& s, int b, int kvh, int j0,
                                              int end) {
  const int64_t kv_row = int64_t(s.n_kv_heads) * HD;
  const float* base = src + int64_t(b) * s.capacity * kv_row + int64_t(kvh) * HD;
  for (int e = threadIdx.x; e < kTile * HD; e += kTileThreads) {
    const int i = e / HD, c = e % HD;
    dst[i * stride + c] = j0 + i < end ? base[int64_t(j0 + i) * kv_row + c] : 0.0f;
  }
}

// acc[i] += bcast[row0 + i] . own for the warp's Rows rows (kRowsPerWarp unless said), over c
// ascending. The bcast rows (all lanes read the same address) are 16-byte aligned and read as
// float4: one shared load per 4 columns and row; own is the lane's padded row, read as scalars.
template <int HD, int Rows = kRowsPerWarp>
__device__ __forceinline__ void dot_warp_rows(float (&acc)[Rows], const float* bcast, int row0,
                                              const float* own) {
#pragma unroll 1  // unrolled further, ptxas spills more in dk/dv (sm_90a, CUDA 13)
  for (int c = 0; c < HD; c += 4) {
    const float o0 = own[c], o1 = own[c + 1], o2 = own[c + 2], o3 = own[c + 3];
#pragma unroll
    for (int i = 0; i < Rows; ++i) {
      const float4 b = *reinterpret_cast<const float4*>(bcast + (row0 + i) * HD + c);
      acc[i] += b.x * o0;
      acc[i] += b.y * o1;
      acc[i] += b.z * o2;
      acc[i] += b.w * o3;
    }
  }
}

// Columns of a head row a lane owns: c = lane + 32 * n, n < kCols.
template <int HD>
constexpr int kCols = (HD + 31) / 32;

// grid (row tiles, key splits, B * Hkv), kTileThreads threads. A row tile is 4 RowsPerWarp
// query rows and warp w owns rows w*RowsPerWarp .. +RowsPerWarp-1 of it; in the score phase
// lane = key of the tile, in the PV phase lane = column. RowsPerWarp is 8, or 1 or 2 for a
// decode step's few rows of a group on a wide grid (forward_rows_per_warp): tiles of 32 rows
// give each warp 8 rows to walk, most of them copies of the last real one. Each row's
// arithmetic is the same either way (same key order, same sums), so the choice changes no
// bit.
// With one split, writes out and lse; with several, each split writes its unnormalized
// (acc, m, l) to partials and attention_combine_kernel merges them in split order.
template <int HD, int RowsPerWarp>
__global__ void __launch_bounds__(kTileThreads)
    attention_forward_tiled_kernel(float* out, float* lse, float* partials, const float* q,
                                   const float* k, const float* v, AttentionShape s, float scale,
                                   int keys_per_split) {
  extern __shared__ float smem[];
  constexpr int kRowTile = kTileWarps * RowsPerWarp;
  float* q_sh = smem;                              // [kRowTile][HD]
  float* k_sh = q_sh + kTile * HD;                 // [kTile][HD + 1]: lane = key, no conflicts
  float* v_sh = k_sh + kTile * (HD + 1);           // [kTile][HD]
  const int group = s.n_heads / s.n_kv_heads, rows = s.n_new * group;
  const int r0 = blockIdx.x * kRowTile, split = blockIdx.y;
  const int b = blockIdx.z / s.n_kv_heads, kvh = blockIdx.z % s.n_kv_heads;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int start = s.start[b];
  // Keys of this block: the split's range, cut at the last key its last row sees.
  const int key_lo = split * keys_per_split;
  const int key_hi =
      min(key_lo + keys_per_split, start + group_row(s, b, kvh, r0 + kRowTile - 1).t + 1);
  int last[RowsPerWarp];
  float m[RowsPerWarp], l[RowsPerWarp], acc[RowsPerWarp][kCols<HD>];
#pragma unroll
  for (int i = 0; i < RowsPerWarp; ++i) {
    last[i] = start + group_row(s, b, kvh, r0 + warp * RowsPerWarp + i).t;
    m[i] = -INFINITY;
    l[i] = 0;
#pragma unroll
    for (int n = 0; n < kCols<HD>; ++n) acc[i][n] = 0;
  }
  load_query_tile<HD, kRowTile>(q_sh, HD, q, s, b, kvh, r0);
  for (int j0 = key_lo; j0 < key_hi; j0 += kTile) {
    __syncthreads();  // the previous tile's readers are done (and q_sh is published)
    load_key_tile<HD>(k_sh, HD + 1, k, s, b, kvh, j0, key_hi);
    load_key_tile<HD>(v_sh, HD, v, s, b, kvh, j0, key_hi);
    __syncthreads();
    float p[RowsPerWarp];
#pragma unroll
    for (int i = 0; i < RowsPerWarp; ++i) p[i] = 0;
    dot_warp_rows<HD, RowsPerWarp>(p, q_sh, warp * RowsPerWarp, k_sh + lane * (HD + 1));
    const int j = j0 + lane;
#pragma unroll
    for (int i = 0; i < RowsPerWarp; ++i) {
      const bool seen = j < key_hi && j <= last[i];
      const float score = p[i] * scale;
      const float new_m = fmaxf(m[i], warp_max(seen ? score : -INFINITY));
      p[i] = seen ? expf(score - new_m) : 0.0f;  // seen: new_m >= score is finite
      // A row may see no key of this split yet (m and new_m both -inf): leave it as it is.
      const float correction = new_m == -INFINITY ? 1.0f : expf(m[i] - new_m);
      l[i] = l[i] * correction + warp_sum(p[i]);
      m[i] = new_m;
#pragma unroll
      for (int n = 0; n < kCols<HD>; ++n) acc[i][n] *= correction;
    }
    for (int jj = 0; jj < kTile; ++jj) {
#pragma unroll
      for (int n = 0; n < kCols<HD>; ++n) {
        const int c = lane + 32 * n;
        const float vc = c < HD ? v_sh[jj * HD + c] : 0.0f;
#pragma unroll
        for (int i = 0; i < RowsPerWarp; ++i) {
          acc[i][n] += __shfl_sync(0xffffffffu, p[i], jj) * vc;
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < RowsPerWarp; ++i) {
    const int r = r0 + warp * RowsPerWarp + i;
    if (r >= rows) break;
    const GroupRow row = group_row(s, b, kvh, r);
    if (gridDim.y == 1) {
      const float inv = 1.0f / l[i];
#pragma unroll
      for (int n = 0; n < kCols<HD>; ++n) {
        const int c = lane + 32 * n;
        if (c < HD) out[row.q_offset + c] = acc[i][n] * inv;
      }
      if (lse && lane == 0) lse[row.row_index] = m[i] + logf(l[i]);
    } else {
      // partials: [splits][B * Hq * T][HD + 2], (acc..., m, l)
      const int64_t n_rows = int64_t(s.batch) * s.n_heads * s.n_new;
      float* part = partials + (int64_t(split) * n_rows + row.row_index) * (HD + 2);
#pragma unroll
      for (int n = 0; n < kCols<HD>; ++n) {
        const int c = lane + 32 * n;
        if (c < HD) part[c] = acc[i][n];
      }
      if (lane == 0) {
        part[HD] = m[i];
        part[HD + 1] = l[i];
      }
    }
  }
}

// grid (B * Hq * T), 32 threads: merges the key splits of one query row in split order.
// Split 0 holds key 0, which every row sees, so its m is finite; an empty split has m = -inf
// and weight exp(-inf) = 0.
__global__ void attention_combine_kernel(float* out, float* lse, const float* partials,
                                         AttentionShape s, int splits) {
  const int64_t row_index = blockIdx.x;  // (b * Hq + h) * T + t
  const int hd = s.head_dim, lane = threadIdx.x;
  const int64_t n_rows = int64_t(s.batch) * s.n_heads * s.n_new;
  const int t = int(row_index % s.n_new);
  const int64_t bh = row_index / s.n_new;
  const int h = int(bh % s.n_heads), b = int(bh / s.n_heads);
  const int64_t qi = ((int64_t(b) * s.n_new + t) * s.n_heads + h) * hd;
  float m = -INFINITY;
  for (int sp = 0; sp < splits; ++sp) {
    m = fmaxf(m, partials[(sp * n_rows + row_index) * (hd + 2) + hd]);
  }
  float l = 0;
  for (int sp = 0; sp < splits; ++sp) {
    const float* part = partials + (sp * n_rows + row_index) * (hd + 2);
    l += part[hd + 1] * expf(part[hd] - m);
  }
  const float inv = 1.0f / l;
  for (int c = lane; c < hd; c += 32) {
    float o = 0;
    for (int sp = 0; sp < splits; ++sp) {
      const float* part = partials + (sp * n_rows + row_index) * (hd + 2);
      o += part[c] * expf(part[hd] - m);
    }
    out[qi + c] = o * inv;
  }
  if (lse && lane == 0) lse[row_index] = m + logf(l);
}

// grid (row tiles, 1, B * Hkv), kTileThreads threads: dq of a tile of the group's query rows,
// and delta = dout . out of each (for the key-side kernel). Keys stream as in the forward;
// lane = key for the scores, lane = column for dq += ds k.
template <int HD>
__global__ void __launch_bounds__(kTileThreads)
    attention_backward_dq_tiled_kernel(float* dq, float* delta, const float* dout,
                                       const float* out, const float* lse, const float* q,
                                       const float* k, const float* v, AttentionShape s,
                                       float scale) {
  extern __shared__ float smem[];
  float* q_sh = smem;                       // [kTile][HD]
  float* do_sh = q_sh + kTile * HD;         // [kTile][HD]
  float* k_sh = do_sh + kTile * HD;         // [kTile][HD + 1]
  float* v_sh = k_sh + kTile * (HD + 1);    // [kTile][HD + 1]
  const int group = s.n_heads / s.n_kv_heads, rows = s.n_new * group;
  const int r0 = blockIdx.x * kTile;
  const int b = blockIdx.z / s.n_kv_heads, kvh = blockIdx.z % s.n_kv_heads;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int start = s.start[b];
  const int key_hi = start + group_row(s, b, kvh, r0 + kTile - 1).t + 1;
  load_query_tile<HD>(q_sh, HD, q, s, b, kvh, r0);
  load_query_tile<HD>(do_sh, HD, dout, s, b, kvh, r0);
  __syncthreads();
  int last[kRowsPerWarp];
  float row_lse[kRowsPerWarp], row_delta[kRowsPerWarp], acc[kRowsPerWarp][kCols<HD>];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = r0 + warp * kRowsPerWarp + i;
    const GroupRow row = group_row(s, b, kvh, r);
    last[i] = start + row.t;
    row_lse[i] = lse[row.row_index];
    float d = 0;
#pragma unroll
    for (int n = 0; n < kCols<HD>; ++n) {
      const int c = lane + 32 * n;
      if (c < HD) d += do_sh[(warp * kRowsPerWarp + i) * HD + c] * out[row.q_offset + c];
    }
    row_delta[i] = warp_sum(d);
    if (r < rows && lane == 0) delta[row.row_index] = row_delta[i];
#pragma unroll
    for (int n = 0; n < kCols<HD>; ++n) acc[i][n] = 0;
  }
  for (int j0 = 0; j0 < key_hi; j0 += kTile) {
    __syncthreads();  // the previous tile's readers are done
    load_key_tile<HD>(k_sh, HD + 1, k, s, b, kvh, j0, key_hi);
    load_key_tile<HD>(v_sh, HD + 1, v, s, b, kvh, j0, key_hi);
    __syncthreads();
    float score[kRowsPerWarp], dp[kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) score[i] = dp[i] = 0;
    dot_warp_rows<HD>(score, q_sh, warp * kRowsPerWarp, k_sh + lane * (HD + 1));
    dot_warp_rows<HD>(dp, do_sh, warp * kRowsPerWarp, v_sh + lane * (HD + 1));
    const int j = j0 + lane;
    float ds[kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      ds[i] = j < key_hi && j <= last[i]
                  ? expf(score[i] * scale - row_lse[i]) * (dp[i] - row_delta[i]) * scale
                  : 0.0f;
    }
    for (int jj = 0; jj < kTile; ++jj) {
#pragma unroll
      for (int n = 0; n < kCols<HD>; ++n) {
        const int c = lane + 32 * n;
        const float kc = c < HD ? k_sh[jj * (HD + 1) + c] : 0.0f;
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) {
          acc[i][n] += __shfl_sync(0xffffffffu, ds[i], jj) * kc;
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = r0 + warp * kRowsPerWarp + i;
    if (r >= rows) break;
    const int64_t qi = group_row(s, b, kvh, r).q_offset;
#pragma unroll
    for (int n = 0; n < kCols<HD>; ++n) {
      const int c = lane + 32 * n;
      if (c < HD) dq[qi + c] = acc[i][n];
    }
  }
}

// grid (key tiles, 1, B * Hkv), kTileThreads threads: dk and dv of kTile cache positions of
// (b, kvh), summed over the group's query rows that see them, in row order (t outer, head
// inner). Warp w owns keys w*8 .. w*8+7; lane = query row of the tile for p and ds, lane =
// column for the sums. Rows come in tiles of kTile from the first row that sees the first key.
template <int HD>
__global__ void __launch_bounds__(kTileThreads)
    attention_backward_dkv_tiled_kernel(float* dk, float* dv, const float* dout,
                                        const float* delta, const float* lse, const float* q,
                                        const float* k, const float* v, AttentionShape s,
                                        float scale) {
  extern __shared__ float smem[];
  float* k_sh = smem;                        // [kTile][HD]
  float* v_sh = k_sh + kTile * HD;           // [kTile][HD]
  float* q_sh = v_sh + kTile * HD;           // [kTile][HD + 1]: lane = row, no conflicts
  float* do_sh = q_sh + kTile * (HD + 1);    // [kTile][HD + 1]
  float* lse_sh = do_sh + kTile * (HD + 1);  // [kTile]
  float* delta_sh = lse_sh + kTile;          // [kTile]
  const int group = s.n_heads / s.n_kv_heads, rows = s.n_new * group;
  const int j0 = blockIdx.x * kTile;
  const int b = blockIdx.z / s.n_kv_heads, kvh = blockIdx.z % s.n_kv_heads;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int start = s.start[b];
  load_key_tile<HD>(k_sh, HD, k, s, b, kvh, j0, s.capacity);
  load_key_tile<HD>(v_sh, HD, v, s, b, kvh, j0, s.capacity);
  float dk_acc[kRowsPerWarp][kCols<HD>], dv_acc[kRowsPerWarp][kCols<HD>];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
#pragma unroll
    for (int n = 0; n < kCols<HD>; ++n) dk_acc[i][n] = dv_acc[i][n] = 0;
  }
  // Query t sees key j when start + t >= j: the first row that sees j0 is (j0 - start) * group.
  const int first_row = max(0, j0 - start) * group;
  for (int r0 = first_row; r0 < rows; r0 += kTile) {
    __syncthreads();  // the previous tile's readers are done (and k_sh, v_sh are published)
    load_query_tile<HD>(q_sh, HD + 1, q, s, b, kvh, r0);
    load_query_tile<HD>(do_sh, HD + 1, dout, s, b, kvh, r0);
    if (threadIdx.x < kTile) {
      const int64_t ri = group_row(s, b, kvh, r0 + threadIdx.x).row_index;
      lse_sh[threadIdx.x] = lse[ri];
      delta_sh[threadIdx.x] = delta[ri];
    }
    __syncthreads();
    float score[kRowsPerWarp], dp[kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) score[i] = dp[i] = 0;
    dot_warp_rows<HD>(score, k_sh, warp * kRowsPerWarp, q_sh + lane * (HD + 1));
    dot_warp_rows<HD>(dp, v_sh, warp * kRowsPerWarp, do_sh + lane * (HD + 1));
    const int r = r0 + lane;
    const int last = start + group_row(s, b, kvh, r).t;
    float p[kRowsPerWarp], ds[kRowsPerWarp];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int j = j0 + warp * kRowsPerWarp + i;
      const bool seen = r < rows && j <= last;
      p[i] = seen ? expf(score[i] * scale - lse_sh[lane]) : 0.0f;
      ds[i] = seen ? p[i] * (dp[i] - delta_sh[lane]) * scale : 0.0f;
    }
    for (int rr = 0; rr < kTile; ++rr) {
#pragma unroll
      for (int n = 0; n < kCols<HD>; ++n) {
        const int c = lane + 32 * n;
        const float qc = c < HD ? q_sh[rr * (HD + 1) + c] : 0.0f;
        const float dc = c < HD ? do_sh[rr * (HD + 1) + c] : 0.0f;
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) {
          dv_acc[i][n] += __shfl_sync(0xffffffffu, p[i], rr) * dc;
          dk_acc[i][n] += __shfl_sync(0xffffffffu, ds[i], rr) * qc;
        }
      }
    }
  }
  const int64_t kv_row = int64_t(s.n_kv_heads) * HD;
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int j = j0 + warp * kRowsPerWarp + i;
    if (j >= s.capacity) break;
    const int64_t kj = (int64_t(b) * s.capacity + j) * kv_row + int64_t(kvh) * HD;
#pragma unroll
    for (int n = 0; n < kCols<HD>; ++n) {
      const int c = lane + 32 * n;
      if (c < HD) {
        dk[kj + c] = dk_acc[i][n];
        dv[kj + c] = dv_acc[i][n];
      }
    }
  }
}

// Dynamic shared memory of the tiled kernels, in bytes (HD = 128: 49 280, 65 792, 66 048).
constexpr size_t forward_smem_bytes(int hd) {
  return sizeof(float) * size_t(kTile) * (3 * hd + 1);
}
constexpr size_t dq_smem_bytes(int hd) { return sizeof(float) * size_t(kTile) * (4 * hd + 2); }
constexpr size_t dkv_smem_bytes(int hd) { return sizeof(float) * size_t(kTile) * (4 * hd + 4); }

// Above the 48 KB default a kernel must opt in (H100: up to 227 KB per block).
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    int(bytes)));
  }
}

bool tiled_head_dim(int hd) { return hd == 16 || hd == 32 || hd == 64 || hd == 128; }

// Calls f(std::integral_constant<int, hd>) for a tiled head_dim.
template <typename F>
void with_head_dim(int hd, F&& f) {
  switch (hd) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    default: f(std::integral_constant<int, 128>{}); break;
  }
}

int ceil_div(int64_t a, int64_t b) { return int((a + b - 1) / b); }

// The forward's key split, a function of the shape alone (never of the device), so the
// summation order, and the bits, are the same on every GPU.
struct ForwardSplit {
  int row_tiles, splits, keys_per_split;
};

// Query rows per warp of the forward's row tiles (4 warps). With a wide grid (at least
// kForwardNarrowTileBlocks blocks even with small tiles: decode at large batches) the fewest
// that cover a group's rows in one tile, so no warp walks copies of a row; otherwise 8. On an
// H100 one row per warp took 9% off a decode step at batch 256 (1024 blocks) but made it 6%
// slower at batch 128 (512 blocks) and 13 to 19% at 64 and below, where a block's latency
// sets the time (docs/perf.md). Either choice gives the same bits.
constexpr int64_t kForwardNarrowTileBlocks = 1024;
int forward_rows_per_warp(const AttentionShape& s) {
  const int64_t rows = int64_t(s.n_new) * (s.n_heads / s.n_kv_heads);
  const int narrow = rows <= kTileWarps ? 1 : rows <= 2 * kTileWarps ? 2 : kRowsPerWarp;
  const int64_t blocks = int64_t(s.batch) * s.n_kv_heads *
                         ceil_div(rows, int64_t(kTileWarps) * narrow);
  return blocks >= kForwardNarrowTileBlocks ? narrow : kRowsPerWarp;
}

ForwardSplit forward_split(const AttentionShape& s) {
  ForwardSplit f;
  f.row_tiles = ceil_div(int64_t(s.n_new) * (s.n_heads / s.n_kv_heads),
                         kTileWarps * forward_rows_per_warp(s));
  const int64_t blocks = int64_t(f.row_tiles) * s.batch * s.n_kv_heads;
  int splits = 1;
  if (blocks < kForwardTargetBlocks) {
    splits = std::min(ceil_div(kForwardTargetBlocks, blocks),
                      ceil_div(s.capacity, kForwardMinSplitKeys));
    splits = std::max(splits, 1);
  }
  f.keys_per_split = ceil_div(ceil_div(s.capacity, splits), kTile) * kTile;
  f.splits = ceil_div(s.capacity, f.keys_per_split);
  return f;
}

}  // namespace

int64_t attention_forward_scratch_floats(const AttentionShape& shape) {
  if (!tiled_head_dim(shape.head_dim) || shape.batch == 0 || shape.n_new == 0) return 0;
  const ForwardSplit f = forward_split(shape);
  if (f.splits == 1) return 0;
  return int64_t(f.splits) * shape.batch * shape.n_heads * shape.n_new * (shape.head_dim + 2);
}

void kv_cache_write(float* cache, const float* kv, const AttentionShape& shape,
                    cudaStream_t stream) {
  kv_cache_write_pair(cache, kv, nullptr, nullptr, shape, stream);
}

void kv_cache_write_pair(float* cache0, const float* kv0, float* cache1, const float* kv1,
                         const AttentionShape& shape, cudaStream_t stream) {
  const int64_t n = int64_t(shape.batch) * shape.n_new * shape.n_kv_heads * shape.head_dim;
  if (n == 0) return;
  kv_cache_write_kernel<<<grid_for(cache1 ? 2 * n : n), kThreads, 0, stream>>>(
      cache0, kv0, cache1, kv1, shape);
  CUDA_CHECK_LAUNCH();
}

void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const AttentionShape& shape, float* partials, cudaStream_t stream) {
  CUDA_REQUIRE(shape.head_dim <= kAttnMaxHeadDim, "head_dim above the attention kernel's limit");
  if (shape.batch == 0 || shape.n_new == 0) return;
  const float scale = 1.0f / sqrtf(float(shape.head_dim));
  if (!tiled_head_dim(shape.head_dim)) {
    const dim3 grid(shape.n_new, shape.n_heads, shape.batch);
    attention_forward_kernel<<<grid, kAttnThreads, 0, stream>>>(out, lse, q, k, v, shape, scale);
    CUDA_CHECK_LAUNCH();
    return;
  }
  const ForwardSplit f = forward_split(shape);
  const int rows_per_warp = forward_rows_per_warp(shape);
  with_head_dim(shape.head_dim, [&](auto hd) {
    constexpr int HD = decltype(hd)::value;
    const size_t smem = forward_smem_bytes(HD);
    const dim3 grid(f.row_tiles, f.splits, shape.batch * shape.n_kv_heads);
    const auto launch = [&](auto kernel) {
      allow_smem(kernel, smem);
      kernel<<<grid, kTileThreads, smem, stream>>>(out, lse, partials, q, k, v, shape, scale,
                                                   f.keys_per_split);
      CUDA_CHECK_LAUNCH();
    };
    if (rows_per_warp == 1) {
      launch(attention_forward_tiled_kernel<HD, 1>);
    } else if (rows_per_warp == 2) {
      launch(attention_forward_tiled_kernel<HD, 2>);
    } else {
      launch(attention_forward_tiled_kernel<HD, kRowsPerWarp>);
    }
  });
  if (f.splits > 1) {
    const int64_t rows = int64_t(shape.batch) * shape.n_heads * shape.n_new;
    attention_combine_kernel<<<unsigned(rows), 32, 0, stream>>>(out, lse, partials, shape,
                                                                f.splits);
    CUDA_CHECK_LAUNCH();
  }
}

void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* out,
                        const float* lse, const float* q, const float* k, const float* v,
                        const AttentionShape& shape, float* delta, cudaStream_t stream) {
  CUDA_REQUIRE(shape.head_dim <= kAttnMaxHeadDim, "head_dim above the attention kernel's limit");
  if (shape.batch == 0) return;
  const float scale = 1.0f / sqrtf(float(shape.head_dim));
  if (!tiled_head_dim(shape.head_dim)) {
    if (shape.n_new > 0) {
      const dim3 grid(shape.n_new, shape.n_heads, shape.batch);
      attention_backward_dq_kernel<<<grid, kAttnThreads, 0, stream>>>(dq, delta, dout, out, lse,
                                                                      q, k, v, shape, scale);
      CUDA_CHECK_LAUNCH();
    }
    const dim3 grid(shape.capacity, shape.n_kv_heads, shape.batch);
    attention_backward_dkv_kernel<<<grid, kAttnThreads, 0, stream>>>(dk, dv, dout, delta, lse,
                                                                     q, k, v, shape, scale);
    CUDA_CHECK_LAUNCH();
    return;
  }
  with_head_dim(shape.head_dim, [&](auto hd) {
    constexpr int HD = decltype(hd)::value;
    const unsigned kv_blocks = unsigned(shape.batch) * shape.n_kv_heads;
    if (shape.n_new > 0) {
      const size_t smem = dq_smem_bytes(HD);
      allow_smem(attention_backward_dq_tiled_kernel<HD>, smem);
      const dim3 grid(ceil_div(int64_t(shape.n_new) * (shape.n_heads / shape.n_kv_heads), kTile),
                      1, kv_blocks);
      attention_backward_dq_tiled_kernel<HD><<<grid, kTileThreads, smem, stream>>>(
          dq, delta, dout, out, lse, q, k, v, shape, scale);
      CUDA_CHECK_LAUNCH();
    }
    const size_t smem = dkv_smem_bytes(HD);
    allow_smem(attention_backward_dkv_tiled_kernel<HD>, smem);
    const dim3 grid(ceil_div(shape.capacity, kTile), 1, kv_blocks);
    attention_backward_dkv_tiled_kernel<HD><<<grid, kTileThreads, smem, stream>>>(
        dk, dv, dout, delta, lse, q, k, v, shape, scale);
    CUDA_CHECK_LAUNCH();
  });
}

}  // namespace rlhf::cuda
