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
// Example (inside a model's forward):
//   if (checkpointing_.needs_plan(ids.size(0), ids.size(1))) {
//     checkpointing_.plan(ids.size(0), ids.size(1), [&](int64_t budget_bytes) {
//       return plan_checkpointing(*this, MyStep(ids), budget_bytes);
//     });
//   }
//   hidden = run_stack(layers, hidden, side, checkpointing_.schedule(), call);
#pragma once

#include "remat/checkpoint.h"
#include "remat/policy.h"

#include <cstdint>
#include <functional>
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
/// `layers` are module holders (torch::nn::ModuleHolder); `call(layer,
/// hidden, side, mode)` runs one layer and returns its output; `side` are
/// the tensors every layer reads besides the hidden state (mask, rotary
/// tables). A kRecompute segment becomes one remat::checkpoint over its
/// layers (their parameters explicit inputs); the other modes (kStore,
/// kRecomputeAttention, kRecomputeMlp) are passed to `call`, for the layer
/// to handle inside.
///
/// Example:
///   hidden = remat::nn::run_stack(layers, hidden, {mask},
///       checkpointing_.schedule(),
///       [](const MyLayer& l, const torch::Tensor& h,
///          const std::vector<torch::Tensor>& side, remat::SegmentMode mode) {
///         return l->forward(h, side[0], mode);
///       });
template <typename Layer, typename Call>
torch::Tensor run_stack(
    const std::vector<Layer>& layers,
    torch::Tensor hidden,
    const std::vector<torch::Tensor>& side,
    const Schedule& schedule,
    const Call& call) {
  for (const auto& seg : schedule.segments) {
    if (seg.mode != SegmentMode::kRecompute) {
      for (int64_t i = seg.begin; i < seg.end; ++i) {
        hidden = call(layers[i], hidden, side, seg.mode);
      }
      continue;
    }
    std::vector<Layer> segment(layers.begin() + seg.begin, layers.begin() + seg.end);
    std::vector<torch::Tensor> params;
    for (const auto& layer : segment) {
      auto p = layer->parameters();
      params.insert(params.end(), p.begin(), p.end());
    }
    std::vector<torch::Tensor> inputs{hidden};
    inputs.insert(inputs.end(), side.begin(), side.end());
    // Captures copies of the layer holders and of `call`: it runs again in
    // backward, after this frame is gone.
    auto fn = [segment, call](const std::vector<torch::Tensor>& in) mutable {
      std::vector<torch::Tensor> rest(in.begin() + 1, in.end());
      torch::Tensor h = in[0];
      for (const auto& layer : segment) {
        h = call(layer, h, rest, SegmentMode::kStore);
      }
      return std::vector<torch::Tensor>{h};
    };
    hidden = checkpoint(
        fn, inputs,
        CheckpointOptions()
            .parameters(std::move(params))
            .name("layers[" + std::to_string(seg.begin) + "," +
                  std::to_string(seg.end) + ")"))[0];
  }
  return hidden;
}

} // namespace nn
} // namespace remat
