// Fused autograd functions for the Llama layer's RMSNorm and SwiGLU MLP that
// keep fewer activation bytes than the eager composition, with the same
// outputs and gradients.
//
// Eager RMSNorm (x.float(), x * rsqrt(mean(x^2) + eps), weight * h) keeps the
// float input, its squares (LibTorch 1.13's mean), the normalised tensor and
// rstd; rms_norm keeps only its input and rstd, and recomputes the rest in
// backward. Eager down(silu(gate) * up) keeps gate, silu(gate), up and the
// product (down_proj's input); swiglu_linear keeps only gate and up (and the
// weight, a parameter), and recomputes silu(gate) * up in backward when the
// weight's gradient is needed.
//
// Mixed precision: swiglu_linear's matrix products run where CPU or CUDA
// autocast would run linear (the autocast dtype when autocast is on for the
// inputs' device, otherwise the activations' dtype); the dtype is decided in
// forward and used again in backward, which runs with autocast off whatever
// the caller's state. Gradients come back in each input's dtype.
//
// Example:
//   // given: torch::Tensor x = torch::randn({2, 128, 512});  // [B, S, H]
//   // given: torch::Tensor norm_weight = torch::ones({512});
//   // given: torch::nn::Linear gate_proj(512, 1376), up_proj(512, 1376);
//   // given: torch::Tensor down_weight = torch::randn({512, 1376});  // [H, I]
//   auto h = remat::nn::rms_norm(x, norm_weight, 1e-6);   // [B, S, H]
//   auto g = gate_proj->forward(h);                        // [B, S, I]
//   auto u = up_proj->forward(h);                          // [B, S, I]
//   auto y = remat::nn::swiglu_linear(g, u, down_weight);  // [B, S, H]
#pragma once

#include <torch/types.h>

namespace remat {
namespace nn {

/// weight * (x * rsqrt(mean(x^2, -1) + eps)), the normalisation computed in
/// float32 and cast back to x's dtype before the weight, as Hugging Face's
/// LlamaRMSNorm (so the output dtype is x's promoted with weight's).
/// x: [..., H]; weight: [H]. Keeps x and rstd (float32, [..., 1]) for
/// backward: 4 bytes per row beyond the input and the output.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);

/// silu(gate) * up, keeping only gate and up for backward (eager keeps
/// silu(gate) too). Not an autocast op (like silu and mul): computed in the
/// promoted dtype of gate and up. gate, up: [..., I], same shape.
torch::Tensor swiglu(const torch::Tensor& gate, const torch::Tensor& up);

/// linear(silu(gate) * up, down_weight) without a bias, keeping gate and up
/// only: the product, down_proj's input ([..., I], as large as gate), is
/// recomputed in backward, and only when down_weight needs its gradient.
/// gate, up: [..., I]; down_weight: [H, I]; returns [..., H] in the dtype the
/// linear would give (the autocast dtype under autocast).
torch::Tensor swiglu_linear(
    const torch::Tensor& gate,
    const torch::Tensor& up,
    const torch::Tensor& down_weight);

} // namespace nn
} // namespace remat
