// Per-op save policies (remat/op_policy.h) and compressed saved activations
// (remat/compress.h): what is kept, what the recompute skips, and gradients
// equal to running without checkpointing.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "remat/checkpoint.h"
#include "remat/compress.h"
#include "remat/memory.h"
#include "remat/op_policy.h"
#include "remat/policy.h"
#include "testing.h"

#include <vector>

namespace {

using torch::Tensor;
using Tensors = std::vector<Tensor>;
using remat::CheckpointOptions;
using remat::OpPolicy;

constexpr int64_t kRows = 128;
constexpr int64_t kWidth = 256;
constexpr int64_t kActivation = kRows * kWidth * 4; // bytes of one fp32 activation

class OpPolicyTest : public ::testing::Test {
 protected:
  OpPolicyTest() {
    torch::manual_seed(0);
  }
};

// Gradients of `loss_of(use_checkpoint)` with respect to `params`.
template <typename F>
Tensors grads_of(F&& loss_of, const Tensors& params) {
  for (auto p : params) {
    p.mutable_grad() = Tensor();
  }
  loss_of().backward();
  Tensors out;
  for (const auto& p : params) {
    out.push_back(p.grad().clone());
  }
  return out;
}

void expect_all_equal(const Tensors& a, const Tensors& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(torch::equal(a[i], b[i])) << "gradient " << i << " differs";
  }
}

TEST_F(OpPolicyTest, PresetsAndParse) {
  EXPECT_TRUE(OpPolicy().empty());
  EXPECT_TRUE(OpPolicy::matmuls().keeps("aten::mm"));
  EXPECT_TRUE(OpPolicy::matmuls().keeps("aten::bmm"));
  EXPECT_FALSE(OpPolicy::matmuls().keeps("aten::gelu"));
  EXPECT_TRUE(OpPolicy::projections().keeps("aten::addmm"));
  EXPECT_FALSE(OpPolicy::projections().keeps("aten::bmm"));
  EXPECT_EQ(OpPolicy::parse("matmuls"), OpPolicy::matmuls());
  EXPECT_EQ(OpPolicy::parse("projections").name(), "projections");
  const auto two = OpPolicy::parse("mm/aten::bmm");
  EXPECT_EQ(two.ops(), (std::vector<std::string>{"aten::bmm", "aten::mm"}));
  EXPECT_EQ(two.name(), "aten::bmm/aten::mm");
  EXPECT_EQ(OpPolicy::parse(two.name()), two);
  EXPECT_THROW_WITH(OpPolicy::parse("aten::mmm"), "expected ops the dispatcher knows");
  EXPECT_THROW_WITH(OpPolicy::parse("aten::mm/"), "but got 'aten::mm/'");
  EXPECT_THROW_WITH(OpPolicy::parse(""), "but got ''");
  EXPECT_THROW_WITH(
      OpPolicy::parse("aten::native_dropout"), "'aten::native_dropout' does; it is always recomputed");
}

// Three products with pointwise ops between them: with matmuls kept, forward
// holds the three product outputs (and the output); the recompute re-runs
// tanh and gelu only, skipping the three products.
TEST_F(OpPolicyTest, KeepsProductsAndSkipsThemInTheRecompute) {
  ASSERT_TRUE(remat::memory::installed());
  auto w = torch::randn({kWidth, kWidth}).mul_(0.05).requires_grad_();
  auto x = torch::randn({kRows, kWidth}).requires_grad_();
  auto fn = [&](const Tensors& in) {
    auto h = torch::tanh(torch::mm(in[0], w));
    h = torch::gelu(torch::mm(h, w));
    return Tensors{torch::sigmoid(torch::mm(h, w))};
  };
  auto run = [&](const CheckpointOptions* options, int64_t* held) {
    const auto before = remat::memory::current_bytes();
    auto out = options != nullptr ? remat::checkpoint(fn, {x}, *options)[0] : fn({x})[0];
    if (held != nullptr) {
      *held = remat::memory::current_bytes() - before;
    }
    return out.sum();
  };
  const auto plain = grads_of([&] { return run(nullptr, nullptr); }, {w, x});

  const auto keep = CheckpointOptions().op_policy(OpPolicy::matmuls());
  int64_t held = 0;
  const auto skipped = remat::op_policy_skipped_ops();
  const auto with_policy = grads_of([&] { return run(&keep, &held); }, {w, x});
  expect_all_equal(plain, with_policy);
  EXPECT_EQ(remat::op_policy_skipped_ops() - skipped, 3);
  // Three kept products and the output, and bookkeeping.
  EXPECT_GE(held, 4 * kActivation) << held;
  EXPECT_LT(held, 4 * kActivation + 16 * 1024) << held;

  // A policy that keeps nothing of these ops skips nothing.
  const auto other = CheckpointOptions().op_policy(OpPolicy::parse("aten::bmm"));
  const auto before = remat::op_policy_skipped_ops();
  expect_all_equal(plain, grads_of([&] { return run(&other, nullptr); }, {w, x}));
  EXPECT_EQ(remat::op_policy_skipped_ops(), before);
}

