// A small random generator whose output is fixed by its seed on every
// platform (the standard library's distributions and std::shuffle are not),
// for data shuffling and generated data sets.
#pragma once

#include <cstdint>

namespace remat {
namespace train {
namespace detail {

/// splitmix64 (Steele, Lea, Flood 2014).
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  /// Uniform in [0, n), without modulo bias; n > 0.
  uint64_t below(uint64_t n) {
    const uint64_t threshold = (0 - n) % n;
    for (;;) {
      uint64_t r = next();
      if (r >= threshold) {
        return r % n;
      }
    }
  }
  /// Uniform in [0, 1) with 53 random bits.
  double uniform() {
    return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0);
  }
  bool chance(double p) {
    return uniform() < p;
  }

 private:
  uint64_t state_;
};

} // namespace detail
} // namespace train
} // namespace remat
