#include "io/unicode.h"

#include <algorithm>

namespace remat {
namespace io {
namespace unicode {

namespace {

constexpr char32_t kReplacement = 0xFFFD;

bool in_ranges(const CodeRange* ranges, size_t n, char32_t cp) {
  const CodeRange* end = ranges + n;
  // First range whose last >= cp.
  auto it = std::lower_bound(
      ranges, end, cp,
      [](const CodeRange& r, char32_t c) { return r.last < c; });
  return it != end && it->first <= cp;
}

// One UTF-8 sequence at s[i] of s[0, n).
struct Decoded {
  char32_t cp;  ///< the code point, or U+FFFD when not well formed
  size_t size;  ///< bytes it spans: 1 for an invalid lead byte, up to the
                ///< offending byte for a truncated sequence
  bool valid;   ///< well formed: not overlong, not a surrogate, <= U+10FFFF
};

Decoded decode_at(const unsigned char* s, size_t n, size_t i) {
  const unsigned char c = s[i];
  if (c < 0x80) {
    return {c, 1, true};
  }
  size_t len = 0;
  char32_t cp = 0;
  char32_t min = 0;
  if ((c & 0xE0) == 0xC0) {
    len = 2, cp = c & 0x1F, min = 0x80;
  } else if ((c & 0xF0) == 0xE0) {
    len = 3, cp = c & 0x0F, min = 0x800;
  } else if ((c & 0xF8) == 0xF0) {
    len = 4, cp = c & 0x07, min = 0x10000;
  } else {
    return {kReplacement, 1, false}; // stray continuation or invalid lead byte
  }
  size_t k = 1;
  for (; k < len && i + k < n && (s[i + k] & 0xC0) == 0x80; ++k) {
    cp = (cp << 6) | (s[i + k] & 0x3F);
  }
  if (k < len) {
    return {kReplacement, k, false}; // truncated: resume at the offending byte
  }
  const bool overlong = cp < min;
  const bool surrogate = cp >= 0xD800 && cp <= 0xDFFF;
  const bool valid = !overlong && !surrogate && cp <= 0x10FFFF;
  return {valid ? cp : kReplacement, len, valid};
}

} // namespace

size_t invalid_utf8_offset(const std::string& text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  for (size_t i = 0; i < text.size();) {
    const auto d = decode_at(s, text.size(), i);
    if (!d.valid) {
      return i;
    }
    i += d.size;
  }
  return std::string::npos;
}

std::u32string decode_utf8(const std::string& text) {
  std::u32string out;
  out.reserve(text.size());
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  for (size_t i = 0; i < text.size();) {
    const auto d = decode_at(s, text.size(), i);
    out.push_back(d.cp);
    i += d.size;
  }
  return out;
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
    cp = kReplacement;
  }
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string encode_utf8(const std::u32string& text) {
  std::string out;
  out.reserve(text.size());
  for (char32_t cp : text) {
    append_utf8(out, cp);
  }
  return out;
}

bool is_control(char32_t cp) {
  if (cp == '\t' || cp == '\n' || cp == '\r') {
    return false;
  }
  return in_ranges(kOther, kOther_size, cp);
}

bool is_whitespace(char32_t cp) {
  if (cp == ' ' || cp == '\t' || cp == '\n' || cp == '\r' || cp == 0x2028 ||
      cp == 0x2029) {
    return true;
  }
  return in_ranges(kSpaceSeparator, kSpaceSeparator_size, cp);
}

bool is_punctuation(char32_t cp) {
  if ((cp >= 33 && cp <= 47) || (cp >= 58 && cp <= 64) ||
      (cp >= 91 && cp <= 96) || (cp >= 123 && cp <= 126)) {
    return true;
  }
  return in_ranges(kPunctuation, kPunctuation_size, cp);
}

bool is_cjk(char32_t cp) {
  return (cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0x3400 && cp <= 0x4DBF) ||
      (cp >= 0x20000 && cp <= 0x2A6DF) || (cp >= 0x2A700 && cp <= 0x2B73F) ||
      (cp >= 0x2B740 && cp <= 0x2B81F) || (cp >= 0x2B820 && cp <= 0x2CEAF) ||
      (cp >= 0xF900 && cp <= 0xFAFF) || (cp >= 0x2F800 && cp <= 0x2FA1F);
}

bool is_nonspacing_mark(char32_t cp) {
  return in_ranges(kNonSpacingMark, kNonSpacingMark_size, cp);
}

void append_folded(std::u32string& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(cp >= 'A' && cp <= 'Z' ? cp + ('a' - 'A') : cp);
    return;
  }
  // Hangul syllables decompose algorithmically (Unicode 3.12) into jamo.
  constexpr char32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161,
                     kTBase = 0x11A7;
  constexpr char32_t kVCount = 21, kTCount = 28, kSCount = 11172;
  if (cp >= kSBase && cp < kSBase + kSCount) {
    const char32_t s = cp - kSBase;
    out.push_back(kLBase + s / (kVCount * kTCount));
    out.push_back(kVBase + (s % (kVCount * kTCount)) / kTCount);
    if (s % kTCount != 0) {
      out.push_back(kTBase + s % kTCount);
    }
    return;
  }
  if (is_nonspacing_mark(cp)) {
    return;
  }
  const CodeMap* end = kFold + kFold_size;
  auto it = std::lower_bound(
      kFold, end, cp, [](const CodeMap& m, char32_t c) { return m.from < c; });
  out.push_back(it != end && it->from == cp ? it->to : cp);
}

} // namespace unicode
} // namespace io
} // namespace remat
