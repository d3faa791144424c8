// CudaOps<float> against CpuOps<float>, op by op, on fresh random inputs of several shapes (odd
// sizes included), forward and backward. Skips when no CUDA device is present.
//
// Tolerances, per op family (both sides compute in float, so a difference is reordering or a
// different rounding of the same formula, never a different algorithm). A value passes when
//   |gpu - cpu| <= rel * |cpu| + abs_frac * max|cpu|   (max over the compared tensor)
// and NaN never passes. Every output buffer is poisoned with NaN before the op, so an element
// the kernel forgot to write fails.
//  - Exact (bitwise): pure data movement (embedding and dispatch forward, KV-cache write, copy,
//    fill, zero_where), integer outputs (routing index arrays, clamp counts), the FP4 quantizer's
//    values and saturation mask (fp4.h's shared rules), sums kept in the CPU's order (embedding
//    and dispatch backward), and single multiplies (scale_inplace).
//  - kElementwise (rel 2e-6, abs 1e-6): formulas evaluated per element where the GPU's expf (2
//    ulp) stands in for the CPU's fast_expf (1 ulp) and nvcc contracts a*b+c into one FMA: a few
//    float ulps (1 ulp = 1.2e-7 relative).
//  - kReduction (rel 1e-5, abs 1e-5): sums over up to ~1000 terms in a different order (GEMM
//    over K, RMSNorm rows, softmax rows, attention over keys): float reordering error grows like
//    sqrt(K) ulps of the magnitudes summed.
//  - Double results: sum_squares and the balance loss rel 1e-12 (exact float terms, double sums
//    on both sides); the cross-entropy total rel 1e-6 (its per-row terms are float log-sum-exps).
// Measured on an H100 (2026-11-23, docs/cuda.md): no test used more than 0.09 of its bound except
// CrossEntropy (0.52, with the rel 1e-6 loss total its tightest bound). The run prints each
// test's largest share of its tolerance at the end.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "common/rng.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/fp4/fp4.h"
#include "tests/gpu/gpu_test_support.h"

namespace rlhf {
namespace {

struct Tol {
  double rel;
  double abs_frac;
};
constexpr Tol kElementwise{2e-6, 1e-6};
constexpr Tol kReduction{1e-5, 1e-5};
constexpr Tol kExact{0, 0};

// Per test, the largest share of its tolerance any compared element used (0 = exact match
// everywhere, 1 = at the bound), printed after the run: the measured margin of each bound.
std::map<std::string, double>& tolerance_used() {
  static std::map<std::string, double> used;
  return used;
}

class ToleranceReport : public testing::Environment {
 public:
  void TearDown() override {
    if (tolerance_used().empty()) return;
    std::printf("largest error as a share of its tolerance, per test:\n");
    for (const auto& [test, share] : tolerance_used()) std::printf("  %-60s %.3g\n", test.c_str(), share);
  }
};
const testing::Environment* const kToleranceReport =
    testing::AddGlobalTestEnvironment(new ToleranceReport);

void record_share(double share) {
  const auto* info = testing::UnitTest::GetInstance()->current_test_info();
  if (!info || std::string(info->test_suite_name()) == "CudaOpsTolerance") return;
  double& used = tolerance_used()[std::string(info->test_suite_name()) + "." + info->name()];
  used = std::max(used, share);
}

// Reports the first failing coordinate and the largest error, as a gtest assertion result.
testing::AssertionResult close(const std::vector<float>& got, const std::vector<float>& want,
                               Tol tol) {
  if (got.size() != want.size()) {
    return testing::AssertionFailure() << "size " << got.size() << " vs " << want.size();
  }
  double max_ref = 0;
  for (float w : want) max_ref = std::max(max_ref, std::fabs(double(w)));
  double worst = 0, share = 0;
  size_t worst_at = 0, bad = 0, first_bad = got.size();
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = got[i], w = want[i];
    const double err = std::fabs(g - w);
    const bool exact_match = std::memcmp(&got[i], &want[i], sizeof(float)) == 0;
    const bool ok = tol.rel == 0 && tol.abs_frac == 0
                        ? exact_match
                        : (std::isfinite(g) && err <= tol.rel * std::fabs(w) + tol.abs_frac * max_ref);
    if (!ok) {
      ++bad;
      if (first_bad == got.size()) first_bad = i;
    }
    if (tol.rel > 0 || tol.abs_frac > 0) {
      const double bound = tol.rel * std::fabs(w) + tol.abs_frac * max_ref;
      share = std::max(share, bound > 0 ? err / bound : (err > 0 ? INFINITY : 0.0));
    }
    if (!(err <= worst)) {
      worst = std::isnan(err) ? std::numeric_limits<double>::infinity() : err;
      worst_at = i;
    }
  }
  record_share(share);
  if (bad == 0) return testing::AssertionSuccess();
  return testing::AssertionFailure()
         << bad << " of " << got.size() << " elements differ; first at " << first_bad
         << " (gpu " << got[first_bad] << ", cpu " << want[first_bad] << "); largest error "
         << worst << " at " << worst_at << "; max|cpu| " << max_ref;
}

template <typename U>
testing::AssertionResult same(const std::vector<U>& got, const std::vector<U>& want) {
  if (got.size() != want.size()) {
    return testing::AssertionFailure() << "size " << got.size() << " vs " << want.size();
  }
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] != want[i]) {
      return testing::AssertionFailure() << "first difference at " << i << ": gpu " << +got[i]
                                         << ", cpu " << +want[i];
    }
  }
  return testing::AssertionSuccess();
}

testing::AssertionResult close_double(double got, double want, double rel) {
  record_share(std::fabs(got - want) / (rel * std::fabs(want)));
  if (std::fabs(got - want) <= rel * std::fabs(want) && std::isfinite(got)) {
    return testing::AssertionSuccess();
  }
  return testing::AssertionFailure() << "gpu " << got << " cpu " << want << " rel "
                                     << std::fabs(got - want) / std::fabs(want);
}

std::vector<float> normal(Rng& rng, size_t n, double scale = 1.0) {
  std::vector<float> x(n);
  for (float& v : x) v = float(rng.normal() * scale);
  return x;
}

std::vector<int32_t> ints(Rng& rng, size_t n, int lo, int hi) {
  std::vector<int32_t> x(n);
  for (int32_t& v : x) v = int32_t(rng.uniform_int(lo, hi));
  return x;
}

const float kNaN = std::numeric_limits<float>::quiet_NaN();

using FewRowsMath = CudaOps<float>::FewRowsMath;
const char* math_name(FewRowsMath math) {
  return math == FewRowsMath::tensor_cores ? "tensor cores" : "fma";
}

class CudaOpsTest : public testing::Test {
 protected:
  void SetUp() override {
    SKIP_WITHOUT_GPU();
    gpu_ = std::make_unique<CudaOps<float>>();
  }
  void TearDown() override {
    for (void* p : allocations_) gpu_->free_bytes(p);
  }

  // A device copy of `host`, freed at the end of the test.
  template <typename U>
  U* dev(const std::vector<U>& host) {
    void* p = gpu_->alloc_bytes(sizeof(U) * host.size());
    allocations_.push_back(p);
    gpu_->copy_from_host(p, host.data(), sizeof(U) * host.size());
    return static_cast<U*>(p);
  }
  // A device array of n NaNs (poison: an element the op does not write stays NaN).
  float* poisoned(size_t n) { return dev(std::vector<float>(n, kNaN)); }
  template <typename U>
  std::vector<U> back(const U* p, size_t n) {
    std::vector<U> host(n);
    gpu_->copy_to_host(host.data(), p, sizeof(U) * n);
    return host;
  }

  CpuOps<float> cpu_;
  std::unique_ptr<CudaOps<float>> gpu_;
  std::vector<void*> allocations_;
};

// ---------------------------------------------------------------- dense algebra

TEST_F(CudaOpsTest, MatmulForwardAndBackward) {
  Rng rng(101);
  struct Shape { int M, N, K; };
  for (const Shape s : {Shape{1, 1, 1}, Shape{7, 13, 5}, Shape{64, 96, 128}, Shape{33, 250, 257},
                        Shape{130, 17, 1000}}) {
    SCOPED_TRACE(testing::Message() << "M=" << s.M << " N=" << s.N << " K=" << s.K);
    const auto in = normal(rng, size_t(s.M) * s.K), w = normal(rng, size_t(s.N) * s.K);
    for (bool accumulate : {false, true}) {
      auto out = normal(rng, size_t(s.M) * s.N);
      float* d_out = dev(out);
      gpu_->matmul_forward(d_out, dev(in), dev(w), s.M, s.N, s.K, accumulate);
      cpu_.matmul_forward(out.data(), in.data(), w.data(), s.M, s.N, s.K, accumulate);
      EXPECT_TRUE(close(back(d_out, out.size()), out, kReduction)) << "accumulate " << accumulate;
    }
    const auto dout = normal(rng, size_t(s.M) * s.N);
    for (bool accumulate_din : {false, true}) {
      auto din = normal(rng, size_t(s.M) * s.K), dw = normal(rng, size_t(s.N) * s.K);
      float* d_din = accumulate_din ? dev(din) : poisoned(din.size());
      float* d_dw = dev(dw);
      gpu_->matmul_backward(d_din, d_dw, dev(dout), dev(in), dev(w), s.M, s.N, s.K,
                            accumulate_din);
      cpu_.matmul_backward(din.data(), dw.data(), dout.data(), in.data(), w.data(), s.M, s.N,
                           s.K, accumulate_din);
      EXPECT_TRUE(close(back(d_din, din.size()), din, kReduction)) << "din";
      EXPECT_TRUE(close(back(d_dw, dw.size()), dw, kReduction)) << "dw (accumulated)";
    }
    // Null din or dw: the other is still computed.
    auto dw = normal(rng, size_t(s.N) * s.K);
    float* d_dw = dev(dw);
    gpu_->matmul_backward(nullptr, d_dw, dev(dout), dev(in), dev(w), s.M, s.N, s.K, false);
    cpu_.matmul_backward(nullptr, dw.data(), dout.data(), in.data(), w.data(), s.M, s.N, s.K,
                         false);
    EXPECT_TRUE(close(back(d_dw, dw.size()), dw, kReduction)) << "dw alone";
  }
}

