// Checkpoint policies: which layers of a stack keep their activations and
// which recompute them. One type for every model, `remat bench --policy` and
// training.
//
// A policy turns into a Schedule for a stack of L layers: contiguous segments
// covering [0, L), each with a mode.
//
// Example:
//   auto policy = remat::CheckpointPolicy::parse("every-2");
//   for (const auto& seg : policy.schedule(12).segments) {
//     // seg.begin, seg.end, seg.mode
//   }
#pragma once

#include "remat/checkpoint.h"

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace remat {

/// What a segment of layers keeps for backward.
enum class SegmentMode {
  kStore,              ///< no checkpointing: keep every activation
  kRecompute,          ///< keep only the segment's input; recompute it all
  kRecomputeAttention, ///< per layer, recompute only the attention core
                       ///< (scores, softmax, dropout, weighted sum)
  kRecomputeMlp,       ///< per layer, recompute only the MLP
  kSaveMatmuls,        ///< per layer, checkpointed keeping the outputs of
                       ///< its matrix products (OpPolicy::matmuls())
  kSaveProjections,    ///< per layer, checkpointed keeping the outputs of
                       ///< its products with weights (OpPolicy::projections())
  kCompress,           ///< per layer, nothing recomputed; saved floating
                       ///< activations kept narrower (Schedule::compress)
};

const char* to_string(SegmentMode mode);

/// The modes that keep part of each layer and run the rest again in
/// backward, or keep it smaller: every mode but kStore and kRecompute, in
/// the order planners try them.
const std::vector<SegmentMode>& partial_modes();

/// The op policy a per-op mode (kSaveMatmuls, kSaveProjections) checkpoints
/// its layers with; empty for every other mode.
OpPolicy op_policy_of(SegmentMode mode);

/// Layers [begin, end) and what they keep.
struct ScheduleSegment {
  int64_t begin = 0;
  int64_t end = 0;
  SegmentMode mode = SegmentMode::kStore;

  bool operator==(const ScheduleSegment& o) const {
    return begin == o.begin && end == o.end && mode == o.mode;
  }
};

/// A complete assignment of modes to the layers of a stack.
struct Schedule {
  std::vector<ScheduleSegment> segments;
  /// How the recomputed segments are checkpointed (the implementation and
  /// determinism check), when the policy said: run_stack puts these in place
  /// for the stack's forward, so the checkpoints inside a layer (selective
  /// modes) use them too. Unset: the thread's defaults as they are.
  std::optional<CheckpointDefaults> checkpoint;
  /// The dtype kCompress segments keep saved floating activations in
  /// (remat/compress.h: bf16, or fp8 where LibTorch has it); unset: bf16.
  /// Lossy.
  std::optional<c10::ScalarType> compress;
  /// The stored segments move saved activations of at least 1 MiB to pinned
  /// host memory until backward (remat/offload.h; CUDA only).
  bool offload = false;

  /// Throws unless the segments cover [0, num_layers) in order.
  void validate(int64_t num_layers) const;
  /// "store[0,4) recompute[4,8)"
  std::string str() const;
  /// The inverse of str(): "store[0,4) recompute[4,8)" back into segments
  /// (not validated against a layer count; call validate()). Throws, naming
  /// the piece, on anything else.
  static Schedule parse(const std::string& text);
};

/// A named policy.
class CheckpointPolicy {
 public:
  enum class Kind {
    kNone,               ///< "none"
    kEvery,              ///< "every-layer" (K=1) or "every-K": segments of K
                         ///< consecutive layers, each checkpointed as one
    kSqrt,               ///< "sqrt": about sqrt(L) segments (Chen et al. 2016)
    kFull,               ///< "full": the whole stack as one segment
    kSelectiveAttention, ///< "selective-attention"
    kSelectiveMlp,       ///< "selective-mlp"
    kSaveOps,            ///< "save-matmuls", "save-projections": every layer
                         ///< checkpointed, keeping those ops' outputs
                         ///< (remat/op_policy.h)
    kCompress,           ///< "compress" (bf16), "compress-fp8": nothing
                         ///< recomputed, saved activations compressed
    kOffload,            ///< "offload": nothing recomputed, saved
                         ///< activations wait in host memory (CUDA)
    kBudget,             ///< "budget:2GiB": planned to a memory budget
    kCustom,             ///< an explicit Schedule (from a planner)
  };

  CheckpointPolicy() = default;

  static CheckpointPolicy none();
  static CheckpointPolicy every(int64_t k);
  static CheckpointPolicy every_layer() { return every(1); }
  static CheckpointPolicy sqrt();
  static CheckpointPolicy full();
  static CheckpointPolicy selective_attention();
  static CheckpointPolicy selective_mlp();
  /// Every layer checkpointed, keeping the outputs of the ops `ops` names.
  static CheckpointPolicy save_ops(const OpPolicy& ops);
  /// Nothing recomputed; saved floating activations kept as `to` (bf16 or
  /// fp8, remat/compress.h).
  static CheckpointPolicy compress(c10::ScalarType to);
  /// Nothing recomputed; saved activations offloaded to pinned host memory
  /// (remat/offload.h). A model on the CPU refuses it when it runs.
  static CheckpointPolicy offload();
  /// A policy that a planner turns into a schedule; `bytes` > 0.
  static CheckpointPolicy budget(int64_t bytes);
  /// A fixed schedule, as a planner makes ("+reentrant" in `name`: see parse).
  static CheckpointPolicy custom(Schedule schedule, std::string name = "custom");

  /// Parses one of the names above, optionally followed by how its segments
  /// are checkpointed: "+reentrant" (CheckpointImpl::kReentrant), "+values"
  /// (DeterminismCheck::kValues) and "+save=OPS" (an op policy, as
  /// OpPolicy::parse reads OPS), as in "every-layer+reentrant" or
  /// "every-2+save=aten::mm/aten::addmm".
  /// Throws c10::Error naming the text and the accepted names when it cannot.
  static CheckpointPolicy parse(const std::string& text);

  /// This policy with its segments checkpointed as `how` says; its name
  /// gets the suffixes that parse() reads.
  CheckpointPolicy with_checkpoint(CheckpointDefaults how) const;

  /// The accepted names, for help texts.
  static std::string names();

  Kind kind() const { return kind_; }
  int64_t every_k() const { return k_; }            ///< layers per segment
  int64_t budget_bytes() const { return budget_; }  ///< bytes, for kBudget
  const std::string& name() const { return name_; }
  /// For kCompress: the dtype saved activations are kept in.
  c10::ScalarType compress_dtype() const { return compress_; }
  /// For kCustom: the schedule it was made with (empty otherwise).
  const Schedule& custom_schedule() const { return custom_; }
  bool enabled() const { return kind_ != Kind::kNone; }
  /// How its segments are checkpointed, when its name said ("+reentrant",
  /// "+values"); unset: the defaults of the thread that runs it.
  const std::optional<CheckpointDefaults>& checkpoint() const { return checkpoint_; }

  /// The schedule for a stack of `num_layers` layers. Throws for kBudget,
  /// which needs a planner (remat::plan) and a cost profile.
  Schedule schedule(int64_t num_layers) const;

 private:
  static CheckpointPolicy parse_base(const std::string& text, const std::string& given);

  Kind kind_ = Kind::kNone;
  int64_t k_ = 0;
  int64_t budget_ = 0;
  c10::ScalarType compress_ = c10::kBFloat16;
  std::string name_ = "none";
  Schedule custom_;
  std::optional<CheckpointDefaults> checkpoint_;
  SegmentMode save_mode_ = SegmentMode::kRecompute; ///< kSaveOps: a preset's mode
};

} // namespace remat
