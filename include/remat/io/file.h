// Whole-file reading and crash-safe writing, shared by everything that saves
// state (weights, configs, data sets, training checkpoints, JSON reports).
// Every file is written under temp_path(path) and renamed into place; what a
// process killed mid-save leaves is cleared by remove_stale_temp_files.
//
// clang-format off
// Example:
//   // given: std::string text = "{\"step\": 100}";
//   remat::io::AtomicFile out("run/state.json");
//   out.write(text);  // to run/state.json.tmp.<pid>
//   out.commit();     // fsync, rename over run/state.json, fsync the folder
//   // Destroyed without commit(), it removes the temporary file instead.
//   remat::io::remove_stale_temp_files("run");  // at the next start
// clang-format on
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace remat {
namespace io {

/// A file written under a temporary name and renamed into place on commit(),
/// so that a reader (or a crash) sees the old content or the new, never part.
class AtomicFile {
 public:
  /// Creates temp_path(path). Throws c10::Error naming it on failure.
  explicit AtomicFile(std::string path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t size_bytes);
  void write(const std::string& bytes) {
    write(bytes.data(), bytes.size());
  }
  /// fsync, close, rename over the target, fsync its folder. Throws on error.
  void commit();

  const std::string& path() const {
    return path_;
  }
  const std::string& temp_path() const {
    return temp_path_;
  }

 private:
  std::string path_;
  std::string temp_path_;
  int fd_ = -1;
  bool committed_ = false;
};

/// Writes `bytes` to `path` through an AtomicFile.
void write_file_atomic(const std::string& path, const std::string& bytes);

/// `path + ".tmp.<pid>"`, <pid> this process's: the name under which
/// AtomicFile (and link_file_atomic) write `path` before the rename.
std::string temp_path(const std::string& path);

/// Makes `link_path` a hard link to the existing file `target`, atomically:
/// the link is made under temp_path(link_path) and renamed over
/// `link_path`, so a reader sees the old file or the new, never none.
/// Throws c10::Error naming both paths on failure (the temporary link is
/// then removed).
void link_file_atomic(const std::string& target, const std::string& link_path);

/// Removes the temporary files that atomic writes of processes no longer
/// running left in `dir` (a process killed mid-save leaves NAME.tmp.<pid>):
/// those whose <pid> names no live process of this machine (kill(pid, 0)
/// fails with ESRCH). A live process's, anything else, and sub-folders
/// are left alone; the scan is not recursive. Returns the paths removed
/// (`dir` + "/" + name), in name order; none when `dir` does not exist.
/// Throws c10::Error naming the file when one cannot be removed.
///
///   for (const auto& p : remat::io::remove_stale_temp_files("runs/a")) {
///     std::cerr << "removed " << p << "\n";
///   }
std::vector<std::string> remove_stale_temp_files(const std::string& dir);

/// Checks that `path` names a regular file (or a link to one) before it is
/// opened, so a folder, a device such as /dev/zero, or a FIFO (whose open
/// would block) is refused with a one-line error naming it, e.g.
/// "could not open '/dev/null': expected a regular file, but it is a
/// character device".
/// `what` starts the message (e.g. "training data"); empty: nothing.
void require_regular_file(const std::string& path, const std::string& what = "");

/// Why `path` is not a readable regular file ("No such file or directory",
/// "expected a regular file, but it is a FIFO"), or "" when it is one. The
/// check require_regular_file makes, for callers that word the error.
std::string regular_file_problem(const std::string& path);

/// The whole content of `path`, a regular file of at most `max_bytes` bytes
/// (-1: no limit but the file's size). Throws c10::Error naming the path on
/// failure, and before reading anything when the file is larger than
/// `max_bytes`:
///
///   auto text = remat::io::read_file("config.json", 16 << 20); // 16 MiB
std::string read_file(const std::string& path, int64_t max_bytes = -1);

} // namespace io
} // namespace remat
