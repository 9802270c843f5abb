#include "remat/nn/dropout.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <mutex>

namespace remat {
namespace nn {
namespace {

// One 64-bit draw from the default CPU generator per call: seeding and
// checkpoint recompute (which restores that generator) see the same masks.
uint64_t draw_seed() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get<at::CPUGeneratorImpl>()->random64();
}

// splitmix64 of a counter: a strong enough hash for dropout masks, and each
// element is independent, so the mask is built in parallel and does not
// depend on the thread count. LibTorch 1.13's CPU uniform_ is a serial
// mt19937 loop that dominated a training step's forward here.
inline uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

torch::Tensor cpu_drop_mask(const torch::Tensor& input, double p) {
  auto drop = torch::empty(input.sizes(), input.options().dtype(torch::kBool));
  bool* out = drop.data_ptr<bool>();
  const uint64_t seed = draw_seed();
  // P(hash < threshold) = p, on the top 32 bits.
  const auto threshold = static_cast<uint64_t>(p * 4294967296.0);
  at::parallel_for(0, drop.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint64_t z = mix(seed + static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ULL);
      out[i] = (z >> 32) < threshold;
    }
  });
  return drop;
}

} // namespace

torch::Tensor dropout(const torch::Tensor& input, double p, bool training) {
  TORCH_CHECK(p >= 0 && p < 1, "remat::nn::dropout: expected p in [0, 1), but got ", p);
  if (!training || p == 0) {
    return input;
  }
  auto drop = input.is_cpu()
      ? cpu_drop_mask(input, p)
      : torch::rand_like(input, input.options().dtype(torch::kFloat)) < p;
  // masked_fill saves only the bool mask for its backward.
  return input.masked_fill(drop, 0).mul_(1.0 / (1.0 - p));
}

} // namespace nn
} // namespace remat
