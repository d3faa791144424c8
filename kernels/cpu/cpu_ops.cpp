#include "kernels/cpu/cpu_ops.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

#include <cblas.h>
#include <omp.h>

#include "common/error.h"
#include "kernels/cpu/fast_exp.h"

namespace rlhf {

namespace {

// The BLAS entry point for each compute type. Row-major, C = alpha op(A) op(B) + beta C.
void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
          const float* B, int ldb, float beta, float* C, int ldc) {
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
void gemm(bool trans_a, bool trans_b, int M, int N, int K, double alpha, const double* A,
          int lda, const double* B, int ldb, double beta, double* C, int ldc) {
  cblas_dgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

template <typename T>
T sigmoid(T x) {
  return T(1) / (T(1) + exp_fast(-x));
}

// Static partition of [0, n) for thread `tid` of `nthreads`: deterministic chunk boundaries.
inline void thread_range(int64_t n, int tid, int nthreads, int64_t& begin, int64_t& end) {
  const int64_t chunk = (n + nthreads - 1) / nthreads;
  begin = std::min<int64_t>(n, chunk * tid);
  end = std::min<int64_t>(n, begin + chunk);
}

}  // namespace

void cpu_set_threads(int threads) {
  if (threads <= 0) threads = omp_get_num_procs();
  omp_set_num_threads(threads);
  openblas_set_num_threads(threads);
}

int cpu_threads() { return omp_get_max_threads(); }

// ---------------------------------------------------------------- memory

template <typename T>
void* CpuOps<T>::alloc_bytes(size_t bytes) {
  // 64-byte alignment: whole cache lines, and what AVX-512 loads would want.
  const size_t rounded = (std::max<size_t>(bytes, 1) + 63) / 64 * 64;
  void* ptr = std::aligned_alloc(64, rounded);
  if (!ptr) throw std::bad_alloc();
  return ptr;
}

template <typename T>
void CpuOps<T>::free_bytes(void* ptr) {
  std::free(ptr);
}

template <typename T>
void CpuOps<T>::copy_to_host(void* host_dst, const void* src, size_t bytes) {
  if (bytes) std::memcpy(host_dst, src, bytes);
}

template <typename T>
void CpuOps<T>::copy_from_host(void* dst, const void* host_src, size_t bytes) {
  if (bytes) std::memcpy(dst, host_src, bytes);
}

// ---------------------------------------------------------------- dense algebra

template <typename T>
void CpuOps<T>::matmul_forward(T* out, const T* in, const T* w, int M, int N, int K,
                               bool accumulate) {
  if (M == 0) return;
  gemm(false, true, M, N, K, T(1), in, K, w, K, accumulate ? T(1) : T(0), out, N);
}

template <typename T>
void CpuOps<T>::matmul_backward(T* din, T* dw, const T* dout, const T* in, const T* w, int M,
                                int N, int K, bool accumulate_din) {
  if (M == 0) return;
  if (din) gemm(false, false, M, K, N, T(1), dout, N, w, K, accumulate_din ? T(1) : T(0), din, K);
  if (dw) gemm(true, false, N, K, M, T(1), dout, N, in, K, T(1), dw, K);
}

template <typename T>
void CpuOps<T>::grouped_matmul_forward(T* out, const T* in, const T* w, const int32_t* offsets,
                                       int n_groups, int rows, int N, int K) {
  RLHF_CHECK(offsets[n_groups] == rows,
             "grouped matmul: offsets end at row {}, the caller says {}", offsets[n_groups], rows);
  for (int e = 0; e < n_groups; ++e) {
    const int group_rows = offsets[e + 1] - offsets[e];
    if (group_rows == 0) continue;
    matmul_forward(out + int64_t(offsets[e]) * N, in + int64_t(offsets[e]) * K,
                   w + int64_t(e) * N * K, group_rows, N, K, false);
  }
}

template <typename T>
void CpuOps<T>::grouped_matmul_backward(T* din, T* dw, const T* dout, const T* in, const T* w,
                                        const int32_t* offsets, int n_groups, int N, int K,
                                        bool accumulate_din) {
  for (int e = 0; e < n_groups; ++e) {
    const int rows = offsets[e + 1] - offsets[e];
    if (rows == 0) continue;
    const int64_t r0 = offsets[e];
    matmul_backward(din ? din + r0 * K : nullptr, dw ? dw + int64_t(e) * N * K : nullptr,
                    dout + r0 * N, in + r0 * K, w + int64_t(e) * N * K, rows, N, K, accumulate_din);
  }
}

// ---------------------------------------------------------------- embedding

template <typename T>
void CpuOps<T>::embedding_forward(T* out, const int32_t* tokens, const T* table, int N, int D) {
#pragma omp parallel for schedule(static)
  for (int i = 0; i < N; ++i) {
    std::memcpy(out + int64_t(i) * D, table + int64_t(tokens[i]) * D, sizeof(T) * D);
  }
}

template <typename T>
void CpuOps<T>::embedding_backward(T* dtable, const T* dout, const int32_t* tokens, int N, int D,
                                   int V) {
  // Threads split the D columns, so two threads never add into the same element and the
  // summation order over tokens is fixed.
#pragma omp parallel
  {
    int64_t c0, c1;
    thread_range(D, omp_get_thread_num(), omp_get_num_threads(), c0, c1);
    for (int i = 0; i < N; ++i) {
      T* dst = dtable + int64_t(tokens[i]) * D;
      const T* src = dout + int64_t(i) * D;
      for (int64_t c = c0; c < c1; ++c) dst[c] += src[c];
    }
  }
}

// ---------------------------------------------------------------- RMSNorm

template <typename T>
void CpuOps<T>::rmsnorm_forward(T* out, T* rstd, const T* in, const T* weight, int N, int D,
                                double eps) {
#pragma omp parallel for schedule(static)
  for (int i = 0; i < N; ++i) {
    const T* x = in + int64_t(i) * D;
    T* y = out + int64_t(i) * D;
    T sum = 0;
    for (int c = 0; c < D; ++c) sum += x[c] * x[c];
    const T r = T(1) / std::sqrt(sum / T(D) + T(eps));
    for (int c = 0; c < D; ++c) y[c] = x[c] * r * weight[c];
    rstd[i] = r;
  }
}

template <typename T>
void CpuOps<T>::rmsnorm_backward(T* din, T* dweight, const T* dout, const T* in, const T* weight,
                                 const T* rstd, int N, int D) {
  const int nthreads = omp_get_max_threads();
  std::vector<T> partial(size_t(nthreads) * D, T(0));
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = omp_get_thread_num();
    int64_t r0, r1;
    thread_range(N, tid, omp_get_num_threads(), r0, r1);
    T* dw = partial.data() + size_t(tid) * D;
    for (int64_t i = r0; i < r1; ++i) {
      const T* x = in + i * D;
      const T* dy = dout + i * D;
      T* dx = din + i * D;
      const T r = rstd[i];
      // y = x r w  =>  dx = r (dy w) - x r^3 mean(dy w x)
      T dot = 0;
      for (int c = 0; c < D; ++c) dot += dy[c] * weight[c] * x[c];
      const T coef = dot * r * r * r / T(D);
      for (int c = 0; c < D; ++c) {
        dx[c] += dy[c] * weight[c] * r - x[c] * coef;
        dw[c] += dy[c] * x[c] * r;
      }
    }
  }
  for (int t = 0; t < nthreads; ++t) {
    for (int c = 0; c < D; ++c) dweight[c] += partial[size_t(t) * D + c];
  }
}

// ---------------------------------------------------------------- RoPE

template <typename T>
const T* CpuOps<T>::rope_table(int positions, int hd, double theta) {
  const bool same_geometry = hd == rope_head_dim_ && theta == rope_theta_;
  if (!same_geometry || positions > rope_positions_) {
    // Grow geometrically so a decode loop extends the table O(log n) times, not per token.
    const int n = same_geometry ? std::max(positions, 2 * rope_positions_) : positions;
    rope_table_.assign(size_t(n) * hd, T(0));
    for (int p = 0; p < n; ++p) {
      for (int i = 0; i < hd / 2; ++i) {
        const double angle = p * std::pow(theta, -2.0 * i / hd);
        rope_table_[(size_t(p) * (hd / 2) + i) * 2] = T(std::cos(angle));
        rope_table_[(size_t(p) * (hd / 2) + i) * 2 + 1] = T(std::sin(angle));
      }
    }
    rope_positions_ = n;
    rope_head_dim_ = hd;
    rope_theta_ = theta;
  }
  return rope_table_.data();
}

namespace {
template <typename T>
void rope_rotate(T* x, const int32_t* positions, int N, int H, int hd, const T* table, T sign) {
#pragma omp parallel for schedule(static)
  for (int i = 0; i < N; ++i) {
    const T* cs = table + size_t(positions[i]) * hd;
    for (int h = 0; h < H; ++h) {
      T* v = x + (int64_t(i) * H + h) * hd;
      for (int p = 0; p < hd / 2; ++p) {
        const T c = cs[2 * p], s = sign * cs[2 * p + 1];
        const T a = v[2 * p], b = v[2 * p + 1];
        v[2 * p] = a * c - b * s;
        v[2 * p + 1] = a * s + b * c;
      }
    }
  }
}

int max_position(const int32_t* positions, int N) {
  int m = 0;
  for (int i = 0; i < N; ++i) m = std::max(m, positions[i]);
  return m;
}
}  // namespace

template <typename T>
void CpuOps<T>::rope_forward(T* x, const int32_t* positions, int N, int H, int hd,
                             double theta) {
  const T* table = rope_table(max_position(positions, N) + 1, hd, theta);
  rope_rotate(x, positions, N, H, hd, table, T(1));
}

template <typename T>
void CpuOps<T>::rope_backward(T* dx, const int32_t* positions, int N, int H, int hd,
                              double theta) {
  // The rotation is orthogonal, so its gradient is the rotation by the negative angle.
  const T* table = rope_table(max_position(positions, N) + 1, hd, theta);
  rope_rotate(dx, positions, N, H, hd, table, T(-1));
}

// ---------------------------------------------------------------- attention

template <typename T>
T* CpuOps<T>::attention_scratch(int64_t per_thread) {
  const size_t need = size_t(omp_get_max_threads()) * size_t(per_thread);
  if (scratch_.size() < need) scratch_.resize(need);
  return scratch_.data();
}

namespace {

// Queries per head from which attention_forward transposes keys and values (see there).
constexpr int kMinQueriesToTranspose = 8;

// rows [0, n) of one head's keys or values (row stride `row`, hd columns) as [hd][capacity]:
// column c of every position is contiguous, so the dot products of one query with many keys run
// as vector loops over the keys, each lane summing its own dot over c (no horizontal sums).
template <typename T>
void transpose_head(T* dst, const T* src, int n, int64_t row, int hd, int capacity) {
  for (int j = 0; j < n; ++j) {
    for (int c = 0; c < hd; ++c) dst[int64_t(c) * capacity + j] = src[int64_t(j) * row + c];
  }
}

// dots[j] = sum over c, in order, of x[c] * xt[c][j] for j in [0, n).
template <typename T>
void dots_with_transposed(T* dots, const T* x, const T* xt, int n, int hd, int capacity) {
  for (int j = 0; j < n; ++j) dots[j] = 0;
  for (int c = 0; c < hd; ++c) {
    const T xc = x[c];
    const T* col = xt + int64_t(c) * capacity;
#pragma omp simd
    for (int j = 0; j < n; ++j) dots[j] += xc * col[j];
  }
}

// out[c] = sum over j of w[j] * xt[c][j], j in [0, n): one vector reduction per column c.
template <typename T>
void weighted_sum_transposed(T* out, const T* w, const T* xt, int n, int hd, int capacity) {
  for (int c = 0; c < hd; ++c) {
    const T* col = xt + int64_t(c) * capacity;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < n; ++j) sum += w[j] * col[j];
    out[c] = sum;
  }
}

}  // namespace

