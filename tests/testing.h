// Helpers shared by the C++ tests: checking the text of an error, not only
// that one was thrown.
#pragma once

#include <c10/util/Exception.h>
#include <gtest/gtest.h>

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

} // namespace remat_test

/// Expects `stmt` to throw an exception whose message contains `text`.
#define EXPECT_THROW_WITH(stmt, text)                                    \
  do {                                                                   \
    const std::string remat_message_ =                                   \
        ::remat_test::thrown_message([&] { stmt; });                     \
    EXPECT_NE(remat_message_.find(text), std::string::npos)              \
        << "expected a message containing \"" << (text) << "\", got: \"" \
        << remat_message_ << "\"";                                       \
  } while (0)
