// MoE routing, dispatch and combine kernels of the CUDA backend. The routing is the CPU's
// algorithm on the device: top-k by repeated selection (ties to the lower id), then a stable
// counting sort of the (token, choice) pairs by expert, so every index array matches the CPU's
// exactly. The balance loss keeps the CPU's summation order (sequential loops in double).
#include "kernels/cuda/cuda_ops_device.cuh"
#include "kernels/cuda/cuda_ops_kernels.cuh"

namespace rlhf::cuda {

namespace {

// One thread per token.
__global__ void router_select_kernel(float* scores, float* gates, MoeRouting r,
                                     const float* logits, const float* bias, float route_scale,
                                     bool replay) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= r.n_tokens) return;
  const int E = r.n_experts, K = r.top_k;
  const float* lt = logits + int64_t(t) * E;
  float* st = scores + int64_t(t) * E;
  for (int e = 0; e < E; ++e) st[e] = sigmoidf(lt[e]);
  int32_t* ids = r.expert_ids + int64_t(t) * K;
  if (!replay) {
    for (int j = 0; j < K; ++j) {
      int best = -1;
      float best_value = -INFINITY;
      for (int e = 0; e < E; ++e) {
        bool taken = false;
        for (int i = 0; i < j; ++i) taken |= ids[i] == e;
        const float value = st[e] + (bias ? bias[e] : 0.0f);
        if (!taken && value > best_value) {
          best = e;
          best_value = value;
        }
      }
      ids[j] = best;
    }
  }
  // A replayed id outside [0, E) is reported by router_count; read nothing out of range here.
  float sum = 0;
  for (int j = 0; j < K; ++j) sum += ids[j] >= 0 && ids[j] < E ? st[ids[j]] : 0.0f;
  for (int j = 0; j < K; ++j) {
    const float s = ids[j] >= 0 && ids[j] < E ? st[ids[j]] : 0.0f;
    gates[int64_t(t) * K + j] = route_scale * s / sum;
  }
}

// One warp per token, for up to kWarpRouterMaxExperts experts: lane l holds experts l, l + 32,
// ... Top-k by k rounds of a warp argmax over the experts not yet taken, ties to the lower id,
// so the ids are the CPU's (and the one-thread kernel's) exactly. The scores and the gates are
// the same per-element formulas, and lane 0 sums the chosen scores in choice order, as the CPU.
// At decode sizes the one-thread kernel ran one block of serial loops over global memory (15 us
// per layer at 64 tokens); this one spreads a token over a warp.
constexpr int kWarpRouterChunks = 8;
constexpr int kWarpRouterMaxExperts = 32 * kWarpRouterChunks;

// One warp: offsets[e] = counts[0] + ... + counts[e-1] for e in 0..E. Lane l scans a contiguous
// chunk of experts, the lanes' totals are scanned with shuffles. offsets may be counts itself:
// each lane reads an expert's count before it writes that expert's offset, and only lane 31
// writes offsets[E].
__device__ void warp_offsets_scan(int32_t* offsets, const int32_t* counts, int E, int lane) {
  const int per_lane = (E + 31) / 32;
  const int first = min(E, lane * per_lane), last = min(E, first + per_lane);
  int32_t chunk = 0;
  for (int e = first; e < last; ++e) chunk += counts[e];
  int32_t inclusive = chunk;
  for (int d = 1; d < 32; d <<= 1) {
    const int32_t before = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane >= d) inclusive += before;
  }
  int32_t running = inclusive - chunk;
  for (int e = first; e < last; ++e) {
    const int32_t count = counts[e];
    offsets[e] = running;
    running += count;
  }
  if (lane == 31) offsets[E] = inclusive;
}