// The user's module: Linear is a composite op (linear -> addmm or matmul);
// the fallback looks through it to the product. Dropout draws the same mask
// in the recompute, and is never kept.
TEST_F(OpPolicyTest, UserModuleWithDropoutAndLayerNorm) {
  torch::nn::Sequential block(
      torch::nn::LayerNorm(torch::nn::LayerNormOptions({kWidth})),
      torch::nn::Linear(kWidth, 4 * kWidth), torch::nn::GELU(),
      torch::nn::Dropout(0.1), torch::nn::Linear(4 * kWidth, kWidth));
  block->train();
  auto x = torch::randn({2, 64, kWidth}).requires_grad_();
  auto params = block->parameters();
  params.push_back(x);
  auto loss = [&](bool use_checkpoint, const OpPolicy& policy) {
    torch::manual_seed(7);
    auto fn = [&](const Tensors& in) { return Tensors{block->forward(in[0]) + in[0]}; };
    auto out = use_checkpoint
        ? remat::checkpoint(fn, {x}, CheckpointOptions().op_policy(policy))[0]
        : fn({x})[0];
    return out.pow(2).mean();
  };
  const auto plain = grads_of([&] { return loss(false, {}); }, params);
  for (const auto& policy : {OpPolicy::matmuls(), OpPolicy::projections()}) {
    const auto before = remat::op_policy_skipped_ops();
    expect_all_equal(plain, grads_of([&] { return loss(true, policy); }, params));
    // The two products (and in 1.13, a bias added in place after one).
    EXPECT_GE(remat::op_policy_skipped_ops() - before, 2) << policy.name();
  }
}

// A kept output that the segment then writes into (a bias added in place).
// In 1.13 a Linear on 3-d input does this: mm, then add_ on matmul's
// _unsafe_view of its output, whose version counter is not the product's.
//   - With no read in between, the kept output takes the write, and the
//     recompute skips the add_ too: 3 ops skipped per recompute.
//   - Read before the write (y = 2h), the output is kept as it was before
//     the write, and the recompute runs the add_ on a copy: 2 ops skipped.
// Two recomputes (retain_graph) see the same kept values.
TEST_F(OpPolicyTest, OutputWrittenInPlaceIsKeptAsForwardSawIt) {
  auto w = torch::randn({kWidth, kWidth}).mul_(0.05).requires_grad_();
  auto b = torch::randn({kWidth}).requires_grad_();
  auto x = torch::randn({2, kRows, kWidth}).requires_grad_();
  for (bool read_first : {false, true}) {
    auto fn = [&](const Tensors& in) {
      auto h = torch::matmul(in[0], w);
      Tensor y = read_first ? torch::tanh(h * 2) : torch::zeros({}); // a read before the write
      h.add_(b);
      return Tensors{torch::gelu(torch::matmul(h, w)) + y};
    };
    auto grads = [&](bool use_checkpoint) {
      auto out = use_checkpoint
          ? remat::checkpoint(fn, {x}, CheckpointOptions().op_policy(OpPolicy::matmuls()))[0]
          : fn({x})[0];
      auto loss = out.sum();
      Tensors all;
      for (int i = 0; i < 2; ++i) {
        auto g = torch::autograd::grad({loss}, {w, b, x}, {}, /*retain_graph=*/true);
        all.insert(all.end(), g.begin(), g.end());
      }
      return all;
    };
    const auto plain = grads(false);
    const auto before = remat::op_policy_skipped_ops();
    expect_all_equal(plain, grads(true));
    EXPECT_EQ(remat::op_policy_skipped_ops() - before, read_first ? 4 : 6) << read_first;
  }
}