// The few-rows kernels (decode-sized products, cuda_ops_few_rows.cu) against the CPU: group sizes
// around their 32-row tiles (0, 1, 31, 32, 33 and 70 rows, so a group loops over tiles), column
// counts that do not fill their 64-column tiles (100, 200), K that does not fill their 64-value
// chunks (44) and the realistic 512 and 1024 (198 rows over 7 groups: within the kernel's
// average of 32 per group).
// kReduction: each output is one sum of K products in another order than the CPU BLAS's. A
// second run must repeat the first bit for bit (no atomics, fixed order). Both of the kernels'
// multiply variants run every shape: FP32 fmas, and the 3xTF32 tensor cores (about 2^-21 of
// each |x w| per product instead of 2^-24; over K = 1024 standard-normal terms that is some
// 1e-5 absolute against the 1e-5 x max|out| (about 1e-3) kReduction allows; plain TF32, at
// 2^-11 per product, would be off by about 1e-2 and fail).
TEST_F(CudaOpsTest, FewRowsProductsMatchTheCpu) {
  Rng rng(131);
  const std::vector<int32_t> offsets = {0, 1, 1, 32, 64, 97, 167, 198};
  const int E = int(offsets.size()) - 1, R = offsets.back();
  for (const auto& [N, K] : {std::pair{100, 44}, std::pair{64, 1024}, std::pair{200, 512}}) {
    for (const auto math : {FewRowsMath::fma, FewRowsMath::tensor_cores}) {
      gpu_->set_few_rows_math(math);
      SCOPED_TRACE(testing::Message() << "N " << N << " K " << K << " " << math_name(math));
      const auto in = normal(rng, size_t(R) * K), w = normal(rng, size_t(E) * N * K);
      std::vector<float> out(size_t(R) * N);
      const float* d_in = dev(in);
      const float* d_w = dev(w);
      const int32_t* d_off = dev(offsets);
      float* d_out = poisoned(out.size());
      gpu_->grouped_matmul_forward(d_out, d_in, d_w, d_off, E, R, N, K);
      cpu_.grouped_matmul_forward(out.data(), in.data(), w.data(), offsets.data(), E, R, N, K);
      const auto first = back(d_out, out.size());
      EXPECT_TRUE(close(first, out, kReduction)) << "grouped";
      d_out = poisoned(out.size());
      gpu_->grouped_matmul_forward(d_out, d_in, d_w, d_off, E, R, N, K);
      EXPECT_EQ(back(d_out, out.size()), first) << "repeat";

      // Dense products of 1 to 4 rows take the GEMV (a warp per column), up to 64 rows the
      // split-k variant (k cut across blocks, the splits added in order by a second kernel),
      // with and without accumulation; 64 rows are two row tiles.
      for (const int M : {1, 2, 3, 4, 7, 64}) {
        for (const bool accumulate : {false, true}) {
          auto dense = normal(rng, size_t(M) * N);
          float* d_dense = accumulate ? dev(dense) : poisoned(dense.size());
          gpu_->matmul_forward(d_dense, d_in, d_w, M, N, K, accumulate);
          const auto got = back(d_dense, dense.size());
          if (!accumulate) {
            gpu_->matmul_forward(d_dense, d_in, d_w, M, N, K, false);
            EXPECT_EQ(back(d_dense, dense.size()), got) << "dense repeat, M " << M;
          }
          cpu_.matmul_forward(dense.data(), in.data(), w.data(), M, N, K, accumulate);
          EXPECT_TRUE(close(got, dense, kReduction))
              << "dense M " << M << " accumulate " << accumulate;
        }
      }
    }
  }
}

// Projections of one input in one launch (q, k and v; router, shared gate and up) must give
// each output the bits of its own matmul_forward: the kernel runs each product's blocks as a
// launch of its own would. Widths that do not fill 64-column tiles, 1 to 64 rows, both
// multiply variants; above the few-rows sizes (65 rows) the call falls back to one product at
// a time. The CPU backend's default (one matmul_forward each) is the reference.
TEST_F(CudaOpsTest, ProjectionsInOneLaunchEqualSeparateProducts) {
  Rng rng(134);
  const int K = 320;
  const std::vector<int> widths = {200, 64, 36};
  for (const auto math : {FewRowsMath::fma, FewRowsMath::tensor_cores}) {
    gpu_->set_few_rows_math(math);
    for (const int M : {1, 7, 64, 65}) {
      SCOPED_TRACE(testing::Message() << "M " << M << " " << math_name(math));
      const auto in = normal(rng, size_t(M) * K);
      const float* d_in = dev(in);
      std::vector<std::vector<float>> w;
      std::vector<const float*> d_w;
      std::vector<float*> d_together, d_alone;
      std::vector<Ops<float>::Projection> gpu_projections, cpu_projections;
      std::vector<std::vector<float>> cpu_out;
      for (const int n : widths) {
        w.push_back(normal(rng, size_t(n) * K));
        d_w.push_back(dev(w.back()));
        d_together.push_back(poisoned(size_t(M) * n));
        d_alone.push_back(poisoned(size_t(M) * n));
        cpu_out.emplace_back(size_t(M) * n);
      }
      for (size_t i = 0; i < widths.size(); ++i) {
        gpu_projections.push_back({d_together[i], d_w[i], widths[i]});
        cpu_projections.push_back({cpu_out[i].data(), w[i].data(), widths[i]});
        gpu_->matmul_forward(d_alone[i], d_in, d_w[i], M, widths[i], K, false);
      }
      gpu_->matmul_forward_projections(d_in, M, K, gpu_projections);
      cpu_.matmul_forward_projections(in.data(), M, K, cpu_projections);
      for (size_t i = 0; i < widths.size(); ++i) {
        const auto together = back(d_together[i], cpu_out[i].size());
        EXPECT_EQ(together, back(d_alone[i], cpu_out[i].size())) << "projection " << i;
        EXPECT_TRUE(close(together, cpu_out[i], kReduction)) << "projection " << i;
      }
    }
  }
}

// The end of a residual branch with the norm after it (matmul_residual_rmsnorm_forward): up to
// 64 rows the few-rows split kernel and one kernel that adds the residual and the splits, writes
// x and the copy and norms each row. It must give the bits of the separate calls it replaces
// (copy, matmul_forward accumulating, rmsnorm_forward, copy), since it adds in the reduction
// kernel's order and norms with rmsnorm_forward's code. Above 64 rows (65) the call is those
// calls. In place (residual is x) and with a separate residual, with and without the copy,
// both multiply variants; then x against the CPU (kReduction, as every product).
TEST_F(CudaOpsTest, ResidualProductWithNormEqualsSeparateCalls) {
  Rng rng(131);
  struct Shape { int M, N, K; };
  const double eps = 1e-5;
  for (const Shape s : {Shape{1, 1024, 1024}, Shape{7, 100, 44}, Shape{64, 200, 512},
                        Shape{65, 96, 128}}) {
    for (const auto math : {FewRowsMath::fma, FewRowsMath::tensor_cores}) {
      gpu_->set_few_rows_math(math);
      for (const bool in_place : {false, true}) {
        for (const bool with_copy : {false, true}) {
          SCOPED_TRACE(testing::Message() << "M=" << s.M << " N=" << s.N << " K=" << s.K << " "
                                          << math_name(math) << (in_place ? " in place" : "")
                                          << (with_copy ? " with copy" : ""));
          const size_t xs = size_t(s.M) * s.N;
          const auto residual = normal(rng, xs), in = normal(rng, size_t(s.M) * s.K);
          const auto w = normal(rng, size_t(s.N) * s.K, 0.05), weight = normal(rng, s.N);
          const float* d_in = dev(in);
          const float* d_w = dev(w);
          const float* d_weight = dev(weight);
          float* x = in_place ? dev(residual) : poisoned(xs);
          const float* d_residual = in_place ? x : dev(residual);
          float* normed = poisoned(xs);
          float* rstd = poisoned(s.M);
          float* copy = with_copy ? poisoned(xs) : nullptr;
          gpu_->matmul_residual_rmsnorm_forward(x, d_residual, d_in, d_w, s.M, s.N, s.K,
                                                {normed, rstd, d_weight, eps, copy});
          float* x_ref = dev(residual);
          float* normed_ref = poisoned(xs);
          float* rstd_ref = poisoned(s.M);
          gpu_->matmul_forward(x_ref, d_in, d_w, s.M, s.N, s.K, true);
          gpu_->rmsnorm_forward(normed_ref, rstd_ref, x_ref, d_weight, s.M, s.N, eps);
          const auto got_x = back(x, xs);
          EXPECT_TRUE(close(got_x, back(x_ref, xs), kExact)) << "x";
          EXPECT_TRUE(close(back(normed, xs), back(normed_ref, xs), kExact)) << "normed";
          EXPECT_TRUE(close(back(rstd, s.M), back(rstd_ref, s.M), kExact)) << "rstd";
          if (with_copy) {
            EXPECT_TRUE(close(back(copy, xs), got_x, kExact)) << "copy";
          }
          std::vector<float> x_cpu(xs), normed_cpu(xs), rstd_cpu(s.M);
          cpu_.matmul_residual_rmsnorm_forward(x_cpu.data(), residual.data(), in.data(),
                                               w.data(), s.M, s.N, s.K,
                                               {normed_cpu.data(), rstd_cpu.data(),
                                                weight.data(), eps});
          EXPECT_TRUE(close(got_x, x_cpu, kReduction)) << "x against the CPU";
        }
      }
    }
  }
}

TEST_F(CudaOpsTest, GroupedMatmulForwardAndBackward) {
  Rng rng(102);
  const int N = 24, K = 41;
  // Five groups, one of them empty, one of a single row.
  const std::vector<int32_t> offsets = {0, 9, 9, 10, 31, 44};
  const int E = int(offsets.size()) - 1, R = offsets.back();
  const auto in = normal(rng, size_t(R) * K), w = normal(rng, size_t(E) * N * K);
  auto out = std::vector<float>(size_t(R) * N);
  float* d_out = poisoned(out.size());
  const int32_t* d_off = dev(offsets);
  gpu_->grouped_matmul_forward(d_out, dev(in), dev(w), d_off, E, R, N, K);
  cpu_.grouped_matmul_forward(out.data(), in.data(), w.data(), offsets.data(), E, R, N, K);
  EXPECT_TRUE(close(back(d_out, out.size()), out, kReduction));

  const auto dout = normal(rng, size_t(R) * N);
  for (bool accumulate_din : {false, true}) {
    auto din = normal(rng, size_t(R) * K), dw = normal(rng, size_t(E) * N * K);
    float* d_din = accumulate_din ? dev(din) : poisoned(din.size());
    float* d_dw = dev(dw);
    gpu_->grouped_matmul_backward(d_din, d_dw, dev(dout), dev(in), dev(w), d_off, E, N, K,
                                  accumulate_din);
    cpu_.grouped_matmul_backward(din.data(), dw.data(), dout.data(), in.data(), w.data(),
                                 offsets.data(), E, N, K, accumulate_din);
    EXPECT_TRUE(close(back(d_din, din.size()), din, kReduction));
    EXPECT_TRUE(close(back(d_dw, dw.size()), dw, kReduction));
  }
}

