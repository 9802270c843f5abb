#include "remat/io/hf.h"
#include "remat/model_sizes.h"

#include "remat/io/json_text.h"
#include "remat/io/file.h"
#include "remat/io/safetensors.h"

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <filesystem>
#include <set>
#include <sstream>

namespace remat {
namespace io {

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
      s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool starts_with(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

std::string shape_text(const torch::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

// The module name that file name `key` stands for. `found` is false when the
// module has no such tensor; `name` is then the name after prefix stripping.
struct Mapped {
  std::string name;
  bool found = false;
};

Mapped map_name(
    const std::string& key,
    const std::map<std::string, torch::Tensor>& targets,
    const LoadStateOptions& options) {
  std::string stripped = key;
  for (const auto& prefix : options.strip_prefixes()) {
    if (!prefix.empty() && starts_with(key, prefix)) {
      stripped = key.substr(prefix.size());
      break;
    }
  }
  std::vector<std::string> candidates{key};
  if (stripped != key) {
    candidates.push_back(stripped);
  }
  if (options.rename_legacy_layer_norm()) {
    const size_t n = candidates.size();
    for (size_t i = 0; i < n; ++i) {
      const auto c = candidates[i];
      if (ends_with(c, "LayerNorm.gamma")) {
        candidates.push_back(c.substr(0, c.size() - 5) + "weight");
      } else if (ends_with(c, "LayerNorm.beta")) {
        candidates.push_back(c.substr(0, c.size() - 4) + "bias");
      }
    }
  }
  for (const auto& c : candidates) {
    if (targets.count(c)) {
      return {c, true};
    }
  }
  return {stripped, false};
}

bool is_floating(torch::Dtype d) {
  return c10::isFloatingType(d);
}

// One line listing the problems, at most a few named.
std::string join_problems(const std::vector<std::string>& problems) {
  std::string out;
  const size_t shown = std::min<size_t>(problems.size(), 4);
  for (size_t i = 0; i < shown; ++i) {
    out += (i ? "; " : "") + problems[i];
  }
  if (problems.size() > shown) {
    out += "; and " + std::to_string(problems.size() - shown) + " more";
  }
  return out;
}

// --- JSON config fields

// config.json's fields, read and refused as every remat reader does
// (remat/io/json_text.h): "config field \"hidden_size\": expected an
// integer, but got \"64\"".
JsonReader config(const nlohmann::json& j) {
  return JsonReader(j, "config");
}

// A config.json or shard index is a few kilobytes; past this it is not one.
constexpr int64_t kMaxJsonBytes = 16 << 20;

nlohmann::json read_json_file(const std::string& path) {
  auto text = read_file(path, kMaxJsonBytes);
  try {
    auto j = nlohmann::json::parse(text);
    TORCH_CHECK(
        j.is_object(), "config file '", path, "': expected a JSON object");
    return j;
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, "config file '", path, "': invalid JSON: ", json_error_text(e));
  }
}

void write_json_file(const std::string& path, const nlohmann::json& j) {
  write_file_atomic(path, j.dump(2) + "\n");
}

// Runs `parse` and prefixes any error with the file it came from.
template <typename F>
auto with_file(const std::string& path, F&& parse) -> decltype(parse()) {
  try {
    return parse();
  } catch (const c10::Error& e) {
    TORCH_CHECK(
        false, "config file '", path, "': ", e.what_without_backtrace());
  }
}

// The tensors a module can take from a file, by module name.
struct ModuleTensors {
  std::map<std::string, torch::Tensor> targets;
  std::vector<std::string> order; // registration order, parameters first
  std::set<std::string> buffers; // optional: a file may leave them out
};

// Lists `module`'s parameters and then its buffers; a buffer under a
// parameter's name is that parameter.
ModuleTensors module_tensors(torch::nn::Module& module) {
  ModuleTensors out;
  for (const auto& kv : module.named_parameters(/*recurse=*/true)) {
    out.targets.emplace(kv.key(), kv.value());
    out.order.push_back(kv.key());
  }
  for (const auto& kv : module.named_buffers(/*recurse=*/true)) {
    if (out.targets.emplace(kv.key(), kv.value()).second) {
      out.order.push_back(kv.key());
      out.buffers.insert(kv.key());
    }
  }
  return out;
}

// module name -> (file name, tensor)
using Sources = std::map<std::string, std::pair<std::string, torch::Tensor>>;

// Maps each file tensor to the module tensor it loads. Names the module lacks
// go to `unexpected`; two file tensors for one module tensor are a problem,
// and so are unexpected ones unless ignore_unexpected(true).
Sources map_sources(
    const std::map<std::string, torch::Tensor>& tensors,
    const std::map<std::string, torch::Tensor>& targets,
    const LoadStateOptions& options,
    std::vector<std::string>& unexpected,
    std::vector<std::string>& problems) {
  Sources sources;
  for (const auto& kv : tensors) {
    auto mapped = map_name(kv.first, targets, options);
    const auto& name = mapped.name;
    if (!mapped.found) {
      unexpected.push_back(name);
      continue;
    }
    auto inserted = sources.emplace(name, std::make_pair(kv.first, kv.second));
    if (!inserted.second) {
      problems.push_back(
          "'" + name + "' comes from both '" + inserted.first->second.first +
          "' and '" + kv.first + "'");
    }
  }
  if (!options.ignore_unexpected()) {
    for (const auto& name : unexpected) {
      problems.push_back("'" + name + "' is in the file but not in the module");
    }
  }
  return sources;
}

// Why file tensor `src` cannot load module tensor `target`, or "" when it can.
std::string mismatch(
    const std::string& name,
    const torch::Tensor& src,
    const torch::Tensor& target,
    const LoadStateOptions& options) {
  if (!src.defined()) {
    return "'" + name + "' is undefined in the file";
  }
  if (src.sizes() != target.sizes()) {
    return "'" + name + "' has shape " + shape_text(src) + " in the file but " +
        shape_text(target) + " in the module";
  }
  if (src.scalar_type() != target.scalar_type() &&
      !(options.cast_dtype() && is_floating(src.scalar_type()) &&
        is_floating(target.scalar_type()))) {
    std::ostringstream msg;
    msg << "'" << name << "' has dtype " << src.scalar_type()
        << " in the file but " << target.scalar_type() << " in the module";
    if (is_floating(src.scalar_type()) && is_floating(target.scalar_type())) {
      msg << " (cast_dtype(true) converts it)";
    }
    return msg.str();
  }
  return "";
}

// Checks every module tensor the file has against it, adding to `problems`;
// returns the module tensors the file lacks, in registration order.
std::vector<std::string> check_sources(
    const ModuleTensors& module,
    const Sources& sources,
    const LoadStateOptions& options,
    std::vector<std::string>& problems) {
  std::vector<std::string> missing;
  for (const auto& name : module.order) {
    const auto& target = module.targets.at(name);
    auto it = sources.find(name);
    if (it == sources.end()) {
      missing.push_back(name);
      continue;
    }
    auto problem = mismatch(name, it->second.second, target, options);
    if (!problem.empty()) {
      problems.push_back(problem);
    }
  }
  return missing;
}

// Whether `t` is loaded through some other name: a tensor registered twice
// (tied embeddings) needs only one of its names in the file.
bool loaded_elsewhere(
    const torch::Tensor& t,
    const std::map<std::string, torch::Tensor>& targets,
    const Sources& sources) {
  for (const auto& kv : sources) {
    auto target = targets.find(kv.first);
    if (target != targets.end() && target->second.is_same(t)) {
      return true;
    }
  }
  return false;
}

// Sorts the tensors the file lacks into tied and missing ones; a missing
// parameter is a problem unless ignore_missing(true), a missing buffer never.
void sort_missing(
    const std::vector<std::string>& missing,
    const ModuleTensors& module,
    const Sources& sources,
    const LoadStateOptions& options,
    LoadStateReport& report,
    std::vector<std::string>& problems) {
  for (const auto& name : missing) {
    if (loaded_elsewhere(module.targets.at(name), module.targets, sources)) {
      report.tied.push_back(name);
      continue;
    }
    report.missing.push_back(name);
    const bool optional =
        options.ignore_missing() || module.buffers.count(name);
    if (!optional) {
      problems.push_back(
          "'" + name + "' with shape " + shape_text(module.targets.at(name)) +
          " is missing from the file");
    }
  }
}

} // namespace

LoadStateReport load_state(
    torch::nn::Module& module,
    const std::map<std::string, torch::Tensor>& tensors,
    const LoadStateOptions& options) {
  auto own = module_tensors(module);
  LoadStateReport report;
  std::vector<std::string> problems;
  const auto sources = map_sources(
      tensors, own.targets, options, report.unexpected, problems);
  const auto missing = check_sources(own, sources, options, problems);
  sort_missing(missing, own, sources, options, report, problems);

  TORCH_CHECK(
      problems.empty(),
      "load_state: expected the file's tensors to match the module's, but ",
      join_problems(problems),
      report.unexpected.empty() || options.ignore_unexpected()
          ? ""
          : " (ignore_unexpected(true) skips extra tensors; strip_prefixes removes a prefix)");

  torch::NoGradGuard no_grad;
  for (const auto& name : own.order) {
    auto it = sources.find(name);
    if (it != sources.end()) {
      own.targets.at(name).copy_(it->second.second);
      report.loaded.push_back(name);
    }
  }
  return report;
}

LoadStateReport load_state(
    torch::nn::Module& module,
    const std::string& path,
    const LoadStateOptions& options) {
  auto tensors = load_safetensors(path);
  try {
    return load_state(module, tensors, options);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "'", path, "': ", e.what_without_backtrace());
  }
}

void save_state(
    const torch::nn::Module& module,
    const std::string& path,
    const std::map<std::string, std::string>& metadata) {
  std::map<std::string, torch::Tensor> out;
  std::vector<torch::Tensor> written;
  for (const auto& kv : module.named_parameters(/*recurse=*/true)) {
    bool shared = false;
    for (const auto& w : written) {
      shared = shared || w.is_same(kv.value());
    }
    if (!shared) {
      out.emplace(kv.key(), kv.value().detach());
      written.push_back(kv.value());
    }
  }
  save_safetensors(path, out, metadata);
}

std::map<std::string, torch::Tensor> read_hf_weights(const std::string& dir) {
  namespace fs = std::filesystem;
  if (fs::is_regular_file(dir)) {
    return load_safetensors(dir);
  }
  const fs::path root(dir);
  TORCH_CHECK(
      fs::is_directory(root), "read_hf_weights: expected a model folder, but '",
      dir, "' is not one");
  if (fs::is_regular_file(root / "model.safetensors")) {
    return load_safetensors((root / "model.safetensors").string());
  }
  const auto index_path = root / "model.safetensors.index.json";
  if (!fs::is_regular_file(index_path)) {
    TORCH_CHECK(
        false,
        "read_hf_weights: expected model.safetensors or model.safetensors.index.json in '",
        dir, "', but found neither",
        fs::exists(root / "pytorch_model.bin")
            ? " (pytorch_model.bin is a pickle, which remat does not read: convert it "
              "with safetensors.torch.save_file first)"
            : "");
  }
  const auto index = read_json_file(index_path.string());
  auto map_it = index.find("weight_map");
  TORCH_CHECK(
      map_it != index.end() && map_it->is_object(), "'", index_path.string(),
      "': expected an object field \"weight_map\" {tensor name: shard file}");
  std::map<std::string, std::set<std::string>> by_shard;
  for (auto it = map_it->begin(); it != map_it->end(); ++it) {
    TORCH_CHECK(
        it.value().is_string(), "'", index_path.string(),
        "': expected the shard of '", it.key(), "' to be a file name, but got ",
        describe_json(it.value()));
    const auto shard = it.value().get<std::string>();
    TORCH_CHECK(
        shard.find('/') == std::string::npos && shard != ".." && !shard.empty(),
        "'", index_path.string(),
        "': expected shard names inside the folder, but got '", shard, "'");
    by_shard[shard].insert(it.key());
  }
  std::map<std::string, torch::Tensor> out;
  for (const auto& kv : by_shard) {
    const auto shard_path = (root / kv.first).string();
    auto tensors = load_safetensors(shard_path);
    for (const auto& name : kv.second) {
      auto t = tensors.find(name);
      TORCH_CHECK(
          t != tensors.end(), "'", index_path.string(), "' places tensor '",
          name, "' in '", kv.first, "', but that shard does not hold it");
      out.emplace(name, std::move(t->second));
    }
  }
  return out;
}

// ---------------------------------------------------------------- BERT

nn::BertOptions bert_options_from_json(const nlohmann::json& j) {
  TORCH_CHECK(
      j.is_object(), "BERT config: expected a JSON object, but got ",
      j.type_name());
  const auto model_type = config(j).string("model_type", "bert");
  TORCH_CHECK(
      model_type == "bert",
      "config field \"model_type\": expected \"bert\", but got \"", model_type,
      "\"");
  const auto act = config(j).string("hidden_act", "gelu");
  TORCH_CHECK(
      act == "gelu",
      "config field \"hidden_act\": expected \"gelu\" (the exact erf GELU "
      "that remat's BERT computes), but got \"",
      act, "\"");
  const auto position = config(j).string("position_embedding_type", "absolute");
  TORCH_CHECK(
      position == "absolute",
      "config field \"position_embedding_type\": expected "
      "\"absolute\", but got \"",
      position, "\"");
  auto options =
      nn::BertOptions()
          .vocab_size(config(j).integer("vocab_size", 30522))
          .hidden_size(config(j).integer("hidden_size", 768))
          .num_layers(config(j).integer("num_hidden_layers", 12))
          .num_heads(config(j).integer("num_attention_heads", 12))
          .intermediate_size(config(j).integer("intermediate_size", 3072))
          .max_position_embeddings(config(j).integer("max_position_embeddings", 512))
          .type_vocab_size(config(j).integer("type_vocab_size", 2))
          .pad_token_id(
              config(j).has("pad_token_id") ? config(j).integer("pad_token_id")
                  : j.contains("pad_token_id") ? -1 // null: no padding token
                                               : 0)
          .hidden_dropout(config(j).number("hidden_dropout_prob", 0.1))
          .attention_dropout(config(j).number("attention_probs_dropout_prob", 0.1))
          .layer_norm_eps(config(j).number("layer_norm_eps", 1e-12));
  options.validate();
  return options;
}

nn::BertOptions read_bert_config(const std::string& path) {
  auto j = read_json_file(path);
  return with_file(path, [&] { return bert_options_from_json(j); });
}

nlohmann::json bert_config_to_json(const nn::BertOptions& o) {
  return {
      {"architectures", {"BertModel"}},
      {"model_type", "bert"},
      {"vocab_size", o.vocab_size()},
      {"hidden_size", o.hidden_size()},
      {"num_hidden_layers", o.num_layers()},
      {"num_attention_heads", o.num_heads()},
      {"intermediate_size", o.mlp_size()},
      {"hidden_act", "gelu"},
      {"hidden_dropout_prob", o.hidden_dropout()},
      {"attention_probs_dropout_prob", o.attention_dropout()},
      {"max_position_embeddings", o.max_position_embeddings()},
      {"type_vocab_size", o.type_vocab_size()},
      {"initializer_range", 0.02},
      {"layer_norm_eps", o.layer_norm_eps()},
      {"pad_token_id",
       o.pad_token_id() >= 0 ? nlohmann::json(o.pad_token_id()) : nlohmann::json()},
      {"position_embedding_type", "absolute"},
      {"torch_dtype", "float32"},
  };
}

void write_bert_config(
    const std::string& path,
    const nn::BertOptions& options) {
  write_json_file(path, bert_config_to_json(options));
}

// ---------------------------------------------------------------- Llama

void LlamaConfig::validate() const {
  // The bounds every description of a model shares (remat/model_sizes.h),
  // under config.json's own field names.
  check_size("vocab_size", vocab_size, 1, limits::kMaxVocab);
  check_size("hidden_size", hidden_size, 1, limits::kMaxHidden);
  check_size("intermediate_size", intermediate_size, 1, limits::kMaxIntermediate);
  check_size("num_hidden_layers", num_hidden_layers, 1, limits::kMaxLayers);
  check_size("num_key_value_heads", num_key_value_heads, 1, limits::kMaxHeads);
  check_size("max_position_embeddings", max_position_embeddings, 1, limits::kMaxPositions);
  check_heads(hidden_size, num_attention_heads, num_key_value_heads,
              {"hidden_size", "num_attention_heads", "num_key_value_heads"});
  TORCH_CHECK(rope_theta > 0, "expected rope_theta > 0, but got ", rope_theta);
  check_norm_eps("rms_norm_eps", rms_norm_eps);
}

LlamaConfig llama_config_from_json(const nlohmann::json& j) {
  TORCH_CHECK(
      j.is_object(), "Llama config: expected a JSON object, but got ",
      j.type_name());
  const auto model_type = config(j).string("model_type", "llama");
  TORCH_CHECK(
      model_type == "llama",
      "config field \"model_type\": expected \"llama\", but got \"", model_type,
      "\"");
  const auto act = config(j).string("hidden_act", "silu");
  TORCH_CHECK(
      act == "silu",
      "config field \"hidden_act\": expected \"silu\", but got \"", act, "\"");
  TORCH_CHECK(
      !config(j).has("rope_scaling"),
      "config field \"rope_scaling\": expected null (remat's Llama has "
      "plain RoPE), but got ",
      config(j).has("rope_scaling") ? describe_json(j.at("rope_scaling")) : "");
  TORCH_CHECK(
      !config(j).boolean("attention_bias", false),
      "config field \"attention_bias\": expected "
      "false (remat's Llama has no projection biases), but got true");
  TORCH_CHECK(
      !config(j).boolean("mlp_bias", false),
      "config field \"mlp_bias\": expected false, but got true");
  LlamaConfig c;
  c.vocab_size = config(j).integer("vocab_size", c.vocab_size);
  c.hidden_size = config(j).integer("hidden_size", c.hidden_size);
  c.intermediate_size = config(j).integer("intermediate_size", c.intermediate_size);
  c.num_hidden_layers = config(j).integer("num_hidden_layers", c.num_hidden_layers);
  c.num_attention_heads =
      config(j).integer("num_attention_heads", c.num_attention_heads);
  c.num_key_value_heads =
      config(j).integer("num_key_value_heads", c.num_attention_heads);
  c.max_position_embeddings =
      config(j).integer("max_position_embeddings", c.max_position_embeddings);
  c.rope_theta = config(j).number("rope_theta", c.rope_theta);
  // transformers 5 writes RoPE settings as "rope_parameters": {"rope_type":
  // "default", "rope_theta": ...} instead of a top-level rope_theta; reading
  // only the latter would run such a model with the default theta, silently.
  if (config(j).has("rope_parameters")) {
    const auto* rope = &j.at("rope_parameters");
    TORCH_CHECK(
        rope->is_object(),
        "config field \"rope_parameters\": expected an object, but got ",
        describe_json(*rope));
    const auto type = config(*rope).string("rope_type", "default");
    TORCH_CHECK(
        type == "default",
        "config field \"rope_parameters\": expected rope_type \"default\" "
        "(remat's Llama has plain RoPE), but got \"",
        type, "\"");
    const auto theta = config(*rope).number("rope_theta", c.rope_theta);
    TORCH_CHECK(
        !config(j).has("rope_theta") || theta == c.rope_theta,
        "config fields \"rope_theta\" ", c.rope_theta,
        " and \"rope_parameters\".rope_theta ", theta, " disagree");
    c.rope_theta = theta;
  }
  c.rms_norm_eps = config(j).number("rms_norm_eps", c.rms_norm_eps);
  c.tie_word_embeddings =
      config(j).boolean("tie_word_embeddings", c.tie_word_embeddings);
  c.validate();
  const auto head_dim =
      config(j).integer("head_dim", c.hidden_size / c.num_attention_heads);
  TORCH_CHECK(
      head_dim == c.hidden_size / c.num_attention_heads,
      "config field \"head_dim\": expected "
      "hidden_size / num_attention_heads = ",
      c.hidden_size / c.num_attention_heads, ", but got ", head_dim);
  return c;
}

LlamaConfig read_llama_config(const std::string& path) {
  auto j = read_json_file(path);
  return with_file(path, [&] { return llama_config_from_json(j); });
}

nlohmann::json llama_config_to_json(const LlamaConfig& c) {
  return {
      {"architectures", {"LlamaForCausalLM"}},
      {"model_type", "llama"},
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads},
      {"max_position_embeddings", c.max_position_embeddings},
      {"rope_theta", c.rope_theta},
      {"rope_scaling", nullptr},
      {"rms_norm_eps", c.rms_norm_eps},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"hidden_act", "silu"},
      {"attention_bias", false},
      {"initializer_range", 0.02},
      {"torch_dtype", "float32"},
  };
}

