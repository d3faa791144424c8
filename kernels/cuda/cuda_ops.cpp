// The CUDA backend's checked entry points (cuda_ops.h says what this slice is): shapes
// validated, cuBLAS called, kernels launched through cuda_ops_kernels.cuh, scalars read back.
#include "kernels/cuda/cuda_ops.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <new>
#include <string>

#include "common/error.h"
#include "kernels/cuda/cublas_check.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_ops_kernels.cuh"
#include "kernels/fp4/fp4_quant.cuh"

namespace rlhf {

namespace {

// Sizes of the pieces one op carves out of the scratch buffer, each 256-byte aligned.
size_t aligned(size_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace

template <typename T>
struct CudaOps<T>::GroupedCallArrays {
  std::vector<cublasOperation_t> trans_first, trans_second;
  std::vector<float> alpha, beta;
  std::vector<int> lda, ldb, ldc, size;
};

namespace {
// An on/off switch from the environment: on unless `name` is set to off; any other value is an
// error naming it.
bool env_switch(const char* name) {
  const char* mode = std::getenv(name);
  if (!mode) return true;
  const std::string m = mode;
  RLHF_CHECK(m == "off" || m == "on", "{} is '{}'; expected off or on", name, m);
  return m == "on";
}
}  // namespace

template <typename T>
CudaOps<T>::CudaOps() : grouped_call_(std::make_unique<GroupedCallArrays>()) {
  // A/B switches, each RLHF_CUDA_...=off|on (default on), for measurements with one binary
  // (docs/cuda.md):
  // FEW_ROWS: whether small products may take the few-rows kernels (else cuBLAS).
  few_rows_enabled_ = env_switch("RLHF_CUDA_FEW_ROWS");
  // FEW_ROWS_TC: whether the few-rows kernels may take their 3xTF32 tensor-core variant.
  if (!env_switch("RLHF_CUDA_FEW_ROWS_TC")) few_rows_math_ = FewRowsMath::fma;
  // FUSED_NORM: whether a residual update and the RMSNorm after it run as one kernel
  // (matmul_residual_rmsnorm_forward, moe_combine_rmsnorm_forward) or as the separate calls.
  // Same bits either way.
  fused_norm_enabled_ = env_switch("RLHF_CUDA_FUSED_NORM");
  // SIDE_BRANCH: whether side branches (side_branch_begin) run on a stream of their own or in
  // order on the main one.
  side_branch_enabled_ = env_switch("RLHF_CUDA_SIDE_BRANCH");
  // GRAPHS: whether callers may record ops into CUDA graphs.
  graphs_enabled_ = env_switch("RLHF_CUDA_GRAPHS");
  // A stream of our own because the legacy default stream cannot be captured into a graph.
  // Non-blocking: a blocking stream synchronizes with the legacy stream, so another thread's
  // cudaMemcpy (the actor builds a new model version beside the one generating) would break a
  // capture in progress. Every copy of ours goes through this stream instead.
  // The side branch's stream is made the same way, with a cuBLAS handle of its own (a handle's
  // workspace must not serve two streams at once).
  const auto make_stream = [](CUstream_st*& stream, cublasContext*& cublas) {
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cublasHandle_t handle = nullptr;
    CUBLAS_CHECK(cublasCreate(&handle));
    cublas = handle;
    CUBLAS_CHECK(cublasSetStream(handle, stream));
    // Plain FP32 products: no TF32 tensor-op shortcut, so the GEMMs differ from the CPU BLAS
    // by summation order only.
    CUBLAS_CHECK(cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH));
  };
  make_stream(main_stream_, main_cublas_);
  make_stream(side_stream_, side_cublas_);
  stream_ = main_stream_;
  cublas_ = main_cublas_;
  CUDA_CHECK(cudaEventCreateWithFlags(&fork_event_, cudaEventDisableTiming));
  CUDA_CHECK(cudaEventCreateWithFlags(&join_event_, cudaEventDisableTiming));
  CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&device_flags_host_), sizeof(int32_t),
                           cudaHostAllocMapped));
  *device_flags_host_ = 0;
  CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_flags_),
                                      device_flags_host_, 0));
}

template <typename T>
void CudaOps<T>::check_device_flags() {
  // Fatal, like the other internal checks: the model validates replayed traces on the host, so
  // an id out of range here is a bug, not bad input.
  const int32_t out_of_range = *device_flags_host_;
  RLHF_CHECK(out_of_range == 0,
             "{} expert ids outside [0, n_experts) reached the router", out_of_range);
}

template <typename T>
CudaOps<T>::~CudaOps() {
  // Unchecked: a destructor may run while an exception unwinds, and must not abort then.
  if (main_scratch_.ptr) cudaFree(main_scratch_.ptr);
  if (side_scratch_.ptr) cudaFree(side_scratch_.ptr);
  for (CUevent_st* event : grouped_events_) cudaEventDestroy(event);
  if (grouped_staging_) cudaFreeHost(grouped_staging_);
  if (grouped_device_) cudaFree(grouped_device_);
  if (device_flags_host_) cudaFreeHost(device_flags_host_);
  if (fork_event_) cudaEventDestroy(fork_event_);
  if (join_event_) cudaEventDestroy(join_event_);
  if (side_cublas_) cublasDestroy(side_cublas_);
  if (main_cublas_) cublasDestroy(main_cublas_);
  if (side_stream_) cudaStreamDestroy(side_stream_);
  if (main_stream_) cudaStreamDestroy(main_stream_);
}

// ---------------------------------------------------------------- recording

template <typename T>
class CudaOps<T>::Recording final : public OpsRecording {
 public:
  Recording(CudaOps& owner, cudaGraphExec_t exec)
      : owner_(owner), exec_(exec), scratch_epoch_(owner.scratch_epoch_) {}
  ~Recording() override { cudaGraphExecDestroy(exec_); }  // unchecked, as in ~CudaOps
  Recording(const Recording&) = delete;
  Recording& operator=(const Recording&) = delete;

