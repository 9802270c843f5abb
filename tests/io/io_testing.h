// Helpers for the I/O and data tests: a temporary folder removed afterwards,
// and the text of a thrown c10::Error.
#pragma once

#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

namespace remat_io_test {

/// A fresh folder under the system's temporary folder, removed with its
/// content.
class TempDir {
 public:
  TempDir() {
    std::string pattern =
        (std::filesystem::temp_directory_path() / "remat-io-XXXXXX").string();
    const char* made = ::mkdtemp(&pattern[0]);
    EXPECT_NE(made, nullptr);
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const {
    return path_;
  }
  std::string file(const std::string& name) const {
    return path_ + "/" + name;
  }

 private:
  std::string path_;
};

inline void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

/// The message of what `f` throws (c10::Error without backtrace), or
/// "<nothing thrown>".
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    return std::string("<not a c10::Error> ") + e.what();
  }
  return "<nothing thrown>";
}

} // namespace remat_io_test

/// Expects `stmt` to throw a c10::Error whose message contains `text`.
#define EXPECT_ERROR_CONTAINS(stmt, text)                               \
  do {                                                                  \
    const std::string remat_io_message_ =                               \
        ::remat_io_test::error_of([&] { stmt; });                       \
    EXPECT_NE(remat_io_message_.find(text), std::string::npos)          \
        << "expected an error containing \"" << (text) << "\", got: \"" \
        << remat_io_message_ << "\"";                                   \
  } while (0)
