// The Hopper FP4 grouped MoE GEMM (kernels/cuda/sm90_fp4_bf16_moe_grouped.cuh) against the CPU:
// the same packed experts dequantized by fp4_dequantize, times the same BF16-rounded
// activations, summed in double. Kernel tests skip without a CUDA device; the layout and
// bad-input tests run anywhere the CUDA toolkit is.
//
// Tolerance (per element): the weights the kernel feeds the tensor cores are exactly
// fp4_dequantize's values (times a per-expert power of two, undone in FP32), and the BF16
// activations are the reference's, so every product is exact. What differs is the FP32 summation:
// the kernel sums k products in an order of its own (MMA steps of 16, k slices), the reference in
// double. Each FP32 addition is off by at most 2^-23 of the partial sum (allowing truncation
// inside the tensor cores), a partial sum is at most sum_k |x_k w_k|, and there are fewer than k
// additions, so |y - ref| <= k * 2^-23 * sum_k |x_k w_k|. NVFP4's reference rounds
// E4M3 * global once more per weight (fp4_dequantize), the kernel applies the global scale once
// at the end: 2^-22 * sum_k |x_k w_k| more. BF16 output adds its own rounding, 2^-9 |y|; we allow
// 2^-8 |ref|. A wrong code, scale or row moves an element by about |x_k w_k| ~ sum / k, far more.
#include <gtest/gtest.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/rng.h"
#include "kernels/cuda/fp4_moe_layout.h"
#include "kernels/cuda/sm90_fp4_bf16_moe_grouped.cuh"
#include "kernels/fp4/fp4.h"
#include "tests/gpu/gpu_test_support.h"

