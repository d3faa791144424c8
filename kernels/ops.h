#pragma once
// The op interface: everything the model computes goes through one of these calls, so the
// architecture in model/ is written once and each backend (kernels/cpu now, kernels/cuda next)
// implements the full set. Conventions:
//  - Row-major tensors; a shape comment on every argument. Outputs come first.
//  - Weight matrices are [out, in]: y = x W^T (PyTorch's nn.Linear convention).
//  - Backward ops ACCUMULATE into parameter gradients (dW += ...), so one gradient buffer
//    collects contributions from several uses; activation gradients are overwritten unless
//    the argument says "+=".
//  - `T` is the compute type: float for real work, double for the gradient-check reference.
//  - Pointers are in the backend's memory (host for the CPU backend). Index arrays too.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <stdexcept>

#include "kernels/fp4/fp4.h"
#include "kernels/swiglu_clamp.h"

namespace rlhf {

// Attention geometry. Queries are the T new tokens of each of B sequences; keys and values
// live in a cache of capacity S per sequence (in training, the cache IS this batch's K/V:
// S == T and start == 0). Query t of sequence b sits at absolute position start[b] + t and
// attends to cache positions 0..start[b] + t (causal).
struct AttentionShape {
  int batch = 0;         // B
  int n_new = 0;         // T: new tokens per sequence
  int capacity = 0;      // S: cache positions per sequence
  int n_heads = 0;       // Hq
  int n_kv_heads = 0;    // Hkv (Hq % Hkv == 0; query head h reads kv head h / (Hq / Hkv))
  int head_dim = 0;      // hd
  const int32_t* start = nullptr;  // [B] absolute position of the first new token
};

// Which rows go to which expert. After routing, the N*k (token, choice) pairs are sorted by
// expert so each expert's rows are contiguous: rows offsets[e] .. offsets[e+1]-1.
struct MoeRouting {
  int n_tokens = 0;                // N
  int top_k = 0;                   // k
  int n_experts = 0;               // E
  int32_t* expert_ids = nullptr;   // [N, k] chosen experts (the routing trace)
  int32_t* offsets = nullptr;      // [E + 1] first sorted row of each expert
  int32_t* sorted_token = nullptr; // [N * k] token of sorted row r
  int32_t* sorted_choice = nullptr;// [N * k] which of the token's k choices row r is
  int32_t* slot = nullptr;         // [N * k] sorted row of (token t, choice j), at t * k + j
};

struct ClampCounts {
  int64_t gate = 0;    // units whose gate pre-activation exceeded gate_max
  int64_t linear = 0;  // units whose linear path fell outside [-limit, limit]
  int64_t total = 0;   // units looked at
};

struct AdamWHyper {
  double lr = 0.0;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.0;  // decoupled: param -= lr * wd * param
  int64_t step = 1;           // 1-based, for bias correction
};

// A packed FP4 weight matrix [rows, cols] in backend memory, in the layout the backend reads
// (the CPU backend: fp4.h's row-major codes and scales). cols is the reduction dimension.
struct PackedFp4Matrix {
  Fp4Format format = Fp4Format::mxfp4;
  int64_t rows = 0;
  int64_t cols = 0;
  const uint8_t* codes = nullptr;   // [rows, cols / 2]
  const uint8_t* scales = nullptr;  // [rows, cols / block]
  float global_scale = 1.0f;        // NVFP4's per-tensor scale; 1 for MXFP4
};

// A sequence of ops recorded once (Ops::begin_recording .. end_recording) to be run again many
// times at a fraction of the launch cost: a CUDA graph on the GPU backend. A recording keeps the
// arguments it was recorded with (pointers, shapes, scalars) and reads whatever the memory
// behind those pointers holds when it is replayed. So whoever replays it keeps that memory
// alive and puts new inputs into the same buffers first. A recording must not outlive the
// backend that made it.
class OpsRecording {
 public:
  virtual ~OpsRecording() = default;
  // Runs the recorded ops, in order, as if they were called again. Returns false, running
  // nothing, when the backend has since released memory of its own that the recording uses
  // (its scratch grew): record again.
  virtual bool replay() = 0;
};

// Thrown by an op called while recording that cannot be recorded (Ops::begin_recording).
class OpNotRecordable : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

template <typename T>
class Ops {
 public:
  virtual ~Ops() = default;
  virtual const char* name() const = 0;

