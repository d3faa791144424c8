#pragma once
// Launchers of the CUDA backend's kernels (cuda_ops_*.cu). Plain C++ header: cuda_ops.cpp,
// the checked entry points, includes it. Every launcher queues its kernels on `stream` and
// checks the launch; none validates shapes (the entry points do) and none waits.
// All pointers are device memory; shapes are those of the op of the same name in ops.h.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <span>

#include "kernels/ops.h"

namespace rlhf::cuda {

// ---- elementwise and reductions (cuda_ops_elementwise.cu) ----
void fill(float* x, float value, int64_t n, cudaStream_t stream);
void scale(float* x, float s, int64_t n, cudaStream_t stream);
// partials[blocks] = sums of squares (double) of fixed contiguous chunks of x, in chunk order.
constexpr int kSumSquaresBlocks = 512;
void sum_squares_partials(double* partials, const float* x, int64_t n, cudaStream_t stream);
struct AdamWScalars {
  float beta1, beta2, correction1, correction2, lr, weight_decay, eps;
};
void adamw(float* param, const float* grad, float* m, float* v, int64_t n, AdamWScalars h,
           cudaStream_t stream);
void zero_where(float* grad, const uint8_t* mask, int64_t n, cudaStream_t stream);
// counts[0] += gate clamps, counts[1] += linear clamps (integer atomics: order-free); null:
// not counted.
void swiglu_forward(float* h, const float* gate, const float* up, int64_t n, float gate_max,
                    float limit, unsigned long long* counts, cudaStream_t stream);
void swiglu_backward(float* dgate, float* dup, const float* dh, const float* gate,
                     const float* up, int64_t n, float gate_max, float limit,
                     cudaStream_t stream);

// ---- embedding, RMSNorm, RoPE (cuda_ops_norm.cu) ----
void embedding_forward(float* out, const int32_t* tokens, const float* table, int N, int D,
                       cudaStream_t stream);
void embedding_backward(float* dtable, const float* dout, const int32_t* tokens, int N, int D,
                        cudaStream_t stream);
void rmsnorm_forward(float* out, float* rstd, const float* in, const float* weight, int N, int D,
                     float eps, cudaStream_t stream);
void rmsnorm_backward(float* din, float* dweight, const float* dout, const float* in,
                      const float* weight, const float* rstd, int N, int D, cudaStream_t stream);
// Ops::NormAfter with the float eps the RMSNorm kernels take. Row blocks of kThreads.
struct NormAfterArgs {
  float* normed;
  float* rstd;
  const float* weight;
  float eps;
  float* copy;  // null: none
};
// Rotates pairs by sign * pos * theta^(-2i/hd) (sign -1: the backward).
void rope(float* x, const int32_t* positions, int N, int H, int hd, double theta, float sign,
          cudaStream_t stream);
// rope of x0 [N, H0, hd] and x1 [N, H1, hd] in one launch.
void rope_pair(float* x0, int H0, float* x1, int H1, const int32_t* positions, int N, int hd,
               double theta, float sign, cudaStream_t stream);

// ---- attention (cuda_ops_attention.cu) ----
void kv_cache_write(float* cache, const float* kv, const AttentionShape& shape,
                    cudaStream_t stream);
// kv_cache_write of cache0 <- kv0 and cache1 <- kv1 in one launch.
void kv_cache_write_pair(float* cache0, const float* kv0, float* cache1, const float* kv1,
                         const AttentionShape& shape, cudaStream_t stream);
// partials is scratch of attention_forward_scratch_floats(shape) floats (null when 0): the
// per-split softmax state when the keys are split across blocks (decode, small batches).
int64_t attention_forward_scratch_floats(const AttentionShape& shape);
void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const AttentionShape& shape, float* partials, cudaStream_t stream);
// delta [B, Hq, T] is scratch (dout . out per query row).
void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* out,
                        const float* lse, const float* q, const float* k, const float* v,
                        const AttentionShape& shape, float* delta, cudaStream_t stream);

