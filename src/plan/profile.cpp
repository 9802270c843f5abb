// plan::profile: measures a model's stages one at a time with remat's byte
// counters and a clock, and writes down the Chain the planner optimises over.
#include "remat/plan/chain.h"

#include "remat/rng_state.h"

#include "remat/checkpoint.h"
#include "remat/compress.h"
#include "remat/memory.h"
#include "remat/timing.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>
#include <torch/csrc/api/include/torch/cuda.h>
#include <torch/csrc/autograd/autograd.h>

#include <c10/util/Optional.h>

#include <algorithm>
#include <chrono>
#include <unordered_set>

namespace remat {
namespace plan {
namespace {

using Clock = std::chrono::steady_clock;

int64_t bytes_of(const at::Tensor& t) {
  return t.defined() ? static_cast<int64_t>(t.numel()) * t.element_size() : 0;
}

// One forward and backward of a stage in one mode.
struct Sample {
  int64_t output = 0;
  int64_t stored = 0;
  int64_t forward_transient = 0;
  int64_t backward_transient = 0;
  double forward_seconds = 0;
  double backward_seconds = 0;
  bool output_requires_grad = false;
  // Held after backward returned, above what was held before the forward,
  // with the output and its gradient still referenced (as a caller holds
  // the loss): the output, its gradient, and whatever the graph keeps alive
  // until the output dies.
  int64_t kept_after_backward = 0;
};

class Meter {
 public:
  explicit Meter(c10::Device device) : device_(device) {}

  int64_t held() const { return memory::current_bytes(device_); }
  int64_t peak() const { return memory::peak_bytes(device_); }
  void reset_peak() const { memory::reset_peak(device_); }
  // Kernels on a GPU run asynchronously; a time needs them finished.
  Clock::time_point now() const {
    if (device_.is_cuda()) {
      torch::cuda::synchronize(device_.index());
    }
    return Clock::now();
  }

