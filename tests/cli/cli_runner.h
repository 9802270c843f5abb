// Runs the built `remat` program (REMAT_CLI_PATH) and captures what it printed.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

namespace remat {
namespace test {

struct CliResult {
  int exit_code = -1;
  std::string out;
  std::string err;
};

inline std::string slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

/// `args` is appended to the program path as is (shell words).
inline CliResult run_cli(const std::string& args) {
  static int counter = 0;
  const std::string base = ::testing::TempDir() + "/remat_cli_" +
      std::to_string(getpid()) + "_" + std::to_string(counter++);
  const std::string cmd = std::string(REMAT_CLI_PATH) + " " + args + " > " + base +
      ".out 2> " + base + ".err < /dev/null";
  const int status = std::system(cmd.c_str());
  CliResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = slurp(base + ".out");
  r.err = slurp(base + ".err");
  std::remove((base + ".out").c_str());
  std::remove((base + ".err").c_str());
  return r;
}

/// Runs `args --json TEMP/name.json`, expects exit code 0, and returns the
/// report it wrote.
inline nlohmann::json run_json(const std::string& args, const std::string& name) {
  const std::string path = ::testing::TempDir() + "/" + name + ".json";
  auto r = run_cli(args + " --json " + path);
  EXPECT_EQ(r.exit_code, 0) << args << "\n" << r.err;
  std::ifstream f(path);
  return nlohmann::json::parse(f);
}

} // namespace test
} // namespace remat
