#include "remat/io/safetensors.h"

#include "remat/io/json_text.h"
#include "remat/io/file.h"

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "remat's safetensors code assumes a little-endian host"
#endif

namespace remat {
namespace io {

namespace {

// The reference implementation's bound; it keeps a corrupt length field from
// asking for gigabytes before anything is checked.
constexpr uint64_t kMaxHeaderBytes = 100 * 1000 * 1000;
constexpr const char* kMetadataKey = "__metadata__";

struct DtypeInfo {
  const char* name;
  torch::Dtype dtype;
  size_t item_bytes;
};

const DtypeInfo kDtypes[] = {
    {"F64", torch::kFloat64, 8}, {"F32", torch::kFloat32, 4},
    {"F16", torch::kFloat16, 2}, {"BF16", torch::kBFloat16, 2},
    {"I64", torch::kInt64, 8},   {"I32", torch::kInt32, 4},
    {"I16", torch::kInt16, 2},   {"I8", torch::kInt8, 1},
    {"U8", torch::kUInt8, 1},    {"BOOL", torch::kBool, 1},
};

const DtypeInfo* find_dtype(const std::string& name) {
  for (const auto& d : kDtypes) {
    if (name == d.name) {
      return &d;
    }
  }
  return nullptr;
}

const DtypeInfo& dtype_info(torch::Dtype dtype) {
  for (const auto& d : kDtypes) {
    if (d.dtype == dtype) {
      return d;
    }
  }
  TORCH_CHECK(
      false,
      "safetensors: expected a dtype among F64, F32, F16, BF16, I64, I32, "
      "I16, I8, U8, BOOL, but got ",
      dtype);
}

// JSON text from a corrupt file may hold anything; keep messages one line.
std::string printable(const std::string& text, size_t max_chars = 80) {
  std::string out;
  for (char c : text.substr(0, max_chars)) {
    out.push_back(static_cast<unsigned char>(c) < 0x20 || c == 0x7f ? '?' : c);
  }
  if (text.size() > max_chars) {
    out += "...";
  }
  return out;
}

// Where bytes come from: a file (read piece by piece, so that a large model
// is never held twice) or a buffer in memory.
class Source {
 public:
  virtual ~Source() = default;
  virtual uint64_t size() const = 0;
  /// Reads exactly n bytes at offset; the caller has checked the bounds.
  virtual void read(uint64_t offset, void* dst, size_t n) = 0;
};

class FileSource : public Source {
 public:
  explicit FileSource(const std::string& path)
      : path_((require_regular_file(path, "safetensors file"), path)),
        in_(path, std::ios::binary) {
    TORCH_CHECK(
        in_, "could not open safetensors file '", path,
        "': ", std::strerror(errno));
    in_.seekg(0, std::ios::end);
    auto end = in_.tellg();
    TORCH_CHECK(
        end >= 0, "could not find the size of safetensors file '", path, "'");
    size_ = static_cast<uint64_t>(end);
  }
  uint64_t size() const override {
    return size_;
  }
  void read(uint64_t offset, void* dst, size_t n) override {
    in_.seekg(static_cast<std::streamoff>(offset));
    in_.read(static_cast<char*>(dst), static_cast<std::streamsize>(n));
    TORCH_CHECK(
        in_ && static_cast<size_t>(in_.gcount()) == n, "could not read ", n,
        " bytes at offset ", offset, " of safetensors file '", path_,
        "' (did it change while being read?)");
  }

 private:
  std::string path_;
  std::ifstream in_;
  uint64_t size_ = 0;
};

class MemorySource : public Source {
 public:
  MemorySource(const void* data, size_t size)
      : data_(static_cast<const char*>(data)), size_(size) {}
  uint64_t size() const override {
    return size_;
  }
  void read(uint64_t offset, void* dst, size_t n) override {
    TORCH_INTERNAL_ASSERT(offset <= size_ && n <= size_ - offset);
    if (n > 0) {
      std::memcpy(dst, data_ + offset, n);
    }
  }

