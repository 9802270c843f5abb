// tokenizer.json with a BPE model, following the `tokenizers` library step by
// step: added tokens, pre-tokenizer, BPE with merge ranks, post-processor,
// decoder. Where the library's behaviour is subtle (how lstrip meets an
// earlier match, merge order on ties), the comment says which rule of the
// library is copied.
#include "remat/io/bpe_tokenizer.h"

#include "io/unicode.h"
#include "remat/io/file.h"

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <mutex>
#include <queue>
#include <unordered_map>

namespace remat {
namespace io {

namespace u = unicode;
using json = nlohmann::json;

namespace {

// GPT-2's regex, which ByteLevel(use_regex=true) splits with.
constexpr const char* kByteLevelPattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
// Rust's regex \w (what single_word looks at): Alphabetic, marks, decimal
// digits, connector punctuation, joiners. PCRE2 10.42's \w lacks the marks.
constexpr const char* kWordChar =
    R"([\p{L}\p{Nl}\p{M}\p{Nd}\p{Pc}\x{200C}\x{200D}])";

// A compiled PCRE2 pattern (UTF + UCP, JIT where available), or a literal
// string (UTF; PCRE2 refuses UCP beside LITERAL, and a literal has no
// classes for it to change).
class Regex {
 public:
  Regex(const std::string& pattern, bool literal, const std::string& where) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    const uint32_t options = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
    code_ = pcre2_compile(
        reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), options,
        &error, &offset, nullptr);
    if (code_ == nullptr) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof message);
      TORCH_CHECK(
          false, where, ": expected a pattern PCRE2 compiles, but at offset ",
          offset, " of '", pattern, "': ", reinterpret_cast<char*>(message));
    }
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE); // else the interpreter
  }
  ~Regex() {
    pcre2_code_free(code_);
  }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Calls f(start, end) for every non-empty match in s, left to right.
  template <typename F>
  void for_each_match(const std::string& s, F&& f) const {
    thread_local std::unique_ptr<pcre2_match_data, void (*)(pcre2_match_data*)>
        data(pcre2_match_data_create(1, nullptr), pcre2_match_data_free);
    size_t at = 0;
    while (at <= s.size()) {
      const int rc = pcre2_match(
          code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), at,
          PCRE2_NO_UTF_CHECK, data.get(), nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) {
        return;
      }
      TORCH_CHECK(rc >= 0, "PCRE2 match failed with error ", rc);
      const PCRE2_SIZE* v = pcre2_get_ovector_pointer(data.get());
      if (v[1] > v[0]) {
        f(static_cast<size_t>(v[0]), static_cast<size_t>(v[1]));
        at = v[1];
      } else { // an empty match: step over one character
        at = v[1] + 1;
        while (at < s.size() && (static_cast<unsigned char>(s[at]) & 0xC0) == 0x80) {
          ++at;
        }
      }
    }
  }
  // Whether the pattern matches at the very start of s.
  bool matches_at_start(const std::string& s) const {
    bool found = false;
    for_each_match(s, [&](size_t start, size_t) {
      found = found || start == 0;
    });
    return found;
  }

 private:
  pcre2_code* code_ = nullptr;
};

// Unicode White_Space, what Rust's \s and char::is_whitespace match.
bool is_white_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 ||
      c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 ||
      c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// The code point starting at s[i] and its length (s is valid UTF-8).
char32_t code_point_at(const std::string& s, size_t i, size_t* length) {
  const auto b = static_cast<unsigned char>(s[i]);
  const size_t n = b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
  char32_t c = n == 1 ? b : b & (0x7F >> n);
  for (size_t k = 1; k < n; ++k) {
    c = (c << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  }
  *length = n;
  return c;
}

size_t char_start_before(const std::string& s, size_t end) {
  size_t i = end - 1;
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) {
    --i;
  }
  return i;
}

// GPT-2's bytes_to_unicode: printable bytes stand for themselves, the others
// for 256 + n.
std::array<char32_t, 256> byte_chars() {
  std::array<char32_t, 256> out{};
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) ||
        (b >= 174 && b <= 255);
    out[static_cast<size_t>(b)] = printable ? static_cast<char32_t>(b) : next++;
  }
  return out;
}

enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct PreTokenizer {
  enum class Kind { kSplit, kByteLevel } kind = Kind::kSplit;
  std::shared_ptr<const Regex> regex; // Split's pattern, ByteLevel's regex
  Behavior behavior = Behavior::kIsolated;
  bool invert = false;
  bool add_prefix_space = false; // ByteLevel
};

// A stretch [first, second) of a piece, in bytes.
using Range = std::pair<size_t, size_t>;

// Cuts `piece` into the matches of the step's pattern and the text between
// them, over the whole piece, as the library's Pattern does; is_match says
// which range is which (flipped when the step inverts).
void match_ranges(
    const PreTokenizer& step,
    const std::string& piece,
    std::vector<Range>& ranges,
    std::vector<bool>& is_match) {
  ranges.clear();
  is_match.clear();
  size_t prev = 0;
  step.regex->for_each_match(piece, [&](size_t a, size_t b) {
    if (a > prev) {
      ranges.emplace_back(prev, a);
      is_match.push_back(false);
    }
    ranges.emplace_back(a, b);
    is_match.push_back(true);
    prev = b;
  });
  if (prev < piece.size()) {
    ranges.emplace_back(prev, piece.size());
    is_match.push_back(false);
  }
  if (step.invert) {
    is_match.flip();
  }
}

