// A Llama-style decoder with the architecture and parameter names of Hugging
// Face's LlamaForCausalLM: RMSNorm before attention and MLP, rotary position
// embeddings (HF's rotate_half layout), grouped-query attention, a SwiGLU MLP,
// no biases, and a language-model head (optionally tied to the embeddings).
//
// Parameter names: model.embed_tokens.weight,
// model.layers.N.self_attn.{q,k,v,o}_proj.weight,
// model.layers.N.mlp.{gate,up,down}_proj.weight,
// model.layers.N.{input,post_attention}_layernorm.weight, model.norm.weight,
// lm_head.weight (absent when tied: the embedding matrix serves, as in HF's
// named_parameters()).
//
// Training and generation are two modes:
//   - training: forward(input_ids, attention_mask) under grad, with
//     gradient_checkpointing_enable(policy) deciding what is recomputed;
//   - generation: forward(..., &cache) under torch::NoGradGuard, appending
//     each layer's keys and values to a KvCache; generate() does this.
// A forward that gets a cache while grad mode is on is refused. This is the
// "use_cache during training" pitfall: a cache kept under autograd holds every
// layer's keys and values (and their graph) alive, which is what
// checkpointing is there to avoid, and a recompute would append to the cache
// a second time.
//
// Packed documents: an attention_mask [B, S] may number the documents that
// share a row (0 padding, 1 the row's first document, 2 its second, ...;
// numbers restart in each row, each document's tokens are contiguous; not
// checked). A token then attends only to the earlier-or-equal tokens of its
// own document, and its rotary position is its index minus that of its
// document's first token, so each document is computed as if it were alone
// in a row (up to rounding). Padding counts as one more document. Labels are
// the caller's: -100 on each document's first token keeps the previous
// document from predicting it. Every path takes it (forward, forward_loss,
// the stages, any checkpoint policy, every attention kind); it costs an
// additive [B, 1, S, S] mask shared by the layers, and is refused with a KV
// cache. A mask of only 1 and 0 is today's padding mask, [B, 1, 1, S]. Which
// of the two a mask is costs one max() and, on a GPU, a host sync per
// forward (none for a bool mask).
//
// Example:
//   // given: torch::Tensor input_ids = torch::randint(32000, {2, 256});
//   // given: torch::Tensor prompt = torch::randint(32000, {1, 8});  // [B, S]
//   remat::nn::Llama model(remat::nn::LlamaOptions().vocab_size(32000)
//       .hidden_size(512).intermediate_size(1376).num_layers(8)
//       .num_heads(8).num_kv_heads(2));
//   model->gradient_checkpointing_enable(
//       remat::CheckpointPolicy::every_layer());
//   auto loss = model->forward_loss(input_ids, input_ids);  // next-token loss
//   loss.backward();                                // no [B, S, vocab] kept
//   auto logits = model->forward(input_ids);        // [B, S] -> [B, S, vocab]
//   model->eval();
//   auto tokens = model->generate(prompt, 20);      // [B, S + 20]
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
#include <torch/nn/modules/embedding.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <vector>

namespace remat {
namespace nn {

/// Sizes and settings of a Llama decoder. Defaults are Llama-2-7B's.
///
/// Example:
///   auto options = remat::nn::LlamaOptions().hidden_size(64)
///       .intermediate_size(172).num_layers(2).num_heads(4).num_kv_heads(2)
///       .vocab_size(100);
struct LlamaOptions {
  TORCH_ARG(int64_t, vocab_size) = 32000;
  TORCH_ARG(int64_t, hidden_size) = 4096;
  /// Width of the SwiGLU MLP; 0 means remat::llama_mlp_size(hidden_size)
  /// (11008 for 4096). Read it through mlp_size().
  TORCH_ARG(int64_t, intermediate_size) = 0;
  TORCH_ARG(int64_t, num_layers) = 32;
  TORCH_ARG(int64_t, num_heads) = 32;
  /// Key/value heads for grouped-query attention; 0 means num_heads.
  TORCH_ARG(int64_t, num_kv_heads) = 0;
  /// Longest sequence (prompt plus generated tokens), in tokens.
  TORCH_ARG(int64_t, max_position_embeddings) = 4096;
  TORCH_ARG(double, rope_theta) = 10000.0;
  TORCH_ARG(double, rms_norm_eps) = 1e-6;
  /// lm_head reuses the embedding matrix.
  TORCH_ARG(bool, tie_word_embeddings) = false;
  TORCH_ARG(AttentionKind, attention) = AttentionKind::kEager;
  /// Dropout on the attention probabilities (training only).
  TORCH_ARG(double, attention_dropout) = 0.0;
  /// Standard deviation of the normal initialisation of weights.
  TORCH_ARG(double, initializer_range) = 0.02;

