#include "remat/nn/dropout.h"

#include <torch/torch.h>

namespace remat {
namespace nn {

torch::Tensor dropout(const torch::Tensor& input, double p, bool training) {
  TORCH_CHECK(p >= 0 && p < 1, "remat::nn::dropout: expected p in [0, 1), but got ", p);
  if (!training || p == 0) {
    return input;
  }
  auto drop = torch::rand_like(input, input.options().dtype(torch::kFloat)) < p;
  // masked_fill saves only the bool mask for its backward.
  return input.masked_fill(drop, 0).mul_(1.0 / (1.0 - p));
}

} // namespace nn
} // namespace remat