// The ranges a Split's behavior keeps: matches dropped, kept alone, or
// joined to the text before or after them.
std::vector<Range> apply_behavior(
    Behavior behavior,
    const std::vector<Range>& ranges,
    const std::vector<bool>& is_match) {
  std::vector<Range> out;
  switch (behavior) {
    case Behavior::kIsolated:
      out = ranges;
      break;
    case Behavior::kRemoved:
      for (size_t i = 0; i < ranges.size(); ++i) {
        if (!is_match[i]) {
          out.push_back(ranges[i]);
        }
      }
      break;
    case Behavior::kContiguous:
    case Behavior::kMergedWithPrevious: {
      bool previous = false;
      for (size_t i = 0; i < ranges.size(); ++i) {
        const bool join = behavior == Behavior::kContiguous
            ? is_match[i] == previous
            : is_match[i] && !previous;
        if (join && !out.empty()) {
          out.back().second = ranges[i].second;
        } else {
          out.push_back(ranges[i]);
        }
        previous = is_match[i];
      }
      break;
    }
    case Behavior::kMergedWithNext: {
      bool previous = false;
      for (size_t i = ranges.size(); i-- > 0;) {
        if (is_match[i] && !previous && !out.empty()) {
          out.back().first = ranges[i].first;
        } else {
          out.push_back(ranges[i]);
        }
        previous = is_match[i];
      }
      std::reverse(out.begin(), out.end());
      break;
    }
  }
  return out;
}

struct AddedToken {
  std::string content;
  int64_t id = 0;
  bool single_word = false, lstrip = false, rstrip = false;
  bool normalized = false, special = false;
};

struct Merge {
  int32_t rank;
  int32_t new_id;
};

// A symbol of merge_word: a token id, linked to its neighbours; a symbol
// merged into its left neighbour is no longer live.
struct WordSymbol {
  int64_t id;
  int prev, next;
  bool live;
};

// Appends a symbol for `id` to the end of the list.
void push_symbol(std::vector<WordSymbol>& sym, int64_t id) {
  const int n = static_cast<int>(sym.size());
  sym.push_back({id, n - 1, -1, true});
  if (n > 0) {
    sym[static_cast<size_t>(n - 1)].next = n;
  }
}

// A pair that may merge: the lowest rank first, the leftmost on ties.
struct Candidate {
  int32_t rank;
  int pos;
  int64_t new_id;
  bool operator>(const Candidate& o) const {
    return rank != o.rank ? rank > o.rank : pos > o.pos;
  }
};

uint64_t pair_key(int64_t a, int64_t b) {
  return (static_cast<uint64_t>(a) << 32) | static_cast<uint64_t>(b);
}

// Reads fields of the tokenizer.json, naming the file and the field in every
// refusal.
struct Reader {
  std::string source;

  [[noreturn]] void refuse(const std::string& field, const std::string& what)
      const {
    TORCH_CHECK(false, "tokenizer '", source, "': ", field, ": ", what);
  }
  const json& at(const json& j, const std::string& key, const std::string& field)
      const {
    auto it = j.find(key);
    if (it == j.end()) {
      refuse(field, "expected a field \"" + key + "\", but there is none");
    }
    return *it;
  }
  std::string type_of(const json& j, const std::string& field) const {
    if (!j.is_object()) {
      refuse(field, "expected an object, but got " + std::string(j.type_name()));
    }
    const auto& t = at(j, "type", field);
    if (!t.is_string()) {
      refuse(field + ".type", "expected a string, but got " + t.dump());
    }
    return t.get<std::string>();
  }
  bool flag(const json& j, const std::string& key, bool fallback,
            const std::string& field) const {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) {
      return fallback;
    }
    if (!it->is_boolean()) {
      refuse(field + "." + key, "expected true or false, but got " + it->dump());
    }
    return it->get<bool>();
  }
  std::string text(const json& j, const std::string& field) const {
    if (!j.is_string()) {
      refuse(field, "expected a string, but got " + j.dump().substr(0, 80));
    }
    return j.get<std::string>();
  }
  int64_t id(const json& j, const std::string& field) const {
    if (!j.is_number_integer() || j.get<int64_t>() < 0 ||
        j.get<int64_t>() > INT32_MAX) {
      refuse(field, "expected a token id (an integer >= 0), but got " +
                 j.dump().substr(0, 80));
    }
    return j.get<int64_t>();
  }
};

// Refuses a model other than BPE, one with dropout, and one with subword
// markers.
void check_plain_bpe(const json& m, const Reader& r) {
  const std::string type =
      m.is_object() && !m.contains("type") && m.contains("merges")
      ? "BPE" // files from tokenizers < 0.10 carry no model type
      : r.type_of(m, "model");
  if (type != "BPE") {
    r.refuse("model.type", "expected \"BPE\" (remat reads BPE tokenizer.json), "
             "but got \"" + type + "\"");
  }
  auto dropout = m.find("dropout");
  if (dropout != m.end() && !dropout->is_null() &&
      !(dropout->is_number() && dropout->get<double>() == 0)) {
    r.refuse("model.dropout", "expected null (deterministic BPE), but got " +
             dropout->dump());
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    auto it = m.find(key);
    if (it != m.end() && !it->is_null() && *it != "") {
      r.refuse(std::string("model.") + key,
               "expected null (remat reads BPE without subword markers), "
               "but got " + it->dump());
    }
  }
}

