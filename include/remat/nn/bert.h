// A BERT encoder with the architecture and parameter names of Hugging Face's
// BertModel: word, position and token-type embeddings, post-LayerNorm layers,
// exact (erf) GELU, an attention mask, dropout, a pooler. Its linear layers
// are remat Projections, so LoRA adapters can be added (remat/nn/lora.h);
// their names are Hugging Face's ("query", "key", "value", "dense").
//
// Example:
//   // given: torch::Tensor input_ids = torch::randint(30522, {8, 128});
//   // given: torch::Tensor attention_mask = torch::ones_like(input_ids);
//   remat::nn::Bert bert(
//       remat::nn::BertOptions().num_layers(12).hidden_size(256).num_heads(4));
//   bert->gradient_checkpointing_enable(
//       remat::CheckpointPolicy::every_layer());
//   auto out = bert->forward(input_ids, attention_mask);   // [B, S] each
//   auto loss = out.last_hidden_state.pow(2).mean();
//   loss.backward();
#pragma once

#include "remat/model_sizes.h"
#include "remat/nn/attention.h"
#include "remat/nn/lora.h"
#include "remat/nn/profile.h"
#include "remat/nn/stack_checkpointing.h"
#include "remat/nn/stages.h"
#include "remat/policy.h"

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include <functional>
#include <utility>

namespace remat {
namespace nn {

/// Sizes and settings of a BERT encoder. Defaults are bert-base's.
struct BertOptions {
  TORCH_ARG(int64_t, vocab_size) = 30522;
  TORCH_ARG(int64_t, hidden_size) = 768;
  TORCH_ARG(int64_t, num_layers) = 12;
  TORCH_ARG(int64_t, num_heads) = 12;
  /// Width of the MLP; 0 means 4 * hidden_size.
  TORCH_ARG(int64_t, intermediate_size) = 0;
  TORCH_ARG(int64_t, max_position_embeddings) = 512;
  TORCH_ARG(int64_t, type_vocab_size) = 2;
  /// The padding token's id, whose embedding gets no gradient (Hugging Face's
  /// padding_idx: BertConfig.pad_token_id, 0 by default); -1: none.
  TORCH_ARG(int64_t, pad_token_id) = 0;
  TORCH_ARG(double, hidden_dropout) = 0.1;
  TORCH_ARG(double, attention_dropout) = 0.1;
  TORCH_ARG(double, layer_norm_eps) = 1e-12;
  TORCH_ARG(AttentionKind, attention) = AttentionKind::kEager;

 public:
  /// The MLP width: intermediate_size, or the BERT rule when it is 0.
  int64_t mlp_size() const {
    return intermediate_size_ > 0 ? intermediate_size_ : bert_mlp_size(hidden_size_);
  }
  /// Throws remat::FieldError naming the field ("num_layers") when a size is
  /// invalid or past its bound in remat/model_sizes.h. Loaders of configs and
  /// training states call it on what they read.
  void validate() const;
};

/// Embeddings: word + position + token type, then LayerNorm and dropout.
class BertEmbeddingsImpl : public torch::nn::Cloneable<BertEmbeddingsImpl> {
 public:
  explicit BertEmbeddingsImpl(BertOptions options);
  void reset() override;
  /// input_ids, token_type_ids: [B, S] int64 -> [B, S, H]
  torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& token_type_ids);

  BertOptions options;
  torch::nn::Embedding word_embeddings{nullptr};
  torch::nn::Embedding position_embeddings{nullptr};
  torch::nn::Embedding token_type_embeddings{nullptr};
  torch::nn::LayerNorm LayerNorm{nullptr};
  torch::nn::Dropout dropout{nullptr};
};
TORCH_MODULE(BertEmbeddings);

/// The query/key/value projections ("attention.self" in Hugging Face).
class BertSelfAttentionImpl : public torch::nn::Cloneable<BertSelfAttentionImpl> {
 public:
  explicit BertSelfAttentionImpl(BertOptions options);
  void reset() override;
  /// hidden: [B, S, H]; mask: additive [B, 1, 1, S] or undefined.
  /// With `recompute_core`, the attention core is checkpointed.
  torch::Tensor forward(const torch::Tensor& hidden, const torch::Tensor& mask,
                        bool recompute_core = false);

