// A run as a program runs it (remat/train/run.h): a new run finds the
// bundled data and refuses to overwrite a state, a resumed run keeps what
// shapes its loss curve, the outputs are checked before training, and the
// run writes its metrics, report and model.
#include "remat/train/run.h"

#include "remat/model_sizes.h"
#include "remat/train/train_state.h"
#include "testing.h"
#include "temp_dir.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

namespace {

namespace fs = std::filesystem;
using namespace remat::train;

const std::string kData = std::string(REMAT_SOURCE_DIR) + "/data/routing";

TrainOptions tiny() {
  return TrainOptions()
      .train_path(kData + "/train.jsonl")
      .vocab_path(kData + "/vocab.txt")
      .valid_fraction(0.05)
      .model(remat::nn::ModelConfig().layers(1).hidden(16).heads(2).seq(32).batch(8).dropout(0))
      .max_steps(3)
      .eval_every(2)
      .threads(1);
}

std::string temp_dir(const std::string& name) {
  return remat_test::fresh_temp_dir("train_run_" + name, /*create=*/false);
}

// The field of the FieldError `f` throws, and its message.
template <typename F>
std::pair<std::string, std::string> field_error(F&& f) {
  try {
    f();
  } catch (const remat::FieldError& e) {
    return {e.field(), e.what_without_backtrace()};
  }
  return {"<nothing thrown>", ""};
}

TEST(TrainRun, ANewRunWithoutDataTakesTheBundledSet) {
  const auto dir = find_bundled_data();
  ASSERT_FALSE(dir.empty());
  EXPECT_TRUE(fs::exists(dir + "/train.jsonl"));
  EXPECT_EQ(fs::path(dir).filename(), "routing");

  const auto o = new_run_options(TrainOptions(), /*hold_out=*/false);
  EXPECT_EQ(o.train_path(), dir + "/train.jsonl");
  EXPECT_EQ(o.valid_path(), dir + "/valid.jsonl");
  EXPECT_EQ(o.vocab_path(), dir + "/vocab.txt");
  // A share of the training set held out instead of the bundled validation.
  EXPECT_EQ(new_run_options(TrainOptions(), /*hold_out=*/true).valid_path(), "");
  // Data given: nothing is filled in.
  const auto mine = new_run_options(TrainOptions().train_path("a.jsonl"), false);
  EXPECT_EQ(mine.train_path(), "a.jsonl");
  EXPECT_EQ(mine.valid_path(), "");
  EXPECT_EQ(mine.vocab_path(), "");
}

TEST(TrainRun, ANewRunRefusesAFolderHoldingAState) {
  const auto dir = temp_dir("holds_state");
  TrainState s;
  s.info = {{"step", 7}};
  save_train_state(dir, s);
  const auto [field, what] =
      field_error([&] { new_run_options(tiny().out_dir(dir), false); });
  EXPECT_EQ(field, "out_dir");
  EXPECT_EQ(what, "'" + dir + "' already holds a training state (step 7); pass --resume to "
                  "continue it, or choose another folder");
  EXPECT_EQ(new_run_options(tiny().out_dir(dir + "/fresh"), false).out_dir(), dir + "/fresh");
}

TEST(TrainRun, OutputsAreCheckedBeforeTraining) {
  const auto dir = temp_dir("outputs");
  fs::create_directories(dir);
  auto [field, what] = field_error([&] {
    check_run_outputs(tiny(), RunOutputs().metrics_path(dir + "/no/such/m.jsonl"));
  });
  EXPECT_EQ(field, "metrics");
  EXPECT_EQ(what, "cannot write '" + dir + "/no/such/m.jsonl': its folder does not exist");
  std::tie(field, what) =
      field_error([&] { check_run_outputs(tiny(), RunOutputs().report_path(dir)); });
  EXPECT_EQ(field, "report");
  EXPECT_EQ(what, "'" + dir + "' is a folder, expected a file");
  std::ofstream(dir + "/file") << "x";
  std::tie(field, what) =
      field_error([&] { check_run_outputs(tiny(), RunOutputs().save_dir(dir + "/file/m")); });
  EXPECT_EQ(field, "save");
  EXPECT_NE(what.find("cannot create the folder '" + dir + "/file/m'"), std::string::npos);
  // Folders that do not exist yet are made.
  check_run_outputs(tiny().out_dir(dir + "/state"), RunOutputs().save_dir(dir + "/model"));
  EXPECT_TRUE(fs::is_directory(dir + "/state"));
  EXPECT_TRUE(fs::is_directory(dir + "/model"));
}

TEST(TrainRun, WritesMetricsReportModelAndSaysWhere) {
  const auto dir = temp_dir("outputs_written");
  fs::create_directories(dir);
  const auto options = tiny().out_dir(dir + "/state").memory_timeline(true);
  std::FILE* progress = std::tmpfile();
  ASSERT_NE(progress, nullptr);
  const auto outputs = RunOutputs()
                           .metrics_path(dir + "/m.jsonl")
                           .report_path(dir + "/r.html")
                           .save_dir(dir + "/model")
                           .progress_stream(progress)
                           .log_every(1);
  check_run_outputs(options, outputs);
  const auto result = run_with_outputs(options, outputs);
  EXPECT_EQ(result.steps, 3);
  EXPECT_TRUE(fs::exists(dir + "/r.html"));
  EXPECT_TRUE(fs::exists(dir + "/model/model.safetensors"));
  std::ifstream metrics(dir + "/m.jsonl");
  int lines = 0;
  for (std::string line; std::getline(metrics, line);) {
    ++lines;
  }
  EXPECT_EQ(lines, 3 + 2); // the steps, the evaluation at step 2 and the final one

  // Plain lines (no terminal): the steps and the state saved at the end.
  std::rewind(progress);
  std::string text;
  for (int c; (c = std::fgetc(progress)) != EOF;) {
    text += static_cast<char>(c);
  }
  std::fclose(progress);
  EXPECT_NE(text.find("saved " + state_path(dir + "/state") + " at step 3"), std::string::npos)
      << text;

  EXPECT_EQ(outputs_text(result, options, outputs),
            "state: " + state_path(dir + "/state") + " (step 3)\n" + "model: " + dir +
                "/model/model.safetensors, config.json\n" + "metrics: " + dir +
                "/m.jsonl\n" + "report: " + dir + "/r.html\n");
  EXPECT_EQ(outputs_text(result, tiny(), RunOutputs()), "");

  // Resumed: the saved options, changed where a run may change them.
  const auto resumed = resumed_run_options(
      dir + "/state", [](TrainOptions o) { return o.eval_every(1).out_dir("elsewhere"); });
  EXPECT_EQ(resumed.out_dir(), dir + "/state");
  EXPECT_EQ(resumed.eval_every(), 1);
  EXPECT_EQ(resumed.model().hidden(), 16);
  EXPECT_THROW_WITH(
      resumed_run_options(dir + "/state",
                          [](TrainOptions o) { o.model().batch(4); return o; }),
      "batch: the state in '" + state_path(dir + "/state") +
          "' was saved by a run with 8, but this run has 4");
  const auto [field, what] = field_error([&] { resumed_run_options(dir + "/none"); });
  EXPECT_EQ(field, "resume");
}

} // namespace
