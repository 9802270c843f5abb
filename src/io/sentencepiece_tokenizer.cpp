// remat's own reader of SentencePiece .model files. Debian's libsentencepiece
// cannot be linked beside LibTorch (its protobuf-lite clashes with LibTorch's
// libprotobuf), so the file is read here: a bounds-checked protobuf wire
// reader for ModelProto, SentencePiece's normalizer (the precompiled charsmap
// is a Darts double-array trie), and its BPE and unigram encoders, written to
// give the ids of sentencepiece's normalizer.cc, bpe_model.cc,
// unigram_model.cc (EncodeOptimized) and sentencepiece_processor.cc.
#include "remat/io/sentencepiece_tokenizer.h"

#include "remat/io/file.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cfloat>
#include <cstring>
#include <queue>
#include <string_view>
#include <unordered_map>
#include <utility>

namespace remat {
namespace io {

namespace {

// U+2581 LOWER ONE EIGHTH BLOCK, what SentencePiece writes for a space.
constexpr std::string_view kSpaceSymbol = "\xe2\x96\x81";
constexpr std::string_view kReplacementChar = "\xef\xbf\xbd"; // U+FFFD

enum PieceType : int {
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6,
};

enum ModelType : int { kUnigram = 1, kBpe = 2, kWord = 3, kChar = 4 };

// ------------------------------------------------------------------ UTF-8
// As SentencePiece's string_util: the length a lead byte announces, and
// whether the front of `s` is one valid character.

int one_char_len(const char* p) {
  return "\1\1\1\1\1\1\1\1\1\1\1\1\2\2\3\4"[static_cast<uint8_t>(*p) >> 4];
}

bool is_trail(char c) {
  return (static_cast<uint8_t>(c) & 0xC0) == 0x80;
}

bool is_valid_codepoint(uint32_t c) {
  return c < 0xD800 || (c >= 0xE000 && c <= 0x10FFFF);
}

// Sets *len to the bytes of the first character (1 for a malformed one)
// and says whether it is valid UTF-8 (U+FFFD written out counts as valid).
bool valid_utf8_prefix(std::string_view s, size_t* len) {
  const auto b = [&](size_t i) {
    return static_cast<uint32_t>(static_cast<uint8_t>(s[i]));
  };
  *len = 1;
  if (b(0) < 0x80) {
    return true;
  }
  uint32_t cp = 0;
  if (s.size() >= 2 && (b(0) & 0xE0) == 0xC0) {
    cp = ((b(0) & 0x1F) << 6) | (b(1) & 0x3F);
    if (is_trail(s[1]) && cp >= 0x80 && is_valid_codepoint(cp)) {
      *len = 2;
      return true;
    }
  } else if (s.size() >= 3 && (b(0) & 0xF0) == 0xE0) {
    cp = ((b(0) & 0x0F) << 12) | ((b(1) & 0x3F) << 6) | (b(2) & 0x3F);
    if (is_trail(s[1]) && is_trail(s[2]) && cp >= 0x800 &&
        is_valid_codepoint(cp)) {
      *len = 3;
      return true;
    }
  } else if (s.size() >= 4 && (b(0) & 0xF8) == 0xF0) {
    cp = ((b(0) & 0x07) << 18) | ((b(1) & 0x3F) << 12) | ((b(2) & 0x3F) << 6) |
        (b(3) & 0x3F);
    if (is_trail(s[1]) && is_trail(s[2]) && is_trail(s[3]) && cp >= 0x10000 &&
        is_valid_codepoint(cp)) {
      *len = 4;
      return true;
    }
  }
  return false;
}

// 0..255 for "<0x00>".."<0xFF>" (upper-case hex, as SentencePiece writes
// them), else -1.
int piece_byte(std::string_view piece) {
  if (piece.size() != 6 || piece.substr(0, 3) != "<0x" || piece[5] != '>') {
    return -1;
  }
  int value = 0;
  for (char c : piece.substr(3, 2)) {
    const int digit = c >= '0' && c <= '9' ? c - '0'
        : c >= 'A' && c <= 'F'             ? c - 'A' + 10
                                           : -1;
    if (digit < 0) {
      return -1;
    }
    value = value * 16 + digit;
  }
  return value;
}

// A piece as an error message shows it: on one line (control bytes as
// \xNN), and cut after 40 bytes.
std::string shown_piece(std::string_view piece) {
  static const char* hex = "0123456789ABCDEF";
  std::string out = "'";
  for (char c : piece.substr(0, 40)) {
    const auto b = static_cast<uint8_t>(c);
    if (b < 0x20 || b == 0x7F) {
      out += std::string("\\x") + hex[b >> 4] + hex[b & 15];
    } else {
      out += c;
    }
  }
  return out + (piece.size() > 40 ? "...'" : "'");
}

// --------------------------------------------------------------- protobuf

// A protobuf message's bytes, read field by field. Every length is checked
// against what is left, so a damaged file ends in an error naming it, never
// in a read past the end or an allocation larger than the file.
class WireReader {
 public:
  WireReader(std::string_view bytes, size_t base, const std::string& path)
      : bytes_(bytes), base_(base), path_(path) {}

