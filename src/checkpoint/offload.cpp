#include "remat/offload.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/cuda.h>

#ifdef REMAT_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cstdlib>
#include <cstring>

namespace remat {

struct OffloadHooks::Entry {
  torch::Tensor host;   ///< where the tensor waits (pinned, or outside the allocator)
  c10::Device device = c10::kCPU;
  size_t order = 0;     ///< its place in pack order
  torch::Tensor ahead;  ///< fetched before its unpack (CUDA prefetch)
#ifdef REMAT_WITH_CUDA
  std::shared_ptr<at::cuda::CUDAEvent> copied;  ///< the copy to host is done
  std::shared_ptr<at::cuda::CUDAEvent> fetched; ///< `ahead` is on the device
#endif
};

namespace {

struct Packed {
  torch::Tensor kept;                               ///< not offloaded
  std::shared_ptr<OffloadHooks::Entry> entry;       ///< offloaded
};

bool of_a_leaf(const torch::Tensor& t) {
  torch::Tensor root = t;
  while (root.is_view()) {
    root = root._base();
  }
  return root.is_leaf();
}

// A CPU tensor in memory from malloc, which LibTorch's allocator (and so
// remat::memory) does not see.
torch::Tensor outside_allocator(const torch::Tensor& t) {
  const auto c = t.contiguous();
  const size_t bytes = static_cast<size_t>(c.numel()) * c.element_size();
  void* data = std::malloc(bytes == 0 ? 1 : bytes);
  TORCH_CHECK(data != nullptr, "remat::OffloadHooks: expected ", bytes,
              " bytes of host memory, but malloc returned none");
  std::memcpy(data, c.data_ptr(), bytes);
  return torch::from_blob(data, c.sizes(), [](void* p) { std::free(p); }, c.options());
}

#ifdef REMAT_WITH_CUDA
c10::cuda::CUDAStream side_stream(c10::Device device) {
  // One per device and thread-safe: the pool hands out the same low-priority
  // streams in turn; one stream keeps copies in order.
  static std::mutex mutex;
  static std::vector<std::optional<c10::cuda::CUDAStream>> streams(
      static_cast<size_t>(c10::cuda::device_count()));
  std::lock_guard<std::mutex> lock(mutex);
  auto& s = streams.at(static_cast<size_t>(device.index()));
  if (!s) {
    s = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.index());
  }
  return *s;
}
#endif

} // namespace

std::optional<std::string> cuda_offload_unavailable() {
#ifdef REMAT_WITH_CUDA
  if (!torch::cuda::is_available()) {
    return std::string("this LibTorch has CUDA, but no CUDA device is visible");
  }
  return std::nullopt;
#else
  return std::string("this LibTorch has no CUDA");
#endif
}

OffloadHooks::OffloadHooks(OffloadOptions options) : options_(options) {
  TORCH_CHECK(options_.min_bytes() >= 0,
              "remat::OffloadHooks: expected min_bytes >= 0, but got ", options_.min_bytes());
  TORCH_CHECK(options_.prefetch() >= 0,
              "remat::OffloadHooks: expected prefetch >= 0, but got ", options_.prefetch());
}

std::any OffloadHooks::pack(const torch::Tensor& t) {
  Packed p;
  const auto bytes = static_cast<int64_t>(t.numel() * t.element_size());
  const bool movable = (t.is_cuda() || (t.is_cpu() && options_.cpu())) &&
      t.layout() == c10::kStrided && bytes >= options_.min_bytes() && !of_a_leaf(t);
  if (!movable) {
    p.kept = t;
    return p;
  }
  at::NoGradGuard no_grad;
  auto e = std::make_shared<Entry>();
  e->device = t.device();
  if (t.is_cpu()) {
    e->host = outside_allocator(t);
  } else {
#ifdef REMAT_WITH_CUDA
    c10::cuda::CUDAGuard on(t.device());
    const auto current = c10::cuda::getCurrentCUDAStream(t.device().index());
    const auto side = side_stream(t.device());
    at::cuda::CUDAEvent written;
    written.record(current);
    written.block(side);
    e->host = at::empty(t.sizes(), t.options().device(c10::kCPU).pinned_memory(true));
    {
      c10::cuda::CUDAStreamGuard on_side(side);
      e->host.copy_(t, /*non_blocking=*/true);
    }
    t.record_stream(side);
    e->copied = std::make_shared<at::cuda::CUDAEvent>();
    e->copied->record(side);
#else
    TORCH_INTERNAL_ASSERT(false, "remat::OffloadHooks: a CUDA tensor in a build without CUDA");
#endif
  }
  tensors_.fetch_add(1, std::memory_order_relaxed);
  offloaded_.fetch_add(bytes, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    e->order = order_.size();
    order_.push_back(e);
  }
  p.entry = std::move(e);
  return p;
}

