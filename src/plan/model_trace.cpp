// How each op of remat's transformer layers allocates and saves, following
// PyTorch's autograd formulas (tools/autograd/derivatives.yaml; the generated
// code saves a tensor only when the gradient that reads it is required):
//   linear (addmm / mm)  saves its input if the weight trains, the weight if
//                        the input requires grad (a parameter: not counted);
//   LoRA                 A saves the (dropped) input, B saves A's output;
//   layer_norm           saves input, mean and rstd (fp32, B*S each);
//   RMSNorm              remat::nn::rms_norm, a fused Function (to fp32,
//                        pow, mean, add, rsqrt, mul, to dtype, mul weight,
//                        all temporaries): saves its input in its own dtype
//                        and rstd (fp32, B*S);
//   SwiGLU MLP           remat::nn::swiglu_linear (silu, mul_ in place,
//                        linear): saves gate and up only; with an adapter on
//                        down_proj, swiglu (silu, mul: saves gate and up)
//                        then down_proj's own linear;
//   gelu, silu           save their input;      softmax saves its output;
//   mul                  saves each operand whose partner requires grad;
//   add, views, copies   save nothing;
//   matmul               saves each operand whose partner requires grad;
//   causal masked_fill   saves the S*S bool mask;
//   dropout              remat::nn::dropout (the models'): a 1-byte mask,
//                        after a float uniform draw that dies at once;
//                        LibTorch's (LoRA's adapters): on CPU a noise tensor
//                        of the input's dtype (input * noise), on CUDA a
//                        1-byte mask;
//   mean over a dim      LibTorch 1.13 saves its input (2.x: only sizes);
//   blockwise attention  saves q, k, v, the output, and a fp32 B*heads*S
//                        log-sum-exp (kernels regenerate dropout from a seed);
//   cross-entropy        log_softmax saves its fp32 output (bf16 logits are
//                        cast to fp32 first); nll_loss reads the same tensor.
//
// Compared with Korthikanti et al. 2022 (34 s*b*h + 5 a*s^2*b bytes per GPT
// layer in fp16 with 1-byte dropout masks): a BERT layer here (intermediate
// 4h, full fine-tuning, dropout on) with e-byte activations and 1-byte masks
// keeps (16e + 2) s*b*h + (2e + 1) a*s^2*b + 16 s*b bytes, so bf16 gives
// exactly their 34 s*b*h + 5 a*s^2*b, plus the fp32 LayerNorm statistics
// (2 norms x mean, rstd x 4 bytes x s*b) that they leave out. We count the layer's output where they count its input (the previous
// output): the same tensors, one layer shifted. The test
// PlanEstimate.BertLayerMatchesKorthikanti checks this.
#include "plan/model_trace.h"

#include <c10/util/Exception.h>
#include <torch/version.h>

#include <algorithm>

namespace remat {
namespace plan {
namespace detail {
namespace {

using Shape = std::vector<int64_t>;

class Builder {
 public:
  explicit Builder(const ModelSpec& spec)
      : s(spec),
        B(spec.batch()),
        S(spec.seq()),
        H(spec.hidden()),
        heads(spec.heads()),
        kv(spec.kv_heads_or_heads()),
        d(spec.hidden() / spec.heads()),
        I(spec.mlp_size()),
        e(spec.activation_bytes_per_element()),
        pe(spec.precision() == Precision::kFp32 ? 4 : 2),
        full(spec.lora_rank() == 0) {}

  const ModelSpec& s;
  const int64_t B, S, H, heads, kv, d, I, e;
  const int64_t pe; // bytes per element of parameters and their gradients
  const bool full; // every weight trains
  Trace t;

  bool rg(int v) const { return t.requires_grad(v); }

  static double numel(const Shape& shape) {
    double n = 1;
    for (auto x : shape) {
      n *= static_cast<double>(x);
    }
    return n;
  }

  Shape lead(int x) const {
    Shape sh = t.at(x).shape;
    sh.pop_back();
    return sh;
  }

  static Shape with_last(Shape sh, int64_t last) {
    sh.push_back(last);
    return sh;
  }

  int act(const std::string& name, Shape shape, bool requires_grad) {
    return t.value(name, std::move(shape), e, requires_grad);
  }

  bool lora_on(const std::string& key) const {
    if (full || s.lora_rank() <= 0) {
      return false;
    }
    const auto& tg = s.lora_targets();
    return std::find(tg.begin(), tg.end(), key) != tg.end();
  }

