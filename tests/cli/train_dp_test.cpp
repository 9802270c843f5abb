// `remat train` data-parallel: two local processes follow the one-process
// loss curve with the same global batch; a rank that dies makes the other
// fail with an error naming it, and --resume continues from the last state.
#include "cli/cli_runner.h"
#include "temp_dir.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cmath>
#include <filesystem>
#include <sstream>

namespace {

namespace fs = std::filesystem;
using remat::test::run_cli;
using ::testing::HasSubstr;

// A tiny model under every-layer checkpointing; no dropout, so that one
// process and two draw nothing differently.
const std::string kRun =
    "train --layers 2 --hidden 16 --heads 2 --seq 32 --batch 8 --valid-fraction 0.05 "
    "--threads 1 --seed 5 --dropout 0 --policy every-layer --max-steps 20 --dist-timeout 30 ";

std::string temp_dir(const std::string& name) {
  return remat_test::fresh_temp_dir("train_dp_" + name, /*create=*/true);
}

std::vector<nlohmann::json> steps_of(const std::string& path) {
  std::vector<nlohmann::json> out;
  std::istringstream in(remat::test::slurp(path));
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j["type"] == "step") {
      out.push_back(j);
    }
  }
  return out;
}

void expect_same_curve(const std::vector<nlohmann::json>& a, const std::vector<nlohmann::json>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i]["step"], b[i]["step"]);
    EXPECT_EQ(a[i]["tokens"], b[i]["tokens"]) << "step " << i + 1;
    EXPECT_NEAR(a[i]["loss"].get<double>(), b[i]["loss"].get<double>(), 1e-5)
        << "step " << i + 1;
    EXPECT_NEAR(a[i]["grad_norm"].get<double>(), b[i]["grad_norm"].get<double>(), 1e-4)
        << "step " << i + 1;
  }
}

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

TEST(TrainDataParallel, TwoProcessesFollowTheOneProcessLossCurve) {
  const auto dir = temp_dir("curve");
  auto one = run_cli(kRun + "--metrics " + dir + "/one.jsonl");
  ASSERT_EQ(one.exit_code, 0) << one.err;
  auto two = run_cli(kRun + "--nproc 2 --metrics " + dir + "/two.jsonl --out " + dir + "/two");
  ASSERT_EQ(two.exit_code, 0) << two.err;
  EXPECT_THAT(two.out, HasSubstr("data parallel: 2 ranks, global batch 8 rows (4 per rank)"));
  EXPECT_THAT(two.err, HasSubstr("remat train: rank 1 of 2: 20 steps, peak"));
  EXPECT_THAT(two.out, HasSubstr("of gradient bytes all-reduced during backward"));
  const auto a = steps_of(dir + "/one.jsonl");
  ASSERT_EQ(a.size(), 20u);
  const auto b = steps_of(dir + "/two.jsonl");
  expect_same_curve(a, b);
  // The all-reduce overlapped the backward pass: gradient buckets started
  // from the hooks, not after backward.
  for (const auto& s : b) {
    ASSERT_TRUE(s.contains("reduced_in_backward_bytes")) << s;
    EXPECT_GT(s["reduced_in_backward_bytes"].get<int64_t>(), 0) << s;
  }
  EXPECT_FALSE(a[0].contains("reduced_in_backward_bytes"));
  // Rank 0 alone wrote the state.
  EXPECT_TRUE(fs::exists(dir + "/two/state.safetensors"));
}

TEST(TrainDataParallel, DeadRankFailsThePeerAndTheGroupResumes) {
  const auto dir = temp_dir("kill");
  auto one = run_cli(kRun + "--metrics " + dir + "/one.jsonl");
  ASSERT_EQ(one.exit_code, 0) << one.err;

  // Two ranks started by hand, as torchrun would; rank 1 dies right after
  // step 7 (the last state saved is step 6's).
  const std::string env = "WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=" +
      std::to_string(free_port()) + " ";
  const std::string args = kRun + "--save-every 3 --stop-after-step 7 --stop-rank 1 --out " +
      dir + "/run --metrics " + dir + "/run.jsonl";
  const std::string cmd = "cd " + dir + " && (" + env + "RANK=1 " + REMAT_CLI_PATH + " " +
      args + " > r1.out 2> r1.err; echo $? > r1.code) & " + env + "RANK=0 " + REMAT_CLI_PATH +
      " " + args + " > " + dir + "/r0.out 2> " + dir + "/r0.err; echo $? > " + dir +
      "/r0.code; wait";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  EXPECT_EQ(remat::test::slurp(dir + "/r1.code"), "137\n");
  EXPECT_EQ(remat::test::slurp(dir + "/r0.code"), "1\n") << remat::test::slurp(dir + "/r0.err");
  const auto err = remat::test::slurp(dir + "/r0.err");
  EXPECT_THAT(err, HasSubstr("remat: error: data parallel: all-reduce failed on rank 0 of 2"));
  EXPECT_THAT(err, HasSubstr("rank 1 stopped after starting step 7 (at step 8)"));

  auto resumed = run_cli("train --resume --nproc 2 --out " + dir + "/run --metrics " + dir +
                         "/run.jsonl");
  ASSERT_EQ(resumed.exit_code, 0) << resumed.err;
  EXPECT_THAT(resumed.err, HasSubstr("resumed from " + dir + "/run/state.safetensors at step 6"));
  expect_same_curve(steps_of(dir + "/one.jsonl"), steps_of(dir + "/run.jsonl"));
}

