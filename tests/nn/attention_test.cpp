#include "remat/memory.h"
#include "remat/nn/attention.h"

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <limits>

namespace {

using remat::nn::AttentionKind;
using remat::nn::AttentionOptions;
using remat::nn::attention;

struct Shape {
  int64_t batch, heads, sq, sk, dim;
};

struct Result {
  torch::Tensor out, dq, dk, dv;
};

class AttentionTest : public ::testing::Test {
 protected:
  AttentionTest() {
    torch::manual_seed(0);
  }

  struct Inputs {
    torch::Tensor q, k, v, grad;
  };

  Inputs make(const Shape& s, torch::Dtype dtype = torch::kFloat) {
    auto o = torch::TensorOptions().dtype(dtype);
    return {
        torch::randn({s.batch, s.heads, s.sq, s.dim}, o),
        torch::randn({s.batch, s.heads, s.sk, s.dim}, o),
        torch::randn({s.batch, s.heads, s.sk, s.dim}, o),
        torch::randn({s.batch, s.heads, s.sq, s.dim}, o)};
  }

  static Result run(const Inputs& in, const torch::Tensor& mask, const AttentionOptions& o) {
    auto q = in.q.clone().requires_grad_();
    auto k = in.k.clone().requires_grad_();
    auto v = in.v.clone().requires_grad_();
    auto out = attention(q, k, v, mask, o);
    out.backward(in.grad);
    return {out.detach(), q.grad(), k.grad(), v.grad()};
  }

  static double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
    return (a - b).abs().max().item<double>();
  }

  // Blockwise against eager on the same inputs: outputs and gradients.
  void expect_matches_eager(
      const Shape& s, const torch::Tensor& mask, bool causal, int64_t block) {
    auto in = make(s);
    auto eager = run(in, mask, AttentionOptions().causal(causal));
    auto blocks = run(
        in, mask,
        AttentionOptions().kind(AttentionKind::kBlockwise).causal(causal).block_size(block));
    SCOPED_TRACE(
        "shape [" + std::to_string(s.batch) + "," + std::to_string(s.heads) + "," +
        std::to_string(s.sq) + "," + std::to_string(s.sk) + "," + std::to_string(s.dim) +
        "] causal " + std::to_string(causal) + " block " + std::to_string(block));
    EXPECT_LE(max_diff(blocks.out, eager.out), 1e-5);
    EXPECT_LE(max_diff(blocks.dq, eager.dq), 1e-5);
    EXPECT_LE(max_diff(blocks.dk, eager.dk), 1e-5);
    EXPECT_LE(max_diff(blocks.dv, eager.dv), 1e-5);
  }

  // Additive [B, 1, 1, Sk] mask dropping the last `pad` keys of batch 1.
  static torch::Tensor padding_mask(const Shape& s, int64_t pad) {
    auto keep = torch::ones({s.batch, s.sk});
    keep.index_put_({1, torch::indexing::Slice(s.sk - pad)}, 0);
    return ((1.0 - keep) * std::numeric_limits<float>::lowest())
        .unsqueeze(1)
        .unsqueeze(2);
  }
};

TEST_F(AttentionTest, ParsesKinds) {
  EXPECT_EQ(remat::nn::parse_attention("eager"), AttentionKind::kEager);
  EXPECT_EQ(remat::nn::parse_attention("blockwise"), AttentionKind::kBlockwise);
  EXPECT_EQ(remat::nn::parse_attention("sdpa"), AttentionKind::kSdpa);
  EXPECT_STREQ(remat::nn::to_string(AttentionKind::kBlockwise), "blockwise");
  try {
    remat::nn::parse_attention("flash");
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("(eager, blockwise, sdpa), but got 'flash'"),
              std::string::npos) << e.what();
  }
}

TEST_F(AttentionTest, BlockwiseMatchesEagerWithoutMask) {
  expect_matches_eager({2, 3, 100, 100, 16}, {}, false, 32);
  expect_matches_eager({1, 2, 64, 64, 8}, {}, false, 64);
  expect_matches_eager({1, 2, 33, 47, 8}, {}, false, 16);
}