  // remat::nn::dropout, which the models use: a float uniform draw, a bool
  // mask from it, then masked_fill (which saves the mask) and an in-place
  // scale.
  int dropout(const std::string& name, int x) {
    const Shape sh = t.at(x).shape;
    const bool r = rg(x);
    int uniform = t.value(name + ".uniform", sh, 4, false);
    t.op(name + ".uniform (rand_like)", {}, {});
    int mask = t.value(name + ".mask", sh, 1, false);
    t.op(name + ".mask (lt)", {uniform}, {});
    int out = act(name, sh, r);
    t.op(name + " (masked_fill, mul_)", {x, mask}, r ? std::vector<int>{mask} : std::vector<int>{});
    return out;
  }

  // LibTorch's own dropout (torch::dropout), which LoRA's adapters use: on
  // CPU input * noise, keeping the noise tensor in the input's dtype; on CUDA
  // native_dropout, keeping a 1-byte mask.
  int torch_dropout(const std::string& name, int x) {
    const Shape sh = t.at(x).shape;
    const bool r = rg(x);
    int mask = s.backend() == Backend::kCuda
        ? t.value(name + ".mask", sh, 1, false)
        : t.value(name + ".noise", sh, e, false);
    int out = act(name, sh, r);
    t.op(name + " (dropout)", {x}, r ? std::vector<int>{mask} : std::vector<int>{});
    return out;
  }

  // A linear layer, with a LoRA adapter when `lora_key` is targeted.
  // `trainable`: whether the base weight trains.
  int linear(const std::string& name, int x, int64_t out_features,
             const std::string& lora_key, bool trainable) {
    const int64_t in_features = t.at(x).shape.back();
    const bool lora = lora_on(lora_key);
    const bool xr = rg(x);
    const Shape out_shape = with_last(lead(x), out_features);
    const double f = 2 * numel(lead(x)) * in_features * out_features;
    const bool bias = s.family() == Family::kBert;
    int y = act(name, out_shape, xr || trainable || lora);
    t.op(name + " (linear)", {x},
         trainable ? std::vector<int>{x} : std::vector<int>{}, f,
         (xr ? f : 0) + (trainable ? f : 0),
         trainable ? (in_features + (bias ? 1 : 0)) * out_features * pe : 0);
    t.product(Product::kProjection);
    if (!lora) {
      return y;
    }
    const int64_t r = s.lora_rank();
    int xa = s.lora_dropout() ? torch_dropout(name + ".lora_dropout", x) : x;
    const double fa = 2 * numel(lead(x)) * in_features * r;
    const double fb = 2 * numel(lead(x)) * r * out_features;
    int a = act(name + ".lora_A", with_last(lead(x), r), true);
    t.op(name + ".lora_A (linear)", {xa}, {xa}, fa, fa + (xr ? fa : 0), in_features * r * pe);
    t.product(Product::kProjection);
    int b = act(name + ".lora_B", out_shape, true);
    t.op(name + ".lora_B (linear)", {a}, {a}, fb, 2 * fb, r * out_features * pe);
    t.product(Product::kProjection);
    int scaled = act(name + ".lora_scaled", out_shape, true);
    t.op(name + ".lora_scale (mul)", {b}, {});
    int sum = act(name + "+lora", out_shape, true);
    t.op(name + " + lora (add)", {y, scaled}, {});
    return sum;
  }

  int linear(const std::string& name, int x, int64_t out_features,
             const std::string& lora_key) {
    return linear(name, x, out_features, lora_key, full);
  }

  int layer_norm(const std::string& name, int x) {
    const Shape sh = t.at(x).shape;
    const bool any = rg(x) || full;
    int mean = t.value(name + ".mean", lead(x), 4, false);
    int rstd = t.value(name + ".rstd", lead(x), 4, false);
    int y = act(name, sh, any);
    t.op(name + " (layer_norm)", {x},
         any ? std::vector<int>{x, mean, rstd} : std::vector<int>{}, 0, 0,
         full ? 2 * sh.back() * pe : 0);
    return y;
  }

