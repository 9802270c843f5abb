// The Unicode facts that BERT's BasicTokenizer needs, without ICU: UTF-8
// decoding and encoding, and lookups in tables generated from Python's
// unicodedata (see scripts/gen_unicode_tables.py).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace remat {
namespace io {
namespace unicode {

struct CodeRange {
  char32_t first, last; ///< inclusive
};
struct CodeMap {
  char32_t from, to;
};

extern const CodeRange kOther[]; ///< categories C*: Cc, Cf, Cn, Co, Cs
extern const size_t kOther_size;
extern const CodeRange kPunctuation[]; ///< categories P*
extern const size_t kPunctuation_size;
extern const CodeRange kSpaceSeparator[]; ///< category Zs
extern const size_t kSpaceSeparator_size;
extern const CodeRange kNonSpacingMark[]; ///< category Mn
extern const size_t kNonSpacingMark_size;
/// lower() + NFD without marks, for Latin, Greek and Cyrillic blocks; sorted.
extern const CodeMap kFold[];
extern const size_t kFold_size;

/// The byte offset of the first byte that is not part of well-formed UTF-8
/// (a stray continuation, a truncated, overlong or surrogate sequence, a code
/// point past U+10FFFF), or std::string::npos when all of `text` is UTF-8.
size_t invalid_utf8_offset(const std::string& text);
/// Decodes UTF-8; every invalid or truncated sequence becomes U+FFFD.
std::u32string decode_utf8(const std::string& text);
/// Encodes code points as UTF-8 (invalid ones as U+FFFD).
std::string encode_utf8(const std::u32string& text);
void append_utf8(std::string& out, char32_t cp);

/// Python's unicodedata.category(c).startswith("C") except \t \n \r.
bool is_control(char32_t cp);
/// Space, \t, \n, \r, category Zs, and the line/paragraph separators that
/// Python's str.split() also splits on.
bool is_whitespace(char32_t cp);
/// ASCII symbols (BERT counts $, +, ^ ... as punctuation) or category P*.
bool is_punctuation(char32_t cp);
/// CJK Unified Ideographs and their extensions (not Hangul, Kana).
bool is_cjk(char32_t cp);
bool is_nonspacing_mark(char32_t cp);
/// Appends lower() then NFD without marks (what uncased BERT does to a
/// character): nothing for a mark, 2 or 3 jamo for a Hangul syllable.
/// Exact for ASCII, Latin, Greek, Cyrillic and Hangul; other characters pass
/// through unchanged.
void append_folded(std::u32string& out, char32_t cp);

} // namespace unicode
} // namespace io
} // namespace remat
