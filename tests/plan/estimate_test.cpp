#include "remat/plan/estimate.h"
#include "remat/plan/estimate_table.h"
#include "remat/plan/solver.h"
#include "testing.h"

#include <gtest/gtest.h>

#include <algorithm>

namespace {

using remat::CheckpointPolicy;
using remat::SegmentMode;
using namespace remat::plan;

int64_t layer_bytes(const ModelSpec& spec, SegmentMode mode = SegmentMode::kStore) {
  int64_t n = 0;
  for (const auto& t : layer_activations(spec, mode)) {
    n += t.bytes;
  }
  return n;
}

const SavedTensor* find(const std::vector<SavedTensor>& ts, const std::string& name) {
  auto it = std::find_if(ts.begin(), ts.end(), [&](const SavedTensor& t) { return t.name == name; });
  return it == ts.end() ? nullptr : &*it;
}

TEST(PlanEstimate, ParameterCountsMatchKnownModels) {
  // bert-base-uncased with its pooler.
  EXPECT_EQ(count_parameters(ModelSpec::bert_base()).total, 109482240);
  // Llama-2-7B, untied LM head.
  auto llama = count_parameters(ModelSpec::llama2_7b());
  EXPECT_EQ(llama.total, 6738415616);
  EXPECT_EQ(llama.trainable, llama.total);
  // PEFT prints "trainable params: 4,194,304" for Llama-2-7B, r = 8 on q, v.
  auto lora = count_parameters(ModelSpec::llama2_7b().lora_rank(8).lora_targets({"q", "v"}));
  EXPECT_EQ(lora.trainable, 4194304);
  EXPECT_EQ(lora.total, 6738415616 + 4194304);
  // The default intermediate size follows Llama's rule.
  EXPECT_EQ(ModelSpec(Family::kLlama, 1, 4096, 32, 100).mlp_size(), 11008);
  EXPECT_EQ(ModelSpec(Family::kLlama, 1, 5120, 40, 100).mlp_size(), 13824);
  EXPECT_EQ(ModelSpec::bert_base().mlp_size(), 3072);
}

// A BERT layer (intermediate 4h, dropout, full fine-tuning) with e-byte
// activations and 1-byte dropout masks keeps (16e + 2) s*b*h +
// (2e + 1) a*s^2*b bytes plus the fp32 LayerNorm statistics: Korthikanti et
// al.'s 34 s*b*h + 5 a*s^2*b for bf16.
TEST(PlanEstimate, BertLayerMatchesKorthikanti) {
  const int64_t b = 2, s = 128, h = 256, a = 4;
  auto spec = ModelSpec(Family::kBert, 2, h, a, 1000).seq(s).batch(b);
  const int64_t sbh = s * b * h, as2b = a * s * s * b, stats = 16 * s * b;
  EXPECT_EQ(layer_bytes(ModelSpec(spec).precision(Precision::kBf16).backend(Backend::kCuda)),
            34 * sbh + 5 * as2b + stats);
  // remat's dropout keeps 1-byte masks on every backend: fp32 on CPU.
  EXPECT_EQ(layer_bytes(spec), (16 * 4 + 2) * sbh + (2 * 4 + 1) * as2b + stats);
  // Without dropout the masks and the dropped copy of the probabilities go.
  EXPECT_EQ(layer_bytes(ModelSpec(spec).dropout(false)), 16 * 4 * sbh + 4 * as2b + stats);
}

TEST(PlanEstimate, BreakdownNamesTensorsAndModes) {
  auto spec = ModelSpec::bert_base().batch(2).seq(64);
  auto store = layer_activations(spec);
  const auto* probs = find(store, "attention.self.probs");
  ASSERT_NE(probs, nullptr);
  EXPECT_EQ(probs->bytes, 2 * 12 * 64 * 64 * 4);
  EXPECT_EQ(probs->saved_by, "attention.self.probs (softmax)");
  EXPECT_EQ(probs->shape, "[2, 12, 64, 64] x 4 B");
  // remat's dropout keeps a 1-byte mask.
  const auto* mask = find(store, "attention.self.probs_dropout.mask");
  ASSERT_NE(mask, nullptr);
  EXPECT_EQ(mask->bytes, 2 * 12 * 64 * 64);
  EXPECT_EQ(find(store, "output.LayerNorm")->saved_by, "next layer (the layer output)");

  // Recomputing the attention core drops the S^2 tensors and keeps its
  // inputs for the checkpoint.
  auto attn = layer_activations(spec, SegmentMode::kRecomputeAttention);
  EXPECT_EQ(find(attn, "attention.self.probs"), nullptr);
  EXPECT_EQ(find(attn, "attention.self.query_contiguous"), nullptr);
  ASSERT_NE(find(attn, "attention.self.query"), nullptr);
  EXPECT_EQ(find(attn, "attention.self.query")->saved_by,
            "checkpoint of the attention core (its input)");
  // Recomputing the MLP drops its 4h tensors and keeps its input.
  auto mlp = layer_activations(spec, SegmentMode::kRecomputeMlp);
  EXPECT_EQ(find(mlp, "intermediate.gelu"), nullptr);
  EXPECT_EQ(find(mlp, "intermediate.dense"), nullptr);
  ASSERT_NE(find(mlp, "attention.output.LayerNorm"), nullptr);
  EXPECT_LT(layer_bytes(spec, SegmentMode::kRecomputeMlp), layer_bytes(spec));
  EXPECT_LT(layer_bytes(spec, SegmentMode::kRecomputeAttention), layer_bytes(spec));

  // On CUDA dropout keeps a 1-byte mask instead of a noise tensor.
  auto cuda = layer_activations(ModelSpec(spec).backend(Backend::kCuda));
  ASSERT_NE(find(cuda, "attention.self.probs_dropout.mask"), nullptr);
  EXPECT_EQ(find(cuda, "attention.self.probs_dropout.mask")->bytes, 2 * 12 * 64 * 64);
}

TEST(PlanEstimate, FrozenWeightsKeepLess) {
  // Under LoRA on attention only, the frozen MLP projections do not keep
  // their input (the norm's output), while swiglu_linear still keeps gate
  // and up; the gated product feeding down_proj is never saved.
  auto full = ModelSpec::llama2_7b().seq(256).precision(Precision::kBf16Mixed);
  auto lora = ModelSpec(full).lora_rank(16).lora_targets({"q", "k", "v", "o"});
  auto f = layer_activations(full);
  auto l = layer_activations(lora);
  EXPECT_NE(find(f, "post_attention_layernorm"), nullptr);
  EXPECT_EQ(find(l, "post_attention_layernorm"), nullptr);
  for (const auto* acts : {&f, &l}) {
    EXPECT_EQ(find(*acts, "mlp.gated"), nullptr);
    EXPECT_EQ(find(*acts, "mlp.act"), nullptr);
    ASSERT_NE(find(*acts, "mlp.gate_proj"), nullptr);
    EXPECT_EQ(find(*acts, "mlp.gate_proj")->saved_by, "mlp.down_proj (swiglu_linear)");
    EXPECT_NE(find(*acts, "mlp.up_proj"), nullptr);
  }
  EXPECT_LT(layer_bytes(lora), layer_bytes(full));
  // An adapter on down_proj makes its input saved again (by LoRA's A).
  auto down = layer_activations(ModelSpec(lora).lora_targets({"q", "v", "down"}));
  ASSERT_NE(find(down, "mlp.gated"), nullptr);
  EXPECT_EQ(find(down, "mlp.gated")->saved_by, "mlp.down_proj.lora_A (linear)");
}

TEST(PlanEstimate, ActivationsAreLinearInBatch) {
  // Blockwise attention, no S x S mask: every saved tensor has a batch axis.
  auto spec = ModelSpec::llama2_7b().seq(512).attention(AttentionImpl::kBlockwise)
                  .precision(Precision::kBf16Mixed);
  for (const char* policy : {"none", "every-layer", "selective-mlp"}) {
    auto p = CheckpointPolicy::parse(policy);
    auto one = estimate(ModelSpec(spec).batch(1), p);
    auto four = estimate(ModelSpec(spec).batch(4), p);
    // All but the 4-byte loss.
    EXPECT_NEAR(four.activation_bytes, 4 * one.activation_bytes, 16) << policy;
    EXPECT_EQ(four.weight_bytes, one.weight_bytes);
  }
  auto bert = ModelSpec::bert_base().seq(128);
  EXPECT_EQ(layer_bytes(ModelSpec(bert).batch(4)), 4 * layer_bytes(ModelSpec(bert).batch(1)));
}

TEST(PlanEstimate, CheckpointingEveryLayerKeepsFarLess) {
  auto spec = ModelSpec::bert_base().batch(8).seq(512);
  auto none = estimate(spec, CheckpointPolicy::none());
  auto every = estimate(spec, CheckpointPolicy::every_layer());
  EXPECT_LT(every.activation_bytes * 10, none.activation_bytes);
  EXPECT_LT(every.peak_bytes, none.peak_bytes);
  EXPECT_GT(every.step_seconds, none.step_seconds);
  // Held after forward with every layer checkpointed: the 12 layer inputs
  // (embedding output and 11 layer outputs), the last layer's output, and
  // the embedding stage's own saved tensors.
  const int64_t x = 8 * 512 * 768 * 4;
  EXPECT_GE(every.activation_bytes, 13 * x);
  EXPECT_LT(every.activation_bytes, 16 * x);
  // Identical fixed memory.
  EXPECT_EQ(every.weight_bytes + every.gradient_bytes + every.optimizer_bytes,
            none.weight_bytes + none.gradient_bytes + none.optimizer_bytes);
  EXPECT_EQ(none.optimizer_bytes, 2 * none.weight_bytes); // fp32 AdamW
}

// Per-op policies keep each layer's product outputs (save-projections only
// those with a weight) and recompute the rest; compress keeps the saved fp32
// activations in bf16; the user's own op lists and offload are refused.
TEST(PlanEstimate, PerOpAndCompressedPoliciesAreModelled) {
  auto spec = ModelSpec::bert_base().batch(8).seq(512);
  auto none = estimate(spec, CheckpointPolicy::none());
  auto every = estimate(spec, CheckpointPolicy::every_layer());
  auto matmuls = estimate(spec, CheckpointPolicy::parse("save-matmuls"));
  auto projections = estimate(spec, CheckpointPolicy::parse("save-projections"));
  auto compress = estimate(spec, CheckpointPolicy::parse("compress"));
  EXPECT_EQ(matmuls.schedule.str(), CheckpointPolicy::parse("save-matmuls").schedule(12).str());
  EXPECT_LT(every.activation_bytes, projections.activation_bytes);
  EXPECT_LT(projections.activation_bytes, matmuls.activation_bytes);
  EXPECT_LT(matmuls.activation_bytes, none.activation_bytes);
  // A layer keeps its outputs of q, k, v, the attention output, the two MLP
  // products (hidden, hidden, hidden, hidden, 4 hidden, hidden) and its
  // output; save-matmuls adds the scores and the weighted sum (12 heads x
  // 512 x 512, and hidden).
  const int64_t x = 8 * 512 * 768 * 4;
  const int64_t scores = int64_t(8) * 12 * 512 * 512 * 4;
  const auto per_layer = [&](const Estimate& e) {
    return (e.activation_bytes - every.activation_bytes) / 12;
  };
  EXPECT_NEAR(per_layer(projections), 9 * x, x);
  EXPECT_NEAR(per_layer(matmuls) - per_layer(projections), scores + x, x);
  // The products are kept, so only pointwise work runs again: no more
  // matrix FLOPs than none.
  EXPECT_NEAR(matmuls.step_seconds, none.step_seconds, 0.01 * none.step_seconds);
  EXPECT_GT(projections.step_seconds, matmuls.step_seconds);
  // bf16 halves the saved fp32 tensors; masks, ids and each layer's output
  // stay as they are.
  EXPECT_LT(compress.activation_bytes, none.activation_bytes * 6 / 10);
  EXPECT_GT(compress.activation_bytes, none.activation_bytes * 4 / 10);
  EXPECT_EQ(compress.step_seconds, none.step_seconds);
  EXPECT_LT(compress.peak_bytes, none.peak_bytes);
  // They fit more than none on the same device (the --fit path builds the
  // chain each policy runs on).
  const int64_t device = int64_t(16) << 30;
  const int64_t none_fit = fit_batch(spec, CheckpointPolicy::none(), device);
  EXPECT_GT(fit_batch(spec, CheckpointPolicy::parse("compress"), device), none_fit);
  EXPECT_GT(fit_batch(spec, CheckpointPolicy::parse("save-projections"), device), none_fit);
  // A budget may choose the per-op modes, never compression (lossy).
  for (const auto& seg : estimate(spec, CheckpointPolicy::budget(matmuls.peak_bytes)).schedule.segments) {
    EXPECT_NE(seg.mode, remat::SegmentMode::kCompress);
  }
  EXPECT_THROW_WITH(estimate(spec, CheckpointPolicy::parse("every-layer+save=aten::mm")),
                    "an op policy of your own (+save=) is measured by remat bench");
  EXPECT_THROW_WITH(estimate(spec, CheckpointPolicy::offload()),
                    "offload is measured on the GPU by remat bench");
}

TEST(PlanEstimate, BlockwiseAttentionRemovesTheQuadraticTerm) {
  auto base = ModelSpec::llama2_7b().batch(1).precision(Precision::kBf16Mixed);
  auto blockwise = ModelSpec(base).attention(AttentionImpl::kBlockwise);
  // Blockwise: exactly linear in the sequence length.
  EXPECT_EQ(layer_bytes(ModelSpec(blockwise).seq(2048)), 2 * layer_bytes(ModelSpec(blockwise).seq(1024)));
  // Eager: the difference is the S^2 tensors, probabilities (2 bytes) and
  // the causal mask (1 byte), minus blockwise's output and log-sum-exp.
  auto per_layer = [](int64_t s) {
    const int64_t quadratic = 32 * s * s * 2 + s * s;
    const int64_t blockwise_only = s * 4096 * 2 + 32 * s * 4; // output, lse
    return quadratic - blockwise_only;
  };
  for (int64_t s : {1024, 4096}) {
    const int64_t eager = layer_bytes(ModelSpec(base).seq(s));
    const int64_t block = layer_bytes(ModelSpec(blockwise).seq(s));
    EXPECT_EQ(eager - block, per_layer(s)) << s;
  }
  // And the estimate's peak follows: 32 layers of it.
  auto e = estimate(ModelSpec(base).seq(4096), CheckpointPolicy::none());
  auto f = estimate(ModelSpec(blockwise).seq(4096), CheckpointPolicy::none());
  EXPECT_GE(e.peak_bytes - f.peak_bytes, 32 * per_layer(4096));
}

TEST(PlanEstimate, PrecisionAndOptimizerBytes) {
  auto spec = ModelSpec::bert_base();
  const int64_t n = count_parameters(spec).total;
  auto fp32 = estimate(spec, CheckpointPolicy::none());
  EXPECT_EQ(fp32.weight_bytes, 4 * n);
  EXPECT_EQ(fp32.gradient_bytes, 4 * n);
  EXPECT_EQ(fp32.optimizer_bytes, 8 * n);
  auto mixed = estimate(ModelSpec(spec).precision(Precision::kBf16Mixed), CheckpointPolicy::none());
  EXPECT_EQ(mixed.weight_bytes + mixed.gradient_bytes + mixed.optimizer_bytes, 16 * n);
  auto pure = estimate(ModelSpec(spec).precision(Precision::kBf16), CheckpointPolicy::none());
  EXPECT_EQ(pure.weight_bytes + pure.gradient_bytes + pure.optimizer_bytes, 8 * n);
  auto sgd = estimate(ModelSpec(spec).optimizer(Optimizer::kSgd), CheckpointPolicy::none());
  EXPECT_EQ(sgd.optimizer_bytes, 0);
  // LoRA: only the adapters carry gradients and optimizer state.
  auto lora = ModelSpec::llama2_7b().precision(Precision::kBf16Mixed).lora_rank(8)
                  .lora_targets({"q", "v"});
  auto le = estimate(lora, CheckpointPolicy::none());
  EXPECT_EQ(le.gradient_bytes, 2 * 4194304);
  EXPECT_EQ(le.optimizer_bytes, 12 * 4194304);
}

TEST(PlanEstimate, FitFindsTheLargestBatchAndSequence) {
  auto spec = ModelSpec::llama2_7b().precision(Precision::kBf16Mixed).seq(2048)
                  .lora_rank(16);
  const int64_t device = int64_t(40) << 30;
  for (const char* name : {"none", "every-layer", "every-4", "selective-mlp"}) {
    auto policy = CheckpointPolicy::parse(name);
    const int64_t b = fit_batch(spec, policy, device);
    ASSERT_GE(b, 1) << name;
    EXPECT_LE(estimate(ModelSpec(spec).batch(b), policy).peak_bytes, device) << name;
    EXPECT_GT(estimate(ModelSpec(spec).batch(b + 1), policy).peak_bytes, device) << name;
  }
  EXPECT_GT(fit_batch(spec, CheckpointPolicy::every_layer(), device),
            fit_batch(spec, CheckpointPolicy::none(), device));
  const int64_t s = fit_seq(spec, CheckpointPolicy::every_layer(), device, 256);
  ASSERT_GT(s, 0);
  EXPECT_EQ(s % 256, 0);
  EXPECT_LE(estimate(ModelSpec(spec).seq(s), CheckpointPolicy::every_layer()).peak_bytes, device);
  EXPECT_GT(estimate(ModelSpec(spec).seq(s + 256), CheckpointPolicy::every_layer()).peak_bytes,
            device);
  // A device smaller than the weights fits nothing.
  EXPECT_EQ(fit_batch(spec, CheckpointPolicy::every_layer(), int64_t(1) << 30), 0);
  // A budget policy fits when some schedule does.
  const int64_t planned = fit_batch(spec, CheckpointPolicy::budget(device), device);
  EXPECT_GE(planned, fit_batch(spec, CheckpointPolicy::every_layer(), device));
}

TEST(PlanEstimate, BudgetPolicyIsPlanned) {
  auto spec = ModelSpec::llama_13b_lora_8k();
  const int64_t budget = int64_t(60) << 30;
  auto e = estimate(spec, CheckpointPolicy::budget(budget));
  EXPECT_LE(e.peak_bytes, budget);
  auto every = estimate(spec, CheckpointPolicy::every_layer());
  EXPECT_LT(e.step_seconds, every.step_seconds);
}

TEST(PlanEstimate, ChainIsValidAndMatchesTheEstimate) {
  auto spec = ModelSpec::bert_base().batch(4).seq(128).head(Head::kClassifier);
  auto chain = estimate_chain(spec);
  chain.validate();
  EXPECT_EQ(chain.num_layers(), 12);
  EXPECT_EQ(chain.stages.size(), 14u);
  EXPECT_EQ(chain.stages[1].stored_bytes(), layer_bytes(spec));
  auto e = estimate(spec, CheckpointPolicy::sqrt());
  EXPECT_EQ(e.peak_bytes, predicted_peak_bytes(chain, CheckpointPolicy::sqrt().schedule(12)));
  EXPECT_EQ(e.peak_bytes - e.peak_activation_bytes,
            e.weight_bytes + e.gradient_bytes + e.optimizer_bytes + e.input_bytes);
}

TEST(PlanEstimate, LanguageModelHeadKeepsNoLogits) {
  // Llama's loss is remat::nn::linear_cross_entropy: until backward its head
  // keeps the normed hidden state and a float per token, never the B*S*V
  // logits or log-probabilities.
  auto spec = ModelSpec::llama2_7b().layers(4).seq(4096).batch(2)
                  .precision(Precision::kBf16Mixed)
                  .attention(AttentionImpl::kBlockwise);
  auto chain = estimate_chain(spec);
  const auto& head = chain.stages.back();
  const int64_t logits = int64_t(2) * 4096 * 32000;
  const int64_t hidden = int64_t(2) * 4096 * 4096 * 2; // bf16
  EXPECT_LT(head.stored_bytes(), logits);
  EXPECT_GE(head.stored_bytes(), hidden + 2 * 4096 * 4);
  auto e = estimate(spec, CheckpointPolicy::every_layer());
  EXPECT_NE(e.peak_event, "backward of head");
}

TEST(PlanEstimate, WorkedFineTuneComparison) {
  auto spec = ModelSpec::llama_13b_lora_8k();
  auto params = count_parameters(spec);
  EXPECT_NEAR(params.total / 1e9, 13.0, 0.1);
  // Per-layer checkpointing keeps 40 layer inputs of B*S*H*2 bytes, plus
  // the embedding output and what the head's fp32 final RMSNorm keeps (its
  // input, and on LibTorch 1.13 its squares: 2 x each).
  auto every = estimate(spec, CheckpointPolicy::every_layer());
  const int64_t x = int64_t(2) * 8192 * 5120 * 2;
  EXPECT_GE(every.activation_bytes, 40 * x);
  EXPECT_LT(every.activation_bytes, 47 * x);
  // The seed's comparison table is the estimate command's: tests/cli.
}

TEST(PlanEstimate, ErrorsNameTheField) {
  auto bad = [](const ModelSpec& s, const std::string& text) {
    try {
      count_parameters(s);
      FAIL() << "expected an error";
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
  };
  bad(ModelSpec(Family::kLlama, 2, 100, 3, 10), "expected hidden (100) to be a multiple of heads (3)");
  bad(ModelSpec(Family::kLlama, 2, 96, 12, 10).kv_heads(5), "expected kv_heads dividing heads (12; 0: as many), but got 5");
  bad(ModelSpec::bert_base().seq(1024), "expected seq <= max_positions (512) for BERT, but got 1024");
  bad(ModelSpec::bert_base().lora_rank(4).lora_targets({"gate"}), "but got 'gate'");
  EXPECT_THROW(parse_precision("fp16"), c10::Error);
  EXPECT_EQ(parse_precision("bf16-mixed"), Precision::kBf16Mixed);
  // bf16 alone is bf16 autocast to the commands, which is not modelled.
  EXPECT_EQ(parse_precision("bf16-pure"), Precision::kBf16);
  EXPECT_STREQ(to_string(Precision::kBf16), "bf16-pure");
  try {
    parse_precision("bf16");
    FAIL();
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("bf16 autocast"), std::string::npos);
  }
  EXPECT_EQ(parse_head("lm"), Head::kLanguageModel);
  EXPECT_EQ(ModelSpec::preset("llama-13b-lora-8k").layers(), 40);
  EXPECT_EQ(ModelSpec::preset("harbor-13b").layers(), 40); // the old name
  try {
    ModelSpec::preset("gpt-5");
    FAIL();
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("but got 'gpt-5'"), std::string::npos);
  }
}

