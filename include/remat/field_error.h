// The error that names the field a value is about, so that a caller maps
// it to its own spelling (a command-line flag, a JSON key) without reading
// the message. Every options type of remat (nn::ModelConfig, the models'
// options, train::TrainOptions, plan::ModelSpec) throws it from validate().
//
// Example:
//   // given: int64_t batch = 0;
//   try {
//     remat::check_field(batch >= 1, "batch",
//                        "batch: expected a value >= 1, but got 0");
//   } catch (const remat::FieldError& e) {
//     std::cerr << "--" << e.field() << "\n";  // --batch
//   }
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <utility>

namespace remat {

/// A value out of its range, with the name of the field it is about
/// ("layers", "hidden_size", "repeats"), so a caller maps it to its own
/// spelling (a command-line flag, a JSON key) without reading the message.
class FieldError : public c10::Error {
 public:
  FieldError(std::string field, const std::string& message)
      : c10::Error(
            c10::SourceLocation{__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
            message),
        field_(std::move(field)) {}

  const std::string& field() const {
    return field_;
  }

 private:
  std::string field_;
};

/// The first line of a message: what a one-line refusal prints of an error
/// (c10::Error messages may span lines and carry a backtrace).
inline std::string first_line(const std::string& text) {
  return text.substr(0, text.find('\n'));
}
inline std::string first_line(const c10::Error& e) {
  return first_line(e.what_without_backtrace());
}

/// Throws FieldError(field, message) unless `ok`.
inline void check_field(bool ok, const std::string& field, const std::string& message) {
  if (!ok) {
    throw FieldError(field, message);
  }
}

} // namespace remat
