#include "remat/nn/model_config.h"

#include <algorithm>

namespace remat {
namespace nn {

int64_t ModelConfig::mlp_size() const {
  if (intermediate_ > 0) {
    return intermediate_;
  }
  return llama() ? llama_mlp_size(hidden_) : bert_mlp_size(hidden_);
}

int64_t ModelConfig::vocab_size() const {
  return vocab_ > 0 ? vocab_ : (llama() ? 32000 : 30522);
}

int64_t ModelConfig::positions() const {
  if (max_positions_ > 0) {
    return max_positions_;
  }
  // BERT learns a position table (bert-base's 512 rows, grown for longer
  // sequences); Llama's rotary tables are computed, 4096 is Llama-2's.
  return std::max<int64_t>(llama() ? 4096 : 512, seq_);
}

double ModelConfig::dropout_p() const {
  return dropout_ >= 0 ? dropout_ : (llama() ? 0.0 : 0.1);
}

AutocastState ModelConfig::autocast(c10::Device device) const {
  return AutocastState::bf16(device, dtype_ == c10::ScalarType::BFloat16);
}

void ModelConfig::validate() const {
  // Fields whose 0 means "the family's": a negative value is a mistake that
  // the defaults would hide from spec().
  check_size("intermediate", intermediate_, 0, limits::kMaxIntermediate);
  check_size("vocab", vocab_, 0, limits::kMaxVocab);
  check_size("max_positions", max_positions_, 0, limits::kMaxPositions);
  // The head rules before the division by heads below.
  check_size("hidden", hidden_, 1, limits::kMaxHidden);
  check_heads(hidden_, heads_, kv_heads_);
  check_field(
      !llama() || (hidden_ / heads_) % 2 == 0, "heads",
      "expected an even head size (hidden / heads) for rotary embeddings, but got " +
          std::to_string(hidden_ / heads_));
  check_field(
      dtype_ == c10::ScalarType::Float || dtype_ == c10::ScalarType::BFloat16, "dtype",
      std::string("expected fp32 or bf16, but got ") + c10::toString(dtype_));
  check_field(
      dropout_ < 1, "dropout",
      "expected a probability in [0, 1) (< 0: the family's), but got " +
          std::to_string(dropout_));
  // Every size against its bound (same field names), and their product.
  spec().validate();
}

BertOptions ModelConfig::bert_options() const {
  TORCH_CHECK(!llama(), "remat::nn::ModelConfig: expected a bert config, but got llama");
  const double p = dropout_p();
  return BertOptions()
      .vocab_size(vocab_size())
      .hidden_size(hidden_)
      .num_layers(layers_)
      .num_heads(heads_)
      .intermediate_size(mlp_size())
      .max_position_embeddings(positions())
      .hidden_dropout(p)
      .attention_dropout(p)
      .attention(attention_);
}

LlamaOptions ModelConfig::llama_options() const {
  TORCH_CHECK(llama(), "remat::nn::ModelConfig: expected a llama config, but got bert");
  return LlamaOptions()
      .vocab_size(vocab_size())
      .hidden_size(hidden_)
      .intermediate_size(mlp_size())
      .num_layers(layers_)
      .num_heads(heads_)
      .num_kv_heads(kv_heads_)
      .max_position_embeddings(positions())
      .tie_word_embeddings(tie_embeddings_)
      .attention_dropout(dropout_p())
      .attention(attention_);
}

plan::ModelSpec ModelConfig::spec() const {
  return plan::ModelSpec(family_, layers_, hidden_, heads_, vocab_size())
      .kv_heads(kv_heads_)
      .intermediate(mlp_size())
      .seq(seq_)
      .batch(batch_)
      .max_positions(positions())
      .tie_embeddings(tie_embeddings_)
      .head(llama() ? plan::Head::kLanguageModel : plan::Head::kNone)
      .precision(dtype_ == c10::ScalarType::BFloat16 ? plan::Precision::kBf16
                                                      : plan::Precision::kFp32)
      .attention(attention_ == AttentionKind::kEager ? plan::AttentionImpl::kEager
                                                     : plan::AttentionImpl::kBlockwise)
      .dropout(dropout_p() > 0);
}

ModelConfig ModelConfig::from_spec(const plan::ModelSpec& spec) {
  return ModelConfig(spec.family())
      .layers(spec.layers())
      .hidden(spec.hidden())
      .heads(spec.heads())
      .kv_heads(spec.kv_heads())
      .intermediate(spec.mlp_size())
      .vocab(spec.vocab())
      .max_positions(spec.family() == plan::Family::kBert ? spec.max_positions() : 0)
      .seq(spec.seq())
      .batch(spec.batch())
      .attention(spec.attention() == plan::AttentionImpl::kEager ? AttentionKind::kEager
                                                                 : AttentionKind::kBlockwise)
      .dtype(spec.precision() == plan::Precision::kFp32 ? c10::ScalarType::Float
                                                        : c10::ScalarType::BFloat16)
      .dropout(spec.dropout() ? 0.1 : 0.0)
      .tie_embeddings(spec.tie_embeddings());
}

c10::ScalarType parse_model_dtype(const std::string& text) {
  if (text == "fp32" || text == "f32") {
    return c10::ScalarType::Float;
  }
  check_field(text == "bf16", "dtype", "expected fp32 or bf16, but got '" + text + "'");
  return c10::ScalarType::BFloat16;
}

const char* model_dtype_name(c10::ScalarType dtype) {
  return dtype == c10::ScalarType::BFloat16 ? "bf16" : "fp32";
}

} // namespace nn
} // namespace remat
