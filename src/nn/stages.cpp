#include "remat/nn/stages.h"

#include <c10/util/Exception.h>

namespace remat {
namespace nn {

ObservedStack::ObservedStack(std::shared_ptr<LayerStack> inner, Before before, After after)
    : inner_(std::move(inner)), before_(std::move(before)), after_(std::move(after)) {
  TORCH_CHECK(inner_ != nullptr, "remat::nn::ObservedStack: expected a layer stack, but got none");
}

int64_t ObservedStack::num_layers() const {
  return inner_->num_layers();
}

torch::Tensor ObservedStack::layer_forward(
    int64_t i,
    const torch::Tensor& hidden,
    const SideInputs& side,
    SegmentMode mode) {
  if (before_) {
    before_(i, hidden, mode);
  }
  auto out = inner_->layer_forward(i, hidden, side, mode);
  if (after_) {
    after_(i, out);
  }
  return out;
}

std::vector<torch::Tensor> ObservedStack::layer_parameters(int64_t i) const {
  return inner_->layer_parameters(i);
}

std::vector<SegmentMode> ObservedStack::selective_modes(int64_t i) const {
  return inner_->selective_modes(i);
}

} // namespace nn
} // namespace remat
