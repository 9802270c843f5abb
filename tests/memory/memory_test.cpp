// remat::memory: exact byte counts, peak, the hard cap and its error, the
// training-memory breakdown, and size parsing.
#include <gtest/gtest.h>
#include <c10/core/CPUAllocator.h>
#include <torch/torch.h>

#include "remat/checkpoint.h"
#include "remat/memory.h"
#include "testing.h"

#include <string>
#include <vector>

#ifdef REMAT_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace {

namespace mem = remat::memory;
using torch::Tensor;

class MemoryTest : public ::testing::Test {
 protected:
  MemoryTest() {
    torch::manual_seed(0);
    mem::install();
  }
  ~MemoryTest() override {
    mem::set_limit(0);
  }
};

TEST_F(MemoryTest, InstallIsIdempotent) {
  mem::install();
  auto* allocator = c10::GetCPUAllocator();
  mem::install();
  EXPECT_TRUE(mem::installed());
  EXPECT_EQ(c10::GetCPUAllocator(), allocator);

  // Counting still works after a second install.
  const int64_t before = mem::current_bytes();
  auto t = torch::empty({256}, torch::kFloat);
  EXPECT_EQ(mem::current_bytes() - before, 1024);
}

TEST_F(MemoryTest, CurrentBytesFollowsAllocationsExactly) {
  const int64_t before = mem::current_bytes();
  {
    auto t = torch::empty({1000}, torch::kFloat); // 4000 bytes
    EXPECT_EQ(mem::current_bytes() - before, 4000);
    auto u = torch::empty({3, 7}, torch::kDouble); // 168 bytes
    EXPECT_EQ(mem::current_bytes() - before, 4168);
    auto view = t.view({10, 100}); // a view allocates nothing
    EXPECT_EQ(mem::current_bytes() - before, 4168);
    u = Tensor();
    EXPECT_EQ(mem::current_bytes() - before, 4000);
  }
  EXPECT_EQ(mem::current_bytes(), before);
}

TEST_F(MemoryTest, LargeBlocksAreReusedAndCountedAsWhatTensorsHold) {
  mem::empty_cache();
  const int64_t before = mem::current_bytes();
  void* first = nullptr;
  {
    auto t = torch::empty({1 << 20}, torch::kFloat); // 4 MiB
    first = t.data_ptr();
    EXPECT_EQ(mem::current_bytes() - before, 4 << 20);
  }
  EXPECT_EQ(mem::current_bytes(), before);
  EXPECT_EQ(mem::cached_bytes(), 4 << 20);
  {
    // 3.9 MiB is in the same size class: the same block comes back, and
    // the counters see the 3.9 MiB asked for.
    auto t = torch::empty({(1 << 20) - 25000}, torch::kFloat);
    EXPECT_EQ(t.data_ptr(), first);
    EXPECT_EQ(mem::cached_bytes(), 0);
    EXPECT_EQ(mem::current_bytes() - before, 4 * ((1 << 20) - 25000));
  }
  // Small blocks go straight back to the C library.
  { auto small = torch::empty({1000}, torch::kFloat); }
  EXPECT_EQ(mem::cached_bytes(), 4 << 20);
  mem::empty_cache();
  EXPECT_EQ(mem::cached_bytes(), 0);

  mem::set_caching(false);
  { auto t = torch::empty({1 << 20}, torch::kFloat); }
  EXPECT_EQ(mem::cached_bytes(), 0);
  mem::set_caching(true);
}

TEST_F(MemoryTest, TheCacheGivesWayUnderALimit) {
  mem::empty_cache();
  const int64_t base = mem::current_bytes();
  { auto t = torch::empty({4 << 20}, torch::kFloat); } // 16 MiB, now cached
  EXPECT_EQ(mem::cached_bytes(), 16 << 20);
  mem::LimitGuard guard(base + (20 << 20));
  // A 12 MiB block is another size class: held + cached would pass the
  // limit, so the cache is emptied first.
  auto u = torch::empty({3 << 20}, torch::kFloat);
  EXPECT_EQ(mem::cached_bytes(), 0);
}

