#include "remat/checkpoint.h"
#include "remat/memory.h"
#include "remat/nn/attention.h"

#include "remat/autocast.h"
#include "compat/torch.h"

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <limits>

namespace {

using remat::nn::AttentionKind;
using remat::nn::AttentionOptions;
using remat::nn::attention;
using remat::nn::repeat_kv;

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
  if (!remat::compat::kHasSdpa) {
    try {
      attention(in.q, in.k, in.v, {}, o);
      FAIL() << "expected an error";
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what()).find("sdpa needs LibTorch >= 2.0, but this build has 1.13"),
                std::string::npos) << e.what();
    }
    return;
  }
  auto r = run(in, {}, o);
  auto e = run(in, {}, AttentionOptions().causal(true));
  EXPECT_LE(max_diff(r.out, e.out), 1e-5);
  EXPECT_LE(max_diff(r.dq, e.dq), 1e-5);
  // Cache offset and a padding mask go through an explicit bias.
  auto in2 = make({2, 2, 4, 16, 8});
  auto mask = padding_mask({2, 2, 4, 16, 8}, 3);
  EXPECT_LE(max_diff(run(in2, mask, o).out, run(in2, mask, AttentionOptions().causal(true)).out),
            1e-5);
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

// ---------------------------------------------------------------------------
// checkpointed_attention: the selective-attention core.

TEST_F(AttentionTest, RepeatKvGivesEachQueryHeadItsGroupsKeyValueHead) {
  auto kv = torch::randn({2, 3, 5, 4});
  auto out = repeat_kv(kv, 4);
  ASSERT_EQ(out.sizes(), torch::IntArrayRef({2, 12, 5, 4}));
  for (int64_t h = 0; h < 12; ++h) {
    EXPECT_TRUE(torch::equal(out.select(1, h), kv.select(1, h / 4))) << h;
  }
  EXPECT_TRUE(repeat_kv(kv, 1).is_same(kv));
  try {
    repeat_kv(torch::randn({3, 5, 4}), 2);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find(
                  "expected [batch, kv_heads, seq, dim] and groups >= 1, but got [3, 5, 4]"),
              std::string::npos) << e.what();
  }
}

struct CoreCase {
  Shape shape;
  int64_t kv_heads;
  bool causal;
  bool padded;
  double dropout;
};

// Output and gradients of checkpointed_attention against attention() on
// repeated heads, from the same RNG state: bit-equal for eager.
void expect_bit_equal_to_attention(const CoreCase& c, AttentionKind kind) {
  const auto& s = c.shape;
  const int64_t groups = s.heads / c.kv_heads;
  torch::manual_seed(1);
  auto q0 = torch::randn({s.batch, s.heads, s.sq, s.dim});
  auto k0 = torch::randn({s.batch, c.kv_heads, s.sk, s.dim});
  auto v0 = torch::randn({s.batch, c.kv_heads, s.sk, s.dim});
  auto grad = torch::randn({s.batch, s.heads, s.sq, s.dim});
  torch::Tensor mask;
  if (c.padded) {
    mask = torch::zeros({s.batch, 1, 1, s.sk});
    mask.index_put_({0, 0, 0, torch::indexing::Slice(s.sk - 3)}, -1e9);
  }
  auto o = AttentionOptions().kind(kind).causal(c.causal).dropout(c.dropout).training(true);
  auto run = [&](bool kept) {
    auto q = q0.clone().requires_grad_();
    auto k = k0.clone().requires_grad_();
    auto v = v0.clone().requires_grad_();
    torch::manual_seed(7);
    auto out = kept ? remat::nn::checkpointed_attention(q, k, v, mask, o)
                    : attention(q, repeat_kv(k, groups), repeat_kv(v, groups), mask, o);
    // The RNG stream after the call is the same too.
    auto next = torch::rand({1});
    out.backward(grad);
    return std::vector<torch::Tensor>{out.detach(), q.grad(), k.grad(), v.grad(), next};
  };
  auto want = run(false);
  auto got = run(true);
  SCOPED_TRACE(
      std::string(remat::nn::to_string(kind)) + " heads " + std::to_string(s.heads) +
      " kv " + std::to_string(c.kv_heads) + " sq " + std::to_string(s.sq) + " sk " +
      std::to_string(s.sk) + " causal " + std::to_string(c.causal) + " padded " +
      std::to_string(c.padded) + " dropout " + std::to_string(c.dropout));
  const char* names[] = {"out", "dq", "dk", "dv", "rng"};
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_TRUE(got[i].defined()) << names[i];
    EXPECT_TRUE(torch::equal(got[i], want[i]))
        << names[i] << " differs by " << (got[i] - want[i]).abs().max().item<double>();
  }
}

