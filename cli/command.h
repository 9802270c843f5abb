// The subcommands of the `remat` program. Each adds itself to the root app
// and returns what to run once the command line has been parsed.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>

namespace remat {
namespace cli {

/// A caller's mistake on the command line: printed as one line, exit code 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// Throws UsageError("--flag: message") unless `ok`.
inline void require(bool ok, const std::string& flag, const std::string& message) {
  if (!ok) {
    throw UsageError(flag + ": " + message);
  }
}

using Run = std::function<int()>;

Run add_bench(CLI::App& root);
Run add_train(CLI::App& root);
Run add_plan(CLI::App& root);
Run add_estimate(CLI::App& root);

} // namespace cli
} // namespace remat
