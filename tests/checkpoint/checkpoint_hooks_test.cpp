// remat::checkpoint on saved-tensor hooks (the default): what it does that
// the reentrant one cannot. Closures over tensors nobody listed, early stop,
// double backward, recompute on another thread, and the value check.
// tests/checkpoint/checkpoint_test.cpp runs the rest under both.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "remat/checkpoint.h"
#include "remat/memory.h"
#include "testing.h"

#include <ATen/CPUGeneratorImpl.h>

#include <thread>
#include <vector>

namespace {

using torch::Tensor;
using Tensors = std::vector<Tensor>;
using remat::CheckpointImpl;
using remat::CheckpointOptions;
using remat::DeterminismCheck;

class CheckpointHooksTest : public ::testing::Test {
 protected:
  CheckpointHooksTest() {
    torch::manual_seed(0);
  }
};

void expect_all_equal(const Tensors& a, const Tensors& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(torch::equal(a[i], b[i])) << "tensor " << i << " differs";
  }
}

TEST_F(CheckpointHooksTest, IsTheDefault) {
  EXPECT_EQ(CheckpointOptions().implementation(), CheckpointImpl::kSavedTensorHooks);
  EXPECT_EQ(CheckpointOptions().determinism_check(), DeterminismCheck::kMetadata);
  {
    remat::CheckpointDefaultsGuard reentrant({CheckpointImpl::kReentrant, DeterminismCheck::kNone});
    EXPECT_EQ(CheckpointOptions().implementation(), CheckpointImpl::kReentrant);
    EXPECT_EQ(CheckpointOptions().determinism_check(), DeterminismCheck::kNone);
  }
  EXPECT_EQ(CheckpointOptions().implementation(), CheckpointImpl::kSavedTensorHooks);
}

// A module's weights, a table with history made outside the segment (a tied
// weight's transpose), and a buffer: none listed, all reached.
TEST_F(CheckpointHooksTest, ClosureOverTensorsItWasNotGiven) {
  torch::nn::Linear fc(8, 8);
  auto base = torch::randn({8, 8}).requires_grad_();
  auto x = torch::randn({4, 8}).requires_grad_();
  auto scale = torch::rand({8}); // a buffer: no grad
  auto run = [&](bool use_checkpoint) {
    auto tied = base.t() * 0.5; // history outside the segment
    auto fn = [&, tied](const Tensors& in) {
      auto h = torch::gelu(fc(in[0])) * scale;
      return Tensors{torch::tanh(torch::matmul(h, tied))};
    };
    auto out = use_checkpoint ? remat::checkpoint(fn, {x}, CheckpointOptions().name("closure"))[0]
                              : fn({x})[0];
    return torch::autograd::grad(
        {out.pow(2).sum()}, {x, fc->weight, fc->bias, base});
  };
  const int64_t before = remat::recompute_count();
  auto plain = run(false);
  auto ckpt = run(true);
  EXPECT_EQ(remat::recompute_count(), before + 1);
  expect_all_equal(plain, ckpt);
}

// The reentrant implementation refuses the same closure in backward.
TEST_F(CheckpointHooksTest, ReentrantRefusesWhatHooksAccept) {
  torch::nn::Linear fc(8, 8);
  auto x = torch::randn({4, 8}).requires_grad_();
  auto fn = [&](const Tensors& in) { return Tensors{fc(in[0])}; };
  auto out = remat::checkpoint(
      fn, {x}, CheckpointOptions().implementation(CheckpointImpl::kReentrant))[0];
  EXPECT_THROW_WITH(out.sum().backward(), "CheckpointOptions::parameters");
  auto hooked = remat::checkpoint(fn, {x})[0];
  hooked.sum().backward();
  EXPECT_TRUE(fc->weight.grad().defined());
}

// tanh saves its output last; the three ops after it save nothing, so the
// recompute stops before them.
TEST_F(CheckpointHooksTest, EarlyStopSkipsTheTail) {
  auto w = torch::randn({8, 8}).requires_grad_();
  auto x = torch::randn({4, 8}).requires_grad_();
  int tails = 0;
  auto fn = [&](const Tensors& in) {
    auto h = torch::tanh(torch::matmul(in[0], w)); // mm saves x and w; tanh its output
    h = (h + 1) * 3;                                // add, mul by a scalar: nothing saved
    h = h.reshape({2, 16});                         // a view: nothing saved
    ++tails;
    return Tensors{h};
  };
  auto plain = torch::autograd::grad({fn({x})[0].pow(2).sum()}, {x, w});

  for (bool early : {true, false}) {
    SCOPED_TRACE(early ? "early stop" : "no early stop");
    tails = 0;
    const int64_t skipped = remat::early_stop_skipped_nodes();
    auto out = remat::checkpoint(fn, {x}, CheckpointOptions().early_stop(early))[0];
    auto ckpt = torch::autograd::grad({out.pow(2).sum()}, {x, w});
    expect_all_equal(plain, ckpt);
    EXPECT_EQ(tails, early ? 1 : 2) << "the recompute reached the end of fn";
    EXPECT_EQ(remat::early_stop_skipped_nodes() - skipped, early ? 3 : 0);
  }
}

