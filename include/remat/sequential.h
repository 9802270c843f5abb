// Checkpointing for models remat did not write: torch::nn::Sequential stacks,
// and any module a predicate picks out of one.
//
// Example (a Sequential of 8 blocks in 4 checkpointed segments):
//   // given: torch::Tensor x = torch::randn({8, 256});  // [B, 256]
//   torch::nn::Sequential net;
//   for (int i = 0; i < 8; ++i) net->push_back(torch::nn::Linear(256, 256));
//   auto y = remat::checkpoint_sequential(net, 4, x);
//
// Example (checkpoint every Linear of a Sequential, by type or by name):
//   // given: torch::nn::Sequential net(torch::nn::Linear(4, 4));
//   net = remat::apply_activation_checkpointing(
//       net, [](const std::string& name, const torch::nn::Module& m) {
//         return m.as<torch::nn::Linear>() != nullptr;
//       });
//
// A module whose forward calls typed submodules directly (a member
// `MyBlock block;` called as `block->forward(x)`) cannot be rewired from
// outside in C++; call `remat::checkpoint(block, {x})` in that forward, or
// give the model a policy as remat's own models do.
#pragma once

#include "remat/checkpoint.h"

#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/sequential.h>

#include <functional>
#include <string>

namespace remat {

/// Runs `sequential` on `input` in `segments` contiguous segments. As
/// torch.utils.checkpoint.checkpoint_sequential does, every segment but the
/// last is checkpointed: the last one's activations are needed at once by
/// backward, so recomputing them would cost time and save nothing at peak.
/// Every child must take and return one Tensor. `segments` >= 1 and at most
/// the number of children.
torch::Tensor checkpoint_sequential(
    torch::nn::Sequential& sequential,
    int64_t segments,
    const torch::Tensor& input,
    const CheckpointOptions& options = {});

/// Picks modules by their name in the Sequential ("0", "3") and the module.
using ModulePredicate =
    std::function<bool(const std::string& name, const torch::nn::Module& module)>;

/// A module that runs another, single-tensor module checkpointed. It takes
/// over the wrapped module's parameters, buffers and children under their
/// own names, so state dicts keep their keys ("3.weight", not
/// "3.module.weight").
class CheckpointedImpl : public torch::nn::Cloneable<CheckpointedImpl> {
 public:
  CheckpointedImpl(torch::nn::AnyModule module, CheckpointOptions options = {});
  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  torch::Tensor forward(const torch::Tensor& input);

  torch::nn::AnyModule module;
  CheckpointOptions options;
};
TORCH_MODULE(Checkpointed);

/// Returns a Sequential with the same children in which every child that
/// `predicate` accepts runs checkpointed. Children are shared, not copied:
/// the parameters are the same tensors. Accepted children must take and
/// return one Tensor.
torch::nn::Sequential apply_activation_checkpointing(
    const torch::nn::Sequential& sequential,
    const ModulePredicate& predicate,
    const CheckpointOptions& options = {});

} // namespace remat
