#include "plan/op_trace.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <sstream>

namespace remat {
namespace plan {
namespace detail {

int64_t TraceValue::bytes() const {
  int64_t n = elem_bytes;
  for (auto d : shape) {
    n *= d;
  }
  return n;
}

std::string TraceValue::shape_str() const {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    s << (i ? ", " : "") << shape[i];
  }
  s << "] x " << elem_bytes << " B";
  return s.str();
}

int Trace::input(std::string name, std::vector<int64_t> shape, int64_t elem_bytes,
                 bool requires_grad) {
  TraceValue v;
  v.name = std::move(name);
  v.shape = std::move(shape);
  v.elem_bytes = elem_bytes;
  v.requires_grad = requires_grad;
  v.producer = -1;
  values_.push_back(std::move(v));
  return static_cast<int>(values_.size()) - 1;
}

int Trace::value(std::string name, std::vector<int64_t> shape, int64_t elem_bytes,
                 bool requires_grad) {
  TraceValue v;
  v.name = std::move(name);
  v.shape = std::move(shape);
  v.elem_bytes = elem_bytes;
  v.requires_grad = requires_grad;
  v.block = block_;
  v.producer = static_cast<int>(ops_.size());
  values_.push_back(std::move(v));
  pending_.push_back(static_cast<int>(values_.size()) - 1);
  return static_cast<int>(values_.size()) - 1;
}

void Trace::op(std::string name, std::vector<int> inputs, std::vector<int> saved,
               double flops, double backward_flops, int64_t weight_grad_bytes) {
  const int k = static_cast<int>(ops_.size());
  TraceOp o;
  o.name = std::move(name);
  o.block = block_;
  o.inputs = std::move(inputs);
  o.outputs = std::move(pending_);
  pending_.clear();
  o.flops = flops;
  o.backward_flops = backward_flops;
  o.weight_grad_bytes = weight_grad_bytes;
  for (int v : o.inputs) {
    TORCH_INTERNAL_ASSERT(v >= 0 && v < static_cast<int>(values_.size()));
    values_[v].last_use = k;
  }
  for (int v : saved) {
    values_[v].saved_by.push_back(k);
  }
  ops_.push_back(std::move(o));
}

bool Trace::kept(int v, SegmentMode mode) const {
  const auto& val = values_[v];
  if (val.producer < 0) {
    return false;
  }
  if (v == output_) {
    return true;
  }
  if (mode == SegmentMode::kSaveMatmuls || mode == SegmentMode::kSaveProjections) {
    // The layer's checkpoint keeps its input; the op policy the products'
    // outputs, whatever autograd saves. The rest is made again in backward.
    const Product p = ops_[val.producer].product;
    return p == Product::kProjection ||
        (p == Product::kMatmul && mode == SegmentMode::kSaveMatmuls);
  }
  if (mode == SegmentMode::kCompress) {
    mode = SegmentMode::kStore; // what it keeps; held_bytes says how
  }
  const bool selective = mode == SegmentMode::kRecomputeAttention ||
      mode == SegmentMode::kRecomputeMlp;
  const Block recomputed = mode == SegmentMode::kRecomputeAttention
      ? Block::kAttentionCore
      : Block::kMlp;
  for (int k : val.saved_by) {
    if (!selective || ops_[k].block != recomputed) {
      return true;
    }
  }
  if (!selective || ops_[val.producer].block == recomputed) {
    return false;
  }
  // Made outside the recomputed block and read inside it: the block's
  // checkpoint keeps it as an input.
  for (const auto& o : ops_) {
    if (o.block == recomputed &&
        std::find(o.inputs.begin(), o.inputs.end(), v) != o.inputs.end()) {
      return true;
    }
  }
  return false;
}

int64_t Trace::held_bytes(int v, SegmentMode mode) const {
  const auto& val = values_[v];
  const int64_t bytes = val.bytes();
  // remat::CompressedSavesGuard: floating tensors (fp32 or bf16 here; masks
  // are 1 byte, ids 8) of at least its 4 KiB; the output stays as it is
  // for the next stage.
  if (mode != SegmentMode::kCompress || v == output_ || bytes < 4096 ||
      (val.elem_bytes != 4 && val.elem_bytes != 2) || val.elem_bytes <= compress_bytes_) {
    return bytes;
  }
  return bytes / val.elem_bytes * compress_bytes_;
}

namespace {

bool selective(SegmentMode mode) {
  return mode == SegmentMode::kRecomputeAttention || mode == SegmentMode::kRecomputeMlp;
}

Block recomputed_block(SegmentMode mode) {
  return mode == SegmentMode::kRecomputeAttention ? Block::kAttentionCore : Block::kMlp;
}

} // namespace

int64_t Trace::forward_peak(bool grad, SegmentMode mode) const {
  std::vector<bool> alive(values_.size(), false);
  int64_t live = 0;
  int64_t peak = 0;
  // kCompress: a kept value's compressed copy is made when it is saved
  // (taken as when it is made); the value itself goes after its last use.
  auto compressed = [&](int v) {
    return grad && mode == SegmentMode::kCompress && kept(v, mode) &&
        held_bytes(v, mode) < values_[v].bytes();
  };
  for (int k = 0; k < static_cast<int>(ops_.size()); ++k) {
    for (int v : ops_[k].outputs) {
      alive[v] = true;
      live += values_[v].bytes() + (compressed(v) ? held_bytes(v, mode) : 0);
    }
    peak = std::max(peak, live);
    for (size_t v = 0; v < values_.size(); ++v) {
      const bool keep = static_cast<int>(v) == output_ ||
          (grad && kept(static_cast<int>(v), mode) && !compressed(static_cast<int>(v)));
      if (alive[v] && !keep && values_[v].last_use <= k) {
        alive[v] = false;
        live -= values_[v].bytes();
      }
    }
  }
  return peak;
}

namespace {

// The state of Trace::backward_peak's walk: what is held and until when,
// which gradients live, and the running and highest byte totals.
struct BackwardWalk {
  BackwardWalk(const Trace& trace, SegmentMode mode);
  int64_t run();