TEST_F(CheckpointHooksTest, DoubleBackward) {
  auto w = torch::randn({6, 6}).requires_grad_();
  auto x = torch::randn({3, 6}).requires_grad_();
  auto fn = [&](const Tensors& in) {
    return Tensors{torch::tanh(torch::matmul(in[0], w)).pow(3)};
  };
  auto second_order = [&](const Tensor& out) {
    auto g = torch::autograd::grad(
        {out.sum()}, {x, w}, {}, /*retain_graph=*/true, /*create_graph=*/true);
    return torch::autograd::grad({g[0].pow(2).sum() + g[1].pow(2).sum()}, {x, w});
  };
  auto plain = second_order(fn({x})[0]);
  auto ckpt = second_order(remat::checkpoint(fn, {x})[0]);
  expect_all_equal(plain, ckpt);
}

TEST_F(CheckpointHooksTest, NestedThreeDeep) {
  std::vector<torch::nn::Linear> layers;
  for (int i = 0; i < 3; ++i) {
    layers.emplace_back(8, 8);
  }
  auto x = torch::randn({4, 8}).requires_grad_();
  std::function<Tensor(const Tensor&, int, bool)> body = [&](const Tensor& h, int depth, bool ckpt) {
    auto y = torch::gelu(layers[depth](h));
    if (depth + 1 == 3) {
      return y;
    }
    if (!ckpt) {
      return body(y, depth + 1, false);
    }
    return remat::checkpoint(
        [&, depth](const Tensors& in) { return Tensors{body(in[0], depth + 1, true)}; },
        {y}, CheckpointOptions().name("depth" + std::to_string(depth + 1)))[0];
  };
  Tensors wrt{x};
  for (auto& l : layers) {
    wrt.push_back(l->weight);
  }
  auto plain = torch::autograd::grad({body(x, 0, false).pow(2).sum()}, wrt);
  auto out = remat::checkpoint(
      [&](const Tensors& in) { return Tensors{body(in[0], 0, true)}; }, {x})[0];
  expect_all_equal(plain, torch::autograd::grad({out.pow(2).sum()}, wrt));
}

// Forward on this thread; backward, and so the recompute, on others.
TEST_F(CheckpointHooksTest, RecomputesOnTheThreadThatRunsBackward) {
  torch::nn::Linear fc(8, 8);
  auto fn = [&](const Tensors& in) { return Tensors{torch::tanh(fc(in[0]))}; };
  Tensors xs, plain, outs;
  for (int i = 0; i < 4; ++i) {
    xs.push_back(torch::randn({4, 8}).requires_grad_());
    plain.push_back(torch::autograd::grad({fn({xs[i]})[0].sum()}, {xs[i]})[0]);
    outs.push_back(remat::checkpoint(fn, {xs[i]})[0]);
  }
  const int64_t before = remat::recompute_count();
  Tensors grads(outs.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < outs.size(); ++i) {
    threads.emplace_back([&, i] {
      grads[i] = torch::autograd::grad({outs[i].sum()}, {xs[i]})[0];
    });
  }
  for (auto& t : threads) {
    t.join();
  }
  EXPECT_EQ(remat::recompute_count(), before + 4);
  expect_all_equal(plain, grads);
}

// A generator the checkpoint does not know (not the default one) draws
// other numbers in the recompute. The metadata check passes and the
// gradient is silently wrong; the value check names the segment and tensor.
TEST_F(CheckpointHooksTest, ValueCheckCatchesAnUnseededDraw) {
  auto x = torch::randn({4, 8}).requires_grad_();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(42);
  auto fn = [&](const Tensors& in) {
    auto noise = torch::randn({4, 8}, gen);
    return Tensors{torch::tanh(in[0] * noise)};
  };
  auto metadata = remat::checkpoint(fn, {x}, CheckpointOptions().name("noisy"))[0];
  auto silent = torch::autograd::grad({metadata.sum()}, {x})[0];
  EXPECT_TRUE(silent.defined()) << "the metadata check sees equal shapes";

  auto values = remat::checkpoint(
      fn, {x}, CheckpointOptions().name("noisy").determinism_check(DeterminismCheck::kValues))[0];
  const std::string message =
      remat_test::thrown_message([&] { torch::autograd::grad({values.sum()}, {x}); });
  EXPECT_NE(message.find("segment 'noisy'"), std::string::npos) << message;
  EXPECT_NE(message.find("with other values than its forward"), std::string::npos) << message;
  // mul saves its other factor (the noise, a leaf): tensor 0 of 2.
  EXPECT_NE(message.find("saved tensor 0 of 2 (a leaf, [4, 8] Float on cpu)"), std::string::npos)
      << message;
}