namespace rlhf {
namespace {


// Round to nearest even (no NaN or Inf in these tests).
uint16_t bf16_bits(float x) {
  const uint32_t u = fp4_float_bits(x);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
float bf16_float(uint16_t b) { return fp4_float_from_bits(uint32_t{b} << 16); }

struct MoeProblem {
  Fp4Format format = Fp4Format::mxfp4;
  int64_t n = 0, k = 0;
  std::vector<Fp4Tensor> experts;  // [E] of [n, k]
  std::vector<int32_t> offsets;    // [E + 1]
  std::vector<uint16_t> x;         // [rows, k] bf16 bits
  int64_t rows() const { return offsets.back(); }
};

// Weights: normal values times a random power of two per row, with whole zero blocks mixed in.
Fp4Tensor random_expert(Rng& rng, Fp4Format format, int64_t n, int64_t k) {
  std::vector<float> w(static_cast<size_t>(n * k));
  const int block = fp4_block_size(format);
  for (int64_t r = 0; r < n; ++r) {
    const float row_scale = std::ldexp(1.0f, static_cast<int>(rng.uniform_int(-12, 12)));
    for (int64_t c = 0; c < k; c += block) {
      const bool zero_block = rng.uniform_int(0, 19) == 0;
      for (int i = 0; i < block; ++i) {
        w[static_cast<size_t>(r * k + c + i)] =
            zero_block ? 0.0f : static_cast<float>(rng.normal()) * row_scale;
      }
    }
  }
  return fp4_quantize(w.data(), n, k, format, "expert");
}

MoeProblem random_problem(uint64_t seed, Fp4Format format, int64_t n, int64_t k,
                          const std::vector<int>& rows_per_expert) {
  Rng rng(seed);
  MoeProblem p;
  p.format = format;
  p.n = n;
  p.k = k;
  p.offsets.push_back(0);
  for (int rows : rows_per_expert) {
    p.experts.push_back(random_expert(rng, format, n, k));
    p.offsets.push_back(p.offsets.back() + rows);
  }
  p.x.resize(static_cast<size_t>(p.rows() * k));
  for (uint16_t& v : p.x) v = bf16_bits(static_cast<float>(rng.normal()));
  return p;
}

struct Reference {
  std::vector<double> y;        // [rows, n]
  std::vector<double> abs_sum;  // [rows, n]: sum_k |x_k w_k|
};

Reference reference(const MoeProblem& p) {
  Reference ref;
  ref.y.assign(static_cast<size_t>(p.rows() * p.n), 0.0);
  ref.abs_sum.assign(ref.y.size(), 0.0);
  std::vector<float> w(static_cast<size_t>(p.n * p.k));
  std::vector<double> xr(static_cast<size_t>(p.k));
  for (size_t e = 0; e < p.experts.size(); ++e) {
    if (p.offsets[e] == p.offsets[e + 1]) continue;
    fp4_dequantize(p.experts[e], w.data());
    for (int64_t r = p.offsets[e]; r < p.offsets[e + 1]; ++r) {
      for (int64_t c = 0; c < p.k; ++c) xr[c] = bf16_float(p.x[static_cast<size_t>(r * p.k + c)]);
      for (int64_t j = 0; j < p.n; ++j) {
        const float* wj = w.data() + j * p.k;
        double sum = 0.0, abs_sum = 0.0;
        for (int64_t c = 0; c < p.k; ++c) {
          const double t = xr[c] * static_cast<double>(wj[c]);
          sum += t;
          abs_sum += std::fabs(t);
        }
        ref.y[static_cast<size_t>(r * p.n + j)] = sum;
        ref.abs_sum[static_cast<size_t>(r * p.n + j)] = abs_sum;
      }
    }
  }
  return ref;
}

// The problem on the device. y is poisoned (all bytes 0xff: NaN in bf16 and f32) before every
// run and followed by a poisoned guard that must stay untouched.
class DeviceMoe {
 public:
  static constexpr size_t kGuardBytes = 4096;

  explicit DeviceMoe(const MoeProblem& p)
      : layout_(fp4_moe_layout_pack(p.experts)),
        weights_(layout_.bytes.size()),
        factors_(layout_.expert_factors.size()),
        x_(p.x.size()),
        offsets_(p.offsets.size()),
        y_(static_cast<size_t>(p.rows() * p.n) * sizeof(float) + kGuardBytes) {
    params_.format = p.format;
    params_.experts = static_cast<int32_t>(p.experts.size());
    params_.n = p.n;
    params_.k = p.k;
    params_.weights = weights_.ptr;
    params_.expert_factors = factors_.ptr;
    params_.x = reinterpret_cast<const __nv_bfloat16*>(x_.ptr);
    params_.offsets = offsets_.ptr;
    params_.total_rows = p.rows();
    params_.y = y_.ptr;
    ok_ = weights_.ptr && factors_.ptr && x_.ptr && offsets_.ptr && y_.ptr &&
          cudaMemcpy(weights_.ptr, layout_.bytes.data(), layout_.bytes.size(),
                     cudaMemcpyHostToDevice) == cudaSuccess &&
          cudaMemcpy(factors_.ptr, layout_.expert_factors.data(),
                     layout_.expert_factors.size() * sizeof(float),
                     cudaMemcpyHostToDevice) == cudaSuccess &&
          cudaMemcpy(x_.ptr, p.x.data(), p.x.size() * sizeof(uint16_t),
                     cudaMemcpyHostToDevice) == cudaSuccess &&
          cudaMemcpy(offsets_.ptr, p.offsets.data(), p.offsets.size() * sizeof(int32_t),
                     cudaMemcpyHostToDevice) == cudaSuccess;
  }
  bool ok() const { return ok_; }
  const Sm90Fp4MoeParams& params() const { return params_; }

  // Runs the kernel (the checked entry point if config is null) and returns y as floats, or
  // an empty vector after a failed expectation.
  std::vector<float> run(MoeOutType out_type, const Sm90Fp4MoeConfig* config) {
    Sm90Fp4MoeParams p = params_;
    p.out_type = out_type;
    const size_t elems = static_cast<size_t>(p.total_rows * p.n);
    const size_t bytes = elems * (out_type == MoeOutType::f32 ? 4 : 2);
    std::vector<uint8_t> host(bytes + kGuardBytes);
    EXPECT_EQ(cudaMemset(y_.ptr, 0xff, bytes + kGuardBytes), cudaSuccess);
    if (config != nullptr) {
      sm90_fp4_moe_grouped_launch(p, *config, nullptr);
    } else {
      sm90_fp4_moe_grouped(p, nullptr);
    }
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaGetLastError(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(host.data(), y_.ptr, host.size(), cudaMemcpyDeviceToHost), cudaSuccess);
    for (size_t i = bytes; i < host.size(); ++i) {
      if (host[i] != 0xff) {
        ADD_FAILURE() << "the kernel wrote past y, " << i - bytes << " bytes after its end";
        return {};
      }
    }
    std::vector<float> y(elems);
    for (size_t i = 0; i < elems; ++i) {
      if (out_type == MoeOutType::f32) {
        std::memcpy(&y[i], host.data() + 4 * i, 4);
      } else {
        uint16_t b;
        std::memcpy(&b, host.data() + 2 * i, 2);
        y[i] = bf16_float(b);
      }
    }
    return y;
  }

 private:
  Fp4MoeLayout layout_;
  DeviceBuffer<uint8_t> weights_;
  DeviceBuffer<float> factors_;
  DeviceBuffer<uint16_t> x_;
  DeviceBuffer<int32_t> offsets_;
  DeviceBuffer<uint8_t> y_;
  Sm90Fp4MoeParams params_;
  bool ok_ = false;
};

std::string config_name(const Sm90Fp4MoeConfig* c) {
  if (c == nullptr) return "auto";
  if (c->kernel == Sm90Fp4MoeKernel::prefill) {
    return "prefill/" + std::to_string(c->tokens_per_tile) + (c->x_multicast ? "/mc" : "");
  }
  if (c->schedule == Sm90Fp4MoeSchedule::warp) return "warp/" + std::to_string(c->tokens_per_tile);
  return "decode/" + std::to_string(c->tokens_per_tile) + "/R" +
         std::to_string(c->row_tiles_per_block);
}

// Every element within the bound of the file comment; the first failure names its coordinate.
void expect_close(const MoeProblem& p, const Reference& ref, const std::vector<float>& y,
                  MoeOutType out_type) {
  ASSERT_EQ(y.size(), ref.y.size());
  const double sum_bound = static_cast<double>(p.k) * 0x1p-23 +
                           (p.format == Fp4Format::nvfp4 ? 0x1p-22 : 0.0);
  int64_t bad = 0;
  double err2 = 0.0, ref2 = 0.0;
  for (int64_t r = 0; r < p.rows(); ++r) {
    for (int64_t j = 0; j < p.n; ++j) {
      const size_t i = static_cast<size_t>(r * p.n + j);
      const double diff = std::fabs(static_cast<double>(y[i]) - ref.y[i]);
      const double tol = sum_bound * ref.abs_sum[i] +
                         (out_type == MoeOutType::bf16 ? 0x1p-8 * std::fabs(ref.y[i]) : 0.0);
      err2 += diff * diff;
      ref2 += ref.y[i] * ref.y[i];
      if (!(diff <= tol) && bad++ == 0) {  // !(<=) also catches NaN: an unwritten element
        const auto e = std::upper_bound(p.offsets.begin(), p.offsets.end(), r) -
                       p.offsets.begin() - 1;
        ADD_FAILURE() << "y[" << r << ", " << j << "] (expert " << e << ") = " << y[i]
                      << ", reference " << ref.y[i] << ", tolerance " << tol;
      }
    }
  }
  EXPECT_EQ(bad, 0) << "elements out of tolerance";
  // Norm-wise, FP32 accumulation lands near 1e-7 (METHOD.md: far under 1e-3).
  if (ref2 > 0.0 && out_type == MoeOutType::f32) {
    EXPECT_LT(std::sqrt(err2 / ref2), 1e-5);
  }
}

void check_problem(const MoeProblem& p, const std::vector<Sm90Fp4MoeConfig>& configs) {
  const Reference ref = reference(p);
  DeviceMoe dev(p);
  ASSERT_TRUE(dev.ok());
  std::vector<const Sm90Fp4MoeConfig*> runs = {nullptr};
  for (const Sm90Fp4MoeConfig& c : configs) runs.push_back(&c);
  for (const Sm90Fp4MoeConfig* c : runs) {
    for (MoeOutType out : {MoeOutType::f32, MoeOutType::bf16}) {
      SCOPED_TRACE(config_name(c) + (out == MoeOutType::f32 ? " f32" : " bf16"));
      const std::vector<float> y = dev.run(out, c);
      if (!y.empty()) expect_close(p, ref, y, out);
    }
  }
}

constexpr Fp4Format kFormats[2] = {Fp4Format::mxfp4, Fp4Format::nvfp4};

Sm90Fp4MoeConfig decode_config(int tokens, int row_tiles) {
  return {Sm90Fp4MoeKernel::decode, tokens, row_tiles};
}
Sm90Fp4MoeConfig prefill_config(int tokens) { return {Sm90Fp4MoeKernel::prefill, tokens, 2}; }
// Pairs of blocks sharing x (a cluster of two; the second block idles past the last row tile).
Sm90Fp4MoeConfig multicast_config(int tokens) {
  Sm90Fp4MoeConfig c = prefill_config(tokens);
  c.x_multicast = true;
  return c;
}
Sm90Fp4MoeConfig warp_config(int tokens) {
  return {Sm90Fp4MoeKernel::decode, tokens, 1, Sm90Fp4MoeSchedule::warp};
}

std::vector<int> random_rows(Rng& rng, int experts, int max_rows) {
  std::vector<int> rows(static_cast<size_t>(experts));
  for (int& r : rows) r = rng.uniform_int(0, 3) == 0 ? 0 : static_cast<int>(rng.uniform_int(1, max_rows));
  return rows;
}

// 1..16 rows per expert (and empty experts): the decode kernel, every block shape, and the
// warp schedule (here with fewer (m-tile, row tile) columns than warps: many warps find none).
TEST(Fp4MoeGrouped, DecodeShapesMatchCpu) {
  SKIP_WITHOUT_GPU();
  const struct {
    int64_t n, k;
  } shapes[] = {{64, 64}, {192, 320}, {320, 1088}, {128, 576}};
  // Row tiles per block that do not divide the warps (7, 3, 5) leave warps idle.
  const std::vector<Sm90Fp4MoeConfig> configs = {
      decode_config(8, 1), decode_config(16, 2), decode_config(8, 8), decode_config(16, 4),
      decode_config(8, 7), decode_config(16, 3), decode_config(8, 5), warp_config(8),
      warp_config(16)};
  uint64_t seed = 100;
  for (Fp4Format format : kFormats) {
    for (const auto& s : shapes) {
      Rng rng(++seed);
      const std::vector<int> rows = random_rows(rng, static_cast<int>(rng.uniform_int(1, 9)), 16);
      SCOPED_TRACE(std::string(fp4_format_name(format)) + " n=" + std::to_string(s.n) +
                   " k=" + std::to_string(s.k));
      check_problem(random_problem(++seed, format, s.n, s.k, rows), configs);
    }
  }
}

// Up to 300 rows per expert: the prefill kernel with 128- and 256-row tiles (several m-tiles,
// partial ones, a half-empty last row block when n / 64 is odd), and the decode kernel on the
// same problem.
TEST(Fp4MoeGrouped, PrefillShapesMatchCpu) {
  SKIP_WITHOUT_GPU();
  const struct {
    int64_t n, k;
  } shapes[] = {{192, 320}, {64, 1024}, {256, 192}};
  const std::vector<Sm90Fp4MoeConfig> configs = {prefill_config(128), prefill_config(256),
                                                 multicast_config(128), multicast_config(256),
                                                 decode_config(16, 1)};
  uint64_t seed = 200;
  for (Fp4Format format : kFormats) {
    for (const auto& s : shapes) {
      Rng rng(++seed);
      std::vector<int> rows = random_rows(rng, static_cast<int>(rng.uniform_int(2, 5)), 300);
      rows[0] = 0;  // an empty expert first
      rows[1] = 129;  // one full m-tile and one row
      SCOPED_TRACE(std::string(fp4_format_name(format)) + " n=" + std::to_string(s.n) +
                   " k=" + std::to_string(s.k));
      check_problem(random_problem(++seed, format, s.n, s.k, rows), configs);
    }
  }
}

// Row r of x is the unit vector e_r, so y = W^T: every dequantized weight comes back through
// the kernel. MXFP4 bit for bit (every step is exact); NVFP4 within 2^-22 relative: the kernel
// rounds once (code * E4M3 * global), fp4_dequantize twice (E4M3 * global, then * code).
TEST(Fp4MoeGrouped, OneHotActivationsReturnEveryWeight) {
  SKIP_WITHOUT_GPU();
  const int64_t n = 128, k = 192;
  for (Fp4Format format : kFormats) {
    SCOPED_TRACE(fp4_format_name(format));
    MoeProblem p = random_problem(300, format, n, k, {0, static_cast<int>(k), 0});
    std::fill(p.x.begin(), p.x.end(), uint16_t{0});
    for (int64_t r = 0; r < k; ++r) p.x[static_cast<size_t>(r * k + r)] = bf16_bits(1.0f);
    std::vector<float> w(static_cast<size_t>(n * k));
    fp4_dequantize(p.experts[1], w.data());
    DeviceMoe dev(p);
    ASSERT_TRUE(dev.ok());
    const Sm90Fp4MoeConfig configs[] = {prefill_config(128), prefill_config(256),
                                        multicast_config(128), multicast_config(256),
                                        decode_config(16, 2), decode_config(8, 8),
                                        warp_config(8), warp_config(16)};
    for (const Sm90Fp4MoeConfig& c : configs) {
      SCOPED_TRACE(config_name(&c));
      const std::vector<float> y = dev.run(MoeOutType::f32, &c);
      ASSERT_EQ(y.size(), w.size());
      int64_t bad = 0;
      for (int64_t r = 0; r < k; ++r) {
        for (int64_t j = 0; j < n; ++j) {
          const float got = y[static_cast<size_t>(r * n + j)];
          const float want = w[static_cast<size_t>(j * k + r)];
          const bool ok = format == Fp4Format::mxfp4
                              ? got == want
                              : std::fabs(got - want) <= 0x1p-22f * std::fabs(want);
          if (!ok && bad++ == 0) {
            ADD_FAILURE() << "W[" << j << ", " << r << "]: kernel " << got << ", fp4_dequantize "
                          << want;
          }
        }
      }
      EXPECT_EQ(bad, 0);
    }
  }
}

// Programmatic dependent launch: a second launch that reads the first one's output as its x
// (n == k) must see all of it. Two back-to-back launches in one stream against the same two run
// with a device synchronization between them: the same bits. Both decode schedules, 8-token
// tiles (the programmatic ones); `config` null: the checked entry point's choice.
void check_chained_launches(const Sm90Fp4MoeConfig* config) {
  SCOPED_TRACE(config_name(config));
  const auto launch = [config](const Sm90Fp4MoeParams& p) {
    if (config != nullptr) {
      sm90_fp4_moe_grouped_launch(p, *config, nullptr);
    } else {
      sm90_fp4_moe_grouped(p, nullptr);
    }
  };
  const int64_t n = 1024, k = 1024;
  Rng rng(800);
  const std::vector<int> rows = random_rows(rng, 40, 16);
  const MoeProblem prob = random_problem(801, Fp4Format::mxfp4, n, k, rows);
  DeviceMoe dev(prob);
  ASSERT_TRUE(dev.ok());
  const size_t elems = static_cast<size_t>(prob.rows() * n);
  DeviceBuffer<uint16_t> y1(elems), y2(elems);
  ASSERT_TRUE(y1.ptr != nullptr && y2.ptr != nullptr);
  Sm90Fp4MoeParams first = dev.params();
  first.y = y1.ptr;
  first.active_experts_hint = 40;
  Sm90Fp4MoeParams second = first;
  second.x = reinterpret_cast<const __nv_bfloat16*>(y1.ptr);
  second.y = y2.ptr;
  std::vector<uint16_t> chained(elems), separate(elems);
  for (bool sync_between : {false, true}) {
    CUDA_OK(cudaMemset(y1.ptr, 0xff, elems * 2));
    CUDA_OK(cudaMemset(y2.ptr, 0xff, elems * 2));
    CUDA_OK(cudaDeviceSynchronize());
    launch(first);
    if (sync_between) {
      CUDA_OK(cudaDeviceSynchronize());
    }
    launch(second);
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<uint16_t>& out = sync_between ? separate : chained;
    CUDA_OK(cudaMemcpy(out.data(), y2.ptr, elems * 2, cudaMemcpyDeviceToHost));
  }
  EXPECT_EQ(std::memcmp(chained.data(), separate.data(), elems * 2), 0);
  int64_t nan = 0;
  for (uint16_t v : separate) nan += (v & 0x7fffu) > 0x7f80u;
  EXPECT_EQ(nan, 0) << "unwritten elements";
}

TEST(Fp4MoeGrouped, ChainedLaunchesSeeThePreviousOutput) {
  SKIP_WITHOUT_GPU();
  const Sm90Fp4MoeConfig block = decode_config(8, 2), warp = warp_config(8);
  check_chained_launches(nullptr);
  check_chained_launches(&block);
  check_chained_launches(&warp);
}

// The heuristic's schedule: the warp schedule exactly where the block schedule would leave one
// k slice per row tile (the down shape), the block schedule where k is split (gate_up).
TEST(Fp4MoeGrouped, HeuristicTakesTheWarpScheduleForOneSlice) {
  Sm90Fp4MoeParams p;
  p.experts = 256;
  p.active_experts_hint = 8;
  p.total_rows = 8;
  p.n = 7168;  // down: 112 row tiles per expert, R = 7: one slice
  p.k = 2048;
  Sm90Fp4MoeConfig c = sm90_fp4_moe_choose_config(p, 132);
  EXPECT_EQ(c.kernel, Sm90Fp4MoeKernel::decode);
  EXPECT_EQ(c.schedule, Sm90Fp4MoeSchedule::warp);
  EXPECT_EQ(c.tokens_per_tile, 8);
  p.total_rows = 128;  // 16 tokens per expert: R = 8
  c = sm90_fp4_moe_choose_config(p, 132);
  EXPECT_EQ(c.schedule, Sm90Fp4MoeSchedule::warp);
  EXPECT_EQ(c.tokens_per_tile, 16);
  p.n = 2048;  // gate_up: 32 row tiles per expert, R = 2: four k slices
  p.k = 7168;
  p.total_rows = 8;
  c = sm90_fp4_moe_choose_config(p, 132);
  EXPECT_EQ(c.schedule, Sm90Fp4MoeSchedule::block);
  EXPECT_EQ(c.row_tiles_per_block, 2);
}

// The warp schedule with more (m-tile, row tile) columns than the grid has warps (64 row tiles
// times 40 to 80 m-tiles against at most 8 warps on each of 132 multiprocessors), so each warp
// takes several, one grid stride apart; both token widths, both formats.
TEST(Fp4MoeGrouped, WarpScheduleLoopsOverColumns) {
  SKIP_WITHOUT_GPU();
  uint64_t seed = 700;
  for (Fp4Format format : kFormats) {
    Rng rng(++seed);
    std::vector<int> rows = random_rows(rng, 48, 16);
    rows[5] = 16;  // at least one full 16-token m-tile
    SCOPED_TRACE(fp4_format_name(format));
    check_problem(random_problem(++seed, format, 4096, 128, rows),
                  {warp_config(8), warp_config(16)});
  }
}

// Many experts, most of them empty, up to the scheduler's bound.
TEST(Fp4MoeGrouped, ManyMostlyEmptyExperts) {
  SKIP_WITHOUT_GPU();
  for (int experts : {300, kFp4MoeMaxExperts}) {
    SCOPED_TRACE(std::to_string(experts) + " experts");
    Rng rng(static_cast<uint64_t>(experts));
    std::vector<int> rows(static_cast<size_t>(experts), 0);
    for (int i = 0; i < 9; ++i) {
      rows[static_cast<size_t>(rng.uniform_int(0, experts - 1))] =
          static_cast<int>(rng.uniform_int(1, i < 6 ? 12 : 40));
    }
    rows.back() = 3;  // the last expert's rows end the tensor
    check_problem(random_problem(400 + experts, Fp4Format::mxfp4, 128, 128, rows),
                  {decode_config(8, 2), prefill_config(128), multicast_config(256),
                   warp_config(8), warp_config(16)});
  }
}

// More units than pairs of blocks fit on the device (n = 2048: 8 pairs of row blocks; 3 to 4
// m-tiles of 256 rows per expert), so each pair runs several units in a row and its stages are
// refilled across units: every stage's "both done" count must carry over. k = 448 (7 chunks)
// ends each unit at another stage than it started.
TEST(Fp4MoeGrouped, MulticastPairsLoopOverUnits) {
  SKIP_WITHOUT_GPU();
  const std::vector<int> rows = {700, 0, 1000, 513, 768};
  for (Fp4Format format : kFormats) {
    SCOPED_TRACE(fp4_format_name(format));
    check_problem(random_problem(900, format, 2048, 448, rows),
                  {multicast_config(256), multicast_config(128), prefill_config(256)});
  }
}

// The host-side layout against fp4_dequantize, decoded by the rules of fp4_moe_layout.h alone
// (no GPU needed): bit positions, multiplier codes and expert factors.
TEST(Fp4MoeLayout, DecodesToFp4Dequantize) {
  for (Fp4Format format : kFormats) {
    SCOPED_TRACE(fp4_format_name(format));
    Rng rng(500);
    const int64_t n = 64, k = 192;
    const Fp4Tensor t = random_expert(rng, format, n, k);
    const Fp4MoeLayout layout = fp4_moe_layout_pack({t});
    std::vector<float> want(static_cast<size_t>(n * k));
    fp4_dequantize(t, want.data());
    const int chunk_bytes = fp4_moe_chunk_bytes(format);
    const int blocks = kFp4MoeChunkCols / fp4_block_size(format);
    int64_t bad = 0;
    for (int64_t row = 0; row < n; ++row) {
      for (int64_t col = 0; col < k; ++col) {
        const int64_t tile = row / 16, chunk = col / 64, r = row % 16, cc = col % 64;
        const int64_t g = r % 8, half = r / 8, s = cc / 16, c = (cc % 8) / 2;
        const int pair = static_cast<int>(cc % 2), high_k = static_cast<int>((cc % 16) / 8);
        const int reg = static_cast<int>(half) + 2 * high_k;  // the A register of (row, col)
        const uint8_t* base =
            layout.bytes.data() + (((tile / 4) * (k / 64) + chunk) * 4 + tile % 4) * chunk_bytes;
        uint32_t word;
        std::memcpy(&word, base + (4 * g + c) * 16 + 4 * s, 4);
        const auto bit = [&](int at) { return (word >> (at % 32)) & 1u; };
        const int sign_at = 15 + 16 * pair + kFp4MoeSignRotation[reg];
        const int mag_at = 6 + 16 * pair + kFp4MoeMagRotation[reg];
        const uint32_t code =
            bit(sign_at) << 3 | bit(mag_at + 2) << 2 | bit(mag_at + 1) << 1 | bit(mag_at);
        const int block = static_cast<int>(cc / fp4_block_size(format));
        const uint8_t f = base[kFp4MoeChunkCodeBytes + g * 2 * blocks + half * blocks + block];
        const float multiplier = format == Fp4Format::mxfp4
                                     ? fp4_float_from_bits(uint32_t{f} << 23)
                                     : fp4_float_from_bits((16u * f + (235u << 7)) << 16);
        const float raw = std::ldexp(fp4_e2m1_decode(static_cast<uint8_t>(code)), -126);
        const float got = raw * multiplier * layout.expert_factors[0];
        const float w = want[static_cast<size_t>(row * k + col)];
        const bool ok = format == Fp4Format::mxfp4 ? got == w
                                                   : std::fabs(got - w) <= 0x1p-22f * std::fabs(w);
        if (!ok && bad++ == 0) {
          ADD_FAILURE() << "W[" << row << ", " << col << "]: layout " << got << ", fp4_dequantize "
                        << w;
        }
      }
    }
    EXPECT_EQ(bad, 0);
  }
}

template <typename F>
void expect_error(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "accepted; expected an error naming '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

// Unsupported shapes and corrupt packed weights are clear errors, before any device work.
TEST(Fp4MoeGrouped, BadInputIsAnError) {
  Sm90Fp4MoeParams p;
  p.experts = 8;
  p.n = 2048;
  p.k = 7168;
  p.total_rows = 16;
  Sm90Fp4MoeParams q = p;
  q.n = 2000;
  expect_error([&] { sm90_fp4_moe_grouped(q); }, "2000 rows");
  q = p;
  q.k = 7200;
  expect_error([&] { sm90_fp4_moe_grouped(q); }, "7200 columns");
  q = p;
  q.experts = 0;
  expect_error([&] { sm90_fp4_moe_grouped(q); }, "0 experts");
  q = p;
  q.experts = kFp4MoeMaxExperts + 1;
  expect_error([&] { sm90_fp4_moe_grouped(q); }, "1025 experts");
  q = p;
  q.total_rows = -1;
  expect_error([&] { sm90_fp4_moe_grouped(q); }, "-1 rows");

  Rng rng(600);
  const Fp4Tensor a = random_expert(rng, Fp4Format::nvfp4, 64, 128);
  const Fp4Tensor b = random_expert(rng, Fp4Format::nvfp4, 64, 192);
  expect_error([&] { fp4_moe_layout_pack({a, b}); }, "expert 1 is nvfp4 [64, 192]");
  Fp4Tensor nan_scale = a;
  nan_scale.scales[37] = 0x7f;
  expect_error([&] { fp4_moe_layout_pack({nan_scale}); }, "NaN E4M3 scale");
  Fp4Tensor short_codes = a;
  short_codes.codes.pop_back();
  expect_error([&] { fp4_moe_layout_pack({short_codes}); }, "code bytes");
  const Fp4Tensor odd = random_expert(rng, Fp4Format::mxfp4, 64, 96);
  expect_error([&] { fp4_moe_layout_pack({odd}); }, "96 columns");
  // MXFP4 blocks 2^-120 and 2^+20 apart in scale: bf16 cannot hold both products exactly.
  std::vector<float> wide(static_cast<size_t>(64 * 64), 1.0f);
  wide[0] = 0x1p-110f;
  for (int i = 1; i < 32; ++i) wide[static_cast<size_t>(i)] = 0x1p-110f;
  wide[32] = 0x1p+30f;
  expect_error(
      [&] { fp4_moe_layout_pack({fp4_quantize(wide.data(), 64, 64, Fp4Format::mxfp4, "w")}); },
      "within 2^133");
}

}  // namespace
}  // namespace rlhf
