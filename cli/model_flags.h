// The one table of the flags that describe a model and its batch, shared by
// `remat bench`, `plan`, `estimate` and `train` (each picks the flags it
// uses, with its own defaults; for bench and plan they become a
// remat::nn::ModelConfig, which owns every default and bound), and what the
// commands share: typed library
// errors turned into their flag, bounded counts, the estimator's check before
// a model is built, sizes on the command line, lists, JSON reports.
#pragma once

#include "command.h"

#include "device_flag.h"
#include "isolate.h"

#include "remat/io/file.h"
#include "remat/memory.h"
#include "remat/model_sizes.h"
#include "remat/nn/attention.h"
#include "remat/nn/model_config.h"
#include "remat/plan/estimate.h"

#include <nlohmann/json.hpp>
#include <torch/utils.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdio>
#include <thread>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace remat {
namespace cli {

/// The flag of a library field: "kv_heads" -> "--kv-heads". A
/// remat::FieldError names the field it is about; this is its spelling.
inline std::string flag_of_field(const std::string& field) {
  std::string flag = "--" + field;
  std::replace(flag.begin(), flag.end(), '_', '-');
  return flag;
}

/// Runs `f`, turning a remat::FieldError into the UsageError of its flag
/// ("--layers: expected layers in [1, 1024], but got 5000").
template <typename F>
auto with_flag_errors(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const FieldError& e) {
    std::string what = first_line(e);
    throw UsageError(flag_of_field(e.field()) + ": " + what);
  }
}

/// A Bert or Llama and its batch, as given on the command line: the flags
/// of a remat::nn::ModelConfig, which owns every default and bound. Sizes
/// left at 0 take the family's default.
struct ModelFlags {
  std::string model = "bert";
  int64_t layers = 12;
  int64_t hidden = 256;
  int64_t heads = 4;
  int64_t kv_heads = 0;     ///< 0: as many as heads
  int64_t intermediate = 0; ///< 0: the family's rule (remat/model_sizes.h)
  int64_t vocab = 0;        ///< 0: 30522 (bert), 32000 (llama)
  int64_t seq = 256;
  int64_t batch = 8;
  std::string attention = "eager";
  std::string dtype = "fp32";
  double dropout = -1;      ///< < 0: 0.1 (bert), 0 (llama)

  bool llama() const { return model == "llama"; }

  /// The flags whose defaults are `config`'s (a command's own defaults).
  static ModelFlags of(const nn::ModelConfig& config) {
    ModelFlags f;
    f.model = config.llama() ? "llama" : "bert";
    f.layers = config.layers();
    f.hidden = config.hidden();
    f.heads = config.heads();
    f.kv_heads = config.kv_heads();
    f.intermediate = config.intermediate();
    f.vocab = config.vocab();
    f.seq = config.seq();
    f.batch = config.batch();
    f.attention = nn::to_string(config.attention());
    f.dtype = nn::model_dtype_name(config.dtype());
    f.dropout = config.dropout();
    return f;
  }

  /// The model description. Throws UsageError naming the flag.
  nn::ModelConfig config() const;
};

/// Sets the fields of `config` whose flags `given("--layers")` says were
/// given (all of them for a new run; on a resumed run only those typed), but
/// the family, which is the command's. Throws UsageError for an attention
/// or dtype that is not one, FieldError for the rest (see validate()).
template <typename Given>
void apply_model_flags(const ModelFlags& f, nn::ModelConfig& config, const Given& given) {
  if (given("--layers")) config.layers(f.layers);
  if (given("--hidden")) config.hidden(f.hidden);
  if (given("--heads")) config.heads(f.heads);
  if (given("--kv-heads")) config.kv_heads(f.kv_heads);
  if (given("--intermediate")) config.intermediate(f.intermediate);
  if (given("--seq")) config.seq(f.seq);
  if (given("--batch")) config.batch(f.batch);
  if (given("--dropout")) config.dropout(f.dropout);
  if (given("--attention")) {
    try {
      const auto kind = nn::parse_attention(f.attention);
      nn::check_attention_supported(kind);
      config.attention(kind);
    } catch (const c10::Error& e) {
      std::string what = first_line(e);
      throw UsageError("--attention: " + what);
    }
  }
  // One spelling with bench and plan ("fp32"); "f32" stays an alias.
  if (given("--dtype")) config.dtype(nn::parse_model_dtype(f.dtype));
}

