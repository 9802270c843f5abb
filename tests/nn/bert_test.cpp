#include "remat/memory.h"
#include "remat/nn/bert.h"
#include "testing.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

namespace {

using remat::CheckpointPolicy;
using remat::nn::Bert;
using remat::nn::BertOptions;
using ::testing::HasSubstr;

BertOptions tiny() {
  return BertOptions()
      .vocab_size(97)
      .hidden_size(32)
      .num_layers(4)
      .num_heads(4)
      .max_position_embeddings(64)
      .hidden_dropout(0.2)
      .attention_dropout(0.2);
}

class BertTest : public ::testing::Test {
 protected:
  BertTest() { torch::manual_seed(0); }
};

struct Step {
  torch::Tensor loss;
  std::vector<torch::Tensor> grads;
};

// One training step with dropout active and the RNG seeded the same way.
Step step(Bert& model, const torch::Tensor& ids, const torch::Tensor& mask) {
  model->zero_grad(true);
  torch::manual_seed(42);
  auto out = model->forward(ids, mask);
  auto loss = out.last_hidden_state.pow(3).mean() + out.pooler_output.sum();
  loss.backward();
  Step s{loss.detach(), {}};
  for (const auto& p : model->parameters()) {
    s.grads.push_back(p.grad().defined() ? p.grad().clone() : torch::Tensor());
  }
  return s;
}

TEST_F(BertTest, ParameterNamesMatchHuggingFace) {
  Bert model(tiny());
  auto params = model->named_parameters();
  for (const char* name :
       {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight",
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.0.attention.self.key.bias",
        "encoder.layer.3.attention.self.value.weight",
        "encoder.layer.1.attention.output.dense.weight",
        "encoder.layer.1.attention.output.LayerNorm.bias",
        "encoder.layer.2.intermediate.dense.weight", "encoder.layer.2.output.dense.bias",
        "encoder.layer.2.output.LayerNorm.weight", "pooler.dense.weight"}) {
    EXPECT_NE(params.find(name), nullptr) << name;
  }
  // 5 embedding/LN tensors + 16 per layer + 2 pooler
  EXPECT_EQ(params.size(), 5u + 16u * 4u + 2u);
}

TEST_F(BertTest, BertBaseHasTheKnownParameterCount) {
  Bert model{BertOptions()}; // bert-base-uncased: 109,482,240 parameters
  int64_t n = 0;
  for (const auto& p : model->parameters()) {
    n += p.numel();
  }
  EXPECT_EQ(n, 109482240);
}

TEST_F(BertTest, EveryPolicyGivesBitIdenticalLossAndGradientsWithDropout) {
  Bert model(tiny());
  model->train();
  auto ids = torch::randint(97, {3, 24}, torch::kLong);
  auto mask = torch::ones({3, 24}, torch::kLong);
  mask.index_put_({2, torch::indexing::Slice(16)}, 0);
  auto reference = step(model, ids, mask);
  // Each policy under both checkpoint implementations, and with the value check.
  std::vector<std::string> names;
  for (const char* base : {"every-layer", "every-2", "every-3", "sqrt", "full",
                           "selective-attention", "selective-mlp"}) {
    for (const char* how : {"", "+reentrant", "+values"}) {
      names.push_back(std::string(base) + how);
    }
  }
  // Per-op policies (the recompute skips the kept products).
  for (const char* name : {"save-matmuls", "save-projections", "save-matmuls+values",
                           "every-2+save=aten::addmm", "selective-attention+save=matmuls"}) {
    names.push_back(name);
  }
  std::vector<CheckpointPolicy> policies;
  for (const auto& name : names) {
    policies.push_back(CheckpointPolicy::parse(name));
  }
  // Per-layer mixes, as a planner makes them.
  for (const char* schedule :
       {"store[0,1) save-matmuls[1,2) recompute-attention[2,3) save-projections[3,4)",
        "save-projections[0,2) recompute[2,4)", "recompute[0,1) store[1,2) save-matmuls[2,4)"}) {
    policies.push_back(CheckpointPolicy::custom(remat::Schedule::parse(schedule), schedule));
  }
  for (const auto& policy : policies) {
    const auto& name = policy.name();
    model->gradient_checkpointing_enable(policy);
    auto got = step(model, ids, mask);
    EXPECT_TRUE(torch::equal(got.loss, reference.loss)) << name;
    ASSERT_EQ(got.grads.size(), reference.grads.size());
    for (size_t i = 0; i < got.grads.size(); ++i) {
      ASSERT_TRUE(got.grads[i].defined()) << name << " param " << i;
      EXPECT_TRUE(torch::equal(got.grads[i], reference.grads[i]))
          << name << " param " << i;
    }
  }
  model->gradient_checkpointing_disable();
  EXPECT_EQ(model->checkpoint_policy().name(), "none");
}

// Compression runs on the CPU (gradients close, not equal); offload needs a
// CUDA device and says so.
TEST_F(BertTest, CompressRunsAndOffloadOnTheCpuIsRefused) {
  Bert model(tiny());
  auto ids = torch::randint(97, {2, 16}, torch::kLong);
  auto mask = torch::ones({2, 16}, torch::kLong);
  auto reference = step(model, ids, mask);
  model->gradient_checkpointing_enable(CheckpointPolicy::parse("compress"));
  auto got = step(model, ids, mask);
  for (size_t i = 0; i < got.grads.size(); ++i) {
    EXPECT_TRUE(torch::allclose(got.grads[i], reference.grads[i], 5e-2, 1e-3)) << "param " << i;
  }
  model->gradient_checkpointing_enable(CheckpointPolicy::parse("offload"));
  EXPECT_THROW_WITH(
      step(model, ids, mask),
      "expected a model on a CUDA device for policy 'offload' (it moves saved "
      "activations to host memory), but it runs on cpu");
  model->gradient_checkpointing_disable();
}

TEST_F(BertTest, EveryLayerKeepsAtMostTwoLayersWorthOfActivations) {
  const int64_t layers = 8;
  Bert model(tiny().num_layers(layers).hidden_dropout(0.1).attention_dropout(0.1));
  auto ids = torch::randint(97, {4, 64}, torch::kLong);
  auto held = [&](const char* policy) {
    model->gradient_checkpointing_enable(CheckpointPolicy::parse(policy));
    model->zero_grad(true);
    const auto before = remat::memory::current_bytes();
    auto loss = model->forward(ids).last_hidden_state.pow(2).mean();
    const auto activations = remat::memory::current_bytes() - before;
    loss.backward();
    return activations;
  };
  const auto none = held("none");
  const auto every = held("every-layer");
  const auto selective = held("selective-attention");
  EXPECT_GT(none, 0);
  EXPECT_LE(every * layers, 2 * none) << "none " << none << " every-layer " << every;
  EXPECT_LT(selective, none);
  EXPECT_GT(selective, every);
}

TEST_F(BertTest, AttentionMaskHidesPaddedTokens) {
  Bert model(tiny());
  model->eval();
  auto ids = torch::randint(97, {1, 10}, torch::kLong);
  auto mask = torch::ones({1, 10}, torch::kLong);
  mask.index_put_({0, torch::indexing::Slice(6)}, 0);
  auto changed = ids.clone();
  changed.index_put_({0, 8}, (ids[0][8].item<int64_t>() + 1) % 97);
  torch::NoGradGuard no_grad;
  auto a = model->forward(ids, mask).last_hidden_state.slice(1, 0, 6);
  auto b = model->forward(changed, mask).last_hidden_state.slice(1, 0, 6);
  EXPECT_TRUE(torch::allclose(a, b, 1e-6, 1e-6));
}

TEST_F(BertTest, FrozenEmbeddingsStillGiveLayerGradientsUnderCheckpointing) {
  Bert model(tiny());
  for (auto& p : model->embeddings->parameters()) {
    p.set_requires_grad(false);
  }
  model->gradient_checkpointing_enable(CheckpointPolicy::every_layer());
  auto ids = torch::randint(97, {2, 16}, torch::kLong);
  model->forward(ids).last_hidden_state.pow(2).mean().backward();
  for (auto& layer : model->encoder->layers) {
    for (const auto& p : layer->parameters()) {
      ASSERT_TRUE(p.grad().defined());
      EXPECT_GT(p.grad().abs().sum().item<double>(), 0.0);
    }
  }
}

TEST_F(BertTest, RejectsBadOptionsAndInputs) {
  try {
    Bert model(tiny().hidden_size(30));
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("expected hidden_size (30) to be a multiple of num_heads"));
    EXPECT_THAT(e.what(), HasSubstr("30"));
  }
  Bert model(tiny());
  try {
    model->forward(torch::zeros({2, 100}, torch::kLong));
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("at most max_position_embeddings = 64"));
  }
  try {
    model->forward(torch::zeros({2, 8}));
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("dtype int64"));
  }
}

} // namespace
