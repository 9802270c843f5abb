// Fine-tuning with activation checkpointing, end to end: multi-label
// classification with a BERT encoder, or causal language modelling with a
// Llama decoder, from JSONL files. AdamW with weight decay, warm-up then
// decay, gradient clipping, gradient accumulation, BF16 autocast on CPU,
// LoRA, any checkpoint policy, evaluation, and a training state saved
// atomically so that a killed run resumes on exactly the same loss curve.
// The loop with its saves, resume and callbacks is run_training
// (remat/train/run.h); `remat train` is a thin command line over both.
//
// Example (the library; the CLI does the same):
//   auto options = remat::train::TrainOptions()
//       .train_path("data/routing/train.jsonl")
//       .valid_path("data/routing/valid.jsonl")
//       .vocab_path("data/routing/vocab.txt")
//       .policy(remat::CheckpointPolicy::every_layer())
//       .epochs(3).out_dir("runs/routing").save_every(50);
//   remat::train::TrainCallbacks cb;
//   cb.on_step = [](const remat::train::StepRecord& r, int64_t total) {
//     std::cout << r.step << "/" << total << " " << r.loss << "\n";
//   };
//   remat::train::Trainer trainer(options);
//   while (trainer.step_count() < trainer.total_steps()) {
//     auto r = trainer.step();
//     cb.on_step(r, trainer.total_steps());
//   }
//   std::cout << trainer.evaluate().macro_f1 << "\n";
#pragma once

#include "remat/train/options.h"
#include "remat/train/records.h"

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace torch {
namespace nn {
class Module;
}
} // namespace torch

namespace remat {
namespace dist {
class ProcessGroup;
}
namespace train {

class Trainer;

/// Things a caller may want to hear about while a run goes on.
struct TrainCallbacks {
  /// After every optimizer step; `total` is the run's step count.
  std::function<void(const StepRecord&, int64_t total)> on_step;
  std::function<void(const EvalRecord&)> on_eval;
  /// After every step of the comparison run.
  std::function<void(const StepRecord&, int64_t total)> on_compare_step;
  /// After a state was saved (its path and step).
  std::function<void(const std::string&, int64_t step)> on_save;
  /// Free text: what is being loaded, resumed, compared.
  std::function<void(const std::string&)> on_message;
  /// Before the first step of training (after a resume: before the first
  /// new step); history() then holds what the run recorded so far.
  std::function<void(const Trainer&)> on_start;
  /// After the final evaluation and state save: export, reports.
  std::function<void(Trainer&)> on_end;
};

/// The end of a run.
struct TrainResult {
  History history;
  EvalRecord final_eval; ///< step 0 and no scores when there is no validation
  bool has_eval = false;
  int64_t steps = 0;
  int64_t parameters = 0;           ///< parameters of the model
  int64_t trainable_parameters = 0; ///< those that require grad
};

/// One training run in memory: data, model, optimizer, schedule. Step by
/// step control; run_training() is the whole loop.
///
/// Example:
///   // given: auto options = remat::train::TrainOptions().max_steps(100);
///   remat::train::Trainer t(options);
///   while (t.step_count() < t.total_steps()) {
///     auto r = t.step();
///   }
///   auto e = t.evaluate();
class Trainer {
 public:
  /// Reads the data, builds the model (seeded with options.seed()) and the
  /// optimizer. Throws c10::Error for invalid options, files that cannot be
  /// read, or an --init folder that does not fit. The trainer keeps a CPU
  /// random stream of its own (dropout draws from it): trainers in one
  /// process do not disturb each other, and the caller's generator is left
  /// as it was.
  ///
  /// With a `group` of more than one rank the trainer is data-parallel: the
  /// options must equal rank 0's (checked; the fields that may change on
  /// resume excepted, but for max_bad_steps, which every rank needs to stop
  /// at the same step), the weights are broadcast from rank 0, each rank
  /// computes rows rank, rank + world, ... of each global batch of
  /// batch * accumulate rows, and the gradients are summed across the ranks
  /// (each rank's loss is scaled by its share of the global batch), so
  /// steps, losses and weights equal those of one process. Dropout masks
  /// differ from one process's, as the rows of a micro-batch do.
  explicit Trainer(
      TrainOptions options,
      std::shared_ptr<dist::ProcessGroup> group = nullptr);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  /// One optimizer step over batch * accumulate rows; appended to history().
  /// A NaN or infinite loss or gradient norm skips the update and returns a
  /// record with `skipped` set (TrainOptions::max_bad_steps); step() never
  /// stops for it: run_training does. Data parallel: every rank skips the
  /// same steps (the loss is summed over the ranks first, so one rank's NaN
  /// is every rank's, and the gradient norm is that of the summed
  /// gradients).
  StepRecord step();
  /// Scores on the validation set (grad off, dropout off); appended to
  /// history(). Leaves the RNG and the model's training mode as they were.
  EvalRecord evaluate();
  bool has_validation() const;

  /// Runs one forward and backward on the next batch without changing
  /// anything (weights, gradients, RNG, data position) and returns the
  /// bytes held after each layer's forward and backward.
  MemoryTimeline memory_timeline();

  /// Saves the training state to state_path(dir).
  void save_state(const std::string& dir);
  /// Continues from a state written by save_state. Throws c10::Error when
  /// the file is damaged or was written for other options (naming the
  /// first field that differs); the trainer is then unchanged.
  void load_state(const std::string& path);

  /// Writes dir/model.safetensors and dir/config.json in Hugging Face's
  /// layout (BertForSequenceClassification or LlamaForCausalLM), LoRA
  /// adapters merged, and dir/vocab.txt when there is one. Atomic per file.
  void save_model(const std::string& dir) const;

  /// One line: the model, its parameters, the data, steps per epoch.
  std::string summary() const;
  int64_t step_count() const;
  int64_t total_steps() const;
  int64_t steps_per_epoch() const;
  int64_t epoch() const; ///< epoch of the next batch
  const TrainOptions& options() const;
  History& history();
  const History& history() const;
  torch::nn::Module& model();
  int64_t parameter_count() const;
  int64_t trainable_parameter_count() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// The options of the run whose training state is in `out_dir`, to resume
/// it. Throws remat::FieldError("resume") when there is no state, and
/// c10::Error when it cannot be read (naming the previous state when that
/// one is readable, so the user can fall back on it).
///
/// Example:
///   auto saved = remat::train::saved_run_options("runs/a");
///   auto o = remat::train::TrainOptions(saved).max_steps(2000);
///   remat::train::check_resume_options(saved, o,
///       remat::train::state_path("runs/a"));
TrainOptions saved_run_options(const std::string& out_dir);

/// Reads the files a run with `options` reads (the training set, the
/// validation set, the vocabulary, the --init folder's config.json) the way
/// training reads them, so that a malformed one is refused before any
/// training (or any worker) starts. Throws remat::FieldError naming the
/// option ("train_path", "valid_path", "vocab_path", "init_dir") with the
/// reader's one-line message.
void check_run_files(const TrainOptions& options);

} // namespace train
} // namespace remat