  bool done() const {
    return pos_ == bytes_.size();
  }

  // Reads a field's tag; returns false at the end of the message.
  bool next(uint32_t* field, int* wire_type) {
    if (done()) {
      return false;
    }
    field_at_ = pos_;
    const uint64_t tag = varint();
    *field = static_cast<uint32_t>(tag >> 3);
    *wire_type = static_cast<int>(tag & 7);
    if (*field == 0 || tag >> 32 != 0 || *wire_type == 3 || *wire_type == 4 ||
        *wire_type > 5) {
      fail(
          "byte ",
          base_ + field_at_,
          " starts field ",
          tag >> 3,
          " of wire type ",
          tag & 7,
          ", which a ModelProto does not have");
    }
    return true;
  }

  uint64_t varint() {
    uint64_t value = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos_ == bytes_.size()) {
        fail("the number at byte ", base_ + field_at_, " runs past the end");
      }
      const auto b = static_cast<uint8_t>(bytes_[pos_++]);
      value |= static_cast<uint64_t>(b & 0x7F) << shift;
      if (b < 0x80) {
        return value;
      }
    }
    fail("the number at byte ", base_ + field_at_, " is longer than 10 bytes");
  }

  // A length-delimited field's bytes, and where they start in the file.
  std::string_view bytes(size_t* offset = nullptr) {
    const uint64_t length = varint();
    if (length > bytes_.size() - pos_) {
      fail(
          "the field at byte ",
          base_ + field_at_,
          " is ",
          length,
          " bytes long, past the end of its message (",
          bytes_.size() - pos_,
          " bytes left)");
    }
    if (offset) {
      *offset = base_ + pos_;
    }
    const auto out = bytes_.substr(pos_, length);
    pos_ += length;
    return out;
  }

  float fixed32_float() {
    need(4);
    uint32_t bits = 0;
    for (int i = 3; i >= 0; --i) {
      bits = bits << 8 | static_cast<uint8_t>(bytes_[pos_ + i]);
    }
    pos_ += 4;
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
  }

  // A field of the expected wire type, or an error naming the field.
  void expect(int wire_type, int want, const char* name) {
    if (wire_type != want) {
      fail(
          name,
          " at byte ",
          base_ + field_at_,
          " has wire type ",
          wire_type,
          " instead of ",
          want);
    }
  }

  void skip(int wire_type) {
    switch (wire_type) {
      case 0:
        varint();
        break;
      case 1:
        need(8);
        pos_ += 8;
        break;
      case 2:
        bytes();
        break;
      case 5:
        need(4);
        pos_ += 4;
        break;
      default:
        TORCH_INTERNAL_ASSERT(false, "wire type ", wire_type, " passed next()");
    }
  }

  template <typename... Args>
  [[noreturn]] void fail(const Args&... args) const {
    TORCH_CHECK(
        false,
        "tokenizer '",
        path_,
        "': expected a SentencePiece model, but ",
        args...);
    std::abort(); // not reached: TORCH_CHECK(false) throws
  }

 private:
  void need(size_t n) {
    if (bytes_.size() - pos_ < n) {
      fail("the field at byte ", base_ + field_at_, " runs past the end");
    }
  }

