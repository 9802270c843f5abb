// The model behind each training task, behind one interface: the trainer's
// loop does not care whether it trains a BERT classifier or a Llama LM.
#pragma once

#include "remat/nn/model_config.h"
#include "remat/nn/stages.h"
#include "remat/plan/chain.h"
#include "remat/plan/solver.h"
#include "remat/policy.h"
#include "remat/train/data.h"
#include "remat/train/trainer.h"

#include <torch/nn/module.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace remat {
namespace train {

/// Called at each point of an instrumented step with the point's label.
using Sample = std::function<void(const std::string&)>;

class TaskModel {
 public:
  virtual ~TaskModel() = default;

  virtual torch::nn::Module& module() = 0;
  virtual const torch::nn::Module& module() const = 0;
  virtual void set_policy(const CheckpointPolicy& policy) = 0;
  /// The model as stages (remat/nn/stages.h): what planning and the
  /// instrumented step run.
  virtual nn::StagedModel& staged() = 0;
  /// The head of this task's training step on `batch`: from the last
  /// layer's hidden state to the task's loss (the loss() of that batch).
  virtual nn::StageHead stage_head(const Batch& batch) = 0;
  /// A batch of `batch` rows of `seq` tokens shaped as this task's: zeros
  /// (they draw no random numbers, and token values do not change what a
  /// step costs), every token kept.
  virtual Batch planning_batch(int64_t batch, int64_t seq) const = 0;

  /// This task's step on micro-batches of `batch` rows of `seq` tokens,
  /// planned to `budget_bytes` (total bytes; remat::nn::plan_checkpointing
  /// over staged() with stage_head), `reserve_bytes` (bytes) added for what
  /// training holds later (AdamW's moments before the first update, the
  /// gradients of earlier micro-batches), its stages profiled as `profile`
  /// says. Throws, giving the smallest feasible budget, when nothing fits.
  plan::Plan plan_budget(
      int64_t budget_bytes,
      int64_t batch,
      int64_t seq,
      int64_t reserve_bytes,
      const plan::ProfileOptions& profile = {});
  /// "remat::nn::Bert(layers=4, ...) + classifier(128 -> 4)"
  virtual std::string describe() const = 0;

  /// What the loss of a batch is a mean over: rows (classification) or
  /// predicted tokens (causal LM). Micro-batch losses are weighted by it.
  virtual int64_t loss_units(const Batch& batch) const = 0;
  /// The mean loss of `batch` as a float32 scalar; `logits` gets the
  /// model's output when not null.
  virtual torch::Tensor loss(const Batch& batch, torch::Tensor* logits = nullptr) = 0;
  /// loss(), run stage by stage through staged() and stage_head(), with
  /// `sample` called after the embeddings, after each layer's forward (and
  /// recompute) and after the loss, and hooks that call it when the
  /// gradient reaches each layer's input in backward.
  torch::Tensor instrumented_loss(const Batch& batch, const Sample& sample);
  /// The projections LoRA adapts when no targets are given.
  virtual std::vector<std::string> default_lora_targets() const = 0;
  /// Loads a Hugging Face folder's weights (the model was built from its
  /// config by make_task_model). Returns a line saying what was loaded.
  virtual std::string load_pretrained(const std::string& dir) = 0;
  /// Writes model.safetensors and config.json (adapters merged into a copy).
  virtual void save_pretrained(
      const std::string& dir,
      const std::vector<std::string>& label_names) const = 0;
};

/// The model options.task() trains, as the one model description: BERT
/// for classification, Llama for LM, `vocab_size` the tokenizer's.
nn::ModelConfig model_config(const TrainOptions& options, int64_t vocab_size);

/// Asks the estimator for the smallest peak of a training step of `config`
/// (a lower bound: no optimizer state, the least LoRA when `lora`), and
/// throws remat::FieldError("memory_limit") naming it when it is above
/// `limit_bytes` (bytes). make_task_model calls it before building.
int64_t check_step_fits(const nn::ModelConfig& config, bool lora, int64_t limit_bytes);

/// Builds the model of options.task(): from options' sizes, or from
/// init_dir/config.json when options.init_dir() is set. `vocab_size` is the
/// tokenizer's, or with `pretokenized` data the largest id + 1 (then an
/// --init model need only hold them); `num_labels` is for classification.
std::unique_ptr<TaskModel> make_task_model(
    const TrainOptions& options,
    int64_t vocab_size,
    int64_t num_labels,
    bool pretokenized = false);

} // namespace train
} // namespace remat
