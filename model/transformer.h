#pragma once
// The MoE transformer, written once against the op interface (kernels/ops.h).
//
//   tokens -> embed -> n_layers x [RMSNorm -> attention (RoPE, GQA, causal) -> +residual
//                                   -> RMSNorm -> FFN (dense SwiGLU | shared + top-k routed
//                                      experts) -> +residual] -> RMSNorm -> LM head -> logits
//
// Three plain structs carry the state (as in llm.c): ModelWeights (views into one flat
// parameter allocation; gradients and AdamW moments use the same layout), LayerActs (every
// intermediate of one layer's forward, allocated once for a maximum batch x sequence shape)
// and KvCache.
// `T` is float for real work and double for the finite-difference gradient reference.
#include <compare>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kernels/buffer.h"
#include "kernels/ops.h"
#include "model/config.h"
#include "model/param_layout.h"

namespace rlhf {

template <typename T>
struct LayerWeights {
  T* attn_norm = nullptr;    // [D]
  T* wq = nullptr;           // [Hq*hd, D]
  T* wk = nullptr;           // [Hkv*hd, D]
  T* wv = nullptr;           // [Hkv*hd, D]
  T* wo = nullptr;           // [D, Hq*hd]
  T* ffn_norm = nullptr;     // [D]
  // dense layers
  T* ffn_gate = nullptr;     // [F, D]
  T* ffn_up = nullptr;       // [F, D]
  T* ffn_down = nullptr;     // [D, F]
  // MoE layers
  T* router = nullptr;       // [E, D]
  T* shared_gate = nullptr;  // [S*Fe, D] (null without shared experts)
  T* shared_up = nullptr;    // [S*Fe, D]
  T* shared_down = nullptr;  // [D, S*Fe]
  T* expert_gate = nullptr;  // [E, Fe, D]
  T* expert_up = nullptr;    // [E, Fe, D]
  T* expert_down = nullptr;  // [E, D, Fe]
  // A model with packed FP4 experts holds these instead of the six expert pointers above.
  PackedFp4Matrix packed_shared_gate;  // [S*Fe, D]
  PackedFp4Matrix packed_shared_up;    // [S*Fe, D]
  PackedFp4Matrix packed_shared_down;  // [D, S*Fe]
  PackedFp4Matrix packed_expert_gate;  // [E*Fe, D]
  PackedFp4Matrix packed_expert_up;    // [E*Fe, D]
  PackedFp4Matrix packed_expert_down;  // [E*D, Fe]
};

template <typename T>
struct ModelWeights {
  T* embed = nullptr;       // [V, D]
  std::vector<LayerWeights<T>> layers;
  T* final_norm = nullptr;  // [D]
  T* lm_head = nullptr;     // [V, D]

  // Carves the views out of `base`, laid out as `layout` (ParamLayout::parameters(config)).
  static ModelWeights view(const ModelConfig& config, const ParamLayout& layout, T* base);
};

// Routing of every MoE layer for every token: expert ids [n_moe_layers][n_tokens][top_k].
// Recorded by a forward on request, and replayed (routing replay) when given.
struct RoutingTrace {
  int n_layers = 0;
  int n_tokens = 0;
  int top_k = 0;
  std::vector<int32_t> expert_ids;
  const int32_t* layer(int moe_layer) const {
    return expert_ids.data() + size_t(moe_layer) * n_tokens * top_k;
  }
};

// What one forward observed, for metrics and for the router's bias balancing.
struct ForwardStats {
  std::vector<std::vector<int64_t>> expert_load;  // [n_moe_layers][E] tokens routed
  std::vector<ClampCounts> clamp;                 // [n_layers] SwiGLU clamping counts
  // With a selection router (anticipatory routing): per MoE layer, the tokens whose top-k set
  // from the selection router differs from the one the latest router would pick. Empty without.
  std::vector<int64_t> router_flips;              // [n_moe_layers]
  int64_t tokens = 0;                             // tokens in the forward
};

template <typename T>
class KvCache {
 public:
  KvCache(Ops<T>& ops, const ModelConfig& config, int batch, int capacity);
  T* k(int layer) { return k_.data() + size_t(layer) * layer_stride_; }  // [B, S, Hkv, hd]
  T* v(int layer) { return v_.data() + size_t(layer) * layer_stride_; }
  int batch() const { return batch_; }
  int capacity() const { return capacity_; }