// The segment's output is a kept product (through matmul's _unsafe_view in
// 1.13), changed in place by the caller after forward: the recompute must
// not see the change.
TEST_F(OpPolicyTest, SegmentOutputChangedAfterForwardIsNotSeenByTheRecompute) {
  auto w = torch::randn({kWidth, kWidth}).mul_(0.05).requires_grad_();
  auto x = torch::randn({2, kRows, kWidth}).requires_grad_();
  auto fn = [&](const Tensors& in) {
    auto p = torch::matmul(torch::tanh(in[0]), w);
    // The recompute needs p for tanh's saved output (a product by a
    // scalar saves nothing).
    return Tensors{p, torch::tanh(p * 2)};
  };
  auto loss = [&](bool use_checkpoint) {
    auto out = use_checkpoint
        ? remat::checkpoint(fn, {x}, CheckpointOptions().op_policy(OpPolicy::matmuls()))
        : fn({x});
    auto y = out[0] * 1.0;
    out[0].mul_(3); // the caller writes into the kept product
    return (y * out[0]).sum() + out[1].sum();
  };
  const auto plain = grads_of([&] { return loss(false); }, {w, x});
  const auto before = remat::op_policy_skipped_ops();
  expect_all_equal(plain, grads_of([&] { return loss(true); }, {w, x}));
  EXPECT_EQ(remat::op_policy_skipped_ops() - before, 1);
}

// Backward twice (retain_graph) skips the kept ops both times; a nested
// checkpoint without a policy hides its ops from the outer one's.
TEST_F(OpPolicyTest, RetainGraphAndNesting) {
  auto w = torch::randn({kWidth, kWidth}).mul_(0.05).requires_grad_();
  auto x = torch::randn({kRows, kWidth}).requires_grad_();
  auto inner = [&](const Tensors& in) { return Tensors{torch::tanh(torch::mm(in[0], w))}; };
  auto fn = [&](const Tensors& in) {
    auto h = torch::gelu(torch::mm(in[0], w));
    h = remat::checkpoint(inner, {h}, CheckpointOptions().name("inner"))[0];
    return Tensors{torch::sigmoid(torch::mm(h, w))};
  };
  auto out_plain = fn({x})[0].sum();
  Tensors plain;
  for (int i = 0; i < 2; ++i) {
    auto g = torch::autograd::grad({out_plain}, {w, x}, {}, /*retain_graph=*/true);
    plain.insert(plain.end(), g.begin(), g.end());
  }
  const auto before = remat::op_policy_skipped_ops();
  auto out = remat::checkpoint(fn, {x}, CheckpointOptions().op_policy(OpPolicy::matmuls()))[0].sum();
  Tensors with_policy;
  for (int i = 0; i < 2; ++i) {
    auto g = torch::autograd::grad({out}, {w, x}, {}, /*retain_graph=*/true);
    with_policy.insert(with_policy.end(), g.begin(), g.end());
  }
  expect_all_equal(plain, with_policy);
  EXPECT_EQ(remat::op_policy_skipped_ops() - before, 4); // two products, twice
}

TEST_F(OpPolicyTest, ReentrantRefusesAPolicy) {
  auto x = torch::randn({4, 4}).requires_grad_();
  EXPECT_THROW_WITH(
      remat::checkpoint(
          [](const Tensors& in) { return Tensors{in[0].sin()}; }, {x},
          CheckpointOptions()
              .implementation(remat::CheckpointImpl::kReentrant)
              .op_policy(OpPolicy::matmuls())
              .name("s")),
      "expected no op policy with the reentrant implementation, but segment 's' has 'matmuls'");
}