TEST_F(MemoryTest, PeakAndResetPeak) {
  mem::reset_peak();
  const int64_t base = mem::current_bytes();
  EXPECT_EQ(mem::peak_bytes(), base);
  {
    auto t = torch::empty({1 << 16}, torch::kByte);
    EXPECT_EQ(mem::peak_bytes(), base + (1 << 16));
  }
  EXPECT_EQ(mem::current_bytes(), base);
  EXPECT_EQ(mem::peak_bytes(), base + (1 << 16)) << "the peak stays";
  mem::reset_peak();
  EXPECT_EQ(mem::peak_bytes(), base);
}

TEST_F(MemoryTest, AllocationCountIncrements) {
  const int64_t before = mem::allocation_count();
  auto a = torch::empty({10});
  EXPECT_EQ(mem::allocation_count(), before + 1);
  auto b = torch::empty({10});
  a = Tensor();
  EXPECT_EQ(mem::allocation_count(), before + 2) << "frees do not count";
}

TEST_F(MemoryTest, SetLimitReturnsPreviousValue) {
  EXPECT_EQ(mem::set_limit(1 << 30), 0);
  EXPECT_EQ(mem::limit(), 1 << 30);
  EXPECT_EQ(mem::set_limit(2 << 20), 1 << 30);
  EXPECT_EQ(mem::set_limit(0), 2 << 20);
  EXPECT_EQ(mem::limit(), 0);
}

TEST_F(MemoryTest, NegativeLimitIsRefused) {
  EXPECT_THROW_WITH(mem::set_limit(-1), "expected a limit >= 0 bytes");
  EXPECT_EQ(mem::limit(), 0);
}

TEST_F(MemoryTest, AllocationPastLimitThrowsWithTheNumbers) {
  const int64_t held = mem::current_bytes();
  const int64_t limit = held + 1000;
  mem::LimitGuard guard(limit);
  bool caught = false;
  try {
    torch::empty({1024}, torch::kFloat); // 4096 bytes
  } catch (const remat::OutOfMemoryError& e) {
    caught = true;
    EXPECT_EQ(e.requested_bytes(), 4096);
    EXPECT_EQ(e.held_bytes(), held);
    EXPECT_EQ(e.limit_bytes(), limit);
    const std::string message = e.what_without_backtrace();
    EXPECT_NE(message.find("requested 4096 bytes"), std::string::npos)
        << message;
    EXPECT_NE(
        message.find(std::to_string(held) + " bytes held"), std::string::npos)
        << message;
    EXPECT_NE(
        message.find("limit of " + std::to_string(limit) + " bytes"),
        std::string::npos)
        << message;
  }
  EXPECT_TRUE(caught);
  EXPECT_EQ(mem::current_bytes(), held)
      << "a refused allocation is not counted";
  // Below the limit, allocation still works.
  auto small = torch::empty({100}, torch::kFloat);
  EXPECT_EQ(mem::current_bytes(), held + 400);
}

TEST_F(MemoryTest, OutOfMemoryErrorIsAC10Error) {
  mem::LimitGuard guard(mem::current_bytes() + 16);
  EXPECT_THROW(torch::empty({1024}), c10::Error);
}

// The autograd engine runs backward functions and carries their exceptions
// back to the caller as std::exception_ptr; the type must survive it.
TEST_F(MemoryTest, OutOfMemoryErrorSurvivesAutogradBackward) {
  auto x = torch::randn({1024}).requires_grad_(); // 4 KiB
  auto loss = x.exp().sum();
  mem::LimitGuard guard(mem::current_bytes() + 1024);
  bool caught = false;
  try {
    loss.backward(); // needs 4 KiB gradients
  } catch (const remat::OutOfMemoryError& e) {
    caught = true;
    EXPECT_EQ(e.requested_bytes(), 4096);
  }
  EXPECT_TRUE(caught);
}

