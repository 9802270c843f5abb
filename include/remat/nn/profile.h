// Checkpointing planned to a memory budget for remat's models: the stages of
// a Bert or Llama (embeddings, each layer, the head with the loss) as
// remat::plan::StageRunners, their cost measured on a real batch
// (remat::plan::profile), and the fastest schedule whose peak fits a budget
// (remat::plan::solve).
//
// Budgets are total bytes as remat::memory counts them: everything the
// process holds at the worst moment of a training step (weights, gradients,
// optimizer state, the batch, activations). A profile's base_bytes is what
// is held when it is taken, plus the gradients not allocated yet, plus
// PlanOptions::reserve_bytes for what the step will hold later (AdamW's two
// moments per trainable parameter before the first optimizer step).
//
// The step the planner predicts is the usual one: forward, loss, backward,
// with gradients allocated (zeroed, not dropped, between steps) and no
// reference to the model's output kept through backward. Holding the logits
// of a language model across backward (`auto logits = model->forward(ids);
// ... loss.backward();`) keeps B*S*vocab*4 bytes that nothing else needs;
// compute the loss from a temporary, or reserve those bytes.
//
// Example:
//   remat::memory::install();
//   remat::nn::Llama model(opts);
//   auto ids = torch::randint(opts.vocab_size(), {2, 1024});
//   auto plan = remat::nn::plan_checkpointing(model, remat::nn::LlamaStep(ids),
//                                             int64_t(3) << 30);  // 3 GiB
//   model->gradient_checkpointing_enable(
//       remat::CheckpointPolicy::custom(plan.schedule, "budget:3GiB"));
//   std::cout << plan.str() << "\n";
//   auto loss = model->loss(model->forward(ids), ids);
//   loss.backward();
//   // Or in one line, planned at the first forward with grad on:
//   model->gradient_checkpointing_enable(
//       remat::CheckpointPolicy::parse("budget:3GiB"));
#pragma once

#include "remat/nn/bert.h"
#include "remat/nn/llama.h"
#include "remat/plan/chain.h"
#include "remat/plan/solver.h"

