// The size rules every description of a transformer shares: the family
// defaults that are computed from other sizes (the MLP width), the bounds a
// real model meets, and the typed error that names the field past them.
//
// remat::nn::BertOptions, remat::nn::LlamaOptions, remat::nn::ModelConfig and
// remat::plan::ModelSpec all ask these, so a model is never described with
// two rules, and a loader (a config.json reader, a training state reader)
// gets the same bounds by calling the options' validate().
//
// Example:
//   // given: int64_t layers = 0;
//   // given: auto options = remat::nn::LlamaOptions().num_layers(layers);
//   remat::check_size("layers", layers, 1, remat::limits::kMaxLayers);
//   int64_t mlp = remat::llama_mlp_size(4096);   // 11008
//   try { options.validate(); }
//   catch (const remat::FieldError& e) { std::cerr << e.field(); }  // "layers"
#pragma once

#include "remat/field_error.h"

#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

namespace remat {

/// Bounds a real model meets, with room: the largest public models have 126
/// layers, hidden 16384 (25600 for the widest), 128 heads, MLP width 53248,
/// 256k-token vocabularies and 1M-token contexts. Past these a size is a
/// typo, and an estimate or a planner would only take long to say so.
namespace limits {
constexpr int64_t kMaxLayers = 1024;             ///< transformer layers
constexpr int64_t kMaxHidden = 65536;            ///< hidden size (elements)
constexpr int64_t kMaxHeads = 1024;              ///< attention heads
constexpr int64_t kMaxIntermediate = 262144;     ///< MLP width (elements)
constexpr int64_t kMaxVocab = 4194304;           ///< token ids (2^22)
constexpr int64_t kMaxSeq = 1048576;             ///< tokens per sequence (2^20)
constexpr int64_t kMaxPositions = 1048576;       ///< position table rows
constexpr int64_t kMaxBatch = 65536;             ///< sequences per batch
constexpr int64_t kMaxLabels = 65536;            ///< classifier labels
constexpr int64_t kMaxLoraRank = 65536;          ///< LoRA rank
/// Steps, rounds, repeats, epochs, warm-up steps: counts of work to do.
constexpr int64_t kMaxCount = 1000000000;
/// What a step of an accepted model may hold, as the rough product of its
/// sizes (bytes, 2^56 = 64 PiB): keeps every estimate far from int64
/// overflow.
constexpr double kMaxStepBytes = 72057594037927936.0;
} // namespace limits

/// Throws FieldError "expected <field> in [lo, hi], but got <value>".
inline void check_size(const std::string& field, int64_t value, int64_t lo, int64_t hi) {
  check_field(
      value >= lo && value <= hi, field,
      "expected " + field + " in [" + std::to_string(lo) + ", " + std::to_string(hi) +
          "], but got " + std::to_string(value));
}

/// How a description spells its head fields, for FieldError and its
/// messages: remat's own ("hidden", "heads", "kv_heads"), the models'
/// options' ("hidden_size", "num_heads", "num_kv_heads") or config.json's.
struct HeadFields {
  const char* hidden = "hidden";
  const char* heads = "heads";
  const char* kv_heads = "kv_heads";
};

/// The head rules, written once for every description of a model: heads in
/// [1, kMaxHeads], hidden a multiple of heads, and kv_heads (grouped-query
/// attention; 0: as many as heads) in [0, heads] and dividing heads. Throws
/// FieldError naming `names.hidden` ("expected hidden (30) to be a multiple
/// of heads (4)") or `names.kv_heads`.
inline void check_heads(
    int64_t hidden,
    int64_t heads,
    int64_t kv_heads,
    const HeadFields& names = {}) {
  const std::string hidden_name = names.hidden;
  const std::string heads_name = names.heads;
  const std::string kv_name = names.kv_heads;
  check_size(heads_name, heads, 1, limits::kMaxHeads);
  check_field(
      hidden % heads == 0, hidden_name,
      "expected " + hidden_name + " (" + std::to_string(hidden) + ") to be a multiple of " +
          heads_name + " (" + std::to_string(heads) + ")");
  check_field(
      kv_heads >= 0 && kv_heads <= heads && (kv_heads == 0 || heads % kv_heads == 0), kv_name,
      "expected " + kv_name + " dividing " + heads_name + " (" + std::to_string(heads) +
          "; 0: as many), but got " + std::to_string(kv_heads));
}

/// The sizes the options of every transformer family share, checked under
/// the options' field names (vocab_size, hidden_size, num_layers, num_heads,
/// num_kv_heads (0: num_heads), intermediate_size (0: the family's rule),
/// max_position_embeddings), with the head rules of check_heads. Throws
/// FieldError.
inline void check_transformer_sizes(
    int64_t vocab_size,
    int64_t hidden_size,
    int64_t num_layers,
    int64_t num_heads,
    int64_t num_kv_heads,
    int64_t intermediate_size,
    int64_t max_position_embeddings) {
  check_size("vocab_size", vocab_size, 1, limits::kMaxVocab);
  check_size("hidden_size", hidden_size, 1, limits::kMaxHidden);
  check_size("num_layers", num_layers, 1, limits::kMaxLayers);
  check_heads(hidden_size, num_heads, num_kv_heads, {"hidden_size", "num_heads", "num_kv_heads"});
  check_size("intermediate_size", intermediate_size, 0, limits::kMaxIntermediate);
  check_size(
      "max_position_embeddings", max_position_embeddings, 1, limits::kMaxPositions);
}

/// A layer-norm or RMS-norm epsilon: finite and above 0 (a config.json
/// with "layer_norm_eps": -1 is a mistake that would train on NaN).
/// Throws FieldError(field).
inline void check_norm_eps(const std::string& field, double eps) {
  check_field(
      eps > 0 && eps < 1, field,
      c10::str("expected ", field, " in (0, 1), but got ", eps));
}

/// BERT's MLP width: 4 x hidden (bert-base: 3072 for 768).
inline int64_t bert_mlp_size(int64_t hidden) {
  return 4 * hidden;
}

/// Llama's MLP width: 2/3 of 4 x hidden, rounded up to a multiple of 256, as
/// Meta's reference sizes are (11008 for 4096, 13824 for 5120).
inline int64_t llama_mlp_size(int64_t hidden) {
  return (8 * hidden / 3 + 255) / 256 * 256;
}

} // namespace remat
