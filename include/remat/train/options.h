// The options of a training run (TrainOptions): the model and its batch as
// one nn::ModelConfig, the data, the optimizer, the schedule and the run,
// their checks, their JSON (saved with every training state), and what a
// resumed run may change.
//
// Example:
//   auto o = remat::train::TrainOptions()
//       .task(remat::train::Task::kCausalLm)
//       .train_path("corpus.jsonl")
//       .policy(remat::CheckpointPolicy::parse("budget:2GiB"));
//   o.model().layers(8).hidden(512).heads(8).kv_heads(2).seq(1024).batch(4);
//   o.validate();                  // remat::FieldError("kv_heads") ...
//   auto j = o.to_json();          // what a training state keeps
#pragma once

#include "remat/field_error.h"
#include "remat/nn/model_config.h"
#include "remat/plan/shape_plans.h"
#include "remat/policy.h"
#include "remat/train/lr_schedule.h"

#include <nlohmann/json_fwd.hpp>
#include <torch/arg.h>
#include <torch/types.h>

#include <cstdint>
#include <string>
#include <vector>

namespace remat {
namespace train {

/// What is trained: the family of TrainOptions::model.
enum class Task {
  kClassification, ///< BERT + linear head on the pooler output, BCE loss
  kCausalLm,       ///< Llama decoder, next-token cross-entropy
};
/// The model family a task trains: BERT for classification, Llama for LM.
plan::Family family_of(Task task);
const char* to_string(Task task);
/// "classify" or "lm"; throws c10::Error naming the text.
Task parse_task(const std::string& text);

/// How a budget policy (budget:SIZE) is planned for batches of many shapes.
enum class BudgetPlans {
  /// A plan per batch shape (rows x a length bucket), made when the shape
  /// first comes and kept in a bounded cache (remat/plan/shape_plans.h): a
  /// short batch recomputes less than a long one, and a shape no schedule
  /// fits runs as smaller micro-batches. The run is refused at the start
  /// only when one row of its longest document fits no schedule.
  kPerShape,
  /// One plan, made at the start for the worst shape (the micro-batch rows
  /// x seq, or the longest rows a token budget allows): every batch runs
  /// it. Data-parallel runs always plan this way (their ranks must
  /// recompute in step).
  kWorstCase,
};
/// "per-shape" or "worst-case".
const char* to_string(BudgetPlans plans);
/// Throws c10::Error naming the text.
BudgetPlans parse_budget_plans(const std::string& text);

/// Everything that defines a run. Field names are those of the `remat train`
/// flags with '_' for '-' (batch -> --batch, valid_fraction ->
/// --valid-fraction), and validate()'s messages start with them.
///
/// The model and its batch are one nn::ModelConfig (remat/nn/model_config.h),
/// the description every command builds from: its family is the task (BERT
/// for classify, Llama for lm), its seq is the tokens per row and its batch
/// the rows per micro-batch. Here its defaults are a small model: 4 layers,
/// hidden 128, 4 heads, seq 64, batch 16, dropout 0. Its vocab, 0 by default,
/// is the tokenizer's; set, it is the embedding's rows, and a tokenizer of
/// another size is refused.
///
/// Example:
///   auto options = remat::train::TrainOptions()
///       .task(remat::train::Task::kCausalLm)
///       .train_path("corpus.jsonl").max_steps(100);
///   options.model().layers(2).hidden(64).heads(4).dtype(torch::kBFloat16);
struct TrainOptions {
  TrainOptions();

  /// The model and its batch. Setting it sets the task too (its family).
  TORCH_ARG(nn::ModelConfig, model);

 public:
  /// Classification trains a BERT, LM a Llama: model().family().
  Task task() const;
  /// Sets model().family() to the task's.
  TrainOptions& task(Task task);