  std::string_view bytes_;
  size_t base_; // where bytes_ starts in the file, for messages
  const std::string& path_;
  size_t pos_ = 0;
  size_t field_at_ = 0;
};

struct Piece {
  std::string text;
  float score = 0;
  int type = kNormal;
};

// NormalizerSpec (fields 1-5 of sentencepiece_model.proto), also the
// denormalizer's.
struct NormalizerSpec {
  std::string name;
  std::string charsmap; // precompiled_charsmap
  bool add_dummy_prefix = true;
  bool remove_extra_whitespaces = true;
  bool escape_whitespaces = true;
};

// What remat uses of TrainerSpec.
struct TrainerSpec {
  int model_type = kUnigram;
  bool treat_whitespace_as_suffix = false;
  bool byte_fallback = false;
  std::string unk_piece = "<unk>";
  std::string bos_piece = "<s>";
  std::string eos_piece = "</s>";
  std::string pad_piece = "<pad>";
  std::string unk_surface = " \xe2\x81\x87 "; // " ⁇ "
};

bool read_bool(WireReader& r, int wire_type, const char* name) {
  r.expect(wire_type, 0, name);
  return r.varint() != 0;
}

Piece read_piece(WireReader& r) {
  Piece p;
  uint32_t field;
  int type;
  while (r.next(&field, &type)) {
    if (field == 1) {
      r.expect(type, 2, "SentencePiece.piece");
      p.text = std::string(r.bytes());
    } else if (field == 2) {
      r.expect(type, 5, "SentencePiece.score");
      p.score = r.fixed32_float();
    } else if (field == 3) {
      r.expect(type, 0, "SentencePiece.type");
      const uint64_t t = r.varint();
      if (t < kNormal || t > kByte) {
        r.fail(
            "piece ",
            shown_piece(p.text),
            " has type ",
            t,
            " (SentencePiece's types are 1 to 6)");
      }
      p.type = static_cast<int>(t);
    } else {
      r.skip(type);
    }
  }
  return p;
}

void read_trainer_spec(WireReader& r, TrainerSpec* spec) {
  uint32_t field;
  int type;
  auto string_field = [&](std::string* out, const char* name) {
    r.expect(type, 2, name);
    const auto s = r.bytes();
    if (!s.empty()) { // an empty piece name means the default
      *out = std::string(s);
    }
  };
  while (r.next(&field, &type)) {
    switch (field) {
      case 3:
        r.expect(type, 0, "TrainerSpec.model_type");
        spec->model_type =
            static_cast<int>(std::min<uint64_t>(r.varint(), 1000));
        break;
      case 24:
        spec->treat_whitespace_as_suffix =
            read_bool(r, type, "TrainerSpec.treat_whitespace_as_suffix");
        break;
      case 35:
        spec->byte_fallback = read_bool(r, type, "TrainerSpec.byte_fallback");
        break;
      case 44:
        r.expect(type, 2, "TrainerSpec.unk_surface");
        spec->unk_surface = std::string(r.bytes());
        break;
      case 45:
        string_field(&spec->unk_piece, "TrainerSpec.unk_piece");
        break;
      case 46:
        string_field(&spec->bos_piece, "TrainerSpec.bos_piece");
        break;
      case 47:
        string_field(&spec->eos_piece, "TrainerSpec.eos_piece");
        break;
      case 48:
        string_field(&spec->pad_piece, "TrainerSpec.pad_piece");
        break;
      default: // unk_id..pad_id (40-43) only say where the trainer put them
        r.skip(type);
    }
  }
}

void read_normalizer_spec(WireReader& r, NormalizerSpec* spec) {
  uint32_t field;
  int type;
  while (r.next(&field, &type)) {
    switch (field) {
      case 1:
        r.expect(type, 2, "NormalizerSpec.name");
        spec->name = std::string(r.bytes());
        break;
      case 2:
        r.expect(type, 2, "NormalizerSpec.precompiled_charsmap");
        spec->charsmap = std::string(r.bytes());
        break;
      case 3:
        spec->add_dummy_prefix =
            read_bool(r, type, "NormalizerSpec.add_dummy_prefix");
        break;
      case 4:
        spec->remove_extra_whitespaces =
            read_bool(r, type, "NormalizerSpec.remove_extra_whitespaces");
        break;
      case 5:
        spec->escape_whitespaces =
            read_bool(r, type, "NormalizerSpec.escape_whitespaces");
        break;
      default:
        r.skip(type);
    }
  }
}

// ------------------------------------------------------------- byte trie

// The pieces as a trie over bytes, for "which pieces start here".
class PieceTrie {
 public:
  void insert(std::string_view key, int id) {
    uint32_t node = 0;
    for (char c : key) {
      const uint64_t edge = uint64_t{node} << 8 | static_cast<uint8_t>(c);
      auto it = edges_.find(edge);
      if (it == edges_.end()) {
        it = edges_.emplace(edge, static_cast<uint32_t>(ids_.size())).first;
        ids_.push_back(-1);
      }
      node = it->second;
    }
    ids_[node] = id;
  }

  bool empty() const {
    return edges_.empty();
  }

  // Calls f(length, id) for every piece that is a prefix of `s`, shortest
  // first.
  template <typename F>
  void prefixes(std::string_view s, F&& f) const {
    uint32_t node = 0;
    for (size_t i = 0; i < s.size(); ++i) {
      const auto it =
          edges_.find(uint64_t{node} << 8 | static_cast<uint8_t>(s[i]));
      if (it == edges_.end()) {
        return;
      }
      node = it->second;
      if (ids_[node] >= 0) {
        f(i + 1, ids_[node]);
      }
    }
  }

 private:
  std::unordered_map<uint64_t, uint32_t> edges_; // node << 8 | byte -> node
  std::vector<int> ids_ = {-1};                  // per node; root is 0
};

// ------------------------------------------------------------- normalizer

// A precompiled charsmap: <uint32 trie bytes><Darts double array><normalized
// strings, each ending in '\0'>. Every index is checked, so a damaged map
// gives an error, not a read outside it.
class CharsMap {
 public:
  CharsMap() = default;
  CharsMap(std::string_view blob, const std::string& path, const char* what) {
    uint32_t trie_bytes = 0;
    if (blob.size() > 4) {
      for (int i = 3; i >= 0; --i) {
        trie_bytes = trie_bytes << 8 | static_cast<uint8_t>(blob[i]);
      }
    }
    TORCH_CHECK(
        blob.size() > 4 && trie_bytes < blob.size() - 4,
        "tokenizer '",
        path,
        "': expected ",
        what,
        ".precompiled_charsmap to be a 4-byte trie size, "
        "the trie and its strings, but got ",
        blob.size(),
        " bytes for a trie of ",
        trie_bytes);
    units_.resize(trie_bytes / 4);
    for (size_t u = 0; u < units_.size(); ++u) {
      const char* p = blob.data() + 4 + 4 * u;
      units_[u] = uint32_t{static_cast<uint8_t>(p[0])} |
          uint32_t{static_cast<uint8_t>(p[1])} << 8 |
          uint32_t{static_cast<uint8_t>(p[2])} << 16 |
          uint32_t{static_cast<uint8_t>(p[3])} << 24;
    }
    normalized_ = std::string(blob.substr(4 + trie_bytes));
  }

