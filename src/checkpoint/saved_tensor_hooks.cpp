#include "remat/saved_tensor_hooks.h"

#include <c10/util/Exception.h>
#include <c10/util/Type.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/saved_variable_hooks.h>

#include <typeinfo>
#include <utility>
#include <vector>

namespace remat {
namespace {

using torch::autograd::Engine;

// The guards open on this thread, innermost last. Only the forward thread
// reads it: what a SavedVariable keeps is bound to its hooks at pack time.
thread_local std::vector<std::shared_ptr<SavedTensorHooks>> open_hooks;

// What a SavedVariable keeps: the hooks that packed it and their result.
class BoundHooks final : public torch::autograd::SavedVariableHooks {
 public:
  explicit BoundHooks(std::shared_ptr<SavedTensorHooks> hooks)
      : hooks_(std::move(hooks)) {}

  void call_pack_hook(const at::Tensor& tensor) override {
    packed_ = hooks_->pack(tensor);
  }
  at::Tensor call_unpack_hook() override {
    return hooks_->unpack(packed_);
  }

 private:
  std::shared_ptr<SavedTensorHooks> hooks_;
  std::any packed_;
};

// The base engine, unchanged, except that it answers SavedVariable's
// question for default hooks with the innermost guard's.
class HookedEngine final : public Engine {
 public:
  HookedEngine() = default;

  std::unique_ptr<torch::autograd::SavedVariableHooks>
  get_default_saved_variable_hooks() override {
    if (open_hooks.empty()) {
      return nullptr;
    }
    return std::make_unique<BoundHooks>(open_hooks.back());
  }

  // Whether `engine` has started threads for devices (CUDA), which it does
  // at its first backward on a machine with a device. A protected member of
  // the base class, read through a member pointer formed here.
  static bool has_device_threads(Engine& engine) {
    auto queues = &HookedEngine::device_ready_queues_;
    return !(engine.*queues).empty();
  }
};

// Never destroyed: autograd's device threads may outlive static destruction.
HookedEngine& hooked_engine() {
  static auto* engine = new HookedEngine();
  return *engine;
}

Engine& hooked_engine_stub() {
  return hooked_engine();
}

std::string engine_name(Engine& engine) {
  return c10::demangle(typeid(engine).name());
}

// Installs the engine once per process; returns why it was not installed,
// or an empty string.
const std::string& install_engine() {
  static const std::string refused = [] {
    Engine& current = Engine::get_default_engine();
    if (&current != &Engine::get_base_engine()) {
      return "the default autograd engine is " + engine_name(current) +
          ", not LibTorch's base engine (PyTorch's Python module installs its "
          "own when it is imported), so C++ saved-tensor hooks cannot be "
          "installed in this process";
    }
    if (HookedEngine::has_device_threads(current)) {
      return std::string(
          "the autograd engine had already run a backward on a device before "
          "remat was loaded, so its engine cannot be replaced safely; link "
          "remat into the program rather than loading it later");
    }
    hooked_engine();
    torch::autograd::set_default_engine_stub(&hooked_engine_stub);
    return std::string();
  }();
  return refused;
}

// At load time, before the program's first backward.
const bool installed_at_load = install_engine().empty();

} // namespace

std::optional<std::string> saved_tensor_hooks_unavailable() {
  (void)installed_at_load;
  const std::string& refused = install_engine();
  if (!refused.empty()) {
    return refused;
  }
  Engine& current = Engine::get_default_engine();
  if (&current != &hooked_engine()) {
    return "the default autograd engine was replaced by " +
        engine_name(current) +
        " after remat installed its own (PyTorch's Python module does this "
        "when it is imported), so C++ saved-tensor hooks cannot work in this "
        "process";
  }
  return std::nullopt;
}

SavedTensorHooksGuard::SavedTensorHooksGuard(std::shared_ptr<SavedTensorHooks> hooks)
    : hooks_(hooks.get()) {
  TORCH_CHECK(
      hooks != nullptr,
      "remat::SavedTensorHooksGuard: expected hooks, but got a null pointer");
  if (auto why = saved_tensor_hooks_unavailable()) {
    TORCH_CHECK(false, "remat::SavedTensorHooksGuard: ", *why);
  }
  open_hooks.push_back(std::move(hooks));
}

namespace {
class FunctionHooks final : public SavedTensorHooks {
 public:
  FunctionHooks(PackHook pack, UnpackHook unpack)
      : pack_(std::move(pack)), unpack_(std::move(unpack)) {}
  std::any pack(const torch::Tensor& tensor) override {
    return pack_(tensor);
  }
  torch::Tensor unpack(const std::any& packed) override {
    return unpack_(packed);
  }

 private:
  PackHook pack_;
  UnpackHook unpack_;
};

std::shared_ptr<SavedTensorHooks> function_hooks(PackHook pack, UnpackHook unpack) {
  TORCH_CHECK(
      pack && unpack,
      "remat::SavedTensorHooksGuard: expected a pack and an unpack function, "
      "but got an empty ", pack ? "unpack" : "pack", " function");
  return std::make_shared<FunctionHooks>(std::move(pack), std::move(unpack));
}
} // namespace

SavedTensorHooksGuard::SavedTensorHooksGuard(PackHook pack, UnpackHook unpack)
    : SavedTensorHooksGuard(function_hooks(std::move(pack), std::move(unpack))) {}

SavedTensorHooksGuard::~SavedTensorHooksGuard() {
  // Scopes: the innermost guard is destroyed first.
  TORCH_INTERNAL_ASSERT(
      !open_hooks.empty() && open_hooks.back().get() == hooks_,
      "remat::SavedTensorHooksGuard: guards must close in reverse order of "
      "opening");
  open_hooks.pop_back();
}

SavedTensorHooks* current_saved_tensor_hooks() {
  return open_hooks.empty() ? nullptr : open_hooks.back().get();
}

} // namespace remat