// ---------------------------------------------------------------- embedding, norm, RoPE

TEST_F(CudaOpsTest, Embedding) {
  Rng rng(103);
  const int V = 50, D = 37, N = 23;
  const auto table = normal(rng, size_t(V) * D);
  const auto tokens = ints(rng, N, 0, 9);  // few distinct ids: many repeats to sum
  std::vector<float> out(size_t(N) * D);
  float* d_out = poisoned(out.size());
  const int32_t* d_tokens = dev(tokens);
  gpu_->embedding_forward(d_out, d_tokens, dev(table), N, D);
  cpu_.embedding_forward(out.data(), tokens.data(), table.data(), N, D);
  EXPECT_TRUE(close(back(d_out, out.size()), out, kExact));

  const auto dout = normal(rng, size_t(N) * D);
  auto dtable = normal(rng, size_t(V) * D);
  float* d_dtable = dev(dtable);
  gpu_->embedding_backward(d_dtable, dev(dout), d_tokens, N, D, V);
  cpu_.embedding_backward(dtable.data(), dout.data(), tokens.data(), N, D, V);
  // Same summation order (tokens in order per column) as the CPU: bitwise.
  EXPECT_TRUE(close(back(d_dtable, dtable.size()), dtable, kExact));
}

TEST_F(CudaOpsTest, RmsNorm) {
  Rng rng(104);
  for (const auto& [N, D] : {std::pair{19, 77}, std::pair{3, 1024}, std::pair{1, 1}}) {
    SCOPED_TRACE(testing::Message() << "N=" << N << " D=" << D);
    const auto in = normal(rng, size_t(N) * D, 3.0);
    const auto weight = normal(rng, D);
    std::vector<float> out(size_t(N) * D), rstd(N);
    float* d_out = poisoned(out.size());
    float* d_rstd = poisoned(rstd.size());
    const float* d_in = dev(in);
    const float* d_weight = dev(weight);
    gpu_->rmsnorm_forward(d_out, d_rstd, d_in, d_weight, N, D, 1e-5);
    cpu_.rmsnorm_forward(out.data(), rstd.data(), in.data(), weight.data(), N, D, 1e-5);
    EXPECT_TRUE(close(back(d_out, out.size()), out, kReduction));
    EXPECT_TRUE(close(back(d_rstd, rstd.size()), rstd, kReduction));

    const auto dout = normal(rng, size_t(N) * D);
    auto din = normal(rng, size_t(N) * D), dweight = normal(rng, D);
    float* d_din = dev(din);
    float* d_dweight = dev(dweight);
    gpu_->rmsnorm_backward(d_din, d_dweight, dev(dout), d_in, d_weight, dev(rstd), N, D);
    cpu_.rmsnorm_backward(din.data(), dweight.data(), dout.data(), in.data(), weight.data(),
                          rstd.data(), N, D);
    EXPECT_TRUE(close(back(d_din, din.size()), din, kReduction)) << "din (accumulated)";
    EXPECT_TRUE(close(back(d_dweight, dweight.size()), dweight, kReduction)) << "dweight";
  }
}

TEST_F(CudaOpsTest, Rope) {
  Rng rng(105);
  for (const auto& [H, hd] : {std::pair{3, 16}, std::pair{2, 64}, std::pair{1, 2}}) {
    SCOPED_TRACE(testing::Message() << "H=" << H << " hd=" << hd);
    const int N = 11;
    const auto positions = ints(rng, N, 0, 4000);
    auto x = normal(rng, size_t(N) * H * hd);
    float* d_x = dev(x);
    const int32_t* d_pos = dev(positions);
    gpu_->rope_forward(d_x, d_pos, N, H, hd, 10000.0);
    cpu_.rope_forward(x.data(), positions.data(), N, H, hd, 10000.0);
    EXPECT_TRUE(close(back(d_x, x.size()), x, kElementwise)) << "forward";
    gpu_->rope_backward(d_x, d_pos, N, H, hd, 500000.0);
    cpu_.rope_backward(x.data(), positions.data(), N, H, hd, 500000.0);
    EXPECT_TRUE(close(back(d_x, x.size()), x, kElementwise)) << "backward";
  }
}

// q and k rotated in one launch: the bits of two rope_forward calls (same formula per element).
TEST_F(CudaOpsTest, RopeOfQAndKInOneLaunch) {
  Rng rng(136);
  const int N = 7, Hq = 8, Hk = 2, hd = 64;
  const auto positions = ints(rng, N, 0, 4000);
  const int32_t* d_pos = dev(positions);
  const auto q = normal(rng, size_t(N) * Hq * hd), k = normal(rng, size_t(N) * Hk * hd);
  float* d_q = dev(q);
  float* d_k = dev(k);
  float* d_q_alone = dev(q);
  float* d_k_alone = dev(k);
  gpu_->rope_forward_qk(d_q, d_k, d_pos, N, Hq, Hk, hd, 10000.0);
  gpu_->rope_forward(d_q_alone, d_pos, N, Hq, hd, 10000.0);
  gpu_->rope_forward(d_k_alone, d_pos, N, Hk, hd, 10000.0);
  EXPECT_TRUE(close(back(d_q, q.size()), back(d_q_alone, q.size()), kExact)) << "q";
  EXPECT_TRUE(close(back(d_k, k.size()), back(d_k_alone, k.size()), kExact)) << "k";
  auto cpu_q = q, cpu_k = k;
  cpu_.rope_forward_qk(cpu_q.data(), cpu_k.data(), positions.data(), N, Hq, Hk, hd, 10000.0);
  EXPECT_TRUE(close(back(d_q, q.size()), cpu_q, kElementwise)) << "q against the CPU";
  EXPECT_TRUE(close(back(d_k, k.size()), cpu_k, kElementwise)) << "k against the CPU";
}

// ---------------------------------------------------------------- attention

struct AttnCase {
  int batch, n_new, capacity, heads, kv_heads, head_dim;
  bool training;  // capacity == n_new and start == 0
};

std::string attn_case_name(const AttnCase& c) {
  return "b" + std::to_string(c.batch) + "_t" + std::to_string(c.n_new) + "_s" +
         std::to_string(c.capacity) + "_h" + std::to_string(c.heads) + "_kv" +
         std::to_string(c.kv_heads) + "_hd" + std::to_string(c.head_dim) +
         (c.training ? "_train" : "_cache");
}
// gtest prints parameters by name, not as raw bytes (whose padding would vary).
void PrintTo(const AttnCase& c, std::ostream* os) { *os << attn_case_name(c); }

class CudaAttentionTest : public CudaOpsTest, public testing::WithParamInterface<AttnCase> {};

TEST_P(CudaAttentionTest, ForwardMatchesCpu) {
  const AttnCase c = GetParam();
  Rng rng(106 + c.n_new * 7 + c.head_dim);
  std::vector<int32_t> start(c.batch, 0);
  if (!c.training) {
    for (int32_t& s : start) s = int32_t(rng.uniform_int(0, c.capacity - c.n_new));
  }
  const size_t q_n = size_t(c.batch) * c.n_new * c.heads * c.head_dim;
  const size_t kv_n = size_t(c.batch) * c.capacity * c.kv_heads * c.head_dim;
  const auto q = normal(rng, q_n), k = normal(rng, kv_n), v = normal(rng, kv_n);
  AttentionShape cpu_shape{c.batch, c.n_new, c.capacity, c.heads, c.kv_heads, c.head_dim,
                           start.data()};
  AttentionShape gpu_shape = cpu_shape;
  gpu_shape.start = dev(start);
  std::vector<float> out(q_n), lse(size_t(c.batch) * c.heads * c.n_new);
  float* d_out = poisoned(out.size());
  float* d_lse = poisoned(lse.size());
  const float *d_q = dev(q), *d_k = dev(k), *d_v = dev(v);
  gpu_->attention_forward(d_out, d_lse, d_q, d_k, d_v, gpu_shape);
  cpu_.attention_forward(out.data(), lse.data(), q.data(), k.data(), v.data(), cpu_shape);
  EXPECT_TRUE(close(back(d_out, out.size()), out, kReduction)) << "out";
  EXPECT_TRUE(close(back(d_lse, lse.size()), lse, kReduction)) << "lse";
  // lse may be null (inference).
  float* d_out2 = poisoned(out.size());
  gpu_->attention_forward(d_out2, nullptr, d_q, d_k, d_v, gpu_shape);
  EXPECT_TRUE(close(back(d_out2, out.size()), back(d_out, out.size()), kExact));

  // Backward (recomputes the probabilities from lse); dk, dv cover the whole capacity.
  const auto dout = normal(rng, q_n);
  std::vector<float> dq(q_n), dk(kv_n), dv(kv_n);
  float* d_dq = poisoned(q_n);
  float* d_dk = poisoned(kv_n);
  float* d_dv = poisoned(kv_n);
  gpu_->attention_backward(d_dq, d_dk, d_dv, dev(dout), d_out, d_lse, d_q, d_k, d_v, gpu_shape);
  cpu_.attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), out.data(), lse.data(),
                          q.data(), k.data(), v.data(), cpu_shape);
  EXPECT_TRUE(close(back(d_dq, q_n), dq, kReduction)) << "dq";
  EXPECT_TRUE(close(back(d_dk, kv_n), dk, kReduction)) << "dk";
  EXPECT_TRUE(close(back(d_dv, kv_n), dv, kReduction)) << "dv";

  // Run to run: the same bits (no atomics, fixed order).
  float* d_dq2 = poisoned(q_n);
  float* d_dk2 = poisoned(kv_n);
  float* d_dv2 = poisoned(kv_n);
  gpu_->attention_backward(d_dq2, d_dk2, d_dv2, dev(dout), d_out, d_lse, d_q, d_k, d_v,
                           gpu_shape);
  EXPECT_TRUE(close(back(d_dq2, q_n), back(d_dq, q_n), kExact));
  EXPECT_TRUE(close(back(d_dk2, kv_n), back(d_dk, kv_n), kExact));
  EXPECT_TRUE(close(back(d_dv2, kv_n), back(d_dv, kv_n), kExact));
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaAttentionTest,
    testing::Values(AttnCase{2, 37, 37, 4, 2, 16, true},     // training, GQA
                    AttnCase{1, 150, 150, 3, 1, 24, true},   // more keys than one 128-key chunk
                    AttnCase{2, 9, 9, 2, 2, 200, true},      // head_dim over 128 threads
                    AttnCase{3, 1, 300, 4, 4, 64, false},    // decode: one new token, cache 300
                    AttnCase{2, 5, 140, 8, 2, 32, false},   // chunked prefill into a cache
                    // The tiled kernels' shapes: 517 x 4 group rows end in a partial tile.
                    AttnCase{2, 517, 517, 8, 2, 64, true},   // training, GQA 4:1
                    AttnCase{2, 1, 1000, 8, 2, 64, false},   // decode, keys split 8 ways
                    AttnCase{2, 40, 300, 4, 2, 128, false},  // prefill, split keys, hd 128
                    // Decode on a wide grid (1024 blocks): 1 and 2 query rows per warp.
                    AttnCase{256, 1, 200, 16, 4, 64, false},
                    AttnCase{1024, 1, 48, 8, 1, 32, false}),
    [](const testing::TestParamInfo<AttnCase>& p) { return attn_case_name(p.param); });