TEST_F(OpPolicyTest, CheckpointPolicyNames) {
  using remat::CheckpointPolicy;
  const auto p = CheckpointPolicy::parse("save-matmuls");
  EXPECT_EQ(p.kind(), CheckpointPolicy::Kind::kSaveOps);
  EXPECT_EQ(p.name(), "save-matmuls");
  EXPECT_FALSE(p.checkpoint().has_value());
  // A preset is a segment mode, which a planner can mix with others per layer,
  // and Schedule::parse reads back.
  const auto s = p.schedule(4);
  EXPECT_EQ(s.str(), "save-matmuls[0,4)");
  EXPECT_EQ(remat::Schedule::parse(s.str()).segments, s.segments);
  EXPECT_EQ(remat::op_policy_of(remat::SegmentMode::kSaveMatmuls), OpPolicy::matmuls());
  EXPECT_EQ(remat::op_policy_of(remat::SegmentMode::kSaveProjections), OpPolicy::projections());
  EXPECT_TRUE(remat::op_policy_of(remat::SegmentMode::kCompress).empty());
  EXPECT_EQ(CheckpointPolicy::save_ops(OpPolicy::projections()).schedule(2).str(),
            "save-projections[0,2)");

  const auto v = CheckpointPolicy::parse("save-projections+values");
  EXPECT_EQ(v.name(), "save-projections+values");
  EXPECT_EQ(v.schedule(2).str(), "save-projections[0,2)");
  EXPECT_TRUE(v.checkpoint()->op_policy.empty());
  EXPECT_EQ(v.checkpoint()->determinism_check, remat::DeterminismCheck::kValues);
  EXPECT_THROW_WITH(
      CheckpointPolicy::parse("save-matmuls+save=aten::mm"),
      "expected +save=OPS on a policy without an op policy of its own, but 'save-matmuls' keeps matmuls");
  EXPECT_THROW_WITH(
      CheckpointPolicy::parse("save-projections+reentrant"),
      "expected a per-op policy without +reentrant");

  const auto custom = CheckpointPolicy::parse("every-2+save=aten::mm/aten::addmm");
  EXPECT_EQ(custom.name(), "every-2+save=aten::addmm/aten::mm");
  EXPECT_EQ(custom.schedule(4).str(), "recompute[0,2) recompute[2,4)");
  EXPECT_EQ(CheckpointPolicy::save_ops(OpPolicy::keep({"aten::mm"})).schedule(2).str(),
            "recompute[0,1) recompute[1,2)");
  EXPECT_EQ(CheckpointPolicy::parse(custom.name()).checkpoint()->op_policy,
            custom.checkpoint()->op_policy);

  EXPECT_THROW_WITH(
      CheckpointPolicy::parse("every-layer+save=matmuls+reentrant"),
      "expected +save=OPS without +reentrant");
  EXPECT_THROW_WITH(CheckpointPolicy::parse("none+save=matmuls"), "expected a policy that checkpoints");
  EXPECT_THROW_WITH(CheckpointPolicy::parse("compress+values"), "expected a policy that checkpoints");
  EXPECT_THROW_WITH(CheckpointPolicy::parse("every-layer+save=nothing"), "but got 'nothing'");

  const auto o = CheckpointPolicy::parse("offload");
  EXPECT_EQ(o.kind(), CheckpointPolicy::Kind::kOffload);
  EXPECT_TRUE(o.schedule(2).offload);
  EXPECT_FALSE(CheckpointPolicy::parse("none").schedule(2).offload);
  EXPECT_THROW_WITH(CheckpointPolicy::parse("offload+values"), "expected a policy that checkpoints");

  const auto c = CheckpointPolicy::parse("compress");
  EXPECT_EQ(c.kind(), CheckpointPolicy::Kind::kCompress);
  const auto cs = c.schedule(3);
  EXPECT_EQ(cs.str(), "compress[0,3)");
  ASSERT_TRUE(cs.compress.has_value());
  EXPECT_EQ(*cs.compress, torch::kBFloat16);
  if (remat::fp8_available()) {
    EXPECT_EQ(CheckpointPolicy::parse("compress-fp8").name(), "compress-fp8");
  } else {
    EXPECT_THROW_WITH(CheckpointPolicy::parse("compress-fp8"), "its float8 dtypes came in 2.1");
  }
}