// The two tokens of model.merges[i], written "a b" or ["a", "b"].
std::pair<std::string, std::string> merge_tokens(
    const json& merge,
    const std::string& field,
    const Reader& r) {
  std::string a, b;
  if (merge.is_string()) { // the legacy "a b" form
    const auto s = merge.get<std::string>();
    const auto space = s.find(' ');
    if (space == std::string::npos ||
        s.find(' ', space + 1) != std::string::npos) {
      r.refuse(field, "expected two tokens separated by one space, but got \"" +
               s + "\"");
    }
    a = s.substr(0, space);
    b = s.substr(space + 1);
  } else if (merge.is_array() && merge.size() == 2) {
    a = r.text(merge[0], field);
    b = r.text(merge[1], field);
  } else {
    r.refuse(field, "expected \"a b\" or [\"a\", \"b\"], but got " +
             merge.dump().substr(0, 80));
  }
  return {a, b};
}

} // namespace

struct BpeTokenizer::Impl {
  std::string source;
  // model
  std::unordered_map<std::string, int64_t> vocab;
  std::vector<std::string> tokens; // id -> model token ("" if unused)
  std::unordered_map<uint64_t, Merge> merges;
  bool ignore_merges = false;
  bool byte_fallback = false;
  bool fuse_unk = false;
  int64_t unk_id = -1;
  std::array<int64_t, 256> byte_ids{}; // byte-level: the id of each byte's char
  std::array<int64_t, 256> fallback_ids{}; // <0xXX>
  std::array<std::string, 256> byte_strings; // each byte's char, UTF-8
  // pipeline
  std::vector<AddedToken> added;
  std::unordered_map<int64_t, size_t> added_by_id;
  std::unordered_map<std::string, int64_t> added_by_content;
  std::vector<std::vector<size_t>> added_by_first_byte{256}; // longest first
  std::vector<PreTokenizer> pre;
  bool byte_level = false; // the pre-tokenizer ends with ByteLevel
  std::shared_ptr<const Regex> word_char;
  // post-processor, decoder
  int64_t begin = -1, end = -1, pad = -1;
  bool byte_level_decoder = false;
  std::array<int, 512> char_bytes{}; // byte-level char -> byte, or -1
  int64_t size = 0;

  mutable std::mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<int64_t>> cache;

  void read_model(const json& m, const Reader& r);
  void read_vocab(const json& m, const Reader& r);
  void read_merges(const json& m, const Reader& r);
  void index_bytes();
  void read_added(const json& a, const Reader& r);
  void read_pre(const json& p, const std::string& field, const Reader& r);
  void read_split(const json& p, const std::string& field, const Reader& r);
  void add_split(const std::string& pattern, bool literal, Behavior b,
                 bool invert, const std::string& field);
  void read_post(const json& p, const std::string& field, const Reader& r);
  void read_decoder(const json& d, const Reader& r);

  // Splits `s` at the added tokens of one pass (normalized or not); pieces
  // of text get id -1.
  void split_added(
      const std::string& s,
      bool normalized,
      std::vector<std::pair<std::string, int64_t>>& out) const;
  std::vector<std::string> pre_tokenize(std::string s) const;
  void word(const std::string& w, std::vector<int64_t>& ids) const;
  void merge_word(const std::string& w, std::vector<int64_t>& ids) const;
  void push_unk(std::vector<WordSymbol>& sym) const;
  std::vector<WordSymbol> word_symbols(const std::string& w) const;
  void apply_merges(std::vector<WordSymbol>& sym) const;
};

// ---------------------------------------------------------------- reading

void BpeTokenizer::Impl::read_model(const json& m, const Reader& r) {
  check_plain_bpe(m, r);
  read_vocab(m, r);
  read_merges(m, r);
  ignore_merges = r.flag(m, "ignore_merges", false, "model");
  byte_fallback = r.flag(m, "byte_fallback", false, "model");
  fuse_unk = r.flag(m, "fuse_unk", false, "model");
  auto unk = m.find("unk_token");
  if (unk != m.end() && !unk->is_null()) {
    const auto name = r.text(*unk, "model.unk_token");
    auto it = vocab.find(name);
    if (it == vocab.end()) {
      r.refuse("model.unk_token", "expected a token of model.vocab, but \"" +
               name + "\" is not one");
    }
    unk_id = it->second;
  }
  index_bytes();
}

