// `remat estimate`: the analytic memory estimate of a training step (weights,
// gradients, optimizer state, activations, peak) under each policy, for
// models of any size; the largest batch or sequence that fits a device; the
// seed's 13B comparison; and, for models that run here, a check against
// measured bytes.
#include "command.h"
#include "worked_example.h"
#include "model_flags.h"

#include "remat/memory.h"
#include "remat/nn/estimate_check.h"
#include "remat/plan/estimate.h"
#include "remat/plan/estimate_table.h"
#include "remat/policy.h"

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <functional>
#include <iostream>

namespace remat {
namespace cli {
namespace {

struct EstimateConfig {
  std::string preset;
  /// The shared model flags; a size left unset is the preset's (or the
  /// family's well-known model's).
  ModelFlags model = [] {
    ModelFlags m;
    m.layers = m.hidden = m.heads = m.seq = m.batch = 0;
    return m;
  }();
  int64_t labels = 0, lora_rank = 0;
  std::string dtype = "fp32"; ///< the estimator's precisions, not bf16 autocast
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

// The precision --dtype names. bf16 means autocast over fp32 weights to
// bench, plan and train; the estimator does not model that, so it is refused
// here rather than silently estimated as something else.
plan::Precision parse_precision_flag(const std::string& text) {
  const std::string accepted =
      "fp32, bf16-pure (everything bf16) or bf16-mixed (bf16 weights, fp32 master weights "
      "and AdamW state)";
  require(text != "bf16", "--dtype",
          "expected " + accepted + ", but got 'bf16': estimate does not model bf16 autocast "
          "(fp32 weights, bf16 compute), which is what --dtype bf16 runs in bench, plan and train");
  if (text == "f32") {
    return plan::Precision::kFp32;
  }
  require(text == "fp32" || text == "bf16-pure" || text == "bf16-mixed", "--dtype",
          "expected " + accepted + ", but got '" + text + "'");
  return plan::parse_precision(text);
}

template <typename Parse>
auto parse_flag(const std::string& flag, const std::string& text, const Parse& parse) {
  try {
    return parse(text);
  } catch (const c10::Error& e) {
    std::string what = first_line(e);
    throw UsageError(flag + ": " + what);
  }
}

using Given = std::function<bool(const char*)>;

// The spec the flags start from: the preset, or the family's well-known model.
plan::ModelSpec base_spec(const EstimateConfig& c, const Given& given) {
  plan::ModelSpec s = plan::ModelSpec::bert_base();
  if (!c.preset.empty()) {
    s = parse_flag("--preset", c.preset, [](const std::string& t) {
      return plan::ModelSpec::preset(t);
    });
    if (given("--model")) {
      const auto family = parse_flag("--model", c.model.model, plan::parse_family);
      require(family == s.family(), "--model",
              "expected " + std::string(plan::to_string(s.family())) + " for preset " +
                  c.preset + ", but got '" + c.model.model + "'");
    }
  } else {
    const auto family = parse_flag("--model", c.model.model, plan::parse_family);
    s = family == plan::Family::kBert ? plan::ModelSpec::bert_base()
                                      : plan::ModelSpec::llama2_7b();
  }
  return s;
}

// The model's sizes and its batch, as given.
void apply_size_flags(const EstimateConfig& c, const Given& given, plan::ModelSpec& s) {
  const bool bert = s.family() == plan::Family::kBert;
  auto positive = [&](const char* flag, int64_t v) {
    require(v > 0, flag, "expected a value above 0, but got " + std::to_string(v));
    return v;
  };
  if (given("--layers")) s.layers(positive("--layers", c.model.layers));
  if (given("--hidden")) s.hidden(positive("--hidden", c.model.hidden));
  if (given("--heads")) s.heads(positive("--heads", c.model.heads));
  if (given("--vocab")) s.vocab(positive("--vocab", c.model.vocab));
  if (given("--seq")) {
    s.seq(positive("--seq", c.model.seq));
    if (bert) {
      s.max_positions(std::max(s.max_positions(), c.model.seq));
    }
  }
  if (given("--batch")) s.batch(positive("--batch", c.model.batch));
  if (given("--labels")) s.num_labels(positive("--labels", c.labels));
  if (given("--kv-heads")) {
    require(c.model.kv_heads >= 0, "--kv-heads", "expected a value >= 0 (0: --heads), but got " +
            std::to_string(c.model.kv_heads));
    s.kv_heads(c.model.kv_heads);
  }
  if (given("--intermediate")) {
    require(c.model.intermediate >= 0, "--intermediate",
            "expected a value >= 0 (0: the family's default), but got " +
                std::to_string(c.model.intermediate));
    s.intermediate(c.model.intermediate);
  }
}

// How it trains: precision, attention, optimizer, head, device, dropout, LoRA.
void apply_training_flags(const EstimateConfig& c, const Given& given, plan::ModelSpec& s) {
  if (given("--dtype")) {
    s.precision(parse_precision_flag(c.dtype));
  }
  if (given("--attention")) {
    s.attention(parse_flag("--attention", c.model.attention, plan::parse_attention_impl));
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
    // A probability, as in bench, plan and train (the estimate depends only
    // on whether there is dropout); "on" and "off" stay as aliases.
    s.dropout(c.dropout == "on" || (c.dropout != "off" && parse_probability(c.dropout) > 0));
  }
  if (given("--lora-rank")) {
    require(c.lora_rank >= 0, "--lora-rank",
            "expected a value >= 0 (0: full fine-tuning), but got " + std::to_string(c.lora_rank));
    s.lora_rank(c.lora_rank);
  }
  if (given("--lora-targets")) {
    // Short names or the family's module names, as train takes them.
    std::vector<std::string> targets;
    for (const auto& t : split_list(c.lora_targets, "--lora-targets")) {
      targets.push_back(with_flag_errors([&] { return plan::lora_target_short(s.family(), t); }));
    }
    s.lora_targets(targets);
  }
  if (given("--lora-dropout")) {
    s.lora_dropout(c.lora_dropout);
  }
}

// The spec: a preset or a family's well-known model, then every flag given.
plan::ModelSpec make_spec(const EstimateConfig& c, const CLI::App& app) {
  const Given given = [&](const char* flag) { return app.count(flag) > 0; };
  auto s = base_spec(c, given);
  apply_size_flags(c, given, s);
  apply_training_flags(c, given, s);
  // The head rules (remat/model_sizes.h) and the rest are the spec's; it
  // names the field it refuses, and the flag is its spelling.
  try {
    s.validate();
  } catch (const FieldError& e) {
    std::string what = first_line(e);
    const std::string flag = e.field() == "num_labels"      ? "--labels"
        : e.field() == "max_positions" ? "--seq"
                                       : flag_of_field(e.field());
    throw UsageError(flag + ": " + what);
  }
  return s;
}

// The worked 13B fine-tune's figures beside the estimate's, printed, for the
// preset that is that example; null for any other.
nlohmann::json print_worked_example(const EstimateConfig& c) {
  if (plan::ModelSpec::preset_name(c.preset) != "llama-13b-lora-8k") {
    return nlohmann::json();
  }
  std::cout << "\nThe worked 13B fine-tune's own figures against this estimate "
               "(docs/estimate.md):\n\n"
            << worked_example_table();
  auto worked = nlohmann::json::array();
  for (const auto& r : worked_example_comparison()) {
    worked.push_back({{"quantity", r.quantity},
                      {"unit", r.unit},
                      {"seed", r.seed < 0 ? nlohmann::json() : nlohmann::json(r.seed)},
                      {"remat", r.remat}});
  }
  return worked;
}

// --check: the model built and run here, one step per policy; prints the
// table, puts the rows in `checks`, and returns the exit status (1 when a
// peak is off by more than the tolerance).
int run_check(const EstimateConfig& c, const plan::ModelSpec& spec,
              const std::vector<CheckpointPolicy>& policies, nlohmann::json& checks) {
  set_threads(c.threads);
  std::cout << "\nCheck: the same model built with remat::nn, one training step per policy "
               "here, bytes counted by remat's allocator (no optimizer runs: estimates "
               "with SGD):\n\n";
  std::vector<nn::EstimateCheck> results;
  try {
    results = nn::check_estimate(spec, policies);
  } catch (const c10::Error& e) {
    std::string what = first_line(e);
    throw UsageError("--check: " + what);
  }
  std::cout << nn::check_table(results);
  checks = nlohmann::json::array();
  for (const auto& r : results) {
    checks.push_back(r.to_json());
  }
  return nn::checks_within(results) ? 0 : 1;
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

  const auto table = plan::estimate_table(
      spec, policies,
      plan::EstimateTableOptions().fit_bytes(fit_bytes).fit_seq(c.fit_seq).seq_multiple(
          c.seq_multiple));
  std::cout << "remat estimate: " << plan::describe(spec) << "\n"
            << table.summary_text() << table.str();

  const nlohmann::json worked = print_worked_example(c);
  nlohmann::json checks;
  const int status = c.check ? run_check(c, spec, policies, checks) : 0;
  if (!c.json_path.empty()) {
    nlohmann::json config = plan::spec_json(spec);
    config["preset"] = c.preset;
    nlohmann::json j{{"config", config},
                     {"parameters", table.none.parameters.total},
                     {"trainable_parameters", table.none.parameters.trainable},
                     {"policies", table.rows_json()}};
    if (fit_bytes > 0) {
      j["fit_bytes"] = fit_bytes;
      j["fit"] = c.fit_seq ? "seq" : "batch";
    }
    if (!worked.is_null()) {
      j["worked_example_comparison"] = worked;
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
                  "bert-base, llama2-7b or llama-13b-lora-8k (a 13B Llama-shaped classifier, 8k "
                  "tokens, batch 2, LoRA 64, bf16: the worked fine-tune; harbor-13b is its old "
                  "name); other flags "
                  "override it");
  add_model_flags(app, c->model,
                  kModelFamily | kModelLayers | kModelHidden | kModelHeads | kModelKvHeads |
                      kModelIntermediate | kModelVocab | kModelSeq | kModelBatch |
                      kModelAttention,
                  /*show_defaults=*/false);
  // The estimator models two of the attention kinds the models run.
  app->get_option("--attention")->description("eager or blockwise (sdpa is not modelled)");
  app->add_option("--dtype", c->dtype,
                  "fp32, bf16-pure (everything bf16) or bf16-mixed (bf16 weights and "
                  "activations, fp32 AdamW state and master weights); bf16 autocast (what "
                  "--dtype bf16 runs elsewhere) is not modelled")
      ->capture_default_str();
  app->add_option("--optimizer", c->optimizer, "adamw or sgd")->capture_default_str();
  app->add_option("--head", c->head, "none, lm or classifier (default: the preset's or none "
                  "for bert, lm for llama)");
  app->add_option("--labels", c->labels, "classifier labels");
  app->add_option("--backend", c->backend, "cpu or cuda (how dropout keeps its mask)")
      ->capture_default_str();
  app->add_option("--dropout", c->dropout,
                  "dropout probability; the estimate counts its masks when above 0 (on and "
                  "off accepted; default: 0.1 for bert, 0 for llama)");
  app->add_option("--lora-rank", c->lora_rank, "LoRA rank (0: full fine-tuning)");
  app->add_option("--lora-targets", c->lora_targets,
                  "comma-separated: q, k, v, o, gate (llama), up, down, or the model's own "
                  "names (q_proj, query, ...), as train takes them")
      ->capture_default_str();
  app->add_flag("--lora-dropout", c->lora_dropout, "dropout on the adapters' input");
  app->add_option("--policy", c->policies,
                  "comma-separated policies the estimator models: none, every-layer, "
                  "every-K, sqrt, full, selective-attention, selective-mlp, save-matmuls, "
                  "save-projections, compress, compress-fp8, budget:SIZE, each optionally "
                  "with +reentrant (remat bench measures offload and +save=OPS)")
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
