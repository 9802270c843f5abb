// LoRA (Hu et al. 2021) for remat's models: low-rank adapters on the linear
// projections, with the rest of the model frozen.
//
// Every linear layer of remat's Bert and Llama is a `Projection`: a Linear
// (same `weight`/`bias` names and shapes as torch::nn::Linear and Hugging
// Face) that can carry an adapter. `apply_lora` adds adapters to the
// projections whose names match its targets and freezes every other
// parameter; the model's own forward then runs them, inside checkpointed
// segments too. Adapter parameters are named as in Hugging Face PEFT, after
// the base layer: "...self_attn.q_proj.lora_A.weight" ([rank, in_features])
// and "...self_attn.q_proj.lora_B.weight" ([out_features, rank]).
//
// Example:
//   // given: auto opts = remat::nn::LlamaOptions().num_layers(8);
//   remat::nn::Llama model(opts);
//   auto adapted = remat::nn::apply_lora(*model,
//       remat::nn::LoraOptions().rank(8).alpha(16).dropout(0.05)
//           .targets({"q_proj", "v_proj"}));
//   model->gradient_checkpointing_enable(
//       remat::CheckpointPolicy::every_layer());
//   torch::optim::AdamW opt(remat::nn::trainable_parameters(*model).values());
//   ... train ...
//   remat::nn::merge_lora(*model);  // adapters folded into the weights
#pragma once

#include <c10/util/Optional.h>
#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torch/ordered_dict.h>

#include <string>
#include <vector>

namespace remat {
namespace nn {

/// Settings of LoRA adapters.
///
/// Example:
///   auto lora = remat::nn::LoraOptions().rank(8).alpha(16).dropout(0.05)
///                   .targets({"query", "value"});
struct LoraOptions {
  /// Inner dimension of the adapter (rows of A, columns of B).
  TORCH_ARG(int64_t, rank) = 8;
  /// The update is scaled by alpha / rank.
  TORCH_ARG(double, alpha) = 16.0;
  /// Dropout on the adapter's input (applied only when training).
  TORCH_ARG(double, dropout) = 0.0;
  /// Which projections get an adapter: a target matches a projection whose
  /// dotted name equals it or ends with "." + target. "q_proj" matches every
  /// layer's query projection; "layers.0.self_attn.q_proj" only layer 0's.
  TORCH_ARG(std::vector<std::string>, targets) = {};

 public:
  double scaling() const {
    return alpha_ / static_cast<double>(rank_);
  }
  /// Throws c10::Error naming the field when a setting is invalid.
  void validate() const;
};

/// Sizes of a Projection, and its adapter if it has one.
struct ProjectionOptions {
  ProjectionOptions(int64_t in_features, int64_t out_features)
      : in_features_(in_features), out_features_(out_features) {}
  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(int64_t, out_features);
  TORCH_ARG(bool, bias) = true;
  /// The adapter; set by `add_adapter`, and kept here so that `clone()`
  /// rebuilds it.
  TORCH_ARG(c10::optional<LoraOptions>, lora) = c10::nullopt;
};

/// A linear layer that may carry a LoRA adapter:
///   y = x W^T + b + scaling * B(A(dropout(x)))
/// Without an adapter it is exactly torch::nn::Linear (same parameter names,
/// shapes and default initialisation).
///
/// Example:
///   // given: torch::Tensor x = torch::randn({2, 128, 64});
///   remat::nn::Projection proj(
///       remat::nn::ProjectionOptions(64, 64).bias(false));
///   proj->add_adapter(remat::nn::LoraOptions().rank(4));
///   auto y = proj->forward(x);   // x: [..., 64]
class ProjectionImpl : public torch::nn::Cloneable<ProjectionImpl> {
 public:
  ProjectionImpl(int64_t in_features, int64_t out_features)
      : ProjectionImpl(ProjectionOptions(in_features, out_features)) {}
  explicit ProjectionImpl(ProjectionOptions options);

  void reset() override;
  /// Kaiming-uniform weight and uniform bias, as torch::nn::Linear.
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  /// x: [..., in_features] -> [..., out_features]
  torch::Tensor forward(const torch::Tensor& x);

  /// Adds an adapter: lora_A kaiming-uniform (as a Linear), lora_B zeros, so
  /// the output is unchanged until B trains. Throws if one is present.
  void add_adapter(const LoraOptions& lora);
  bool has_adapter() const {
    return static_cast<bool>(lora_A);
  }
  /// weight += scaling * B A, then removes the adapter. Outputs are
  /// unchanged (up to rounding); `weight` keeps its requires_grad.
  void merge_adapter();

  ProjectionOptions options;
  torch::Tensor weight;              ///< [out_features, in_features]
  torch::Tensor bias;                ///< [out_features], or undefined
  torch::nn::Linear lora_A{nullptr}; ///< [rank, in_features], or null
  torch::nn::Linear lora_B{nullptr}; ///< [out_features, rank], or null
};
TORCH_MODULE(Projection);

/// Adds adapters to every Projection of `model` whose name matches one of
/// `options.targets()`, and freezes every parameter that is not an adapter's
/// (embeddings and norms included). Returns the names of the adapted
/// projections. Throws c10::Error when no projection matches (naming the
/// ones there are) or when a matching one already has an adapter.
std::vector<std::string> apply_lora(torch::nn::Module& model, const LoraOptions& options);

/// Folds every adapter of `model` into its base weight and removes it.
/// Returns how many were merged. Base parameters stay frozen.
int64_t merge_lora(torch::nn::Module& model);

/// The parameters that require grad, by name: what an optimizer should get.
torch::OrderedDict<std::string, torch::Tensor> trainable_parameters(
    const torch::nn::Module& model);

/// Overloads for module holders: `apply_lora(model, ...)` for a remat::nn::Llama.
template <typename Impl>
std::vector<std::string> apply_lora(
    torch::nn::ModuleHolder<Impl>& model,
    const LoraOptions& options) {
  return apply_lora(*model, options);
}
template <typename Impl>
int64_t merge_lora(torch::nn::ModuleHolder<Impl>& model) {
  return merge_lora(*model);
}
template <typename Impl>
torch::OrderedDict<std::string, torch::Tensor> trainable_parameters(
    const torch::nn::ModuleHolder<Impl>& model) {
  return trainable_parameters(*model);
}

} // namespace nn
} // namespace remat
