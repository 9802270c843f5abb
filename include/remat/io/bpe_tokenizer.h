// A Hugging Face tokenizer.json whose model is BPE: byte-level BPE as GPT-2,
// RoBERTa, Llama 3 and Qwen save it. Token ids are the ones the `tokenizers`
// library gives for the same file (tests/io/hf_tokenizer_test.cpp checks them
// on a corpus of many scripts).
//
// Read: added_tokens (matched in the raw text first, leftmost-longest, with
// lstrip / rstrip / single_word), normalizer null, pre_tokenizer ByteLevel
// (add_prefix_space, use_regex), Split (Regex or String pattern; behaviour
// Isolated, Removed, MergedWithPrevious or MergedWithNext; invert), Digits,
// Whitespace, WhitespaceSplit and a Sequence of these with ByteLevel last;
// model BPE (vocab, merges as "a b" or [a, b], ignore_merges, unk_token,
// fuse_unk, byte_fallback); post_processor ByteLevel, TemplateProcessing (at
// most one special token before and one after $A), RobertaProcessing,
// BertProcessing or a Sequence of these; decoder ByteLevel or null. Anything
// else (a normalizer, a WordPiece or Unigram model, BPE dropout, ...) is
// refused with a c10::Error naming the file and the field: an approximation
// would give ids that mean nothing to the model.
//
// Example:
//   auto tok = remat::io::BpeTokenizer::from_file("llama3/tokenizer.json");
//   auto ids = tok.tokenize("Hello world");     // ids, no special tokens
//   auto enc = tok.encode("Hello world");   // <|begin_of_text|> Hello world
//   std::string text = tok.decode(enc.input_ids); // "Hello world"
#pragma once

#include "remat/io/tokenizer.h"

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace remat {
namespace io {

/// A tokenizer.json with a BPE model (see the file comment for what is read).
class BpeTokenizer : public Tokenizer {
 public:
  /// Reads a tokenizer.json. Throws c10::Error naming `path` and the field
  /// for a file remat does not read exactly.
  static BpeTokenizer from_file(const std::string& path);
  /// The same from parsed JSON; `source` names it in errors.
  static BpeTokenizer from_json(
      const nlohmann::json& j,
      const std::string& source);

  /// The ids of `text`: added tokens where they occur, BPE elsewhere. No
  /// begin or end token (encode() adds what the post-processor adds).
  std::vector<int64_t> tokenize(const std::string& text) const override;
  /// Bytes of the tokens, through the decoder; an added token is its
  /// content, and a special one is left out when `skip_special`. Bytes that
  /// are not UTF-8 become U+FFFD.
  std::string decode(const std::vector<int64_t>& ids, bool skip_special = true)
      const override;
  /// One more than the largest id, added tokens included.
  int64_t vocab_size() const override;
  /// The tokenizer.json's padding.pad_id; without one, the end token, else
  /// the begin token, else 0. Padding is masked out, so any id works; this
  /// one is never a token the model has not seen.
  int64_t pad_id() const override;
  /// What the post-processor puts before the text, or -1 (GPT-2 adds none).
  int64_t begin_id() const override;
  /// What the post-processor puts after the text, or -1 (Llama 3 adds none).
  int64_t end_id() const override;

  /// The id of a model or added token, or -1.
  int64_t token_to_id(const std::string& token) const;
  /// The model's token (byte-level characters, e.g. "Ġworld") or the added
  /// token's content. Throws c10::Error for an id out of range or unused.
  std::string id_to_token(int64_t id) const;

  struct Impl;

 private:
  explicit BpeTokenizer(std::shared_ptr<const Impl> impl)
      : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
};

} // namespace io
} // namespace remat
