// One test binary for the whole suite. Tests whose name ends in _CUDA need a
// GPU; without one they are filtered out, so CPU-only CI runs the rest.
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include "remat/memory.h"

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (!torch::cuda::is_available()) {
    auto& filter = ::testing::GTEST_FLAG(filter);
    filter += (filter.find('-') == std::string::npos ? "-" : ":");
    filter += "*_CUDA";
  }
  // Count every CPU byte from the start, as the CLI does.
  remat::memory::install();
  return RUN_ALL_TESTS();
}