  // remat::nn::rms_norm: computed in fp32 (a bf16 input is cast up first,
  // and the normalised tensor cast back before the weight), every
  // intermediate a temporary; the Function saves x and rstd. The
  // intermediates "require grad" so that backward holds temporaries of their
  // sizes, as the fused backward does.
  int rms_norm(const std::string& name, int x) {
    const Shape sh = t.at(x).shape;
    const Shape stat = with_last(lead(x), 1);
    const bool xr = rg(x);
    const bool any = xr || full;
    const std::vector<int> none;
    // The first op saves x and rsqrt saves rstd: the trace then holds them
    // through the whole fused backward, as the Function does.
    const std::vector<int> saves_x = any ? std::vector<int>{x} : none;
    int h = x;
    if (e != 4) {
      h = t.value(name + ".float", sh, 4, xr);
      t.op(name + " (rms_norm: to fp32)", {x}, saves_x);
    }
    int sq = t.value(name + ".pow", sh, 4, xr);
    t.op(name + " (rms_norm: pow)", {h}, e != 4 ? none : saves_x);
    int ms = t.value(name + ".mean", stat, 4, xr);
    t.op(name + " (mean)", {sq}, none);
    int eps = t.value(name + ".mean_eps", stat, 4, xr);
    t.op(name + " (add eps)", {ms}, none);
    int rstd = t.value(name + ".rstd", stat, 4, xr);
    t.op(name + " (rms_norm: rsqrt)", {eps}, any ? std::vector<int>{rstd} : none);
    int n = t.value(name + ".normalized", sh, 4, xr);
    t.op(name + " (mul rstd)", {h, rstd}, none);
    if (e != 4) {
      int cast = act(name + ".normalized_cast", sh, xr);
      t.op(name + " (to activation dtype)", {n}, none);
      n = cast;
    }
    int y = act(name, sh, any);
    t.op(name + " (mul weight)", {n}, none, 0, 0, full ? sh.back() * pe : 0);
    return y;
  }

  // remat::nn::swiglu: silu(gate) * up, saving gate and up.
  int swiglu(const std::string& name, const std::string& silu_name, int gate, int up) {
    const bool r = rg(gate) || rg(up);
    int s = act(silu_name, t.at(gate).shape, rg(gate));
    t.op(silu_name + " (silu)", {gate}, {});
    int y = act(name, t.at(gate).shape, r);
    t.op(name + " (swiglu)", {s, up}, r ? std::vector<int>{gate, up} : std::vector<int>{});
    return y;
  }

  // remat::nn::swiglu_linear: silu(gate), times up in place, then the linear
  // without a bias (the weight trains under full fine-tuning); saves gate
  // and up, and recomputes the product in backward. The first op saves them,
  // so that the trace holds them through the whole fused backward.
  int swiglu_linear(const std::string& name, const std::string& gated_name,
                    int gate, int up, int64_t out_features) {
    const Shape sh = t.at(gate).shape;
    const bool r = rg(gate) || rg(up);
    const bool trainable = full;
    int a = act(gated_name, sh, r);
    t.op(name + " (swiglu_linear)", {gate, up},
         r || trainable ? std::vector<int>{gate, up} : std::vector<int>{});
    const double f = 2 * numel(lead(gate)) * sh.back() * out_features;
    int y = act(name, with_last(lead(gate), out_features), r || trainable);
    t.op(name + " (swiglu_linear: linear)", {a}, {}, f, (r ? f : 0) + (trainable ? f : 0),
         trainable ? sh.back() * out_features * pe : 0);
    t.product(Product::kProjection);
    return y;
  }

  int unary_saving_input(const std::string& name, const std::string& op, int x) {
    int y = act(name, t.at(x).shape, rg(x));
    t.op(name + " (" + op + ")", {x}, rg(x) ? std::vector<int>{x} : std::vector<int>{});
    return y;
  }

  int unary_saving_output(const std::string& name, const std::string& op, int x) {
    int y = act(name, t.at(x).shape, rg(x));
    t.op(name + " (" + op + ")", {x}, rg(x) ? std::vector<int>{y} : std::vector<int>{});
    return y;
  }

  int mul(const std::string& name, int a, int b) {
    int y = act(name, t.at(a).shape, rg(a) || rg(b));
    std::vector<int> saved;
    if (rg(b)) {
      saved.push_back(a);
    }
    if (rg(a)) {
      saved.push_back(b);
    }
    t.op(name + " (mul)", {a, b}, saved);
    return y;
  }

  int add(const std::string& name, int a, int b) {
    int y = act(name, t.at(a).shape, rg(a) || rg(b));
    t.op(name + " (add)", {a, b}, {});
    return y;
  }

  // A new tensor of `shape` computed from `x`, saving nothing (copies,
  // reshapes that copy, in-graph constants).
  int copy(const std::string& name, const std::string& op, int x, Shape shape) {
    int y = act(name, std::move(shape), rg(x));
    t.op(name + " (" + op + ")", {x}, {});
    return y;
  }