// Reads model.vocab into vocab and its inverse, tokens.
void BpeTokenizer::Impl::read_vocab(const json& m, const Reader& r) {
  const auto& v = r.at(m, "vocab", "model");
  if (!v.is_object()) {
    r.refuse("model.vocab", "expected an object {token: id}, but got " +
             std::string(v.type_name()));
  }
  for (auto it = v.begin(); it != v.end(); ++it) {
    const auto id = r.id(it.value(), "model.vocab[\"" + it.key() + "\"]");
    vocab[it.key()] = id;
    if (static_cast<size_t>(id) >= tokens.size()) {
      tokens.resize(static_cast<size_t>(id) + 1);
    }
    tokens[static_cast<size_t>(id)] = it.key();
  }
}

// Reads model.merges into merges, each ranked by its place in the list.
void BpeTokenizer::Impl::read_merges(const json& m, const Reader& r) {
  const auto& ms = r.at(m, "merges", "model");
  if (!ms.is_array()) {
    r.refuse("model.merges", "expected an array, but got " +
             std::string(ms.type_name()));
  }
  merges.reserve(ms.size());
  for (size_t i = 0; i < ms.size(); ++i) {
    const std::string field = "model.merges[" + std::to_string(i) + "]";
    const auto [a, b] = merge_tokens(ms[i], field, r);
    auto id_of = [&](const std::string& t) {
      auto it = vocab.find(t);
      if (it == vocab.end()) {
        r.refuse(field, "expected tokens of model.vocab, but \"" + t +
                 "\" is not one");
      }
      return it->second;
    };
    // A repeated pair keeps its last rank, as the library's map does.
    const auto left = id_of(a), right = id_of(b), merged = id_of(a + b);
    merges[pair_key(left, right)] = {
        static_cast<int32_t>(i), static_cast<int32_t>(merged)};
  }
}

// Finds each byte's byte-level character, and its <0xXX> token, in the
// vocabulary.
void BpeTokenizer::Impl::index_bytes() {
  const auto chars = byte_chars();
  for (int b = 0; b < 256; ++b) {
    std::string& c = byte_strings[static_cast<size_t>(b)];
    u::append_utf8(c, chars[static_cast<size_t>(b)]);
    auto it = vocab.find(c);
    byte_ids[static_cast<size_t>(b)] = it == vocab.end() ? -1 : it->second;
    char hex[8];
    std::snprintf(hex, sizeof hex, "<0x%02X>", b);
    it = vocab.find(hex);
    fallback_ids[static_cast<size_t>(b)] = it == vocab.end() ? -1 : it->second;
  }
}

void BpeTokenizer::Impl::read_added(const json& a, const Reader& r) {
  if (a.is_null()) {
    return;
  }
  if (!a.is_array()) {
    r.refuse("added_tokens", "expected an array, but got " +
             std::string(a.type_name()));
  }
  for (size_t i = 0; i < a.size(); ++i) {
    const std::string field = "added_tokens[" + std::to_string(i) + "]";
    AddedToken t;
    t.id = r.id(r.at(a[i], "id", field), field + ".id");
    t.content = r.text(r.at(a[i], "content", field), field + ".content");
    if (t.content.empty()) {
      r.refuse(field + ".content", "expected a non-empty token, but got \"\"");
    }
    t.single_word = r.flag(a[i], "single_word", false, field);
    t.lstrip = r.flag(a[i], "lstrip", false, field);
    t.rstrip = r.flag(a[i], "rstrip", false, field);
    t.normalized = r.flag(a[i], "normalized", true, field);
    t.special = r.flag(a[i], "special", false, field);
    added_by_id[t.id] = added.size();
    added_by_content[t.content] = t.id;
    added.push_back(std::move(t));
  }
  for (size_t i = 0; i < added.size(); ++i) {
    added_by_first_byte[static_cast<unsigned char>(added[i].content[0])]
        .push_back(i);
  }
  for (auto& list : added_by_first_byte) {
    std::stable_sort(list.begin(), list.end(), [&](size_t x, size_t y) {
      return added[x].content.size() > added[y].content.size();
    });
  }
}

void BpeTokenizer::Impl::read_pre(
    const json& p,
    const std::string& field,
    const Reader& r) {
  if (p.is_null()) {
    return;
  }
  const auto type = r.type_of(p, field);
  if (byte_level) {
    r.refuse(field, "expected ByteLevel to be the last pre-tokenizer, but "
             "\"" + type + "\" follows it");
  }
  if (type == "Sequence") {
    const auto& list = r.at(p, "pretokenizers", field);
    if (!list.is_array()) {
      r.refuse(field + ".pretokenizers", "expected an array, but got " +
               std::string(list.type_name()));
    }
    for (size_t i = 0; i < list.size(); ++i) {
      read_pre(list[i], field + ".pretokenizers[" + std::to_string(i) + "]", r);
    }
  } else if (type == "ByteLevel") {
    PreTokenizer s;
    s.kind = PreTokenizer::Kind::kByteLevel;
    s.add_prefix_space = r.flag(p, "add_prefix_space", true, field);
    if (r.flag(p, "use_regex", true, field)) {
      s.regex = std::make_shared<Regex>(kByteLevelPattern, false, field);
    }
    pre.push_back(std::move(s));
    byte_level = true;
  } else if (type == "Split") {
    read_split(p, field, r);
  } else if (type == "Digits") {
    add_split(R"(\p{N})", false,
              r.flag(p, "individual_digits", false, field)
                  ? Behavior::kIsolated
                  : Behavior::kContiguous,
              false, field);
  } else if (type == "Whitespace") {
    const std::string w = R"([\p{L}\p{Nl}\p{M}\p{Nd}\p{Pc}\x{200C}\x{200D}])";
    add_split(w + "+|[^" + w.substr(1, w.size() - 2) + R"(\s]+)", false,
              Behavior::kRemoved, true, field);
  } else if (type == "WhitespaceSplit") {
    add_split(R"(\s+)", false, Behavior::kRemoved, false, field);
  } else {
    r.refuse(field + ".type",
             "expected ByteLevel, Split, Digits, Whitespace, WhitespaceSplit "
             "or Sequence (remat reads byte-level BPE; a Metaspace tokenizer "
             "of Llama 1/2 or Mistral is read from its tokenizer.model), but "
             "got \"" + type + "\"");
  }
}