  bool replay() override {
    RLHF_CHECK(!owner_.recording_, "a recording replayed while another is being recorded");
    RLHF_CHECK(owner_.branch_ == Branch::none, "a recording replayed inside a side branch");
    if (owner_.scratch_epoch_ != scratch_epoch_) return false;
    // The graph rewrites memory (routing offsets among it) without passing through the ops
    // that drop host mirrors of offsets, so none may survive it.
    owner_.offsets_mirror_.clear();
    CUDA_CHECK(cudaGraphLaunch(exec_, owner_.main_stream_));
    return true;
  }

 private:
  CudaOps& owner_;
  cudaGraphExec_t exec_;
  uint64_t scratch_epoch_;
};

template <typename T>
void CudaOps<T>::begin_recording() {
  RLHF_CHECK(graphs_enabled_, "recording asked of a backend with RLHF_CUDA_GRAPHS=off");
  RLHF_CHECK(!recording_, "begin_recording while already recording");
  RLHF_CHECK(branch_ == Branch::none, "begin_recording inside a side branch");
  // Thread-local mode: other threads' CUDA calls (another model's ops) stay unaffected.
  CUDA_CHECK(cudaStreamBeginCapture(main_stream_, cudaStreamCaptureModeThreadLocal));
  recording_ = true;
}

template <typename T>
std::unique_ptr<OpsRecording> CudaOps<T>::end_recording() {
  RLHF_CHECK(recording_, "end_recording without begin_recording");
  RLHF_CHECK(branch_ == Branch::none, "end_recording inside a side branch that was not joined");
  recording_ = false;
  cudaGraph_t graph = nullptr;
  CUDA_CHECK(cudaStreamEndCapture(main_stream_, &graph));
  cudaGraphExec_t exec = nullptr;
  const cudaError_t status = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);  // the executable graph is independent of it
  CUDA_CHECK(status);
  return std::make_unique<Recording>(*this, exec);
}

template <typename T>
void CudaOps<T>::refuse_while_recording(const char* op) {
  if (!recording_) return;
  recording_ = false;
  close_side_branch();  // a capture ends only with its side streams joined
  cudaGraph_t graph = nullptr;
  CUDA_CHECK(cudaStreamEndCapture(main_stream_, &graph));
  if (graph) cudaGraphDestroy(graph);
  throw OpNotRecordable(fmt::format(
      "{} cannot be recorded into a CUDA graph: it waits for the device or allocates", op));
}

template <typename T>
void* CudaOps<T>::scratch(size_t bytes) {
  Scratch& s = branch_ == Branch::open ? side_scratch_ : main_scratch_;
  if (bytes > s.bytes) {
    refuse_while_recording("growing the scratch");
    ++scratch_epoch_;
    // Work queued on the streams may still read the old buffer.
    CUDA_CHECK(cudaDeviceSynchronize());
    if (s.ptr) CUDA_CHECK(cudaFree(s.ptr));
    s.ptr = nullptr;
    const size_t grown = std::max(bytes, 2 * s.bytes);
    CUDA_CHECK(cudaMalloc(&s.ptr, grown));
    s.bytes = grown;
  }
  return s.ptr;
}

// ---------------------------------------------------------------- side branch

template <typename T>
void CudaOps<T>::side_branch_begin() {
  // A forward that threw inside a branch left it open: join it, then fork anew.
  close_side_branch();
  if (!side_branch_enabled_) return;
  CUDA_CHECK(cudaEventRecord(fork_event_, main_stream_));
  CUDA_CHECK(cudaStreamWaitEvent(side_stream_, fork_event_, 0));
  stream_ = side_stream_;
  cublas_ = side_cublas_;
  branch_ = Branch::open;
}

template <typename T>
void CudaOps<T>::side_branch_end() {
  if (!side_branch_enabled_) return;
  RLHF_CHECK(branch_ == Branch::open, "side_branch_end without side_branch_begin");
  CUDA_CHECK(cudaEventRecord(join_event_, side_stream_));
  stream_ = main_stream_;
  cublas_ = main_cublas_;
  branch_ = Branch::unjoined;
}

template <typename T>
void CudaOps<T>::side_branch_join() {
  if (!side_branch_enabled_) return;
  RLHF_CHECK(branch_ == Branch::unjoined, "side_branch_join without side_branch_end");
  CUDA_CHECK(cudaStreamWaitEvent(main_stream_, join_event_, 0));
  branch_ = Branch::none;
}

template <typename T>
void CudaOps<T>::close_side_branch() {
  if (branch_ == Branch::open) side_branch_end();
  if (branch_ == Branch::unjoined) side_branch_join();
}

template <typename T>
const int32_t* CudaOps<T>::host_offsets(const int32_t* offsets, int n_groups) {
  // Even a mirror hit: the recording would keep these offsets when the routing changes.
  refuse_while_recording("reading expert offsets back");
  const auto known = offsets_mirror_.find(offsets);
  if (known != offsets_mirror_.end() && known->second.size() == size_t(n_groups) + 1) {
    return known->second.data();
  }
  std::vector<int32_t>& mirror = offsets_mirror_[offsets];
  mirror.resize(size_t(n_groups) + 1);
  copy_to_host(mirror.data(), offsets, sizeof(int32_t) * mirror.size());
  return mirror.data();
}

template <typename T>
void CudaOps<T>::forget_offsets(const void* ptr, size_t bytes) {
  const auto* begin = static_cast<const char*>(ptr);
  std::erase_if(offsets_mirror_, [&](const auto& entry) {
    const auto* p = reinterpret_cast<const char*>(entry.first);
    return p + sizeof(int32_t) * entry.second.size() > begin && p < begin + bytes;
  });
}

