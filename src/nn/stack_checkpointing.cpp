#include "remat/nn/stack_checkpointing.h"

#include "remat/compress.h"
#include "remat/offload.h"

#include "remat/plan/chain.h"
#include "remat/plan/solver.h"

#include <c10/util/Exception.h>

#include <limits>
#include <optional>
#include <string>

namespace remat {
namespace nn {

StackCheckpointing::StackCheckpointing(std::string model, int64_t num_layers)
    : model_(std::move(model)), num_layers_(num_layers) {
  if (num_layers_ > 0) { // a model sets its layers once its options are known
    enable(CheckpointPolicy::none());
  }
}

void StackCheckpointing::resize(int64_t num_layers) {
  num_layers_ = num_layers;
  enable(CheckpointPolicy(policy_));
}

void StackCheckpointing::enable(const CheckpointPolicy& policy) {
  schedule_ = policy.kind() == CheckpointPolicy::Kind::kBudget
      ? CheckpointPolicy::none().schedule(num_layers_)
      : policy.schedule(num_layers_);
  policy_ = policy;
  planned_batch_ = 0;
  planned_seq_ = 0;
}

void StackCheckpointing::enable(const CheckpointPolicy& policy, const plan::Chain& chain) {
  if (policy.kind() != CheckpointPolicy::Kind::kBudget) {
    enable(policy);
    return;
  }
  TORCH_CHECK(
      chain.num_layers() == num_layers_,
      model_, ": expected a cost profile with ", num_layers_,
      " layers, but got one with ", chain.num_layers());
  schedule_ = plan::solve(chain, policy.budget_bytes()).schedule;
  schedule_.checkpoint = policy.checkpoint();
  policy_ = policy;
  // Planned for good: a forward does not plan it again.
  planned_batch_ = planned_seq_ = std::numeric_limits<int64_t>::max();
}

bool StackCheckpointing::needs_plan(int64_t batch, int64_t seq) const {
  return policy_.kind() == CheckpointPolicy::Kind::kBudget &&
      (batch > planned_batch_ || seq > planned_seq_);
}

void StackCheckpointing::plan(
    int64_t batch,
    int64_t seq,
    const std::function<plan::Plan(int64_t)>& make_plan) {
  plan::Plan p;
  try {
    p = make_plan(policy_.budget_bytes());
  } catch (const c10::Error& e) {
    TORCH_CHECK(
        false, model_, ": checkpoint policy '", policy_.name(), "': ",
        e.what_without_backtrace());
  }
  schedule_ = p.schedule;
  schedule_.checkpoint = policy_.checkpoint();
  planned_batch_ = batch;
  planned_seq_ = seq;
}

namespace {

// Layers [begin, end) checkpointed as one segment that keeps only its input
// (and, with an op policy, the outputs of the ops it names).
torch::Tensor checkpoint_layers(
    const std::shared_ptr<LayerStack>& stack,
    const torch::Tensor& hidden,
    const SideInputs& side,
    int64_t begin,
    int64_t end,
    const OpPolicy& ops) {
  std::vector<torch::Tensor> params;
  for (int64_t i = begin; i < end; ++i) {
    auto p = stack->layer_parameters(i);
    params.insert(params.end(), p.begin(), p.end());
  }
  std::vector<torch::Tensor> inputs{hidden};
  inputs.insert(inputs.end(), side.begin(), side.end());
  // Holds the stack: it runs again in backward, after this frame is gone.
  auto fn = [stack, begin, end](const std::vector<torch::Tensor>& in) {
    const SideInputs rest(in.begin() + 1, in.end());
    torch::Tensor h = in[0];
    for (int64_t i = begin; i < end; ++i) {
      h = stack->layer_forward(i, h, rest, SegmentMode::kStore);
    }
    return std::vector<torch::Tensor>{h};
  };
  auto options = CheckpointOptions().parameters(std::move(params)).name(
      "layers[" + std::to_string(begin) + "," + std::to_string(end) + ")");
  if (!ops.empty()) {
    options.op_policy(ops);
  }
  return checkpoint(fn, inputs, options)[0];
}

} // namespace

torch::Tensor run_stack(
    const std::shared_ptr<LayerStack>& stack,
    torch::Tensor hidden,
    const SideInputs& side,
    const Schedule& schedule) {
  TORCH_CHECK(stack != nullptr, "remat::nn::run_stack: expected a layer stack, but got none");
  const int64_t n = stack->num_layers();
  std::optional<CheckpointDefaultsGuard> how;
  if (schedule.checkpoint) {
    how.emplace(*schedule.checkpoint);
  }
  std::optional<SavedTensorHooksGuard> offloaded;
  if (schedule.offload) {
    TORCH_CHECK(
        hidden.is_cuda(), "remat: expected a model on a CUDA device for policy "
        "'offload' (it moves saved activations to host memory), but it runs on ",
        hidden.device());
    offloaded.emplace(std::make_shared<OffloadHooks>());
  }
  for (const auto& seg : schedule.segments) {
    TORCH_CHECK(
        0 <= seg.begin && seg.begin <= seg.end && seg.end <= n,
        "remat::nn::run_stack: expected a schedule over the stack's ", n,
        " layers, but it has a segment [", seg.begin, ", ", seg.end, ")");
    switch (seg.mode) {
      case SegmentMode::kRecompute:
        hidden = checkpoint_layers(stack, hidden, side, seg.begin, seg.end, OpPolicy());
        break;
      case SegmentMode::kSaveMatmuls:
      case SegmentMode::kSaveProjections:
        for (int64_t i = seg.begin; i < seg.end; ++i) {
          hidden = checkpoint_layers(stack, hidden, side, i, i + 1, op_policy_of(seg.mode));
        }
        break;
      case SegmentMode::kCompress: {
        const CompressedSavesGuard compressed(schedule.compress.value_or(c10::kBFloat16));
        for (int64_t i = seg.begin; i < seg.end; ++i) {
          hidden = stack->layer_forward(i, hidden, side, SegmentMode::kStore);
        }
        break;
      }
      default: // kStore and the modes the layers run themselves
        for (int64_t i = seg.begin; i < seg.end; ++i) {
          hidden = stack->layer_forward(i, hidden, side, seg.mode);
        }
    }
  }
  return hidden;
}

} // namespace nn
} // namespace remat