// Reads a Split pre-tokenizer: its pattern (a regex or a literal string),
// its behavior, and whether it inverts.
void BpeTokenizer::Impl::read_split(
    const json& p,
    const std::string& field,
    const Reader& r) {
  const auto& pattern = r.at(p, "pattern", field);
  bool literal = false;
  std::string text;
  if (pattern.is_object() && pattern.contains("Regex")) {
    text = r.text(pattern["Regex"], field + ".pattern.Regex");
  } else if (pattern.is_object() && pattern.contains("String")) {
    text = r.text(pattern["String"], field + ".pattern.String");
    literal = true;
  } else {
    r.refuse(field + ".pattern", "expected {\"Regex\": ...} or {\"String\": "
             "...}, but got " + pattern.dump().substr(0, 80));
  }
  const auto behavior = r.text(r.at(p, "behavior", field), field + ".behavior");
  const std::vector<std::pair<std::string, Behavior>> names{
      {"Removed", Behavior::kRemoved},
      {"Isolated", Behavior::kIsolated},
      {"MergedWithPrevious", Behavior::kMergedWithPrevious},
      {"MergedWithNext", Behavior::kMergedWithNext},
      {"Contiguous", Behavior::kContiguous}};
  auto it = std::find_if(names.begin(), names.end(),
                         [&](const auto& n) { return n.first == behavior; });
  if (it == names.end()) {
    r.refuse(field + ".behavior", "expected Removed, Isolated, "
             "MergedWithPrevious, MergedWithNext or Contiguous, but got \"" +
             behavior + "\"");
  }
  add_split(text, literal, it->second, r.flag(p, "invert", false, field),
            field);
}

// Appends a Split step, its pattern compiled now (an error names `field`).
void BpeTokenizer::Impl::add_split(
    const std::string& pattern,
    bool literal,
    Behavior b,
    bool invert,
    const std::string& field) {
  PreTokenizer s;
  s.regex = std::make_shared<Regex>(
      pattern, literal, "tokenizer '" + source + "': " + field);
  s.behavior = b;
  s.invert = invert;
  pre.push_back(std::move(s));
}

void BpeTokenizer::Impl::read_post(
    const json& p,
    const std::string& field,
    const Reader& r) {
  if (p.is_null()) {
    return;
  }
  const auto type = r.type_of(p, field);
  auto set = [&](int64_t& slot, int64_t id, const char* which) {
    if (slot >= 0 && slot != id) {
      r.refuse(field, std::string("expected one ") + which +
               " token, but a second post-processor adds another");
    }
    slot = id;
  };
  if (type == "Sequence") {
    const auto& list = r.at(p, "processors", field);
    for (size_t i = 0; i < list.size(); ++i) {
      read_post(list[i], field + ".processors[" + std::to_string(i) + "]", r);
    }
  } else if (type == "ByteLevel") {
    // Offsets only; no ids.
  } else if (type == "RobertaProcessing" || type == "BertProcessing") {
    for (const char* key : {"cls", "sep"}) {
      const auto& pair = r.at(p, key, field);
      if (!pair.is_array() || pair.size() != 2) {
        r.refuse(field + "." + key, "expected [token, id], but got " +
                 pair.dump().substr(0, 80));
      }
      set(std::string(key) == "cls" ? begin : end,
          r.id(pair[1], field + "." + key + "[1]"), key);
    }
  } else if (type == "TemplateProcessing") {
    const auto& single = r.at(p, "single", field);
    const auto& specials = r.at(p, "special_tokens", field);
    bool seen_a = false;
    if (!single.is_array()) {
      r.refuse(field + ".single", "expected an array, but got " +
               std::string(single.type_name()));
    }
    for (size_t i = 0; i < single.size(); ++i) {
      const std::string item = field + ".single[" + std::to_string(i) + "]";
      if (single[i].contains("Sequence")) {
        const auto& seq = single[i]["Sequence"];
        if (seq.value("id", "") != "A" || seen_a) {
          r.refuse(item, "expected the sequence $A once, but got " + seq.dump());
        }
        seen_a = true;
        continue;
      }
      if (!single[i].contains("SpecialToken")) {
        r.refuse(item, "expected SpecialToken or Sequence, but got " +
                 single[i].dump().substr(0, 80));
      }
      const auto name = r.text(r.at(single[i]["SpecialToken"], "id", item),
                               item + ".SpecialToken.id");
      if (!specials.contains(name) || !specials[name].contains("ids") ||
          specials[name]["ids"].size() != 1) {
        r.refuse(field + ".special_tokens", "expected \"" + name +
                 "\" with exactly one id, but got " +
                 (specials.contains(name) ? specials[name].dump() : "none"));
      }
      const auto id = r.id(specials[name]["ids"][0], field + ".special_tokens");
      int64_t& slot = seen_a ? end : begin;
      if (slot >= 0) {
        r.refuse(item, std::string("expected at most one special token ") +
                 (seen_a ? "after" : "before") + " $A, but got a second");
      }
      slot = id;
    }
  } else {
    r.refuse(field + ".type", "expected ByteLevel, TemplateProcessing, "
             "RobertaProcessing, BertProcessing or Sequence, but got \"" +
             type + "\"");
  }
}

