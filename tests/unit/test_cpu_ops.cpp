// CPU-backend details the gradient checks do not cover: the vectorizable exp, and that the
// float ops agree with the double reference on fresh random inputs.
#include <cmath>
#include <limits>

#include <gtest/gtest.h>

#include "common/rng.h"
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

}  // namespace
}  // namespace rlhf