  bool empty() const {
    return units_.empty();
  }

  // The longest rule that is a prefix of `s`: its length in bytes (0 for
  // none); *value is where its replacement starts in the strings.
  size_t longest_prefix(std::string_view s, uint32_t* value) const {
    // Darts-clone's unit: offset in bits 10-31 (shifted by 8 when bit 9),
    // has_leaf bit 8, label in bits 0-7 (bit 31 set marks a value unit).
    auto offset = [](uint32_t unit) {
      return (unit >> 10) << ((unit & (1U << 9)) >> 6);
    };
    size_t longest = 0;
    if (units_.empty()) {
      return 0;
    }
    size_t pos = offset(units_[0]);
    for (size_t i = 0; i < s.size(); ++i) {
      const auto c = static_cast<uint8_t>(s[i]);
      pos ^= c;
      if (pos >= units_.size()) {
        break;
      }
      const uint32_t unit = units_[pos];
      if ((unit & ((1U << 31) | 0xFF)) != c) {
        break;
      }
      pos ^= offset(unit);
      if ((unit >> 8) & 1) {
        if (pos >= units_.size()) {
          break;
        }
        longest = i + 1;
        *value = units_[pos] & ((1U << 31) - 1);
      }
    }
    return longest;
  }

  // The replacement string at `value`, or false when it lies outside.
  bool replacement(uint32_t value, std::string_view* out) const {
    if (value >= normalized_.size()) {
      return false;
    }
    const char* begin = normalized_.data() + value;
    *out = std::string_view(begin, std::strlen(begin)); // normalized_ ends in 0
    return true;
  }

 private:
  std::vector<uint32_t> units_;
  std::string normalized_;
};

// SentencePiece's Normalizer::Normalize, without the alignment it keeps.
class Normalizer {
 public:
  Normalizer() = default;
  Normalizer(
      NormalizerSpec spec,
      bool whitespace_as_suffix,
      const PieceTrie* user_defined,
      const std::string& path,
      const char* what)
      : spec_(std::move(spec)),
        whitespace_as_suffix_(whitespace_as_suffix),
        user_defined_(user_defined),
        path_(path) {
    if (!spec_.charsmap.empty()) {
      map_ = CharsMap(spec_.charsmap, path, what);
    }
  }

  bool has_charsmap() const {
    return !map_.empty();
  }

  std::string normalize(std::string_view input) const {
    std::string out;
    if (input.empty()) {
      return out;
    }
    const bool remove_extra = spec_.remove_extra_whitespaces;
    if (remove_extra) { // leading spaces
      while (!input.empty()) {
        const auto p = prefix(input);
        if (p.first != " ") {
          break;
        }
        input.remove_prefix(p.second);
      }
    }
    if (input.empty()) {
      return out;
    }
    out.reserve(input.size() * 3);
    // NFKC makes at most 18 bytes of one character (U+FDFA); a charsmap
    // that makes far more is damaged, and would fill memory.
    const size_t text_bytes = input.size();
    const size_t max_bytes = 64 * text_bytes + 4096;
    auto add_space = [&] {
      if (spec_.escape_whitespaces) {
        out += kSpaceSymbol;
      } else {
        out += ' ';
      }
    };
    if (!whitespace_as_suffix_ && spec_.add_dummy_prefix) {
      add_space();
    }
    bool prev_space = remove_extra;
    while (!input.empty()) {
      const auto p = prefix(input);
      std::string_view sp = p.first;
      while (prev_space && !sp.empty() && sp.front() == ' ') {
        sp.remove_prefix(1);
      }
      if (!sp.empty()) {
        for (char c : sp) {
          if (spec_.escape_whitespaces && c == ' ') {
            out += kSpaceSymbol;
          } else {
            out += c;
          }
        }
        prev_space = sp.back() == ' ';
      }
      input.remove_prefix(p.second);
      TORCH_CHECK(
          out.size() <= max_bytes,
          "tokenizer '",
          path_,
          "': expected the charsmap's rules to make at most 64 bytes of a "
          "byte, but a text of ",
          text_bytes,
          " bytes became ",
          out.size(),
          " and more");
      if (!remove_extra) {
        prev_space = false;
      }
    }
    if (remove_extra) { // trailing spaces
      const std::string_view space =
          spec_.escape_whitespaces ? kSpaceSymbol : std::string_view(" ");
      while (out.size() >= space.size() &&
             std::string_view(out).substr(out.size() - space.size()) == space) {
        out.resize(out.size() - space.size());
      }
    }
    if (whitespace_as_suffix_ && spec_.add_dummy_prefix) {
      add_space();
    }
    return out;
  }

