// Data parallelism over a remat::dist::ProcessGroup: the same model on every
// rank, parameters broadcast from rank 0 once, and after each backward the
// gradients summed (or averaged) across the ranks, bucket by bucket.
//
// When the all-reduce runs: on LibTorch 1.13 there is no post-accumulate-
// grad hook in C++, and a tensor hook sees a gradient before it is added to
// .grad (so with gradient accumulation it is not yet the step's gradient).
// GradReducer therefore reduces after backward; its buckets are all started
// at once, so Gloo's threads work on one while the next is being packed.
//
// Checkpointing and DDP: remat's checkpoint takes a segment's parameters as
// explicit autograd inputs, so each parameter's gradient arrives exactly
// once per backward, under every policy (Python's reentrant checkpoint
// breaks DDP there: "marked ready twice", pytorch/pytorch#24005).
// tests/dist/data_parallel_test.cpp counts the hooks.
//
// Example:
//   auto group = std::make_shared<remat::dist::ProcessGroup>(options);
//   remat::dist::broadcast_parameters(*group, model);
//   remat::dist::GradReducer reducer(group, model->parameters());
//   loss.backward();
//   reducer.reduce();  // every rank's .grad is now the average
//   optimizer.step();
#pragma once

#include "remat/dist/process_group.h"

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
/// Example: remat::dist::GradReducerOptions().bucket_bytes(1 << 20).average(false)
struct GradReducerOptions {
  /// Largest bucket, in bytes of gradient (a parameter larger than this is a
  /// bucket of its own). 25 MiB, as PyTorch's DDP.
  TORCH_ARG(int64_t, bucket_bytes) = 25 << 20;
  /// Divide the sums by the world size (true), or keep the sums (false: for
  /// losses already scaled by each rank's share of the global batch).
  TORCH_ARG(bool, average) = true;
};

/// Sums or averages the .grad of a fixed list of parameters across a group.
/// Parameters are packed into buckets in reverse order (the order in which
/// backward produces their gradients). An undefined .grad counts as zeros
/// when another rank has one (and is defined afterwards, on every rank
/// alike); a parameter that no rank has a gradient for keeps none.
class GradReducer {
 public:
  GradReducer(
      std::shared_ptr<ProcessGroup> group,
      std::vector<torch::Tensor> params,
      GradReducerOptions options = {});

  /// Every rank must call it after the same backward passes. Throws
  /// c10::Error when a peer rank died or timed out.
  void reduce();

  /// Indices into the parameter list, one vector per bucket.
  const std::vector<std::vector<size_t>>& buckets() const {
    return buckets_;
  }

 private:
  std::shared_ptr<ProcessGroup> group_;
  std::vector<torch::Tensor> params_;
  GradReducerOptions options_;
  std::vector<std::vector<size_t>> buckets_;
};

/// Copies rank `root`'s parameters and buffers into every rank's module.
void broadcast_parameters(ProcessGroup& group, torch::nn::Module& module, int64_t root = 0);

} // namespace dist
} // namespace remat
