// Helpers for the I/O and data tests: a temporary folder removed afterwards,
// and the text of a thrown c10::Error.
#pragma once

#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <cstdio>
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

/// How a Python reference script ended and what it printed.
struct ScriptRun {
  bool skipped = false;    ///< it cannot run here (REMAT_PYTHON lacks a package)
  std::string skip_reason; ///< the script's "SKIP: ..." line
  int status = -1;         ///< exit code; -1: killed or not started
  std::string output;      ///< stdout and stderr together
};

/// Runs tests/io/`script` with REMAT_PYTHON (the test binary's), passing
/// `args`. A script that exits 77 after printing "SKIP: why" is skipped.
inline ScriptRun run_python_script(const std::string& script, const std::string& args) {
  ScriptRun r;
  const std::string command = std::string(REMAT_PYTHON) + " " + REMAT_SOURCE_DIR +
      "/tests/io/" + script + " " + args + " 2>&1";
  FILE* pipe = ::popen(command.c_str(), "r");
  if (!pipe) {
    r.output = "popen failed";
    return r;
  }
  char buffer[4096];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof buffer, pipe)) > 0) {
    r.output.append(buffer, n);
  }
  const int raw = ::pclose(pipe);
  r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  const auto skip = r.output.find("SKIP: ");
  if (r.status == 77 && skip != std::string::npos) {
    r.skipped = true;
    r.skip_reason = r.output.substr(skip + 6);
    while (!r.skip_reason.empty() && r.skip_reason.back() == '\n') {
      r.skip_reason.pop_back();
    }
  }
  return r;
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