 private:
  // What the front of `input` becomes, and how many bytes of it that takes.
  std::pair<std::string_view, size_t> prefix(std::string_view input) const {
    if (user_defined_ && !user_defined_->empty()) {
      size_t longest = 0;
      user_defined_->prefixes(input, [&](size_t n, int) { longest = n; });
      if (longest > 0) { // user-defined pieces are not normalized
        return {input.substr(0, longest), longest};
      }
    }
    uint32_t value = 0;
    const size_t n = map_.longest_prefix(input, &value);
    if (n > 0) {
      std::string_view out;
      TORCH_CHECK(
          map_.replacement(value, &out),
          "tokenizer '",
          path_,
          "': expected the charsmap's rules to point into its strings, but "
          "one points at byte ",
          value);
      return {out, n};
    }
    size_t len = 0;
    if (!valid_utf8_prefix(input, &len)) {
      return {kReplacementChar, 1};
    }
    return {input.substr(0, len), len};
  }

  NormalizerSpec spec_;
  bool whitespace_as_suffix_ = false;
  const PieceTrie* user_defined_ = nullptr;
  CharsMap map_;
  std::string path_;
};

using EncodeResult = std::vector<std::pair<std::string_view, int>>;

// ----------------------------------------------------------- BPE encoding

// A symbol of bpe_model.cc's merge loop, linked to its neighbours; a symbol
// merged into its left neighbour has an empty piece.
struct BpeSymbol {
  int prev;
  int next;
  bool frozen;
  std::string_view piece;
};

// Two adjacent symbols whose concatenation is a piece, and its score.
struct BpePair {
  int left;
  int right;
  float score;
  size_t size;
};

// The order of the agenda: the highest score first, the leftmost on ties.
struct BpeLower {
  bool operator()(const BpePair& a, const BpePair& b) const {
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  }
};

// What encode_bpe works on: the symbols and the pairs that may merge.
struct BpeState {
  std::priority_queue<BpePair, std::vector<BpePair>, BpeLower> agenda;
  std::vector<BpeSymbol> symbols;
  // Merged UNUSED pieces, to be split back into what made them.
  std::unordered_map<
      std::string_view,
      std::pair<std::string_view, std::string_view>>
      rev_merge;
};

} // namespace

struct SentencePieceTokenizer::Impl {
  std::string source;
  std::vector<Piece> pieces;
  TrainerSpec trainer;
  NormalizerSpec normalizer_spec;
  NormalizerSpec denormalizer_spec;
  bool has_denormalizer = false;

  // NORMAL, USER_DEFINED and UNUSED pieces: what the encoders may give.
  std::unordered_map<std::string_view, int> piece_ids;
  // CONTROL, UNKNOWN and BYTE pieces.
  std::unordered_map<std::string_view, int> reserved_ids;
  PieceTrie trie;         // piece_ids, but UNUSED, for unigram
  PieceTrie user_defined; // USER_DEFINED pieces, matched before the model
  int unk = -1;           // the UNKNOWN piece
  std::array<int, 256> byte_ids{};
  float min_score = FLT_MAX; // over NORMAL pieces, for the unknown penalty
  float max_score = FLT_MIN; // (sic: SentencePiece starts from FLT_MIN)

  Normalizer normalizer;
  Normalizer denormalizer;

  int piece_to_id(std::string_view piece) const {
    auto it = reserved_ids.find(piece);
    if (it != reserved_ids.end()) {
      return it->second;
    }
    it = piece_ids.find(piece);
    return it != piece_ids.end() ? it->second : unk;
  }
  int type(int id) const {
    return pieces[id].type;
  }
  // SentencePiece's bos_id() and the others: the id of the trainer's piece
  // name ("<s>") when that piece has the type, else -1.
  int special_id(const std::string& piece, int piece_type) const {
    const int id = piece_to_id(piece);
    return type(id) == piece_type ? id : -1;
  }

  // The length of the symbol at the front of `s`: the longest user-defined
  // piece (*frozen then), else one character.
  size_t symbol_length(std::string_view s, bool* frozen) const {
    size_t longest = 0;
    user_defined.prefixes(s, [&](size_t n, int) { longest = n; });
    *frozen = longest > 0;
    if (longest > 0) {
      return longest;
    }
    return std::min<size_t>(one_char_len(s.data()), s.size());
  }

  void add_bpe_pair(BpeState& state, int left, int right) const;
  void merge_bpe_pairs(BpeState& state) const;
  void resegment(
      const BpeState& state,
      std::string_view w,
      EncodeResult& out) const;
  EncodeResult encode_bpe(std::string_view normalized) const;
  EncodeResult encode_unigram(std::string_view normalized) const;
  std::vector<int64_t> encode(const std::string& text) const;
  std::string decode_run(const std::vector<int64_t>& ids) const;

  // Reading, in from_file's order.
  void read_model_proto(WireReader& r);
  void check_model(const WireReader& r) const;
  void index_piece(const WireReader& r, int id);
  void check_special_pieces(const WireReader& r) const;
  void make_normalizers();
};

// Queues the pair (left, right) when its concatenation is a piece.
void SentencePieceTokenizer::Impl::add_bpe_pair(
    BpeState& state,
    int left,
    int right) const {
  auto& symbols = state.symbols;
  if (left == -1 || right == -1 || symbols[left].frozen ||
      symbols[right].frozen) {
    return;
  }
  const std::string_view piece(
      symbols[left].piece.data(),
      symbols[left].piece.size() + symbols[right].piece.size());
  const auto it = piece_ids.find(piece);
  if (it == piece_ids.end()) {
    return;
  }
  state.agenda.push({left, right, pieces[it->second].score, piece.size()});
  if (type(it->second) == kUnused) {
    state.rev_merge[piece] = {symbols[left].piece, symbols[right].piece};
  }
}