 private:
  const char* data_;
  size_t size_;
};

struct Entry {
  std::string name;
  const DtypeInfo* dtype = nullptr;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;
};

struct Header {
  std::vector<Entry> entries; ///< sorted by data offsets
  std::map<std::string, std::string> metadata;
  uint64_t data_start = 0; ///< 8 + header length
};

uint64_t read_u64_le(const unsigned char* b) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) {
    v = (v << 8) | b[i];
  }
  return v;
}

uint64_t json_uint(
    const nlohmann::json& j,
    const std::string& what,
    const std::string& tensor,
    const std::string& file) {
  TORCH_CHECK(
      j.is_number_unsigned(), "safetensors file '", file, "': tensor '", tensor,
      "': expected ", what, " to be a non-negative integer, but got ",
      describe_json(j));
  return j.get<uint64_t>();
}

Entry parse_entry(
    const std::string& name,
    const nlohmann::json& j,
    const std::string& file) {
  const std::string where =
      "safetensors file '" + file + "': tensor '" + printable(name) + "'";
  TORCH_CHECK(
      j.is_object(), where,
      ": expected an object with dtype, shape and "
      "data_offsets, but got ",
      describe_json(j));
  Entry e;
  e.name = name;
  auto dtype = j.find("dtype");
  TORCH_CHECK(
      dtype != j.end() && dtype->is_string(), where,
      ": expected a string field \"dtype\"");
  e.dtype = find_dtype(dtype->get<std::string>());
  TORCH_CHECK(
      e.dtype != nullptr, where,
      ": expected dtype F64, F32, F16, BF16, I64, I32, I16, I8, "
      "U8 or BOOL, but got \"",
      printable(dtype->get<std::string>()), "\"");
  auto shape = j.find("shape");
  TORCH_CHECK(
      shape != j.end() && shape->is_array(), where,
      ": expected an array field \"shape\"");
  for (const auto& d : *shape) {
    uint64_t size = json_uint(d, "every shape entry", e.name, file);
    TORCH_CHECK(
        size <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()),
        where, ": shape entry ", size, " overflows int64");
    e.shape.push_back(static_cast<int64_t>(size));
  }
  std::string shape_text = "[";
  for (size_t i = 0; i < e.shape.size(); ++i) {
    shape_text += (i ? ", " : "") + std::to_string(e.shape[i]);
  }
  shape_text += "]";
  uint64_t numel = 1;
  for (auto size : e.shape) {
    const auto u = static_cast<uint64_t>(size);
    TORCH_CHECK(
        u == 0 || numel <= std::numeric_limits<uint64_t>::max() / u, where,
        ": shape ", shape_text, " overflows 64 bits");
    numel *= u;
  }
  auto offsets = j.find("data_offsets");
  TORCH_CHECK(
      offsets != j.end() && offsets->is_array() && offsets->size() == 2, where,
      ": expected a field \"data_offsets\" of two integers [begin, end]");
  e.begin = json_uint((*offsets)[0], "data_offsets", e.name, file);
  e.end = json_uint((*offsets)[1], "data_offsets", e.name, file);
  TORCH_CHECK(
      e.end >= e.begin, where,
      ": expected data_offsets [begin, end] with end >= begin, "
      "but got [",
      e.begin, ", ", e.end, "]");
  TORCH_CHECK(
      numel <= std::numeric_limits<uint64_t>::max() / e.dtype->item_bytes,
      where, ": shape ", shape_text, " overflows 64 bits");
  const uint64_t nbytes = numel * e.dtype->item_bytes;
  TORCH_CHECK(
      e.end - e.begin == nbytes, where, ": expected ", nbytes, " bytes (shape ",
      shape_text, " of ", e.dtype->name, "), but data_offsets [", e.begin, ", ",
      e.end, "] hold ", e.end - e.begin);
  return e;
}

std::map<std::string, std::string> parse_metadata(
    const nlohmann::json& j,
    const std::string& file) {
  TORCH_CHECK(
      j.is_object(), "safetensors file '", file,
      "': expected \"__metadata__\" to be an "
      "object of strings, but got ",
      describe_json(j));
  std::map<std::string, std::string> out;
  for (auto it = j.begin(); it != j.end(); ++it) {
    TORCH_CHECK(
        it.value().is_string(), "safetensors file '", file,
        "': expected every "
        "\"__metadata__\" value to be a string, but \"",
        printable(it.key()), "\" is ", describe_json(it.value()));
    out[it.key()] = it.value().get<std::string>();
  }
  return out;
}

