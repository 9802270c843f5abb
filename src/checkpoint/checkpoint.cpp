#include "remat/checkpoint.h"

#include "checkpoint/autocast_state.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/SequenceNumber.h>
#include <ATen/core/ivalue.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>

#ifdef REMAT_WITH_CUDA
#include <ATen/cuda/CUDAGeneratorImpl.h>
#endif

#include <atomic>
#include <sstream>
#include <unordered_set>

namespace remat {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::atomic<int64_t> recomputes{0};

struct TensorMeta {
  std::vector<int64_t> sizes;
  c10::ScalarType dtype;
  c10::Device device;

  explicit TensorMeta(const torch::Tensor& t)
      : sizes(t.sizes().vec()), dtype(t.scalar_type()), device(t.device()) {}

  bool operator==(const TensorMeta& o) const {
    return sizes == o.sizes && dtype == o.dtype && device == o.device;
  }
  std::string str() const {
    std::ostringstream s;
    s << c10::IntArrayRef(sizes) << " " << dtype << " on " << device;
    return s.str();
  }
};

// Everything the recompute needs that is not a saved tensor. It lives in
// ctx->saved_data as a capsule.
struct Segment : torch::CustomClassHolder {
  SegmentFn fn;
  CheckpointOptions options;
  size_t num_inputs = 0;
  std::vector<bool> input_requires_grad;
  std::vector<TensorMeta> output_meta;
  AutocastState autocast;
  torch::Tensor cpu_rng_state;
#ifdef REMAT_WITH_CUDA
  c10::DeviceIndex cuda_device = -1;
  torch::Tensor cuda_rng_state;
#endif
};

// The CUDA device of the first CUDA input, if any: its generator is the one
// the segment draws from.
c10::optional<c10::Device> cuda_device_of(const std::vector<torch::Tensor>& ts) {
  for (const auto& t : ts) {
    if (t.defined() && t.is_cuda()) {
      return t.device();
    }
  }
  return c10::nullopt;
}

void save_rng(Segment& seg, const std::vector<torch::Tensor>& inputs) {
  auto gen = at::detail::getDefaultCPUGenerator();
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    seg.cpu_rng_state = gen.get_state();
  }
#ifdef REMAT_WITH_CUDA
  if (auto d = cuda_device_of(inputs)) {
    auto cuda_gen = at::cuda::detail::getDefaultCUDAGenerator(d->index());
    std::lock_guard<std::mutex> lock(cuda_gen.mutex());
    seg.cuda_device = d->index();
    seg.cuda_rng_state = cuda_gen.get_state();
  }
#else
  (void)inputs;
#endif
}

// Puts the segment's RNG state in place for the recompute and restores the
// state it found on destruction, so the rest of backward is unaffected.
class RngScope {
 public:
  explicit RngScope(const Segment& seg) : active_(seg.cpu_rng_state.defined()) {
    if (!active_) {
      return;
    }
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    cpu_state_ = gen.get_state();
    gen.set_state(seg.cpu_rng_state);
#ifdef REMAT_WITH_CUDA
    if (seg.cuda_rng_state.defined()) {
      cuda_device_ = seg.cuda_device;
      auto cuda_gen = at::cuda::detail::getDefaultCUDAGenerator(cuda_device_);
      std::lock_guard<std::mutex> cuda_lock(cuda_gen.mutex());
      cuda_state_ = cuda_gen.get_state();
      cuda_gen.set_state(seg.cuda_rng_state);
    }
#endif
  }
  ~RngScope() {
    if (!active_) {
      return;
    }
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(cpu_state_);
#ifdef REMAT_WITH_CUDA
    if (cuda_state_.defined()) {
      auto cuda_gen = at::cuda::detail::getDefaultCUDAGenerator(cuda_device_);
      std::lock_guard<std::mutex> cuda_lock(cuda_gen.mutex());
      cuda_gen.set_state(cuda_state_);
    }
#endif
  }
  RngScope(const RngScope&) = delete;
  RngScope& operator=(const RngScope&) = delete;

 private:
  bool active_;
  torch::Tensor cpu_state_;
#ifdef REMAT_WITH_CUDA
  c10::DeviceIndex cuda_device_ = -1;
  torch::Tensor cuda_state_;
#endif
};

bool differentiable(const torch::Tensor& t) {
  return t.defined() && (t.is_floating_point() || t.is_complex());
}

// The recomputed graph must reach only the tensors we differentiate for: a
// leaf that requires grad but was not declared, or a captured tensor with
// history outside the segment, would silently get no gradient. Nodes made by
// the recompute have sequence numbers in [first_seq, ...).
void check_closed(
    const Segment& seg,
    const std::vector<torch::Tensor>& outputs,
    const std::unordered_set<const c10::TensorImpl*>& declared,
    uint64_t first_seq) {
  std::vector<torch::autograd::Node*> stack;
  std::unordered_set<torch::autograd::Node*> seen;
  for (const auto& o : outputs) {
    if (o.defined() && o.grad_fn()) {
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
          declared.count(acc->variable.unsafeGetTensorImpl()) > 0,
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
        node->name(), "); expected it to be passed as an input");
    for (const auto& edge : node->next_edges()) {
      if (edge.function) {
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
      save_rng(*seg, inputs);
    }
    seg->autocast = AutocastState::capture();

    // Function::apply runs forward with grad mode off: nothing is saved.
    auto outputs = seg->fn(inputs);

    for (const auto& o : outputs) {
      seg->output_meta.emplace_back(o);
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
    ctx->save_for_backward(inputs_and_params.vec());
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
      RngScope rng(*seg);
      AutocastScope autocast(seg->autocast);
      torch::AutoGradMode grad_on(true);
      outputs = seg->fn(inputs);
    }
    recomputes.fetch_add(1, std::memory_order_relaxed);

    if (seg->options.determinism_check()) {
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
    std::unordered_set<const c10::TensorImpl*> declared;
    for (size_t i = 0; i < saved.size(); ++i) {
      const auto& t = i < n_in ? inputs[i] : saved[i];
      if (!t.defined() || !t.requires_grad()) {
        continue;
      }
      declared.insert(t.unsafeGetTensorImpl());
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

    // One slot per argument of forward: the segment (no gradient), then
    // the inputs and parameters.
    variable_list result(1 + saved.size());
    if (outs.empty() || targets.empty()) {
      return result;
    }
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

std::vector<torch::Tensor> checkpoint(
    const SegmentFn& fn,
    const std::vector<torch::Tensor>& inputs,
    const CheckpointOptions& options) {
  TORCH_CHECK(fn, "remat::checkpoint: expected a callable function, but got an empty one");
  bool any_grad = false;
  for (size_t i = 0; i < inputs.size(); ++i) {
    TORCH_CHECK(
        inputs[i].defined(),
        "remat::checkpoint: expected defined input tensors, but input ", i,
        " of segment '", options.name(), "' is undefined");
  }
  for (const auto& t : inputs) {
    any_grad = any_grad || (t.defined() && t.requires_grad());
  }
  for (const auto& p : options.parameters()) {
    any_grad = any_grad || (p.defined() && p.requires_grad());
  }
  if (!torch::GradMode::is_enabled() || !any_grad) {
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

} // namespace remat
