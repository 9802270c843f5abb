// --device, shared by `remat bench` and `remat train`.
#pragma once

#include "command.h"

#include "remat/device.h"
#include "remat/field_error.h"

#include <c10/util/Exception.h>

#include <string>

namespace remat {
namespace cli {

/// --device's value ("cpu", "cuda", "cuda:N") as a device this process can
/// use, its index filled in; a UsageError (one line, exit 2) when the text is
/// malformed, the build has no CUDA, or no such GPU is visible.
inline c10::Device parse_device_flag(const std::string& text, const std::string& flag = "--device") {
  try {
    return require_device(parse_device(text));
  } catch (const c10::Error& e) {
    std::string what = first_line(e);
    throw UsageError(flag + ": " + what);
  }
}

} // namespace cli
} // namespace remat