// ---- products with few rows per weight matrix (cuda_ops_few_rows.cu) ----
// out[r, n] = in[r, :] . w_g[n, :] for the rows r of group g (offsets[g]..offsets[g+1]-1; rows
// in total). w is [n_groups, N, K]. Needs K % 4 == 0 and 16-byte aligned in and w; sized for
// up to a few dozen rows per group.
// tensor_cores: the 3xTF32 tensor-core variant (about 2^-21 relative per product against
// 2^-24 for an FP32 fma; fewer instructions from about 8 rows per matrix) instead of FP32 fmas;
// few_rows_take_tensor_cores says which is faster for a shape. Either gives the same bits on
// every run of one shape.
// Up to kFewRowsMaxGroupedProducts weight sets of one shape against the same input and
// routing (a MoE layer's gate and up) run in one launch; each output has the bits it would
// have alone.
bool few_rows_take_tensor_cores(int rows, int n_groups);
struct FewRowsGroupedProduct {
  float* out;
  const float* w;
};
constexpr int kFewRowsMaxGroupedProducts = 2;
void few_rows_matmul(std::span<const FewRowsGroupedProduct> products, const float* in,
                     const int32_t* offsets, int n_groups, int rows, int N, int K,
                     bool tensor_cores, cudaStream_t stream);
// The same on packed FP4 weights (fp4.h's layout, n_groups matrices of N rows each, `format`
// with `global_scale`): each chunk is decoded in shared memory, no float copy of w exists.
// Needs K % 32 == 0 and the block's scales for all of K within the kernel's shared memory.
// Products as for few_rows_matmul, all in `format`.
bool few_rows_fp4_fits(Fp4Format format, int K);
// out[M, N] (+)= in[M, K] . dequantize(w)^T for a packed matrix of N rows (codes, scales in
// fp4.h's layout) and 1 to 4 rows of x: a warp per output column decodes the column in
// registers (a packed model's shared experts at decode). Needs fp4_gemv_fits and 16-byte
// aligned codes rows and x (K a multiple of 32).
bool fp4_gemv_fits(int M, int K);
void fp4_gemv(float* out, const float* in, const uint8_t* codes, const uint8_t* scales,
              float global_scale, Fp4Format format, int M, int N, int K, bool accumulate,
              cudaStream_t stream);
struct FewRowsFp4GroupedProduct {
  float* out;
  const uint8_t* codes;
  const uint8_t* scales;
  float global_scale;
};
void few_rows_fp4_matmul(std::span<const FewRowsFp4GroupedProduct> products, const float* in,
                         Fp4Format format, const int32_t* offsets, int n_groups, int rows,
                         int N, int K, bool tensor_cores, cudaStream_t stream);
// Dense out_i[M, N_i] (+)= in[M, K] . w_i[N_i, K]^T for small M (up to a few dozen rows), for
// up to kFewRowsMaxProducts weight matrices against one input in one launch (the projections of
// a decode step, each too small to fill the GPU alone). The k range is split across blocks,
// each split's sum goes to `partial` (few_rows_dense_scratch_floats floats of scratch), and a
// second kernel adds the splits in order; 1 to 4 rows take one GEMV launch instead (a warp per
// output column) and no scratch. Each output has the same bits as in a launch of its own. Same
// layout needs as few_rows_matmul.
struct FewRowsDenseProduct {
  float* out;
  const float* w;
  int N;
};
constexpr int kFewRowsMaxProducts = 4;
int64_t few_rows_dense_scratch_floats(int M, std::span<const FewRowsDenseProduct> products,
                                      int K);
void few_rows_dense_matmul(std::span<const FewRowsDenseProduct> products, const float* in,
                           int M, int K, bool accumulate, float* partial, bool tensor_cores,
                           cudaStream_t stream);
// Ops::matmul_residual_rmsnorm_forward for one product (product.out is x): the split product
// as above, then one block per row adds residual and the splits (the bits of the reduction
// kernel), writes x and the copy, and norms the row (the bits of rmsnorm_forward).
void few_rows_dense_matmul_rmsnorm(const FewRowsDenseProduct& product, const float* residual,
                                   const float* in, int M, int K, float* partial,
                                   bool tensor_cores, const NormAfterArgs& after,
                                   cudaStream_t stream);