TEST_F(MemoryTest, OutOfMemoryErrorSurvivesCheckpointRecompute) {
  auto w = torch::randn({64, 64}).requires_grad_();
  auto x = torch::randn({16, 64}).requires_grad_();
  auto out = remat::checkpoint(
      [&](const std::vector<Tensor>& in) {
        return std::vector<Tensor>{torch::tanh(torch::matmul(in[0], w))};
      },
      {x},
      remat::CheckpointOptions().parameters({w}))[0];
  auto loss = out.sum();
  mem::LimitGuard guard(mem::current_bytes() + 512);
  bool caught = false;
  try {
    loss.backward();
  } catch (const remat::OutOfMemoryError& e) {
    caught = true;
    EXPECT_GT(e.requested_bytes(), 512);
  }
  EXPECT_TRUE(caught);
}

TEST_F(MemoryTest, LimitGuardRestores) {
  mem::set_limit(1 << 30);
  {
    mem::LimitGuard outer(1 << 29);
    EXPECT_EQ(mem::limit(), 1 << 29);
    {
      mem::LimitGuard inner(0);
      EXPECT_EQ(mem::limit(), 0);
    }
    EXPECT_EQ(mem::limit(), 1 << 29);
  }
  EXPECT_EQ(mem::limit(), 1 << 30);
}

TEST_F(MemoryTest, BreakdownAfterAdamWStep) {
  torch::nn::Linear model(16, 8);
  torch::optim::AdamW optimizer(
      model->parameters(), torch::optim::AdamWOptions(1e-3));
  const int64_t param_bytes = (16 * 8 + 8) * 4;

  auto x = torch::randn({4, 16});
  model->forward(x).pow(2).sum().backward();
  optimizer.step();

  auto b = mem::breakdown(*model, &optimizer);
  EXPECT_EQ(b.weights, param_bytes);
  EXPECT_EQ(b.gradients, param_bytes);
  EXPECT_EQ(b.optimizer_state, 2 * param_bytes) << "exp_avg and exp_avg_sq";
  EXPECT_EQ(b.total, mem::current_bytes());
  EXPECT_EQ(
      b.activations, b.total - b.weights - b.gradients - b.optimizer_state);

  auto without_optimizer = mem::breakdown(*model);
  EXPECT_EQ(without_optimizer.weights, param_bytes);
  EXPECT_EQ(without_optimizer.optimizer_state, 0);
}

TEST_F(MemoryTest, BreakdownCountsSharedStorageOnce) {
  // A tied weight, registered under two names, and a view of it as a buffer.
  struct Tied : torch::nn::Module {
    Tied() {
      auto w = torch::randn({4, 4});
      register_parameter("encoder_weight", w);
      register_parameter("decoder_weight", w);
      register_buffer("first_row", w[0]);
      register_buffer("scale", torch::ones({4}));
    }
  } model;
  auto b = mem::breakdown(model);
  EXPECT_EQ(b.weights, (16 + 4) * 4);
}

TEST_F(MemoryTest, ParseSize) {
  EXPECT_EQ(mem::parse_size("512MiB"), 536870912);
  EXPECT_EQ(mem::parse_size("80GiB"), int64_t{80} << 30);
  EXPECT_EQ(mem::parse_size("2GB"), 2000000000);
  EXPECT_EQ(mem::parse_size("1.5GiB"), int64_t{3} << 29);
  EXPECT_EQ(mem::parse_size("4096"), 4096);
  EXPECT_EQ(mem::parse_size("1KiB"), 1024);
  EXPECT_EQ(mem::parse_size("3kb"), 3000);
  EXPECT_EQ(mem::parse_size(" 2 TiB "), int64_t{2} << 40);
  EXPECT_EQ(mem::parse_size("0"), 0);
}

TEST_F(MemoryTest, ParseSizeRefusesBadText) {
  for (const std::string bad :
       {"",
        "abc",
        "12XB",
        "-5MiB",
        "1.2.3GiB",
        "MiB",
        ".",
        "1e3",
        "9999999TiB"}) {
    SCOPED_TRACE(bad);
    EXPECT_THROW_WITH(mem::parse_size(bad), "but got '" + bad + "'");
  }
}