 public:
  int64_t head_dim() const {
    return hidden_size_ / num_heads_;
  }
  int64_t kv_heads() const {
    return num_kv_heads_ > 0 ? num_kv_heads_ : num_heads_;
  }
  /// The MLP width: intermediate_size, or the Llama rule when it is 0.
  int64_t mlp_size() const {
    return intermediate_size_ > 0 ? intermediate_size_ : llama_mlp_size(hidden_size_);
  }
  /// Throws remat::FieldError naming the field ("num_layers") when a size is
  /// invalid or past its bound in remat/model_sizes.h. Loaders of configs and
  /// training states call it on what they read.
  void validate() const;
};

/// Keys and values of the tokens seen so far, one entry per layer, before
/// the key/value heads are repeated for grouped-query attention.
struct KvCache {
  std::vector<torch::Tensor> keys;   ///< per layer [B, kv_heads, T, head_dim]
  std::vector<torch::Tensor> values; ///< per layer [B, kv_heads, T, head_dim]

  /// Tokens cached (T); 0 when empty.
  int64_t length() const {
    return keys.empty() || !keys[0].defined() ? 0 : keys[0].size(2);
  }
  void clear() {
    keys.clear();
    values.clear();
  }
};

/// x * rsqrt(mean(x^2) + eps) * weight, computed in float32 ("LlamaRMSNorm"),
/// by remat::nn::rms_norm (remat/nn/fused.h): keeps x and rstd for backward.
class RMSNormImpl : public torch::nn::Cloneable<RMSNormImpl> {
 public:
  RMSNormImpl(int64_t hidden_size, double eps);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);

  int64_t hidden_size;
  double eps;
  torch::Tensor weight; ///< [hidden_size], initialised to 1
};
TORCH_MODULE(RMSNorm);

/// Rotary tables for positions [offset, offset + seq): cos and sin, each
/// [seq, head_dim], in float32 then cast to `dtype`.
std::pair<torch::Tensor, torch::Tensor> rotary_tables(
    int64_t head_dim,
    double theta,
    int64_t offset,
    int64_t seq,
    const torch::TensorOptions& options);

/// x * cos + rotate_half(x) * sin for x [B, heads, S, head_dim], cos/sin
/// [S, head_dim] (or [B, 1, S, head_dim]: a position per token, for packed
/// documents); rotate_half(x) = cat(-x2, x1) of the two halves.
torch::Tensor apply_rotary(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);

/// Causal self-attention with rotary embeddings and grouped-query heads.
class LlamaAttentionImpl : public torch::nn::Cloneable<LlamaAttentionImpl> {
 public:
  explicit LlamaAttentionImpl(LlamaOptions options);
  void reset() override;
  /// hidden [B, S, H]; cos/sin [S, head_dim] or, packed, [B, 1, S,
  /// head_dim]; mask additive [B, 1, 1, T], [B, 1, S, S] (packed documents)
  /// or undefined, T = cached + S. Causal masking is applied on top. `cache_keys`/`cache_values` (both or none)
  /// are this layer's cache entries: read, then replaced with the longer
  /// ones. With `recompute_core` the attention core is checkpointed.
  torch::Tensor forward(
      const torch::Tensor& hidden,
      const torch::Tensor& cos,
      const torch::Tensor& sin,
      const torch::Tensor& mask,
      torch::Tensor* cache_keys = nullptr,
      torch::Tensor* cache_values = nullptr,
      bool recompute_core = false);

  LlamaOptions options;
  Projection q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
};
TORCH_MODULE(LlamaAttention);

/// down_proj(silu(gate_proj(x)) * up_proj(x)), by remat::nn::swiglu_linear
/// (remat/nn/fused.h; swiglu then down_proj when it has an adapter or a
/// bias): keeps gate and up for backward.
class LlamaMLPImpl : public torch::nn::Cloneable<LlamaMLPImpl> {
 public:
  explicit LlamaMLPImpl(LlamaOptions options);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& x);

  LlamaOptions options;
  Projection gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
};
TORCH_MODULE(LlamaMLP);

/// One decoder layer: h + attn(norm(h)), then h + mlp(norm(h)).
class LlamaDecoderLayerImpl : public torch::nn::Cloneable<LlamaDecoderLayerImpl> {
 public:
  explicit LlamaDecoderLayerImpl(LlamaOptions options);
  void reset() override;
  /// `mode` kRecomputeAttention checkpoints the attention core only (scores,
  /// softmax, dropout, weighted sum; projections kept); kRecomputeMlp
  /// checkpoints post_attention_layernorm + MLP.
  torch::Tensor forward(
      const torch::Tensor& hidden,
      const torch::Tensor& cos,
      const torch::Tensor& sin,
      const torch::Tensor& mask,
      SegmentMode mode = SegmentMode::kStore,
      torch::Tensor* cache_keys = nullptr,
      torch::Tensor* cache_values = nullptr);

