#include "remat/nn/attention.h"

#include "remat/nn/dropout.h"

#include "remat/checkpoint.h"

#include "remat/autocast.h"
#include "compat/torch.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/autograd.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>

namespace remat {
namespace nn {

AttentionKind parse_attention(const std::string& text) {
  if (text == "eager") {
    return AttentionKind::kEager;
  }
  if (text == "blockwise") {
    return AttentionKind::kBlockwise;
  }
  if (text == "sdpa") {
    return AttentionKind::kSdpa;
  }
  TORCH_CHECK(
      false, "expected an attention kind (eager, blockwise, sdpa), but got '",
      text, "'");
}

void check_attention_supported(AttentionKind kind) {
  TORCH_CHECK(
      kind != AttentionKind::kSdpa || compat::kHasSdpa,
      "sdpa needs LibTorch >= 2.0, but this build has ", compat::torch_version(),
      "; use eager or blockwise");
}

const char* to_string(AttentionKind kind) {
  switch (kind) {
    case AttentionKind::kEager:
      return "eager";
    case AttentionKind::kBlockwise:
      return "blockwise";
    case AttentionKind::kSdpa:
      return "sdpa";
  }
  return "?";
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr double kInf = std::numeric_limits<double>::infinity();

double softmax_scale(const torch::Tensor& q) {
  return 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
}

// Additive bias with -inf where key j is after query i + (sk - sq).
torch::Tensor causal_bias(int64_t sq, int64_t sk, const torch::TensorOptions& o) {
  auto hide = torch::ones({sq, sk}, o.dtype(torch::kBool)).triu(sk - sq + 1);
  return torch::zeros({sq, sk}, o).masked_fill_(hide, -kInf);
}

// softmax(q k^T / sqrt(d) + mask), causally masked, then dropout with the
// mask of `seed` when `dropout` > 0 (CPU) or a fresh draw (other devices).
torch::Tensor eager_probs(
    const torch::Tensor& q,
    const torch::Tensor& k,
    const torch::Tensor& mask,
    bool causal,
    double dropout,
    uint64_t seed) {
  // Scaling q touches S x d elements instead of the S x S scores (in forward
  // and in backward), and hands matmul a contiguous operand it would
  // otherwise copy out of the heads' transposed view.
  auto scores = torch::matmul(q * softmax_scale(q), k.transpose(-2, -1));
  if (mask.defined()) {
    // In place when that changes nothing: the scores are a fresh tensor that
    // no backward needs, so only a mask that itself needs a gradient or
    // would promote the dtype or widen the shape goes out of place.
    if (!mask.requires_grad() && mask.scalar_type() == scores.scalar_type() &&
        at::infer_size(scores.sizes(), mask.sizes()) == scores.sizes()) {
      scores.add_(mask);
    } else {
      scores = scores + mask;
    }
  }
  if (causal) {
    const auto sq = q.size(-2);
    const auto sk = k.size(-2);
    // Query i (offset by sk - sq when a cache precedes it) sees keys <= i.
    auto drop = torch::ones({sq, sk}, q.options().dtype(torch::kBool))
                    .triu(sk - sq + 1);
    scores.masked_fill_(drop, -kInf);
  }
  auto probs = torch::softmax(scores, -1);
  if (dropout > 0) {
    probs = seeded_dropout_supports(probs)
        ? remat::nn::seeded_dropout(probs, dropout, seed)
        : remat::nn::dropout(probs, dropout, /*training=*/true);
  }
  return probs;
}

double effective_dropout(const AttentionOptions& o) {
  return o.training() ? o.dropout() : 0.0;
}

torch::Tensor eager(
    const torch::Tensor& q,
    const torch::Tensor& k,
    const torch::Tensor& v,
    const torch::Tensor& mask,
    const AttentionOptions& o) {
  const double p = effective_dropout(o);
  const uint64_t seed = p > 0 && seeded_dropout_supports(q) ? draw_dropout_seed() : 0;
  return torch::matmul(eager_probs(q, k, mask, o.causal(), p, seed), v);
}

torch::Tensor sdpa(
    const torch::Tensor& q,
    const torch::Tensor& k,
    const torch::Tensor& v,
    const torch::Tensor& mask,
    const AttentionOptions& o) {
  check_attention_supported(AttentionKind::kSdpa);
  // is_causal aligns the mask top-left; ours is bottom-right (a KV cache
  // precedes the queries), so an explicit bias carries it when they differ.
  const auto sq = q.size(-2);
  const auto sk = k.size(-2);
  bool is_causal = false;
  torch::Tensor bias = mask;
  if (o.causal()) {
    if (!mask.defined() && sq == sk) {
      is_causal = true;
    } else {
      auto c = causal_bias(sq, sk, q.options());
      bias = bias.defined() ? bias + c : c;
    }
  }
  c10::optional<torch::Tensor> attn_mask;
  if (bias.defined()) {
    attn_mask = bias.to(q.scalar_type());
  }
  return compat::scaled_dot_product_attention(
      q, k, v, attn_mask, o.training() ? o.dropout() : 0.0, is_causal);
}

// ---------------------------------------------------------------------------
// Blockwise attention (FlashAttention-2 on ATen ops).
//
// q, k, v are flattened to [B*H, S, D]. The grid is made of query blocks
// [i0, i0 + nq) and key blocks [j0, j0 + nk), both `block` rows. Causal
// masking skips the key blocks that no query of a block can see, and trims
// the last visible one. Forward and backward visit the same tiles with the
// same shapes, which is what lets dropout regenerate a tile's mask from the
// tile's coordinates.

struct Blocks {
  int64_t batch = 0;
  int64_t heads = 0;
  int64_t sq = 0;
  int64_t sk = 0;
  int64_t block = 0;
  double scale = 1.0;
  bool causal = false;
  int64_t offset = 0;   ///< causal: query i sees keys j <= i + offset
  torch::Tensor mask;   ///< [mb, mh, mq, mk], each 1 or full, or undefined
  double dropout = 0.0; ///< probability; 0 unless training
  uint64_t seed = 0;    ///< dropout seed of this call

  int64_t bh() const {
    return batch * heads;
  }
  /// Keys [0, key_end) are visible to at least one of queries [i0, i0 + nq).
  int64_t key_end(int64_t i0, int64_t nq) const {
    return causal ? std::clamp<int64_t>(i0 + nq + offset, 0, sk) : sk;
  }
};

// s = (q_i * scale) k_j^T + mask_ij, causally hidden keys at -inf; in place.
void tile_scores(
    const Blocks& p,
    const torch::Tensor& qs,
    const torch::Tensor& k,
    int64_t i0,
    int64_t nq,
    int64_t j0,
    int64_t nk,
    torch::Tensor& s) {
  s.resize_({p.bh(), nq, nk});
  at::bmm_out(s, qs.narrow(1, i0, nq), k.narrow(1, j0, nk).transpose(1, 2));
  if (p.mask.defined()) {
    auto m = p.mask;
    if (m.size(2) > 1) {
      m = m.narrow(2, i0, nq);
    }
    if (m.size(3) > 1) {
      m = m.narrow(3, j0, nk);
    }
    s.view({p.batch, p.heads, nq, nk}).add_(m);
  }
  if (p.causal && j0 + nk - 1 > i0 + p.offset) {
    auto idx = s.options().dtype(torch::kLong);
    auto rows = torch::arange(i0 + p.offset, i0 + p.offset + nq, idx);
    auto cols = torch::arange(j0, j0 + nk, idx);
    s.masked_fill_(cols.unsqueeze(0) > rows.unsqueeze(1), -kInf);
  }
}

// The scaled keep-mask (0 or 1 / (1 - p)) of tile (ib, jb) with the shape of
// `like`. A generator per tile, seeded from the call's seed and the tile's
// coordinates, makes the mask independent of the order tiles are visited in.
torch::Tensor tile_keep(const Blocks& p, int64_t ib, int64_t jb, const torch::Tensor& like) {
  const uint64_t tile = static_cast<uint64_t>(ib) * 0x100000001B3ULL +
      static_cast<uint64_t>(jb) + 1;
  auto gen = at::detail::createCPUGenerator(p.seed ^ (tile * 0x9E3779B97F4A7C15ULL));
  auto keep = at::empty(like.sizes(), torch::TensorOptions().dtype(torch::kFloat))
                  .bernoulli_(1.0 - p.dropout, gen);
  return keep.to(like.options()).mul_(1.0 / (1.0 - p.dropout));
}

// Returns out [BH, Sq, Dv] and lse [BH, Sq]: lse is the log of each row's
// softmax normaliser, +inf for a row that sees no key (so that backward
// gives it probabilities exp(s - lse) = 0 rather than NaN).
std::pair<torch::Tensor, torch::Tensor> blockwise_forward(
    const Blocks& p,
    const torch::Tensor& q,
    const torch::Tensor& k,
    const torch::Tensor& v) {
  const auto bh = p.bh();
  auto out = at::empty({bh, p.sq, v.size(2)}, q.options());
  auto lse = at::empty({bh, p.sq}, q.options());
  auto qs = q * p.scale;
  auto s = at::empty({0}, q.options());
  for (int64_t i0 = 0, ib = 0; i0 < p.sq; i0 += p.block, ++ib) {
    const int64_t nq = std::min(p.block, p.sq - i0);
    auto m = at::full({bh, nq}, -kInf, q.options()); // running row max
    auto l = at::zeros({bh, nq}, q.options());       // running row sum
    auto acc = out.narrow(1, i0, nq).zero_();
    const int64_t kend = p.key_end(i0, nq);
    for (int64_t j0 = 0, jb = 0; j0 < kend; j0 += p.block, ++jb) {
      const int64_t nk = std::min(p.block, kend - j0);
      tile_scores(p, qs, k, i0, nq, j0, nk, s);
      auto m_new = at::maximum(m, s.amax(-1));
      // A row with only -inf so far keeps exp(-inf - 0) = 0, not NaN.
      auto m_safe = m_new.masked_fill(m_new == -kInf, 0.0);
      s.sub_(m_safe.unsqueeze(-1)).exp_();
      auto alpha = (m - m_safe).exp_();
      l.mul_(alpha).add_(s.sum(-1));
      acc.mul_(alpha.unsqueeze(-1));
      if (p.dropout > 0) {
        s.mul_(tile_keep(p, ib, jb, s));
      }
      acc.baddbmm_(s, v.narrow(1, j0, nk));
      m = std::move(m_new);
    }
    auto empty = l == 0;
    acc.div_(l.masked_fill(empty, 1.0).unsqueeze(-1));
    lse.narrow(1, i0, nq).copy_(
        (m.masked_fill(empty, 0.0) + l.log()).masked_fill_(empty, kInf));
  }
  return {out, lse};
}

// FlashAttention-2 backward: key blocks outside, query blocks inside, so the
// gradients of a key block accumulate in place while the tile is hot.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> blockwise_backward(
    const Blocks& p,
    const torch::Tensor& q,
    const torch::Tensor& k,
    const torch::Tensor& v,
    const torch::Tensor& out,
    const torch::Tensor& lse,
    const torch::Tensor& dout) {
  auto qs = q * p.scale;
  auto delta = (dout * out).sum(-1); // D = rowsum(dO * O), [BH, Sq]
  auto dq = at::zeros_like(q);
  auto dk = at::zeros_like(k);
  auto dv = at::zeros_like(v);
  auto s = at::empty({0}, q.options());
  auto dp = at::empty({0}, q.options());
  for (int64_t j0 = 0, jb = 0; j0 < p.sk; j0 += p.block, ++jb) {
    const int64_t nk_block = std::min(p.block, p.sk - j0);
    for (int64_t i0 = 0, ib = 0; i0 < p.sq; i0 += p.block, ++ib) {
      const int64_t nq = std::min(p.block, p.sq - i0);
      const int64_t kend = p.key_end(i0, nq);
      if (kend <= j0) {
        continue; // no query of this block sees these keys
      }
      const int64_t nk = std::min(nk_block, kend - j0);
      auto q_i = qs.narrow(1, i0, nq);
      auto k_j = k.narrow(1, j0, nk);
      auto v_j = v.narrow(1, j0, nk);
      auto do_i = dout.narrow(1, i0, nq);
      tile_scores(p, qs, k, i0, nq, j0, nk, s);
      s.sub_(lse.narrow(1, i0, nq).unsqueeze(-1)).exp_(); // P
      dp.resize_({p.bh(), nq, nk});
      at::bmm_out(dp, do_i, v_j.transpose(1, 2)); // dO V^T
      auto dv_j = dv.narrow(1, j0, nk);
      if (p.dropout > 0) {
        auto keep = tile_keep(p, ib, jb, s);
        dv_j.baddbmm_((s * keep).transpose(1, 2), do_i);
        dp.mul_(keep);
      } else {
        dv_j.baddbmm_(s.transpose(1, 2), do_i);
      }
      dp.sub_(delta.narrow(1, i0, nq).unsqueeze(-1)).mul_(s); // dS
      dq.narrow(1, i0, nq).baddbmm_(dp, k_j);
      dk.narrow(1, j0, nk).baddbmm_(dp.transpose(1, 2), q_i);
    }
  }
  dq.mul_(p.scale);
  return {dq, dk, dv};
}

Blocks make_blocks(
    const torch::Tensor& q,
    const torch::Tensor& k,
    const torch::Tensor& mask,
    bool causal,
    int64_t block,
    double dropout,
    uint64_t seed) {
  Blocks p;
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.sq = q.size(2);
  p.sk = k.size(2);
  p.block = block;
  p.scale = softmax_scale(q);
  p.causal = causal;
  p.offset = p.sk - p.sq;
  if (mask.defined()) {
    auto m = mask;
    while (m.dim() < 4) {
      m = m.unsqueeze(0);
    }
    p.mask = m;
  }
  p.dropout = dropout;
  p.seed = seed;
  return p;
}

torch::Tensor flat(const torch::Tensor& t) {
  return t.reshape({t.size(0) * t.size(1), t.size(2), t.size(3)}).contiguous();
}


struct BlockwiseFunction : torch::autograd::Function<BlockwiseFunction> {
  static torch::Tensor forward(
      AutogradContext* ctx,
      const torch::Tensor& q,
      const torch::Tensor& k,
      const torch::Tensor& v,
      const c10::optional<torch::Tensor>& mask_or_none,
      bool causal,
      int64_t block,
      double dropout) {
    // An optional, because an undefined tensor cannot be an input of apply.
    auto mask = mask_or_none.value_or(torch::Tensor());
    const uint64_t seed = dropout > 0 ? draw_dropout_seed() : 0;
    auto p = make_blocks(q, k, mask, causal, block, dropout, seed);
    auto res = blockwise_forward(p, flat(q), flat(k), flat(v));
    auto out = res.first.view({p.batch, p.heads, p.sq, v.size(3)});
    // The [Sq, Sk] probabilities are not kept: backward rebuilds them from
    // q, k and the log-sum-exp of each row.
    ctx->save_for_backward({q, k, v, mask, out, res.second});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["block"] = block;
    ctx->saved_data["dropout"] = dropout;
    ctx->saved_data["seed"] = static_cast<int64_t>(seed);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(
        !torch::GradMode::is_enabled(),
        "remat::nn::attention: blockwise attention has no double backward; "
        "expected create_graph=false, but got true");
    // The kernel picks its own precision; autocast would recast its matmuls.
    AutocastScope no_autocast(AutocastState{});
    auto saved = ctx->get_saved_variables();
    const auto& q = saved[0];
    const auto& k = saved[1];
    const auto& v = saved[2];
    auto p = make_blocks(
        q, k, saved[3], ctx->saved_data["causal"].toBool(),
        ctx->saved_data["block"].toInt(), ctx->saved_data["dropout"].toDouble(),
        static_cast<uint64_t>(ctx->saved_data["seed"].toInt()));
    auto g = blockwise_backward(
        p, flat(q), flat(k), flat(v), flat(saved[4]), saved[5], flat(grads[0]));
    return {
        std::get<0>(g).view(q.sizes()), std::get<1>(g).view(k.sizes()),
        std::get<2>(g).view(v.sizes()), torch::Tensor(), torch::Tensor(),
        torch::Tensor(), torch::Tensor()};
  }
};

torch::Tensor blockwise(
    const torch::Tensor& q,
    const torch::Tensor& k,
    const torch::Tensor& v,
    const torch::Tensor& mask,
    const AttentionOptions& o) {
  TORCH_CHECK(
      o.block_size() > 0,
      "remat::nn::attention: expected block_size > 0, but got ", o.block_size());
  TORCH_CHECK(
      q.size(0) == k.size(0) && q.size(1) == k.size(1) &&
          k.sizes().slice(0, 3) == v.sizes().slice(0, 3) &&
          q.size(3) == k.size(3),
      "remat::nn::attention: expected k and v with the batch and heads of q, "
      "keys and values of the same length and q, k of the same head_dim, but "
      "got q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  if (mask.defined()) {
    TORCH_CHECK(
        mask.is_floating_point(),
        "remat::nn::attention: expected an additive floating-point mask for "
        "blockwise attention, but got dtype ", mask.scalar_type());
    TORCH_CHECK(
        !mask.requires_grad(),
        "remat::nn::attention: blockwise attention gives no gradient to the "
        "mask; expected a mask that does not require grad");
    TORCH_CHECK(
        mask.dim() <= 4,
        "remat::nn::attention: expected a mask broadcastable to ",
        std::vector<int64_t>{q.size(0), q.size(1), q.size(2), k.size(2)},
        ", but got ", mask.sizes());
    // Throws when the mask does not broadcast.
    (void)mask.expand({q.size(0), q.size(1), q.size(2), k.size(2)});
  }
  // Half precision accumulates in float, as the fused kernels do; autocast
  // would recast the kernel's matmuls, so it is off inside.
  AutocastScope no_autocast(AutocastState{});
  // Mixed inputs (rotary tables in float against bf16 projections under
  // autocast) are computed in float too.
  const auto dtype = q.scalar_type();
  auto reduced = [](const torch::Tensor& t) {
    return t.scalar_type() == torch::kHalf || t.scalar_type() == torch::kBFloat16;
  };
  const bool upcast = reduced(q) || reduced(k) || reduced(v) ||
      k.scalar_type() != dtype || v.scalar_type() != dtype;
  auto cast = [&](const torch::Tensor& t) {
    return upcast && t.defined() ? t.to(torch::kFloat) : t;
  };
  const double dropout = o.training() ? o.dropout() : 0.0;
  torch::Tensor out;
  if (torch::GradMode::is_enabled() &&
      (q.requires_grad() || k.requires_grad() || v.requires_grad())) {
    c10::optional<torch::Tensor> m;
    if (mask.defined()) {
      m = cast(mask);
    }
    out = BlockwiseFunction::apply(
        cast(q), cast(k), cast(v), m, o.causal(), o.block_size(), dropout);
  } else {
    const uint64_t seed = dropout > 0 ? draw_dropout_seed() : 0;
    auto p = make_blocks(q, k, cast(mask), o.causal(), o.block_size(), dropout, seed);
    out = blockwise_forward(p, flat(cast(q)), flat(cast(k)), flat(cast(v)))
              .first.view({p.batch, p.heads, p.sq, v.size(3)});
  }
  return upcast ? out.to(dtype) : out;
}

// The backward of matmul(probs, values) without its forward: apply returns
// an uninitialised tensor of the product's shape, whose gradient backward
// turns into the product's two gradients with the bmm calls matmul's own
// backward makes ([B*H, Sq, Sk] x [B*H, Sk, Dv]). The recompute of
// RecomputedEagerFunction ends in it, so that autograd starts from a
// [Sq, Dv] gradient and frees each [Sq, Sk] one as soon as it is used, as
// for eager attention.
struct ProductBackwardOnly : torch::autograd::Function<ProductBackwardOnly> {
  static torch::Tensor forward(
      AutogradContext* ctx, const torch::Tensor& probs, const torch::Tensor& values) {
    ctx->save_for_backward({probs, values});
    auto shape = probs.sizes().vec();
    shape.back() = values.size(-1);
    return at::empty(shape, values.options());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto& probs = saved[0];
    const auto& values = saved[1];
    const auto bh = probs.size(0) * probs.size(1);
    const auto& grad = grads[0];
    auto grad3 = grad.reshape({bh, grad.size(2), grad.size(3)});
    variable_list result(2);
    if (ctx->needs_input_grad(1)) {
      auto probs3 = probs.reshape({bh, probs.size(2), probs.size(3)});
      result[1] = at::bmm(probs3.transpose(1, 2), grad3).view(values.sizes());
    }
    if (ctx->needs_input_grad(0)) {
      auto values3 = values.reshape({bh, values.size(2), values.size(3)});
      result[0] = at::bmm(grad3, values3.transpose(1, 2)).view(probs.sizes());
    }
    return result;
  }
};

// Eager attention that keeps only its inputs: the selective-attention core
// without the generic checkpoint's second forward. Backward rebuilds the
// probabilities through the same ops as eager() with grad on, but not their
// product with v (ProductBackwardOnly stands in for it): bit for bit what
// autograd does for eager(), with one recomputed matmul of the core's two.
struct RecomputedEagerFunction : torch::autograd::Function<RecomputedEagerFunction> {
  static torch::Tensor forward(
      AutogradContext* ctx,
      const torch::Tensor& q,
      const torch::Tensor& k,
      const torch::Tensor& v,
      const c10::optional<torch::Tensor>& mask_or_none,
      bool causal,
      double dropout) {
    auto mask = mask_or_none.value_or(torch::Tensor());
    const int64_t groups = q.size(1) / k.size(1);
    const uint64_t seed = dropout > 0 ? draw_dropout_seed() : 0;
    auto out = torch::matmul(
        eager_probs(q, repeat_kv(k, groups), mask, causal, dropout, seed),
        repeat_kv(v, groups));
    ctx->save_for_backward({q, k, v, mask});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["dropout"] = dropout;
    ctx->saved_data["seed"] = static_cast<int64_t>(seed);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // create_graph: the gradients need a graph of their own, so the product
    // is recomputed for real and differentiated as eager's is.
    const bool create_graph = torch::GradMode::is_enabled();
    auto saved = ctx->get_saved_variables();
    variable_list result(6); // q, k, v, mask, causal, dropout
    std::vector<torch::Tensor> inputs;  // q, k, v
    std::vector<torch::Tensor> targets; // those whose gradient is asked for
    std::vector<size_t> slots;
    for (size_t i = 0; i < 3; ++i) {
      // With create_graph the recompute reads the saved tensors themselves,
      // so that the gradients' graph leads back to the caller's q, k, v.
      inputs.push_back(create_graph ? saved[i] : saved[i].detach());
      if (ctx->needs_input_grad(i)) {
        if (!create_graph) {
          inputs[i].requires_grad_(true);
        }
        targets.push_back(inputs[i]);
        slots.push_back(i);
      }
    }
    const auto& grad = grads[0];
    if (targets.empty() || !grad.defined()) {
      return result;
    }
    const auto& q = inputs[0];
    const int64_t groups = q.size(1) / inputs[1].size(1);
    torch::Tensor product;
    {
      torch::AutoGradMode grad_on(true);
      auto probs = eager_probs(
          q, repeat_kv(inputs[1], groups), saved[3], ctx->saved_data["causal"].toBool(),
          ctx->saved_data["dropout"].toDouble(),
          static_cast<uint64_t>(ctx->saved_data["seed"].toInt()));
      auto values = repeat_kv(inputs[2], groups);
      product = create_graph ? torch::matmul(probs, values)
                             : ProductBackwardOnly::apply(probs, values);
    }
    remat::count_recompute();
    auto g = torch::autograd::grad(
        {product}, targets, {grad}, /*retain_graph=*/create_graph,
        /*create_graph=*/create_graph, /*allow_unused=*/true);
    for (size_t i = 0; i < targets.size(); ++i) {
      result[slots[i]] = g[i];
    }
    return result;
  }
};

} // namespace

torch::Tensor attention(
    const torch::Tensor& q,
    const torch::Tensor& k,
    const torch::Tensor& v,
    const torch::Tensor& mask,
    const AttentionOptions& options) {
  TORCH_CHECK(
      q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
      "remat::nn::attention: expected q, k, v of shape [batch, heads, seq, "
      "head_dim], but got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(
      options.dropout() >= 0 && options.dropout() < 1,
      "remat::nn::attention: expected dropout in [0, 1), but got ",
      options.dropout());
  switch (options.kind()) {
    case AttentionKind::kEager:
      return eager(q, k, v, mask, options);
    case AttentionKind::kBlockwise:
      return blockwise(q, k, v, mask, options);
    case AttentionKind::kSdpa:
      return sdpa(q, k, v, mask, options);
  }
  TORCH_INTERNAL_ASSERT(false, "unknown attention kind");
}

torch::Tensor repeat_kv(const torch::Tensor& x, int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && groups >= 1,
              "repeat_kv: expected [batch, kv_heads, seq, dim] and groups >= 1, but got ",
              x.sizes(), " and groups ", groups);
  if (groups == 1) {
    return x;
  }
  const auto s = x.sizes();
  return x.unsqueeze(2)
      .expand({s[0], s[1], groups, s[2], s[3]})
      .reshape({s[0], s[1] * groups, s[2], s[3]});
}