// Forward changes state the segment reads (a step counter): the recompute
// sees the new value.
TEST_F(CheckpointHooksTest, ValueCheckCatchesStateForwardMutated) {
  auto w = torch::randn({8, 8}).requires_grad_();
  auto x = torch::randn({4, 8}).requires_grad_();
  auto step = torch::zeros({1});
  auto fn = [&](const Tensors& in) {
    step.add_(1);
    auto h = torch::matmul(in[0], w);
    return Tensors{torch::sigmoid(h * step)};
  };
  auto out = remat::checkpoint(
      fn, {x}, CheckpointOptions().name("counter").determinism_check(DeterminismCheck::kValues))[0];
  EXPECT_THROW_WITH(torch::autograd::grad({out.sum()}, {x, w}), "segment 'counter' recomputed saved tensor");
}

TEST_F(CheckpointHooksTest, ValueCheckPassesADeterministicSegmentWithDropout) {
  auto w = torch::randn({8, 8}).requires_grad_();
  auto x = torch::randn({4, 8}).requires_grad_();
  auto fn = [&](const Tensors& in) {
    return Tensors{torch::dropout(torch::gelu(torch::matmul(in[0], w)), 0.5, true)};
  };
  torch::manual_seed(9);
  auto plain = torch::autograd::grad({fn({x})[0].pow(2).sum()}, {x, w});
  torch::manual_seed(9);
  auto out = remat::checkpoint(
      fn, {x}, CheckpointOptions().determinism_check(DeterminismCheck::kValues))[0];
  expect_all_equal(plain, torch::autograd::grad({out.pow(2).sum()}, {x, w}));
}

TEST_F(CheckpointHooksTest, MetadataCheckNamesTheTensorThatChangedShape) {
  auto x = torch::randn({4, 8}).requires_grad_();
  int calls = 0;
  auto out = remat::checkpoint(
      [&](const Tensors& in) {
        ++calls;
        auto h = calls == 1 ? in[0] : in[0].narrow(0, 0, 2);
        return Tensors{torch::tanh(h).sum(0)};
      },
      {x}, CheckpointOptions().name("shifty"))[0];
  const std::string message = remat_test::thrown_message([&] { out.sum().backward(); });
  EXPECT_NE(message.find("segment 'shifty' recomputed saved tensor 0 of 1"), std::string::npos)
      << message;
  EXPECT_NE(message.find("TanhBackward"), std::string::npos) << message;
  EXPECT_NE(message.find("[2, 8]"), std::string::npos) << message;
}

TEST_F(CheckpointHooksTest, RecomputeThatSavesLessIsRefused) {
  auto x = torch::randn({4, 8}).requires_grad_();
  int calls = 0;
  auto out = remat::checkpoint(
      [&](const Tensors& in) {
        ++calls;
        auto h = torch::tanh(in[0]);
        return Tensors{calls == 1 ? torch::exp(h) : h * 2};
      },
      {x}, CheckpointOptions().name("fewer"))[0];
  EXPECT_THROW_WITH(out.sum().backward(), "segment 'fewer' saved 1 tensors in its recompute but 2 in its forward");
}

TEST_F(CheckpointHooksTest, ValuesCheckIsRefusedByTheReentrantImplementation) {
  auto x = torch::randn({2, 2}).requires_grad_();
  EXPECT_THROW_WITH(
      remat::checkpoint(
          [](const Tensors& in) { return in; }, {x},
          CheckpointOptions()
              .implementation(CheckpointImpl::kReentrant)
              .determinism_check(DeterminismCheck::kValues)),
      "value fingerprints need kSavedTensorHooks");
}

// Tensors saved in forward are not kept: after forward the segment holds
// its input (kept by the caller anyway), its output and a few bytes per saved
// tensor; a plain forward holds every saved activation.
TEST_F(CheckpointHooksTest, ForwardKeepsNoSavedTensor) {
  ASSERT_TRUE(remat::memory::installed());
  auto w = torch::randn({256, 256}).requires_grad_();
  auto x = torch::randn({128, 256}).requires_grad_();
  auto fn = [&](const Tensors& in) {
    auto h = torch::tanh(torch::matmul(in[0], w));      // 128 KiB saved by tanh
    h = torch::gelu(torch::matmul(h, w));               // mm saves h; gelu its input
    return Tensors{torch::sigmoid(torch::matmul(h, w))}; // and so on
  };
  auto held = [&](bool use_checkpoint) {
    const auto before = remat::memory::current_bytes();
    auto out = use_checkpoint ? remat::checkpoint(fn, {x})[0] : fn({x})[0];
    const auto bytes = remat::memory::current_bytes() - before;
    out.sum().backward();
    return bytes;
  };
  const int64_t activation = 128 * 256 * 4;
  const auto plain = held(false);
  const auto checkpointed = held(true);
  EXPECT_GE(plain, 4 * activation) << plain; // tanh, mm, gelu and sigmoid outputs
  // The output (what the caller holds) and the bookkeeping.
  EXPECT_LT(checkpointed, activation + 16 * 1024) << checkpointed;
}

} // namespace