inline nn::ModelConfig ModelFlags::config() const {
  require(model == "bert" || model == "llama", "--model",
          "expected bert or llama, but got '" + model + "'");
  nn::ModelConfig c(llama() ? plan::Family::kLlama : plan::Family::kBert);
  return with_flag_errors([&] {
    c.vocab(vocab);
    apply_model_flags(*this, c, [](const char*) { return true; });
    return c;
  });
}

/// "bert, 12 layers, hidden 256, 4 heads, intermediate 1024, vocab 30522,
/// seq 256, batch 8, eager attention, fp32, dropout 0.1": the model line the
/// commands print, defaults filled in.
inline std::string model_line(const ModelFlags& f) {
  const auto c = f.config();
  std::ostringstream o;
  o << f.model << ", " << f.layers << " layers, hidden " << f.hidden << ", " << f.heads
    << " heads";
  if (c.llama()) {
    o << " (" << (f.kv_heads > 0 ? f.kv_heads : f.heads) << " kv)";
  }
  o << ", intermediate " << c.mlp_size() << ", vocab " << c.vocab_size() << ", seq " << f.seq
    << ", batch " << f.batch << ", " << f.attention << " attention, "
    << nn::model_dtype_name(c.dtype()) << ", dropout " << c.dropout_p();
  return o.str();
}

/// The model's flags in a JSON report, defaults filled in.
inline nlohmann::json model_json(const ModelFlags& f) {
  const auto c = f.config();
  return {{"model", f.model},
          {"layers", f.layers},
          {"hidden", f.hidden},
          {"heads", f.heads},
          {"kv_heads", f.kv_heads > 0 ? f.kv_heads : f.heads},
          {"intermediate", c.mlp_size()},
          {"vocab", c.vocab_size()},
          {"seq", f.seq},
          {"batch", f.batch},
          {"attention", f.attention},
          {"dtype", nn::model_dtype_name(c.dtype())},
          {"dropout", c.dropout_p()}};
}

/// The model flags, one bit each: a command adds those it uses.
enum ModelFlag : unsigned {
  kModelFamily = 1u << 0,  ///< --model
  kModelLayers = 1u << 1,  ///< --layers
  kModelHidden = 1u << 2,  ///< --hidden
  kModelHeads = 1u << 3,   ///< --heads
  kModelKvHeads = 1u << 4, ///< --kv-heads
  kModelIntermediate = 1u << 5, ///< --intermediate
  kModelVocab = 1u << 6,   ///< --vocab
  kModelSeq = 1u << 7,     ///< --seq
  kModelBatch = 1u << 8,   ///< --batch
  kModelAttention = 1u << 9, ///< --attention
  kModelDtype = 1u << 10,  ///< --dtype: fp32 or bf16 (autocast)
  kModelDropout = 1u << 11, ///< --dropout: a probability
  kAllModelFlags = (1u << 12) - 1,
};

/// The one reading of a --dropout value: a probability in [0, 1). Returns
/// an empty message and sets `p`, or the message of a refusal.
inline std::string probability_problem(const std::string& text, double& p) {
  char* end = nullptr;
  p = std::strtod(text.c_str(), &end);
  if (end == text.c_str() || *end != '\0' || !(p >= 0 && p < 1)) {
    return "expected a probability in [0, 1), but got " + text;
  }
  return "";
}

/// A --dropout value parsed after the flag parser (estimate's, which also
/// takes on and off); throws UsageError.
inline double parse_probability(const std::string& text) {
  double p = 0;
  const auto problem = probability_problem(text, p);
  require(problem.empty(), "--dropout", problem);
  return p;
}

/// Checks a --dropout where it is given: a probability in [0, 1), in every
/// command alike (a command's "family default" stays a value no one types).
inline CLI::Validator probability_check() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        double p = 0;
        return probability_problem(text, p);
      },
      "", "probability");
}

