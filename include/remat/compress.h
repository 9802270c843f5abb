// Compressed saved activations: saved-tensor hooks that keep each floating
// activation autograd saves at a lower precision, and give it back in its
// own dtype in backward. Lossy, so never a default: gradients change by the
// rounding of what was saved (docs/compression.md gives measured errors).
//
// Applies to tensors made by ops in the scope (activations) of at least
// `min_bytes`; parameters and other leaves are saved as they are (they stay
// alive anyway, so a copy would only add bytes), and so are tensors already
// at or below the target width and integer tensors (masks, indices). A
// tensor that several ops save (softmax's output, saved by softmax and by the
// product after it) is compressed once, while the first copy lives.
//
//   - bf16: fp32 and fp64 activations are stored as bfloat16 (half the bytes
//     of fp32; 8 bits of mantissa, relative rounding error <= 2^-9).
//   - fp8 (LibTorch >= 2.1, where the dtype exists): floating activations are
//     stored as float8_e4m3fn scaled by their largest |x| / 448, with the
//     scale as a one-element tensor (a quarter of fp32's bytes, relative
//     rounding error <= 2^-4 of the largest |x|).
//
// Example (a block whose activations are stored as bf16):
//   // given: torch::nn::Linear block(256, 256);
//   // given: torch::Tensor x = torch::randn({8, 256});
//   torch::Tensor loss;
//   {
//     remat::CompressedSavesGuard bf16(torch::kBFloat16);
//     loss = block->forward(x).pow(2).mean();
//   }
//   loss.backward();
#pragma once

#include "remat/saved_tensor_hooks.h"

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <memory>
#include <string>

namespace remat {

/// Whether this LibTorch has an fp8 dtype (float8_e4m3fn) to compress to.
bool fp8_available();

struct CompressMemo;

/// The hooks (for a SavedTensorHooksGuard of your own, or to nest).
class CompressHooks final : public SavedTensorHooks {
 public:
  /// `to`: torch::kBFloat16, or c10::ScalarType::Float8_e4m3fn where
  /// fp8_available(). Throws, naming the dtype, for anything else.
  /// `min_bytes`: smaller tensors are saved as they are (bytes, >= 0).
  explicit CompressHooks(c10::ScalarType to, int64_t min_bytes = 4096);

  std::any pack(const torch::Tensor& tensor) override;
  torch::Tensor unpack(const std::any& packed) override;

  c10::ScalarType to() const { return to_; }
  int64_t min_bytes() const { return min_bytes_; }

 private:
  c10::ScalarType to_;
  int64_t min_bytes_;
  std::shared_ptr<CompressMemo> memo_; ///< what this scope compressed
};

/// Compresses what autograd saves on this thread for its lifetime.
class CompressedSavesGuard {
 public:
  explicit CompressedSavesGuard(c10::ScalarType to, int64_t min_bytes = 4096);

 private:
  SavedTensorHooksGuard guard_;
};

/// "bf16" or "fp8" into the dtype; throws, naming the text, on anything else
/// (and for "fp8" where !fp8_available()).
c10::ScalarType parse_compression(const std::string& text);
/// "bf16", "fp8".
const char* compression_name(c10::ScalarType to);

} // namespace remat
