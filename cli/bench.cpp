// `remat bench`: the same training step under each checkpoint policy, on the
// same weights and inputs, with exact byte counts and side-by-side timings.
#include "command.h"
#include "isolate.h"
#include "model_flags.h"

#include "remat/device.h"
#include "remat/memory.h"
#include "checkpoint/autocast_state.h"
#include "remat/nn/attention.h"
#include "remat/nn/bert.h"
#include "remat/nn/llama.h"
#include "remat/nn/lora.h"
#include "remat/nn/profile.h"
#include "remat/policy.h"

#include <nlohmann/json.hpp>
#include <torch/torch.h>
#include <torch/version.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
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
  std::string model = "bert";
  int64_t layers = 12;
  int64_t hidden = 256;
  int64_t heads = 4;
  int64_t kv_heads = 0;       ///< llama: 0 means heads (no grouping)
  int64_t intermediate = 0;   ///< 0: the family's default
  int64_t seq = 256;
  int64_t batch = 8;
  int64_t vocab = 0;          ///< 0: the family's default
  double dropout = -1;        ///< < 0: the family's default
  std::string dtype = "fp32";
  std::string attention = "eager";
  int64_t lora_rank = 0;
  double lora_alpha = 0;      ///< 0: 2 * rank
  std::string lora_targets;   ///< empty: the attention projections
  std::string policies = "none,every-layer";
  int64_t steps = 3;
  int64_t warmup = 1;
  int64_t threads = 0;
  std::string memory_limit;
  std::string json_path;
  uint64_t seed = 0;
  /// --device as typed; `dev` is it resolved ("cuda" -> cuda:0) and checked.
  std::string device = "cpu";
  c10::Device dev = c10::kCPU;
  /// "process": each policy in a process of its own (cli/isolate.h says
  /// why); "in-process": all in this one, timed in interleaved rounds.
  std::string isolation = "process";
  /// "process" mode: how many times each policy's process runs, in
  /// alternating order (see run_isolated).
  int64_t rounds = 1;
  // A child of the "process" mode: where the reference gradients go to, or
  // come from (hidden flags).
  std::string grads_out, grads_ref;
};

struct RunResult {
  std::string policy;
  bool ok = true;
  bool out_of_memory = false;
  std::string error;
  int64_t held_before_forward = 0;
  int64_t held_before_backward = 0;
  int64_t held_after_backward = 0;
  int64_t peak = 0;
  double step_seconds = 0;
  double forward_seconds = 0;  ///< median forward + loss
  double max_abs_grad_diff = -1; ///< -1: no reference to compare with
  // A budget policy: the schedule the planner chose and what it predicted.
  bool planned = false;
  std::string schedule;
  int64_t budget = 0;               ///< bytes
  int64_t predicted_peak = 0;       ///< bytes
  double predicted_step_seconds = 0;
  CheckpointPolicy applied;      ///< what the timed rounds set on the model
  std::vector<double> times, forward_times; ///< seconds, one per timed step
  /// --rounds > 1: per round, the median step of this policy over none's
  /// median step in the same round.
  std::vector<double> round_ratios;
};

// Gradients of a reference run, kept outside remat's allocator so that they
// do not count against the bytes or the limit of the runs compared with them.
using GradCopy = std::vector<std::vector<float>>;

GradCopy copy_grads(const std::vector<torch::Tensor>& params) {
  GradCopy out;
  for (const auto& p : params) {
    out.emplace_back();
    if (!p.grad().defined()) {
      continue;
    }
    auto g = p.grad().to(torch::kCPU, torch::kFloat).contiguous();
    out.back().assign(g.data_ptr<float>(), g.data_ptr<float>() + g.numel());
  }
  return out;
}

double max_abs_diff(const GradCopy& a, const GradCopy& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    if (a[i].size() != b[i].size()) {
      return std::numeric_limits<double>::infinity();
    }
    for (size_t j = 0; j < a[i].size(); ++j) {
      worst = std::max(worst, static_cast<double>(std::abs(a[i][j] - b[i][j])));
    }
  }
  return worst;
}

// The reference gradients travel between child processes as a flat file:
// the count of tensors, then each one's element count and floats.
void write_grads(const std::string& path, const GradCopy& grads) {
  std::ofstream f(path, std::ios::binary);
  const uint64_t n = grads.size();
  f.write(reinterpret_cast<const char*>(&n), sizeof(n));
  for (const auto& g : grads) {
    const uint64_t k = g.size();
    f.write(reinterpret_cast<const char*>(&k), sizeof(k));
    f.write(reinterpret_cast<const char*>(g.data()), static_cast<std::streamsize>(k * sizeof(float)));
  }
  TORCH_CHECK(static_cast<bool>(f), "remat bench: cannot write the reference gradients to ", path);
}

