// `remat train` as a user runs it: one-line errors with exit code 2, the
// metrics file, the HTML report, the LM task, export.
#include "cli_runner.h"
#include "remat/train/train_state.h"
#include "testing.h"
#include "temp_dir.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>

#include <sys/wait.h>
#include <unistd.h>

namespace {

namespace fs = std::filesystem;
using remat::test::run_cli;
using remat::test::slurp;
using ::testing::HasSubstr;
using ::testing::StartsWith;

const std::string kTiny =
    "train --layers 1 --hidden 16 --heads 2 --seq 32 --batch 8 --valid-fraction 0.05 "
    "--threads 1 ";

std::string temp_dir(const std::string& name) {
  return remat_test::fresh_temp_dir("train_cli_" + name, /*create=*/true);
}

void write(const std::string& path, const std::string& text) {
  std::ofstream(path) << text;
}

TEST(TrainCli, BadInputGetsOneLineNamingTheFlagOrFileAndExitCode2) {
  const auto dir = temp_dir("bad");
  write(dir + "/broken.jsonl", "{\"text\": \"ok\", \"labels\": [\"a\"]}\n{\"text\": \"no\n");
  write(dir + "/empty.jsonl", "\n");
  struct Case {
    std::string args;
    std::string text;
  };
  // Each case costs a process start (about a second here, loading
  // LibTorch); the library's own checks of every field are in trainer_test.
  for (const auto& c : std::vector<Case>{
           {"train --no-such-flag", "--no-such-flag"},
           {"train --train " + dir + "/absent.jsonl", "--train: cannot read '" + dir +
                                                          "/absent.jsonl'"},
           {"train --train /dev/null",
            "--train: cannot read '/dev/null': expected a regular file, but it is a "
            "character device"},
           {"train --train " + dir + "/broken.jsonl", "broken.jsonl:2"},
           {"train --train " + dir + "/empty.jsonl", "--train"},
           {"train --accumulate 0", "--accumulate: expected a value >= 1, but got 0"},
           {"train --hidden 30 --heads 4", "--hidden: expected hidden (30) to be a multiple of heads (4)"},
           {"train --policy bogus", "--policy"},
           {"train --compare-policy every-0", "--compare-policy"},
           {"train --dtype f16", "--dtype"},
           {"train --save-every 5", "--save-every: expected an out_dir"},
           {"train --max-bad-steps -1", "--max-bad-steps: expected a value >= 0, but got -1"},
           {"train --resume", "--resume: expected --out DIR"},
           {"train --init " + dir + "/nothing", "--init"},
           {"train --metrics " + dir + "/no/such/folder/m.jsonl", "--metrics: cannot write"},
           {"train --out " + dir + "/broken.jsonl", "--out: cannot create the folder"},
           {"train --pack", "--pack: expected the lm task"},
           {"train --task lm --max-tokens 10", "--max-tokens: expected at least seq (64) tokens"},
           {"train --task lm --pack --max-tokens 128", "--pack: expected no max_tokens"},
           {"train --budget-plans sometimes",
            "--budget-plans: expected per-shape or worst-case, but got 'sometimes'"},
           {"train --plan-share 2",
            "--plan-share: expected a share in [0, 1] of the run's time, but got 2"},
           {"train --vocab 10000000000", "--vocab: expected a vocabulary size in [0, 4194304]"},
       }) {
    auto r = run_cli(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << "\n" << r.err;
    EXPECT_THAT(r.err, StartsWith("remat: error: ")) << c.args;
    EXPECT_THAT(r.err, HasSubstr(c.text)) << c.args << "\n" << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << c.args << "\n" << r.err;
  }
}

// Points of every <polyline class="series"> in the chart with `id`.
std::vector<size_t> polyline_sizes(const std::string& html, const std::string& id) {
  std::vector<size_t> sizes;
  const auto start = html.find("<svg class=\"chart\" id=\"" + id + "\"");
  if (start == std::string::npos) {
    return sizes;
  }
  const auto end = html.find("</svg>", start);
  const std::string svg = html.substr(start, end - start);
  std::regex poly("<polyline class=\"series\"[^>]* points=\"([^\"]*)\"");
  for (auto it = std::sregex_iterator(svg.begin(), svg.end(), poly);
       it != std::sregex_iterator(); ++it) {
    std::istringstream points((*it)[1].str());
    std::string p;
    size_t n = 0;
    while (points >> p) {
      EXPECT_TRUE(std::regex_match(p, std::regex("-?[0-9.]+,-?[0-9.]+"))) << p;
      ++n;
    }
    sizes.push_back(n);
  }
  return sizes;
}

void expect_report(const std::string& html) {
  EXPECT_THAT(html, StartsWith("<!DOCTYPE html>"));
  EXPECT_THAT(html, HasSubstr("</html>"));
  // Self-contained: nothing is fetched.
  EXPECT_EQ(html.find("<script src"), std::string::npos);
  EXPECT_EQ(html.find("<link"), std::string::npos);
  EXPECT_EQ(html.find("http://"), std::string::npos);
  EXPECT_EQ(html.find("https://"), std::string::npos);
  // Two series (the policy and the compared one) with a point per step.
  EXPECT_EQ(polyline_sizes(html, "loss"), (std::vector<size_t>{4, 3, 1}));
  EXPECT_EQ(polyline_sizes(html, "memory"), (std::vector<size_t>{4, 3}));
  EXPECT_EQ(polyline_sizes(html, "time"), (std::vector<size_t>{4, 3}));
  auto timeline = polyline_sizes(html, "timeline");
  ASSERT_EQ(timeline.size(), 2u);
  // Recomputes make the checkpointed step's timeline longer.
  EXPECT_GT(timeline[1], timeline[0]);
  EXPECT_THAT(html, HasSubstr("recompute layer 0"));
  EXPECT_THAT(html, HasSubstr("<b id=\"max-loss-diff\">0</b>"));
}

TEST(TrainCli, WritesMetricsAndASelfContainedReport) {
  const auto dir = temp_dir("report");
  auto r = run_cli(kTiny + "--max-steps 4 --dropout 0.1 --compare-policy none --compare-steps 3 "
                           "--metrics " + dir + "/m.jsonl --report " + dir + "/r.html --save " +
                   dir + "/model");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // What a person reads: the comparison with its largest difference.
  EXPECT_THAT(r.out, HasSubstr("largest |loss difference|: 0\n"));
  EXPECT_THAT(r.out, HasSubstr("validation: eval step 4"));
  EXPECT_THAT(r.out, HasSubstr("macro-F1"));
  // Not a terminal: plain lines, no carriage returns.
  EXPECT_EQ(r.err.find('\r'), std::string::npos);
  EXPECT_THAT(r.err, HasSubstr("train every-layer step 4/4"));

  std::istringstream lines(slurp(dir + "/m.jsonl"));
  std::string line;
  int steps = 0, evals = 0, compares = 0;
  while (std::getline(lines, line)) {
    auto j = nlohmann::json::parse(line);
    if (j["type"] == "step") {
      ++steps;
      for (const char* key : {"step", "epoch", "loss", "lr", "tokens_per_s", "peak_bytes",
                              "step_seconds", "grad_norm"}) {
        EXPECT_TRUE(j.contains(key)) << key;
      }
      EXPECT_EQ(j["step"], steps);
      EXPECT_GT(j["peak_bytes"].get<int64_t>(), 0);
      if (steps <= 3) {
        EXPECT_EQ(j["loss_diff"].get<double>(), 0.0);
      }
    } else if (j["type"] == "eval") {
      ++evals;
      EXPECT_TRUE(j.contains("macro_f1"));
      EXPECT_EQ(j["f1"].size(), 4u);
      EXPECT_TRUE(j["f1"].contains("spam"));
      EXPECT_TRUE(j.contains("loss"));
    } else {
      EXPECT_EQ(j["type"], "compare_step");
      EXPECT_EQ(j["policy"], "none");
      ++compares;
    }
  }
  EXPECT_EQ(steps, 4);
  EXPECT_EQ(evals, 1);
  EXPECT_EQ(compares, 3);

  expect_report(slurp(dir + "/r.html"));
}

// What a browser sees: the DOM after parsing. The page has no script, so
// this is the same page; the check is that it parses into the same charts.
TEST(TrainCli, ReportRendersInHeadlessChromium) {
  ASSERT_TRUE(fs::exists("/usr/bin/chromium"))
      << "expected Debian's chromium at /usr/bin/chromium (scripts/setup installs it)";
  const auto dir = temp_dir("chromium");
  auto r = run_cli(kTiny + "--max-steps 4 --compare-policy none --compare-steps 3 --report " +
                   dir + "/r.html");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string cmd = "/usr/bin/chromium --headless --no-sandbox --disable-gpu "
                          "--dump-dom file://" + dir + "/r.html > " + dir +
                          "/dom.html 2>/dev/null";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  const auto dom = slurp(dir + "/dom.html");
  EXPECT_EQ(polyline_sizes(dom, "loss"), (std::vector<size_t>{4, 3, 1}));
  EXPECT_EQ(polyline_sizes(dom, "memory"), (std::vector<size_t>{4, 3}));
  EXPECT_EQ(polyline_sizes(dom, "timeline").size(), 2u);
}

TEST(TrainCli, ExportsAHuggingFaceFolderThatInitReads) {
  const auto dir = temp_dir("export");
  auto r = run_cli(kTiny + "--max-steps 2 --lora-rank 2 --save " + dir + "/model");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto config = nlohmann::json::parse(slurp(dir + "/model/config.json"));
  EXPECT_EQ(config["problem_type"], "multi_label_classification");
  EXPECT_EQ(config["num_hidden_layers"], 1);
  EXPECT_TRUE(fs::exists(dir + "/model/model.safetensors"));
  // No adapter names in the export: they were merged.
  EXPECT_EQ(slurp(dir + "/model/model.safetensors").find("lora_"), std::string::npos);
  auto again = run_cli("train --threads 1 --valid-fraction 0.05 --max-steps 1 --init " + dir +
                       "/model");
  EXPECT_EQ(again.exit_code, 0) << again.err;
  EXPECT_THAT(again.err, HasSubstr("with its classifier head"));
}

TEST(TrainCli, TrainsALanguageModelOnBytes) {
  const auto dir = temp_dir("lm");
  std::string text;
  for (int i = 0; i < 40; ++i) {
    text += "{\"text\": \"the cat sat on the mat number " + std::to_string(i) + "\"}\n";
  }
  write(dir + "/corpus.jsonl", text);
  auto r = run_cli("train --task lm --train " + dir + "/corpus.jsonl --layers 1 --hidden 32 "
                   "--heads 4 --kv-heads 2 --seq 48 --batch 4 --accumulate 2 --max-steps 3 "
                   "--dtype bf16 --threads 1 --policy every-layer");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("remat::nn::Llama(layers=1"));
  EXPECT_THAT(r.err, HasSubstr("vocab=259")); // bytes and three special ids
  EXPECT_THAT(r.out, HasSubstr("perplexity"));
}

// --device: refused in one line (exit 2) where it cannot run, before any
// data is read. Runs on every build.
TEST(TrainCli, DeviceThatIsNotThereIsRefusedInOneLine) {
  const bool have_gpu = remat_test::no_cuda_reason().empty();
  for (const std::string& device : {std::string(have_gpu ? "cuda:99" : "cuda"), std::string("gpu")}) {
    auto r = run_cli(kTiny + "--max-steps 1 --device " + device);
    EXPECT_EQ(r.exit_code, 2) << device << "\n" << r.err;
    EXPECT_THAT(r.err, StartsWith("remat: error: --device: ")) << device;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << device << "\n" << r.err;
  }
}

// On a GPU: a short run on cuda:0 in fp32 and bf16, its peaks the CUDA
// allocator's, and the same losses whatever the policy.
TEST(TrainCli, CudaTrainsAndReportsCudaPeaks) {
  REMAT_REQUIRE_CUDA();
  for (const std::string dtype : {"f32", "bf16"}) {
    const auto dir = temp_dir("cuda_" + dtype);
    auto r = run_cli(kTiny + "--max-steps 3 --dropout 0.1 --device cuda --dtype " + dtype +
                     " --compare-policy none --compare-steps 2 --metrics " + dir + "/m.jsonl");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_THAT(r.out, HasSubstr("on cuda:0"));
    EXPECT_THAT(r.out, HasSubstr("largest |loss difference|: "));
    std::istringstream lines(slurp(dir + "/m.jsonl"));
    std::string line;
    int steps = 0;
    while (std::getline(lines, line)) {
      auto j = nlohmann::json::parse(line);
      if (j["type"] == "step") {
        ++steps;
        EXPECT_GT(j["peak_bytes"].get<int64_t>(), 0) << line;
        EXPECT_TRUE(std::isfinite(j["loss"].get<double>())) << line;
      }
    }
    EXPECT_EQ(steps, 3);
  }
}

// A learning rate of 1e30 throws the weights so far in one step that their
// products overflow, so from the second step on the loss is NaN: each bad
// step is skipped and said, and the run stops after --max-bad-steps of them
// in a row, keeping the state of the last good step. At its start it also
// removed what a killed save had left in --out, and nothing else.
TEST(TrainCli, NonFiniteLossesAreSkippedThenStopTheRunKeepingTheGoodState) {
  const auto dir = temp_dir("bad_steps");
  const pid_t child = ::fork();
  if (child == 0) {
    ::_exit(0);
  }
  ::waitpid(child, nullptr, 0); // a pid no process has
  const std::string stale = dir + "/out/state.safetensors.tmp." + std::to_string(child);
  const std::string live = dir + "/out/state.safetensors.tmp." + std::to_string(::getpid());
  fs::create_directories(dir + "/out");
  write(stale, "half a state");
  write(live, "a save going on");
  auto r = run_cli(kTiny + "--max-steps 6 --lr 1e30 --max-bad-steps 1 --out " + dir +
                   "/out --save-every 1 --metrics " + dir + "/m.jsonl");
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_THAT(r.err, HasSubstr("removed " + stale + ", left by a save that was killed\n"));
  EXPECT_FALSE(fs::exists(stale));
  EXPECT_TRUE(fs::exists(live));
  EXPECT_THAT(r.err, HasSubstr("step 2: loss is "));
  EXPECT_THAT(r.err, HasSubstr("; update skipped (1 of 1 allowed in a row)\n"));
  EXPECT_THAT(r.err, HasSubstr("\nremat: error: max_bad_steps: expected at most 1 bad steps in a "
                               "row, but got 2 (step 3: loss is "));
  EXPECT_THAT(r.err, HasSubstr("); training stopped, the last state saved, " + dir +
                               "/out/state.safetensors (step 1), is left as it is\n"));
  EXPECT_EQ(remat::train::peek_train_state_step(dir + "/out/state.safetensors"), 1);
  std::istringstream lines(slurp(dir + "/m.jsonl"));
  std::string line;
  std::vector<bool> skipped;
  while (std::getline(lines, line)) {
    auto j = nlohmann::json::parse(line);
    if (j["type"] == "step") {
      skipped.push_back(j.value("skipped", false));
    }
  }
  EXPECT_EQ(skipped, (std::vector<bool>{false, true, true}));
}

// Two ranks on two GPUs over NCCL give the losses of one process.
TEST(TrainCli, CudaDataParallelOverNccl) {
  REMAT_REQUIRE_CUDA();
  if (remat_test::cuda_device_count() < 2) {
    GTEST_SKIP() << "needs 2 GPUs for --nproc 2 on CUDA (one per rank), but "
                 << remat_test::cuda_device_count() << " is visible";
  }
  auto r = run_cli(kTiny + "--max-steps 3 --device cuda --nproc 2");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("data parallel: 2 ranks"));
}

} // namespace