// A decode step's attention on a wide grid takes row tiles of 1 or 2 rows per warp instead of
// 8 (forward_rows_per_warp); each row's arithmetic is the same, so a sequence's output must
// have the bits it gets when it runs alone (a narrow grid: 8 rows per warp). A cache of 128
// positions keeps the lone sequence's keys in one split, as on the wide grid.
TEST_F(CudaOpsTest, DecodeAttentionOnAWideGridGivesTheBitsOfANarrowOne) {
  Rng rng(507);
  const int B = 256, S = 128, Hq = 16, Hkv = 4, hd = 64;
  std::vector<int32_t> start(B);
  for (int32_t& st : start) st = int32_t(rng.uniform_int(0, S - 1));
  const size_t q_row = size_t(Hq) * hd, kv_seq = size_t(S) * Hkv * hd;
  const auto q = normal(rng, B * q_row), k = normal(rng, B * kv_seq), v = normal(rng, B * kv_seq);
  const AttentionShape wide{B, 1, S, Hq, Hkv, hd, dev(start)};
  float* d_out = poisoned(B * q_row);
  gpu_->attention_forward(d_out, nullptr, dev(q), dev(k), dev(v), wide);
  const auto out = back(d_out, B * q_row);
  for (const int b : {0, 77, 255}) {
    SCOPED_TRACE("sequence " + std::to_string(b));
    const auto slice = [](const std::vector<float>& x, size_t at, size_t n) {
      return std::vector<float>(x.begin() + long(at), x.begin() + long(at + n));
    };
    const AttentionShape alone{1, 1, S, Hq, Hkv, hd, dev(std::vector<int32_t>{start[b]})};
    float* d_alone = poisoned(q_row);
    gpu_->attention_forward(d_alone, nullptr, dev(slice(q, b * q_row, q_row)),
                            dev(slice(k, b * kv_seq, kv_seq)), dev(slice(v, b * kv_seq, kv_seq)),
                            alone);
    EXPECT_TRUE(close(slice(out, b * q_row, q_row), back(d_alone, q_row), kExact));
  }
}

TEST_F(CudaOpsTest, KvCacheWrite) {
  Rng rng(107);
  const int B = 3, T = 4, S = 20, Hkv = 2, hd = 8;
  const auto start = std::vector<int32_t>{0, 16, 7};
  const size_t row = size_t(Hkv) * hd;
  const auto kv = normal(rng, size_t(B) * T * row);
  auto cache = normal(rng, size_t(B) * S * row);  // untouched positions must stay as they were
  float* d_cache = dev(cache);
  AttentionShape shape{B, T, S, 4, Hkv, hd, start.data()};
  AttentionShape gpu_shape = shape;
  gpu_shape.start = dev(start);
  gpu_->kv_cache_write(d_cache, dev(kv), gpu_shape);
  cpu_.kv_cache_write(cache.data(), kv.data(), shape);
  EXPECT_TRUE(close(back(d_cache, cache.size()), cache, kExact));

  // k and v into their caches in one launch.
  const auto v = normal(rng, size_t(B) * T * row);
  auto cache_v = normal(rng, size_t(B) * S * row);
  float* d_cache_k = dev(cache);
  float* d_cache_v = dev(cache_v);
  gpu_->kv_cache_write_kv(d_cache_k, d_cache_v, dev(kv), dev(v), gpu_shape);
  cpu_.kv_cache_write(cache_v.data(), v.data(), shape);
  EXPECT_TRUE(close(back(d_cache_k, cache.size()), cache, kExact)) << "k, paired";
  EXPECT_TRUE(close(back(d_cache_v, cache_v.size()), cache_v, kExact)) << "v, paired";
}

// The bounds are the caller's to check (the model does, on its host copy of start[]; a
// device read here would cost a wait per layer). A write that runs past the cache anyway must
// stop at its end: start 18 with 4 new tokens in a cache of 20 writes positions 18 and 19 and
// nothing in the guard rows after the cache.
TEST_F(CudaOpsTest, KvCacheWriteStaysInsideTheCache) {
  Rng rng(132);
  const int T = 4, S = 20, Hkv = 1, hd = 8, guard_rows = 8;
  const auto kv = normal(rng, size_t(T) * hd);
  const auto before = normal(rng, size_t(S + guard_rows) * hd);
  float* d_cache = dev(before);
  AttentionShape shape{1, T, S, 1, Hkv, hd, dev(std::vector<int32_t>{18})};
  gpu_->kv_cache_write(d_cache, dev(kv), shape);
  auto want = before;
  std::copy_n(kv.begin(), 2 * hd, want.begin() + 18 * hd);  // positions 18, 19 only
  EXPECT_TRUE(close(back(d_cache, want.size()), want, kExact));
}

// ---------------------------------------------------------------- SwiGLU

TEST_F(CudaOpsTest, SwigluWithAndWithoutClamping) {
  Rng rng(108);
  const int64_t n = 10007;
  // Scale 6: a few percent of the values lie beyond the limit of 10 on each path.
  const auto gate = normal(rng, n, 6.0), up = normal(rng, n, 6.0), dh = normal(rng, n);
  for (bool enabled : {true, false}) {
    SCOPED_TRACE(testing::Message() << "clamping " << enabled);
    SwigluClampConfig clamp;
    clamp.enabled = enabled;
    std::vector<float> h(n), dgate(n), dup(n);
    float* d_h = poisoned(n);
    const float *d_gate = dev(gate), *d_up = dev(up);
    // The counts accumulate: both sides start from the same nonzero values.
    int64_t c[2] = {5, 7};
    int64_t* d_counts = dev(std::vector<int64_t>{5, 7});
    gpu_->swiglu_forward(d_h, d_gate, d_up, n, clamp, d_counts);
    cpu_.swiglu_forward(h.data(), gate.data(), up.data(), n, clamp, c);
    const auto g = back(d_counts, 2);
    EXPECT_EQ(g[0], c[0]);
    EXPECT_EQ(g[1], c[1]);
    if (enabled) {
      EXPECT_GT(c[0], 5);
      EXPECT_GT(c[1], 7);
    }
    EXPECT_TRUE(close(back(d_h, n), h, kElementwise));
    float* d_dgate = poisoned(n);
    float* d_dup = poisoned(n);
    gpu_->swiglu_backward(d_dgate, d_dup, dev(dh), d_gate, d_up, n, clamp);
    cpu_.swiglu_backward(dgate.data(), dup.data(), dh.data(), gate.data(), up.data(), n, clamp);
    EXPECT_TRUE(close(back(d_dgate, n), dgate, kElementwise));
    EXPECT_TRUE(close(back(d_dup, n), dup, kElementwise));
  }
}

// ---------------------------------------------------------------- MoE

// Router logits without near-ties: token t's experts get logits from a random permutation of
// well-separated levels (score gaps >= ~0.01), and the bias is far smaller than the gaps, so
// both backends must pick the same experts.
std::vector<float> untied_logits(Rng& rng, int N, int E) {
  std::vector<float> logits(size_t(N) * E);
  std::vector<int> perm(E);
  for (int t = 0; t < N; ++t) {
    std::iota(perm.begin(), perm.end(), 0);
    for (int i = E - 1; i > 0; --i) std::swap(perm[i], perm[rng.uniform_int(0, i)]);
    for (int e = 0; e < E; ++e) {
      logits[size_t(t) * E + e] = float((perm[e] - E / 2) * (4.0 / E) + 0.001 * rng.uniform());
    }
  }
  return logits;
}

struct HostRouting {
  int N, K, E;
  std::vector<int32_t> ids, offsets, sorted_token, sorted_choice, slot;
  HostRouting(int n, int k, int e)
      : N(n), K(k), E(e), ids(size_t(n) * k), offsets(e + 1), sorted_token(size_t(n) * k),
        sorted_choice(size_t(n) * k), slot(size_t(n) * k) {}
  MoeRouting view() {
    return MoeRouting{N, K, E, ids.data(), offsets.data(), sorted_token.data(),
                      sorted_choice.data(), slot.data()};
  }
};

class CudaRouterTest : public CudaOpsTest {
 protected:
  // A device routing; `from` (when given) is copied in, else the arrays are poisoned (-1).
  MoeRouting device_routing(const HostRouting& shape, const HostRouting* from = nullptr) {
    const HostRouting& src = from ? *from : shape;
    auto fill = [&](const std::vector<int32_t>& v) {
      return dev(from ? v : std::vector<int32_t>(v.size(), -1));
    };
    return MoeRouting{shape.N, shape.K, shape.E, fill(src.ids), fill(src.offsets),
                      fill(src.sorted_token), fill(src.sorted_choice), fill(src.slot)};
  }
  void expect_same_routing(const MoeRouting& d, const HostRouting& h) {
    EXPECT_TRUE(same(back(d.expert_ids, h.ids.size()), h.ids)) << "expert_ids";
    EXPECT_TRUE(same(back(d.offsets, h.offsets.size()), h.offsets)) << "offsets";
    EXPECT_TRUE(same(back(d.sorted_token, h.sorted_token.size()), h.sorted_token))
        << "sorted_token";
    EXPECT_TRUE(same(back(d.sorted_choice, h.sorted_choice.size()), h.sorted_choice))
        << "sorted_choice";
    EXPECT_TRUE(same(back(d.slot, h.slot.size()), h.slot)) << "slot";
  }
};