// Token t's selection by the calling warp (lane = its lane).
__device__ void router_select_token(float* scores, float* gates, const MoeRouting& r,
                                    const float* logits, const float* bias, float route_scale,
                                    bool replay, int t, int lane) {
  const int E = r.n_experts, K = r.top_k;
  const float* lt = logits + int64_t(t) * E;
  float* st = scores + int64_t(t) * E;
  int32_t* ids = r.expert_ids + int64_t(t) * K;
  float value[kWarpRouterChunks];
#pragma unroll
  for (int c = 0; c < kWarpRouterChunks; ++c) {
    const int e = lane + 32 * c;
    value[c] = -INFINITY;
    if (e < E) {
      const float s = sigmoidf(lt[e]);
      st[e] = s;
      value[c] = s + (bias ? bias[e] : 0.0f);
    }
  }
  if (!replay) {
    unsigned taken = 0;  // bit c: this lane's expert lane + 32c is chosen
    for (int j = 0; j < K; ++j) {
      // This lane's best untaken expert (strict >: the lower id keeps a tie), then the warp's.
      int best = -1;
      float best_value = -INFINITY;
#pragma unroll
      for (int c = 0; c < kWarpRouterChunks; ++c) {
        const int e = lane + 32 * c;
        if (e < E && !(taken >> c & 1u) && value[c] > best_value) {
          best = e;
          best_value = value[c];
        }
      }
      for (int offset = 16; offset > 0; offset >>= 1) {
        const float other_value = __shfl_xor_sync(0xffffffffu, best_value, offset);
        const int other = __shfl_xor_sync(0xffffffffu, best, offset);
        const bool better = other >= 0 && (best < 0 || other_value > best_value ||
                                           (other_value == best_value && other < best));
        if (better) {
          best = other;
          best_value = other_value;
        }
      }
      if (best >= 0 && best % 32 == lane) taken |= 1u << (best / 32);
      if (lane == 0) ids[j] = best;
    }
  }
  __syncwarp();  // the scores and ids written by other lanes are visible to lane 0
  if (lane != 0) return;
  // A replayed id outside [0, E) is reported by router_count; read nothing out of range here.
  float sum = 0;
  for (int j = 0; j < K; ++j) sum += ids[j] >= 0 && ids[j] < E ? st[ids[j]] : 0.0f;
  for (int j = 0; j < K; ++j) {
    const float s = ids[j] >= 0 && ids[j] < E ? st[ids[j]] : 0.0f;
    gates[int64_t(t) * K + j] = route_scale * s / sum;
  }
}

__global__ void router_select_warp_kernel(float* scores, float* gates, MoeRouting r,
                                          const float* logits, const float* bias,
                                          float route_scale, bool replay) {
  const int t = int((blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32);
  if (t >= r.n_tokens) return;  // uniform over the warp
  router_select_token(scores, gates, r, logits, bias, route_scale, replay, t, threadIdx.x & 31);
}

// The whole routing of a decode-sized batch in one block, instead of select, count, offsets
// and fill (four launches of 3 to 5 us each, most of it launch latency): every warp selects
// tokens as router_select_warp_kernel does, then thread i takes pair i. Its row in the stable
// counting sort is offsets[e] + (pairs of expert e in earlier warps) + (in earlier lanes of its
// warp), the CPU's order; the index arrays are the same as the four kernels' exactly.
constexpr int kRouterOneBlockThreads = 1024;
constexpr int kRouterOneBlockWarps = kRouterOneBlockThreads / 32;

__global__ void __launch_bounds__(kRouterOneBlockThreads)
    router_one_block_kernel(float* scores, float* gates, MoeRouting r, const float* logits,
                            const float* bias, float route_scale, bool replay, int32_t* flag) {
  // earlier[w][b]: pairs of bucket b (expert b; E: an id out of range) in warp w, then in the
  // warps before w. total[b]: all pairs of bucket b, then offsets[b].
  __shared__ int32_t earlier[kRouterOneBlockWarps][kWarpRouterMaxExperts + 1];
  __shared__ int32_t total[kWarpRouterMaxExperts + 1];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int E = r.n_experts, K = r.top_k;
  for (int t = warp; t < r.n_tokens; t += kRouterOneBlockWarps) {
    router_select_token(scores, gates, r, logits, bias, route_scale, replay, t, lane);
  }
  for (int b = lane; b <= E; b += 32) earlier[warp][b] = 0;
  __syncthreads();  // the ids (global writes of this block) and the zeroed counts are visible

  const int pairs = r.n_tokens * K, i = threadIdx.x;
  int bucket = E + 1;  // past the pairs: in no bucket
  if (i < pairs) {
    const int32_t e = r.expert_ids[i];
    bucket = e >= 0 && e < E ? e : E;
  }
  const unsigned peers = __match_any_sync(0xffffffffu, bucket);
  const int rank_in_warp = __popc(peers & ((1u << lane) - 1u));
  if (i < pairs && rank_in_warp == 0) earlier[warp][bucket] = __popc(peers);
  __syncthreads();
  if (i <= E) {
    int32_t running = 0;
    for (int w = 0; w < kRouterOneBlockWarps; ++w) {
      const int32_t count = earlier[w][i];
      earlier[w][i] = running;
      running += count;
    }
    total[i] = running;
  }
  __syncthreads();
  if (warp == 0) {
    const int32_t invalid = total[E];
    __syncwarp();  // lane 0 has read total[E] before lane 31 overwrites it with offsets[E]
    warp_offsets_scan(total, total, E, lane);  // in place
    if (lane == 0 && invalid != 0) *reinterpret_cast<volatile int32_t*>(flag) = invalid;
  }
  __syncthreads();
  if (i <= E) r.offsets[i] = total[i];
  if (i < pairs && bucket < E) {
    const int32_t row = total[bucket] + earlier[warp][bucket] + rank_in_warp;
    r.sorted_token[row] = int32_t(i / K);
    r.sorted_choice[row] = int32_t(i % K);
    r.slot[i] = row;
  }
}

// counts[E + 1] zeroed by the caller; integer atomics, so the counts are order-free.
__global__ void router_count_kernel(int32_t* counts, const int32_t* ids, int64_t pairs, int E) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < pairs;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int32_t e = ids[i];
    atomicAdd(counts + (e >= 0 && e < E ? e : E), 1);
  }
}

