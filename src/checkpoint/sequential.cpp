#include "remat/sequential.h"

#include <torch/torch.h>

namespace remat {

torch::Tensor checkpoint_sequential(
    torch::nn::Sequential& sequential,
    int64_t segments,
    const torch::Tensor& input,
    const CheckpointOptions& options) {
  const auto n = static_cast<int64_t>(sequential->size());
  TORCH_CHECK(
      segments >= 1 && segments <= n,
      "remat::checkpoint_sequential: expected 1 to ", n,
      " segments (the number of children), but got ", segments);
  std::vector<torch::nn::AnyModule> children(sequential->begin(), sequential->end());
  // Split as evenly as possible: the first n % segments get one extra.
  const int64_t base = n / segments;
  const int64_t extra = n % segments;
  torch::Tensor x = input;
  int64_t begin = 0;
  for (int64_t s = 0; s < segments; ++s) {
    const int64_t end = begin + base + (s < extra ? 1 : 0);
    std::vector<torch::nn::AnyModule> part(children.begin() + begin, children.begin() + end);
    auto run = [part](const std::vector<torch::Tensor>& in) mutable {
      torch::Tensor h = in[0];
      for (auto& m : part) {
        h = m.forward(h);
      }
      return std::vector<torch::Tensor>{h};
    };
    if (s + 1 == segments) {
      x = run({x})[0];
      break;
    }
    std::vector<torch::Tensor> params;
    for (auto& m : part) {
      auto p = m.ptr()->parameters();
      params.insert(params.end(), p.begin(), p.end());
    }
    auto opts = options;
    auto extra_params = opts.parameters();
    params.insert(params.end(), extra_params.begin(), extra_params.end());
    opts.parameters(std::move(params))
        .name(options.name() + "[" + std::to_string(begin) + "," + std::to_string(end) + ")");
    x = checkpoint(run, {x}, opts)[0];
    begin = end;
  }
  return x;
}

CheckpointedImpl::CheckpointedImpl(torch::nn::AnyModule module_, CheckpointOptions options_)
    : module(std::move(module_)), options(std::move(options_)) {
  TORCH_CHECK(!module.is_empty(), "remat::Checkpointed: expected a module, but got an empty one");
  reset();
}

void CheckpointedImpl::reset() {
  auto inner = module.ptr();
  for (const auto& p : inner->named_parameters(/*recurse=*/false)) {
    register_parameter(p.key(), p.value(), p.value().requires_grad());
  }
  for (const auto& b : inner->named_buffers(/*recurse=*/false)) {
    register_buffer(b.key(), b.value());
  }
  for (const auto& c : inner->named_children()) {
    register_module(c.key(), c.value());
  }
}

void CheckpointedImpl::pretty_print(std::ostream& stream) const {
  stream << "remat::Checkpointed(";
  module.ptr()->pretty_print(stream);
  stream << ")";
}

torch::Tensor CheckpointedImpl::forward(const torch::Tensor& input) {
  auto opts = options;
  auto params = module.ptr()->parameters();
  auto extra = opts.parameters();
  params.insert(params.end(), extra.begin(), extra.end());
  opts.parameters(std::move(params));
  auto inner = module;
  return checkpoint(
      [inner](const std::vector<torch::Tensor>& in) mutable {
        return std::vector<torch::Tensor>{inner.forward(in[0])};
      },
      {input}, opts)[0];
}

torch::nn::Sequential apply_activation_checkpointing(
    const torch::nn::Sequential& sequential,
    const ModulePredicate& predicate,
    const CheckpointOptions& options) {
  TORCH_CHECK(predicate, "remat::apply_activation_checkpointing: expected a predicate, but got an empty one");
  torch::nn::Sequential out;
  size_t i = 0;
  for (const auto& child : sequential->named_children()) {
    torch::nn::AnyModule any = *(sequential->begin() + static_cast<int64_t>(i));
    if (predicate(child.key(), *child.value())) {
      any = torch::nn::AnyModule(
          Checkpointed(any, CheckpointOptions(options).name(child.key())));
    }
    out->push_back(std::string(child.key()), std::move(any));
    ++i;
  }
  out->train(sequential->is_training());
  return out;
}

} // namespace remat