#include <torch/arg.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace remat {
namespace nn {

/// The loss of a Bert training step, from the model's output.
using BertLoss = std::function<torch::Tensor(const BertOutput&)>;

/// The default BertLoss: mean of squares of the last hidden state plus that
/// of the pooler output, a stand-in for a light head. A heavier head (a
/// masked-LM head over the vocabulary) should be passed as BertStep::loss.
torch::Tensor default_bert_loss(const BertOutput& output);

/// One training step's batch and loss for a Bert.
///
/// Example:
///   remat::nn::BertStep(input_ids).attention_mask(mask).loss(
///       [&](const remat::nn::BertOutput& o) {
///         return torch::mse_loss(o.last_hidden_state, target);
///       })
struct BertStep {
  explicit BertStep(torch::Tensor input_ids) : input_ids_(std::move(input_ids)) {}
  TORCH_ARG(torch::Tensor, input_ids);            ///< [B, S] int64
  TORCH_ARG(torch::Tensor, attention_mask) = {};  ///< [B, S], 1 keep / 0 pad;
                                                  ///< undefined: keep all
  TORCH_ARG(torch::Tensor, token_type_ids) = {};  ///< [B, S]; undefined: 0
  TORCH_ARG(BertLoss, loss) = nullptr;            ///< empty: default_bert_loss
};

/// One training step's batch for a Llama; the loss is LlamaImpl::forward_loss's
/// (no [B, S, vocab] logits kept).
///
/// Example:
///   remat::nn::LlamaStep(input_ids).labels(labels)
struct LlamaStep {
  explicit LlamaStep(torch::Tensor input_ids) : input_ids_(std::move(input_ids)) {}
  TORCH_ARG(torch::Tensor, input_ids);            ///< [B, S] int64
  TORCH_ARG(torch::Tensor, attention_mask) = {};  ///< [B, S], 1 keep / 0 pad;
                                                  ///< undefined: keep all
  TORCH_ARG(torch::Tensor, labels) = {};          ///< [B, S]; undefined:
                                                  ///< input_ids (next token)
};

/// The model's stages as the profiler runs them: "embeddings" (with the
/// attention mask, and for Llama the rotary tables, that the layers read),
/// "layer.0" ... (each offering kRecomputeAttention and kRecomputeMlp), and
/// "head" (Bert: pooler and loss; Llama: final norm, LM head and loss),
/// calling the same module code as forward. The runners refer to `model`
/// and the step's tensors; they must not outlive them. The first stage's
/// input is step.input_ids().
std::vector<plan::StageRunner> stage_runners(BertImpl& model, const BertStep& step);
std::vector<plan::StageRunner> stage_runners(LlamaImpl& model, const LlamaStep& step);

/// The model's measured cost Chain on this batch (remat::plan::profile over
/// stage_runners). Runs each stage warmup + repeats times in each mode; the
/// model's gradients, policy and the CPU generator are left as they were.
///
/// Example:
///   auto chain = remat::nn::profile_model(*bert, remat::nn::BertStep(ids));
///   std::cout << chain.str();
plan::Chain profile_model(
    BertImpl& model,
    const BertStep& step,
    const plan::ProfileOptions& options = {});
plan::Chain profile_model(
    LlamaImpl& model,
    const LlamaStep& step,
    const plan::ProfileOptions& options = {});
inline plan::Chain profile_model(
    Bert& model, const BertStep& step, const plan::ProfileOptions& options = {}) {
  return profile_model(*model, step, options);
}
inline plan::Chain profile_model(
    Llama& model, const LlamaStep& step, const plan::ProfileOptions& options = {}) {
  return profile_model(*model, step, options);
}

/// Options of plan_checkpointing.
///
/// Example:
///   remat::nn::PlanOptions().reserve_bytes(2 * trainable_bytes)  // AdamW
struct PlanOptions {
  TORCH_ARG(plan::ProfileOptions, profile) = {};
  TORCH_ARG(plan::PlannerOptions, planner) = {};
  /// Bytes the step will hold that are not held when planning (optimizer
  /// state not created yet, outputs kept through backward); added to the
  /// profile's base_bytes.
  TORCH_ARG(int64_t, reserve_bytes) = 0;
};

/// Profiles the model on the step's batch and returns the fastest schedule
/// whose predicted peak is at most `budget_bytes` (total bytes). Does not
/// change the model's policy: enable it with
/// CheckpointPolicy::custom(plan.schedule). Throws c10::Error giving the
/// smallest feasible budget (bytes and human-readable) when nothing fits.
///
/// Example:
///   auto plan = remat::nn::plan_checkpointing(*bert,
///       remat::nn::BertStep(ids).attention_mask(mask), int64_t(1) << 30);
plan::Plan plan_checkpointing(
    BertImpl& model,
    const BertStep& step,
    int64_t budget_bytes,
    const PlanOptions& options = {});
plan::Plan plan_checkpointing(
    LlamaImpl& model,
    const LlamaStep& step,
    int64_t budget_bytes,
    const PlanOptions& options = {});
inline plan::Plan plan_checkpointing(
    Bert& model, const BertStep& step, int64_t budget_bytes,
    const PlanOptions& options = {}) {
  return plan_checkpointing(*model, step, budget_bytes, options);
}
inline plan::Plan plan_checkpointing(
    Llama& model, const LlamaStep& step, int64_t budget_bytes,
    const PlanOptions& options = {}) {
  return plan_checkpointing(*model, step, budget_bytes, options);
}

/// What measured training steps cost.
struct StepMeasurement {
  int64_t base_bytes = 0;       ///< bytes held when the step began
  int64_t peak_bytes = 0;       ///< bytes, the most held during a step
  int64_t activation_bytes = 0; ///< bytes held after forward and loss,
                                ///< above base_bytes
  double step_seconds = 0;      ///< seconds, median over the timed steps
};

/// Runs `warmup + steps` training steps (forward, loss, backward) with the
/// model's current policy, as the planner predicts them: before each step
/// every trainable parameter's gradient is zeroed in place (allocated where
/// missing), and the output is dropped once the loss is computed. Peaks and
/// held bytes are the largest over the timed steps. Leaves the last step's
/// gradients in `.grad`.
///
/// Example:
///   auto m = remat::nn::measure_step(*model, remat::nn::LlamaStep(ids), 3);
StepMeasurement measure_step(
    BertImpl& model,
    const BertStep& step,
    int64_t steps = 1,
    int64_t warmup = 0);
StepMeasurement measure_step(
    LlamaImpl& model,
    const LlamaStep& step,
    int64_t steps = 1,
    int64_t warmup = 0);

} // namespace nn
} // namespace remat
