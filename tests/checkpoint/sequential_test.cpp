#include "remat/memory.h"
#include "remat/sequential.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

namespace {

using ::testing::HasSubstr;

struct BlockImpl : torch::nn::Module {
  torch::nn::Linear up{nullptr}, down{nullptr};
  BlockImpl() {
    up = register_module("up", torch::nn::Linear(64, 256));
    down = register_module("down", torch::nn::Linear(256, 64));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return down->forward(torch::gelu(up->forward(x)));
  }
};
TORCH_MODULE(Block);

class SequentialTest : public ::testing::Test {
 protected:
  SequentialTest() { torch::manual_seed(0); }

  static torch::nn::Sequential make(int blocks) {
    torch::nn::Sequential net;
    for (int i = 0; i < blocks; ++i) {
      net->push_back(torch::nn::Linear(16, 16));
      net->push_back(torch::nn::Functional(torch::gelu, "none"));
      net->push_back(torch::nn::Dropout(0.25));
    }
    return net;
  }

  static std::vector<torch::Tensor> grads(torch::nn::Module& m) {
    std::vector<torch::Tensor> g;
    for (const auto& p : m.parameters()) {
      g.push_back(p.grad().clone());
    }
    return g;
  }
};

TEST_F(SequentialTest, CheckpointSequentialMatchesThePlainForwardBitForBit) {
  auto net = make(4);
  auto x = torch::randn({8, 16}, torch::requires_grad());
  torch::manual_seed(7);
  auto ref = net->forward(x);
  ref.pow(2).sum().backward();
  auto ref_grads = grads(*net);
  auto ref_x = x.grad().clone();

  for (int64_t segments : {1, 2, 3, 5, 12}) {
    net->zero_grad(true);
    x.mutable_grad() = torch::Tensor();
    const auto before = remat::recompute_count();
    torch::manual_seed(7);
    auto out = remat::checkpoint_sequential(net, segments, x);
    EXPECT_TRUE(torch::equal(out, ref)) << segments;
    out.pow(2).sum().backward();
    // The last segment is not checkpointed.
    EXPECT_EQ(remat::recompute_count() - before, segments - 1);
    auto g = grads(*net);
    for (size_t i = 0; i < g.size(); ++i) {
      EXPECT_TRUE(torch::equal(g[i], ref_grads[i])) << segments << " param " << i;
    }
    EXPECT_TRUE(torch::equal(x.grad(), ref_x));
  }
}

TEST_F(SequentialTest, CheckpointSequentialRefusesBadSegmentCounts) {
  auto net = make(2);
  auto x = torch::randn({2, 16});
  for (int64_t bad : {0, 7, -1}) {
    try {
      remat::checkpoint_sequential(net, bad, x);
      FAIL() << bad;
    } catch (const c10::Error& e) {
      EXPECT_THAT(e.what(), HasSubstr("expected 1 to 6 segments"));
      EXPECT_THAT(e.what(), HasSubstr("but got " + std::to_string(bad)));
    }
  }
}

TEST_F(SequentialTest, ApplyActivationCheckpointingKeepsNamesAndGradients) {
  auto net = make(3);
  auto x = torch::randn({4, 16});
  torch::manual_seed(3);
  net->forward(x).pow(2).sum().backward();
  auto ref = grads(*net);
  net->zero_grad(true);

  auto wrapped = remat::apply_activation_checkpointing(
      net, [](const std::string&, const torch::nn::Module& m) {
        return m.as<torch::nn::Linear>() != nullptr;
      });
  auto names = [](torch::nn::Module& m) {
    std::vector<std::string> k;
    for (const auto& p : m.named_parameters()) {
      k.push_back(p.key());
    }
    return k;
  };
  EXPECT_EQ(names(*wrapped), names(*net));
  int checkpointed = 0;
  for (const auto& child : wrapped->children()) {
    checkpointed += child->as<remat::Checkpointed>() != nullptr;
  }
  EXPECT_EQ(checkpointed, 3);

  const auto before = remat::recompute_count();
  torch::manual_seed(3);
  wrapped->forward(x).pow(2).sum().backward();
  EXPECT_EQ(remat::recompute_count() - before, 3);
  auto g = grads(*net); // the same parameter tensors
  ASSERT_EQ(g.size(), ref.size());
  for (size_t i = 0; i < g.size(); ++i) {
    EXPECT_TRUE(torch::equal(g[i], ref[i])) << i;
  }
}

TEST_F(SequentialTest, ApplyActivationCheckpointingByNameCutsHeldBytes) {
  torch::nn::Sequential net;
  for (int i = 0; i < 6; ++i) {
    net->push_back(Block());
  }
  auto x = torch::randn({128, 64}, torch::requires_grad());
  auto held = [&](torch::nn::Sequential& model) {
    const auto before = remat::memory::current_bytes();
    auto y = model->forward(x);
    const auto bytes = remat::memory::current_bytes() - before;
    y.sum().backward();
    return bytes;
  };
  const auto plain = held(net);
  auto wrapped = remat::apply_activation_checkpointing(
      net, [](const std::string& name, const torch::nn::Module&) { return name != "5"; });
  const auto checkpointed = held(wrapped);
  // Five of six blocks keep only their 128x64 input instead of ~3 of 128x256.
  EXPECT_LT(checkpointed * 3, plain) << plain << " vs " << checkpointed;
}

} // namespace