// One warp: the offsets of counts[0..E-1] (warp_offsets_scan). counts[E] (ids out of range)
// goes to the host-mapped flag, which the host reads after its next wait.
__global__ void router_offsets_kernel(int32_t* offsets, const int32_t* counts, int E,
                                      int32_t* flag) {
  const int lane = threadIdx.x;
  warp_offsets_scan(offsets, counts, E, lane);
  if (lane == 0 && counts[E] != 0) *reinterpret_cast<volatile int32_t*>(flag) = counts[E];
}

// Block e places expert e's pairs: it walks the pairs in (token, choice) order in chunks of
// blockDim.x, and a pair's row is offsets[e] + the number of earlier pairs of expert e (a
// ballot scan). That is the CPU's stable counting sort.
__global__ void router_fill_kernel(MoeRouting r) {
  __shared__ int warp_counts[32];
  const int e = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  const int64_t pairs = int64_t(r.n_tokens) * r.top_k;
  int32_t base = r.offsets[e];
  for (int64_t i0 = 0; i0 < pairs; i0 += blockDim.x) {
    const int64_t i = i0 + threadIdx.x;
    const bool mine = i < pairs && r.expert_ids[i] == e;
    const unsigned ballot = __ballot_sync(0xffffffffu, mine);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = __popc(ballot & ((1u << lane) - 1u));
    int chunk_total = 0;
    for (int w = 0; w < warps; ++w) {
      before += w < warp ? warp_counts[w] : 0;
      chunk_total += warp_counts[w];
    }
    if (mine) {
      const int32_t row = base + before;
      r.sorted_token[row] = int32_t(i / r.top_k);
      r.sorted_choice[row] = int32_t(i % r.top_k);
      r.slot[i] = row;
    }
    base += chunk_total;
    __syncthreads();  // warp_counts is rewritten by the next chunk
  }
}

