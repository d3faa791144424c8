// The FP4 quantizer's rules (docs/fp4.md), checked value by value: E2M1 and E4M3 against
// brute-force nearest-value references, the MXFP4 / NVFP4 scale rules and their edge cases,
// fake-quantize == dequantize(quantize) bit for bit, the error bound, and bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/rng.h"
#include "kernels/fp4/fp4.h"

namespace rlhf {
namespace {

template <typename F>
std::string error_message(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an rlhf::Error";
  return "";
}

#define EXPECT_CONTAINS(text, part) \
  EXPECT_NE(std::string(text).find(part), std::string::npos) << "message: " << (text)

uint32_t bits(float x) { return fp4_float_bits(x); }

constexpr float kE2m1Values[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
constexpr Fp4Format kFormats[2] = {Fp4Format::mxfp4, Fp4Format::nvfp4};

// Nearest E2M1 code by search: ties to the even magnitude index (mantissa bit 0), |x| > 6 -> 6.
uint8_t e2m1_reference(float x) {
  const double a = std::fabs(static_cast<double>(x));
  int best = 0;
  for (int i = 1; i < 8; ++i) {
    const double d = std::fabs(a - kE2m1Values[i]);
    const double best_d = std::fabs(a - kE2m1Values[best]);
    if (d < best_d || (d == best_d && i % 2 == 0)) best = i;
  }
  return static_cast<uint8_t>((std::signbit(x) ? 8 : 0) | best);
}

// Nearest finite E4M3FN code by search over the 127 magnitudes; ties to the even code.
uint8_t e4m3_reference(float x) {
  const double a = std::fabs(static_cast<double>(x));
  int best = 0;
  for (int c = 1; c <= 0x7e; ++c) {
    const double d = std::fabs(a - fp4_e4m3_decode(static_cast<uint8_t>(c)));
    const double best_d = std::fabs(a - fp4_e4m3_decode(static_cast<uint8_t>(best)));
    if (d < best_d || (d == best_d && c % 2 == 0)) best = c;
  }
  return static_cast<uint8_t>((std::signbit(x) ? 0x80 : 0) | best);
}

// Normal values times a random power of two per row (2^-max_row_exp .. 2^max_row_exp), with
// exact zeros, negative zeros and E2M1 tie points sprinkled in: every branch of the encoder
// gets hit, and NVFP4 sees blocks whose scale underflows to 0.
std::vector<float> random_tensor(uint64_t seed, int64_t rows, int64_t cols, int max_row_exp = 20) {
  Rng rng(seed);
  std::vector<float> x(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    const float row_scale =
        std::ldexp(1.0f, static_cast<int>(rng.uniform_int(-max_row_exp, max_row_exp)));
    for (int64_t c = 0; c < cols; ++c) {
      float v = static_cast<float>(rng.normal()) * row_scale;
      const int64_t kind = rng.uniform_int(0, 19);
      if (kind == 0) v = 0.0f;
      if (kind == 1) v = -0.0f;
      if (kind == 2) v = 0.25f * static_cast<float>(rng.uniform_int(-24, 24)) * row_scale;
      x[static_cast<size_t>(r * cols + c)] = v;
    }
  }
  return x;
}

// ---- E2M1 ----

TEST(Fp4E2m1, EveryCodeDecodesAndRoundTrips) {
  for (int c = 0; c < 16; ++c) {
    const float v = fp4_e2m1_decode(static_cast<uint8_t>(c));
    const float want = (c & 8) ? -kE2m1Values[c & 7] : kE2m1Values[c & 7];
    EXPECT_EQ(bits(v), bits(want)) << "code " << c;  // bits: 0x8 must be -0.0, not +0.0
    EXPECT_EQ(fp4_e2m1_encode(v), c) << "value " << v;
  }
}

// The kernels' decoder (exponent and mantissa bits placed straight into a float) against
// fp4_decode_scaled, bit for bit: every code at every nibble position, times every MXFP4 scale
// (NaN included), NVFP4 multipliers (every E4M3 scale code times a few global scales, subnormal
// products among them), and zero.
TEST(Fp4E2m1, NibbleDecoderEqualsTheScalarDecoder) {
  std::vector<float> multipliers = {0.0f};
  for (int s = 0; s < 256; ++s) {
    multipliers.push_back(fp4_block_multiplier(Fp4Format::mxfp4, uint8_t(s), 1.0f));
  }
  for (const float global : {1.0f, 3.7e-3f, 1.0e-30f, 2.5e30f}) {
    for (int s = 0; s < 256; ++s) {
      multipliers.push_back(fp4_block_multiplier(Fp4Format::nvfp4, uint8_t(s), global));
    }
  }
  int compared = 0;
  for (const float multiplier : multipliers) {
    for (int code = 0; code < 16; ++code) {
      for (int i = 0; i < 8; ++i) {
        // The other nibbles hold other codes, so a decoder that leaks a neighbour's bits fails.
        const uint32_t word = (0x9e3779b9u & ~(15u << (4 * i))) | (uint32_t(code) << (4 * i));
        const float got = fp4_decode_nibble_scaled(word, i, multiplier);
        const float want = fp4_decode_scaled(uint8_t(code), multiplier);
        ASSERT_EQ(bits(got), bits(want)) << "code " << code << " nibble " << i << " multiplier "
                                         << multiplier;
        ++compared;
      }
    }
  }
  EXPECT_EQ(compared, int(multipliers.size()) * 16 * 8);
}

TEST(Fp4E2m1, TiesGoToTheEvenMantissa) {
  // tie -> the neighbour whose mantissa bit is 0
  const struct { float tie; uint8_t code; } ties[] = {
      {0.25f, 0},  // 0 | 0.5  -> 0
      {0.75f, 2},  // 0.5 | 1  -> 1
      {1.25f, 2},  // 1 | 1.5  -> 1
      {1.75f, 4},  // 1.5 | 2  -> 2
      {2.5f, 4},   // 2 | 3    -> 2
      {3.5f, 6},   // 3 | 4    -> 4
      {5.0f, 6},   // 4 | 6    -> 4
  };
  for (const auto& t : ties) {
    EXPECT_EQ(fp4_e2m1_encode(t.tie), t.code) << t.tie;
    EXPECT_EQ(fp4_e2m1_encode(-t.tie), t.code | 8) << -t.tie;
  }
}

TEST(Fp4E2m1, JustAboveAndBelowEachTie) {
  const float ties[] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};
  for (int i = 0; i < 7; ++i) {
    const float above = std::nextafter(ties[i], 100.0f);
    const float below = std::nextafter(ties[i], 0.0f);
    EXPECT_EQ(fp4_e2m1_encode(above), i + 1) << above;
    EXPECT_EQ(fp4_e2m1_encode(below), i) << below;
    EXPECT_EQ(fp4_e2m1_encode(-above), (i + 1) | 8) << -above;
    EXPECT_EQ(fp4_e2m1_encode(-below), i | 8) << -below;
  }
}

TEST(Fp4E2m1, SaturatesAtSix) {
  const float inf = std::numeric_limits<float>::infinity();
  for (float x : {6.0f, std::nextafter(6.0f, 7.0f), 7.0f, 100.0f, 1e30f, inf}) {
    EXPECT_EQ(fp4_e2m1_encode(x), 7) << x;
    EXPECT_EQ(fp4_e2m1_encode(-x), 15) << -x;
  }
}

TEST(Fp4E2m1, ZeroKeepsItsSign) {
  EXPECT_EQ(fp4_e2m1_encode(0.0f), 0);
  EXPECT_EQ(fp4_e2m1_encode(-0.0f), 8);
  EXPECT_EQ(fp4_e2m1_encode(-0.1f), 8);  // rounds to zero from below: -0
  EXPECT_EQ(fp4_e2m1_encode(1e-40f), 0);
  EXPECT_TRUE(std::signbit(fp4_e2m1_decode(8)));
  EXPECT_EQ(fp4_e2m1_decode(8), 0.0f);
  // The scalar encoder is total: NaN becomes a zero (the tensor API refuses NaN first).
  EXPECT_EQ(fp4_e2m1_encode(std::numeric_limits<float>::quiet_NaN()) & 7, 0);
}

TEST(Fp4E2m1, MatchesTheNearestValueSearch) {
  Rng rng(11);
  for (int i = 0; i < 200000; ++i) {
    const float x = static_cast<float>((rng.uniform() * 2.0 - 1.0) * 8.0);
    ASSERT_EQ(fp4_e2m1_encode(x), e2m1_reference(x)) << x;
  }
}

// ---- E4M3FN ----

TEST(Fp4E4m3, EveryFiniteCodeRoundTrips) {
  for (int c = 0; c < 256; ++c) {
    const auto code = static_cast<uint8_t>(c);
    const float v = fp4_e4m3_decode(code);
    if ((c & 0x7f) == 0x7f) {
      EXPECT_TRUE(std::isnan(v)) << c;
      EXPECT_EQ(fp4_e4m3_encode(v) & 0x7f, 0x7f);
      continue;
    }
    EXPECT_FALSE(std::isnan(v)) << c;
    EXPECT_EQ(fp4_e4m3_encode(v), code) << "code " << c << " value " << v;
  }
  EXPECT_EQ(fp4_e4m3_decode(0x7e), 448.0f);
  EXPECT_EQ(fp4_e4m3_decode(0x38), 1.0f);
  EXPECT_EQ(fp4_e4m3_decode(0x08), 0x1p-6f);  // smallest normal
  EXPECT_EQ(fp4_e4m3_decode(0x07), 7 * 0x1p-9f);  // largest subnormal
  EXPECT_EQ(fp4_e4m3_decode(0x01), 0x1p-9f);  // smallest subnormal
  EXPECT_EQ(bits(fp4_e4m3_decode(0x80)), bits(-0.0f));
}

TEST(Fp4E4m3, TiesGoToEvenAndLargeValuesSaturate) {
  EXPECT_EQ(fp4_e4m3_encode(1.0625f), 0x38);          // 1 | 1.125 -> 1 (mantissa 000)
  EXPECT_EQ(fp4_e4m3_encode(1.1875f), 0x3a);          // 1.125 | 1.25 -> 1.25 (010)
  EXPECT_EQ(fp4_e4m3_encode(0x1p-10f), 0x00);         // 0 | 2^-9 -> 0
  EXPECT_EQ(fp4_e4m3_encode(3 * 0x1p-10f), 0x02);     // 1 | 2 units of 2^-9 -> 2
  EXPECT_EQ(fp4_e4m3_encode(15 * 0x1p-10f), 0x08);    // largest subnormal | 2^-6 -> 2^-6
  EXPECT_EQ(fp4_e4m3_encode(std::nextafter(0x1p-10f, 1.0f)), 0x01);
  EXPECT_EQ(fp4_e4m3_encode(1e-30f), 0x00);
  EXPECT_EQ(fp4_e4m3_encode(-1e-30f), 0x80);
  const float inf = std::numeric_limits<float>::infinity();
  for (float x : {448.0f, 449.0f, 464.0f, 500.0f, 1e30f, inf}) {
    EXPECT_EQ(fp4_e4m3_encode(x), 0x7e) << x;
    EXPECT_EQ(fp4_e4m3_encode(-x), 0xfe) << -x;
  }
  EXPECT_EQ(fp4_e4m3_encode(std::numeric_limits<float>::quiet_NaN()) & 0x7f, 0x7f);
}

TEST(Fp4E4m3, MatchesTheNearestValueSearch) {
  Rng rng(12);
  std::vector<float> xs;
  // Every midpoint between neighbouring codes, and one ulp either side of it.
  for (int c = 0; c < 0x7e; ++c) {
    const float mid = (fp4_e4m3_decode(static_cast<uint8_t>(c)) +
                       fp4_e4m3_decode(static_cast<uint8_t>(c + 1))) / 2;  // exact in float
    xs.insert(xs.end(), {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1000.0f)});
  }
  for (int i = 0; i < 20000; ++i) {
    const int exponent = static_cast<int>(rng.uniform_int(-14, 9));
    xs.push_back(static_cast<float>(std::ldexp(rng.uniform(), exponent)));
  }
  for (float x : xs) {
    ASSERT_EQ(fp4_e4m3_encode(x), e4m3_reference(x)) << x;
    ASSERT_EQ(fp4_e4m3_encode(-x), e4m3_reference(-x)) << -x;
  }
}

// ---- MXFP4 ----

// One MXFP4 row of 32 values: fill, then quantize.
Fp4Tensor mx_block(const std::vector<float>& x) {
  return fp4_quantize(x.data(), 1, static_cast<int64_t>(x.size()), Fp4Format::mxfp4, "block");
}

TEST(Fp4Mx, ScaleIsFloorLog2OfAmaxMinusTwo) {
  Rng rng(13);
  for (int i = 0; i < 2000; ++i) {
    std::vector<float> x(32);
    const int e = static_cast<int>(rng.uniform_int(-120, 120));
    for (float& v : x) v = static_cast<float>(std::ldexp(rng.normal(), e));
    float amax = 0.0f;
    for (float v : x) amax = std::max(amax, std::fabs(v));
    const Fp4Tensor t = mx_block(x);
    const int want = std::ilogb(amax) - 2;  // floor(log2(amax)) - emax(E2M1)
    ASSERT_EQ(static_cast<int>(t.scales[0]) - 127, want) << "amax " << amax;
    EXPECT_EQ(t.global_scale, 1.0f);
  }
}

TEST(Fp4Mx, AllZeroBlockGetsTheSmallestScale) {
  std::vector<float> x(32, 0.0f);
  x[3] = -0.0f;
  const Fp4Tensor t = mx_block(x);
  EXPECT_EQ(t.scales[0], 0);  // 2^-127
  std::vector<float> out(32, 1.0f);
  fp4_dequantize(t, out.data());
  for (int i = 0; i < 32; ++i) EXPECT_EQ(bits(out[i]), bits(x[i])) << i;  // -0 stays -0
}

TEST(Fp4Mx, PackedLayoutAndExactTies) {
  // amax 4 -> scale 2^0, so values are encoded as they are: the scalar tie rules hold.
  std::vector<float> x = {0.5f, 1.0f, 0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f, 4.0f};
  x.resize(32, 0.0f);
  const Fp4Tensor t = mx_block(x);
  ASSERT_EQ(t.scales[0], 127);
  ASSERT_EQ(t.codes.size(), 16u);
  EXPECT_EQ(t.codes[0], 0x21);  // 0.5 (code 1) low nibble, 1.0 (code 2) high nibble
  EXPECT_EQ(t.codes[1], 0x20);  // 0.25 -> 0, 0.75 -> 1.0
  EXPECT_EQ(t.codes[2], 0x42);  // 1.25 -> 1.0, 1.75 -> 2.0
  EXPECT_EQ(t.codes[3], 0x64);  // 2.5 -> 2.0, 3.5 -> 4.0
  EXPECT_EQ(t.codes[4], 0x66);  // 5 -> 4.0, 4.0
}

TEST(Fp4Mx, OneHugeValueAmongTinyOnes) {
  std::vector<float> x(32, 1e-3f);
  x[7] = -1000.0f;  // floor(log2(1000)) = 9 -> scale 2^7; 1000 / 128 = 7.8 saturates to 6
  const Fp4Tensor t = mx_block(x);
  EXPECT_EQ(t.scales[0], 127 + 7);
  std::vector<float> out(32);
  fp4_dequantize(t, out.data());
  EXPECT_EQ(out[7], -768.0f);
  for (int i = 0; i < 32; ++i) {
    if (i == 7) continue;
    EXPECT_EQ(bits(out[i]), bits(0.0f)) << i;  // 1e-3 / 128 << 0.25
  }
}

TEST(Fp4Mx, SubnormalRange) {
  // 2^-128 is a float subnormal. Its exponent -128 - 2 clamps to E8M0's -127, and
  // 2^-128 / 2^-127 = 0.5 is an E2M1 value: the round trip is exact.
  std::vector<float> x(32, 0x1p-128f);
  x[1] = -0x1p-128f;
  Fp4Tensor t = mx_block(x);
  EXPECT_EQ(t.scales[0], 0);
  std::vector<float> out(32);
  fp4_dequantize(t, out.data());
  for (int i = 0; i < 32; ++i) EXPECT_EQ(bits(out[i]), bits(x[i])) << i;
  // 1e-40 / 2^-127 = 0.017 < 0.25: below 2^-129 MXFP4 flushes to (signed) zero.
  std::vector<float> y(32, 1e-40f);
  y[2] = -1e-40f;
  t = mx_block(y);
  EXPECT_EQ(t.scales[0], 0);
  fp4_dequantize(t, out.data());
  for (int i = 0; i < 32; ++i) EXPECT_EQ(bits(out[i]), bits(i == 2 ? -0.0f : 0.0f)) << i;
  // The largest finite float: exponent 127 - 2.
  std::vector<float> z(32, std::numeric_limits<float>::max());
  EXPECT_EQ(mx_block(z).scales[0], 127 + 125);
}

// ---- NVFP4 ----

TEST(Fp4Nv, GlobalScaleIsAmaxOverSixTimes448) {
  std::vector<float> x = random_tensor(21, 4, 64);
  float amax = 0.0f;
  for (float v : x) amax = std::max(amax, std::fabs(v));
  const Fp4Tensor t = fp4_quantize(x.data(), 4, 64, Fp4Format::nvfp4, "w");
  EXPECT_EQ(bits(t.global_scale), bits(amax / 2688.0f));
  // The block holding the tensor amax gets E4M3's largest scale, 448.
  int saw_448 = 0;
  for (uint8_t s : t.scales) saw_448 += s == 0x7e;
  EXPECT_GE(saw_448, 1);
  // Each block: E4M3(amax_block / 6 / global).
  for (int64_t b = 0; b < 16; ++b) {
    float block_amax = 0.0f;
    for (int i = 0; i < 16; ++i) block_amax = std::max(block_amax, std::fabs(x[b * 16 + i]));
    EXPECT_EQ(t.scales[b], fp4_e4m3_encode(block_amax / 6.0f / t.global_scale)) << b;
  }
}

TEST(Fp4Nv, AllZeroTensor) {
  std::vector<float> x(32, 0.0f);
  x[5] = -0.0f;
  const Fp4Tensor t = fp4_quantize(x.data(), 2, 16, Fp4Format::nvfp4, "zeros");
  EXPECT_EQ(t.global_scale, 1.0f);
  for (uint8_t s : t.scales) EXPECT_EQ(s, 0);
  std::vector<float> out(32, 1.0f);
  fp4_dequantize(t, out.data());
  for (int i = 0; i < 32; ++i) EXPECT_EQ(bits(out[i]), bits(x[i])) << i;
}

TEST(Fp4Nv, OneHugeValueAndABlockWhoseScaleUnderflows) {
  std::vector<float> x(32, 1e-3f);
  x[4] = 1000.0f;                                  // block 0: the tensor amax
  for (int i = 16; i < 32; ++i) x[i] = -1e-7f;     // block 1: 1e-7 / 6 / (1000 / 2688) < 2^-10
  const Fp4Tensor t = fp4_quantize(x.data(), 1, 32, Fp4Format::nvfp4, "w");
  EXPECT_EQ(t.scales[0], 0x7e);
  EXPECT_EQ(t.scales[1], 0x00);  // rounds to a zero scale: the block becomes signed zeros
  std::vector<float> out(32);
  fp4_dequantize(t, out.data());
  EXPECT_NEAR(out[4], 1000.0f, 1e-3f);  // 6 * 448 * (1000 / 2688), one rounding each way
  EXPECT_EQ(bits(out[0]), bits(0.0f));  // 1e-3 / (1000 / 6) << 0.25
  for (int i = 16; i < 32; ++i) EXPECT_EQ(bits(out[i]), bits(-0.0f)) << i;
}

TEST(Fp4Nv, SubnormalRangeKeepsTheGlobalScaleNormal) {
  // amax / 2688 would be a float subnormal: the global scale is held at 2^-126.
  std::vector<float> x(16, 1e-40f);
  x[3] = -5e-41f;
  const Fp4Tensor t = fp4_quantize(x.data(), 1, 16, Fp4Format::nvfp4, "tiny");
  EXPECT_EQ(t.global_scale, 0x1p-126f);
  // 1e-40 / 6 / 2^-126 = 1.4e-3 -> E4M3 2^-9 (code 1); values 1e-40 / 2^-135 = 4.4 -> 4.
  EXPECT_EQ(t.scales[0], 0x01);
  std::vector<float> out(16);
  fp4_dequantize(t, out.data());
  EXPECT_EQ(out[0], 4 * 0x1p-135f);
  EXPECT_EQ(out[3], -2 * 0x1p-135f);  // 5e-41 / 2^-135 = 2.2 -> 2
  // Still within the bound: half a step (1 at 4) of the 2^-135 scale.
  EXPECT_LE(std::fabs(out[0] - x[0]), 0x1p-135f);
}

// ---- Both formats ----

TEST(Fp4, FakeQuantizeEqualsDequantizeOfQuantizeBitwise) {
  const struct {
    int64_t rows, cols;
  } shapes[] = {{1, 32}, {3, 64}, {17, 96}, {64, 256}, {300, 320}};
  uint64_t seed = 100;
  for (Fp4Format format : kFormats) {
    for (const auto& s : shapes) {
      std::vector<float> x = random_tensor(++seed, s.rows, s.cols);
      x[0] = 1e-41f;  // a subnormal input
      const Fp4Tensor t = fp4_quantize(x.data(), s.rows, s.cols, format, "w");
      std::vector<float> dq(x.size()), fq(x.size());
      fp4_dequantize(t, dq.data());
      fp4_fake_quantize(x.data(), fq.data(), s.rows, s.cols, format, "w");
      for (size_t i = 0; i < x.size(); ++i) {
        ASSERT_EQ(bits(fq[i]), bits(dq[i]))
            << fp4_format_name(format) << " [" << s.rows << ", " << s.cols
            << "] first mismatch at [" << i / s.cols << ", " << i % s.cols << "] x=" << x[i];
      }
      // In place gives the same.
      fp4_fake_quantize(x.data(), x.data(), s.rows, s.cols, format, "w");
      ASSERT_EQ(std::memcmp(x.data(), fq.data(), x.size() * sizeof(float)), 0);
    }
  }
}

// The error bound, per value, with m the block's multiplier (fp4_block_multiplier) and
// v = x / m: if |v| <= 6 then |x - q(x)| <= m * step(|v|) / 2, where step is the E2M1 spacing
// of v's interval (0.5 below 2, 1 below 4, 2 up to 6). MXFP4's m is a power of two, so every
// operation is exact and the bound holds with no slack. NVFP4 rounds twice (x / m and
// code * m, each within 2^-24 relative), hence a slack of 2^-23 (|x| + |q|). Rows span 2^+-4
// here so that few NVFP4 block scales underflow to 0 (those blocks decode to signed zeros).
TEST(Fp4, QuantizationErrorBound) {
  for (Fp4Format format : kFormats) {
    const int block = fp4_block_size(format);
    std::vector<float> x = random_tensor(format == Fp4Format::mxfp4 ? 31 : 32, 64, 512, 4);
    const Fp4Tensor t = fp4_quantize(x.data(), 64, 512, format, "w");
    std::vector<float> q(x.size());
    fp4_dequantize(t, q.data());
    int64_t checked = 0, saturated = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      const float m = fp4_block_multiplier(format, t.scales[i / block], t.global_scale);
      if (m == 0.0f) {
        ASSERT_EQ(bits(q[i]), bits(x[i]) & 0x80000000u) << i;
        continue;
      }
      const float v = std::fabs(x[i] / m);
      const double err = std::fabs(static_cast<double>(x[i]) - q[i]);
      if (v > 6.0f) {  // saturated: decodes to +-6 m
        ++saturated;
        ASSERT_EQ(std::fabs(q[i]), 6.0f * m) << i;
        continue;
      }
      const double step = v < 2.0f ? 0.5 : v < 4.0f ? 1.0 : 2.0;
      double bound = m * step / 2;
      if (format == Fp4Format::nvfp4) bound += 0x1p-23 * (std::fabs(x[i]) + std::fabs(q[i]));
      ASSERT_LE(err, bound) << fp4_format_name(format) << " index " << i << " x=" << x[i];
      ++checked;
    }
    EXPECT_GT(checked, static_cast<int64_t>(x.size() * 9 / 10));
    // NVFP4 scales to amax / 6, so only E4M3 rounding of the scale can push a value past 6.
    if (format == Fp4Format::mxfp4) {
      EXPECT_GT(saturated, 0);
    }
  }
}