template <typename T>
void CudaOps<T>::gemm(bool trans_a, bool trans_b, int M, int N, int K, const T* A, int lda,
                      const T* B, int ldb, float beta, T* C, int ldc) {
  // A row-major matrix read column-major is its transpose: C^T = op(B)^T op(A)^T, so the
  // column-major call takes B first and swaps M and N.
  const float alpha = 1.0f;
  CUBLAS_CHECK(cublasSgemm(cublas_, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                           trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &alpha, B, ldb, A, lda,
                           &beta, C, ldc));
}

template <typename T>
void CudaOps<T>::grouped_gemm(bool trans_a, bool trans_b, const GroupedProblems& p, int lda,
                              int ldb, float beta, int ldc) {
  // Its pointer arrays come from host staging rewritten by later calls.
  refuse_while_recording("a grouped cuBLAS product");
  const size_t count = p.m.size();
  if (count == 0) return;
  if (count > grouped_capacity_) {
    CUDA_CHECK(cudaDeviceSynchronize());  // queued copies may still read the old arrays
    if (grouped_staging_) CUDA_CHECK(cudaFreeHost(grouped_staging_));
    if (grouped_device_) CUDA_CHECK(cudaFree(grouped_device_));
    grouped_capacity_ = std::max<size_t>(count, 64);
    const size_t bytes = kGroupedSlots * 3 * grouped_capacity_ * sizeof(void*);
    CUDA_CHECK(cudaMallocHost(reinterpret_cast<void**>(&grouped_staging_), bytes));
    CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&grouped_device_), bytes));
  }
  if (grouped_events_.empty()) {
    grouped_events_.resize(kGroupedSlots);
    for (auto& event : grouped_events_) {
      CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
      CUDA_CHECK(cudaEventRecord(event, stream_));  // "done": nothing to wait for yet
    }
  }
  const int slot = grouped_next_slot_;
  grouped_next_slot_ = (grouped_next_slot_ + 1) % kGroupedSlots;
  // The copy out of this slot kGroupedSlots calls ago must have run before it is rewritten.
  CUDA_CHECK(cudaEventSynchronize(grouped_events_[slot]));
  void** staging = grouped_staging_ + size_t(slot) * 3 * grouped_capacity_;
  void** device = grouped_device_ + size_t(slot) * 3 * grouped_capacity_;
  // Column-major view, as in gemm(): C^T = op(B)^T op(A)^T, so B comes first and M, N swap.
  for (size_t g = 0; g < count; ++g) {
    staging[g] = const_cast<T*>(p.b[g]);
    staging[grouped_capacity_ + g] = const_cast<T*>(p.a[g]);
    staging[2 * grouped_capacity_ + g] = p.c[g];
  }
  CUDA_CHECK(cudaMemcpyAsync(device, staging, 3 * grouped_capacity_ * sizeof(void*),
                             cudaMemcpyHostToDevice, stream_));
  CUDA_CHECK(cudaEventRecord(grouped_events_[slot], stream_));
  GroupedCallArrays& arrays = *grouped_call_;
  arrays.trans_first.assign(count, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N);
  arrays.trans_second.assign(count, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N);
  arrays.alpha.assign(count, 1.0f);
  arrays.beta.assign(count, beta);
  arrays.lda.assign(count, ldb);
  arrays.ldb.assign(count, lda);
  arrays.ldc.assign(count, ldc);
  arrays.size.assign(count, 1);
  CUBLAS_CHECK(cublasSgemmGroupedBatched(
      cublas_, arrays.trans_first.data(), arrays.trans_second.data(),
      p.n.data(), p.m.data(), p.k.data(), arrays.alpha.data(),
      reinterpret_cast<const float* const*>(device), arrays.lda.data(),
      reinterpret_cast<const float* const*>(device + grouped_capacity_),
      arrays.ldb.data(), arrays.beta.data(),
      reinterpret_cast<float* const*>(device + 2 * grouped_capacity_),
      arrays.ldc.data(), int(count), arrays.size.data()));
}

// ---------------------------------------------------------------- memory

template <typename T>
void* CudaOps<T>::alloc_bytes(size_t bytes) {
  refuse_while_recording("allocating device memory");
  void* ptr = nullptr;
  const cudaError_t status = cudaMalloc(&ptr, std::max<size_t>(bytes, 1));
  if (status == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // clear it: running out of memory is the caller's to handle
    throw std::bad_alloc();
  }
  CUDA_CHECK(status);
  return ptr;
}

template <typename T>
void CudaOps<T>::free_bytes(void* ptr) {
  refuse_while_recording("freeing device memory");
  offsets_mirror_.clear();
  if (ptr) CUDA_CHECK(cudaFree(ptr));
}

template <typename T>
void CudaOps<T>::copy_to_host(void* host_dst, const void* src, size_t bytes) {
  refuse_while_recording("a copy to the host");
  if (bytes) CUDA_CHECK(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  check_device_flags();  // the wait covered every queued kernel
}

template <typename T>
void CudaOps<T>::copy_from_host(void* dst, const void* host_src, size_t bytes) {
  refuse_while_recording("a copy from the host");
  forget_offsets(dst, bytes);
  // In stream order. From pageable memory the call returns once the source is staged, so the
  // caller may reuse it at once.
  if (bytes) CUDA_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, stream_));
}

// ---------------------------------------------------------------- dense algebra

template <typename T>
bool CudaOps<T>::few_rows_kernel_fits(const void* in, const void* w, int K) const {
  const auto aligned16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return K % 4 == 0 && aligned16(in) && aligned16(w);
}

template <typename T>
bool CudaOps<T>::few_rows_tensor_cores(int rows, int n_groups) const {
  switch (few_rows_math_) {
    case FewRowsMath::fma: return false;
    case FewRowsMath::tensor_cores: return true;
    case FewRowsMath::by_shape: break;
  }
  return cuda::few_rows_take_tensor_cores(rows, n_groups);
}