GradCopy read_grads(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  TORCH_CHECK(static_cast<bool>(f), "remat bench: cannot read reference gradients from ", path);
  uint64_t n = 0;
  f.read(reinterpret_cast<char*>(&n), sizeof(n));
  GradCopy out;
  for (uint64_t i = 0; i < n && f; ++i) {
    uint64_t k = 0;
    f.read(reinterpret_cast<char*>(&k), sizeof(k));
    out.emplace_back(k);
    f.read(reinterpret_cast<char*>(out.back().data()), static_cast<std::streamsize>(k * sizeof(float)));
  }
  TORCH_CHECK(static_cast<bool>(f) && out.size() == n,
              "remat bench: expected ", n, " reference gradients in ", path, ", but the file is short");
  return out;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n == 0 ? 0 : (n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]));
}

// --dtype bf16: autocast to bfloat16 on the device the step runs on
// (FP32 master weights), nothing on the other.
AutocastState bf16_autocast(c10::Device device) {
  return device.is_cuda() ? AutocastState{false, c10::kBFloat16, true, c10::kBFloat16}
                          : AutocastState{true, c10::kBFloat16, false, c10::kHalf};
}

int64_t physical_memory_bytes() {
  return static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGE_SIZE);
}

// A policy and how it was spelled (a child process is given the spelling:
// "budget:1.2GiB" is not what the parsed policy's name prints).
struct PolicyItem {
  std::string text;
  CheckpointPolicy policy;
};

std::vector<PolicyItem> parse_policies(const std::string& list) {
  std::vector<PolicyItem> out;
  std::stringstream in(list);
  std::string item;
  while (std::getline(in, item, ',')) {
    try {
      out.push_back({item, CheckpointPolicy::parse(item)});
    } catch (const c10::Error& e) {
      throw UsageError("--policy: " + std::string(e.what_without_backtrace()));
    }
  }
  require(!out.empty(), "--policy", "expected at least one policy, but got '" + list + "'");
  return out;
}

void validate(const BenchConfig& c) {
  auto positive = [](int64_t v, const char* flag) {
    require(v > 0, flag, "expected a value above 0, but got " + std::to_string(v));
  };
  positive(c.layers, "--layers");
  positive(c.hidden, "--hidden");
  positive(c.heads, "--heads");
  positive(c.seq, "--seq");
  positive(c.batch, "--batch");
  positive(c.vocab, "--vocab");
  positive(c.steps, "--steps");
  require(c.kv_heads >= 0, "--kv-heads", "expected a value >= 0 (0: --heads), but got " +
          std::to_string(c.kv_heads));
  require(c.kv_heads == 0 || c.heads % c.kv_heads == 0, "--kv-heads",
          "expected a divisor of --heads (" + std::to_string(c.heads) + "), but got " +
              std::to_string(c.kv_heads));
  require(c.intermediate >= 0, "--intermediate",
          "expected a value >= 0 (0: the family's default), but got " +
              std::to_string(c.intermediate));
  require(c.lora_rank >= 0, "--lora-rank", "expected a value >= 0 (0: no LoRA), but got " +
          std::to_string(c.lora_rank));
  require(c.model == "bert" || c.model == "llama", "--model",
          "expected bert or llama, but got '" + c.model + "'");
  try {
    nn::check_attention_supported(nn::parse_attention(c.attention));
  } catch (const c10::Error& e) {
    throw UsageError("--attention: " + std::string(e.what_without_backtrace()));
  }
  require(c.dtype == "fp32" || c.dtype == "bf16", "--dtype",
          "expected fp32 or bf16, but got '" + c.dtype + "'");
  require(c.warmup >= 0, "--warmup", "expected a value >= 0, but got " + std::to_string(c.warmup));
  require(c.threads >= 0, "--threads", "expected a value >= 0 (0: all cores), but got " +
          std::to_string(c.threads));
  require(c.hidden % c.heads == 0, "--hidden",
          "expected a multiple of --heads (" + std::to_string(c.heads) + "), but got " +
              std::to_string(c.hidden));
  require(c.dropout >= 0 && c.dropout < 1, "--dropout",
          "expected a probability in [0, 1), but got " + std::to_string(c.dropout));
  require(c.isolation == "process" || c.isolation == "in-process", "--isolation",
          "expected process or in-process, but got '" + c.isolation + "'");
  require_rounds(c.rounds, c.isolation);
}

// The LoRA targets of "a,b,,c": empty items dropped.
std::vector<std::string> split_targets(const std::string& list) {
  std::vector<std::string> out;
  std::stringstream in(list);
  std::string item;
  while (std::getline(in, item, ',')) {
    if (!item.empty()) {
      out.push_back(item);
    }
  }
  return out;
}

// A model, its inputs and a loss: one training step of some family.
struct Workload {
  virtual ~Workload() = default;
  virtual torch::Tensor loss() = 0;
  virtual void set_policy(const CheckpointPolicy& policy) = 0;
  virtual torch::nn::Module& module() = 0;
  /// Profiles this workload's step and plans its checkpointing to
  /// `budget_bytes` (total bytes); throws, naming the smallest feasible
  /// budget, when nothing fits.
  virtual plan::Plan plan(int64_t budget_bytes) = 0;