template <typename T>
void CpuOps<T>::kv_cache_write(T* cache, const T* kv, const AttentionShape& s) {
  const int64_t row = int64_t(s.n_kv_heads) * s.head_dim;
  for (int b = 0; b < s.batch; ++b) {
    RLHF_CHECK(s.start[b] + s.n_new <= s.capacity, "KV cache overflow: {} + {} > {}", s.start[b],
               s.n_new, s.capacity);
    std::memcpy(cache + (int64_t(b) * s.capacity + s.start[b]) * row,
                kv + int64_t(b) * s.n_new * row, sizeof(T) * row * s.n_new);
  }
}

template <typename T>
void CpuOps<T>::attention_forward(T* out, T* lse, const T* q, const T* k, const T* v,
                                  const AttentionShape& s) {
  const int hd = s.head_dim, group = s.n_heads / s.n_kv_heads;
  const T scale = T(1) / std::sqrt(T(hd));
  const int64_t q_row = int64_t(s.n_heads) * hd, kv_row = int64_t(s.n_kv_heads) * hd;
  // Prefill and training (many queries per head) read the head's keys and values transposed,
  // so that the products with every key run as vector loops over the keys; the copy costs about
  // what one query's products do, so decode steps (one new query) read the rows as they are
  // (transposing there made CPU decode at batch 64 about 1.3x slower).
  const bool transposed = s.n_new >= kMinQueriesToTranspose;
  // Per thread: the scores of one query, then the head's keys and values transposed.
  const int64_t per_thread = int64_t(s.capacity) * (1 + (transposed ? 2 * hd : 0));
  T* scratch = attention_scratch(per_thread);
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < s.batch; ++b) {
    for (int h = 0; h < s.n_heads; ++h) {
      T* scores = scratch + size_t(omp_get_thread_num()) * per_thread;
      // Only the transposed path has room for these (per_thread above).
      T* kt = transposed ? scores + s.capacity : nullptr;
      T* vt = transposed ? kt + int64_t(hd) * s.capacity : nullptr;
      const int kvh = h / group;
      const T* kb = k + int64_t(b) * s.capacity * kv_row + kvh * hd;
      const T* vb = v + int64_t(b) * s.capacity * kv_row + kvh * hd;
      if (transposed) {
        transpose_head(kt, kb, s.start[b] + s.n_new, kv_row, hd, s.capacity);
        transpose_head(vt, vb, s.start[b] + s.n_new, kv_row, hd, s.capacity);
      }
      for (int t = 0; t < s.n_new; ++t) {
        const int last = s.start[b] + t;  // attends to 0..last
        const T* qt = q + (int64_t(b) * s.n_new + t) * q_row + int64_t(h) * hd;
        if (transposed) {
          dots_with_transposed(scores, qt, kt, last + 1, hd, s.capacity);
        } else {
          for (int j = 0; j <= last; ++j) {
            const T* kj = kb + int64_t(j) * kv_row;
            T dot = 0;
            for (int c = 0; c < hd; ++c) dot += qt[c] * kj[c];
            scores[j] = dot;
          }
        }
        T max_score = -std::numeric_limits<T>::infinity();
        for (int j = 0; j <= last; ++j) {
          scores[j] *= scale;
          max_score = std::max(max_score, scores[j]);
        }
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j <= last; ++j) {
          scores[j] = exp_fast(scores[j] - max_score);
          sum += scores[j];
        }
        T* ot = out + (int64_t(b) * s.n_new + t) * q_row + int64_t(h) * hd;
        const T inv = T(1) / sum;
#pragma omp simd
        for (int j = 0; j <= last; ++j) scores[j] *= inv;
        if (transposed) {
          weighted_sum_transposed(ot, scores, vt, last + 1, hd, s.capacity);
        } else {
          for (int c = 0; c < hd; ++c) ot[c] = 0;
          for (int j = 0; j <= last; ++j) {
            const T* vj = vb + int64_t(j) * kv_row;
            for (int c = 0; c < hd; ++c) ot[c] += scores[j] * vj[c];
          }
        }
        if (lse) lse[(int64_t(b) * s.n_heads + h) * s.n_new + t] = max_score + std::log(sum);
      }
    }
  }
}