  LlamaOptions options;
  LlamaAttention self_attn{nullptr};
  LlamaMLP mlp{nullptr};
  RMSNorm input_layernorm{nullptr};
  RMSNorm post_attention_layernorm{nullptr};
};
TORCH_MODULE(LlamaDecoderLayer);

/// Embeddings, the layers and the final norm ("model" in HF). Its layers
/// are a LayerStack (remat/nn/stages.h) whose side inputs are side_inputs().
class LlamaModelImpl : public torch::nn::Cloneable<LlamaModelImpl>, public LayerStack {
 public:
  explicit LlamaModelImpl(LlamaOptions options);
  void reset() override;
  /// input_ids [B, S] -> last hidden state [B, S, H]. See LlamaImpl::forward.
  torch::Tensor forward(
      const torch::Tensor& input_ids,
      const torch::Tensor& attention_mask,
      const Schedule& schedule,
      KvCache* cache = nullptr);

  /// What every layer reads besides the hidden state, for input_ids [B, S]
  /// after `past` cached tokens: the rotary cos and sin [S, head_dim] in the
  /// dtype and device of `options`, then, when attention_mask ([B, past + S],
  /// 1 keep / 0 pad) is defined, the additive mask [B, 1, 1, past + S].
  /// When attention_mask holds document numbers (a value > 1; see the top
  /// of this file, needs past == 0): cos and sin [B, 1, S, head_dim] at each
  /// token's position in its document, and the block-diagonal additive mask
  /// [B, 1, S, S] (0 where query and key share a document number).
  std::vector<torch::Tensor> side_inputs(
      const torch::Tensor& input_ids,
      const torch::Tensor& attention_mask,
      int64_t past,
      const torch::TensorOptions& options) const;

  int64_t num_layers() const override;
  torch::Tensor layer_forward(
      int64_t i, const torch::Tensor& hidden, const SideInputs& side,
      SegmentMode mode) override;
  std::vector<torch::Tensor> layer_parameters(int64_t i) const override;
  std::vector<SegmentMode> selective_modes(int64_t i) const override;

  LlamaOptions options;
  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  std::vector<LlamaDecoderLayer> decoder_layers; ///< `layers`, typed
  RMSNorm norm{nullptr};
};
TORCH_MODULE(LlamaModel);

class LlamaImpl;

/// One training step's batch for a Llama; the loss is LlamaImpl::forward_loss's
/// (no [B, S, vocab] logits kept). The family-free planning calls take it
/// (remat/nn/profile.h: profile_model, plan_checkpointing, measure_step).
///
/// Example:
///   // given: torch::Tensor input_ids = torch::randint(32000, {2, 256});
///   // given: torch::Tensor labels = input_ids;  // [B, S]
///   auto step = remat::nn::LlamaStep(input_ids).labels(labels);
struct LlamaStep {
  explicit LlamaStep(torch::Tensor input_ids) : input_ids_(std::move(input_ids)) {}
  TORCH_ARG(torch::Tensor, input_ids);            ///< [B, S] int64
  TORCH_ARG(torch::Tensor, attention_mask) = {};  ///< [B, S], 1 keep / 0 pad,
                                                  ///< or document numbers
                                                  ///< (packed, see top of
                                                  ///< file); undefined: keep all
  TORCH_ARG(torch::Tensor, labels) = {};          ///< [B, S]; undefined:
                                                  ///< input_ids (next token)

 public:
  /// The step's batch, as the embedding stage reads it.
  StageBatch batch() const;
  /// The labels: labels(), or input_ids() when undefined.
  torch::Tensor next_token_labels() const;
  /// The step's head: `model`'s final norm, then the next-token loss.
  StageHead head(LlamaImpl& model) const;
  /// Forward and loss, as a training step runs them (0-dim).
  torch::Tensor forward_loss(LlamaImpl& model) const;
};

/// A causal language model ("LlamaForCausalLM"), a StagedModel
/// (remat/nn/stages.h): embed_tokens with the rotary tables, model.layers.N,
/// and a head made of the final norm and the next-token loss (step_head).
class LlamaImpl : public torch::nn::Cloneable<LlamaImpl>, public StagedModel {
 public:
  explicit LlamaImpl(LlamaOptions options = {});
  void reset() override;
  void pretty_print(std::ostream& stream) const override;