  /// After construction: LoRA if asked, the model on --device, and the
  /// trainable parameters.
  void finish(const BenchConfig& c, const std::vector<std::string>& default_targets) {
    if (c.lora_rank > 0) {
      auto targets = c.lora_targets.empty() ? default_targets : split_targets(c.lora_targets);
      try {
        nn::apply_lora(module(), nn::LoraOptions()
                                     .rank(c.lora_rank)
                                     .alpha(c.lora_alpha > 0 ? c.lora_alpha : 2.0 * c.lora_rank)
                                     .targets(targets));
      } catch (const c10::Error& e) {
        throw UsageError("--lora-targets: " + std::string(e.what_without_backtrace()));
      }
    }
    // Built and initialised on the CPU, from the same seed, then moved: the
    // same weights on every device.
    module().to(c.dev);
    params = nn::trainable_parameters(module()).values();
    module().train();
  }

  std::vector<torch::Tensor> params; ///< what receives gradients
};

// An encoder trained to regress its last hidden state onto a fixed random
// target. (The mean of the hidden state, as some tutorials use, has an almost
// zero gradient through the final LayerNorm: useless for comparing gradients.)
struct BertWorkload : Workload {
  nn::Bert model{nullptr};
  torch::Tensor input_ids, attention_mask, target;

  explicit BertWorkload(const BenchConfig& c) {
    torch::manual_seed(c.seed);
    model = nn::Bert(nn::BertOptions()
                         .vocab_size(c.vocab)
                         .hidden_size(c.hidden)
                         .num_layers(c.layers)
                         .num_heads(c.heads)
                         .intermediate_size(c.intermediate)
                         .max_position_embeddings(std::max<int64_t>(512, c.seq))
                         .hidden_dropout(c.dropout)
                         .attention_dropout(c.dropout)
                         .attention(nn::parse_attention(c.attention)));
    input_ids = torch::randint(c.vocab, {c.batch, c.seq}, torch::kLong).to(c.dev);
    attention_mask = torch::ones({c.batch, c.seq}, torch::kLong).to(c.dev);
    target = torch::randn({c.batch, c.seq, c.hidden}).to(c.dev);
    finish(c, {"query", "key", "value", "attention.output.dense"});
  }
  torch::Tensor loss() override {
    auto out = model->forward(input_ids, attention_mask);
    return torch::mse_loss(out.last_hidden_state.to(torch::kFloat), target);
  }
  void set_policy(const CheckpointPolicy& p) override { model->gradient_checkpointing_enable(p); }
  torch::nn::Module& module() override { return *model; }
  plan::Plan plan(int64_t budget_bytes) override {
    auto t = target;
    return nn::plan_checkpointing(
        *model,
        nn::BertStep(input_ids).attention_mask(attention_mask).loss(
            [t](const nn::BertOutput& o) {
              return torch::mse_loss(o.last_hidden_state.to(torch::kFloat), t);
            }),
        budget_bytes);
  }
};

// A decoder trained on next-token prediction of random tokens.
struct LlamaWorkload : Workload {
  nn::Llama model{nullptr};
  torch::Tensor input_ids;

  explicit LlamaWorkload(const BenchConfig& c) {
    torch::manual_seed(c.seed);
    model = nn::Llama(nn::LlamaOptions()
                          .vocab_size(c.vocab)
                          .hidden_size(c.hidden)
                          .intermediate_size(c.intermediate)
                          .num_layers(c.layers)
                          .num_heads(c.heads)
                          .num_kv_heads(c.kv_heads)
                          .max_position_embeddings(std::max<int64_t>(4096, c.seq))
                          .attention_dropout(c.dropout)
                          .attention(nn::parse_attention(c.attention)));
    input_ids = torch::randint(c.vocab, {c.batch, c.seq}, torch::kLong).to(c.dev);
    finish(c, {"q_proj", "k_proj", "v_proj", "o_proj"});
  }
  torch::Tensor loss() override {
    return model->forward_loss(input_ids, input_ids);
  }
  void set_policy(const CheckpointPolicy& p) override { model->gradient_checkpointing_enable(p); }
  torch::nn::Module& module() override { return *model; }
  plan::Plan plan(int64_t budget_bytes) override {
    return nn::plan_checkpointing(*model, nn::LlamaStep(input_ids), budget_bytes);
  }
};

// Fills in the family defaults (0 or negative meant "the family's").
void apply_family_defaults(BenchConfig& c) {
  const bool llama = c.model == "llama";
  if (c.vocab == 0) {
    c.vocab = llama ? 32000 : 30522;
  }
  if (c.dropout < 0) {
    c.dropout = llama ? 0.0 : 0.1;
  }
  if (c.intermediate == 0) {
    // BERT: 4h. Llama: 2/3 of 4h rounded up to a multiple of 256, as Meta's
    // reference sizes do (4096 -> 11008).
    c.intermediate = llama ? (8 * c.hidden / 3 + 255) / 256 * 256 : 4 * c.hidden;
  }
}

