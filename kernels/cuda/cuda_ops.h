#pragma once
// The CUDA backend: every op of kernels/ops.h on the GPU, in FP32, each checked against
// CpuOps<float> (tests/gpu/test_cuda_ops.cpp; tolerances stated there and in docs/cuda.md).
// What it is not yet (DESIGN.md's target): BF16 compute with FP32 accumulation through
// cuBLASLt, tensor-core attention (the attention kernels are tiled FP32), the FP4 experts
// through the sm90 grouped kernel, multi-stream work. Dense GEMMs go to cuBLAS
// SGEMM with tensor-op (TF32) math off, so they are plain FP32 and agree with the BLAS up to
// reordering; the experts' grouped GEMMs are one cublasSgemmGroupedBatched call each.
//
// Three layers per op, as ggml splits them: __global__ kernels and their launchers in the
// cuda_ops_*.cu files (declared in cuda_ops_kernels.cuh), and the checked entry points here
// (cuda_ops.cpp), which validate shapes, talk to cuBLAS and copy scalars back.
//
// Memory and ordering: every pointer the ops take is device memory (index arrays too, as
// ops.h says), every kernel, copy and cuBLAS call runs on the instance's own stream, in call
// order. The stream is non-blocking (it does not wait for the legacy default stream, nor that
// for it): code outside the ops that reads their memory waits through copy_to_host first.
// Ops that return a host value (seq_balance_loss, cross-entropy, sum_squares) wait for the
// device. A decode-sized forward does not wait anywhere: the router counts and scans the expert
// offsets on the device, the SwiGLU clamp counts accumulate in device memory, the KV cache's
// bounds are the caller's to check (it holds start[] on the host), and the grouped products of
// few rows per expert run the few-rows kernel, which reads the offsets on the device. Larger
// grouped products (training) size their grouped cuBLAS call from offsets read back once per
// routing (host_offsets), and fp4_grouped_matmul_forward does the same to decode only the
// experts with rows. Expert ids outside [0, E) (only a replayed trace could hold them, and the
// model checks those) raise a device flag that the next copy_to_host reports.
//
// Determinism: no float atomics anywhere. Each sum runs in an order fixed by the launch shape,
// so results repeat bit for bit from run to run on one GPU. Where the CPU reference sums
// sequentially and the op is cheap, the kernel keeps the CPU's order (embedding and dispatch
// backward, the balance loss), and the results match the CPU's exactly up to FMA contraction.
//
// Recording (ops.h): the ops between begin_recording and end_recording are captured from the
// stream into a CUDA graph. Ops that wait for the device or allocate refuse to be recorded
// (OpNotRecordable): copies to and from the host, offsets read back (the grouped cuBLAS route of
// training-sized products), growing the scratch. A recording replays only while the scratch it
// captured is still the current one. RLHF_CUDA_GRAPHS=off turns recording off (can_record()
// false), for A/B measurements with one binary.
//
// Not thread-safe: one instance per model, like CpuOps.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <unordered_map>
#include <vector>

#include "kernels/ops.h"

namespace rlhf::cuda {
struct FewRowsDenseProduct;  // cuda_ops_kernels.cuh
}  // namespace rlhf::cuda

struct cublasContext;  // cuBLAS's handle type (cublasHandle_t) without its header
struct CUevent_st;     // CUDA's event type (cudaEvent_t) without its header
struct CUstream_st;    // CUDA's stream type (cudaStream_t) without its header

namespace rlhf {

template <typename T>
class CudaOps final : public Ops<T> {
  static_assert(sizeof(T) == sizeof(float), "the CUDA backend computes in float only");

 public:
  // Creates the cuBLAS handle on the current device. Fatal (CUDA_CHECK) without a device.
  CudaOps();
  ~CudaOps() override;
  CudaOps(const CudaOps&) = delete;
  CudaOps& operator=(const CudaOps&) = delete;

  const char* name() const override { return "cuda"; }

  // How the few-rows kernels multiply: FP32 fmas or 3xTF32 tensor cores, by shape (the
  // default; RLHF_CUDA_FEW_ROWS_TC=off forces fmas), or one of them forced, for tests that must
  // check both on every shape.
  enum class FewRowsMath { by_shape, fma, tensor_cores };
  void set_few_rows_math(FewRowsMath math) { few_rows_math_ = math; }

  void* alloc_bytes(size_t bytes) override;
  void free_bytes(void* ptr) override;
  void copy_to_host(void* host_dst, const void* src, size_t bytes) override;
  void copy_from_host(void* dst, const void* host_src, size_t bytes) override;