void BpeTokenizer::Impl::read_decoder(const json& d, const Reader& r) {
  if (d.is_null()) {
    return;
  }
  const auto type = r.type_of(d, "decoder");
  if (type != "ByteLevel") {
    r.refuse("decoder.type", "expected ByteLevel or null, but got \"" + type +
             "\"");
  }
  byte_level_decoder = true;
  char_bytes.fill(-1);
  const auto chars = byte_chars();
  for (int b = 0; b < 256; ++b) {
    char_bytes[chars[static_cast<size_t>(b)]] = b;
  }
}

BpeTokenizer BpeTokenizer::from_json(const json& j, const std::string& source) {
  Reader r{source};
  if (!j.is_object()) {
    r.refuse("the file", "expected a JSON object, but got " +
             std::string(j.type_name()));
  }
  auto impl = std::make_shared<Impl>();
  impl->source = source;
  impl->word_char = std::make_shared<Regex>(kWordChar, false, source);
  auto field = [&](const char* key) -> const json& {
    static const json null;
    auto it = j.find(key);
    return it == j.end() ? null : *it;
  };
  const auto& normalizer = field("normalizer");
  if (!normalizer.is_null()) {
    r.refuse("normalizer", "expected null (remat reads no normalizer), but "
             "got " + (normalizer.is_object() && normalizer.contains("type")
                           ? "type " + normalizer["type"].dump()
                           : normalizer.dump().substr(0, 80)));
  }
  impl->read_model(r.at(j, "model", "the file"), r);
  impl->read_added(field("added_tokens"), r);
  impl->read_pre(field("pre_tokenizer"), "pre_tokenizer", r);
  impl->read_post(field("post_processor"), "post_processor", r);
  impl->read_decoder(field("decoder"), r);
  // truncation and padding are settings of a call, which remat's max_len
  // replaces; the pad id is kept.
  const auto& padding = field("padding");
  if (padding.is_object() && padding.contains("pad_id")) {
    impl->pad = r.id(padding["pad_id"], "padding.pad_id");
  }
  int64_t size = static_cast<int64_t>(impl->tokens.size());
  for (const auto& t : impl->added) {
    size = std::max(size, t.id + 1);
  }
  impl->size = size;
  for (int64_t id : {impl->begin, impl->end, impl->pad}) {
    if (id >= size) {
      r.refuse("post_processor", "expected special token ids below the "
               "vocabulary size " + std::to_string(size) + ", but got " +
               std::to_string(id));
    }
  }
  if (impl->pad < 0) {
    impl->pad = impl->end >= 0 ? impl->end : impl->begin >= 0 ? impl->begin : 0;
  }
  return BpeTokenizer(std::move(impl));
}

BpeTokenizer BpeTokenizer::from_file(const std::string& path) {
  // Llama 3's tokenizer.json is 9 MB; the largest in use are a few tens.
  constexpr int64_t kMaxBytes = 512 << 20;
  json j;
  try {
    j = json::parse(read_file(path, kMaxBytes));
  } catch (const json::exception& e) {
    TORCH_CHECK(false, "tokenizer '", path, "': expected JSON, but got ",
                e.what());
  }
  return from_json(j, path);
}

// ---------------------------------------------------------------- encoding

void BpeTokenizer::Impl::split_added(
    const std::string& s,
    bool normalized,
    std::vector<std::pair<std::string, int64_t>>& out) const {
  // Leftmost-longest matches, as the library's Aho-Corasick finds them; a
  // match refused for single_word still moves the search past it.
  size_t kept_end = 0; // where the last kept match stopped
  size_t text_start = 0;
  size_t at = 0;
  while (at < s.size()) {
    const AddedToken* hit = nullptr;
    for (size_t i : added_by_first_byte[static_cast<unsigned char>(s[at])]) {
      const auto& t = added[i];
      if (t.normalized == normalized &&
          s.compare(at, t.content.size(), t.content) == 0) {
        hit = &t;
        break; // longest first
      }
    }
    if (hit == nullptr) {
      ++at;
      continue;
    }
    size_t start = at, stop = at + hit->content.size();
    at = stop;
    if (hit->single_word) {
      const bool word_before = start > 0 &&
          word_char->matches_at_start(s.substr(char_start_before(s, start),
                                               start - char_start_before(s, start)));
      size_t len = 0;
      const bool word_after = stop < s.size() &&
          (code_point_at(s, stop, &len), word_char->matches_at_start(s.substr(stop, len)));
      if (word_before || word_after) {
        continue;
      }
    }
    if (hit->lstrip) { // spaces before it, but not into the previous match
      size_t len = 0;
      while (start > kept_end) {
        const size_t prev = char_start_before(s, start);
        if (!is_white_space(code_point_at(s, prev, &len))) {
          break;
        }
        start = prev;
      }
      start = std::max(start, kept_end);
    }
    if (hit->rstrip) {
      size_t len = 0;
      while (stop < s.size() && is_white_space(code_point_at(s, stop, &len))) {
        stop += len;
      }
    }
    if (start > text_start) {
      out.emplace_back(s.substr(text_start, start - text_start), -1);
    }
    out.emplace_back(std::string(), hit->id);
    text_start = kept_end = stop;
    at = std::max(at, stop);
  }
  if (text_start < s.size()) {
    out.emplace_back(s.substr(text_start), -1);
  }
}

