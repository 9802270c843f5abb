#include "remat/nn/loss.h"

#include "remat/autocast.h"

#include <torch/torch.h>

#include <algorithm>

namespace remat {
namespace nn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The dtype the head's matmuls run in: what autocast would pick for them
// (it casts floating inputs other than double), else the input's own.
c10::ScalarType compute_dtype(const torch::Tensor& hidden) {
  const auto state = AutocastState::capture();
  const auto type = hidden.device().type();
  if (hidden.scalar_type() != torch::kDouble) {
    if (type == c10::DeviceType::CPU && state.cpu_enabled) {
      return state.cpu_dtype;
    }
    if (type == c10::DeviceType::CUDA && state.cuda_enabled) {
      return state.cuda_dtype;
    }
  }
  return hidden.scalar_type();
}

// Every cast below is explicit; autocast is off inside forward and backward
// so that it neither recasts them nor pushes the fp32 softmax math down.
AutocastState autocast_off() {
  AutocastState s = AutocastState::capture();
  s.cpu_enabled = false;
  s.cuda_enabled = false;
  return s;
}

// Rows of one chunk of the fp32 logits.
int64_t chunk_rows(int64_t chunk_bytes, int64_t vocab) {
  return std::max<int64_t>(1, chunk_bytes / (vocab * 4));
}

// Forward: per chunk, logits -> fp32 log-sum-exp and target logit; keeps the
// inputs and lse [N] fp32. Backward: per chunk, recomputes the logits and
// forms (softmax - onehot) * grad / count, the gradient of the logits, then
// grad_hidden = g W and grad_weight += g^T hidden.
struct LinearCrossEntropy : public torch::autograd::Function<LinearCrossEntropy> {
  static torch::Tensor forward(
      AutogradContext* ctx,
      const torch::Tensor& hidden,
      const torch::Tensor& weight,
      const torch::Tensor& labels,
      int64_t ignore_index,
      int64_t chunk_bytes) {
    const auto compute = compute_dtype(hidden);
    AutocastScope no_autocast(autocast_off());
    const int64_t n = hidden.size(0);
    const int64_t vocab = weight.size(0);
    const int64_t rows = chunk_rows(chunk_bytes, vocab);
    const auto f32 = hidden.options().dtype(torch::kFloat);
    const auto w = weight.to(compute);
    const auto valid = labels.ne(ignore_index);
    const auto targets = labels.masked_fill(valid.logical_not(), 0);
    auto lse = torch::empty({n}, f32);
    auto sum = torch::zeros({}, f32);
    for (int64_t begin = 0; begin < n; begin += rows) {
      const int64_t m = std::min(rows, n - begin);
      auto logits = torch::mm(hidden.narrow(0, begin, m).to(compute), w.t()).to(torch::kFloat);
      auto target = logits.gather(1, targets.narrow(0, begin, m).unsqueeze(1)).squeeze(1);
      // logsumexp in place: torch::logsumexp would take two more chunks.
      auto max = logits.amax(1, /*keepdim=*/true);
      auto l = logits.sub_(max).exp_().sum(1).log_().add_(max.squeeze(1));
      sum.add_((l - target).masked_fill_(valid.narrow(0, begin, m).logical_not(), 0).sum());
      lse.narrow(0, begin, m).copy_(l);
    }
    auto count = valid.sum();
    ctx->save_for_backward({hidden, weight, labels, lse, count});
    ctx->saved_data["compute_dtype"] = static_cast<int64_t>(compute);
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["rows"] = rows;
    // 0 / 0 is NaN when no row counts, as torch's mean reduction gives.
    return sum / count.to(torch::kFloat);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& hidden = saved[0];
    const auto& weight = saved[1];
    const auto& labels = saved[2];
    const auto& lse = saved[3];
    const auto& count = saved[4];
    const auto compute = static_cast<c10::ScalarType>(ctx->saved_data["compute_dtype"].toInt());
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const int64_t rows = ctx->saved_data["rows"].toInt();
    const bool need_hidden = ctx->needs_input_grad(0);
    const bool need_weight = ctx->needs_input_grad(1);
    if (!need_hidden && !need_weight) {
      return {torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
    }
    AutocastScope no_autocast(autocast_off());
    const int64_t n = hidden.size(0);
    const auto f32 = hidden.options().dtype(torch::kFloat);
    // d loss / d sum of the counted rows' losses; where() keeps the rows of
    // an all-ignored batch at 0 rather than 0 * inf.
    const auto scale = grads[0].to(torch::kFloat) / count.to(torch::kFloat);
    const auto w = weight.to(compute);
    const auto valid = labels.ne(ignore_index);
    const auto targets = labels.masked_fill(valid.logical_not(), 0);

    torch::Tensor grad_hidden;
    if (need_hidden) {
      grad_hidden = torch::empty({n, hidden.size(1)}, hidden.options());
    }
    // bf16 chunks accumulate into fp32: one rounding at the end, not per chunk.
    const auto acc_dtype = (compute == torch::kBFloat16 || compute == torch::kHalf) ? torch::kFloat : compute;
    torch::Tensor grad_weight;
    if (need_weight) {
      grad_weight = torch::zeros(weight.sizes(), weight.options().dtype(acc_dtype));
    }
    for (int64_t begin = 0; begin < n; begin += rows) {
      const int64_t m = std::min(rows, n - begin);
      const auto h = hidden.narrow(0, begin, m).to(compute);
      auto g = torch::mm(h, w.t()).to(torch::kFloat);
      g.sub_(lse.narrow(0, begin, m).unsqueeze(1)).exp_();
      g.scatter_add_(1, targets.narrow(0, begin, m).unsqueeze(1), torch::full({m, 1}, -1.0, f32));
      auto row_scale = torch::zeros({m}, f32).masked_fill_(valid.narrow(0, begin, m), scale);
      g.mul_(row_scale.unsqueeze(1));
      const auto gc = g.to(compute);
      if (need_hidden) {
        auto out = grad_hidden.narrow(0, begin, m);
        if (compute == hidden.scalar_type()) {
          torch::mm_out(out, gc, w);
        } else {
          out.copy_(torch::mm(gc, w));
        }
      }
      if (need_weight) {
        if (acc_dtype == compute) {
          grad_weight.addmm_(gc.t(), h);
        } else {
          grad_weight.add_(torch::mm(gc.t(), h));
        }
      }
    }
    if (need_weight) {
      grad_weight = grad_weight.to(weight.scalar_type());
    }
    return {grad_hidden, grad_weight, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

} // namespace

torch::Tensor linear_cross_entropy(
    const torch::Tensor& hidden,
    const torch::Tensor& weight,
    const torch::Tensor& labels,
    const LinearCrossEntropyOptions& options) {
  const char* fn = "remat::nn::linear_cross_entropy: ";
  TORCH_CHECK(
      hidden.defined() && hidden.dim() == 2, fn, "expected hidden of shape [N, h], but got ",
      hidden.defined() ? hidden.sizes() : c10::IntArrayRef{}, hidden.defined() ? "" : " (undefined)");
  TORCH_CHECK(
      weight.defined() && weight.dim() == 2 && weight.size(1) == hidden.size(1), fn,
      "expected weight of shape [vocab, h] with h = ", hidden.size(1),
      " (hidden's last size), but got ", weight.defined() ? weight.sizes() : c10::IntArrayRef{});
  TORCH_CHECK(
      weight.size(0) > 0, fn, "expected a weight with at least one row (vocab > 0), but got ",
      weight.sizes());
  TORCH_CHECK(
      labels.defined() && labels.dim() == 1 && labels.size(0) == hidden.size(0), fn,
      "expected labels of shape [N] with N = ", hidden.size(0),
      " (hidden's rows), but got ", labels.defined() ? labels.sizes() : c10::IntArrayRef{});
  TORCH_CHECK(
      labels.scalar_type() == torch::kLong, fn, "expected labels of dtype int64, but got ",
      labels.scalar_type());
  TORCH_CHECK(
      at::isFloatingType(hidden.scalar_type()) && at::isFloatingType(weight.scalar_type()), fn,
      "expected floating-point hidden and weight, but got ", hidden.scalar_type(), " and ",
      weight.scalar_type());
  TORCH_CHECK(
      hidden.device() == weight.device() && hidden.device() == labels.device(), fn,
      "expected hidden, weight and labels on one device, but got ", hidden.device(), ", ",
      weight.device(), " and ", labels.device());
  const auto compute = compute_dtype(hidden);
  TORCH_CHECK(
      compute != hidden.scalar_type() || hidden.scalar_type() == weight.scalar_type(), fn,
      "expected weight of hidden's dtype ", hidden.scalar_type(),
      " (or autocast on), but got ", weight.scalar_type());
  TORCH_CHECK(
      options.chunk_bytes() > 0, fn, "expected chunk_bytes > 0, but got ", options.chunk_bytes());
  const int64_t vocab = weight.size(0);
  const auto bad = labels.ne(options.ignore_index()) & (labels.lt(0) | labels.ge(vocab));
  if (bad.any().item<bool>()) {
    TORCH_CHECK(
        false, fn, "expected labels in [0, ", vocab, ") or ignore_index ", options.ignore_index(),
        ", but got ", labels.masked_select(bad)[0].item<int64_t>());
  }
  return LinearCrossEntropy::apply(
      hidden, weight, labels, options.ignore_index(), options.chunk_bytes());
}

} // namespace nn
} // namespace remat