TEST_F(CudaRouterTest, ForwardSelectsAndSortsLikeCpu) {
  Rng rng(109);
  struct Case { int N, E, K; bool bias; double route_scale; };
  // Up to 32 tokens (and 256 experts) take the one-block kernel, more the four separate
  // kernels: 32 and 33 tokens sit on either side of that line; 32 x 32 is its 1024 pairs.
  for (const Case c : {Case{37, 16, 4, true, 2.5}, Case{1, 8, 1, false, 1.0},
                       Case{300, 64, 6, true, 1.0}, Case{5, 3, 3, true, 1.0},
                       Case{32, 16, 4, true, 1.0}, Case{33, 16, 4, true, 1.0},
                       Case{4, 256, 8, false, 1.0}, Case{32, 64, 32, true, 1.0}}) {
    SCOPED_TRACE(testing::Message() << "N=" << c.N << " E=" << c.E << " K=" << c.K);
    const auto logits = untied_logits(rng, c.N, c.E);
    std::vector<float> bias(c.E);
    for (float& b : bias) b = c.bias ? float(0.002 * (rng.uniform() - 0.5)) : 0.0f;
    HostRouting h(c.N, c.K, c.E);
    MoeRouting hr = h.view();
    std::vector<float> scores(size_t(c.N) * c.E), gates(size_t(c.N) * c.K);
    cpu_.router_forward(scores.data(), gates.data(), hr, logits.data(),
                        c.bias ? bias.data() : nullptr, c.route_scale, false);
    MoeRouting dr = device_routing(h);
    float* d_scores = poisoned(scores.size());
    float* d_gates = poisoned(gates.size());
    gpu_->router_forward(d_scores, d_gates, dr, dev(logits), c.bias ? dev(bias) : nullptr,
                         c.route_scale, false);
    EXPECT_TRUE(close(back(d_scores, scores.size()), scores, kElementwise)) << "scores";
    EXPECT_TRUE(close(back(d_gates, gates.size()), gates, kElementwise)) << "gates";
    expect_same_routing(dr, h);
  }
}

// Grouped products above the few-rows kernel's sizes (here 80 rows per expert) go to cuBLAS,
// sized from a host mirror of the offsets read back once per routing. Both directions must
// hold: after router_forward, a grouped product over those offsets equals the CPU's over the
// CPU router's offsets; and after the same device buffer is overwritten by copy_from_host, the
// product follows the new offsets, not the stale mirror (a product over the old ones would
// multiply most rows by other experts).
TEST_F(CudaRouterTest, GroupedProductsFollowTheRoutersOffsetsAndLaterRewrites) {
  Rng rng(121);
  const int N = 320, E = 8, K = 2, D = 24, F = 16;
  const auto logits = untied_logits(rng, N, E);
  HostRouting h(N, K, E);
  MoeRouting hr = h.view();
  std::vector<float> scores(size_t(N) * E), gates(size_t(N) * K);
  cpu_.router_forward(scores.data(), gates.data(), hr, logits.data(), nullptr, 1.0, false);
  MoeRouting dr = device_routing(h);
  gpu_->router_forward(poisoned(scores.size()), poisoned(gates.size()), dr, dev(logits), nullptr,
                       1.0, false);
  const auto x = normal(rng, size_t(N) * K * D), w = normal(rng, size_t(E) * F * D);
  std::vector<float> out(size_t(N) * K * F);
  float* d_out = poisoned(out.size());
  gpu_->grouped_matmul_forward(d_out, dev(x), dev(w), dr.offsets, E, N * K, F, D);
  cpu_.grouped_matmul_forward(out.data(), x.data(), w.data(), h.offsets.data(), E, N * K, F, D);
  EXPECT_TRUE(close(back(d_out, out.size()), out, kReduction)) << "offsets from the router";

  // Every row to the last expert: a different split of the same rows.
  std::vector<int32_t> rewritten(E + 1, 0);
  rewritten[E] = N * K;
  ASSERT_NE(rewritten, h.offsets) << "the rewrite must change the offsets";
  gpu_->copy_from_host(dr.offsets, rewritten.data(), sizeof(int32_t) * rewritten.size());
  d_out = poisoned(out.size());
  gpu_->grouped_matmul_forward(d_out, dev(x), dev(w), dr.offsets, E, N * K, F, D);
  cpu_.grouped_matmul_forward(out.data(), x.data(), w.data(), rewritten.data(), E, N * K, F, D);
  EXPECT_TRUE(close(back(d_out, out.size()), out, kReduction)) << "offsets rewritten";
}

// Exact ties go to the lower id, as on the CPU, also across the warp kernel's lanes and chunks
// (E = 40: experts 0-31 and 32-39 sit in two chunks): a token with all logits equal, one whose
// two best experts (1 and 33) tie and the rest tie lower, and random tokens.
TEST_F(CudaRouterTest, TiesGoToTheLowerIdLikeTheCpu) {
  Rng rng(134);
  const int N = 6, E = 40, K = 4;
  auto logits = normal(rng, size_t(N) * E);
  std::fill_n(logits.begin(), E, 0.0f);
  std::fill_n(logits.begin() + E, E, -1.0f);
  logits[E + 1] = logits[E + 33] = 2.0f;
  HostRouting h(N, K, E);
  MoeRouting hr = h.view();
  std::vector<float> scores(size_t(N) * E), gates(size_t(N) * K);
  cpu_.router_forward(scores.data(), gates.data(), hr, logits.data(), nullptr, 1.0, false);
  ASSERT_EQ(std::vector<int32_t>(h.ids.begin(), h.ids.begin() + K),
            (std::vector<int32_t>{0, 1, 2, 3}));
  ASSERT_EQ(std::vector<int32_t>(h.ids.begin() + K, h.ids.begin() + 2 * K),
            (std::vector<int32_t>{1, 33, 0, 2}));
  MoeRouting dr = device_routing(h);
  float* d_scores = poisoned(scores.size());
  float* d_gates = poisoned(gates.size());
  gpu_->router_forward(d_scores, d_gates, dr, dev(logits), nullptr, 1.0, false);
  EXPECT_TRUE(close(back(d_scores, scores.size()), scores, kElementwise));
  EXPECT_TRUE(close(back(d_gates, gates.size()), gates, kElementwise));
  expect_same_routing(dr, h);
}

TEST_F(CudaRouterTest, ReplayKeepsTheGivenExperts) {
  Rng rng(110);
  const int N = 29, E = 12, K = 3;
  const auto logits = normal(rng, size_t(N) * E);
  HostRouting h(N, K, E);
  // Random distinct experts per token (ties or not: replay does not select).
  for (int t = 0; t < N; ++t) {
    std::vector<int> perm(E);
    std::iota(perm.begin(), perm.end(), 0);
    for (int i = E - 1; i > 0; --i) std::swap(perm[i], perm[rng.uniform_int(0, i)]);
    for (int j = 0; j < K; ++j) h.ids[size_t(t) * K + j] = perm[j];
  }
  MoeRouting dr = device_routing(h);
  gpu_->copy_from_host(dr.expert_ids, h.ids.data(), sizeof(int32_t) * h.ids.size());
  MoeRouting hr = h.view();
  std::vector<float> scores(size_t(N) * E), gates(size_t(N) * K);
  cpu_.router_forward(scores.data(), gates.data(), hr, logits.data(), nullptr, 1.0, true);
  float* d_scores = poisoned(scores.size());
  float* d_gates = poisoned(gates.size());
  gpu_->router_forward(d_scores, d_gates, dr, dev(logits), nullptr, 1.0, true);
  EXPECT_TRUE(close(back(d_gates, gates.size()), gates, kElementwise));
  expect_same_routing(dr, h);
}

// A replayed trace naming expert 7 of 4. The router runs without waiting for the host, so the
// error surfaces at the next read-back (here the gates), not later or never.
void route_replay_out_of_range() {
  const std::vector<int32_t> ids = {0, 7};
  CudaOps<float> ops;
  auto* buf = static_cast<int32_t*>(ops.alloc_bytes(sizeof(int32_t) * 16));
  auto* f = static_cast<float*>(ops.alloc_bytes(sizeof(float) * 16));
  ops.copy_from_host(buf, ids.data(), sizeof(int32_t) * 2);
  MoeRouting r{2, 1, 4, buf, buf + 2, buf + 8, buf + 10, buf + 12};
  ops.router_forward(f, f + 8, r, f, nullptr, 1.0, true);
  float gates[2];
  ops.copy_to_host(gates, f + 8, sizeof gates);
}

TEST_F(CudaRouterTest, ReplayedIdOutOfRangeIsFatal) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(route_replay_out_of_range(), "1 expert ids outside");
}

class CudaMoeTest : public CudaRouterTest {
 protected:
  // A CPU-made routing of N tokens (top-k of E), and its device copy.
  void route(int N, int E, int K, uint64_t seed) {
    Rng rng(seed);
    host_ = std::make_unique<HostRouting>(N, K, E);
    MoeRouting hr = host_->view();
    scores_.resize(size_t(N) * E);
    gates_.resize(size_t(N) * K);
    cpu_.router_forward(scores_.data(), gates_.data(), hr, untied_logits(rng, N, E).data(),
                        nullptr, 1.0, false);
    device_ = device_routing(*host_, host_.get());
  }
  std::unique_ptr<HostRouting> host_;
  MoeRouting device_{};
  std::vector<float> scores_, gates_;
};

TEST_F(CudaMoeTest, RouterBackward) {
  Rng rng(111);
  route(41, 10, 3, 1111);
  const auto dgates = normal(rng, gates_.size());
  std::vector<float> dlogits(scores_.size());
  float* d_dlogits = poisoned(dlogits.size());
  gpu_->router_backward(d_dlogits, dev(dgates), dev(scores_), dev(gates_), device_, 1.7);
  cpu_.router_backward(dlogits.data(), dgates.data(), scores_.data(), gates_.data(),
                       host_->view(), 1.7);
  EXPECT_TRUE(close(back(d_dlogits, dlogits.size()), dlogits, kElementwise));
}

