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
//   auto y = remat::nn::dropout(x, 0.1, is_training());
#pragma once

#include <torch/types.h>

namespace remat {
namespace nn {

/// Zeroes each element with probability `p` when `training`, scaling the
/// rest by 1 / (1 - p); returns `input` unchanged otherwise or when p == 0.
torch::Tensor dropout(const torch::Tensor& input, double p, bool training);

} // namespace nn
} // namespace remat
