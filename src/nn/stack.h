// Runs a stack of layers under a checkpoint Schedule. Shared by every model
// family, so a policy means the same thing for all of them.
#pragma once

#include "remat/checkpoint.h"
#include "remat/policy.h"

#include <string>
#include <vector>

namespace remat {
namespace nn {
namespace detail {

/// `call(layer, hidden, side, mode)` runs one layer; `side` are the tensors
/// every layer reads besides the hidden state (mask, rotary tables). A
/// kRecompute segment becomes one checkpoint over its layers; the other modes
/// are handled inside the layer.
template <typename Layer, typename Call>
torch::Tensor run_stack(
    const std::vector<Layer>& layers,
    torch::Tensor hidden,
    const std::vector<torch::Tensor>& side,
    const Schedule& schedule,
    const Call& call) {
  for (const auto& seg : schedule.segments) {
    if (seg.mode != SegmentMode::kRecompute) {
      for (int64_t i = seg.begin; i < seg.end; ++i) {
        hidden = call(layers[i], hidden, side, seg.mode);
      }
      continue;
    }
    std::vector<Layer> segment(layers.begin() + seg.begin, layers.begin() + seg.end);
    std::vector<torch::Tensor> params;
    for (const auto& layer : segment) {
      auto p = layer->parameters();
      params.insert(params.end(), p.begin(), p.end());
    }
    std::vector<torch::Tensor> inputs{hidden};
    inputs.insert(inputs.end(), side.begin(), side.end());
    // Captures copies of the layer holders and of `call`: it runs again in
    // backward, after this frame is gone.
    auto fn = [segment, call](const std::vector<torch::Tensor>& in) mutable {
      std::vector<torch::Tensor> rest(in.begin() + 1, in.end());
      torch::Tensor h = in[0];
      for (const auto& layer : segment) {
        h = call(layer, h, rest, SegmentMode::kStore);
      }
      return std::vector<torch::Tensor>{h};
    };
    hidden = checkpoint(
        fn, inputs,
        CheckpointOptions()
            .parameters(std::move(params))
            .name("layers[" + std::to_string(seg.begin) + "," +
                  std::to_string(seg.end) + ")"))[0];
  }
  return hidden;
}

} // namespace detail
} // namespace nn
} // namespace remat
