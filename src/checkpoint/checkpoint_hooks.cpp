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
//
// Per-op policies (CheckpointOptions::op_policy) use the same fallback, in
// forward and in the recompute. It numbers the segment's ops (composite ops
// are looked through, to the ops they call). In forward, an op the policy
// keeps runs as usual, and its outputs are kept (detached) with what the op
// saved for backward, each traced to one of its inputs or outputs. In the
// recompute, the fallback skips that op: the tensors it saved are filled from
// its recomputed inputs and kept outputs, and the kept outputs are returned
// in its place. An op whose kept output changed in place since is run again.
#include "remat/autocast.h"
#include "remat/checkpoint.h"
#include "remat/saved_tensor_hooks.h"
#include "remat/rng_state.h"
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
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>
#include <typeinfo>
#include <unordered_map>
#include <unordered_set>

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

class OpTape;

// The tape of the segment whose forward or recompute runs on this thread with
// an op policy; null otherwise (a nested segment without one hides its ops).
thread_local OpTape* active_tape = nullptr;

// Every op passes here first while kStopKey is included. Without a tape, the
// ops it calls inside do not (the key is excluded while it runs).
void at_op(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack);

TORCH_LIBRARY_IMPL(_, TESTING_ONLY_GenericMode, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&at_op>());
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

// --- Per-op policies ------------------------------------------------------

// Runs `op` as if the fallback were not there: the ops it calls inside do not
// pass through the fallback.
void pass(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard pass_through(kStopKey);
  op.callBoxed(stack);
}

// The tensors among an op's arguments (a list's elements in order), as the
// op finds them on the stack.
std::vector<Tensor> tensor_arguments(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  std::vector<Tensor> out;
  for (const auto& v : torch::jit::last(*stack, op.schema().arguments().size())) {
    if (v.isTensor()) {
      out.push_back(v.toTensor());
    } else if (v.isTensorList()) {
      for (const Tensor& t : v.toTensorVector()) {
        out.push_back(t);
      }
    }
  }
  return out;
}

// Whether an op's outputs can stand in for running it: it returns only new
// tensors (no views, no lists) and writes into none of its arguments.
bool keepable(const c10::OperatorHandle& op) {
  const auto& schema = op.schema();
  if (schema.returns().empty()) {
    return false;
  }
  for (const auto& r : schema.returns()) {
    if (r.type()->kind() != c10::TypeKind::TensorType || r.alias_info() != nullptr) {
      return false;
    }
  }
  for (const auto& a : schema.arguments()) {
    if (a.alias_info() != nullptr && a.alias_info()->isWrite()) {
      return false;
    }
  }
  return !op.hasTag(at::Tag::nondeterministic_seeded);
}

// Two tensors with equal keys read the same elements of the same storage.
struct ViewKey {
  const void* storage = nullptr;
  int64_t offset = 0;
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;

  explicit ViewKey(const Tensor& t) {
    if (t.defined() && t.has_storage()) {
      storage = t.storage().unsafeGetStorageImpl();
      offset = t.storage_offset();
      dtype = t.scalar_type();
      sizes = t.sizes().vec();
      strides = t.strides().vec();
    }
  }
  bool operator==(const ViewKey& o) const {
    return storage != nullptr && storage == o.storage && offset == o.offset &&
        dtype == o.dtype && sizes == o.sizes && strides == o.strides;
  }
};

// Where a tensor that a kept op saved for backward is found in the recompute.
struct SavedSource {
  enum class From { kInput, kOutput, kKept };
  From from = From::kKept;
  size_t index = 0;   ///< kInput: among the op's tensor arguments; kOutput: its outputs
  Tensor kept;        ///< kKept: the tensor itself, detached
  uint32_t version = 0;
};

