#pragma once
// A small, fully specified random number generator (xoshiro256**, seeded by splitmix64).
// We do not use <random> distributions: their output is implementation-defined, and exact
// resume and deterministic task generators need the same numbers on every platform.
#include <array>
#include <cmath>
#include <cstdint>
#include <string>

namespace rlhf {

inline uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Mixes several words into one seed, e.g. (base seed, stream id, example index).
inline uint64_t mix_seed(uint64_t a, uint64_t b, uint64_t c = 0) {
  uint64_t s = a;
  uint64_t h = splitmix64(s) ^ b;
  h = splitmix64(h) ^ c;
  return splitmix64(h);
}

class Rng {
 public:
  explicit Rng(uint64_t seed = 0) { reseed(seed); }

  void reseed(uint64_t seed) {
    uint64_t s = seed;
    for (auto& word : state_) word = splitmix64(s);
    has_spare_normal_ = false;
  }

  uint64_t next_u64() {
    const uint64_t result = rotl(state_[1] * 5, 7) * 9;
    const uint64_t t = state_[1] << 17;
    state_[2] ^= state_[0];
    state_[3] ^= state_[1];
    state_[1] ^= state_[2];
    state_[0] ^= state_[3];
    state_[2] ^= t;
    state_[3] = rotl(state_[3], 45);
    return result;
  }

  // Uniform in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }

  // Uniform integer in [lo, hi] (inclusive). Bias is below 2^-40 for the ranges we use.
  int64_t uniform_int(int64_t lo, int64_t hi) {
    const uint64_t span = static_cast<uint64_t>(hi - lo) + 1;
    return lo + static_cast<int64_t>(next_u64() % span);
  }

  // Standard normal (Box-Muller, keeping the second value for the next call).
  double normal() {
    if (has_spare_normal_) {
      has_spare_normal_ = false;
      return spare_normal_;
    }
    double u1 = uniform();
    while (u1 <= 0.0) u1 = uniform();
    const double u2 = uniform();
    const double r = std::sqrt(-2.0 * std::log(u1));
    spare_normal_ = r * std::sin(2.0 * M_PI * u2);
    has_spare_normal_ = true;
    return r * std::cos(2.0 * M_PI * u2);
  }

  // Serialized state for exact resume: "s0 s1 s2 s3 spare_flag spare_bits".
  std::string serialize() const;
  void deserialize(const std::string& text);  // throws rlhf::Error on malformed text

 private:
  static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  std::array<uint64_t, 4> state_{};
  bool has_spare_normal_ = false;
  double spare_normal_ = 0.0;
};

}  // namespace rlhf
