// The cost description of a model as a chain of stages, which is what the
// planner (remat/plan/solver.h) optimises over: the embeddings, each
// transformer layer, and the head with its loss.
//
// Every figure is per training step (one forward and one backward of one
// micro-batch). Sizes are bytes, times are seconds. A chain comes either from
// measuring a model (`profile`, below; remat/nn/profile.h builds the stages
// of remat's models) or from the analytic estimator (remat/plan/estimate.h).
//
// Conventions (the planner's memory model relies on them; see solver.h):
//   x_i  = output_bytes of stage i, the tensor a checkpoint keeps;
//   s_i  = stored_bytes, everything stage i keeps for its backward when run
//          normally, INCLUDING its output x_i and EXCLUDING its input (the
//          input is the previous stage's output and is counted there);
//   the gradient of x_i has the size of x_i.
//
// Example:
//   remat::plan::Chain chain;
//   chain.base_bytes = int64_t(2) << 30;  // weights, gradients, optimizer
//   chain.stages.push_back(remat::plan::StageCost("embeddings",
//       remat::plan::StageKind::kEmbedding).forward_seconds(0.001)
//       .backward_seconds(0.001).output_bytes(8 << 20).stored_bytes(8 << 20));
//   for (int i = 0; i < 12; ++i) {
//     chain.stages.push_back(remat::plan::StageCost("layer." +
//         std::to_string(i)).forward_seconds(0.01).backward_seconds(0.02)
//         .output_bytes(8 << 20).stored_bytes(120 << 20)
//         .recompute_attention(remat::plan::SelectiveCost(40 << 20, 0.002)));
//   }
//   chain.validate();
#pragma once

#include "remat/policy.h"

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/util/Optional.h>
#include <torch/arg.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace remat {
namespace plan {

/// Where a stage sits in the chain. Only layers can be checkpointed (a
/// remat::Schedule covers the layers); embeddings come first, heads last, and
/// both always run normally.
enum class StageKind {
  kEmbedding, ///< before the layers (token, position embeddings)
  kLayer,     ///< one transformer layer: what a Schedule segment covers
  kHead,      ///< after the layers (final norm, head, loss)
};

const char* to_string(StageKind kind);

/// What happens to the parameters' gradients of the previous step before a
/// step starts, which decides when a step holds them.
enum class GradientReset {
  kZero, ///< zeroed in place, allocated where missing: held for the whole
         ///< step (Chain::base_bytes counts them)
  kNone, ///< set to none (freed): stage i's gradients appear in its backward
         ///< and stay held to the end of the step (what remat's bench and
         ///< trainer run, and PyTorch 2's zero_grad() default)
};

const char* to_string(GradientReset reset);

/// The cost of running one layer in a partial mode (remat::partial_modes():
/// kRecomputeAttention, kRecomputeMlp, a per-op policy, compressed saves): it
/// keeps less, and pays for it in backward (a sub-block or the ops between
/// the kept ones run again; compressed saves are widened). The fields mean
/// what StageCost's do, measured with the layer in that mode.
///
/// Example:
///   auto cost = remat::plan::SelectiveCost(/*stored_bytes=*/40 << 20,
///                                          /*recompute_seconds=*/0.002)
///                   .backward_transient_bytes(90 << 20);
struct SelectiveCost {
  SelectiveCost(int64_t stored_bytes, double recompute_seconds)
      : stored_bytes_(stored_bytes), recompute_seconds_(recompute_seconds) {}
  /// Bytes the layer keeps for backward in this mode: its output, the inputs
  /// of the recomputed sub-block, and what the rest of the layer saves.
  TORCH_ARG(int64_t, stored_bytes);
  /// Seconds the mode adds to the layer's step (the sub-block's forward,
  /// run again in backward; for compressed saves, the casts).
  TORCH_ARG(double, recompute_seconds);
  /// Bytes above stored_bytes at the worst moment of the layer's forward.
  TORCH_ARG(int64_t, forward_transient_bytes) = 0;
  /// Bytes above stored_bytes and the output's and input's gradients at the
  /// worst moment of the layer's backward: this is where the recomputed
  /// sub-block's tensors live (and its parameters' gradients, which its
  /// checkpoint holds until it returns), so it is rarely small.
  TORCH_ARG(int64_t, backward_transient_bytes) = 0;
};

/// The cost of one stage.
///
/// How a profiler measures each field, with remat::memory counters and the
/// stage run alone on its real input (input held by the caller, grad on):
///   stored_bytes            = held after forward - held before (the output
///                             still referenced);
///   forward_transient_bytes = peak during forward - held after forward;
///   nograd_transient_bytes  = peak during a forward under NoGradGuard -
///                             held after it (the output referenced);
///   backward_transient_bytes= peak during backward - (held before backward
///                             + size of the output's gradient + size of the
///                             input's gradient);
///   parameter_gradient_bytes= sum of the stage's trainable parameters'
///                             gradient sizes;
///   group_backward_transient_bytes = as backward_transient_bytes, with the
///                             backward run as torch::autograd::grad over
///                             the input and parameters;
///   SelectiveCost fields    = the same, measured with the layer in that mode.
///
/// Example:
///   auto cost = remat::plan::StageCost("layer.3").forward_seconds(0.01)
///       .backward_seconds(0.02).output_bytes(8 << 20)
///       .stored_bytes(120 << 20).backward_transient_bytes(32 << 20);
struct StageCost {
  explicit StageCost(std::string name = "", StageKind kind = StageKind::kLayer)
      : name_(std::move(name)), kind_(kind) {}

