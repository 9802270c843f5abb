// libFuzzer harness for the safetensors reader (remat/io/safetensors.h).
// Each input is a whole file. It is read twice, from memory
// (decode_safetensors) and from a file (read_safetensors,
// load_safetensors_metadata); both must agree. A file that reads is written
// again (encode_safetensors) and must read back to the same tensors, byte
// for byte, and the same metadata.
#include "fuzz_input.h"

#include "remat/io/safetensors.h"

#include <torch/torch.h>

#include <cstring>
#include <optional>

namespace {

using remat::io::SafetensorsFile;
using remat_fuzz::require;

bool same_bytes(const torch::Tensor& a, const torch::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && a.sizes() == b.sizes() &&
      a.nbytes() == b.nbytes() &&
      (a.nbytes() == 0 || std::memcmp(a.data_ptr(), b.data_ptr(), a.nbytes()) == 0);
}

bool same_file(const SafetensorsFile& a, const SafetensorsFile& b) {
  if (a.metadata != b.metadata || a.tensors.size() != b.tensors.size()) {
    return false;
  }
  for (const auto& kv : a.tensors) {
    auto it = b.tensors.find(kv.first);
    if (it == b.tensors.end() || !same_bytes(kv.second, it->second)) {
      return false;
    }
  }
  return true;
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::optional<SafetensorsFile> from_memory;
  remat_fuzz::expect_refusal_or_success(
      [&] { from_memory = remat::io::decode_safetensors(data, size, "fuzz"); });

  const auto& path = remat_fuzz::write_input(data, size, ".safetensors");
  std::optional<SafetensorsFile> from_file;
  remat_fuzz::expect_refusal_or_success(
      [&] { from_file = remat::io::read_safetensors(path); });
  require(
      from_memory.has_value() == from_file.has_value(),
      "decode_safetensors and read_safetensors disagree on whether the file is valid");
  if (!from_memory) {
    return 0;
  }
  require(same_file(*from_memory, *from_file), "memory and file reads differ");
  require(
      remat::io::load_safetensors_metadata(path) == from_memory->metadata,
      "load_safetensors_metadata differs from read_safetensors' metadata");

  const std::string again =
      remat::io::encode_safetensors(from_memory->tensors, from_memory->metadata);
  const auto back = remat::io::decode_safetensors(again.data(), again.size(), "again");
  require(same_file(*from_memory, back), "encode then decode changed the file's content");
  return 0;
}
