#include "remat/nn/llama.h"

#include "remat/checkpoint.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

namespace {

using remat::CheckpointPolicy;
using remat::nn::Llama;
using remat::nn::LlamaOptions;

LlamaOptions tiny() {
  return LlamaOptions()
      .vocab_size(50)
      .hidden_size(32)
      .intermediate_size(64)
      .num_layers(4)
      .num_heads(4)
      .num_kv_heads(2)
      .max_position_embeddings(64);
}

class LlamaTest : public ::testing::Test {
 protected:
  LlamaTest() {
    torch::manual_seed(0);
  }

  static std::string error_of(const std::function<void()>& f) {
    try {
      f();
    } catch (const c10::Error& e) {
      return e.what();
    }
    return "";
  }

  struct Step {
    torch::Tensor loss;
    std::vector<torch::Tensor> grads;
  };

  // One forward + backward with a fixed seed (dropout draws the same masks).
  static Step step(Llama& model, const torch::Tensor& ids) {
    model->zero_grad();
    torch::manual_seed(123);
    auto loss = model->loss(model->forward(ids), ids);
    loss.backward();
    Step s{loss.detach(), {}};
    for (const auto& p : model->parameters()) {
      s.grads.push_back(p.grad().defined() ? p.grad().clone() : torch::Tensor());
    }
    return s;
  }

