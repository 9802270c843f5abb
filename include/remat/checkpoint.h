// Activation checkpointing for LibTorch: run a segment of the forward pass
// without keeping its intermediate tensors, and recompute them in backward.
//
// A checkpointed segment keeps only its inputs. In backward it runs again,
// with grad on, the RNG state of the first run and the same autocast state,
// and its gradients flow into the normal autograd graph:
//   - the segment's parameters are explicit inputs of the autograd node, so
//     each parameter's gradient accumulates exactly once, through the graph;
//   - torch::autograd::grad works, not only backward();
//   - an input that needs no grad (a frozen embedding's output) still gives
//     the parameters their gradients.
//
// Example (a function of tensors; `params` are the tensors it reads besides
// its inputs):
//   auto out = remat::checkpoint(
//       [&](const std::vector<torch::Tensor>& in) {
//         return std::vector<torch::Tensor>{layer->forward(in[0], in[1])};
//       },
//       {hidden, mask},
//       remat::CheckpointOptions().parameters(layer->parameters()))[0];
//
// Example (a module; its parameters are taken from it):
//   torch::nn::Linear fc(256, 256);
//   torch::Tensor y = remat::checkpoint(fc, {x});
#pragma once

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

/// Options of one checkpointed segment.
///
/// Example:
///   remat::CheckpointOptions().name("layer.3").preserve_rng_state(false)
struct CheckpointOptions {
  /// Restore the RNG state (CPU generator, and the CUDA generator of the
  /// inputs' device where built) before recomputing, so dropout draws the
  /// same masks twice.
  TORCH_ARG(bool, preserve_rng_state) = true;
  /// Check that the recompute produced outputs of the same number, shapes,
  /// dtypes and devices as the first run; an error names the segment.
  TORCH_ARG(bool, determinism_check) = true;
  /// Name used in error messages ("layer.3").
  TORCH_ARG(std::string, name) = "segment";
  /// Tensors the function reads besides its inputs (typically parameters).
  /// They become explicit inputs of the autograd node, so they receive
  /// gradients. A tensor that requires grad and is neither an input nor listed
  /// here is detected in backward and refused with an error.
  TORCH_ARG(std::vector<torch::Tensor>, parameters) = {};
};

namespace detail {
std::vector<torch::Tensor> checkpoint_segment(
    const SegmentFn& fn,
    const std::vector<torch::Tensor>& inputs,
    const CheckpointOptions& options);
} // namespace detail

/// Runs `fn(inputs)` as a checkpointed segment and returns its outputs.
/// `fn` is anything callable as a SegmentFn (a lambda, a std::function); it is
/// kept, as a copy, until backward, so what it captures by reference must
/// live that long. Under NoGradGuard, or when neither inputs nor parameters
/// require grad, it just calls `fn` (nothing would be saved anyway).
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
/// number of tensors `forward` takes (1 to 8). The module's parameters are
/// passed to autograd explicitly, and the segment keeps a copy of the holder
/// until backward. Returns what `forward` returns if that is a Tensor, else a
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
