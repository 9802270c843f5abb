// run_self and TempDir: fork/exec of /proc/self/exe with posix_spawn.
#include "isolate.h"

#include "command.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>

extern char** environ;

namespace remat {
namespace cli {

ChildOutcome run_self(const std::vector<std::string>& args) {
  TempDir dir("remat-child");
  const std::string err_path = dir.file("stderr");
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(
      &actions, 2, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  std::vector<std::string> argv_store;
  argv_store.reserve(args.size() + 1);
  argv_store.push_back("remat");
  argv_store.insert(argv_store.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_store) {
    argv.push_back(a.data());
  }
  argv.push_back(nullptr);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, "/proc/self/exe", &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) {
    throw std::runtime_error(
        std::string("cannot start a child process of /proc/self/exe: ") + std::strerror(rc));
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) {
      throw std::runtime_error(std::string("waitpid: ") + std::strerror(errno));
    }
  }
  ChildOutcome out;
  out.exit_code = WIFEXITED(status) ? WEXITSTATUS(status)
                                    : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  std::ifstream err(err_path);
  for (std::string line; std::getline(err, line);) {
    if (line.find_first_not_of(" \t\r") != std::string::npos) {
      out.error = line;
    }
  }
  if (out.error.empty() && WIFSIGNALED(status)) {
    out.error = std::string("killed by signal ") + strsignal(WTERMSIG(status));
  }
  return out;
}

TempDir::TempDir(const std::string& prefix) {
  const char* base = std::getenv("TMPDIR");
  std::string pattern = std::string(base != nullptr && *base ? base : "/tmp") + "/" + prefix +
      ".XXXXXX";
  if (mkdtemp(pattern.data()) == nullptr) {
    throw std::runtime_error("cannot create a temporary directory " + pattern + ": " +
                             std::strerror(errno));
  }
  path_ = pattern;
}

TempDir::~TempDir() {
  std::error_code ignored;
  std::filesystem::remove_all(path_, ignored);
}

std::string strip_error_prefix(const std::string& line) {
  const std::string prefix = "remat: error: ";
  return line.compare(0, prefix.size(), prefix) == 0 ? line.substr(prefix.size()) : line;
}

std::string describe_exit(const ChildOutcome& outcome) {
  return "its process exited with status " + std::to_string(outcome.exit_code) +
      (outcome.error.empty() ? "" : ": " + strip_error_prefix(outcome.error));
}

void require_rounds(int64_t rounds, const std::string& isolation) {
  // Each round starts a process per item: 10000 is days of work already.
  require(rounds >= 1 && rounds <= 10000, "--rounds",
          "expected a count in [1, 10000], but got " + std::to_string(rounds));
  require(rounds == 1 || isolation == "process", "--rounds",
          "expected 1 with --isolation in-process (it interleaves steps already), but got " +
              std::to_string(rounds));
}

std::vector<size_t> round_order(int64_t round, size_t count) {
  std::vector<size_t> order(count);
  for (size_t n = 0; n < count; ++n) {
    order[n] = round % 2 == 0 ? n : count - 1 - n;
  }
  return order;
}

std::string progress_label(size_t done, size_t total, const std::string& name,
                           int64_t round, int64_t rounds) {
  return "[" + std::to_string(done) + "/" + std::to_string(total) + "] " + name +
      (rounds > 1 ? " (round " + std::to_string(round + 1) + ")" : "") +
      ": in its own process ... ";
}

} // namespace cli
} // namespace remat