 private:
  int batch_, capacity_;
  int64_t layer_stride_;
  Buffer<T, Ops<T>> k_, v_;
};

// A training or scoring batch: B sequences of T tokens, right-padded. targets/weights are
// only needed for the loss: weights[i] multiplies the loss of predicting targets[i] at i.
struct TokenBatch {
  int batch = 0;
  int seq_len = 0;
  std::vector<int32_t> tokens;   // [B*T]
  std::vector<int32_t> targets;  // [B*T]
  std::vector<float> weights;    // [B*T]
};

template <typename T>
class Transformer {
 public:
  // Allocates parameters (uninitialized; call init_random or load), gradients, buffers, and
  // activations for batches of up to max_batch x max_seq tokens. With `packed_experts`, the
  // expert weights exist only in that FP4 format (set them with set_packed_expert) and the
  // model runs inference only.
  Transformer(Ops<T>& ops, const ModelConfig& config, int max_batch, int max_seq,
              std::optional<Fp4Format> packed_experts = std::nullopt);

  const ModelConfig& config() const { return config_; }
  const ParamLayout& layout() const { return layout_; }
  const ParamLayout& buffer_layout() const { return buffer_layout_; }
  Ops<T>& ops() { return ops_; }
  // The activation capacity given to the constructor.
  int max_batch() const { return max_batch_; }
  int max_seq() const { return max_seq_; }

  void init_random(uint64_t seed);

  // ---- FP4 ----
  std::optional<Fp4Format> packed_format() const { return packed_format_; }
  const std::vector<ExpertMatrixSpec>& expert_matrices() const { return expert_matrices_; }
  // Copies one packed expert matrix (host data) into a packed model.
  void set_packed_expert(const std::string& name, const Fp4Tensor& packed);
  // Quantization-aware training: while on, the forward (and the backward's input gradients)
  // use fake-quantized expert weights, computing exactly what the packed model computes; the
  // gradient reaches the float master weights straight through (zeroed where a weight
  // saturated its block, with the clipped estimator). Off again with std::nullopt.
  void set_qat(std::optional<Fp4Format> format, bool clipped_ste);
  std::optional<Fp4Format> qat_format() const { return qat_format_; }
  // Whoever writes params() (optimizer, loader) calls this, so QAT re-quantizes before the
  // next forward rather than on every decode step.
  void params_changed() { qat_stale_ = true; }

  // Flat storage (backend memory), laid out by layout() / buffer_layout().
  T* params() { return params_.data(); }
  T* grads() { return grads_.data(); }
  T* buffers() { return buffers_.data(); }
  const ModelWeights<T>& weights() const { return weights_; }

  // Runs the model on `n_new` tokens of each of `batch` sequences. tokens[B*T] (host).
  // Without a cache the sequences start at position 0 (training / scoring). With a cache,
  // sequence b's new tokens sit at positions start[b].. and their K/V are appended there.
  // Returns logits [B*T, V] in backend memory, valid until the next forward.
  // `record` receives the routing trace; `replay` forces it.
  const T* forward(const int32_t* tokens, int batch, int n_new, KvCache<T>* cache = nullptr,
                   const int32_t* start = nullptr, RoutingTrace* record = nullptr,
                   const RoutingTrace* replay = nullptr);

  // Forward + backward of the weighted cross-entropy (plus the sequence balance loss when
  // configured). Gradients ACCUMULATE into grads(); zero them with zero_grads(). Returns the
  // loss (sum over tokens of weight * nll, plus the balance loss).
  double forward_backward(const TokenBatch& batch, const RoutingTrace* replay = nullptr);
  void zero_grads();

  // The auxiliary-loss-free balancing step: after an update, each MoE layer's bias moves
  // by bias_update_rate toward under-loaded experts (sign of mean load - load), using the load
  // of the last forward.
  void update_router_bias();

  // Reads the last forward's counts from backend memory on the first call after it.
  const ForwardStats& last_stats() const;

