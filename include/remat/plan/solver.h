// The checkpoint planner: for a Chain (remat/plan/chain.h) and a memory budget,
// the remat::Schedule with the shortest predicted step whose predicted peak
// fits the budget; and evaluators that predict peak and time for any schedule.
//
// The schedules considered are exactly those remat executes: the layers split
// into contiguous segments, each either
//   - run normally layer by layer, each layer kStore, kRecomputeAttention or
//     kRecomputeMlp, or
//   - one checkpointed group (kRecompute): keeps only its input, and in
//     backward recomputes all its layers, then backpropagates through them.
// Embedding and head stages always run normally.
//
// Memory model. Per stage i: x = output_bytes, s = stored_bytes, f / g / b
// = forward / no-grad / backward transient bytes, p = parameter gradient
// bytes; for a layer in selective mode m, s_m, f_m, b_m from its
// SelectiveCost (for kStore, s_m = s, f_m = f, b_m = b). All in bytes.
// `held` starts at chain.base_bytes; the peak is the largest `held + extra`
// over these events:
//   forward, stage i run normally in mode m: extra s_m + f_m; held += s_m;
//   forward, checkpointed group [a, b), grad off, for each i in it:
//     extra c + (i > a ? x_{i-1} : 0) + x_i + g_i;  then held += x_{b-1} + c
//     (c = chain.checkpoint_bytes, what the checkpoint itself keeps until
//     its backward ends);
//   backward starts holding the loss gradient: held += x_last;
//   backward of a stage i run normally (held includes s_m and grad x_i):
//     extra x_{i-1} + b_m; then held -= s_m + x_i, held += x_{i-1};
//   backward of a group [a, b) (held includes x_{b-1} and its gradient):
//     the old output is released: held -= x_{b-1};
//     recompute, grad on, i = a..b-1: extra acc + s_i + f_i, acc += s_i;
//     then layers i = b-1..a: extra x_{i-1} + B_i + (p_{i+1} + ... + p_{b-1})
//     (parameter gradients, which remat's checkpoint returns all at once;
//     B_i = group_backward_transient_bytes, which counts layer i's own as
//     they appear, or b_i + p_i where unset), plus for i < b-1 the gradient
//     of x_i and the recomputed x_{b-1} (the checkpoint holds it until it
//     returns); held -= s_i;
//     at return: extra x_{b-1} + x_{a-1} + (p_a + ... + p_{b-1}); then the
//     group's incoming gradient and c are freed and x_{a-1}'s is held.
// The gradient of the first stage's input (token ids) is 0 bytes. Where the
// model simplifies, it errs high: a stage's output counts as held until the
// stage's own backward (autograd frees it one stage earlier), and both its
// gradients count for the whole of its backward. Memory an allocator caches
// but no tensor holds is not modelled. On remat's BERT (CPU, counting
// allocator) the estimator's chains predict measured peaks within 1%
// (docs/estimate.md).
//
// Time model (seconds): a stage run normally costs forward + backward
// seconds, plus the selective recompute_seconds in a selective mode; a layer
// in a checkpointed group costs 2 x forward + backward.
//
// The planner is Rotor's dynamic programme (Beaumont et al. 2019) restricted
// to one checkpoint level: over suffixes of the chain it keeps the Pareto
// front of (memory needed, time); exact, no memory discretisation unless
// PlannerOptions::memory_resolution_bytes asks for it. Cost: about
// stages^2 x front size; a 160-layer chain of identical sizes with noisy
// times solves in well under a second, chains whose every size differs take
// longer (80 layers with +-20% noise on every figure: ~0.4 s).
//
// What the planner assumes of the model's execution (remat::nn's stack runs
// schedules this way): a kRecompute segment is one remat::checkpoint over its
// layers, whose saved input is the previous segment's output; the autograd
// engine runs the segments' backwards last to first; a selective mode is a
// nested checkpoint inside the layer.
//
// Example:
//   // given: auto spec = remat::plan::ModelSpec::llama2_7b().seq(4096);
//   // given: remat::nn::Llama model(remat::nn::LlamaOptions().num_layers(32));
//   auto chain = remat::plan::estimate_chain(spec);         // or profile(...)
//   auto plan = remat::plan::solve(chain, 40LL << 30);      // 40 GiB
//   model->gradient_checkpointing_enable(
//       remat::CheckpointPolicy::custom(plan.schedule, "budget:40GiB"));
//   std::cout << plan.str() << "\n";
//   // Fixed policies side by side:
//   auto every = remat::CheckpointPolicy::every_layer()
//                    .schedule(chain.num_layers());
//   std::cout << remat::plan::predicted_peak_bytes(chain, every) << " bytes, "
//             << remat::plan::predicted_step_seconds(chain, every) << " s\n";
#pragma once

