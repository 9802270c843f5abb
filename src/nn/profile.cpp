// The stages of any StagedModel as the profiler runs them, and planning and
// measuring a step. The runners call the model's own stages (embed, its
// layer stack with a mode, the step's head), the code its forward runs, so
// what is profiled is what runs.
#include "remat/nn/profile.h"

#include "remat/memory.h"
#include "remat/nn/step.h"
#include "remat/timing.h"

#include <torch/torch.h>

#include <algorithm>
#include <memory>
#include <string>

namespace remat {
namespace nn {

std::vector<plan::StageRunner> stage_runners(
    StagedModel& model,
    const StageBatch& batch,
    const StageHead& head) {
  const auto& ids = batch.input_ids();
  TORCH_CHECK(
      ids.defined() && ids.dim() == 2 && ids.scalar_type() == torch::kLong,
      "remat::nn::stage_runners: expected input_ids of shape [batch, seq] and dtype int64, "
      "but got ", ids.defined() ? c10::str(ids.sizes(), " ", ids.scalar_type()) : "none");
  TORCH_CHECK(head.loss, "remat::nn::stage_runners: expected a head with a loss, but got none");

  // The side inputs (mask, rotary tables): made by the embedding stage,
  // read by the layers, as in forward.
  auto side = std::make_shared<SideInputs>();
  StagedModel* m = &model;
  std::vector<plan::StageRunner> runners;
  plan::StageRunner emb;
  emb.name = "embeddings";
  emb.kind = plan::StageKind::kEmbedding;
  emb.forward = [m, side, batch](const torch::Tensor& input_ids, SegmentMode) {
    auto b = batch;
    auto e = m->embed(b.input_ids(input_ids));
    *side = std::move(e.side);
    return e.hidden;
  };
  emb.reset = [side] { side->clear(); };
  emb.parameters = model.embedding_parameters();
  runners.push_back(std::move(emb));

  const auto stack = model.layer_stack();
  for (int64_t i = 0; i < stack->num_layers(); ++i) {
    plan::StageRunner r;
    r.name = "layer." + std::to_string(i);
    r.forward = [stack, side, i](const torch::Tensor& h, SegmentMode mode) {
      return stack->layer_forward(i, h, *side, mode);
    };
    r.modes = stack->selective_modes(i);
    r.parameters = stack->layer_parameters(i);
    runners.push_back(std::move(r));
  }

  plan::StageRunner last;
  last.name = "head";
  last.kind = plan::StageKind::kHead;
  last.forward = [loss = head.loss](const torch::Tensor& h, SegmentMode) { return loss(h); };
  last.parameters = head.parameters;
  runners.push_back(std::move(last));
  return runners;
}

plan::Chain profile_model(
    StagedModel& model,
    const StageBatch& batch,
    const StageHead& head,
    const plan::ProfileOptions& options) {
  return plan::profile_stages(stage_runners(model, batch, head), batch.input_ids(), options);
}

plan::Plan plan_checkpointing(
    StagedModel& model,
    const StageBatch& batch,
    const StageHead& head,
    int64_t budget_bytes,
    const PlanOptions& options) {
  TORCH_CHECK(
      options.reserve_bytes() >= 0,
      "remat::nn::plan_checkpointing: expected reserve_bytes >= 0, but got ",
      options.reserve_bytes());
  auto chain = profile_model(model, batch, head, options.profile());
  chain.base_bytes += options.reserve_bytes();
  return plan::solve(chain, budget_bytes, options.planner());
}

StepMeasurement measure_step(
    torch::nn::Module& model,
    const std::function<torch::Tensor()>& loss_of_step,
    int64_t steps,
    int64_t warmup,
    GradientReset gradients) {
  TORCH_CHECK(
      steps >= 1 && warmup >= 0,
      "remat::nn::measure_step: expected steps >= 1 and warmup >= 0, but got steps ",
      steps, " and warmup ", warmup);
  TORCH_CHECK(
      memory::installed(),
      "remat::nn::measure_step: expected remat::memory::install() to have run, but it has not");
  StepMeasurement m;
  std::vector<double> times;
  for (int64_t i = 0; i < warmup + steps; ++i) {
    const auto s = measured_step(model, loss_of_step, StepOptions().gradients(gradients));
    if (i < warmup) {
      continue;
    }
    m.base_bytes = std::max(m.base_bytes, s.before_forward_bytes);
    m.peak_bytes = std::max(m.peak_bytes, s.peak_bytes);
    m.activation_bytes =
        std::max(m.activation_bytes, s.before_backward_bytes - s.before_forward_bytes);
    times.push_back(s.step_seconds);
  }
  m.step_seconds = median(times);
  return m;
}

} // namespace nn
} // namespace remat
