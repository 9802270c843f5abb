// Reading and writing the safetensors format, the one Hugging Face model
// repositories ship weights in. A file is: an 8-byte little-endian header
// length N, N bytes of JSON
//   {"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, ...,
//    "__metadata__": {"key": "value"}}
// then the data, tensors packed without holes (offsets count from the start
// of the data, after the header).
//
// The reader refuses every malformed file with a one-line c10::Error that
// names the file and the tensor; it never reads out of bounds. The writer is
// atomic: a crash leaves either the old file or the new one, never a part.
//
// clang-format off
// Example:
//   std::map<std::string, torch::Tensor> w{
//       {"linear.weight", torch::randn({4, 3})}};
//   remat::io::save_safetensors("model.safetensors", w, {{"format", "pt"}});
//   auto back = remat::io::load_safetensors("model.safetensors");
//   auto meta = remat::io::read_safetensors("model.safetensors").metadata;
// clang-format on
#pragma once

#include <torch/types.h>

#include <cstddef>
#include <map>
#include <string>

namespace remat {
namespace io {

/// The tensors and the free-form string metadata of one safetensors file.
struct SafetensorsFile {
  std::map<std::string, torch::Tensor> tensors; ///< contiguous CPU tensors
  std::map<std::string, std::string> metadata; ///< the "__metadata__" object
};

/// Reads a whole file. Throws c10::Error naming the file (and the tensor)
/// when the file is malformed: truncated, header length beyond the file,
/// invalid JSON, unknown dtype, offsets out of bounds, overlapping or leaving
/// holes, byte size not shape x item size, duplicate names.
SafetensorsFile read_safetensors(const std::string& path);

/// The tensors of a file (see read_safetensors).
std::map<std::string, torch::Tensor> load_safetensors(const std::string& path);

/// Reads only the header's "__metadata__" (cheap for a large file).
std::map<std::string, std::string> load_safetensors_metadata(
    const std::string& path);

/// Parses a file held in memory; `name` stands for the file in messages.
SafetensorsFile decode_safetensors(
    const void* data,
    size_t size_bytes,
    const std::string& name = "<memory>");

/// The bytes of a safetensors file holding `tensors` (any device and layout;
/// copied to contiguous CPU). Data is ordered by item size, largest first,
/// then by name, as the reference implementation does, so every tensor is
/// aligned to its item size; the header is padded with spaces to 8 bytes.
std::string encode_safetensors(
    const std::map<std::string, torch::Tensor>& tensors,
    const std::map<std::string, std::string>& metadata = {});

/// Writes `tensors` to `path` atomically: to `path + ".tmp.<pid>"`, then
/// flush, fsync and rename over `path`. Throws c10::Error naming the path on
/// an unsupported dtype or an I/O error (and removes the temporary file).
void save_safetensors(
    const std::string& path,
    const std::map<std::string, torch::Tensor>& tensors,
    const std::map<std::string, std::string>& metadata = {});

} // namespace io
} // namespace remat
