// The checkpointing state of a model's layer stack: the policy it was given
// and the schedule its layers run, planned on demand for a budget policy.
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
//   hidden = detail::run_stack(layers, hidden, side, checkpointing_.schedule(), call);
#pragma once

#include "remat/policy.h"

#include <cstdint>
#include <functional>
#include <string>

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

} // namespace nn
} // namespace remat
