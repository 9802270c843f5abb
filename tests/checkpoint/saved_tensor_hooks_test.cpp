// remat::SavedTensorHooksGuard: every tensor autograd saves in a scope goes
// through pack, and comes back through unpack in backward, on whatever
// thread runs it.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "remat/checkpoint.h"
#include "remat/saved_tensor_hooks.h"

#include <torch/csrc/autograd/engine.h>
#include "testing.h"

#include <atomic>
#include <thread>
#include <vector>

namespace {

using torch::Tensor;

// Counts what it packs and unpacks; keeps the tensor itself.
struct Counting : remat::SavedTensorHooks {
  std::atomic<int> packed{0};
  std::atomic<int> unpacked{0};
  std::vector<std::thread::id> unpack_threads;
  std::mutex mutex;

  std::any pack(const Tensor& t) override {
    ++packed;
    return t.detach();
  }
  Tensor unpack(const std::any& p) override {
    ++unpacked;
    std::lock_guard<std::mutex> lock(mutex);
    unpack_threads.push_back(std::this_thread::get_id());
    return std::any_cast<Tensor>(p);
  }
};

class SavedTensorHooksTest : public ::testing::Test {
 protected:
  SavedTensorHooksTest() {
    torch::manual_seed(0);
  }
};

TEST_F(SavedTensorHooksTest, AvailableInThisProcess) {
  auto why = remat::saved_tensor_hooks_unavailable();
  EXPECT_FALSE(why.has_value()) << *why;
}

// tanh(x @ w).sum(): mm saves x and w, tanh its output.
TEST_F(SavedTensorHooksTest, EverySavedTensorIsPackedAndUnpackedOnce) {
  auto x = torch::randn({4, 8}).requires_grad_();
  auto w = torch::randn({8, 3}).requires_grad_();
  auto plain = torch::autograd::grad({torch::tanh(torch::mm(x, w)).sum()}, {x, w});

  auto hooks = std::make_shared<Counting>();
  Tensor loss;
  {
    remat::SavedTensorHooksGuard guard(hooks);
    EXPECT_EQ(remat::current_saved_tensor_hooks(), hooks.get());
    loss = torch::tanh(torch::mm(x, w)).sum();
  }
  EXPECT_EQ(remat::current_saved_tensor_hooks(), nullptr);
  EXPECT_EQ(hooks->packed, 3);
  EXPECT_EQ(hooks->unpacked, 0);
  auto grads = torch::autograd::grad({loss}, {x, w});
  EXPECT_EQ(hooks->unpacked, 3);
  EXPECT_TRUE(torch::equal(grads[0], plain[0]));
  EXPECT_TRUE(torch::equal(grads[1], plain[1]));
}

TEST_F(SavedTensorHooksTest, InnermostScopeApplies) {
  auto x = torch::randn({4, 8}).requires_grad_();
  auto outer = std::make_shared<Counting>();
  auto inner = std::make_shared<Counting>();
  Tensor loss;
  {
    remat::SavedTensorHooksGuard a(outer);
    auto h = torch::tanh(x); // outer: 1
    {
      remat::SavedTensorHooksGuard b(inner);
      h = torch::sigmoid(h) * h; // inner: sigmoid's output, then both factors
    }
    loss = torch::exp(h).sum(); // outer: exp's output
  }
  EXPECT_EQ(outer->packed, 2);
  EXPECT_EQ(inner->packed, 3);
  loss.backward();
  EXPECT_EQ(outer->unpacked, 2);
  EXPECT_EQ(inner->unpacked, 3);
}

// The hooks are bound when a tensor is packed: the guard is closed and
// backward runs on other threads, which never saw it.
TEST_F(SavedTensorHooksTest, PackedOnOneThreadUnpackedOnAnother) {
  auto w = torch::randn({8, 8}).requires_grad_();
  auto hooks = std::make_shared<Counting>();
  std::vector<Tensor> losses;
  {
    remat::SavedTensorHooksGuard guard(hooks);
    for (int i = 0; i < 4; ++i) {
      losses.push_back(torch::tanh(torch::mm(torch::randn({2, 8}), w)).sum());
    }
  }
  ASSERT_EQ(hooks->packed, 8); // each: x (for w's gradient) and tanh's output
  std::vector<std::thread> threads;
  std::vector<Tensor> grads(losses.size());
  for (size_t i = 0; i < losses.size(); ++i) {
    threads.emplace_back([&, i] {
      EXPECT_EQ(remat::current_saved_tensor_hooks(), nullptr);
      grads[i] = torch::autograd::grad({losses[i]}, {w})[0];
    });
  }
  for (auto& t : threads) {
    t.join();
  }
  EXPECT_EQ(hooks->unpacked, 8);
  for (auto id : hooks->unpack_threads) {
    EXPECT_NE(id, std::this_thread::get_id());
  }
  for (const auto& g : grads) {
    EXPECT_TRUE(g.defined());
  }
}

// The short form: a bf16 store of saved float tensors.
TEST_F(SavedTensorHooksTest, FunctionPairCompressesToBfloat16) {
  auto x = torch::randn({16, 32}).requires_grad_();
  auto w = torch::randn({32, 32}).requires_grad_();
  auto plain = torch::autograd::grad({torch::tanh(torch::mm(x, w)).pow(2).sum()}, {w})[0];
  std::vector<c10::ScalarType> stored;
  Tensor loss;
  {
    remat::SavedTensorHooksGuard bf16(
        [&](const Tensor& t) -> std::any {
          auto packed = t.is_floating_point() ? t.to(torch::kBFloat16) : t;
          stored.push_back(packed.scalar_type());
          return packed;
        },
        [](const std::any& p) { return std::any_cast<Tensor>(p).to(torch::kFloat); });
    loss = torch::tanh(torch::mm(x, w)).pow(2).sum();
  }
  auto grad = torch::autograd::grad({loss}, {w})[0];
  ASSERT_FALSE(stored.empty());
  for (auto dtype : stored) {
    EXPECT_EQ(dtype, torch::kBFloat16);
  }
  EXPECT_FALSE(torch::equal(grad, plain)) << "bf16 rounds";
  const double relative = ((grad - plain).norm() / plain.norm()).item<double>();
  EXPECT_LT(relative, 0.02) << "bf16 keeps 8 bits of mantissa";
}

TEST_F(SavedTensorHooksTest, DoubleBackwardThroughHooks) {
  auto x = torch::randn({5}).requires_grad_();
  auto hooks = std::make_shared<Counting>();
  Tensor y;
  {
    remat::SavedTensorHooksGuard guard(hooks);
    y = (x * x * x).sum();
  }
  auto g = torch::autograd::grad({y}, {x}, {}, /*retain_graph=*/true, /*create_graph=*/true)[0];
  EXPECT_TRUE(torch::allclose(g, 3 * x * x));
  auto gg = torch::autograd::grad({g.sum()}, {x})[0];
  EXPECT_TRUE(torch::allclose(gg, 6 * x));
}

// What PyTorch's Python module does when it is imported: it makes its own
// engine the default. Simulated with the base engine; then restored.
torch::autograd::Engine* remat_engine = nullptr;

TEST_F(SavedTensorHooksTest, RefusedWhenAnotherEngineIsTheDefault) {
  using torch::autograd::Engine;
  remat_engine = &Engine::get_default_engine();
  ASSERT_NE(remat_engine, &Engine::get_base_engine()) << "remat's engine is installed at load";
  torch::autograd::set_default_engine_stub([]() -> Engine& { return Engine::get_base_engine(); });
  const auto why = remat::saved_tensor_hooks_unavailable();
  const std::string message = remat_test::thrown_message([] {
    remat::SavedTensorHooksGuard guard(std::make_shared<Counting>());
  });
  const std::string checkpoint = remat_test::thrown_message([] {
    auto x = torch::randn({2}).requires_grad_();
    remat::checkpoint([](const std::vector<Tensor>& in) { return std::vector<Tensor>{in[0].exp()}; },
                      {x}, remat::CheckpointOptions().name("py"));
  });
  torch::autograd::set_default_engine_stub([]() -> Engine& { return *remat_engine; });
  ASSERT_TRUE(why.has_value());
  EXPECT_NE(why->find("was replaced by torch::autograd::Engine after remat installed its own"),
            std::string::npos)
      << *why;
  EXPECT_NE(message.find("remat::SavedTensorHooksGuard: the default autograd engine was replaced"),
            std::string::npos)
      << message;
  EXPECT_NE(checkpoint.find("segment 'py' cannot use saved-tensor hooks"), std::string::npos)
      << checkpoint;
  EXPECT_NE(checkpoint.find("use CheckpointImpl::kReentrant here"), std::string::npos)
      << checkpoint;
  EXPECT_FALSE(remat::saved_tensor_hooks_unavailable().has_value()) << "restored";
}

TEST_F(SavedTensorHooksTest, EmptyHooksAreRefused) {
  EXPECT_THROW_WITH(
      remat::SavedTensorHooksGuard(std::shared_ptr<remat::SavedTensorHooks>()),
      "expected hooks, but got a null pointer");
  EXPECT_THROW_WITH(
      remat::SavedTensorHooksGuard(
          remat::PackHook(), [](const std::any&) { return Tensor(); }),
      "but got an empty pack function");
}

// An error in pack reaches the op that saved, as PyTorch's does.
TEST_F(SavedTensorHooksTest, ErrorInPackPropagates) {
  auto x = torch::randn({3}).requires_grad_();
  remat::SavedTensorHooksGuard guard(
      [](const Tensor&) -> std::any {
        TORCH_CHECK(false, "pack refused this tensor");
        return {};
      },
      [](const std::any&) { return Tensor(); });
  EXPECT_THROW_WITH(torch::tanh(x), "pack refused this tensor");
}

} // namespace
