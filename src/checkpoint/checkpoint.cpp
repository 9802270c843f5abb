#include "remat/checkpoint.h"

#include "remat/autocast.h"
#include "remat/rng_state.h"
#include "checkpoint/tensor_meta.h"
#include "compat/torch.h"

#include <ATen/SequenceNumber.h>
#include <ATen/core/ivalue.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>

#include <atomic>
#include <set>
#include <sstream>
#include <unordered_set>

namespace remat {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::atomic<int64_t> recomputes{0};

using detail::TensorMeta;

std::atomic<int64_t> skipped_nodes{0};
std::atomic<int64_t> skipped_ops{0};

// Everything the recompute needs that is not a saved tensor. It lives in
// ctx->saved_data as a capsule.
struct Segment : torch::CustomClassHolder {
  SegmentFn fn;
  CheckpointOptions options;
  size_t num_inputs = 0;
  std::vector<bool> input_requires_grad;
  std::vector<TensorMeta> output_meta;
  AutocastState autocast;
  // The RNG states travel to backward as saved variables (after the inputs
  // and parameters), so that autograd frees them with the other saved
  // tensors once the segment's backward has run, instead of keeping them
  // until the whole graph is destroyed; `rng` holds them only while forward
  // saves them and while backward recomputes.
  size_t num_saved = 0; // inputs and parameters among the saved variables
  RngState rng;
  bool saved_cpu_rng = false;
  bool saved_cuda_rng = false;
};

bool differentiable(const torch::Tensor& t) {
  return t.defined() && (t.is_floating_point() || t.is_complex());
}

// The tensors the recompute differentiates for. Inputs are detached leaves;
// parameters are usually leaves, but one made before the segment (a
// transposed tied weight, a merged LoRA weight) has history, and the walk
// below stops at its gradient edge, as the gradient does.
struct Declared {
  std::unordered_set<const c10::TensorImpl*> leaves;
  std::set<std::pair<const torch::autograd::Node*, uint32_t>> edges;

  void add(const torch::Tensor& t) {
    if (t.grad_fn()) {
      edges.emplace(t.grad_fn().get(), t.output_nr());
    } else {
      leaves.insert(t.unsafeGetTensorImpl());
    }
  }
  bool stops_at(const torch::autograd::Edge& e) const {
    return edges.count({e.function.get(), e.input_nr}) > 0;
  }
};

// The recomputed graph must reach only the tensors we differentiate for: a
// leaf that requires grad but was not declared, or a captured tensor with
// history outside the segment, would silently get no gradient. Nodes made by
// the recompute have sequence numbers in [first_seq, ...).
void check_closed(
    const Segment& seg,
    const std::vector<torch::Tensor>& outputs,
    const Declared& declared,
    uint64_t first_seq) {
  std::vector<torch::autograd::Node*> stack;
  std::unordered_set<torch::autograd::Node*> seen;
  for (const auto& o : outputs) {
    if (o.defined() && o.grad_fn() &&
        !declared.stops_at(torch::autograd::impl::gradient_edge(o))) {
      stack.push_back(o.grad_fn().get());
    }
  }
  while (!stack.empty()) {
    auto* node = stack.back();
    stack.pop_back();
    if (!seen.insert(node).second) {
      continue;
    }
    if (auto* acc = dynamic_cast<torch::autograd::AccumulateGrad*>(node)) {
      TORCH_CHECK(
          declared.leaves.count(acc->variable.unsafeGetTensorImpl()) > 0,
          "remat::checkpoint: segment '", seg.options.name(),
          "' reads a tensor that requires grad (shape ", acc->variable.sizes(),
          ") but is neither an input nor in CheckpointOptions::parameters; "
          "expected it to be declared so that it receives its gradient");
      continue;
    }
    TORCH_CHECK(
        node->sequence_nr() >= first_seq,
        "remat::checkpoint: segment '", seg.options.name(),
        "' reads a tensor with autograd history from outside the segment (",
        node->name(), "); expected it to be passed as an input or in "
        "CheckpointOptions::parameters");
    for (const auto& edge : node->next_edges()) {
      if (edge.function && !declared.stops_at(edge)) {
        stack.push_back(edge.function.get());
      }
    }
  }
}

struct CheckpointFunction : torch::autograd::Function<CheckpointFunction> {
  static variable_list forward(
      AutogradContext* ctx,
      c10::intrusive_ptr<Segment> seg,
      at::TensorList inputs_and_params) {
    std::vector<torch::Tensor> inputs(
        inputs_and_params.begin(),
        inputs_and_params.begin() + static_cast<int64_t>(seg->num_inputs));
    for (const auto& t : inputs) {
      seg->input_requires_grad.push_back(t.defined() && t.requires_grad());
    }
    if (seg->options.preserve_rng_state()) {
      seg->rng = RngState::capture(inputs);
    }
    seg->autocast = AutocastState::capture();

    // Function::apply runs forward with grad mode off: nothing is saved.
    std::vector<torch::Tensor> outputs;
    {
      AutocastCacheDisabled no_cast_cache;
      outputs = seg->fn(inputs);
    }

    // LibTorch 1.13's Function::apply calls std::terminate on an undefined
    // output, so refuse one here with an error the caller can act on.
    for (size_t i = 0; i < outputs.size(); ++i) {
      TORCH_CHECK(
          outputs[i].defined(),
          "remat::checkpoint: expected the function to return defined tensors, "
          "but output ", i, " of segment '", seg->options.name(),
          "' is undefined; leave it out of the returned vector");
      seg->output_meta.emplace_back(outputs[i]);
    }
    variable_list non_diff;
    for (const auto& o : outputs) {
      if (o.defined() && !differentiable(o)) {
        non_diff.push_back(o);
      }
    }
    if (!non_diff.empty()) {
      ctx->mark_non_differentiable(non_diff);
    }
    auto to_save = inputs_and_params.vec();
    seg->num_saved = to_save.size();
    if (seg->rng.cpu.defined()) {
      to_save.push_back(std::move(seg->rng.cpu));
      seg->saved_cpu_rng = true;
    }
    if (seg->rng.cuda.defined()) {
      to_save.push_back(std::move(seg->rng.cuda));
      seg->saved_cuda_rng = true;
    }
    seg->rng.cpu = seg->rng.cuda = torch::Tensor();
    ctx->save_for_backward(to_save);
    ctx->saved_data["segment"] = c10::IValue::make_capsule(seg);
    return outputs;
  }