// An op the policy keeps, as forward ran it.
struct KeptOp {
  size_t op_index = 0; ///< among the segment's ops
  std::string name;
  std::vector<Tensor> outputs; ///< detached: they share the version counters
  std::vector<uint32_t> versions;
  std::vector<bool> requires_grad;
  size_t first_slot = 0;
  std::vector<SavedSource> saved; ///< one per slot from first_slot, in order
  /// An in-place add_ or sub_ into the output of kept op `parent` (a bias
  /// added in place), with no read of that output in between: the kept
  /// output holds what it wrote, so a recompute that skips the parent skips
  /// this op too.
  bool joined = false;
  size_t parent = 0;
  size_t written_arg = 0; ///< joined: the argument it writes into
  /// Never skipped: a joined write saved a tensor for backward.
  bool broken = false;
  bool skipped = false; ///< in the running recompute
  /// Outputs that forward wrote into after the op, or that left the segment
  /// sharing their storage: they were copied (before the write), and a
  /// skip hands out a copy, which the recompute may write into again. The
  /// version counter does not always tell of such writes: the _unsafe_view
  /// that matmul returns in 1.13 has a counter of its own.
  std::vector<bool> copied;
};

// The ops of one segment under an op policy: numbered alike in forward and in
// each recompute, the kept ones recorded in forward and skipped in recomputes.
class OpTape {
 public:
  OpTape(Frame* frame, OpPolicy policy) : frame_(frame), policy_(std::move(policy)) {}

  void start(bool recompute) {
    recompute_ = recompute;
    op_index_ = 0;
    cursor_ = 0;
    for (auto& k : kept_) {
      k.skipped = false;
    }
  }
  void run(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack);
  /// forward's pack of `t`, while an op may be kept
  void saw_pack(const Tensor& t) {
    if (recording_) {
      packs_.push_back(t);
    }
  }
  size_t kept_ops() const { return kept_.size(); }

 private:
  void record(const c10::OperatorHandle& op, torch::jit::Stack* stack, size_t index);
  /// Runs `op`, returning what forward packed while it ran.
  std::vector<Tensor> run_recording(const c10::OperatorHandle& op, torch::jit::Stack* stack);
  bool join_write(const c10::OperatorHandle& op, torch::jit::Stack* stack, size_t index);
  void note_access(const c10::OperatorHandle& op, const torch::jit::Stack& stack);
  void skip_join(KeptOp& k, const c10::OperatorHandle& op, torch::jit::Stack* stack);

 public:
  /// Copies the kept outputs that share `t`'s storage, so that what is
  /// written into it (or done to it outside the segment) leaves them alone.
  void privatize(const Tensor& t);

 private:
  bool unchanged(const KeptOp& k) const;
  void skip(KeptOp& k, const c10::OperatorHandle& op, torch::jit::Stack* stack);

  Frame* frame_; // owns this tape
  OpPolicy policy_;
  bool recompute_ = false;
  size_t op_index_ = 0;
  size_t cursor_ = 0; ///< the recompute's next kept op
  std::vector<KeptOp> kept_;
  /// Storage of each kept output: its kept op.
  std::unordered_multimap<const void*, size_t> kept_storage_;
  /// Kept storages that an op read since they took their kept values.
  std::unordered_set<const void*> read_;
  bool recording_ = false;
  std::vector<Tensor> packs_; ///< while recording
};

// Makes `tape` (or none) the thread's tape for a scope.
class TapeScope {
 public:
  explicit TapeScope(OpTape* tape) : previous_(std::exchange(active_tape, tape)) {}
  ~TapeScope() { active_tape = previous_; }
  TapeScope(const TapeScope&) = delete;
  TapeScope& operator=(const TapeScope&) = delete;

 private:
  OpTape* previous_;
};