std::unique_ptr<Workload> make_workload(const BenchConfig& c) {
  if (c.model == "llama") {
    return std::make_unique<LlamaWorkload>(c);
  }
  return std::make_unique<BertWorkload>(c);
}

// One training step under the policy the model has now. Returns {forward +
// loss, whole step} in seconds; throws what the step throws (out of memory
// included). Every policy draws the same dropout masks, so gradients are
// comparable.
struct StepBytes {
  int64_t before_forward = 0;  ///< held once the previous gradients are gone
  int64_t before_backward = 0;
};

std::pair<double, double> train_step(
    Workload& w, const BenchConfig& c, bool bf16, int64_t limit, StepBytes* bytes) {
  w.module().zero_grad(/*set_to_none=*/true);
  torch::manual_seed(c.seed + 1); // the CPU's and every GPU's generator
  // A GPU runs the step asynchronously: each clock is read once the device
  // has finished the work queued before it.
  synchronize(c.dev);
  if (bytes != nullptr) {
    bytes->before_forward = memory::current_bytes(c.dev);
    memory::reset_peak(c.dev);
  }
  memory::LimitGuard guard(limit, c.dev);
  const auto t0 = std::chrono::steady_clock::now();
  torch::Tensor loss;
  {
    AutocastScope autocast(bf16 ? bf16_autocast(c.dev) : AutocastState{});
    loss = w.loss();
  }
  synchronize(c.dev);
  const auto t_mid = std::chrono::steady_clock::now();
  if (bytes != nullptr) {
    bytes->before_backward = memory::current_bytes(c.dev);
  }
  loss.backward();
  at::autocast::clear_cache();
  synchronize(c.dev);
  const auto t1 = std::chrono::steady_clock::now();
  return {std::chrono::duration<double>(t_mid - t0).count(),
          std::chrono::duration<double>(t1 - t0).count()};
}

void fail(RunResult& r, const c10::Error& e) {
  std::string what = e.what_without_backtrace();
  r.ok = false;
  // remat's CPU limit and CUDA's caching allocator both throw this.
  r.out_of_memory = dynamic_cast<const c10::OutOfMemoryError*>(&e) != nullptr;
  r.error = what.substr(0, what.find('\n'));
}

// Warm-up steps, then one step whose bytes and gradients are measured (and
// whose time is the first sample). The other timed steps run interleaved
// with the other policies' (time_interleaved), so that a noisy neighbour
// slows every policy alike instead of whichever ran last.
RunResult run_policy(
    Workload& w,
    const CheckpointPolicy& policy,
    const BenchConfig& c,
    bool bf16,
    int64_t limit,
    const GradCopy* reference,
    GradCopy* grads_out) {
  RunResult r;
  r.policy = policy.name();
  r.applied = policy;
  if (policy.kind() == CheckpointPolicy::Kind::kBudget) {
    // Planned before the timed steps, on this workload's own step (its loss,
    // its dtype), so that profiling counts in neither the time nor the peak.
    r.planned = true;
    r.budget = policy.budget_bytes();
    w.module().zero_grad(/*set_to_none=*/true);
    torch::manual_seed(c.seed + 1);
    try {
      memory::LimitGuard guard(limit, c.dev);
      AutocastScope autocast(bf16 ? bf16_autocast(c.dev) : AutocastState{});
      const auto p = w.plan(policy.budget_bytes());
      r.schedule = p.schedule.str();
      r.predicted_peak = p.peak_bytes;
      r.predicted_step_seconds = p.step_seconds;
      r.applied = CheckpointPolicy::custom(p.schedule, policy.name());
    } catch (const c10::Error& e) {
      fail(r, e);
      w.module().zero_grad(true);
      return r;
    }
  }
  w.set_policy(r.applied);
  for (int64_t step = 0; step <= c.warmup; ++step) {
    const bool measured = step == c.warmup;
    StepBytes bytes;
    try {
      const auto t = train_step(w, c, bf16, limit, &bytes);
      if (measured) {
        r.forward_times.push_back(t.first);
        r.times.push_back(t.second);
        r.held_before_forward = bytes.before_forward;
        r.held_before_backward = bytes.before_backward;
      }
    } catch (const c10::Error& e) {
      fail(r, e);
      r.held_before_forward = bytes.before_forward;
      r.peak = memory::peak_bytes(c.dev);
      w.module().zero_grad(true);
      return r;
    }
    if (measured) {
      r.held_after_backward = memory::current_bytes(c.dev);
      r.peak = memory::peak_bytes(c.dev);
      auto grads = copy_grads(w.params);
      if (reference != nullptr) {
        r.max_abs_grad_diff = max_abs_diff(*reference, grads);
      }
      if (grads_out != nullptr) {
        *grads_out = std::move(grads);
      }
    }
  }
  w.module().zero_grad(true);
  return r;
}

