// The autocast state of the calling thread, captured in a checkpoint's forward
// and put back around its recompute, across LibTorch 1.13 and 2.x APIs.
#pragma once

#include <ATen/autocast_mode.h>
#include <torch/version.h>

namespace remat {

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
#define REMAT_AUTOCAST_DEVICE_API 1
#endif

struct AutocastState {
  bool cpu_enabled = false;
  c10::ScalarType cpu_dtype = c10::kBFloat16;
  bool cuda_enabled = false;
  c10::ScalarType cuda_dtype = c10::kHalf;

  static AutocastState capture() {
    AutocastState s;
#ifdef REMAT_AUTOCAST_DEVICE_API
    s.cpu_enabled = at::autocast::is_autocast_enabled(at::kCPU);
    s.cpu_dtype = at::autocast::get_autocast_dtype(at::kCPU);
    s.cuda_enabled = at::autocast::is_autocast_enabled(at::kCUDA);
    s.cuda_dtype = at::autocast::get_autocast_dtype(at::kCUDA);
#else
    s.cpu_enabled = at::autocast::is_cpu_enabled();
    s.cpu_dtype = at::autocast::get_autocast_cpu_dtype();
    s.cuda_enabled = at::autocast::is_enabled();
    s.cuda_dtype = at::autocast::get_autocast_gpu_dtype();
#endif
    return s;
  }

  /// Autocast is on for some device.
  bool any() const {
    return cpu_enabled || cuda_enabled;
  }

  void apply() const {
#ifdef REMAT_AUTOCAST_DEVICE_API
    at::autocast::set_autocast_enabled(at::kCPU, cpu_enabled);
    at::autocast::set_autocast_dtype(at::kCPU, cpu_dtype);
    at::autocast::set_autocast_enabled(at::kCUDA, cuda_enabled);
    at::autocast::set_autocast_dtype(at::kCUDA, cuda_dtype);
#else
    at::autocast::set_cpu_enabled(cpu_enabled);
    at::autocast::set_autocast_cpu_dtype(cpu_dtype);
    at::autocast::set_enabled(cuda_enabled);
    at::autocast::set_autocast_gpu_dtype(cuda_dtype);
#endif
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
