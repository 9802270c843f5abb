// Checkpoint policies compared on one model: the same weights, batch and
// dropout masks under each policy, with exact bytes, the largest gradient
// difference to a reference run (none), and step times taken in interleaved
// rounds so that a noisy machine slows every policy alike. `remat bench` is
// flags and printing over this; `remat plan --measure` measures its
// schedules (remat/plan/compare.h) on the same workload.
//
// Example:
//   remat::memory::install();
//   auto config = remat::nn::ModelConfig().layers(4).hidden(128).seq(128);
//   remat::nn::BenchWorkload w(config, remat::nn::BenchOptions().steps(3));
//   remat::nn::ReferenceGradients none_grads;
//   std::vector<remat::nn::PolicyRun> runs{
//       remat::nn::run_policy(w, remat::CheckpointPolicy::none(), nullptr,
//                             &none_grads),
//       remat::nn::run_policy(w, remat::CheckpointPolicy::every_layer(),
//                             &none_grads)};
//   remat::nn::time_interleaved(w, runs);
//   std::cout << remat::nn::policy_table(runs);
#pragma once

#include "remat/nn/bert.h"
#include "remat/nn/llama.h"
#include "remat/nn/model_config.h"
#include "remat/plan/compare.h"
#include "remat/plan/solver.h"
#include "remat/policy.h"

#include <c10/core/Device.h>
#include <nlohmann/json.hpp>
#include <torch/arg.h>

#include <cstdint>
#include <string>
#include <vector>

namespace remat {
namespace nn {

/// How policies are compared.
struct BenchOptions {
  /// Where the model runs; built on the CPU from `seed`, then moved, so the
  /// weights are the same on every device.
  TORCH_ARG(c10::Device, device) = c10::kCPU;
  TORCH_ARG(uint64_t, seed) = 0;
  TORCH_ARG(int64_t, warmup) = 1;  ///< untimed steps per policy
  TORCH_ARG(int64_t, steps) = 3;   ///< timed steps per policy
  /// Bytes a step may hold (remat::memory::LimitGuard); 0: no limit.
  TORCH_ARG(int64_t, limit_bytes) = 0;
  /// LoRA rank; 0 trains every weight.
  TORCH_ARG(int64_t, lora_rank) = 0;
  TORCH_ARG(double, lora_alpha) = 0; ///< 0: 2 x rank
  /// Projections with adapters; empty: the attention projections.
  TORCH_ARG(std::vector<std::string>, lora_targets) = {};
};

/// A model, its batch and the loss of its training step. A BERT encoder
/// regresses its last hidden state onto a fixed random target (a mean of the
/// hidden state has an almost zero gradient through the final LayerNorm:
/// useless for comparing gradients); a Llama predicts the next token of
/// random tokens. With dtype bf16 the weights stay float32 and forward and
/// loss run under bf16 autocast (ModelConfig::autocast), the profile of
/// plan() and profile() too.
class BenchWorkload {
 public:
  /// Throws remat::FieldError("lora_targets") when a target matches nothing.
  BenchWorkload(const ModelConfig& config, const BenchOptions& options);

  torch::Tensor loss();
  void set_policy(const CheckpointPolicy& policy);
  torch::nn::Module& module();
  /// Profiles this step and plans it to `budget_bytes` (total bytes);
  /// throws, naming the smallest feasible budget, when nothing fits.
  plan::Plan plan(int64_t budget_bytes);
  /// This step's measured cost chain (remat::nn::profile_model), under the
  /// config's autocast. The model's policy and gradients are left as they were.
  plan::Chain profile(const plan::ProfileOptions& options = {});
  /// Parameters of the model (trainable or not).
  int64_t parameter_count();
  /// Elements of what receives gradients (trainable()).
  int64_t trainable_parameter_count() const;
  /// Bytes of the model's weights on its device (memory::breakdown).
  int64_t weight_bytes();
  /// What receives gradients.
  const std::vector<torch::Tensor>& trainable() const {
    return trainable_;
  }
  const ModelConfig& config() const {
    return config_;
  }
  const BenchOptions& options() const {
    return options_;
  }

 private:
  ModelConfig config_;
  BenchOptions options_;
  Bert bert_{nullptr};
  Llama llama_{nullptr};
  torch::Tensor ids_, mask_, target_;
  std::vector<torch::Tensor> trainable_;
};

/// Bytes a policy may hold on `device` when the caller sets no limit: 90%
/// of physical memory on the CPU (a policy that does not fit then fails
/// cleanly rather than meeting the kernel's OOM killer); 0, no limit, on a
/// GPU (its caching allocator throws c10::OutOfMemoryError at its size).
int64_t default_limit_bytes(c10::Device device);

/// What `remat bench --json` writes of the workload under "config": the
/// trainable parameters, weight bytes, steps, warm-up, threads, limit
/// (bytes), seed, LoRA rank, device, and where the byte counts come from.
nlohmann::json workload_json(BenchWorkload& w);

/// Gradients of a reference run, kept outside remat's allocator so that they
/// count against neither the bytes nor the limit of the runs compared with
/// them: one float vector per trainable parameter.
using ReferenceGradients = std::vector<std::vector<float>>;
ReferenceGradients copy_gradients(const std::vector<torch::Tensor>& params);
/// The largest |a - b| over all elements; infinity when the shapes differ.
double max_abs_difference(const ReferenceGradients& a, const ReferenceGradients& b);
/// The file format between processes: the count of tensors, then each one's
/// element count (uint64) and floats. Throw c10::Error naming the path.
void write_gradients(const std::string& path, const ReferenceGradients& grads);
ReferenceGradients read_gradients(const std::string& path);

/// One policy's figures. Sizes in bytes, times in seconds.
struct PolicyRun {
  std::string policy;
  bool ok = true;
  bool out_of_memory = false;
  std::string error;
  int64_t held_before_forward = 0;
  int64_t held_before_backward = 0;
  int64_t held_after_backward = 0;
  int64_t peak = 0;
  double step_seconds = 0;        ///< median
  double forward_seconds = 0;     ///< median forward + loss
  double max_abs_grad_diff = -1;  ///< -1: no reference to compare with
  // A budget policy: the schedule the planner chose and what it predicted.
  bool planned = false;
  std::string schedule;
  int64_t budget = 0;
  int64_t predicted_peak = 0;
  double predicted_step_seconds = 0;
  CheckpointPolicy applied;       ///< what the timed rounds set on the model
  std::vector<double> times, forward_times; ///< one per timed step
  /// Runs in separate processes, several rounds: per round, the median step
  /// of this policy over none's median step in the same round.
  std::vector<double> round_ratios;