// The remaining steps - 1 timed steps of every policy that ran, in rounds of
// one step each; then each policy's medians.
void time_interleaved(
    Workload& w, std::vector<RunResult>& runs, const BenchConfig& c, bool bf16, int64_t limit) {
  for (int64_t round = 1; round < c.steps; ++round) {
    for (auto& r : runs) {
      if (!r.ok) {
        continue;
      }
      w.set_policy(r.applied);
      try {
        const auto t = train_step(w, c, bf16, limit, nullptr);
        r.forward_times.push_back(t.first);
        r.times.push_back(t.second);
      } catch (const c10::Error& e) {
        fail(r, e);
      }
    }
  }
  w.module().zero_grad(true);
  for (auto& r : runs) {
    r.step_seconds = median(r.times);
    r.forward_seconds = median(r.forward_times);
  }
}

std::string mib(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f", static_cast<double>(bytes) / (1 << 20));
  return buf;
}

void print_table(const std::vector<RunResult>& runs, std::ostream& out) {
  const RunResult* none = nullptr;
  for (const auto& r : runs) {
    if (r.policy == "none" && r.ok) {
      none = &r;
    }
  }
  char line[512];
  std::snprintf(line, sizeof(line), "%-22s %13s %13s %11s %13s %9s %9s %8s %11s\n",
                "policy", "before-bwd", "after-bwd", "peak", "activations",
                "fwd(s)", "step(s)", "vs none", "max|dgrad|");
  out << line;
  std::snprintf(line, sizeof(line), "%-22s %13s %13s %11s %13s %9s %9s %8s %11s\n", "",
                "(MiB)", "(MiB)", "(MiB)", "(MiB)", "", "", "", "");
  out << line;
  for (const auto& r : runs) {
    if (!r.ok) {
      std::snprintf(line, sizeof(line), "%-22s %13s %13s %11s %13s   %s\n",
                    r.policy.c_str(), "-", "-", mib(r.peak).c_str(), "-",
                    r.out_of_memory ? "OUT OF MEMORY" : "FAILED");
      out << line;
      continue;
    }
    std::string ratio = none && none->step_seconds > 0
        ? [&] {
            char b[16];
            std::snprintf(b, sizeof(b), "%.2fx", r.step_seconds / none->step_seconds);
            return std::string(b);
          }()
        : "-";
    std::string diff = "-";
    if (r.max_abs_grad_diff >= 0) {
      char b[24];
      std::snprintf(b, sizeof(b), "%.3g", r.max_abs_grad_diff);
      diff = b;
    }
    std::snprintf(line, sizeof(line), "%-22s %13s %13s %11s %13s %9.3f %9.3f %8s %11s\n",
                  r.policy.c_str(), mib(r.held_before_backward).c_str(),
                  mib(r.held_after_backward).c_str(), mib(r.peak).c_str(),
                  mib(r.held_before_backward - r.held_before_forward).c_str(),
                  r.forward_seconds, r.step_seconds, ratio.c_str(), diff.c_str());
    out << line;
  }
  for (const auto& r : runs) {
    if (r.round_ratios.empty() || r.policy == "none") {
      continue;
    }
    out << r.policy << ": step vs none per round (median of each round's steps):";
    for (double x : r.round_ratios) {
      char b[16];
      std::snprintf(b, sizeof(b), " %.2fx", x);
      out << b;
    }
    out << "\n";
  }
  for (const auto& r : runs) {
    if (r.planned && r.ok) {
      out << r.policy << ": planned " << r.schedule << " (predicted peak "
          << memory::format_size(r.predicted_peak) << ", measured "
          << memory::format_size(r.peak) << ", "
          << (r.peak <= r.budget ? "within" : "ABOVE") << " the budget)\n";
    }
  }
  for (const auto& r : runs) {
    if (!r.ok) {
      out << r.policy << ": " << r.error << "\n";
    }
  }
}

nlohmann::json to_json(const RunResult& r) {
  nlohmann::json j{{"policy", r.policy}, {"ok", r.ok}};
  if (r.planned) {
    j["budget_bytes"] = r.budget;
    if (r.ok) {
      j["schedule"] = r.schedule;
      j["predicted_peak_bytes"] = r.predicted_peak;
      j["predicted_step_seconds"] = r.predicted_step_seconds;
    }
  }
  if (!r.ok) {
    j["error"] = r.error;
    j["out_of_memory"] = r.out_of_memory;
    j["held_before_forward_bytes"] = r.held_before_forward;
    j["peak_bytes"] = r.peak;
    return j;
  }
  j["held_before_forward_bytes"] = r.held_before_forward;
  j["held_before_backward_bytes"] = r.held_before_backward;
  j["held_after_backward_bytes"] = r.held_after_backward;
  j["peak_bytes"] = r.peak;
  j["activation_bytes"] = r.held_before_backward - r.held_before_forward;
  j["step_seconds"] = r.step_seconds;
  j["forward_seconds"] = r.forward_seconds;
  j["backward_seconds"] = r.step_seconds - r.forward_seconds;
  j["max_abs_grad_diff"] =
      r.max_abs_grad_diff >= 0 ? nlohmann::json(r.max_abs_grad_diff) : nlohmann::json();
  j["step_seconds_all"] = r.times;
  j["forward_seconds_all"] = r.forward_times;
  if (!r.round_ratios.empty()) {
    j["step_ratio_per_round"] = r.round_ratios;
  }
  return j;
}

