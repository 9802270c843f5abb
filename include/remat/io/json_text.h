// Describing a JSON value from an untrusted file in an error message: the
// readers of config.json, safetensors headers, JSONL data and training
// states share it.
//
// Example:
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

} // namespace io
} // namespace remat
