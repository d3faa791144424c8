#pragma once
// The CPU backend: the reference implementation of every op (and fast enough for CI and the
// embedded demo). GEMMs go to the BLAS; everything else is plain loops parallelized with
// OpenMP using static partitions, so results are bit-identical from run to run at a fixed
// thread count (exact resume depends on that). Not thread-safe: one instance per model.
#include <vector>

#include "kernels/ops.h"

namespace rlhf {

template <typename T>
class CpuOps final : public Ops<T> {
 public:
  const char* name() const override { return "cpu"; }

  void* alloc_bytes(size_t bytes) override;
  void free_bytes(void* ptr) override;
  void copy_to_host(void* host_dst, const void* src, size_t bytes) override;
  void copy_from_host(void* dst, const void* host_src, size_t bytes) override;

  void matmul_forward(T* out, const T* in, const T* w, int M, int N, int K,
                      bool accumulate) override;
  void matmul_backward(T* din, T* dw, const T* dout, const T* in, const T* w, int M, int N,
                       int K, bool accumulate_din) override;
  void grouped_matmul_forward(T* out, const T* in, const T* w, const int32_t* offsets,
                              int n_groups, int rows, int N, int K) override;
  void grouped_matmul_backward(T* din, T* dw, const T* dout, const T* in, const T* w,
                               const int32_t* offsets, int n_groups, int N, int K,
                               bool accumulate_din) override;

  void embedding_forward(T* out, const int32_t* tokens, const T* table, int N, int D) override;
  void embedding_backward(T* dtable, const T* dout, const int32_t* tokens, int N, int D,
                          int V) override;

  void rmsnorm_forward(T* out, T* rstd, const T* in, const T* weight, int N, int D,
                       double eps) override;
  void rmsnorm_backward(T* din, T* dweight, const T* dout, const T* in, const T* weight,
                        const T* rstd, int N, int D) override;

  void rope_forward(T* x, const int32_t* positions, int N, int H, int hd, double theta) override;
  void rope_backward(T* dx, const int32_t* positions, int N, int H, int hd,
                     double theta) override;

  void kv_cache_write(T* cache, const T* kv, const AttentionShape& shape) override;
  void attention_forward(T* out, T* lse, const T* q, const T* k, const T* v,
                         const AttentionShape& shape) override;
  void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* out, const T* lse,
                          const T* q, const T* k, const T* v,
                          const AttentionShape& shape) override;

  void swiglu_forward(T* h, const T* gate, const T* up, int64_t n,
                      const SwigluClampConfig& clamp, int64_t* clamp_counts) override;
  void swiglu_backward(T* dgate, T* dup, const T* dh, const T* gate, const T* up, int64_t n,
                       const SwigluClampConfig& clamp) override;

  void router_forward(T* scores, T* gates, MoeRouting& routing, const T* logits, const T* bias,
                      double route_scale, bool replay) override;
  void router_backward(T* dlogits, const T* dgates, const T* scores, const T* gates,
                       const MoeRouting& routing, double route_scale) override;
  double seq_balance_loss(T* dlogits, const T* scores, const MoeRouting& routing, int seq_len,
                          double coef, double normalizer) override;
  void moe_dispatch_forward(T* xe, const T* x, const MoeRouting& routing, int D) override;
  void moe_dispatch_backward(T* dx, const T* dxe, const MoeRouting& routing, int D) override;
  void moe_combine_forward(T* out, const T* ye, const T* gates, const MoeRouting& routing,
                           int D) override;
  void moe_combine_backward(T* dye, T* dgates, const T* dout, const T* ye, const T* gates,
                            const MoeRouting& routing, int D) override;

  double cross_entropy_forward_backward(T* dlogits, const T* logits, const int32_t* targets,
                                        const T* weights, int N, int V) override;
  void log_softmax_gather(T* logprobs, const T* logits, const int32_t* targets, int N, int V,
                          double temperature) override;

  void fp4_fake_quantize(T* out, uint8_t* saturated, const T* in, int64_t rows, int64_t cols,
                         Fp4Format format) override;
  void zero_where(T* grad, const uint8_t* mask, int64_t n) override;
  void fp4_matmul_forward(T* out, const T* in, const PackedFp4Matrix& w, int M,
                          bool accumulate) override;
  void fp4_grouped_matmul_forward(T* out, const T* in, const PackedFp4Matrix& w,
                                  const int32_t* offsets, int n_groups, int rows) override;

  void copy(T* dst, const T* src, int64_t n) override;
  void fill(T* x, T value, int64_t n) override;
  void scale_inplace(T* x, double s, int64_t n) override;
  double sum_squares(const T* x, int64_t n) override;
  void adamw_step(T* param, const T* grad, T* m, T* v, int64_t n,
                  const AdamWHyper& hyper) override;

 private:
  // cos/sin of position * theta^(-2i/hd) for positions [0, rope_positions_), pairs i.
  const T* rope_table(int positions, int hd, double theta);
  // Per-thread scratch of the attention kernels: [threads, per_thread].
  T* attention_scratch(int64_t per_thread);

  std::vector<T> rope_table_;  // [positions, hd/2, 2] (cos, sin)
  int rope_positions_ = 0;
  int rope_head_dim_ = 0;
  double rope_theta_ = 0.0;
  std::vector<T> scratch_;
  std::vector<int32_t> route_cursor_;  // router_forward's per-expert fill position
  std::vector<float> fp4_scratch_;     // dequantized weight tiles / float copies for FP4 ops
};

// Number of threads the CPU backend (and the BLAS) use; set once at start from the config.
void cpu_set_threads(int threads);
int cpu_threads();

}  // namespace rlhf