/// Adds the model flags in `which`. Their defaults are `f`'s values as the
/// command set them before the call (shown in --help when `show_defaults`;
/// a command whose 0 means "the preset's" hides them).
inline void add_model_flags(
    CLI::App* app, ModelFlags& f, unsigned which = kAllModelFlags, bool show_defaults = true) {
  auto add = [&](unsigned bit, const char* name, auto& field, const std::string& help) {
    if ((which & bit) == 0) {
      return;
    }
    auto* o = app->add_option(name, field, help);
    if (show_defaults) {
      o->capture_default_str();
    }
  };
  add(kModelFamily, "--model", f.model, "bert or llama");
  add(kModelLayers, "--layers", f.layers, "transformer layers (at most 1024)");
  add(kModelHidden, "--hidden", f.hidden, "hidden size (at most 65536)");
  add(kModelHeads, "--heads", f.heads, "attention heads");
  add(kModelKvHeads, "--kv-heads", f.kv_heads, "key/value heads, llama (0: --heads)");
  add(kModelIntermediate, "--intermediate", f.intermediate,
      "MLP width (0: 4 x hidden for bert, 8/3 x hidden rounded up to 256 for llama)");
  add(kModelVocab, "--vocab", f.vocab, "vocabulary size (0: 30522 bert, 32000 llama)");
  add(kModelSeq, "--seq", f.seq, "sequence length (tokens)");
  add(kModelBatch, "--batch", f.batch, "batch size (sequences)");
  add(kModelAttention, "--attention", f.attention, "eager, blockwise or sdpa");
  add(kModelDtype, "--dtype", f.dtype,
      "fp32 (f32 accepted) or bf16: autocast over float32 master weights (weights, "
      "gradients and optimizer state fp32, matrix products bf16)");
  if ((which & kModelDropout) != 0 && f.dropout < 0) {
    // No default shown: it is the family's unless given.
    app->add_option("--dropout", f.dropout,
                    "hidden and attention dropout (default 0.1 bert, 0 llama)")
        ->check(probability_check());
  } else if ((which & kModelDropout) != 0) {
    add(kModelDropout, "--dropout", f.dropout, "hidden and attention dropout");
    app->get_option("--dropout")->check(probability_check());
  }
}

/// The model flags as a child process's arguments, every value explicit.
inline std::vector<std::string> model_args(const ModelFlags& f) {
  auto num = [](auto v) {
    std::ostringstream out;
    out << v;
    return out.str();
  };
  // The dropout that is every model's (as the child's flags give it).
  const double dropout = f.config().dropout_p();
  return {"--model", f.model, "--layers", num(f.layers), "--hidden", num(f.hidden),
          "--heads", num(f.heads), "--kv-heads", num(f.kv_heads), "--intermediate",
          num(f.intermediate), "--vocab", num(f.vocab), "--seq", num(f.seq), "--batch",
          num(f.batch), "--attention", f.attention, "--dtype", f.dtype, "--dropout",
          num(dropout)};
}

/// Throws UsageError naming the first bad flag.
inline void validate(const ModelFlags& f) {
  const auto config = f.config();
  with_flag_errors([&] { config.validate(); });
}

/// Refuses a count of work (steps, rounds, repeats) past remat's bound. The
/// flag parser saturates a number past int64 to its largest value; that is
/// said as such.
inline void require_count(int64_t value, int64_t least, const std::string& flag) {
  const std::string got = value == std::numeric_limits<int64_t>::max()
      ? std::string("a number past 2^63")
      : std::to_string(value);
  require(value >= least && value <= limits::kMaxCount, flag,
          "expected a count in [" + std::to_string(least) + ", " +
              std::to_string(limits::kMaxCount) + "], but got " + got);
}

/// Asks the estimator whether the smallest peak of this model's step fits
/// `limit_bytes` (or, at 0, this machine's physical memory), before
/// anything is built. Throws UsageError naming --memory-limit.
inline void require_fits(const plan::ModelSpec& spec, int64_t limit_bytes) {
  const bool given = limit_bytes > 0;
  const int64_t limit = given ? limit_bytes : memory::physical_bytes();
  try {
    plan::check_fits(spec, limit, given ? "the --memory-limit" : "this machine's memory");
  } catch (const FieldError& e) {
    std::string what = first_line(e);
    throw UsageError(std::string(given ? "--memory-limit" : "--model") + ": " +
                     what);
  }
}