TEST(Fp4, RowAndBlockDecodersMatchTheFullDequantize) {
  for (Fp4Format format : kFormats) {
    std::vector<float> x = random_tensor(41, 5, 128);
    const Fp4Tensor t = fp4_quantize(x.data(), 5, 128, format, "w");
    std::vector<float> full(x.size()), row(128), part(64);
    fp4_dequantize(t, full.data());
    for (int64_t r = 0; r < 5; ++r) {
      fp4_dequantize_row(t, r, row.data());
      ASSERT_EQ(std::memcmp(row.data(), full.data() + r * 128, 128 * sizeof(float)), 0) << r;
    }
    // Columns 64..127 of row 2: a block-aligned slice.
    const int block = fp4_block_size(format);
    const int64_t start = 2 * 128 + 64;
    fp4_dequantize_blocks(format, t.codes.data() + start / 2, t.scales.data() + start / block,
                          t.global_scale, 64, part.data());
    ASSERT_EQ(std::memcmp(part.data(), full.data() + start, 64 * sizeof(float)), 0);
  }
}

TEST(Fp4, NanAndInfAreErrorsNamingTensorAndIndex) {
  for (Fp4Format format : kFormats) {
    std::vector<float> x(4 * 32, 1.0f);
    x[2 * 32 + 5] = std::numeric_limits<float>::quiet_NaN();
    x[3 * 32] = std::numeric_limits<float>::infinity();  // after the NaN: the NaN is reported
    std::vector<float> out(x.size());
    std::string msg = error_message(
        [&] { fp4_quantize(x.data(), 4, 32, format, "layers.3.experts.7.w1"); });
    EXPECT_CONTAINS(msg, "layers.3.experts.7.w1");
    EXPECT_CONTAINS(msg, "nan");
    EXPECT_CONTAINS(msg, "[2, 5]");
    msg = error_message(
        [&] { fp4_fake_quantize(x.data(), out.data(), 4, 32, format, "w2"); });
    EXPECT_CONTAINS(msg, "w2");
    EXPECT_CONTAINS(msg, "[2, 5]");
    x[2 * 32 + 5] = 1.0f;
    x[3 * 32] = -std::numeric_limits<float>::infinity();
    msg = error_message([&] { fp4_quantize(x.data(), 4, 32, format, "w3"); });
    EXPECT_CONTAINS(msg, "-inf");
    EXPECT_CONTAINS(msg, "[3, 0]");
  }
}

