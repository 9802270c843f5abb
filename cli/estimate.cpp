// `remat estimate`: the analytic memory estimate of a training step (weights,
// gradients, optimizer state, activations, peak) under each policy, for
// models of any size; the largest batch or sequence that fits a device; the
// seed's 13B comparison; and, for models that run here, a check against
// measured bytes.
#include "command.h"
#include "harbor.h"
#include "model_flags.h"

#include "remat/memory.h"
#include "remat/nn/estimate_check.h"
#include "remat/plan/estimate.h"
#include "remat/policy.h"

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <thread>

namespace remat {
namespace cli {
namespace {

struct EstimateConfig {
  std::string preset;
  std::string model = "bert";
  int64_t layers = 0, hidden = 0, heads = 0, kv_heads = 0, intermediate = 0, vocab = 0;
  int64_t seq = 0, batch = 0, labels = 0, lora_rank = 0;
  std::string dtype = "fp32";
  std::string attention = "eager";
  std::string optimizer = "adamw";
  std::string head;
  std::string backend = "cpu";
  std::string dropout = "auto";
  std::string lora_targets = "q,k,v,o";
  bool lora_dropout = false;
  std::string policies = "none,every-layer,sqrt,full,selective-attention,selective-mlp";
  std::string fit;
  bool fit_seq = false;
  int64_t seq_multiple = 1;
  bool check = false;
  int64_t threads = 0;
  std::string json_path;
};

template <typename Parse>
auto parse_flag(const std::string& flag, const std::string& text, const Parse& parse) {
  try {
    return parse(text);
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    throw UsageError(flag + ": " + what.substr(0, what.find('\n')));
  }
}

// The spec: a preset or a family's well-known model, then every flag given.
plan::ModelSpec make_spec(const EstimateConfig& c, const CLI::App& app) {
  auto given = [&](const char* flag) { return app.count(flag) > 0; };
  plan::ModelSpec s = plan::ModelSpec::bert_base();
  if (!c.preset.empty()) {
    s = parse_flag("--preset", c.preset, [](const std::string& t) {
      return plan::ModelSpec::preset(t);
    });
    if (given("--model")) {
      const auto family = parse_flag("--model", c.model, plan::parse_family);
      require(family == s.family(), "--model",
              "expected " + std::string(plan::to_string(s.family())) + " for preset " +
                  c.preset + ", but got '" + c.model + "'");
    }
  } else {
    const auto family = parse_flag("--model", c.model, plan::parse_family);
    s = family == plan::Family::kBert ? plan::ModelSpec::bert_base()
                                      : plan::ModelSpec::llama2_7b();
  }
  const bool bert = s.family() == plan::Family::kBert;
  auto positive = [&](const char* flag, int64_t v) {
    require(v > 0, flag, "expected a value above 0, but got " + std::to_string(v));
    return v;
  };
  if (given("--layers")) s.layers(positive("--layers", c.layers));
  if (given("--hidden")) s.hidden(positive("--hidden", c.hidden));
  if (given("--heads")) s.heads(positive("--heads", c.heads));
  if (given("--vocab")) s.vocab(positive("--vocab", c.vocab));
  if (given("--seq")) {
    s.seq(positive("--seq", c.seq));
    if (bert) {
      s.max_positions(std::max(s.max_positions(), c.seq));
    }
  }
  if (given("--batch")) s.batch(positive("--batch", c.batch));
  if (given("--labels")) s.num_labels(positive("--labels", c.labels));
  if (given("--kv-heads")) {
    require(c.kv_heads >= 0, "--kv-heads", "expected a value >= 0 (0: --heads), but got " +
            std::to_string(c.kv_heads));
    s.kv_heads(c.kv_heads);
  }
  if (given("--intermediate")) {
    require(c.intermediate >= 0, "--intermediate",
            "expected a value >= 0 (0: the family's default), but got " +
                std::to_string(c.intermediate));
    s.intermediate(c.intermediate);
  }
  require(s.hidden() % s.heads() == 0, given("--hidden") ? "--hidden" : "--heads",
          "expected hidden (" + std::to_string(s.hidden()) + ") to be a multiple of heads (" +
              std::to_string(s.heads()) + ")");
  if (s.kv_heads() > 0) {
    require(s.heads() % s.kv_heads() == 0 && (!bert || s.kv_heads() == s.heads()), "--kv-heads",
            bert ? "expected no --kv-heads for bert (or as many as --heads), but got " +
                       std::to_string(s.kv_heads())
                 : "expected a divisor of heads (" + std::to_string(s.heads()) + "), but got " +
                       std::to_string(s.kv_heads()));
  }
  if (given("--dtype")) {
    require(c.dtype == "fp32" || c.dtype == "bf16" || c.dtype == "bf16-mixed", "--dtype",
            "expected fp32, bf16 (pure) or bf16-mixed (bf16 weights, fp32 AdamW state), but "
            "got '" + c.dtype + "'");
    s.precision(plan::parse_precision(c.dtype));
  }
  if (given("--attention")) {
    s.attention(parse_flag("--attention", c.attention, plan::parse_attention_impl));
  }
  if (given("--optimizer")) {
    require(c.optimizer == "adamw" || c.optimizer == "sgd", "--optimizer",
            "expected adamw or sgd, but got '" + c.optimizer + "'");
    s.optimizer(c.optimizer == "adamw" ? plan::Optimizer::kAdamW : plan::Optimizer::kSgd);
  }
  if (given("--head")) {
    s.head(parse_flag("--head", c.head, plan::parse_head));
  }
  if (given("--backend")) {
    require(c.backend == "cpu" || c.backend == "cuda", "--backend",
            "expected cpu or cuda, but got '" + c.backend + "'");
    s.backend(c.backend == "cpu" ? plan::Backend::kCpu : plan::Backend::kCuda);
  }
  if (given("--dropout")) {
    require(c.dropout == "on" || c.dropout == "off", "--dropout",
            "expected on or off, but got '" + c.dropout + "'");
    s.dropout(c.dropout == "on");
  }
  if (given("--lora-rank")) {
    require(c.lora_rank >= 0, "--lora-rank",
            "expected a value >= 0 (0: full fine-tuning), but got " + std::to_string(c.lora_rank));
    s.lora_rank(c.lora_rank);
  }
  if (given("--lora-targets")) {
    s.lora_targets(split_list(c.lora_targets, "--lora-targets"));
  }
  if (given("--lora-dropout")) {
    s.lora_dropout(c.lora_dropout);
  }
  // The spec names the field it refuses; the flag is its spelling.
  try {
    s.validate();
  } catch (const FieldError& e) {
    std::string what = e.what_without_backtrace();
    const std::string flag = e.field() == "num_labels"      ? "--labels"
        : e.field() == "max_positions" ? "--seq"
                                       : flag_of_field(e.field());
    throw UsageError(flag + ": " + what.substr(0, what.find('\n')));
  }
  return s;
}

std::string describe(const plan::ModelSpec& s) {
  std::ostringstream o;
  o << plan::to_string(s.family()) << ", " << s.layers() << " layers, hidden " << s.hidden()
    << ", " << s.heads() << " heads";
  if (s.family() == plan::Family::kLlama) {
    o << " (" << s.kv_heads_or_heads() << " kv)";
  }
  o << ", intermediate " << s.mlp_size() << ", vocab " << s.vocab() << ", seq " << s.seq()
    << ", batch " << s.batch() << ", " << plan::to_string(s.precision()) << ", "
    << plan::to_string(s.attention()) << " attention, "
    << (s.optimizer() == plan::Optimizer::kAdamW ? "AdamW" : "SGD") << ", head "
    << plan::to_string(s.head()) << ", dropout " << (s.dropout() ? "on" : "off") << ", "
    << (s.backend() == plan::Backend::kCpu ? "cpu" : "cuda");
  if (s.lora_rank() > 0) {
    o << ", LoRA rank " << s.lora_rank() << " on ";
    for (size_t i = 0; i < s.lora_targets().size(); ++i) {
      o << (i ? "," : "") << s.lora_targets()[i];
    }
    if (s.lora_dropout()) {
      o << " with dropout";
    }
  }
  return o.str();
}

std::string billions(int64_t n) {
  char b[32];
  std::snprintf(b, sizeof(b), "%.3f B", static_cast<double>(n) / 1e9);
  return b;
}

std::string percent_cell(double v) {
  char b[32];
  std::snprintf(b, sizeof(b), "%+.1f%%", v);
  return b;
}

int run_estimate(const EstimateConfig& c, const CLI::App& app) {
  const auto spec = make_spec(c, app);
  std::vector<CheckpointPolicy> policies;
  for (const auto& item : split_list(c.policies, "--policy")) {
    policies.push_back(parse_flag("--policy", item, CheckpointPolicy::parse));
  }
  require(!policies.empty(), "--policy", "expected at least one policy, but got '" + c.policies + "'");
  int64_t fit_bytes = 0;
  if (!c.fit.empty()) {
    fit_bytes = parse_size_flag(c.fit, "--fit");
  }
  require(!c.fit_seq || fit_bytes > 0, "--fit-seq", "expected --fit SIZE with it, but got none");
  require(c.seq_multiple >= 1, "--seq-multiple",
          "expected a value above 0, but got " + std::to_string(c.seq_multiple));
  require(c.threads >= 0, "--threads",
          "expected a value >= 0 (0: all cores), but got " + std::to_string(c.threads));

  std::cout << "remat estimate: " << describe(spec) << "\n";
  const auto none = plan::estimate(spec, CheckpointPolicy::none());
  std::cout << "parameters " << billions(none.parameters.total) << " ("
            << billions(none.parameters.trainable) << " trainable); weights "
            << memory::format_size(none.weight_bytes) << ", gradients "
            << memory::format_size(none.gradient_bytes) << ", optimizer state "
            << memory::format_size(none.optimizer_bytes) << ", inputs "
            << memory::format_size(none.input_bytes) << "\n\n";

  char line[512];
  std::snprintf(line, sizeof(line), "%-22s %12s %12s %12s %9s", "policy", "activations",
                "act. at peak", "peak", "step");
  std::cout << line;
  if (fit_bytes > 0) {
    std::snprintf(line, sizeof(line), " %10s", c.fit_seq ? "max seq" : "max batch");
    std::cout << line;
  }
  std::cout << "  peak at\n";
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& policy : policies) {
    nlohmann::json row{{"policy", policy.name()}};
    plan::Estimate e;
    bool ok = true;
    std::string error;
    try {
      e = plan::estimate(spec, policy);
    } catch (const c10::Error& err) {
      ok = false;
      error = err.what_without_backtrace();
      error = error.substr(0, error.find('\n'));
    }
    int64_t fit = -1;
    if (fit_bytes > 0) {
      fit = c.fit_seq ? plan::fit_seq(spec, policy, fit_bytes, c.seq_multiple)
                      : plan::fit_batch(spec, policy, fit_bytes);
    }
    if (!ok) {
      std::snprintf(line, sizeof(line), "%-22s %s", policy.name().c_str(), error.c_str());
      std::cout << line << "\n";
      row["error"] = error;
    } else {
      std::snprintf(line, sizeof(line), "%-22s %12s %12s %12s %9s", policy.name().c_str(),
                    memory::format_size(e.activation_bytes).c_str(),
                    memory::format_size(e.peak_activation_bytes).c_str(),
                    memory::format_size(e.peak_bytes).c_str(),
                    percent_cell(100.0 * (e.step_seconds / none.step_seconds - 1)).c_str());
      std::cout << line;
      if (fit >= 0) {
        std::snprintf(line, sizeof(line), " %10lld", static_cast<long long>(fit));
        std::cout << line;
      }
      std::cout << "  " << e.peak_event << "\n";
      row["schedule"] = e.schedule.str();
      row["weight_bytes"] = e.weight_bytes;
      row["gradient_bytes"] = e.gradient_bytes;
      row["optimizer_bytes"] = e.optimizer_bytes;
      row["input_bytes"] = e.input_bytes;
      row["activation_bytes"] = e.activation_bytes;
      row["peak_activation_bytes"] = e.peak_activation_bytes;
      row["peak_bytes"] = e.peak_bytes;
      row["step_flops_relative_to_none"] = e.step_seconds / none.step_seconds;
      row["peak_event"] = e.peak_event;
    }
    if (fit >= 0) {
      row[c.fit_seq ? "max_seq" : "max_batch"] = fit;
    }
    rows.push_back(row);
  }
  std::cout << "\nactivations: held after forward; act. at peak: peak minus weights, "
               "gradients, optimizer state and inputs; step: matrix-product FLOPs against none.\n";
  if (fit_bytes > 0) {
    std::cout << (c.fit_seq ? "max seq" : "max batch") << ": the largest that fits "
              << memory::format_size(fit_bytes) << " (0: not even "
              << (c.fit_seq ? std::to_string(c.seq_multiple) + " tokens" : "batch 1") << ").\n";
  }