  static variable_list backward(
      AutogradContext* ctx,
      variable_list grad_outputs) {
    auto seg = c10::static_intrusive_pointer_cast<Segment>(
        ctx->saved_data["segment"].toCapsule());
    const bool create_graph = torch::GradMode::is_enabled();
    auto saved = ctx->get_saved_variables();
    size_t next = seg->num_saved;
    if (seg->saved_cpu_rng) {
      seg->rng.cpu = saved[next++];
    }
    if (seg->saved_cuda_rng) {
      seg->rng.cuda = saved[next++];
    }
    saved.resize(seg->num_saved);
    const size_t n_in = seg->num_inputs;

    std::vector<torch::Tensor> inputs(n_in);
    for (size_t i = 0; i < n_in; ++i) {
      if (saved[i].defined()) {
        inputs[i] = saved[i].detach();
        inputs[i].set_requires_grad(seg->input_requires_grad[i]);
      }
    }

    std::vector<torch::Tensor> outputs;
    const uint64_t first_seq = at::sequence_number::peek();
    {
      RngScope rng(seg->rng);
      AutocastScope autocast(seg->autocast);
      AutocastCacheDisabled no_cast_cache;
      torch::AutoGradMode grad_on(true);
      outputs = seg->fn(inputs);
    }
    seg->rng.cpu = seg->rng.cuda = torch::Tensor();
    recomputes.fetch_add(1, std::memory_order_relaxed);

    if (seg->options.determinism_check() != DeterminismCheck::kNone) {
      bool same = outputs.size() == seg->output_meta.size();
      std::ostringstream detail;
      for (size_t i = 0; same && i < outputs.size(); ++i) {
        TensorMeta now(outputs[i]);
        if (!(now == seg->output_meta[i])) {
          same = false;
          detail << "output " << i << ": expected " << seg->output_meta[i].str()
                 << ", but got " << now.str();
        }
      }
      if (outputs.size() != seg->output_meta.size()) {
        detail << "expected " << seg->output_meta.size()
               << " outputs, but got " << outputs.size();
      }
      TORCH_CHECK(
          same,
          "remat::checkpoint: segment '", seg->options.name(),
          "' recomputed different outputs than its forward (", detail.str(),
          "); the function must be deterministic in shape, dtype and device");
    }

    // Differentiate only what autograd asks for.
    std::vector<torch::Tensor> targets;
    std::vector<size_t> target_index;
    Declared declared;
    for (size_t i = 0; i < saved.size(); ++i) {
      const auto& t = i < n_in ? inputs[i] : saved[i];
      if (!t.defined() || !t.requires_grad()) {
        continue;
      }
      declared.add(t);
      if (ctx->needs_input_grad(i)) {
        targets.push_back(t);
        target_index.push_back(i);
      }
    }

    std::vector<torch::Tensor> outs;
    std::vector<torch::Tensor> grads_out;
    for (size_t i = 0; i < outputs.size() && i < grad_outputs.size(); ++i) {
      if (outputs[i].defined() && outputs[i].requires_grad() &&
          grad_outputs[i].defined()) {
        outs.push_back(outputs[i]);
        grads_out.push_back(grad_outputs[i]);
      }
    }
    check_closed(*seg, outs, declared, first_seq);

    // One gradient per argument of forward: slot 0 is the Segment, which
    // gets none; slot 1 + i is inputs_and_params[i].
    variable_list result(1 + saved.size());
    if (outs.empty() || targets.empty()) {
      return result;
    }
    // The parameters and the detached inputs are leaves of the recompute's
    // graph. Their hooks run when the outer backward takes what this returns
    // (a parameter's when its gradient accumulates), not in this capture:
    // once per backward, as without checkpointing, on 1.13 and 2.x alike.
    compat::TensorHooksSuspended quiet(targets);
    auto grads = torch::autograd::grad(
        outs, targets, grads_out,
        /*retain_graph=*/create_graph,
        /*create_graph=*/create_graph,
        /*allow_unused=*/true);
    for (size_t k = 0; k < targets.size(); ++k) {
      result[1 + target_index[k]] = grads[k];
    }
    return result;
  }
};

} // namespace