template <typename T>
void CudaOps<T>::matmul_forward(T* out, const T* in, const T* w, int M, int N, int K,
                                bool accumulate) {
  if (M == 0 || N == 0) return;
  if (few_rows_dense_fits(in, w, M, K)) {
    const cuda::FewRowsDenseProduct product[] = {{out, w, N}};
    few_rows_dense(product, in, M, K, accumulate);
    return;
  }
  gemm(false, true, M, N, K, in, K, w, K, accumulate ? 1.0f : 0.0f, out, N);
}

template <typename T>
void CudaOps<T>::matmul_forward_projections(const T* in, int M, int K,
                                            std::span<const Projection> projections) {
  bool one_launch = M > 0 && projections.size() <= size_t(cuda::kFewRowsMaxProducts);
  for (const Projection& p : projections) one_launch &= few_rows_dense_fits(in, p.w, M, K);
  if (!one_launch) {
    Ops<T>::matmul_forward_projections(in, M, K, projections);
    return;
  }
  std::array<cuda::FewRowsDenseProduct, cuda::kFewRowsMaxProducts> products;
  for (size_t i = 0; i < projections.size(); ++i) {
    products[i] = {projections[i].out, projections[i].w, projections[i].n};
  }
  few_rows_dense(std::span(products.data(), projections.size()), in, M, K, false);
}

template <typename T>
void CudaOps<T>::few_rows_dense(std::span<const cuda::FewRowsDenseProduct> products,
                                const T* in, int M, int K, bool accumulate) {
  cuda::few_rows_dense_matmul(products, in, M, K, accumulate,
                              few_rows_dense_partial(products, M, K), few_rows_tensor_cores(M, 1),
                              stream_);
}

template <typename T>
bool CudaOps<T>::few_rows_dense_fits(const void* in, const void* w, int M, int K) const {
  return few_rows_enabled_ && M <= kFewRowsDenseMaxRows && few_rows_kernel_fits(in, w, K);
}

template <typename T>
float* CudaOps<T>::few_rows_dense_partial(std::span<const cuda::FewRowsDenseProduct> products,
                                          int M, int K) {
  return static_cast<float*>(
      scratch(sizeof(float) * size_t(cuda::few_rows_dense_scratch_floats(M, products, K))));
}

template <typename T>
void CudaOps<T>::matmul_backward(T* din, T* dw, const T* dout, const T* in, const T* w, int M,
                                 int N, int K, bool accumulate_din) {
  if (M == 0 || K == 0) return;
  if (din) gemm(false, false, M, K, N, dout, N, w, K, accumulate_din ? 1.0f : 0.0f, din, K);
  if (dw && N > 0) gemm(true, false, N, K, M, dout, N, in, K, 1.0f, dw, K);
}

// Larger products: one cuBLAS call per grouped product for all experts with rows, instead of
// one per expert: an MoE layer of E experts issues 3 calls forward and 6 backward rather than
// 3E and 6E, which is what bounded small-batch training (docs/cuda.md).
template <typename T>
bool CudaOps<T>::few_rows_grouped(const void* in, const void* w, int rows, int n_groups,
                                  int K) const {
  return few_rows_enabled_ && rows <= few_rows_grouped_max_average() * n_groups &&
         few_rows_kernel_fits(in, w, K);
}

template <typename T>
bool CudaOps<T>::few_rows_fp4_grouped(const void* in, const PackedFp4Matrix& w, int rows,
                                      int n_groups) const {
  return few_rows_enabled_ && rows <= few_rows_grouped_max_average() * n_groups &&
         cuda::few_rows_fp4_fits(w.format, int(w.cols)) &&
         few_rows_kernel_fits(in, w.codes, int(w.cols));
}

template <typename T>
void CudaOps<T>::grouped_matmul_forward_projections(
    const T* in, const int32_t* offsets, int n_groups, int rows, int N, int K,
    std::span<const GroupedProjection> projections) {
  bool one_launch = rows > 0 && N > 0 && !projections.empty() &&
                    projections.size() <= size_t(cuda::kFewRowsMaxGroupedProducts);
  for (const GroupedProjection& p : projections) {
    one_launch &= few_rows_grouped(in, p.w, rows, n_groups, K);
  }
  if (!one_launch) {
    Ops<T>::grouped_matmul_forward_projections(in, offsets, n_groups, rows, N, K, projections);
    return;
  }
  std::array<cuda::FewRowsGroupedProduct, cuda::kFewRowsMaxGroupedProducts> products;
  for (size_t i = 0; i < projections.size(); ++i) {
    products[i] = {projections[i].out, projections[i].w};
  }
  cuda::few_rows_matmul(std::span(products.data(), projections.size()), in, offsets, n_groups, rows, N, K,
                        few_rows_tensor_cores(rows, n_groups), stream_);
}

template <typename T>
void CudaOps<T>::fp4_grouped_matmul_forward_projections(
    const T* in, const int32_t* offsets, int n_groups, int rows,
    std::span<const Fp4GroupedProjection> projections) {
  bool one_launch = rows > 0 && n_groups > 0 && !projections.empty() &&
                    projections.size() <= size_t(cuda::kFewRowsMaxGroupedProducts);
  if (!one_launch) {
    Ops<T>::fp4_grouped_matmul_forward_projections(in, offsets, n_groups, rows, projections);
    return;
  }
  const PackedFp4Matrix& first = *projections.front().w;
  for (const Fp4GroupedProjection& p : projections) {
    one_launch &= p.w->format == first.format && p.w->rows == first.rows &&
                  p.w->cols == first.cols && p.w->rows % n_groups == 0 && p.w->rows > 0 &&
                  few_rows_fp4_grouped(in, *p.w, rows, n_groups);
  }
  if (!one_launch) {
    Ops<T>::fp4_grouped_matmul_forward_projections(in, offsets, n_groups, rows, projections);
    return;
  }
  std::array<cuda::FewRowsFp4GroupedProduct, cuda::kFewRowsMaxGroupedProducts> products;
  for (size_t i = 0; i < projections.size(); ++i) {
    const PackedFp4Matrix& w = *projections[i].w;
    products[i] = {projections[i].out, w.codes, w.scales, w.global_scale};
  }
  cuda::few_rows_fp4_matmul(std::span(products.data(), projections.size()), in, first.format, offsets, n_groups, rows,
                            int(first.rows / n_groups), int(first.cols),
                            few_rows_tensor_cores(rows, n_groups), stream_);
}

