// Activation checkpointing for LibTorch: run a segment of the forward pass
// without keeping its intermediate tensors, and recompute them in backward.
//
// Two implementations, chosen per segment by CheckpointOptions::implementation:
//
//   - kSavedTensorHooks (the default), PyTorch's non-reentrant design
//     (torch.utils.checkpoint with use_reentrant=False). Forward builds the
//     normal autograd graph, but every tensor autograd would save inside the
//     segment is packed as a small handle (remat/saved_tensor_hooks.h) and
//     dropped. The first time backward unpacks one, the segment runs again
//     and the tensors it saves fill the handles; gradients then flow through
//     the original graph. So:
//       - a closure may read any tensor (a module's weights, a rotary table,
//         a mask) without listing it: no parameter list;
//       - torch::autograd::grad, retain_graph, create_graph (double
//         backward) and nested checkpoints work as without checkpointing;
//       - early stop: the recompute stops as soon as the last tensor forward
//         saved is back, skipping the segment's tail
//         (early_stop_skipped_nodes() counts what it skipped);
//       - per-op save policies (CheckpointOptions::op_policy,
//         remat/op_policy.h): the outputs of the ops a policy names (matrix
//         products, say) are kept, and the recompute skips those ops;
//       - each recomputed tensor is compared with the one forward saved:
//         shape, dtype and device, and with DeterminismCheck::kValues a
//         fingerprint of its values; a difference names the segment and the
//         tensor.
//   - kReentrant: a custom autograd Function that keeps the segment's
//     inputs and, in backward, re-runs the segment and differentiates it with
//     torch::autograd::grad. Tensors the function reads besides its inputs
//     must be listed in CheckpointOptions::parameters. Kept for comparison
//     and for processes where the hooks cannot be installed (PyTorch's
//     Python module loaded in the same process).
//
// Both restore the RNG state (dropout draws the same masks) and the autocast
// state of the first run, and give gradients bit-identical to running
// without checkpointing on the CPU.
//
// Example (a lambda over a module's weights; nothing to list):
//   // given: torch::Tensor hidden = torch::randn({8, 256});  // [B, 256]
//   torch::nn::Linear fc(256, 256);
//   auto out = remat::checkpoint(
//       [&](const std::vector<torch::Tensor>& in) {
//         return std::vector<torch::Tensor>{torch::gelu(fc(in[0]))};
//       },
//       {hidden}, remat::CheckpointOptions().name("layer.3"))[0];
//
// Example (a module; what forward returns comes back):
//   // given: torch::nn::Linear fc(256, 256);
//   // given: torch::Tensor x = torch::randn({8, 256});
//   torch::Tensor y = remat::checkpoint(fc, {x});
#pragma once