  nlohmann::json harbor;
  if (c.preset == "harbor-13b") {
    std::cout << "\nThe seed's Harbor 13B fine-tune against this estimate (docs/estimate.md):\n\n"
              << harbor_comparison_table();
    harbor = nlohmann::json::array();
    for (const auto& r : harbor_comparison()) {
      harbor.push_back({{"quantity", r.quantity},
                        {"unit", r.unit},
                        {"seed", r.seed < 0 ? nlohmann::json() : nlohmann::json(r.seed)},
                        {"remat", r.remat}});
    }
  }

  nlohmann::json checks;
  int status = 0;
  if (c.check) {
    torch::set_num_threads(static_cast<int>(
        c.threads > 0 ? c.threads : std::max(1u, std::thread::hardware_concurrency())));
    std::cout << "\nCheck: the same model built with remat::nn, one training step per policy "
                 "here, bytes counted by remat's allocator (no optimizer runs: estimates "
                 "with SGD):\n\n";
    std::vector<nn::EstimateCheck> results;
    try {
      results = nn::check_estimate(spec, policies);
    } catch (const c10::Error& e) {
      const std::string what = e.what_without_backtrace();
      throw UsageError("--check: " + what.substr(0, what.find('\n')));
    }
    std::snprintf(line, sizeof(line), "%-22s %23s %23s %23s %8s\n", "policy",
                  "fixed est / meas", "activations est / meas", "peak est / meas", "peak err");
    std::cout << line;
    checks = nlohmann::json::array();
    for (const auto& r : results) {
      const double err = 100.0 * static_cast<double>(r.estimated_peak_bytes - r.measured_peak_bytes) /
          static_cast<double>(std::max<int64_t>(1, r.measured_peak_bytes));
      auto pair = [](int64_t a, int64_t b) {
        return memory::format_size(a) + " / " + memory::format_size(b);
      };
      std::snprintf(line, sizeof(line), "%-22s %23s %23s %23s %8s\n", r.policy.c_str(),
                    pair(r.estimated_fixed_bytes, r.measured_fixed_bytes).c_str(),
                    pair(r.estimated_activation_bytes, r.measured_activation_bytes).c_str(),
                    pair(r.estimated_peak_bytes, r.measured_peak_bytes).c_str(),
                    percent_cell(err).c_str());
      std::cout << line;
      if (std::abs(err) > 10) {
        status = 1;
      }
      checks.push_back({{"policy", r.policy},
                        {"estimated_fixed_bytes", r.estimated_fixed_bytes},
                        {"measured_fixed_bytes", r.measured_fixed_bytes},
                        {"estimated_activation_bytes", r.estimated_activation_bytes},
                        {"measured_activation_bytes", r.measured_activation_bytes},
                        {"estimated_peak_bytes", r.estimated_peak_bytes},
                        {"measured_peak_bytes", r.measured_peak_bytes},
                        {"peak_error_percent", err}});
    }
    std::cout << "\n" << (status == 0 ? "every peak within 10% of the measured one"
                                      : "SOME PEAKS ARE MORE THAN 10% OFF")
              << "\n";
  }

