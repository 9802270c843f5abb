#include "remat/nn/fused.h"

#include "remat/autocast.h"
#include "remat/checkpoint.h"
#include "remat/memory.h"
#include "remat/nn/llama.h"
#include "remat/nn/lora.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>

namespace {

using Tensors = std::vector<torch::Tensor>;

// The compositions the fused functions replace, as remat's Llama ran them.
torch::Tensor eager_rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  auto h = x.to(torch::kFloat);
  h = h * torch::rsqrt(h.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return w * h.to(x.scalar_type());
}

torch::Tensor eager_swiglu(const torch::Tensor& gate, const torch::Tensor& up) {
  return torch::silu(gate) * up;
}

torch::Tensor eager_swiglu_linear(
    const torch::Tensor& gate,
    const torch::Tensor& up,
    const torch::Tensor& w) {
  return torch::linear(torch::silu(gate) * up, w);
}

remat::AutocastState bf16_autocast() {
  remat::AutocastState s;
  s.cpu_enabled = true;
  s.cpu_dtype = torch::kBFloat16;
  return s;
}

class FusedTest : public ::testing::Test {
 protected:
  FusedTest() { torch::manual_seed(0); }

  static std::string error_of(const std::function<void()>& f) {
    try {
      f();
    } catch (const c10::Error& e) {
      return e.what();
    }
    return "";
  }

  // Output and the gradients of every input that requires grad, for a
  // random upstream gradient (the same for both runs: seeded by the caller).
  struct Run {
    torch::Tensor out;
    Tensors grads; ///< undefined where the input does not require grad
  };

  static Run run(
      const std::function<torch::Tensor(const Tensors&)>& fn,
      const Tensors& inputs,
      const torch::Tensor& upstream,
      const remat::AutocastState& autocast = {}) {
    Tensors leaves;
    for (const auto& t : inputs) {
      leaves.push_back(t.detach().requires_grad_(t.requires_grad()));
    }
    Run r;
    {
      remat::AutocastScope scope(autocast);
      r.out = fn(leaves);
    }
    at::autocast::clear_cache();
    (r.out.to(torch::kFloat) * upstream).sum().backward();
    for (const auto& t : leaves) {
      r.grads.push_back(t.grad().defined() ? t.grad().clone() : torch::Tensor());
    }
    return r;
  }

  // max |a - b| <= atol + rtol * max |b|, dtypes and shapes equal.
  static void expect_close(
      const torch::Tensor& a,
      const torch::Tensor& b,
      double rtol,
      double atol,
      const std::string& what) {
    ASSERT_EQ(a.defined(), b.defined()) << what;
    if (!a.defined()) {
      return;
    }
    EXPECT_EQ(a.scalar_type(), b.scalar_type()) << what;
    ASSERT_EQ(a.sizes(), b.sizes()) << what;
    const auto af = a.to(torch::kDouble);
    const auto bf = b.to(torch::kDouble);
    const double diff = (af - bf).abs().max().item<double>();
    const double scale = bf.abs().max().item<double>();
    EXPECT_LE(diff, atol + rtol * scale) << what << " (max |b| " << scale << ")";
  }

  static void expect_same_run(
      const Run& fused,
      const Run& eager,
      double rtol,
      double atol,
      const std::string& what) {
    expect_close(fused.out, eager.out, rtol, atol, what + ": output");
    ASSERT_EQ(fused.grads.size(), eager.grads.size());
    for (size_t i = 0; i < fused.grads.size(); ++i) {
      expect_close(
          fused.grads[i], eager.grads[i], rtol, atol,
          what + ": grad of input " + std::to_string(i));
    }
  }