torch::Tensor OffloadHooks::fetch(Entry& e, bool ahead) {
  at::NoGradGuard no_grad;
  const auto bytes = static_cast<int64_t>(e.host.numel() * e.host.element_size());
  fetched_.fetch_add(bytes, std::memory_order_relaxed);
  if (e.device.is_cpu()) {
    return e.host.clone(); // into LibTorch's allocator again
  }
#ifdef REMAT_WITH_CUDA
  c10::cuda::CUDAGuard on(e.device);
  const auto current = c10::cuda::getCurrentCUDAStream(e.device.index());
  const auto stream = ahead ? side_stream(e.device) : current;
  e.copied->block(stream);
  torch::Tensor d;
  {
    c10::cuda::CUDAStreamGuard on_stream(stream);
    d = at::empty(e.host.sizes(), e.host.options().device(e.device).pinned_memory(false));
    d.copy_(e.host, /*non_blocking=*/true);
  }
  if (ahead) {
    e.fetched = std::make_shared<at::cuda::CUDAEvent>();
    e.fetched->record(stream);
    prefetched_.fetch_add(1, std::memory_order_relaxed);
  }
  return d;
#else
  (void)ahead;
  TORCH_INTERNAL_ASSERT(false, "remat::OffloadHooks: a CUDA tensor in a build without CUDA");
#endif
}

torch::Tensor OffloadHooks::unpack(const std::any& packed) {
  const auto& p = std::any_cast<const Packed&>(packed);
  if (!p.entry) {
    return p.kept;
  }
  Entry& e = *p.entry;
  torch::Tensor out;
  std::vector<std::shared_ptr<Entry>> next;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (e.ahead.defined()) {
      out = std::exchange(e.ahead, torch::Tensor());
#ifdef REMAT_WITH_CUDA
      const auto current = c10::cuda::getCurrentCUDAStream(e.device.index());
      e.fetched->block(current);
      out.record_stream(current);
#endif
    }
    if (e.device.is_cuda() && options_.prefetch() > 0) {
      // Backward unpacks roughly in reverse: fetch the ones packed before.
      for (size_t i = e.order; i > 0 && next.size() < static_cast<size_t>(options_.prefetch()); --i) {
        auto candidate = order_[i - 1].lock();
        if (candidate && !candidate->ahead.defined() && candidate->device.is_cuda()) {
          next.push_back(std::move(candidate));
        }
      }
    }
  }
  if (!out.defined()) {
    out = fetch(e, /*ahead=*/false);
  }
  for (auto& n : next) {
    auto d = fetch(*n, /*ahead=*/true);
    std::lock_guard<std::mutex> lock(mutex_);
    if (!n->ahead.defined()) {
      n->ahead = std::move(d);
    }
  }
  return out;
}

OffloadStats OffloadHooks::stats() const {
  OffloadStats s;
  s.tensors = tensors_.load(std::memory_order_relaxed);
  s.bytes_offloaded = offloaded_.load(std::memory_order_relaxed);
  s.bytes_fetched = fetched_.load(std::memory_order_relaxed);
  s.prefetched = prefetched_.load(std::memory_order_relaxed);
  return s;
}

} // namespace remat
