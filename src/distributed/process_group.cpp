// ProcessGroup over c10d: TCPStore/FileStore rendezvous, Gloo collectives,
// and NCCL's for CUDA tensors where the build has both (REMAT_WITH_NCCL:
// a CUDA LibTorch, and CMake found nccl.h, the wheel's or the toolkit's).
// The c10d headers stay in this file: they need USE_C10D_GLOO and Gloo's
// headers (libgloo-dev), USE_C10D_NCCL and nccl.h, which no user of remat
// should have to set up.
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO
#endif
#ifdef REMAT_WITH_NCCL
#ifndef USE_C10D_NCCL
#define USE_C10D_NCCL
#endif
#endif
#include "remat/distributed/process_group.h"
#include "remat/field_error.h"

#include "compat/torch.h"

#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#ifdef REMAT_WITH_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdlib>
#include <exception>
#include <string>

namespace remat {
namespace dist {

namespace {


std::string what_of(const std::exception& e) {
  if (auto* c = dynamic_cast<const c10::Error*>(&e)) {
    return first_line(c->what_without_backtrace());
  }
  return first_line(e.what());
}

int64_t env_int(const char* name, bool required, int64_t fallback) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') {
    TORCH_CHECK(!required, name, ": expected the environment variable to be set, but it is not");
    return fallback;
  }
  char* end = nullptr;
  const long long v = std::strtoll(text, &end, 10);
  TORCH_CHECK(
      end != text && *end == '\0', name, ": expected an integer in the environment, but got '",
      text, "'");
  return v;
}

std::vector<uint8_t> bytes_of(const std::string& s) {
  return std::vector<uint8_t>(s.begin(), s.end());
}

std::string string_of(const std::vector<uint8_t>& v) {
  return std::string(v.begin(), v.end());
}

bool is_loopback(const std::string& addr) {
  return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1";
}

} // namespace

bool nccl_available() {
#ifdef REMAT_WITH_NCCL
  return true;
#else
  return false;
#endif
}

c10::optional<DistOptions> DistOptions::from_env() {
  if (std::getenv("WORLD_SIZE") == nullptr) {
    return c10::nullopt;
  }
  DistOptions o;
  o.world_size(env_int("WORLD_SIZE", true, 1));
  o.rank(env_int("RANK", o.world_size() > 1, 0));
  const char* addr = std::getenv("MASTER_ADDR");
  if (addr != nullptr && *addr != '\0') {
    o.master_addr(addr);
  }
  o.master_port(env_int("MASTER_PORT", o.world_size() > 1, o.master_port()));
  return o;
}

void DistOptions::validate() const {
  TORCH_CHECK(world_size() >= 1, "world_size: expected a value >= 1, but got ", world_size());
  TORCH_CHECK(
      rank() >= 0 && rank() < world_size(), "rank: expected a value in [0, ", world_size(),
      "), but got ", rank());
  TORCH_CHECK(
      master_port() >= 1 && master_port() <= 65535,
      "master_port: expected a port in [1, 65535], but got ", master_port());
  TORCH_CHECK(
      timeout_seconds() > 0, "timeout_seconds: expected a value > 0, but got ",
      timeout_seconds());
  TORCH_CHECK(
      !master_addr().empty() || !store_path().empty(),
      "master_addr: expected a host name or address, but got an empty one");
  TORCH_CHECK(
      device().is_cpu() || device().is_cuda(), "device: expected cpu or a CUDA device, but got ",
      device());
  TORCH_CHECK(
      device().is_cpu() || nccl_available(), "device: a group on ", device(),
      " needs NCCL, but this remat was built without it (",
#ifdef REMAT_WITH_CUDA
      "a CUDA build, but CMake found no nccl.h",
#else
      "its LibTorch has no CUDA",
#endif
      "); use device cpu (Gloo)");
}

void Pending::wait() {
  if (wait_) {
    auto w = std::move(wait_);
    wait_ = nullptr;
    w();
  }
}

struct ProcessGroup::Impl {
  DistOptions options;
  std::chrono::milliseconds timeout{0};
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> gloo;
  c10::Device device = c10::kCPU; ///< NCCL's device; cpu: no NCCL
#ifdef REMAT_WITH_NCCL
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> nccl;
#endif
  int64_t strings = 0; ///< broadcast_string calls so far: the key of the next

  ~Impl() {
#ifdef REMAT_WITH_NCCL
    if (nccl) {
      compat::shutdown_backend(*nccl); // before the store goes
    }
#endif
  }

