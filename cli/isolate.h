// Running this program again in a fresh process, for measurements that must
// not share a process with the ones they are compared to.
//
// Why: a training step's time depends on the state the allocator and the
// page tables were left in. Timed in rounds inside one process, a policy run
// right after a different one pays for the other's leftover blocks: on a
// 2-core VM, per-layer checkpointing measured 1.30x of none that way and
// 1.15x each in its own process. `remat bench` and `remat plan --measure`
// therefore run each policy (or schedule) in a process of its own by
// default.
//
// Example:
//   remat::cli::TempDir dir("remat-bench");
//   auto r = remat::cli::run_self({"bench", "--policy", "none", "--json", dir.file("none.json")});
//   if (r.exit_code != 0) { ... r.error ... }
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace remat {
namespace cli {

/// How a child process ended.
struct ChildOutcome {
  int exit_code = 0;  ///< the exit status; 128 + N when killed by signal N
  std::string error;  ///< the last non-empty line it wrote to stderr
};

/// Runs this program (/proc/self/exe) with `args` (argv[1:]) and waits for
/// it: stdin and stdout are /dev/null, stderr is captured. Throws
/// std::runtime_error when the process cannot be started.
ChildOutcome run_self(const std::vector<std::string>& args);

/// A private directory under $TMPDIR (or /tmp), removed with its files when
/// destroyed.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix);
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  /// path() + "/" + name
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

/// "remat: error: --x: ..." -> "--x: ...": a child's one-line error without
/// the program's prefix.
std::string strip_error_prefix(const std::string& line);

/// "its process exited with status N: <its error>": why a child that left
/// no result failed, for a table's error column.
std::string describe_exit(const ChildOutcome& outcome);

/// Checks --rounds against --isolation (throws UsageError): at least 1, and
/// 1 unless each item runs in a process of its own.
void require_rounds(int64_t rounds, const std::string& isolation);

/// The order in which `count` items run in round `round` (from 0) of
/// --rounds: as given in even rounds, reversed in odd ones, so that a
/// machine whose speed drifts over minutes does not charge the drift to the
/// items that always run last.
std::vector<size_t> round_order(int64_t round, size_t count);

/// "[done/total] name (round r): in its own process ... ", the progress
/// line's start; "(round r)" only when rounds > 1.
std::string progress_label(size_t done, size_t total, const std::string& name,
                           int64_t round, int64_t rounds);

} // namespace cli
} // namespace remat
