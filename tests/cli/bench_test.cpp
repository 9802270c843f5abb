// The `remat bench` program as a user runs it: exit codes, one-line errors,
// and the JSON report.
#include "cli_runner.h"
#include "testing.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>

namespace {

using remat::test::run_cli;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

const std::string kSmall =
    "bench --layers 2 --hidden 32 --heads 4 --seq 16 --batch 2 --vocab 50 "
    "--steps 1 --warmup 0 --threads 1";

TEST(BenchCli, BadInputGetsOneLineNamingTheFlagAndExitCode2) {
  struct Case {
    std::string args;
    std::string flag;
  };
  for (const auto& c : std::vector<Case>{
           {"bench --hidden 250 --heads 4", "--hidden"},
           {"bench --layers 0", "--layers"},
           {"bench --seq -3", "--seq"},
           {"bench --batch 0", "--batch"},
           {"bench --policy none,bogus", "--policy"},
           {"bench --policy every-0", "--policy"},
           {"bench --memory-limit 12XB", "--memory-limit"},
           {"bench --memory-limit 0", "--memory-limit"},
           {"bench --no-such-flag", "--no-such-flag"},
           {"bench --layers abc", "--layers"},
           {"bench --preset gpt5", "--preset"},
           {"bench --model gpt", "--model"},
           {"bench --dtype fp8", "--dtype"},
           {"bench --attention flash", "--attention"},
           {"bench --model llama --heads 8 --kv-heads 3", "--kv-heads"},
           {"bench --lora-rank -1", "--lora-rank"},
           {"bench --isolation threads", "--isolation"},
           {"bench --rounds 0", "--rounds"},
           {"bench --rounds 2 --isolation in-process", "--rounds"},
       }) {
    auto r = run_cli(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << "\n" << r.err;
    EXPECT_THAT(r.err, StartsWith("remat: error: ")) << c.args;
    EXPECT_THAT(r.err, HasSubstr(c.flag)) << c.args << "\n" << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << c.args << "\n" << r.err;
  }
}

TEST(BenchCli, WritesTheDocumentedJsonFields) {
  const std::string path = ::testing::TempDir() + "/bench.json";
  auto r = run_cli(kSmall + " --policy none,every-layer,selective-attention --json " + path);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("every-layer"));
  std::ifstream f(path);
  auto j = nlohmann::json::parse(f);
  EXPECT_EQ(j["config"]["layers"], 2);
  EXPECT_EQ(j["config"]["hidden"], 32);
  ASSERT_EQ(j["runs"].size(), 3u);
  for (const auto& run : j["runs"]) {
    for (const char* key :
         {"policy", "ok", "held_before_backward_bytes", "held_after_backward_bytes",
          "peak_bytes", "activation_bytes", "step_seconds", "max_abs_grad_diff"}) {
      EXPECT_TRUE(run.contains(key)) << key;
    }
    EXPECT_TRUE(run["ok"].get<bool>());
    EXPECT_EQ(run["max_abs_grad_diff"].get<double>(), 0.0) << run["policy"];
  }
  EXPECT_LT(j["runs"][1]["activation_bytes"].get<int64_t>(),
            j["runs"][0]["activation_bytes"].get<int64_t>());
}

// Each policy in its own process (the default) measures the same bytes and
// gradients as all of them in one process: only the timings may differ.
TEST(BenchCli, PolicyPerProcessMeasuresWhatOneProcessDoes) {
  const std::string a = ::testing::TempDir() + "/bench_process.json";
  const std::string b = ::testing::TempDir() + "/bench_in_process.json";
  const std::string policies = " --policy none,every-layer,budget:9MiB";
  auto r = run_cli(kSmall + policies + " --json " + a);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("[3/3] budget:9MiB: in its own process ... done"));
  r = run_cli(kSmall + policies + " --isolation in-process --json " + b);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::ifstream fa(a), fb(b);
  auto ja = nlohmann::json::parse(fa), jb = nlohmann::json::parse(fb);
  EXPECT_EQ(ja["config"]["isolation"], "process");
  EXPECT_EQ(jb["config"]["isolation"], "in-process");
  ASSERT_EQ(ja["runs"].size(), 3u);
  ASSERT_EQ(jb["runs"].size(), 3u);
  for (size_t k = 0; k < 3; ++k) {
    const auto &x = ja["runs"][k], &y = jb["runs"][k];
    EXPECT_EQ(x["policy"], y["policy"]);
    ASSERT_TRUE(x["ok"].get<bool>()) << x;
    for (const char* key : {"held_before_forward_bytes", "held_before_backward_bytes",
                            "held_after_backward_bytes", "peak_bytes", "activation_bytes"}) {
      EXPECT_EQ(x[key], y[key]) << x["policy"] << " " << key;
    }
    EXPECT_EQ(x["max_abs_grad_diff"].get<double>(), 0.0) << x["policy"];
    EXPECT_EQ(x["step_seconds_all"].size(), 1u);
  }
  EXPECT_EQ(ja["runs"][2]["schedule"], jb["runs"][2]["schedule"]);
}

