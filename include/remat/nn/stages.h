// A model as stages: its embeddings, a stack of layers, and a head. This is
// the one interface through which a model's forward (run_stack,
// remat/nn/stack_checkpointing.h), the planner's profiler
// (remat::nn::profile_model, remat/nn/profile.h) and the trainer's
// instrumented step run a model, so none of them walks a Bert's or a
// Llama's modules, and a third family plugs in by implementing it.
//
// A family implements two things:
//   - LayerStack: layer i's forward under a SegmentMode, and its parameters
//     (BertEncoderImpl, LlamaModelImpl);
//   - StagedModel: the embedding stage (the batch -> the first hidden state
//     and the side inputs every layer reads), its layer stack and the
//     schedule its checkpoint policy gives (BertImpl, LlamaImpl).
// The head, with its loss, belongs to the training step, not the model: a
// StageHead turns the last layer's hidden state into the loss (BertImpl's
// pooler and a loss, LlamaImpl's final norm and next-token loss, or a
// classifier of your own).
//
// Example (a training step through the stages; what forward does):
//   // given: remat::nn::Llama llama(remat::nn::LlamaOptions().num_layers(8));
//   // given: torch::Tensor ids = torch::randint(32000, {2, 1024});  // [B, S]
//   // given: torch::Tensor mask = torch::ones({2, 1024}, torch::kLong);
//   remat::nn::StagedModel& m = *llama;
//   auto e = m.embed(remat::nn::StageBatch(ids).attention_mask(mask));
//   auto h = remat::nn::run_stack(m.layer_stack(), e.hidden, e.side,
//                                 m.checkpoint_schedule());
//   auto loss = llama->step_head(ids).loss(h);   // next-token loss
//   loss.backward();
#pragma once

#include "remat/policy.h"

#include <torch/arg.h>
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

namespace remat {
namespace nn {

/// The tensors every layer reads besides the hidden state (an additive
/// attention mask, rotary tables), made by the embedding stage. None of
/// them needs a gradient.
using SideInputs = std::vector<torch::Tensor>;

/// A stack of layers, each run by index. run_stack runs one under a
/// checkpoint Schedule.
class LayerStack {
 public:
  virtual ~LayerStack() = default;
  /// How many layers the stack has.
  virtual int64_t num_layers() const = 0;
  /// Layer i (0 <= i < num_layers()): hidden [B, S, H] -> [B, S, H]. `mode`
  /// is kStore, kRecomputeAttention or kRecomputeMlp (the last two
  /// checkpoint inside the layer); run_stack turns kRecompute segments into
  /// a checkpoint around whole layers and runs them with kStore.
  virtual torch::Tensor layer_forward(
      int64_t i,
      const torch::Tensor& hidden,
      const SideInputs& side,
      SegmentMode mode) = 0;
  /// Layer i's parameters (LoRA adapters included): the explicit inputs of
  /// a checkpoint around it.
  virtual std::vector<torch::Tensor> layer_parameters(int64_t i) const = 0;
  /// The selective modes layer i handles inside (kRecomputeAttention,
  /// kRecomputeMlp); the planner offers only these. Default: none.
  virtual std::vector<SegmentMode> selective_modes(int64_t /*i*/) const { return {}; }
};

/// The batch of one step, as an embedding stage reads it.
///
/// Example:
///   // given: torch::Tensor input_ids = torch::randint(32000, {2, 1024});
///   // given: torch::Tensor mask = torch::ones({2, 1024}, torch::kLong);
///   auto batch = remat::nn::StageBatch(input_ids).attention_mask(mask);
struct StageBatch {
  explicit StageBatch(torch::Tensor input_ids) : input_ids_(std::move(input_ids)) {}
  TORCH_ARG(torch::Tensor, input_ids);            ///< [B, S] int64
  /// [B, S]: 0 pad, 1 keep; undefined: keep all. A Llama also takes packed
  /// rows, numbered 1, 2, ... per document (remat/nn/llama.h).
  TORCH_ARG(torch::Tensor, attention_mask) = {};
  TORCH_ARG(torch::Tensor, token_type_ids) = {};  ///< [B, S] (Bert); undefined: 0
};

/// What the embedding stage returns.
struct Embedded {
  torch::Tensor hidden; ///< [B, S, H], the first layer's input
  SideInputs side;      ///< what every layer reads besides `hidden`
};

/// The head of one training step: the last layer's hidden state [B, S, H]
/// -> a 0-dim loss, and the parameters it uses (the profiler counts their
/// gradients in the head stage).
struct StageHead {
  std::function<torch::Tensor(const torch::Tensor& hidden)> loss;
  std::vector<torch::Tensor> parameters;
};

/// A model made of stages: embeddings, then a LayerStack.
class StagedModel {
 public:
  virtual ~StagedModel() = default;
  /// The embedding stage: the batch -> the first hidden state and the side
  /// inputs. Checks the batch's shapes and dtypes.
  virtual Embedded embed(const StageBatch& batch) = 0;
  /// The embedding stage's parameters.
  virtual std::vector<torch::Tensor> embedding_parameters() const = 0;
  /// The layers, shared, since a checkpoint's recompute runs them again in
  /// backward, after the caller's frame is gone.
  virtual std::shared_ptr<LayerStack> layer_stack() = 0;
  /// The schedule the model's checkpoint policy gives its layers now.
  virtual const Schedule& checkpoint_schedule() const = 0;
};

/// A LayerStack that runs another and reports each layer call: `observe(i,
/// hidden_in, mode)` before layer i runs and `done(i, hidden_out)` after,
/// in forward and again in a checkpoint's recompute. The trainer's
/// instrumented step samples memory with it.
///
/// Example:
///   // given: remat::nn::Llama llama(remat::nn::LlamaOptions().num_layers(8));
///   // given: remat::nn::StagedModel& m = *llama;
///   // given: torch::Tensor ids = torch::randint(32000, {2, 1024});  // [B, S]
///   // given: auto e = m.embed(remat::nn::StageBatch(ids));
///   auto watched = std::make_shared<remat::nn::ObservedStack>(
///       m.layer_stack(),
///       [](int64_t i, const torch::Tensor& h, remat::SegmentMode) {},
///       [](int64_t i, const torch::Tensor& out) { std::cout << i << "\n"; });
///   auto h = remat::nn::run_stack(watched, e.hidden, e.side,
///                                 m.checkpoint_schedule());
class ObservedStack : public LayerStack {
 public:
  using Before = std::function<void(int64_t i, const torch::Tensor& hidden, SegmentMode mode)>;
  using After = std::function<void(int64_t i, const torch::Tensor& output)>;
  ObservedStack(std::shared_ptr<LayerStack> inner, Before before, After after);

  int64_t num_layers() const override;
  torch::Tensor layer_forward(
      int64_t i,
      const torch::Tensor& hidden,
      const SideInputs& side,
      SegmentMode mode) override;
  std::vector<torch::Tensor> layer_parameters(int64_t i) const override;
  std::vector<SegmentMode> selective_modes(int64_t i) const override;

 private:
  std::shared_ptr<LayerStack> inner_;
  Before before_;
  After after_;
};

} // namespace nn
} // namespace remat
