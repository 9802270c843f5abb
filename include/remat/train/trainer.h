// Fine-tuning with activation checkpointing, end to end: multi-label
// classification with a BERT encoder, or causal language modelling with a
// Llama decoder, from JSONL files. AdamW with weight decay, warm-up then
// decay, gradient clipping, gradient accumulation, BF16 autocast on CPU,
// LoRA, any checkpoint policy, evaluation, and a training state saved
// atomically so that a killed run resumes on exactly the same loss curve.
// `remat train` is a thin command line over this header.
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
//   auto result = remat::train::run_training(options, cb);
//   std::cout << result.final_eval.macro_f1 << "\n";
//   // After a crash: the same options, resume = true.
//   remat::train::run_training(options, cb, /*resume=*/true);
#pragma once

#include "remat/policy.h"
#include "remat/train/lr_schedule.h"

#include <nlohmann/json_fwd.hpp>
#include <torch/arg.h>
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

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

/// What is trained.
enum class Task {
  kClassification, ///< BERT + linear head on the pooler output, BCE loss
  kCausalLm,       ///< Llama decoder, next-token cross-entropy
};
const char* to_string(Task task);
/// "classify" or "lm"; throws c10::Error naming the text.
Task parse_task(const std::string& text);

/// Everything that defines a run. Field names are those of the `remat train`
/// flags with '_' for '-' (batch -> --batch, valid_fraction ->
/// --valid-fraction), and validate()'s messages start with them.
///
/// Example:
///   auto options = remat::train::TrainOptions()
///       .task(remat::train::Task::kCausalLm)
///       .train_path("corpus.jsonl").layers(2).hidden(64).heads(4)
///       .max_steps(100).dtype(torch::kBFloat16);
struct TrainOptions {
  TORCH_ARG(Task, task) = Task::kClassification;

  // ---- data
  /// JSONL: {"text": ..., "labels": [...]} (classification) or {"text": ...}.
  TORCH_ARG(std::string, train_path);
  /// Validation JSONL; empty: split valid_fraction off the training file.
  TORCH_ARG(std::string, valid_path);
  /// Share of the training file held out when valid_path is empty (0: no
  /// validation). The split depends only on `seed`.
  TORCH_ARG(double, valid_fraction) = 0.1;
  /// BERT vocab.txt for WordPiece; empty: byte-level tokens (259 ids).
  TORCH_ARG(std::string, vocab_path);
  /// Tokens per row, special tokens included; longer texts are cut.
  TORCH_ARG(int64_t, seq) = 64;
  /// Rows per micro-batch (one forward and backward).
  TORCH_ARG(int64_t, batch) = 16;
  /// Micro-batches per optimizer step: a step sees batch * accumulate rows,
  /// and its gradient equals that of one batch of that size.
  TORCH_ARG(int64_t, accumulate) = 1;
  TORCH_ARG(int64_t, epochs) = 3;
  /// Optimizer steps in the run; 0: epochs decide.
  TORCH_ARG(int64_t, max_steps) = 0;

  // ---- model
  TORCH_ARG(int64_t, layers) = 4;
  TORCH_ARG(int64_t, hidden) = 128;
  TORCH_ARG(int64_t, heads) = 4;
  /// Key/value heads of the Llama decoder (0: heads).
  TORCH_ARG(int64_t, kv_heads) = 0;
  /// MLP width; 0: 4 * hidden (BERT) or the multiple of 8 nearest to
  /// 8/3 * hidden (Llama).
  TORCH_ARG(int64_t, intermediate) = 0;
  /// Hidden and attention dropout (BERT), attention dropout (Llama). The
  /// default suits the small models trained from scratch here (measured on
  /// data/routing, 3 epochs of batch 32: macro-F1 0.91 without dropout,
  /// 0.23 with 0.1); fine-tuning a pretrained BERT usually takes 0.1.
  TORCH_ARG(double, dropout) = 0.0;
  /// A Hugging Face folder (config.json + model.safetensors) to start from;
  /// its config replaces the model sizes above.
  TORCH_ARG(std::string, init_dir);
  TORCH_ARG(CheckpointPolicy, policy) = CheckpointPolicy::every_layer();
  /// torch::kFloat, or torch::kBFloat16 for BF16 autocast (weights, optimizer
  /// state and gradients stay float32).
  TORCH_ARG(torch::Dtype, dtype) = torch::kFloat;

