// Where a model trains: "cpu", "cuda" or "cuda:N", and the few device
// operations that differ between a CPU-only and a CUDA build. This header
// has no CUDA includes; on a build without CUDA every CUDA device is refused
// with the reason.
//
// Example:
//   // given: torch::nn::Linear model(256, 256);
//   auto device = remat::parse_device("cuda:1");       // c10::Device
//   device = remat::require_device(device);            // throws: no GPU here
//   model->to(device);
//   ...
//   remat::synchronize(device);                   // before reading a clock
#pragma once

#include <c10/core/Device.h>

#include <cstdint>
#include <string>

namespace at {
class Tensor;
}

namespace remat {

/// Parses "cpu", "cuda" or "cuda:N". Throws c10::Error ("expected cpu, cuda
/// or cuda:N, but got 'x'") for anything else. Says nothing about whether
/// the device is there (require_device does).
c10::Device parse_device(const std::string& text);

/// True when this library was built against a LibTorch with CUDA.
bool built_with_cuda();

/// "" when this process can run on `device`, else one line saying why not:
/// the build has no CUDA, no GPU is visible, or the index is past the
/// devices there are.
std::string device_unavailable_reason(c10::Device device);

/// `device` with its index filled in ("cuda" -> "cuda:0"), after checking
/// that it is there; throws c10::Error with device_unavailable_reason.
c10::Device require_device(c10::Device device);

/// Makes a CUDA device the calling thread's current one (kernels and
/// allocations without an explicit device go there). Nothing for the CPU.
void make_current(c10::Device device);

/// Waits for the work queued on a CUDA device, so that a clock read after it
/// measures that work. Nothing for the CPU (its work is synchronous).
void synchronize(c10::Device device);

/// "cpu", or "cuda:0 (NVIDIA H200, 139.8 GiB)".
std::string describe_device(c10::Device device);

/// The state of the default random generator of a CUDA device (dropout on
/// CUDA draws from it); an undefined tensor for the CPU.
at::Tensor cuda_rng_state(c10::Device device);

/// Puts a state from cuda_rng_state back. Nothing for the CPU or for an
/// undefined state.
void set_cuda_rng_state(c10::Device device, const at::Tensor& state);

} // namespace remat
