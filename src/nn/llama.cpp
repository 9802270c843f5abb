#include "remat/nn/llama.h"

#include "remat/checkpoint.h"
#include "remat/nn/fused.h"
#include "remat/nn/loss.h"
#include "remat/nn/profile.h"
#include "remat/plan/solver.h"

#include <torch/torch.h>

#include <limits>

namespace remat {
namespace nn {

void LlamaOptions::validate() const {
  check_transformer_sizes(
      vocab_size_, hidden_size_, num_layers_, num_heads_, num_kv_heads_, intermediate_size_,
      max_position_embeddings_);
  check_field(
      head_dim() % 2 == 0, "num_heads",
      "expected an even head_dim (hidden_size / num_heads) for rotary embeddings, but got " +
          std::to_string(head_dim()));
  TORCH_CHECK(rope_theta_ > 0, "expected rope_theta > 0, but got ", rope_theta_);
  check_norm_eps("rms_norm_eps", rms_norm_eps_);
  TORCH_CHECK(
      attention_dropout_ >= 0 && attention_dropout_ < 1,
      "expected attention_dropout in [0, 1), but got ", attention_dropout_);
}

namespace {

Projection projection(int64_t in, int64_t out) {
  return Projection(ProjectionOptions(in, out).bias(false));
}

} // namespace

RMSNormImpl::RMSNormImpl(int64_t hidden_size_, double eps_)
    : hidden_size(hidden_size_), eps(eps_) {
  reset();
}

void RMSNormImpl::reset() {
  weight = register_parameter("weight", torch::ones({hidden_size}));
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  // Fused: keeps x and rstd where the eager ops kept x in float, its squares
  // and the normalised tensor too.
  return rms_norm(x, weight, eps);
}

std::pair<torch::Tensor, torch::Tensor> rotary_tables(
    int64_t head_dim,
    double theta,
    int64_t offset,
    int64_t seq,
    const torch::TensorOptions& options) {
  auto f32 = options.dtype(torch::kFloat);
  auto inv_freq = 1.0 /
      torch::pow(theta, torch::arange(0, head_dim, 2, f32) / static_cast<double>(head_dim));
  auto pos = torch::arange(offset, offset + seq, f32);
  auto freqs = torch::outer(pos, inv_freq);
  auto emb = torch::cat({freqs, freqs}, -1);
  return {emb.cos().to(options.dtype()), emb.sin().to(options.dtype())};
}

torch::Tensor apply_rotary(
    const torch::Tensor& x,
    const torch::Tensor& cos,
    const torch::Tensor& sin) {
  const auto half = x.size(-1) / 2;
  auto rotated = torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

LlamaAttentionImpl::LlamaAttentionImpl(LlamaOptions options_) : options(std::move(options_)) {
  reset();
}

void LlamaAttentionImpl::reset() {
  const auto h = options.hidden_size();
  const auto kv = options.kv_heads() * options.head_dim();
  q_proj = register_module("q_proj", projection(h, options.num_heads() * options.head_dim()));
  k_proj = register_module("k_proj", projection(h, kv));
  v_proj = register_module("v_proj", projection(h, kv));
  o_proj = register_module("o_proj", projection(options.num_heads() * options.head_dim(), h));
}

torch::Tensor LlamaAttentionImpl::forward(
    const torch::Tensor& hidden,
    const torch::Tensor& cos,
    const torch::Tensor& sin,
    const torch::Tensor& mask,
    torch::Tensor* cache_keys,
    torch::Tensor* cache_values,
    bool recompute_core) {
  const auto b = hidden.size(0);
  const auto s = hidden.size(1);
  const auto heads = options.num_heads();
  const auto kv_heads = options.kv_heads();
  const auto d = options.head_dim();
  auto q = q_proj->forward(hidden).view({b, s, heads, d}).transpose(1, 2);
  auto k = k_proj->forward(hidden).view({b, s, kv_heads, d}).transpose(1, 2);
  auto v = v_proj->forward(hidden).view({b, s, kv_heads, d}).transpose(1, 2);
  q = apply_rotary(q, cos, sin);
  k = apply_rotary(k, cos, sin);
  TORCH_INTERNAL_ASSERT((cache_keys == nullptr) == (cache_values == nullptr));
  if (cache_keys != nullptr) {
    if (cache_keys->defined()) {
      k = torch::cat({*cache_keys, k}, 2);
      v = torch::cat({*cache_values, v}, 2);
    }
    *cache_keys = k;
    *cache_values = v;
  }
  const auto groups = heads / kv_heads;
  const auto attn = AttentionOptions()
                        .kind(options.attention())
                        .dropout(options.attention_dropout())
                        .training(is_training())
                        .causal(true);
  // The core: repeat kv heads, scores, softmax, dropout, weighted sum.
  auto ctx = recompute_core
      ? checkpointed_attention(q, k, v, mask, attn)
      : attention(q, repeat_kv(k, groups), repeat_kv(v, groups), mask, attn);
  return o_proj->forward(ctx.transpose(1, 2).reshape({b, s, heads * d}));
}

LlamaMLPImpl::LlamaMLPImpl(LlamaOptions options_) : options(std::move(options_)) {
  reset();
}

void LlamaMLPImpl::reset() {
  const auto h = options.hidden_size();
  const auto m = options.mlp_size();
  gate_proj = register_module("gate_proj", projection(h, m));
  up_proj = register_module("up_proj", projection(h, m));
  down_proj = register_module("down_proj", projection(m, h));
}

torch::Tensor LlamaMLPImpl::forward(const torch::Tensor& x) {
  auto gate = gate_proj->forward(x);
  auto up = up_proj->forward(x);
  // Fused, keeping only gate and up: silu(gate) and the product are
  // recomputed in backward. down_proj with an adapter or a bias runs its own
  // forward on the product.
  if (!down_proj->has_adapter() && !down_proj->bias.defined()) {
    return swiglu_linear(gate, up, down_proj->weight);
  }
  return down_proj->forward(swiglu(gate, up));
}

LlamaDecoderLayerImpl::LlamaDecoderLayerImpl(LlamaOptions options_)
    : options(std::move(options_)) {
  reset();
}

void LlamaDecoderLayerImpl::reset() {
  self_attn = register_module("self_attn", LlamaAttention(options));
  mlp = register_module("mlp", LlamaMLP(options));
  input_layernorm = register_module(
      "input_layernorm", RMSNorm(options.hidden_size(), options.rms_norm_eps()));
  post_attention_layernorm = register_module(
      "post_attention_layernorm", RMSNorm(options.hidden_size(), options.rms_norm_eps()));
}

torch::Tensor LlamaDecoderLayerImpl::forward(
    const torch::Tensor& hidden,
    const torch::Tensor& cos,
    const torch::Tensor& sin,
    const torch::Tensor& mask,
    SegmentMode mode,
    torch::Tensor* cache_keys,
    torch::Tensor* cache_values) {
  auto h = hidden +
      self_attn->forward(
          input_layernorm->forward(hidden), cos, sin, mask, cache_keys, cache_values,
          mode == SegmentMode::kRecomputeAttention);
  if (mode != SegmentMode::kRecomputeMlp) {
    return h + mlp->forward(post_attention_layernorm->forward(h));
  }
  // Recompute norm -> gate/up -> SiLU -> down; keep only its input `h`, which
  // the residual keeps anyway.
  auto norm = post_attention_layernorm;
  auto block = mlp;
  auto params = norm->parameters();
  for (const auto& p : block->parameters()) { // LoRA adapters included
    params.push_back(p);
  }
  auto out = checkpoint(
      [norm, block](const std::vector<torch::Tensor>& t) mutable {
        return std::vector<torch::Tensor>{block->forward(norm->forward(t[0]))};
      },
      {h}, CheckpointOptions().parameters(std::move(params)).name("mlp"))[0];
  return h + out;
}

LlamaModelImpl::LlamaModelImpl(LlamaOptions options_) : options(std::move(options_)) {
  reset();
}

void LlamaModelImpl::reset() {
  embed_tokens = register_module(
      "embed_tokens", torch::nn::Embedding(options.vocab_size(), options.hidden_size()));
  layers = register_module("layers", torch::nn::ModuleList());
  decoder_layers.clear();
  for (int64_t i = 0; i < options.num_layers(); ++i) {
    decoder_layers.emplace_back(options);
    layers->push_back(decoder_layers.back());
  }
  norm = register_module("norm", RMSNorm(options.hidden_size(), options.rms_norm_eps()));
}

namespace {

// The embedding stage of input_ids [B, S] after `past` cached tokens: its
// checks, embed_tokens' output and the side inputs. What forward and
// LlamaImpl::embed (the stages interface) share.
Embedded embed_after(
    LlamaModelImpl& model,
    const torch::Tensor& input_ids,
    const torch::Tensor& attention_mask,
    int64_t past) {
  TORCH_CHECK(
      input_ids.defined() && input_ids.dim() == 2 && input_ids.scalar_type() == torch::kLong,
      "remat::nn::Llama: expected input_ids of shape [batch, seq] and dtype int64, but got ",
      input_ids.defined()
          ? c10::str("shape ", input_ids.sizes(), " and dtype ", input_ids.scalar_type())
          : std::string("none"));
  const auto seq = input_ids.size(1);
  const auto max_positions = model.options.max_position_embeddings();
  TORCH_CHECK(
      past + seq <= max_positions, "remat::nn::Llama: expected at most max_position_embeddings = ",
      max_positions, " tokens, but got ", past + seq, " (", past, " cached + ", seq, " new)");
  auto hidden = model.embed_tokens->forward(input_ids);
  auto side = model.side_inputs(input_ids, attention_mask, past, hidden.options());
  return Embedded{hidden, std::move(side)};
}

} // namespace

torch::Tensor LlamaModelImpl::forward(
    const torch::Tensor& input_ids,
    const torch::Tensor& attention_mask,
    const Schedule& schedule,
    KvCache* cache) {
  TORCH_CHECK(
      cache == nullptr || !torch::GradMode::is_enabled(),
      "remat::nn::Llama: expected grad mode off when a KV cache is passed "
      "(use_cache is for generation), but grad mode is on. Under autograd a "
      "cache keeps every layer's keys, values and graph alive, and a "
      "checkpoint's recompute would append to it twice: wrap generation in "
      "torch::NoGradGuard, and pass no cache when training");
  const auto past = cache != nullptr ? cache->length() : 0;
  auto e = embed_after(*this, input_ids, attention_mask, past);
  auto hidden = e.hidden;
  const auto& side = e.side;
  torch::Tensor mask = side.size() > 2 ? side[2] : torch::Tensor();
  // Per-token rotary tables mean packed documents, whose positions restart
  // per document where a cache continues one position per row.
  TORCH_CHECK(
      cache == nullptr || side[0].dim() == 2,
      "remat::nn::Llama: expected an attention_mask of 1 (keep) / 0 (pad) with a "
      "KV cache, but got document numbers (packed documents)");
  if (cache != nullptr) {
    // Generation: no grad, so nothing to checkpoint; each layer extends its
    // cache entries.
    const auto n = static_cast<size_t>(options.num_layers());
    if (cache->keys.empty()) {
      cache->keys.resize(n);
      cache->values.resize(n);
    }
    TORCH_CHECK(
        cache->keys.size() == n && cache->values.size() == n,
        "remat::nn::Llama: expected a KvCache for ", n, " layers, but got one for ",
        cache->keys.size());
    for (size_t i = 0; i < n; ++i) {
      hidden = decoder_layers[i]->forward(
          hidden, side[0], side[1], mask, SegmentMode::kStore,
          &cache->keys[i], &cache->values[i]);
    }
  } else {
    auto self = std::dynamic_pointer_cast<LlamaModelImpl>(shared_from_this());
    hidden = run_stack(self, hidden, side, schedule);
  }
  return norm->forward(hidden);
}

int64_t LlamaModelImpl::num_layers() const {
  return static_cast<int64_t>(decoder_layers.size());
}

torch::Tensor LlamaModelImpl::layer_forward(
    int64_t i,
    const torch::Tensor& hidden,
    const SideInputs& side,
    SegmentMode mode) {
  TORCH_CHECK(
      side.size() == 2 || side.size() == 3,
      "remat::nn::Llama: expected side inputs cos, sin and optionally a mask, but got ",
      side.size(), " tensors");
  return decoder_layers.at(i)->forward(
      hidden, side[0], side[1], side.size() > 2 ? side[2] : torch::Tensor(), mode);
}

std::vector<torch::Tensor> LlamaModelImpl::layer_parameters(int64_t i) const {
  return decoder_layers.at(i)->parameters();
}

std::vector<SegmentMode> LlamaModelImpl::selective_modes(int64_t /*i*/) const {
  return {SegmentMode::kRecomputeAttention, SegmentMode::kRecomputeMlp};
}

namespace {

// [B, S, S] or [B, T] of true (keep) / false (drop) -> additive: 0 /
// float's most negative value, in `options`' dtype. One expression for the
// padding mask and the packed one, so that both drop keys alike.
torch::Tensor additive_mask(const torch::Tensor& keep, const torch::TensorOptions& options) {
  return (1.0 - keep.to(options.dtype())) * std::numeric_limits<float>::lowest();
}

// Whether attention_mask holds document numbers (some value > 1) rather
// than 1 keep / 0 pad. A bool mask cannot; any other dtype costs one
// reduction and a host sync (max().item()).
bool has_packed_documents(const torch::Tensor& attention_mask) {
  return attention_mask.scalar_type() != torch::kBool && attention_mask.numel() > 0 &&
      attention_mask.max().item<double>() > 1;
}

// Side inputs of a row-packed batch: docs [B, S] of document numbers (0 on
// padding, which counts as one more document). A token's rotary position
// is its index minus the index of its document's first token; the mask
// keeps the keys of the query's own document (the kernel's causal mask
// hides the later ones), so it is block-diagonal [B, 1, S, S].
std::vector<torch::Tensor> packed_side_inputs(
    const torch::Tensor& docs,
    const std::pair<torch::Tensor, torch::Tensor>& tables,
    const torch::TensorOptions& options) {
  const auto batch = docs.size(0);
  const auto seq = docs.size(1);
  const auto head_dim = tables.first.size(1);
  auto index = torch::arange(seq, docs.options()).expand({batch, seq});
  auto first = torch::ones({batch, seq}, docs.options().dtype(torch::kBool));
  if (seq > 1) {
    first.narrow(1, 1, seq - 1).copy_(docs.narrow(1, 1, seq - 1) != docs.narrow(1, 0, seq - 1));
  }
  // Index of the first token of each token's document: the running max of
  // the indices where a document starts.
  auto start = std::get<0>(torch::cummax(index * first, 1));
  auto flat = (index - start).reshape({-1});
  // Rows of the [0, S) tables, so that a document's positions get the very
  // values they would get alone in a row.
  auto cos = tables.first.index_select(0, flat).view({batch, 1, seq, head_dim});
  auto sin = tables.second.index_select(0, flat).view({batch, 1, seq, head_dim});
  auto same = (docs.unsqueeze(2) == docs.unsqueeze(1)).unsqueeze(1); // [B, 1, S, S]
  return {cos, sin, additive_mask(same, options)};
}

} // namespace

std::vector<torch::Tensor> LlamaModelImpl::side_inputs(
    const torch::Tensor& input_ids,
    const torch::Tensor& attention_mask,
    int64_t past,
    const torch::TensorOptions& options) const {
  const auto batch = input_ids.size(0);
  const auto seq = input_ids.size(1);
  auto tables = rotary_tables(
      this->options.head_dim(), this->options.rope_theta(), past, seq, options);
  if (!attention_mask.defined()) {
    return {tables.first, tables.second};
  }
  TORCH_CHECK(
      attention_mask.dim() == 2 && attention_mask.size(0) == batch &&
          attention_mask.size(1) == past + seq,
      "remat::nn::Llama: expected attention_mask of shape [", batch, ", ",
      past + seq, "] (cached + new tokens), but got ", attention_mask.sizes());
  if (has_packed_documents(attention_mask)) {
    // Positions restart per document, which a cache (one running position
    // per row) cannot continue.
    TORCH_CHECK(
        past == 0,
        "remat::nn::Llama: expected an attention_mask of 1 (keep) / 0 (pad) with a "
        "KV cache, but got document numbers up to ", attention_mask.max().item<int64_t>(),
        " (packed documents) after ", past, " cached tokens");
    return packed_side_inputs(
        attention_mask.to(options.device(), torch::kLong), tables, options);
  }
  // [B, T] of 1/0 -> additive [B, 1, 1, T] of 0 / most negative value.
  auto keep = attention_mask.view({batch, 1, 1, past + seq});
  return {tables.first, tables.second, additive_mask(keep, options)};
}

namespace {

// Hugging Face's Llama initialisation: normal(0, initializer_range) for
// linear and embedding weights; RMSNorm weights stay 1.
void init_llama_weights(torch::nn::Module& module, double std) {
  torch::NoGradGuard no_grad;
  for (auto& m : module.modules(/*include_self=*/false)) {
    if (auto* proj = m->as<Projection>()) {
      proj->weight.normal_(0.0, std);
    } else if (auto* emb = m->as<torch::nn::Embedding>()) {
      emb->weight.normal_(0.0, std);
    }
  }
}

} // namespace

LlamaImpl::LlamaImpl(LlamaOptions options_) : options(std::move(options_)) {
  options.validate();
  reset();
}

void LlamaImpl::reset() {
  model = register_module("model", LlamaModel(options));
  if (options.tie_word_embeddings()) {
    lm_head = nullptr;
  } else {
    lm_head = register_module("lm_head", projection(options.hidden_size(), options.vocab_size()));
  }
  init_llama_weights(*this, options.initializer_range());
  checkpointing_.resize(options.num_layers());
}

void LlamaImpl::pretty_print(std::ostream& stream) const {
  stream << "remat::nn::Llama(layers=" << options.num_layers()
         << ", hidden=" << options.hidden_size() << ", heads=" << options.num_heads()
         << ", kv_heads=" << options.kv_heads()
         << ", intermediate=" << options.mlp_size()
         << ", vocab=" << options.vocab_size()
         << ", tied=" << (options.tie_word_embeddings() ? "true" : "false")
         << ", attention=" << to_string(options.attention())
         << ", checkpoint=" << checkpointing_.policy().name() << ")";
}

torch::Tensor LlamaImpl::lm_head_weight() const {
  return lm_head ? lm_head->weight : model->embed_tokens->weight;
}

torch::Tensor LlamaImpl::last_hidden_state(
    const torch::Tensor& input_ids,
    const torch::Tensor& attention_mask,
    KvCache* cache) {
  if (cache == nullptr && torch::GradMode::is_enabled() && input_ids.dim() == 2 &&
      checkpointing_.needs_plan(input_ids.size(0), input_ids.size(1))) {
    checkpointing_.plan(input_ids.size(0), input_ids.size(1), [&](int64_t budget_bytes) {
      return plan_checkpointing(
          *this, LlamaStep(input_ids).attention_mask(attention_mask), budget_bytes);
    });
  }
  return model->forward(input_ids, attention_mask, checkpointing_.schedule(), cache);
}

torch::Tensor LlamaImpl::forward(
    const torch::Tensor& input_ids,
    const torch::Tensor& attention_mask,
    KvCache* cache) {
  auto hidden = last_hidden_state(input_ids, attention_mask, cache);
  return lm_head ? lm_head->forward(hidden)
                 : torch::nn::functional::linear(hidden, model->embed_tokens->weight);
}

torch::Tensor LlamaImpl::forward_loss(
    const torch::Tensor& input_ids,
    const torch::Tensor& labels,
    const torch::Tensor& attention_mask) {
  return head_loss(last_hidden_state(input_ids, attention_mask, nullptr), labels);
}

torch::Tensor LlamaImpl::head_loss(const torch::Tensor& hidden, const torch::Tensor& labels) {
  TORCH_CHECK(
      hidden.dim() == 3 && labels.dim() == 2 && hidden.size(0) == labels.size(0) &&
          hidden.size(1) == labels.size(1) && hidden.size(2) == options.hidden_size(),
      "remat::nn::Llama::head_loss: expected hidden [batch, seq, ", options.hidden_size(),
      "] and labels [batch, seq], but got ", hidden.sizes(), " and ", labels.sizes());
  if (lm_head && (lm_head->has_adapter() || lm_head->bias.defined())) {
    return causal_lm_loss(lm_head->forward(hidden), labels);
  }
  // Position s predicts label s + 1. Shifting the labels rather than the
  // hidden state keeps the [B * S, H] reshape a view, where narrowing the
  // hidden state would copy it (and keep the copy until backward); the
  // last position of each row gets ignore_index and adds nothing.
  const auto batch = labels.size(0);
  const auto seq = labels.size(1);
  auto next = torch::cat(
      {labels.narrow(1, 1, seq - 1), torch::full({batch, 1}, -100, labels.options())}, 1);
  return linear_cross_entropy(
      hidden.reshape({batch * seq, hidden.size(2)}), lm_head_weight(), next.reshape({-1}),
      LinearCrossEntropyOptions().ignore_index(-100));
}

Embedded LlamaImpl::embed(const StageBatch& batch) {
  TORCH_CHECK(
      !batch.token_type_ids().defined(),
      "remat::nn::Llama: expected no token_type_ids (a Llama has no token types), but got ",
      batch.token_type_ids().sizes());
  return embed_after(*model, batch.input_ids(), batch.attention_mask(), 0);
}

std::vector<torch::Tensor> LlamaImpl::embedding_parameters() const {
  return model->embed_tokens->parameters();
}

std::shared_ptr<LayerStack> LlamaImpl::layer_stack() {
  return model.ptr();
}

StageHead LlamaImpl::step_head(const torch::Tensor& labels) {
  auto params = model->norm->parameters();
  const auto out = lm_head ? lm_head->parameters()
                           : std::vector<torch::Tensor>{model->embed_tokens->weight};
  params.insert(params.end(), out.begin(), out.end());
  LlamaImpl* m = this;
  return StageHead{
      [m, labels](const torch::Tensor& hidden) {
        return m->head_loss(m->model->norm->forward(hidden), labels);
      },
      std::move(params)};
}

StageBatch LlamaStep::batch() const {
  return StageBatch(input_ids_).attention_mask(attention_mask_);
}

torch::Tensor LlamaStep::next_token_labels() const {
  return labels_.defined() ? labels_ : input_ids_;
}

StageHead LlamaStep::head(LlamaImpl& model) const {
  return model.step_head(next_token_labels());
}

torch::Tensor LlamaStep::forward_loss(LlamaImpl& model) const {
  return model.forward_loss(input_ids_, next_token_labels(), attention_mask_);
}

torch::Tensor causal_lm_loss(const torch::Tensor& logits, const torch::Tensor& labels) {
  TORCH_CHECK(
      logits.dim() == 3 && labels.dim() == 2 && logits.size(0) == labels.size(0) &&
          logits.size(1) == labels.size(1),
      "remat::nn::causal_lm_loss: expected logits [batch, seq, vocab] and labels "
      "[batch, seq], but got ", logits.sizes(), " and ", labels.sizes());
  const auto seq = logits.size(1);
  auto shifted_logits = logits.narrow(1, 0, seq - 1).reshape({-1, logits.size(2)});
  auto shifted_labels = labels.narrow(1, 1, seq - 1).reshape({-1});
  return torch::nn::functional::cross_entropy(
      shifted_logits.to(torch::kFloat), shifted_labels,
      torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100));
}

torch::Tensor LlamaImpl::loss(const torch::Tensor& logits, const torch::Tensor& labels) const {
  return causal_lm_loss(logits, labels);
}

torch::Tensor LlamaImpl::generate(
    const torch::Tensor& input_ids,
    int64_t max_new_tokens,
    bool use_cache) {
  TORCH_CHECK(
      max_new_tokens >= 0, "remat::nn::Llama::generate: expected max_new_tokens >= 0, but got ",
      max_new_tokens);
  torch::NoGradGuard no_grad;
  KvCache cache;
  auto tokens = input_ids;
  auto next_input = input_ids;
  for (int64_t i = 0; i < max_new_tokens; ++i) {
    auto logits = use_cache ? forward(next_input, {}, &cache) : forward(tokens);
    auto next = logits.select(1, -1).argmax(-1, /*keepdim=*/true);
    tokens = torch::cat({tokens, next}, 1);
    next_input = next;
  }
  return tokens;
}

void LlamaImpl::gradient_checkpointing_enable(const CheckpointPolicy& policy) {
  checkpointing_.enable(policy);
}

void LlamaImpl::gradient_checkpointing_enable(
    const CheckpointPolicy& policy,
    const plan::Chain& chain) {
  checkpointing_.enable(policy, chain);
}

void LlamaImpl::gradient_checkpointing_disable() {
  gradient_checkpointing_enable(CheckpointPolicy::none());
}

} // namespace nn
} // namespace remat