template <typename T>
void CudaOps<T>::grouped_matmul_forward(T* out, const T* in, const T* w, const int32_t* offsets,
                                        int n_groups, int rows, int N, int K) {
  RLHF_CHECK(rows >= 0 && n_groups > 0, "grouped matmul of {} rows over {} groups", rows,
             n_groups);
  // Decode-sized groups (a few dozen rows per expert on average) go to the few-rows kernel,
  // which reads the offsets on the device: no wait, and the weights stream at HBM speed.
  if (few_rows_grouped(in, w, rows, n_groups, K)) {
    const cuda::FewRowsGroupedProduct product[] = {{out, w}};
    cuda::few_rows_matmul(product, in, offsets, n_groups, rows, N, K,
                          few_rows_tensor_cores(rows, n_groups), stream_);
    return;
  }
  const int32_t* off = host_offsets(offsets, n_groups);
  grouped_.clear();
  for (int e = 0; e < n_groups; ++e) {
    const int group_rows = off[e + 1] - off[e];
    if (group_rows == 0) continue;
    // out_e[group_rows, N] = in_e[group_rows, K] W_e^T
    grouped_.add(group_rows, N, K, in + int64_t(off[e]) * K, w + int64_t(e) * N * K,
                 out + int64_t(off[e]) * N);
  }
  if (N > 0) grouped_gemm(false, true, grouped_, K, K, 0.0f, N);
}

template <typename T>
void CudaOps<T>::grouped_matmul_backward(T* din, T* dw, const T* dout, const T* in, const T* w,
                                         const int32_t* offsets, int n_groups, int N, int K,
                                         bool accumulate_din) {
  const int32_t* off = host_offsets(offsets, n_groups);
  if (K == 0) return;
  grouped_.clear();
  grouped_dw_.clear();
  for (int e = 0; e < n_groups; ++e) {
    const int rows = off[e + 1] - off[e];
    if (rows == 0) continue;
    const int64_t r0 = off[e];
    // din_e[rows, K] (+)= dout_e[rows, N] W_e[N, K]
    if (din) grouped_.add(rows, K, N, dout + r0 * N, w + int64_t(e) * N * K, din + r0 * K);
    // dW_e[N, K] += dout_e^T[N, rows] in_e[rows, K]
    if (dw && N > 0) {
      grouped_dw_.add(N, K, rows, dout + r0 * N, in + r0 * K, dw + int64_t(e) * N * K);
    }
  }
  grouped_gemm(false, false, grouped_, N, K, accumulate_din ? 1.0f : 0.0f, K);
  grouped_gemm(true, false, grouped_dw_, N, K, 1.0f, K);
}

// ---------------------------------------------------------------- embedding, norm, RoPE

template <typename T>
void CudaOps<T>::embedding_forward(T* out, const int32_t* tokens, const T* table, int N, int D) {
  cuda::embedding_forward(out, tokens, table, N, D, stream_);
}

template <typename T>
void CudaOps<T>::embedding_backward(T* dtable, const T* dout, const int32_t* tokens, int N, int D,
                                    int V) {
  cuda::embedding_backward(dtable, dout, tokens, N, D, stream_);
}

template <typename T>
void CudaOps<T>::rmsnorm_forward(T* out, T* rstd, const T* in, const T* weight, int N, int D,
                                 double eps) {
  cuda::rmsnorm_forward(out, rstd, in, weight, N, D, float(eps), stream_);
}

namespace {
template <typename NormAfter>
cuda::NormAfterArgs norm_after_args(const NormAfter& after) {
  return {after.normed, after.rstd, after.weight, float(after.eps), after.copy};
}
}  // namespace

// A decode-sized product: the few-rows split kernel, then one kernel for the residual, the
// split sums, the copy and the norm (instead of a copy, the reduction, the norm and a copy).
template <typename T>
void CudaOps<T>::matmul_residual_rmsnorm_forward(T* x, const T* residual, const T* in,
                                                 const T* w, int M, int N, int K,
                                                 const NormAfter& after) {
  if (M == 0 || N == 0) return;
  if (!(fused_norm_enabled_ && few_rows_dense_fits(in, w, M, K))) {
    Ops<T>::matmul_residual_rmsnorm_forward(x, residual, in, w, M, N, K, after);
    return;
  }
  const cuda::FewRowsDenseProduct product{x, w, N};
  float* partial = few_rows_dense_partial(std::span(&product, 1), M, K);
  cuda::few_rows_dense_matmul_rmsnorm(product, residual, in, M, K, partial,
                                      few_rows_tensor_cores(M, 1), norm_after_args(after),
                                      stream_);
}

template <typename T>
void CudaOps<T>::moe_combine_rmsnorm_forward(T* out, const T* ye, const T* gates,
                                             const MoeRouting& r, int D,
                                             const NormAfter& after) {
  if (!fused_norm_enabled_) {
    Ops<T>::moe_combine_rmsnorm_forward(out, ye, gates, r, D, after);
    return;
  }
  cuda::moe_combine_rmsnorm_forward(out, ye, gates, r, D, norm_after_args(after), stream_);
}

