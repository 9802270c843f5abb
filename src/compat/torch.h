// Every difference between the LibTorch versions remat builds against, in one
// place: Debian 12's 1.13 and the 2.x that users run (PyPI's 2.15 wheel in CI).
// The rest of the library calls what is here and never tests TORCH_VERSION
// itself; tests/compat/compat_test.cpp has one test per difference.
//
// Example:
//   #include "compat/torch.h"
//   if (remat::compat::autocast_enabled(c10::DeviceType::CPU)) { ... }
//
// Differences, and the version that brought each:
//   - c10::Allocator::allocate is non-const and copy_data is pure virtual
//     (2.3): CpuAllocatorBase.
//   - Autocast takes a device type (2.4); 1.13 has per-device functions:
//     autocast_enabled / set_autocast_enabled / autocast_dtype /
//     set_autocast_dtype.
//   - at::scaled_dot_product_attention exists (2.0): kHasSdpa.
//   - mean over a dimension keeps its input for backward in 1.13, only its
//     sizes in 2.x (a full mean() keeps sizes on both): kMeanSavesInput.
//   - impl::grad_accumulator returns a shared_ptr in 1.13 and an
//     intrusive_ptr in 2.x: GradAccumulatorPtr.
//   - autograd::grad runs the tensor hooks of a leaf whose gradient it
//     captures (2.0; 1.13 runs none), so a checkpoint's recompute would fire
//     a parameter's hooks once more than a plain backward: TensorHooksSuspended.
//   - CUDA allocator statistics (Stat, StatType, DeviceStats) moved out of
//     c10::cuda::CUDACachingAllocator in 2.x: cuda_memory_stats (CUDA builds).
//   - c10d's ProcessGroupNCCL has shutdown() in 2.x (its destructor warns
//     when it was not called), not in 1.13: shutdown_backend.
//   - LibTorch 2.10 and later need C++20; CMake takes that from Torch's
//     target (cxx_std_20), so nothing here.
#pragma once

#include <ATen/Functions.h>
#include <ATen/autocast_mode.h>
#include <c10/core/Allocator.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/version.h>

#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <utility>
#include <vector>

