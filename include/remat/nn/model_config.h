// One description of a model and its batch: the family, the sizes, the
// attention, the dtype and the dropout. It alone turns sizes into
// BertOptions or LlamaOptions (for the models) and into a plan::ModelSpec
// (for the estimator), and owns every family default, so `remat bench`,
// `plan`, `estimate`, `estimate --check` and `train` build the same model
// from the same sizes.
//
// Sizes left at 0 (and a negative dropout) take the family's default:
//   - intermediate: remat::bert_mlp_size / remat::llama_mlp_size
//     (remat/model_sizes.h; 512 for a Llama of hidden 128);
//   - vocab: 30522 (BERT), 32000 (Llama);
//   - max_positions: max(512, seq) (BERT), max(4096, seq) (Llama);
//   - dropout: 0.1 (BERT), 0 (Llama).
//
// Example:
//   auto config = remat::nn::ModelConfig(remat::plan::Family::kLlama)
//                     .layers(4).hidden(128).heads(4).seq(256).batch(8);
//   config.validate();                            // FieldError("hidden") ...
//   remat::nn::Llama model(config.llama_options());  // MLP 512 wide
//   auto e = remat::plan::estimate(config.spec(),
//                                  remat::CheckpointPolicy::every_layer());
#pragma once

#include "remat/autocast.h"
#include "remat/model_sizes.h"
#include "remat/nn/attention.h"
#include "remat/nn/bert.h"
#include "remat/nn/llama.h"
#include "remat/plan/estimate.h"

#include <c10/core/ScalarType.h>
#include <torch/arg.h>

#include <cstdint>
#include <string>

namespace remat {
namespace nn {

/// A BERT encoder or Llama decoder and the batch it trains on.
struct ModelConfig {
  explicit ModelConfig(plan::Family family = plan::Family::kBert) : family_(family) {}

  TORCH_ARG(plan::Family, family);
  TORCH_ARG(int64_t, layers) = 12;        ///< transformer layers
  TORCH_ARG(int64_t, hidden) = 256;       ///< hidden size (elements)
  TORCH_ARG(int64_t, heads) = 4;          ///< attention heads
  TORCH_ARG(int64_t, kv_heads) = 0;       ///< Llama GQA; 0: as many as heads
  TORCH_ARG(int64_t, intermediate) = 0;   ///< MLP width; 0: the family's rule
  TORCH_ARG(int64_t, vocab) = 0;          ///< token ids; 0: the family's
  TORCH_ARG(int64_t, max_positions) = 0;  ///< position rows; 0: the family's
  TORCH_ARG(int64_t, seq) = 256;          ///< tokens per sequence
  TORCH_ARG(int64_t, batch) = 8;          ///< sequences per batch
  TORCH_ARG(AttentionKind, attention) = AttentionKind::kEager;
  /// The step's precision: torch::kFloat, or torch::kBFloat16 for bf16
  /// autocast over float32 master weights: the weights, gradients and
  /// optimizer state stay float32, forward and loss run under autocast()
  /// (matrix products in bfloat16). This is what `--dtype bf16` means to
  /// `remat bench`, `plan` and `train`; pure bf16 (everything cast) exists
  /// only in the estimator (plan::Precision::kBf16, "bf16-pure").
  TORCH_ARG(c10::ScalarType, dtype) = c10::ScalarType::Float;
  /// Hidden and attention dropout (BERT), attention dropout (Llama); < 0:
  /// the family's.
  TORCH_ARG(double, dropout) = -1;
  /// Llama: the LM head shares the embedding matrix.
  TORCH_ARG(bool, tie_embeddings) = false;

 public:
  bool llama() const {
    return family_ == plan::Family::kLlama;
  }
  int64_t mlp_size() const;       ///< intermediate or the family's rule
  int64_t vocab_size() const;     ///< vocab or the family's
  int64_t positions() const;      ///< max_positions or the family's
  double dropout_p() const;       ///< dropout or the family's
  /// The autocast state a training step of this config runs forward and
  /// loss under on `device`: bf16 autocast on that device's type when dtype
  /// is bf16, everything off for fp32.
  AutocastState autocast(c10::Device device) const;

  /// Throws remat::FieldError naming the field ("layers", "kv_heads",
  /// "dtype") when a value is invalid or past its bound (remat/model_sizes.h),
  /// or when the sizes together would need a step past 64 PiB ("batch").
  void validate() const;

  /// The options of the model these sizes describe (family defaults filled
  /// in). Throws unless the family matches.
  BertOptions bert_options() const;
  LlamaOptions llama_options() const;
  /// The estimator's description of a training step of this model: head
  /// none for BERT (a loss on the last hidden state), lm for Llama; AdamW;
  /// dropout as dropout_p() > 0. The estimator does not model autocast: a
  /// bf16 config's spec is pure bf16 (Precision::kBf16), a lower bound of
  /// the autocast step's bytes, which is what plan::check_fits needs to
  /// refuse only a step that cannot fit.
  plan::ModelSpec spec() const;
  /// The config of a spec's model (its head, precision details and LoRA are
  /// the spec's business, not the model's; a bf16 spec gives dtype bf16, and
  /// a caller that wants pure bf16, as check_estimate, casts the model).
  static ModelConfig from_spec(const plan::ModelSpec& spec);
};

/// Parses "fp32" or "bf16" (and the old spelling "f32") into a dtype; throws
/// remat::FieldError("dtype") naming the text otherwise.
c10::ScalarType parse_model_dtype(const std::string& text);
/// "fp32" or "bf16".
const char* model_dtype_name(c10::ScalarType dtype);

} // namespace nn
} // namespace remat