template <typename T>
void CpuOps<T>::attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* out,
                                   const T* lse, const T* q, const T* k, const T* v,
                                   const AttentionShape& s) {
  const int hd = s.head_dim, group = s.n_heads / s.n_kv_heads;
  const T scale = T(1) / std::sqrt(T(hd));
  const int64_t q_row = int64_t(s.n_heads) * hd, kv_row = int64_t(s.n_kv_heads) * hd;
  // Queries are taken kQueryBlock at a time: their rows of p and ds first, then one pass over
  // the keys adds all of them to each key's dk and dv row, so every row is read and written
  // once per block instead of once per query (those row updates were the backward's largest
  // cost once the dot products ran as vector loops).
  constexpr int kQueryBlock = 4;
  // Per thread: p and ds rows of a block of queries, the head's keys and values transposed, and
  // a zero row that stands for the queries past the end of a last, partial block.
  const int64_t per_thread = int64_t(s.capacity) * (2 * kQueryBlock + 2 * hd) + hd;
  T* scratch = attention_scratch(per_thread);
  // One task per (sequence, kv head): it owns that slice of dk/dv, so no two threads write
  // the same element, and every sum runs in a fixed order.
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < s.batch; ++b) {
    for (int kvh = 0; kvh < s.n_kv_heads; ++kvh) {
      T* p = scratch + size_t(omp_get_thread_num()) * per_thread;  // [kQueryBlock][capacity]
      T* dscore = p + kQueryBlock * s.capacity;  // [kQueryBlock][capacity]: dp, then ds in place
      T* kt = dscore + kQueryBlock * s.capacity;
      T* vt = kt + int64_t(hd) * s.capacity;
      T* zeros = vt + int64_t(hd) * s.capacity;
      for (int c = 0; c < hd; ++c) zeros[c] = 0;
      const T* kb = k + int64_t(b) * s.capacity * kv_row + kvh * hd;
      const T* vb = v + int64_t(b) * s.capacity * kv_row + kvh * hd;
      T* dkb = dk + int64_t(b) * s.capacity * kv_row + kvh * hd;
      T* dvb = dv + int64_t(b) * s.capacity * kv_row + kvh * hd;
      for (int j = 0; j < s.capacity; ++j) {
        for (int c = 0; c < hd; ++c) dkb[j * kv_row + c] = dvb[j * kv_row + c] = 0;
      }
      const int keys = s.start[b] + s.n_new;
      transpose_head(kt, kb, keys, kv_row, hd, s.capacity);
      transpose_head(vt, vb, keys, kv_row, hd, s.capacity);
      for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
        for (int t0 = 0; t0 < s.n_new; t0 += kQueryBlock) {
          // The block's last query sees the most keys; the others' rows are zero past their own.
          const int n_block = s.start[b] + std::min(t0 + kQueryBlock, s.n_new);
          const T* qs[kQueryBlock];
          const T* douts[kQueryBlock];
          for (int i = 0; i < kQueryBlock; ++i) {
            T* pi = p + i * s.capacity;
            T* dsi = dscore + i * s.capacity;
            const int t = t0 + i;
            if (t >= s.n_new) {  // past the end: contributes nothing
              qs[i] = douts[i] = zeros;
              for (int j = 0; j < n_block; ++j) pi[j] = dsi[j] = 0;
              continue;
            }
            const int n = s.start[b] + t + 1;  // keys 0..n-1
            const int64_t qi = (int64_t(b) * s.n_new + t) * q_row + int64_t(h) * hd;
            const T* qt = q + qi;
            const T* dot_ = dout + qi;
            const T* ot = out + qi;
            qs[i] = qt;
            douts[i] = dot_;
            const T l = lse[(int64_t(b) * s.n_heads + h) * s.n_new + t];
            T d_sum = 0;  // sum_j p_j dp_j == dout . out
            for (int c = 0; c < hd; ++c) d_sum += dot_[c] * ot[c];
            dots_with_transposed(pi, qt, kt, n, hd, s.capacity);     // q . k_j
            dots_with_transposed(dsi, dot_, vt, n, hd, s.capacity);  // dout . v_j
#pragma omp simd
            for (int j = 0; j < n; ++j) {
              pi[j] = exp_fast(pi[j] * scale - l);
              dsi[j] = pi[j] * (dsi[j] - d_sum) * scale;
            }
            for (int j = n; j < n_block; ++j) pi[j] = dsi[j] = 0;
            weighted_sum_transposed(dq + qi, dsi, kt, n, hd, s.capacity);
          }
          for (int j = 0; j < n_block; ++j) {
            T* dvj = dvb + int64_t(j) * kv_row;
            T* dkj = dkb + int64_t(j) * kv_row;
            T pw[kQueryBlock], dsw[kQueryBlock];
            for (int i = 0; i < kQueryBlock; ++i) {
              pw[i] = p[i * s.capacity + j];
              dsw[i] = dscore[i * s.capacity + j];
            }
#pragma omp simd
            for (int c = 0; c < hd; ++c) {
              T sv = dvj[c], sk = dkj[c];
              for (int i = 0; i < kQueryBlock; ++i) {
                sv += pw[i] * douts[i][c];
                sk += dsw[i] * qs[i][c];
              }
              dvj[c] = sv;
              dkj[c] = sk;
            }
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------- SwiGLU with clamping

// The SwiGLU loops are written with plain value selects (no std::min/max, no ||) because that
// is the form GCC vectorizes; with clamping off the limits are infinite, so one loop serves both.
template <typename T>
void CpuOps<T>::swiglu_forward(T* h, const T* gate, const T* up, int64_t n,
                               const SwigluClampConfig& clamp, int64_t* clamp_counts) {
  const T inf = std::numeric_limits<T>::infinity();
  const T gmax = clamp.enabled ? T(clamp.gate_max) : inf;
  const T lim = clamp.enabled ? T(clamp.linear_limit) : inf;
  int64_t clamped_gate = 0, clamped_linear = 0;
#pragma omp parallel for simd schedule(static) reduction(+ : clamped_gate, clamped_linear)
  for (int64_t i = 0; i < n; ++i) {
    const T graw = gate[i], uraw = up[i];
    const T g = graw > gmax ? gmax : graw;
    T u = uraw > lim ? lim : uraw;
    u = u < -lim ? -lim : u;
    clamped_gate += graw > gmax ? 1 : 0;
    clamped_linear += (uraw > lim ? 1 : 0) + (uraw < -lim ? 1 : 0);
    h[i] = g * sigmoid(g) * u;
  }
  if (clamp_counts) {
    clamp_counts[0] += clamped_gate;
    clamp_counts[1] += clamped_linear;
  }
}

template <typename T>
void CpuOps<T>::swiglu_backward(T* dgate, T* dup, const T* dh, const T* gate, const T* up,
                                int64_t n, const SwigluClampConfig& clamp) {
  const T inf = std::numeric_limits<T>::infinity();
  const T gmax = clamp.enabled ? T(clamp.gate_max) : inf;
  const T lim = clamp.enabled ? T(clamp.linear_limit) : inf;
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T graw = gate[i], uraw = up[i];
    const T g = graw > gmax ? gmax : graw;
    T u = uraw > lim ? lim : uraw;
    u = u < -lim ? -lim : u;
    const T sg = sigmoid(g);
    // Zero gradient where the input was clamped: the clamp's derivative there is 0.
    const T gate_pass = graw > gmax ? T(0) : T(1);
    const T linear_pass = (uraw > lim ? T(0) : T(1)) * (uraw < -lim ? T(0) : T(1));
    dgate[i] = gate_pass * dh[i] * u * sg * (T(1) + g * (T(1) - sg));
    dup[i] = linear_pass * dh[i] * g * sg;
  }
}

// ---------------------------------------------------------------- MoE

template <typename T>
void CpuOps<T>::router_forward(T* scores, T* gates, MoeRouting& r, const T* logits,
                               const T* bias, double route_scale, bool replay) {
  const int N = r.n_tokens, E = r.n_experts, K = r.top_k;
#pragma omp parallel for schedule(static)
  for (int t = 0; t < N; ++t) {
    const T* lt = logits + int64_t(t) * E;
    T* st = scores + int64_t(t) * E;
    for (int e = 0; e < E; ++e) st[e] = sigmoid(lt[e]);
    int32_t* ids = r.expert_ids + int64_t(t) * K;
    if (!replay) {
      // Top-k of score + bias by repeated selection (k is small); ties go to the lower id.
      for (int j = 0; j < K; ++j) {
        int best = -1;
        T best_value = -std::numeric_limits<T>::infinity();
        for (int e = 0; e < E; ++e) {
          bool taken = false;
          for (int i = 0; i < j; ++i) taken |= ids[i] == e;
          const T value = st[e] + (bias ? bias[e] : T(0));
          if (!taken && value > best_value) { best = e; best_value = value; }
        }
        ids[j] = best;
      }
    }
    T sum = 0;
    for (int j = 0; j < K; ++j) sum += st[ids[j]];
    for (int j = 0; j < K; ++j) gates[int64_t(t) * K + j] = T(route_scale) * st[ids[j]] / sum;
  }
  // Counting sort of the (token, choice) pairs by expert; ascending token order inside each
  // expert keeps everything deterministic.
  for (int e = 0; e <= E; ++e) r.offsets[e] = 0;
  for (int64_t i = 0; i < int64_t(N) * K; ++i) {
    RLHF_CHECK(r.expert_ids[i] >= 0 && r.expert_ids[i] < E, "expert id {} out of range",
               r.expert_ids[i]);
    ++r.offsets[r.expert_ids[i] + 1];
  }
  for (int e = 0; e < E; ++e) r.offsets[e + 1] += r.offsets[e];
  std::vector<int32_t>& cursor = route_cursor_;
  cursor.assign(r.offsets, r.offsets + E);
  for (int t = 0; t < N; ++t) {
    for (int j = 0; j < K; ++j) {
      const int32_t row = cursor[r.expert_ids[int64_t(t) * K + j]]++;
      r.sorted_token[row] = t;
      r.sorted_choice[row] = j;
      r.slot[int64_t(t) * K + j] = row;
    }
  }
}

template <typename T>
void CpuOps<T>::router_backward(T* dlogits, const T* dgates, const T* scores, const T* gates,
                                const MoeRouting& r, double route_scale) {
  const int N = r.n_tokens, E = r.n_experts, K = r.top_k;
#pragma omp parallel for schedule(static)
  for (int t = 0; t < N; ++t) {
    const T* st = scores + int64_t(t) * E;
    const int32_t* ids = r.expert_ids + int64_t(t) * K;
    const T* gt = gates + int64_t(t) * K;
    const T* dg = dgates + int64_t(t) * K;
    T* dl = dlogits + int64_t(t) * E;
    for (int e = 0; e < E; ++e) dl[e] = 0;
    T sum = 0, weighted = 0;
    for (int j = 0; j < K; ++j) {
      sum += st[ids[j]];
      weighted += dg[j] * gt[j];
    }
    // g_j = c s_j / S  =>  dL/ds_j = (c dg_j - sum_i dg_i g_i) / S
    for (int j = 0; j < K; ++j) {
      const T s = st[ids[j]];
      const T ds = (T(route_scale) * dg[j] - weighted) / sum;
      dl[ids[j]] += ds * s * (T(1) - s);
    }
  }
}

template <typename T>
double CpuOps<T>::seq_balance_loss(T* dlogits, const T* scores, const MoeRouting& r,
                                   int seq_len, double coef, double normalizer) {
  const int N = r.n_tokens, E = r.n_experts, K = r.top_k;
  RLHF_CHECK(N % seq_len == 0, "{} tokens are not whole sequences of {}", N, seq_len);
  const int n_seq = N / seq_len;
  double total = 0;
  std::vector<double> f(E), p(E);
  for (int b = 0; b < n_seq; ++b) {
    std::fill(f.begin(), f.end(), 0.0);
    std::fill(p.begin(), p.end(), 0.0);
    for (int t = b * seq_len; t < (b + 1) * seq_len; ++t) {
      for (int j = 0; j < K; ++j) f[r.expert_ids[int64_t(t) * K + j]] += 1.0;
      const T* st = scores + int64_t(t) * E;
      double sum = 0;
      for (int e = 0; e < E; ++e) sum += st[e];
      for (int e = 0; e < E; ++e) p[e] += st[e] / sum;
    }
    for (int e = 0; e < E; ++e) {
      f[e] *= double(E) / (double(K) * seq_len);
      p[e] /= seq_len;
      total += coef * f[e] * p[e] / normalizer;
    }
    // dL/ds'_{t,e} = coef f_e / (seq_len normalizer); s' = s / sum(s) per token.
    for (int t = b * seq_len; t < (b + 1) * seq_len; ++t) {
      const T* st = scores + int64_t(t) * E;
      T* dl = dlogits + int64_t(t) * E;
      double sum = 0, inner = 0;
      for (int e = 0; e < E; ++e) sum += st[e];
      for (int e = 0; e < E; ++e) inner += coef * f[e] / (seq_len * normalizer) * st[e] / sum;
      for (int e = 0; e < E; ++e) {
        const double dsn = coef * f[e] / (seq_len * normalizer);
        const double ds = (dsn - inner) / sum;
        dl[e] += T(ds * st[e] * (1.0 - st[e]));
      }
    }
  }
  return total;
}

template <typename T>
void CpuOps<T>::moe_dispatch_forward(T* xe, const T* x, const MoeRouting& r, int D) {
  const int64_t rows = int64_t(r.n_tokens) * r.top_k;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    std::memcpy(xe + row * D, x + int64_t(r.sorted_token[row]) * D, sizeof(T) * D);
  }
}

template <typename T>
void CpuOps<T>::moe_dispatch_backward(T* dx, const T* dxe, const MoeRouting& r, int D) {
#pragma omp parallel for schedule(static)
  for (int t = 0; t < r.n_tokens; ++t) {
    T* dst = dx + int64_t(t) * D;
    for (int j = 0; j < r.top_k; ++j) {
      const T* src = dxe + int64_t(r.slot[int64_t(t) * r.top_k + j]) * D;
      for (int c = 0; c < D; ++c) dst[c] += src[c];
    }
  }
}

template <typename T>
void CpuOps<T>::moe_combine_forward(T* out, const T* ye, const T* gates, const MoeRouting& r,
                                    int D) {
#pragma omp parallel for schedule(static)
  for (int t = 0; t < r.n_tokens; ++t) {
    T* dst = out + int64_t(t) * D;
    for (int j = 0; j < r.top_k; ++j) {
      const T g = gates[int64_t(t) * r.top_k + j];
      const T* src = ye + int64_t(r.slot[int64_t(t) * r.top_k + j]) * D;
      for (int c = 0; c < D; ++c) dst[c] += g * src[c];
    }
  }
}

template <typename T>
void CpuOps<T>::moe_combine_backward(T* dye, T* dgates, const T* dout, const T* ye,
                                     const T* gates, const MoeRouting& r, int D) {
#pragma omp parallel for schedule(static)
  for (int t = 0; t < r.n_tokens; ++t) {
    const T* dy = dout + int64_t(t) * D;
    for (int j = 0; j < r.top_k; ++j) {
      const int64_t i = int64_t(t) * r.top_k + j;
      const int64_t row = r.slot[i];
      const T g = gates[i];
      const T* y = ye + row * D;
      T* d = dye + row * D;
      T dot = 0;
      for (int c = 0; c < D; ++c) {
        dot += y[c] * dy[c];
        d[c] = g * dy[c];
      }
      dgates[i] = dot;
    }
  }
}

// ---------------------------------------------------------------- loss

template <typename T>
double CpuOps<T>::cross_entropy_forward_backward(T* dlogits, const T* logits,
                                                 const int32_t* targets, const T* weights, int N,
                                                 int V) {
  std::vector<double> row_loss(N, 0.0);
#pragma omp parallel for schedule(static)
  for (int i = 0; i < N; ++i) {
    const T* l = logits + int64_t(i) * V;
    T* d = dlogits + int64_t(i) * V;
    const T w = weights[i];
    if (w == T(0)) {
      for (int c = 0; c < V; ++c) d[c] = 0;
      continue;
    }
    T max_logit = l[0];
    for (int c = 1; c < V; ++c) max_logit = std::max(max_logit, l[c]);
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int c = 0; c < V; ++c) sum += exp_fast(l[c] - max_logit);
    const T log_sum = std::log(sum);
    row_loss[i] = double(w) * double(max_logit + log_sum - l[targets[i]]);
    const T inv = T(1) / sum;
#pragma omp simd
    for (int c = 0; c < V; ++c) d[c] = w * exp_fast(l[c] - max_logit) * inv;
    d[targets[i]] -= w;
  }
  double total = 0;
  for (double x : row_loss) total += x;
  return total;
}

template <typename T>
void CpuOps<T>::log_softmax_gather(T* logprobs, const T* logits, const int32_t* targets, int N,
                                   int V, double temperature) {
  const T inv_temp = T(1) / T(temperature);
#pragma omp parallel for schedule(static)
  for (int i = 0; i < N; ++i) {
    const T* l = logits + int64_t(i) * V;
    T max_logit = l[0] * inv_temp;
    for (int c = 1; c < V; ++c) max_logit = std::max(max_logit, l[c] * inv_temp);
    T sum = 0;
    for (int c = 0; c < V; ++c) sum += std::exp(l[c] * inv_temp - max_logit);
    logprobs[i] = l[targets[i]] * inv_temp - max_logit - std::log(sum);
  }
}

// ---------------------------------------------------------------- FP4 experts

template <typename T>
void CpuOps<T>::fp4_fake_quantize(T* out, uint8_t* saturated, const T* in, int64_t rows,
                                  int64_t cols, Fp4Format format) {
  const int64_t n = rows * cols;
  // The quantizer is float; T = double (the gradient reference) goes through a float copy.
  // FP4 values and their scales are exactly representable in float, so nothing is lost. The
  // copy also makes in == out safe.
  fp4_scratch_.resize(size_t(n));
  float* x = fp4_scratch_.data();
  for (int64_t i = 0; i < n; ++i) x[i] = float(in[i]);
  if constexpr (std::is_same_v<T, float>) {
    ::rlhf::fp4_fake_quantize(x, out, rows, cols, format, "expert weights");
  } else {
    std::vector<float> q(static_cast<size_t>(n));
    ::rlhf::fp4_fake_quantize(x, q.data(), rows, cols, format, "expert weights");
    for (int64_t i = 0; i < n; ++i) out[i] = T(q[i]);
  }
  if (!saturated) return;
  // A value saturates when it lies beyond 6 x its block's multiplier: the rule the quantizer
  // applied, recomputed from the same scale helpers.
  const int block = fp4_block_size(format);
  uint32_t tensor_amax = 0;
  for (int64_t i = 0; i < n; ++i) tensor_amax = std::max(tensor_amax, fp4_abs_bits(x[i]));
  const float global = format == Fp4Format::nvfp4 ? fp4_nv_global_scale(tensor_amax) : 1.0f;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < n / block; ++b) {
    const float* xb = x + b * block;
    uint32_t amax = 0;
    for (int i = 0; i < block; ++i) amax = std::max(amax, fp4_abs_bits(xb[i]));
    const float limit =
        kFp4E2m1Max * fp4_block_multiplier(format, fp4_block_scale_code(format, amax, global), global);
    for (int i = 0; i < block; ++i) saturated[b * block + i] = std::abs(xb[i]) > limit ? 1 : 0;
  }
}

