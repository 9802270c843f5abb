// GradReducer: gradients packed into flat buckets, summed across the group.
#include "remat/distributed/data_parallel.h"

#include "compat/torch.h"

#include <c10/util/Exception.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/nn/module.h>
#include <torch/torch.h>

#include <algorithm>
#include <exception>
#include <mutex>
#include <string>

namespace remat {
namespace dist {

// What one step's all-reduces have reached; shared with the hooks, which
// hold it weakly (a hook that outlives its reducer does nothing).
struct GradReducer::State {
  std::shared_ptr<ProcessGroup> group;
  std::vector<torch::Tensor> params;
  GradReducerOptions options;
  std::vector<std::vector<size_t>> buckets;
  std::vector<size_t> bucket_of; ///< parameter -> bucket
  /// The accumulators carry the hooks; autograd caches them only weakly.
  std::vector<compat::GradAccumulatorPtr> accumulators;
  std::vector<uintptr_t> hook_keys;

  // The step so far, guarded by `mutex` (hooks run on autograd's threads).
  std::mutex mutex;
  bool sync = false;        ///< the current backward starts ready buckets
  std::vector<char> ready;  ///< per parameter: its hook ran in a synced backward
  std::vector<size_t> missing; ///< per bucket: parameters not ready yet
  size_t next_bucket = 0;   ///< buckets [0, next_bucket) have been started
  std::vector<char> dirty;  ///< per bucket: a gradient changed after its start
  std::vector<torch::Tensor> flats;
  std::vector<Pending> pending;
  GradReducerStats current;
  GradReducerStats last;
  std::string error; ///< the first failure in a hook, rethrown by reduce()

  struct Hook : torch::autograd::FunctionPostHook {
    Hook(std::weak_ptr<State> state, size_t index) : state(std::move(state)), index(index) {}
    // `inputs` is the incoming gradient; it is undefined when none reached
    // .grad (a checkpointed segment's unused parameter).
    torch::autograd::variable_list operator()(
        const torch::autograd::variable_list& outputs,
        const torch::autograd::variable_list& inputs) override {
      if (auto s = state.lock()) {
        s->on_accumulated(index, inputs.empty() || inputs[0].defined());
      }
      return outputs;
    }
    std::weak_ptr<State> state;
    size_t index;
  };

  void reset() {
    sync = false;
    std::fill(ready.begin(), ready.end(), 0);
    for (size_t b = 0; b < buckets.size(); ++b) {
      missing[b] = buckets[b].size();
    }
    next_bucket = 0;
    std::fill(dirty.begin(), dirty.end(), 0);
    flats.assign(buckets.size(), torch::Tensor());
    pending.assign(buckets.size(), Pending());
    current = GradReducerStats();
    error.clear();
  }

  // The bucket's gradients as one flat tensor; undefined ones are zeros.
  torch::Tensor pack(size_t b) const {
    std::vector<torch::Tensor> pieces;
    pieces.reserve(buckets[b].size());
    for (size_t k : buckets[b]) {
      const auto& p = params[k];
      const auto& g = p.grad();
      TORCH_CHECK(
          !g.defined() || g.layout() == torch::kStrided,
          "GradReducer: expected dense gradients, but parameter ", k, " has a ", g.layout(),
          " one");
      pieces.push_back(g.defined() ? g.reshape({-1}) : torch::zeros({p.numel()}, p.options()));
    }
    return torch::cat(pieces);
  }

  // Caller holds `mutex`.
  void launch(size_t b, bool in_backward) {
    flats[b] = pack(b);
    pending[b] = group->all_reduce_sum_async({flats[b]});
    const int64_t bytes = flats[b].numel() * static_cast<int64_t>(flats[b].element_size());
    (in_backward ? current.bytes_in_backward : current.bytes_in_reduce) += bytes;
  }