// Reads the header's JSON text, checking the length field against the file
// size; the data starts 8 + text.size() bytes in.
std::string read_header_text(Source& src, const std::string& file) {
  const uint64_t size = src.size();
  TORCH_CHECK(
      size >= 8, "safetensors file '", file,
      "' is truncated: expected at least 8 bytes "
      "(the header length), but got ",
      size);
  unsigned char len_bytes[8];
  src.read(0, len_bytes, 8);
  const uint64_t n = read_u64_le(len_bytes);
  TORCH_CHECK(
      n <= kMaxHeaderBytes, "safetensors file '", file,
      "': expected a header of at most ", kMaxHeaderBytes,
      " bytes, but the length field says ", n);
  TORCH_CHECK(
      n <= size - 8, "safetensors file '", file,
      "' is truncated: the header length is ", n, " bytes but only ", size - 8,
      " bytes follow the length field");
  std::string text(static_cast<size_t>(n), '\0');
  src.read(8, &text[0], text.size());
  TORCH_CHECK(
      !text.empty() && text[0] == '{', "safetensors file '", file,
      "': expected the header to start with '{', but got '",
      printable(text.substr(0, 1)), "'");
  return text;
}

// Parses the header's JSON text into an object, refusing a tensor name that
// appears twice.
nlohmann::json parse_header_json(
    const std::string& text,
    const std::string& file) {
  // Duplicate names would silently shadow each other in a JSON object.
  std::set<std::string> seen;
  std::string duplicate;
  auto on_event = [&](int depth, nlohmann::json::parse_event_t event,
                      nlohmann::json& parsed) {
    if (event == nlohmann::json::parse_event_t::key && depth == 1) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (!seen.insert(key).second && duplicate.empty()) {
        duplicate = key;
      }
    }
    return true;
  };
  nlohmann::json root;
  try {
    root = nlohmann::json::parse(text, on_event);
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(
        false, "safetensors file '", file,
        "': invalid JSON header: ", json_error_text(e, false, 200));
  }
  TORCH_CHECK(
      duplicate.empty(), "safetensors file '", file, "': tensor '",
      printable(duplicate), "' appears twice in the header");
  TORCH_CHECK(
      root.is_object(), "safetensors file '", file,
      "': expected the header to be a JSON object");
  return root;
}

// Checks that `entries`, sorted by offsets, tile the `data_bytes` bytes of
// data.
void check_tiling(
    const std::vector<Entry>& entries,
    uint64_t data_bytes,
    const std::string& file) {
  // The format requires the tensors to tile the data exactly: no overlap, no
  // hole.
  uint64_t expected = 0;
  const Entry* previous = nullptr;
  for (const auto& e : entries) {
    const std::string where =
        "safetensors file '" + file + "': tensor '" + printable(e.name) + "'";
    TORCH_CHECK(
        e.end <= data_bytes, where, ": data_offsets [", e.begin, ", ", e.end,
        "] go beyond the ", data_bytes,
        " bytes of data in the file (truncated?)");
    TORCH_CHECK(
        e.begin >= expected, where, ": data_offsets [", e.begin, ", ", e.end,
        "] overlap tensor '", previous ? printable(previous->name) : "",
        "', which ends at ", expected);
    TORCH_CHECK(
        e.begin == expected, where, ": expected data to start at byte ",
        expected,
        " (tensors must cover the data without holes), but it starts at ",
        e.begin);
    expected = e.end;
    previous = &e;
  }
  TORCH_CHECK(
      expected == data_bytes, "safetensors file '", file,
      "': expected the tensors to cover all ", data_bytes,
      " bytes of data, but they end at byte ", expected,
      " (trailing bytes, or data without a header entry)");
}

Header read_header(Source& src, const std::string& file) {
  const std::string text = read_header_text(src, file);
  const nlohmann::json root = parse_header_json(text, file);

  Header h;
  h.data_start = 8 + static_cast<uint64_t>(text.size());
  for (auto it = root.begin(); it != root.end(); ++it) {
    if (it.key() == kMetadataKey) {
      h.metadata = parse_metadata(it.value(), file);
    } else {
      h.entries.push_back(parse_entry(it.key(), it.value(), file));
    }
  }
  std::sort(
      h.entries.begin(), h.entries.end(), [](const Entry& a, const Entry& b) {
        return std::tie(a.begin, a.end, a.name) <
            std::tie(b.begin, b.end, b.name);
      });
  check_tiling(h.entries, src.size() - h.data_start, file);
  return h;
}

