// The `remat estimate` program as a user runs it: the breakdown, --fit and
// --fit-seq (monotonic in the device size), the presets, --check, bad flags.
#include "cli_runner.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <map>

namespace {

using remat::test::run_cli;
using remat::test::run_json;
using ::testing::HasSubstr;
using ::testing::StartsWith;

TEST(EstimateCli, BreaksDownThePresetWithMasterWeightsUnderBf16) {
  auto j = run_json("estimate --preset llama2-7b --dtype bf16-mixed --policy none,every-layer",
                    "estimate_7b");
  EXPECT_EQ(j["config"]["layers"], 32);
  EXPECT_EQ(j["config"]["precision"], "bf16-mixed");
  const int64_t params = j["trainable_parameters"];
  EXPECT_NEAR(static_cast<double>(j["parameters"].get<int64_t>()), 6.74e9, 0.01e9);
  ASSERT_EQ(j["policies"].size(), 2u);
  const auto& none = j["policies"][0];
  // bf16 weights and gradients; AdamW's fp32 master copy and two moments.
  EXPECT_EQ(none["weight_bytes"].get<int64_t>(), 2 * params);
  EXPECT_EQ(none["gradient_bytes"].get<int64_t>(), 2 * params);
  EXPECT_EQ(none["optimizer_bytes"].get<int64_t>(), 12 * params);
  EXPECT_LT(j["policies"][1]["activation_bytes"].get<int64_t>(),
            none["activation_bytes"].get<int64_t>());
}

TEST(EstimateCli, FitIsMonotonicInTheDeviceAndThePolicy) {
  const std::string base =
      "estimate --preset llama2-7b --dtype bf16-mixed --lora-rank 16 "
      "--policy none,every-layer,full --fit ";
  std::map<std::string, int64_t> last;
  for (const char* size : {"24GiB", "40GiB", "80GiB", "160GiB"}) {
    auto j = run_json(base + size, std::string("estimate_fit_") + size);
    EXPECT_EQ(j["fit"], "batch");
    for (const auto& row : j["policies"]) {
      const std::string policy = row["policy"];
      const int64_t b = row["max_batch"];
      EXPECT_GE(b, last[policy]) << policy << " at " << size;
      last[policy] = b;
    }
    // Keeping less never fits a smaller batch.
    EXPECT_LE(j["policies"][0]["max_batch"].get<int64_t>(),
              j["policies"][1]["max_batch"].get<int64_t>()) << size;
  }
  EXPECT_GT(last["every-layer"], last["none"]);
}

TEST(EstimateCli, FitSeqIsMonotonicAndAMultiple) {
  int64_t last = 0;
  for (const char* size : {"8GiB", "16GiB", "32GiB"}) {
    auto j = run_json(std::string("estimate --model bert --policy every-layer --fit-seq "
                                  "--seq-multiple 128 --fit ") + size,
                      std::string("estimate_fit_seq_") + size);
    EXPECT_EQ(j["fit"], "seq");
    const int64_t s = j["policies"][0]["max_seq"];
    EXPECT_EQ(s % 128, 0) << size;
    EXPECT_GE(s, last) << size;
    last = s;
  }
  EXPECT_GT(last, 0);
}

TEST(EstimateCli, WorkedFineTunePresetPrintsItsFiguresBesideRemats) {
  auto r = run_cli("estimate --preset llama-13b-lora-8k --policy none,every-layer");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("The worked 13B fine-tune's own figures"));
  // The old name is an alias.
  EXPECT_EQ(run_cli("estimate --preset harbor-13b --policy none,every-layer").out, r.out);
  EXPECT_THAT(r.out, HasSubstr("LoRA rank 64"));
  EXPECT_THAT(r.out, HasSubstr("| quantity"));
  EXPECT_THAT(r.out, HasSubstr("| total peak, none | GiB | 74 |"));
  const auto j = run_json("estimate --preset llama-13b-lora-8k --policy none", "worked");
  ASSERT_GE(j["worked_example_comparison"].size(), 10u);
  int with_seed = 0;
  for (const auto& row : j["worked_example_comparison"]) {
    with_seed += !row["seed"].is_null();
    EXPECT_GT(row["remat"].get<double>(), 0) << row;
  }
  EXPECT_GE(with_seed, 7);
}

TEST(EstimateCli, CheckMeasuresASmallModelWithin10Percent) {
  auto j = run_json("estimate --model llama --layers 2 --hidden 64 --heads 4 --kv-heads 2 "
                    "--vocab 128 --seq 64 --batch 2 --threads 1 --policy none,every-layer "
                    "--check",
                    "estimate_check");
  ASSERT_EQ(j["check"].size(), 2u);
  for (const auto& c : j["check"]) {
    EXPECT_LE(std::abs(c["peak_error_percent"].get<double>()), 10.0) << c;
  }
}

TEST(EstimateCli, BadInputGetsOneLineNamingTheFlagAndExitCode2) {
  struct Case {
    std::string args;
    std::string flag;
  };
  for (const auto& c : std::vector<Case>{
           {"estimate --preset gpt5", "--preset"},
           {"estimate --model gpt", "--model"},
           {"estimate --layers 0", "--layers"},
           {"estimate --hidden 770", "--hidden"},
           {"estimate --dtype fp8", "--dtype"},
           {"estimate --attention flash", "--attention"},
           {"estimate --fit 12XB", "--fit"},
           {"estimate --fit-seq", "--fit-seq"},
           {"estimate --policy bogus", "--policy"},
           {"estimate --lora-rank=-1", "--lora-rank"},
           {"estimate --no-such-flag", "--no-such-flag"},
           {"estimate --preset llama-13b-lora-8k --check", "--check"},
       }) {
    auto r = run_cli(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << "\n" << r.err;
    EXPECT_THAT(r.err, StartsWith("remat: error: ")) << c.args;
    EXPECT_THAT(r.err, HasSubstr(c.flag)) << c.args << "\n" << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << c.args << "\n" << r.err;
  }
}

} // namespace
