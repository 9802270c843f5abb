// Saved-tensor hooks for LibTorch: the C++ counterpart of Python's
// torch.autograd.graph.saved_tensors_hooks.
//
// Autograd keeps, for backward, some of the tensors an op reads or returns
// (a matmul keeps both operands, tanh its output). Inside a
// SavedTensorHooksGuard every such tensor goes through `pack` as it is saved,
// and autograd keeps only what `pack` returns; when backward needs the tensor
// it calls `unpack` on that value. What a pack returns can be anything: the
// tensor itself, a bf16 copy, a host copy, or a handle to recompute it from
// (remat::checkpoint is built this way).
//
//   - Scopes nest; the innermost applies.
//   - The hooks are bound to each tensor when it is packed. `unpack` runs on
//     whatever thread backward runs it on (autograd's device threads on
//     CUDA), long after the guard is gone; it must not rely on thread-local
//     state.
//   - A scope covers the tensors saved by ops on the thread that opened it.
//     `pack` runs with grad mode off, so ops inside it save nothing.
//   - Wrapped numbers (a Python-style scalar turned into a 0-d tensor) are
//     never packed, as in PyTorch.
//   - Saved tensors are not version-checked through hooks (PyTorch does the
//     same): an in-place change of a packed tensor after it was packed is
//     not caught by autograd.
//
// How it works. LibTorch keeps Python's hooks as Python objects only; its
// C++ route is the autograd engine, which every SavedVariable asks for
// default hooks (Engine::get_default_saved_variable_hooks, a virtual). remat
// installs an Engine subclass that answers with the hooks of the innermost
// guard, once, when the library loads; it runs backward exactly as the base
// engine does. docs/saved_tensor_hooks.md has the details.
//
// Limits, each refused with one error naming it when a guard opens (see
// saved_tensor_hooks_unavailable()):
//   - PyTorch's Python module loaded in the same process replaces the engine
//     with its own (before remat loads, or after it): then no C++ hooks;
//   - an engine that had started its device threads before remat loaded
//     (a CUDA backward before remat was dlopen()ed) is not replaced;
//   - compiled autograd (torch.compile's, Python only) refuses these hooks
//     itself ("Compiled Autograd only supports python saved tensor hooks").
//
// Example (keep saved float32 tensors as bfloat16):
//   // given: torch::nn::Linear model(256, 256);
//   // given: torch::Tensor x = torch::randn({8, 256});
//   torch::Tensor loss;
//   {
//     remat::SavedTensorHooksGuard bf16(
//         [](const torch::Tensor& t) -> std::any {
//           return t.is_floating_point() ? t.to(torch::kBFloat16) : t;
//         },
//         [](const std::any& packed) {
//           return std::any_cast<torch::Tensor>(packed).to(torch::kFloat);
//         });
//     loss = model->forward(x).sum();
//   }
//   loss.backward();   // unpacks through the lambdas above
#pragma once

#include <torch/types.h>

#include <any>
#include <functional>
#include <memory>
#include <optional>
#include <string>

namespace remat {

/// A pack/unpack pair. Subclass it for hooks with state of their own; the
/// function pair of SavedTensorHooksGuard is the short form.
class SavedTensorHooks {
 public:
  virtual ~SavedTensorHooks() = default;
  /// Called in forward, with grad mode off, for each tensor autograd saves
  /// in the scope. Returns what autograd keeps instead of the tensor.
  virtual std::any pack(const torch::Tensor& tensor) = 0;
  /// Called in backward, on any thread, with what `pack` returned; returns a
  /// tensor equal in shape, dtype and device to the packed one. May be
  /// called more than once for one pack (retain_graph).
  virtual torch::Tensor unpack(const std::any& packed) = 0;
};

using PackHook = std::function<std::any(const torch::Tensor&)>;
using UnpackHook = std::function<torch::Tensor(const std::any&)>;

/// Installs hooks for every tensor autograd saves on this thread during the
/// guard's lifetime. Guards nest and must be destroyed in reverse order of
/// construction (they are scopes).
class SavedTensorHooksGuard {
 public:
  explicit SavedTensorHooksGuard(std::shared_ptr<SavedTensorHooks> hooks);
  SavedTensorHooksGuard(PackHook pack, UnpackHook unpack);
  ~SavedTensorHooksGuard();
  SavedTensorHooksGuard(const SavedTensorHooksGuard&) = delete;
  SavedTensorHooksGuard& operator=(const SavedTensorHooksGuard&) = delete;

 private:
  SavedTensorHooks* hooks_;
};

/// Why saved-tensor hooks cannot work in this process (another autograd
/// engine is the default: PyTorch's Python one, or one started before remat
/// loaded), or nothing when they can. A guard throws this reason.
std::optional<std::string> saved_tensor_hooks_unavailable();

/// Hooks of the innermost guard open on this thread, or null.
SavedTensorHooks* current_saved_tensor_hooks();

} // namespace remat