template <typename T>
void CudaOps<T>::rmsnorm_backward(T* din, T* dweight, const T* dout, const T* in, const T* weight,
                                  const T* rstd, int N, int D) {
  cuda::rmsnorm_backward(din, dweight, dout, in, weight, rstd, N, D, stream_);
}

template <typename T>
void CudaOps<T>::rope_forward(T* x, const int32_t* positions, int N, int H, int hd,
                              double theta) {
  RLHF_CHECK(hd % 2 == 0, "RoPE needs an even head_dim, got {}", hd);
  cuda::rope(x, positions, N, H, hd, theta, 1.0f, stream_);
}

template <typename T>
void CudaOps<T>::rope_forward_qk(T* q, T* k, const int32_t* positions, int N, int Hq, int Hk,
                                 int hd, double theta) {
  RLHF_CHECK(hd % 2 == 0, "RoPE needs an even head_dim, got {}", hd);
  cuda::rope_pair(q, Hq, k, Hk, positions, N, hd, theta, 1.0f, stream_);
}

template <typename T>
void CudaOps<T>::rope_backward(T* dx, const int32_t* positions, int N, int H, int hd,
                               double theta) {
  // The rotation is orthogonal, so its gradient is the rotation by the negative angle.
  RLHF_CHECK(hd % 2 == 0, "RoPE needs an even head_dim, got {}", hd);
  cuda::rope(dx, positions, N, H, hd, theta, -1.0f, stream_);
}

// ---------------------------------------------------------------- attention

template <typename T>
void CudaOps<T>::kv_cache_write(T* cache, const T* kv, const AttentionShape& s) {
  // start[] is device memory: checking it here would cost a wait per layer. The caller checks
  // start[b] + n_new <= capacity on its host copy (Transformer::forward); the kernel writes
  // nothing outside the cache even if that check were skipped.
  cuda::kv_cache_write(cache, kv, s, stream_);
}

template <typename T>
void CudaOps<T>::kv_cache_write_kv(T* cache_k, T* cache_v, const T* k, const T* v,
                                   const AttentionShape& s) {
  cuda::kv_cache_write_pair(cache_k, k, cache_v, v, s, stream_);  // bounds: kv_cache_write
}

template <typename T>
void CudaOps<T>::attention_forward(T* out, T* lse, const T* q, const T* k, const T* v,
                                   const AttentionShape& s) {
  RLHF_CHECK(s.n_kv_heads > 0 && s.n_heads % s.n_kv_heads == 0,
             "{} query heads are not groups of {} kv heads", s.n_heads, s.n_kv_heads);
  const int64_t partial_floats = cuda::attention_forward_scratch_floats(s);
  auto* partials =
      partial_floats > 0 ? static_cast<float*>(scratch(sizeof(float) * size_t(partial_floats)))
                         : nullptr;
  cuda::attention_forward(out, lse, q, k, v, s, partials, stream_);
}

template <typename T>
void CudaOps<T>::attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* out,
                                    const T* lse, const T* q, const T* k, const T* v,
                                    const AttentionShape& s) {
  RLHF_CHECK(s.n_kv_heads > 0 && s.n_heads % s.n_kv_heads == 0,
             "{} query heads are not groups of {} kv heads", s.n_heads, s.n_kv_heads);
  auto* delta = static_cast<float*>(
      scratch(sizeof(float) * std::max<size_t>(1, size_t(s.batch) * s.n_heads * s.n_new)));
  cuda::attention_backward(dq, dk, dv, dout, out, lse, q, k, v, s, delta, stream_);
}

// ---------------------------------------------------------------- SwiGLU

namespace {
float clamp_gate_max(const SwigluClampConfig& c) {
  return c.enabled ? float(c.gate_max) : std::numeric_limits<float>::infinity();
}
float clamp_limit(const SwigluClampConfig& c) {
  return c.enabled ? float(c.linear_limit) : std::numeric_limits<float>::infinity();
}
}  // namespace

template <typename T>
void CudaOps<T>::swiglu_forward(T* h, const T* gate, const T* up, int64_t n,
                                const SwigluClampConfig& clamp, int64_t* clamp_counts) {
  static_assert(sizeof(int64_t) == sizeof(unsigned long long));
  cuda::swiglu_forward(h, gate, up, n, clamp_gate_max(clamp), clamp_limit(clamp),
                       reinterpret_cast<unsigned long long*>(clamp_counts), stream_);
}

template <typename T>
void CudaOps<T>::swiglu_backward(T* dgate, T* dup, const T* dh, const T* gate, const T* up,
                                 int64_t n, const SwigluClampConfig& clamp) {
  cuda::swiglu_backward(dgate, dup, dh, gate, up, n, clamp_gate_max(clamp), clamp_limit(clamp),
                        stream_);
}

// ---------------------------------------------------------------- MoE

template <typename T>
void CudaOps<T>::router_forward(T* scores, T* gates, MoeRouting& r, const T* logits,
                                const T* bias, double route_scale, bool replay) {
  const int E = r.n_experts;
  forget_offsets(r.offsets, sizeof(int32_t) * (size_t(E) + 1));
  if (r.n_tokens > 0 && cuda::router_fits_one_block(r)) {  // decode sizes: one launch
    cuda::router_one_block(scores, gates, r, logits, bias, float(route_scale), replay,
                           device_flags_, stream_);
    return;
  }
  cuda::router_select(scores, gates, r, logits, bias, float(route_scale), replay, stream_);
  // Counted and scanned on the device: the host does not wait for the routing. Ids outside
  // [0, E) raise the device flag (reported at the next read-back).
  auto* counts = static_cast<int32_t*>(scratch(sizeof(int32_t) * (size_t(E) + 1)));
  cuda::router_count(counts, r, stream_);
  cuda::router_offsets(r.offsets, counts, E, device_flags_, stream_);
  cuda::router_fill(r, stream_);
}

