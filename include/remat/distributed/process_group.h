// A group of training processes that talk through PyTorch's c10d: the
// rendezvous through a TCPStore (or a FileStore), Gloo's collectives on CPU
// tensors and, for a group on a CUDA device (DistOptions::device, CUDA
// builds with NCCL), ProcessGroupNCCL's on CUDA tensors: rank r then uses
// cuda:(r % the GPUs visible). A collective goes to NCCL or Gloo by where its
// tensors are. It is the transport of data-parallel training
// (remat/distributed/data_parallel.h); remat has no transport of its own.
//
// Every collective is bounded by DistOptions::timeout_seconds: a rank that
// died or hangs makes the others throw a c10::Error (naming, where the store
// can tell, the ranks that fell behind) instead of waiting forever.
//
// Example (two processes started with RANK=0/1, WORLD_SIZE=2,
// MASTER_ADDR=127.0.0.1, MASTER_PORT=29500, as torchrun sets them):
//   auto options = remat::dist::DistOptions::from_env();  // nullopt: alone
//   auto group = std::make_shared<remat::dist::ProcessGroup>(*options);
//   std::vector<torch::Tensor> t{torch::ones({4})};
//   group->all_reduce_sum(t);  // t[0] is 2 everywhere
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Optional.h>
#include <torch/arg.h>
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace remat {
namespace dist {

/// Where a process stands in its group and how the group meets.
///
/// Example:
///   auto options =
///       remat::dist::DistOptions().rank(1).world_size(2).master_port(29511);
struct DistOptions {
  TORCH_ARG(int64_t, rank) = 0;
  TORCH_ARG(int64_t, world_size) = 1;
  /// Host of rank 0, which serves the TCPStore.
  TORCH_ARG(std::string, master_addr) = "127.0.0.1";
  TORCH_ARG(int64_t, master_port) = 29500;
  /// Seconds that the rendezvous and each collective may take before the
  /// ranks give up on a peer that died or hangs.
  TORCH_ARG(double, timeout_seconds) = 60;
  /// A file that every rank can reach: a FileStore instead of the TCPStore
  /// (tests; ranks as threads of one process). Empty: TCP.
  TORCH_ARG(std::string, store_path);
  /// cpu: Gloo only. A CUDA device (any index): also NCCL, on
  /// cuda:(rank % the GPUs visible); needs nccl_available().
  TORCH_ARG(c10::Device, device) = c10::kCPU;

 public:
  /// From RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; nullopt when
  /// WORLD_SIZE is not set. Throws c10::Error naming the variable that is
  /// missing or malformed.
  static c10::optional<DistOptions> from_env();
  /// Throws c10::Error starting with the field's name for a bad value.
  void validate() const;
};

/// A collective that was started and may still be running.
class Pending {
 public:
  Pending() = default;
  explicit Pending(std::function<void()> wait) : wait_(std::move(wait)) {}
  /// Blocks until done; throws c10::Error when it failed or timed out.
  void wait();

 private:
  std::function<void()> wait_;
};

/// True when this build can make a group on a CUDA device: LibTorch with
/// CUDA, and NCCL's header found when remat was built.
bool nccl_available();

/// The ranks of one data-parallel run. Construction is the rendezvous: it
/// returns once all world_size ranks have joined, or throws after
/// timeout_seconds. Collectives must be called by every rank, in the same
/// order, with tensors of the same shapes.
class ProcessGroup {
 public:
  explicit ProcessGroup(DistOptions options);
  ~ProcessGroup();
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  int64_t rank() const;
  int64_t world_size() const;
  const DistOptions& options() const;
  /// This rank's CUDA device for NCCL (cuda:(rank % GPUs)), or cpu for a
  /// Gloo-only group.
  c10::Device device() const;

  /// Sums dense tensors across the ranks, in place: CPU tensors through
  /// Gloo, tensors on device() through NCCL (one call takes one kind).
  void all_reduce_sum(std::vector<torch::Tensor>& tensors);
  /// Starts the sum; the tensors must stay alive until wait() returns.
  Pending all_reduce_sum_async(std::vector<torch::Tensor> tensors);
  /// Copies `root`'s tensors into every rank's, in place (CPU or device()).
  void broadcast(std::vector<torch::Tensor>& tensors, int64_t root = 0);
  /// Rank `root`'s `text`, on every rank (through the store).
  std::string broadcast_string(const std::string& text, int64_t root = 0);
  void barrier();

  /// Records that this rank has started `step` (cheap: one store write),
  /// so that after a failed collective describe_failure() can name the
  /// ranks that fell behind.
  void mark_progress(int64_t step);
  /// "rank 1 stopped at step 3", "rank 0, which serves the rendezvous
  /// store, is gone", or "" when the store cannot tell.
  std::string describe_failure(int64_t step);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

} // namespace dist
} // namespace remat