  BertOptions options;
  Projection query{nullptr}, key{nullptr}, value{nullptr};
};
TORCH_MODULE(BertSelfAttention);

/// Dense + dropout + residual + LayerNorm, after attention or the MLP.
class BertSelfOutputImpl : public torch::nn::Cloneable<BertSelfOutputImpl> {
 public:
  BertSelfOutputImpl(BertOptions options, int64_t in_features);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& residual);

  BertOptions options;
  int64_t in_features;
  Projection dense{nullptr};
  torch::nn::LayerNorm LayerNorm{nullptr};
  torch::nn::Dropout dropout{nullptr};
};
TORCH_MODULE(BertSelfOutput);

class BertAttentionImpl : public torch::nn::Cloneable<BertAttentionImpl> {
 public:
  explicit BertAttentionImpl(BertOptions options);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& hidden, const torch::Tensor& mask,
                        bool recompute_core = false);

  BertOptions options;
  BertSelfAttention self{nullptr};
  BertSelfOutput output{nullptr};
};
TORCH_MODULE(BertAttention);

/// The MLP's first half ("intermediate"): dense + GELU.
class BertIntermediateImpl : public torch::nn::Cloneable<BertIntermediateImpl> {
 public:
  explicit BertIntermediateImpl(BertOptions options);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);

  BertOptions options;
  Projection dense{nullptr};
};
TORCH_MODULE(BertIntermediate);

/// One encoder layer: attention, then the MLP, each post-LayerNorm.
class BertLayerImpl : public torch::nn::Cloneable<BertLayerImpl> {
 public:
  explicit BertLayerImpl(BertOptions options);
  void reset() override;
  /// `mode` kRecomputeAttention / kRecomputeMlp checkpoints that part only.
  torch::Tensor forward(const torch::Tensor& hidden, const torch::Tensor& mask,
                        SegmentMode mode = SegmentMode::kStore);

  BertOptions options;
  BertAttention attention{nullptr};
  BertIntermediate intermediate{nullptr};
  BertSelfOutput output{nullptr};
};
TORCH_MODULE(BertLayer);

/// The stack of layers ("encoder"; its list is "encoder.layer.N"), as a
/// LayerStack (remat/nn/stages.h) whose side inputs are the additive mask
/// [B, 1, 1, S], or none.
class BertEncoderImpl : public torch::nn::Cloneable<BertEncoderImpl>, public LayerStack {
 public:
  explicit BertEncoderImpl(BertOptions options);
  void reset() override;
  /// Runs every layer under `schedule` (see remat/policy.h); `mask` is the
  /// additive mask, or undefined.
  torch::Tensor forward(const torch::Tensor& hidden, const torch::Tensor& mask,
                        const Schedule& schedule);

  int64_t num_layers() const override;
  torch::Tensor layer_forward(
      int64_t i, const torch::Tensor& hidden, const SideInputs& side,
      SegmentMode mode) override;
  std::vector<torch::Tensor> layer_parameters(int64_t i) const override;
  std::vector<SegmentMode> selective_modes(int64_t i) const override;

  BertOptions options;
  torch::nn::ModuleList layer{nullptr};
  std::vector<BertLayer> layers; ///< the same modules as `layer`, typed
};
TORCH_MODULE(BertEncoder);

/// tanh(dense(hidden of the first token)) ("pooler").
class BertPoolerImpl : public torch::nn::Cloneable<BertPoolerImpl> {
 public:
  explicit BertPoolerImpl(BertOptions options);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& hidden);

  BertOptions options;
  Projection dense{nullptr};
};
TORCH_MODULE(BertPooler);

/// What a BertModel returns.
struct BertOutput {
  torch::Tensor last_hidden_state; ///< [B, S, H]
  torch::Tensor pooler_output;     ///< [B, H]: tanh(dense(first token))
};

/// The loss of a Bert training step, from the model's output.
using BertLoss = std::function<torch::Tensor(const BertOutput&)>;

/// The default BertLoss: mean of squares of the last hidden state plus that
/// of the pooler output, a stand-in for a light head. A heavier head (a
/// masked-LM head over the vocabulary) should be passed as BertStep::loss.
torch::Tensor default_bert_loss(const BertOutput& output);

class BertImpl;