template <typename T>
void CudaOps<T>::router_backward(T* dlogits, const T* dgates, const T* scores, const T* gates,
                                 const MoeRouting& r, double route_scale) {
  cuda::router_backward(dlogits, dgates, scores, gates, r, float(route_scale), stream_);
}

template <typename T>
double CudaOps<T>::seq_balance_loss(T* dlogits, const T* scores, const MoeRouting& r,
                                    int seq_len, double coef, double normalizer) {
  const int N = r.n_tokens, E = r.n_experts;
  RLHF_CHECK(seq_len > 0 && N % seq_len == 0, "{} tokens are not whole sequences of {}", N,
             seq_len);
  const int n_seq = N / seq_len;
  const size_t terms_bytes = aligned(sizeof(double) * size_t(n_seq) * E);
  const size_t sums_bytes = aligned(sizeof(double) * size_t(N));
  auto* base = static_cast<char*>(scratch(2 * terms_bytes + sums_bytes + 256));
  auto* terms = reinterpret_cast<double*>(base);
  auto* dsn = reinterpret_cast<double*>(base + terms_bytes);
  auto* row_sums = reinterpret_cast<double*>(base + 2 * terms_bytes);
  cuda::seq_balance_loss(dlogits, terms, row_sums, dsn, scores, r, seq_len, coef, normalizer,
                         stream_);
  // Summed on the host in the CPU's order (sequence, then expert).
  host_values_.resize(size_t(n_seq) * E);
  copy_to_host(host_values_.data(), terms, sizeof(double) * host_values_.size());
  double total = 0;
  for (double term : host_values_) total += term;
  return total;
}

template <typename T>
void CudaOps<T>::moe_dispatch_forward(T* xe, const T* x, const MoeRouting& r, int D) {
  cuda::moe_dispatch_forward(xe, x, r, D, stream_);
}

template <typename T>
void CudaOps<T>::moe_dispatch_backward(T* dx, const T* dxe, const MoeRouting& r, int D) {
  cuda::moe_dispatch_backward(dx, dxe, r, D, stream_);
}

template <typename T>
void CudaOps<T>::moe_combine_forward(T* out, const T* ye, const T* gates, const MoeRouting& r,
                                     int D) {
  cuda::moe_combine_forward(out, ye, gates, r, D, stream_);
}

template <typename T>
void CudaOps<T>::moe_combine_backward(T* dye, T* dgates, const T* dout, const T* ye,
                                      const T* gates, const MoeRouting& r, int D) {
  cuda::moe_combine_backward(dye, dgates, dout, ye, gates, r, D, stream_);
}

// ---------------------------------------------------------------- loss

template <typename T>
double CudaOps<T>::cross_entropy_forward_backward(T* dlogits, const T* logits,
                                                  const int32_t* targets, const T* weights,
                                                  int N, int V) {
  if (N == 0) return 0.0;
  auto* row_loss = static_cast<double*>(scratch(sizeof(double) * size_t(N)));
  cuda::cross_entropy(dlogits, row_loss, logits, targets, weights, N, V, stream_);
  // Summed on the host in row order, as on the CPU.
  host_values_.resize(size_t(N));
  copy_to_host(host_values_.data(), row_loss, sizeof(double) * size_t(N));
  double total = 0;
  for (double x : host_values_) total += x;
  return total;
}

template <typename T>
void CudaOps<T>::log_softmax_gather(T* logprobs, const T* logits, const int32_t* targets, int N,
                                    int V, double temperature) {
  cuda::log_softmax_gather(logprobs, logits, targets, N, V, 1.0f / float(temperature), stream_);
}

// ---------------------------------------------------------------- FP4

template <typename T>
void CudaOps<T>::fp4_fake_quantize(T* out, uint8_t* saturated, const T* in, int64_t rows,
                                   int64_t cols, Fp4Format format) {
  // The quantizer reads the tensor's largest value back to check it is finite.
  refuse_while_recording("fp4_fake_quantize");
  const int64_t n = rows * cols;
  if (n == 0) return;
  fp4_check_shape("fp4_fake_quantize", "expert weights", rows, cols, format);
  const int block = fp4_block_size(format);
  const size_t codes_bytes = aligned(size_t(n / 2));
  const size_t scales_bytes = aligned(size_t(n / block));
  auto* base = static_cast<uint8_t*>(scratch(codes_bytes + scales_bytes + 256));
  uint8_t* codes = base;
  uint8_t* scales = base + codes_bytes;
  auto* global = reinterpret_cast<float*>(base + codes_bytes + scales_bytes);
  // The CUDA quantizer (bit-identical to the CPU's; throws on NaN/Inf like it), then the
  // saturation mask from `in` before the decode may overwrite it (in == out is allowed).
  fp4_quantize_cuda(in, rows, cols, format, "expert weights", codes, scales, global, stream_);
  if (saturated) cuda::fp4_saturated(saturated, in, rows, cols, format, global, stream_);
  fp4_dequantize_cuda(codes, scales, global, rows, cols, format, out, stream_);
}

template <typename T>
void CudaOps<T>::zero_where(T* grad, const uint8_t* mask, int64_t n) {
  cuda::zero_where(grad, mask, n, stream_);
}