SafetensorsFile read_all(Source& src, const std::string& file) {
  Header h = read_header(src, file);
  SafetensorsFile out;
  out.metadata = std::move(h.metadata);
  for (const auto& e : h.entries) {
    auto t =
        torch::empty(e.shape, torch::TensorOptions().dtype(e.dtype->dtype));
    src.read(
        h.data_start + e.begin, t.data_ptr(),
        static_cast<size_t>(e.end - e.begin));
    if (e.dtype->dtype == torch::kBool && t.numel() > 0) {
      // A byte other than 0 or 1 in a bool tensor is undefined behaviour.
      auto max_byte = t.view(torch::kUInt8).max().item<int64_t>();
      TORCH_CHECK(
          max_byte <= 1, "safetensors file '", file, "': tensor '",
          printable(e.name), "': expected BOOL bytes 0 or 1, but got ",
          max_byte);
    }
    out.tensors.emplace(e.name, std::move(t));
  }
  return out;
}

// What a writer needs: the header bytes and the order of the data.
struct WritePlan {
  std::string header; ///< the 8-byte length, the JSON, the padding
  std::vector<std::pair<std::string, torch::Tensor>> order;
};

WritePlan plan_write(
    const std::map<std::string, torch::Tensor>& tensors,
    const std::map<std::string, std::string>& metadata) {
  WritePlan plan;
  for (const auto& kv : tensors) {
    TORCH_CHECK(
        kv.first != kMetadataKey,
        "save_safetensors: expected tensor names other than the "
        "reserved \"__metadata__\"");
    TORCH_CHECK(
        kv.second.defined(), "save_safetensors: tensor '", kv.first,
        "' is undefined");
    TORCH_CHECK(
        kv.second.layout() == torch::kStrided, "save_safetensors: tensor '",
        kv.first, "': expected a dense (strided) tensor, but got layout ",
        kv.second.layout());
    (void)dtype_info(kv.second.scalar_type());
    plan.order.emplace_back(kv.first, kv.second);
  }
  // Larger items first, then by name: every tensor starts aligned to its item
  // size.
  std::stable_sort(
      plan.order.begin(), plan.order.end(), [](const auto& a, const auto& b) {
        return dtype_info(a.second.scalar_type()).item_bytes >
            dtype_info(b.second.scalar_type()).item_bytes;
      });

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    header[kMetadataKey] = metadata;
  }
  uint64_t offset = 0;
  for (const auto& kv : plan.order) {
    const auto& t = kv.second;
    const uint64_t nbytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    header[kv.first] = {
        {"dtype", dtype_info(t.scalar_type()).name},
        {"shape", t.sizes().vec()},
        {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string json;
  try {
    json = header.dump();
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(
        false,
        "save_safetensors: expected UTF-8 names and metadata: ", e.what());
  }
  json.append((8 - json.size() % 8) % 8, ' ');
  uint64_t n = json.size();
  plan.header.resize(8);
  for (int i = 0; i < 8; ++i) {
    plan.header[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  }
  plan.header += json;
  return plan;
}

template <typename Sink>
void write_planned(const WritePlan& plan, Sink&& sink) {
  sink(plan.header.data(), plan.header.size());
  for (const auto& kv : plan.order) {
    auto t = kv.second.detach().to(torch::kCPU).contiguous();
    sink(t.data_ptr(), static_cast<size_t>(t.numel()) * t.element_size());
  }
}

} // namespace

SafetensorsFile read_safetensors(const std::string& path) {
  FileSource src(path);
  return read_all(src, path);
}

std::map<std::string, torch::Tensor> load_safetensors(const std::string& path) {
  return read_safetensors(path).tensors;
}

std::map<std::string, std::string> load_safetensors_metadata(
    const std::string& path) {
  FileSource src(path);
  return read_header(src, path).metadata;
}

SafetensorsFile decode_safetensors(
    const void* data,
    size_t size_bytes,
    const std::string& name) {
  TORCH_CHECK(
      data != nullptr || size_bytes == 0,
      "decode_safetensors: expected data, but got null");
  MemorySource src(data, size_bytes);
  return read_all(src, name);
}

std::string encode_safetensors(
    const std::map<std::string, torch::Tensor>& tensors,
    const std::map<std::string, std::string>& metadata) {
  auto plan = plan_write(tensors, metadata);
  std::string out;
  write_planned(plan, [&](const void* p, size_t n) {
    out.append(static_cast<const char*>(p), n);
  });
  return out;
}

void save_safetensors(
    const std::string& path,
    const std::map<std::string, torch::Tensor>& tensors,
    const std::map<std::string, std::string>& metadata) {
  auto plan = plan_write(tensors, metadata);
  AtomicFile file(path);
  write_planned(plan, [&](const void* p, size_t n) { file.write(p, n); });
  file.commit();
}

} // namespace io
} // namespace remat
