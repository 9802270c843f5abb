#include "remat/nn/policy_bench.h"
#include "remat/field_error.h"

#include "remat/autocast.h"
#include "remat/device.h"
#include "remat/memory.h"
#include "remat/nn/lora.h"
#include "remat/nn/profile.h"
#include "remat/nn/step.h"
#include "remat/timing.h"

#include <torch/torch.h>

#include <cstdio>
#include <fstream>
#include <limits>
#include <sstream>

namespace remat {
namespace nn {
namespace {

// One training step under the policy the model has now (the measured step,
// remat/nn/step.h), starting from no gradients. Throws what the step throws
// (out of memory included). Every policy draws the same dropout masks, so
// gradients are comparable.
StepSample train_step(BenchWorkload& w) {
  const auto& o = w.options();
  return measured_step(
      w.module(), [&] { return w.loss(); },
      StepOptions()
          .device(o.device())
          .gradients(GradientReset::kNone)
          .seed(o.seed() + 1)
          .limit_bytes(o.limit_bytes())
          .autocast(w.config().autocast(o.device())));
}

void fail(PolicyRun& r, const c10::Error& e) {
  std::string what = first_line(e);
  r.ok = false;
  // remat's CPU limit and CUDA's caching allocator both throw this.
  r.out_of_memory = dynamic_cast<const c10::OutOfMemoryError*>(&e) != nullptr;
  r.error = what;
}

std::string mib(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f", static_cast<double>(bytes) / (1 << 20));
  return buf;
}

// Bench's Bert step: the padded batch, and the mean square error of the
// last hidden state (in fp32) against `target`. What loss, profile and plan
// all run.
BertStep bert_step(
    const torch::Tensor& ids,
    const torch::Tensor& mask,
    const torch::Tensor& target) {
  return BertStep(ids).attention_mask(mask).loss([target](const BertOutput& o) {
    return torch::mse_loss(o.last_hidden_state.to(torch::kFloat), target);
  });
}

} // namespace

std::string policy_table(const std::vector<PolicyRun>& runs) {
  std::ostringstream out;
  const PolicyRun* none = nullptr;
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
  return out.str();
}

BenchWorkload::BenchWorkload(const ModelConfig& config, const BenchOptions& options)
    : config_(config), options_(options) {
  const auto dev = options.device();
  torch::manual_seed(options.seed());
  const int64_t batch = config.batch(), seq = config.seq();
  std::vector<std::string> default_targets;
  if (config.llama()) {
    llama_ = Llama(config.llama_options());
    ids_ = torch::randint(config.vocab_size(), {batch, seq}, torch::kLong).to(dev);
    default_targets = {"q_proj", "k_proj", "v_proj", "o_proj"};
  } else {
    bert_ = Bert(config.bert_options());
    ids_ = torch::randint(config.vocab_size(), {batch, seq}, torch::kLong).to(dev);
    mask_ = torch::ones({batch, seq}, torch::kLong).to(dev);
    target_ = torch::randn({batch, seq, config.hidden()}).to(dev);
    default_targets = {"query", "key", "value", "attention.output.dense"};
  }
  if (options.lora_rank() > 0) {
    const auto targets =
        options.lora_targets().empty() ? default_targets : options.lora_targets();
    try {
      apply_lora(module(), LoraOptions()
                               .rank(options.lora_rank())
                               .alpha(options.lora_alpha() > 0 ? options.lora_alpha()
                                                               : 2.0 * options.lora_rank())
                               .targets(targets));
    } catch (const FieldError&) {
      throw;
    } catch (const c10::Error& e) {
      std::string what = first_line(e);
      throw FieldError("lora_targets", what);
    }
  }
  // Built and initialised on the CPU, from the same seed, then moved: the
  // same weights on every device.
  module().to(dev);
  trainable_ = trainable_parameters(module()).values();
  module().train();
}

torch::Tensor BenchWorkload::loss() {
  return llama_ ? LlamaStep(ids_).forward_loss(*llama_)
                : bert_step(ids_, mask_, target_).forward_loss(*bert_);
}

void BenchWorkload::set_policy(const CheckpointPolicy& policy) {
  if (llama_) {
    llama_->gradient_checkpointing_enable(policy);
  } else {
    bert_->gradient_checkpointing_enable(policy);
  }
}

torch::nn::Module& BenchWorkload::module() {
  return llama_ ? static_cast<torch::nn::Module&>(*llama_) : *bert_;
}

plan::Plan BenchWorkload::plan(int64_t budget_bytes) {
  // Profiled as the step runs (under its autocast), nothing reserved.
  return plan::solve(profile(), budget_bytes);
}

plan::Chain BenchWorkload::profile(const plan::ProfileOptions& options) {
  AutocastScope autocast(config_.autocast(options_.device()));
  return llama_ ? profile_model(*llama_, LlamaStep(ids_), options)
                : profile_model(*bert_, bert_step(ids_, mask_, target_), options);
}

int64_t BenchWorkload::parameter_count() {
  int64_t n = 0;
  for (const auto& p : module().parameters()) {
    n += p.numel();
  }
  return n;
}

int64_t BenchWorkload::trainable_parameter_count() const {
  int64_t n = 0;
  for (const auto& p : trainable_) {
    n += p.numel();
  }
  return n;
}

int64_t BenchWorkload::weight_bytes() {
  return memory::breakdown(module(), nullptr, options_.device()).weights;
}

int64_t default_limit_bytes(c10::Device device) {
  return device.is_cpu() ? memory::physical_bytes() / 10 * 9 : 0;
}

nlohmann::json workload_json(BenchWorkload& w) {
  const auto& o = w.options();
  return {
      {"lora_rank", o.lora_rank()},
      {"trainable_parameters", w.trainable_parameter_count()},
      {"steps", o.steps()},
      {"warmup", o.warmup()},
      {"threads", torch::get_num_threads()},
      {"memory_limit_bytes", o.limit_bytes()},
      {"weight_bytes", w.weight_bytes()},
      {"seed", o.seed()},
      {"device", o.device().str()},
      {"device_name", describe_device(o.device())},
      // Where the byte counts of the runs come from.
      {"memory_source", o.device().is_cuda() ? "cuda caching allocator (allocated bytes)"
                                             : "remat counting CPU allocator"}};
}

void measure_schedule(BenchWorkload& w, plan::ScheduleCandidate& candidate, bool timed) {
  const auto& o = w.options();
  candidate.measured = true;
  w.module().zero_grad(/*set_to_none=*/true);
  try {
    w.set_policy(CheckpointPolicy::custom(candidate.schedule, candidate.name));
    const auto s = measured_step(
        w.module(), [&] { return w.loss(); },
        StepOptions()
            .device(o.device())
            .gradients(GradientReset::kNone)
            .seed(o.seed() + 1)
            .limit_bytes(o.limit_bytes())
            .autocast(w.config().autocast(o.device())));
    candidate.peak_bytes = std::max(candidate.peak_bytes, s.peak_bytes);
    if (timed) {
      candidate.times.push_back(s.step_seconds);
    }
  } catch (const c10::Error& e) {
    std::string what = first_line(e);
    candidate.ok = false;
    candidate.error = what;
  }
}

void measure_interleaved(
    BenchWorkload& w,
    const std::vector<plan::ScheduleCandidate*>& candidates) {
  const auto& o = w.options();
  for (int64_t round = 0; round < o.warmup() + o.steps(); ++round) {
    for (auto* cand : candidates) {
      if (cand->ok) {
        measure_schedule(w, *cand, round >= o.warmup());
      }
    }
  }
  w.module().zero_grad(/*set_to_none=*/true);
}

ReferenceGradients copy_gradients(const std::vector<torch::Tensor>& params) {
  ReferenceGradients out;
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

double max_abs_difference(const ReferenceGradients& a, const ReferenceGradients& b) {
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

void write_gradients(const std::string& path, const ReferenceGradients& grads) {
  std::ofstream f(path, std::ios::binary);
  const uint64_t n = grads.size();
  f.write(reinterpret_cast<const char*>(&n), sizeof(n));
  for (const auto& g : grads) {
    const uint64_t k = g.size();
    f.write(reinterpret_cast<const char*>(&k), sizeof(k));
    f.write(reinterpret_cast<const char*>(g.data()), static_cast<std::streamsize>(k * sizeof(float)));
  }
  TORCH_CHECK(static_cast<bool>(f), "remat::nn::write_gradients: cannot write the reference gradients to ", path);
}

ReferenceGradients read_gradients(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  TORCH_CHECK(static_cast<bool>(f), "remat::nn::read_gradients: cannot read reference gradients from ", path);
  uint64_t n = 0;
  f.read(reinterpret_cast<char*>(&n), sizeof(n));
  ReferenceGradients out;
  for (uint64_t i = 0; i < n && f; ++i) {
    uint64_t k = 0;
    f.read(reinterpret_cast<char*>(&k), sizeof(k));
    out.emplace_back(k);
    f.read(reinterpret_cast<char*>(out.back().data()), static_cast<std::streamsize>(k * sizeof(float)));
  }
  TORCH_CHECK(static_cast<bool>(f) && out.size() == n,
              "remat::nn::read_gradients: expected ", n, " reference gradients in ", path, ", but the file is short");
  return out;
}

nlohmann::json PolicyRun::to_json() const {
  const PolicyRun& r = *this;
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

PolicyRun PolicyRun::from_json(const nlohmann::json& j) {
  PolicyRun r;
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

PolicyRun run_policy(
    BenchWorkload& w,
    const CheckpointPolicy& policy,
    const ReferenceGradients* reference,
    ReferenceGradients* grads_out) {
  const auto& o = w.options();
  const auto dev = o.device();
  PolicyRun r;
  r.policy = policy.name();
  r.applied = policy;
  if (policy.kind() == CheckpointPolicy::Kind::kBudget) {
    // Planned before the timed steps, on this workload's own step (its loss,
    // its dtype), so that profiling counts in neither the time nor the peak.
    r.planned = true;
    r.budget = policy.budget_bytes();
    w.module().zero_grad(/*set_to_none=*/true);
    torch::manual_seed(o.seed() + 1);
    try {
      memory::LimitGuard guard(o.limit_bytes(), dev);
      AutocastScope autocast(
          AutocastState::bf16(dev, w.config().dtype() == c10::ScalarType::BFloat16));
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
  for (int64_t step = 0; step <= o.warmup(); ++step) {
    const bool measured = step == o.warmup();
    StepSample t;
    try {
      t = train_step(w);
    } catch (const c10::Error& e) {
      fail(r, e);
      // What was held when the failed step began: the weights alone.
      w.module().zero_grad(true);
      r.held_before_forward = memory::current_bytes(dev);
      r.peak = memory::peak_bytes(dev);
      return r;
    }
    if (measured) {
      r.forward_times.push_back(t.forward_seconds);
      r.times.push_back(t.step_seconds);
      r.held_before_forward = t.before_forward_bytes;
      r.held_before_backward = t.before_backward_bytes;
      r.held_after_backward = t.after_backward_bytes;
      r.peak = t.peak_bytes;
      auto grads = copy_gradients(w.trainable());
      if (reference != nullptr) {
        r.max_abs_grad_diff = max_abs_difference(*reference, grads);
      }
      if (grads_out != nullptr) {
        *grads_out = std::move(grads);
      }
    }
  }
  w.module().zero_grad(true);
  return r;
}

void time_interleaved(BenchWorkload& w, std::vector<PolicyRun>& runs) {
  for (int64_t round = 1; round < w.options().steps(); ++round) {
    for (auto& r : runs) {
      if (!r.ok) {
        continue;
      }
      w.set_policy(r.applied);
      try {
        const auto t = train_step(w);
        r.forward_times.push_back(t.forward_seconds);
        r.times.push_back(t.step_seconds);
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

std::vector<PolicyRun> run_policies(
    BenchWorkload& w,
    const std::vector<CheckpointPolicy>& policies,
    const ReferenceGradients* reference,
    ReferenceGradients* none_grads) {
  // none's gradients go straight where the caller wants them: no copy.
  ReferenceGradients own;
  ReferenceGradients* store = none_grads != nullptr ? none_grads : &own;
  const ReferenceGradients* compare_with = reference;
  std::vector<PolicyRun> runs;
  for (const auto& policy : policies) {
    const bool is_reference = !policy.enabled() && compare_with == nullptr;
    auto r = run_policy(w, policy, compare_with, is_reference ? store : nullptr);
    if (is_reference && r.ok) {
      compare_with = store;
      r.max_abs_grad_diff = 0;
    }
    runs.push_back(std::move(r));
  }
  time_interleaved(w, runs);
  return runs;
}

PolicyRounds::PolicyRounds(size_t policies, int64_t rounds)
    : rounds_(rounds),
      runs_(policies),
      started_(policies, false),
      round_medians_(policies) {
  TORCH_CHECK(rounds >= 1, "rounds: expected at least 1, but got ", rounds);
}

bool PolicyRounds::wants(size_t k) const {
  TORCH_CHECK(k < runs_.size(), "expected a policy index below ", runs_.size(), ", but got ", k);
  return !started_[k] || runs_[k].ok;
}

void PolicyRounds::add(size_t k, PolicyRun run) {
  TORCH_CHECK(wants(k), "policy ", k, " (", runs_[k].policy,
              ") failed in an earlier round; expected no more runs of it");
  if (!started_[k] || !run.ok) {
    if (!started_[k]) {
      round_medians_[k].push_back(run.step_seconds);
    }
    started_[k] = true;
    runs_[k] = std::move(run);
    return;
  }
  auto& first = runs_[k];
  first.times.insert(first.times.end(), run.times.begin(), run.times.end());
  first.forward_times.insert(
      first.forward_times.end(), run.forward_times.begin(), run.forward_times.end());
  round_medians_[k].push_back(run.step_seconds);
}

std::vector<PolicyRun> PolicyRounds::runs() const {
  auto runs = runs_;
  if (rounds_ <= 1) {
    return runs;
  }
  const PolicyRun* none = nullptr;
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
    if (!runs[k].ok || round_medians_[k].size() != round_medians_[none_index].size()) {
      continue;
    }
    for (size_t i = 0; i < round_medians_[k].size(); ++i) {
      runs[k].round_ratios.push_back(round_medians_[k][i] / round_medians_[none_index][i]);
    }
  }
  return runs;
}

} // namespace nn
} // namespace remat