template <typename T>
void CudaOps<T>::fp4_matmul_forward(T* out, const T* in, const PackedFp4Matrix& w, int M,
                                    bool accumulate) {
  const int64_t N = w.rows, K = w.cols;
  const int block = fp4_block_size(w.format);
  RLHF_CHECK(K % block == 0, "packed FP4 matrix with {} columns is not whole {}-value blocks", K,
             block);
  if (M == 0 || N == 0) return;
  // A decode step's few rows: a warp per output column decodes the packed column in registers.
  if (few_rows_enabled_ && cuda::fp4_gemv_fits(M, int(K)) &&
      few_rows_kernel_fits(in, w.codes, int(K))) {
    cuda::fp4_gemv(out, in, w.codes, w.scales, w.global_scale, w.format, M, int(N), int(K),
                   accumulate, stream_);
    return;
  }
  // Decode a tile of weight rows at a time (at most 4M values, 16 MB) and multiply it through
  // cuBLAS: the full-precision weight never exists, only one tile of it.
  constexpr int64_t kTileValues = int64_t(1) << 22;
  const int64_t tile_rows = std::max<int64_t>(1, std::min<int64_t>(N, kTileValues / K));
  auto* tile = static_cast<float*>(scratch(sizeof(float) * size_t(tile_rows * K)));
  for (int64_t n0 = 0; n0 < N; n0 += tile_rows) {
    const int64_t rows = std::min(tile_rows, N - n0);
    cuda::fp4_dequantize_rows(tile, w.codes + n0 * (K / 2), w.scales + n0 * (K / block),
                              w.global_scale, rows, K, w.format, stream_);
    gemm(false, true, M, int(rows), int(K), in, int(K), tile, int(K), accumulate ? 1.0f : 0.0f,
         out + n0, int(N));
  }
}

// Few rows per expert: the FP4 few-rows kernel. Otherwise decodes the experts that have rows
// into scratch (whole experts, up to 16M values, 64 MB, at a time) and multiplies each batch of
// them in one grouped cuBLAS call.
template <typename T>
void CudaOps<T>::fp4_grouped_matmul_forward(T* out, const T* in, const PackedFp4Matrix& w,
                                            const int32_t* offsets, int n_groups, int rows) {
  RLHF_CHECK(n_groups > 0 && w.rows % n_groups == 0, "{} packed rows are not {} equal groups",
             w.rows, n_groups);
  RLHF_CHECK(rows >= 0, "grouped FP4 matmul of {} rows", rows);
  const int64_t N = w.rows / n_groups, K = w.cols;
  const int block = fp4_block_size(w.format);
  RLHF_CHECK(K % block == 0, "packed FP4 matrix with {} columns is not whole {}-value blocks", K,
             block);
  // Decode-sized products read the packed weights directly (no wait, no float copy).
  if (few_rows_fp4_grouped(in, w, rows, n_groups)) {
    const cuda::FewRowsFp4GroupedProduct product[] = {{out, w.codes, w.scales, w.global_scale}};
    cuda::few_rows_fp4_matmul(product, in, w.format, offsets, n_groups, rows, int(N), int(K),
                              few_rows_tensor_cores(rows, n_groups), stream_);
    return;
  }
  const int32_t* off = host_offsets(offsets, n_groups);
  if (N == 0) return;
  constexpr int64_t kBatchValues = int64_t(1) << 24;
  const int64_t experts_per_batch = std::max<int64_t>(1, kBatchValues / (N * K));
  auto* decoded = static_cast<float*>(
      scratch(sizeof(float) * size_t(std::min<int64_t>(experts_per_batch, n_groups) * N * K)));
  auto flush = [&] {
    grouped_gemm(false, true, grouped_, int(K), int(K), 0.0f, int(N));
    grouped_.clear();
  };
  grouped_.clear();
  for (int g = 0; g < n_groups; ++g) {
    const int group_rows = off[g + 1] - off[g];
    if (group_rows == 0) continue;  // an expert with no tokens costs nothing
    // The previous batch's product reads the scratch; it is queued before this decode.
    if (int64_t(grouped_.m.size()) == experts_per_batch) flush();
    float* slot = decoded + int64_t(grouped_.m.size()) * N * K;
    cuda::fp4_dequantize_rows(slot, w.codes + g * N * (K / 2), w.scales + g * N * (K / block),
                              w.global_scale, N, K, w.format, stream_);
    grouped_.add(group_rows, int(N), int(K), in + int64_t(off[g]) * K, slot,
                 out + int64_t(off[g]) * N);
  }
  flush();
}

// ---------------------------------------------------------------- elementwise

template <typename T>
void CudaOps<T>::copy(T* dst, const T* src, int64_t n) {
  forget_offsets(dst, sizeof(T) * size_t(n));
  if (n) {
    CUDA_CHECK(cudaMemcpyAsync(dst, src, sizeof(T) * size_t(n), cudaMemcpyDeviceToDevice,
                               stream_));
  }
}

template <typename T>
void CudaOps<T>::fill(T* x, T value, int64_t n) {
  forget_offsets(x, sizeof(T) * size_t(n));
  cuda::fill(x, value, n, stream_);
}

template <typename T>
void CudaOps<T>::scale_inplace(T* x, double s, int64_t n) {
  cuda::scale(x, float(s), n, stream_);
}

template <typename T>
double CudaOps<T>::sum_squares(const T* x, int64_t n) {
  if (n == 0) return 0.0;
  auto* partials = static_cast<double*>(scratch(sizeof(double) * cuda::kSumSquaresBlocks));
  cuda::sum_squares_partials(partials, x, n, stream_);
  host_values_.resize(cuda::kSumSquaresBlocks);
  copy_to_host(host_values_.data(), partials, sizeof(double) * host_values_.size());
  double total = 0;
  for (double s : host_values_) total += s;
  return total;
}

template <typename T>
void CudaOps<T>::adamw_step(T* param, const T* grad, T* m, T* v, int64_t n,
                            const AdamWHyper& h) {
  // The scalars rounded to float exactly as CpuOps<float> rounds them.
  const cuda::AdamWScalars s{float(h.beta1),
                             float(h.beta2),
                             float(1.0 - std::pow(h.beta1, double(h.step))),
                             float(1.0 - std::pow(h.beta2, double(h.step))),
                             float(h.lr),
                             float(h.weight_decay),
                             float(h.eps)};
  cuda::adamw(param, grad, m, v, n, s, stream_);
}

template class CudaOps<float>;

}  // namespace rlhf