// The inverse of to_json, for a child process's report.
RunResult from_json(const nlohmann::json& j) {
  RunResult r;
  r.policy = j.at("policy").get<std::string>();
  r.ok = j.at("ok").get<bool>();
  if (j.contains("budget_bytes")) {
    r.planned = true;
    r.budget = j.at("budget_bytes").get<int64_t>();
    if (r.ok) {
      r.schedule = j.at("schedule").get<std::string>();
      r.predicted_peak = j.at("predicted_peak_bytes").get<int64_t>();
      r.predicted_step_seconds = j.at("predicted_step_seconds").get<double>();
    }
  }
  r.held_before_forward = j.at("held_before_forward_bytes").get<int64_t>();
  r.peak = j.at("peak_bytes").get<int64_t>();
  if (!r.ok) {
    r.error = j.at("error").get<std::string>();
    r.out_of_memory = j.at("out_of_memory").get<bool>();
    return r;
  }
  r.held_before_backward = j.at("held_before_backward_bytes").get<int64_t>();
  r.held_after_backward = j.at("held_after_backward_bytes").get<int64_t>();
  r.step_seconds = j.at("step_seconds").get<double>();
  r.forward_seconds = j.at("forward_seconds").get<double>();
  if (!j.at("max_abs_grad_diff").is_null()) {
    r.max_abs_grad_diff = j.at("max_abs_grad_diff").get<double>();
  }
  r.times = j.at("step_seconds_all").get<std::vector<double>>();
  r.forward_times = j.at("forward_seconds_all").get<std::vector<double>>();
  return r;
}

