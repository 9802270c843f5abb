// A cross-entropy over a linear layer's output that never holds the whole
// [tokens, vocab] logits: the language-model head and its loss in one
// autograd Function, as Liger-Kernel's FusedLinearCrossEntropy and Apple's
// "Cut Your Losses" (cut cross-entropy) do.
//
// torch's linear + cross_entropy keeps, until backward, the fp32 log-softmax
// of every row: N * vocab * 4 bytes (250 MiB for 2046 tokens of a 32000-token
// vocabulary). linear_cross_entropy processes the rows in chunks whose logits
// take about `chunk_bytes`, keeps only its inputs and one fp32 log-sum-exp per
// row, and recomputes each chunk's logits in backward.
//
// Precision: the matmuls run in the autocast dtype when autocast is on for
// the input's device (decided in forward, reused in backward, where autocast
// does not apply), else in the input's dtype; the softmax and log-sum-exp in
// fp32. The loss is fp32; gradients come back in the inputs' dtypes.
//
// Example:
//   // given: torch::Tensor hidden = torch::randn({512, 256});  // [N, h]
//   // given: torch::nn::Linear lm_head(256, 32000);
//   // given: torch::Tensor labels = torch::randint(32000, {512});  // [N]
//   // hidden [N, h] (after the final norm), weight [vocab, h], labels [N]
//   auto loss = remat::nn::linear_cross_entropy(hidden, lm_head->weight,
//       labels, remat::nn::LinearCrossEntropyOptions().chunk_bytes(16 << 20));
//   loss.backward();
#pragma once

#include <torch/arg.h>
#include <torch/types.h>

#include <cstdint>

namespace remat {
namespace nn {

/// Settings of linear_cross_entropy.
///
/// Example:
///   auto options = remat::nn::LinearCrossEntropyOptions().ignore_index(-100)
///                      .chunk_bytes(32 << 20);  // 32 MiB of logits per chunk
struct LinearCrossEntropyOptions {
  /// Rows whose label equals this add nothing to the loss or the count.
  TORCH_ARG(int64_t, ignore_index) = -100;
  /// Bytes (not MiB) of fp32 logits per chunk: a chunk has
  /// max(1, chunk_bytes / (vocab * 4)) rows. Must be > 0.
  TORCH_ARG(int64_t, chunk_bytes) = int64_t(32) << 20;
};

/// Mean cross-entropy of softmax(hidden @ weight^T) against `labels`, over
/// the rows whose label is not ignore_index; the same value and gradients as
/// torch::nn::functional::cross_entropy(linear(hidden, weight).to(kFloat),
/// labels, ignore_index) without holding the logits.
///
/// hidden: [N, h], floating; weight: [vocab, h], floating (the same dtype as
/// hidden unless autocast is on); labels: [N] int64, each in [0, vocab) or
/// ignore_index. Returns a 0-dim float32 tensor. When no row counts (N == 0,
/// or every label ignored) the loss is NaN (0 / 0) and the gradients are
/// zero, as with torch's mean reduction.
///
/// Only the gradients autograd asks for are computed: a frozen weight (LoRA)
/// costs no [vocab, h] gradient. Holds until backward: hidden, weight and
/// labels (references, no copies) and N * 4 bytes of log-sum-exp.
torch::Tensor linear_cross_entropy(
    const torch::Tensor& hidden,
    const torch::Tensor& weight,
    const torch::Tensor& labels,
    const LinearCrossEntropyOptions& options = {});

} // namespace nn
} // namespace remat
