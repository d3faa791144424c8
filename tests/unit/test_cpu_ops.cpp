// CPU-backend details the gradient checks do not cover: the vectorizable exp, the gradient
// norm's sum and the AdamW update, each against a higher-precision reference on fresh random
// inputs.
#include <cmath>
#include <limits>
#include <vector>

#include <gtest/gtest.h>

#include "common/rng.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/fast_exp.h"

namespace rlhf {
namespace {

TEST(FastExp, WithinTwoUlpOfStdExpAcrossTheRange) {
  // 2.5e-7 relative: std::expf itself is correctly rounded to within 1 ulp (6e-8), the
  // polynomial's error is ~1e-7, and float rounding in the evaluation adds about one more ulp.
  Rng rng(1);
  double worst = 0;
  for (int i = 0; i < 200000; ++i) {
    const float x = float(rng.uniform() * 175.0 - 87.3);
    const double exact = std::exp(double(x));
    const double rel = std::abs(double(fast_expf(x)) - exact) / exact;
    worst = std::max(worst, rel);
  }
  EXPECT_LT(worst, 2.5e-7);
  EXPECT_EQ(fast_expf(0.0f), 1.0f);
  EXPECT_TRUE(std::isfinite(fast_expf(88.7f)));
  EXPECT_TRUE(std::isfinite(fast_expf(1000.0f)));  // clamped, not inf
  EXPECT_GE(fast_expf(-1000.0f), 0.0f);
  EXPECT_LT(fast_expf(-1000.0f), 1e-37f);
}


TEST(CpuOps, SumSquaresMatchesALongDoubleSum) {
  // The sum runs in eight interleaved double chains per thread. Each term is exact in double
  // (a float squared has at most 48 significant bits), so the only error is the double
  // additions' rounding: about n * 1.1e-16 relative at worst, 1e-12 for these sizes with room.
  CpuOps<float> ops;
  Rng rng(7);
  for (int64_t n : {1, 7, 8, 9, 1000, 100003}) {  // below, at and past the 8-wide step; a tail
    std::vector<float> x(static_cast<size_t>(n));
    for (float& v : x) v = float(rng.normal() * 3.0);
    long double exact = 0;
    for (float v : x) exact += (long double)v * (long double)v;
    const double got = ops.sum_squares(x.data(), n);
    EXPECT_NEAR(got, double(exact), 1e-12 * double(exact)) << "n = " << n;
  }
}

TEST(CpuOps, AdamWStepMatchesADoubleReference) {
  // One AdamW step on fresh random state, against the same formula in double from the same
  // float inputs and the float-rounded betas. The float path rounds m, v and the update a few
  // times (each 6e-8 relative), so each agrees to 1e-6 of the sizes that meet in it (m's two
  // terms; v; |param| and lr times the normalized step).
  CpuOps<float> ops;
  Rng rng(11);
  const int64_t n = 1003;  // not a multiple of the vector width: the tail runs too
  std::vector<float> param(n), grad(n), m(n), v(n);
  for (int64_t i = 0; i < n; ++i) {
    param[i] = float(rng.normal());
    grad[i] = float(rng.normal() * 0.1);
    m[i] = float(rng.normal() * 0.05);
    v[i] = float(rng.uniform() * 0.01 + 1e-6);
  }
  AdamWHyper h;
  h.lr = 1.5e-3;
  h.weight_decay = 0.1;
  h.step = 37;
  const std::vector<float> param0 = param, m0 = m, v0 = v;
  ops.adamw_step(param.data(), grad.data(), m.data(), v.data(), n, h);

  const double b1 = float(h.beta1), b2 = float(h.beta2);
  const double c1 = 1.0 - std::pow(h.beta1, double(h.step));
  const double c2 = 1.0 - std::pow(h.beta2, double(h.step));
  for (int64_t i = 0; i < n; ++i) {
    const double g = grad[i];
    const double m_ref = b1 * m0[i] + (1.0 - b1) * g;
    const double v_ref = b2 * v0[i] + (1.0 - b2) * g * g;
    const double step = (m_ref / c1) / (std::sqrt(v_ref / c2) + float(h.eps));
    const double p_ref = param0[i] - h.lr * (step + h.weight_decay * param0[i]);
    // m's two terms can nearly cancel, so its rounding is relative to their sizes, and the
    // step inherits that through m.
    const double m_size = std::abs(b1 * m0[i]) + std::abs((1.0 - b1) * g);
    const double step_size = (m_size / c1) / (std::sqrt(v_ref / c2) + float(h.eps));
    ASSERT_NEAR(m[i], m_ref, 1e-6 * m_size) << "m at " << i;
    ASSERT_NEAR(v[i], v_ref, 1e-6 * v_ref) << "v at " << i;
    ASSERT_NEAR(param[i], p_ref, 1e-6 * (std::abs(param0[i]) + h.lr * step_size))
        << "param at " << i;
  }
}

}  // namespace
}  // namespace rlhf