// ------------------------------------------------------------ compression

// An MLP's activations stored as bf16: about half the bytes of fp32, the
// parameters left alone, and gradients within 1% (relative, in the L2 norm)
// of the exact ones.
TEST_F(OpPolicyTest, CompressedSavesHalveTheBytesWithinTheStatedError) {
  ASSERT_TRUE(remat::memory::installed());
  torch::nn::Sequential mlp(
      torch::nn::Linear(kWidth, 4 * kWidth), torch::nn::GELU(),
      torch::nn::Linear(4 * kWidth, kWidth), torch::nn::Tanh());
  auto x = torch::randn({kRows, kWidth});
  auto params = mlp->parameters();
  auto run = [&](bool compress, int64_t* held) {
    std::optional<remat::CompressedSavesGuard> guard;
    if (compress) {
      guard.emplace(torch::kBFloat16);
    }
    const auto before = remat::memory::current_bytes();
    auto out = mlp->forward(x);
    *held = remat::memory::current_bytes() - before;
    guard.reset();
    return out.pow(2).sum();
  };
  int64_t exact_bytes = 0;
  int64_t compressed_bytes = 0;
  const auto exact = grads_of([&] { return run(false, &exact_bytes); }, params);
  const auto compressed = grads_of([&] { return run(true, &compressed_bytes); }, params);
  // Saved: the first product's output (4x wide) for GELU, GELU's output for
  // the second Linear, Tanh's output (also the forward's output, kept fp32).
  EXPECT_LT(compressed_bytes, exact_bytes * 0.7) << compressed_bytes << " vs " << exact_bytes;
  for (size_t i = 0; i < exact.size(); ++i) {
    const double err = (compressed[i] - exact[i]).norm().item<double>() /
        exact[i].norm().item<double>();
    EXPECT_LT(err, 1e-2) << "gradient " << i;
    EXPECT_GT(err, 0) << "gradient " << i << ": nothing was compressed";
  }
}

TEST_F(OpPolicyTest, CompressHooksRoundTrip) {
  remat::CompressHooks bf16(torch::kBFloat16, /*min_bytes=*/0);
  auto leaf = torch::randn({64}).requires_grad_();
  auto made = leaf * 2;
  // A parameter is saved as it is; an activation as bf16, within 2^-8.
  EXPECT_TRUE(bf16.unpack(bf16.pack(leaf)).is_same(leaf));
  auto back = bf16.unpack(bf16.pack(made));
  EXPECT_EQ(back.scalar_type(), torch::kFloat);
  EXPECT_LE((back - made).abs().max().item<double>(), made.abs().max().item<double>() / 256);
  auto ints = torch::arange(64) * 2;
  EXPECT_TRUE(bf16.unpack(bf16.pack(ints)).is_same(ints));
  EXPECT_THROW_WITH((remat::CompressHooks(torch::kInt8)), "expected torch::kBFloat16");
  EXPECT_THROW_WITH((remat::CompressHooks(torch::kBFloat16, -1)), "expected min_bytes >= 0");
  EXPECT_THROW_WITH(remat::parse_compression("fp4"), "but got 'fp4'");
  if (remat::fp8_available()) {
    remat::CompressHooks fp8(remat::parse_compression("fp8"), 0);
    auto big = made * 1000;
    auto f = fp8.unpack(fp8.pack(big));
    EXPECT_EQ(f.scalar_type(), torch::kFloat);
    // e4m3: 3 mantissa bits, scaled to the largest |x|.
    EXPECT_LE((f - big).abs().max().item<double>(), big.abs().max().item<double>() / 16);
  }
}

} // namespace