TEST_F(AttentionTest, CheckpointedEagerIsBitEqualToEager) {
  for (const auto& c : std::vector<CoreCase>{
           {{2, 4, 24, 24, 8}, 4, false, false, 0.0},
           {{2, 4, 24, 24, 8}, 4, true, false, 0.0},
           {{2, 4, 24, 24, 8}, 2, true, false, 0.0},   // grouped-query
           {{2, 4, 24, 24, 8}, 1, true, true, 0.0},    // multi-query, padded
           {{2, 4, 6, 20, 8}, 2, true, false, 0.0},    // queries after a cache
           {{2, 4, 24, 24, 8}, 4, false, true, 0.2},   // BERT-like dropout
           {{2, 4, 24, 24, 8}, 2, true, false, 0.3}}) {
    expect_bit_equal_to_attention(c, AttentionKind::kEager);
  }
}

TEST_F(AttentionTest, CheckpointedBlockwiseIsBitEqualToBlockwise) {
  expect_bit_equal_to_attention({{2, 4, 40, 40, 8}, 2, true, false, 0.0}, AttentionKind::kBlockwise);
  expect_bit_equal_to_attention({{2, 4, 40, 40, 8}, 4, false, true, 0.1}, AttentionKind::kBlockwise);
}

TEST_F(AttentionTest, CheckpointedEagerCountsItsRecompute) {
  auto in = make({1, 2, 8, 8, 4});
  auto q = in.q.clone().requires_grad_();
  const auto before = remat::recompute_count();
  auto out = remat::nn::checkpointed_attention(q, in.k, in.v, {}, AttentionOptions());
  EXPECT_EQ(remat::recompute_count(), before);
  out.backward(in.grad);
  EXPECT_EQ(remat::recompute_count(), before + 1);
}

// A frozen k and v (a LoRA adapter only on q): only q gets a gradient, and
// it is eager's.
TEST_F(AttentionTest, CheckpointedEagerGivesOnlyTheGradientsAskedFor) {
  auto in = make({2, 2, 16, 16, 8});
  auto q1 = in.q.clone().requires_grad_();
  attention(q1, in.k, in.v, {}, AttentionOptions().causal(true)).backward(in.grad);
  auto q2 = in.q.clone().requires_grad_();
  auto out = remat::nn::checkpointed_attention(q2, in.k, in.v, {}, AttentionOptions().causal(true));
  out.backward(in.grad);
  EXPECT_TRUE(torch::equal(q1.grad(), q2.grad()));

  // Only v: the probabilities need no graph.
  auto v = in.v.clone().requires_grad_();
  auto v_ref = in.v.clone().requires_grad_();
  remat::nn::checkpointed_attention(in.q, in.k, v, {}, AttentionOptions()).backward(in.grad);
  attention(in.q, in.k, v_ref, {}, AttentionOptions()).backward(in.grad);
  EXPECT_TRUE(torch::equal(v.grad(), v_ref.grad()));
}

// Under autocast it falls back to checkpoint(), which replays the autocast
// state: still equal to attention() under the same autocast.
TEST_F(AttentionTest, CheckpointedEagerUnderAutocastMatchesAttention) {
  auto in = make({2, 2, 16, 16, 8});
  auto run = [&](bool kept) {
    auto q = in.q.clone().requires_grad_();
    auto k = in.k.clone().requires_grad_();
    auto v = in.v.clone().requires_grad_();
    torch::Tensor out;
    {
      remat::AutocastScope bf16(remat::AutocastState{true, torch::kBFloat16, false, torch::kHalf});
      out = kept ? remat::nn::checkpointed_attention(q, k, v, {}, AttentionOptions().causal(true))
                 : attention(q, k, v, {}, AttentionOptions().causal(true));
    }
    EXPECT_EQ(out.scalar_type(), torch::kBFloat16);
    out.backward(in.grad.to(torch::kBFloat16));
    return std::vector<torch::Tensor>{out, q.grad(), k.grad(), v.grad()};
  };
  auto want = run(false);
  auto got = run(true);
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_TRUE(torch::equal(got[i], want[i])) << i;
  }
}