TEST_F(MemoryTest, FormatSize) {
  EXPECT_EQ(mem::format_size(0), "0 B");
  EXPECT_EQ(mem::format_size(512), "512 B");
  EXPECT_EQ(mem::format_size(1023), "1023 B");
  EXPECT_EQ(mem::format_size(1536), "1.50 KiB");
  EXPECT_EQ(mem::format_size(12 << 20), "12.0 MiB");
  EXPECT_EQ(mem::format_size(int64_t{3} << 29), "1.50 GiB");
  EXPECT_EQ(mem::format_size(int64_t{2} << 40), "2.00 TiB");
}

} // namespace

// ---------------------------------------------------------------- CUDA
// On a GPU the same functions read the caching allocator's statistics and
// cap it through its memory fraction. Without a GPU these skip, saying why.

TEST(MemoryCudaTest, StatsEqualATensorsBytes) {
  REMAT_REQUIRE_CUDA();
#ifdef REMAT_WITH_CUDA
  const c10::Device cuda(c10::kCUDA, 0);
  const int64_t before = mem::current_bytes(cuda);
  const int64_t count_before = mem::allocation_count(cuda);
  // 4 MiB: a multiple of the allocator's 512-byte rounding, so the bytes it
  // reports allocated are the tensor's exactly.
  auto t = torch::empty({1 << 20}, torch::TensorOptions().device(cuda));
  const int64_t bytes = static_cast<int64_t>(t.nbytes());
  EXPECT_EQ(mem::current_bytes(cuda) - before, bytes);
  EXPECT_GE(mem::peak_bytes(cuda), before + bytes);
  EXPECT_EQ(mem::allocation_count(cuda) - count_before, 1);
  t = torch::Tensor();
  EXPECT_EQ(mem::current_bytes(cuda), before);
  mem::reset_peak(cuda);
  EXPECT_EQ(mem::peak_bytes(cuda), before);
  // The CPU's counts do not move for a CUDA tensor.
  const int64_t cpu_before = mem::current_bytes();
  auto u = torch::empty({1 << 20}, torch::TensorOptions().device(cuda));
  EXPECT_EQ(mem::current_bytes(), cpu_before);
#endif
}

TEST(MemoryCudaTest, LimitMakesAnOversizeAllocationThrowAndTheGuardRestores) {
  REMAT_REQUIRE_CUDA();
#ifdef REMAT_WITH_CUDA
  const c10::Device cuda(c10::kCUDA, 0);
  const int64_t limit = int64_t(256) << 20;
  ASSERT_EQ(mem::limit(cuda), 0);
  // The allocator counts what it reserves: start from nothing cached.
  c10::cuda::CUDACachingAllocator::emptyCache();
  {
    mem::LimitGuard guard(limit, cuda);
    EXPECT_EQ(mem::limit(cuda), limit);
    // 1 GiB does not fit under 256 MiB: the caching allocator refuses it.
    bool caught = false;
    try {
      auto big = torch::empty({int64_t(1) << 28}, torch::TensorOptions().device(cuda));
    } catch (const c10::OutOfMemoryError&) {
      caught = true;
    }
    EXPECT_TRUE(caught) << "a 1 GiB allocation under a 256 MiB limit did not throw";
    // Within the limit still works.
    auto small = torch::ones({1 << 20}, torch::TensorOptions().device(cuda));
    EXPECT_EQ(small.sum().item<float>(), float(1 << 20));
  }
  EXPECT_EQ(mem::limit(cuda), 0);
  // Restored: the same 1 GiB now fits (an H200 or any GPU of > 2 GiB).
  auto big = torch::empty({int64_t(1) << 28}, torch::TensorOptions().device(cuda));
  EXPECT_EQ(static_cast<int64_t>(big.nbytes()), int64_t(1) << 30);
  // The CPU limit was not touched.
  EXPECT_EQ(mem::limit(), 0);
#endif
}
