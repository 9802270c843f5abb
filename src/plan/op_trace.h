// A record of the tensors one stage of a model creates in its forward, which
// of them autograd saves for backward, and when each dies: the analytic
// estimator builds one per stage (model_trace.cpp) and reads memory and
// FLOPs off it. Private to src/plan.
#pragma once

#include "remat/policy.h"

#include <cstdint>
#include <string>
#include <vector>

namespace remat {
namespace plan {
namespace detail {

/// Which sub-block of a layer an op belongs to, for the selective modes.
enum class Block { kOther, kAttentionCore, kMlp };

/// What kind of matrix product an op is, for the per-op modes: kSaveMatmuls
/// keeps the outputs of both kinds (OpPolicy::matmuls: mm, addmm, bmm, the
/// fused attention kernels), kSaveProjections those with a weight
/// (OpPolicy::projections: mm, addmm).
enum class Product { kNone, kMatmul, kProjection };

struct TraceValue {
  std::string name;
  std::vector<int64_t> shape;
  int64_t elem_bytes = 0;
  bool requires_grad = false;
  Block block = Block::kOther;
  int producer = -1;             // op index; -1 for the stage input
  int last_use = -1;             // last op reading it
  std::vector<int> saved_by;     // ops that save it for backward
  int64_t bytes() const;
  std::string shape_str() const; // "[2, 8192, 5120] x 2 B"
};

struct TraceOp {
  std::string name;
  Block block = Block::kOther;
  std::vector<int> inputs;
  std::vector<int> outputs;
  double flops = 0;          // forward FLOPs
  double backward_flops = 0; // FLOPs of its backward
  int64_t weight_grad_bytes = 0; // gradients of trainable weights it reads
  // false: a selective recompute of its block does not run it again (the
  // eager core's product with v: nn::checkpointed_attention recomputes the
  // probabilities only).
  bool replayed = true;
  Product product = Product::kNone;
};

/// What a trace says about its stage in one mode (bytes, FLOPs).
struct TraceCost {
  int64_t output_bytes = 0;
  int64_t stored_bytes = 0;             // saved + output, not the input
  int64_t forward_transient_bytes = 0;  // see remat::plan::StageCost
  int64_t nograd_transient_bytes = 0;
  int64_t backward_transient_bytes = 0;
  double forward_flops = 0;
  double backward_flops = 0;
  double recompute_flops = 0;           // forward FLOPs of the recomputed block
  int64_t parameter_gradient_bytes = 0; // all ops' weight gradients
};

class Trace {
 public:
  /// The stage input (the previous stage's output); not counted.
  int input(std::string name, std::vector<int64_t> shape, int64_t elem_bytes,
            bool requires_grad);
  /// Subsequent ops and values belong to `block`.
  void block(Block b) { block_ = b; }
  /// A value the next `op` produces.
  int value(std::string name, std::vector<int64_t> shape, int64_t elem_bytes,
            bool requires_grad);
  /// An op reading `inputs` and producing the values made since the last op;
  /// it saves `saved` (any values, inputs or its own products).
  void op(std::string name, std::vector<int> inputs, std::vector<int> saved,
          double flops = 0, double backward_flops = 0,
          int64_t weight_grad_bytes = 0);
  /// Marks the last op as one a selective recompute of its block skips.
  void skip_in_recompute() { ops_.back().replayed = false; }
  /// Marks the last op as a matrix product of kind `p`.
  void product(Product p) { ops_.back().product = p; }
  /// The element size (bytes) kCompress keeps saved floating values in: 2
  /// (bf16, the default) or 1 (fp8).
  void compress_to(int64_t elem_bytes) { compress_bytes_ = elem_bytes; }
  /// Marks the stage output.
  void output(int v) { output_ = v; }
  int output() const { return output_; }

  const TraceValue& at(int v) const { return values_[v]; }
  bool requires_grad(int v) const { return values_[v].requires_grad; }
  const std::vector<TraceValue>& values() const { return values_; }
  const std::vector<TraceOp>& ops() const { return ops_; }

  /// True when `v` is kept for backward with the stage in `mode` (any but
  /// kRecompute, which the chain models); the input never is.
  bool kept(int v, SegmentMode mode) const;
  /// The bytes a kept `v` holds in `mode`: its own, or, in kCompress, its
  /// compressed copy's (a floating value of at least 4 KiB, not the output).
  int64_t held_bytes(int v, SegmentMode mode) const;
  /// Memory and FLOPs of the stage in `mode`, with the meanings of
  /// remat::plan::StageCost / SelectiveCost.
  TraceCost cost(SegmentMode mode) const;

 private:
  // Peaks above the stage input, with the stage in `mode`.
  int64_t forward_peak(bool grad, SegmentMode mode) const;
  int64_t backward_peak(SegmentMode mode) const;
  // The per-op modes and kCompress, from kStore's walks.
  int64_t per_op_backward_peak(SegmentMode mode) const;
  int64_t compress_backward_peak() const;

  std::vector<TraceValue> values_;
  std::vector<TraceOp> ops_;
  std::vector<int> pending_;
  Block block_ = Block::kOther;
  int output_ = -1;
  int64_t compress_bytes_ = 2;
};

} // namespace detail
} // namespace plan
} // namespace remat
