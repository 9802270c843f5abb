#include "remat/nn/step.h"

#include "remat/device.h"
#include "remat/memory.h"

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <chrono>
#include <memory>

namespace remat {
namespace nn {
namespace {

void reset_gradients(torch::nn::Module& model, GradientReset how) {
  if (how == GradientReset::kNone) {
    model.zero_grad(/*set_to_none=*/true);
    return;
  }
  torch::NoGradGuard no_grad;
  for (auto& p : model.parameters()) {
    if (!p.requires_grad()) {
      continue;
    }
    if (p.grad().defined()) {
      p.mutable_grad().zero_();
    } else {
      p.mutable_grad() = torch::zeros_like(p);
    }
  }
}

} // namespace

StepSample measured_step(
    torch::nn::Module& model,
    const std::function<torch::Tensor()>& loss_of_step,
    const StepOptions& o) {
  TORCH_CHECK(
      !o.device().is_cpu() || memory::installed(),
      "remat::nn::measured_step: expected remat::memory::install() to have run, but it has not");
  TORCH_CHECK(
      o.limit_bytes() >= 0, "remat::nn::measured_step: expected limit_bytes >= 0, but got ",
      o.limit_bytes());
  torch::AutoGradMode grad_on(true);
  reset_gradients(model, o.gradients());
  if (o.seed()) {
    torch::manual_seed(*o.seed()); // the CPU's and every GPU's generator
  }
  using Clock = std::chrono::steady_clock;
  const c10::Device d = o.device();
  // A GPU runs the step asynchronously: each clock is read once the device
  // has finished the work queued before it.
  synchronize(d);
  StepSample s;
  s.before_forward_bytes = memory::current_bytes(d);
  memory::reset_peak(d);
  // No limit of its own leaves the caller's in place.
  std::unique_ptr<memory::LimitGuard> guard;
  if (o.limit_bytes() > 0) {
    guard = std::make_unique<memory::LimitGuard>(o.limit_bytes(), d);
  }
  const auto t0 = Clock::now();
  torch::Tensor loss;
  {
    AutocastScope autocast(o.autocast());
    loss = loss_of_step();
  }
  synchronize(d);
  const auto t_mid = Clock::now();
  s.before_backward_bytes = memory::current_bytes(d);
  loss.backward();
  loss = torch::Tensor();
  if (o.autocast().any()) {
    at::autocast::clear_cache();
  }
  synchronize(d);
  const auto t1 = Clock::now();
  s.after_backward_bytes = memory::current_bytes(d);
  s.peak_bytes = memory::peak_bytes(d);
  s.forward_seconds = std::chrono::duration<double>(t_mid - t0).count();
  s.step_seconds = std::chrono::duration<double>(t1 - t0).count();
  return s;
}

} // namespace nn
} // namespace remat