  // ---- anticipatory routing ----
  // Every MoE layer's router (weights [E, D], then balance bias [E]) copied to the host, in
  // layer order: a snapshot to hand back to set_selection_router later.
  std::vector<T> router_state() const;
  // From now on every MoE layer picks its top-k experts with `state`'s routers (an older
  // snapshot, from router_state), while the gates (normalized affinities of the chosen experts)
  // and the experts themselves use the latest parameters, so the gradient still trains the
  // latest router. A routing trace given to forward() still takes precedence.
  void set_selection_router(const std::vector<T>& state);
  void clear_selection_router() { selection_router_on_ = false; }
  bool has_selection_router() const { return selection_router_on_; }

  // ---- recorded decode steps ----
  // On a backend that can record ops (CUDA graphs), a forward of one new token per sequence
  // with a cache is recorded the first time its shape (rows, cache memory and capacity) comes
  // and replayed afterwards, with the same results bit for bit and a fraction of the launch
  // cost. On by default; off runs every step op by op (tests, A/B measurements).
  void record_decode_steps(bool on) {
    record_decode_steps_ = on;
    if (!on) recorded_steps_.clear();
  }
  // Decode shapes that hold a recording now (for tests and diagnostics).
  size_t recorded_decode_steps() const;

  // Model FLOPs of the last forward pass alone (matmuls + attention). A training step costs
  // about three times this (the backward computes two products per forward product).
  double last_forward_flops() const { return last_forward_flops_; }

 private:
  // Every intermediate one layer's forward keeps for its backward. Row counts are for the
  // maximum shape; a smaller batch uses the leading rows.
  struct LayerActs {
    T* x_in = nullptr;       // [N, D] residual stream entering the layer
    T* attn_in = nullptr;    // [N, D] RMSNorm(x_in)
    T* attn_rstd = nullptr;  // [N]
    T* q = nullptr;          // [N, Hq*hd] after RoPE
    T* k = nullptr;          // [N, Hkv*hd] after RoPE
    T* v = nullptr;          // [N, Hkv*hd]
    T* attn_out = nullptr;   // [N, Hq*hd]
    T* lse = nullptr;        // [B, Hq, T]
    T* x_mid = nullptr;      // [N, D] residual after attention
    T* ffn_in = nullptr;     // [N, D] RMSNorm(x_mid)
    T* ffn_rstd = nullptr;   // [N]
    T* gate = nullptr;       // [N, F] dense, or [N, S*Fe] shared experts
    T* up = nullptr;         // same
    T* h = nullptr;          // same
    T* scores = nullptr;     // [N, E] sigmoid affinities
    T* gates = nullptr;      // [N, k]
    T* xe = nullptr;         // [N*k, D] token rows sorted by expert
    T* e_gate = nullptr;     // [N*k, Fe]
    T* e_up = nullptr;       // [N*k, Fe]
    T* e_h = nullptr;        // [N*k, Fe]
    T* ye = nullptr;         // [N*k, D]
    MoeRouting routing;
  };

  void allocate_activations();
  // Each block ends with the norm the next block starts from: the attention block with the
  // FFN's norm of x_mid (and the copy of x_mid the FFN adds to), the FFN with the next layer's
  // attention norm or the final norm, so that a backend can fuse a residual update with the
  // norm after it (Ops::NormAfter).
  void attention_block(int layer, int batch, int n_new, KvCache<T>* cache);
  void ffn_block(int layer, int n_tokens, const RoutingTrace* replay);
  typename Ops<T>::NormAfter norm_after_ffn(int layer);
  // The device work of a forward whose inputs (tokens_, positions_, start_) are in place:
  // embedding, layers, final norm, LM head. Touches no host memory but the clamp totals.
  void run_layers(int batch, int n_new, KvCache<T>* cache, const RoutingTrace* replay);
  // run_layers of a decode step (n_new = 1) through a recording of its shape: replayed when
  // one exists, else recorded and replayed, or run op by op where the backend refuses.
  void run_recorded_decode_step(int batch, KvCache<T>& cache);
  void select_with_selection_router(int moe_layer, int n_tokens);
  using Projection = typename Ops<T>::Projection;
  using GroupedProjection = typename Ops<T>::GroupedProjection;
  using Fp4GroupedProjection = typename Ops<T>::Fp4GroupedProjection;
  double backward(int batch, int seq_len);