#include "remat/op_policy.h"

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace remat {

/// A checkpointable segment: tensors in, tensors out.
using SegmentFn =
    std::function<std::vector<torch::Tensor>(const std::vector<torch::Tensor>&)>;

/// How a segment is checkpointed (see the top of this file).
enum class CheckpointImpl {
  kSavedTensorHooks, ///< non-reentrant, on saved-tensor hooks (the default)
  kReentrant,        ///< a custom Function that re-runs the segment in backward
};

/// What the recompute is compared with, per tensor that forward saved
/// (kSavedTensorHooks) or per output (kReentrant).
enum class DeterminismCheck {
  kNone,     ///< nothing
  kMetadata, ///< number, shapes, dtypes and devices (what PyTorch checks)
  /// and each tensor's fingerprint: sum and sum of |x| over a strided grid of
  /// <= 4,096 of its elements, bit-equal on the CPU, within 1e-3 (16-bit: 1e-2)
  /// of the latter on a GPU. Catches what changes many elements (an unrestored
  /// generator, changed state), not a few off the grid. A few small ops per
  /// saved tensor (remat bench shows the cost). kSavedTensorHooks only.
  kValues,
};

const char* to_string(CheckpointImpl impl);
const char* to_string(DeterminismCheck check);

/// The implementation and determinism check that CheckpointOptions starts
/// from on this thread. remat's models and checkpoint_sequential make their
/// options this way, so a scope of CheckpointDefaultsGuard picks the
/// implementation for a whole model's forward.
struct CheckpointDefaults {
  CheckpointImpl implementation = CheckpointImpl::kSavedTensorHooks;
  DeterminismCheck determinism_check = DeterminismCheck::kMetadata;
  /// Which ops' outputs a segment keeps (empty: none, the whole segment is
  /// recomputed). kSavedTensorHooks only.
  OpPolicy op_policy = {};

  bool operator==(const CheckpointDefaults& o) const {
    return implementation == o.implementation &&
        determinism_check == o.determinism_check && op_policy == o.op_policy;
  }
  bool operator!=(const CheckpointDefaults& o) const {
    return !(*this == o);
  }
};

/// This thread's defaults.
CheckpointDefaults checkpoint_defaults();

/// Sets this thread's defaults for its lifetime, then restores them.
///
/// Example:
///   // given: remat::nn::Llama model(remat::nn::LlamaOptions().num_layers(2));
///   // given: torch::Tensor ids = torch::randint(32000, {2, 64});  // [B, S]
///   {
///     remat::CheckpointDefaultsGuard old({remat::CheckpointImpl::kReentrant});
///     auto loss = model->forward_loss(ids, ids);  // every segment reentrant
///     loss.backward();
///   }
class CheckpointDefaultsGuard {
 public:
  explicit CheckpointDefaultsGuard(CheckpointDefaults defaults);
  ~CheckpointDefaultsGuard();
  CheckpointDefaultsGuard(const CheckpointDefaultsGuard&) = delete;
  CheckpointDefaultsGuard& operator=(const CheckpointDefaultsGuard&) = delete;

 private:
  CheckpointDefaults previous_;
};

/// Options of one checkpointed segment.
///
/// Example:
///   auto options =
///       remat::CheckpointOptions().name("layer.3").preserve_rng_state(false);
struct CheckpointOptions {
  /// Restore the RNG state (CPU generator, and the CUDA generator of the
  /// inputs' device where built) before recomputing, so dropout draws the
  /// same masks twice.
  TORCH_ARG(bool, preserve_rng_state) = true;
  /// What the recompute is checked against; an error names the segment.
  TORCH_ARG(DeterminismCheck, determinism_check) =
      checkpoint_defaults().determinism_check;
  TORCH_ARG(CheckpointImpl, implementation) = checkpoint_defaults().implementation;
  /// The ops whose outputs the segment keeps from forward, so that its
  /// recompute skips them (remat/op_policy.h); empty: recompute everything.
  /// kSavedTensorHooks only: the reentrant implementation refuses a
  /// non-empty one.
  TORCH_ARG(OpPolicy, op_policy) = checkpoint_defaults().op_policy;
  /// Stop the recompute once every tensor forward saved is back
  /// (kSavedTensorHooks; the reentrant one always runs the whole segment).
  TORCH_ARG(bool, early_stop) = true;
  /// Name used in error messages ("layer.3").
  TORCH_ARG(std::string, name) = "segment";
  /// kReentrant only: tensors the function reads besides its inputs
  /// (typically parameters). They become explicit inputs of the autograd
  /// node, so they receive gradients; a tensor that requires grad and is
  /// neither an input nor listed here is refused in backward. The default
  /// implementation ignores the list: it needs none.
  TORCH_ARG(std::vector<torch::Tensor>, parameters) = {};
};

namespace detail {
std::vector<torch::Tensor> checkpoint_segment(
    const SegmentFn& fn,
    const std::vector<torch::Tensor>& inputs,
    const CheckpointOptions& options);
std::vector<torch::Tensor> checkpoint_reentrant(
    const SegmentFn& fn,
    const std::vector<torch::Tensor>& inputs,
    const CheckpointOptions& options);
std::vector<torch::Tensor> checkpoint_with_hooks(
    const SegmentFn& fn,
    const std::vector<torch::Tensor>& inputs,
    const CheckpointOptions& options);
} // namespace detail

/// Runs `fn(inputs)` as a checkpointed segment and returns its outputs.
/// `fn` is anything callable as a SegmentFn (a lambda, a std::function); it is
/// kept, as a copy, until backward, so what it captures by reference must
/// live that long. Under NoGradGuard it just calls `fn` (nothing would be
/// saved anyway), and so does the reentrant implementation when neither
/// inputs nor parameters require grad.
//
// A template rather than a `const SegmentFn&` parameter: with the latter,
// overload resolution for `checkpoint(module, ...)` would try to convert the
// module holder to std::function, and ModuleHolder::operator()'s return type
// is not SFINAE-friendly, so every call of the module overload failed to
// compile.
template <
    typename Fn,
    typename = std::enable_if_t<!torch::detail::is_module_holder<Fn>::value>>
std::vector<torch::Tensor> checkpoint(
    Fn&& fn,
    const std::vector<torch::Tensor>& inputs,
    const CheckpointOptions& options = {}) {
  return detail::checkpoint_segment(
      SegmentFn(std::forward<Fn>(fn)), inputs, options);
}

/// How many checkpointed segments have been recomputed in this process
/// (a count; tests and benchmarks use it to see that recompute happened).
/// Kernels that recompute inside their own backward, such as
/// remat::nn::checkpointed_attention, count themselves with count_recompute().
int64_t recompute_count();

/// Adds one to recompute_count(): for a custom autograd function that keeps
/// its inputs and recomputes in backward instead of calling checkpoint().
void count_recompute();

/// Autograd nodes (ops that record history) that early stop did not re-run,
/// over every recompute in this process: a count. A segment's recompute
/// stops after the last op whose tensor forward saved; the ops after it (a
/// residual add, a scale, a view) are skipped.
int64_t early_stop_skipped_nodes();

/// Ops that recomputes skipped because an op policy kept their outputs
/// (CheckpointOptions::op_policy), over this process: a count.
int64_t op_policy_skipped_ops();

namespace detail {

inline std::vector<torch::Tensor> as_tensors(torch::Tensor t) {
  return {std::move(t)};
}
inline std::vector<torch::Tensor> as_tensors(std::vector<torch::Tensor> v) {
  return v;
}
template <typename... Ts>
std::vector<torch::Tensor> as_tensors(std::tuple<Ts...> t) {
  return std::apply(
      [](auto&&... x) { return std::vector<torch::Tensor>{x...}; }, t);
}

template <typename M, size_t... I>
auto call_forward(M& module, const std::vector<torch::Tensor>& in,
                  std::index_sequence<I...>) {
  return module->forward(in[I]...);
}

template <typename M, typename Seq, typename = void>
struct ForwardArity : std::false_type {};
template <typename M, size_t... I>
struct ForwardArity<
    M,
    std::index_sequence<I...>,
    std::void_t<decltype(std::declval<M&>()->forward(
        (static_cast<void>(I), std::declval<torch::Tensor>())...))>>
    : std::true_type {};

// The smallest number of Tensor arguments `module->forward` accepts (<= 8).
template <typename M, size_t N = 1>
constexpr size_t forward_arity() {
  if constexpr (ForwardArity<M, std::make_index_sequence<N>>::value) {
    return N;
  } else {
    static_assert(N < 8, "remat::checkpoint(module, ...): forward must take "
                         "1 to 8 tensors; use the SegmentFn overload");
    return forward_arity<M, N + 1>();
  }
}

} // namespace detail

/// Checkpoints `module->forward(inputs[0], ..., inputs[N-1])`, where N is the
/// number of tensors `forward` takes (1 to 8). The segment keeps a copy of
/// the holder until backward; the module's parameters are listed for the
/// reentrant implementation. Returns what `forward` returns if that is a Tensor, else a
/// std::vector<Tensor> of its outputs.
template <
    typename ModuleHolder,
    typename = decltype(std::declval<ModuleHolder&>()->parameters())>
auto checkpoint(
    ModuleHolder& module,
    const std::vector<torch::Tensor>& inputs,
    CheckpointOptions options = {}) {
  constexpr size_t n = detail::forward_arity<ModuleHolder>();
  TORCH_CHECK(
      inputs.size() == n,
      "remat::checkpoint: expected ", n, " input tensors for this module's "
      "forward, but got ", inputs.size());
  auto params = module->parameters();
  auto& extra = options.parameters();
  params.insert(params.end(), extra.begin(), extra.end());
  options.parameters(std::move(params));
  // A copy of the holder (a shared pointer), not a reference: the recompute
  // runs in backward, when the caller's holder may be gone.
  auto fn = [module](const std::vector<torch::Tensor>& in) mutable {
    return detail::as_tensors(
        detail::call_forward(module, in, std::make_index_sequence<n>{}));
  };
  using Result = decltype(detail::call_forward(
      module, inputs, std::make_index_sequence<n>{}));
  auto out = detail::checkpoint_segment(fn, inputs, options);
  if constexpr (std::is_same_v<std::decay_t<Result>, torch::Tensor>) {
    return out.at(0);
  } else {
    return out;
  }
}

} // namespace remat