  // ---- data
  /// JSONL: {"text": ..., "labels": [...]} (classification) or {"text": ...};
  /// or pre-tokenized, {"input_ids": [...]} (any tokenizer; the model's
  /// vocabulary, model().vocab() or the init_dir folder's, must hold every
  /// id).
  TORCH_ARG(std::string, train_path);
  /// Validation JSONL; empty: split valid_fraction off the training file.
  TORCH_ARG(std::string, valid_path);
  /// Share of the training file held out when valid_path is empty (0: no
  /// validation). The split depends only on `seed`.
  TORCH_ARG(double, valid_fraction) = 0.1;
  /// The tokenizer (remat/io/tokenizer.h): a tokenizer.json (BPE), a
  /// SentencePiece .model, or a BERT vocab.txt (WordPiece); empty: the
  /// init_dir folder's, else byte-level tokens (259 ids).
  TORCH_ARG(std::string, vocab_path);
  /// Micro-batches per optimizer step: a step sees batch * accumulate rows,
  /// and its gradient equals that of one batch of that size.
  TORCH_ARG(int64_t, accumulate) = 1;
  TORCH_ARG(int64_t, epochs) = 3;
  /// Optimizer steps in the run; 0: epochs decide.
  TORCH_ARG(int64_t, max_steps) = 0;
  /// Token budget of a step (0: off, every step takes batch * accumulate
  /// documents). On, documents are bucketed by length and a step takes as
  /// many as fit: rows * its longest row's tokens <= max_tokens, at most
  /// batch * accumulate rows, split into micro-batches of batch rows, so
  /// short documents make wide steps and long ones narrow steps
  /// (train::DataLoaderOptions::max_tokens). At least seq.
  TORCH_ARG(int64_t, max_tokens) = 0;
  /// Language modelling: several documents per row of seq tokens, each
  /// attending only to itself with its positions starting at 0, so each
  /// document's loss is what it would be alone in a row
  /// (train::DataLoaderOptions::pack, nn::Llama's packed documents). Not
  /// with max_tokens.
  TORCH_ARG(bool, pack) = false;
  /// Pads every row to seq tokens (train::DataLoaderOptions::pad_to_max_len)
  /// instead of to its batch's longest row: one batch shape, so one budget
  /// plan, at the cost of computing on padding.
  TORCH_ARG(bool, pad_to_seq) = false;

  // ---- model (the sizes are model()'s)
  /// A Hugging Face folder (config.json + model.safetensors) to start from;
  /// its config replaces model()'s sizes (its seq, batch, dtype, attention
  /// and dropout stay).
  TORCH_ARG(std::string, init_dir);
  TORCH_ARG(CheckpointPolicy, policy) = CheckpointPolicy::every_layer();
  /// How a budget policy is planned (see BudgetPlans). May change on resume.
  TORCH_ARG(BudgetPlans, budget_plans) = BudgetPlans::kPerShape;
  /// Per-shape plans: the share of the run's time (planning + steps), in
  /// [0, 1], that planning may take; past it a new shape runs under a kept
  /// plan for a larger shape, which bounds its peak too, and is planned
  /// when it comes again within the share (0: only shapes no plan covers
  /// are planned; 1: every shape; plan::ShapePlansOptions::plan_share).
  /// May change on resume.
  TORCH_ARG(double, plan_share) = plan::ShapePlansOptions(1).plan_share();

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
  /// Throws remat::FieldError naming the field ("batch", "accumulate") for
  /// an invalid setting: the model's through nn::ModelConfig::validate(),
  /// the run's with messages that start with the field ("accumulate:
  /// expected a value >= 1, but got 0").
  void validate() const;
  /// One flat object: the model's fields under their flags' names
  /// ("layers", "seq", "dtype": "fp32"), the run's beside them. The keys of
  /// states saved before a field existed are read with its default.
  nlohmann::json to_json() const;
  /// Throws c10::Error naming the field when one is missing or mistyped.
  static TrainOptions from_json(const nlohmann::json& j);
};

/// Checks that a run with `resumed` options may continue a state saved by a
/// run with `saved` ones: every field that shapes the loss curve (data,
/// model, optimizer, schedule, seed, policy, ...) is equal; out_dir,
/// save_every, eval_every, compare_policy, compare_steps, memory_timeline,
/// threads, budget_plans, plan_share and max_bad_steps may differ. Throws c10::Error starting with the first field
/// that differs ("batch: the state in 'PATH' was saved by a run with 8, but
/// this run has 4; ..."); `path` names the state in the message.
void check_resume_options(
    const TrainOptions& saved,
    const TrainOptions& resumed,
    const std::string& path);

} // namespace train
} // namespace remat
