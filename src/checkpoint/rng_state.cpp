#include "checkpoint/rng_state.h"

#include <ATen/CPUGeneratorImpl.h>

#ifdef REMAT_WITH_CUDA
#include <ATen/cuda/CUDAGeneratorImpl.h>
#endif

#include <mutex>

namespace remat {
namespace detail {
namespace {

torch::Tensor swap_cpu(const torch::Tensor& state) {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  auto found = gen.get_state();
  if (state.defined()) {
    gen.set_state(state);
  }
  return found;
}

#ifdef REMAT_WITH_CUDA
torch::Tensor swap_cuda(c10::DeviceIndex device, const torch::Tensor& state) {
  auto gen = at::cuda::detail::getDefaultCUDAGenerator(device);
  std::lock_guard<std::mutex> lock(gen.mutex());
  auto found = gen.get_state();
  if (state.defined()) {
    gen.set_state(state);
  }
  return found;
}
#endif

} // namespace

RngState RngState::capture(const std::vector<torch::Tensor>& inputs) {
  RngState s;
  s.cpu = swap_cpu(torch::Tensor());
#ifdef REMAT_WITH_CUDA
  for (const auto& t : inputs) {
    if (t.defined() && t.is_cuda()) {
      s.cuda_device = t.device().index();
      s.cuda = swap_cuda(s.cuda_device, torch::Tensor());
      break;
    }
  }
#else
  (void)inputs;
#endif
  return s;
}

RngScope::RngScope(const RngState& state) {
  if (!state.defined()) {
    return;
  }
  found_.cpu = swap_cpu(state.cpu);
#ifdef REMAT_WITH_CUDA
  if (state.cuda.defined()) {
    found_.cuda_device = state.cuda_device;
    found_.cuda = swap_cuda(state.cuda_device, state.cuda);
  }
#endif
}

RngScope::~RngScope() {
  if (!found_.defined()) {
    return;
  }
  swap_cpu(found_.cpu);
#ifdef REMAT_WITH_CUDA
  if (found_.cuda.defined()) {
    swap_cuda(found_.cuda_device, found_.cuda);
  }
#endif
}

} // namespace detail
} // namespace remat
