// What a training run records: a record per optimizer step and per
// evaluation, memory timelines, and the history they make up, each with its
// JSON (the training state keeps the history; --metrics writes the records
// one per line).
//
// Example:
//   remat::train::History h;
//   remat::train::StepRecord r;
//   r.step = 1;
//   r.loss = 2.3;
//   h.steps.push_back(r);
//   auto back = remat::train::History::from_json(h.to_json());
#pragma once

#include <c10/util/Optional.h>
#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace remat {
namespace train {

/// One optimizer step.
struct StepRecord {
  int64_t step = 0;  ///< 1-based: the number of optimizer steps taken
  int64_t epoch = 0; ///< 0-based epoch the step's batch came from
  double loss = 0;   ///< training loss of the step's whole batch
  double lr = 0;
  double grad_norm = 0;      ///< before clipping
  int64_t tokens = 0;        ///< real (unpadded) tokens in the step
  double tokens_per_s = 0;
  int64_t peak_bytes = 0;    ///< remat::memory::peak_bytes() during the step
  double step_seconds = 0;   ///< forward, backward and optimizer, in seconds
  std::string policy;
  /// This rank's batch as it ran: rows of row_tokens tokens each (padded),
  /// in micro_batches micro-batches.
  int64_t rows = 0;
  int64_t row_tokens = 0;
  int64_t micro_batches = 0;
  /// Budget policies (budget:SIZE) only, else empty and 0: the shape its
  /// plan was made for ("4x520": micro-batches of 4 rows, planned at 520
  /// tokens a row; "2x520+grads" for the micro-batches after the first,
  /// which hold the first's gradients), its schedule
  /// ("recompute[0,2) store[2,4)"), its predicted peak (bytes; the largest
  /// over the step's micro-batches, comparable with peak_bytes) and the
  /// seconds spent planning since the step before (shapes this step met
  /// first; the first step's include the plan made at the start), which
  /// step_seconds leaves out. Several plans in one step are joined with
  /// " | ". `covered`: the micro-batches that ran under a plan made for a
  /// larger shape than their own bucket, as planning was over its share
  /// (TrainOptions::plan_share).
  std::string planned;
  std::string schedule;
  int64_t predicted_peak_bytes = 0;
  double plan_seconds = 0;
  int64_t covered = 0;
  /// Data parallel: bytes of gradient whose all-reduce started during the
  /// last backward (overlapped), and after it, in GradReducer::reduce().
  int64_t reduced_in_backward_bytes = 0;
  int64_t reduced_after_backward_bytes = 0;
  /// Loss of the same step in the comparison run, when there is one.
  c10::optional<double> compare_loss;
  /// A bad step: the loss or grad_norm is NaN or infinite, and the update
  /// was skipped (see TrainOptions::max_bad_steps).
  bool skipped = false;
  /// Bad steps in a row up to this one, this one included (0: a good step).
  int64_t skipped_in_a_row = 0;

  nlohmann::json to_json() const;
  static StepRecord from_json(const nlohmann::json& j);
};

/// The line that says a step was skipped, with its step number and the
/// value that was not finite: "step 12: loss is nan; update skipped (1 of 3
/// allowed in a row)", or "step 7: gradient norm is inf (loss 2.303); update
/// skipped (...)". `max_bad_steps` is TrainOptions::max_bad_steps.
std::string describe_skipped_step(const StepRecord& record, int64_t max_bad_steps);

/// One evaluation on the validation set.
struct EvalRecord {
  int64_t step = 0;
  int64_t epoch = 0;
  double loss = 0; ///< mean over rows (classification) or tokens (LM)
  /// Classification only.
  double macro_f1 = 0;
  double micro_f1 = 0;
  std::vector<double> per_label_f1;
  /// Causal LM only: exp(loss).
  double perplexity = 0;

  nlohmann::json to_json() const;
  static EvalRecord from_json(const nlohmann::json& j);
};

/// Bytes held at one point of an instrumented training step.
struct TimelinePoint {
  std::string label; ///< "forward layer 3", "backward layer 3", ...
  int64_t bytes = 0; ///< remat::memory::current_bytes()
};

/// The memory timeline of one step under one policy.
struct MemoryTimeline {
  std::string policy;
  std::vector<TimelinePoint> points;

  nlohmann::json to_json() const;
  static MemoryTimeline from_json(const nlohmann::json& j);
};

/// What a run has recorded so far; saved with the training state.
struct History {
  std::vector<StepRecord> steps;
  std::vector<EvalRecord> evals;
  /// The comparison run's steps (see TrainOptions::compare_policy).
  std::string compare_policy;
  std::vector<StepRecord> compare_steps;
  std::vector<MemoryTimeline> timelines;
  std::vector<std::string> label_names; ///< classification only

  /// Largest |loss - compare_loss| over the compared steps (-1: none).
  double max_compare_diff() const;

  nlohmann::json to_json() const;
  static History from_json(const nlohmann::json& j);
};

} // namespace train
} // namespace remat