  /// The cost in a partial `mode` (one of remat::partial_modes()), or
  /// nullopt when the stage does not offer it.
  c10::optional<SelectiveCost> selective(SegmentMode mode) const;
  /// Sets the cost in a partial `mode`; throws for kStore and kRecompute.
  StageCost& selective(SegmentMode mode, SelectiveCost cost);

  TORCH_ARG(std::string, name);
  TORCH_ARG(StageKind, kind);
  TORCH_ARG(double, forward_seconds) = 0;  ///< seconds, forward with grad on
  TORCH_ARG(double, backward_seconds) = 0; ///< seconds, its backward
  /// Bytes of the stage's output x_i: what a checkpoint boundary keeps, and
  /// the size of the gradient that flows into the stage in backward.
  TORCH_ARG(int64_t, output_bytes) = 0;
  /// Bytes the stage keeps for backward when run normally (kStore): every
  /// saved tensor it creates, plus its output; not its input. >= output_bytes.
  TORCH_ARG(int64_t, stored_bytes) = 0;
  /// Bytes above stored_bytes at the worst moment of the forward with grad
  /// on (run normally, or recomputed in backward): temporaries alive then.
  /// Often 0: most of a layer's temporaries die before it has saved all.
  TORCH_ARG(int64_t, forward_transient_bytes) = 0;
  /// Bytes above output_bytes at the worst moment of the forward with grad
  /// off (a checkpointed group's first pass): what is alive then besides
  /// the output.
  TORCH_ARG(int64_t, nograd_transient_bytes) = 0;
  /// Bytes of temporaries alive at the worst moment of the backward, on top of
  /// the stored bytes and the output's and the input's gradients.
  TORCH_ARG(int64_t, backward_transient_bytes) = 0;
  /// Bytes of the gradients of the stage's trainable parameters. Run
  /// normally, each is added into `.grad` (held in Chain::base_bytes) as soon
  /// as it is computed; in a checkpointed group, remat's checkpoint returns
  /// them all at once, so the group holds its layers' until its backward ends.
  TORCH_ARG(int64_t, parameter_gradient_bytes) = 0;
  /// Bytes of temporaries at the worst moment of the stage's backward when it
  /// runs inside a checkpointed group, on top of the stored bytes and the
  /// output's and input's gradients: there its parameters' gradients are
  /// returned rather than added into `.grad`, so they pile up as the
  /// backward goes. Measured as backward_transient_bytes, with the backward
  /// run as torch::autograd::grad over the input and the parameters. Unset:
  /// backward_transient_bytes + parameter_gradient_bytes (an upper bound).
  TORCH_ARG(c10::optional<int64_t>, group_backward_transient_bytes) = c10::nullopt;
  /// Costs of kRecomputeAttention / kRecomputeMlp; unset: mode not offered.
  TORCH_ARG(c10::optional<SelectiveCost>, recompute_attention) = c10::nullopt;
  TORCH_ARG(c10::optional<SelectiveCost>, recompute_mlp) = c10::nullopt;
  /// Costs of kSaveMatmuls / kSaveProjections / kCompress (measured by
  /// `profile` on any layer); unset: mode not offered.
  TORCH_ARG(c10::optional<SelectiveCost>, save_matmuls) = c10::nullopt;
  TORCH_ARG(c10::optional<SelectiveCost>, save_projections) = c10::nullopt;
  TORCH_ARG(c10::optional<SelectiveCost>, compress) = c10::nullopt;

};

/// A model as a chain of stages, and the memory held regardless of schedule.
///
/// Example: see the top of this file.
struct Chain {
  /// Embeddings first, then at least one layer, then heads.
  std::vector<StageCost> stages;
  /// Bytes held for the whole step whatever the schedule: weights, optimizer
  /// state, the input batch, and with GradientReset::kZero the gradients.
  int64_t base_bytes = 0;
  /// kNone: the parameters' gradients are not in base_bytes; each stage's
  /// parameter_gradient_bytes are held from its backward to the step's end.
  GradientReset gradients = GradientReset::kZero;
  /// Bytes a checkpointed group keeps from its forward until its backward
  /// has run, besides its input and output: remat's checkpoint saves the
  /// generator state for the recompute (5,056 bytes for the CPU generator).
  int64_t checkpoint_bytes = 0;

