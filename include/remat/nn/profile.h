// Checkpointing planned to a memory budget for any StagedModel
// (remat/nn/stages.h; remat's Bert and Llama are ones): the model's stages
// (embeddings, each layer, the head with the loss) as
// remat::plan::StageRunners, their cost measured on a real batch
// (remat::plan::profile_stages), and the fastest schedule whose peak fits a budget
// (remat::plan::solve). This file names no model family; a family's step
// (BertStep in bert.h, LlamaStep in llama.h) plugs into the overloads at
// the end.
//
// Budgets are total bytes as remat::memory counts them: everything the
// process holds at the worst moment of a training step (weights, gradients,
// optimizer state, the batch, activations). A profile's base_bytes is what
// is held when it is taken, less the gradients the step frees, plus
// PlanOptions::reserve_bytes for what the step will hold later (AdamW's two
// moments per trainable parameter before the first optimizer step).
//
// The step the planner predicts is the one remat's bench and trainer run:
// gradients set to none, forward, loss, backward (ProfileOptions::gradients
// kZero predicts a loop that zeroes them instead), with no
// reference to the model's output kept through backward. Holding the logits
// of a language model across backward (`auto logits = model->forward(ids);
// ... loss.backward();`) keeps B*S*vocab*4 bytes that nothing else needs;
// compute the loss from a temporary, or reserve those bytes.
//
// Example:
//   // given: auto opts = remat::nn::LlamaOptions().num_layers(8);
//   remat::memory::install();
//   remat::nn::Llama model(opts);
//   auto ids = torch::randint(opts.vocab_size(), {2, 1024});
//   auto plan = remat::nn::plan_checkpointing(*model,
//       remat::nn::StageBatch(ids), model->step_head(ids),
//       int64_t(3) << 30);  // 3 GiB
//   model->gradient_checkpointing_enable(
//       remat::CheckpointPolicy::custom(plan.schedule, "budget:3GiB"));
//   std::cout << plan.str() << "\n";
//   auto loss = model->forward_loss(ids, ids);
//   loss.backward();
//   // Or in one line, planned at the first forward with grad on:
//   model->gradient_checkpointing_enable(
//       remat::CheckpointPolicy::parse("budget:3GiB"));
#pragma once