/// One training step's batch and loss for a Bert. The family-free planning
/// calls take it (remat/nn/profile.h: profile_model, plan_checkpointing,
/// measure_step).
///
/// Example:
///   // given: torch::Tensor input_ids = torch::randint(30522, {8, 128});
///   // given: torch::Tensor mask = torch::ones({8, 128}, torch::kLong);
///   // given: torch::Tensor target = torch::zeros({8, 128, 768});  // [B,S,H]
///   auto step = remat::nn::BertStep(input_ids).attention_mask(mask).loss(
///       [&](const remat::nn::BertOutput& o) {
///         return torch::mse_loss(o.last_hidden_state, target);
///       });
struct BertStep {
  explicit BertStep(torch::Tensor input_ids) : input_ids_(std::move(input_ids)) {}
  TORCH_ARG(torch::Tensor, input_ids);            ///< [B, S] int64
  TORCH_ARG(torch::Tensor, attention_mask) = {};  ///< [B, S], 1 keep / 0 pad;
                                                  ///< undefined: keep all
  TORCH_ARG(torch::Tensor, token_type_ids) = {};  ///< [B, S]; undefined: 0
  TORCH_ARG(BertLoss, loss) = nullptr;            ///< empty: default_bert_loss

 public:
  /// The step's batch, as the embedding stage reads it.
  StageBatch batch() const;
  /// The step's head: `model`'s pooler, then the loss.
  StageHead head(BertImpl& model) const;
  /// Forward and loss, as a training step runs them (0-dim).
  torch::Tensor forward_loss(BertImpl& model) const;
};

/// The encoder stack with embeddings and pooler ("BertModel"), a
/// StagedModel (remat/nn/stages.h): embeddings, encoder.layer.N, and a head
/// made of the pooler and a loss (step_head).
class BertImpl : public torch::nn::Cloneable<BertImpl>, public StagedModel {
 public:
  explicit BertImpl(BertOptions options = {});
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  /// input_ids: [B, S] int64. attention_mask: [B, S], 1 keeps a token, 0
  /// masks it (undefined: keep all). token_type_ids: [B, S] (undefined: 0).
  BertOutput forward(
      const torch::Tensor& input_ids,
      const torch::Tensor& attention_mask = {},
      const torch::Tensor& token_type_ids = {});

  /// The part of forward before the layers: the embeddings' output
  /// [B, S, H], and as side input the additive mask [B, 1, 1, S] the layers
  /// read (none without an attention_mask). The batch as for forward.
  Embedded embed(const StageBatch& batch) override;
  std::vector<torch::Tensor> embedding_parameters() const override;
  std::shared_ptr<LayerStack> layer_stack() override;
  /// The head of a training step: the pooler, then `loss` of the output
  /// (empty: default_bert_loss); its parameters are the pooler's.
  StageHead step_head(BertLoss loss = nullptr);

  /// Checkpoint the layers as `policy` says; `none` turns it off.
  ///
  /// A budget policy (CheckpointPolicy::budget, "budget:2GiB") is planned at
  /// the first forward with grad on: the model is profiled on that batch
  /// (remat::nn::plan_checkpointing, remat/nn/profile.h, with its default
  /// loss) and the fastest schedule whose predicted peak fits the budget
  /// (total bytes, weights included) runs from then on. A batch that is
  /// larger than the planned one in batch or sequence is planned again. A
  /// budget below what any schedule needs fails that forward with an error
  /// giving the smallest feasible budget.
  void gradient_checkpointing_enable(
      const CheckpointPolicy& policy = CheckpointPolicy::every_layer());
  /// A budget policy planned now on a given cost profile (from
  /// remat::nn::profile_model or remat::plan::estimate_chain); any other
  /// policy ignores `chain`. Throws, giving the smallest feasible budget,
  /// when nothing fits.
  void gradient_checkpointing_enable(
      const CheckpointPolicy& policy,
      const plan::Chain& chain);
  void gradient_checkpointing_disable();
  const CheckpointPolicy& checkpoint_policy() const { return checkpointing_.policy(); }
  /// The schedule the layers run: the policy's, or for a budget policy the
  /// planned one (all kStore until planned).
  const Schedule& checkpoint_schedule() const override { return checkpointing_.schedule(); }

  BertOptions options;
  BertEmbeddings embeddings{nullptr};
  BertEncoder encoder{nullptr};
  BertPooler pooler{nullptr};

 private:
  StackCheckpointing checkpointing_{"remat::nn::Bert", 0};
};
TORCH_MODULE(Bert);

} // namespace nn
} // namespace remat