torch::Tensor checkpointed_attention(
    const torch::Tensor& q,
    const torch::Tensor& k,
    const torch::Tensor& v,
    const torch::Tensor& mask,
    const AttentionOptions& options) {
  TORCH_CHECK(
      q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && k.size(1) == v.size(1) &&
          k.size(1) > 0 && q.size(1) % k.size(1) == 0,
      "remat::nn::checkpointed_attention: expected q [batch, heads, seq, head_dim] "
      "and k, v [batch, kv_heads, seq, head_dim] with heads a multiple of "
      "kv_heads, but got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const int64_t groups = q.size(1) / k.size(1);
  const double p = effective_dropout(options);
  const bool differentiable = torch::GradMode::is_enabled() &&
      (q.requires_grad() || k.requires_grad() || v.requires_grad());
  // The kept-inputs kernel runs what eager() runs, so it is used where its
  // recompute needs nothing eager() would take from the thread: no autocast
  // state, and the dropout mask from a seed it keeps (CPU).
  const bool lean = options.kind() == AttentionKind::kEager && differentiable &&
      !(mask.defined() && mask.requires_grad()) && !AutocastState::capture().any() &&
      (p == 0 || seeded_dropout_supports(q));
  if (lean) {
    TORCH_CHECK(
        options.dropout() >= 0 && options.dropout() < 1,
        "remat::nn::attention: expected dropout in [0, 1), but got ",
        options.dropout());
    c10::optional<torch::Tensor> m;
    if (mask.defined()) {
      m = mask;
    }
    return RecomputedEagerFunction::apply(q, k, v, m, options.causal(), p);
  }
  auto core = [options, groups](const std::vector<torch::Tensor>& t) {
    return std::vector<torch::Tensor>{attention(
        t[0], repeat_kv(t[1], groups), repeat_kv(t[2], groups),
        t.size() > 3 ? t[3] : torch::Tensor(), options)};
  };
  if (!differentiable) {
    return core({q, k, v, mask})[0];
  }
  std::vector<torch::Tensor> in{q, k, v};
  if (mask.defined()) {
    in.push_back(mask);
  }
  return remat::checkpoint(core, in, CheckpointOptions().name("attention"))[0];
}

} // namespace nn
} // namespace remat

