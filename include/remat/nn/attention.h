// Scaled dot-product attention, the core that every remat model shares and
// that `selective-attention` recomputes.
//
// Example:
//   // q, k, v: [batch, heads, seq, head_dim]; mask: additive, broadcastable
//   // to [batch, heads, seq_q, seq_k] (0 keeps, -inf or a large negative
//   // number drops), or an undefined tensor.
//   auto ctx = remat::nn::attention(q, k, v, mask,
//       remat::nn::AttentionOptions().dropout(0.1).training(true));
#pragma once

#include <torch/arg.h>
#include <torch/types.h>

#include <string>

namespace remat {
namespace nn {

/// Which kernel computes attention.
enum class AttentionKind {
  kEager,     ///< softmax(q k^T / sqrt(d) + mask) v, keeping the scores
};

/// Parses "eager". Throws c10::Error naming the text otherwise.
AttentionKind parse_attention(const std::string& text);
const char* to_string(AttentionKind kind);

struct AttentionOptions {
  TORCH_ARG(AttentionKind, kind) = AttentionKind::kEager;
  /// Dropout on the attention probabilities (applied only when training).
  TORCH_ARG(double, dropout) = 0.0;
  TORCH_ARG(bool, training) = false;
  /// Mask out keys after the query position (decoders).
  TORCH_ARG(bool, causal) = false;
};

/// Returns the attention output, [batch, heads, seq_q, head_dim].
torch::Tensor attention(
    const torch::Tensor& q,
    const torch::Tensor& k,
    const torch::Tensor& v,
    const torch::Tensor& mask,
    const AttentionOptions& options = {});

} // namespace nn
} // namespace remat
