#include "remat/train/train_state.h"
#include "remat/field_error.h"

#include "remat/io/file.h"
#include "remat/io/safetensors.h"

#include <c10/util/Exception.h>
#include <torch/torch.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include <sys/stat.h>

namespace remat {
namespace train {

namespace {

constexpr const char* kFormatKey = "remat.format";
constexpr const char* kFormat = "remat-train-state-1";
constexpr const char* kInfoKey = "remat.state";
constexpr const char* kChecksumKey = "remat.checksum";

// FNV-1a over 8-byte words (then the tail byte by byte): not cryptographic,
// but any torn write or flipped bit changes it, at memory speed rather than
// a byte per multiply (a state is weights plus twice their size in AdamW
// moments).
struct Fnv1a {
  uint64_t h = 0xcbf29ce484222325ULL;
  void add(const void* data, size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
      uint64_t word;
      std::memcpy(&word, p + i, 8);
      h = (h ^ word) * 0x100000001b3ULL;
    }
    for (; i < n; ++i) {
      h = (h ^ p[i]) * 0x100000001b3ULL;
    }
  }
  void add(const std::string& s) {
    add(s.data(), s.size());
    add("\0", 1);
  }
};

std::string checksum(
    const std::map<std::string, torch::Tensor>& tensors,
    const std::string& info_text) {
  Fnv1a f;
  f.add(info_text);
  for (const auto& kv : tensors) { // std::map: sorted by name
    auto t = kv.second.contiguous().cpu();
    f.add(kv.first);
    f.add(std::string(c10::toString(t.scalar_type())));
    for (auto d : t.sizes()) {
      f.add(&d, sizeof(d));
    }
    f.add(t.data_ptr(), t.nbytes());
  }
  char hex[17];
  std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(f.h));
  return hex;
}

void make_dirs(const std::string& dir) {
  if (dir.empty()) {
    return;
  }
  std::string partial;
  size_t pos = 0;
  while (pos != std::string::npos) {
    pos = dir.find('/', pos + 1);
    partial = dir.substr(0, pos);
    if (partial.empty()) {
      continue;
    }
    if (::mkdir(partial.c_str(), 0777) != 0 && errno != EEXIST) {
      TORCH_CHECK(false, "could not create the folder '", partial, "': ",
                  std::strerror(errno));
    }
  }
  struct stat st;
  TORCH_CHECK(
      ::stat(dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode), "'", dir,
      "' is not a folder");
}

bool exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

} // namespace

std::string state_path(const std::string& dir) {
  return dir + "/state.safetensors";
}

std::string previous_state_path(const std::string& dir) {
  return dir + "/state.prev.safetensors";
}

void save_train_state(const std::string& dir, const TrainState& state) {
  make_dirs(dir);
  const std::string info_text = state.info.dump();
  std::map<std::string, std::string> metadata{
      {kFormatKey, kFormat},
      {kInfoKey, info_text},
      {kChecksumKey, checksum(state.tensors, info_text)}};
  const std::string bytes = io::encode_safetensors(state.tensors, metadata);

  const std::string path = state_path(dir);
  io::AtomicFile file(path);
  file.write(bytes);
  if (exists(path)) {
    // Keep the state being replaced: a hard link, itself atomic, so the
    // previous state is whole too.
    io::link_file_atomic(path, previous_state_path(dir));
  }
  file.commit();
}

TrainState load_train_state(const std::string& path) {
  TORCH_CHECK(exists(path), "no training state at '", path, "'");
  io::SafetensorsFile file;
  try {
    file = io::read_safetensors(path);
  } catch (const c10::Error& e) {
    std::string what = first_line(e);
    TORCH_CHECK(false, "'", path, "' is damaged (", what,
                ")");
  }
  auto meta = [&](const char* key) -> const std::string& {
    auto it = file.metadata.find(key);
    TORCH_CHECK(
        it != file.metadata.end(), "'", path,
        "' is not a remat training state (its metadata lacks \"", key, "\")");
    return it->second;
  };
  TORCH_CHECK(
      meta(kFormatKey) == kFormat, "'", path, "' has format '", meta(kFormatKey),
      "', but this remat reads '", kFormat, "'");
  const std::string& info_text = meta(kInfoKey);
  const std::string expected = meta(kChecksumKey);
  const std::string actual = checksum(file.tensors, info_text);
  TORCH_CHECK(
      actual == expected, "'", path, "' is damaged (checksum ", actual,
      ", but the file says ", expected, ")");
  TrainState state;
  state.tensors = std::move(file.tensors);
  try {
    state.info = nlohmann::json::parse(info_text);
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, "'", path, "' is damaged (its state document is not JSON)");
  }
  TORCH_CHECK(
      state.info.is_object(), "'", path,
      "' is damaged (its state document is not a JSON object)");
  return state;
}

int64_t peek_train_state_step(const std::string& path) {
  try {
    auto meta = io::load_safetensors_metadata(path);
    auto it = meta.find(kInfoKey);
    if (it == meta.end()) {
      return -1;
    }
    auto j = nlohmann::json::parse(it->second);
    return j.at("step").get<int64_t>();
  } catch (...) {
    return -1;
  }
}

} // namespace train
} // namespace remat