  // ---- memory (bytes; the model keeps all tensors in backend memory) ----
  virtual void* alloc_bytes(size_t bytes) = 0;
  virtual void free_bytes(void* ptr) = 0;
  virtual void copy_to_host(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void copy_from_host(void* dst, const void* host_src, size_t bytes) = 0;

  // ---- recording (see OpsRecording) ----
  // Whether begin_recording works here. The CPU backend runs every op at once and cannot.
  virtual bool can_record() const { return false; }
  // Until end_recording, ops are recorded, not run. An op that would have to wait for the
  // device or allocate (any copy to or from the host, a read-back of offsets, growing the
  // scratch) cannot be recorded: it throws OpNotRecordable and ends the recording, and nothing
  // of it has run, so the caller can run the same ops again without recording.
  // Calling either where can_record() is false is a programming error (std::logic_error).
  virtual void begin_recording() { throw std::logic_error("this backend cannot record ops"); }
  virtual std::unique_ptr<OpsRecording> end_recording() {
    throw std::logic_error("this backend cannot record ops");
  }

  // ---- a side branch: independent work that may overlap the main sequence ----
  // Ops called between side_branch_begin() and side_branch_end() start after every op called
  // before side_branch_begin(), and may run concurrently with the ops called after
  // side_branch_end() until side_branch_join(); the ops called after the join see the branch's
  // results. The caller promises that the branch and the ops it overlaps write disjoint memory
  // and read nothing the other writes (atomic counters aside). A branch may be recorded. The
  // CPU backend runs every op at once, in call order.
  virtual void side_branch_begin() {}
  virtual void side_branch_end() {}
  virtual void side_branch_join() {}

  // ---- dense algebra ----
  // out[M,N] = in[M,K] . w[N,K]^T   (out += ... when accumulate)
  virtual void matmul_forward(T* out, const T* in, const T* w, int M, int N, int K,
                              bool accumulate) = 0;
  // Several products of one input, out_i[M,n_i] = in[M,K] . w_i[n_i,K]^T: the projections
  // that read the same activations (q, k and v; a MoE layer's router with its shared expert's
  // gate and up). A backend may run them as one launch, a decode step's products being too
  // small to fill a GPU alone; each out_i must be what matmul_forward gives, bit for bit.
  struct Projection {
    T* out;
    const T* w;
    int n;
  };
  virtual void matmul_forward_projections(const T* in, int M, int K,
                                          std::span<const Projection> projections) {
    for (const Projection& p : projections) matmul_forward(p.out, in, p.w, M, p.n, K, false);
  }
  // din[M,K] = dout[M,N] . w[N,K] (+= when accumulate_din; skipped when din is null)
  // dw[N,K] += dout[M,N]^T . in[M,K] (skipped when dw is null)
  virtual void matmul_backward(T* din, T* dw, const T* dout, const T* in, const T* w, int M,
                               int N, int K, bool accumulate_din) = 0;
  // Expert GEMMs for all experts in one call: rows offsets[e]..offsets[e+1]-1 of in[R,K] use
  // w[e] ([E,N,K]). out[R,N]. rows = R = offsets[n_groups], passed by the caller (who knows it
  // as tokens x top_k) so a GPU backend can size its launch without reading the offsets back.
  virtual void grouped_matmul_forward(T* out, const T* in, const T* w, const int32_t* offsets,
                                      int n_groups, int rows, int N, int K) = 0;
  // Grouped products of one input and one routing against weight sets of one shape:
  // out_i = grouped_matmul_forward(in, w_i) (a MoE layer's expert gate and up). As with
  // matmul_forward_projections, a backend may run them together; each out_i must have the
  // bits of its own call.
  struct GroupedProjection {
    T* out;
    const T* w;
  };
  virtual void grouped_matmul_forward_projections(const T* in, const int32_t* offsets,
                                                  int n_groups, int rows, int N, int K,
                                                  std::span<const GroupedProjection> projections) {
    for (const GroupedProjection& p : projections) {
      grouped_matmul_forward(p.out, in, p.w, offsets, n_groups, rows, N, K);
    }
  }
  // din[R,K] = dout . w[e] (+= when accumulate_din); dw[E,N,K] += dout^T . in (per group)
  virtual void grouped_matmul_backward(T* din, T* dw, const T* dout, const T* in, const T* w,
                                       const int32_t* offsets, int n_groups, int N, int K,
                                       bool accumulate_din) = 0;

  // ---- embedding ----
  // out[N,D] = table[tokens[i]]
  virtual void embedding_forward(T* out, const int32_t* tokens, const T* table, int N, int D) = 0;
  // dtable[V,D] += scatter of dout[N,D] by tokens
  virtual void embedding_backward(T* dtable, const T* dout, const int32_t* tokens, int N,
                                  int D, int V) = 0;

  // ---- RMSNorm ----
  // out[N,D] = in * rstd * weight, rstd[N] = 1 / sqrt(mean(in^2) + eps)
  virtual void rmsnorm_forward(T* out, T* rstd, const T* in, const T* weight, int N, int D,
                               double eps) = 0;
  // din[N,D] += ..., dweight[D] += ...
  virtual void rmsnorm_backward(T* din, T* dweight, const T* dout, const T* in, const T* weight,
                                const T* rstd, int N, int D) = 0;

  // ---- the end of a sublayer and the start of the next ----
  // After the residual stream x[N,D] takes a sublayer's output: the next sublayer's RMSNorm of x
  // (normed, rstd, as rmsnorm_forward) and, when `copy` is set, a copy of x (the buffer the next
  // sublayer adds its output to).
  struct NormAfter {
    T* normed;          // [N,D]
    T* rstd;            // [N]
    const T* weight;    // [D]
    double eps;
    T* copy = nullptr;  // [N,D], or null
  };
  // x[M,N] = residual[M,N] + in[M,K] . w[N,K]^T (residual may be x itself), then `after` on x.
  // Each output has the bits of the separate calls (copy, matmul_forward accumulating,
  // rmsnorm_forward, copy); a backend may fuse them into fewer launches.
  virtual void matmul_residual_rmsnorm_forward(T* x, const T* residual, const T* in,
                                               const T* w, int M, int N, int K,
                                               const NormAfter& after) {
    if (residual != x) copy(x, residual, int64_t(M) * N);
    matmul_forward(x, in, w, M, N, K, true);
    rmsnorm_after(x, M, N, after);
  }

  // ---- rotary position embedding, in place on x[N, H, hd] at positions[N] ----
  // Pairs (2i, 2i+1) rotate by angle pos * theta^(-2i/hd).
  virtual void rope_forward(T* x, const int32_t* positions, int N, int H, int hd,
                            double theta) = 0;
  // rope_forward of q[N, Hq, hd] and k[N, Hk, hd] at the same positions: one launch where the
  // backend can (a decode step's RoPE is all launch latency); the same values either way.
  virtual void rope_forward_qk(T* q, T* k, const int32_t* positions, int N, int Hq, int Hk,
                               int hd, double theta) {
    rope_forward(q, positions, N, Hq, hd, theta);
    rope_forward(k, positions, N, Hk, hd, theta);
  }
  // The inverse rotation applied to the gradient.
  virtual void rope_backward(T* dx, const int32_t* positions, int N, int H, int hd,
                             double theta) = 0;

  // ---- causal attention with grouped-query heads ----
  // cache[B,S,Hkv,hd] at positions start[b]+t <- kv[B,T,Hkv,hd]
  virtual void kv_cache_write(T* cache, const T* kv, const AttentionShape& shape) = 0;
  // kv_cache_write of k and v into their two caches, one launch where the backend can.
  virtual void kv_cache_write_kv(T* cache_k, T* cache_v, const T* k, const T* v,
                                 const AttentionShape& shape) {
    kv_cache_write(cache_k, k, shape);
    kv_cache_write(cache_v, v, shape);
  }
  // out[B,T,Hq,hd] = softmax(q k^T / sqrt(hd)) v; lse[B,Hq,T] (log-sum-exp of the scaled
  // scores, kept for backward; may be null at inference). q[B,T,Hq,hd], k/v[B,S,Hkv,hd].
  virtual void attention_forward(T* out, T* lse, const T* q, const T* k, const T* v,
                                 const AttentionShape& shape) = 0;
  // dq[B,T,Hq,hd] =; dk, dv[B,S,Hkv,hd] = (training layout: S == T, start == 0).
  // Recomputes the probabilities from lse instead of storing a T x S matrix.
  virtual void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* out,
                                  const T* lse, const T* q, const T* k, const T* v,
                                  const AttentionShape& shape) = 0;

