#include "remat/nn/fused.h"

#include "remat/autocast.h"

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Optional.h>
#include <torch/torch.h>

namespace remat {
namespace nn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Autocast off for its lifetime. The ops below run in dtypes decided
// explicitly, so that a backward called under autocast (which is not where
// the forward decided anything) computes what the forward implies.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// The dtype autocast would run linear in for activations of `dtype` on
// `device`, when autocast is on there and would cast them (float32, float16,
// bfloat16; not float64); nullopt otherwise.
c10::optional<c10::ScalarType> autocast_dtype(c10::ScalarType dtype, const c10::Device& device) {
  if (!at::isFloatingType(dtype) || dtype == at::kDouble) {
    return c10::nullopt;
  }
  const auto state = AutocastState::capture();
  if (device.is_cpu() && state.cpu_enabled) {
    return state.cpu_dtype;
  }
  if (device.is_cuda() && state.cuda_enabled) {
    return state.cuda_dtype;
  }
  return c10::nullopt;
}

// Saves x (in its own dtype) and rstd; the float copy of x, its squares and
// the normalised tensor, which the eager composition keeps, are recomputed.
struct RmsNormFunction : public torch::autograd::Function<RmsNormFunction> {
  static torch::Tensor forward(
      AutogradContext* ctx,
      const torch::Tensor& x,
      const torch::Tensor& weight,
      double eps) {
    NoAutocast no_autocast;
    // The same ops as the eager composition, so the output is bit-equal.
    auto xf = x.to(torch::kFloat);
    auto rstd = torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
    auto out = weight * (xf * rstd).to(x.scalar_type());
    ctx->save_for_backward({x, rstd, weight});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    NoAutocast no_autocast;
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& rstd = saved[1];
    const auto& weight = saved[2];
    const auto& grad = grads[0];
    const auto dtype = x.scalar_type();
    auto xhat = x.to(torch::kFloat) * rstd;
    torch::Tensor grad_x;
    torch::Tensor grad_weight;
    if (ctx->needs_input_grad(1)) {
      // Eager: (grad * normalised cast to x's dtype), summed to [H].
      grad_weight = (grad * xhat.to(dtype))
                        .reshape({-1, weight.size(0)})
                        .sum(0)
                        .to(weight.scalar_type());
    }
    if (ctx->needs_input_grad(0)) {
      // The gradient reaches the normalised tensor in x's dtype, then float
      // (the two casts of the eager graph). With xhat = x * rstd:
      //   grad_x = rstd * (g - xhat * mean(g * xhat)).
      // g is a fresh tensor, and xhat is not needed after: in place.
      auto g = (grad * weight).to(dtype).to(torch::kFloat);
      auto dot = (g * xhat).mean(-1, /*keepdim=*/true);
      grad_x = g.sub_(xhat.mul_(dot)).mul_(rstd).to(dtype);
    }
    return {grad_x, grad_weight, torch::Tensor()};
  }
};

// silu(gate) * up keeping gate and up; backward as the eager graph's
// (MulBackward, then SiluBackward on gate).
struct SwigluFunction : public torch::autograd::Function<SwigluFunction> {
  static torch::Tensor forward(
      AutogradContext* ctx,
      const torch::Tensor& gate,
      const torch::Tensor& up) {
    NoAutocast no_autocast;
    ctx->save_for_backward({gate, up});
    return torch::silu(gate) * up;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    NoAutocast no_autocast;
    const auto saved = ctx->get_saved_variables();
    const auto& gate = saved[0];
    const auto& up = saved[1];
    const auto& grad = grads[0];
    torch::Tensor grad_gate;
    torch::Tensor grad_up;
    if (ctx->needs_input_grad(1)) {
      grad_up = (grad * torch::silu(gate)).to(up.scalar_type());
    }
    if (ctx->needs_input_grad(0)) {
      grad_gate = at::silu_backward((grad * up).to(gate.scalar_type()), gate);
    }
    return {grad_gate, grad_up};
  }
};

// linear(silu(gate) * up, weight) keeping gate and up (and the weight): the
// product is recomputed in backward, and only for the weight's gradient.
// The linear runs in the dtype chosen in forward (saved_data "dtype").
struct SwigluLinearFunction : public torch::autograd::Function<SwigluLinearFunction> {
  static torch::Tensor forward(
      AutogradContext* ctx,
      const torch::Tensor& gate,
      const torch::Tensor& up,
      const torch::Tensor& weight) {
    const auto act_dtype = at::result_type(gate, up);
    const auto autocast = autocast_dtype(act_dtype, gate.device());
    const auto dtype = autocast.value_or(act_dtype);
    NoAutocast no_autocast;
    TORCH_CHECK(
        autocast || weight.scalar_type() == act_dtype,
        "remat::nn::swiglu_linear: expected down_weight of the activations' dtype ",
        act_dtype, " (or autocast on), but got ", weight.scalar_type());
    auto a = torch::silu(gate);
    a = a.scalar_type() == act_dtype ? a.mul_(up) : a * up;
    auto out = torch::linear(a.to(dtype), weight.to(dtype));
    ctx->save_for_backward({gate, up, weight});
    ctx->saved_data["dtype"] = static_cast<int64_t>(dtype);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    NoAutocast no_autocast;
    const auto saved = ctx->get_saved_variables();
    const auto& gate = saved[0];
    const auto& up = saved[1];
    const auto& weight = saved[2];
    const auto dtype = static_cast<c10::ScalarType>(ctx->saved_data["dtype"].toInt());
    const auto act_dtype = at::result_type(gate, up);
    const auto grad = grads[0].to(dtype);
    const int64_t out_features = weight.size(0);
    const int64_t in_features = weight.size(1);
    const bool need_gate = ctx->needs_input_grad(0);
    const bool need_up = ctx->needs_input_grad(1);
    const bool need_weight = ctx->needs_input_grad(2);
    // Ordered so that at most three [..., I] temporaries live at once.
    torch::Tensor s;
    if (need_weight || need_up) {
      s = torch::silu(gate);
    }
    torch::Tensor grad_gate;
    torch::Tensor grad_up;
    torch::Tensor grad_weight;
    if (need_weight) {
      auto a = (s * up).to(dtype);
      grad_weight = grad.reshape({-1, out_features})
                        .t()
                        .mm(a.reshape({-1, in_features}))
                        .to(weight.scalar_type());
    }
    if (need_gate || need_up) {
      // The product's gradient, in the linear's dtype, then the product's
      // (a fresh tensor either way, so it may be scaled in place).
      auto grad_a = torch::matmul(grad, weight.to(dtype)).to(act_dtype);
      if (need_up) {
        grad_up = (grad_a * s).to(up.scalar_type());
      }
      s = torch::Tensor();
      if (need_gate) {
        grad_gate = at::silu_backward(grad_a.mul_(up).to(gate.scalar_type()), gate);
      }
    }
    return {grad_gate, grad_up, grad_weight};
  }
};

void check_gate_up(const char* what, const torch::Tensor& gate, const torch::Tensor& up) {
  TORCH_CHECK(
      gate.dim() >= 1 && gate.sizes() == up.sizes(),
      what, ": expected gate and up of the same shape [..., I], but got ",
      gate.sizes(), " and ", up.sizes());
}

} // namespace

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(
      x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1),
      "remat::nn::rms_norm: expected x [..., H] and weight [H], but got ", x.sizes(),
      " and ", weight.sizes());
  TORCH_CHECK(eps >= 0, "remat::nn::rms_norm: expected eps >= 0, but got ", eps);
  return RmsNormFunction::apply(x, weight, eps);
}

torch::Tensor swiglu(const torch::Tensor& gate, const torch::Tensor& up) {
  check_gate_up("remat::nn::swiglu", gate, up);
  return SwigluFunction::apply(gate, up);
}

torch::Tensor swiglu_linear(
    const torch::Tensor& gate,
    const torch::Tensor& up,
    const torch::Tensor& down_weight) {
  check_gate_up("remat::nn::swiglu_linear", gate, up);
  TORCH_CHECK(
      down_weight.dim() == 2 && down_weight.size(1) == gate.size(-1),
      "remat::nn::swiglu_linear: expected down_weight [H, ", gate.size(-1),
      "], but got ", down_weight.sizes());
  return SwigluLinearFunction::apply(gate, up, down_weight);
}

} // namespace nn
} // namespace remat
