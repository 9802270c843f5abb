// For tests only, private (not part of remat's API):
//   - a hook into Trainer::step() that may spoil a step's loss or gradients
//     (a NaN, an infinity) on a chosen step and rank, to exercise the guard
//     on bad steps (TrainOptions::max_bad_steps) without a data set or a
//     model that diverges;
//   - REMAT_TEST_EXIT_AFTER_STEP=N in the environment: run_training ends the
//     process with _exit(137) right after step N, before anything else is
//     saved, a deterministic stand-in for a kill (`remat train`'s hidden
//     --stop-after-step sets it).
//
// Example:
//   remat::train::detail::ScopedStepFault fault(
//       [](int64_t step, int64_t rank, double& loss, const auto& params) {
//         if (step == 2) loss = std::nan("");
//       });
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace remat {
namespace train {
namespace detail {

/// Called by Trainer::step() after the backward of its last micro-batch and
/// before the loss is summed over the ranks: `step` is 1-based, `loss` this
/// rank's share of the step's loss, `params` the trainable parameters,
/// whose .grad() a fault may spoil alone (one process): data parallel, the
/// all-reduce started during backward overwrites them afterwards.
using StepFault = std::function<void(
    int64_t step,
    int64_t rank,
    double& loss,
    const std::vector<torch::Tensor>& params)>;

/// Installs `fault` for every Trainer of this process (empty: none) and
/// returns the one it replaces. Set it before steps run, not during.
StepFault set_step_fault(StepFault fault);

/// REMAT_TEST_EXIT_AFTER_STEP as a step number; 0 when unset or not a
/// positive number.
int64_t exit_after_step();

/// Installs a fault for its lifetime.
class ScopedStepFault {
 public:
  explicit ScopedStepFault(StepFault fault) : previous_(set_step_fault(std::move(fault))) {}
  ~ScopedStepFault() {
    set_step_fault(std::move(previous_));
  }
  ScopedStepFault(const ScopedStepFault&) = delete;
  ScopedStepFault& operator=(const ScopedStepFault&) = delete;

 private:
  StepFault previous_;
};

} // namespace detail
} // namespace train
} // namespace remat