// --rounds 3: each policy's process runs three times, the order reversed in
// the middle round; samples pool, bytes and gradients stay exact.
TEST(BenchCli, RoundsAlternateTheOrderAndPoolTheSamples) {
  const std::string path = ::testing::TempDir() + "/bench_rounds.json";
  auto r = run_cli(
      "bench --layers 2 --hidden 32 --heads 4 --seq 16 --batch 2 --vocab 50 --warmup 0 "
      "--threads 1 --policy none,every-layer --rounds 3 --steps 2 --json " + path);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto first = r.out.find("[1/6] none (round 1)");
  const auto reversed = r.out.find("[3/6] every-layer (round 2)");
  const auto last = r.out.find("[6/6] every-layer (round 3)");
  EXPECT_NE(first, std::string::npos) << r.out;
  EXPECT_NE(reversed, std::string::npos) << r.out;
  EXPECT_NE(last, std::string::npos) << r.out;
  EXPECT_THAT(r.out, HasSubstr("every-layer: step vs none per round"));
  std::ifstream f(path);
  auto j = nlohmann::json::parse(f);
  EXPECT_EQ(j["config"]["rounds"], 3);
  for (const auto& run : j["runs"]) {
    ASSERT_TRUE(run["ok"].get<bool>()) << run.dump();
    EXPECT_EQ(run["step_seconds_all"].size(), 6u) << run["policy"];
    EXPECT_EQ(run["forward_seconds_all"].size(), 6u) << run["policy"];
    EXPECT_EQ(run["max_abs_grad_diff"].get<double>(), 0.0) << run["policy"];
    ASSERT_EQ(run["step_ratio_per_round"].size(), 3u) << run["policy"];
  }
  EXPECT_EQ(j["runs"][0]["step_ratio_per_round"][1].get<double>(), 1.0);
}

// A child that cannot run reports as a failed policy; the others still run.
TEST(BenchCli, PolicyPerProcessReportsAChildsOutOfMemory) {
  // none needs more than 8 MiB, every-layer less (as in the in-process
  // case below): none's process fails, every-layer's runs.
  auto r = run_cli(
      "bench --layers 6 --hidden 64 --heads 4 --seq 64 --batch 4 --vocab 50 "
      "--steps 1 --warmup 0 --threads 1 --policy none,every-layer --memory-limit 8MiB");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("[1/2] none: in its own process ... failed"));
  EXPECT_THAT(r.out, HasSubstr("[2/2] every-layer: in its own process ... done"));
  EXPECT_THAT(r.out, HasSubstr("OUT OF MEMORY"));
}

TEST(BenchCli, LimitNoScheduleCanMeetIsRefusedBeforeAnythingRuns) {
  // The estimator's smallest peak of any schedule is above 200 KiB: no
  // process starts.
  auto r = run_cli(kSmall + " --policy none,every-layer --memory-limit 200KiB");
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_THAT(r.err, StartsWith("remat: error: --memory-limit: expected a step that fits the "
                                "--memory-limit (200.0 KiB), but the estimate of its smallest "
                                "peak"));
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_THAT(r.out, Not(HasSubstr("in its own process")));
}

// The README's example: every-layer peaks at about 172 MiB here, under the
// limit, while the estimator's step (which holds zeroed gradients) peaks at
// 222 MiB at best. The check made before running bounds the step from below,
// so it lets the run go; none is then stopped cleanly at the limit.
TEST(BenchCli, ThePreCheckNeverRefusesARunThatFits) {
  auto r = run_cli(
      "bench --layers 12 --hidden 256 --heads 4 --seq 256 --batch 8 --steps 1 --warmup 0 "
      "--policy none,every-layer --memory-limit 200MiB");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("[1/2] none: in its own process ... failed"));
  EXPECT_THAT(r.out, HasSubstr("[2/2] every-layer: in its own process ... done"));
}

TEST(BenchCli, LlamaWithLoraBf16AndBlockwiseAttentionMatchesNoCheckpointing) {
  const std::string path = ::testing::TempDir() + "/bench_llama.json";
  auto r = run_cli(
      "bench --model llama --layers 2 --hidden 32 --heads 4 --kv-heads 2 --seq 24 "
      "--batch 2 --vocab 60 --lora-rank 4 --dtype bf16 --attention blockwise "
      "--steps 1 --warmup 0 --threads 1 "
      "--policy none,every-layer,sqrt,full,selective-attention --json " + path);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::ifstream f(path);
  auto j = nlohmann::json::parse(f);
  EXPECT_EQ(j["config"]["model"], "llama");
  EXPECT_EQ(j["config"]["dtype"], "bf16");
  // Only the adapters train: 2 layers x 4 projections x (A + B).
  EXPECT_LT(j["config"]["trainable_parameters"].get<int64_t>(), 5000);
  for (const auto& run : j["runs"]) {
    ASSERT_TRUE(run["ok"].get<bool>()) << run.dump();
    EXPECT_EQ(run["max_abs_grad_diff"].get<double>(), 0.0) << run["policy"];
  }
}