std::vector<torch::Tensor> detail::checkpoint_segment(
    const SegmentFn& fn,
    const std::vector<torch::Tensor>& inputs,
    const CheckpointOptions& options) {
  TORCH_CHECK(fn, "remat::checkpoint: expected a callable function, but got an empty one");
  for (size_t i = 0; i < inputs.size(); ++i) {
    TORCH_CHECK(
        inputs[i].defined(),
        "remat::checkpoint: expected defined input tensors, but input ", i,
        " of segment '", options.name(), "' is undefined");
  }
  if (!torch::GradMode::is_enabled()) {
    return fn(inputs);
  }
  switch (options.implementation()) {
    case CheckpointImpl::kSavedTensorHooks:
      return checkpoint_with_hooks(fn, inputs, options);
    case CheckpointImpl::kReentrant:
      return checkpoint_reentrant(fn, inputs, options);
  }
  TORCH_INTERNAL_ASSERT(false, "remat::checkpoint: unknown implementation");
}

std::vector<torch::Tensor> detail::checkpoint_reentrant(
    const SegmentFn& fn,
    const std::vector<torch::Tensor>& inputs,
    const CheckpointOptions& options) {
  TORCH_CHECK(
      options.op_policy().empty(),
      "remat::checkpoint: expected no op policy with the reentrant "
      "implementation, but segment '", options.name(), "' has '",
      options.op_policy().name(), "' (per-op policies need kSavedTensorHooks)");
  TORCH_CHECK(
      options.determinism_check() != DeterminismCheck::kValues,
      "remat::checkpoint: expected determinism_check kNone or kMetadata with "
      "the reentrant implementation, but got kValues (segment '",
      options.name(), "'); value fingerprints need kSavedTensorHooks");
  bool any_grad = false;
  for (const auto& t : inputs) {
    any_grad = any_grad || (t.defined() && t.requires_grad());
  }
  for (const auto& p : options.parameters()) {
    any_grad = any_grad || (p.defined() && p.requires_grad());
  }
  if (!any_grad) {
    return fn(inputs);
  }

  auto seg = c10::make_intrusive<Segment>();
  seg->fn = fn;
  seg->options = options;
  seg->num_inputs = inputs.size();
  std::vector<torch::Tensor> all(inputs);
  all.insert(all.end(), options.parameters().begin(), options.parameters().end());
  // The segment keeps its own copy of the parameter list only through the
  // saved tensors; drop it from the options it carries.
  seg->options.parameters({});
  return CheckpointFunction::apply(seg, at::TensorList(all));
}

int64_t recompute_count() {
  return recomputes.load(std::memory_order_relaxed);
}

void count_recompute() {
  recomputes.fetch_add(1, std::memory_order_relaxed);
}

int64_t early_stop_skipped_nodes() {
  return skipped_nodes.load(std::memory_order_relaxed);
}

void detail::count_early_stop(int64_t skipped) {
  skipped_nodes.fetch_add(skipped, std::memory_order_relaxed);
}

int64_t op_policy_skipped_ops() {
  return skipped_ops.load(std::memory_order_relaxed);
}

void detail::count_op_skip() {
  skipped_ops.fetch_add(1, std::memory_order_relaxed);
}

const char* to_string(CheckpointImpl impl) {
  switch (impl) {
    case CheckpointImpl::kSavedTensorHooks:
      return "saved-tensor-hooks";
    case CheckpointImpl::kReentrant:
      return "reentrant";
  }
  return "?";
}

const char* to_string(DeterminismCheck check) {
  switch (check) {
    case DeterminismCheck::kNone:
      return "none";
    case DeterminismCheck::kMetadata:
      return "metadata";
    case DeterminismCheck::kValues:
      return "values";
  }
  return "?";
}

namespace {
thread_local CheckpointDefaults thread_defaults;
} // namespace

CheckpointDefaults checkpoint_defaults() {
  return thread_defaults;
}

CheckpointDefaultsGuard::CheckpointDefaultsGuard(CheckpointDefaults defaults)
    : previous_(thread_defaults) {
  thread_defaults = defaults;
}

CheckpointDefaultsGuard::~CheckpointDefaultsGuard() {
  thread_defaults = previous_;
}

} // namespace remat
