// What a person (or a script) sees of a training run while it goes on: a
// progress bar rewritten in place on a terminal, plain lines otherwise, and
// a JSONL file with one line per step and per evaluation.
//
// Example:
//   // given: remat::train::TrainCallbacks cb;  // remat/train/trainer.h
//   remat::train::Progress progress(stderr, isatty(2), /*log_every=*/10);
//   remat::train::MetricsLog metrics("run.jsonl");
//   cb.on_start = [&](const remat::train::Trainer& t) {
//     metrics.start(t.history());
//   };
//   cb.on_step = [&](const remat::train::StepRecord& r, int64_t total) {
//     progress.step(r, total, "train");
//     metrics.step(r);
//   };
#pragma once

#include "remat/train/trainer.h"

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

namespace remat {
namespace train {

/// Step-by-step progress for people.
class Progress {
 public:
  /// `terminal`: draw one bar rewritten in place (step/total, loss,
  /// tokens/s, peak memory, ETA); otherwise print a plain line every
  /// `log_every` steps and on the first and last.
  Progress(std::FILE* stream, bool terminal, int64_t log_every = 10);

  /// A step of the phase `phase` ("train", "compare none").
  void step(const StepRecord& record, int64_t total, const std::string& phase);
  /// A line of its own (an evaluation, a message), above the bar.
  void line(const std::string& text);
  /// Ends the bar's line.
  void finish();

 private:
  void clear_bar();

  std::FILE* stream_;
  bool terminal_;
  int64_t log_every_;
  bool bar_shown_ = false;
  std::string phase_;
  int64_t phase_steps_ = 0;
  std::chrono::steady_clock::time_point phase_start_;
  std::string last_bar_;
};

/// "1:05", "12:00:03"
std::string format_duration(double seconds);

/// One line for an evaluation: "eval step 63: loss 0.21 macro-F1 0.91 (finance 0.95 ...)".
std::string describe_eval(const EvalRecord& e, const std::vector<std::string>& label_names);

/// JSONL metrics: {"type": "step", ...} per optimizer step (StepRecord's
/// fields), {"type": "eval", ...} per evaluation (EvalRecord's, plus "f1":
/// {label: score}), {"type": "compare_step", ...} per step of the comparison
/// run. Each line is flushed as it is written.
class MetricsLog {
 public:
  explicit MetricsLog(std::string path);

  /// Writes what `history` holds (atomically, replacing the file: a resumed
  /// run's file then holds exactly the steps its state knows, none of those
  /// a killed run wrote after its last save), then appends from there on.
  void start(const History& history);
  void step(const StepRecord& record);
  void eval(const EvalRecord& record);

  const std::string& path() const {
    return path_;
  }

 private:
  std::string eval_line(const EvalRecord& record) const;
  void append(const std::string& line);

  std::string path_;
  std::vector<std::string> label_names_;
  std::ofstream out_;
};

} // namespace train
} // namespace remat