  int matmul(const std::string& name, int a, int b, Shape out, double flops) {
    int y = act(name, std::move(out), rg(a) || rg(b));
    std::vector<int> saved;
    if (rg(b)) {
      saved.push_back(a);
    }
    if (rg(a)) {
      saved.push_back(b);
    }
    t.op(name + " (matmul)", {a, b}, saved, flops,
         (rg(a) ? flops : 0) + (rg(b) ? flops : 0));
    t.product(Product::kMatmul);
    return y;
  }

  // Rotary embedding, Hugging Face style: x * cos + rotate_half(x) * sin,
  // with cos and sin constants.
  int rotary(const std::string& name, int x, int64_t n_heads) {
    const Shape sh{B, n_heads, S, d};
    int c = copy(name + ".cos", "mul cos", x, sh);
    int half = copy(name + ".rotate_half", "neg, cat", x, sh);
    int sn = copy(name + ".sin", "mul sin", half, sh);
    return add(name, c, sn);
  }

  // The attention core: q [B, heads, S, d], k and v [B, kv, S, d] in, the
  // context [B, heads, S, d] out. `*_view`: the tensor is a transposed view
  // of a [B, S, n, d] projection, which at::matmul copies (reshape of a
  // non-contiguous view) and whose copy bmm then saves.
  int attention(const std::string& p, int q, int k, int v, bool causal,
                bool q_view, bool k_view, bool v_view) {
    t.block(Block::kAttentionCore);
    const double f = 2.0 * B * heads * S * S * d; // one of the two products
    int out;
    if (s.attention() == AttentionImpl::kBlockwise) {
      const bool r = rg(q) || rg(k) || rg(v);
      out = act(p + "attention_output", {B, heads, S, d}, r);
      int lse = t.value(p + "attention_lse", {B, heads, S}, 4, false);
      const double fwd = 2 * f * (causal ? 0.5 : 1.0);
      // FlashAttention-2's backward: five products of size S*S against two
      // in forward.
      t.op(p + "attention (blockwise)", {q, k, v},
           r ? std::vector<int>{q, k, v, out, lse} : std::vector<int>{}, fwd,
           r ? 2.5 * fwd : 0);
    } else {
      if (kv != heads) {
        k = copy(p + "key_repeated", "repeat_kv: expand, reshape", k, {B, heads, S, d});
        v = copy(p + "value_repeated", "repeat_kv: expand, reshape", v, {B, heads, S, d});
        k_view = v_view = false;
      }
      const std::string why = "matmul's reshape of a transposed view";
      if (q_view) {
        q = copy(p + "query_contiguous", why, q, {B, heads, S, d});
      }
      if (k_view) {
        k = copy(p + "key_contiguous", why, k, {B, heads, d, S});
      }
      if (v_view) {
        v = copy(p + "value_contiguous", why, v, {B, heads, S, d});
      }
      int scores = matmul(p + "scores", q, k, {B, heads, S, S}, f);
      // scores.mul_(scale) is in place and saves nothing.
      int masked;
      if (causal) {
        int tri = t.value(p + "causal_mask", {S, S}, 1, false);
        t.op(p + "causal_mask (ones, triu)", {}, {});
        masked = act(p + "scores_masked", {B, heads, S, S}, rg(scores));
        t.op(p + "scores_masked (masked_fill)", {scores, tri},
             rg(scores) ? std::vector<int>{tri} : std::vector<int>{});
      } else {
        masked = copy(p + "scores_masked", "add padding mask", scores, {B, heads, S, S});
      }
      int probs = unary_saving_output(p + "probs", "softmax", masked);
      if (s.dropout()) {
        probs = dropout(p + "probs_dropout", probs);
      }
      out = matmul(p + "attention_output", probs, v, {B, heads, S, d}, f);
      // nn::checkpointed_attention's own kernel (no autocast; a dropout mask
      // it can redraw from a seed on the CPU) recomputes the probabilities
      // but not this product; otherwise remat::checkpoint replays it all.
      if (s.precision() != Precision::kBf16Mixed && (!s.dropout() || s.backend() == Backend::kCpu)) {
        t.skip_in_recompute();
      }
    }
    t.block(Block::kOther);
    return out;
  }
};

} // namespace

bool layer_input_requires_grad(const ModelSpec& spec, int64_t layer) {
  // Full fine-tuning trains the embeddings; under LoRA something trains in
  // every layer (the adapters), so only the first layer's input is frozen.
  return spec.lora_rank() == 0 || layer > 0;
}

Trace trace_embedding(const ModelSpec& spec) {
  Builder b(spec);
  auto& t = b.t;
  const bool tr = b.full;
  int ids = t.input("input_ids", {b.B, b.S}, 8, false);
  if (spec.family() == Family::kLlama) {
    int x = b.act("embed_tokens", {b.B, b.S, b.H}, tr);
    // A dense gradient of the whole table.
    t.op("embed_tokens (embedding)", {ids}, {}, 0, 0, tr ? spec.vocab() * b.H * b.pe : 0);
    t.output(x);
    return std::move(t);
  }
  int word = b.act("embeddings.word_embeddings", {b.B, b.S, b.H}, tr);
  const int64_t g = tr ? b.H * b.pe : 0; // dense gradients of the tables
  t.op("embeddings.word_embeddings (embedding)", {ids}, {}, 0, 0, spec.vocab() * g);
  int pos = b.act("embeddings.position_embeddings", {b.S, b.H}, tr);
  t.op("embeddings.position_embeddings (embedding)", {}, {}, 0, 0, spec.max_positions() * g);
  int type = b.act("embeddings.token_type_embeddings", {b.B, b.S, b.H}, tr);
  t.op("embeddings.token_type_embeddings (embedding)", {ids}, {}, 0, 0, spec.type_vocab() * g);
  int sum = b.add("embeddings.sum", word, pos);
  sum = b.add("embeddings.sum_types", sum, type);
  int x = b.layer_norm("embeddings.LayerNorm", sum);
  if (spec.dropout()) {
    x = b.dropout("embeddings.dropout", x);
  }
  t.output(x);
  return std::move(t);
}

Trace trace_layer(const ModelSpec& spec, bool input_requires_grad) {
  Builder b(spec);
  auto& t = b.t;
  const int64_t B = b.B, S = b.S, H = b.H, d = b.d;
  int h = t.input("input", {B, S, H}, b.e, input_requires_grad);
  if (spec.family() == Family::kBert) {
    int q = b.linear("attention.self.query", h, H, "q");
    int k = b.linear("attention.self.key", h, H, "k");
    int v = b.linear("attention.self.value", h, H, "v");
    // view + transpose to [B, heads, S, d]: views, nothing new.
    int ctx = b.attention("attention.self.", q, k, v, /*causal=*/false,
                          /*q_view=*/true, /*k_view=*/true, /*v_view=*/true);
    ctx = b.copy("attention.self.context", "transpose, reshape", ctx, {B, S, H});
    int o = b.linear("attention.output.dense", ctx, H, "o");
    if (spec.dropout()) {
      o = b.dropout("attention.output.dropout", o);
    }
    int r = b.add("attention.output.residual", o, h);
    int a = b.layer_norm("attention.output.LayerNorm", r);
    t.block(Block::kMlp);
    int u = b.linear("intermediate.dense", a, b.I, "up");
    int g = b.unary_saving_input("intermediate.gelu", "gelu", u);
    int dn = b.linear("output.dense", g, H, "down");
    if (spec.dropout()) {
      dn = b.dropout("output.dropout", dn);
    }
    t.block(Block::kOther);
    int r2 = b.add("output.residual", dn, a);
    t.output(b.layer_norm("output.LayerNorm", r2));
    return std::move(t);
  }
  const int64_t Hkv = b.kv * d;
  int n1 = b.rms_norm("input_layernorm", h);
  int q = b.linear("self_attn.q_proj", n1, H, "q");
  int k = b.linear("self_attn.k_proj", n1, Hkv, "k");
  int v = b.linear("self_attn.v_proj", n1, Hkv, "v");
  q = b.rotary("self_attn.q_rotary", q, b.heads);
  k = b.rotary("self_attn.k_rotary", k, b.kv);
  // v: view + transpose to [B, kv, S, d], nothing new.
  // q and k leave the rotary embedding contiguous in [B, heads, S, d].
  int ctx = b.attention("self_attn.", q, k, v, /*causal=*/true,
                        /*q_view=*/false, /*k_view=*/false, /*v_view=*/true);
  ctx = b.copy("self_attn.context", "transpose, reshape", ctx, {B, S, H});
  int o = b.linear("self_attn.o_proj", ctx, H, "o");
  int h2 = b.add("residual", h, o);
  // remat's Llama checkpoints the norm with the MLP.
  t.block(Block::kMlp);
  int n2 = b.rms_norm("post_attention_layernorm", h2);
  int gate = b.linear("mlp.gate_proj", n2, b.I, "gate");
  int up = b.linear("mlp.up_proj", n2, b.I, "up");
  // LlamaMLP: swiglu_linear, or swiglu and down_proj's own forward when it
  // has an adapter.
  int dn = b.lora_on("down")
      ? b.linear("mlp.down_proj", b.swiglu("mlp.gated", "mlp.act", gate, up), H, "down")
      : b.swiglu_linear("mlp.down_proj", "mlp.gated", gate, up, H);
  t.block(Block::kOther);
  t.output(b.add("output", h2, dn));
  return std::move(t);
}

Trace trace_head(const ModelSpec& spec, bool input_requires_grad) {
  Builder b(spec);
  auto& t = b.t;
  const int64_t B = b.B, S = b.S, H = b.H;
  int h = t.input("last_hidden_state", {B, S, H}, b.e, input_requires_grad);
  const bool bert = spec.family() == Family::kBert;
  int x = bert ? h : b.rms_norm("norm", h);
  const auto head = spec.head();

  auto loss_of = [&](int in) {
    int loss = t.value("loss", {}, 4, b.rg(in));
    t.op("loss", {in}, {});
    return loss;
  };

  if (head == Head::kNone) {
    if (bert && spec.pooler()) {
      int first = b.copy("pooler.first_token", "select", x, {B, H});
      int p = b.linear("pooler.dense", first, H, "");
      b.unary_saving_output("pooler.tanh", "tanh", p);
    }
    t.output(loss_of(x)); // mean of the last hidden state: saves nothing
    return std::move(t);
  }
  if (head == Head::kClassifier) {
    const bool head_trains = true; // trained under LoRA too (modules_to_save)
    int logits;
    if (bert) {
      int first = b.copy("pooler.first_token", "select", x, {B, H});
      int p = b.linear("pooler.dense", first, H, "");
      p = b.unary_saving_output("pooler.tanh", "tanh", p);
      if (spec.dropout()) {
        p = b.dropout("classifier.dropout", p);
      }
      logits = b.linear("classifier", p, spec.num_labels(), "", head_trains);
    } else {
      int all = b.linear("score", x, spec.num_labels(), "", head_trains);
      logits = b.copy("score.last_token", "index", all, {B, spec.num_labels()});
    }
    t.output(loss_of(logits));
    return std::move(t);
  }
  // Language model.
  if (!bert && !b.lora_on("lm_head")) {
    // remat::nn::linear_cross_entropy (Llama's forward_loss): keeps the
    // normed hidden state and a float32 log-sum-exp per token, never the
    // [B, S, vocab] logits; backward recomputes them chunk by chunk (one more
    // head matmul), and the chunks are transients.
    const bool xr = b.rg(x);
    const bool trains = b.full;
    const double f = 2.0 * static_cast<double>(B * S * H) * static_cast<double>(spec.vocab());
    int lse = t.value("lm_head.lse", {B, S}, 4, false);
    int loss = t.value("loss", {}, 4, xr || trains);
    t.op("lm_head + cross_entropy (linear_cross_entropy)", {x},
         xr || trains ? std::vector<int>{x, lse} : std::vector<int>{}, f,
         xr || trains ? f + (xr ? f : 0) + (trains ? f : 0) : 0,
         trains ? H * spec.vocab() * b.pe : 0);
    t.output(loss);
    return std::move(t);
  }
  if (bert) {
    x = b.linear("cls.predictions.transform.dense", x, H, "");
    x = b.unary_saving_input("cls.predictions.transform.gelu", "gelu", x);
    x = b.layer_norm("cls.predictions.transform.LayerNorm", x);
  }
  int logits = b.linear(bert ? "cls.predictions.decoder" : "lm_head", x, spec.vocab(), "");
  if (b.e != 4) {
    int f = t.value("logits.float", {B, S, spec.vocab()}, 4, b.rg(logits));
    t.op("logits.float (to fp32)", {logits}, {});
    logits = f;
  }
  int lsm = t.value("log_softmax", {B, S, spec.vocab()}, 4, b.rg(logits));
  t.op("log_softmax", {logits}, b.rg(logits) ? std::vector<int>{lsm} : std::vector<int>{});
  int loss = t.value("loss", {}, 4, b.rg(lsm));
  t.op("nll_loss", {lsm}, b.rg(lsm) ? std::vector<int>{lsm} : std::vector<int>{});
  t.output(loss);
  return std::move(t);
}

} // namespace detail
} // namespace plan
} // namespace remat
