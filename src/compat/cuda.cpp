// CUDA caching-allocator statistics across LibTorch versions (CUDA builds).
#include "compat/torch.h"

#ifdef REMAT_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>

#include <mutex>

namespace remat {
namespace compat {

void initialise_cuda(c10::DeviceIndex device) {
  static std::once_flag once;
  std::call_once(once, [device] {
    (void)at::empty({0}, at::TensorOptions().device(c10::kCUDA, device));
  });
}

CudaMemoryStats cuda_memory_stats(c10::DeviceIndex device) {
  initialise_cuda(device);
  // StatType::AGGREGATE, the first entry of every per-pool array; the enum
  // moved namespaces between 1.13 and 2.x, its value did not.
  constexpr size_t kAll = 0;
  const auto s = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
  CudaMemoryStats out;
  out.current_bytes = s.allocated_bytes[kAll].current;
  out.peak_bytes = s.allocated_bytes[kAll].peak;
  out.allocations = s.allocation[kAll].allocated;
  out.reserved_bytes = s.reserved_bytes[kAll].current;
  return out;
}

} // namespace compat
} // namespace remat
#endif