  static void expect_same(const Step& a, const Step& b, const std::string& what) {
    EXPECT_LE((a.loss - b.loss).abs().item<double>(), 1e-6) << what;
    ASSERT_EQ(a.grads.size(), b.grads.size());
    for (size_t i = 0; i < a.grads.size(); ++i) {
      ASSERT_TRUE(a.grads[i].defined() && b.grads[i].defined()) << what << " param " << i;
      EXPECT_LE((a.grads[i] - b.grads[i]).abs().max().item<double>(), 1e-6)
          << what << " param " << i;
    }
  }
};

TEST_F(LlamaTest, ShapesAndHuggingFaceNames) {
  Llama model(tiny());
  auto ids = torch::randint(0, 50, {2, 10});
  EXPECT_EQ(model->forward(ids).sizes(), (std::vector<int64_t>{2, 10, 50}));
  auto params = model->named_parameters();
  for (const char* name :
       {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.o_proj.weight", "model.layers.3.mlp.gate_proj.weight",
        "model.layers.3.mlp.up_proj.weight", "model.layers.3.mlp.down_proj.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight", "model.norm.weight",
        "lm_head.weight"}) {
    EXPECT_TRUE(params.contains(name)) << name;
  }
  // Per layer: 4 attention + 3 MLP + 2 norms; no biases.
  EXPECT_EQ(params.size(), 4u * 9 + 3);
  EXPECT_EQ(params["model.layers.0.self_attn.k_proj.weight"].sizes(),
            (std::vector<int64_t>{2 * 8, 32}));
  EXPECT_EQ(params["model.layers.0.mlp.down_proj.weight"].sizes(),
            (std::vector<int64_t>{32, 64}));
}

TEST_F(LlamaTest, EveryPolicyGivesTheSameLossAndGradients) {
  for (auto kind : {remat::nn::AttentionKind::kEager, remat::nn::AttentionKind::kBlockwise}) {
    Llama model(tiny().attention_dropout(0.1).attention(kind));
    model->train();
    auto ids = torch::randint(0, 50, {2, 16});
    auto reference = step(model, ids);
    for (const char* base : {"every-layer", "every-2", "sqrt", "full", "selective-attention",
                             "selective-mlp"}) {
      // Under both checkpoint implementations, and with the value check.
      for (const char* how : {"", "+reentrant", "+values"}) {
        const std::string name = std::string(base) + how;
        model->gradient_checkpointing_enable(CheckpointPolicy::parse(name));
        const auto before = remat::recompute_count();
        auto s = step(model, ids);
        EXPECT_GT(remat::recompute_count(), before) << name;
        expect_same(reference, s, name + " " + remat::nn::to_string(kind));
      }
    }
    // Per-op policies: the recompute skips the kept products.
    for (const char* name : {"save-matmuls", "save-projections", "save-matmuls+values",
                             "every-2+save=aten::mm"}) {
      model->gradient_checkpointing_enable(CheckpointPolicy::parse(name));
      const auto before = remat::op_policy_skipped_ops();
      auto s = step(model, ids);
      EXPECT_GT(remat::op_policy_skipped_ops(), before) << name;
      expect_same(reference, s, std::string(name) + " " + remat::nn::to_string(kind));
    }
    model->gradient_checkpointing_disable();
    expect_same(reference, step(model, ids), "none again");
  }
}

TEST_F(LlamaTest, GenerateWithCacheEqualsRecomputing) {
  Llama model(tiny());
  model->eval();
  auto prompt = torch::randint(0, 50, {2, 5});
  auto cached = model->generate(prompt, 8, /*use_cache=*/true);
  auto full = model->generate(prompt, 8, /*use_cache=*/false);
  EXPECT_EQ(cached.sizes(), (std::vector<int64_t>{2, 13}));
  EXPECT_TRUE(torch::equal(cached, full)) << cached << full;
  EXPECT_TRUE(torch::equal(cached.narrow(1, 0, 5), prompt));

  // Logits of a cached forward equal those of the whole sequence.
  torch::NoGradGuard no_grad;
  remat::nn::KvCache cache;
  auto first = model->forward(full.narrow(1, 0, 9), {}, &cache);
  auto rest = model->forward(full.narrow(1, 9, 4), {}, &cache);
  EXPECT_EQ(cache.length(), 13);
  auto whole = model->forward(full);
  EXPECT_LE((torch::cat({first, rest}, 1) - whole).abs().max().item<double>(), 1e-5);

  // Blockwise attention, whose causal mask follows the cache offset, gives
  // the same tokens.
  Llama blocks(tiny().attention(remat::nn::AttentionKind::kBlockwise));
  blocks->eval();
  auto src = model->named_parameters();
  for (auto& p : blocks->named_parameters()) {
    p.value().copy_(src[p.key()]);
  }
  EXPECT_TRUE(torch::equal(blocks->generate(prompt, 8), cached));
}

TEST_F(LlamaTest, RefusesCacheUnderGrad) {
  Llama model(tiny());
  remat::nn::KvCache cache;
  auto ids = torch::randint(0, 50, {1, 4});
  auto msg = error_of([&] { model->forward(ids, {}, &cache); });
  EXPECT_NE(msg.find("expected grad mode off when a KV cache is passed (use_cache is "
                     "for generation), but grad mode is on"),
            std::string::npos) << msg;
  EXPECT_EQ(cache.length(), 0);
}

// A GQA model is an MHA model whose key/value heads are repeated.
TEST_F(LlamaTest, GroupedQueryAttentionEqualsRepeatedHeads) {
  for (int64_t kv : {1, 2}) {
    Llama gqa(tiny().num_kv_heads(kv));
    Llama mha(tiny().num_kv_heads(4));
    {
      torch::NoGradGuard no_grad;
      auto src = gqa->named_parameters();
      for (auto& p : mha->named_parameters()) {
        auto w = src[p.key()];
        if (p.key().find("k_proj") != std::string::npos ||
            p.key().find("v_proj") != std::string::npos) {
          // [kv * d, H] -> [heads * d, H], head h from kv head h / (4 / kv).
          w = w.view({kv, 1, 8, 32}).expand({kv, 4 / kv, 8, 32}).reshape({32, 32});
        }
        p.value().copy_(w);
      }
    }
    auto ids = torch::randint(0, 50, {2, 12});
    auto a = gqa->forward(ids);
    auto b = mha->forward(ids);
    EXPECT_LE((a - b).abs().max().item<double>(), 1e-5) << "kv_heads " << kv;
    gqa->loss(a, ids).backward();
    EXPECT_TRUE(gqa->named_parameters()["model.layers.0.self_attn.k_proj.weight"]
                    .grad()
                    .defined());
  }
}

TEST_F(LlamaTest, TiedEmbeddingsShareStorage) {
  Llama model(tiny().tie_word_embeddings(true));
  EXPECT_FALSE(model->lm_head);
  EXPECT_FALSE(model->named_parameters().contains("lm_head.weight"));
  auto emb = model->model->embed_tokens->weight;
  EXPECT_EQ(model->lm_head_weight().data_ptr(), emb.data_ptr());
  auto ids = torch::randint(0, 50, {2, 8});
  auto logits = model->forward(ids);
  // The head reads the embedding matrix: a token never in the input still
  // gets a gradient through the logits.
  model->loss(logits, ids).backward();
  torch::Tensor unused_rows = torch::ones({50}, torch::kBool);
  unused_rows.index_put_({ids.flatten()}, false);
  EXPECT_GT(emb.grad().index({unused_rows}).abs().sum().item<double>(), 0.0);
}

TEST_F(LlamaTest, LossShiftsAndIgnoresPadding) {
  auto logits = torch::randn({2, 5, 7});
  auto labels = torch::randint(0, 7, {2, 5});
  labels.index_put_({1, 3}, -100);
  auto loss = remat::nn::causal_lm_loss(logits, labels);
  // By hand: position s predicts label s + 1; (1, 2) -> label -100 skipped.
  double total = 0;
  int count = 0;
  auto logp = torch::log_softmax(logits, -1);
  for (int b = 0; b < 2; ++b) {
    for (int s = 0; s < 4; ++s) {
      auto y = labels[b][s + 1].item<int64_t>();
      if (y == -100) {
        continue;
      }
      total -= logp[b][s][y].item<double>();
      ++count;
    }
  }
  EXPECT_NEAR(loss.item<double>(), total / count, 1e-6);
}

} // namespace
