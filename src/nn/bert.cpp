#include "remat/nn/bert.h"

#include "remat/checkpoint.h"
#include "remat/nn/dropout.h"
#include "remat/nn/profile.h"
#include "remat/plan/solver.h"
#include "nn/stack.h"

#include <torch/torch.h>

#include <limits>

namespace remat {
namespace nn {

void BertOptions::validate() const {
  TORCH_CHECK(vocab_size_ > 0, "expected vocab_size > 0, but got ", vocab_size_);
  TORCH_CHECK(hidden_size_ > 0, "expected hidden_size > 0, but got ", hidden_size_);
  TORCH_CHECK(num_layers_ > 0, "expected num_layers > 0, but got ", num_layers_);
  TORCH_CHECK(num_heads_ > 0, "expected num_heads > 0, but got ", num_heads_);
  TORCH_CHECK(
      hidden_size_ % num_heads_ == 0,
      "expected hidden_size divisible by num_heads, but got hidden_size ",
      hidden_size_, " and num_heads ", num_heads_);
  TORCH_CHECK(
      intermediate_size_ >= 0,
      "expected intermediate_size >= 0 (0: 4 * hidden), but got ", intermediate_size_);
  // mlp_size() computes 4 * hidden for intermediate_size 0.
  TORCH_CHECK(
      intermediate_size_ > 0 || hidden_size_ <= std::numeric_limits<int64_t>::max() / 4,
      "expected hidden_size <= ", std::numeric_limits<int64_t>::max() / 4,
      " when intermediate_size is 0 (4 * hidden), but got ", hidden_size_);
  TORCH_CHECK(
      max_position_embeddings_ > 0,
      "expected max_position_embeddings > 0, but got ", max_position_embeddings_);
  TORCH_CHECK(type_vocab_size_ > 0, "expected type_vocab_size > 0, but got ", type_vocab_size_);
  TORCH_CHECK(
      pad_token_id_ >= -1 && pad_token_id_ < vocab_size_,
      "expected pad_token_id in [0, vocab_size ", vocab_size_, ") or -1 (none), but got ",
      pad_token_id_);
  TORCH_CHECK(
      hidden_dropout_ >= 0 && hidden_dropout_ < 1 && attention_dropout_ >= 0 &&
          attention_dropout_ < 1,
      "expected dropout probabilities in [0, 1), but got hidden_dropout ",
      hidden_dropout_, " and attention_dropout ", attention_dropout_);
}

namespace {

// Hugging Face's BERT initialisation: normal(0, 0.02) weights, zero biases,
// LayerNorm weight 1 and bias 0.
void init_bert_weights(torch::nn::Module& module) {
  torch::NoGradGuard no_grad;
  for (auto& m : module.modules(/*include_self=*/false)) {
    if (auto* proj = m->as<Projection>()) {
      proj->weight.normal_(0.0, 0.02);
      if (proj->bias.defined()) {
        proj->bias.zero_();
      }
    } else if (auto* emb = m->as<torch::nn::Embedding>()) {
      emb->weight.normal_(0.0, 0.02);
    } else if (auto* ln = m->as<torch::nn::LayerNorm>()) {
      ln->weight.fill_(1.0);
      ln->bias.zero_();
    }
  }
}

torch::nn::LayerNorm layer_norm(const BertOptions& o) {
  return torch::nn::LayerNorm(
      torch::nn::LayerNormOptions({o.hidden_size()}).eps(o.layer_norm_eps()));
}

} // namespace

BertEmbeddingsImpl::BertEmbeddingsImpl(BertOptions options_) : options(std::move(options_)) {
  reset();
}

void BertEmbeddingsImpl::reset() {
  const auto h = options.hidden_size();
  auto word = torch::nn::EmbeddingOptions(options.vocab_size(), h);
  if (options.pad_token_id() >= 0) {
    word.padding_idx(options.pad_token_id());
  }
  word_embeddings = register_module("word_embeddings", torch::nn::Embedding(word));
  position_embeddings = register_module(
      "position_embeddings", torch::nn::Embedding(options.max_position_embeddings(), h));
  token_type_embeddings = register_module(
      "token_type_embeddings", torch::nn::Embedding(options.type_vocab_size(), h));
  LayerNorm = register_module("LayerNorm", layer_norm(options));
  dropout = register_module("dropout", torch::nn::Dropout(options.hidden_dropout()));
}

torch::Tensor BertEmbeddingsImpl::forward(
    const torch::Tensor& input_ids,
    const torch::Tensor& token_type_ids) {
  const auto seq = input_ids.size(1);
  TORCH_CHECK(
      seq <= options.max_position_embeddings(),
      "remat::nn::Bert: expected a sequence of at most max_position_embeddings = ",
      options.max_position_embeddings(), " tokens, but got ", seq);
  auto positions = torch::arange(seq, input_ids.options().dtype(torch::kLong));
  auto x = word_embeddings->forward(input_ids) +
      position_embeddings->forward(positions).unsqueeze(0) +
      token_type_embeddings->forward(token_type_ids);
  return remat::nn::dropout(LayerNorm->forward(x), options.hidden_dropout(), is_training());
}

BertSelfAttentionImpl::BertSelfAttentionImpl(BertOptions options_)
    : options(std::move(options_)) {
  reset();
}

void BertSelfAttentionImpl::reset() {
  const auto h = options.hidden_size();
  query = register_module("query", Projection(h, h));
  key = register_module("key", Projection(h, h));
  value = register_module("value", Projection(h, h));
}

torch::Tensor BertSelfAttentionImpl::forward(
    const torch::Tensor& hidden,
    const torch::Tensor& mask,
    bool recompute_core) {
  const auto b = hidden.size(0);
  const auto s = hidden.size(1);
  const auto heads = options.num_heads();
  const auto d = options.hidden_size() / heads;
  auto split = [&](const torch::Tensor& x) {
    return x.view({b, s, heads, d}).transpose(1, 2);
  };
  auto q = split(query->forward(hidden));
  auto k = split(key->forward(hidden));
  auto v = split(value->forward(hidden));
  auto attn = AttentionOptions()
                  .kind(options.attention())
                  .dropout(options.attention_dropout())
                  .training(is_training());
  auto ctx = recompute_core ? checkpointed_attention(q, k, v, mask, attn)
                            : attention(q, k, v, mask, attn);
  return ctx.transpose(1, 2).reshape({b, s, options.hidden_size()});
}

BertSelfOutputImpl::BertSelfOutputImpl(BertOptions options_, int64_t in_features_)
    : options(std::move(options_)), in_features(in_features_) {
  reset();
}

void BertSelfOutputImpl::reset() {
  dense = register_module("dense", Projection(in_features, options.hidden_size()));
  LayerNorm = register_module("LayerNorm", layer_norm(options));
  dropout = register_module("dropout", torch::nn::Dropout(options.hidden_dropout()));
}

torch::Tensor BertSelfOutputImpl::forward(const torch::Tensor& x, const torch::Tensor& residual) {
  return LayerNorm->forward(
      remat::nn::dropout(dense->forward(x), options.hidden_dropout(), is_training()) + residual);
}

BertAttentionImpl::BertAttentionImpl(BertOptions options_) : options(std::move(options_)) {
  reset();
}

void BertAttentionImpl::reset() {
  self = register_module("self", BertSelfAttention(options));
  output = register_module("output", BertSelfOutput(options, options.hidden_size()));
}

torch::Tensor BertAttentionImpl::forward(
    const torch::Tensor& hidden,
    const torch::Tensor& mask,
    bool recompute_core) {
  return output->forward(self->forward(hidden, mask, recompute_core), hidden);
}

BertIntermediateImpl::BertIntermediateImpl(BertOptions options_) : options(std::move(options_)) {
  reset();
}

void BertIntermediateImpl::reset() {
  dense = register_module("dense", Projection(options.hidden_size(), options.mlp_size()));
}

torch::Tensor BertIntermediateImpl::forward(const torch::Tensor& x) {
  return torch::gelu(dense->forward(x));
}

BertLayerImpl::BertLayerImpl(BertOptions options_) : options(std::move(options_)) {
  reset();
}

void BertLayerImpl::reset() {
  attention = register_module("attention", BertAttention(options));
  intermediate = register_module("intermediate", BertIntermediate(options));
  output = register_module("output", BertSelfOutput(options, options.mlp_size()));
}

torch::Tensor BertLayerImpl::forward(
    const torch::Tensor& hidden,
    const torch::Tensor& mask,
    SegmentMode mode) {
  auto a = attention->forward(hidden, mask, mode == SegmentMode::kRecomputeAttention);
  if (mode != SegmentMode::kRecomputeMlp) {
    return output->forward(intermediate->forward(a), a);
  }
  // Recompute dense -> GELU -> dense -> dropout; keep only its input `a`.
  auto inter = intermediate;
  auto out = output;
  std::vector<torch::Tensor> params = inter->parameters();
  for (const auto& p : out->dense->parameters()) { // LoRA adapters included
    params.push_back(p);
  }
  auto mlp = checkpoint(
      [inter, out](const std::vector<torch::Tensor>& t) mutable {
        return std::vector<torch::Tensor>{
            remat::nn::dropout(out->dense->forward(inter->forward(t[0])),
                               out->options.hidden_dropout(), out->is_training())};
      },
      {a}, CheckpointOptions().parameters(std::move(params)).name("mlp"))[0];
  return output->LayerNorm->forward(mlp + a);
}

BertEncoderImpl::BertEncoderImpl(BertOptions options_) : options(std::move(options_)) {
  reset();
}

void BertEncoderImpl::reset() {
  layer = register_module("layer", torch::nn::ModuleList());
  layers.clear();
  for (int64_t i = 0; i < options.num_layers(); ++i) {
    layers.emplace_back(options);
    layer->push_back(layers.back());
  }
}

torch::Tensor BertEncoderImpl::forward(
    const torch::Tensor& hidden,
    const torch::Tensor& mask,
    const Schedule& schedule) {
  std::vector<torch::Tensor> side;
  if (mask.defined()) {
    side.push_back(mask);
  }
  return detail::run_stack(
      layers, hidden, side, schedule,
      [](BertLayer layer, const torch::Tensor& h,
         const std::vector<torch::Tensor>& side, SegmentMode mode) {
        return layer->forward(h, side.empty() ? torch::Tensor() : side[0], mode);
      });
}

BertPoolerImpl::BertPoolerImpl(BertOptions options_) : options(std::move(options_)) {
  reset();
}

void BertPoolerImpl::reset() {
  dense = register_module("dense", Projection(options.hidden_size(), options.hidden_size()));
}

torch::Tensor BertPoolerImpl::forward(const torch::Tensor& hidden) {
  return torch::tanh(dense->forward(hidden.select(1, 0)));
}

BertImpl::BertImpl(BertOptions options_) : options(std::move(options_)) {
  options.validate();
  reset();
}

void BertImpl::reset() {
  embeddings = register_module("embeddings", BertEmbeddings(options));
  encoder = register_module("encoder", BertEncoder(options));
  pooler = register_module("pooler", BertPooler(options));
  init_bert_weights(*this);
  checkpointing_.resize(options.num_layers());
}

void BertImpl::pretty_print(std::ostream& stream) const {
  stream << "remat::nn::Bert(layers=" << options.num_layers()
         << ", hidden=" << options.hidden_size() << ", heads=" << options.num_heads()
         << ", intermediate=" << options.mlp_size() << ", vocab=" << options.vocab_size()
         << ", checkpoint=" << checkpointing_.policy().name() << ")";
}

BertOutput BertImpl::forward(
    const torch::Tensor& input_ids,
    const torch::Tensor& attention_mask,
    const torch::Tensor& token_type_ids) {
  if (torch::GradMode::is_enabled() && input_ids.dim() == 2 &&
      checkpointing_.needs_plan(input_ids.size(0), input_ids.size(1))) {
    checkpointing_.plan(input_ids.size(0), input_ids.size(1), [&](int64_t budget_bytes) {
      return plan_checkpointing(
          *this,
          BertStep(input_ids).attention_mask(attention_mask).token_type_ids(token_type_ids),
          budget_bytes);
    });
  }
  auto embedded = embed(input_ids, attention_mask, token_type_ids);
  auto last = encoder->forward(embedded.first, embedded.second, checkpointing_.schedule());
  return {last, pooler->forward(last)};
}

std::pair<torch::Tensor, torch::Tensor> BertImpl::embed(
    const torch::Tensor& input_ids,
    const torch::Tensor& attention_mask,
    const torch::Tensor& token_type_ids) {
  TORCH_CHECK(
      input_ids.dim() == 2 && input_ids.scalar_type() == torch::kLong,
      "remat::nn::Bert: expected input_ids of shape [batch, seq] and dtype int64, "
      "but got shape ", input_ids.sizes(), " and dtype ", input_ids.scalar_type());
  auto types = token_type_ids.defined() ? token_type_ids : torch::zeros_like(input_ids);
  auto hidden = embeddings->forward(input_ids, types);
  torch::Tensor mask;
  if (attention_mask.defined()) {
    TORCH_CHECK(
        attention_mask.sizes() == input_ids.sizes(),
        "remat::nn::Bert: expected attention_mask of shape ", input_ids.sizes(),
        ", but got ", attention_mask.sizes());
    // [B, S] of 1/0 -> additive [B, 1, 1, S] of 0 / most negative value.
    auto keep = attention_mask.to(hidden.scalar_type()).unsqueeze(1).unsqueeze(2);
    mask = (1.0 - keep) * std::numeric_limits<float>::lowest();
  }
  return {hidden, mask};
}

void BertImpl::gradient_checkpointing_enable(const CheckpointPolicy& policy) {
  checkpointing_.enable(policy);
}

void BertImpl::gradient_checkpointing_enable(
    const CheckpointPolicy& policy,
    const plan::Chain& chain) {
  checkpointing_.enable(policy, chain);
}

void BertImpl::gradient_checkpointing_disable() {
  gradient_checkpointing_enable(CheckpointPolicy::none());
}

} // namespace nn
} // namespace remat
