// Dropout that keeps a 1-byte mask for backward.
//
// LibTorch's CPU dropout (1.13) draws a float noise tensor with bernoulli_
// and saves it: 4 bytes per element and a slow draw. remat's draws uniform
// numbers from the same default generator (so checkpoint recompute replays
// it exactly), keeps a bool mask (1 byte per element), and scales the kept
// values by 1 / (1 - p).
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
