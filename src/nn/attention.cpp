#include "remat/nn/attention.h"

#include "remat/nn/dropout.h"

#include <torch/torch.h>

#include <cmath>

namespace remat {
namespace nn {

AttentionKind parse_attention(const std::string& text) {
  if (text == "eager") {
    return AttentionKind::kEager;
  }
  TORCH_CHECK(false, "expected an attention kind (eager), but got '", text, "'");
}

const char* to_string(AttentionKind kind) {
  switch (kind) {
    case AttentionKind::kEager:
      return "eager";
  }
  return "?";
}

namespace {

torch::Tensor eager(
    const torch::Tensor& q,
    const torch::Tensor& k,
    const torch::Tensor& v,
    const torch::Tensor& mask,
    const AttentionOptions& o) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  auto scores = torch::matmul(q, k.transpose(-2, -1)).mul_(scale);
  if (mask.defined()) {
    scores = scores + mask;
  }
  if (o.causal()) {
    const auto sq = q.size(-2);
    const auto sk = k.size(-2);
    // Query i (offset by sk - sq when a cache precedes it) sees keys <= i.
    auto drop = torch::ones({sq, sk}, q.options().dtype(torch::kBool))
                    .triu(sk - sq + 1);
    scores = scores.masked_fill(drop, -std::numeric_limits<float>::infinity());
  }
  auto probs = torch::softmax(scores, -1);
  if (o.training() && o.dropout() > 0) {
    probs = remat::nn::dropout(probs, o.dropout(), /*training=*/true);
  }
  return torch::matmul(probs, v);
}

} // namespace

torch::Tensor attention(
    const torch::Tensor& q,
    const torch::Tensor& k,
    const torch::Tensor& v,
    const torch::Tensor& mask,
    const AttentionOptions& options) {
  TORCH_CHECK(
      q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
      "remat::nn::attention: expected q, k, v of shape [batch, heads, seq, "
      "head_dim], but got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  switch (options.kind()) {
    case AttentionKind::kEager:
      return eager(q, k, v, mask, options);
  }
  TORCH_INTERNAL_ASSERT(false, "unknown attention kind");
}

} // namespace nn
} // namespace remat