 private:
  c10::Device device_;
};

double seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// The stage alone under a remat::checkpoint, as run_stack runs a layer it
// checkpoints; with a non-empty `ops`, keeping those ops' outputs.
at::Tensor checkpointed(const StageRunner& r, const at::Tensor& input, const OpPolicy& ops) {
  const auto forward = r.forward;
  auto options = CheckpointOptions().parameters(r.parameters).name(r.name);
  if (!ops.empty()) {
    options.op_policy(ops);
  }
  return checkpoint(
      [forward](const std::vector<at::Tensor>& in) {
        return std::vector<at::Tensor>{forward(in[0], SegmentMode::kStore)};
      },
      {input}, options)[0];
}

// The stage's output with it run in `mode`: the modes it offers itself
// through its forward, a per-op mode as run_stack runs it (checkpointed
// with the mode's op policy), kCompress under compressed saves (bf16).
at::Tensor forward_in(const StageRunner& r, const at::Tensor& input, SegmentMode mode) {
  const OpPolicy ops = op_policy_of(mode);
  if (!ops.empty()) {
    return checkpointed(r, input, ops);
  }
  if (mode == SegmentMode::kCompress) {
    const CompressedSavesGuard compressed(c10::kBFloat16);
    return r.forward(input, SegmentMode::kStore);
  }
  return r.forward(input, mode);
}

// `grouped`: backward as a checkpointed group runs it, with
// torch::autograd::grad returning the input's and parameters' gradients
// instead of adding them into `.grad`.
Sample run_once(
    const StageRunner& r,
    const at::Tensor& input,
    SegmentMode mode,
    const Meter& m,
    GradientReset gradients,
    bool grouped = false) {
  if (r.reset) {
    r.reset();
  }
  Sample s;
  const int64_t before = m.held();
  m.reset_peak();
  const auto t0 = m.now();
  at::Tensor out = forward_in(r, input, mode);
  const auto t1 = m.now();
  TORCH_CHECK(
      out.defined(), "remat::plan::profile_stages: expected stage '", r.name,
      "' to return a defined tensor, but it returned an undefined one");
  const int64_t after = m.held();
  s.output = bytes_of(out);
  s.stored = after - before;
  s.forward_transient = std::max<int64_t>(0, m.peak() - after);
  s.forward_seconds = seconds(t0, t1);
  s.output_requires_grad = out.requires_grad();
  if (out.requires_grad()) {
    // The gradient that the next stage would hand back.
    at::Tensor grad = at::ones_like(out, at::MemoryFormat::Contiguous);
    const int64_t held = m.held();
    m.reset_peak();
    const auto t2 = m.now();
    if (grouped) {
      std::vector<at::Tensor> targets;
      if (input.requires_grad()) {
        targets.push_back(input);
      }
      for (const auto& p : r.parameters) {
        if (p.defined() && p.requires_grad()) {
          targets.push_back(p);
        }
      }
      if (!targets.empty()) {
        torch::autograd::grad({out}, targets, {grad}, /*retain_graph=*/false,
                              /*create_graph=*/false, /*allow_unused=*/true);
      }
    } else {
      torch::autograd::backward({out}, {grad});
    }
    const auto t3 = m.now();
    // The input's gradient is the planner's own term, not a transient.
    const int64_t input_grad = input.requires_grad() ? bytes_of(input) : 0;
    s.backward_transient = std::max<int64_t>(0, m.peak() - held - input_grad);
    s.backward_seconds = seconds(t2, t3);
    if (gradients == GradientReset::kNone) {
      // The step keeps them (the planner counts them from here on); the next
      // run starts without them again.
      for (const auto& p : r.parameters) {
        if (p.defined() && p.grad().defined()) {
          const_cast<at::Tensor&>(p).mutable_grad().reset();
        }
      }
    }
    s.kept_after_backward = std::max<int64_t>(0, m.held() - before - input_grad);
  }
  if (input.requires_grad()) {
    const_cast<at::Tensor&>(input).mutable_grad().reset();
  }
  return s;
}

// Gives every trainable parameter a gradient of the profiler's own for the
// duration: zeroed (kZero, as a training loop that zeroes gradients holds
// them) or none (kNone, as a step that frees them starts); puts the caller's
// (possibly none) back afterwards.
class GradientSwap {
 public:
  GradientSwap(const std::vector<StageRunner>& stages, GradientReset reset) {
    std::unordered_set<const c10::TensorImpl*> seen;
    for (const auto& st : stages) {
      for (const auto& p : st.parameters) {
        if (!p.defined() || !p.requires_grad() ||
            !seen.insert(p.unsafeGetTensorImpl()).second) {
          continue;
        }
        params_.push_back(p);
        saved_.push_back(p.grad());
        (p.grad().defined() ? present_bytes_ : missing_bytes_) += bytes_of(p);
      }
    }
    for (auto& p : params_) {
      p.mutable_grad() = reset == GradientReset::kZero ? at::zeros_like(p) : at::Tensor();
    }
  }
  ~GradientSwap() {
    for (size_t i = 0; i < params_.size(); ++i) {
      params_[i].mutable_grad() = saved_[i];
    }
  }
  GradientSwap(const GradientSwap&) = delete;
  GradientSwap& operator=(const GradientSwap&) = delete;

  /// Bytes of the gradients the caller had not allocated yet.
  int64_t missing_bytes() const { return missing_bytes_; }
  /// Bytes of the gradients the caller held.
  int64_t present_bytes() const { return present_bytes_; }