  /// input_ids: [B, S] int64 -> logits [B, S, vocab].
  /// attention_mask: [B, T] of 1 (keep) / 0 (padding) over the cached and new
  /// tokens, T = cache length + S; undefined keeps all. Positions continue
  /// from the cache: token s of this call is at position cache length + s.
  /// Without a cache it may instead number packed documents (0 padding,
  /// 1, 2, ... per row; see the top of this file): attention stays within
  /// a document and positions restart at each document's first token.
  /// cache: appends this call's keys and values; needs grad mode off
  /// (torch::NoGradGuard), otherwise the call is refused.
  torch::Tensor forward(
      const torch::Tensor& input_ids,
      const torch::Tensor& attention_mask = {},
      KvCache* cache = nullptr);

  /// Next-token cross-entropy: logits [B, S, vocab] at position s predict
  /// labels [B, S] at s + 1; labels of -100 are ignored. Mean over the
  /// predicted tokens.
  torch::Tensor loss(const torch::Tensor& logits, const torch::Tensor& labels) const;

  /// loss(forward(input_ids, attention_mask), labels) without the logits:
  /// the model runs to its final hidden state (checkpointed and planned as
  /// in forward) and head_loss takes it from there. Use it for training
  /// steps that need only the loss; forward and loss remain for logits.
  /// input_ids, labels: [B, S] int64. Returns a 0-dim float32 tensor.
  ///
  /// Example:
  ///   // given: auto opts = remat::nn::LlamaOptions().num_layers(8);
  ///   // given: remat::nn::Llama model(opts);
  ///   // given: torch::Tensor input_ids = torch::randint(32000, {2, 256});
  ///   auto loss = model->forward_loss(input_ids, input_ids);
  ///   loss.backward();
  torch::Tensor forward_loss(
      const torch::Tensor& input_ids,
      const torch::Tensor& labels,
      const torch::Tensor& attention_mask = {});

  /// The next-token loss of the final hidden state [B, S, H] (model's
  /// output, after the final norm) against labels [B, S], computed with
  /// remat::nn::linear_cross_entropy (remat/nn/loss.h) on lm_head_weight():
  /// until backward it keeps the hidden state and B * S * 4 bytes, where
  /// logits and their log-softmax would keep B * (S - 1) * vocab * 4 or
  /// more. An lm_head with a LoRA adapter or a bias is not a plain matrix:
  /// then it falls back to loss(lm_head(hidden), labels), logits and all.
  torch::Tensor head_loss(const torch::Tensor& hidden, const torch::Tensor& labels);

  /// The embedding stage: embed_tokens' output [B, S, H], and as side
  /// inputs the rotary tables and, with an attention_mask, the additive mask
  /// (LlamaModelImpl::side_inputs). A Llama has no token types.
  Embedded embed(const StageBatch& batch) override;
  std::vector<torch::Tensor> embedding_parameters() const override;
  std::shared_ptr<LayerStack> layer_stack() override;
  /// The head of a training step: the final norm, then head_loss against
  /// `labels` [B, S]; its parameters are the norm's and the output matrix.
  StageHead step_head(const torch::Tensor& labels);

  /// Greedy decoding of `max_new_tokens` tokens after input_ids [B, S] (no
  /// padding). Runs under NoGradGuard; with `use_cache` each step feeds one
  /// token and reuses the KvCache, without it each step recomputes the whole
  /// sequence. Returns [B, S + max_new_tokens]. Call eval() first when
  /// attention_dropout > 0.
  torch::Tensor generate(
      const torch::Tensor& input_ids,
      int64_t max_new_tokens,
      bool use_cache = true);

  /// Checkpoint the layers as `policy` says; `none` turns it off.
  ///
  /// A budget policy (CheckpointPolicy::budget, "budget:2GiB") is planned at
  /// the first forward with grad on: the model is profiled on that batch
  /// (remat::nn::plan_checkpointing, remat/nn/profile.h, with next-token
  /// labels) and the fastest schedule whose predicted peak fits the budget
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

  /// The [vocab, hidden] output matrix: lm_head's, or the embeddings' when tied.
  torch::Tensor lm_head_weight() const;

  LlamaOptions options;
  LlamaModel model{nullptr};
  Projection lm_head{nullptr}; ///< null when tie_word_embeddings

 private:
  // Plans a budget policy when needed, then runs the model to its final
  // hidden state [B, S, H]: what forward and forward_loss share.
  torch::Tensor last_hidden_state(
      const torch::Tensor& input_ids,
      const torch::Tensor& attention_mask,
      KvCache* cache);

  StackCheckpointing checkpointing_{"remat::nn::Llama", 0};
};
TORCH_MODULE(Llama);

/// The loss of LlamaImpl::loss, for any causal LM's logits.
torch::Tensor causal_lm_loss(const torch::Tensor& logits, const torch::Tensor& labels);

} // namespace nn
} // namespace remat
