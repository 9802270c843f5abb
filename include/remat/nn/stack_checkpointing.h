// A model's layer stack under checkpointing: its policy and schedule (planned
// on demand for a budget policy), and run_stack, which runs that schedule.
//
// Bert and Llama hold one; a model of your own can too. A fixed policy
// (none, every-K, sqrt, selective-...) has its schedule at once. A budget
// policy runs everything stored until it is planned, either now on a cost
// profile (enable(policy, chain)) or at the first forward with grad on
// (needs_plan / plan), and again when a later batch is larger in batch size
// or sequence length than the one it was planned for.
//
// Example (in the forward of a StagedModel of your own, remat/nn/stages.h,
// with `model` as *this, a member `checkpointing`, and its loss `head`):
//   // given: remat::nn::Llama llama(remat::nn::LlamaOptions().num_layers(8));
//   // given: remat::nn::StagedModel& model = *llama;
//   // given: remat::nn::StackCheckpointing checkpointing("MyModel", 8);
//   // given: torch::Tensor ids = torch::randint(32000, {2, 1024});  // [B, S]
//   // given: remat::nn::StageHead head = llama->step_head(ids);
//   if (checkpointing.needs_plan(ids.size(0), ids.size(1))) {
//     checkpointing.plan(ids.size(0), ids.size(1), [&](int64_t budget_bytes) {
//       return remat::nn::plan_checkpointing(  // remat/nn/profile.h
//           model, remat::nn::StageBatch(ids), head, budget_bytes);
//     });
//   }
//   auto e = model.embed(remat::nn::StageBatch(ids));
//   auto hidden = remat::nn::run_stack(model.layer_stack(), e.hidden, e.side,
//                                      checkpointing.schedule());
#pragma once

#include "remat/checkpoint.h"
#include "remat/nn/stages.h"
#include "remat/policy.h"

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace remat {
namespace plan {
struct Chain;
struct Plan;
} // namespace plan

namespace nn {

class StackCheckpointing {
 public:
  /// `model` names the model in error messages ("remat::nn::Bert"). With
  /// 0 layers nothing is scheduled until resize().
  StackCheckpointing(std::string model, int64_t num_layers);

  /// The stack now has `num_layers` layers: the policy stays, a plan goes.
  void resize(int64_t num_layers);

  /// Checkpoint as `policy` says; a budget policy is planned later.
  void enable(const CheckpointPolicy& policy);
  /// A budget policy planned now on `chain` (and never again); any other
  /// policy ignores `chain`. Throws, giving the smallest feasible budget,
  /// when nothing fits, or when `chain` has another number of layers.
  void enable(const CheckpointPolicy& policy, const plan::Chain& chain);

  /// Whether a forward with grad on, of `batch` rows of `seq` tokens, must
  /// plan first: a budget policy not yet planned for a batch that large.
  bool needs_plan(int64_t batch, int64_t seq) const;
  /// Plans the budget policy with `make_plan(budget_bytes)` (total bytes)
  /// for `batch` x `seq`; an error of make_plan comes back prefixed with the
  /// model and the policy.
  void plan(
      int64_t batch,
      int64_t seq,
      const std::function<plan::Plan(int64_t budget_bytes)>& make_plan);

  const CheckpointPolicy& policy() const { return policy_; }
  /// The policy's schedule or, for a budget policy, the planned one (every
  /// layer kStore until planned).
  const Schedule& schedule() const { return schedule_; }

 private:
  std::string model_;
  int64_t num_layers_;
  CheckpointPolicy policy_;
  Schedule schedule_;
  int64_t planned_batch_ = 0; ///< shape the budget plan was made for; 0: none
  int64_t planned_seq_ = 0;
};

/// Runs a stack of layers under a checkpoint Schedule, the way every remat
/// model family does, so a policy means the same thing for all of them.
/// `side` are the tensors every layer reads besides the hidden state (mask,
/// rotary tables). A kRecompute segment becomes one remat::checkpoint over
/// its layers (their parameters explicit inputs, `side` saved with its
/// input); the other modes (kStore, kRecomputeAttention, kRecomputeMlp) are
/// passed to the layer, for it to handle inside. The stack is shared because
/// a recompute runs it again in backward. Throws when the schedule's layers
/// are not the stack's.
///
/// Example:
///   // given: remat::nn::Llama model(remat::nn::LlamaOptions().num_layers(8));
///   // given: torch::Tensor ids = torch::randint(32000, {2, 1024});  // [B, S]
///   auto e = model->embed(remat::nn::StageBatch(ids));
///   auto hidden = remat::nn::run_stack(model->layer_stack(), e.hidden, e.side,
///                                      model->checkpoint_schedule());
torch::Tensor run_stack(
    const std::shared_ptr<LayerStack>& stack,
    torch::Tensor hidden,
    const SideInputs& side,
    const Schedule& schedule);

namespace detail {

// A LayerStack over module holders and a call, for run_stack's template.
template <typename Layer, typename Call>
class CallStack : public LayerStack {
 public:
  CallStack(std::vector<Layer> layers, Call call)
      : layers_(std::move(layers)), call_(std::move(call)) {}
  int64_t num_layers() const override {
    return static_cast<int64_t>(layers_.size());
  }
  torch::Tensor layer_forward(
      int64_t i, const torch::Tensor& hidden, const SideInputs& side,
      SegmentMode mode) override {
    return call_(layers_[i], hidden, side, mode);
  }
  std::vector<torch::Tensor> layer_parameters(int64_t i) const override {
    return layers_[i]->parameters();
  }

 private:
  std::vector<Layer> layers_;
  Call call_;
};

} // namespace detail

/// run_stack over a model of your own: `layers` are module holders
/// (torch::nn::ModuleHolder) and `call(layer, hidden, side, mode)` runs one
/// layer and returns its output. Copies of both are kept until backward.
///
/// Example (a layer is a holder, taken by reference: a const holder gives
/// only const access to its module):
///   // given: std::vector<torch::nn::Linear> layers;  // 64 -> 64 each
///   // given: torch::Tensor hidden = torch::randn({2, 128, 64});  // [B,S,64]
///   // given: torch::Tensor mask = torch::ones({2, 128, 1});
///   // given: remat::nn::StackCheckpointing checkpointing("MyModel", 4);
///   hidden = remat::nn::run_stack(layers, hidden, {mask},
///       checkpointing.schedule(),
///       [](torch::nn::Linear& l, const torch::Tensor& h,
///          const std::vector<torch::Tensor>& side, remat::SegmentMode mode) {
///         return l->forward(h) * side[0];  // mode: for selective layers
///       });
template <typename Layer, typename Call>
torch::Tensor run_stack(
    const std::vector<Layer>& layers,
    torch::Tensor hidden,
    const SideInputs& side,
    const Schedule& schedule,
    const Call& call) {
  return run_stack(
      std::make_shared<detail::CallStack<Layer, Call>>(layers, call), std::move(hidden),
      side, schedule);
}

} // namespace nn
} // namespace remat