  // Checks that `tensors` are all CPU tensors or all on the group's CUDA
  // device (and contiguous, when asked); returns true for CUDA ones.
  bool check_tensors(
      const std::vector<torch::Tensor>& tensors, const char* what, bool contiguous) const {
    const bool cuda = !tensors.empty() && tensors[0].defined() && tensors[0].is_cuda();
    for (const auto& t : tensors) {
      TORCH_CHECK(
          t.defined() && (cuda ? t.device() == device : t.device().is_cpu()) &&
              (!contiguous || t.is_contiguous()),
          what, ": expected defined", contiguous ? ", contiguous" : "",
          " tensors, all on the CPU or all on the group's device (", device, "), but got ",
          t.defined() ? t.toString() + " on " + t.device().str()
                      : std::string("an undefined tensor"));
    }
    return cuda;
  }

  // Runs f(backend) on Gloo for CPU tensors, on NCCL for CUDA ones (the
  // backends' common base differs between LibTorch versions, so no type
  // is named here).
  template <typename F>
  auto with_backend(bool cuda, F&& f) {
#ifdef REMAT_WITH_NCCL
    if (cuda) {
      return f(*nccl);
    }
#else
    TORCH_INTERNAL_ASSERT(!cuda, "a CUDA tensor passed the device check without NCCL");
#endif
    return f(*gloo);
  }

  // Runs a collective; a failure becomes one c10::Error that says what
  // went wrong in terms of ranks and the timeout.
  template <typename F>
  void guard(const char* what, F&& f) {
    try {
      f();
    } catch (const std::exception& e) {
      TORCH_CHECK(
          false, "data parallel: ", what, " failed on rank ", options.rank(), " of ",
          options.world_size(), " (a peer rank exited, or did not answer within ",
          options.timeout_seconds(), " s): ", what_of(e));
    }
  }
};

ProcessGroup::ProcessGroup(DistOptions options) : impl_(std::make_unique<Impl>()) {
  options.validate();
  auto& d = *impl_;
  d.options = options;
  d.timeout = std::chrono::milliseconds(
      static_cast<int64_t>(options.timeout_seconds() * 1000.0));
  const int rank = static_cast<int>(options.rank());
  const int size = static_cast<int>(options.world_size());
  try {
    if (!options.store_path().empty()) {
      d.store = c10::make_intrusive<c10d::FileStore>(options.store_path(), size);
    } else {
      c10d::TCPStoreOptions so;
      so.port = static_cast<std::uint16_t>(options.master_port());
      so.isServer = rank == 0;
      so.numWorkers = static_cast<std::size_t>(size);
      so.waitWorkers = true;
      so.timeout = d.timeout;
      d.store = c10::make_intrusive<c10d::TCPStore>(options.master_addr(), so);
    }
    d.store->setTimeout(d.timeout);
    auto go = c10d::ProcessGroupGloo::Options::create(d.timeout);
    const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
    if (ifname != nullptr && *ifname != '\0') {
      go->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
    } else if (!options.store_path().empty() || is_loopback(options.master_addr())) {
      go->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    } else {
      go->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    go->threads = 2;
    d.gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(
        c10::make_intrusive<c10d::PrefixStore>("gloo", d.store), rank, size, go);
#ifdef REMAT_WITH_NCCL
    if (options.device().is_cuda()) {
      const int gpus = c10::cuda::device_count();
      TORCH_CHECK(gpus > 0, "a group on ", options.device(), " needs a GPU, but none is visible");
      // One GPU per rank. NCCL's communicators are made on the first
      // collective, on the device of its tensors.
      d.device = c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(rank % gpus));
      auto no = c10d::ProcessGroupNCCL::Options::create();
      no->timeout = d.timeout;
      d.nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(
          c10::make_intrusive<c10d::PrefixStore>("nccl", d.store), rank, size, no);
    }
#endif
  } catch (const std::exception& e) {
    TORCH_CHECK(
        false, "data parallel: rank ", rank, " of ", size, " could not join the group at ",
        options.store_path().empty()
            ? options.master_addr() + ":" + std::to_string(options.master_port())
            : options.store_path(),
        " within ", options.timeout_seconds(), " s: ", what_of(e));
  }
}

ProcessGroup::~ProcessGroup() = default;

int64_t ProcessGroup::rank() const {
  return impl_->options.rank();
}
int64_t ProcessGroup::world_size() const {
  return impl_->options.world_size();
}
const DistOptions& ProcessGroup::options() const {
  return impl_->options;
}
c10::Device ProcessGroup::device() const {
  return impl_->device;
}

