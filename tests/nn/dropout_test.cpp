#include "remat/nn/dropout.h"
#include "remat/memory.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

namespace {

class DropoutTest : public ::testing::Test {
 protected:
  DropoutTest() { torch::manual_seed(0); }
};

TEST_F(DropoutTest, DropsAboutPAndScalesTheRest) {
  auto x = torch::ones({1000, 1000});
  for (double p : {0.1, 0.5, 0.9}) {
    auto y = remat::nn::dropout(x, p, true);
    const double dropped = (y == 0).to(torch::kDouble).mean().item<double>();
    EXPECT_NEAR(dropped, p, 0.003) << p; // ~6 standard deviations at 1e6 draws
    auto kept = y.masked_select(y != 0);
    EXPECT_TRUE(torch::allclose(kept, torch::full_like(kept, 1.0 / (1.0 - p))));
  }
}

TEST_F(DropoutTest, FollowsTheSeedAndNotTheThreadCount) {
  auto x = torch::randn({300, 700});
  const int threads = torch::get_num_threads();
  torch::manual_seed(5);
  auto a = remat::nn::dropout(x, 0.3, true);
  torch::set_num_threads(1);
  torch::manual_seed(5);
  auto b = remat::nn::dropout(x, 0.3, true);
  torch::set_num_threads(threads);
  EXPECT_TRUE(torch::equal(a, b));
  auto c = remat::nn::dropout(x, 0.3, true); // the generator moved on
  EXPECT_FALSE(torch::equal(a, c));
}

TEST_F(DropoutTest, IdentityWhenNotTrainingOrPZeroAndRefusesBadP) {
  auto x = torch::randn({4, 4});
  EXPECT_TRUE(remat::nn::dropout(x, 0.5, false).is_same(x));
  EXPECT_TRUE(remat::nn::dropout(x, 0.0, true).is_same(x));
  try {
    remat::nn::dropout(x, 1.0, true);
    FAIL();
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("expected p in [0, 1), but got 1"), std::string::npos);
  }
}

TEST_F(DropoutTest, GradientIsTheMaskTimesTheScale) {
  auto x = torch::randn({64, 64}, torch::requires_grad());
  auto y = remat::nn::dropout(x, 0.25, true);
  y.sum().backward();
  auto expected = (y.detach() != 0).to(torch::kFloat) / 0.75;
  EXPECT_TRUE(torch::allclose(x.grad(), expected));
}

TEST_F(DropoutTest, NonContiguousAndBFloat16InputsMatchTheirFloatReference) {
  auto base = torch::randn({32, 48});
  auto x = base.t(); // not contiguous
  torch::manual_seed(9);
  auto y = remat::nn::dropout(x, 0.2, true);
  torch::manual_seed(9);
  auto y_contig = remat::nn::dropout(x.contiguous(), 0.2, true);
  EXPECT_TRUE(torch::equal(y, y_contig));
  EXPECT_EQ(y.sizes(), x.sizes());

  torch::manual_seed(9);
  auto xb = x.to(torch::kBFloat16).requires_grad_();
  auto yb = remat::nn::dropout(xb, 0.2, true);
  EXPECT_EQ(yb.scalar_type(), torch::kBFloat16);
  // Same mask as float (it depends on the seed and the index only).
  EXPECT_TRUE(torch::equal(yb == 0, y == 0));
  yb.sum().backward();
  EXPECT_EQ(xb.grad().scalar_type(), torch::kBFloat16);
  auto expected = ((y != 0).to(torch::kFloat) / 0.8).to(torch::kBFloat16);
  EXPECT_TRUE(torch::equal(xb.grad(), expected));
}

TEST_F(DropoutTest, HoldsOnlyTheOutputAndAOneByteMask) {
  ASSERT_TRUE(remat::memory::installed());
  auto x = torch::randn({256, 256}, torch::requires_grad());
  const auto before = remat::memory::current_bytes();
  auto y = remat::nn::dropout(x, 0.1, true);
  const auto held = remat::memory::current_bytes() - before;
  // float output (4 bytes per element) + bool keep mask (1 byte per element);
  // LibTorch's own dropout would keep a 4-byte noise tensor instead.
  EXPECT_GE(held, 5 * x.numel());
  EXPECT_LE(held, 5 * x.numel() + 1024);
}

} // namespace