  bool can_record() const override { return graphs_enabled_; }
  void begin_recording() override;
  std::unique_ptr<OpsRecording> end_recording() override;
  // The branch runs on a second stream with its own cuBLAS handle and scratch; the fork and
  // the join are events (graph edges when recording). RLHF_CUDA_SIDE_BRANCH=off keeps every op
  // on the main stream, for A/B runs.
  void side_branch_begin() override;
  void side_branch_end() override;
  void side_branch_join() override;

  using typename Ops<T>::Projection;
  void rope_forward_qk(T* q, T* k, const int32_t* positions, int N, int Hq, int Hk, int hd,
                       double theta) override;
  void kv_cache_write_kv(T* cache_k, T* cache_v, const T* k, const T* v,
                         const AttentionShape& shape) override;
  using typename Ops<T>::GroupedProjection;
  using typename Ops<T>::Fp4GroupedProjection;
  void grouped_matmul_forward_projections(const T* in, const int32_t* offsets, int n_groups,
                                          int rows, int N, int K,
                                          std::span<const GroupedProjection> projections) override;
  void fp4_grouped_matmul_forward_projections(
      const T* in, const int32_t* offsets, int n_groups, int rows,
      std::span<const Fp4GroupedProjection> projections) override;
  void matmul_forward_projections(const T* in, int M, int K,
                                  std::span<const Projection> projections) override;
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
  using typename Ops<T>::NormAfter;
  void matmul_residual_rmsnorm_forward(T* x, const T* residual, const T* in, const T* w, int M,
                                       int N, int K, const NormAfter& after) override;
  void moe_combine_rmsnorm_forward(T* out, const T* ye, const T* gates, const MoeRouting& routing,
                                   int D, const NormAfter& after) override;

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
  // Row-major C[M,N] = alpha op(A) op(B) + beta C through column-major SGEMM.
  void gemm(bool trans_a, bool trans_b, int M, int N, int K, const T* A, int lda, const T* B,
            int ldb, float beta, T* C, int ldc);
  // One grouped product: row-major C_g[M_g, N_g] = op(A_g) op(B_g) + beta C_g for every
  // problem g in `p`, all in one cublasSgemmGroupedBatched call. lda/ldb/ldc are shared.
  struct GroupedProblems {
    std::vector<int> m, n, k;
    std::vector<const T*> a, b;
    std::vector<T*> c;
    void clear() { m.clear(), n.clear(), k.clear(), a.clear(), b.clear(), c.clear(); }
    void add(int m_, int n_, int k_, const T* a_, const T* b_, T* c_) {
      m.push_back(m_), n.push_back(n_), k.push_back(k_), a.push_back(a_), b.push_back(b_),
          c.push_back(c_);
    }
  };
  void grouped_gemm(bool trans_a, bool trans_b, const GroupedProblems& p, int lda, int ldb,
                    float beta, int ldc);
  // The few-rows kernels (cuda_ops_few_rows.cu) take the forward products of decode and
  // small-batch sizes, where cuBLAS's large tiles leave HBM mostly idle: grouped products of at
  // most 64 rows per expert on average with tensor cores (batch 256 of bench-gpu.yaml: the step
  // took 4.0 ms against 6.1 through cuBLAS), 32 with FP32 fmas only (at 64 their first version
  // was slower than cuBLAS), and dense ones of at most 64 rows (their k is split across blocks
  // so one weight matrix still fills the GPU). Measured in docs/perf.md.
  static constexpr int kFewRowsGroupedMaxAverage = 64;
  static constexpr int kFewRowsGroupedMaxAverageFma = 32;
  static constexpr int kFewRowsDenseMaxRows = 64;
  // The most rows per group on average the grouped few-rows kernels take.
  int few_rows_grouped_max_average() const {
    return few_rows_math_ == FewRowsMath::fma ? kFewRowsGroupedMaxAverageFma
                                              : kFewRowsGroupedMaxAverage;
  }
  bool few_rows_enabled_ = true;
  bool fused_norm_enabled_ = true;  // RLHF_CUDA_FUSED_NORM
  FewRowsMath few_rows_math_ = FewRowsMath::by_shape;
  // Whether a few-rows product of `rows` rows over n_groups weight matrices takes tensor cores.
  bool few_rows_tensor_cores(int rows, int n_groups) const;
  // Whether a dense product of M rows goes to the few-rows kernels.
  bool few_rows_dense_fits(const void* in, const void* w, int M, int K) const;
  // The scratch for the split sums of few-rows dense products.
  float* few_rows_dense_partial(std::span<const cuda::FewRowsDenseProduct> products, int M,
                                int K);
  // Dense products of M <= kFewRowsDenseMaxRows rows through the few-rows kernel, in one launch.
  void few_rows_dense(std::span<const cuda::FewRowsDenseProduct> products, const T* in, int M,
                      int K, bool accumulate);
  // Whether grouped products of `rows` rows over n_groups matrices of K columns (in float, or
  // packed in `format`) go to the few-rows kernels.
  bool few_rows_grouped(const void* in, const void* w, int rows, int n_groups, int K) const;
  bool few_rows_fp4_grouped(const void* in, const PackedFp4Matrix& w, int rows,
                            int n_groups) const;
  // Whether the kernel's layout needs hold: 16-byte rows and 16-byte aligned operands.
  bool few_rows_kernel_fits(const void* in, const void* w, int K) const;
  // A fatal check that no kernel raised the device error flag. Valid after any wait for the
  // device.
  void check_device_flags();
  // Pinned host word the kernels write through its mapped device address when they meet bad
  // input they cannot report otherwise (expert ids out of range): read after every wait.
  int32_t* device_flags_host_ = nullptr;
  int32_t* device_flags_ = nullptr;
  // Device scratch of at least `bytes`, valid until the next call of scratch(); grows only.
  // Inside an open side branch it is the branch's own buffer.
  void* scratch(size_t bytes);
  // offsets[n_groups + 1] (device) on the host: the mirror of an earlier read, else read back
  // (a wait for the device) and mirrored.
  const int32_t* host_offsets(const int32_t* offsets, int n_groups);
  // Drops the offsets mirrors inside [ptr, ptr + bytes): that memory is being rewritten.
  void forget_offsets(const void* ptr, size_t bytes);