template <typename T>
void CpuOps<T>::zero_where(T* grad, const uint8_t* mask, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) grad[i] = mask[i] ? T(0) : grad[i];
}

template <typename T>
void CpuOps<T>::fp4_matmul_forward(T* out, const T* in, const PackedFp4Matrix& w, int M,
                                   bool accumulate) {
  // Dequantize a tile of weight rows at a time and multiply it through the BLAS: the
  // full-precision weight never exists, only one tile of it.
  constexpr int64_t kTileRows = 64;
  const int64_t N = w.rows, K = w.cols;
  const int block = fp4_block_size(w.format);
  fp4_scratch_.resize(size_t(kTileRows * K));
  std::vector<T> tile_t;
  for (int64_t n0 = 0; n0 < N; n0 += kTileRows) {
    const int64_t rows = std::min(kTileRows, N - n0);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      fp4_dequantize_blocks(w.format, w.codes + (n0 + r) * (K / 2),
                            w.scales + (n0 + r) * (K / block), w.global_scale, K,
                            fp4_scratch_.data() + r * K);
    }
    const T* tile = nullptr;
    if constexpr (std::is_same_v<T, float>) {
      tile = fp4_scratch_.data();
    } else {
      tile_t.assign(fp4_scratch_.begin(), fp4_scratch_.begin() + rows * K);
      tile = tile_t.data();
    }
    if (M > 0) {
      gemm(false, true, M, int(rows), int(K), T(1), in, int(K), tile, int(K),
           accumulate ? T(1) : T(0), out + n0, int(N));
    }
  }
}

