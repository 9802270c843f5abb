#include "remat/rng_state.h"

#include <ATen/CPUGeneratorImpl.h>

#ifdef REMAT_WITH_CUDA
#include <ATen/cuda/CUDAGeneratorImpl.h>
#endif

#include <mutex>

namespace remat {
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

RngState RngState::capture(c10::Device device) {
  RngState s;
  s.cpu = swap_cpu(torch::Tensor());
#ifdef REMAT_WITH_CUDA
  if (device.is_cuda() && device.has_index()) {
    s.cuda_device = device.index();
    s.cuda = swap_cuda(s.cuda_device, torch::Tensor());
  }
#else
  (void)device;
#endif
  return s;
}

RngScope::RngScope(const RngState& state, RngState* advanced) {
  if (!state.defined()) {
    return;
  }
  found_.cpu = swap_cpu(state.cpu);
  advanced_ = advanced;
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
  const torch::Tensor cpu = swap_cpu(found_.cpu);
  torch::Tensor cuda;
#ifdef REMAT_WITH_CUDA
  if (found_.cuda.defined()) {
    cuda = swap_cuda(found_.cuda_device, found_.cuda);
  }
#endif
  if (advanced_ != nullptr) {
    advanced_->cpu = cpu;
    if (cuda.defined()) {
      advanced_->cuda_device = found_.cuda_device;
      advanced_->cuda = cuda;
    }
  }
}

} // namespace remat
