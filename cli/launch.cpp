// The local launcher behind `remat train --nproc N`.
#include "launch.h"

#include "command.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <thread>
#include <vector>

namespace remat {
namespace cli {

namespace {

std::vector<pid_t> g_children; // for the signal handler

void forward_signal(int sig) {
  for (pid_t pid : g_children) {
    if (pid > 0) {
      ::kill(pid, sig);
    }
  }
}

// This process's own arguments, as the kernel holds them.
std::vector<std::string> own_arguments() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> args;
  std::string cur;
  for (char c : all) {
    if (c == '\0') {
      args.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) {
    args.push_back(cur);
  }
  return args;
}

// A TCP port that nothing listens on now (the kernel's choice).
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  require(fd >= 0, "--nproc", "cannot open a socket to find a free port");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
  ::close(fd);
  require(ok, "--nproc", "cannot find a free TCP port on 127.0.0.1");
  return ntohs(addr.sin_port);
}

std::string describe(int status) {
  if (WIFSIGNALED(status)) {
    return "was killed by signal " + std::to_string(WTERMSIG(status)) + " (" +
        strsignal(WTERMSIG(status)) + ")";
  }
  return "exited with code " + std::to_string(WEXITSTATUS(status));
}

int exit_code_of(int status) {
  return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
}

// This process's arguments without `flag` and its value, for the workers.
std::vector<std::string> worker_arguments(const std::string& flag) {
  auto args = own_arguments();
  std::vector<std::string> kept;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == flag) {
      ++i; // and its value
    } else if (args[i].rfind(flag + "=", 0) != 0) {
      kept.push_back(args[i]);
    }
  }
  return kept;
}

// In a forked child: becomes worker `rank` of `nproc`, or exits with 127.
[[noreturn]] void exec_worker(
    int64_t rank,
    int64_t nproc,
    int port,
    const std::vector<std::string>& args,
    const std::string& flag) {
  ::setenv("RANK", std::to_string(rank).c_str(), 1);
  ::setenv("LOCAL_RANK", std::to_string(rank).c_str(), 1);
  ::setenv("WORLD_SIZE", std::to_string(nproc).c_str(), 1);
  ::setenv("LOCAL_WORLD_SIZE", std::to_string(nproc).c_str(), 1);
  ::setenv("MASTER_ADDR", "127.0.0.1", 1);
  ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
  std::vector<char*> argv;
  for (auto& a : args) {
    argv.push_back(const_cast<char*>(a.c_str()));
  }
  argv.push_back(nullptr);
  ::execv("/proc/self/exe", argv.data());
  std::fprintf(stderr, "remat: error: %s: cannot start worker %lld: %s\n", flag.c_str(),
               static_cast<long long>(rank), std::strerror(errno));
  ::_exit(127);
}

// Forks `nproc` workers running `args`, recording them in g_children, and
// passes SIGINT and SIGTERM on to them from then on.
void start_workers(
    int64_t nproc,
    const std::vector<std::string>& args,
    const std::string& flag) {
  const int port = free_port();
  std::fflush(nullptr);
  g_children.assign(static_cast<size_t>(nproc), -1);
  for (int64_t r = 0; r < nproc; ++r) {
    const pid_t pid = ::fork();
    require(pid >= 0, flag, std::string("cannot start a worker: ") + std::strerror(errno));
    if (pid == 0) {
      exec_worker(r, nproc, port, args, flag);
    }
    g_children[static_cast<size_t>(r)] = pid;
  }
  struct sigaction sa{};
  sa.sa_handler = forward_signal;
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
}

// The rank of worker `pid`, now struck from g_children; -1 if not a worker.
int64_t reap(pid_t pid) {
  int64_t rank = -1;
  for (size_t r = 0; r < g_children.size(); ++r) {
    if (g_children[r] == pid) {
      rank = static_cast<int64_t>(r);
      g_children[r] = -1;
    }
  }
  return rank;
}

// Asks the `running` workers to stop, gives them 5 seconds, then kills the
// rest; `running` counts down as they exit.
void stop_workers(int64_t& running) {
  forward_signal(SIGTERM);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (running > 0 && std::chrono::steady_clock::now() < deadline) {
    int status = 0;
    const pid_t done = ::waitpid(-1, &status, WNOHANG);
    if (done > 0) {
      for (auto& c : g_children) {
        if (c == done) {
          c = -1;
          --running;
        }
      }
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  forward_signal(SIGKILL);
}

// Waits for all `nproc` workers; at the first failure, names the rank and
// stops the others. Returns 0, or the exit code of the first failure.
int wait_for_workers(int64_t nproc, const std::string& flag) {
  int64_t running = nproc;
  int failed_code = 0;
  while (running > 0) {
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, 0);
    if (pid < 0) {
      if (errno == EINTR) {
        continue;
      }
      break;
    }
    const int64_t rank = reap(pid);
    if (rank < 0) {
      continue;
    }
    --running;
    if ((WIFEXITED(status) && WEXITSTATUS(status) == 0) || failed_code != 0) {
      continue;
    }
    // The first failure: say which rank, stop the others.
    failed_code = exit_code_of(status);
    if (failed_code == 0) {
      failed_code = 1;
    }
    std::fprintf(stderr, "remat: error: %s: rank %lld of %lld %s; stopping the other ranks\n",
                 flag.c_str(), static_cast<long long>(rank), static_cast<long long>(nproc),
                 describe(status).c_str());
    stop_workers(running);
  }
  return failed_code;
}

} // namespace

int launch_workers(int64_t nproc, const std::string& flag) {
  start_workers(nproc, worker_arguments(flag), flag);
  return wait_for_workers(nproc, flag);
}

} // namespace cli
} // namespace remat