  // ---- SwiGLU with clamping ----
  // h[n] = silu(min(gate, gate_max)) * clamp(up, -limit, limit)   (no clamping if disabled)
  // clamp_counts[2] (backend memory; null: not counted) += the units whose gate was clamped
  // and those whose linear path was. The counts stay in backend memory until the caller reads
  // them, so a GPU forward needs no wait for the host.
  virtual void swiglu_forward(T* h, const T* gate, const T* up, int64_t n,
                              const SwigluClampConfig& clamp, int64_t* clamp_counts) = 0;
  // dgate[n], dup[n] = ; zero where the input was clamped.
  virtual void swiglu_backward(T* dgate, T* dup, const T* dh, const T* gate, const T* up,
                               int64_t n, const SwigluClampConfig& clamp) = 0;

  // ---- MoE routing, dispatch and combine ----
  // scores[N,E] = sigmoid(logits[N,E]). Unless `replay`, expert_ids[N,k] = top-k of
  // scores + bias[E] (the bias steers selection only). gates[N,k] = route_scale * s_j /
  // sum_k s. Fills routing.offsets / sorted_token / sorted_choice / slot.
  virtual void router_forward(T* scores, T* gates, MoeRouting& routing, const T* logits,
                              const T* bias, double route_scale, bool replay) = 0;
  // dlogits[N,E] = d(gates)/d(logits)^T . dgates[N,k]
  virtual void router_backward(T* dlogits, const T* dgates, const T* scores, const T* gates,
                               const MoeRouting& routing, double route_scale) = 0;
  // Sequence-level balance loss (DeepSeek-V3 style), per sequence of `seq_len` tokens:
  //   coef * sum_e f_e * P_e, f_e = E/(k T) * #tokens routed to e, P_e = mean_t s'_{t,e}
  // with s' the scores normalized over all experts. Returns the loss summed over sequences,
  // divided by `normalizer`; dlogits[N,E] += its gradient (through P only).
  virtual double seq_balance_loss(T* dlogits, const T* scores, const MoeRouting& routing,
                                  int seq_len, double coef, double normalizer) = 0;
  // xe[N*k, D] = x[sorted_token[r]]
  virtual void moe_dispatch_forward(T* xe, const T* x, const MoeRouting& routing, int D) = 0;
  // dx[N,D] += sum over the token's rows of dxe
  virtual void moe_dispatch_backward(T* dx, const T* dxe, const MoeRouting& routing, int D) = 0;
  // out[N,D] += sum_j gates[t,j] * ye[slot(t,j)]
  virtual void moe_combine_forward(T* out, const T* ye, const T* gates,
                                   const MoeRouting& routing, int D) = 0;
  // moe_combine_forward into out[N,D], then `after` on out, with the bits of the separate calls.
  virtual void moe_combine_rmsnorm_forward(T* out, const T* ye, const T* gates,
                                           const MoeRouting& routing, int D,
                                           const NormAfter& after) {
    moe_combine_forward(out, ye, gates, routing, D);
    rmsnorm_after(out, routing.n_tokens, D, after);
  }
  // dye[R,D] = gate * dout[token]; dgates[N,k] = ye[slot] . dout[token]
  virtual void moe_combine_backward(T* dye, T* dgates, const T* dout, const T* ye,
                                    const T* gates, const MoeRouting& routing, int D) = 0;

