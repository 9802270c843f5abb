// remat::checkpoint on saved-tensor hooks (CheckpointImpl::kSavedTensorHooks),
// PyTorch's non-reentrant design in C++.
//
// Forward runs the segment under hooks whose pack keeps a Slot (an index into
// the segment's Frame) instead of the tensor. The graph is the ordinary one:
// autograd reaches every tensor the closure read, listed or not. The first
// unpack in backward re-runs the segment under other hooks, which fill the
// Frame's slots with the tensors it saves, in the order forward saved them;
// each unpack then takes its slot.
//
// Early stop: once the last tensor forward saved is back, the recompute is
// stopped at the entry of the next op, by a StopRecompute thrown from a
// boxed dispatcher fallback that the recompute turns on (below). Not from
// the pack itself: an exception there can leave autograd half-built, and a
// custom Function's AutogradContext then keeps its to-be-saved outputs, whose
// grad_fn is the context's own node: a cycle that never frees them.
#include "remat/autocast.h"
#include "remat/checkpoint.h"
#include "remat/saved_tensor_hooks.h"
#include "checkpoint/rng_state.h"
#include "checkpoint/tensor_meta.h"

#include <ATen/SequenceNumber.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Type.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>
#include <typeinfo>

namespace remat {
namespace detail {
namespace {

using torch::Tensor;

// Thrown at the entry of the first op after the recompute's last pack;
// caught by the recompute.
struct StopRecompute {};

// The dispatch key of the early-stop fallback: ranked above Autograd and
// Autocast, so the fallback sees each op before autograd records anything
// of it. LibTorch registers no kernel for it (its name says it is for
// tests); remat registers the only fallback. See docs/saved_tensor_hooks.md.
constexpr c10::DispatchKey kStopKey = c10::DispatchKey::TESTING_ONLY_GenericMode;

// Set by the recompute's last pack, on the recomputing thread.
thread_local bool stop_requested = false;

// Every op a recompute runs passes here first (while kStopKey is included);
// the ops it calls inside do not (the key is excluded while it runs).
void stop_at_next_op(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  if (stop_requested) {
    throw StopRecompute{};
  }
  c10::impl::ExcludeDispatchKeyGuard pass_through(kStopKey);
  op.callBoxed(stack);
}

TORCH_LIBRARY_IMPL(_, TESTING_ONLY_GenericMode, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&stop_at_next_op>());
}

// What forward knew of a tensor it saved.
struct SavedInfo {
  TensorMeta meta;
  const std::type_info* made_by = nullptr; ///< the node that made it; null: a leaf
};

// The node that made `t`, read without the view bookkeeping of grad_fn()
// (which may create nodes).
const std::type_info* maker(const Tensor& t) {
  auto* node = torch::autograd::impl::grad_fn_unsafe(t);
  return node != nullptr ? &typeid(*node) : nullptr;
}

std::string describe(const SavedInfo& info, size_t index, size_t count) {
  std::ostringstream s;
  s << "saved tensor " << index << " of " << count << " ("
    << (info.made_by != nullptr ? "made by " + c10::demangle(info.made_by->name())
                                : std::string("a leaf"))
    << ", " << info.meta.str() << ")";
  return s.str();
}

// A fingerprint of `t`'s values: the sum and the sum of absolute values, in
// float64, of a strided grid of at most kSampled of its elements (every dim
// stepped alike), as a 2-element tensor on its device. The grid is a view,
// so a fingerprint reads kilobytes whatever the tensor's size, and it does
// not synchronise with a GPU.
constexpr double kSampled = 4096;

Tensor fingerprint(const Tensor& t) {
  at::NoGradGuard no_grad;
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  Tensor grid = t.detach();
  if (grid.is_complex()) {
    grid = torch::view_as_real(grid);
  }
  if (grid.dim() > 0) {
    const auto per_dim = static_cast<int64_t>(
        std::max(2.0, std::floor(std::pow(kSampled, 1.0 / static_cast<double>(grid.dim())))));
    for (int64_t d = 0; d < grid.dim(); ++d) {
      const int64_t n = grid.size(d);
      if (n > per_dim) {
        grid = grid.slice(d, 0, n, (n + per_dim - 1) / per_dim);
      }
    }
  }
  const Tensor x = grid.to(torch::kDouble);
  return torch::stack({x.sum(), x.abs().sum()});
}

// How far a recomputed fingerprint may be from forward's, relative to its
// sum of absolute values: exact on the CPU, whose kernels are deterministic;
// on a GPU, atomics and split reductions may change the last bits.
double tolerance(const TensorMeta& meta) {
  if (meta.device.is_cpu()) {
    return 0;
  }
  const bool half = meta.dtype == c10::kHalf || meta.dtype == c10::kBFloat16;
  return half ? 1e-2 : 1e-3;
}

class Frame;

// The token a SavedVariable keeps: its slot. When autograd drops it (the
// node ran, or the graph was freed), the slot is released.
struct Slot {
  std::shared_ptr<Frame> frame;
  size_t index = 0;
  ~Slot();
};

// One checkpointed segment, from its forward until the last of its saved
// tensors is gone.
class Frame : public std::enable_shared_from_this<Frame> {
 public:
  Frame(SegmentFn fn, const std::vector<Tensor>& inputs, const CheckpointOptions& options)
      : fn_(std::move(fn)),
        name_(options.name()),
        check_(options.determinism_check()),
        early_stop_(options.early_stop()),
        autocast_(AutocastState::capture()) {
    for (const auto& t : inputs) {
      inputs_.push_back(t.detach()); // shares t's version counter
      requires_grad_.push_back(t.requires_grad());
      versions_.push_back(t._version());
    }
    if (options.preserve_rng_state()) {
      rng_ = RngState::capture(inputs);
    }
  }