TEST(BenchCli, MemoryLimitFailsNoneCleanlyAndEveryLayerStillRuns) {
  const std::string path = ::testing::TempDir() + "/bench_limit.json";
  // Measured: none peaks at 13.1 MiB, every-layer at 4.9 MiB (weights and
  // gradients included).
  auto r = run_cli(
      "bench --layers 6 --hidden 64 --heads 4 --seq 64 --batch 4 --vocab 50 "
      "--steps 1 --warmup 0 --threads 1 --policy none,every-layer "
      "--memory-limit 8MiB --json " + path);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("OUT OF MEMORY"));
  std::ifstream f(path);
  auto j = nlohmann::json::parse(f);
  EXPECT_FALSE(j["runs"][0]["ok"].get<bool>());
  EXPECT_THAT(j["runs"][0]["error"].get<std::string>(), HasSubstr("out of memory"));
  EXPECT_TRUE(j["runs"][1]["ok"].get<bool>());
  EXPECT_LE(j["runs"][1]["peak_bytes"].get<int64_t>(), 8 << 20);
}

// --device: refused in one line (exit 2) where it cannot run. This runs on
// every build: without a GPU "cuda" is refused, with one a GPU past the last.
TEST(BenchCli, DeviceThatIsNotThereIsRefusedInOneLine) {
  const bool have_gpu = remat_test::no_cuda_reason().empty();
  for (const std::string& device :
       {std::string(have_gpu ? "cuda:99" : "cuda"), std::string("cuda:0x"), std::string("tpu")}) {
    auto r = run_cli(kSmall + " --device " + device);
    EXPECT_EQ(r.exit_code, 2) << device << "\n" << r.err;
    EXPECT_THAT(r.err, StartsWith("remat: error: --device: ")) << device;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << device << "\n" << r.err;
  }
  if (!have_gpu) {
    auto r = run_cli(kSmall + " --device cuda");
    EXPECT_THAT(r.err, ::testing::AnyOf(HasSubstr("needs a CUDA build"), HasSubstr("needs a GPU")));
  }
  // cpu is the default, and says so in the report.
  const std::string path = ::testing::TempDir() + "/bench_cpu_device.json";
  auto r = run_cli(kSmall + " --policy none --device cpu --json " + path);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::ifstream f(path);
  auto j = nlohmann::json::parse(f);
  EXPECT_EQ(j["config"]["device"], "cpu");
  EXPECT_THAT(j["config"]["memory_source"].get<std::string>(), HasSubstr("CPU"));
}

// On a GPU: each policy in its own process on cuda:0, bytes from the CUDA
// caching allocator, gradients as without checkpointing, fp32 and bf16.
TEST(BenchCli, CudaRunsEachPolicyAndReportsCudaPeaks) {
  REMAT_REQUIRE_CUDA();
  for (const std::string dtype : {"fp32", "bf16"}) {
    const std::string path = ::testing::TempDir() + "/bench_cuda_" + dtype + ".json";
    auto r = run_cli(kSmall + " --device cuda --dtype " + dtype +
                     " --policy none,every-layer,selective-attention --json " + path);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_THAT(r.out, HasSubstr("device cuda:0 ("));
    std::ifstream f(path);
    auto j = nlohmann::json::parse(f);
    EXPECT_EQ(j["config"]["device"], "cuda:0");
    EXPECT_THAT(j["config"]["memory_source"].get<std::string>(), HasSubstr("cuda"));
    EXPECT_GT(j["config"]["weight_bytes"].get<int64_t>(), 0);
    ASSERT_EQ(j["runs"].size(), 3u);
    for (const auto& run : j["runs"]) {
      ASSERT_TRUE(run["ok"].get<bool>()) << run.dump();
      EXPECT_GT(run["peak_bytes"].get<int64_t>(), 0) << run["policy"];
      EXPECT_GT(run["step_seconds"].get<double>(), 0.0) << run["policy"];
      // CUDA's embedding backward adds with atomics: equal up to rounding.
      EXPECT_LT(run["max_abs_grad_diff"].get<double>(), dtype == "fp32" ? 1e-4 : 1e-2)
          << run["policy"];
    }
    EXPECT_LT(j["runs"][1]["activation_bytes"].get<int64_t>(),
              j["runs"][0]["activation_bytes"].get<int64_t>());
  }
}

} // namespace