void at_op(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  if (stop_requested) {
    throw StopRecompute{};
  }
  if (active_tape != nullptr) {
    active_tape->run(op, keys, stack);
    return;
  }
  pass(op, stack);
}

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
    if (!options.op_policy().empty()) {
      tape_ = std::make_unique<OpTape>(this, options.op_policy());
    }
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
  /// Slots so far: forward's packs, or the recompute's next slot.
  size_t packed() const { return saved_.size(); }
  size_t next_recomputed() const { return next_; }
  const std::string& name() const { return name_; }
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
  std::unique_ptr<OpTape> tape_; ///< with an op policy

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
    TapeScope tape(tape_.get());
    std::optional<c10::impl::IncludeDispatchKeyGuard> watch;
    if (tape_) {
      tape_->start(/*recompute=*/false);
      watch.emplace(kStopKey);
    }
    outputs = fn_(inputs);
  }
  if (tape_) {
    // The caller may write into what it gets.
    for (const auto& out : outputs) {
      tape_->privatize(out);
    }
  }
  forward_nodes_ = static_cast<int64_t>(at::sequence_number::peek() - first);
  return outputs;
}

std::any Frame::pack_forward(const Tensor& t) {
  // Its own ops are not the segment's.
  c10::impl::ExcludeDispatchKeyGuard unseen(kStopKey);
  if (tape_) {
    tape_->saw_pack(t);
  }
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
  c10::impl::ExcludeDispatchKeyGuard unseen(kStopKey);
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
    TapeScope tape(tape_.get());
    std::optional<c10::impl::IncludeDispatchKeyGuard> watch;
    if (early_stop_ || tape_) {
      watch.emplace(kStopKey);
    }
    if (tape_) {
      tape_->start(/*recompute=*/true);
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

void OpTape::run(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  // A composite op is looked through: the ops it calls come here.
  if (op.hasKernelForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd)) {
    op.redispatchBoxed(keys & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, kStopKey), stack);
    return;
  }
  const size_t index = op_index_++;
  const std::string& name = op.schema().name();
  if (recompute_) {
    if (cursor_ < kept_.size() && kept_[cursor_].op_index == index) {
      KeptOp& k = kept_[cursor_++];
      TORCH_CHECK(
          k.name == name, "remat::checkpoint: segment '", frame_->name(), "' ran ",
          name, " as its op ", index, " in the recompute, where forward ran ", k.name,
          "; expected the recompute to run the same ops");
      if (k.joined && kept_[k.parent].skipped) {
        skip_join(k, op, stack);
        return;
      }
      if (!k.joined && !k.broken && unchanged(k)) {
        k.skipped = true;
        skip(k, op, stack);
        return;
      }
    }
    pass(op, stack);
    return;
  }
  if (!kept_storage_.empty()) {
    if (join_write(op, stack, index)) {
      return;
    }
    note_access(op, *stack);
  }
  if (at::GradMode::is_enabled() && policy_.keeps(name) && keepable(op)) {
    record(op, stack, index);
    return;
  }
  pass(op, stack);
}

// Ops that write into a tensor by adding to it, and save nothing for
// backward: a bias added in place.
bool additive_write(const std::string& name) {
  return name == "aten::add_" || name == "aten::sub_";
}

// The storage of `v`'s tensors (a list's elements too).
template <typename F>
void for_each_tensor(const c10::IValue& v, F&& f) {
  if (v.isTensor()) {
    f(v.toTensor());
  } else if (v.isTensorList()) {
    for (const Tensor& t : v.toTensorVector()) {
      f(t);
    }
  }
}

const void* storage_of(const Tensor& t) {
  return t.defined() && t.has_storage() ? t.storage().unsafeGetStorageImpl() : nullptr;
}

// Ops that only make another tensor over the same memory: they read nothing.
bool aliases_only(const c10::OperatorHandle& op) {
  const auto& schema = op.schema();
  if (schema.name() == "aten::_unsafe_view") { // an alias without the annotation
    return true;
  }
  if (schema.returns().empty()) {
    return false;
  }
  for (const auto& r : schema.returns()) {
    if (r.alias_info() == nullptr || r.alias_info()->isWrite()) {
      return false;
    }
  }
  return true;
}