template <typename T>
void CpuOps<T>::fp4_grouped_matmul_forward(T* out, const T* in, const PackedFp4Matrix& w,
                                           const int32_t* offsets, int n_groups, int rows) {
  RLHF_CHECK(offsets[n_groups] == rows,
             "grouped FP4 matmul: offsets end at row {}, the caller says {}", offsets[n_groups],
             rows);
  const int64_t N = w.rows / n_groups, K = w.cols;
  const int block = fp4_block_size(w.format);
  for (int g = 0; g < n_groups; ++g) {
    const int group_rows = offsets[g + 1] - offsets[g];
    if (group_rows == 0) continue;  // an expert with no tokens costs nothing
    PackedFp4Matrix expert = w;
    expert.rows = N;
    expert.codes = w.codes + g * N * (K / 2);
    expert.scales = w.scales + g * N * (K / block);
    fp4_matmul_forward(out + int64_t(offsets[g]) * N, in + int64_t(offsets[g]) * K, expert,
                       group_rows, false);
  }
}

// ---------------------------------------------------------------- elementwise

template <typename T>
void CpuOps<T>::copy(T* dst, const T* src, int64_t n) {
  if (n) std::memcpy(dst, src, sizeof(T) * n);
}

template <typename T>
void CpuOps<T>::fill(T* x, T value, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) x[i] = value;
}