TEST(Fp4, ColumnsNotAMultipleOfTheBlockAreErrors) {
  std::vector<float> x(96, 1.0f);
  std::string msg = error_message([&] { fp4_quantize(x.data(), 2, 48, Fp4Format::mxfp4, "wq"); });
  EXPECT_CONTAINS(msg, "wq");
  EXPECT_CONTAINS(msg, "48 columns");
  EXPECT_CONTAINS(msg, "32");
  msg = error_message([&] { fp4_quantize(x.data(), 4, 24, Fp4Format::nvfp4, "wk"); });
  EXPECT_CONTAINS(msg, "24 columns");
  EXPECT_CONTAINS(msg, "16");
  std::vector<float> out(96);
  msg = error_message(
      [&] { fp4_fake_quantize(x.data(), out.data(), 2, 48, Fp4Format::mxfp4, "wv"); });
  EXPECT_CONTAINS(msg, "wv");
  // 48 columns are fine for NVFP4.
  EXPECT_NO_THROW(fp4_quantize(x.data(), 2, 48, Fp4Format::nvfp4, "ok"));
}

TEST(Fp4, PackedTensorThatDisagreesWithItsShapeIsAnError) {
  std::vector<float> x(64, 1.0f);
  Fp4Tensor t = fp4_quantize(x.data(), 2, 32, Fp4Format::mxfp4, "w");
  t.scales.pop_back();
  std::vector<float> out(64);
  const std::string msg = error_message([&] { fp4_dequantize(t, out.data()); });
  EXPECT_CONTAINS(msg, "1 scales");
}

