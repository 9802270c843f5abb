// A fresh folder for a test that writes files.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <string>

namespace remat_test {

/// ::testing::TempDir() + "/" + name, emptied of what an earlier run left:
/// nothing is there afterwards, or, with `create`, an empty folder.
inline std::string fresh_temp_dir(const std::string& name, bool create) {
  const auto dir = ::testing::TempDir() + "/" + name;
  std::filesystem::remove_all(dir);
  if (create) {
    std::filesystem::create_directories(dir);
  }
  return dir;
}

} // namespace remat_test
