// Autocast (automatic mixed precision) state as one value, and scopes that
// set it, on LibTorch 1.13 and 2.x alike (their autocast APIs differ).
//
// A checkpoint captures the state in forward and puts it back around its
// recompute; a training step runs its forward under a bf16 scope. Both use
// these.
//
// Example:
//   // given: torch::nn::Linear model(256, 256);
//   // given: torch::Tensor x = torch::randn({8, 256});
//   torch::Tensor loss;
//   {
//     remat::AutocastScope bf16(remat::AutocastState::bf16(torch::kCPU));
//     loss = model(x).pow(2).mean();          // matmuls in bfloat16
//   }                                         // autocast as it was
//   loss.backward();
#pragma once

#include <ATen/autocast_mode.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

namespace remat {

/// Whether autocast is on, and to which dtype, for the CPU and for CUDA.
struct AutocastState {
  bool cpu_enabled = false;
  c10::ScalarType cpu_dtype = c10::kBFloat16;
  bool cuda_enabled = false;
  c10::ScalarType cuda_dtype = c10::kHalf;

  /// The calling thread's state now.
  static AutocastState capture();
  /// bfloat16 autocast on `device`'s type (float32 master weights), off on
  /// the other; `enabled` false gives the state with everything off.
  static AutocastState bf16(c10::Device device, bool enabled = true);

  /// Autocast is on for some device.
  bool any() const {
    return cpu_enabled || cuda_enabled;
  }
  /// Makes this the calling thread's state.
  void apply() const;
};

/// Applies `state` for its lifetime, then restores what it found.
class AutocastScope {
 public:
  explicit AutocastScope(const AutocastState& state) : previous_(AutocastState::capture()) {
    state.apply();
  }
  ~AutocastScope() {
    previous_.apply();
  }
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  AutocastState previous_;
};

/// Turns off autocast's cache of weight casts for its lifetime. LibTorch
/// caches the lower-precision cast of a leaf weight until clear_cache(); a
/// segment must cast its weights afresh in forward and in the recompute, or
/// the recompute reuses a cast made in the forward (which runs with grad off,
/// so the cast has no grad_fn and the weight gets no gradient) or one made
/// outside the segment (history the recompute may not reach into).
class AutocastCacheDisabled {
 public:
  AutocastCacheDisabled() : previous_(at::autocast::is_autocast_cache_enabled()) {
    at::autocast::set_autocast_cache_enabled(false);
  }
  ~AutocastCacheDisabled() {
    at::autocast::set_autocast_cache_enabled(previous_);
  }
  AutocastCacheDisabled(const AutocastCacheDisabled&) = delete;
  AutocastCacheDisabled& operator=(const AutocastCacheDisabled&) = delete;

 private:
  bool previous_;
};

} // namespace remat
