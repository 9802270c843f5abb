// Reading JSON from an untrusted file: describing a value in an error
// message, a parser error in one line, and typed reads of an object's fields
// worded alike for every reader (config.json, training states, records).
//
// Example:
//   // given: auto j = nlohmann::json::parse(R"({"layers": "2"})");
//   remat::io::JsonReader config(j, "config");
//   int64_t heads = config.integer("heads", 12);  // absent: the fallback
//   int64_t layers = config.integer("layers");
//   // throws: config field "layers": expected an integer, but got "2"
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

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

/// Typed reads of the fields of one JSON object from an untrusted file. Every
/// refusal is a c10::Error worded alike, `what` naming the document: a
/// missing field ("training options: expected a field \"seed\", but it is
/// missing"), a mistyped one ("config field \"hidden_size\": expected an
/// integer, but got \"64\""). The reads with a fallback give it when the
/// field is absent or null; the others require the field. A required number
/// reads null as NaN (nlohmann::json writes NaN and infinity as null).
class JsonReader {
  // Defined first: the reads below deduce their types from it.
  template <typename Get>
  auto typed(const nlohmann::json& v, const char* key, const char* expected, const Get& get) const {
    auto got = get(v);
    TORCH_CHECK(got.has_value(), what_, " field \"", key, "\": expected ", expected,
                ", but got ", describe_json(v));
    return *got;
  }
  double as_number(const nlohmann::json& v, const char* key, const char* expected = "a number")
      const {
    if (v.is_null()) {
      return std::numeric_limits<double>::quiet_NaN();
    }
    return typed(v, key, expected, [](const nlohmann::json& x) {
      return x.is_number() ? c10::optional<double>(x.get<double>()) : c10::nullopt;
    });
  }


 public:
  /// Throws unless `j` is an object. `j` must outlive the reader.
  JsonReader(const nlohmann::json& j, std::string what) : j_(j), what_(std::move(what)) {
    TORCH_CHECK(j.is_object(), what_, ": expected a JSON object, but got ", describe_json(j));
  }

  /// The field is there and not null.
  bool has(const char* key) const {
    auto it = j_.find(key);
    return it != j_.end() && !it->is_null();
  }
  /// The field, whatever its type; throws when it is missing.
  const nlohmann::json& at(const char* key) const {
    auto it = j_.find(key);
    TORCH_CHECK(it != j_.end(), what_, ": expected a field \"", key, "\", but it is missing");
    return *it;
  }

  int64_t integer(const char* key) const {
    return typed(at(key), key, "an integer", [](const nlohmann::json& v) {
      return v.is_number_integer() ? c10::optional<int64_t>(v.get<int64_t>()) : c10::nullopt;
    });
  }
  int64_t integer(const char* key, int64_t fallback) const {
    return has(key) ? integer(key) : fallback;
  }
  /// An integer >= 0 that may need all 64 bits (a seed).
  uint64_t unsigned_integer(const char* key) const {
    return typed(at(key), key, "an integer >= 0", [](const nlohmann::json& v) {
      return v.is_number_unsigned() ? c10::optional<uint64_t>(v.get<uint64_t>()) : c10::nullopt;
    });
  }
  double number(const char* key) const {
    return as_number(at(key), key);
  }
  double number(const char* key, double fallback) const {
    return has(key) ? number(key) : fallback;
  }
  bool boolean(const char* key) const {
    return typed(at(key), key, "true or false", [](const nlohmann::json& v) {
      return v.is_boolean() ? c10::optional<bool>(v.get<bool>()) : c10::nullopt;
    });
  }
  bool boolean(const char* key, bool fallback) const {
    return has(key) ? boolean(key) : fallback;
  }
  std::string string(const char* key) const {
    return typed(at(key), key, "a string", [](const nlohmann::json& v) {
      return v.is_string() ? c10::optional<std::string>(v.get<std::string>()) : c10::nullopt;
    });
  }
  std::string string(const char* key, const std::string& fallback) const {
    return has(key) ? string(key) : fallback;
  }
  /// An array of numbers (null items read as NaN).
  std::vector<double> numbers(const char* key) const {
    std::vector<double> out;
    for (const auto& x : array(key)) {
      out.push_back(as_number(x, key, "numbers"));
    }
    return out;
  }
  std::vector<std::string> strings(const char* key) const {
    std::vector<std::string> out;
    for (const auto& x : array(key)) {
      out.push_back(typed(x, key, "strings", [](const nlohmann::json& v) {
        return v.is_string() ? c10::optional<std::string>(v.get<std::string>()) : c10::nullopt;
      }));
    }
    return out;
  }
  /// The array field; throws for anything else.
  const nlohmann::json& array(const char* key) const {
    const auto& v = at(key);
    TORCH_CHECK(v.is_array(), what_, " field \"", key, "\": expected an array, but got ",
                describe_json(v));
    return v;
  }


 private:
  const nlohmann::json& j_;
  std::string what_;
};

} // namespace io
} // namespace remat
