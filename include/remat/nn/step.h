// One measured training step, defined once: forward and loss, backward, and
// what it held and took. `remat bench`, `remat plan --measure` (through
// remat::nn::measure_step) and `remat estimate --check` all time and count
// their steps with it, so their figures mean the same thing.
//
// Example:
//   // given: remat::nn::Llama model(remat::nn::LlamaOptions().num_layers(8));
//   // given: torch::Tensor ids = torch::randint(32000, {2, 1024});  // [B, S]
//   remat::memory::install();
//   auto s = remat::nn::measured_step(*model,
//       [&] { return model->forward_loss(ids, ids); },
//       remat::nn::StepOptions().limit_bytes(int64_t(2) << 30));  // 2 GiB
//   std::cout << s.peak_bytes << " bytes at the peak, " << s.step_seconds
//             << " s\n";
#pragma once

#include "remat/autocast.h"
#include "remat/plan/chain.h"

#include <c10/core/Device.h>
#include <c10/util/Optional.h>
#include <torch/arg.h>
#include <torch/nn/module.h>

#include <cstdint>
#include <functional>

namespace remat {
namespace nn {

/// What happens to the previous step's gradients before a step (defined
/// with the planner's chain, which models both).
using plan::GradientReset;

/// How a measured step runs.
struct StepOptions {
  /// Where the model and batch are; bytes and clocks are that device's.
  TORCH_ARG(c10::Device, device) = c10::kCPU;
  /// kNone, as remat's bench and trainer step; kZero for a loop that
  /// zeroes gradients and keeps them (what remat's estimator models).
  TORCH_ARG(GradientReset, gradients) = GradientReset::kNone;
  /// Seeds every generator before the step, so that every run draws the
  /// same dropout masks; none: the generators go on as they are.
  TORCH_ARG(c10::optional<uint64_t>, seed) = c10::nullopt;
  /// Bytes the step may hold (remat::memory::LimitGuard); 0: no limit.
  TORCH_ARG(int64_t, limit_bytes) = 0;
  /// The autocast state of forward and loss (AutocastState::bf16 for bf16).
  TORCH_ARG(AutocastState, autocast) = {};
};

/// What one step held and took.
struct StepSample {
  int64_t before_forward_bytes = 0;  ///< bytes held once gradients were reset
  int64_t before_backward_bytes = 0; ///< bytes held after forward and loss
  int64_t after_backward_bytes = 0;  ///< bytes held with the new gradients
  int64_t peak_bytes = 0;            ///< bytes, the most held during the step
  double forward_seconds = 0;        ///< seconds, forward and loss
  double step_seconds = 0;           ///< seconds, forward, loss and backward
};

/// Runs one training step of `model`: resets its gradients, runs `loss`
/// (forward and loss; the output is dropped once the loss is computed) under
/// the options' autocast, then backward, reading each clock once the device
/// is done. Throws what the step throws (remat::OutOfMemoryError past the
/// limit); the gradients are then left as the step left them. Needs
/// remat::memory::install() on the CPU.
StepSample measured_step(
    torch::nn::Module& model,
    const std::function<torch::Tensor()>& loss,
    const StepOptions& options = {});

} // namespace nn
} // namespace remat
