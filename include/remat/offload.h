// Offloaded saved activations: saved-tensor hooks that move each activation
// autograd saves on a CUDA device to pinned host memory during forward, and
// bring it back during backward, a few tensors ahead of use (PyTorch's
// save_on_cpu with pin_memory, plus the prefetch).
//
// Stream discipline (CUDA):
//   - pack: the side stream waits for the current stream (the tensor is
//     written), copies device -> pinned host without blocking, and the
//     tensor's memory is recorded on the side stream, so the caching
//     allocator does not hand it out again before the copy has read it;
//   - unpack: the current stream waits for that copy, and copies the tensor
//     back; then the `prefetch` tensors packed just before it (the next ones
//     backward needs) are copied back on the side stream, each with an event
//     that its unpack waits for on the current stream, and recorded there.
// Nothing waits on the host: forward and backward stay asynchronous.
//
// Applies to tensors made by ops (activations) of at least `min_bytes`;
// parameters and other leaves stay where they are. CPU tensors stay too,
// unless OffloadOptions::cpu is set: then they move to memory outside
// LibTorch's allocator (so remat::memory stops counting them) and back,
// which tests the mechanism on machines without a GPU.
//
// Example (a block whose activations wait in host memory until backward):
//   // given: torch::nn::Linear block(256, 256);
//   // given: torch::Tensor x = torch::randn({8, 256});
//   auto hooks = std::make_shared<remat::OffloadHooks>();
//   torch::Tensor loss;
//   {
//     remat::SavedTensorHooksGuard offload(hooks);
//     loss = block->forward(x).pow(2).mean();
//   }
//   loss.backward();
//   int64_t moved = hooks->stats().bytes_offloaded;
#pragma once

#include "remat/saved_tensor_hooks.h"

#include <torch/arg.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace remat {

struct OffloadOptions {
  /// Smaller tensors stay on their device (bytes, >= 0).
  TORCH_ARG(int64_t, min_bytes) = 1 << 20;
  /// How many tensors backward fetches ahead of the one it unpacks (>= 0).
  TORCH_ARG(int64_t, prefetch) = 2;
  /// Move CPU tensors too, to memory outside LibTorch's allocator.
  TORCH_ARG(bool, cpu) = false;
};

/// What the hooks moved, in bytes, since they were made.
struct OffloadStats {
  int64_t tensors = 0;          ///< tensors offloaded
  int64_t bytes_offloaded = 0;  ///< bytes moved off the device in forward
  int64_t bytes_fetched = 0;    ///< bytes moved back in backward
  int64_t prefetched = 0;       ///< tensors fetched ahead of their unpack
};

/// Why CUDA offload cannot run here (no CUDA in this LibTorch, or no device),
/// or nothing when it can.
std::optional<std::string> cuda_offload_unavailable();

class OffloadHooks final : public SavedTensorHooks {
 public:
  /// Throws, naming the option, for negative sizes.
  explicit OffloadHooks(OffloadOptions options = {});

  std::any pack(const torch::Tensor& tensor) override;
  torch::Tensor unpack(const std::any& packed) override;

  OffloadStats stats() const;
  const OffloadOptions& options() const { return options_; }

  struct Entry; ///< one offloaded tensor (internal)

 private:
  torch::Tensor fetch(Entry& e, bool ahead);

  OffloadOptions options_;
  mutable std::mutex mutex_;
  std::vector<std::weak_ptr<Entry>> order_; ///< in pack order
  std::atomic<int64_t> tensors_{0};
  std::atomic<int64_t> offloaded_{0};
  std::atomic<int64_t> fetched_{0};
  std::atomic<int64_t> prefetched_{0};
};

} // namespace remat