std::vector<Tensor> OpTape::run_recording(
    const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  struct Recording {
    OpTape& tape;
    explicit Recording(OpTape& t) : tape(t) {
      tape.recording_ = true;
      tape.packs_.clear();
    }
    ~Recording() { tape.recording_ = false; }
  } on(*this);
  pass(op, stack);
  return std::exchange(packs_, {});
}

bool OpTape::join_write(const c10::OperatorHandle& op, torch::jit::Stack* stack, size_t index) {
  const auto& schema = op.schema();
  const auto& args = schema.arguments();
  if (!additive_write(schema.name()) || args.empty() || args[0].alias_info() == nullptr ||
      !args[0].alias_info()->isWrite()) {
    return false;
  }
  const size_t first = stack->size() - args.size();
  const c10::IValue& self = (*stack)[first];
  if (!self.isTensor()) {
    return false;
  }
  const void* storage = storage_of(self.toTensor());
  auto range = kept_storage_.equal_range(storage);
  if (storage == nullptr || range.first == range.second || read_.count(storage) != 0) {
    return false;
  }
  for (size_t i = 1; i < args.size(); ++i) {
    bool same = false;
    for_each_tensor((*stack)[first + i], [&](const Tensor& t) {
      same = same || storage_of(t) == storage;
    });
    if (same) {
      return false; // h.add_(h): the written memory is also read
    }
  }
  size_t parent = range.first->second;
  for (auto it = range.first; it != range.second; ++it) {
    parent = std::max(parent, it->second);
  }
  KeptOp k;
  k.op_index = index;
  k.name = schema.name();
  k.first_slot = frame_->packed();
  k.joined = true;
  k.parent = parent;
  k.written_arg = 0;
  const bool saved = !run_recording(op, stack).empty();
  KeptOp& p = kept_[parent];
  if (saved) {
    p.broken = true; // what it saved cannot be filled: run both again
    return true;
  }
  // The write is part of the kept value now (its version too, when the
  // counter is shared).
  for (size_t i = 0; i < p.outputs.size(); ++i) {
    p.versions[i] = p.outputs[i]._version();
  }
  kept_.push_back(std::move(k));
  return true;
}

void OpTape::note_access(const c10::OperatorHandle& op, const torch::jit::Stack& stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack.size() - args.size();
  const bool reads = !aliases_only(op);
  for (size_t i = 0; i < args.size(); ++i) {
    const bool writes = args[i].alias_info() != nullptr && args[i].alias_info()->isWrite();
    for_each_tensor(stack[first + i], [&](const Tensor& t) {
      const void* storage = storage_of(t);
      if (storage == nullptr || kept_storage_.count(storage) == 0) {
        return;
      }
      if (writes) {
        privatize(t);
      } else if (reads) {
        read_.insert(storage);
      }
    });
  }
}

void OpTape::skip_join(KeptOp& k, const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const size_t count = op.schema().arguments().size();
  c10::IValue self = (*stack)[stack->size() - count + k.written_arg];
  torch::jit::drop(*stack, count);
  torch::jit::push(*stack, std::move(self));
  count_op_skip();
}

void OpTape::privatize(const Tensor& t) {
  if (kept_storage_.empty() || !t.defined() || !t.has_storage()) {
    return;
  }
  const void* storage = t.storage().unsafeGetStorageImpl();
  auto range = kept_storage_.equal_range(storage);
  if (range.first == range.second) {
    return;
  }
  c10::impl::ExcludeDispatchKeyGuard unseen(kStopKey);
  at::NoGradGuard no_grad;
  for (auto it = range.first; it != range.second; ++it) {
    KeptOp& k = kept_[it->second];
    for (size_t i = 0; i < k.outputs.size(); ++i) {
      Tensor& out = k.outputs[i];
      if (out.has_storage() && out.storage().unsafeGetStorageImpl() == storage) {
        out = out.clone(at::MemoryFormat::Preserve);
        k.versions[i] = out._version();
        k.copied[i] = true;
      }
    }
  }
  kept_storage_.erase(storage);
  read_.erase(storage);
}