// One thread per token. g_j = c s_j / S  =>  dL/ds_j = (c dg_j - sum_i dg_i g_i) / S
__global__ void router_backward_kernel(float* dlogits, const float* dgates, const float* scores,
                                       const float* gates, MoeRouting r, float route_scale) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= r.n_tokens) return;
  const int E = r.n_experts, K = r.top_k;
  const float* st = scores + int64_t(t) * E;
  const int32_t* ids = r.expert_ids + int64_t(t) * K;
  const float* gt = gates + int64_t(t) * K;
  const float* dg = dgates + int64_t(t) * K;
  float* dl = dlogits + int64_t(t) * E;
  for (int e = 0; e < E; ++e) dl[e] = 0;
  float sum = 0, weighted = 0;
  for (int j = 0; j < K; ++j) {
    sum += st[ids[j]];
    weighted += dg[j] * gt[j];
  }
  for (int j = 0; j < K; ++j) {
    const float s = st[ids[j]];
    const float ds = (route_scale * dg[j] - weighted) / sum;
    dl[ids[j]] += ds * s * (1.0f - s);
  }
}

// row_sums[t] = sum_e scores[t, e] in double, in expert order (as the CPU).
__global__ void score_row_sums_kernel(double* row_sums, const float* scores, int N, int E) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= N) return;
  double sum = 0;
  for (int e = 0; e < E; ++e) sum += scores[int64_t(t) * E + e];
  row_sums[t] = sum;
}

// grid (sequences): per expert, f_e and P_e walked over the sequence's tokens in order.
__global__ void balance_terms_kernel(double* terms, double* dsn, const float* scores,
                                     const double* row_sums, MoeRouting r, int seq_len,
                                     double coef, double normalizer) {
  const int b = blockIdx.x, E = r.n_experts, K = r.top_k;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    double f = 0, p = 0;
    for (int t = b * seq_len; t < (b + 1) * seq_len; ++t) {
      for (int j = 0; j < K; ++j) f += r.expert_ids[int64_t(t) * K + j] == e ? 1.0 : 0.0;
      p += double(scores[int64_t(t) * E + e]) / row_sums[t];
    }
    f *= double(E) / (double(K) * seq_len);
    p /= seq_len;
    terms[int64_t(b) * E + e] = coef * f * p / normalizer;
    // dL/ds'_{t,e} = coef f_e / (seq_len normalizer); s' = s / sum(s) per token.
    dsn[int64_t(b) * E + e] = coef * f / (seq_len * normalizer);
  }
}

__global__ void balance_grad_kernel(float* dlogits, const float* scores, const double* row_sums,
                                    const double* dsn, int N, int E, int seq_len) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= N) return;
  const double* d = dsn + int64_t(t / seq_len) * E;
  const float* st = scores + int64_t(t) * E;
  float* dl = dlogits + int64_t(t) * E;
  const double sum = row_sums[t];
  double inner = 0;
  for (int e = 0; e < E; ++e) inner += d[e] * st[e] / sum;
  for (int e = 0; e < E; ++e) {
    const double ds = (d[e] - inner) / sum;
    dl[e] += float(ds * st[e] * (1.0 - st[e]));
  }
}

__global__ void dispatch_forward_kernel(float* xe, const float* x, MoeRouting r, int D) {
  const int64_t n = int64_t(r.n_tokens) * r.top_k * D;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / D, c = i % D;
    xe[i] = x[int64_t(r.sorted_token[row]) * D + c];
  }
}

// One thread per (token, column): the token's k rows added in choice order, as on the CPU.
__global__ void dispatch_backward_kernel(float* dx, const float* dxe, MoeRouting r, int D) {
  const int64_t n = int64_t(r.n_tokens) * D;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / D, c = i % D;
    float acc = dx[i];
    for (int j = 0; j < r.top_k; ++j) acc += dxe[int64_t(r.slot[t * r.top_k + j]) * D + c];
    dx[i] = acc;
  }
}

// out[t, c] + the token's gated expert rows at column c, choices in order: the one formula of
// both combine kernels, so they give the same bits.
__device__ __forceinline__ float combined(const float* out, const float* ye, const float* gates,
                                          const MoeRouting& r, int D, int64_t t, int64_t c) {
  float acc = out[t * D + c];
  for (int j = 0; j < r.top_k; ++j) {
    const int64_t pair = t * r.top_k + j;
    acc += gates[pair] * ye[int64_t(r.slot[pair]) * D + c];
  }
  return acc;
}