// Merges the best pair on the agenda, again and again, until none is left.
void SentencePieceTokenizer::Impl::merge_bpe_pairs(BpeState& state) const {
  auto& symbols = state.symbols;
  while (!state.agenda.empty()) {
    const BpePair top = state.agenda.top();
    state.agenda.pop();
    auto& left = symbols[top.left];
    auto& right = symbols[top.right];
    // Stale: one side was merged away since the pair was seen.
    if (left.piece.empty() || right.piece.empty() ||
        left.piece.size() + right.piece.size() != top.size) {
      continue;
    }
    left.piece = std::string_view(left.piece.data(), top.size);
    left.next = right.next;
    if (right.next >= 0) {
      symbols[right.next].prev = top.left;
    }
    right.piece = std::string_view();
    add_bpe_pair(state, left.prev, top.left);
    add_bpe_pair(state, top.left, left.next);
  }
}

// Appends `w` to `out`, split back into the pieces that made it when it is
// a merged UNUSED piece.
void SentencePieceTokenizer::Impl::resegment(
    const BpeState& state,
    std::string_view w,
    EncodeResult& out) const {
  const int id = piece_to_id(w);
  const auto it = state.rev_merge.find(w);
  if (id < 0 || type(id) != kUnused || it == state.rev_merge.end()) {
    out.emplace_back(w, id);
    return;
  }
  resegment(state, it->second.first, out);
  resegment(state, it->second.second, out);
}

// bpe_model.cc: start from symbols (characters, user-defined pieces), and
// merge the adjacent pair whose concatenation is the piece of highest score,
// the leftmost on ties, until no pair is a piece.
EncodeResult SentencePieceTokenizer::Impl::encode_bpe(
    std::string_view normalized) const {
  BpeState state;
  auto& symbols = state.symbols;
  std::string_view rest = normalized;
  while (!rest.empty()) {
    BpeSymbol s;
    const size_t n = symbol_length(rest, &s.frozen);
    s.piece = rest.substr(0, n);
    s.prev = static_cast<int>(symbols.size()) - 1;
    rest.remove_prefix(n);
    s.next = rest.empty() ? -1 : static_cast<int>(symbols.size()) + 1;
    symbols.push_back(s);
  }
  if (symbols.empty()) {
    return {};
  }
  for (size_t i = 1; i < symbols.size(); ++i) {
    add_bpe_pair(state, static_cast<int>(i) - 1, static_cast<int>(i));
  }
  merge_bpe_pairs(state);

  EncodeResult out;
  for (int i = 0; i != -1; i = symbols[i].next) {
    resegment(state, symbols[i].piece, out);
  }
  return out;
}

// unigram_model.cc (EncodeOptimized): Viterbi over the pieces that start at
// each character, by score; a character no piece starts with is unknown,
// scored 10 below the lowest piece.
EncodeResult SentencePieceTokenizer::Impl::encode_unigram(
    std::string_view normalized) const {
  struct Best {
    int id = -1;
    float score = 0;
    int starts_at = -1;
  };
  constexpr float kUnkPenalty = 10.0;
  const float unk_score = min_score - kUnkPenalty;
  const size_t size = normalized.size();
  std::vector<Best> best(size + 1);
  size_t start = 0;
  while (start < size) {
    const float score_here = best[start].score;
    const size_t mblen =
        std::min<size_t>(one_char_len(normalized.data() + start), size - start);
    bool has_single = false;
    trie.prefixes(normalized.substr(start), [&](size_t length, int id) {
      auto& target = best[start + length];
      // User-defined pieces get a bonus so that they are always taken.
      // In float, as the sentencepiece package computes it: a double sum
      // breaks ties differently.
      const float score = type(id) == kUserDefined
          ? static_cast<float>(length * max_score - 0.1)
          : pieces[id].score;
      const float candidate = score + score_here;
      if (target.starts_at == -1 || candidate > target.score) {
        target.score = candidate;
        target.starts_at = static_cast<int>(start);
        target.id = id;
      }
      has_single = has_single || length == mblen;
    });
    if (!has_single) {
      auto& target = best[start + mblen];
      const float candidate = unk_score + score_here;
      if (target.starts_at == -1 || candidate > target.score) {
        target.score = candidate;
        target.starts_at = static_cast<int>(start);
        target.id = unk;
      }
    }
    start += mblen;
  }
  EncodeResult out;
  for (size_t end = size; end > 0;) {
    const auto& node = best[end];
    TORCH_INTERNAL_ASSERT(node.starts_at >= 0 && size_t(node.starts_at) < end);
    out.emplace_back(
        normalized.substr(node.starts_at, end - node.starts_at), node.id);
    end = node.starts_at;
  }
  std::reverse(out.begin(), out.end());
  return out;
}

