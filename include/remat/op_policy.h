// Per-op save policies: which ops' outputs a checkpointed segment keeps from
// its forward, so that its recompute returns them instead of running those
// ops again (PyTorch's selective activation checkpointing, in C++).
//
// A segment checkpointed with an OpPolicy (CheckpointOptions::op_policy, or
// a policy such as "save-matmuls" for remat's models) keeps the outputs of
// the ops the policy names, and recomputes everything else: norms,
// activations, softmax, dropout, elementwise arithmetic. The recompute
// still runs the segment's code, but each kept op is skipped at the
// dispatcher: its inputs fill the tensors the op would have saved for
// backward, and its kept outputs are returned in its place. So the
// expensive matrix products run once, and the cheap ops that surround them
// are what is paid twice. How it works: docs/saved_tensor_hooks.md.
//
// Ops are named as the dispatcher names them ("aten::mm", without overload
// names). An op is never kept, whatever the policy says, when
//   - it draws random numbers (dropout, bernoulli, randn: skipping it would
//     shift the generator for every op after it), or
//   - it returns a view of an input, or writes into one (views are free;
//     in-place ops change what they would return), or
//   - grad mode is off where it runs (its output is not part of the graph).
// An output the segment writes into later (a bias added in place) is kept
// as forward read it (docs/saved_tensor_hooks.md, "Per-op policies").
//
// Example (keep the outputs of matrix products in a user's block):
//   // given: torch::nn::Linear mlp(256, 256);
//   // given: torch::Tensor x = torch::randn({8, 256});
//   auto y = remat::checkpoint(
//       [&](const std::vector<torch::Tensor>& in) {
//         return std::vector<torch::Tensor>{mlp->forward(in[0])};
//       },
//       {x},
//       remat::CheckpointOptions().op_policy(remat::OpPolicy::matmuls()))[0];
#pragma once

#include <string>
#include <vector>

namespace remat {

/// The set of ops whose outputs a checkpointed segment keeps.
class OpPolicy {
 public:
  /// Keeps nothing: the whole segment is recomputed.
  OpPolicy() = default;

  /// Keeps the outputs of `ops`, each "aten::name" (or "name", read as
  /// "aten::name"). Throws, naming the op, for one that draws random numbers.
  static OpPolicy keep(const std::vector<std::string>& ops, std::string name = "");

  /// "matmuls": every matrix product and fused attention kernel (mm, addmm,
  /// bmm, baddbmm, _addmm_activation, convolution, the
  /// _scaled_dot_product_* and _*_attention_forward kernels). Keeps about
  /// half of a transformer layer's activations for almost none of its
  /// recompute time.
  static OpPolicy matmuls();

  /// "projections": the products with weights (mm, addmm,
  /// _addmm_activation, convolution) and fused attention kernels, but not
  /// the batched products of eager attention (bmm, baddbmm), whose score
  /// matrices grow with the square of the sequence. Keeps less than
  /// matmuls() and recomputes the attention core.
  static OpPolicy projections();

  /// "matmuls", "projections", or ops separated by '/'
  /// ("aten::mm/aten::bmm"). Throws, naming the text, on anything else.
  static OpPolicy parse(const std::string& text);

  /// The accepted spellings, for help texts.
  static std::string names();

  /// Whether the outputs of `op` ("aten::mm") are kept.
  bool keeps(const std::string& op) const;

  /// "matmuls", "projections", or the op list as parse() reads it.
  const std::string& name() const { return name_; }
  /// The kept ops, sorted.
  const std::vector<std::string>& ops() const { return ops_; }
  bool empty() const { return ops_.empty(); }

  bool operator==(const OpPolicy& o) const { return ops_ == o.ops_; }
  bool operator!=(const OpPolicy& o) const { return !(*this == o); }

 private:
  static OpPolicy make(const std::vector<std::string>& ops, std::string name, bool preset);
  static OpPolicy with_attention(std::vector<std::string> ops, std::string name);

  std::vector<std::string> ops_; ///< sorted, unique
  std::string name_;
};

} // namespace remat
