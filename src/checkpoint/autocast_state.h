// The autocast state of the calling thread, captured in a checkpoint's forward
// and put back around its recompute, across LibTorch 1.13 and 2.x APIs.
#pragma once

#include "compat/torch.h"

#include <ATen/autocast_mode.h>

namespace remat {

struct AutocastState {
  bool cpu_enabled = false;
  c10::ScalarType cpu_dtype = c10::kBFloat16;
  bool cuda_enabled = false;
  c10::ScalarType cuda_dtype = c10::kHalf;

  static AutocastState capture() {
    AutocastState s;
    s.cpu_enabled = compat::autocast_enabled(c10::DeviceType::CPU);
    s.cpu_dtype = compat::autocast_dtype(c10::DeviceType::CPU);
    s.cuda_enabled = compat::autocast_enabled(c10::DeviceType::CUDA);
    s.cuda_dtype = compat::autocast_dtype(c10::DeviceType::CUDA);
    return s;
  }

  /// Autocast is on for some device.
  bool any() const {
    return cpu_enabled || cuda_enabled;
  }

  void apply() const {
    compat::set_autocast_enabled(c10::DeviceType::CPU, cpu_enabled);
    compat::set_autocast_dtype(c10::DeviceType::CPU, cpu_dtype);
    compat::set_autocast_enabled(c10::DeviceType::CUDA, cuda_enabled);
    compat::set_autocast_dtype(c10::DeviceType::CUDA, cuda_dtype);
  }
};

/// Applies `state` for its lifetime, then restores what it found.
class AutocastScope {
 public:
  explicit AutocastScope(const AutocastState& state)
      : previous_(AutocastState::capture()) {
    state.apply();
  }
  ~AutocastScope() { previous_.apply(); }
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
  AutocastCacheDisabled()
      : previous_(at::autocast::is_autocast_cache_enabled()) {
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