  std::vector<Tensor> forward(const std::vector<Tensor>& inputs);
  std::any pack_forward(const Tensor& t);
  void pack_recomputed(const Tensor& t);
  Tensor unpack(size_t index);
  void release(size_t index) {
    std::lock_guard<std::mutex> lock(slots_mutex_);
    alive_[index] = false;
    slots_[index] = Tensor();
  }

 private:
  void recompute();
  Tensor take(size_t index) {
    std::lock_guard<std::mutex> lock(slots_mutex_);
    return std::exchange(slots_[index], Tensor());
  }
  void check_values() const;

  SegmentFn fn_;
  std::string name_;
  DeterminismCheck check_;
  bool early_stop_;
  AutocastState autocast_;
  RngState rng_;
  std::vector<Tensor> inputs_; ///< detached
  std::vector<bool> requires_grad_;
  std::vector<uint32_t> versions_; ///< of the inputs when forward ran

  // Written by forward, read by recomputes.
  std::vector<SavedInfo> saved_;
  std::vector<Tensor> fingerprints_; ///< kValues: one per saved tensor
  int64_t forward_nodes_ = 0;

  // Slots: a recomputed tensor waits in its slot until its unpack takes it.
  std::mutex slots_mutex_;
  std::vector<Tensor> slots_;
  std::vector<bool> alive_; ///< its SavedVariable still exists

  // One recompute at a time; its progress.
  std::mutex recompute_mutex_;
  std::atomic<std::thread::id> recomputing_on_{};
  size_t next_ = 0;
  std::vector<Tensor> recomputed_fingerprints_;
};

Slot::~Slot() {
  frame->release(index);
}

class ForwardHooks final : public SavedTensorHooks {
 public:
  explicit ForwardHooks(std::shared_ptr<Frame> frame) : frame_(std::move(frame)) {}
  std::any pack(const Tensor& t) override {
    return frame_->pack_forward(t);
  }
  Tensor unpack(const std::any& packed) override {
    const auto& slot = std::any_cast<const std::shared_ptr<Slot>&>(packed);
    return slot->frame->unpack(slot->index);
  }

