// A training run as a program runs it: its options made ready (a new run's
// data found, a resumed run's options read back and checked), the files it
// writes checked before it starts, and the run itself with its progress,
// JSONL metrics, HTML report and model export wired to it. `remat train` is
// flags and printing over this; the loop alone, with callbacks instead of
// outputs, is run_training.
//
// Example (summary_text is in remat/train/summary.h):
//   using namespace remat::train;
//   auto options =
//       new_run_options(TrainOptions().max_steps(20), /*hold_out=*/false);
//   options.validate();
//   check_run_files(options);
//   auto outputs =
//       RunOutputs().metrics_path("run.jsonl").report_path("run.html");
//   check_run_outputs(options, outputs);
//   auto result = run_with_outputs(options, outputs);
//   std::cout << summary_text(result, options)
//             << outputs_text(result, options, outputs);
#pragma once

#include "remat/train/trainer.h"

#include <torch/arg.h>

#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace remat {
namespace dist {
class ProcessGroup;
} // namespace dist

namespace train {

/// The whole run: the comparison run when options.compare_policy() is set
/// (not on resume), training with evaluation every eval_every steps or
/// epoch, state saves every save_every steps and at the end, a final
/// evaluation. With `resume`, continues from state_path(out_dir).
///
/// A bad step (TrainOptions::max_bad_steps) is said through on_message
/// (describe_skipped_step) after on_step; a save that falls on a bad step
/// waits for the next good one, so that the saved state is always that of a
/// good step. After more than max_bad_steps bad steps in a row it throws a
/// c10::Error ("max_bad_steps: expected at most 3 bad steps in a row, but
/// got 4 (step 15: loss is nan); ...") naming the last state saved, which
/// is left as it is.
///
/// With a `group` of more than one rank (see Trainer): every rank runs the
/// same loop in lockstep, only rank 0 saves the state and hears the
/// callbacks, and on resume every rank reads rank 0's state file (out_dir
/// must be reachable from every rank). A rank that dies or hangs makes the
/// others throw a c10::Error within the group's timeout.
TrainResult run_training(
    const TrainOptions& options,
    const TrainCallbacks& callbacks = {},
    bool resume = false,
    std::shared_ptr<dist::ProcessGroup> group = nullptr);


/// The folder of the bundled document-routing data set (train.jsonl,
/// valid.jsonl, vocab.txt): data/routing in the current folder or one
/// above it, else in the running program's folder or one above it, else in
/// one of `also` (as given, e.g. the source tree the program was built
/// from). Empty when there is none.
std::string find_bundled_data(const std::vector<std::string>& also = {});

/// The options of a new run: `options`, its empty data paths filled from
/// the bundled data set (find_bundled_data(data_search)) when it names no
/// training file; the validation file too unless `hold_out` (the caller
/// asked for a share of the training file instead), the vocabulary when it
/// names none. Throws remat::FieldError("train_path") when it names no
/// training file and there is no bundled data, and FieldError("out_dir")
/// when out_dir already holds a training state (a new run would overwrite
/// it).
TrainOptions new_run_options(
    TrainOptions options,
    bool hold_out,
    const std::vector<std::string>& data_search = {});

/// The options of a run continuing the one in `out_dir`: its saved options
/// (saved_run_options), changed by `change` (what the caller gives anew),
/// with out_dir set, checked to keep everything that shapes the loss curve
/// (check_resume_options). Throws what those throw.
///
/// Example:
///   auto o = remat::train::resumed_run_options("runs/a",
///       [](remat::train::TrainOptions o) { return o.max_steps(2000); });
TrainOptions resumed_run_options(
    const std::string& out_dir,
    const std::function<TrainOptions(TrainOptions)>& change = {});

/// What a run writes besides its state (TrainOptions::out_dir), and how it
/// shows its progress. Empty paths write nothing.
struct RunOutputs {
  using Stream = std::FILE*; // TORCH_ARG spells `const T&`: a pointer needs a name
  /// JSONL, one line per step and evaluation (MetricsLog).
  TORCH_ARG(std::string, metrics_path);
  /// Self-contained HTML report (write_report); the run's options need
  /// memory_timeline(true) for its memory chart.
  TORCH_ARG(std::string, report_path);
  /// Folder for the trained model, Hugging Face layout (Trainer::save_model).
  TORCH_ARG(std::string, save_dir);
  /// Where progress lines and the bar go (Progress).
  TORCH_ARG(Stream, progress_stream) = stderr;
  /// Draw a progress bar rewritten in place, not plain lines.
  TORCH_ARG(bool, terminal) = false;
  TORCH_ARG(int64_t, log_every) = 10; ///< steps between plain lines, >= 1
};

/// Checks, before any training, that the run can write where it will:
/// the metrics and report files' folders exist and neither is a folder
/// (FieldError "metrics", "report"); out_dir and save_dir are folders,
/// created when missing (FieldError "out_dir", "save").
void check_run_outputs(const TrainOptions& options, const RunOutputs& outputs);

/// run_training with its progress, metrics, report and export wired (the
/// outputs checked first by check_run_outputs, which makes the folders):
/// progress lines and the bar go to outputs.progress_stream (rank 0 alone
/// draws a bar), each step and evaluation to the metrics file, and at the
/// end rank 0 exports the model and writes the report. The bar's line is
/// ended before anything is thrown, so an error gets a line of its own.
TrainResult run_with_outputs(
    const TrainOptions& options,
    const RunOutputs& outputs,
    bool resume = false,
    std::shared_ptr<dist::ProcessGroup> group = nullptr);

/// "state: DIR/state.safetensors (step N)", "model: DIR/model.safetensors,
/// config.json", "metrics: PATH", "report: PATH": one line for each thing
/// the run wrote, in that order; lines end in "\n".
std::string outputs_text(
    const TrainResult& result,
    const TrainOptions& options,
    const RunOutputs& outputs);

} // namespace train
} // namespace remat