  // A hook: parameter k's accumulator ran. Never throws (autograd's thread
  // would end the process); a failure waits for reduce().
  void on_accumulated(size_t k, bool accumulated) noexcept {
    std::lock_guard<std::mutex> lock(mutex);
    if (!error.empty()) {
      return;
    }
    try {
      torch::NoGradGuard no_grad;
      const size_t b = bucket_of[k];
      if (b < next_bucket) {
        // Started with the gradient as it was then: redo it in reduce().
        dirty[b] = dirty[b] || accumulated;
        return;
      }
      if (!sync || ready[k]) {
        return;
      }
      ready[k] = 1;
      --missing[b];
      // In bucket order, so that every rank issues the same collectives.
      while (next_bucket < buckets.size() && missing[next_bucket] == 0) {
        launch(next_bucket++, /*in_backward=*/true);
      }
    } catch (const c10::Error& e) {
      error = e.what_without_backtrace();
    } catch (const std::exception& e) {
      error = e.what();
    } catch (...) {
      error = "unknown exception";
    }
  }
};

GradReducer::GradReducer(
    std::shared_ptr<ProcessGroup> group,
    std::vector<torch::Tensor> params,
    GradReducerOptions options)
    : state_(std::make_shared<State>()) {
  auto& s = *state_;
  s.group = std::move(group);
  s.params = std::move(params);
  s.options = options;
  TORCH_CHECK(s.group != nullptr, "GradReducer: expected a process group, but got none");
  TORCH_CHECK(
      options.bucket_bytes() >= 1, "bucket_bytes: expected a value >= 1, but got ",
      options.bucket_bytes());
  // A bucket holds one dtype; a new one starts when the next parameter
  // would take it past bucket_bytes.
  std::vector<size_t> current;
  int64_t bytes = 0;
  for (size_t k = s.params.size(); k-- > 0;) {
    const auto& p = s.params[k];
    TORCH_CHECK(p.defined(), "GradReducer: parameter ", k, " is undefined");
    const int64_t b = p.numel() * static_cast<int64_t>(p.element_size());
    if (!current.empty() &&
        (bytes + b > options.bucket_bytes() ||
         s.params[current.front()].scalar_type() != p.scalar_type())) {
      s.buckets.push_back(std::move(current));
      current.clear();
      bytes = 0;
    }
    current.push_back(k);
    bytes += b;
  }
  if (!current.empty()) {
    s.buckets.push_back(std::move(current));
  }
  s.bucket_of.resize(s.params.size());
  for (size_t b = 0; b < s.buckets.size(); ++b) {
    for (size_t k : s.buckets[b]) {
      s.bucket_of[k] = b;
    }
  }
  s.ready.resize(s.params.size());
  s.missing.resize(s.buckets.size());
  s.dirty.resize(s.buckets.size());
  s.reset();
  s.accumulators.resize(s.params.size());
  s.hook_keys.resize(s.params.size());
  if (!options.overlap()) {
    return;
  }
  for (size_t k = 0; k < s.params.size(); ++k) {
    const auto& p = s.params[k];
    if (!p.is_leaf() || !p.requires_grad()) {
      continue; // no accumulator: its bucket starts in reduce()
    }
    s.accumulators[k] = torch::autograd::impl::grad_accumulator(p);
    if (s.accumulators[k]) {
      s.hook_keys[k] = s.accumulators[k]->add_post_hook(
          std::make_unique<State::Hook>(std::weak_ptr<State>(state_), k));
    }
  }
}

GradReducer::~GradReducer() {
  auto& s = *state_;
  for (size_t k = 0; k < s.accumulators.size(); ++k) {
    if (s.accumulators[k]) {
      s.accumulators[k]->del_post_hook(s.hook_keys[k]);
    }
  }
}

const std::vector<std::vector<size_t>>& GradReducer::buckets() const {
  return state_->buckets;
}

GradReducerStats GradReducer::stats() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->last;
}

void GradReducer::prepare_for_backward(bool sync) {
  auto& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  s.sync = sync && s.options.overlap();
}

void GradReducer::reduce() {
  auto& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  // Whatever happens, the next step starts afresh.
  struct Reset {
    State& s;
    ~Reset() {
      s.last = s.current;
      s.reset();
    }
  } reset{s};
  TORCH_CHECK(s.error.empty(), "GradReducer: a gradient hook failed during backward: ", s.error);
  torch::NoGradGuard no_grad;
  const size_t n = s.params.size();
  const size_t nb = s.buckets.size();
  for (; s.next_bucket < nb; ++s.next_bucket) {
    s.launch(s.next_bucket, /*in_backward=*/false);
  }
  // After the buckets, in the same place on every rank: which parameters
  // have a gradient on some rank (one that none has keeps none: the
  // optimizer then skips it, as it would in one process), and which
  // buckets some rank must redo.
  auto flags = torch::zeros({static_cast<int64_t>(n + nb)});
  auto* f = flags.data_ptr<float>();
  for (size_t k = 0; k < n; ++k) {
    f[k] = s.params[k].grad().defined() ? 1.0f : 0.0f;
  }
  for (size_t b = 0; b < nb; ++b) {
    f[n + b] = s.dirty[b] ? 1.0f : 0.0f;
  }
  s.group->all_reduce_sum_async({flags}).wait();
  for (auto& p : s.pending) {
    p.wait();
  }
  for (size_t b = 0; b < nb; ++b) {
    if (f[n + b] != 0.0f) {
      s.launch(b, /*in_backward=*/false);
      ++s.current.buckets_redone;
    }
  }
  const double scale = s.options.average() ? 1.0 / static_cast<double>(s.group->world_size()) : 1.0;
  for (size_t b = 0; b < nb; ++b) {
    s.pending[b].wait();
    auto& flat = s.flats[b];
    if (scale != 1.0) {
      flat.mul_(scale);
    }
    int64_t offset = 0;
    for (size_t k : s.buckets[b]) {
      auto& p = s.params[k];
      auto piece = flat.narrow(0, offset, p.numel()).view(p.sizes());
      offset += p.numel();
      if (f[k] == 0.0f) {
        continue;
      }
      if (p.grad().defined()) {
        p.mutable_grad().copy_(piece);
      } else {
        p.mutable_grad() = piece.clone();
      }
    }
  }
}

void broadcast_parameters(ProcessGroup& group, torch::nn::Module& module, int64_t root) {
  if (group.world_size() == 1) {
    return;
  }
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> tensors;
  for (const auto& p : module.parameters()) {
    tensors.push_back(p.detach());
  }
  for (const auto& b : module.buffers()) {
    tensors.push_back(b.detach());
  }
  group.broadcast(tensors, root);
}

} // namespace dist
} // namespace remat