  nlohmann::json to_json() const;
  static PolicyRun from_json(const nlohmann::json& j);
};

/// Warm-up steps, then one step whose bytes and gradients are measured (and
/// whose time is the first sample) under `policy` (a budget policy is
/// planned first, on this step). Gradients are compared with `reference`
/// when given, and copied to `grads_out` when given. A failure (out of
/// memory included) is recorded in the result, not thrown.
PolicyRun run_policy(
    BenchWorkload& w,
    const CheckpointPolicy& policy,
    const ReferenceGradients* reference = nullptr,
    ReferenceGradients* grads_out = nullptr);

/// The remaining steps - 1 timed steps of every run that succeeded, in
/// rounds of one step each; then each run's medians.
void time_interleaved(BenchWorkload& w, std::vector<PolicyRun>& runs);

/// Each of `policies` in turn (run_policy), then their remaining timed
/// steps (time_interleaved). With a `reference` (none's gradients from
/// another process) every run is compared with it; without one, the first
/// `none` that succeeds is the reference of the runs after it (its own
/// difference 0), and its gradients are left in `none_grads` when given.
/// Put `none` first to compare every policy with it.
///
/// Example:
///   // given: remat::nn::BenchWorkload w(remat::nn::ModelConfig(), {});
///   remat::nn::ReferenceGradients none_grads;
///   auto runs = remat::nn::run_policies(w,
///       {remat::CheckpointPolicy::none(),
///        remat::CheckpointPolicy::every_layer()},
///       nullptr, &none_grads);
std::vector<PolicyRun> run_policies(
    BenchWorkload& w,
    const std::vector<CheckpointPolicy>& policies,
    const ReferenceGradients* reference = nullptr,
    ReferenceGradients* none_grads = nullptr);

/// The runs of the same policies over several rounds (--rounds, each run in
/// a process of its own), pooled: a policy's step samples of every round
/// together, its bytes the first round's (they repeat exactly), and per
/// round its median step over none's median step of that round
/// (PolicyRun::round_ratios), so that a machine whose speed drifts is seen
/// in the ratios rather than charged to one policy. A policy that fails in
/// a round is that failure from then on.
///
/// Example:
///   // given: std::vector<remat::CheckpointPolicy> policies;
///   // given: int64_t rounds = 3;
///   // given: std::function<remat::nn::PolicyRun(size_t)> run_in_own_process;
///   remat::nn::PolicyRounds pool(policies.size(), rounds);
///   for (int64_t round = 0; round < rounds; ++round)
///     for (size_t k = 0; k < policies.size(); ++k)
///       if (pool.wants(k)) pool.add(k, run_in_own_process(k));
///   std::cout << remat::nn::policy_table(pool.runs());
class PolicyRounds {
 public:
  /// `policies` runs per round, `rounds` >= 1 rounds.
  PolicyRounds(size_t policies, int64_t rounds);

  /// Whether policy `k` is still to run: it has not failed (a failure
  /// repeats itself in every later round).
  bool wants(size_t k) const;
  /// Policy `k`'s run in the next round of its own.
  void add(size_t k, PolicyRun run);
  /// The pooled runs, in the order of the policies: with more than one
  /// round, medians (seconds) over the pooled samples and the ratios to
  /// none's round medians (when none ran in as many rounds).
  std::vector<PolicyRun> runs() const;

 private:
  int64_t rounds_;
  std::vector<PolicyRun> runs_;
  std::vector<bool> started_;
  std::vector<std::vector<double>> round_medians_; ///< seconds, per round
};

/// One training step of `w` under `candidate.schedule` as the planner
/// predicts it: gradients dropped, then zeroed in place (allocated), forward
/// and loss under the config's autocast, the dropout masks of seed + 1, at
/// most options().limit_bytes. Its peak (bytes) and, when `timed`, its time
/// (seconds) are added to the candidate; a failure (out of memory included)
/// is recorded in it, not thrown.
void measure_schedule(BenchWorkload& w, plan::ScheduleCandidate& candidate, bool timed);

/// options().warmup() + options().steps() rounds, each candidate that has
/// not failed stepping once per round (the warm-up rounds untimed), so that
/// a machine whose load changes slows them alike. Leaves no gradients.
void measure_interleaved(
    BenchWorkload& w,
    const std::vector<plan::ScheduleCandidate*>& candidates);

/// The runs as a table (MiB, seconds, ratio to none), then planned
/// schedules, per-round ratios and errors, one line each.
std::string policy_table(const std::vector<PolicyRun>& runs);

} // namespace nn
} // namespace remat