Pending ProcessGroup::all_reduce_sum_async(std::vector<torch::Tensor> tensors) {
  auto* d = impl_.get();
  const bool cuda = d->check_tensors(tensors, "all_reduce_sum", /*contiguous=*/true);
  // Gloo sums a list of same-shaped tensors as replicas of one (NCCL takes
  // one tensor a call); each of ours is a collective of its own, all started
  // before any is waited for. NCCL's wait() orders the caller's CUDA stream
  // after the sum.
  auto holder = std::make_shared<std::vector<std::vector<torch::Tensor>>>();
  auto works = std::make_shared<std::vector<c10::intrusive_ptr<c10d::Work>>>();
  for (auto& t : tensors) {
    holder->push_back({t});
  }
  d->guard("all-reduce", [&] {
    c10d::AllreduceOptions ao;
    ao.reduceOp = c10d::ReduceOp::SUM;
    ao.timeout = d->timeout;
    for (auto& one : *holder) {
      works->push_back(d->with_backend(cuda, [&](auto& b) { return b.allreduce(one, ao); }));
    }
  });
  return Pending([d, works, holder] {
    d->guard("all-reduce", [&] {
      for (auto& w : *works) {
        w->wait();
      }
    });
  });
}

void ProcessGroup::all_reduce_sum(std::vector<torch::Tensor>& tensors) {
  all_reduce_sum_async(tensors).wait();
}

void ProcessGroup::broadcast(std::vector<torch::Tensor>& tensors, int64_t root) {
  auto& d = *impl_;
  TORCH_CHECK(
      root >= 0 && root < world_size(), "broadcast: expected a root rank in [0, ",
      world_size(), "), but got ", root);
  const bool cuda = d.check_tensors(tensors, "broadcast", /*contiguous=*/false);
  d.guard("broadcast", [&] {
    c10d::BroadcastOptions bo;
    bo.rootRank = root;
    bo.timeout = d.timeout;
    // Gloo and NCCL broadcast one contiguous tensor per call.
    for (auto& t : tensors) {
      std::vector<torch::Tensor> one{t.is_contiguous() ? t : t.contiguous()};
      d.with_backend(cuda, [&](auto& b) { return b.broadcast(one, bo); })->wait();
      if (!one[0].is_same(t)) {
        t.copy_(one[0]);
      }
    }
  });
}

std::string ProcessGroup::broadcast_string(const std::string& text, int64_t root) {
  auto& d = *impl_;
  const std::string key = "remat/string/" + std::to_string(d.strings++);
  std::string out;
  d.guard("broadcast of a string", [&] {
    if (rank() == root) {
      d.store->set(key, bytes_of(text));
      out = text;
    } else {
      out = string_of(d.store->get(key));
    }
  });
  return out;
}

void ProcessGroup::barrier() {
  auto& d = *impl_;
  // An all-reduce of one number rather than Gloo's barrier: its timeout is
  // the group's, on every LibTorch version.
  std::vector<torch::Tensor> one{torch::zeros({1})};
  all_reduce_sum(one);
  (void)d;
}

void ProcessGroup::mark_progress(int64_t step) {
  auto& d = *impl_;
  try {
    d.store->set("remat/step/" + std::to_string(rank()), bytes_of(std::to_string(step)));
  } catch (const std::exception&) {
    // The next collective reports the failure, with more to say about it.
  }
}

std::string ProcessGroup::describe_failure(int64_t step) {
  auto& d = *impl_;
  std::string out;
  try {
    d.store->setTimeout(std::chrono::milliseconds(2000));
    for (int64_t r = 0; r < world_size(); ++r) {
      if (r == rank()) {
        continue;
      }
      const std::string key = "remat/step/" + std::to_string(r);
      std::string what;
      if (!d.store->check({key})) {
        what = "rank " + std::to_string(r) + " never started a step";
      } else {
        const int64_t at = std::stoll(string_of(d.store->get(key)));
        if (at < step) {
          what = "rank " + std::to_string(r) + " stopped after starting step " +
              std::to_string(at);
        }
      }
      if (!what.empty()) {
        out += (out.empty() ? "" : "; ") + what;
      }
    }
  } catch (const std::exception&) {
    if (rank() != 0) {
      out = "rank 0, which serves the rendezvous store, is gone";
    }
  }
  try {
    d.store->setTimeout(d.timeout);
  } catch (const std::exception&) {
  }
  return out;
}

} // namespace dist
} // namespace remat