std::vector<int64_t> SentencePieceTokenizer::Impl::encode(
    const std::string& text) const {
  const std::string normalized = normalizer.normalize(text);
  const auto result = trainer.model_type == kBpe ? encode_bpe(normalized)
                                                 : encode_unigram(normalized);
  std::vector<int64_t> ids;
  ids.reserve(result.size());
  bool prev_unk = false;
  for (const auto& [piece, id] : result) {
    const bool is_unk = type(id) == kUnknown;
    if (is_unk && trainer.byte_fallback) {
      for (char c : piece) {
        ids.push_back(byte_ids[static_cast<uint8_t>(c)]);
      }
    } else if (!(is_unk && prev_unk)) { // a run of unknowns is one
      ids.push_back(id);
    }
    prev_unk = is_unk;
  }
  return ids;
}

// SentencePieceProcessor::Decode: control pieces are invisible, the unknown
// piece is its surface (" ⁇ "), byte pieces are put together into UTF-8
// (U+FFFD for a byte that starts no character), "▁" is a space, and the
// first piece's leading "▁" (the dummy prefix) is dropped.
std::string SentencePieceTokenizer::Impl::decode_run(
    const std::vector<int64_t>& ids) const {
  std::string text;
  std::string bytes;
  auto flush_bytes = [&] {
    std::string_view rest = bytes;
    while (!rest.empty()) {
      size_t len = 0;
      if (valid_utf8_prefix(rest, &len)) {
        text += rest.substr(0, len);
      } else {
        text += kReplacementChar;
      }
      rest.remove_prefix(len);
    }
    bytes.clear();
  };
  const auto& ns = normalizer_spec;
  bool is_bos_ws = true;
  bool bos_ws_seen = false;
  for (const auto id64 : ids) {
    const int id = static_cast<int>(id64);
    const auto& p = pieces[id];
    if (p.type == kByte) {
      bytes += static_cast<char>(piece_byte(p.text));
      continue;
    }
    flush_bytes();
    if (bos_ws_seen || !text.empty()) {
      is_bos_ws = false;
    }
    bos_ws_seen = false;
    if (p.type == kControl) {
      continue;
    }
    if (p.type == kUnknown) {
      text += trainer.unk_surface;
      continue;
    }
    std::string_view piece = p.text;
    if (is_bos_ws && (ns.add_dummy_prefix || ns.remove_extra_whitespaces)) {
      if (piece.substr(0, kSpaceSymbol.size()) == kSpaceSymbol) {
        piece.remove_prefix(kSpaceSymbol.size());
        // With extra whitespace removed, every leading space goes.
        bos_ws_seen = !ns.remove_extra_whitespaces;
      }
    }
    for (size_t at;
         (at = piece.find(kSpaceSymbol)) != std::string_view::npos;) {
      text += piece.substr(0, at);
      text += ' ';
      piece.remove_prefix(at + kSpaceSymbol.size());
    }
    text += piece;
  }
  flush_bytes();
  return has_denormalizer ? denormalizer.normalize(text) : text;
}

// Reads the fields of ModelProto that remat uses: the pieces, the trainer's
// spec, and the normalizer's and denormalizer's.
void SentencePieceTokenizer::Impl::read_model_proto(WireReader& r) {
  uint32_t field;
  int type;
  while (r.next(&field, &type)) {
    size_t at = 0;
    switch (field) {
      case 1: {
        r.expect(type, 2, "ModelProto.pieces");
        const auto sub = r.bytes(&at);
        WireReader pr(sub, at, source);
        pieces.push_back(read_piece(pr));
        break;
      }
      case 2: {
        r.expect(type, 2, "ModelProto.trainer_spec");
        const auto sub = r.bytes(&at);
        WireReader tr(sub, at, source);
        read_trainer_spec(tr, &trainer);
        break;
      }
      case 3:
      case 5: {
        r.expect(
            type,
            2,
            field == 3 ? "ModelProto.normalizer_spec"
                       : "ModelProto.denormalizer_spec");
        const auto sub = r.bytes(&at);
        WireReader nr(sub, at, source);
        read_normalizer_spec(
            nr, field == 3 ? &normalizer_spec : &denormalizer_spec);
        has_denormalizer = has_denormalizer || field == 5;
        break;
      }
      default:
        r.skip(type);
    }
  }
}

// Refuses a model with no pieces, one of a type remat does not encode, and
// one with more pieces than an int id holds.
void SentencePieceTokenizer::Impl::check_model(const WireReader& r) const {
  if (pieces.empty()) {
    r.fail("it has no pieces (ModelProto field 1)");
  }
  const int model_type = trainer.model_type;
  TORCH_CHECK(
      model_type == kUnigram || model_type == kBpe,
      "tokenizer '",
      source,
      "': expected a unigram or BPE SentencePiece model (the ones remat reads), "
      "but got model type ",
      model_type == kWord       ? "WORD"
          : model_type == kChar ? "CHAR"
                                : "",
      model_type == kWord || model_type == kChar ? ""
                                                 : std::to_string(model_type));
  TORCH_CHECK(
      pieces.size() < (1u << 30),
      "tokenizer '",
      source,
      "': expected fewer than 2^30 pieces, but got ",
      pieces.size());
}