#include "remat/plan/chain.h"
#include "remat/policy.h"

#include <nlohmann/json.hpp>
#include <torch/arg.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace remat {
namespace plan {

/// Predicted cost of one schedule on one chain.
struct Evaluation {
  int64_t peak_bytes = 0;         ///< bytes, including chain.base_bytes
  double step_seconds = 0;        ///< seconds, forward + backward + recompute
  int64_t activation_bytes = 0;   ///< bytes held at the end of forward, above
                                  ///< chain.base_bytes
  std::string peak_event;         ///< where the peak happens, for people
};

/// Evaluates `schedule` (over the chain's layers) under the model above.
/// Throws if the schedule does not cover the layers, or uses a selective mode
/// on a layer that does not offer it.
Evaluation evaluate(const Chain& chain, const Schedule& schedule);
/// Predicted peak bytes of `schedule` (evaluate(...).peak_bytes).
int64_t predicted_peak_bytes(const Chain& chain, const Schedule& schedule);
/// Predicted step seconds of `schedule` (evaluate(...).step_seconds).
double predicted_step_seconds(const Chain& chain, const Schedule& schedule);

/// What the planner may choose.
///
/// Example:
///   auto options = remat::plan::PlannerOptions().selective(false);
struct PlannerOptions {
  /// Consider the partial modes (remat::partial_modes(): selective, per-op,
  /// compressed) where a stage offers them.
  TORCH_ARG(bool, selective) = true;
  /// Consider checkpointed groups (kRecompute).
  TORCH_ARG(bool, recompute) = true;
  /// 0: exact. Otherwise memory figures are rounded up to a multiple of this
  /// many bytes inside the search, so that near-equal figures (measured sizes
  /// that differ a little from layer to layer) coincide and the search keeps
  /// fewer candidates. Plans stay within budget and may be slightly slower
  /// than the optimum; the reported peak and time are exact.
  TORCH_ARG(int64_t, memory_resolution_bytes) = 0;
};

/// A schedule chosen by the planner and its predicted cost.
struct Plan {
  Schedule schedule;                    ///< over the chain's layers
  std::vector<SegmentMode> stage_modes; ///< per chain stage; embeddings and
                                        ///< heads are kStore
  int64_t peak_bytes = 0;               ///< bytes, predicted
  double step_seconds = 0;              ///< seconds, predicted
  int64_t activation_bytes = 0;         ///< bytes held after forward, above base
  /// "recompute[0,4) store[4,12): peak 1.20 GiB, 0.532 s"
  std::string str() const;
};

/// The smallest budget (bytes) any executable schedule fits in.
int64_t min_feasible_budget(
    const Chain& chain,
    const PlannerOptions& options = {});

/// The fastest schedule whose predicted peak is <= `budget_bytes`. Throws
/// c10::Error giving the smallest feasible budget (bytes and human-readable)
/// when `budget_bytes` is below it.
Plan solve(
    const Chain& chain,
    int64_t budget_bytes,
    const PlannerOptions& options = {});

/// Every Pareto-optimal plan, by peak ascending (time descending): the
/// memory/time trade-off curve of the chain.
std::vector<Plan> frontier(
    const Chain& chain,
    const PlannerOptions& options = {});

/// The schedules of the fixed policies on `layers` layers, by name: none,
/// every-K (K <= 4, or K dividing `layers`), sqrt, full, selective-attention,
/// selective-mlp, save-matmuls, save-projections. What a plan is compared with
/// (those whose modes a chain does not offer are left out by the comparison).
std::vector<std::pair<std::string, Schedule>> fixed_policy_schedules(int64_t layers);

/// Stage by stage, what `schedule` keeps and recomputes on `chain`, one
/// line each: "  layer.0 .. layer.3         checkpointed as one group: ...".
std::vector<std::string> describe_schedule(const Chain& chain, const Schedule& schedule);

/// `chain` as JSON: base and checkpoint bytes, and each stage's costs
/// (seconds, bytes) with its selective modes.
nlohmann::json chain_json(const Chain& chain);

} // namespace plan
} // namespace remat
