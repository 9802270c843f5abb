#include "remat/autocast.h"

#include "compat/torch.h"

namespace remat {

AutocastState AutocastState::capture() {
  AutocastState s;
  s.cpu_enabled = compat::autocast_enabled(c10::DeviceType::CPU);
  s.cpu_dtype = compat::autocast_dtype(c10::DeviceType::CPU);
  s.cuda_enabled = compat::autocast_enabled(c10::DeviceType::CUDA);
  s.cuda_dtype = compat::autocast_dtype(c10::DeviceType::CUDA);
  return s;
}

AutocastState AutocastState::bf16(c10::Device device, bool enabled) {
  AutocastState s;
  s.cpu_enabled = enabled && !device.is_cuda();
  s.cuda_enabled = enabled && device.is_cuda();
  s.cuda_dtype = c10::kBFloat16;
  return s;
}

void AutocastState::apply() const {
  compat::set_autocast_enabled(c10::DeviceType::CPU, cpu_enabled);
  compat::set_autocast_dtype(c10::DeviceType::CPU, cpu_dtype);
  compat::set_autocast_enabled(c10::DeviceType::CUDA, cuda_enabled);
  compat::set_autocast_dtype(c10::DeviceType::CUDA, cuda_dtype);
}

} // namespace remat