TEST_F(CudaMoeTest, SequenceBalanceLoss) {
  Rng rng(112);
  const int seq_len = 16, n_seq = 3;
  route(seq_len * n_seq, 8, 2, 1212);
  auto dlogits = normal(rng, scores_.size());  // the loss's gradient accumulates into it
  float* d_dlogits = dev(dlogits);
  const double g = gpu_->seq_balance_loss(d_dlogits, dev(scores_), device_, seq_len, 0.01, 3.0);
  const double c = cpu_.seq_balance_loss(dlogits.data(), scores_.data(), host_->view(), seq_len,
                                         0.01, 3.0);
  // Double sums in the CPU's order on both sides.
  EXPECT_TRUE(close_double(g, c, 1e-12));
  EXPECT_GT(c, 0);
  EXPECT_TRUE(close(back(d_dlogits, dlogits.size()), dlogits, kElementwise));
}

TEST_F(CudaMoeTest, DispatchAndCombine) {
  Rng rng(113);
  const int N = 33, E = 7, K = 2, D = 37;
  route(N, E, K, 1313);
  const int64_t R = int64_t(N) * K;
  const auto x = normal(rng, size_t(N) * D);
  std::vector<float> xe(size_t(R) * D);
  float* d_xe = poisoned(xe.size());
  gpu_->moe_dispatch_forward(d_xe, dev(x), device_, D);
  cpu_.moe_dispatch_forward(xe.data(), x.data(), host_->view(), D);
  EXPECT_TRUE(close(back(d_xe, xe.size()), xe, kExact)) << "dispatch forward";

  const auto dxe = normal(rng, xe.size());
  auto dx = normal(rng, x.size());
  float* d_dx = dev(dx);
  gpu_->moe_dispatch_backward(d_dx, dev(dxe), device_, D);
  cpu_.moe_dispatch_backward(dx.data(), dxe.data(), host_->view(), D);
  EXPECT_TRUE(close(back(d_dx, dx.size()), dx, kExact)) << "dispatch backward (CPU order)";

  const auto ye = normal(rng, xe.size());
  auto out = normal(rng, x.size());
  float* d_out = dev(out);
  const float* d_ye = dev(ye);
  const float* d_gates = dev(gates_);
  gpu_->moe_combine_forward(d_out, d_ye, d_gates, device_, D);
  cpu_.moe_combine_forward(out.data(), ye.data(), gates_.data(), host_->view(), D);
  EXPECT_TRUE(close(back(d_out, out.size()), out, kElementwise)) << "combine forward";

  const auto dout = normal(rng, x.size());
  std::vector<float> dye(xe.size()), dgates(gates_.size());
  float* d_dye = poisoned(dye.size());
  float* d_dgates = poisoned(dgates.size());
  gpu_->moe_combine_backward(d_dye, d_dgates, dev(dout), d_ye, d_gates, device_, D);
  cpu_.moe_combine_backward(dye.data(), dgates.data(), dout.data(), ye.data(), gates_.data(),
                            host_->view(), D);
  EXPECT_TRUE(close(back(d_dye, dye.size()), dye, kExact)) << "dye (one multiply)";
  EXPECT_TRUE(close(back(d_dgates, dgates.size()), dgates, kReduction)) << "dgates";
}

// moe_combine_rmsnorm_forward: one block per token adds the experts' rows as the combine kernel
// does and norms the row with rmsnorm_forward's code, so it must give the bits of those two
// calls (and of the copy), at any number of tokens.
TEST_F(CudaMoeTest, CombineWithNormEqualsSeparateCalls) {
  Rng rng(137);
  const int N = 33, E = 7, K = 2, D = 300;
  const double eps = 1e-6;
  route(N, E, K, 1717);
  const size_t xs = size_t(N) * D;
  const float* d_gates = dev(gates_);
  for (const bool with_copy : {false, true}) {
    SCOPED_TRACE(with_copy ? "with copy" : "without copy");
    const auto ye = normal(rng, size_t(N) * K * D), out = normal(rng, xs);
    const auto weight = normal(rng, D);
    const float* d_ye = dev(ye);
    const float* d_weight = dev(weight);
    float* d_out = dev(out);
    float* normed = poisoned(xs);
    float* rstd = poisoned(N);
    float* copy = with_copy ? poisoned(xs) : nullptr;
    gpu_->moe_combine_rmsnorm_forward(d_out, d_ye, d_gates, device_, D,
                                      {normed, rstd, d_weight, eps, copy});
    float* out_ref = dev(out);
    float* normed_ref = poisoned(xs);
    float* rstd_ref = poisoned(N);
    gpu_->moe_combine_forward(out_ref, d_ye, d_gates, device_, D);
    gpu_->rmsnorm_forward(normed_ref, rstd_ref, out_ref, d_weight, N, D, eps);
    const auto got = back(d_out, xs);
    EXPECT_TRUE(close(got, back(out_ref, xs), kExact)) << "out";
    EXPECT_TRUE(close(back(normed, xs), back(normed_ref, xs), kExact)) << "normed";
    EXPECT_TRUE(close(back(rstd, N), back(rstd_ref, N), kExact)) << "rstd";
    if (with_copy) {
      EXPECT_TRUE(close(back(copy, xs), got, kExact)) << "copy";
    }
  }
}

// ---------------------------------------------------------------- loss

TEST_F(CudaOpsTest, CrossEntropy) {
  Rng rng(114);
  for (const auto& [N, V] : {std::pair{13, 1000}, std::pair{4, 50257}, std::pair{1, 3}}) {
    SCOPED_TRACE(testing::Message() << "N=" << N << " V=" << V);
    const auto logits = normal(rng, size_t(N) * V, 4.0);
    const auto targets = ints(rng, N, 0, V - 1);
    std::vector<float> weights(N);
    for (int i = 0; i < N; ++i) weights[i] = i % 5 == 2 ? 0.0f : float(rng.uniform() + 0.5);
    std::vector<float> dlogits(logits.size());
    float* d_dlogits = poisoned(dlogits.size());
    const float* d_logits = dev(logits);
    const double g = gpu_->cross_entropy_forward_backward(d_dlogits, d_logits, dev(targets),
                                                          dev(weights), N, V);
    const double c = cpu_.cross_entropy_forward_backward(dlogits.data(), logits.data(),
                                                         targets.data(), weights.data(), N, V);
    // Per row: a float log-sum-exp over V terms; then a double sum over rows.
    EXPECT_TRUE(close_double(g, c, 1e-6));
    EXPECT_TRUE(close(back(d_dlogits, dlogits.size()), dlogits, kReduction));
    // dlogits may alias logits.
    float* d_alias = dev(logits);
    const double g2 = gpu_->cross_entropy_forward_backward(d_alias, d_alias, dev(targets),
                                                           dev(weights), N, V);
    EXPECT_EQ(g2, g);
    EXPECT_TRUE(close(back(d_alias, dlogits.size()), back(d_dlogits, dlogits.size()), kExact));
  }
}

TEST_F(CudaOpsTest, LogSoftmaxGather) {
  Rng rng(115);
  const int N = 17, V = 3001;
  const auto logits = normal(rng, size_t(N) * V, 3.0);
  const auto targets = ints(rng, N, 0, V - 1);
  for (double temperature : {1.0, 0.7}) {
    std::vector<float> lp(N);
    float* d_lp = poisoned(N);
    gpu_->log_softmax_gather(d_lp, dev(logits), dev(targets), N, V, temperature);
    cpu_.log_softmax_gather(lp.data(), logits.data(), targets.data(), N, V, temperature);
    EXPECT_TRUE(close(back(d_lp, N), lp, kReduction)) << "temperature " << temperature;
  }
}

// ---------------------------------------------------------------- FP4

// Normal values with outliers and exact zeros, so blocks saturate and scales vary.
std::vector<float> fp4_input(Rng& rng, int64_t n) {
  std::vector<float> x(n);
  for (float& v : x) {
    v = float(rng.normal());
    const int64_t r = rng.uniform_int(0, 29);
    if (r == 0) v *= 40.0f;
    if (r == 1) v = 0.0f;
  }
  return x;
}

TEST_F(CudaOpsTest, Fp4FakeQuantizeIsBitIdentical) {
  Rng rng(116);
  for (const Fp4Format format : {Fp4Format::mxfp4, Fp4Format::nvfp4}) {
    SCOPED_TRACE(fp4_format_name(format));
    const int64_t rows = 24, cols = 96;
    const auto in = fp4_input(rng, rows * cols);
    std::vector<float> out(in.size());
    std::vector<uint8_t> sat(in.size());
    float* d_out = poisoned(out.size());
    uint8_t* d_sat = dev(std::vector<uint8_t>(in.size(), 7));
    const float* d_in = dev(in);
    gpu_->fp4_fake_quantize(d_out, d_sat, d_in, rows, cols, format);
    cpu_.fp4_fake_quantize(out.data(), sat.data(), in.data(), rows, cols, format);
    EXPECT_TRUE(close(back(d_out, out.size()), out, kExact));
    EXPECT_TRUE(same(back(d_sat, sat.size()), sat));
    EXPECT_GT(std::accumulate(sat.begin(), sat.end(), 0), 0) << "no value saturated";
    // In place, without the mask.
    float* d_inplace = dev(in);
    gpu_->fp4_fake_quantize(d_inplace, nullptr, d_inplace, rows, cols, format);
    EXPECT_TRUE(close(back(d_inplace, out.size()), out, kExact)) << "in place";
  }
}

