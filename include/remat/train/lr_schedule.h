// The learning rate of each optimizer step: a linear warm-up, then constant,
// linear or cosine decay to zero at the last step. A pure function of the
// step number, so that a resumed run needs only the step to continue the
// schedule exactly.
//
// Example:
//   // given: torch::nn::Linear model(256, 4);
//   // given: torch::optim::AdamW optimizer(model->parameters());
//   remat::train::LrSchedule schedule(
//       remat::train::LrScheduleOptions(/*lr=*/1e-3, /*total_steps=*/1000)
//           .warmup_steps(100).kind(remat::train::LrScheduleKind::kCosine));
//   for (int64_t step = 0; step < 1000; ++step) {
//     for (auto& group : optimizer.param_groups()) {
//       group.options().set_lr(schedule.lr(step));  // step 0 gets 1e-5
//     }
//     ...
//   }
#pragma once

#include <torch/arg.h>

#include <cstdint>
#include <string>

namespace remat {
namespace train {

/// What happens after the warm-up.
enum class LrScheduleKind {
  kConstant, ///< stay at the peak rate
  kLinear,   ///< fall linearly to 0 at total_steps
  kCosine,   ///< half a cosine from the peak to 0 at total_steps
};

const char* to_string(LrScheduleKind kind);
/// "constant", "linear" or "cosine"; throws c10::Error naming the text.
LrScheduleKind parse_lr_schedule_kind(const std::string& text);

/// Settings of an LrSchedule.
struct LrScheduleOptions {
  LrScheduleOptions(double lr, int64_t total_steps)
      : lr_(lr), total_steps_(total_steps) {}
  /// The peak learning rate, reached at the end of the warm-up.
  TORCH_ARG(double, lr);
  /// Optimizer steps in the whole run.
  TORCH_ARG(int64_t, total_steps);
  /// Steps of linear warm-up from lr / warmup_steps to lr (0: none).
  TORCH_ARG(int64_t, warmup_steps) = 0;
  TORCH_ARG(LrScheduleKind, kind) = LrScheduleKind::kLinear;
};

/// Warm-up then decay. Unlike Hugging Face's schedules, the first step does
/// not get a rate of 0: warm-up step s (from 0) gets lr * (s + 1) / warmup.
class LrSchedule {
 public:
  /// Throws c10::Error when lr < 0, total_steps < 1 or warmup_steps < 0.
  explicit LrSchedule(LrScheduleOptions options);

  /// The rate of optimizer step `step` (0-based). Steps at or past
  /// total_steps get the final rate (0 after a decay).
  double lr(int64_t step) const;

  const LrScheduleOptions& options() const {
    return options_;
  }

 private:
  LrScheduleOptions options_;
};

} // namespace train
} // namespace remat