TEST_F(AttentionTest, BlockwiseMatchesEagerWithPaddingMask) {
  Shape s{2, 3, 100, 100, 16};
  expect_matches_eager(s, padding_mask(s, 37), false, 32);
  // A full [B, H, Sq, Sk] additive mask.
  Shape t{2, 2, 40, 40, 8};
  expect_matches_eager(t, torch::randn({2, 2, 40, 40}), false, 16);
  // A [Sq, Sk] mask broadcast over batch and heads.
  expect_matches_eager(t, torch::randn({40, 40}), false, 24);
}

TEST_F(AttentionTest, BlockwiseMatchesEagerCausal) {
  expect_matches_eager({2, 3, 100, 100, 16}, {}, true, 32);
  Shape s{2, 2, 64, 64, 8};
  expect_matches_eager(s, padding_mask(s, 10), true, 16);
}

TEST_F(AttentionTest, BlockwiseMatchesEagerCausalWithCacheOffset) {
  // The queries are the last seq_q positions, as after a KV cache.
  expect_matches_eager({2, 2, 7, 50, 8}, {}, true, 16);
  expect_matches_eager({2, 2, 1, 50, 8}, {}, true, 16);
  expect_matches_eager({1, 2, 20, 45, 8}, {}, true, 8);
}

TEST_F(AttentionTest, BlockwiseMatchesEagerForAnyBlockSize) {
  Shape s{1, 2, 50, 50, 8};
  for (int64_t block : {1, 7, 49, 50, 128}) {
    expect_matches_eager(s, {}, true, block);
    expect_matches_eager(s, padding_mask({2, 2, 50, 50, 8}, 5).narrow(0, 1, 1), false, block);
  }
}

TEST_F(AttentionTest, BlockwiseFullyMaskedRowsGiveZeroNotNan) {
  Shape s{1, 1, 6, 6, 4};
  auto in = make(s);
  auto mask = torch::zeros({1, 1, 6, 6});
  mask.index_put_({0, 0, 2}, -std::numeric_limits<float>::infinity());
  auto r = run(in, mask, AttentionOptions().kind(AttentionKind::kBlockwise).block_size(4));
  EXPECT_FALSE(r.out.isnan().any().item<bool>());
  EXPECT_FALSE(r.dq.isnan().any().item<bool>());
  EXPECT_FALSE(r.dk.isnan().any().item<bool>());
  EXPECT_FALSE(r.dv.isnan().any().item<bool>());
  EXPECT_EQ(r.out[0][0][2].abs().max().item<float>(), 0.0f);
  EXPECT_EQ(r.dq[0][0][2].abs().max().item<float>(), 0.0f);
  // The other rows match eager.
  auto e = run(in, mask.index_put_({0, 0, 2}, 0.0), AttentionOptions());
  auto rows = torch::tensor({0, 1, 3, 4, 5});
  EXPECT_LE(max_diff(r.out.index_select(2, rows), e.out.index_select(2, rows)), 1e-5);
  // Causal with more queries than keys: the first queries see nothing.
  auto c = run(make({1, 1, 8, 5, 4}), {},
               AttentionOptions().kind(AttentionKind::kBlockwise).causal(true).block_size(3));
  EXPECT_FALSE(c.out.isnan().any().item<bool>());
  EXPECT_FALSE(c.dq.isnan().any().item<bool>());
}

TEST_F(AttentionTest, BlockwiseWithoutGradMatchesWithGrad) {
  auto in = make({2, 2, 30, 30, 8});
  auto o = AttentionOptions().kind(AttentionKind::kBlockwise).causal(true).block_size(8);
  torch::Tensor a;
  {
    torch::NoGradGuard no_grad;
    a = attention(in.q, in.k, in.v, {}, o);
  }
  auto b = run(in, {}, o).out;
  EXPECT_TRUE(torch::equal(a, b));
}

TEST_F(AttentionTest, BlockwiseRefusesMaskThatRequiresGrad) {
  auto in = make({1, 1, 4, 4, 2});
  auto mask = torch::zeros({1, 1, 4, 4}).requires_grad_();
  try {
    attention(in.q, in.k, in.v, mask, AttentionOptions().kind(AttentionKind::kBlockwise));
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("gives no gradient to the mask"), std::string::npos)
        << e.what();
  }
}

