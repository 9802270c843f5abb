#include "remat/compress.h"

#include "compat/torch.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <mutex>
#include <vector>

namespace remat {
namespace {

// fp8's largest finite value (float8_e4m3fn).
constexpr double kFp8Max = 448.0;

} // namespace

// What pack keeps: the tensor as saved, or its compressed form.
struct CompressedSave {
  torch::Tensor data;
  torch::Tensor scale;                              ///< fp8 only: one element
  c10::ScalarType dtype = c10::ScalarType::Undefined; ///< Undefined: not compressed
};
using Packed = CompressedSave;

// Tensors compressed in one scope, so that a second save of the same view
// (same live storage, offset, sizes, strides and version) shares the copy.
struct CompressMemo {
  struct Seen {
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    int64_t offset = 0;
    std::vector<int64_t> sizes;
    std::vector<int64_t> strides;
    int64_t version = 0;
    std::weak_ptr<const Packed> packed;
  };
  std::mutex mutex;
  std::vector<Seen> seen;

  std::shared_ptr<const Packed> find(const torch::Tensor& t) {
    std::lock_guard<std::mutex> lock(mutex);
    for (const auto& s : seen) {
      auto storage = s.storage.lock(); // the original is alive: the same memory
      if (storage && storage.get() == t.storage().unsafeGetStorageImpl() &&
          s.offset == t.storage_offset() && s.version == t._version() &&
          s.sizes == t.sizes().vec() && s.strides == t.strides().vec()) {
        if (auto p = s.packed.lock()) {
          return p;
        }
      }
    }
    return nullptr;
  }

  void add(const torch::Tensor& t, const std::shared_ptr<const Packed>& p) {
    std::lock_guard<std::mutex> lock(mutex);
    if (seen.size() >= 64 && seen.size() % 64 == 0) {
      seen.erase(std::remove_if(seen.begin(), seen.end(), [](const Seen& s) {
                   return s.storage.expired() || s.packed.expired();
                 }), seen.end());
    }
    seen.push_back({t.storage().getWeakStorageImpl(), t.storage_offset(), t.sizes().vec(),
                    t.strides().vec(), t._version(), p});
  }
};

namespace {

bool is_fp8(c10::ScalarType t) {
#if REMAT_TORCH_AT_LEAST(2, 1)
  return t == c10::ScalarType::Float8_e4m3fn;
#else
  (void)t;
  return false;
#endif
}

} // namespace

bool fp8_available() {
  return REMAT_TORCH_AT_LEAST(2, 1);
}

CompressHooks::CompressHooks(c10::ScalarType to, int64_t min_bytes)
    : to_(to), min_bytes_(min_bytes), memo_(std::make_shared<CompressMemo>()) {
  TORCH_CHECK(
      to == c10::kBFloat16 || is_fp8(to),
      "remat::CompressHooks: expected torch::kBFloat16",
      fp8_available() ? " or c10::ScalarType::Float8_e4m3fn" : "",
      ", but got ", to);
  TORCH_CHECK(
      min_bytes >= 0, "remat::CompressHooks: expected min_bytes >= 0, but got ", min_bytes);
}

namespace {
// Whether `t` is, or is a view of, a leaf (a parameter, an input): its
// memory stays alive anyway, so a compressed copy would only add bytes.
bool of_a_leaf(const torch::Tensor& t) {
  torch::Tensor root = t;
  while (root.is_view()) {
    root = root._base();
  }
  return root.is_leaf();
}
} // namespace

std::any CompressHooks::pack(const torch::Tensor& t) {
  const bool narrower = c10::elementSize(to_) < c10::elementSize(t.scalar_type());
  const auto bytes = static_cast<int64_t>(t.numel() * t.element_size());
  if (!t.is_floating_point() || !narrower || bytes < min_bytes_ ||
      t.layout() != c10::kStrided || !t.has_storage() || of_a_leaf(t)) {
    auto p = std::make_shared<Packed>();
    p->data = t;
    return std::shared_ptr<const Packed>(std::move(p));
  }
  if (auto again = memo_->find(t)) {
    return again;
  }
  at::NoGradGuard no_grad;
  auto p = std::make_shared<Packed>();
  p->dtype = t.scalar_type();
  if (is_fp8(to_)) {
    // One scale per tensor, kept on its device (no synchronisation).
    p->scale = (t.detach().abs().amax().to(torch::kFloat) / kFp8Max).clamp_min(1e-30);
    p->data = (t.detach().to(torch::kFloat) / p->scale).to(to_);
  } else {
    p->data = t.detach().to(to_);
  }
  std::shared_ptr<const Packed> out = std::move(p);
  memo_->add(t, out);
  return out;
}

torch::Tensor CompressHooks::unpack(const std::any& packed) {
  const auto& p = *std::any_cast<const std::shared_ptr<const Packed>&>(packed);
  if (p.dtype == c10::ScalarType::Undefined) {
    return p.data;
  }
  at::NoGradGuard no_grad;
  if (p.scale.defined()) {
    return (p.data.to(torch::kFloat) * p.scale).to(p.dtype);
  }
  return p.data.to(p.dtype);
}

CompressedSavesGuard::CompressedSavesGuard(c10::ScalarType to, int64_t min_bytes)
    : guard_(std::make_shared<CompressHooks>(to, min_bytes)) {}

c10::ScalarType parse_compression(const std::string& text) {
  if (text == "bf16") {
    return c10::kBFloat16;
  }
#if REMAT_TORCH_AT_LEAST(2, 1)
  if (text == "fp8") {
    return c10::ScalarType::Float8_e4m3fn;
  }
#else
  TORCH_CHECK(
      text != "fp8", "remat: expected bf16 compression with LibTorch ",
      compat::torch_version(), ", but got fp8 (its float8 dtypes came in 2.1)");
#endif
  TORCH_CHECK(false, "remat: expected a compression of bf16 or fp8, but got '", text, "'");
}

const char* compression_name(c10::ScalarType to) {
  return is_fp8(to) ? "fp8" : "bf16";
}

} // namespace remat