// This configuration as `remat bench` flags for one policy in a child
// process: every size explicit (defaults and presets already applied).
std::vector<std::string> child_args(const BenchConfig& c, const std::string& policy) {
  auto num = [](auto v) {
    std::ostringstream out;
    out << v;
    return out.str();
  };
  std::vector<std::string> a{
      "bench", "--model", c.model, "--layers", num(c.layers), "--hidden", num(c.hidden),
      "--heads", num(c.heads), "--kv-heads", num(c.kv_heads), "--intermediate",
      num(c.intermediate), "--dtype", c.dtype, "--attention", c.attention, "--lora-rank",
      num(c.lora_rank), "--seq", num(c.seq), "--batch", num(c.batch), "--vocab", num(c.vocab),
      "--dropout", num(c.dropout), "--policy", policy, "--steps", num(c.steps), "--warmup",
      num(c.warmup), "--threads", num(c.threads), "--seed", num(c.seed), "--device",
      c.dev.str(), "--isolation", "in-process"};
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
RunResult run_child(
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
  RunResult r;
  if (f) {
    r = from_json(nlohmann::json::parse(f).at("runs").at(0));
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
std::vector<RunResult> run_isolated(const BenchConfig& c, const std::vector<PolicyItem>& policies) {
  TempDir dir("remat-bench");
  const std::string reference = dir.file("reference.grads");
  bool have_reference = false;
  std::vector<RunResult> runs(policies.size());
  std::vector<std::vector<double>> round_medians(policies.size());
  const size_t total = policies.size() * static_cast<size_t>(c.rounds);
  size_t done = 0;
  for (int64_t round = 0; round < c.rounds; ++round) {
    for (const size_t k : round_order(round, policies.size())) {
      const auto& item = policies[k];
      if (round > 0 && !runs[k].ok) {
        continue; // failed in the first round: it fails the same way again
      }
      const bool is_reference = round == 0 && !item.policy.enabled() && !have_reference;
      std::cout << progress_label(++done, total, item.policy.name(), round, c.rounds)
                << std::flush;
      const std::string json =
          dir.file("run" + std::to_string(k) + "_" + std::to_string(round) + ".json");
      auto r = run_child(c, item, json, reference, is_reference, have_reference);
      std::cout << (r.ok ? "done" : "failed") << "\n";
      have_reference = have_reference || (is_reference && r.ok);
      if (round == 0) {
        runs[k] = std::move(r);
        round_medians[k].push_back(runs[k].step_seconds);
        continue;
      }
      if (!r.ok) {
        runs[k] = std::move(r);
        continue;
      }
      auto& first = runs[k];
      first.times.insert(first.times.end(), r.times.begin(), r.times.end());
      first.forward_times.insert(
          first.forward_times.end(), r.forward_times.begin(), r.forward_times.end());
      round_medians[k].push_back(r.step_seconds);
    }
  }
  if (c.rounds > 1) {
    const RunResult* none = nullptr;
    size_t none_index = 0;
    for (size_t k = 0; k < runs.size(); ++k) {
      auto& r = runs[k];
      if (r.ok) {
        r.step_seconds = median(r.times);
        r.forward_seconds = median(r.forward_times);
      }
      if (r.ok && r.policy == "none" && none == nullptr) {
        none = &r;
        none_index = k;
      }
    }
    for (size_t k = 0; none != nullptr && k < runs.size(); ++k) {
      if (!runs[k].ok || round_medians[k].size() != round_medians[none_index].size()) {
        continue;
      }
      for (size_t i = 0; i < round_medians[k].size(); ++i) {
        runs[k].round_ratios.push_back(round_medians[k][i] / round_medians[none_index][i]);
      }
    }
  }
  std::cout << "\n";
  return runs;
}

int run_bench(BenchConfig c) {
  if (c.preset == "seed-bert") {
    // The experiment of the seed document: BERT-large-sized, batch 64.
    c.layers = 24;
    c.hidden = 1024;
    c.heads = 16;
    c.seq = 512;
    c.batch = 64;
  } else {
    require(c.preset.empty(), "--preset", "expected seed-bert, but got '" + c.preset + "'");
  }
  apply_family_defaults(c);
  validate(c);
  c.dev = parse_device_flag(c.device);
  make_current(c.dev);
  auto policies = parse_policies(c.policies);
  int64_t limit = c.memory_limit.empty() ? 0 : parse_size_flag(c.memory_limit, "--memory-limit");
  // A GPU's own size is its limit: its allocator throws c10::OutOfMemoryError.
  const bool default_limit = limit == 0 && c.dev.is_cpu();
  if (default_limit) {
    // Without a limit, a policy that does not fit would meet the kernel's
    // OOM killer; stop it at 90% of physical memory with a clean error.
    limit = physical_memory_bytes() / 10 * 9;
  }
  // OpenMP's default here can be a single thread; 0 means every core.
  torch::set_num_threads(static_cast<int>(
      c.threads > 0 ? c.threads : std::max(1u, std::thread::hardware_concurrency())));

  auto w = make_workload(c);
  const int64_t weights = memory::breakdown(w->module(), nullptr, c.dev).weights;
  int64_t trainable = 0;
  for (const auto& p : w->params) {
    trainable += p.numel();
  }
  std::cout << "remat bench: " << c.model << ", " << c.layers << " layers, hidden " << c.hidden
            << ", " << c.heads << " heads, seq " << c.seq << ", batch " << c.batch
            << ", vocab " << c.vocab << ", dropout " << c.dropout << ", " << c.dtype
            << ", " << c.attention << " attention"
            << (c.model == "llama" ? ", kv-heads " + std::to_string(c.kv_heads ? c.kv_heads : c.heads) : "")
            << (c.lora_rank ? ", LoRA rank " + std::to_string(c.lora_rank) : "") << "\n"
            << "device " << describe_device(c.dev) << ", trainable parameters " << trainable
            << ", weights " << memory::format_size(weights) << ", threads "
            << torch::get_num_threads() << ", limit "
            << (limit > 0 ? memory::format_size(limit) : std::string("the device's size"))
            << (default_limit ? " (90% of RAM)" : "") << ", steps " << c.steps
            << " after " << c.warmup << " warm-up\n\n";

  // Run `none` first when present: it is the reference for gradients.
  std::stable_partition(policies.begin(), policies.end(),
                        [](const PolicyItem& p) { return !p.policy.enabled(); });
  std::vector<RunResult> runs;
  if (c.isolation == "process") {
    w.reset();
    memory::empty_cache();
    runs = run_isolated(c, policies);
  } else {
    GradCopy reference;
    bool have_reference = false;
    if (!c.grads_ref.empty()) {
      reference = read_grads(c.grads_ref);
      have_reference = true;
    }
    for (const auto& item : policies) {
      const bool is_reference = !item.policy.enabled() && !have_reference;
      auto r = run_policy(*w, item.policy, c, c.dtype == "bf16", limit,
                          have_reference ? &reference : nullptr,
                          is_reference ? &reference : nullptr);
      have_reference = have_reference || (is_reference && r.ok);
      if (is_reference && r.ok) {
        r.max_abs_grad_diff = 0;
        if (!c.grads_out.empty()) {
          write_grads(c.grads_out, reference);
        }
      }
      runs.push_back(r);
    }
    time_interleaved(*w, runs, c, c.dtype == "bf16", limit);
  }
  print_table(runs, std::cout);

  if (!c.json_path.empty()) {
    nlohmann::json config{
        {"model", c.model},    {"layers", c.layers},   {"hidden", c.hidden},
        {"heads", c.heads},    {"kv_heads", c.kv_heads ? c.kv_heads : c.heads},
        {"intermediate", c.intermediate}, {"dtype", c.dtype},
        {"attention", c.attention}, {"lora_rank", c.lora_rank},
        {"trainable_parameters", trainable},
        {"seq", c.seq},         {"batch", c.batch},
        {"vocab", c.vocab},    {"dropout", c.dropout}, {"steps", c.steps},
        {"warmup", c.warmup},  {"threads", torch::get_num_threads()},
        {"memory_limit_bytes", limit}, {"weight_bytes", weights},
        {"seed", c.seed},      {"preset", c.preset}, {"isolation", c.isolation},
        {"rounds", c.rounds},  {"device", c.dev.str()},
        {"device_name", describe_device(c.dev)},
        // Where the byte counts of the runs come from.
        {"memory_source", c.dev.is_cuda() ? "cuda caching allocator (allocated bytes)"
                                          : "remat counting CPU allocator"}};
    nlohmann::json runs_json = nlohmann::json::array();
    for (const auto& r : runs) {
      runs_json.push_back(to_json(r));
    }
    write_json_file(c.json_path, {{"config", config}, {"runs", runs_json}});
  }
  return 0;
}

} // namespace

Run add_bench(CLI::App& root) {
  auto c = std::make_shared<BenchConfig>();
  auto* app = root.add_subcommand(
      "bench", "Run training steps under each checkpoint policy and compare memory and time");
  app->add_option("--preset", c->preset, "seed-bert: the seed's 24-layer, hidden-1024, batch-64 BERT");
  app->add_option("--model", c->model, "bert or llama")->capture_default_str();
  app->add_option("--layers", c->layers, "layers")->capture_default_str();
  app->add_option("--hidden", c->hidden, "hidden size")->capture_default_str();
  app->add_option("--heads", c->heads, "attention heads")->capture_default_str();
  app->add_option("--kv-heads", c->kv_heads, "llama key/value heads (0: --heads)")->capture_default_str();
  app->add_option("--intermediate", c->intermediate, "MLP width (0: BERT 4h, Llama 8h/3 rounded to 256)")->capture_default_str();
  app->add_option("--dtype", c->dtype, "fp32, or bf16 (autocast on --device, FP32 master weights)")->capture_default_str();
  app->add_option("--attention", c->attention, "eager, blockwise (memory-efficient) or sdpa (LibTorch >= 2.0)")->capture_default_str();
  app->add_option("--lora-rank", c->lora_rank, "LoRA rank; 0 trains every weight")->capture_default_str();
  app->add_option("--lora-alpha", c->lora_alpha, "LoRA alpha (0: 2 * rank)");
  app->add_option("--lora-targets", c->lora_targets, "comma-separated projections (default: the attention projections)");
  app->add_option("--seq", c->seq, "sequence length (tokens)")->capture_default_str();
  app->add_option("--batch", c->batch, "batch size (sequences)")->capture_default_str();
  app->add_option("--vocab", c->vocab, "vocabulary size (default: BERT 30522, Llama 32000)");
  app->add_option("--dropout", c->dropout, "dropout (default: BERT 0.1, Llama 0)");
  app->add_option("--policy", c->policies,
                  "comma-separated policies: " + CheckpointPolicy::names())
      ->capture_default_str();
  app->add_option("--steps", c->steps, "timed steps per policy")->capture_default_str();
  app->add_option("--warmup", c->warmup, "warm-up steps per policy")->capture_default_str();
  app->add_option("--threads", c->threads, "intra-op threads (0: all cores)")->capture_default_str();
  app->add_option("--memory-limit", c->memory_limit,
                  "fail a policy cleanly past this many bytes, e.g. 512MiB, 80GiB "
                  "(default: 90% of RAM)");
  app->add_option("--json", c->json_path, "also write the results as JSON to FILE");
  app->add_option("--seed", c->seed, "seed for weights, inputs and dropout")->capture_default_str();
  app->add_option("--device", c->device,
                  "cpu, cuda or cuda:N (a CUDA build and a visible GPU); bytes are then the "
                  "CUDA caching allocator's")
      ->capture_default_str();
  app->add_option("--isolation", c->isolation,
                  "process: each policy in its own process, one after another (steadier: "
                  "no policy inherits another's allocator state); in-process: all in this "
                  "one, timed in interleaved rounds")
      ->capture_default_str();
  app->add_option("--rounds", c->rounds,
                  "process isolation: run each policy's process this many times, in "
                  "alternating order, and pool the step times (steadier ratios on a "
                  "machine whose speed drifts)")
      ->capture_default_str();
  // Hidden: how `process` mode hands the reference gradients between children.
  app->add_option("--grads-out", c->grads_out)->group("");
  app->add_option("--grads-ref", c->grads_ref)->group("");
  return [c] { return run_bench(*c); };
}

} // namespace cli
} // namespace remat
