#include "remat/plan/estimate.h"

#include "plan/model_trace.h"
#include "remat/memory.h"
#include "remat/model_sizes.h"
#include "remat/plan/solver.h"

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <sstream>

namespace remat {
namespace plan {

const char* to_string(Family f) {
  return f == Family::kBert ? "bert" : "llama";
}

const char* to_string(Precision p) {
  switch (p) {
    case Precision::kFp32:
      return "fp32";
    case Precision::kBf16Mixed:
      return "bf16-mixed";
    case Precision::kBf16:
      return "bf16-pure";
  }
  return "?";
}

const char* to_string(AttentionImpl a) {
  return a == AttentionImpl::kEager ? "eager" : "blockwise";
}

const char* to_string(Head h) {
  switch (h) {
    case Head::kNone:
      return "none";
    case Head::kLanguageModel:
      return "lm";
    case Head::kClassifier:
      return "classifier";
  }
  return "?";
}

Family parse_family(const std::string& text) {
  if (text == "bert") {
    return Family::kBert;
  }
  TORCH_CHECK(text == "llama", "expected a model family (bert, llama), but got '", text, "'");
  return Family::kLlama;
}

Precision parse_precision(const std::string& text) {
  for (auto p : {Precision::kFp32, Precision::kBf16Mixed, Precision::kBf16}) {
    if (text == to_string(p)) {
      return p;
    }
  }
  TORCH_CHECK(
      false, "expected a precision (fp32, bf16-mixed, bf16-pure), but got '", text, "'",
      text == "bf16" ? " (bf16 autocast, fp32 weights with bf16 compute, is not modelled)" : "");
}

AttentionImpl parse_attention_impl(const std::string& text) {
  if (text == "eager") {
    return AttentionImpl::kEager;
  }
  TORCH_CHECK(
      text == "blockwise", "expected an attention kind (eager, blockwise), but got '",
      text, "'");
  return AttentionImpl::kBlockwise;
}

Head parse_head(const std::string& text) {
  for (auto h : {Head::kNone, Head::kLanguageModel, Head::kClassifier}) {
    if (text == to_string(h)) {
      return h;
    }
  }
  TORCH_CHECK(false, "expected a head (none, lm, classifier), but got '", text, "'");
}

ModelSpec::ModelSpec(Family family, int64_t layers, int64_t hidden, int64_t heads, int64_t vocab)
    : family_(family),
      layers_(layers),
      hidden_(hidden),
      heads_(heads),
      vocab_(vocab),
      dropout_(family == Family::kBert) {}

int64_t ModelSpec::mlp_size() const {
  if (intermediate_ > 0) {
    return intermediate_;
  }
  return family_ == Family::kBert ? bert_mlp_size(hidden_) : llama_mlp_size(hidden_);
}

int64_t ModelSpec::activation_bytes_per_element() const {
  return precision_ == Precision::kFp32 ? 4 : 2;
}

namespace {

struct LoraName {
  const char* short_name;
  const char* bert;  ///< nullptr: BERT has none apply_lora can match alone
  const char* llama;
};

constexpr LoraName kLoraNames[] = {
    {"q", "query", "q_proj"},
    {"k", "key", "k_proj"},
    {"v", "value", "v_proj"},
    {"o", "attention.output.dense", "o_proj"},
    {"gate", nullptr, "gate_proj"},
    {"up", "intermediate.dense", "up_proj"},
    {"down", nullptr, "down_proj"},
};

const LoraName& lora_name(Family family, const std::string& target) {
  const bool bert = family == Family::kBert;
  for (const auto& n : kLoraNames) {
    const char* module = bert ? n.bert : n.llama;
    if (target == n.short_name || (module != nullptr && target == module)) {
      // BERT's "down" exists for the estimate alone (see the header).
      check_field(
          !(bert && target == "gate"), "lora_targets",
          "expected LoRA targets of bert among q, k, v, o, up, down (or query, key, value, "
          "attention.output.dense, intermediate.dense), but got 'gate'");
      return n;
    }
  }
  std::string accepted;
  for (const auto& n : kLoraNames) {
    const char* module = bert ? n.bert : n.llama;
    if (bert && std::string(n.short_name) == "gate") {
      continue;
    }
    accepted += std::string(accepted.empty() ? "" : ", ") + n.short_name +
        (module != nullptr ? std::string(" (") + module + ")" : "");
  }
  check_field(false, "lora_targets",
              "expected LoRA targets of " + std::string(to_string(family)) + " among " +
                  accepted + ", but got '" + target + "'");
  return kLoraNames[0]; // not reached
}

} // namespace

std::string lora_target_short(Family family, const std::string& target) {
  return lora_name(family, target).short_name;
}

std::string lora_target_module(Family family, const std::string& target) {
  const auto& n = lora_name(family, target);
  const char* module = family == Family::kBert ? n.bert : n.llama;
  check_field(
      module != nullptr, "lora_targets",
      "expected LoRA targets of bert that training can adapt (q, k, v, o, up), but got '" +
          target + "': its module name, output.dense, is also the end of the attention's "
          "output.dense");
  return module;
}

void ModelSpec::validate() const {
  check_size("layers", layers_, 1, limits::kMaxLayers);
  check_size("hidden", hidden_, 1, limits::kMaxHidden);
  check_heads(hidden_, heads_, kv_heads_);
  const int64_t kv = kv_heads_or_heads();
  check_field(
      family_ == Family::kLlama || kv == heads_, "kv_heads",
      "expected kv_heads == heads for BERT, but got " + std::to_string(kv_heads_));
  check_size("vocab", vocab_, 1, limits::kMaxVocab);
  check_size("intermediate", intermediate_, 0, limits::kMaxIntermediate);
  check_size("seq", seq_, 1, limits::kMaxSeq);
  check_size("batch", batch_, 1, limits::kMaxBatch);
  check_size("max_positions", max_positions_, 1, limits::kMaxPositions);
  check_size("type_vocab", type_vocab_, 1, limits::kMaxVocab);
  check_field(
      family_ == Family::kLlama || seq_ <= max_positions_, "seq",
      "expected seq <= max_positions (" + std::to_string(max_positions_) +
          ") for BERT, but got " + std::to_string(seq_));
  check_size("num_labels", num_labels_, 1, limits::kMaxLabels);
  check_size("lora_rank", lora_rank_, 0, limits::kMaxLoraRank);
  for (const auto& t : lora_targets_) {
    // Throws for a name in neither column of the table.
    const auto short_name = lora_target_short(family_, t);
    check_field(
        short_name == t, "lora_targets",
        "expected LoRA targets by their short names here (" + short_name + " for " + t +
            "), but got '" + t + "'");
  }
  // Each size is within its bound; their product must be too, or the
  // estimate's byte counts would leave int64. Rough and generous: every
  // layer keeps at most this many elements per token, 4 bytes each.
  const double tokens = static_cast<double>(batch_) * static_cast<double>(seq_);
  const double per_token = 64.0 * hidden_ + 16.0 * mlp_size() + 8.0 * heads_ * seq_;
  const double weights = static_cast<double>(layers_) *
          (4.0 * hidden_ * hidden_ + 3.0 * static_cast<double>(hidden_) * mlp_size()) +
      2.0 * static_cast<double>(vocab_) * hidden_ +
      static_cast<double>(max_positions_) * hidden_;
  const double bytes = 4.0 * (layers_ * tokens * per_token + tokens * vocab_) + 16.0 * weights;
  check_field(
      bytes <= limits::kMaxStepBytes, "batch",
      "expected a step of at most 64 PiB (the product of layers, batch, seq and the widths), "
      "but this one would hold about " + memory::format_size(static_cast<int64_t>(
          std::min(bytes, 9.0e18))) + "; reduce batch, seq or the model's size");
}

ModelSpec ModelSpec::bert_base() {
  return ModelSpec(Family::kBert, 12, 768, 12, 30522).seq(512).max_positions(512);
}

ModelSpec ModelSpec::llama2_7b() {
  // intermediate 0: the Llama rule gives Llama-2's 11008 for hidden 4096,
  // and follows a --hidden given after the preset.
  return ModelSpec(Family::kLlama, 32, 4096, 32, 32000)
      .seq(4096)
      .head(Head::kLanguageModel);
}

ModelSpec ModelSpec::llama_13b_lora_8k() {
  return ModelSpec(Family::kLlama, 40, 5120, 40, 32000)
      .kv_heads(40) // intermediate 0: the Llama rule gives 13824
      .seq(8192)
      .batch(2)
      .head(Head::kClassifier)
      .num_labels(4)
      .precision(Precision::kBf16Mixed)
      .attention(AttentionImpl::kBlockwise)
      .backend(Backend::kCuda)
      .lora_rank(64)
      .lora_targets({"q", "k", "v", "o"});
}

ModelSpec ModelSpec::preset(const std::string& name) {
  if (name == "bert-base") {
    return bert_base();
  }
  if (name == "llama2-7b") {
    return llama2_7b();
  }
  TORCH_CHECK(
      preset_name(name) == "llama-13b-lora-8k",
      "expected a preset (bert-base, llama2-7b, llama-13b-lora-8k), but got '", name, "'");
  return llama_13b_lora_8k();
}

std::string ModelSpec::preset_name(const std::string& name) {
  return name == "harbor-13b" ? "llama-13b-lora-8k" : name;
}

namespace {

// Parameters of one layer's adapters.
int64_t lora_parameters(const ModelSpec& s) {
  if (s.lora_rank() == 0) {
    return 0;
  }
  const int64_t H = s.hidden();
  const int64_t kv = s.kv_heads_or_heads() * (H / s.heads());
  const int64_t I = s.mlp_size();
  int64_t n = 0;
  for (const auto& t : s.lora_targets()) {
    int64_t in = H;
    int64_t out = H;
    if (t == "k" || t == "v") {
      out = kv;
    } else if (t == "gate" || t == "up") {
      out = I;
    } else if (t == "down") {
      in = I;
    }
    n += s.lora_rank() * (in + out);
  }
  return n;
}

int64_t head_parameters(const ModelSpec& s) {
  const int64_t H = s.hidden();
  const bool bert = s.family() == Family::kBert;
  switch (s.head()) {
    case Head::kNone:
      return 0;
    case Head::kClassifier:
      return H * s.num_labels() + (bert ? s.num_labels() : 0);
    case Head::kLanguageModel:
      if (bert) {
        // Transform dense + LayerNorm, decoder bias; the decoder weight is
        // the word embeddings.
        return H * H + H + 2 * H + s.vocab();
      }
      return s.tie_embeddings() ? 0 : s.vocab() * H;
  }
  return 0;
}

int64_t input_bytes(const ModelSpec& s) {
  const int64_t tokens = s.batch() * s.seq();
  // Token ids (and for BERT token types and the attention mask), int64.
  int64_t n = tokens * 8 * (s.family() == Family::kBert ? 3 : 1);
  if (s.head() == Head::kLanguageModel) {
    n += tokens * 8;
  } else if (s.head() == Head::kClassifier) {
    n += s.batch() * s.num_labels() * 4;
  }
  return n;
}

struct Fixed {
  ParameterCount params;
  int64_t weights = 0, gradients = 0, optimizer = 0, inputs = 0;
  int64_t total() const { return weights + gradients + optimizer + inputs; }
};

Fixed fixed_bytes(const ModelSpec& s) {
  Fixed f;
  f.params = count_parameters(s);
  const bool fp32 = s.precision() == Precision::kFp32;
  f.weights = f.params.total * (fp32 ? 4 : 2);
  f.gradients = f.params.trainable * (fp32 ? 4 : 2);
  int64_t per = 0;
  if (s.optimizer() == Optimizer::kAdamW) {
    per = s.precision() == Precision::kBf16 ? 4 : 8;
  }
  if (s.precision() == Precision::kBf16Mixed) {
    per += 4; // fp32 master copy
  }
  f.optimizer = f.params.trainable * per;
  f.inputs = input_bytes(s);
  return f;
}

bool is_layer_mode(SegmentMode m) {
  return m == SegmentMode::kStore || m == SegmentMode::kRecomputeAttention ||
      m == SegmentMode::kRecomputeMlp;
}

} // namespace

ParameterCount count_parameters(const ModelSpec& s) {
  s.validate();
  const int64_t H = s.hidden();
  const int64_t I = s.mlp_size();
  const int64_t L = s.layers();
  ParameterCount c;
  int64_t classifier = 0;
  if (s.family() == Family::kBert) {
    const int64_t emb = (s.vocab() + s.max_positions() + s.type_vocab()) * H + 2 * H;
    const int64_t layer = 4 * (H * H + H) + 2 * H + (H * I + I) + (I * H + H) + 2 * H;
    const bool pooler = s.pooler() || s.head() == Head::kClassifier;
    c.total = emb + L * layer + (pooler ? H * H + H : 0);
  } else {
    const int64_t kv = s.kv_heads_or_heads() * (H / s.heads());
    const int64_t layer = 2 * H * H + 2 * H * kv + 3 * H * I + 2 * H;
    c.total = s.vocab() * H + L * layer + H;
  }
  const int64_t head = head_parameters(s);
  if (s.head() == Head::kClassifier) {
    classifier = head;
  }
  const int64_t adapters = L * lora_parameters(s);
  c.total += head + adapters;
  c.trainable = s.lora_rank() == 0 ? c.total : adapters + classifier;
  return c;
}

std::vector<SavedTensor> layer_activations(const ModelSpec& spec, SegmentMode mode) {
  spec.validate();
  TORCH_CHECK(
      is_layer_mode(mode), "remat::plan: expected a per-layer mode (store, ",
      "recompute-attention, recompute-mlp), but got ", to_string(mode));
  auto t = detail::trace_layer(spec, /*input_requires_grad=*/true);
  std::vector<SavedTensor> out;
  const auto& values = t.values();
  const int output = t.output();
  for (int v = 0; v < static_cast<int>(values.size()); ++v) {
    if (!t.kept(v, mode)) {
      continue;
    }
    const auto& val = values[v];
    SavedTensor s;
    s.name = val.name;
    s.shape = val.shape_str();
    s.bytes = val.bytes();
    const detail::Block recomputed = mode == SegmentMode::kRecomputeAttention
        ? detail::Block::kAttentionCore
        : detail::Block::kMlp;
    for (int k : val.saved_by) {
      const auto& op = t.ops()[k];
      if (mode != SegmentMode::kStore && op.block == recomputed) {
        continue;
      }
      s.saved_by += (s.saved_by.empty() ? "" : ", ") + op.name;
    }
    if (s.saved_by.empty()) {
      s.saved_by = v == output ? "next layer (the layer output)"
                               : std::string("checkpoint of the ") +
              (mode == SegmentMode::kRecomputeAttention ? "attention core" : "MLP") +
              " (its input)";
    }
    out.push_back(std::move(s));
  }
  return out;
}

namespace {

// The chain with each layer's partial modes: the selective ones, the per-op
// ones, and kCompress (to `compress_bytes` per element) only when given:
// it is lossy, so a budget is never planned with it unasked.
Chain chain_of(const ModelSpec& spec, double flops_per_second, int64_t compress_bytes) {
  spec.validate();
  TORCH_CHECK(
      flops_per_second > 0, "remat::plan: expected flops_per_second > 0, but got ",
      flops_per_second);
  auto stage = [&](const detail::Trace& t, std::string name, StageKind kind) {
    auto c = t.cost(SegmentMode::kStore);
    auto s = StageCost(std::move(name), kind)
                 .forward_seconds(c.forward_flops / flops_per_second)
                 .backward_seconds(c.backward_flops / flops_per_second)
                 .output_bytes(c.output_bytes)
                 .stored_bytes(c.stored_bytes)
                 .forward_transient_bytes(c.forward_transient_bytes)
                 .nograd_transient_bytes(c.nograd_transient_bytes)
                 .backward_transient_bytes(c.backward_transient_bytes)
                 .parameter_gradient_bytes(c.parameter_gradient_bytes);
    if (kind == StageKind::kLayer) {
      auto selective = [&](SegmentMode mode) {
        auto m = t.cost(mode);
        return SelectiveCost(m.stored_bytes, m.recompute_flops / flops_per_second)
            .forward_transient_bytes(m.forward_transient_bytes)
            .backward_transient_bytes(m.backward_transient_bytes);
      };
      s.recompute_attention(selective(SegmentMode::kRecomputeAttention));
      s.recompute_mlp(selective(SegmentMode::kRecomputeMlp));
      s.save_matmuls(selective(SegmentMode::kSaveMatmuls));
      s.save_projections(selective(SegmentMode::kSaveProjections));
      if (compress_bytes > 0) {
        s.compress(selective(SegmentMode::kCompress));
      }
    }
    return s;
  };
  Chain chain;
  chain.base_bytes = fixed_bytes(spec).total();
  chain.stages.push_back(stage(detail::trace_embedding(spec), "embeddings", StageKind::kEmbedding));
  auto first = detail::trace_layer(spec, detail::layer_input_requires_grad(spec, 0));
  auto rest = detail::trace_layer(spec, true);
  if (compress_bytes > 0) {
    first.compress_to(compress_bytes);
    rest.compress_to(compress_bytes);
  }
  for (int64_t i = 0; i < spec.layers(); ++i) {
    chain.stages.push_back(
        stage(i == 0 ? first : rest, "layer." + std::to_string(i), StageKind::kLayer));
  }
  chain.stages.push_back(stage(
      detail::trace_head(spec, detail::layer_input_requires_grad(spec, spec.layers())),
      "head", StageKind::kHead));
  return chain;
}

// An op policy of the user's (+save=OPS) keeps ops the traces do not name
// one by one, and offload's device bytes follow its copies' timing on the
// GPU: refused rather than estimated as something else.
void require_modelled(const CheckpointPolicy& policy) {
  const bool own_ops = policy.checkpoint() && !policy.checkpoint()->op_policy.empty();
  TORCH_CHECK(
      !own_ops && policy.kind() != CheckpointPolicy::Kind::kOffload,
      "expected a policy the estimator models (none, every-K, sqrt, full, selective-*, "
      "save-matmuls, save-projections, compress, compress-fp8, budget:SIZE), but got '",
      policy.name(), "': ",
      own_ops ? "an op policy of your own (+save=) is measured by remat bench, not estimated"
              : "offload is measured on the GPU by remat bench, not estimated");
}

} // namespace

Chain estimate_chain(const ModelSpec& spec, double flops_per_second) {
  return chain_of(spec, flops_per_second, /*compress_bytes=*/0);
}

namespace {

// The chain `policy` runs on: estimate_chain's, with kCompress's costs for a
// compress policy (to its dtype).
Chain chain_for(const ModelSpec& spec, const CheckpointPolicy& policy) {
  return policy.kind() == CheckpointPolicy::Kind::kCompress
      ? chain_of(spec, kEstimateFlopsPerSecond,
                 static_cast<int64_t>(c10::elementSize(policy.compress_dtype())))
      : estimate_chain(spec);
}

} // namespace

Estimate estimate(const ModelSpec& spec, const CheckpointPolicy& policy) {
  require_modelled(policy);
  const auto chain = chain_for(spec, policy);
  const auto fixed = fixed_bytes(spec);
  Estimate e;
  e.parameters = fixed.params;
  e.weight_bytes = fixed.weights;
  e.gradient_bytes = fixed.gradients;
  e.optimizer_bytes = fixed.optimizer;
  e.input_bytes = fixed.inputs;
  e.schedule = policy.kind() == CheckpointPolicy::Kind::kBudget
      ? solve(chain, policy.budget_bytes()).schedule
      : policy.schedule(spec.layers());
  auto ev = evaluate(chain, e.schedule);
  e.activation_bytes = ev.activation_bytes;
  e.peak_bytes = ev.peak_bytes;
  e.peak_activation_bytes = ev.peak_bytes - chain.base_bytes;
  e.step_seconds = ev.step_seconds;
  e.peak_event = ev.peak_event;
  return e;
}

std::string Estimate::str() const {
  using memory::format_size;
  std::ostringstream s;
  s << "parameters " << parameters.total << " (" << parameters.trainable
    << " trainable)\n"
    << "weights " << format_size(weight_bytes) << ", gradients "
    << format_size(gradient_bytes) << ", optimizer " << format_size(optimizer_bytes)
    << ", inputs " << format_size(input_bytes) << "\n"
    << "activations held after forward " << format_size(activation_bytes)
    << ", at peak " << format_size(peak_activation_bytes) << "\n"
    << "peak " << format_size(peak_bytes) << " (" << peak_event << ")\n"
    << "schedule " << schedule.str();
  return s.str();
}

namespace {

bool fits(const ModelSpec& spec, const CheckpointPolicy& policy, int64_t device_bytes) {
  require_modelled(policy);
  Chain chain;
  try {
    chain = chain_for(spec, policy);
  } catch (const FieldError&) {
    return false; // past the product bound: far more than any device
  }
  if (policy.kind() == CheckpointPolicy::Kind::kBudget) {
    return min_feasible_budget(chain) <= device_bytes;
  }
  return predicted_peak_bytes(chain, policy.schedule(spec.layers())) <= device_bytes;
}

// The largest n >= 1 with ok(n), given that ok is monotone (true then false);
// 0 if !ok(1).
// Returns `most` when ok(most): the search never leaves the sizes that
// ModelSpec::validate accepts, so it ends in at most 2 log2(most) steps.
template <typename Ok>
int64_t largest(const Ok& ok, int64_t most) {
  if (most < 1 || !ok(1)) {
    return 0;
  }
  if (ok(most)) {
    return most;
  }
  int64_t lo = 1;
  int64_t hi = 2;
  while (hi < most && ok(hi)) {
    lo = hi;
    hi *= 2;
  }
  hi = std::min(hi, most);
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    (ok(mid) ? lo : hi) = mid;
  }
  return lo;
}

} // namespace

int64_t check_fits(const ModelSpec& spec, int64_t limit_bytes, const std::string& limit_name) {
  // The estimator's step holds zeroed gradients throughout; bench's and
  // train's set them to none, and may peak before most exist. Checked
  // before running, the bound must be one that no step that fits exceeds.
  const int64_t least =
      std::max<int64_t>(0, min_feasible_budget(estimate_chain(spec)) - fixed_bytes(spec).gradients);
  check_field(
      least <= limit_bytes, "memory_limit",
      "expected a step that fits " + limit_name + " (" + memory::format_size(limit_bytes) +
          "), but the estimate of its smallest peak, under any checkpointing, is at least " +
          memory::format_size(least) + " (weights, inputs and activations; no gradients)");
  return least;
}

int64_t fit_batch(const ModelSpec& spec, const CheckpointPolicy& policy, int64_t device_bytes) {
  spec.validate();
  return largest(
      [&](int64_t b) { return fits(ModelSpec(spec).batch(b), policy, device_bytes); },
      limits::kMaxBatch);
}

int64_t fit_seq(
    const ModelSpec& spec,
    const CheckpointPolicy& policy,
    int64_t device_bytes,
    int64_t multiple) {
  spec.validate();
  TORCH_CHECK(multiple >= 1, "remat::plan: expected multiple >= 1, but got ", multiple);
  TORCH_CHECK(
      multiple <= limits::kMaxSeq, "remat::plan: expected multiple <= ", limits::kMaxSeq,
      ", but got ", multiple);
  return multiple * largest(
      [&](int64_t k) {
        auto s = ModelSpec(spec).seq(k * multiple);
        s.max_positions(std::max(spec.max_positions(), k * multiple));
        return fits(s, policy, device_bytes);
      },
      limits::kMaxSeq / multiple);
}

} // namespace plan
} // namespace remat
