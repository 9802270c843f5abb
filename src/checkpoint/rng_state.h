// The generator state a checkpointed segment draws from, captured in forward
// and put back around its recompute, so that dropout draws the same masks
// twice. Both checkpoint implementations use it.
#pragma once

#include <c10/core/Device.h>
#include <torch/types.h>

#include <vector>

namespace remat {
namespace detail {

/// The default CPU generator's state, and the default CUDA generator's of
/// the first CUDA tensor's device (CUDA builds).
struct RngState {
  torch::Tensor cpu;
  c10::DeviceIndex cuda_device = -1;
  torch::Tensor cuda; ///< undefined: no CUDA input, or a CPU-only build

  /// The states now, for a segment over `inputs`.
  static RngState capture(const std::vector<torch::Tensor>& inputs);
  bool defined() const {
    return cpu.defined();
  }
};

/// Puts `state` in place for its lifetime, then restores the states it found,
/// so the rest of backward draws as if nothing had been recomputed. An
/// undefined state does nothing.
class RngScope {
 public:
  explicit RngScope(const RngState& state);
  ~RngScope();
  RngScope(const RngScope&) = delete;
  RngScope& operator=(const RngScope&) = delete;

 private:
  RngState found_;
};

} // namespace detail
} // namespace remat