  // A recording (a CUDA graph) of this instance's stream; defined in the .cpp.
  class Recording;
  // Called first by every op that cannot be recorded: while recording, it ends the capture,
  // discards it and throws OpNotRecordable naming `op`.
  void refuse_while_recording(const char* op);
  bool graphs_enabled_ = true;
  bool recording_ = false;
  // Bumped whenever the scratch is reallocated: a recording made before reads freed memory.
  uint64_t scratch_epoch_ = 0;

  // The stream and cuBLAS handle ops queue on: the main ones, or the side branch's between
  // side_branch_begin and side_branch_end.
  CUstream_st* stream_ = nullptr;
  cublasContext* cublas_ = nullptr;
  CUstream_st* main_stream_ = nullptr;
  cublasContext* main_cublas_ = nullptr;
  CUstream_st* side_stream_ = nullptr;
  cublasContext* side_cublas_ = nullptr;
  CUevent_st* fork_event_ = nullptr;
  CUevent_st* join_event_ = nullptr;
  enum class Branch { none, open, unjoined };  // open: ops go to the side stream
  Branch branch_ = Branch::none;
  bool side_branch_enabled_ = true;  // RLHF_CUDA_SIDE_BRANCH
  // Ends a branch at once (joined), when a recording is abandoned.
  void close_side_branch();
  // Each stream's scratch: a branch's ops may run while the main ones use theirs.
  struct Scratch {
    void* ptr = nullptr;
    size_t bytes = 0;
  };
  Scratch main_scratch_, side_scratch_;
  // Host mirrors of expert offsets read back, keyed by device address, so the three grouped
  // products of a layer's forward (and the backward's) share one read. A mirror is dropped
  // when its memory may be rewritten: router_forward over it, copy_from_host, copy or fill
  // over it, and every free_bytes (freed addresses come back from cudaMalloc).
  std::unordered_map<const int32_t*, std::vector<int32_t>> offsets_mirror_;
  GroupedProblems grouped_, grouped_dw_;  // the problems of one grouped GEMM (two in backward)
  struct GroupedCallArrays;  // the per-group cuBLAS arguments (cuBLAS types: in the .cpp)
  std::unique_ptr<GroupedCallArrays> grouped_call_;
  // Pointer arrays of grouped_gemm reach the device through a ring of kGroupedSlots pinned
  // staging slots (3 arrays of grouped_capacity_ each) with an event recorded after each slot's
  // copy: a slot is rewritten only after its previous copy has run, without a device-wide wait.
  static constexpr int kGroupedSlots = 8;
  void** grouped_staging_ = nullptr;
  void** grouped_device_ = nullptr;
  size_t grouped_capacity_ = 0;
  std::vector<CUevent_st*> grouped_events_;  // cudaEvent_t per slot, created on first use
  int grouped_next_slot_ = 0;
  std::vector<double> host_values_;    // per-row or per-block partial results read back
};

}  // namespace rlhf
