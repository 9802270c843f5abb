// One test binary for the whole suite. Tests that need a GPU call
// REMAT_REQUIRE_CUDA() (testing.h) and are reported as skipped, with the
// reason, where there is none.
#include <gtest/gtest.h>

#include "remat/memory.h"

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  // Count every CPU byte from the start, as the CLI does.
  remat::memory::install();
  return RUN_ALL_TESTS();
}