/// The flags of a measured run, shared by `remat bench` (its policies) and
/// `remat plan --measure` (its schedules): the other half of the flag table.
struct RunFlags {
  int64_t steps = 3;   ///< timed steps per item
  int64_t warmup = 1;  ///< untimed steps per item
  int64_t threads = 0; ///< intra-op threads; 0: all cores
  uint64_t seed = 0;
  std::string json_path;
  /// "process": each item in a process of its own (cli/isolate.h says why);
  /// "in-process": all in this one, timed in interleaved rounds.
  std::string isolation = "process";
  /// "process": how many times each item's process runs, in alternating
  /// order.
  int64_t rounds = 1;
};

/// Adds the run flags; `item` names what is measured ("policy", "schedule
/// with --measure").
inline void add_run_flags(CLI::App* app, RunFlags& r, const std::string& item) {
  app->add_option("--steps", r.steps, "timed steps per " + item)->capture_default_str();
  app->add_option("--warmup", r.warmup, "warm-up steps per " + item)->capture_default_str();
  app->add_option("--threads", r.threads, "intra-op threads (0: all cores)")
      ->capture_default_str();
  app->add_option("--json", r.json_path, "also write the results as JSON to FILE");
  app->add_option("--seed", r.seed, "seed for weights, inputs and dropout")
      ->capture_default_str();
  app->add_option("--isolation", r.isolation,
                  "process: each " + item + " in its own process, one after another "
                  "(steadier: none inherits another's allocator state); in-process: all in "
                  "this one, timed in interleaved rounds")
      ->capture_default_str();
  app->add_option("--rounds", r.rounds,
                  "process isolation: run each " + item + "'s process this many times, in "
                  "alternating order, and pool the step times (steadier ratios on a machine "
                  "whose speed drifts)")
      ->capture_default_str();
}

/// The counts and seed of the run flags as a child process's arguments.
inline std::vector<std::string> run_args(const RunFlags& r) {
  return {"--steps", std::to_string(r.steps), "--warmup", std::to_string(r.warmup),
          "--threads", std::to_string(r.threads), "--seed", std::to_string(r.seed)};
}

/// Sets LibTorch's intra-op threads: `threads`, or at 0 every core
/// (OpenMP's default can be a single thread).
inline void set_threads(int64_t threads) {
  torch::set_num_threads(static_cast<int>(
      threads > 0 ? threads : std::max(1u, std::thread::hardware_concurrency())));
}

/// Throws UsageError naming the first bad run flag.
inline void validate(const RunFlags& r) {
  require_count(r.steps, 1, "--steps");
  require_count(r.warmup, 0, "--warmup");
  require(r.threads >= 0 && r.threads <= 4096, "--threads",
          "expected a count in [0, 4096] (0: all cores), but got " + std::to_string(r.threads));
  require(r.isolation == "process" || r.isolation == "in-process", "--isolation",
          "expected process or in-process, but got '" + r.isolation + "'");
  require_rounds(r.rounds, r.isolation);
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

/// Splits "a,b,c" for `flag`; an empty item ("a,,b", "a,") is refused,
/// the same way for every list flag.
inline std::vector<std::string> split_list(const std::string& text, const std::string& flag) {
  std::vector<std::string> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    out.push_back(item);
  }
  if (!text.empty() && text.back() == ',') {
    out.emplace_back();
  }
  for (const auto& i : out) {
    require(!i.empty(), flag, "expected a comma-separated list without empty items, but got '" +
                                  text + "'");
  }
  return out;
}

/// Writes `j` to `path` atomically (remat::io::write_file_atomic: a
/// temporary file, fsynced and renamed over `path`), so a failed run never
/// leaves a half-written report where a previous one was.
inline void write_json_file(const std::string& path, const nlohmann::json& j) {
  try {
    io::write_file_atomic(path, j.dump(2) + "\n");
  } catch (const c10::Error& e) {
    std::string what = first_line(e);
    throw UsageError("--json: " + what);
  }
}

} // namespace cli
} // namespace remat