std::vector<std::string> BpeTokenizer::Impl::pre_tokenize(std::string s) const {
  std::vector<std::string> pieces;
  pieces.push_back(std::move(s));
  std::vector<std::string> next;
  std::vector<Range> ranges;
  std::vector<bool> is_match;
  for (const auto& step : pre) {
    next.clear();
    for (auto& piece : pieces) {
      if (step.kind == PreTokenizer::Kind::kByteLevel && step.add_prefix_space &&
          (piece.empty() || piece[0] != ' ')) {
        piece.insert(piece.begin(), ' ');
      }
      if (!step.regex) {
        next.push_back(std::move(piece));
        continue;
      }
      match_ranges(step, piece, ranges, is_match);
      const auto kept = apply_behavior(step.behavior, ranges, is_match);
      for (const auto& range : kept) {
        if (range.second > range.first) {
          next.push_back(piece.substr(range.first, range.second - range.first));
        }
      }
    }
    pieces.swap(next);
  }
  return pieces;
}

// Appends the unknown token, unless fuse_unk joins it to the one before; with
// no unknown token the character is dropped, as the library drops a
// character it cannot name.
void BpeTokenizer::Impl::push_unk(std::vector<WordSymbol>& sym) const {
  if (unk_id >= 0 && !(fuse_unk && !sym.empty() && sym.back().id == unk_id)) {
    push_symbol(sym, unk_id);
  }
}

// The symbols of `w` before any merge: the ids of its bytes' characters
// (byte-level), else of its characters, or of their <0xXX> bytes.
std::vector<WordSymbol> BpeTokenizer::Impl::word_symbols(
    const std::string& w) const {
  std::vector<WordSymbol> sym;
  sym.reserve(w.size());
  if (byte_level) {
    for (unsigned char b : w) {
      const auto id = byte_ids[b];
      if (id >= 0) {
        push_symbol(sym, id);
      } else {
        push_unk(sym);
      }
    }
  } else {
    for (size_t i = 0; i < w.size();) {
      size_t len = 0;
      code_point_at(w, i, &len);
      auto it = vocab.find(w.substr(i, len));
      bool all_bytes = byte_fallback;
      for (size_t k = 0; all_bytes && k < len; ++k) {
        all_bytes = fallback_ids[static_cast<unsigned char>(w[i + k])] >= 0;
      }
      if (it != vocab.end()) {
        push_symbol(sym, it->second);
      } else if (all_bytes) {
        for (size_t k = 0; k < len; ++k) {
          push_symbol(sym, fallback_ids[static_cast<unsigned char>(w[i + k])]);
        }
      } else {
        push_unk(sym);
      }
      i += len;
    }
  }
  return sym;
}

// The library's merge loop: the lowest rank first, the leftmost on ties,
// one pair at a time, skipping queue entries that a merge made stale.
void BpeTokenizer::Impl::apply_merges(std::vector<WordSymbol>& sym) const {
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>>
      queue;
  auto consider = [&](int pos) {
    if (pos < 0 || sym[static_cast<size_t>(pos)].next < 0) {
      return;
    }
    const auto& a = sym[static_cast<size_t>(pos)];
    auto it = merges.find(pair_key(a.id, sym[static_cast<size_t>(a.next)].id));
    if (it != merges.end()) {
      queue.push({it->second.rank, pos, it->second.new_id});
    }
  };
  for (int i = 0; i + 1 < static_cast<int>(sym.size()); ++i) {
    consider(i);
  }
  while (!queue.empty()) {
    const auto top = queue.top();
    queue.pop();
    auto& a = sym[static_cast<size_t>(top.pos)];
    if (!a.live || a.next < 0) {
      continue;
    }
    auto& b = sym[static_cast<size_t>(a.next)];
    auto it = merges.find(pair_key(a.id, b.id));
    if (it == merges.end() || it->second.new_id != top.new_id) {
      continue;
    }
    a.id = top.new_id;
    b.live = false;
    a.next = b.next;
    if (a.next >= 0) {
      sym[static_cast<size_t>(a.next)].prev = top.pos;
    }
    consider(a.prev);
    consider(top.pos);
  }
}