#include "remat/nn/stages.h"
#include "remat/plan/chain.h"
#include "remat/plan/solver.h"

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace remat {
namespace nn {

/// The model's stages as the profiler runs them: "embeddings" (the
/// embedding stage on `batch`, keeping the side inputs the layers read),
/// "layer.0" ... (each offering the selective modes its stack gives), and
/// "head" (`head.loss`), calling the same code as the model's forward. The
/// runners refer to `model`; they must not outlive it. The first stage's
/// input is batch.input_ids().
std::vector<plan::StageRunner> stage_runners(
    StagedModel& model,
    const StageBatch& batch,
    const StageHead& head);

/// The model's measured cost Chain on this batch and head
/// (remat::plan::profile_stages over stage_runners). Runs each stage warmup +
/// repeats times in each mode; the model's gradients, policy and the CPU
/// generator are left as they were.
///
/// Example:
///   // given: remat::nn::Llama llama(remat::nn::LlamaOptions().num_layers(8));
///   // given: torch::Tensor ids = torch::randint(32000, {2, 1024});  // [B, S]
///   auto chain = remat::nn::profile_model(*llama, remat::nn::StageBatch(ids),
///                                         llama->step_head(ids));
///   std::cout << chain.str();
plan::Chain profile_model(
    StagedModel& model,
    const StageBatch& batch,
    const StageHead& head,
    const plan::ProfileOptions& options = {});

/// Options of plan_checkpointing.
///
/// Example:
///   // given: int64_t trainable_bytes = int64_t(440) << 20;  // fp32 weights
///   auto options =
///       remat::nn::PlanOptions().reserve_bytes(2 * trainable_bytes);  // AdamW
struct PlanOptions {
  TORCH_ARG(plan::ProfileOptions, profile) = {};
  TORCH_ARG(plan::PlannerOptions, planner) = {};
  /// Bytes the step will hold that are not held when planning (optimizer
  /// state not created yet, outputs kept through backward); added to the
  /// profile's base_bytes.
  TORCH_ARG(int64_t, reserve_bytes) = 0;
};

/// Profiles the model on `batch` with `head` and returns the fastest
/// schedule whose predicted peak is at most `budget_bytes` (total bytes).
/// Does not change the model's policy: enable it with
/// CheckpointPolicy::custom(plan.schedule). Throws c10::Error giving the
/// smallest feasible budget (bytes and human-readable) when nothing fits.
///
/// Example:
///   // given: remat::nn::Bert bert(remat::nn::BertOptions().num_layers(4));
///   // given: torch::Tensor ids = torch::randint(30522, {8, 128});  // [B, S]
///   // given: torch::Tensor mask = torch::ones({8, 128}, torch::kLong);
///   auto plan = remat::nn::plan_checkpointing(*bert,
///       remat::nn::StageBatch(ids).attention_mask(mask), bert->step_head(),
///       int64_t(1) << 30);
plan::Plan plan_checkpointing(
    StagedModel& model,
    const StageBatch& batch,
    const StageHead& head,
    int64_t budget_bytes,
    const PlanOptions& options = {});

/// What measured training steps cost.
struct StepMeasurement {
  int64_t base_bytes = 0;       ///< bytes held when the step began
  int64_t peak_bytes = 0;       ///< bytes, the most held during a step
  int64_t activation_bytes = 0; ///< bytes held after forward and loss,
                                ///< above base_bytes
  double step_seconds = 0;      ///< seconds, median over the timed steps
};

/// Runs `warmup + steps` training steps (`loss_of_step`: forward and loss;
/// then backward) with the model's current policy, as the planner predicts
/// them (remat::nn::measured_step, remat/nn/step.h): before each step the
/// gradients are reset as `gradients` says (kNone: freed; kZero: zeroed in
/// place, allocated where missing), and the output is dropped once the loss
/// is computed. Peaks and
/// held bytes are the largest over the timed steps. Leaves the last step's
/// gradients in `.grad`. Needs remat::memory::install().
///
/// Example:
///   // given: remat::nn::Llama model(remat::nn::LlamaOptions().num_layers(8));
///   // given: torch::Tensor ids = torch::randint(32000, {2, 1024});  // [B, S]
///   auto m = remat::nn::measure_step(*model,
///       [&] { return model->forward_loss(ids, ids); }, 3);
StepMeasurement measure_step(
    torch::nn::Module& model,
    const std::function<torch::Tensor()>& loss_of_step,
    int64_t steps = 1,
    int64_t warmup = 0,
    plan::GradientReset gradients = plan::GradientReset::kNone);

// ---------------------------------------------------------------------------
// A family's own step. remat::nn::BertStep and remat::nn::LlamaStep (and a
// step of your own) give batch() -> StageBatch, head(model) -> StageHead and
// forward_loss(model) -> the loss of forward as training runs it; these
// overloads take such a step, with the model or its module holder.
//
// Example:
//   // given: remat::nn::Bert bert(remat::nn::BertOptions().num_layers(4));
//   // given: remat::nn::Llama llama(remat::nn::LlamaOptions().num_layers(8));
//   // given: torch::Tensor ids = torch::randint(30522, {8, 128});  // [B, S]
//   auto chain = remat::nn::profile_model(bert, remat::nn::BertStep(ids));
//   auto plan = remat::nn::plan_checkpointing(*llama,
//       remat::nn::LlamaStep(ids), int64_t(3) << 30);
//   auto m = remat::nn::measure_step(*llama, remat::nn::LlamaStep(ids), 3);

/// profile_model on the step's batch and head.
template <typename Model, typename Step>
auto profile_model(Model& model, const Step& step, const plan::ProfileOptions& options = {})
    -> decltype(step.head(model), plan::Chain()) {
  return profile_model(model, step.batch(), step.head(model), options);
}
template <typename Impl, typename Step>
auto profile_model(
    torch::nn::ModuleHolder<Impl>& model,
    const Step& step,
    const plan::ProfileOptions& options = {}) -> decltype(step.head(*model), plan::Chain()) {
  return profile_model(*model, step, options);
}

/// plan_checkpointing on the step's batch and head; `budget_bytes` total
/// bytes.
template <typename Model, typename Step>
auto plan_checkpointing(
    Model& model,
    const Step& step,
    int64_t budget_bytes,
    const PlanOptions& options = {}) -> decltype(step.head(model), plan::Plan()) {
  return plan_checkpointing(model, step.batch(), step.head(model), budget_bytes, options);
}
template <typename Impl, typename Step>
auto plan_checkpointing(
    torch::nn::ModuleHolder<Impl>& model,
    const Step& step,
    int64_t budget_bytes,
    const PlanOptions& options = {}) -> decltype(step.head(*model), plan::Plan()) {
  return plan_checkpointing(*model, step, budget_bytes, options);
}

/// measure_step of the step's forward_loss.
template <typename Model, typename Step>
auto measure_step(
    Model& model,
    const Step& step,
    int64_t steps = 1,
    int64_t warmup = 0,
    plan::GradientReset gradients = plan::GradientReset::kNone)
    -> decltype(step.forward_loss(model), StepMeasurement()) {
  return measure_step(
      model, [&] { return step.forward_loss(model); }, steps, warmup, gradients);
}

} // namespace nn
} // namespace remat
