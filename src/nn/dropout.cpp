#include "remat/nn/dropout.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <mutex>

namespace remat {
namespace nn {
namespace {

// splitmix64 of a counter: a strong enough hash for dropout masks, and each
// element is independent, so the mask is built in parallel and does not
// depend on the thread count. LibTorch 1.13's CPU uniform_ is a serial
// mt19937 loop that dominated a training step's forward here.
inline uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Element i is dropped when the top 32 bits of its hash fall below
// p * 2^32, so P(drop) = p.
inline bool dropped(uint64_t seed, int64_t i, uint64_t threshold) {
  return (mix(seed + static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ULL) >> 32) < threshold;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// One pass forward (draw, mask, scale) and one pass backward (mask, scale),
// where masked_fill + mul_ + a separate draw took three and allocated twice.
// Saves only the 1-byte keep mask.
struct CpuDropout : public torch::autograd::Function<CpuDropout> {
  static torch::Tensor forward(
      AutogradContext* ctx, const torch::Tensor& input, double p, uint64_t seed) {
    auto x = input.contiguous();
    auto out = torch::empty_like(x, at::MemoryFormat::Contiguous);
    auto keep = torch::empty(x.sizes(), x.options().dtype(torch::kBool));
    bool* k = keep.data_ptr<bool>();
    const auto threshold = static_cast<uint64_t>(p * 4294967296.0);
    const double scale = 1.0 / (1.0 - p);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, x.scalar_type(), "remat::nn::dropout", [&] {
          using opmath = at::opmath_type<scalar_t>;
          const auto s = static_cast<opmath>(scale);
          const scalar_t* in = x.data_ptr<scalar_t>();
          scalar_t* o = out.data_ptr<scalar_t>();
          at::parallel_for(0, x.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) {
              const bool kept = !dropped(seed, i, threshold);
              k[i] = kept;
              o[i] = kept ? static_cast<scalar_t>(static_cast<opmath>(in[i]) * s)
                          : static_cast<scalar_t>(0);
            }
          });
        });
    ctx->save_for_backward({keep});
    ctx->saved_data["scale"] = scale;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto keep = ctx->get_saved_variables()[0];
    const double scale = ctx->saved_data["scale"].toDouble();
    auto g = grads[0].contiguous();
    auto out = torch::empty_like(g, at::MemoryFormat::Contiguous);
    const bool* k = keep.data_ptr<bool>();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, g.scalar_type(), "remat::nn::dropout_backward", [&] {
          using opmath = at::opmath_type<scalar_t>;
          const auto s = static_cast<opmath>(scale);
          const scalar_t* in = g.data_ptr<scalar_t>();
          scalar_t* o = out.data_ptr<scalar_t>();
          at::parallel_for(0, g.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i) {
              o[i] = k[i] ? static_cast<scalar_t>(static_cast<opmath>(in[i]) * s)
                          : static_cast<scalar_t>(0);
            }
          });
        });
    return {out, torch::Tensor(), torch::Tensor()};
  }
};

} // namespace

// One 64-bit draw from the default CPU generator per call: seeding and
// checkpoint recompute (which restores that generator) see the same masks.
uint64_t draw_dropout_seed() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get<at::CPUGeneratorImpl>()->random64();
}

bool seeded_dropout_supports(const torch::Tensor& input) {
  return input.is_cpu() && at::isFloatingType(input.scalar_type());
}

torch::Tensor seeded_dropout(const torch::Tensor& input, double p, uint64_t seed) {
  TORCH_CHECK(p >= 0 && p < 1, "remat::nn::seeded_dropout: expected p in [0, 1), but got ", p);
  TORCH_CHECK(
      seeded_dropout_supports(input),
      "remat::nn::seeded_dropout: expected a CPU floating-point tensor, but got ",
      input.device(), " ", input.scalar_type());
  if (p == 0) {
    return input;
  }
  return CpuDropout::apply(input, p, seed);
}

torch::Tensor dropout(const torch::Tensor& input, double p, bool training) {
  TORCH_CHECK(p >= 0 && p < 1, "remat::nn::dropout: expected p in [0, 1), but got ", p);
  if (!training || p == 0) {
    return input;
  }
  if (seeded_dropout_supports(input)) {
    return CpuDropout::apply(input, p, draw_dropout_seed());
  }
  auto drop = torch::rand_like(input, input.options().dtype(torch::kFloat)) < p;
  // masked_fill saves only the bool mask for its backward.
  return input.masked_fill(drop, 0).mul_(1.0 / (1.0 - p));
}

} // namespace nn
} // namespace remat
