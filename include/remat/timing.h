// The statistic remat reports for repeated timings: the median, so that one
// step slowed by a noisy neighbour does not move the figure.
//
// Example:
//   double s = remat::median({0.51, 0.49, 0.93});   // 0.51 (seconds)
#pragma once

#include <algorithm>
#include <vector>

namespace remat {

/// The median of `samples` (the mean of the middle two for an even count);
/// 0 for none. Units are the samples'.
inline double median(std::vector<double> samples) {
  if (samples.empty()) {
    return 0;
  }
  std::sort(samples.begin(), samples.end());
  const size_t n = samples.size();
  return n % 2 ? samples[n / 2] : 0.5 * (samples[n / 2 - 1] + samples[n / 2]);
}

} // namespace remat
