// Helpers shared by the C++ tests: checking the text of an error, not only
// that one was thrown.
#pragma once

#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include <exception>
#include <string>

namespace remat_test {

/// Runs `f` and returns the message of what it threw (without LibTorch's
/// backtrace), or "<nothing thrown>".
template <typename F>
std::string thrown_message(F&& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "<nothing thrown>";
}

/// Why a CUDA test cannot run here ("" when it can): the build has no CUDA,
/// or it has but no device is visible.
inline std::string no_cuda_reason() {
#ifdef REMAT_WITH_CUDA
  if (!torch::cuda::is_available()) {
    return "needs a CUDA device: this is a CUDA build, but "
           "torch::cuda::is_available() is false (no GPU or no driver)";
  }
  return "";
#else
  return "needs a CUDA build of LibTorch: this one has no CUDA";
#endif
}

/// How many CUDA devices a test may use (0 without CUDA).
inline int64_t cuda_device_count() {
  return no_cuda_reason().empty() ? static_cast<int64_t>(torch::cuda::device_count()) : 0;
}

} // namespace remat_test

/// Skips the test, with the reason, where no GPU can run it. ctest reports
/// it as Skipped and the log keeps the reason.
#define REMAT_REQUIRE_CUDA()                                    \
  do {                                                          \
    const std::string remat_why_ = ::remat_test::no_cuda_reason(); \
    if (!remat_why_.empty()) {                                  \
      GTEST_SKIP() << remat_why_;                               \
    }                                                           \
  } while (0)

/// Expects `stmt` to throw an exception whose message contains `text`.
#define EXPECT_THROW_WITH(stmt, text)                                    \
  do {                                                                   \
    const std::string remat_message_ =                                   \
        ::remat_test::thrown_message([&] { stmt; });                     \
    EXPECT_NE(remat_message_.find(text), std::string::npos)              \
        << "expected a message containing \"" << (text) << "\", got: \"" \
        << remat_message_ << "\"";                                       \
  } while (0)