void OpTape::record(const c10::OperatorHandle& op, torch::jit::Stack* stack, size_t index) {
  KeptOp k;
  k.op_index = index;
  k.name = op.schema().name();
  k.first_slot = frame_->packed();
  const std::vector<Tensor> args = tensor_arguments(op, stack);
  const std::vector<Tensor> packs = run_recording(op, stack);
  c10::impl::ExcludeDispatchKeyGuard unseen(kStopKey);
  for (const auto& v : torch::jit::last(*stack, op.schema().returns().size())) {
    const Tensor& out = v.toTensor();
    k.outputs.push_back(out.detach());
    k.versions.push_back(out._version());
    k.requires_grad.push_back(out.requires_grad());
    k.copied.push_back(false);
  }
  TORCH_INTERNAL_ASSERT(frame_->packed() - k.first_slot == packs.size());
  for (const Tensor& p : packs) {
    const ViewKey key(p);
    SavedSource src;
    auto find = [&](const std::vector<Tensor>& among) {
      for (size_t i = 0; i < among.size(); ++i) {
        if (ViewKey(among[i]) == key) {
          return i;
        }
      }
      return among.size();
    };
    if ((src.index = find(args)) < args.size()) {
      src.from = SavedSource::From::kInput;
    } else if ((src.index = find(k.outputs)) < k.outputs.size()) {
      src.from = SavedSource::From::kOutput;
    } else {
      // Made inside the op (autocast's cast of an input): kept as it is.
      src.from = SavedSource::From::kKept;
      src.kept = p.detach();
      src.version = p._version();
    }
    k.saved.push_back(std::move(src));
  }
  auto remember = [&](const Tensor& t) {
    if (t.defined() && t.has_storage()) {
      kept_storage_.emplace(t.storage().unsafeGetStorageImpl(), kept_.size());
    }
  };
  for (const auto& out : k.outputs) {
    remember(out);
  }
  kept_.push_back(std::move(k));
}

bool OpTape::unchanged(const KeptOp& k) const {
  for (size_t i = 0; i < k.outputs.size(); ++i) {
    if (k.outputs[i]._version() != k.versions[i]) {
      return false;
    }
  }
  for (const auto& src : k.saved) {
    if (src.from == SavedSource::From::kKept && src.kept._version() != src.version) {
      return false;
    }
  }
  return true;
}

void OpTape::skip(KeptOp& k, const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard unseen(kStopKey);
  TORCH_CHECK(
      frame_->next_recomputed() == k.first_slot, "remat::checkpoint: segment '",
      frame_->name(), "' reached ", k.name, " (op ", k.op_index, ") after ",
      frame_->next_recomputed(), " saved tensors in its recompute, but after ",
      k.first_slot, " in forward; expected the recompute to run the same ops");
  const std::vector<Tensor> args = tensor_arguments(op, stack);
  for (const auto& src : k.saved) {
    switch (src.from) {
      case SavedSource::From::kInput:
        frame_->pack_recomputed(args.at(src.index));
        break;
      case SavedSource::From::kOutput:
        frame_->pack_recomputed(k.outputs[src.index]);
        break;
      case SavedSource::From::kKept:
        frame_->pack_recomputed(src.kept);
        break;
    }
  }
  torch::jit::drop(*stack, op.schema().arguments().size());
  for (size_t i = 0; i < k.outputs.size(); ++i) {
    Tensor out = k.outputs[i].detach();
    if (k.requires_grad[i]) {
      out.set_requires_grad(true);
    }
    if (k.copied[i]) {
      // A copy the recompute may write into: not a leaf, as the op's output
      // was not (autograd refuses in-place writes to a leaf that needs grad).
      at::AutoGradMode grad_on(k.requires_grad[i]);
      out = out.clone(at::MemoryFormat::Preserve);
    }
    torch::jit::push(*stack, std::move(out));
  }
  count_op_skip();
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
