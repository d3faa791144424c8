#pragma once
// exp() that vectorizes. GCC turns std::exp in a loop into one scalar libm call per element
// (glibc's vector expf is only declared under -ffast-math), which made the SwiGLU, softmax and
// sigmoid loops a fifth of a CPU training step. This float version uses only arithmetic and
// bit operations, so the loops around it vectorize; its relative error is below 2e-7 (about
// one float ulp) over the whole clamped range, checked against std::exp in test_cpu_ops.
// The double instantiation stays std::exp: doubles are the reference for gradient checks.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

namespace rlhf {

inline float fast_expf(float x) {
  // Below -87.3 the result is under FLT_MIN; above 88.7 it overflows.
  x = std::min(std::max(x, -87.3f), 88.7f);
  // x = n ln2 + r with |r| <= ln2/2; ln2 split in two so n*ln2 is exact in the first part.
  // n = round(x / ln2) by adding and subtracting 1.5 * 2^23: plain arithmetic, which
  // vectorizes (std::floor/nearbyint do not without -fno-trapping-math).
  constexpr float kRoundMagic = 12582912.0f;
  const float n = (x * 1.44269504088896341f + kRoundMagic) - kRoundMagic;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  // Cephes' minimax polynomial for e^r on [-ln2/2, ln2/2].
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n through the exponent bits; n is in [-126, 128) after the clamp. n = 128 only for
  // x in [88.38, 88.7], where 2^127 * p(r) with r < 0 stays finite: split the scaling in two.
  const int32_t e = static_cast<int32_t>(n);
  const float half = std::bit_cast<float>((e / 2 + 127) << 23);
  const float rest = std::bit_cast<float>((e - e / 2 + 127) << 23);
  return p * half * rest;
}

template <typename T>
inline T exp_fast(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return fast_expf(x);
  } else {
    return std::exp(x);
  }
}

}  // namespace rlhf
