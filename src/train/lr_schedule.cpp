#include "remat/train/lr_schedule.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

namespace remat {
namespace train {

const char* to_string(LrScheduleKind kind) {
  switch (kind) {
    case LrScheduleKind::kConstant:
      return "constant";
    case LrScheduleKind::kLinear:
      return "linear";
    case LrScheduleKind::kCosine:
      return "cosine";
  }
  return "?";
}

LrScheduleKind parse_lr_schedule_kind(const std::string& text) {
  for (auto kind : {LrScheduleKind::kConstant, LrScheduleKind::kLinear,
                    LrScheduleKind::kCosine}) {
    if (text == to_string(kind)) {
      return kind;
    }
  }
  TORCH_CHECK(
      false, "expected a schedule constant, linear or cosine, but got '", text,
      "'");
}

LrSchedule::LrSchedule(LrScheduleOptions options)
    : options_(std::move(options)) {
  TORCH_CHECK(
      options_.lr() >= 0 && std::isfinite(options_.lr()),
      "LrSchedule: expected lr >= 0, but got ", options_.lr());
  TORCH_CHECK(
      options_.total_steps() >= 1,
      "LrSchedule: expected total_steps >= 1, but got ",
      options_.total_steps());
  TORCH_CHECK(
      options_.warmup_steps() >= 0,
      "LrSchedule: expected warmup_steps >= 0, but got ",
      options_.warmup_steps());
}

double LrSchedule::lr(int64_t step) const {
  const double peak = options_.lr();
  const int64_t warmup = options_.warmup_steps();
  const int64_t total = options_.total_steps();
  step = std::max<int64_t>(step, 0);
  if (step < warmup) {
    return peak * static_cast<double>(step + 1) / static_cast<double>(warmup);
  }
  if (options_.kind() == LrScheduleKind::kConstant) {
    return peak;
  }
  // Progress through the decay: 0 on the first step after warm-up, 1 at
  // total_steps (a step the run never takes).
  const double span = static_cast<double>(std::max<int64_t>(total - warmup, 1));
  const double progress =
      std::min(1.0, static_cast<double>(step - warmup) / span);
  if (options_.kind() == LrScheduleKind::kLinear) {
    return peak * (1.0 - progress);
  }
  return peak * 0.5 * (1.0 + std::cos(M_PI * progress));
}

} // namespace train
} // namespace remat