// create_graph: the gradient is itself differentiable, and its gradient
// equals eager's (double backward, as a gradient penalty needs).
TEST_F(AttentionTest, CheckpointedEagerSupportsDoubleBackward) {
  auto in = make({1, 2, 8, 8, 4}, torch::kDouble);
  in.grad = in.grad.to(torch::kDouble);
  auto run = [&](bool kept) {
    auto q = in.q.clone().requires_grad_();
    auto k = in.k.clone().requires_grad_();
    auto out = kept ? remat::nn::checkpointed_attention(q, k, in.v, {}, AttentionOptions().causal(true))
                    : attention(q, k, in.v, {}, AttentionOptions().causal(true));
    auto dq = torch::autograd::grad({out}, {q}, {in.grad}, /*retain_graph=*/true,
                                    /*create_graph=*/true)[0];
    dq.pow(2).sum().backward();
    return std::vector<torch::Tensor>{dq.detach(), q.grad(), k.grad()};
  };
  auto want = run(false);
  auto got = run(true);
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_TRUE(got[i].defined()) << i;
    EXPECT_LE((got[i] - want[i]).abs().max().item<double>(), 1e-12) << i;
  }
}

TEST_F(AttentionTest, CheckpointedAttentionRefusesHeadsThatDoNotGroup) {
  auto q = torch::randn({1, 3, 8, 4});
  auto kv = torch::randn({1, 2, 8, 4});
  try {
    remat::nn::checkpointed_attention(q, kv, kv, {}, AttentionOptions());
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("heads a multiple of kv_heads, but got [1, 3, 8, 4]"),
              std::string::npos) << e.what();
  }
}

// What selective-attention is for: after forward nothing [S, S] is held,
// only the output (q, k and v are the caller's).
TEST_F(AttentionTest, CheckpointedEagerHoldsOnlyItsOutputAfterForward) {
  ASSERT_TRUE(remat::memory::installed());
  auto in = make({1, 8, 512, 512, 64});
  auto q = in.q.clone().requires_grad_();
  auto k = in.k.clone().requires_grad_();
  auto v = in.v.clone().requires_grad_();
  const auto before = remat::memory::current_bytes();
  auto out = remat::nn::checkpointed_attention(q, k, v, {}, AttentionOptions().causal(true));
  const auto held = remat::memory::current_bytes() - before;
  EXPECT_EQ(held, out.numel() * 4);
  out.backward(in.grad);
  EXPECT_TRUE(q.grad().defined() && k.grad().defined() && v.grad().defined());
}

// Its backward frees each [S, S] gradient as soon as it is used, as the
// reentrant checkpoint's does: its peak is no higher. (The default
// checkpoint, on saved-tensor hooks, lets each recomputed tensor go as its
// node runs and peaks lower still: 7,934,912 bytes against 8,454,144 here.)
TEST_F(AttentionTest, CheckpointedEagerPeaksNoHigherThanACheckpointedCore) {
  ASSERT_TRUE(remat::memory::installed());
  auto in = make({1, 8, 256, 256, 64});
  auto peak = [&](bool kept) {
    auto q = in.q.clone().requires_grad_();
    auto k = in.k.clone().requires_grad_();
    auto v = in.v.clone().requires_grad_();
    auto grad = in.grad.clone();
    const auto o = AttentionOptions().causal(true);
    remat::memory::reset_peak();
    const auto before = remat::memory::current_bytes();
    auto out = kept ? remat::nn::checkpointed_attention(q, k, v, {}, o)
                    : remat::checkpoint(
                          [o](const std::vector<torch::Tensor>& t) {
                            return std::vector<torch::Tensor>{attention(t[0], t[1], t[2], {}, o)};
                          },
                          {q, k, v},
                          remat::CheckpointOptions().implementation(
                              remat::CheckpointImpl::kReentrant))[0];
    out.backward(grad);
    return remat::memory::peak_bytes() - before;
  };
  const auto generic = peak(false);
  const auto lean = peak(true);
  RecordProperty("checkpoint_peak_bytes", std::to_string(generic));
  RecordProperty("checkpointed_attention_peak_bytes", std::to_string(lean));
  EXPECT_LE(lean, generic);
  // At most three [8, 256, 256] fp32 tensors at once (probabilities, their
  // gradient, the scores' gradient) besides q, k, v and their gradients.
  EXPECT_LE(lean, 3 * 8 * 256 * 256 * 4 + 7 * 8 * 256 * 64 * 4);
}

} // namespace
