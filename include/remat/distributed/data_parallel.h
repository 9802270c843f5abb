// Data parallelism over a remat::dist::ProcessGroup: the same model on every
// rank, parameters broadcast from rank 0 once, and after each backward the
// gradients summed (or averaged) across the ranks, bucket by bucket.
//
// When the all-reduce runs: GradReducer puts a post hook on each
// parameter's gradient accumulator (the AccumulateGrad node, as PyTorch's
// DDP does); it runs after the gradient has been added into .grad. In a
// backward announced with prepare_for_backward(true), a bucket's all-reduce
// starts (on Gloo's threads) as soon as every parameter in it has its
// gradient, while backward goes on with the layers below. Buckets start in
// order (0, 1, ...), so every rank issues the same collectives in the same
// order; a bucket waits for those before it. reduce() starts the buckets
// that were not started (one holds a parameter that got no gradient, or
// comes after one that does), waits, and writes the sums into .grad. Micro-batches before the last one call
// prepare_for_backward(false): their gradients only accumulate (DDP's
// no_sync). Without prepare_for_backward, or with overlap(false), reduce()
// packs and starts every bucket after backward, as before.
//
// A gradient that changes after its bucket started (a reentrant inner
// backward, or a second synced backward before reduce()) is not lost: the
// ranks agree in reduce() on the buckets to redo and reduce them again, so
// the result is always that of reducing the final .grad.
//
// Checkpointing and DDP: remat's checkpoint takes a segment's parameters as
// explicit autograd inputs, so each parameter's gradient arrives exactly
// once per backward, under every policy (Python's reentrant checkpoint
// breaks DDP there: "marked ready twice", pytorch/pytorch#24005; here it
// would cost a redone bucket, not a wrong sum). tests/dist/
// data_parallel_test.cpp counts the hooks.
//
// Example (gradient accumulation over `micros`):
//   // given: remat::dist::DistOptions options;  // this rank's
//   // given: torch::nn::Linear model(256, 256);
//   // given: torch::optim::SGD optimizer(model->parameters(), /*lr=*/0.1);
//   // given: std::vector<torch::Tensor> micros;  // [B, 256] each
//   auto group = std::make_shared<remat::dist::ProcessGroup>(options);
//   remat::dist::broadcast_parameters(*group, *model);
//   remat::dist::GradReducer reducer(group, model->parameters());
//   for (size_t i = 0; i < micros.size(); ++i) {
//     reducer.prepare_for_backward(/*sync=*/i + 1 == micros.size());
//     auto loss = model(micros[i]).pow(2).mean();
//     loss.backward();  // the last one starts the all-reduces
//   }
//   reducer.reduce();  // every rank's .grad is now the average
//   optimizer.step();
#pragma once

#include "remat/distributed/process_group.h"

#include <torch/arg.h>
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <vector>

namespace torch {
namespace nn {
class Module;
}
} // namespace torch

namespace remat {
namespace dist {

/// How GradReducer packs and combines gradients.
///
/// Example:
///   auto options = remat::dist::GradReducerOptions()
///                      .bucket_bytes(1 << 20)  // 1 MiB
///                      .average(false);
struct GradReducerOptions {
  /// Largest bucket, in bytes of gradient (a parameter larger than this is a
  /// bucket of its own). 25 MiB, as PyTorch's DDP.
  TORCH_ARG(int64_t, bucket_bytes) = 25 << 20;
  /// Divide the sums by the world size (true), or keep the sums (false: for
  /// losses already scaled by each rank's share of the global batch).
  TORCH_ARG(bool, average) = true;
  /// Start a bucket's all-reduce during a backward announced with
  /// prepare_for_backward(true), as soon as its gradients are ready (true),
  /// or always after backward, in reduce() (false).
  TORCH_ARG(bool, overlap) = true;
};

/// Where one reduce()'s all-reduces were started: during backward, overlapped
/// with it, or in reduce() itself.
struct GradReducerStats {
  int64_t bytes_in_backward = 0; ///< bytes of gradient started by the hooks
  int64_t bytes_in_reduce = 0;   ///< bytes started in reduce(), redone ones included
  int64_t buckets_redone = 0;    ///< buckets reduced twice: a gradient changed after its start
};

/// Sums or averages the .grad of a fixed list of parameters across a group.
/// Parameters are packed into buckets in reverse order (the order in which
/// backward produces their gradients). An undefined .grad counts as zeros
/// when another rank has one (and is defined afterwards, on every rank
/// alike); a parameter that no rank has a gradient for keeps none.
///
/// Parameters that are leaves requiring grad get a hook on their gradient
/// accumulator for the reducer's lifetime; the others are reduced in
/// reduce() only. The hooks read .grad: between a synced backward and
/// reduce(), change .grad only through backward.
class GradReducer {
 public:
  GradReducer(
      std::shared_ptr<ProcessGroup> group,
      std::vector<torch::Tensor> params,
      GradReducerOptions options = {});
  ~GradReducer();
  GradReducer(const GradReducer&) = delete;
  GradReducer& operator=(const GradReducer&) = delete;

  /// Announces the next backward: `sync` true for the last backward before
  /// reduce() (its ready buckets start during it), false for the ones
  /// before it, whose gradients only accumulate. Each announcement holds
  /// until the next one or until reduce(). Only timing depends on it: ranks
  /// that announce differently still get the same sums. Does nothing with
  /// overlap(false).
  void prepare_for_backward(bool sync = true);

  /// Every rank must call it once per step, and between a synced backward
  /// and reduce() use the group for nothing else (some ranks may still have
  /// buckets to start, which would then come after that collective). Throws
  /// c10::Error when a peer rank died or timed out, or when a hook failed
  /// during backward (the error it recorded); the next step starts afresh.
  void reduce();

  /// Indices into the parameter list, one vector per bucket.
  const std::vector<std::vector<size_t>>& buckets() const;

  /// Where the last reduce()'s all-reduces started (zeros before the first).
  GradReducerStats stats() const;

 private:
  struct State;
  std::shared_ptr<State> state_;
};

/// Copies rank `root`'s parameters and buffers into every rank's module.
void broadcast_parameters(ProcessGroup& group, torch::nn::Module& module, int64_t root = 0);

} // namespace dist
} // namespace remat