template <typename T>
void CpuOps<T>::scale_inplace(T* x, double s, int64_t n) {
  const T factor = T(s);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) x[i] *= factor;
}

template <typename T>
double CpuOps<T>::sum_squares(const T* x, int64_t n) {
  // Fixed per-thread chunks summed in thread order: the same result on every run.
  const int nthreads = omp_get_max_threads();
  std::vector<double> partial(nthreads, 0.0);
#pragma omp parallel num_threads(nthreads)
  {
    int64_t b, e;
    thread_range(n, omp_get_thread_num(), omp_get_num_threads(), b, e);
    // Eight running sums (element i goes to sum i % 8 of its chunk): one chain would be a
    // scalar loop, since the compiler may not reorder a floating-point sum; eight independent
    // ones are two vector registers of doubles. The order is fixed, so the result still is.
    constexpr int kLanes = 8;
    double lane[kLanes] = {};
    int64_t i = b;
    for (; i + kLanes <= e; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) lane[l] += double(x[i + l]) * double(x[i + l]);
    }
    for (int l = 0; i < e; ++i, ++l) lane[l] += double(x[i]) * double(x[i]);
    double s = 0;
    for (double v : lane) s += v;
    partial[omp_get_thread_num()] = s;
  }
  double total = 0;
  for (double s : partial) total += s;
  return total;
}

template <typename T>
void CpuOps<T>::adamw_step(T* param, const T* grad, T* m, T* v, int64_t n,
                           const AdamWHyper& h) {
  const T b1 = T(h.beta1), b2 = T(h.beta2);
  const T correction1 = T(1.0 - std::pow(h.beta1, double(h.step)));
  const T correction2 = T(1.0 - std::pow(h.beta2, double(h.step)));
  const T lr = T(h.lr), wd = T(h.weight_decay), eps = T(h.eps);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T g = grad[i];
    m[i] = b1 * m[i] + (T(1) - b1) * g;
    v[i] = b2 * v[i] + (T(1) - b2) * g * g;
    const T m_hat = m[i] / correction1;
    const T v_hat = v[i] / correction2;
    param[i] -= lr * (m_hat / (std::sqrt(v_hat) + eps) + wd * param[i]);
  }
}

template class CpuOps<float>;
template class CpuOps<double>;

}  // namespace rlhf
