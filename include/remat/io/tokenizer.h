// Text to token ids behind one interface, so that data loading does not care
// which tokenizer it has: BERT's WordPiece (a vocab.txt), a Hugging Face
// tokenizer.json with a BPE model (bpe_tokenizer.h), a SentencePiece
// tokenizer.model (sentencepiece_tokenizer.h), and bytes for when there is
// no vocabulary. make_tokenizer() picks by the file, folder_tokenizer() finds
// a model folder's own.
//
// clang-format off
// Example:
//   auto tok = remat::io::WordPieceTokenizer::from_file("bert-mini/vocab.txt");
//   auto enc = tok.encode("The quick brown fox!", /*max_len=*/16);
//   // enc.input_ids: [CLS] the quick brown fox ! [SEP]; enc.attention_mask: 1s
//   remat::io::ByteTokenizer bytes;           // ids 0..255, then pad/bos/eos
//   auto lm = bytes.encode("héllo", 0);       // <bos> 104 195 169 ... <eos>
//   std::shared_ptr<remat::io::Tokenizer> own = remat::io::make_tokenizer(
//       remat::io::folder_tokenizer("llama3-folder")); // its tokenizer.json
// clang-format on
#pragma once

#include <torch/arg.h>

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace remat {
namespace io {

/// Token ids of one text and which of them are real (1) or padding (0).
struct Encoding {
  std::vector<int64_t> input_ids;
  std::vector<int64_t> attention_mask;
};

/// What every tokenizer offers.
class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  /// The ids of `text`, without special tokens or truncation.
  virtual std::vector<int64_t> tokenize(const std::string& text) const = 0;
  /// The text of `ids`; special tokens are left out when `skip_special`.
  virtual std::string decode(
      const std::vector<int64_t>& ids,
      bool skip_special = true) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual int64_t pad_id() const = 0;
  /// Put before the text: [CLS] for BERT, <bos> for bytes; -1 for none
  /// (a tokenizer.json whose post-processor adds nothing, as GPT-2's).
  virtual int64_t begin_id() const = 0;
  /// Put after the text: [SEP] for BERT, <eos> for bytes; -1 for none.
  virtual int64_t end_id() const = 0;

  /// begin, tokens, end (those that are not -1). With max_len > 0 the tokens
  /// are cut so that the whole fits in max_len (the end token is kept, as
  /// Hugging Face does), and with `pad` it is padded to exactly max_len
  /// (mask 0 on padding).
  /// Throws c10::Error when 0 < max_len < 2.
  Encoding encode(
      const std::string& text,
      int64_t max_len = 0,
      bool pad = false) const;
};

/// Options of BERT's BasicTokenizer + WordPiece.
struct WordPieceOptions {
  /// Lower-case and strip accents (uncased models). Exact for ASCII, Latin,
  /// Greek and Cyrillic letters; other scripts' capitals are kept.
  TORCH_ARG(bool, lower_case) = true;
  /// Words longer than this many characters become [UNK].
  TORCH_ARG(int64_t, max_chars_per_word) = 100;
  TORCH_ARG(std::string, unk_token) = "[UNK]";
  TORCH_ARG(std::string, cls_token) = "[CLS]";
  TORCH_ARG(std::string, sep_token) = "[SEP]";
  TORCH_ARG(std::string, pad_token) = "[PAD]";
};

/// BERT's tokenizer: clean (drop control characters), put spaces around CJK
/// ideographs, split on whitespace, lower-case and strip accents, split off
/// punctuation, then greedy longest-match-first WordPiece with "##"
/// continuations; a word with no match becomes [UNK] as a whole.
class WordPieceTokenizer : public Tokenizer {
 public:
  /// `vocab[i]` is the token with id i. Throws c10::Error when the special
  /// tokens of `options` are not in it.
  explicit WordPieceTokenizer(
      std::vector<std::string> vocab,
      WordPieceOptions options = {});
  /// Reads a vocab.txt: one token per line, id = line number (from 0).
  static WordPieceTokenizer from_file(
      const std::string& path,
      WordPieceOptions options = {});

  std::vector<int64_t> tokenize(const std::string& text) const override;
  std::string decode(const std::vector<int64_t>& ids, bool skip_special = true)
      const override;
  int64_t vocab_size() const override {
    return static_cast<int64_t>(vocab_.size());
  }
  int64_t pad_id() const override {
    return pad_id_;
  }
  int64_t begin_id() const override {
    return cls_id_;
  }
  int64_t end_id() const override {
    return sep_id_;
  }
  int64_t unk_id() const {
    return unk_id_;
  }

  /// The words after BasicTokenizer, before WordPiece ("Café!" -> cafe, !).
  std::vector<std::string> basic_tokenize(const std::string& text) const;
  /// The WordPiece tokens of `text` ("foxes" -> fox, ##es).
  std::vector<std::string> tokenize_to_strings(const std::string& text) const;
  /// The id of `token`, or -1.
  int64_t token_to_id(const std::string& token) const;
  const std::string& id_to_token(int64_t id) const;
  const WordPieceOptions& options() const {
    return options_;
  }

 private:
  void wordpiece(const std::string& word, std::vector<int64_t>& ids) const;

  WordPieceOptions options_;
  std::vector<std::string> vocab_;
  std::unordered_map<std::string, int64_t> ids_;
  int64_t unk_id_ = -1, cls_id_ = -1, sep_id_ = -1, pad_id_ = -1;
};

/// UTF-8 bytes as ids 0..255, then three special ids. Any text round-trips.
class ByteTokenizer : public Tokenizer {
 public:
  static constexpr int64_t kPad = 256;
  static constexpr int64_t kBos = 257;
  static constexpr int64_t kEos = 258;

  std::vector<int64_t> tokenize(const std::string& text) const override;
  std::string decode(const std::vector<int64_t>& ids, bool skip_special = true)
      const override;
  int64_t vocab_size() const override {
    return 259;
  }
  int64_t pad_id() const override {
    return kPad;
  }
  int64_t begin_id() const override {
    return kBos;
  }
  int64_t end_id() const override {
    return kEos;
  }
};

/// The tokenizer of `path`, by its name: a tokenizer.json (any *.json) is a
/// BpeTokenizer, a *.model a SentencePieceTokenizer, any other file a
/// WordPieceTokenizer's vocab.txt, a folder its folder_tokenizer(), and ""
/// a ByteTokenizer. Throws c10::Error naming the file for one it cannot read.
std::shared_ptr<Tokenizer> make_tokenizer(const std::string& path);

/// The tokenizer a model folder (a Hugging Face save, an --init folder)
/// carries, as a path make_tokenizer() reads: the first of tokenizer.json,
/// tokenizer.model (spiece.model, sentencepiece.bpe.model) and vocab.txt
/// that remat reads, or "" when the folder has no tokenizer file at all (a
/// model trained on bytes). A folder whose tokenizer remat cannot read (a
/// tokenizer.json it refuses with nothing else beside it, vocab.json with
/// merges.txt, ...) is refused with a c10::Error naming the file: its ids
/// are never silently replaced by bytes.
std::string folder_tokenizer(const std::string& dir);

} // namespace io
} // namespace remat