// estimate_table (remat/plan/estimate_table.h): the rows `remat estimate`
// prints are the estimator's, row by row.
TEST(EstimateTable, RowsAreTheEstimatesAndARefusedPolicyIsARow) {
  const auto spec = ModelSpec::bert_base().seq(128).batch(4);
  const auto t = estimate_table(
      spec, {CheckpointPolicy::none(), CheckpointPolicy::every_layer(),
             CheckpointPolicy::parse("budget:1KiB")},
      EstimateTableOptions().fit_bytes(int64_t(16) << 30));
  ASSERT_EQ(t.rows.size(), 3u);
  const auto every = estimate(spec, CheckpointPolicy::every_layer());
  EXPECT_EQ(t.rows[1].estimate.peak_bytes, every.peak_bytes);
  EXPECT_EQ(t.rows[1].fit, fit_batch(spec, CheckpointPolicy::every_layer(), int64_t(16) << 30));
  EXPECT_FALSE(t.rows[2].ok);
  EXPECT_FALSE(t.rows[2].error.empty());
  EXPECT_EQ(t.rows[2].error.find('\n'), std::string::npos);
  const auto j = t.rows_json();
  EXPECT_EQ(j[0]["step_flops_relative_to_none"], 1.0);
  EXPECT_EQ(j[1]["peak_bytes"], every.peak_bytes);
  EXPECT_TRUE(j[2].contains("error"));
  EXPECT_NE(t.str().find("max batch"), std::string::npos);
  EXPECT_EQ(describe(spec).rfind("bert, 12 layers, hidden 768, 12 heads, intermediate 3072", 0),
            0u)
      << describe(spec);
  EXPECT_EQ(spec_json(ModelSpec(spec).precision(Precision::kBf16))["precision"], "bf16-pure");
}

} // namespace