// Dropout: the masks backward regenerates are the ones forward drew, so the
// analytic gradient equals finite differences of the (reseeded) function.
TEST_F(AttentionTest, BlockwiseDropoutGradientMatchesFiniteDifferences) {
  auto in = make({1, 2, 5, 7, 3}, torch::kDouble);
  auto o = AttentionOptions()
               .kind(AttentionKind::kBlockwise)
               .dropout(0.3)
               .training(true)
               .causal(true)
               .block_size(2);
  auto f = [&](const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
    torch::manual_seed(7);
    return (attention(q, k, v, {}, o) * in.grad).sum();
  };
  auto q = in.q.clone().requires_grad_();
  auto k = in.k.clone().requires_grad_();
  auto v = in.v.clone().requires_grad_();
  f(q, k, v).backward();
  torch::NoGradGuard no_grad;
  const double eps = 1e-6;
  std::vector<torch::Tensor> xs{in.q, in.k, in.v};
  std::vector<torch::Tensor> grads{q.grad(), k.grad(), v.grad()};
  for (size_t which = 0; which < 3; ++which) {
    auto flat = xs[which].view(-1);
    for (int64_t i = 0; i < flat.numel(); i += 3) {
      auto x = xs;
      x[which] = xs[which].clone();
      x[which].view(-1)[i] += eps;
      const double up = f(x[0], x[1], x[2]).item<double>();
      x[which].view(-1)[i] -= 2 * eps;
      const double down = f(x[0], x[1], x[2]).item<double>();
      EXPECT_NEAR(grads[which].view(-1)[i].item<double>(), (up - down) / (2 * eps), 1e-6)
          << "input " << which << " element " << i;
    }
  }
  // Dropout really drops in training, and not in eval.
  torch::manual_seed(7);
  auto dropped = attention(in.q, in.k, in.v, {}, o);
  auto plain = attention(in.q, in.k, in.v, {}, AttentionOptions(o).training(false));
  auto eager = attention(in.q, in.k, in.v, {}, AttentionOptions().causal(true));
  EXPECT_GT(max_diff(dropped, plain), 1e-3);
  EXPECT_LE(max_diff(plain, eager), 1e-12);
}

TEST_F(AttentionTest, SdpaNeedsLibTorch2) {
  auto in = make({1, 2, 16, 16, 8});
  auto o = AttentionOptions().kind(AttentionKind::kSdpa).causal(true);
#if TORCH_VERSION_MAJOR >= 2
  auto r = run(in, {}, o);
  auto e = run(in, {}, AttentionOptions().causal(true));
  EXPECT_LE(max_diff(r.out, e.out), 1e-5);
  EXPECT_LE(max_diff(r.dq, e.dq), 1e-5);
  // Cache offset and a padding mask go through an explicit bias.
  auto in2 = make({2, 2, 4, 16, 8});
  auto mask = padding_mask({2, 2, 4, 16, 8}, 3);
  EXPECT_LE(max_diff(run(in2, mask, o).out, run(in2, mask, AttentionOptions().causal(true)).out),
            1e-5);
#else
  try {
    attention(in.q, in.k, in.v, {}, o);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("sdpa needs LibTorch >= 2.0, but this build has 1.13"),
              std::string::npos) << e.what();
  }
#endif
}

// The point of blockwise: what the forward leaves held for backward.
TEST_F(AttentionTest, BlockwiseHoldsAnEighthOfEagerAfterForward) {
  ASSERT_TRUE(remat::memory::installed());
  auto in = make({1, 8, 1024, 1024, 64});
  auto held = [&](AttentionKind kind) {
    auto q = in.q.clone().requires_grad_();
    auto k = in.k.clone().requires_grad_();
    auto v = in.v.clone().requires_grad_();
    const auto before = remat::memory::current_bytes();
    auto out = attention(q, k, v, {}, AttentionOptions().kind(kind).causal(true));
    const auto bytes = remat::memory::current_bytes() - before;
    out.backward(in.grad);  // the graph is complete and usable
    EXPECT_TRUE(q.grad().defined());
    return bytes;
  };
  const auto eager = held(AttentionKind::kEager);
  const auto blocks = held(AttentionKind::kBlockwise);
  RecordProperty("eager_bytes", std::to_string(eager));
  RecordProperty("blockwise_bytes", std::to_string(blocks));
  EXPECT_GT(eager, int64_t{8} * 1024 * 1024 * 4);  // at least one [H, S, S] fp32
  EXPECT_LE(blocks * 8, eager) << "blockwise " << blocks << " B, eager " << eager << " B";
}

} // namespace
