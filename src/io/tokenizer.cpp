#include "remat/io/tokenizer.h"
#include "remat/field_error.h"

#include "io/unicode.h"
#include "remat/io/bpe_tokenizer.h"
#include "remat/io/file.h"
#include "remat/io/sentencepiece_tokenizer.h"

#include <c10/util/Exception.h>

#include <filesystem>

namespace remat {
namespace io {

namespace u = unicode;

namespace {

std::string hex_byte(char c) {
  const char* digits = "0123456789ABCDEF";
  const auto u = static_cast<unsigned char>(c);
  return {digits[u >> 4], digits[u & 0xF]};
}

} // namespace

Encoding Tokenizer::encode(const std::string& text, int64_t max_len, bool pad)
    const {
  const int64_t begin = begin_id(), end = end_id();
  const int64_t specials = (begin >= 0) + (end >= 0);
  TORCH_CHECK(
      max_len == 0 || max_len >= 2,
      "encode: expected max_len 0 (no limit) or at least 2 "
      "(room for the begin and end tokens), but got ",
      max_len);
  TORCH_CHECK(
      !pad || max_len > 0,
      "encode: padding needs max_len > 0, but got max_len 0");
  auto tokens = tokenize(text);
  if (max_len > 0 &&
      static_cast<int64_t>(tokens.size()) > max_len - specials) {
    tokens.resize(static_cast<size_t>(max_len - specials));
  }
  Encoding out;
  out.input_ids.reserve(tokens.size() + 2);
  if (begin >= 0) {
    out.input_ids.push_back(begin);
  }
  out.input_ids.insert(out.input_ids.end(), tokens.begin(), tokens.end());
  if (end >= 0) {
    out.input_ids.push_back(end);
  }
  out.attention_mask.assign(out.input_ids.size(), 1);
  if (pad) {
    out.input_ids.resize(static_cast<size_t>(max_len), pad_id());
    out.attention_mask.resize(static_cast<size_t>(max_len), 0);
  }
  return out;
}

// ---------------------------------------------------------------- WordPiece

WordPieceTokenizer::WordPieceTokenizer(
    std::vector<std::string> vocab,
    WordPieceOptions options)
    : options_(std::move(options)), vocab_(std::move(vocab)) {
  TORCH_CHECK(
      options_.max_chars_per_word() > 0,
      "WordPieceTokenizer: expected max_chars_per_word > 0, "
      "but got ",
      options_.max_chars_per_word());
  for (size_t i = 0; i < vocab_.size(); ++i) {
    ids_[vocab_[i]] = static_cast<int64_t>(
        i); // a repeated token keeps its last id, as in BERT
  }
  auto special = [&](const std::string& token) {
    auto id = token_to_id(token);
    TORCH_CHECK(
        id >= 0, "WordPieceTokenizer: expected the special token '", token,
        "' in the vocabulary, but it is not among its ", vocab_.size(),
        " tokens");
    return id;
  };
  unk_id_ = special(options_.unk_token());
  cls_id_ = special(options_.cls_token());
  sep_id_ = special(options_.sep_token());
  pad_id_ = special(options_.pad_token());
}

WordPieceTokenizer WordPieceTokenizer::from_file(
    const std::string& path,
    WordPieceOptions options) {
  // The largest vocabularies in use hold a few hundred thousand tokens, a
  // few megabytes.
  constexpr int64_t kMaxVocabBytes = 256 << 20;
  const auto text = read_file(path, kMaxVocabBytes);
  std::vector<std::string> vocab;
  size_t start = 0;
  while (start < text.size()) {
    auto end = text.find('\n', start);
    if (end == std::string::npos) {
      end = text.size();
    }
    auto line = text.substr(start, end - start);
    if (!line.empty() && line.back() == '\r') {
      line.pop_back();
    }
    // A token that cannot be UTF-8 text never matches a word of the input:
    // such a file is not a vocabulary (a binary, a damaged download).
    const auto line_no = vocab.size() + 1;
    const auto nul = line.find('\0');
    TORCH_CHECK(
        nul == std::string::npos, "vocabulary '", path, "': line ", line_no,
        ": expected a token of UTF-8 text, but byte ", nul + 1, " is NUL");
    const auto bad = u::invalid_utf8_offset(line);
    TORCH_CHECK(
        bad == std::string::npos, "vocabulary '", path, "': line ", line_no,
        ": expected a token of UTF-8 text, but byte ", bad + 1,
        " (0x", hex_byte(line[bad]), ") is not UTF-8");
    vocab.push_back(std::move(line));
    start = end + 1;
  }
  try {
    return WordPieceTokenizer(std::move(vocab), std::move(options));
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "vocabulary '", path, "': ", e.what_without_backtrace());
  }
}

int64_t WordPieceTokenizer::token_to_id(const std::string& token) const {
  auto it = ids_.find(token);
  return it == ids_.end() ? -1 : it->second;
}

const std::string& WordPieceTokenizer::id_to_token(int64_t id) const {
  TORCH_CHECK(
      id >= 0 && id < vocab_size(),
      "WordPieceTokenizer: expected an id in [0, ", vocab_size(), "), but got ",
      id);
  return vocab_[static_cast<size_t>(id)];
}

std::vector<std::string> WordPieceTokenizer::basic_tokenize(
    const std::string& text) const {
  std::vector<std::string> words;
  std::u32string word;
  auto flush = [&] {
    if (!word.empty()) {
      words.push_back(u::encode_utf8(word));
      word.clear();
    }
  };
  std::u32string folded;
  for (char32_t cp : u::decode_utf8(text)) {
    if (cp == 0 || cp == 0xFFFD || u::is_control(cp)) {
      continue;
    }
    if (u::is_whitespace(cp)) {
      flush();
      continue;
    }
    folded.clear();
    if (options_.lower_case()) {
      u::append_folded(folded, cp); // empty for an accent, which is stripped
    } else {
      folded.push_back(cp);
    }
    for (char32_t c : folded) {
      // A CJK ideograph or a punctuation mark is a word of its own.
      if (u::is_cjk(c) || u::is_punctuation(c)) {
        flush();
        word.push_back(c);
        flush();
      } else {
        word.push_back(c);
      }
    }
  }
  flush();
  return words;
}

void WordPieceTokenizer::wordpiece(
    const std::string& word,
    std::vector<int64_t>& ids) const {
  const auto chars = u::decode_utf8(word);
  if (static_cast<int64_t>(chars.size()) > options_.max_chars_per_word()) {
    ids.push_back(unk_id_);
    return;
  }
  const size_t first = ids.size();
  size_t start = 0;
  std::string piece;
  while (start < chars.size()) {
    size_t end = chars.size();
    int64_t found = -1;
    for (; end > start; --end) {
      piece = start > 0 ? "##" : "";
      for (size_t i = start; i < end; ++i) {
        u::append_utf8(piece, chars[i]);
      }
      found = token_to_id(piece);
      if (found >= 0) {
        break;
      }
    }
    if (found < 0) {
      ids.resize(first); // no piece matches here: the whole word is unknown
      ids.push_back(unk_id_);
      return;
    }
    ids.push_back(found);
    start = end;
  }
}

std::vector<int64_t> WordPieceTokenizer::tokenize(
    const std::string& text) const {
  std::vector<int64_t> ids;
  for (const auto& word : basic_tokenize(text)) {
    wordpiece(word, ids);
  }
  return ids;
}

std::vector<std::string> WordPieceTokenizer::tokenize_to_strings(
    const std::string& text) const {
  std::vector<std::string> out;
  for (auto id : tokenize(text)) {
    out.push_back(vocab_[static_cast<size_t>(id)]);
  }
  return out;
}

std::string WordPieceTokenizer::decode(
    const std::vector<int64_t>& ids,
    bool skip_special) const {
  const int64_t mask_id = token_to_id("[MASK]");
  std::string out;
  for (auto id : ids) {
    const auto& token = id_to_token(id);
    if (skip_special &&
        (id == cls_id_ || id == sep_id_ || id == pad_id_ || id == unk_id_ ||
         id == mask_id)) {
      continue;
    }
    if (token.compare(0, 2, "##") == 0) {
      out += token.substr(2);
    } else {
      if (!out.empty()) {
        out += ' ';
      }
      out += token;
    }
  }
  return out;
}

// ---------------------------------------------------------------- bytes

std::vector<int64_t> ByteTokenizer::tokenize(const std::string& text) const {
  std::vector<int64_t> ids;
  ids.reserve(text.size());
  for (unsigned char c : text) {
    ids.push_back(c);
  }
  return ids;
}

std::string ByteTokenizer::decode(
    const std::vector<int64_t>& ids,
    bool skip_special) const {
  std::string out;
  for (auto id : ids) {
    TORCH_CHECK(
        id >= 0 && id < vocab_size(), "ByteTokenizer: expected an id in [0, ",
        vocab_size(), "), but got ", id);
    if (id < 256) {
      out.push_back(static_cast<char>(id));
    } else if (!skip_special) {
      out += id == kPad ? "<pad>" : id == kBos ? "<bos>" : "<eos>";
    }
  }
  return out;
}

namespace {

enum class TokenizerFile { kWordPiece, kHfJson, kSentencePiece };

TokenizerFile kind_of(const std::string& path) {
  const auto name = std::filesystem::path(path).filename().string();
  auto ends_with = [&](const std::string& tail) {
    return name.size() >= tail.size() &&
        name.compare(name.size() - tail.size(), tail.size(), tail) == 0;
  };
  if (ends_with(".json")) {
    return TokenizerFile::kHfJson;
  }
  if (ends_with(".model")) {
    return TokenizerFile::kSentencePiece;
  }
  return TokenizerFile::kWordPiece;
}

} // namespace

std::string folder_tokenizer(const std::string& dir) {
  namespace fs = std::filesystem;
  const fs::path folder(dir);
  std::error_code ec;
  // What transformers and sentencepiece save, in the order they are
  // preferred. A folder often has two forms of the same tokenizer (BERT's
  // tokenizer.json and vocab.txt, Llama 2's tokenizer.json and
  // tokenizer.model): the first that remat reads is taken, and when none
  // reads, the first one's refusal is the error.
  std::string first_error;
  for (const char* name :
       {"tokenizer.json", "tokenizer.model", "spiece.model",
        "sentencepiece.bpe.model", "vocab.txt"}) {
    const fs::path file = folder / name;
    if (!fs::exists(file, ec)) {
      continue;
    }
    try {
      make_tokenizer(file.string());
      return file.string();
    } catch (const c10::Error& e) {
      if (first_error.empty()) {
        first_error = first_line(e);
      }
    }
  }
  TORCH_CHECK(
      first_error.empty(), first_error,
      "; expected a folder whose tokenizer remat reads, since tokenizing "
      "byte by byte would give ids that mean nothing to this model");
  for (const char* name : {"vocab.json", "merges.txt", "tokenizer_config.json"}) {
    const fs::path file = folder / name;
    TORCH_CHECK(
        !fs::exists(file, ec),
        "'", file.string(), "' is the model's tokenizer, which remat cannot read "
        "(it reads tokenizer.json, tokenizer.model and vocab.txt); expected a "
        "folder whose tokenizer remat reads, since tokenizing byte by byte "
        "would give ids that mean nothing to this model");
  }
  return "";
}

std::shared_ptr<Tokenizer> make_tokenizer(const std::string& path) {
  if (path.empty()) {
    return std::make_shared<ByteTokenizer>();
  }
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    return make_tokenizer(folder_tokenizer(path));
  }
  switch (kind_of(path)) {
    case TokenizerFile::kHfJson:
      return std::make_shared<BpeTokenizer>(BpeTokenizer::from_file(path));
    case TokenizerFile::kSentencePiece:
      return std::make_shared<SentencePieceTokenizer>(
          SentencePieceTokenizer::from_file(path));
    case TokenizerFile::kWordPiece:
      break;
  }
  return std::make_shared<WordPieceTokenizer>(
      WordPieceTokenizer::from_file(path));
}

} // namespace io
} // namespace remat
