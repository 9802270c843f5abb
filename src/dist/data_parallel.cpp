// GradReducer: gradients packed into flat buckets, summed across the group.
#include "remat/dist/data_parallel.h"

#include <c10/util/Exception.h>
#include <torch/nn/module.h>
#include <torch/torch.h>

namespace remat {
namespace dist {

GradReducer::GradReducer(
    std::shared_ptr<ProcessGroup> group,
    std::vector<torch::Tensor> params,
    GradReducerOptions options)
    : group_(std::move(group)), params_(std::move(params)), options_(options) {
  TORCH_CHECK(group_ != nullptr, "GradReducer: expected a process group, but got none");
  TORCH_CHECK(
      options_.bucket_bytes() >= 1, "bucket_bytes: expected a value >= 1, but got ",
      options_.bucket_bytes());
  // A bucket holds one dtype; a new one starts when the next parameter
  // would take it past bucket_bytes.
  std::vector<size_t> current;
  int64_t bytes = 0;
  for (size_t k = params_.size(); k-- > 0;) {
    const auto& p = params_[k];
    TORCH_CHECK(p.defined(), "GradReducer: parameter ", k, " is undefined");
    const int64_t b = p.numel() * static_cast<int64_t>(p.element_size());
    if (!current.empty() &&
        (bytes + b > options_.bucket_bytes() ||
         params_[current.front()].scalar_type() != p.scalar_type())) {
      buckets_.push_back(std::move(current));
      current.clear();
      bytes = 0;
    }
    current.push_back(k);
    bytes += b;
  }
  if (!current.empty()) {
    buckets_.push_back(std::move(current));
  }
}

void GradReducer::reduce() {
  torch::NoGradGuard no_grad;
  // Which parameters have a gradient on some rank: one that none has keeps
  // none (the optimizer then skips it, as it would in one process).
  auto has_grad = torch::zeros({static_cast<int64_t>(params_.size())});
  auto* flags = has_grad.data_ptr<float>();
  for (size_t k = 0; k < params_.size(); ++k) {
    flags[k] = params_[k].grad().defined() ? 1.0f : 0.0f;
  }
  Pending flag_sum = group_->all_reduce_sum_async({has_grad});
  std::vector<torch::Tensor> flats;
  std::vector<Pending> pending;
  flats.reserve(buckets_.size());
  pending.reserve(buckets_.size());
  for (const auto& bucket : buckets_) {
    std::vector<torch::Tensor> pieces;
    pieces.reserve(bucket.size());
    for (size_t k : bucket) {
      auto& p = params_[k];
      const auto& g = p.grad();
      pieces.push_back(g.defined() ? g.reshape({-1}) : torch::zeros({p.numel()}, p.options()));
    }
    flats.push_back(torch::cat(pieces));
    // Started at once: Gloo sums this bucket while the next one is packed.
    pending.push_back(group_->all_reduce_sum_async({flats.back()}));
  }
  flag_sum.wait();
  const double scale = options_.average() ? 1.0 / static_cast<double>(group_->world_size()) : 1.0;
  for (size_t b = 0; b < buckets_.size(); ++b) {
    pending[b].wait();
    auto& flat = flats[b];
    if (scale != 1.0) {
      flat.mul_(scale);
    }
    int64_t offset = 0;
    for (size_t k : buckets_[b]) {
      auto& p = params_[k];
      auto piece = flat.narrow(0, offset, p.numel()).view(p.sizes());
      offset += p.numel();
      if (flags[k] == 0.0f) {
        continue;
      }
      if (p.grad().defined()) {
        p.mutable_grad().copy_(piece);
      } else {
        p.mutable_grad() = piece.clone();
      }
    }
  }
}

void broadcast_parameters(ProcessGroup& group, torch::nn::Module& module, int64_t root) {
  if (group.world_size() == 1) {
    return;
  }
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> tensors;
  for (const auto& p : module.parameters()) {
    tensors.push_back(p.detach());
  }
  for (const auto& b : module.buffers()) {
    tensors.push_back(b.detach());
  }
  group.broadcast(tensors, root);
}

} // namespace dist
} // namespace remat
