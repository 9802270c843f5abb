// A SentencePiece model file (tokenizer.model: Llama 1/2, Mistral, T5's
// spiece.model), read and run by remat itself: the file's protobuf, its
// normalizer (identity, or the precompiled charsmap of nmt_nfkc and the
// others), user-defined pieces, the BPE or unigram model, and byte fallback,
// written to give the ids the `sentencepiece` Python package gives
// (tests/io/tokenizer_reference.py checks them). The SentencePiece library
// is not used: its protobuf copy cannot be linked beside LibTorch's.
//
// Example:
//   auto tok = remat::io::SentencePieceTokenizer::from_file(
//       "llama2/tokenizer.model");
//   auto enc = tok.encode("Hello world");   // <s> ▁Hello ▁world </s>
//   std::string text = tok.decode(enc.input_ids); // "Hello world"
#pragma once

#include "remat/io/tokenizer.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace remat {
namespace io {

/// A SentencePiece model (BPE or unigram, with its own normalizer). WORD and
/// CHAR models are refused.
class SentencePieceTokenizer : public Tokenizer {
 public:
  /// Reads a .model file. Throws c10::Error naming `path` when it is not a
  /// SentencePiece model remat reads (damaged, or a WORD or CHAR model).
  static SentencePieceTokenizer from_file(const std::string& path);

  /// The model's ids of `text`, without BOS or EOS.
  std::vector<int64_t> tokenize(const std::string& text) const override;
  /// SentencePiece's own decoding; control tokens (BOS, EOS, pad) are left
  /// out when `skip_special`, otherwise written as their pieces ("<s>").
  std::string decode(const std::vector<int64_t>& ids, bool skip_special = true)
      const override;
  int64_t vocab_size() const override;
  /// The model's pad id. SentencePiece models usually have none (-1, as
  /// Llama's): then the EOS id, else the unknown token's id. Padding is
  /// masked out, so the id only has to be one the model knows.
  int64_t pad_id() const override;
  /// The model's BOS id (-1 when it has none: then none is put before).
  int64_t begin_id() const override;
  /// The model's EOS id (-1 when it has none).
  int64_t end_id() const override;
  int64_t unk_id() const;

  struct Impl;

 private:
  explicit SentencePieceTokenizer(std::shared_ptr<const Impl> impl)
      : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
};

} // namespace io
} // namespace remat