// Checks piece `id` and enters it where its type says: the id maps, the
// tries, the score range, the unknown piece, the byte ids.
void SentencePieceTokenizer::Impl::index_piece(const WireReader& r, int id) {
  const auto& p = pieces[id];
  auto refuse = [&](const char* why) {
    r.fail("piece ", id, " (", shown_piece(p.text), ") ", why);
  };
  if (p.text.empty()) {
    refuse("is empty");
  }
  if (p.text.size() >= 8000) {
    refuse("is 8000 bytes or longer");
  }
  if (p.text.find('\0') != std::string::npos) {
    refuse("holds a 0 byte");
  }
  const bool normal =
      p.type == kNormal || p.type == kUserDefined || p.type == kUnused;
  auto& ids = normal ? piece_ids : reserved_ids;
  if (!ids.emplace(p.text, id).second) {
    refuse("is defined twice");
  }
  if (normal && p.type != kUnused) {
    trie.insert(p.text, id);
  }
  if (p.type == kUserDefined) {
    user_defined.insert(p.text, id);
  }
  if (p.type == kNormal) {
    min_score = std::min(min_score, p.score);
    max_score = std::max(max_score, p.score);
  }
  if (p.type == kUnknown) {
    if (unk >= 0) {
      refuse("is a second unknown piece");
    }
    unk = id;
  }
  if (p.type == kByte) {
    if (!trainer.byte_fallback) {
      refuse("is a byte piece, but byte_fallback is off");
    }
    const int b = piece_byte(p.text);
    if (b < 0) {
      refuse("is a byte piece that is not <0x00> to <0xFF>");
    }
    byte_ids[b] = id;
  }
}

// Refuses a model with no unknown piece, and one with byte_fallback on that
// lacks some of the 256 byte pieces.
void SentencePieceTokenizer::Impl::check_special_pieces(
    const WireReader& r) const {
  if (unk < 0) {
    r.fail("it has no unknown piece (type UNKNOWN)");
  }
  if (trainer.byte_fallback &&
      std::count(byte_ids.begin(), byte_ids.end(), -1) > 0) {
    r.fail(
        "byte_fallback is on and it has ",
        256 - std::count(byte_ids.begin(), byte_ids.end(), -1),
        " byte pieces, not 256");
  }
}

// Builds the normalizer, and the denormalizer where the model has one.
void SentencePieceTokenizer::Impl::make_normalizers() {
  normalizer = Normalizer(
      normalizer_spec,
      trainer.treat_whitespace_as_suffix,
      &user_defined,
      source,
      "normalizer_spec");
  // As SentencePiece: a denormalizer only where it has rules.
  has_denormalizer = has_denormalizer && !denormalizer_spec.charsmap.empty();
  if (has_denormalizer) {
    denormalizer = Normalizer(
        denormalizer_spec, false, nullptr, source, "denormalizer_spec");
  }
}

SentencePieceTokenizer SentencePieceTokenizer::from_file(
    const std::string& path) {
  // Llama's model is 500 kB; the largest vocabularies take a few MB.
  constexpr int64_t kMaxBytes = 256 << 20;
  const auto bytes = read_file(path, kMaxBytes);
  auto impl = std::make_shared<Impl>();
  impl->source = path;
  auto& m = *impl;

  WireReader r(bytes, 0, path);
  m.read_model_proto(r);
  m.check_model(r);
  m.byte_ids.fill(-1);
  for (size_t i = 0; i < m.pieces.size(); ++i) {
    m.index_piece(r, static_cast<int>(i));
  }
  m.check_special_pieces(r);
  m.make_normalizers();
  return SentencePieceTokenizer(std::move(impl));
}

std::vector<int64_t> SentencePieceTokenizer::tokenize(
    const std::string& text) const {
  return impl_->encode(text);
}

std::string SentencePieceTokenizer::decode(
    const std::vector<int64_t>& ids,
    bool skip_special) const {
  std::vector<int64_t> run;
  std::string out;
  for (auto id : ids) {
    TORCH_CHECK(
        id >= 0 && id < vocab_size(),
        "tokenizer '",
        impl_->source,
        "': expected an id in [0, ",
        vocab_size(),
        "), but got ",
        id);
    if (!skip_special && impl_->type(static_cast<int>(id)) == kControl) {
      // Each run is decoded on its own, as SentencePiece would decode it.
      out += impl_->decode_run(run);
      run.clear();
      out += impl_->pieces[id].text;
    } else {
      run.push_back(id);
    }
  }
  return out + impl_->decode_run(run);
}

int64_t SentencePieceTokenizer::vocab_size() const {
  return static_cast<int64_t>(impl_->pieces.size());
}

int64_t SentencePieceTokenizer::pad_id() const {
  const int64_t pad = impl_->special_id(impl_->trainer.pad_piece, kControl);
  return pad >= 0 ? pad : end_id() >= 0 ? end_id() : unk_id();
}

int64_t SentencePieceTokenizer::begin_id() const {
  return impl_->special_id(impl_->trainer.bos_piece, kControl);
}

int64_t SentencePieceTokenizer::end_id() const {
  return impl_->special_id(impl_->trainer.eos_piece, kControl);
}

int64_t SentencePieceTokenizer::unk_id() const {
  return impl_->special_id(impl_->trainer.unk_piece, kUnknown);
}

} // namespace io
} // namespace remat