  // fp32: the fused backward reorders a few float operations.
  static constexpr double kRtol32 = 1e-5;
  static constexpr double kAtol32 = 1e-6;
  // bf16 (8 bits of mantissa): a few ulps of the largest value.
  static constexpr double kRtolBf16 = 3e-2;
  static constexpr double kAtolBf16 = 1e-2;
};

constexpr double kEps = 1e-6;

TEST_F(FusedTest, RmsNormMatchesEagerInFloat32) {
  auto x = torch::randn({3, 5, 37}).requires_grad_();
  auto w = (torch::randn({37}) + 1).requires_grad_();
  auto upstream = torch::randn({3, 5, 37});
  auto fused = run([](const Tensors& t) { return remat::nn::rms_norm(t[0], t[1], kEps); },
                   {x, w}, upstream);
  auto eager = run([](const Tensors& t) { return eager_rms_norm(t[0], t[1], kEps); },
                   {x, w}, upstream);
  // Forward runs the eager ops: bit-equal.
  EXPECT_TRUE(torch::equal(fused.out, eager.out));
  expect_same_run(fused, eager, kRtol32, kAtol32, "rms_norm");
}

TEST_F(FusedTest, SwigluAndSwigluLinearMatchEagerInFloat32) {
  auto gate = torch::randn({2, 7, 24}).requires_grad_();
  auto up = torch::randn({2, 7, 24}).requires_grad_();
  auto w = (torch::randn({10, 24}) * 0.2).requires_grad_();
  auto upstream = torch::randn({2, 7, 10});
  auto fused = run([](const Tensors& t) { return remat::nn::swiglu_linear(t[0], t[1], t[2]); },
                   {gate, up, w}, upstream);
  auto eager = run([](const Tensors& t) { return eager_swiglu_linear(t[0], t[1], t[2]); },
                   {gate, up, w}, upstream);
  expect_same_run(fused, eager, kRtol32, kAtol32, "swiglu_linear");

  auto upstream_i = torch::randn({2, 7, 24});
  auto fused_s = run([](const Tensors& t) { return remat::nn::swiglu(t[0], t[1]); },
                     {gate, up}, upstream_i);
  auto eager_s = run([](const Tensors& t) { return eager_swiglu(t[0], t[1]); },
                     {gate, up}, upstream_i);
  EXPECT_TRUE(torch::equal(fused_s.out, eager_s.out));
  expect_same_run(fused_s, eager_s, kRtol32, kAtol32, "swiglu");
}

TEST_F(FusedTest, NonContiguousInputsAndOddShapes) {
  // x [3, 5, 37] as a permuted view; a 1-D x; a 4-D x.
  for (const auto& x : Tensors{torch::randn({37, 5, 3}).permute({2, 1, 0}),
                               torch::randn({13}), torch::randn({2, 1, 3, 13})}) {
    SCOPED_TRACE(::testing::Message() << "x " << x.sizes());
    const auto h = x.size(-1);
    auto w = torch::randn({2 * h}).slice(0, 0, 2 * h, 2).requires_grad_(); // strided
    auto xr = x.detach().requires_grad_();
    auto upstream = torch::randn(x.sizes());
    auto fused = run([](const Tensors& t) { return remat::nn::rms_norm(t[0], t[1], 1e-5); },
                     {xr, w}, upstream);
    auto eager = run([](const Tensors& t) { return eager_rms_norm(t[0], t[1], 1e-5); },
                     {xr, w}, upstream);
    expect_same_run(fused, eager, kRtol32, kAtol32, "rms_norm");
  }
  // gate and up as transposed views, the weight a transposed view, a 2-D
  // and a 4-D batch, odd sizes.
  struct Case {
    torch::Tensor gate, up, w;
  };
  std::vector<Case> cases{
      {torch::randn({11, 6}).t(), torch::randn({11, 6}).t(), torch::randn({11, 5}).t()},
      {torch::randn({2, 3, 9, 4}).transpose(2, 3), torch::randn({2, 3, 4, 9}),
       torch::randn({7, 9})},
      {torch::randn({1, 1}), torch::randn({1, 1}), torch::randn({1, 1})}};
  for (auto& c : cases) {
    SCOPED_TRACE(::testing::Message() << "gate " << c.gate.sizes() << " w " << c.w.sizes());
    Tensors in{c.gate.requires_grad_(), c.up.requires_grad_(), c.w.requires_grad_()};
    auto out_shape = c.gate.sizes().vec();
    out_shape.back() = c.w.size(0);
    auto upstream = torch::randn(out_shape);
    auto fused = run([](const Tensors& t) { return remat::nn::swiglu_linear(t[0], t[1], t[2]); },
                     in, upstream);
    auto eager = run([](const Tensors& t) { return eager_swiglu_linear(t[0], t[1], t[2]); },
                     in, upstream);
    expect_same_run(fused, eager, kRtol32, kAtol32, "swiglu_linear");
    auto upstream_i = torch::randn(c.gate.sizes());
    auto fused_s = run([](const Tensors& t) { return remat::nn::swiglu(t[0], t[1]); },
                       {in[0], in[1]}, upstream_i);
    auto eager_s = run([](const Tensors& t) { return eager_swiglu(t[0], t[1]); },
                       {in[0], in[1]}, upstream_i);
    expect_same_run(fused_s, eager_s, kRtol32, kAtol32, "swiglu");
  }
}

// Under LoRA the base weights are frozen: no weight gradient, and the
// inputs' gradients are still right. And the other way round: only the
// weight trains.
TEST_F(FusedTest, FrozenWeightOrFrozenInputs) {
  auto x = torch::randn({4, 6, 16}).requires_grad_();
  auto w = torch::randn({16}); // frozen
  auto upstream = torch::randn({4, 6, 16});
  auto fused = run([](const Tensors& t) { return remat::nn::rms_norm(t[0], t[1], kEps); },
                   {x, w}, upstream);
  auto eager = run([](const Tensors& t) { return eager_rms_norm(t[0], t[1], kEps); },
                   {x, w}, upstream);
  EXPECT_FALSE(fused.grads[1].defined());
  expect_same_run(fused, eager, kRtol32, kAtol32, "rms_norm, frozen weight");

  auto gate = torch::randn({4, 6, 20}).requires_grad_();
  auto up = torch::randn({4, 6, 20}).requires_grad_();
  auto down = torch::randn({16, 20}) * 0.2; // frozen
  auto f2 = run([](const Tensors& t) { return remat::nn::swiglu_linear(t[0], t[1], t[2]); },
                {gate, up, down}, upstream);
  auto e2 = run([](const Tensors& t) { return eager_swiglu_linear(t[0], t[1], t[2]); },
                {gate, up, down}, upstream);
  EXPECT_FALSE(f2.grads[2].defined());
  expect_same_run(f2, e2, kRtol32, kAtol32, "swiglu_linear, frozen weight");

  // Only the weights train.
  auto wt = w.clone().requires_grad_();
  auto f3 = run([](const Tensors& t) { return remat::nn::rms_norm(t[0], t[1], kEps); },
                {x.detach(), wt}, upstream);
  auto e3 = run([](const Tensors& t) { return eager_rms_norm(t[0], t[1], kEps); },
                {x.detach(), wt}, upstream);
  EXPECT_FALSE(f3.grads[0].defined());
  expect_same_run(f3, e3, kRtol32, kAtol32, "rms_norm, frozen input");
  auto dt = down.clone().requires_grad_();
  auto f4 = run([](const Tensors& t) { return remat::nn::swiglu_linear(t[0], t[1], t[2]); },
                {gate.detach(), up.detach(), dt}, upstream);
  auto e4 = run([](const Tensors& t) { return eager_swiglu_linear(t[0], t[1], t[2]); },
                {gate.detach(), up.detach(), dt}, upstream);
  expect_same_run(f4, e4, kRtol32, kAtol32, "swiglu_linear, frozen inputs");
}

// CPU autocast to bf16: the linear runs in bf16 (output bf16), rms_norm in
// float32 with its output promoted as eager's; every gradient in its input's
// dtype, as eager gives it.
TEST_F(FusedTest, Bf16AutocastMatchesEagerDtypesAndValues) {
  const auto bf16 = bf16_autocast();
  auto x = torch::randn({2, 9, 32}).requires_grad_();
  auto w = (torch::randn({32}) + 1).requires_grad_();
  auto up32 = torch::randn({2, 9, 32});
  for (const auto& xin : Tensors{x, x.detach().to(torch::kBFloat16).requires_grad_()}) {
    SCOPED_TRACE(::testing::Message() << "x " << xin.scalar_type());
    auto fused = run([](const Tensors& t) { return remat::nn::rms_norm(t[0], t[1], kEps); },
                     {xin, w}, up32, bf16);
    auto eager = run([](const Tensors& t) { return eager_rms_norm(t[0], t[1], kEps); },
                     {xin, w}, up32, bf16);
    expect_same_run(fused, eager, kRtolBf16, kAtolBf16, "rms_norm under autocast");
  }

  // gate and up as the autocast linears give them (bf16), or float32 (a
  // caller's own); the weight float32 (master weights) or bf16.
  auto upstream = torch::randn({2, 9, 12});
  for (auto act : {torch::kBFloat16, torch::kFloat}) {
    for (auto wdtype : {torch::kFloat, torch::kBFloat16}) {
      SCOPED_TRACE(::testing::Message() << "activations " << act << ", weight " << wdtype);
      auto gate = torch::randn({2, 9, 40}).to(act).requires_grad_();
      auto up = torch::randn({2, 9, 40}).to(act).requires_grad_();
      auto down = (torch::randn({12, 40}) * 0.2).to(wdtype).requires_grad_();
      auto fused = run(
          [](const Tensors& t) { return remat::nn::swiglu_linear(t[0], t[1], t[2]); },
          {gate, up, down}, upstream, bf16);
      auto eager = run(
          [](const Tensors& t) { return eager_swiglu_linear(t[0], t[1], t[2]); },
          {gate, up, down}, upstream, bf16);
      EXPECT_EQ(fused.out.scalar_type(), torch::kBFloat16);
      expect_same_run(fused, eager, kRtolBf16, kAtolBf16, "swiglu_linear under autocast");
    }
  }
}

// A backward called inside an autocast region (not where the forward decided
// its dtype) computes in the forward's dtype all the same.
TEST_F(FusedTest, BackwardUnderAutocastUsesTheForwardsDtype) {
  auto gate = torch::randn({3, 8}).requires_grad_();
  auto up = torch::randn({3, 8}).requires_grad_();
  auto down = torch::randn({5, 8}).requires_grad_();
  auto upstream = torch::randn({3, 5});
  auto plain = run([](const Tensors& t) { return remat::nn::swiglu_linear(t[0], t[1], t[2]); },
                   {gate, up, down}, upstream);
  Tensors g2{gate.detach().requires_grad_(), up.detach().requires_grad_(),
             down.detach().requires_grad_()};
  auto out = remat::nn::swiglu_linear(g2[0], g2[1], g2[2]);
  ASSERT_EQ(out.scalar_type(), torch::kFloat);
  {
    remat::AutocastScope scope(bf16_autocast());
    (out * upstream).sum().backward();
  }
  at::autocast::clear_cache();
  for (size_t i = 0; i < g2.size(); ++i) {
    EXPECT_TRUE(torch::equal(g2[i].grad(), plain.grads[i])) << "input " << i;
  }
}

TEST_F(FusedTest, PureBf16MatchesEager) {
  auto x = torch::randn({4, 10, 24}).to(torch::kBFloat16).requires_grad_();
  auto w = (torch::randn({24}) + 1).to(torch::kBFloat16).requires_grad_();
  auto upstream = torch::randn({4, 10, 24});
  auto fused = run([](const Tensors& t) { return remat::nn::rms_norm(t[0], t[1], kEps); },
                   {x, w}, upstream);
  auto eager = run([](const Tensors& t) { return eager_rms_norm(t[0], t[1], kEps); },
                   {x, w}, upstream);
  EXPECT_TRUE(torch::equal(fused.out, eager.out));
  // grad_weight sums 40 rows: bf16 rounding of eager's running sum differs
  // from the fused float32 one by more than an ulp.
  expect_same_run(fused, eager, kRtolBf16, kAtolBf16, "rms_norm bf16");

  auto gate = torch::randn({4, 10, 24}).to(torch::kBFloat16).requires_grad_();
  auto up = torch::randn({4, 10, 24}).to(torch::kBFloat16).requires_grad_();
  auto down = (torch::randn({6, 24}) * 0.2).to(torch::kBFloat16).requires_grad_();
  auto upstream6 = torch::randn({4, 10, 6});
  auto f2 = run([](const Tensors& t) { return remat::nn::swiglu_linear(t[0], t[1], t[2]); },
                {gate, up, down}, upstream6);
  auto e2 = run([](const Tensors& t) { return eager_swiglu_linear(t[0], t[1], t[2]); },
                {gate, up, down}, upstream6);
  expect_same_run(f2, e2, kRtolBf16, kAtolBf16, "swiglu_linear bf16");
}

// Bytes held from forward to backward, counted by remat's allocator
// (installed by the test main). The inputs are made inside the measured
// window and dropped after the call, so what they keep counts too.
TEST_F(FusedTest, RmsNormKeepsItsInputAndRstdOnly) {
  ASSERT_TRUE(remat::memory::installed());
  const int64_t rows = 2 * 64, h = 96;
  auto leaf = torch::randn({2, 64, h}).requires_grad_();
  auto w = torch::ones({h}).requires_grad_();
  auto held_by = [&](const std::function<torch::Tensor(const torch::Tensor&)>& f) {
    const auto before = remat::memory::current_bytes();
    auto x = leaf * 2; // saves nothing (a scalar)
    auto out = f(x);
    x = torch::Tensor();
    const auto held = remat::memory::current_bytes() - before;
    out.sum().backward();
    return held;
  };
  const int64_t x_bytes = rows * h * 4;
  const int64_t rstd_bytes = rows * 4;
  const auto fused = held_by([&](const torch::Tensor& x) { return remat::nn::rms_norm(x, w, kEps); });
  EXPECT_EQ(fused, x_bytes /*x*/ + rstd_bytes + x_bytes /*output*/);
  const auto eager = held_by([&](const torch::Tensor& x) { return eager_rms_norm(x, w, kEps); });
  // Eager keeps the normalised tensor too (and the squares on LibTorch 1.13).
  EXPECT_GE(eager, fused + x_bytes);

  // bf16 input: x is kept in bf16, not as its float copy.
  auto leaf16 = leaf.detach().to(torch::kBFloat16).requires_grad_();
  auto w16 = w.detach().to(torch::kBFloat16).requires_grad_();
  const auto before = remat::memory::current_bytes();
  auto x16 = leaf16 * 2;
  auto out16 = remat::nn::rms_norm(x16, w16, kEps);
  x16 = torch::Tensor();
  EXPECT_EQ(remat::memory::current_bytes() - before, x_bytes / 2 + rstd_bytes + x_bytes / 2);
}

TEST_F(FusedTest, SwigluLinearKeepsGateAndUpOnly) {
  ASSERT_TRUE(remat::memory::installed());
  const int64_t rows = 2 * 64, inter = 160, h = 48;
  auto g_leaf = torch::randn({2, 64, inter}).requires_grad_();
  auto u_leaf = torch::randn({2, 64, inter}).requires_grad_();
  auto w = (torch::randn({h, inter}) * 0.1).requires_grad_();
  const int64_t gate_bytes = rows * inter * 4;
  const int64_t out_bytes = rows * h * 4;
  auto held_by = [&](const std::function<torch::Tensor(const torch::Tensor&,
                                                       const torch::Tensor&)>& f) {
    const auto before = remat::memory::current_bytes();
    auto gate = g_leaf * 2;
    auto up = u_leaf * 2;
    auto out = f(gate, up);
    gate = up = torch::Tensor();
    const auto held = remat::memory::current_bytes() - before;
    out.sum().backward();
    return held;
  };
  const auto fused = held_by([&](const torch::Tensor& g, const torch::Tensor& u) {
    return remat::nn::swiglu_linear(g, u, w);
  });
  EXPECT_EQ(fused, 2 * gate_bytes + out_bytes);
  const auto eager = held_by([&](const torch::Tensor& g, const torch::Tensor& u) {
    return eager_swiglu_linear(g, u, w);
  });
  // Eager keeps silu(gate) and the product as well.
  EXPECT_EQ(eager, 4 * gate_bytes + out_bytes);

  const auto fused_s = held_by([&](const torch::Tensor& g, const torch::Tensor& u) {
    return remat::nn::swiglu(g, u);
  });
  EXPECT_EQ(fused_s, 3 * gate_bytes); // gate, up, the output
}

// Recompute inside remat::checkpoint, with autocast on and off: the same
// outputs and gradients as without checkpointing.
TEST_F(FusedTest, InsideCheckpointWithAndWithoutAutocast) {
  auto x = torch::randn({2, 6, 16}).requires_grad_();
  auto norm_w = (torch::randn({16}) + 1).requires_grad_();
  auto gate_w = (torch::randn({24, 16}) * 0.2).requires_grad_();
  auto up_w = (torch::randn({24, 16}) * 0.2).requires_grad_();
  auto down_w = (torch::randn({16, 24}) * 0.2).requires_grad_();
  Tensors params{norm_w, gate_w, up_w, down_w};
  auto block = [&](const Tensors& in) {
    auto n = remat::nn::rms_norm(in[0], norm_w, kEps);
    auto out = remat::nn::swiglu_linear(
        torch::linear(n, gate_w), torch::linear(n, up_w), down_w);
    return Tensors{out};
  };
  for (bool autocast : {false, true}) {
    SCOPED_TRACE(autocast ? "bf16 autocast" : "fp32");
    const auto state = autocast ? bf16_autocast() : remat::AutocastState{};
    auto grads_of = [&](bool checkpointed) {
      for (auto& p : params) {
        p.mutable_grad() = torch::Tensor();
      }
      auto xi = x.detach().requires_grad_();
      torch::Tensor out;
      {
        remat::AutocastScope scope(state);
        // As the checkpoint runs its segment: no cache of weight casts.
        remat::AutocastCacheDisabled no_cast_cache;
        out = checkpointed
            ? remat::checkpoint(block, {xi}, remat::CheckpointOptions().parameters(params))[0]
            : block({xi})[0];
      }
      at::autocast::clear_cache();
      EXPECT_EQ(out.scalar_type(), autocast ? torch::kBFloat16 : torch::kFloat);
      out.to(torch::kFloat).pow(2).sum().backward();
      Tensors g{out.detach(), xi.grad()};
      for (const auto& p : params) {
        g.push_back(p.grad().clone());
      }
      return g;
    };
    const auto before = remat::recompute_count();
    auto ckpt = grads_of(true);
    EXPECT_EQ(remat::recompute_count(), before + 1);
    auto plain = grads_of(false);
    for (size_t i = 0; i < plain.size(); ++i) {
      EXPECT_EQ(ckpt[i].scalar_type(), plain[i].scalar_type()) << "tensor " << i;
      EXPECT_TRUE(torch::equal(ckpt[i], plain[i])) << "tensor " << i;
    }
  }
}

// LlamaMLP takes swiglu + down_proj's own forward when down_proj carries an
// adapter: gradients reach the adapter as with the eager composition.
TEST_F(FusedTest, LlamaMlpWithAdapterOnDownProj) {
  auto opts = remat::nn::LlamaOptions().hidden_size(16).intermediate_size(40);
  for (bool adapter : {false, true}) {
    SCOPED_TRACE(adapter ? "down_proj adapter" : "no adapter");
    torch::manual_seed(1);
    remat::nn::LlamaMLP mlp(opts);
    if (adapter) {
      remat::nn::apply_lora(mlp, remat::nn::LoraOptions().rank(4).targets({"down_proj"}));
      torch::NoGradGuard no_grad;
      mlp->down_proj->lora_B->weight.normal_(); // B starts at zero
    }
    auto x = torch::randn({3, 5, 16}).requires_grad_();
    auto upstream = torch::randn({3, 5, 16});
    auto params = mlp->parameters();
    auto grads_of = [&](bool fused) {
      mlp->zero_grad();
      auto xi = x.detach().requires_grad_();
      auto out = fused ? mlp->forward(xi)
                       : mlp->down_proj->forward(eager_swiglu(
                             mlp->gate_proj->forward(xi), mlp->up_proj->forward(xi)));
      (out * upstream).sum().backward();
      Tensors g{out.detach(), xi.grad()};
      for (const auto& p : params) {
        g.push_back(p.grad().defined() ? p.grad().clone() : torch::Tensor());
      }
      return g;
    };
    auto fused = grads_of(true);
    auto eager = grads_of(false);
    for (size_t i = 0; i < fused.size(); ++i) {
      expect_close(fused[i], eager[i], kRtol32, kAtol32, "tensor " + std::to_string(i));
    }
    if (adapter) {
      EXPECT_TRUE(fused.back().defined()) << "lora_B gets a gradient";
      EXPECT_FALSE(fused[2].defined()) << "the base weights are frozen";
    }
  }
}

TEST_F(FusedTest, ErrorsNameTheArguments) {
  auto x = torch::randn({2, 8});
  EXPECT_NE(
      error_of([&] { remat::nn::rms_norm(x, torch::ones({7}), kEps); })
          .find("remat::nn::rms_norm: expected x [..., H] and weight [H], but got [2, 8] and [7]"),
      std::string::npos);
  EXPECT_NE(
      error_of([&] { remat::nn::swiglu(x, torch::randn({2, 9})); })
          .find("remat::nn::swiglu: expected gate and up of the same shape [..., I], but "
                "got [2, 8] and [2, 9]"),
      std::string::npos);
  EXPECT_NE(
      error_of([&] { remat::nn::swiglu_linear(x, x, torch::randn({8, 4})); })
          .find("remat::nn::swiglu_linear: expected down_weight [H, 8], but got [8, 4]"),
      std::string::npos);
  EXPECT_NE(
      error_of([&] {
        remat::nn::swiglu_linear(x, x, torch::randn({4, 8}).to(torch::kBFloat16));
      }).find("expected down_weight of the activations' dtype Float (or autocast on), "
              "but got BFloat16"),
      std::string::npos);
}

} // namespace
