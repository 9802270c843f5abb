// Dropout that keeps a 1-byte mask for backward.
//
// LibTorch's CPU dropout (1.13) draws a float noise tensor with a serial
// mt19937 bernoulli_ and saves it: 4 bytes per element and a slow draw that
// dominated a BERT step's forward here. remat's takes one 64-bit seed from the
// default CPU generator per call (so seeding, and checkpoint recompute, which
// restores that generator, replay it exactly), hashes element indices with
// splitmix64 in parallel into a bool mask (1 byte per element, independent of
// the thread count), and scales the kept values by 1 / (1 - p). Other devices
// use rand_like.
//
// Example:
//   // given: torch::Tensor x = torch::randn({8, 128, 256});
//   auto y = remat::nn::dropout(x, /*p=*/0.1, /*training=*/true);
#pragma once

#include <torch/types.h>

namespace remat {
namespace nn {

/// Zeroes each element with probability `p` when `training`, scaling the
/// rest by 1 / (1 - p); returns `input` unchanged otherwise or when p == 0.
torch::Tensor dropout(const torch::Tensor& input, double p, bool training);

/// The seed that dropout() draws for a CPU tensor: one 64-bit number from
/// the default CPU generator.
uint64_t draw_dropout_seed();

/// Whether seeded_dropout() takes `input`: a CPU floating-point tensor.
/// dropout() of any other tensor draws its mask with rand_like, which no
/// seed replays.
bool seeded_dropout_supports(const torch::Tensor& input);

/// dropout() of a CPU floating-point tensor with the mask of `seed`, in
/// training: the same seed and shape give the same mask, so a caller that
/// keeps the seed (8 bytes) can apply the mask again in a recompute.
/// dropout(x, p, true) equals seeded_dropout(x, p, draw_dropout_seed()).
///
/// Example:
///   // given: torch::Tensor x = torch::randn({8, 128, 256});
///   const uint64_t seed = remat::nn::draw_dropout_seed();
///   auto y = remat::nn::seeded_dropout(x, 0.1, seed);
torch::Tensor seeded_dropout(const torch::Tensor& input, double p, uint64_t seed);

} // namespace nn
} // namespace remat