/// True when the LibTorch being compiled against is `major.minor` or newer.
#define REMAT_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) ||        \
   (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

namespace remat {
namespace compat {

/// "1.13.1", "2.15.0": the LibTorch these headers belong to.
inline const char* torch_version() {
  return TORCH_VERSION;
}

// ------------------------------------------------------------ allocators

/// A c10::Allocator whose subclasses implement `allocate_bytes` (const) and
/// compile on either allocator interface.
class CpuAllocatorBase : public c10::Allocator {
 public:
  virtual c10::DataPtr allocate_bytes(size_t nbytes) const = 0;

#if REMAT_TORCH_AT_LEAST(2, 3)
  c10::DataPtr allocate(size_t nbytes) override {
    return allocate_bytes(nbytes);
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
#else
  c10::DataPtr allocate(size_t nbytes) const override {
    return allocate_bytes(nbytes);
  }
#endif
};

// ------------------------------------------------------------ autocast

#if REMAT_TORCH_AT_LEAST(2, 4)
inline bool autocast_enabled(c10::DeviceType device) {
  return at::autocast::is_autocast_enabled(device);
}
inline void set_autocast_enabled(c10::DeviceType device, bool enabled) {
  at::autocast::set_autocast_enabled(device, enabled);
}
inline c10::ScalarType autocast_dtype(c10::DeviceType device) {
  return at::autocast::get_autocast_dtype(device);
}
inline void set_autocast_dtype(c10::DeviceType device, c10::ScalarType dtype) {
  at::autocast::set_autocast_dtype(device, dtype);
}
#else
/// Whether autocast is on for `device` (CPU or CUDA) on this thread.
inline bool autocast_enabled(c10::DeviceType device) {
  return device == c10::DeviceType::CPU ? at::autocast::is_cpu_enabled()
                                        : at::autocast::is_enabled();
}
inline void set_autocast_enabled(c10::DeviceType device, bool enabled) {
  if (device == c10::DeviceType::CPU) {
    at::autocast::set_cpu_enabled(enabled);
  } else {
    at::autocast::set_enabled(enabled);
  }
}
/// The lower-precision dtype autocast casts to on `device`.
inline c10::ScalarType autocast_dtype(c10::DeviceType device) {
  return device == c10::DeviceType::CPU ? at::autocast::get_autocast_cpu_dtype()
                                        : at::autocast::get_autocast_gpu_dtype();
}
inline void set_autocast_dtype(c10::DeviceType device, c10::ScalarType dtype) {
  if (device == c10::DeviceType::CPU) {
    at::autocast::set_autocast_cpu_dtype(dtype);
  } else {
    at::autocast::set_autocast_gpu_dtype(dtype);
  }
}
#endif

// ------------------------------------------------------------ ops

/// at::scaled_dot_product_attention is there to call.
constexpr bool kHasSdpa = REMAT_TORCH_AT_LEAST(2, 0);

/// at::scaled_dot_product_attention where kHasSdpa; elsewhere throws
/// c10::Error naming the version and what to use instead.
inline at::Tensor scaled_dot_product_attention(
    const at::Tensor& q,
    const at::Tensor& k,
    const at::Tensor& v,
    const c10::optional<at::Tensor>& attn_mask,
    double dropout,
    bool is_causal) {
#if REMAT_TORCH_AT_LEAST(2, 0)
  return at::scaled_dot_product_attention(q, k, v, attn_mask, dropout, is_causal);
#else
  TORCH_CHECK(
      false, "remat::nn::attention: sdpa needs LibTorch >= 2.0, but this build "
      "has ", TORCH_VERSION, "; use the eager or blockwise attention kind");
#endif
}

/// x.mean(dim)'s autograd node keeps x alive until backward: memory an
/// eager RMSNorm holds on 1.13 and not on 2.x.
constexpr bool kMeanSavesInput = !REMAT_TORCH_AT_LEAST(2, 0);

// ------------------------------------------------------------ autograd

/// What torch::autograd::impl::grad_accumulator returns.
using GradAccumulatorPtr = decltype(torch::autograd::impl::grad_accumulator(
    std::declval<const at::Tensor&>()));

/// While alive, the tensor hooks (Tensor::register_hook) of `leaves` do not
/// run; they are put back, in order, when it goes. The recompute of a
/// checkpoint holds one around its torch::autograd::grad, so a parameter's
/// hooks fire once per backward, when the outer engine accumulates its
/// gradient, as without checkpointing. Nothing to suspend on 1.13, whose
/// autograd::grad runs no hooks of the leaves it captures.
class TensorHooksSuspended {
 public:
  explicit TensorHooksSuspended(const std::vector<at::Tensor>& leaves) {
#if REMAT_TORCH_AT_LEAST(2, 0)
    for (const auto& t : leaves) {
      if (t.defined() && t.is_leaf() && !torch::autograd::impl::hooks(t).empty()) {
        stashed_.emplace_back(t, std::move(torch::autograd::impl::hooks(t)));
        torch::autograd::impl::hooks(t).clear();
      }
    }
#endif
  }
  ~TensorHooksSuspended() {
#if REMAT_TORCH_AT_LEAST(2, 0)
    for (auto& [t, hooks] : stashed_) {
      auto& now = torch::autograd::impl::hooks(t);
      // Hooks registered meanwhile run after the ones that were there.
      for (auto& h : now) {
        hooks.push_back(std::move(h));
      }
      now = std::move(hooks);
    }
#endif
  }
  TensorHooksSuspended(const TensorHooksSuspended&) = delete;
  TensorHooksSuspended& operator=(const TensorHooksSuspended&) = delete;

 private:
#if REMAT_TORCH_AT_LEAST(2, 0)
  std::vector<std::pair<at::Tensor,
                        std::vector<std::unique_ptr<torch::autograd::FunctionPreHook>>>>
      stashed_;
#endif
};

// ------------------------------------------------------------ c10d

namespace detail {
template <typename B>
auto shutdown_backend(B& backend, int) -> decltype(backend.shutdown(), void()) {
  try {
    backend.shutdown();
  } catch (const std::exception&) {
    // Called on the way out (a destructor): nothing better to do with it.
  }
}
template <typename B>
void shutdown_backend(B&, long) {}
} // namespace detail

/// Calls `backend.shutdown()` where its type has one (a c10d backend whose
/// communicators must be closed before its store goes), and swallows what it
/// throws; does nothing for a type without.
template <typename B>
void shutdown_backend(B& backend) {
  detail::shutdown_backend(backend, 0);
}

// ------------------------------------------------------------ CUDA

/// The CUDA caching allocator's byte and allocation counts for one device.
struct CudaMemoryStats {
  int64_t current_bytes = 0;  ///< bytes allocated to tensors now
  int64_t peak_bytes = 0;     ///< highest current_bytes since the last reset
  int64_t allocations = 0;    ///< allocations made (a count)
  int64_t reserved_bytes = 0; ///< bytes the allocator holds from the driver
};

#ifdef REMAT_WITH_CUDA
/// Makes LibTorch initialise CUDA (as its first CUDA tensor does, on every
/// version) once per process: the caching allocator's per-device statistics
/// and memory fraction exist only after that. CUDA builds only.
void initialise_cuda(c10::DeviceIndex device);

/// Statistics of `device` (an index >= 0), CUDA initialised first. CUDA
/// builds only.
CudaMemoryStats cuda_memory_stats(c10::DeviceIndex device);
#endif

} // namespace compat
} // namespace remat