 private:
  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> saved_;
  int64_t missing_bytes_ = 0;
  int64_t present_bytes_ = 0;
};

bool is_selective(SegmentMode mode) {
  return mode == SegmentMode::kRecomputeAttention || mode == SegmentMode::kRecomputeMlp;
}

bool is_partial(SegmentMode mode) {
  const auto& all = partial_modes();
  return std::find(all.begin(), all.end(), mode) != all.end();
}

// Every argument checked before anything runs.
void check_profile_inputs(
    const std::vector<StageRunner>& stages,
    const at::Tensor& input,
    const ProfileOptions& options) {
  TORCH_CHECK(
      !stages.empty(), "remat::plan::profile_stages: expected at least one stage, but got none");
  TORCH_CHECK(
      input.defined(), "remat::plan::profile_stages: expected a defined input, but got an undefined one");
  TORCH_CHECK(
      options.warmup() >= 0 && options.repeats() >= 1,
      "remat::plan::profile_stages: expected warmup >= 0 and repeats >= 1, but got warmup ",
      options.warmup(), " and repeats ", options.repeats());
  TORCH_CHECK(
      options.device().is_cpu() || options.device().is_cuda(),
      "remat::plan::profile_stages: expected a CPU or CUDA device, but got ", options.device());
  TORCH_CHECK(
      !options.device().is_cpu() || memory::installed(),
      "remat::plan::profile_stages: expected remat::memory::install() to have run (the "
      "profiler reads its byte counters), but it has not");
  for (auto mode : options.layer_modes()) {
    TORCH_CHECK(
        is_partial(mode) && !is_selective(mode),
        "remat::plan::profile_stages: expected layer modes that profile runs itself (save-matmuls, "
        "save-projections, compress), but got ", to_string(mode));
  }
  for (const auto& st : stages) {
    TORCH_CHECK(
        static_cast<bool>(st.forward), "remat::plan::profile_stages: expected stage '", st.name,
        "' to have a forward function, but it has none");
    for (auto mode : st.modes) {
      TORCH_CHECK(
          is_selective(mode) && st.kind == StageKind::kLayer,
          "remat::plan::profile_stages: expected selective modes only on layers, but stage '",
          st.name, "' (", to_string(st.kind), ") offers ", to_string(mode));
    }
  }
}

// The modes a stage is profiled in: kStore, its own selective modes, and
// for a layer the modes the options add.
std::vector<SegmentMode> modes_of(const StageRunner& st, const ProfileOptions& options) {
  std::vector<SegmentMode> modes{SegmentMode::kStore};
  modes.insert(modes.end(), st.modes.begin(), st.modes.end());
  if (st.kind == StageKind::kLayer) {
    for (auto mode : options.layer_modes()) {
      if (std::find(modes.begin(), modes.end(), mode) == modes.end()) {
        modes.push_back(mode);
      }
    }
  }
  return modes;
}

int64_t largest(const std::vector<Sample>& v, int64_t Sample::*field) {
  int64_t m = 0;
  for (const auto& s : v) {
    m = std::max(m, s.*field);
  }
  return m;
}

double median_total_seconds(const std::vector<Sample>& v) {
  std::vector<double> t;
  for (const auto& s : v) {
    t.push_back(s.forward_seconds + s.backward_seconds);
  }
  return median(t);
}

// A stage's cost from its samples, samples[k] in modes[k] (modes[0] is
// kStore); a layer is also run once as a checkpointed group's backward.
StageCost cost_of(
    const StageRunner& st,
    const at::Tensor& x,
    const std::vector<SegmentMode>& modes,
    const std::vector<std::vector<Sample>>& samples,
    const Meter& meter,
    const ProfileOptions& options) {
  const auto& base = samples[0];
  std::vector<double> fwd, bwd;
  for (const auto& s : base) {
    fwd.push_back(s.forward_seconds);
    bwd.push_back(s.backward_seconds);
  }
  StageCost cost(st.name, st.kind);
  cost.forward_seconds(median(fwd))
      .backward_seconds(median(bwd))
      .output_bytes(largest(base, &Sample::output))
      .stored_bytes(std::max(largest(base, &Sample::stored), largest(base, &Sample::output)))
      .forward_transient_bytes(largest(base, &Sample::forward_transient))
      .backward_transient_bytes(largest(base, &Sample::backward_transient));
  int64_t param_grads = 0;
  std::unordered_set<const c10::TensorImpl*> seen;
  for (const auto& p : st.parameters) {
    if (p.defined() && p.requires_grad() && seen.insert(p.unsafeGetTensorImpl()).second) {
      param_grads += bytes_of(p);
    }
  }
  cost.parameter_gradient_bytes(param_grads);
  if (st.kind == StageKind::kLayer) {
    cost.group_backward_transient_bytes(
        run_once(st, x, SegmentMode::kStore, meter, options.gradients(), /*grouped=*/true)
            .backward_transient);
  }
  const double store_seconds = median_total_seconds(base);
  // A recompute runs ops a second time, so it is never free. Where it costs
  // less than the noise (checkpointed_attention's lean recompute of a small
  // layer), a difference <= 0 would make it tie with storing, and the
  // solver breaks ties by memory: a budget that storing fits would get a
  // recompute on some runs and not on others. A nanosecond keeps storing
  // ahead on such ties and changes no step time anyone can see.
  constexpr double kLeastRecomputeSeconds = 1e-9;
  for (size_t k = 1; k < modes.size(); ++k) {
    const auto& v = samples[k];
    auto sel = SelectiveCost(
                   std::max(largest(v, &Sample::stored), cost.output_bytes()),
                   std::max(kLeastRecomputeSeconds, median_total_seconds(v) - store_seconds))
                   .forward_transient_bytes(largest(v, &Sample::forward_transient))
                   .backward_transient_bytes(largest(v, &Sample::backward_transient));
    cost.selective(modes[k], sel);
  }
  return cost;
}

// The stage once more without grad, as a checkpointed group's first pass
// runs it (a layer: inside a real checkpoint, which also tells what the
// checkpoint itself keeps, into chain.checkpoint_bytes); sets the cost's
// no-grad transient bytes. Returns its output, the next stage's input.
at::Tensor run_without_grad(
    const StageRunner& st,
    const at::Tensor& x,
    const Meter& meter,
    StageCost& cost,
    Chain& chain) {
  if (st.reset) {
    st.reset();
  }
  const bool grouped = st.kind == StageKind::kLayer;
  c10::optional<at::NoGradGuard> no_grad;
  if (!grouped) {
    no_grad.emplace();
  }
  const int64_t before = meter.held();
  meter.reset_peak();
  at::Tensor out = grouped ? checkpointed(st, x, OpPolicy()) : st.forward(x, SegmentMode::kStore);
  const int64_t after = meter.held();
  const int64_t kept = std::max<int64_t>(0, after - before - bytes_of(out));
  if (grouped) {
    chain.checkpoint_bytes = std::max(chain.checkpoint_bytes, kept);
  }
  cost.nograd_transient_bytes(
      std::max<int64_t>(0, meter.peak() - before - kept - cost.output_bytes()));
  return out;
}

} // namespace

Chain profile_stages(
    const std::vector<StageRunner>& stages,
    const at::Tensor& input,
    const ProfileOptions& options) {
  check_profile_inputs(stages, input, options);
  c10::AutoGradMode grad_on(true);
  const Meter meter(options.device());
  const int64_t held_at_start = meter.held();
  // Dropout in the stages draws random numbers; the caller's sequence must
  // not depend on whether it profiled first.
  const RngScope keep_generators(RngState::capture(std::vector<torch::Tensor>{}));
  GradientSwap grads(stages, options.gradients());

  Chain chain;
  chain.gradients = options.gradients();
  chain.base_bytes = options.gradients() == GradientReset::kZero
      ? held_at_start + grads.missing_bytes()
      : held_at_start - grads.present_bytes();
  at::Tensor x = input;
  int64_t kept_by_last = 0;
  for (const auto& st : stages) {
    const auto modes = modes_of(st, options);
    std::vector<std::vector<Sample>> samples(modes.size());
    for (int64_t round = 0; round < options.warmup() + options.repeats(); ++round) {
      for (size_t k = 0; k < modes.size(); ++k) {
        auto s = run_once(st, x, modes[k], meter, options.gradients());
        if (round >= options.warmup()) {
          samples[k].push_back(s);
        }
      }
    }
    auto cost = cost_of(st, x, modes, samples, meter, options);
    const auto out = run_without_grad(st, x, meter, cost, chain);
    chain.stages.push_back(cost);
    kept_by_last = largest(samples[0], &Sample::kept_after_backward);
    x = out.detach();
    if (samples[0].front().output_requires_grad && x.is_floating_point()) {
      x.requires_grad_(true);
    }
  }
  // The caller holds the loss until backward returns, autograd the gradient
  // it seeds backward with, and the loss's graph whatever its unfinished
  // nodes saved (a mean squared error keeps a tensor of its input's size):
  // bytes held past the head's backward, where the chain no longer counts
  // the head. In the base, so that no schedule's peak is predicted below
  // what runs (at the cost of counting them during the forward too).
  chain.base_bytes += kept_by_last;
  chain.validate();
  return chain;
}

} // namespace plan
} // namespace remat