  // ---- optimizer
  TORCH_ARG(double, lr) = 1e-3;
  /// AdamW's decoupled weight decay; biases and LayerNorm weights get none.
  TORCH_ARG(double, weight_decay) = 0.01;
  /// Warm-up steps; -1: 10% of the run.
  TORCH_ARG(int64_t, warmup) = -1;
  TORCH_ARG(LrScheduleKind, schedule) = LrScheduleKind::kLinear;
  /// Largest global L2 norm of the gradients (0: no clipping).
  TORCH_ARG(double, clip) = 1.0;

  // ---- LoRA (rank 0: full fine-tuning)
  TORCH_ARG(int64_t, lora_rank) = 0;
  TORCH_ARG(double, lora_alpha) = 16.0;
  /// Projections to adapt; empty: query,value (BERT) or q_proj,v_proj (Llama).
  TORCH_ARG(std::vector<std::string>, lora_targets) = {};

  // ---- run
  /// Seeds the weights, the data order, the split and dropout.
  TORCH_ARG(uint64_t, seed) = 0;
  /// Evaluate every N steps (0: at the end of each epoch); always at the end.
  TORCH_ARG(int64_t, eval_every) = 0;
  /// Where the training state goes (empty: nowhere).
  TORCH_ARG(std::string, out_dir);
  /// Save the state every N steps (0: only at the end); needs out_dir.
  TORCH_ARG(int64_t, save_every) = 0;
  /// Before training, run compare_steps steps under this policy from the
  /// same initial state, seed and data, and report the per-step loss
  /// difference from the training run's first steps.
  TORCH_ARG(c10::optional<CheckpointPolicy>, compare_policy) = c10::nullopt;
  TORCH_ARG(int64_t, compare_steps) = 20;
  /// Record the bytes held after each layer's forward and backward of one
  /// step (for the report); does not change the training run.
  TORCH_ARG(bool, memory_timeline) = false;
  /// Intra-op threads (0: every core).
  TORCH_ARG(int64_t, threads) = 0;
  /// Where the model, its batches and its optimizer state live: "cpu",
  /// "cuda" or "cuda:N" (remat/device.h). With data parallelism on CUDA,
  /// rank r trains on cuda:(r % the GPUs visible) whatever the index given,
  /// and its ProcessGroup uses NCCL. step_bytes, peaks and timelines are the
  /// device's (on CUDA, the caching allocator's allocated bytes); --dtype
  /// bf16 autocasts on that device.
  TORCH_ARG(std::string, device) = "cpu";
  /// Bad steps in a row that a run goes on after. A step whose loss or
  /// gradient norm (before clipping) is NaN or infinite is a bad step: its
  /// update is skipped (gradients dropped; weights and AdamW state, its step
  /// counts included, stay as they were), but it still counts as a step (its
  /// batch is used up, the step counter and the learning-rate schedule move
  /// on), so that the run keeps its length and data order. run_training says
  /// so in one line, and at the (max_bad_steps + 1)-th bad step in a row
  /// stops with a c10::Error, saving nothing more (0: at the first bad
  /// step). A good step starts the count again. May change on resume.
  TORCH_ARG(int64_t, max_bad_steps) = 3;

 public:
  /// Throws c10::Error whose message starts with the field's name ("batch:
  /// expected a value >= 1, but got 0") for an invalid setting.
  void validate() const;
  nlohmann::json to_json() const;
  /// Throws c10::Error naming the field when one is missing or mistyped.
  static TrainOptions from_json(const nlohmann::json& j);
};

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

class TaskModel; // the model of a task (src/train/task.h)

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

/// Checks that a run with `resumed` options may continue a state saved by a
/// run with `saved` ones: every field that shapes the loss curve (data,
/// model, optimizer, schedule, seed, policy, ...) is equal; out_dir,
/// save_every, eval_every, compare_policy, compare_steps, memory_timeline,
/// threads and max_bad_steps may differ. Throws c10::Error starting with the first field
/// that differs ("batch: the state in 'PATH' was saved by a run with 8, but
/// this run has 4; ..."); `path` names the state in the message.
void check_resume_options(
    const TrainOptions& saved,
    const TrainOptions& resumed,
    const std::string& path);

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
/// `stop_after_step` > 0 ends the process with _exit(137) right after that
/// step, before anything else is saved: a deterministic stand-in for a
/// kill, for tests.
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
    int64_t stop_after_step = 0,
    std::shared_ptr<dist::ProcessGroup> group = nullptr);

} // namespace train
} // namespace remat
