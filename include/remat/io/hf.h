// Model weights and configs in the formats people have: Hugging Face model
// folders (config.json + model.safetensors, or shards listed in
// model.safetensors.index.json). Names are matched one to one with a module's
// named_parameters() and named_buffers(), which remat's models keep equal to
// Hugging Face's (BertModel, LlamaForCausalLM).
//
// Example:
//   auto options = remat::io::read_bert_config("bert-mini/config.json");
//   remat::nn::Bert bert(options.hidden_dropout(0.0));
//   auto report = remat::io::load_state(*bert,
//       remat::io::read_hf_weights("bert-mini"),
//       remat::io::LoadStateOptions().strip_prefixes({"bert."})
//           .ignore_unexpected(true));
//   // report.unexpected lists what was skipped, e.g. "cls.predictions.bias"
//   remat::io::save_state(*bert, "out/model.safetensors");
//   remat::io::write_bert_config("out/config.json", options);
#pragma once

#include "remat/nn/bert.h"
#include "remat/nn/llama.h"

#include <nlohmann/json_fwd.hpp>
#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/types.h>

#include <map>
#include <string>
#include <vector>

namespace remat {
namespace io {

/// How load_state matches file names to module names.
struct LoadStateOptions {
  /// Prefixes removed from a file's names where present, first match wins:
  /// {"bert."} loads a BertForSequenceClassification file into a Bert.
  TORCH_ARG(std::vector<std::string>, strip_prefixes) = {};
  /// Skip (and report) tensors the module lacks instead of failing.
  TORCH_ARG(bool, ignore_unexpected) = false;
  /// Leave module tensors the file lacks as they are (and report them)
  /// instead of failing: new heads, LoRA adapters.
  TORCH_ARG(bool, ignore_missing) = false;
  /// Convert floating-point tensors to the module's dtype (F16/BF16 files
  /// into an F32 model) instead of failing on a dtype mismatch.
  TORCH_ARG(bool, cast_dtype) = false;
  /// Read the old names "LayerNorm.gamma" / "LayerNorm.beta" (the original
  /// BERT checkpoints) as "LayerNorm.weight" / "LayerNorm.bias".
  TORCH_ARG(bool, rename_legacy_layer_norm) = true;
};

/// What load_state did, name by name (module names).
struct LoadStateReport {
  std::vector<std::string> loaded; ///< copied from the file
  /// Absent from the file, but the same tensor as a loaded one (tied).
  std::vector<std::string> tied;
  std::vector<std::string> missing; ///< absent and left as they were
  /// File names (after prefix stripping) that the module lacks.
  std::vector<std::string> unexpected;
};

/// Copies `tensors` into `module`'s parameters and buffers by name, checking
/// every shape and dtype first, so that a refused load changes nothing.
/// Throws c10::Error naming the tensor: a shape or dtype mismatch (with both
/// shapes), a missing parameter, an unexpected tensor (see LoadStateOptions),
/// two file names that map to the same module name. A missing buffer is only
/// reported: Hugging Face files leave out derived buffers (RoPE tables,
/// position ids) that a module recomputes.
LoadStateReport load_state(
    torch::nn::Module& module,
    const std::map<std::string, torch::Tensor>& tensors,
    const LoadStateOptions& options = {});

/// load_state from a safetensors file.
LoadStateReport load_state(
    torch::nn::Module& module,
    const std::string& path,
    const LoadStateOptions& options = {});

/// Writes `module`'s named_parameters() to a safetensors file (atomically),
/// with metadata {"format": "pt"} as Hugging Face writes. A tensor registered
/// under two names (tied embeddings) is written once, under the first name;
/// load_state then reports the other name as `tied`.
void save_state(
    const torch::nn::Module& module,
    const std::string& path,
    const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

/// The weights of a Hugging Face model folder: model.safetensors, or the
/// shards that model.safetensors.index.json lists. Throws c10::Error naming
/// the folder when neither is there (pytorch_model.bin is pickle, which
/// remat does not read: convert it to safetensors first).
std::map<std::string, torch::Tensor> read_hf_weights(const std::string& dir);

// ---------------------------------------------------------------- configs

/// BertOptions from a Hugging Face BertConfig (config.json). Fields absent
/// from the JSON take BertConfig's defaults (bert-base). Throws c10::Error
/// naming the field for a wrong type, and for settings remat's BERT lacks
/// (hidden_act other than "gelu", position_embedding_type other than
/// "absolute").
nn::BertOptions bert_options_from_json(const nlohmann::json& config);
nn::BertOptions read_bert_config(const std::string& path);
/// A BertConfig JSON ("model_type": "bert") with every field BertModel reads.
nlohmann::json bert_config_to_json(const nn::BertOptions& options);
void write_bert_config(const std::string& path, const nn::BertOptions& options);

/// The fields of a Hugging Face LlamaConfig that a Llama decoder needs.
/// Defaults are LlamaConfig's (Llama 2 7B).
struct LlamaConfig {
  int64_t vocab_size = 32000;
  int64_t hidden_size = 4096;
  int64_t intermediate_size = 11008;
  int64_t num_hidden_layers = 32;
  int64_t num_attention_heads = 32;
  /// Read as num_attention_heads when absent or null.
  int64_t num_key_value_heads = 32;
  int64_t max_position_embeddings = 2048; ///< tokens
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;

  /// Throws c10::Error naming the field when a size is invalid.
  void validate() const;
};

/// LlamaConfig from config.json content. rope_theta is read at the top level
/// (transformers 4) or from "rope_parameters" (transformers 5). Throws
/// c10::Error naming the field for a wrong type, an invalid size, two
/// rope_theta that disagree, and for what the fields above cannot express:
/// hidden_act other than "silu", a non-null rope_scaling, a rope_type other
/// than "default", attention_bias or mlp_bias true, a head_dim other than
/// hidden / heads.
LlamaConfig llama_config_from_json(const nlohmann::json& config);
LlamaConfig read_llama_config(const std::string& path);
/// A LlamaConfig JSON ("model_type": "llama").
nlohmann::json llama_config_to_json(const LlamaConfig& config);
void write_llama_config(const std::string& path, const LlamaConfig& config);

/// The Llama a LlamaConfig describes (field for field; LlamaOptions' other
/// settings keep their defaults), and the LlamaConfig of a Llama's options.
nn::LlamaOptions llama_options(const LlamaConfig& config);
LlamaConfig llama_config(const nn::LlamaOptions& options);

} // namespace io
} // namespace remat
