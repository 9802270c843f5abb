// What the libFuzzer harnesses in fuzz/ share: the input as a file, for the
// readers that take a path, and the one rule for what a reader may throw.
#pragma once

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include <unistd.h>

namespace remat_fuzz {

/// A file of this process (in /dev/shm where there is one: no disk writes
/// per input), overwritten with `data` on every call; returns its path.
inline const std::string& write_input(
    const uint8_t* data,
    size_t size,
    const char* suffix = "") {
  static const std::string path = [&] {
    const char* dir = std::getenv("REMAT_FUZZ_TMPDIR");
    std::string base = dir ? dir : (access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
    return base + "/remat_fuzz_" + std::to_string(getpid()) + suffix;
  }();
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr || (size > 0 && std::fwrite(data, 1, size, f) != size) ||
      std::fclose(f) != 0) {
    std::perror(path.c_str());
    std::abort();
  }
  return path;
}

/// Runs `read` on one input. The readers' documented failure is a
/// c10::Error (TORCH_CHECK) with a message; anything else that escapes
/// (another exception type, an empty message) is a finding, as is a crash,
/// a sanitizer report, a hang or running out of memory.
template <typename F>
void expect_refusal_or_success(F&& read) {
  try {
    read();
  } catch (const c10::Error& e) {
    if (std::string(e.what_without_backtrace()).empty()) {
      std::fprintf(stderr, "finding: a c10::Error without a message\n");
      std::abort();
    }
  }
}

/// Stops the run with `what` when a property of a successful read fails.
inline void require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "finding: %s\n", what);
    std::abort();
  }
}

} // namespace remat_fuzz