  Ops<T>& ops_;
  ModelConfig config_;
  ParamLayout layout_, buffer_layout_;
  int max_tokens_;
  int max_batch_, max_seq_;
  Buffer<T, Ops<T>> params_, grads_, buffers_;
  ModelWeights<T> weights_, grad_views_;
  std::vector<T*> router_bias_;  // [n_moe_layers] -> [E]
  // Anticipatory routing: the selection router, laid out as router_state() ([E, D] then [E]
  // per MoE layer), and host staging for comparing its choices with the latest router's.
  Buffer<T, Ops<T>> selection_router_;
  bool selection_router_on_ = false;
  std::vector<int32_t> host_selected_, host_latest_;

  // Activations (one allocation for T, one for int32 indices).
  Buffer<T, Ops<T>> act_;
  Buffer<int32_t, Ops<T>> act_index_;
  std::vector<LayerActs> layer_acts_;
  T* resid_final_ = nullptr;     // [N, D] residual after the last layer
  T* final_in_ = nullptr;        // [N, D]
  T* final_rstd_ = nullptr;      // [N]
  T* logits_ = nullptr;          // [N, V]
  T* loss_weights_ = nullptr;    // [N]
  int32_t* tokens_ = nullptr;    // [N]
  int32_t* targets_ = nullptr;   // [N]
  int32_t* positions_ = nullptr; // [N]
  int32_t* start_ = nullptr;     // [B]
  // backward scratch, shared by all layers
  T *d_resid_ = nullptr, *d_norm_ = nullptr, *d_q_ = nullptr, *d_k_ = nullptr, *d_v_ = nullptr,
    *d_attn_ = nullptr, *d_gate_ = nullptr, *d_up_ = nullptr, *d_h_ = nullptr,
    *d_xe_ = nullptr, *d_ye_ = nullptr, *d_scores_ = nullptr, *d_gates_ = nullptr,
    *router_logits_ = nullptr;

  // The weights the forward reads: weights_, or weights_qat_ while QAT is on.
  const ModelWeights<T>& active_weights() const { return qat_format_ ? weights_qat_ : weights_; }
  void refresh_qat();

  std::vector<ExpertMatrixSpec> expert_matrices_;
  // Packed FP4 experts (inference-only models).
  std::optional<Fp4Format> packed_format_;
  Buffer<uint8_t, Ops<T>> packed_codes_, packed_scales_;
  std::vector<PackedFp4Matrix*> packed_slots_;  // parallel to expert_matrices_
  // QAT: fake-quantized expert weights at the same offsets as params_ (only expert regions are
  // filled), and which of them saturated.
  std::optional<Fp4Format> qat_format_;
  bool qat_clipped_ = false;
  bool qat_stale_ = true;
  Buffer<T, Ops<T>> qat_params_;
  Buffer<uint8_t, Ops<T>> qat_saturated_;
  ModelWeights<T> weights_qat_;

  int cur_batch_ = 0, cur_seq_ = 0;
  // Host-side staging reused by every forward, so a decode loop does not allocate per token.
  std::vector<int32_t> host_start_, host_positions_;
  // The last forward's stats. Expert loads and clamp counts stay in backend memory (the
  // routing offsets of each layer, clamp_counts_) until last_stats() reads them.
  mutable ForwardStats stats_;
  mutable bool stats_on_device_ = false;
  Buffer<int64_t, Ops<T>> clamp_counts_;  // [n_layers][gate, linear]
  mutable std::vector<int64_t> host_clamp_counts_;
  double last_forward_flops_ = 0;

  // Recorded decode steps by shape. A recording holds pointers into the cache it ran with,
  // so the key holds the cache's memory and shape: a new cache at the same address with the
  // same shape reuses the recording, as it may.
  struct DecodeStepKey {
    int batch;
    uintptr_t cache_k, cache_v;
    int cache_capacity, cache_batch;
    bool qat;
    auto operator<=>(const DecodeStepKey&) const = default;
  };
  struct RecordedStep {
    std::unique_ptr<OpsRecording> recording;
    std::vector<int64_t> clamp_totals;  // [n_layers] host-side counts the step adds
    int refusals = 0;                   // recordings the backend refused for this shape
  };
  static constexpr int kMaxRecordingRefusals = 2;
  static constexpr size_t kMaxRecordedSteps = 64;
  bool record_decode_steps_ = true;
  std::map<DecodeStepKey, RecordedStep> recorded_steps_;
};

}  // namespace rlhf