  bool in_block(int k) const { return sel && ops[k].block == blk; }
  bool reads(int k, int v) const;
  bool read_inside(int v) const;
  bool read_outside(int v) const;
  int last_inside(int v) const;
  bool stays(int v) const;
  void hold(int v, int until);
  void hold_kept();
  std::vector<bool> recompute_block();
  void hold_recomputed(const std::vector<bool>& alive);
  void step(int k);

  const Trace& trace;
  const std::vector<TraceValue>& values;
  const std::vector<TraceOp>& ops;
  const SegmentMode mode;
  const int n_ops;
  const int n;
  const bool sel;
  const Block blk;
  int first_block = -1;
  int last_block = -1;
  // release[v]: the op after whose backward v is freed; n_ops: never (the
  // stage output, freed with the stage); -1: not held.
  std::vector<int> release;
  std::vector<bool> grad;
  int64_t live = 0;
  int64_t peak = 0;
  int64_t block_weight_grads = 0;
};

// Sets up an empty walk and finds the recomputed block's first and last op.
BackwardWalk::BackwardWalk(const Trace& trace, SegmentMode mode)
    : trace(trace),
      values(trace.values()),
      ops(trace.ops()),
      mode(mode),
      n_ops(static_cast<int>(ops.size())),
      n(static_cast<int>(values.size())),
      sel(selective(mode)),
      blk(recomputed_block(mode)),
      release(n, -1),
      grad(n, false) {
  for (int k = 0; k < n_ops; ++k) {
    if (in_block(k)) {
      first_block = first_block < 0 ? k : first_block;
      last_block = k;
    }
  }
}

// True when op k reads v.
bool BackwardWalk::reads(int k, int v) const {
  const auto& in = ops[k].inputs;
  return std::find(in.begin(), in.end(), v) != in.end();
}

// True when an op of the recomputed block reads v.
bool BackwardWalk::read_inside(int v) const {
  for (int k = first_block; k >= 0 && k <= last_block; ++k) {
    if (in_block(k) && reads(k, v)) {
      return true;
    }
  }
  return false;
}

// True when an op outside the recomputed block reads v.
bool BackwardWalk::read_outside(int v) const {
  for (int k = 0; k < n_ops; ++k) {
    if (!in_block(k) && reads(k, v)) {
      return true;
    }
  }
  return false;
}

// The last op of the recomputed block that reads v; -1 if none.
int BackwardWalk::last_inside(int v) const {
  int last = -1;
  for (int q = first_block; q <= last_block; ++q) {
    if (in_block(q) && reads(q, v)) {
      last = q;
    }
  }
  return last;
}

// True when a recomputed v outlives the re-run: the checkpoint holds it as
// an output, or an op of the block saves it.
bool BackwardWalk::stays(int v) const {
  const auto& by = values[v].saved_by;
  return read_outside(v) ||
      std::any_of(by.begin(), by.end(), [&](int q) { return in_block(q); });
}

// Holds v until op `until`'s backward, counting its bytes if not yet held.
void BackwardWalk::hold(int v, int until) {
  if (release[v] < 0) {
    live += values[v].bytes();
  }
  release[v] = std::max(release[v], until);
}

// Holds what the forward kept, each until its last holder's backward.
void BackwardWalk::hold_kept() {
  for (int v = 0; v < n; ++v) {
    if (!trace.kept(v, mode)) {
      continue;
    }
    int until = -1;
    if (v == trace.output()) {
      until = n_ops;
    }
    for (int k : values[v].saved_by) {
      // Held until the earliest (in forward order) op saving it has run;
      // in backward order that is the last: the smallest index.
      if (!in_block(k)) {
        until = until < 0 ? k : std::min(until, k);
      }
    }
    if (sel && values[v].producer >= 0 && !in_block(values[v].producer) && read_inside(v)) {
      until = until < 0 ? first_block : std::min(until, first_block);
    }
    hold(v, until < 0 ? 0 : until);
  }
}

// Re-runs the block, grad on, raising the peak; returns what is left alive.
std::vector<bool> BackwardWalk::recompute_block() {
  // What it saves, and its outputs (held by the checkpoint) stay; its
  // temporaries die after their last use.
  std::vector<bool> alive(n, false);
  int64_t extra = 0;
  for (int j = first_block; j <= last_block; ++j) {
    if (!in_block(j)) {
      continue;
    }
    for (int v : ops[j].outputs) {
      if (release[v] < 0) {
        alive[v] = true;
        extra += values[v].bytes();
      }
    }
    peak = std::max(peak, live + extra);
    for (int v = 0; v < n; ++v) {
      if (alive[v] && !stays(v) && last_inside(v) <= j) {
        alive[v] = false;
        extra -= values[v].bytes();
      }
    }
  }
  return alive;
}

// Holds what the re-run left alive until the block's backward frees it.
void BackwardWalk::hold_recomputed(const std::vector<bool>& alive) {
  for (int v = 0; v < n; ++v) {
    if (!alive[v]) {
      continue;
    }
    int until = read_outside(v) ? first_block : -1;
    for (int q : values[v].saved_by) {
      if (in_block(q)) {
        until = until < 0 ? q : std::min(until, q);
      }
    }
    hold(v, until);
  }
}

// Runs op k's backward: its inputs' gradients appear, its outputs' and
// what it was the last to hold go.
void BackwardWalk::step(int k) {
  const auto& o = ops[k];
  int64_t fresh = 0;
  for (int v : o.inputs) {
    if (values[v].requires_grad) {
      fresh += values[v].bytes();
    }
  }
  if (in_block(k)) {
    block_weight_grads += o.weight_grad_bytes;
    peak = std::max(peak, live + fresh + block_weight_grads);
  } else {
    peak = std::max(peak, live + fresh + o.weight_grad_bytes + block_weight_grads);
  }
  for (int v : o.inputs) {
    if (values[v].requires_grad && !grad[v]) {
      grad[v] = true;
      live += values[v].bytes();
    }
  }
  for (int v : o.outputs) {
    if (grad[v]) {
      grad[v] = false;
      live -= values[v].bytes();
    }
  }
  for (int v = 0; v < n; ++v) {
    if (release[v] == k) {
      release[v] = -2;
      live -= values[v].bytes();
    }
  }
  if (k == first_block) {
    block_weight_grads = 0;
  }
}

// Walks the ops last to first and returns the highest total.
int64_t BackwardWalk::run() {
  hold_kept();
  const int output = trace.output();
  if (output >= 0 && values[output].requires_grad) {
    grad[output] = true;
    live += values[output].bytes();
  }
  peak = live;
  for (int k = n_ops - 1; k >= 0; --k) {
    if (k == last_block) {
      hold_recomputed(recompute_block());
    }
    step(k);
  }
  return peak;
}

} // namespace

// Walks the backward op by op, last to first. Held: what the forward kept,
// released after the last op (in backward order) that holds it; gradients:
// that of the output, then each value's once an op reading it has run,
// released when the op that made the value has run. With a selective mode,
// reaching the recomputed block first re-runs it with grad on; its tensors,
// its outputs and its weights' gradients then live until the block's first
// op is done (remat's nested checkpoint returns them all at once).
int64_t Trace::backward_peak(SegmentMode mode) const {
  return BackwardWalk(*this, mode).run();
}

// A per-op mode's backward: the layer runs again, its kept products given
// back instead of computed, so at its start every value kStore keeps is
// made again (with the output's gradient held), and then the backward is
// kStore's. The kept products are counted beside all of that, as if none
// were one of the values made again: measured per-op layers peak above
// kStore's walk by most of their kept bytes (a skipped op's output that was
// written in place is handed out as a copy, and the tape holds its own
// until the segment's backward ends), and an estimate should err high.
int64_t Trace::per_op_backward_peak(SegmentMode mode) const {
  const int64_t output_grad =
      values_[output_].requires_grad ? values_[output_].bytes() : 0;
  int64_t products = 0;
  for (int v = 0; v < static_cast<int>(values_.size()); ++v) {
    products += v != output_ && kept(v, mode) && !kept(v, SegmentMode::kStore)
        ? values_[v].bytes()
        : 0;
  }
  return std::max(forward_peak(true, SegmentMode::kStore) + output_grad,
                  backward_peak(SegmentMode::kStore)) +
      products;
}

// kCompress's backward: kStore's with every kept value smaller, plus the
// values one op's backward widens back at once (those it saved).
int64_t Trace::compress_backward_peak() const {
  int64_t saved = 0;
  std::vector<int64_t> widened(ops_.size(), 0);
  for (int v = 0; v < static_cast<int>(values_.size()); ++v) {
    if (!kept(v, SegmentMode::kCompress)) {
      continue;
    }
    const int64_t held = held_bytes(v, SegmentMode::kCompress);
    saved += values_[v].bytes() - held;
    if (held < values_[v].bytes()) {
      for (int k : values_[v].saved_by) {
        widened[k] += values_[v].bytes();
      }
    }
  }
  const int64_t widest = widened.empty() ? 0 : *std::max_element(widened.begin(), widened.end());
  return backward_peak(SegmentMode::kStore) - saved + widest;
}

TraceCost Trace::cost(SegmentMode mode) const {
  TORCH_INTERNAL_ASSERT(output_ >= 0, "trace without an output");
  TORCH_INTERNAL_ASSERT(mode != SegmentMode::kRecompute, "kRecompute is the chain's");
  const bool per_op =
      mode == SegmentMode::kSaveMatmuls || mode == SegmentMode::kSaveProjections;
  TraceCost c;
  c.output_bytes = values_[output_].bytes();
  for (size_t v = 0; v < values_.size(); ++v) {
    if (kept(static_cast<int>(v), mode)) {
      c.stored_bytes += held_bytes(static_cast<int>(v), mode);
    }
  }
  c.forward_transient_bytes =
      std::max<int64_t>(0, forward_peak(true, mode) - c.stored_bytes);
  c.nograd_transient_bytes =
      std::max<int64_t>(0, forward_peak(false, SegmentMode::kStore) - c.output_bytes);
  int64_t input_grad = 0;
  for (const auto& v : values_) {
    if (v.producer < 0 && v.requires_grad) {
      input_grad += v.bytes();
    }
  }
  const int64_t backward = per_op ? per_op_backward_peak(mode)
      : mode == SegmentMode::kCompress ? compress_backward_peak()
                                      : backward_peak(mode);
  c.backward_transient_bytes =
      std::max<int64_t>(0, backward - c.stored_bytes - c.output_bytes - input_grad);
  for (const auto& o : ops_) {
    c.forward_flops += o.flops;
    c.backward_flops += o.backward_flops;
    c.parameter_gradient_bytes += o.weight_grad_bytes;
    if (selective(mode) && o.block == recomputed_block(mode) && o.replayed) {
      c.recompute_flops += o.flops;
    }
    // A per-op mode runs every op again but the products it keeps. The
    // others' FLOPs are mostly not counted (pointwise ops carry none), so
    // each is charged one per element it makes: a recompute is never free,
    // and a plan that has the memory stores.
    const bool kept_product = o.product == Product::kProjection ||
        (o.product == Product::kMatmul && mode == SegmentMode::kSaveMatmuls);
    if (per_op && !kept_product) {
      c.recompute_flops += o.flops;
      for (int v : o.outputs) {
        c.recompute_flops += static_cast<double>(values_[v].bytes() / values_[v].elem_bytes);
      }
    }
  }
  return c;
}

} // namespace detail
} // namespace plan
} // namespace remat
