#include "remat/nn/bert.h"

#include "remat/checkpoint.h"
#include "remat/nn/dropout.h"
#include "remat/nn/profile.h"
#include "remat/plan/solver.h"

#include <torch/torch.h>

#include <limits>

namespace remat {
namespace nn {

void BertOptions::validate() const {
  check_transformer_sizes(
      vocab_size_, hidden_size_, num_layers_, num_heads_, /*num_kv_heads=*/0,
      intermediate_size_, max_position_embeddings_);
  check_size("type_vocab_size", type_vocab_size_, 1, limits::kMaxVocab);
  check_norm_eps("layer_norm_eps", layer_norm_eps_);
  check_field(
      pad_token_id_ >= -1 && pad_token_id_ < vocab_size_, "pad_token_id",
      "expected pad_token_id in [0, vocab_size " + std::to_string(vocab_size_) +
          ") or -1 (none), but got " + std::to_string(pad_token_id_));
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
  SideInputs side;
  if (mask.defined()) {
    side.push_back(mask);
  }
  auto self = std::dynamic_pointer_cast<BertEncoderImpl>(shared_from_this());
  return run_stack(self, hidden, side, schedule);
}

int64_t BertEncoderImpl::num_layers() const {
  return static_cast<int64_t>(layers.size());
}

torch::Tensor BertEncoderImpl::layer_forward(
    int64_t i,
    const torch::Tensor& hidden,
    const SideInputs& side,
    SegmentMode mode) {
  return layers.at(i)->forward(hidden, side.empty() ? torch::Tensor() : side[0], mode);
}

std::vector<torch::Tensor> BertEncoderImpl::layer_parameters(int64_t i) const {
  return layers.at(i)->parameters();
}

std::vector<SegmentMode> BertEncoderImpl::selective_modes(int64_t /*i*/) const {
  return {SegmentMode::kRecomputeAttention, SegmentMode::kRecomputeMlp};
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
  const auto step =
      BertStep(input_ids).attention_mask(attention_mask).token_type_ids(token_type_ids);
  if (torch::GradMode::is_enabled() && input_ids.dim() == 2 &&
      checkpointing_.needs_plan(input_ids.size(0), input_ids.size(1))) {
    checkpointing_.plan(input_ids.size(0), input_ids.size(1), [&](int64_t budget_bytes) {
      return plan_checkpointing(*this, step, budget_bytes);
    });
  }
  auto e = embed(step.batch());
  auto last = run_stack(layer_stack(), e.hidden, e.side, checkpointing_.schedule());
  return {last, pooler->forward(last)};
}

Embedded BertImpl::embed(const StageBatch& batch) {
  const auto& input_ids = batch.input_ids();
  TORCH_CHECK(
      input_ids.defined() && input_ids.dim() == 2 && input_ids.scalar_type() == torch::kLong,
      "remat::nn::Bert: expected input_ids of shape [batch, seq] and dtype int64, but got ",
      input_ids.defined() ? c10::str("shape ", input_ids.sizes(), " and dtype ",
                                     input_ids.scalar_type())
                          : std::string("none"));
  const auto& types = batch.token_type_ids();
  auto hidden = embeddings->forward(input_ids, types.defined() ? types : torch::zeros_like(input_ids));
  Embedded e{hidden, {}};
  if (batch.attention_mask().defined()) {
    TORCH_CHECK(
        batch.attention_mask().sizes() == input_ids.sizes(),
        "remat::nn::Bert: expected attention_mask of shape ", input_ids.sizes(),
        ", but got ", batch.attention_mask().sizes());
    // [B, S] of 1/0 -> additive [B, 1, 1, S] of 0 / most negative value.
    auto keep = batch.attention_mask().to(hidden.scalar_type()).unsqueeze(1).unsqueeze(2);
    e.side.push_back((1.0 - keep) * std::numeric_limits<float>::lowest());
  }
  return e;
}

std::vector<torch::Tensor> BertImpl::embedding_parameters() const {
  return embeddings->parameters();
}

std::shared_ptr<LayerStack> BertImpl::layer_stack() {
  return encoder.ptr();
}

StageHead BertImpl::step_head(BertLoss loss) {
  if (!loss) {
    loss = default_bert_loss;
  }
  auto pool = pooler;
  return StageHead{
      [pool, loss](const torch::Tensor& hidden) mutable {
        return loss(BertOutput{hidden, pool->forward(hidden)});
      },
      pooler->parameters()};
}

StageBatch BertStep::batch() const {
  return StageBatch(input_ids_).attention_mask(attention_mask_).token_type_ids(token_type_ids_);
}

torch::Tensor default_bert_loss(const BertOutput& output) {
  return output.last_hidden_state.pow(2).mean() + output.pooler_output.pow(2).mean();
}

StageHead BertStep::head(BertImpl& model) const {
  return model.step_head(loss_);
}

torch::Tensor BertStep::forward_loss(BertImpl& model) const {
  const BertLoss loss = loss_ ? loss_ : BertLoss(default_bert_loss);
  return loss(model.forward(input_ids_, attention_mask_, token_type_ids_));
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