  // ---- loss and probabilities ----
  // Returns sum_i weights[i] * -log softmax(logits[i])[targets[i]]; dlogits[N,V] =
  // weights[i] * (softmax - onehot). dlogits may alias logits. Rows with weight 0 get 0.
  virtual double cross_entropy_forward_backward(T* dlogits, const T* logits,
                                                const int32_t* targets, const T* weights, int N,
                                                int V) = 0;
  // logprobs[N] = log softmax(logits[i] / temperature)[targets[i]]
  virtual void log_softmax_gather(T* logprobs, const T* logits, const int32_t* targets, int N,
                                  int V, double temperature) = 0;

  // ---- FP4 experts ----
  // QAT's forward: out[rows, cols] = dequantize(quantize(in)) in `format`, the same values the
  // packed model computes with. saturated[i] (when not null) = 1 where |in[i]| lies beyond its
  // block's largest code, for the clipped straight-through estimator.
  virtual void fp4_fake_quantize(T* out, uint8_t* saturated, const T* in, int64_t rows,
                                 int64_t cols, Fp4Format format) = 0;
  // grad[i] = 0 where mask[i] != 0
  virtual void zero_where(T* grad, const uint8_t* mask, int64_t n) = 0;
  // out[M, w.rows] (+)= in[M, w.cols] . dequantize(w)^T, dequantizing inside the matmul: no
  // full-precision copy of w is ever held.
  virtual void fp4_matmul_forward(T* out, const T* in, const PackedFp4Matrix& w, int M,
                                  bool accumulate) = 0;
  // Expert GEMMs on packed weights: w holds n_groups matrices of N = w.rows / n_groups rows;
  // rows offsets[g]..offsets[g+1]-1 of in[R, K] use matrix g. out[R, N]. rows = R, as in
  // grouped_matmul_forward.
  virtual void fp4_grouped_matmul_forward(T* out, const T* in, const PackedFp4Matrix& w,
                                          const int32_t* offsets, int n_groups, int rows) = 0;
  // grouped_matmul_forward_projections on packed weights.
  struct Fp4GroupedProjection {
    T* out;
    const PackedFp4Matrix* w;
  };
  virtual void fp4_grouped_matmul_forward_projections(
      const T* in, const int32_t* offsets, int n_groups, int rows,
      std::span<const Fp4GroupedProjection> projections) {
    for (const Fp4GroupedProjection& p : projections) {
      fp4_grouped_matmul_forward(p.out, in, *p.w, offsets, n_groups, rows);
    }
  }

  // ---- elementwise and reductions ----
  virtual void copy(T* dst, const T* src, int64_t n) = 0;  // same backend
  virtual void fill(T* x, T value, int64_t n) = 0;
  virtual void scale_inplace(T* x, double s, int64_t n) = 0;
  virtual double sum_squares(const T* x, int64_t n) = 0;
  // One AdamW update of n parameters in place.
  virtual void adamw_step(T* param, const T* grad, T* m, T* v, int64_t n,
                          const AdamWHyper& hyper) = 0;

 protected:
  // `after` on x[N,D] by the separate calls (the fused ops' reference).
  void rmsnorm_after(const T* x, int N, int D, const NormAfter& after) {
    rmsnorm_forward(after.normed, after.rstd, x, after.weight, N, D, after.eps);
    if (after.copy) copy(after.copy, x, int64_t(N) * D);
  }
};

}  // namespace rlhf
