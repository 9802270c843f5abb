// Describing a JSON value from an untrusted file in an error message: the
// readers of config.json, safetensors headers, JSONL data and training
// states share it.
//
// Example:
//   // given: auto j = nlohmann::json::parse("[1, 2, 3]");  // from a file
//   TORCH_CHECK(j.is_number_integer(), "expected an integer, but got ",
//               remat::io::describe_json(j));   // "an array of 3 items"
#pragma once

#include <nlohmann/json.hpp>

#include <string>

namespace remat {
namespace io {

/// A scalar as its JSON text, cut to `max_chars` and made one line; an array
/// or object by its kind and size only. (nlohmann's dump() recurses, so a
/// deeply nested value from a hostile file would overflow the stack.)
inline std::string describe_json(
    const nlohmann::json& j,
    size_t max_chars = 60) {
  if (j.is_array()) {
    return "an array of " + std::to_string(j.size()) + " items";
  }
  if (j.is_object()) {
    std::string keys;
    for (auto it = j.begin(); it != j.end() && keys.size() < max_chars; ++it) {
      keys += (keys.empty() ? "" : ", ") + it.key();
    }
    return describe_json(nlohmann::json(keys), max_chars)
        .insert(0, "an object with fields ");
  }
  std::string text =
      j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  std::string out;
  for (char c : text.substr(0, max_chars)) {
    out.push_back(static_cast<unsigned char>(c) < 0x20 || c == 0x7f ? '?' : c);
  }
  return text.size() > max_chars ? out + "..." : out;
}

/// The text of a nlohmann::json error without its "[json.exception.NAME]"
/// tag, one line of printable ASCII (a hostile file's bytes are quoted in
/// "last read: ..."), cut to `max_chars`. When `drop_position`, a parse
/// error's "parse error at line L, column C: " is removed too, for callers
/// that say where themselves (a JSONL reader parses one line at a time, so
/// "line 1" would mislead).
inline std::string json_error_text(
    const std::exception& e,
    bool drop_position = false,
    size_t max_chars = 160) {
  std::string text = e.what();
  if (text.compare(0, 16, "[json.exception.") == 0) {
    auto close = text.find("] ");
    if (close != std::string::npos) {
      text.erase(0, close + 2);
    }
  }
  if (drop_position && text.compare(0, 15, "parse error at ") == 0) {
    auto colon = text.find(": ");
    if (colon != std::string::npos) {
      text.erase(0, colon + 2);
    }
  }
  std::string out;
  for (char c : text.substr(0, max_chars)) {
    const auto u = static_cast<unsigned char>(c);
    out.push_back(u < 0x20 || u >= 0x7f ? '?' : c);
  }
  return text.size() > max_chars ? out + "..." : out;
}

} // namespace io
} // namespace remat
