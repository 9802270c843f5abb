// `remat bench`: the same training step under each checkpoint policy, on the
// same weights and inputs, with exact byte counts and side-by-side timings.
#include "command.h"
#include "isolate.h"
#include "model_flags.h"

#include "remat/device.h"
#include "remat/memory.h"
#include "remat/nn/policy_bench.h"
#include "remat/policy.h"
#include "remat/timing.h"

#include <nlohmann/json.hpp>
#include <torch/torch.h>
#include <torch/version.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

namespace remat {
namespace cli {
namespace {

struct BenchConfig {
  std::string preset;
  ModelFlags model; ///< the shared model flags (cli/model_flags.h)
  RunFlags run;     ///< and the shared run flags
  int64_t lora_rank = 0;
  double lora_alpha = 0;      ///< 0: 2 * rank
  std::string lora_targets;   ///< empty: the attention projections
  std::string policies = "none,every-layer";
  std::string memory_limit;
  /// --device as typed; `dev` is it resolved ("cuda" -> cuda:0) and checked.
  std::string device = "cpu";
  c10::Device dev = c10::kCPU;
  // A child of the "process" mode: where the reference gradients go to, or
  // come from (hidden flags).
  std::string grads_out, grads_ref;
};

// A policy and how it was spelled (a child process is given the spelling:
// "budget:1.2GiB" is not what the parsed policy's name prints).
struct PolicyItem {
  std::string text;
  CheckpointPolicy policy;
};

std::vector<PolicyItem> parse_policies(const std::string& list) {
  std::vector<PolicyItem> out;
  for (const auto& item : split_list(list, "--policy")) {
    try {
      out.push_back({item, CheckpointPolicy::parse(item)});
    } catch (const c10::Error& e) {
      throw UsageError("--policy: " + std::string(e.what_without_backtrace()));
    }
  }
  require(!out.empty(), "--policy", "expected at least one policy, but got '" + list + "'");
  return out;
}

// The model description of the flags (remat::nn::ModelConfig owns the
// family defaults and bounds); throws UsageError naming the flag.
nn::ModelConfig model_config(const BenchConfig& c) {
  auto config = c.model.config();
  with_flag_errors([&] { config.validate(); });
  return config;
}

// Fills in the family defaults (0 or negative meant "the family's"), as the
// model description has them, so a child process gets every size explicit.
void apply_family_defaults(BenchConfig& c) {
  const auto config = model_config(c);
  c.model.vocab = config.vocab_size();
  c.model.dropout = config.dropout_p();
  c.model.intermediate = config.mlp_size();
}

void validate(const BenchConfig& c) {
  model_config(c); // the model's flags
  validate(c.run);
  require(c.lora_rank >= 0 && c.lora_rank <= limits::kMaxLoraRank, "--lora-rank",
          "expected a rank in [0, " + std::to_string(limits::kMaxLoraRank) +
              "] (0: no LoRA), but got " + std::to_string(c.lora_rank));
  require(std::isfinite(c.lora_alpha) && c.lora_alpha >= 0, "--lora-alpha",
          "expected a value above 0 (0: 2 x rank), but got " + std::to_string(c.lora_alpha));
}

nn::BenchOptions bench_options(const BenchConfig& c, int64_t limit) {
  auto o = nn::BenchOptions()
               .device(c.dev)
               .seed(c.run.seed)
               .warmup(c.run.warmup)
               .steps(c.run.steps)
               .limit_bytes(limit)
               .lora_rank(c.lora_rank)
               .lora_alpha(c.lora_alpha);
  if (!c.lora_targets.empty()) {
    o.lora_targets(split_list(c.lora_targets, "--lora-targets"));
  }
  return o;
}

// This configuration as `remat bench` flags for one policy in a child
// process: every size explicit (defaults and presets already applied).
std::vector<std::string> child_args(const BenchConfig& c, const std::string& policy) {
  auto num = [](auto v) {
    std::ostringstream out;
    out << v;
    return out.str();
  };
  std::vector<std::string> a = model_args(c.model);
  a.insert(a.begin(), "bench");
  const auto run = run_args(c.run);
  a.insert(a.end(), run.begin(), run.end());
  a.insert(a.end(), {"--lora-rank", num(c.lora_rank), "--policy", policy, "--device",
                     c.dev.str(), "--isolation", "in-process"});
  if (c.lora_alpha > 0) {
    a.insert(a.end(), {"--lora-alpha", num(c.lora_alpha)});
  }
  if (!c.lora_targets.empty()) {
    a.insert(a.end(), {"--lora-targets", c.lora_targets});
  }
  if (!c.memory_limit.empty()) {
    a.insert(a.end(), {"--memory-limit", c.memory_limit});
  }
  return a;
}

// One policy in a process of its own: warm-up, the measured step and the
// timed steps, as the in-process mode does for one policy. `reference` is
// where none's gradients go (write) or come from (read).
nn::PolicyRun run_child(
    const BenchConfig& c, const PolicyItem& item, const std::string& json,
    const std::string& reference, bool write_reference, bool read_reference) {
  auto args = child_args(c, item.text);
  args.insert(args.end(), {"--json", json});
  if (write_reference) {
    args.insert(args.end(), {"--grads-out", reference});
  } else if (read_reference) {
    args.insert(args.end(), {"--grads-ref", reference});
  }
  const auto outcome = run_self(args);
  if (outcome.exit_code == 2) {
    // The child refused a flag the parent let through (LoRA targets are
    // only checked against a built model): the same mistake for all.
    std::cout << "\n";
    throw UsageError(strip_error_prefix(outcome.error));
  }
  std::ifstream f(json);
  nn::PolicyRun r;
  if (f) {
    r = nn::PolicyRun::from_json(nlohmann::json::parse(f).at("runs").at(0));
  } else {
    r.policy = item.policy.name();
    r.ok = false;
    r.error = describe_exit(outcome);
  }
  return r;
}

// Each policy in a process of its own, one after another; `none` runs first
// and leaves its gradients for the others. With --rounds N every policy's
// process runs N times, the order reversed every other round (none, A, B,
// then B, A, none, ...): this machine's speed drifts by 10-20% over minutes,
// and a fixed order charges the drift to whichever policy runs last. The
// step samples of all rounds are pooled; the bytes are the first round's
// (they repeat exactly), and each round's ratio to none is kept.
std::vector<nn::PolicyRun> run_isolated(const BenchConfig& c, const std::vector<PolicyItem>& policies) {
  TempDir dir("remat-bench");
  const std::string reference = dir.file("reference.grads");
  bool have_reference = false;
  nn::PolicyRounds pool(policies.size(), c.run.rounds);
  const size_t total = policies.size() * static_cast<size_t>(c.run.rounds);
  size_t done = 0;
  for (int64_t round = 0; round < c.run.rounds; ++round) {
    for (const size_t k : round_order(round, policies.size())) {
      const auto& item = policies[k];
      if (!pool.wants(k)) {
        continue; // it failed: it fails the same way again
      }
      const bool is_reference = round == 0 && !item.policy.enabled() && !have_reference;
      std::cout << progress_label(++done, total, item.policy.name(), round, c.run.rounds)
                << std::flush;
      const std::string json =
          dir.file("run" + std::to_string(k) + "_" + std::to_string(round) + ".json");
      auto r = run_child(c, item, json, reference, is_reference, have_reference);
      std::cout << (r.ok ? "done" : "failed") << "\n";
      have_reference = have_reference || (is_reference && r.ok);
      pool.add(k, std::move(r));
    }
  }
  auto runs = pool.runs();
  std::cout << "\n";
  return runs;
}

// Applies --preset: the sizes it names, except those given on the command
// line.
void apply_preset(BenchConfig& c, const CLI::App& app) {
  if (c.preset == "bert-large-b64" || c.preset == "seed-bert") { // the old name
    // BERT-large sized at sequence 512, batch 64 (the experiment of the
    // document remat grew from). Sizes
    // given on the command line override the preset's, as in `estimate`.
    auto preset = [&](const char* flag, int64_t& field, int64_t value) {
      if (app.count(flag) == 0) {
        field = value;
      }
    };
    preset("--layers", c.model.layers, 24);
    preset("--hidden", c.model.hidden, 1024);
    preset("--heads", c.model.heads, 16);
    preset("--seq", c.model.seq, 512);
    preset("--batch", c.model.batch, 64);
  } else {
    require(c.preset.empty(), "--preset", "expected bert-large-b64, but got '" + c.preset + "'");
  }
}

// Prints what is about to run: the model, the device, the sizes and the limit.
void print_header(
    const BenchConfig& c, const nn::BenchWorkload& w, const nlohmann::json& config,
    int64_t limit, bool default_limit) {
  std::cout << "remat bench: " << model_line(c.model)
            << (c.lora_rank ? ", LoRA rank " + std::to_string(c.lora_rank) : "") << "\n"
            << "device " << describe_device(c.dev) << ", trainable parameters "
            << w.trainable_parameter_count() << ", weights "
            << memory::format_size(config.at("weight_bytes").get<int64_t>()) << ", threads "
            << torch::get_num_threads() << ", limit "
            << (limit > 0 ? memory::format_size(limit) : std::string("the device's size"))
            << (default_limit ? " (90% of RAM)" : "") << ", steps " << c.run.steps
            << " after " << c.run.warmup << " warm-up\n\n";
}

// Every policy on workload `w` in this process, reading and writing the
// reference gradients that --grads-ref and --grads-out name.
std::vector<nn::PolicyRun> run_in_process(
    const BenchConfig& c, nn::BenchWorkload& w, const std::vector<PolicyItem>& policies) {
  nn::ReferenceGradients reference, none_grads;
  if (!c.grads_ref.empty()) {
    reference = nn::read_gradients(c.grads_ref);
  }
  std::vector<CheckpointPolicy> list;
  for (const auto& item : policies) {
    list.push_back(item.policy);
  }
  auto runs = nn::run_policies(w, list, c.grads_ref.empty() ? nullptr : &reference,
                               c.grads_out.empty() ? nullptr : &none_grads);
  if (!c.grads_out.empty() && !none_grads.empty()) {
    nn::write_gradients(c.grads_out, none_grads);
  }
  return runs;
}

int run_bench(BenchConfig c, const CLI::App& app) {
  apply_preset(c, app);
  apply_family_defaults(c);
  validate(c);
  c.dev = parse_device_flag(c.device);
  make_current(c.dev);
  auto policies = parse_policies(c.policies);
  int64_t limit = c.memory_limit.empty() ? 0 : parse_size_flag(c.memory_limit, "--memory-limit");
  const bool default_limit = limit == 0 && c.dev.is_cpu();
  if (default_limit) {
    limit = nn::default_limit_bytes(c.dev);
  }
  set_threads(c.run.threads);

  // Refused before anything is built when even the leanest schedule would
  // not fit (the step runs no optimizer).
  if (c.grads_ref.empty() && c.grads_out.empty()) {
    require_fits(model_config(c).spec().optimizer(plan::Optimizer::kSgd),
                 default_limit ? 0 : limit);
  }
  std::unique_ptr<nn::BenchWorkload> w;
  with_flag_errors([&] {
    w = std::make_unique<nn::BenchWorkload>(model_config(c), bench_options(c, limit));
  });
  // Before the workload goes (process mode): the figures of its model.
  nlohmann::json config = model_json(c.model);
  config.update(nn::workload_json(*w));
  config.update({{"preset", c.preset}, {"isolation", c.run.isolation}, {"rounds", c.run.rounds}});
  print_header(c, *w, config, limit, default_limit);

  // Run `none` first when present: it is the reference for gradients.
  std::stable_partition(policies.begin(), policies.end(),
                        [](const PolicyItem& p) { return !p.policy.enabled(); });
  std::vector<nn::PolicyRun> runs;
  if (c.run.isolation == "process") {
    w.reset();
    memory::empty_cache();
    runs = run_isolated(c, policies);
  } else {
    runs = run_in_process(c, *w, policies);
  }
  std::cout << nn::policy_table(runs);

  if (!c.run.json_path.empty()) {
    nlohmann::json runs_json = nlohmann::json::array();
    for (const auto& r : runs) {
      runs_json.push_back(r.to_json());
    }
    write_json_file(c.run.json_path, {{"config", config}, {"runs", runs_json}});
  }
  return 0;
}

} // namespace

Run add_bench(CLI::App& root) {
  auto c = std::make_shared<BenchConfig>();
  auto* app = root.add_subcommand(
      "bench", "Run training steps under each checkpoint policy and compare memory and time");
  app->add_option("--preset", c->preset, "bert-large-b64: 24 layers, hidden 1024, 16 heads, seq 512, batch 64 (seed-bert is "
                  "its old name)");
  add_model_flags(app, c->model);
  add_run_flags(app, c->run, "policy");
  app->add_option("--lora-rank", c->lora_rank, "LoRA rank; 0 trains every weight")->capture_default_str();
  app->add_option("--lora-alpha", c->lora_alpha, "LoRA alpha (0: 2 * rank)");
  app->add_option("--lora-targets", c->lora_targets, "comma-separated projections (default: the attention projections)");
  app->add_option("--policy", c->policies,
                  "comma-separated policies: " + CheckpointPolicy::names())
      ->capture_default_str();
  app->add_option("--memory-limit", c->memory_limit,
                  "fail a policy cleanly past this many bytes, e.g. 512MiB, 80GiB "
                  "(default: 90% of RAM)");
  app->add_option("--device", c->device,
                  "cpu, cuda or cuda:N (a CUDA build and a visible GPU); bytes are then the "
                  "CUDA caching allocator's")
      ->capture_default_str();
  // Hidden: how `process` mode hands the reference gradients between children.
  app->add_option("--grads-out", c->grads_out)->group("");
  app->add_option("--grads-ref", c->grads_ref)->group("");
  return [c, app] { return run_bench(*c, *app); };
}

} // namespace cli
} // namespace remat