// ---- MoE (cuda_ops_moe.cu) ----
// scores, gates and (unless replay) routing.expert_ids.
void router_select(float* scores, float* gates, const MoeRouting& routing, const float* logits,
                   const float* bias, float route_scale, bool replay, cudaStream_t stream);
// counts[e] = pairs routed to e; counts[E] = pairs whose id lies outside [0, E).
void router_count(int32_t* counts, const MoeRouting& routing, cudaStream_t stream);
// router_select, router_count, router_offsets and router_fill in one launch, with the same
// results, for up to 32 tokens, 1024 (token, choice) pairs and 256 experts
// (router_fits_one_block): decode at small batches.
bool router_fits_one_block(const MoeRouting& routing);
void router_one_block(float* scores, float* gates, const MoeRouting& routing,
                      const float* logits, const float* bias, float route_scale, bool replay,
                      int32_t* flag, cudaStream_t stream);
// offsets[E + 1] = the exclusive scan of counts[0..E-1]; a nonzero counts[E] is written to the
// host-mapped word `flag` (device address).
void router_offsets(int32_t* offsets, const int32_t* counts, int E, int32_t* flag,
                    cudaStream_t stream);
// sorted_token, sorted_choice, slot from expert_ids and routing.offsets (already on device).
void router_fill(const MoeRouting& routing, cudaStream_t stream);
void router_backward(float* dlogits, const float* dgates, const float* scores,
                     const float* gates, const MoeRouting& routing, float route_scale,
                     cudaStream_t stream);
// terms[B*E] = each (sequence, expert)'s loss term; dlogits += the gradient. row_sums [N] and
// dsn [B*E] are scratch.
void seq_balance_loss(float* dlogits, double* terms, double* row_sums, double* dsn,
                      const float* scores, const MoeRouting& routing, int seq_len, double coef,
                      double normalizer, cudaStream_t stream);
void moe_dispatch_forward(float* xe, const float* x, const MoeRouting& routing, int D,
                          cudaStream_t stream);
void moe_dispatch_backward(float* dx, const float* dxe, const MoeRouting& routing, int D,
                           cudaStream_t stream);
// moe_combine_forward, then `after` on out: one block per token, the bits of the two kernels.
void moe_combine_rmsnorm_forward(float* out, const float* ye, const float* gates,
                                 const MoeRouting& routing, int D, const NormAfterArgs& after,
                                 cudaStream_t stream);
void moe_combine_forward(float* out, const float* ye, const float* gates,
                         const MoeRouting& routing, int D, cudaStream_t stream);
void moe_combine_backward(float* dye, float* dgates, const float* dout, const float* ye,
                          const float* gates, const MoeRouting& routing, int D,
                          cudaStream_t stream);

// ---- loss and FP4 (cuda_ops_loss.cu) ----
// row_loss[N] (double) = weights[i] * nll_i, 0 for weight-0 rows.
void cross_entropy(float* dlogits, double* row_loss, const float* logits, const int32_t* targets,
                   const float* weights, int N, int V, cudaStream_t stream);
void log_softmax_gather(float* logprobs, const float* logits, const int32_t* targets, int N,
                        int V, float inv_temperature, cudaStream_t stream);
// saturated[i] = |in[i]| beyond its block's largest code; global_scale [1] from the quantizer.
void fp4_saturated(uint8_t* saturated, const float* in, int64_t rows, int64_t cols,
                   Fp4Format format, const float* global_scale, cudaStream_t stream);
// out[rows, cols] = the packed rows decoded (fp4_dequantize_blocks' values).
void fp4_dequantize_rows(float* out, const uint8_t* codes, const uint8_t* scales,
                         float global_scale, int64_t rows, int64_t cols, Fp4Format format,
                         cudaStream_t stream);

}  // namespace rlhf::cuda