void write_llama_config(const std::string& path, const LlamaConfig& config) {
  write_json_file(path, llama_config_to_json(config));
}

nn::LlamaOptions llama_options(const LlamaConfig& c) {
  return nn::LlamaOptions()
      .vocab_size(c.vocab_size)
      .hidden_size(c.hidden_size)
      .intermediate_size(c.intermediate_size)
      .num_layers(c.num_hidden_layers)
      .num_heads(c.num_attention_heads)
      .num_kv_heads(c.num_key_value_heads)
      .max_position_embeddings(c.max_position_embeddings)
      .rope_theta(c.rope_theta)
      .rms_norm_eps(c.rms_norm_eps)
      .tie_word_embeddings(c.tie_word_embeddings);
}

LlamaConfig llama_config(const nn::LlamaOptions& o) {
  LlamaConfig c;
  c.vocab_size = o.vocab_size();
  c.hidden_size = o.hidden_size();
  c.intermediate_size = o.mlp_size();
  c.num_hidden_layers = o.num_layers();
  c.num_attention_heads = o.num_heads();
  c.num_key_value_heads = o.kv_heads();
  c.max_position_embeddings = o.max_position_embeddings();
  c.rope_theta = o.rope_theta();
  c.rms_norm_eps = o.rms_norm_eps();
  c.tie_word_embeddings = o.tie_word_embeddings();
  return c;
}

} // namespace io
} // namespace remat
