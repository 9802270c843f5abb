// Scaled dot-product attention, the core that every remat model shares and
// that `selective-attention` recomputes. Three kernels compute it:
//
//   eager      softmax(q k^T / sqrt(d) + mask) v in a few big ops. Autograd
//              keeps the [batch, heads, seq_q, seq_k] probabilities (and
//              the scores) for backward: O(seq^2) bytes per layer.
//   blockwise  the FlashAttention algorithm on top of ATen matmuls. Forward
//              walks over blocks of queries and keys with an online softmax
//              and keeps only the output and one log-sum-exp per query row;
//              backward recomputes the blocks (FlashAttention-2). O(seq)
//              bytes held per layer, on any device, in any LibTorch.
//   sdpa       at::scaled_dot_product_attention (LibTorch >= 2.0 only), which
//              picks fused flash / memory-efficient kernels on CUDA.
//
// Masks and conventions shared by the kernels:
//   - `mask` is additive and broadcastable to [batch, heads, seq_q, seq_k]:
//     0 keeps a key, -inf or a large negative number drops it. It receives
//     no gradient (blockwise refuses one that requires grad).
//   - `causal` hides key j from query i when j > i + (seq_k - seq_q): the
//     queries are the last seq_q positions of the keys, as with a KV cache.
//   - A query row whose keys are all at -inf gives NaN in eager (softmax of
//     nothing), and 0 with a zero gradient in blockwise.
//
// Example:
//   // given: torch::Tensor q = torch::randn({2, 8, 128, 64});
//   // given: torch::Tensor k = torch::randn({2, 8, 128, 64});
//   // given: torch::Tensor v = torch::randn({2, 8, 128, 64});
//   // given: torch::Tensor mask;  // undefined: every key is kept
//   // q, k, v: [batch, heads, seq, head_dim]
//   auto ctx = remat::nn::attention(q, k, v, mask,
//       remat::nn::AttentionOptions()
//           .kind(remat::nn::AttentionKind::kBlockwise)
//           .causal(true)
//           .dropout(0.1)
//           .training(true));
#pragma once

#include <torch/arg.h>
#include <torch/types.h>

#include <string>

namespace remat {
namespace nn {

/// Which kernel computes attention.
enum class AttentionKind {
  kEager,     ///< softmax(q k^T / sqrt(d) + mask) v, keeping the scores
  kBlockwise, ///< FlashAttention on ATen matmuls: keeps O(seq) per layer
  kSdpa,      ///< at::scaled_dot_product_attention; needs LibTorch >= 2.0
};

/// Parses "eager", "blockwise" or "sdpa". Throws c10::Error naming the text
/// otherwise. "sdpa" parses on every build; it is refused when it runs on a
/// LibTorch older than 2.0.
AttentionKind parse_attention(const std::string& text);
const char* to_string(AttentionKind kind);

/// Throws c10::Error when this build's LibTorch cannot run `kind` (sdpa
/// before 2.0), naming the version and what to use instead.
void check_attention_supported(AttentionKind kind);

/// Options of one attention call.
///
/// Example:
///   auto options = remat::nn::AttentionOptions()
///                      .kind(remat::nn::AttentionKind::kBlockwise)
///                      .block_size(64);
struct AttentionOptions {
  TORCH_ARG(AttentionKind, kind) = AttentionKind::kEager;
  /// Dropout on the attention probabilities (applied only when training).
  /// Blockwise draws one seed from the default CPU generator per call and
  /// derives each block's mask from it, so backward regenerates the masks
  /// it needs (and a checkpoint's recompute, which restores the RNG, draws
  /// the same masks again). Its masks differ from eager's for the same seed;
  /// the masks are drawn on the CPU, which is slow for CUDA tensors.
  TORCH_ARG(double, dropout) = 0.0;
  TORCH_ARG(bool, training) = false;
  /// Mask out keys after the query position (decoders).
  TORCH_ARG(bool, causal) = false;
  /// Blockwise only: queries and keys per block (rows). Need not divide the
  /// sequence. On a 2-core CPU (seq 2048, head_dim 64) 128 and 256 were
  /// within 10% of each other and 64 was 40% slower; 128 keeps a block's
  /// scores in cache and the transient peak lower.
  TORCH_ARG(int64_t, block_size) = 128;
};

/// Returns the attention output, [batch, heads, seq_q, head_dim_v], for
/// q [batch, heads, seq_q, head_dim], k [batch, heads, seq_k, head_dim] and
/// v [batch, heads, seq_k, head_dim_v]. `mask` may be undefined.
torch::Tensor attention(
    const torch::Tensor& q,
    const torch::Tensor& k,
    const torch::Tensor& v,
    const torch::Tensor& mask,
    const AttentionOptions& options = {});

/// Repeats grouped key/value heads for the query heads that share them:
/// [batch, kv_heads, seq, dim] -> [batch, kv_heads * groups, seq, dim],
/// where query head h reads key/value head h / groups, as Hugging Face's
/// repeat_kv. groups == 1 returns x itself.
///
/// Example:
///   // given: torch::Tensor k = torch::randn({2, 2, 128, 64});
///   // k: [2, 2, 128, 64] for 8 query heads
///   auto k8 = remat::nn::repeat_kv(k, /*groups=*/4);  // [2, 8, 128, 64]
torch::Tensor repeat_kv(const torch::Tensor& x, int64_t groups);

/// The attention core as the `selective-attention` policy runs it: the
/// output of attention() on k and v repeated to q's heads, keeping only q, k,
/// v and the mask for backward, which recomputes the rest. No [seq_q, seq_k]
/// tensor outlives forward.
///
/// k and v may have fewer heads than q (grouped-query attention): query
/// head h reads key/value head h / (heads / kv_heads), as HF's repeat_kv.
/// Their gradients are summed over the heads that share them.
///
/// How it recomputes:
///   - eager, no autocast, and dropout 0 or on the CPU: backward rebuilds
///     the probabilities with eager's own ops (dropout from a seed it keeps)
///     but not their product with v, whose gradients it computes with the
///     bmm calls autograd would make. Outputs and gradients are bit-equal
///     to attention()'s; the recompute costs one of the core's two matmuls
///     (seq 1024, 8 heads of 64, batch 2, 2 threads: forward + backward
///     181 ms against 192 ms for checkpoint(eager), 146 ms for eager).
///     With create_graph (double backward) it recomputes the product too.
///   - otherwise, remat::checkpoint around attention(), which replays the
///     whole core under the forward's RNG and autocast state.
///
/// Example:
///   // given: torch::Tensor q = torch::randn({2, 8, 128, 64});
///   // given: torch::Tensor k = torch::randn({2, 2, 128, 64});
///   // given: torch::Tensor v = torch::randn({2, 2, 128, 64});
///   // q: [batch, 8, seq, 64]; k, v: [batch, 2, seq, 64]
///   auto ctx = remat::nn::checkpointed_attention(
///       q, k, v, /*mask=*/{}, remat::nn::AttentionOptions().causal(true));
torch::Tensor checkpointed_attention(
    const torch::Tensor& q,
    const torch::Tensor& k,
    const torch::Tensor& v,
    const torch::Tensor& mask,
    const AttentionOptions& options = {});

} // namespace nn
} // namespace remat