// Appends the ids BPE makes of one word: its symbols, merged by rank.
void BpeTokenizer::Impl::merge_word(
    const std::string& w,
    std::vector<int64_t>& ids) const {
  auto sym = word_symbols(w);
  apply_merges(sym);
  for (const auto& s : sym) {
    if (s.live) {
      ids.push_back(s.id);
    }
  }
}

void BpeTokenizer::Impl::word(const std::string& w, std::vector<int64_t>& ids)
    const {
  if (ignore_merges) {
    std::string key;
    if (byte_level) {
      for (unsigned char b : w) {
        key += byte_strings[b];
      }
    }
    auto it = vocab.find(byte_level ? key : w);
    if (it != vocab.end()) {
      ids.push_back(it->second);
      return;
    }
  }
  constexpr size_t kMaxCachedBytes = 256;
  constexpr size_t kMaxCacheEntries = 10000; // the library's default
  if (w.size() <= kMaxCachedBytes) {
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = cache.find(w);
    if (it != cache.end()) {
      ids.insert(ids.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t first = ids.size();
  merge_word(w, ids);
  if (w.size() <= kMaxCachedBytes) {
    std::lock_guard<std::mutex> lock(cache_mutex);
    if (cache.size() < kMaxCacheEntries) {
      cache.emplace(w, std::vector<int64_t>(ids.begin() + static_cast<std::ptrdiff_t>(first), ids.end()));
    }
  }
}

std::vector<int64_t> BpeTokenizer::tokenize(const std::string& text) const {
  const auto& d = *impl_;
  // Python strings are always Unicode: invalid bytes become U+FFFD first.
  const std::string valid = u::invalid_utf8_offset(text) == std::string::npos
      ? std::string()
      : u::encode_utf8(u::decode_utf8(text));
  const std::string& s = valid.empty() ? text : valid;
  std::vector<int64_t> ids;
  std::vector<std::pair<std::string, int64_t>> raw, normalized;
  d.split_added(s, /*normalized=*/false, raw);
  for (auto& piece : raw) {
    if (piece.second >= 0) {
      ids.push_back(piece.second);
      continue;
    }
    normalized.clear();
    d.split_added(piece.first, /*normalized=*/true, normalized);
    for (auto& part : normalized) {
      if (part.second >= 0) {
        ids.push_back(part.second);
        continue;
      }
      for (const auto& w : d.pre_tokenize(std::move(part.first))) {
        d.word(w, ids);
      }
    }
  }
  return ids;
}

// ---------------------------------------------------------------- decoding

std::string BpeTokenizer::decode(
    const std::vector<int64_t>& ids,
    bool skip_special) const {
  const auto& d = *impl_;
  std::string out, chunk;
  bool first_token = true;
  auto flush = [&] {
    if (!d.byte_level_decoder) {
      out += chunk;
      chunk.clear();
      return;
    }
    size_t len = 0;
    for (size_t i = 0; i < chunk.size(); i += len) {
      const char32_t c = code_point_at(chunk, i, &len);
      if (c < d.char_bytes.size() && d.char_bytes[c] >= 0) {
        out.push_back(static_cast<char>(d.char_bytes[c]));
      } else {
        out.append(chunk, i, len);
      }
    }
    chunk.clear();
  };
  for (auto id : ids) {
    TORCH_CHECK(
        id >= 0 && id < d.size, "tokenizer '", d.source,
        "': expected an id in [0, ", d.size, "), but got ", id);
    auto added = d.added_by_id.find(id);
    if (added != d.added_by_id.end()) {
      const auto& t = d.added[added->second];
      if (skip_special && t.special) {
        continue;
      }
      flush();
      out += t.content;
      continue;
    }
    const auto& token = d.tokens[static_cast<size_t>(id)];
    if (!d.byte_level_decoder && !first_token) {
      chunk += ' '; // no decoder: tokens joined by spaces, as the library
    }
    chunk += token;
    first_token = false;
  }
  flush();
  if (u::invalid_utf8_offset(out) != std::string::npos) {
    out = u::encode_utf8(u::decode_utf8(out));
  }
  return out;
}

int64_t BpeTokenizer::vocab_size() const {
  return impl_->size;
}
int64_t BpeTokenizer::pad_id() const {
  return impl_->pad;
}
int64_t BpeTokenizer::begin_id() const {
  return impl_->begin;
}
int64_t BpeTokenizer::end_id() const {
  return impl_->end;
}

int64_t BpeTokenizer::token_to_id(const std::string& token) const {
  auto added = impl_->added_by_content.find(token);
  if (added != impl_->added_by_content.end()) {
    return added->second;
  }
  auto it = impl_->vocab.find(token);
  return it == impl_->vocab.end() ? -1 : it->second;
}

std::string BpeTokenizer::id_to_token(int64_t id) const {
  const auto& d = *impl_;
  auto added = d.added_by_id.find(id);
  if (added != d.added_by_id.end()) {
    return d.added[added->second].content;
  }
  TORCH_CHECK(
      id >= 0 && id < static_cast<int64_t>(d.tokens.size()) &&
          !d.tokens[static_cast<size_t>(id)].empty(),
      "tokenizer '", d.source, "': expected an id of a token, but got ", id);
  return d.tokens[static_cast<size_t>(id)];
}

} // namespace io
} // namespace remat