  if (!c.json_path.empty()) {
    nlohmann::json config{
        {"family", plan::to_string(spec.family())},
        {"layers", spec.layers()},
        {"hidden", spec.hidden()},
        {"heads", spec.heads()},
        {"kv_heads", spec.kv_heads_or_heads()},
        {"intermediate", spec.mlp_size()},
        {"vocab", spec.vocab()},
        {"seq", spec.seq()},
        {"batch", spec.batch()},
        {"precision", plan::to_string(spec.precision())},
        {"attention", plan::to_string(spec.attention())},
        {"optimizer", spec.optimizer() == plan::Optimizer::kAdamW ? "adamw" : "sgd"},
        {"head", plan::to_string(spec.head())},
        {"dropout", spec.dropout()},
        {"backend", spec.backend() == plan::Backend::kCpu ? "cpu" : "cuda"},
        {"lora_rank", spec.lora_rank()},
        {"lora_targets", spec.lora_targets()},
        {"lora_dropout", spec.lora_dropout()},
        {"preset", c.preset}};
    nlohmann::json j{{"config", config},
                     {"parameters", none.parameters.total},
                     {"trainable_parameters", none.parameters.trainable},
                     {"policies", rows}};
    if (fit_bytes > 0) {
      j["fit_bytes"] = fit_bytes;
      j["fit"] = c.fit_seq ? "seq" : "batch";
    }
    if (!harbor.is_null()) {
      j["harbor_comparison"] = harbor;
    }
    if (!checks.is_null()) {
      j["check"] = checks;
    }
    write_json_file(c.json_path, j);
  }
  return status;
}

} // namespace

Run add_estimate(CLI::App& root) {
  auto c = std::make_shared<EstimateConfig>();
  auto* app = root.add_subcommand(
      "estimate",
      "Estimate the memory of a training step under each policy, for any model size");
  app->add_option("--preset", c->preset,
                  "bert-base, llama2-7b or harbor-13b (the seed's 13B fine-tune); other flags "
                  "override it");
  app->add_option("--model", c->model, "bert (default: bert-base's sizes) or llama (llama2-7b's)")
      ->capture_default_str();
  app->add_option("--layers", c->layers, "transformer layers");
  app->add_option("--hidden", c->hidden, "hidden size");
  app->add_option("--heads", c->heads, "attention heads");
  app->add_option("--kv-heads", c->kv_heads, "key/value heads, llama (0: --heads)");
  app->add_option("--intermediate", c->intermediate,
                  "MLP width (0: 4 x hidden for bert, 8/3 x hidden rounded up to 256 for llama)");
  app->add_option("--vocab", c->vocab, "vocabulary size");
  app->add_option("--seq", c->seq, "sequence length (tokens)");
  app->add_option("--batch", c->batch, "batch size (sequences)");
  app->add_option("--dtype", c->dtype,
                  "fp32, bf16 (everything bf16) or bf16-mixed (bf16 weights and activations, "
                  "fp32 AdamW state and master weights)")
      ->capture_default_str();
  app->add_option("--attention", c->attention, "eager or blockwise")->capture_default_str();
  app->add_option("--optimizer", c->optimizer, "adamw or sgd")->capture_default_str();
  app->add_option("--head", c->head, "none, lm or classifier (default: the preset's or none "
                  "for bert, lm for llama)");
  app->add_option("--labels", c->labels, "classifier labels");
  app->add_option("--backend", c->backend, "cpu or cuda (how dropout keeps its mask)")
      ->capture_default_str();
  app->add_option("--dropout", c->dropout, "on or off (default: on for bert, off for llama)");
  app->add_option("--lora-rank", c->lora_rank, "LoRA rank (0: full fine-tuning)");
  app->add_option("--lora-targets", c->lora_targets,
                  "comma-separated: q, k, v, o, gate (llama), up, down")
      ->capture_default_str();
  app->add_flag("--lora-dropout", c->lora_dropout, "dropout on the adapters' input");
  app->add_option("--policy", c->policies,
                  "comma-separated policies: " + CheckpointPolicy::names())
      ->capture_default_str();
  app->add_option("--fit", c->fit, "device size, e.g. 80GiB: print the largest batch that fits");
  app->add_flag("--fit-seq", c->fit_seq, "with --fit: the largest sequence instead of batch");
  app->add_option("--seq-multiple", c->seq_multiple, "with --fit-seq: sequences in steps of this")
      ->capture_default_str();
  app->add_flag("--check", c->check,
                "also build the model here, run a step per policy and compare measured bytes "
                "(small models only)");
  app->add_option("--threads", c->threads, "intra-op threads for --check (0: all cores)")
      ->capture_default_str();
  app->add_option("--json", c->json_path, "also write the results as JSON to FILE");
  return [c, app] { return run_estimate(*c, *app); };
}

} // namespace cli
} // namespace remat