TEST(TrainDataParallel, RanksWithOtherSettingsAreRefused) {
  const auto dir = temp_dir("mismatch");
  const std::string env = "WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=" +
      std::to_string(free_port()) + " ";
  const std::string cmd = "cd " + dir + " && (" + env + "RANK=1 " + REMAT_CLI_PATH + " " +
      kRun + "--lr 0.002 > r1.out 2> r1.err; echo $? > r1.code) & cd " + dir + " && " + env +
      "RANK=0 " + REMAT_CLI_PATH + " " + kRun + "> r0.out 2> r0.err; echo $? > r0.code; wait";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  EXPECT_EQ(remat::test::slurp(dir + "/r0.code"), "1\n");
  EXPECT_EQ(remat::test::slurp(dir + "/r1.code"), "1\n");
  EXPECT_THAT(remat::test::slurp(dir + "/r1.err"),
              HasSubstr("remat: error: data parallel: lr: rank 1 was started with 0.002, but "
                        "rank 0 with 0.001; every rank must be started with the same settings"));
  EXPECT_THAT(remat::test::slurp(dir + "/r0.err"),
              HasSubstr("remat: error: data parallel: 1 rank(s) were started with settings "
                        "other than rank 0's"));
}

TEST(TrainDataParallel, LauncherNamesTheFailedRank) {
  const auto dir = temp_dir("launcher");
  auto r = run_cli(kRun + "--nproc 2 --stop-after-step 2 --stop-rank 1");
  EXPECT_EQ(r.exit_code, 137) << r.err;
  EXPECT_THAT(r.err, HasSubstr("remat: error: --nproc: rank 1 of 2 exited with code 137; "
                               "stopping the other ranks"));
}

TEST(TrainDataParallel, BadSettingsAreUsageErrors) {
  auto r = run_cli(kRun + "--nproc -1");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("--nproc: expected a number of local processes in [0, 64], but got -1"));
  // Past the bound nothing is started (it once forked until memory ran out).
  r = run_cli(kRun + "--nproc 4294967296");
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_THAT(r.err, HasSubstr("in [0, 64], but got 4294967296"));
  r = run_cli("train --nproc 2 --dist-timeout 0");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("--dist-timeout: expected a number of seconds > 0"));
  r = run_cli("train --nproc 2 --batch 0");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("--batch: expected batch in [1, 65536], but got 0"));
  // Environments that torchrun would never give.
  const auto dir = temp_dir("env");
  auto with_env = [&](const std::string& vars, const std::string& extra = "") {
    const std::string cmd = "env " + vars + " " + REMAT_CLI_PATH + " " + kRun + extra + " 2> " + dir +
        "/err > /dev/null";
    const int status = std::system(cmd.c_str());
    return std::make_pair(WIFEXITED(status) ? WEXITSTATUS(status) : -1,
                          remat::test::slurp(dir + "/err"));
  };
  auto bad_rank = with_env("WORLD_SIZE=2 RANK=5 MASTER_PORT=29999");
  EXPECT_EQ(bad_rank.first, 2);
  EXPECT_THAT(bad_rank.second,
              HasSubstr("data parallel: rank: expected a value in [0, 2), but got 5"));
  auto no_rank = with_env("WORLD_SIZE=2 MASTER_PORT=29999");
  EXPECT_EQ(no_rank.first, 2);
  EXPECT_THAT(no_rank.second, HasSubstr("RANK: expected the environment variable to be set"));
  auto both = with_env("WORLD_SIZE=2 RANK=0 MASTER_PORT=29999", "--nproc 2");
  EXPECT_EQ(both.first, 2);
  EXPECT_THAT(both.second, HasSubstr("--nproc: this process was started as rank 0 of a group"));
}

} // namespace

namespace {

// A budget is planned once, on rank 0, for its share of the batch, and
// every rank runs that plan; a budget nothing fits fails every rank.
TEST(TrainDataParallel, RankZeroPlansABudgetForEveryRank) {
  std::string run = kRun;
  run.replace(run.find("--policy every-layer"), std::string("--policy every-layer").size(),
              "--policy budget:1GiB");
  run.replace(run.find("--max-steps 20"), std::string("--max-steps 20").size(), "--max-steps 3");
  const auto dir = temp_dir("budget");
  auto ok = run_cli(run + "--nproc 2 --metrics " + dir + "/two.jsonl");
  ASSERT_EQ(ok.exit_code, 0) << ok.err;
  const auto steps = steps_of(dir + "/two.jsonl");
  ASSERT_EQ(steps.size(), 3u);
  EXPECT_EQ(steps[0]["policy"], "budget:1GiB");

  run.replace(run.find("--policy budget:1GiB"), std::string("--policy budget:1GiB").size(),
              "--policy budget:1KiB");
  auto refused = run_cli(run + "--nproc 2");
  EXPECT_NE(refused.exit_code, 0);
  EXPECT_THAT(refused.err, HasSubstr("expected a memory budget of at least"));
  EXPECT_THAT(refused.err, HasSubstr("rank 0 could not plan it"));
}

} // namespace
