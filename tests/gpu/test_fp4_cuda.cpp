// The CUDA FP4 quantizer against the CPU one: codes, scales and the NVFP4 global scale must be
// bit-identical, and so must the dequantized values. Skips when no CUDA device is present.
#include <gtest/gtest.h>

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/rng.h"
#include "kernels/fp4/fp4.h"
#include "tests/gpu/gpu_test_support.h"
#include "kernels/fp4/fp4_quant.cuh"

namespace rlhf {
namespace {


// Normal values times a random power of two per row (so NVFP4 meets blocks whose scale
// underflows), with zeros, negative zeros, E2M1 tie points, outliers and subnormals mixed in.
std::vector<float> random_tensor(uint64_t seed, int64_t rows, int64_t cols) {
  Rng rng(seed);
  std::vector<float> x(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    const float row_scale = std::ldexp(1.0f, static_cast<int>(rng.uniform_int(-24, 24)));
    for (int64_t c = 0; c < cols; ++c) {
      float v = static_cast<float>(rng.normal()) * row_scale;
      switch (rng.uniform_int(0, 39)) {
        case 0: v = 0.0f; break;
        case 1: v = -0.0f; break;
        case 2: v = 0.25f * static_cast<float>(rng.uniform_int(-24, 24)) * row_scale; break;
        case 3: v *= 1000.0f; break;
        case 4: v = static_cast<float>(rng.normal()) * 1e-40f; break;
        default: break;
      }
      x[static_cast<size_t>(r * cols + c)] = v;
    }
  }
  return x;
}

// Index of the first differing byte, or -1.
int64_t first_mismatch(const void* a, const void* b, size_t bytes) {
  const auto* pa = static_cast<const uint8_t*>(a);
  const auto* pb = static_cast<const uint8_t*>(b);
  for (size_t i = 0; i < bytes; ++i) {
    if (pa[i] != pb[i]) return static_cast<int64_t>(i);
  }
  return -1;
}

// Finite floats from random bit patterns: every exponent from subnormal to FLT_MAX, so the
// MXFP4 scale covers its whole range and NVFP4 blocks mostly underflow to a zero scale.
std::vector<float> random_bits_tensor(uint64_t seed, int64_t rows, int64_t cols) {
  Rng rng(seed);
  std::vector<float> x(static_cast<size_t>(rows * cols));
  for (float& v : x) {
    do {
      v = fp4_float_from_bits(static_cast<uint32_t>(rng.next_u64()));
    } while (!std::isfinite(v));
  }
  return x;
}

// Quantizes x [rows, cols] on the CPU and on the device, dequantizes both, and expects the
// same bits everywhere; a failure names the first mismatching coordinate.
void expect_cuda_matches_cpu(const std::vector<float>& x, int64_t rows, int64_t cols,
                             Fp4Format format) {
  SCOPED_TRACE(std::string(fp4_format_name(format)) + " [" + std::to_string(rows) + ", " +
               std::to_string(cols) + "]");
  const Fp4Tensor cpu = fp4_quantize(x.data(), rows, cols, format, "w");

  DeviceBuffer<float> d_x(x.size()), d_global(1), d_out(x.size());
  DeviceBuffer<uint8_t> d_codes(cpu.codes.size()), d_scales(cpu.scales.size());
  ASSERT_TRUE(d_x.ptr && d_global.ptr && d_out.ptr && d_codes.ptr && d_scales.ptr);
  CUDA_OK(cudaMemcpy(d_x.ptr, x.data(), x.size() * sizeof(float), cudaMemcpyHostToDevice));
  fp4_quantize_cuda(d_x.ptr, rows, cols, format, "w", d_codes.ptr, d_scales.ptr, d_global.ptr);
  fp4_dequantize_cuda(d_codes.ptr, d_scales.ptr, d_global.ptr, rows, cols, format, d_out.ptr);
  CUDA_OK(cudaDeviceSynchronize());

  std::vector<uint8_t> codes(cpu.codes.size()), scales(cpu.scales.size());
  std::vector<float> out(x.size()), cpu_out(x.size());
  float global = 0.0f;
  CUDA_OK(cudaMemcpy(codes.data(), d_codes.ptr, codes.size(), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(scales.data(), d_scales.ptr, scales.size(), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(&global, d_global.ptr, sizeof global, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(out.data(), d_out.ptr, out.size() * sizeof(float), cudaMemcpyDeviceToHost));
  fp4_dequantize(cpu, cpu_out.data());

  EXPECT_EQ(fp4_float_bits(global), fp4_float_bits(cpu.global_scale));
  const int64_t blocks_per_row = cols / fp4_block_size(format);
  int64_t at = first_mismatch(scales.data(), cpu.scales.data(), scales.size());
  EXPECT_EQ(at, -1) << "first scale mismatch at [" << at / blocks_per_row << ", block "
                    << at % blocks_per_row << "]";
  at = first_mismatch(codes.data(), cpu.codes.data(), codes.size());
  EXPECT_EQ(at, -1) << "first code mismatch at [" << at / (cols / 2) << ", "
                    << 2 * (at % (cols / 2)) << "] x=" << (at >= 0 ? x[2 * at] : 0.0f);
  at = first_mismatch(out.data(), cpu_out.data(), out.size() * sizeof(float));
  EXPECT_EQ(at, -1) << "first dequantized mismatch at flat index " << at / 4;
}

constexpr Fp4Format kFormats[2] = {Fp4Format::mxfp4, Fp4Format::nvfp4};

TEST(Fp4Cuda, RandomTensorsMatchCpuBitForBit) {
  SKIP_WITHOUT_GPU();
  const struct {
    int64_t rows, cols;
  } shapes[] = {{1, 32}, {3, 64}, {17, 96}, {128, 1024}, {7, 4096}, {1000, 160}};
  uint64_t seed = 7;
  for (Fp4Format format : kFormats) {
    for (const auto& s : shapes) {
      expect_cuda_matches_cpu(random_tensor(++seed, s.rows, s.cols), s.rows, s.cols, format);
    }
    expect_cuda_matches_cpu(random_bits_tensor(++seed, 64, 512), 64, 512, format);
  }
}

TEST(Fp4Cuda, EdgeTensorsMatchCpu) {
  SKIP_WITHOUT_GPU();
  std::vector<std::vector<float>> cases;
  cases.emplace_back(64, 0.0f);       // all zeros: NVFP4 global 1
  cases.emplace_back(64, 1e-40f);     // subnormal: global held at 2^-126
  cases.emplace_back(64, 0x1p-128f);  // MXFP4 scale clamped to 2^-127
  std::vector<float> huge(64, 1e-3f);
  huge[9] = -1000.0f;
  huge[40] = std::numeric_limits<float>::max();
  cases.push_back(huge);
  for (Fp4Format format : kFormats) {
    for (const std::vector<float>& x : cases) expect_cuda_matches_cpu(x, 1, 64, format);
  }
  // An empty tensor still writes its global scale.
  expect_cuda_matches_cpu({}, 0, 64, Fp4Format::nvfp4);
}

TEST(Fp4Cuda, NanAndBadColumnsAreErrors) {
  SKIP_WITHOUT_GPU();
  std::vector<float> x(4 * 32, 1.0f);
  x[2 * 32 + 5] = std::numeric_limits<float>::quiet_NaN();
  x[3 * 32 + 1] = std::numeric_limits<float>::infinity();
  DeviceBuffer<float> d_x(x.size()), d_global(1);
  DeviceBuffer<uint8_t> d_codes(x.size() / 2), d_scales(x.size() / 16);
  CUDA_OK(cudaMemcpy(d_x.ptr, x.data(), x.size() * sizeof(float), cudaMemcpyHostToDevice));
  try {
    fp4_quantize_cuda(d_x.ptr, 4, 32, Fp4Format::nvfp4, "experts.3.w2", d_codes.ptr,
                      d_scales.ptr, d_global.ptr);
    ADD_FAILURE() << "NaN input was accepted";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("experts.3.w2"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[2, 5]"), std::string::npos) << msg;  // the first one
  }
  EXPECT_THROW(fp4_quantize_cuda(d_x.ptr, 2, 48, Fp4Format::mxfp4, "w", d_codes.ptr,
                                 d_scales.ptr, d_global.ptr),
               Error);
  CUDA_OK(cudaDeviceSynchronize());
}

}  // namespace
}  // namespace rlhf
