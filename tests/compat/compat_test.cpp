// One test per difference between LibTorch 1.13 and 2.x that
// src/compat/torch.h hides: each runs on both, and checks the behaviour the
// rest of the library relies on, not only that the code compiles.
#include "compat/torch.h"

#include "remat/memory.h"
#include "testing.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <c10/core/impl/alloc_cpu.h>

#include <atomic>
#include <stdexcept>
#include <string>

namespace {

using remat::compat::CpuAllocatorBase;

// An allocator written once against CpuAllocatorBase, as the counting
// allocator is.
class TallyAllocator final : public CpuAllocatorBase {
 public:
  mutable std::atomic<int64_t> calls{0};
  mutable std::atomic<int64_t> bytes{0};

  c10::DataPtr allocate_bytes(size_t nbytes) const override {
    calls.fetch_add(1);
    bytes.fetch_add(static_cast<int64_t>(nbytes));
    void* p = c10::alloc_cpu(nbytes);
    return {p, p, &c10::free_cpu, c10::Device(c10::kCPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override {
    return &c10::free_cpu;
  }
};

TEST(CompatTest, TheVersionStringIsTheHeadersVersion) {
  const std::string v = remat::compat::torch_version();
  EXPECT_EQ(v.rfind(std::to_string(TORCH_VERSION_MAJOR) + "." +
                        std::to_string(TORCH_VERSION_MINOR) + ".", 0),
            0u)
      << v;
}

TEST(CompatTest, CpuAllocatorBaseServesThroughTheC10Interface) {
  TallyAllocator tally;
  c10::Allocator& base = tally;
  {
    auto ptr = base.allocate(4096);
    ASSERT_NE(ptr.get(), nullptr);
    static_cast<char*>(ptr.get())[4095] = 1;
  }
  EXPECT_EQ(tally.calls.load(), 1);
  EXPECT_EQ(tally.bytes.load(), 4096);
  // A tensor built on it sees its bytes.
  auto storage = c10::Storage(
      c10::Storage::use_byte_size_t(), 64 * sizeof(float), &tally, /*resizable=*/false);
  auto t = torch::empty({0}, torch::kFloat).set_(storage, 0, {64}, {1});
  t.fill_(2.0f);
  EXPECT_EQ(t.sum().item<float>(), 128.0f);
  EXPECT_EQ(tally.calls.load(), 2);
}

TEST(CompatTest, AutocastIsSetAndReadPerDevice) {
  using c10::DeviceType;
  const bool cpu_before = remat::compat::autocast_enabled(DeviceType::CPU);
  const auto dtype_before = remat::compat::autocast_dtype(DeviceType::CPU);
  ASSERT_FALSE(cpu_before);
  remat::compat::set_autocast_enabled(DeviceType::CPU, true);
  remat::compat::set_autocast_dtype(DeviceType::CPU, torch::kBFloat16);
  EXPECT_TRUE(remat::compat::autocast_enabled(DeviceType::CPU));
  EXPECT_FALSE(remat::compat::autocast_enabled(DeviceType::CUDA));
  EXPECT_EQ(remat::compat::autocast_dtype(DeviceType::CPU), torch::kBFloat16);
  // What the flag is for: a CPU matmul now runs in bfloat16.
  auto a = torch::randn({4, 4});
  EXPECT_EQ(torch::mm(a, a).scalar_type(), torch::kBFloat16);
  // The CUDA setting is kept apart from the CPU one.
  remat::compat::set_autocast_dtype(DeviceType::CUDA, torch::kBFloat16);
  EXPECT_EQ(remat::compat::autocast_dtype(DeviceType::CUDA), torch::kBFloat16);
  remat::compat::set_autocast_dtype(DeviceType::CUDA, torch::kHalf);
  EXPECT_EQ(remat::compat::autocast_dtype(DeviceType::CUDA), torch::kHalf);
  remat::compat::set_autocast_enabled(DeviceType::CPU, false);
  remat::compat::set_autocast_dtype(DeviceType::CPU, dtype_before);
  at::autocast::clear_cache();
  EXPECT_EQ(torch::mm(a, a).scalar_type(), torch::kFloat);
}

TEST(CompatTest, SdpaRunsWhereTheVersionHasIt) {
  auto q = torch::randn({1, 2, 8, 4});
  EXPECT_EQ(remat::compat::kHasSdpa, TORCH_VERSION_MAJOR >= 2);
  if (remat::compat::kHasSdpa) {
    auto out = remat::compat::scaled_dot_product_attention(q, q, q, {}, 0.0, true);
    auto scores = torch::matmul(q, q.transpose(-2, -1)) / 2.0;
    auto hide = torch::ones({8, 8}, torch::kBool).triu(1);
    auto expected = torch::matmul(scores.masked_fill(hide, -INFINITY).softmax(-1), q);
    EXPECT_TRUE(torch::allclose(out, expected, 1e-5, 1e-6));
  } else {
    EXPECT_THROW_WITH(
        remat::compat::scaled_dot_product_attention(q, q, q, {}, 0.0, true),
        "sdpa needs LibTorch >= 2.0");
  }
}

// A mean over a dimension (RMSNorm's, written eagerly) keeps its input for
// backward on 1.13, and only sizes on 2.x.
TEST(CompatTest, MeanOverADimKeepsItsInputOnlyWhereTheFlagSays) {
  ASSERT_TRUE(remat::memory::installed());
  auto x = torch::randn({256, 1024}).requires_grad_();
  const int64_t before = remat::memory::current_bytes();
  torch::Tensor loss;
  {
    auto a = x * 2.0; // its node saves nothing of a
    loss = a.mean(-1).sum();
  }
  const int64_t held = remat::memory::current_bytes() - before;
  const int64_t a_bytes = 256 * 1024 * 4;
  if (remat::compat::kMeanSavesInput) {
    EXPECT_GE(held, a_bytes);
  } else {
    EXPECT_LT(held, a_bytes);
  }
  loss.backward();
  EXPECT_TRUE(torch::allclose(x.grad(), torch::full_like(x, 2.0 / 1024)));
}

TEST(CompatTest, GradAccumulatorPtrHoldsTheLeafsAccumulator) {
  auto w = torch::ones({3}).requires_grad_();
  remat::compat::GradAccumulatorPtr acc = torch::autograd::impl::grad_accumulator(w);
  ASSERT_TRUE(acc);
  // The same node each time, and the one backward runs into.
  EXPECT_EQ(acc.get(), torch::autograd::impl::grad_accumulator(w).get());
  auto y = (w * 3.0).sum();
  ASSERT_EQ(y.grad_fn()->next_edges().size(), 1u);
  EXPECT_EQ(y.grad_fn()->next_edges()[0].function->next_edges()[0].function.get(), acc.get());
}

TEST(CompatTest, CapturedLeafHooksRunOnlyOutsideASuspension) {
  auto w = torch::ones({3}).requires_grad_();
  int calls = 0;
  w.register_hook([&](const torch::Tensor&) { ++calls; });
  auto grad_of = [&] {
    auto y = (w * w).sum();
    return torch::autograd::grad({y}, {w})[0];
  };
  // What differs: 2.x runs the hook of a leaf autograd::grad captures.
  auto g = grad_of();
  EXPECT_EQ(calls, TORCH_VERSION_MAJOR >= 2 ? 1 : 0);
  EXPECT_TRUE(torch::equal(g, torch::full({3}, 2.0f)));
  calls = 0;
  {
    remat::compat::TensorHooksSuspended quiet({w});
    EXPECT_TRUE(torch::equal(grad_of(), g));
  }
  EXPECT_EQ(calls, 0);
  // Put back: a plain backward runs the hook again.
  (w * w).sum().backward();
  EXPECT_EQ(calls, 1);
}

TEST(CompatTest, CudaMemoryStatsCountATensor) {
  REMAT_REQUIRE_CUDA();
#ifdef REMAT_WITH_CUDA
  const auto before = remat::compat::cuda_memory_stats(0);
  auto t = torch::empty({1 << 20}, torch::TensorOptions().device(torch::kCUDA, 0));
  const auto after = remat::compat::cuda_memory_stats(0);
  EXPECT_EQ(after.current_bytes - before.current_bytes, 4 << 20);
  EXPECT_GE(after.peak_bytes, after.current_bytes);
  EXPECT_EQ(after.allocations, before.allocations + 1);
  EXPECT_GE(after.reserved_bytes, after.current_bytes);
#endif
}

// ProcessGroupNCCL has shutdown() on 2.x only; the call is made where the
// type has one, and what it throws goes no further.
struct WithShutdown {
  int calls = 0;
  bool fail = false;
  void shutdown() {
    ++calls;
    if (fail) {
      throw std::runtime_error("already aborted");
    }
  }
};
struct WithoutShutdown {};

TEST(CompatTest, ShutdownBackendCallsShutdownWhereThereIsOne) {
  WithShutdown a;
  remat::compat::shutdown_backend(a);
  EXPECT_EQ(a.calls, 1);
  a.fail = true;
  EXPECT_NO_THROW(remat::compat::shutdown_backend(a));
  EXPECT_EQ(a.calls, 2);
  WithoutShutdown b;
  remat::compat::shutdown_backend(b); // compiles, does nothing
}

} // namespace
