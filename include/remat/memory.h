// Exact accounting of the bytes that tensors hold, and an optional hard cap.
//
// On CPU, remat installs a counting allocator in front of LibTorch's own
// (one idempotent call, `memory::install()`); every tensor storage allocated
// after that is counted to the byte. On CUDA builds the same figures come from
// the caching allocator's device statistics.
//
// Example:
//   // given: torch::nn::Linear model(256, 256);
//   // given: torch::Tensor x = torch::randn({8, 256});
//   remat::memory::install();
//   remat::memory::reset_peak();
//   auto before = remat::memory::current_bytes();
//   auto loss = model->forward(x).sum();
//   loss.backward();
//   std::cout << remat::memory::peak_bytes() - before << " bytes at peak\n";
//
// Blocks of 1 MiB and more are cached when freed and handed out again to
// allocations of their size class (up to 1/8 larger), as CUDA's caching
// allocator does, instead of going back to the C library. Without it a
// training step returns its large buffers to the kernel and faults them in
// again on the next step; on the virtual machines this project measures on,
// that page-fault work was up to 30% of a step, and larger the more a policy
// allocates, which skewed every timing comparison. The counts above are the
// bytes tensors hold and do not include the cache (`cached_bytes`).
//
// A limit turns "would not fit a device of that size" into a clean error:
//   remat::memory::set_limit(200 << 20);   // bytes
//   try { step(); } catch (const remat::OutOfMemoryError& e) { ... }
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

namespace torch {
namespace nn {
class Module;
}
namespace optim {
class Optimizer;
}
} // namespace torch

namespace remat {

/// Thrown when an allocation would take the counted CPU bytes past the limit
/// set with `memory::set_limit`. A c10::OutOfMemoryError, as LibTorch's CUDA
/// allocator throws when a device (or a CUDA limit) is full, so one
/// `catch (const c10::OutOfMemoryError&)` tells "does not fit" from "is
/// broken" on either device.
class OutOfMemoryError : public c10::OutOfMemoryError {
 public:
  OutOfMemoryError(int64_t requested, int64_t held, int64_t limit);

  int64_t requested_bytes() const { return requested_; } ///< bytes
  int64_t held_bytes() const { return held_; }           ///< bytes
  int64_t limit_bytes() const { return limit_; }         ///< bytes

 private:
  int64_t requested_;
  int64_t held_;
  int64_t limit_;
};

namespace memory {

/// Installs the counting CPU allocator. Idempotent and thread-safe; storages
/// allocated before the call are not counted (their frees are not either).
void install();

/// True once `install()` has run.
bool installed();

/// Bytes held now by tensor storages on `device` (counted since `install()`).
int64_t current_bytes(c10::Device device = c10::kCPU);

/// Highest `current_bytes` since install or the last `reset_peak` (bytes).
int64_t peak_bytes(c10::Device device = c10::kCPU);

/// Sets the peak to the current figure.
void reset_peak(c10::Device device = c10::kCPU);

/// Number of allocations since install (a count, not bytes).
int64_t allocation_count(c10::Device device = c10::kCPU);

/// Caps the counted CPU bytes: an allocation that would take `current_bytes`
/// past `limit_bytes` throws `OutOfMemoryError`. 0 removes the cap. Returns
/// the previous limit (bytes, 0 for none). Installs the allocator if needed.
int64_t set_limit(int64_t limit_bytes);

/// The current CPU limit in bytes (0: none).
int64_t limit();

/// Caps what `device` may hold. For the CPU this is `set_limit(limit_bytes)`.
/// For a CUDA device (CUDA builds) it sets the caching allocator's memory
/// fraction to `limit_bytes` / the device's total bytes, so reserving past
/// the limit throws c10::OutOfMemoryError, as a device of that size would
/// (the allocator counts reserved bytes, a little above `current_bytes`).
/// 0 removes the cap. Returns the previous limit (bytes, 0 for none).
int64_t set_limit(int64_t limit_bytes, c10::Device device);

/// The limit of `device` in bytes (0: none).
int64_t limit(c10::Device device);

/// Bytes of freed CPU blocks kept for reuse (not counted in current_bytes).
/// Under a limit, the cache is emptied before held + cached bytes would pass
/// it, so the process stays within the device it stands for.
int64_t cached_bytes();

/// Gives every cached CPU block back to the C library.
void empty_cache();

/// Turns the CPU block cache on (the default) or off; off empties it.
void set_caching(bool enabled);

/// Sets a limit (bytes) on `device` for the lifetime of the guard, then
/// restores the previous one.
class LimitGuard {
 public:
  explicit LimitGuard(int64_t limit_bytes, c10::Device device = c10::kCPU)
      : device_(device), previous_(set_limit(limit_bytes, device)) {}
  ~LimitGuard() { set_limit(previous_, device_); }
  LimitGuard(const LimitGuard&) = delete;
  LimitGuard& operator=(const LimitGuard&) = delete;

 private:
  c10::Device device_;
  int64_t previous_;
};

/// Where the held bytes go, in the four categories of training memory.
/// Every field is in bytes. Storages shared between tensors count once.
struct Breakdown {
  int64_t weights = 0;          ///< parameters and buffers of the module
  int64_t gradients = 0;        ///< `.grad()` of the parameters
  int64_t optimizer_state = 0;  ///< moments and buffers the optimizer keeps
  int64_t activations = 0;      ///< everything else held: saved activations,
                                ///< inputs, temporaries (current - the above)
  int64_t total = 0;            ///< `current_bytes(device)`
};

/// Splits `current_bytes(device)` into the four categories for `module`
/// trained by `optimizer` (may be null). Knows the state of LibTorch's Adam,
/// AdamW, SGD, RMSprop and Adagrad.
Breakdown breakdown(
    const torch::nn::Module& module,
    const torch::optim::Optimizer* optimizer = nullptr,
    c10::Device device = c10::kCPU);

/// Parses a size such as "512MiB", "80GiB", "2GB", "1.5GiB" or "4096" (bytes)
/// into bytes. Binary (KiB, MiB, GiB, TiB) and decimal (KB, MB, GB, TB) units;
/// a bare number is bytes. Throws c10::Error naming the text when it cannot.
int64_t parse_size(const std::string& text);

/// Formats bytes for people: "1.50 GiB", "12.0 MiB", "512 B".
std::string format_size(int64_t bytes);

/// This machine's physical memory (bytes), from sysconf; what a step that
/// sets no limit of its own must fit.
int64_t physical_bytes();

} // namespace memory
} // namespace remat
