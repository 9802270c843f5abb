// Devices: parsing, availability, synchronization and the CUDA generator,
// with the CUDA calls under REMAT_WITH_CUDA (remat/device.h).
#include "remat/device.h"

#include "remat/memory.h"

#include <ATen/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#ifdef REMAT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

#include <mutex>

namespace remat {

c10::Device parse_device(const std::string& text) {
  bool ok = text == "cpu" || text == "cuda";
  if (!ok && text.rfind("cuda:", 0) == 0 && text.size() > 5 && text.size() <= 8) {
    ok = text.find_first_not_of("0123456789", 5) == std::string::npos;
  }
  TORCH_CHECK(ok, "expected cpu, cuda or cuda:N, but got '", text, "'");
  return c10::Device(text);
}

bool built_with_cuda() {
#ifdef REMAT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string device_unavailable_reason(c10::Device device) {
  if (device.is_cpu()) {
    return "";
  }
  if (!device.is_cuda()) {
    return "remat runs on cpu or cuda, not " + device.str();
  }
#ifdef REMAT_WITH_CUDA
  const int64_t count = c10::cuda::device_count();
  if (count == 0) {
    return device.str() + " needs a GPU, but none is visible (this is a CUDA build of "
           "LibTorch " TORCH_VERSION "; no device or no driver)";
  }
  if (device.has_index() && device.index() >= count) {
    return device.str() + " is not there: " + std::to_string(count) + " CUDA device" +
        (count == 1 ? " is" : "s are") + " visible (cuda:0" +
        (count > 1 ? " to cuda:" + std::to_string(count - 1) : std::string()) + ")";
  }
  return "";
#else
  return device.str() + " needs a CUDA build of LibTorch, but remat was built against "
         "LibTorch " TORCH_VERSION " without CUDA";
#endif
}

c10::Device require_device(c10::Device device) {
  const auto why = device_unavailable_reason(device);
  TORCH_CHECK(why.empty(), why);
  if (device.is_cuda() && !device.has_index()) {
    return c10::Device(c10::kCUDA, 0);
  }
  return device;
}

void make_current(c10::Device device) {
#ifdef REMAT_WITH_CUDA
  if (device.is_cuda()) {
    c10::cuda::set_device(device.has_index() ? device.index() : 0);
  }
#endif
}

void synchronize(c10::Device device) {
#ifdef REMAT_WITH_CUDA
  if (device.is_cuda()) {
    c10::cuda::device_synchronize();
  }
#endif
}

std::string describe_device(c10::Device device) {
#ifdef REMAT_WITH_CUDA
  if (device.is_cuda()) {
    const auto index = device.has_index() ? device.index() : c10::DeviceIndex(0);
    const auto* p = at::cuda::getDeviceProperties(index);
    return "cuda:" + std::to_string(int(index)) + " (" + p->name + ", " +
        memory::format_size(static_cast<int64_t>(p->totalGlobalMem)) + ")";
  }
#endif
  return device.str();
}

at::Tensor cuda_rng_state(c10::Device device) {
#ifdef REMAT_WITH_CUDA
  if (device.is_cuda()) {
    auto gen = at::cuda::detail::getDefaultCUDAGenerator(device.has_index() ? device.index() : 0);
    std::lock_guard<std::mutex> lock(gen.mutex());
    return gen.get_state();
  }
#endif
  return at::Tensor();
}

void set_cuda_rng_state(c10::Device device, const at::Tensor& state) {
#ifdef REMAT_WITH_CUDA
  if (device.is_cuda() && state.defined()) {
    auto gen = at::cuda::detail::getDefaultCUDAGenerator(device.has_index() ? device.index() : 0);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(state);
  }
#endif
}

} // namespace remat
