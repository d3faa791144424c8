// Causal grouped-query attention for the CUDA backend: straightforward kernels, correctness
// first (no tensor cores, no T x S matrix in memory). One block of kAttnThreads threads per
// query row (forward, dq) or per key row (dk, dv) walks the other side in chunks of
// kAttnThreads; each thread owns head-dim columns c = tid and tid + kAttnThreads, so head_dim is
// at most kAttnMaxHeadDim. The forward keeps an online softmax (running max and sum, rescaled
// per chunk); the backward recomputes the probabilities from lse. Every output element is
// written by one thread: no atomics, a fixed summation order.
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

__global__ void kv_cache_write_kernel(float* cache, const float* kv, AttentionShape s) {
  const int64_t row = int64_t(s.n_kv_heads) * s.head_dim;
  const int64_t n = int64_t(s.batch) * s.n_new * row;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = i % row, bt = i / row;
    const int64_t b = bt / s.n_new, t = bt % s.n_new;
    cache[(b * s.capacity + s.start[b] + t) * row + c] = kv[i];
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

}  // namespace

void kv_cache_write(float* cache, const float* kv, const AttentionShape& shape,
                    cudaStream_t stream) {
  const int64_t n = int64_t(shape.batch) * shape.n_new * shape.n_kv_heads * shape.head_dim;
  if (n == 0) return;
  kv_cache_write_kernel<<<grid_for(n), kThreads, 0, stream>>>(cache, kv, shape);
  CUDA_CHECK_LAUNCH();
}

void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const AttentionShape& shape, cudaStream_t stream) {
  CUDA_REQUIRE(shape.head_dim <= kAttnMaxHeadDim, "head_dim above the attention kernel's limit");
  if (shape.batch == 0 || shape.n_new == 0) return;
  const dim3 grid(shape.n_new, shape.n_heads, shape.batch);
  attention_forward_kernel<<<grid, kAttnThreads, 0, stream>>>(out, lse, q, k, v, shape,
                                                              1.0f / sqrtf(float(shape.head_dim)));
  CUDA_CHECK_LAUNCH();
}

void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* out,
                        const float* lse, const float* q, const float* k, const float* v,
                        const AttentionShape& shape, float* delta, cudaStream_t stream) {
  CUDA_REQUIRE(shape.head_dim <= kAttnMaxHeadDim, "head_dim above the attention kernel's limit");
  if (shape.batch == 0) return;
  const float scale = 1.0f / sqrtf(float(shape.head_dim));
  if (shape.n_new > 0) {
    const dim3 grid(shape.n_new, shape.n_heads, shape.batch);
    attention_backward_dq_kernel<<<grid, kAttnThreads, 0, stream>>>(dq, delta, dout, out, lse, q,
                                                                    k, v, shape, scale);
    CUDA_CHECK_LAUNCH();
  }
  const dim3 grid(shape.capacity, shape.n_kv_heads, shape.batch);
  attention_backward_dkv_kernel<<<grid, kAttnThreads, 0, stream>>>(dk, dv, dout, delta, lse, q, k,
                                                                   v, shape, scale);
  CUDA_CHECK_LAUNCH();
}

}  // namespace rlhf::cuda
