// The random generators' state, captured and put back. One mechanism for
// every place that must not disturb a stream or must draw one again:
//   - a checkpointed segment's recompute draws dropout's masks from the
//     state its forward drew from (both checkpoint implementations);
//   - the profiler leaves the caller's generators as it found them;
//   - a Trainer draws only from a stream of its own, so two trainers (a run
//     and its comparison run) in one process do not disturb each other.
//
// Example:
//   auto mine = remat::RngState::capture(c10::Device(c10::kCPU));
//   {
//     remat::RngScope scope(mine, /*advanced=*/&mine);  // draw from `mine`
//     auto mask = torch::rand({4});
//   }   // the caller's generator is back; `mine` has moved on
#pragma once

#include <c10/core/Device.h>
#include <torch/types.h>

#include <vector>

namespace remat {

/// The default CPU generator's state and, in CUDA builds, one CUDA device's.
struct RngState {
  torch::Tensor cpu;
  c10::DeviceIndex cuda_device = -1;
  torch::Tensor cuda; ///< undefined: no CUDA device, or a CPU-only build

  /// The states now: the CPU's, and that of the first CUDA tensor's device
  /// among `inputs` (a checkpointed segment's inputs).
  static RngState capture(const std::vector<torch::Tensor>& inputs);
  /// The states now: the CPU's, and `device`'s when it is a CUDA device
  /// with an index.
  static RngState capture(c10::Device device);
  bool defined() const {
    return cpu.defined();
  }
};

/// Puts `state` in place for its lifetime, then puts back the states it
/// found. With `advanced`, the states the scope ends with are first stored
/// into *advanced (which may be `state` itself: a stream that goes on). An
/// undefined state does nothing. Throws c10::Error, changing nothing, when
/// `state.cpu` is not a CPU generator state.
class RngScope {
 public:
  explicit RngScope(const RngState& state, RngState* advanced = nullptr);
  ~RngScope();
  RngScope(const RngScope&) = delete;
  RngScope& operator=(const RngScope&) = delete;

 private:
  RngState found_;
  RngState* advanced_ = nullptr;
};

} // namespace remat