__global__ void combine_forward_kernel(float* out, const float* ye, const float* gates,
                                       MoeRouting r, int D) {
  const int64_t n = int64_t(r.n_tokens) * D;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = combined(out, ye, gates, r, D, i / D, i % D);
  }
}

// combine_forward_kernel's sums for token blockIdx.x (one block of kThreads per token), to out
// and after.copy, then the row's RMSNorm.
__global__ void combine_rmsnorm_kernel(float* out, const float* ye, const float* gates,
                                       MoeRouting r, int D, NormAfterArgs after) {
  __shared__ float shared[32];
  const int64_t t = blockIdx.x;
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    const float x = combined(out, ye, gates, r, D, t, c);
    out[t * D + c] = x;
    if (after.copy) after.copy[t * D + c] = x;
  }
  rmsnorm_row(after.normed + t * D, after.rstd + t, out + t * D, after.weight, D, after.eps,
              shared);
}

// One warp per (token, choice) pair: dye = gate * dout, dgate = ye . dout.
__global__ void combine_backward_kernel(float* dye, float* dgates, const float* dout,
                                        const float* ye, const float* gates, MoeRouting r,
                                        int D) {
  const int64_t pair = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (pair >= int64_t(r.n_tokens) * r.top_k) return;  // whole warps leave together
  const int64_t t = pair / r.top_k, row = r.slot[pair];
  const float g = gates[pair];
  const float* dy = dout + t * D;
  const float* y = ye + row * D;
  float* d = dye + row * D;
  float dot = 0;
  for (int c = lane; c < D; c += 32) {
    dot += y[c] * dy[c];
    d[c] = g * dy[c];
  }
  dot = warp_sum(dot);
  if (lane == 0) dgates[pair] = dot;
}

}  // namespace

void router_select(float* scores, float* gates, const MoeRouting& routing, const float* logits,
                   const float* bias, float route_scale, bool replay, cudaStream_t stream) {
  if (routing.n_tokens == 0) return;
  if (routing.n_experts <= kWarpRouterMaxExperts) {
    constexpr int kTokensPerBlock = 4;  // 128 threads
    router_select_warp_kernel<<<(routing.n_tokens + kTokensPerBlock - 1) / kTokensPerBlock,
                                32 * kTokensPerBlock, 0, stream>>>(scores, gates, routing, logits,
                                                                   bias, route_scale, replay);
  } else {
    router_select_kernel<<<(routing.n_tokens + 127) / 128, 128, 0, stream>>>(
        scores, gates, routing, logits, bias, route_scale, replay);
  }
  CUDA_CHECK_LAUNCH();
}

bool router_fits_one_block(const MoeRouting& routing) {
  // At most one token per warp: with two (64 tokens) the serial selections made the step 1.4%
  // slower than the four kernels on the H100, with eight (256 tokens) 7% (docs/perf.md).
  return routing.n_experts <= kWarpRouterMaxExperts &&
         routing.n_tokens <= kRouterOneBlockWarps &&
         int64_t(routing.n_tokens) * routing.top_k <= kRouterOneBlockThreads;
}

void router_one_block(float* scores, float* gates, const MoeRouting& routing,
                      const float* logits, const float* bias, float route_scale, bool replay,
                      int32_t* flag, cudaStream_t stream) {
  CUDA_REQUIRE(router_fits_one_block(routing), "routing too large for one block");
  router_one_block_kernel<<<1, kRouterOneBlockThreads, 0, stream>>>(
      scores, gates, routing, logits, bias, route_scale, replay, flag);
  CUDA_CHECK_LAUNCH();
}

void router_count(int32_t* counts, const MoeRouting& routing, cudaStream_t stream) {
  CUDA_CHECK(cudaMemsetAsync(counts, 0, sizeof(int32_t) * (routing.n_experts + 1), stream));
  const int64_t pairs = int64_t(routing.n_tokens) * routing.top_k;
  if (pairs == 0) return;
  router_count_kernel<<<grid_for(pairs), kThreads, 0, stream>>>(counts, routing.expert_ids,
                                                                pairs, routing.n_experts);
  CUDA_CHECK_LAUNCH();
}