TEST(Fp4, FormatNamesAndBitsPerValue) {
  EXPECT_EQ(fp4_format_from_name("mxfp4"), Fp4Format::mxfp4);
  EXPECT_EQ(fp4_format_from_name("nvfp4"), Fp4Format::nvfp4);
  EXPECT_CONTAINS(error_message([] { fp4_format_from_name("fp4"); }), "'fp4'");
  EXPECT_CONTAINS(error_message([] { fp4_format_from_name("MXFP4"); }), "mxfp4 or nvfp4");
  for (Fp4Format format : kFormats) {
    EXPECT_EQ(fp4_format_from_name(fp4_format_name(format)), format);
  }
  EXPECT_EQ(fp4_bits_per_value(Fp4Format::mxfp4), 4.25);
  EXPECT_EQ(fp4_bits_per_value(Fp4Format::nvfp4), 4.5);
  // And the buffers really are that size.
  std::vector<float> x(64 * 128, 1.0f);
  for (Fp4Format format : kFormats) {
    const Fp4Tensor t = fp4_quantize(x.data(), 64, 128, format, "w");
    EXPECT_EQ(static_cast<double>(t.codes.size() + t.scales.size()) * 8 / x.size(),
              fp4_bits_per_value(format));
  }
}

}  // namespace
}  // namespace rlhf