 private:
  std::shared_ptr<Frame> frame_;
};

// The recompute's graph is thrown away: its hooks keep nothing.
class RecomputeHooks final : public SavedTensorHooks {
 public:
  explicit RecomputeHooks(Frame* frame) : frame_(frame) {}
  std::any pack(const Tensor& t) override {
    TORCH_INTERNAL_ASSERT(frame_ != nullptr);
    frame_->pack_recomputed(t);
    return {};
  }
  Tensor unpack(const std::any&) override {
    TORCH_CHECK(
        false,
        "remat::checkpoint: expected no backward through a segment's "
        "recompute, but a tensor it saved was unpacked");
  }

 private:
  Frame* frame_; // valid while the recompute runs, which is all that packs
};

std::vector<Tensor> Frame::forward(const std::vector<Tensor>& inputs) {
  auto hooks = std::make_shared<ForwardHooks>(shared_from_this());
  const auto first = at::sequence_number::peek();
  std::vector<Tensor> outputs;
  {
    SavedTensorHooksGuard guard(hooks);
    AutocastCacheDisabled no_cast_cache;
    outputs = fn_(inputs);
  }
  forward_nodes_ = static_cast<int64_t>(at::sequence_number::peek() - first);
  return outputs;
}

std::any Frame::pack_forward(const Tensor& t) {
  size_t index = 0;
  {
    std::lock_guard<std::mutex> lock(slots_mutex_);
    index = saved_.size();
    saved_.push_back({TensorMeta(t), maker(t)});
    slots_.emplace_back();
    alive_.push_back(true);
  }
  if (check_ == DeterminismCheck::kValues) {
    fingerprints_.push_back(fingerprint(t));
  }
  auto slot = std::make_shared<Slot>();
  slot->frame = shared_from_this();
  slot->index = index;
  return slot;
}

void Frame::pack_recomputed(const Tensor& t) {
  const size_t index = next_++;
  TORCH_CHECK(
      index < saved_.size(),
      "remat::checkpoint: segment '", name_, "' saved more tensors in its "
      "recompute than the ", saved_.size(), " of its forward (the extra one is ",
      TensorMeta(t).str(), "); expected the recompute to run the same ops");
  if (check_ != DeterminismCheck::kNone) {
    const TensorMeta now(t);
    TORCH_CHECK(
        now == saved_[index].meta,
        "remat::checkpoint: segment '", name_, "' recomputed ",
        describe(saved_[index], index, saved_.size()), " as ", now.str(),
        "; the function must be deterministic in shape, dtype and device");
  }
  if (check_ == DeterminismCheck::kValues) {
    recomputed_fingerprints_.push_back(fingerprint(t));
  }
  {
    std::lock_guard<std::mutex> lock(slots_mutex_);
    if (alive_[index]) {
      slots_[index] = t.detach();
    }
  }
  if (early_stop_ && next_ == saved_.size()) {
    stop_requested = true;
  }
}

Tensor Frame::unpack(size_t index) {
  TORCH_CHECK(
      recomputing_on_.load() != std::this_thread::get_id(),
      "remat::checkpoint: segment '", name_, "' unpacked one of its own saved "
      "tensors while recomputing; expected no backward inside the segment");
  std::lock_guard<std::mutex> lock(recompute_mutex_);
  Tensor t = take(index);
  if (t.defined()) {
    return t;
  }
  recompute();
  t = take(index);
  TORCH_INTERNAL_ASSERT(
      t.defined(), "remat::checkpoint: segment '", name_, "' has no tensor in slot ",
      index, " after its recompute");
  return t;
}

void Frame::recompute() {
  struct Recomputing {
    Frame& f;
    bool outer_stop;
    explicit Recomputing(Frame& frame) : f(frame), outer_stop(stop_requested) {
      f.recomputing_on_ = std::this_thread::get_id();
      f.next_ = 0;
      f.recomputed_fingerprints_.clear();
      stop_requested = false;
    }
    ~Recomputing() {
      f.recomputing_on_ = std::thread::id();
      stop_requested = outer_stop;
    }
  } recomputing(*this);

  std::vector<Tensor> inputs;
  for (size_t i = 0; i < inputs_.size(); ++i) {
    TORCH_CHECK(
        inputs_[i]._version() == versions_[i],
        "remat::checkpoint: input ", i, " of segment '", name_, "' (",
        TensorMeta(inputs_[i]).str(), ") was modified by an inplace operation "
        "after the segment's forward (version ", versions_[i], " then, ",
        inputs_[i]._version(), " now); expected it unchanged until backward, "
        "which recomputes from it");
    inputs.push_back(inputs_[i].detach());
    if (requires_grad_[i]) {
      inputs.back().set_requires_grad(true);
    }
  }
  bool stopped = false;
  const auto first = at::sequence_number::peek();
  {
    SavedTensorHooksGuard guard(std::make_shared<RecomputeHooks>(this));
    std::optional<c10::impl::IncludeDispatchKeyGuard> watch;
    if (early_stop_) {
      watch.emplace(kStopKey);
    }
    RngScope rng(rng_);
    AutocastScope autocast(autocast_);
    AutocastCacheDisabled no_cast_cache;
    torch::AutoGradMode grad_on(true);
    try {
      fn_(inputs);
    } catch (const StopRecompute&) {
      stopped = true;
    }
  }
  count_recompute();
  if (stopped) {
    const auto nodes = static_cast<int64_t>(at::sequence_number::peek() - first);
    count_early_stop(std::max<int64_t>(0, forward_nodes_ - nodes));
  }
  TORCH_CHECK(
      next_ == saved_.size(),
      "remat::checkpoint: segment '", name_, "' saved ", next_, " tensors in "
      "its recompute but ", saved_.size(), " in its forward; expected the "
      "recompute to run the same ops");
  if (check_ == DeterminismCheck::kValues) {
    check_values();
  }
}

// One comparison for the whole segment: on a GPU, one synchronisation per
// recompute rather than one per tensor.
void Frame::check_values() const {
  if (fingerprints_.empty()) {
    return;
  }
  at::NoGradGuard no_grad;
  const Tensor before = torch::stack(fingerprints_).cpu();
  const Tensor after = torch::stack(recomputed_fingerprints_).cpu();
  auto b = before.accessor<double, 2>();
  auto a = after.accessor<double, 2>();
  for (int64_t i = 0; i < before.size(0); ++i) {
    const double tol = tolerance(saved_[i].meta) * std::abs(b[i][1]);
    for (int64_t k = 0; k < 2; ++k) {
      const bool both_nan = std::isnan(a[i][k]) && std::isnan(b[i][k]);
      if (both_nan || std::abs(a[i][k] - b[i][k]) <= tol) {
        continue;
      }
      TORCH_CHECK(
          false, "remat::checkpoint: segment '", name_, "' recomputed ",
          describe(saved_[i], static_cast<size_t>(i), saved_.size()),
          " with other values than its forward (", k == 0 ? "sum" : "sum of |x|",
          " ", b[i][k], " in forward, ", a[i][k], " in the recompute); "
          "expected the same values: does the segment draw from a generator "
          "it does not restore, or read state that changed since forward?");
    }
  }
}

} // namespace

std::vector<Tensor> checkpoint_with_hooks(
    const SegmentFn& fn,
    const std::vector<Tensor>& inputs,
    const CheckpointOptions& options) {
  if (auto why = saved_tensor_hooks_unavailable()) {
    TORCH_CHECK(
        false, "remat::checkpoint: segment '", options.name(), "' cannot use ",
        "saved-tensor hooks: ", *why, "; use CheckpointImpl::kReentrant here");
  }
  return std::make_shared<Frame>(fn, inputs, options)->forward(inputs);
}

} // namespace detail
} // namespace remat