void router_offsets(int32_t* offsets, const int32_t* counts, int E, int32_t* flag,
                    cudaStream_t stream) {
  router_offsets_kernel<<<1, 32, 0, stream>>>(offsets, counts, E, flag);
  CUDA_CHECK_LAUNCH();
}

void router_fill(const MoeRouting& routing, cudaStream_t stream) {
  if (routing.n_experts == 0 || routing.n_tokens == 0) return;
  router_fill_kernel<<<routing.n_experts, kThreads, 0, stream>>>(routing);
  CUDA_CHECK_LAUNCH();
}

void router_backward(float* dlogits, const float* dgates, const float* scores,
                     const float* gates, const MoeRouting& routing, float route_scale,
                     cudaStream_t stream) {
  if (routing.n_tokens == 0) return;
  router_backward_kernel<<<(routing.n_tokens + 127) / 128, 128, 0, stream>>>(
      dlogits, dgates, scores, gates, routing, route_scale);
  CUDA_CHECK_LAUNCH();
}

void seq_balance_loss(float* dlogits, double* terms, double* row_sums, double* dsn,
                      const float* scores, const MoeRouting& routing, int seq_len, double coef,
                      double normalizer, cudaStream_t stream) {
  const int N = routing.n_tokens, E = routing.n_experts;
  if (N == 0) return;
  score_row_sums_kernel<<<(N + 127) / 128, 128, 0, stream>>>(row_sums, scores, N, E);
  CUDA_CHECK_LAUNCH();
  balance_terms_kernel<<<N / seq_len, 128, 0, stream>>>(terms, dsn, scores, row_sums, routing,
                                                        seq_len, coef, normalizer);
  CUDA_CHECK_LAUNCH();
  balance_grad_kernel<<<(N + 127) / 128, 128, 0, stream>>>(dlogits, scores, row_sums, dsn, N, E,
                                                           seq_len);
  CUDA_CHECK_LAUNCH();
}

void moe_dispatch_forward(float* xe, const float* x, const MoeRouting& routing, int D,
                          cudaStream_t stream) {
  const int64_t n = int64_t(routing.n_tokens) * routing.top_k * D;
  if (n == 0) return;
  dispatch_forward_kernel<<<grid_for(n), kThreads, 0, stream>>>(xe, x, routing, D);
  CUDA_CHECK_LAUNCH();
}

void moe_dispatch_backward(float* dx, const float* dxe, const MoeRouting& routing, int D,
                           cudaStream_t stream) {
  const int64_t n = int64_t(routing.n_tokens) * D;
  if (n == 0) return;
  dispatch_backward_kernel<<<grid_for(n), kThreads, 0, stream>>>(dx, dxe, routing, D);
  CUDA_CHECK_LAUNCH();
}

void moe_combine_forward(float* out, const float* ye, const float* gates,
                         const MoeRouting& routing, int D, cudaStream_t stream) {
  const int64_t n = int64_t(routing.n_tokens) * D;
  if (n == 0) return;
  combine_forward_kernel<<<grid_for(n), kThreads, 0, stream>>>(out, ye, gates, routing, D);
  CUDA_CHECK_LAUNCH();
}

void moe_combine_rmsnorm_forward(float* out, const float* ye, const float* gates,
                                 const MoeRouting& routing, int D, const NormAfterArgs& after,
                                 cudaStream_t stream) {
  if (routing.n_tokens == 0) return;
  combine_rmsnorm_kernel<<<routing.n_tokens, kThreads, 0, stream>>>(out, ye, gates, routing, D,
                                                                    after);
  CUDA_CHECK_LAUNCH();
}

void moe_combine_backward(float* dye, float* dgates, const float* dout, const float* ye,
                          const float* gates, const MoeRouting& routing, int D,
                          cudaStream_t stream) {
  const int64_t pairs = int64_t(routing.n_tokens) * routing.top_k;
  if (pairs == 0) return;
  const int64_t blocks = (pairs * 32 + kThreads - 1) / kThreads;
  combine_backward_kernel<<<unsigned(blocks), kThreads, 0, stream>>>(dye, dgates, dout, ye, gates,
                                                                     routing, D);
  CUDA_CHECK_LAUNCH();
}

}  // namespace rlhf::cuda