  /// Throws c10::Error naming the first stage that breaks the conventions
  /// above (order of kinds, negative figures, stored < output).
  void validate() const;
  int64_t num_layers() const;  ///< count of kLayer stages
  int64_t first_layer() const; ///< index in `stages` of the first layer
  /// A table of the stages, one line each, sizes for people.
  std::string str() const;
};

// ---------------------------------------------------------------------------
// Profiling a real model: the models (remat/nn/profile.h) describe their
// stages as StageRunners, and `profile` measures each one alone.

/// One stage of a real model, as a profiler needs it.
///
/// Example:
///   // given: remat::nn::Bert model(remat::nn::BertOptions().num_layers(4));
///   // given: torch::Tensor mask;  // additive [B, 1, 1, S], or undefined
///   remat::plan::StageRunner layer;
///   layer.name = "layer.0";
///   layer.forward = [&](const at::Tensor& h, remat::SegmentMode mode) {
///     return model->encoder->layers[0]->forward(h, mask, mode);
///   };
///   layer.modes = {remat::SegmentMode::kRecomputeAttention};
///   layer.parameters = model->encoder->layers[0]->parameters();
struct StageRunner {
  std::string name;
  StageKind kind = StageKind::kLayer;
  /// Runs the stage on the previous stage's output (for an embedding, the
  /// model input); `mode` is kStore or one of `modes`. A head returns the loss.
  std::function<at::Tensor(const at::Tensor& input, SegmentMode mode)> forward;
  /// The selective modes the stage's own forward runs (kRecomputeAttention,
  /// kRecomputeMlp). The modes of ProfileOptions::layer_modes are profile's
  /// own: it runs the stage in kStore under a checkpoint or a compression.
  std::vector<SegmentMode> modes;
  /// The stage's parameters. Those that require grad make up
  /// parameter_gradient_bytes; while profiling they hold zeroed gradients of
  /// the profiler's own (the caller's are put back afterwards).
  std::vector<at::Tensor> parameters;
  /// Optional; called before each run of the stage. Drops what an earlier
  /// run left outside the stage's output (an attention mask or rotary tables
  /// handed to the later stages), so that a new run's copy counts in this
  /// stage's stored bytes instead of replacing the old one unseen.
  std::function<void()> reset;
};

/// Options of `profile`.
///
/// Example:
///   auto options = remat::plan::ProfileOptions().warmup(1).repeats(5);
struct ProfileOptions {
  TORCH_ARG(int64_t, warmup) = 1;  ///< runs per stage and mode discarded
  TORCH_ARG(int64_t, repeats) = 3; ///< timed runs per stage and mode; the
                                   ///< median is kept
  /// Where the bytes are counted (remat::memory's counters for this device).
  TORCH_ARG(c10::Device, device) = c10::Device(c10::kCPU);
  /// Partial modes measured on every layer besides the stage's own `modes`,
  /// whatever the model: per-op policies by default. kCompress is lossy, so
  /// it is measured (and planned) only when asked for.
  TORCH_ARG(std::vector<SegmentMode>, layer_modes) =
      std::vector<SegmentMode>{SegmentMode::kSaveMatmuls, SegmentMode::kSaveProjections};
  /// The step the chain describes: gradients set to none (remat's bench and
  /// trainer) or zeroed and kept (a loop that zeroes them).
  TORCH_ARG(GradientReset, gradients) = GradientReset::kNone;
};

/// Measures each stage on `input` and returns its Chain (fields as
/// documented on StageCost).
///
/// Stage i runs alone, on the output of stage i - 1 (computed without grad,
/// then made a leaf that requires grad when the real output would), first in
/// `warmup + repeats` rounds that each run forward and backward in kStore, in
/// every selective mode the stage offers and, for a layer, in each of
/// `options.layer_modes()` (side by side, so that a noisy machine slows
/// them alike; a per-op mode runs the layer under a checkpoint with that op
/// policy, as remat::nn::run_stack does, and kCompress under bf16 saves), then a layer once more with its backward as
/// a checkpointed group runs it (torch::autograd::grad over the input and
/// parameters), then once under NoGradGuard. Sizes are exact
/// (remat::memory's counting allocator must be installed) and the largest
/// over the timed rounds; times are medians; a selective mode's
/// recompute_seconds is the median extra time of its rounds over kStore's
/// (0 when it is not slower).
///
/// With options.gradients() kZero every trainable parameter holds a gradient
/// during the step, as in a training loop that zeroes gradients rather than
/// dropping them, so base_bytes = the bytes held when `profile` is called,
/// plus the gradients of the stages' trainable parameters that have none
/// yet. With kNone (the default) the step frees them first, so base_bytes =
/// the bytes held when `profile` is called, less the stages' gradients held
/// then. Either way base_bytes adds what the last stage still holds when its
/// backward has returned while its output is referenced (the loss, its
/// gradient, and what the loss's graph keeps: a step holds them until its
/// backward ends). checkpoint_bytes is measured around a real
/// remat::checkpoint of a layer. The caller's
/// gradients and the default CPU generator's state are left as they were.
///
/// Example:
///   // given: std::vector<remat::plan::StageRunner> runners;  // as above
///   // given: torch::Tensor input_ids = torch::randint(30522, {8, 128});
///   auto chain = remat::plan::profile_stages(runners, input_ids);
///   auto plan = remat::plan::solve(chain, int64_t(2) << 30);
Chain profile_stages(
    const std::vector<StageRunner>& stages,
    const at::Tensor& input,
    const ProfileOptions& options = {});

} // namespace plan
} // namespace remat