// The FP4 few-rows kernel (packed experts decoded in shared memory) against the CPU's packed
// product, on the group sizes of FewRowsProductsMatchTheCpu, 200 rows per expert (not whole
// 64-column tiles) and K = 1024 and 96 (96: the last 64-value chunk is half past K), in both
// formats. kReduction as for the float kernels: the dequantized values are exact in float on
// both sides, only the summation order differs (and, with tensor cores, the 3xTF32 products:
// FewRowsProductsMatchTheCpu says why that fits). A second run must repeat the first bit for bit.
TEST_F(CudaOpsTest, FewRowsFp4ProductsMatchTheCpu) {
  Rng rng(133);
  const std::vector<int32_t> offsets = {0, 1, 1, 32, 64, 97, 167, 198};
  const int E = int(offsets.size()) - 1, R = offsets.back(), N = 200;
  for (const Fp4Format format : {Fp4Format::mxfp4, Fp4Format::nvfp4}) {
    for (const int64_t K : {1024, 96}) {
      for (const auto math : {FewRowsMath::fma, FewRowsMath::tensor_cores}) {
        gpu_->set_few_rows_math(math);
        SCOPED_TRACE(testing::Message() << fp4_format_name(format) << " K " << K << " "
                                        << math_name(math));
        const Fp4Tensor w = fp4_quantize(fp4_input(rng, int64_t(E) * N * K).data(), int64_t(E) * N,
                                         K, format, "w");
        PackedFp4Matrix cpu_w{format, int64_t(E) * N, K, w.codes.data(), w.scales.data(),
                              w.global_scale};
        PackedFp4Matrix gpu_w = cpu_w;
        gpu_w.codes = dev(w.codes);
        gpu_w.scales = dev(w.scales);
        const auto in = normal(rng, size_t(R) * K);
        const float* d_in = dev(in);
        const int32_t* d_off = dev(offsets);
        std::vector<float> out(size_t(R) * N);
        float* d_out = poisoned(out.size());
        gpu_->fp4_grouped_matmul_forward(d_out, d_in, gpu_w, d_off, E, R);
        cpu_.fp4_grouped_matmul_forward(out.data(), in.data(), cpu_w, offsets.data(), E, R);
        const auto first = back(d_out, out.size());
        EXPECT_TRUE(close(first, out, kReduction));
        d_out = poisoned(out.size());
        gpu_->fp4_grouped_matmul_forward(d_out, d_in, gpu_w, d_off, E, R);
        EXPECT_EQ(back(d_out, out.size()), first) << "repeat";
      }
    }
  }
}

// The grouped counterpart (a MoE layer's expert gate and up in one launch), in float and in
// both packed formats: each output has the bits of its own grouped call. Group sizes from 0 to
// 33 rows (one over a 32-row tile), both multiply variants; with 70 rows per group (above the
// few-rows sizes) the calls fall back to one product at a time.
TEST_F(CudaOpsTest, GroupedProjectionsInOneLaunchEqualSeparateProducts) {
  Rng rng(135);
  const int N = 136, K = 192;
  for (const std::vector<int32_t>& offsets :
       {std::vector<int32_t>{0, 1, 1, 34, 40, 52}, std::vector<int32_t>{0, 70, 140, 210}}) {
    const int E = int(offsets.size()) - 1, R = offsets.back();
    const auto in = normal(rng, size_t(R) * K);
    const float* d_in = dev(in);
    const int32_t* d_off = dev(offsets);
    for (const auto math : {FewRowsMath::fma, FewRowsMath::tensor_cores}) {
      gpu_->set_few_rows_math(math);
      SCOPED_TRACE(testing::Message() << R << " rows over " << E << " groups, "
                                      << math_name(math));
      // Float weights.
      const auto w0 = normal(rng, size_t(E) * N * K), w1 = normal(rng, size_t(E) * N * K);
      const float* d_w[] = {dev(w0), dev(w1)};
      float* together[] = {poisoned(size_t(R) * N), poisoned(size_t(R) * N)};
      const Ops<float>::GroupedProjection projections[] = {{together[0], d_w[0]},
                                                           {together[1], d_w[1]}};
      gpu_->grouped_matmul_forward_projections(d_in, d_off, E, R, N, K, projections);
      for (int i = 0; i < 2; ++i) {
        float* alone = poisoned(size_t(R) * N);
        gpu_->grouped_matmul_forward(alone, d_in, d_w[i], d_off, E, R, N, K);
        std::vector<float> want(size_t(R) * N);
        cpu_.grouped_matmul_forward(want.data(), in.data(), (i == 0 ? w0 : w1).data(),
                                    offsets.data(), E, R, N, K);
        const auto got = back(together[i], want.size());
        EXPECT_EQ(got, back(alone, want.size())) << "float projection " << i;
        EXPECT_TRUE(close(got, want, kReduction)) << "float projection " << i;
      }
      // Packed weights.
      for (const Fp4Format format : {Fp4Format::mxfp4, Fp4Format::nvfp4}) {
        std::vector<Fp4Tensor> packed;
        std::vector<PackedFp4Matrix> cpu_w, gpu_w;
        for (int i = 0; i < 2; ++i) {
          packed.push_back(fp4_quantize(fp4_input(rng, int64_t(E) * N * K).data(),
                                        int64_t(E) * N, K, format, "w"));
        }
        for (const Fp4Tensor& t : packed) {
          cpu_w.push_back({format, int64_t(E) * N, K, t.codes.data(), t.scales.data(),
                           t.global_scale});
          gpu_w.push_back(cpu_w.back());
          gpu_w.back().codes = dev(t.codes);
          gpu_w.back().scales = dev(t.scales);
        }
        float* fp4_together[] = {poisoned(size_t(R) * N), poisoned(size_t(R) * N)};
        const Ops<float>::Fp4GroupedProjection fp4_projections[] = {
            {fp4_together[0], &gpu_w[0]}, {fp4_together[1], &gpu_w[1]}};
        gpu_->fp4_grouped_matmul_forward_projections(d_in, d_off, E, R, fp4_projections);
        for (int i = 0; i < 2; ++i) {
          float* alone = poisoned(size_t(R) * N);
          gpu_->fp4_grouped_matmul_forward(alone, d_in, gpu_w[i], d_off, E, R);
          std::vector<float> want(size_t(R) * N);
          cpu_.fp4_grouped_matmul_forward(want.data(), in.data(), cpu_w[i], offsets.data(), E,
                                          R);
          const auto got = back(fp4_together[i], want.size());
          EXPECT_EQ(got, back(alone, want.size()))
              << fp4_format_name(format) << " projection " << i;
          EXPECT_TRUE(close(got, want, kReduction))
              << fp4_format_name(format) << " projection " << i;
        }
      }
    }
  }
}

TEST_F(CudaOpsTest, Fp4Matmuls) {
  Rng rng(117);
  for (const Fp4Format format : {Fp4Format::mxfp4, Fp4Format::nvfp4}) {
    SCOPED_TRACE(fp4_format_name(format));
    const int64_t N = 70, K = 64;
    const Fp4Tensor w = fp4_quantize(fp4_input(rng, N * K).data(), N, K, format, "w");
    PackedFp4Matrix cpu_w{format, N, K, w.codes.data(), w.scales.data(), w.global_scale};
    PackedFp4Matrix gpu_w = cpu_w;
    gpu_w.codes = dev(w.codes);
    gpu_w.scales = dev(w.scales);
    // 1 to 4 rows take the FP4 GEMV (a warp per column), 5 the decode-and-SGEMM route.
    for (const int M : {1, 2, 4, 5}) {
      const auto in = normal(rng, size_t(M) * K);
      for (bool accumulate : {false, true}) {
        auto out = normal(rng, size_t(M) * N);
        float* d_out = dev(out);
        gpu_->fp4_matmul_forward(d_out, dev(in), gpu_w, M, accumulate);
        cpu_.fp4_matmul_forward(out.data(), in.data(), cpu_w, M, accumulate);
        EXPECT_TRUE(close(back(d_out, out.size()), out, kReduction))
            << "M " << M << " accumulate " << accumulate;
      }
    }
    // A longer k (3 x 1024 + 32 values: lanes loop, and a partial pass) through the GEMV.
    {
      const int64_t N2 = 9, K2 = 3 * 1024 + 32;
      const int M = 3;
      const Fp4Tensor w2 = fp4_quantize(fp4_input(rng, N2 * K2).data(), N2, K2, format, "w2");
      PackedFp4Matrix cpu_w2{format, N2, K2, w2.codes.data(), w2.scales.data(), w2.global_scale};
      PackedFp4Matrix gpu_w2 = cpu_w2;
      gpu_w2.codes = dev(w2.codes);
      gpu_w2.scales = dev(w2.scales);
      const auto in = normal(rng, size_t(M) * K2);
      std::vector<float> out(size_t(M) * N2);
      float* d_out = poisoned(out.size());
      gpu_->fp4_matmul_forward(d_out, dev(in), gpu_w2, M, false);
      cpu_.fp4_matmul_forward(out.data(), in.data(), cpu_w2, M, false);
      EXPECT_TRUE(close(back(d_out, out.size()), out, kReduction)) << "k " << K2;
    }
    // Grouped: 5 experts of 14 rows each, one without tokens.
    const std::vector<int32_t> offsets = {0, 3, 3, 11, 12, 20};
    const int R = offsets.back();
    const auto xin = normal(rng, size_t(R) * K);
    std::vector<float> out(size_t(R) * (N / 5));
    float* d_out = poisoned(out.size());
    gpu_->fp4_grouped_matmul_forward(d_out, dev(xin), gpu_w, dev(offsets), 5, R);
    cpu_.fp4_grouped_matmul_forward(out.data(), xin.data(), cpu_w, offsets.data(), 5, R);
    EXPECT_TRUE(close(back(d_out, out.size()), out, kReduction)) << "grouped";
  }
}

// ---------------------------------------------------------------- elementwise and reductions

TEST_F(CudaOpsTest, ElementwiseOps) {
  Rng rng(118);
  const int64_t n = 100003;
  auto x = normal(rng, n);
  float* d_x = dev(x);
  float* d_y = poisoned(n);
  gpu_->copy(d_y, d_x, n);
  EXPECT_TRUE(close(back(d_y, n), x, kExact)) << "copy";

  gpu_->scale_inplace(d_x, 0.37, n);
  cpu_.scale_inplace(x.data(), 0.37, n);
  EXPECT_TRUE(close(back(d_x, n), x, kExact)) << "scale";

  gpu_->fill(d_x, 2.5f, n - 1);
  cpu_.fill(x.data(), 2.5f, n - 1);
  EXPECT_TRUE(close(back(d_x, n), x, kExact)) << "fill (last element untouched)";

  std::vector<uint8_t> mask(n);
  for (auto& m : mask) m = rng.uniform() < 0.3 ? 1 : 0;
  auto g = normal(rng, n);
  float* d_g = dev(g);
  gpu_->zero_where(d_g, dev(mask), n);
  cpu_.zero_where(g.data(), mask.data(), n);
  EXPECT_TRUE(close(back(d_g, n), g, kExact)) << "zero_where";
}

