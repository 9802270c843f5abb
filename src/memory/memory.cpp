#include "remat/memory.h"

#include "compat/torch.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/nn/module.h>
#include <torch/optim.h>

#ifdef REMAT_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <mutex>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace remat {

namespace {

std::string oom_message(int64_t requested, int64_t held, int64_t limit) {
  return "remat: out of memory: requested " + std::to_string(requested) +
      " bytes (" + memory::format_size(requested) + ") with " +
      std::to_string(held) + " bytes held, over the limit of " +
      std::to_string(limit) + " bytes (" + memory::format_size(limit) + ")";
}

} // namespace

OutOfMemoryError::OutOfMemoryError(int64_t requested, int64_t held, int64_t limit)
    : c10::OutOfMemoryError(
          c10::SourceLocation{__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
          oom_message(requested, held, limit)),
      requested_(requested),
      held_(held),
      limit_(limit) {}

namespace memory {
namespace {

// Each block carries its size and capacity in a header, so the deleter needs
// no lookup table. The header is one alignment unit, so the payload keeps
// alloc_cpu's 64-byte alignment.
constexpr size_t kHeader = 64;

struct Header {
  int64_t size;     ///< bytes asked for: what the counters count
  int64_t capacity; ///< bytes of payload the block has
};

// Blocks this large are cached when freed (see memory.h).
constexpr size_t kCacheMinBytes = size_t(1) << 20;

// Size classes of 1/8 of a power of two: a block serves requests up to 12.5%
// smaller than its capacity, and repeated shapes find their blocks again.
size_t block_capacity(size_t nbytes) {
  if (nbytes < kCacheMinBytes) {
    return nbytes;
  }
  const size_t power = size_t(1) << (63 - __builtin_clzll(nbytes));
  const size_t step = power / 8;
  return (nbytes + step - 1) / step * step;
}

struct Counters {
  std::atomic<int64_t> current{0};
  std::atomic<int64_t> peak{0};
  std::atomic<int64_t> count{0};
  std::atomic<int64_t> limit{0};
};

Counters& counters() {
  static Counters c;
  return c;
}

struct BlockCache {
  std::mutex mutex;
  std::unordered_map<size_t, std::vector<void*>> free; ///< capacity -> blocks
  std::atomic<int64_t> bytes{0};
  std::atomic<bool> enabled{true};

  // A block of `capacity`, or nullptr.
  void* take(size_t capacity) {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = free.find(capacity);
    if (it == free.end() || it->second.empty()) {
      return nullptr;
    }
    void* block = it->second.back();
    it->second.pop_back();
    bytes.fetch_sub(static_cast<int64_t>(capacity), std::memory_order_relaxed);
    return block;
  }
  // Keeps `block`, or returns false when caching is off.
  bool keep(void* block, size_t capacity) {
    if (!enabled.load(std::memory_order_relaxed)) {
      return false;
    }
    std::lock_guard<std::mutex> lock(mutex);
    free[capacity].push_back(block);
    bytes.fetch_add(static_cast<int64_t>(capacity), std::memory_order_relaxed);
    return true;
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mutex);
    for (auto& kv : free) {
      for (void* block : kv.second) {
        c10::free_cpu(block);
      }
    }
    free.clear();
    bytes.store(0);
  }
};

BlockCache& block_cache() {
  // Leaked on purpose: tensors freed during static destruction still find it.
  static auto* cache = new BlockCache();
  return *cache;
}

void raise_peak(Counters& c, int64_t now) {
  int64_t seen = c.peak.load(std::memory_order_relaxed);
  while (now > seen &&
         !c.peak.compare_exchange_weak(seen, now, std::memory_order_relaxed)) {
  }
}

void counted_free(void* payload) {
  if (payload == nullptr) {
    return;
  }
  char* block = static_cast<char*>(payload) - kHeader;
  const auto* h = reinterpret_cast<const Header*>(block);
  counters().current.fetch_sub(h->size, std::memory_order_relaxed);
  const auto capacity = static_cast<size_t>(h->capacity);
  if (capacity < kCacheMinBytes || !block_cache().keep(block, capacity)) {
    c10::free_cpu(block);
  }
}

class CountingAllocator final : public compat::CpuAllocatorBase {
 public:
  c10::DataPtr allocate_bytes(size_t nbytes) const override {
    auto& c = counters();
    const auto n = static_cast<int64_t>(nbytes);
    const int64_t now = c.current.fetch_add(n, std::memory_order_relaxed) + n;
    const int64_t limit = c.limit.load(std::memory_order_relaxed);
    if (limit > 0 && now > limit) {
      c.current.fetch_sub(n, std::memory_order_relaxed);
      throw OutOfMemoryError(n, now - n, limit);
    }
    const size_t capacity = block_capacity(nbytes);
    auto& cache = block_cache();
    void* block = capacity >= kCacheMinBytes ? cache.take(capacity) : nullptr;
    if (block == nullptr) {
      if (limit > 0 && now + cache.bytes.load(std::memory_order_relaxed) > limit) {
        cache.clear();
      }
      try {
        block = c10::alloc_cpu(capacity + kHeader);
      } catch (...) {
        c.current.fetch_sub(n, std::memory_order_relaxed);
        throw;
      }
    }
    *reinterpret_cast<Header*>(block) = Header{n, static_cast<int64_t>(capacity)};
    void* payload = static_cast<char*>(block) + kHeader;
    raise_peak(c, now);
    c.count.fetch_add(1, std::memory_order_relaxed);
    return {payload, payload, &counted_free, c10::Device(c10::kCPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override {
    return &counted_free;
  }
};

CountingAllocator& counting_allocator() {
  static CountingAllocator allocator;
  return allocator;
}

std::once_flag install_once;
std::atomic<bool> is_installed{false};

bool is_cuda(c10::Device device) {
#ifdef REMAT_WITH_CUDA
  return device.is_cuda();
#else
  TORCH_CHECK(
      device.is_cpu(),
      "remat::memory: expected a CPU device (this build has no CUDA), but got ",
      device);
  return false;
#endif
}

#ifdef REMAT_WITH_CUDA
// The device's index, once LibTorch has initialised CUDA.
c10::DeviceIndex cuda_index(c10::Device device) {
  const auto index = device.index() < 0 ? c10::cuda::current_device() : device.index();
  compat::initialise_cuda(index);
  return index;
}

// Limits set per CUDA device (bytes, 0: none), for limit(device).
std::mutex cuda_limits_mutex;
std::unordered_map<c10::DeviceIndex, int64_t>& cuda_limits() {
  static std::unordered_map<c10::DeviceIndex, int64_t> limits;
  return limits;
}
#endif

} // namespace

void install() {
  std::call_once(install_once, [] {
    // Highest priority, so a later default registration cannot displace it.
    c10::SetCPUAllocator(&counting_allocator(), /*priority=*/UINT8_MAX);
    is_installed.store(true);
  });
}

bool installed() {
  return is_installed.load();
}

int64_t current_bytes(c10::Device device) {
  if (is_cuda(device)) {
#ifdef REMAT_WITH_CUDA
    return compat::cuda_memory_stats(cuda_index(device)).current_bytes;
#endif
  }
  return counters().current.load();
}

int64_t peak_bytes(c10::Device device) {
  if (is_cuda(device)) {
#ifdef REMAT_WITH_CUDA
    return compat::cuda_memory_stats(cuda_index(device)).peak_bytes;
#endif
  }
  return counters().peak.load();
}

void reset_peak(c10::Device device) {
  if (is_cuda(device)) {
#ifdef REMAT_WITH_CUDA
    c10::cuda::CUDACachingAllocator::resetPeakStats(cuda_index(device));
    return;
#endif
  }
  auto& c = counters();
  c.peak.store(c.current.load());
}

int64_t allocation_count(c10::Device device) {
  if (is_cuda(device)) {
#ifdef REMAT_WITH_CUDA
    return compat::cuda_memory_stats(cuda_index(device)).allocations;
#endif
  }
  return counters().count.load();
}

int64_t set_limit(int64_t limit_bytes) {
  return set_limit(limit_bytes, c10::kCPU);
}

int64_t set_limit(int64_t limit_bytes, c10::Device device) {
  TORCH_CHECK(
      limit_bytes >= 0,
      "remat::memory::set_limit: expected a limit >= 0 bytes (0 for none), but got ",
      limit_bytes);
  if (!is_cuda(device)) {
    install();
    return counters().limit.exchange(limit_bytes);
  }
#ifdef REMAT_WITH_CUDA
  const auto index = cuda_index(device);
  size_t free_bytes = 0;
  size_t total_bytes = 0;
  {
    c10::cuda::CUDAGuard guard(index);
    const auto err = cudaMemGetInfo(&free_bytes, &total_bytes);
    TORCH_CHECK(
        err == cudaSuccess,
        "remat::memory::set_limit: expected to read the size of cuda:", int(index),
        ", but cudaMemGetInfo failed: ", cudaGetErrorString(err));
  }
  TORCH_CHECK(
      limit_bytes <= static_cast<int64_t>(total_bytes),
      "remat::memory::set_limit: expected a limit of at most cuda:", int(index),
      "'s ", total_bytes, " bytes (", format_size(static_cast<int64_t>(total_bytes)),
      "), but got ", limit_bytes);
  // The caching allocator refuses to reserve past a fraction of the device
  // and then raises c10::OutOfMemoryError, as remat's CPU limit does.
  const double fraction = limit_bytes == 0
      ? 1.0
      : static_cast<double>(limit_bytes) / static_cast<double>(total_bytes);
  c10::cuda::CUDACachingAllocator::setMemoryFraction(fraction, index);
  std::lock_guard<std::mutex> lock(cuda_limits_mutex);
  const int64_t previous = cuda_limits()[index];
  cuda_limits()[index] = limit_bytes;
  return previous;
#else
  return 0;
#endif
}

int64_t limit() {
  return counters().limit.load();
}

int64_t limit(c10::Device device) {
  if (!is_cuda(device)) {
    return limit();
  }
#ifdef REMAT_WITH_CUDA
  std::lock_guard<std::mutex> lock(cuda_limits_mutex);
  auto it = cuda_limits().find(cuda_index(device));
  return it == cuda_limits().end() ? 0 : it->second;
#else
  return 0;
#endif
}

int64_t cached_bytes() {
  return block_cache().bytes.load();
}

void empty_cache() {
  block_cache().clear();
}

void set_caching(bool enabled) {
  block_cache().enabled.store(enabled);
  if (!enabled) {
    empty_cache();
  }
}

namespace {

// Adds a tensor's storage once, however many tensors share it.
struct StorageSet {
  std::unordered_set<const void*> seen;
  c10::Device device;
  int64_t add(const at::Tensor& t) {
    if (!t.defined() || t.device().type() != device.type() ||
        !t.has_storage()) {
      return 0;
    }
    const auto& storage = t.storage();
    const void* key = storage.unsafeGetStorageImpl();
    if (!seen.insert(key).second) {
      return 0;
    }
    return static_cast<int64_t>(storage.nbytes());
  }
};

template <typename State>
bool add_state(
    const torch::optim::OptimizerParamState& state,
    StorageSet& set,
    int64_t& total) {
  // Each supported state type lists its tensors here.
  auto* s = dynamic_cast<const State*>(&state);
  if (s == nullptr) {
    return false;
  }
  if constexpr (std::is_same_v<State, torch::optim::AdamParamState> ||
                std::is_same_v<State, torch::optim::AdamWParamState>) {
    total += set.add(s->exp_avg()) + set.add(s->exp_avg_sq()) +
        set.add(s->max_exp_avg_sq());
  } else if constexpr (std::is_same_v<State, torch::optim::SGDParamState>) {
    total += set.add(s->momentum_buffer());
  } else if constexpr (std::is_same_v<State, torch::optim::RMSpropParamState>) {
    total += set.add(s->square_avg()) + set.add(s->momentum_buffer()) +
        set.add(s->grad_avg());
  } else if constexpr (std::is_same_v<State, torch::optim::AdagradParamState>) {
    total += set.add(s->sum());
  }
  return true;
}

} // namespace

Breakdown breakdown(
    const torch::nn::Module& module,
    const torch::optim::Optimizer* optimizer,
    c10::Device device) {
  Breakdown b;
  StorageSet set{{}, device};
  for (const auto& p : module.parameters()) {
    b.weights += set.add(p);
  }
  for (const auto& buffer : module.buffers()) {
    b.weights += set.add(buffer);
  }
  for (const auto& p : module.parameters()) {
    b.gradients += set.add(p.grad());
  }
  if (optimizer != nullptr) {
    for (const auto& entry : optimizer->state()) {
      const auto& state = *entry.second;
      add_state<torch::optim::AdamWParamState>(state, set, b.optimizer_state) ||
          add_state<torch::optim::AdamParamState>(state, set, b.optimizer_state) ||
          add_state<torch::optim::SGDParamState>(state, set, b.optimizer_state) ||
          add_state<torch::optim::RMSpropParamState>(
              state, set, b.optimizer_state) ||
          add_state<torch::optim::AdagradParamState>(
              state, set, b.optimizer_state);
    }
  }
  b.total = current_bytes(device);
  b.activations =
      std::max<int64_t>(0, b.total - b.weights - b.gradients - b.optimizer_state);
  return b;
}

int64_t parse_size(const std::string& text) {
  size_t i = 0;
  while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) {
    ++i;
  }
  const size_t number_start = i;
  while (i < text.size() &&
         (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) {
    ++i;
  }
  const std::string number = text.substr(number_start, i - number_start);
  std::string unit;
  for (; i < text.size(); ++i) {
    if (!std::isspace(static_cast<unsigned char>(text[i]))) {
      unit += static_cast<char>(std::tolower(static_cast<unsigned char>(text[i])));
    }
  }
  double value = 0;
  size_t used = 0;
  bool ok = !number.empty() && number.find('.') == number.rfind('.');
  if (ok) {
    try {
      value = std::stod(number, &used);
    } catch (const std::exception&) {
      ok = false;
    }
  }
  double scale = -1;
  const std::pair<const char*, double> units[] = {
      {"", 1},           {"b", 1},
      {"k", 1e3},        {"kb", 1e3},        {"kib", 1024.0},
      {"m", 1e6},        {"mb", 1e6},        {"mib", 1048576.0},
      {"g", 1e9},        {"gb", 1e9},        {"gib", 1073741824.0},
      {"t", 1e12},       {"tb", 1e12},       {"tib", 1099511627776.0}};
  for (const auto& u : units) {
    if (unit == u.first) {
      scale = u.second;
    }
  }
  ok = ok && used == number.size() && scale > 0;
  const double bytes = value * scale;
  TORCH_CHECK(
      ok && bytes >= 0 && bytes < 9.0e18,
      "expected a size such as 512MiB, 80GiB or 4096 (bytes), but got '",
      text,
      "'");
  return static_cast<int64_t>(std::llround(bytes));
}

int64_t physical_bytes() {
  return static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGE_SIZE);
}

std::string format_size(int64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double value = static_cast<double>(bytes);
  int u = 0;
  while (std::abs(value) >= 1024.0 && u < 4) {
    value /= 1024.0;
    ++u;
  }
  char buf[32];
  if (u == 0) {
    std::snprintf(buf, sizeof(buf), "%lld B", static_cast<long long>(bytes));
  } else {
    std::snprintf(buf, sizeof(buf), value < 10 ? "%.2f %s" : "%.1f %s", value, units[u]);
  }
  return buf;
}

} // namespace memory
} // namespace remat
