// The flags that describe a model and its batch, shared by the commands that
// build one (`remat plan`, `remat estimate --check`), and small helpers the
// commands share: sizes on the command line, JSON reports.
#pragma once

#include "command.h"

#include "device_flag.h"

#include "remat/memory.h"
#include "remat/nn/attention.h"

#include <nlohmann/json.hpp>
#include <torch/version.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace remat {
namespace cli {

/// A Bert or Llama and its batch, as given on the command line. Sizes left
/// at 0 take the family's default.
struct ModelFlags {
  std::string model = "bert";
  int64_t layers = 12;
  int64_t hidden = 256;
  int64_t heads = 4;
  int64_t kv_heads = 0;     ///< 0: as many as heads
  int64_t intermediate = 0; ///< 0: 4 x hidden (bert), 8/3 x hidden rounded
                            ///< up to 256 (llama)
  int64_t vocab = 0;        ///< 0: 30522 (bert), 32000 (llama)
  int64_t seq = 256;
  int64_t batch = 8;
  std::string attention = "eager";
  std::string dtype = "fp32";
  double dropout = -1;      ///< < 0: 0.1 (bert), 0 (llama)

  bool llama() const { return model == "llama"; }
  int64_t vocab_or_default() const { return vocab > 0 ? vocab : (llama() ? 32000 : 30522); }
  double dropout_or_default() const { return dropout >= 0 ? dropout : (llama() ? 0.0 : 0.1); }
  int64_t intermediate_or_default() const {
    if (intermediate > 0) {
      return intermediate;
    }
    return llama() ? (8 * hidden / 3 + 255) / 256 * 256 : 4 * hidden;
  }
};

inline void add_model_flags(CLI::App* app, ModelFlags& f) {
  app->add_option("--model", f.model, "bert or llama")->capture_default_str();
  app->add_option("--layers", f.layers, "transformer layers")->capture_default_str();
  app->add_option("--hidden", f.hidden, "hidden size")->capture_default_str();
  app->add_option("--heads", f.heads, "attention heads")->capture_default_str();
  app->add_option("--kv-heads", f.kv_heads, "key/value heads, llama (0: --heads)")
      ->capture_default_str();
  app->add_option("--intermediate", f.intermediate,
                  "MLP width (0: 4 x hidden for bert, 8/3 x hidden rounded up to 256 for llama)")
      ->capture_default_str();
  app->add_option("--vocab", f.vocab, "vocabulary size (0: 30522 bert, 32000 llama)")
      ->capture_default_str();
  app->add_option("--seq", f.seq, "sequence length (tokens)")->capture_default_str();
  app->add_option("--batch", f.batch, "batch size (sequences)")->capture_default_str();
  app->add_option("--attention", f.attention, "eager, blockwise or sdpa")->capture_default_str();
  app->add_option("--dtype", f.dtype, "fp32 or bf16 (weights and activations)")
      ->capture_default_str();
  app->add_option("--dropout", f.dropout,
                  "hidden and attention dropout (default 0.1 bert, 0 llama)");
}

/// Throws UsageError naming the first bad flag.
inline void validate(const ModelFlags& f) {
  require(f.model == "bert" || f.model == "llama", "--model",
          "expected bert or llama, but got '" + f.model + "'");
  auto positive = [](int64_t v, const char* flag) {
    require(v > 0, flag, "expected a value above 0, but got " + std::to_string(v));
  };
  positive(f.layers, "--layers");
  positive(f.hidden, "--hidden");
  positive(f.heads, "--heads");
  positive(f.seq, "--seq");
  positive(f.batch, "--batch");
  require(f.vocab >= 0, "--vocab", "expected a value above 0, but got " + std::to_string(f.vocab));
  require(f.intermediate >= 0, "--intermediate",
          "expected a value >= 0 (0: the default), but got " + std::to_string(f.intermediate));
  require(f.hidden % f.heads == 0, "--hidden",
          "expected a multiple of --heads (" + std::to_string(f.heads) + "), but got " +
              std::to_string(f.hidden));
  require(f.kv_heads >= 0 && (f.kv_heads == 0 || f.heads % f.kv_heads == 0), "--kv-heads",
          "expected a divisor of --heads (" + std::to_string(f.heads) + "), but got " +
              std::to_string(f.kv_heads));
  require(f.kv_heads == 0 || f.kv_heads == f.heads || f.llama(), "--kv-heads",
          "expected --kv-heads only with --model llama, but got " + std::to_string(f.kv_heads));
  require(!f.llama() || (f.hidden / f.heads) % 2 == 0, "--heads",
          "expected an even head size (hidden / heads) for rotary embeddings, but got " +
              std::to_string(f.hidden / f.heads));
  require(f.attention == "eager" || f.attention == "blockwise" || f.attention == "sdpa",
          "--attention", "expected eager, blockwise or sdpa, but got '" + f.attention + "'");
  try {
    nn::check_attention_supported(nn::parse_attention(f.attention));
  } catch (const c10::Error& e) {
    throw UsageError("--attention: " + std::string(e.what_without_backtrace()));
  }
  require(f.dtype == "fp32" || f.dtype == "bf16", "--dtype",
          "expected fp32 or bf16, but got '" + f.dtype + "'");
  require(f.dropout == -1 || (f.dropout >= 0 && f.dropout < 1), "--dropout",
          "expected a probability in [0, 1), but got " + std::to_string(f.dropout));
}

/// Parses a size flag ("2GiB", "512MiB", bytes), throwing UsageError.
inline int64_t parse_size_flag(const std::string& text, const std::string& flag) {
  int64_t bytes = 0;
  try {
    bytes = memory::parse_size(text);
  } catch (const c10::Error& e) {
    throw UsageError(flag + ": " + std::string(e.what_without_backtrace()));
  }
  require(bytes > 0, flag, "expected a size above 0, but got '" + text + "'");
  return bytes;
}

/// Splits "a,b,c"; empty items are kept (and refused by their parser).
inline std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    out.push_back(item);
  }
  if (!text.empty() && text.back() == ',') {
    out.emplace_back();
  }
  return out;
}

/// "1.23 GiB" without the space, for tables.
inline std::string size_cell(int64_t bytes) {
  return memory::format_size(bytes);
}

/// Writes `j` to a temporary file and renames it over `path`, so a failed run
/// never leaves a half-written report where a previous one was.
inline void write_json_file(const std::string& path, const nlohmann::json& j) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp);
    require(static_cast<bool>(f), "--json", "cannot open '" + path + "' for writing");
    f << j.dump(2) << "\n";
    f.flush();
    require(static_cast<bool>(f), "--json", "cannot write '" + path + "'");
  }
  require(std::rename(tmp.c_str(), path.c_str()) == 0, "--json",
          "cannot rename the report into '" + path + "'");
}

} // namespace cli
} // namespace remat