TEST_F(CudaOpsTest, SumSquares) {
  Rng rng(119);
  for (int64_t n : {int64_t(1), int64_t(1000), int64_t(1000003)}) {
    const auto x = normal(rng, n, 3.0);
    // Squares of floats are exact in double; only the double summation order differs.
    EXPECT_TRUE(close_double(gpu_->sum_squares(dev(x), n), cpu_.sum_squares(x.data(), n), 1e-12))
        << "n=" << n;
  }
}

TEST_F(CudaOpsTest, AdamW) {
  Rng rng(120);
  const int64_t n = 10001;
  auto param = normal(rng, n), m = normal(rng, n, 0.1), grad = normal(rng, n);
  std::vector<float> v(n);
  for (float& x : v) x = float(rng.uniform() * 0.1);
  float *d_param = dev(param), *d_m = dev(m), *d_v = dev(v);
  const float* d_grad = dev(grad);
  for (int64_t step : {1, 2, 3}) {
    AdamWHyper h;
    h.lr = 1e-3;
    h.weight_decay = 0.1;
    h.step = step;
    gpu_->adamw_step(d_param, d_grad, d_m, d_v, n, h);
    cpu_.adamw_step(param.data(), grad.data(), m.data(), v.data(), n, h);
  }
  EXPECT_TRUE(close(back(d_param, n), param, kElementwise)) << "param";
  EXPECT_TRUE(close(back(d_m, n), m, kElementwise)) << "m";
  EXPECT_TRUE(close(back(d_v, n), v, kElementwise)) << "v";
}

// ---------------------------------------------------------------- recording (CUDA graphs)

// Recorded ops run only when replayed, run again on every replay with whatever their buffers
// hold then, and give the bits the same ops give unrecorded.
TEST_F(CudaOpsTest, RecordedOpsRunOnReplayWithTheSameBits) {
  if (!gpu_->can_record()) GTEST_SKIP() << "RLHF_CUDA_GRAPHS=off";
  Rng rng(404);
  const int M = 8, N = 96, K = 128;  // the split-k kernel (above the GEMV's rows): scratch
  const std::vector<float> x = normal(rng, size_t(M) * K), w = normal(rng, size_t(N) * K);
  float* d_x = dev(x);
  const float* d_w = dev(w);
  float* d_out = poisoned(size_t(M) * N);
  gpu_->matmul_forward(d_out, d_x, d_w, M, N, K, false);
  const std::vector<float> eager = back(d_out, size_t(M) * N);

  gpu_->fill(d_out, 0.0f, int64_t(M) * N);
  gpu_->begin_recording();
  gpu_->matmul_forward(d_out, d_x, d_w, M, N, K, false);
  std::unique_ptr<OpsRecording> recording = gpu_->end_recording();
  EXPECT_TRUE(close(back(d_out, size_t(M) * N), std::vector<float>(size_t(M) * N, 0.0f), kExact))
      << "recording ran the product";
  ASSERT_TRUE(recording->replay());
  EXPECT_TRUE(close(back(d_out, size_t(M) * N), eager, kExact)) << "first replay";

  // New input in the same buffer: the replay reads it.
  const std::vector<float> x2 = normal(rng, size_t(M) * K);
  gpu_->copy_from_host(d_x, x2.data(), sizeof(float) * x2.size());
  std::vector<float> want2(size_t(M) * N);
  cpu_.matmul_forward(want2.data(), x2.data(), w.data(), M, N, K, false);
  ASSERT_TRUE(recording->replay());
  EXPECT_TRUE(close(back(d_out, size_t(M) * N), want2, kReduction)) << "replay on new input";

  // A larger product grows the scratch the recording uses: it must refuse to replay.
  const int big_n = 4096, big_k = 4096;
  const float* d_big_w = dev(normal(rng, size_t(big_n) * big_k));
  const float* d_big_x = dev(normal(rng, size_t(64) * big_k));
  float* d_big_out = poisoned(size_t(64) * big_n);
  gpu_->matmul_forward(d_big_out, d_big_x, d_big_w, 64, big_n, big_k, false);
  EXPECT_FALSE(recording->replay()) << "replayed over a scratch buffer that was freed";
}

// A side branch (side_branch_begin .. end, joined later) runs its ops on a stream of its own:
// the branch's product, the main sequence's product queued while the branch may still run, and
// an op after the join that reads the branch's output must all have the bits of the same ops
// in order; recorded and replayed too. A scratch grown inside a branch while recording refuses
// the recording (the branch is joined, the capture ends) and the backend works on.
TEST_F(CudaOpsTest, SideBranchOpsMatchTheSameOpsInOrder) {
  Rng rng(405);
  const int M = 8, N = 320, K = 256;  // the split kernel (above the GEMV's rows), with scratch
  const std::vector<float> x = normal(rng, size_t(M) * K);
  const std::vector<float> w1 = normal(rng, size_t(N) * K), w2 = normal(rng, size_t(N) * K);
  const float* d_x = dev(x);
  const float* d_w1 = dev(w1);
  const float* d_w2 = dev(w2);
  const size_t n = size_t(M) * N;
  float* a = poisoned(n);
  float* b = poisoned(n);
  float* c = poisoned(n);
  gpu_->matmul_forward(a, d_x, d_w1, M, N, K, false);
  gpu_->matmul_forward(b, d_x, d_w2, M, N, K, false);
  gpu_->copy(c, a, int64_t(n));
  gpu_->matmul_forward(c, d_x, d_w2, M, N, K, true);
  const auto want_a = back(a, n), want_b = back(b, n), want_c = back(c, n);

  auto branch_ops = [&] {
    gpu_->side_branch_begin();
    gpu_->matmul_forward(a, d_x, d_w1, M, N, K, false);
    gpu_->side_branch_end();
    gpu_->matmul_forward(b, d_x, d_w2, M, N, K, false);
    gpu_->side_branch_join();
    gpu_->copy(c, a, int64_t(n));
    gpu_->matmul_forward(c, d_x, d_w2, M, N, K, true);
  };
  auto expect_results = [&](const char* what) {
    EXPECT_TRUE(close(back(a, n), want_a, kExact)) << what << ": the branch's product";
    EXPECT_TRUE(close(back(b, n), want_b, kExact)) << what << ": the main product";
    EXPECT_TRUE(close(back(c, n), want_c, kExact)) << what << ": after the join";
  };
  auto poison = [&] {
    for (float* p : {a, b, c}) gpu_->fill(p, kNaN, int64_t(n));
  };
  poison();
  branch_ops();
  expect_results("op by op");
  if (!gpu_->can_record()) GTEST_SKIP() << "RLHF_CUDA_GRAPHS=off";
  poison();
  gpu_->begin_recording();
  branch_ops();
  std::unique_ptr<OpsRecording> recording = gpu_->end_recording();
  ASSERT_TRUE(recording->replay());
  expect_results("replayed");

  // A fresh backend has no scratch yet: the branch's product must grow it while recording.
  CudaOps<float> fresh;
  float* a2 = static_cast<float*>(fresh.alloc_bytes(sizeof(float) * n));
  fresh.begin_recording();
  fresh.side_branch_begin();
  EXPECT_THROW(fresh.matmul_forward(a2, d_x, d_w1, M, N, K, false), OpNotRecordable);
  fresh.side_branch_begin();  // usable again: a new branch, op by op
  fresh.matmul_forward(a2, d_x, d_w1, M, N, K, false);
  fresh.side_branch_end();
  fresh.side_branch_join();
  std::vector<float> got(n);
  fresh.copy_to_host(got.data(), a2, sizeof(float) * n);
  EXPECT_TRUE(close(got, want_a, kExact)) << "after the refused recording";
  fresh.free_bytes(a2);
}

// An op that waits for the device cannot be recorded: it throws, the recording ends, nothing
// recorded before it has run, and the backend works on as before.
TEST_F(CudaOpsTest, RecordingRefusesHostCopiesAndRunsNothing) {
  if (!gpu_->can_record()) GTEST_SKIP() << "RLHF_CUDA_GRAPHS=off";
  float* d_x = dev(std::vector<float>(64, 5.0f));
  std::vector<float> host(64);
  gpu_->begin_recording();
  gpu_->fill(d_x, 1.0f, 64);
  EXPECT_THROW(gpu_->copy_to_host(host.data(), d_x, sizeof(float) * 64), OpNotRecordable);
  EXPECT_TRUE(close(back(d_x, 64), std::vector<float>(64, 5.0f), kExact)) << "fill ran";

  gpu_->begin_recording();
  EXPECT_THROW(gpu_->copy_from_host(d_x, host.data(), sizeof(float) * 64), OpNotRecordable);
  gpu_->begin_recording();
  EXPECT_THROW(gpu_->alloc_bytes(16), OpNotRecordable);
  // Training-sized grouped products read their offsets back.
  const std::vector<int32_t> offsets = {0, 80, 160};
  const int32_t* d_offsets = dev(offsets);
  float* d_in = dev(std::vector<float>(160 * 16, 1.0f));
  const float* d_w = dev(std::vector<float>(2 * 8 * 16, 1.0f));
  float* d_out = poisoned(160 * 8);
  gpu_->begin_recording();
  EXPECT_THROW(gpu_->grouped_matmul_forward(d_out, d_in, d_w, d_offsets, 2, 160, 8, 16),
               OpNotRecordable);

  gpu_->fill(d_x, 2.0f, 64);
  EXPECT_TRUE(close(back(d_x, 64), std::vector<float>(64, 2.0f), kExact)) << "after refusals";
}

// The comparison itself must be able to fail: a perturbed result is caught at each tolerance.
TEST(CudaOpsTolerance, DetectsDifferences) {
  std::vector<float> want = {1.0f, -2.0f, 3.0f, 0.0f};
  std::vector<float> got = want;
  EXPECT_TRUE(close(got, want, kExact));
  got[2] = std::nextafter(3.0f, 4.0f);
  EXPECT_FALSE(close(got, want, kExact));
  EXPECT_TRUE(close(got, want, kElementwise));
  got[2] = 3.001f;
  EXPECT_FALSE(close(got, want, kReduction));
  got[2] = kNaN;
  EXPECT_FALSE(close(got, want, kReduction));
}

}  // namespace
}  // namespace rlhf
