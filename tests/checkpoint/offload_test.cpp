// Offloaded saved activations (remat/offload.h). On the CPU the mechanism
// is tested where its bytes can be counted: the tensors leave LibTorch's
// allocator (remat::memory's count) in forward and come back equal. The CUDA
// path (pinned host memory, side stream, prefetch) needs a GPU.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "remat/memory.h"
#include "remat/offload.h"
#include "testing.h"

#include <vector>

namespace {

using torch::Tensor;
using Tensors = std::vector<Tensor>;

struct Run {
  Tensors grads;
  int64_t held = 0; ///< bytes the forward left allocated on the device
};

// An MLP's forward under `hooks` (or none), then its backward.
Run mlp_step(torch::nn::Sequential& mlp, const Tensor& x,
             const std::shared_ptr<remat::OffloadHooks>& hooks) {
  Run r;
  mlp->zero_grad(true);
  const auto device = x.device();
  const auto before = remat::memory::current_bytes(device);
  Tensor loss;
  {
    std::optional<remat::SavedTensorHooksGuard> guard;
    if (hooks) {
      guard.emplace(hooks);
    }
    loss = mlp->forward(x).pow(2).sum();
  }
  r.held = remat::memory::current_bytes(device) - before;
  loss.backward();
  for (const auto& p : mlp->parameters()) {
    r.grads.push_back(p.grad().cpu());
  }
  return r;
}

torch::nn::Sequential make_mlp() {
  torch::manual_seed(0);
  return torch::nn::Sequential(
      torch::nn::Linear(256, 1024), torch::nn::GELU(), torch::nn::Linear(1024, 1024),
      torch::nn::Tanh(), torch::nn::Linear(1024, 256));
}

TEST(OffloadTest, CpuTensorsLeaveTheCountedPoolAndComeBackEqual) {
  ASSERT_TRUE(remat::memory::installed());
  auto mlp = make_mlp();
  auto x = torch::randn({128, 256});
  const auto plain = mlp_step(mlp, x, nullptr);
  auto hooks = std::make_shared<remat::OffloadHooks>(
      remat::OffloadOptions().cpu(true).min_bytes(0));
  const auto offloaded = mlp_step(mlp, x, hooks);
  for (size_t i = 0; i < plain.grads.size(); ++i) {
    EXPECT_TRUE(torch::equal(plain.grads[i], offloaded.grads[i])) << "gradient " << i;
  }
  // Saved activations: the first product (GELU's input), GELU's output,
  // Tanh's output twice (Tanh and the third Linear both save it, and each
  // save is a copy), each 128 x 1024 floats; and the MLP's output, which
  // pow saves (128 x 256). The parameters and x (leaves) stay.
  const int64_t wide = 128 * 1024 * 4;
  const int64_t narrow = 128 * 256 * 4;
  const auto s = hooks->stats();
  EXPECT_EQ(s.tensors, 5);
  EXPECT_EQ(s.bytes_offloaded, 4 * wide + narrow);
  EXPECT_EQ(s.bytes_fetched, s.bytes_offloaded); // each came back once
  // The forward's count drops by each tensor that moved out, once.
  EXPECT_EQ(plain.held - offloaded.held, 3 * wide + narrow)
      << plain.held << " vs " << offloaded.held;
}

TEST(OffloadTest, SmallTensorsAndLeavesStay) {
  auto hooks = remat::OffloadHooks(remat::OffloadOptions().cpu(true).min_bytes(1024));
  auto leaf = torch::randn({1024}).requires_grad_();
  auto made = leaf * 2;
  auto small = made.narrow(0, 0, 8) * 1;
  EXPECT_TRUE(hooks.unpack(hooks.pack(leaf)).is_same(leaf));
  EXPECT_TRUE(hooks.unpack(hooks.pack(small)).is_same(small));
  auto back = hooks.unpack(hooks.pack(made));
  EXPECT_FALSE(back.is_same(made));
  EXPECT_TRUE(torch::equal(back, made));
  EXPECT_EQ(hooks.stats().tensors, 1);
  // Without .cpu(true), CPU tensors stay.
  remat::OffloadHooks gpu_only;
  EXPECT_TRUE(gpu_only.unpack(gpu_only.pack(made)).is_same(made));
  EXPECT_THROW_WITH(remat::OffloadHooks(remat::OffloadOptions().prefetch(-1)),
                    "expected prefetch >= 0, but got -1");
  EXPECT_THROW_WITH(remat::OffloadHooks(remat::OffloadOptions().min_bytes(-2)),
                    "expected min_bytes >= 0, but got -2");
}

// The CUDA path: activations go to pinned host memory on a side stream and
// come back ahead of use; gradients equal, device bytes after forward lower.
TEST(OffloadTest, CudaRoundTripWithPrefetch) {
  REMAT_REQUIRE_CUDA();
  auto mlp = make_mlp();
  mlp->to(torch::kCUDA);
  auto x = torch::randn({128, 256}, torch::kCUDA);
  const auto plain = mlp_step(mlp, x, nullptr);
  auto hooks = std::make_shared<remat::OffloadHooks>(remat::OffloadOptions().min_bytes(0));
  const auto offloaded = mlp_step(mlp, x, hooks);
  torch::cuda::synchronize();
  for (size_t i = 0; i < plain.grads.size(); ++i) {
    EXPECT_TRUE(torch::allclose(plain.grads[i], offloaded.grads[i], 1e-5, 1e-6)) << i;
  }
  const auto s = hooks->stats();
  EXPECT_EQ(s.tensors, 4);
  EXPECT_EQ(s.bytes_fetched, s.bytes_offloaded);
  EXPECT_GT(s.prefetched, 0);
  EXPECT_LE(offloaded.held, plain.held - s.bytes_offloaded / 2) << plain.held;
}

TEST(OffloadTest, SaysWhyCudaOffloadCannotRun) {
  const auto why = remat::cuda_offload_unavailable();
  if (remat_test::no_cuda_reason().empty()) {
    EXPECT_FALSE(why.has_value());
  } else {
    ASSERT_TRUE(why.has_value());
    EXPECT_NE(why->find("CUDA"), std::string::npos) << *why;
  }
}

} // namespace
