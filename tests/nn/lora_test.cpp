#include "remat/nn/lora.h"

#include "remat/checkpoint.h"
#include "remat/nn/bert.h"
#include "remat/nn/llama.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

namespace {

using remat::CheckpointPolicy;
using remat::nn::LoraOptions;

remat::nn::LlamaOptions tiny_llama() {
  return remat::nn::LlamaOptions()
      .vocab_size(50)
      .hidden_size(32)
      .intermediate_size(64)
      .num_layers(3)
      .num_heads(4)
      .num_kv_heads(2)
      .max_position_embeddings(64);
}

remat::nn::BertOptions tiny_bert() {
  return remat::nn::BertOptions()
      .vocab_size(50)
      .hidden_size(32)
      .num_layers(3)
      .num_heads(4)
      .intermediate_size(64)
      .max_position_embeddings(64);
}

bool is_adapter(const std::string& name) {
  return name.find("lora_A") != std::string::npos || name.find("lora_B") != std::string::npos;
}

// Gives every lora_B a random value, as after some training: with B = 0 the
// gradient of A is zero.
template <typename M>
void perturb_adapters(M& model) {
  torch::NoGradGuard no_grad;
  for (auto& p : model->named_parameters()) {
    if (p.key().find("lora_B") != std::string::npos) {
      p.value().normal_(0.0, 0.1);
    }
  }
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what();
  }
  return "";
}

class LoraTest : public ::testing::Test {
 protected:
  LoraTest() {
    torch::manual_seed(0);
  }
};

TEST_F(LoraTest, ProjectionWithoutAdapterIsLinear) {
  remat::nn::Projection proj(8, 5);
  torch::nn::Linear linear(8, 5);
  {
    torch::NoGradGuard no_grad;
    linear->weight.copy_(proj->weight);
    linear->bias.copy_(proj->bias);
  }
  auto x = torch::randn({3, 4, 8});
  EXPECT_TRUE(torch::allclose(proj->forward(x), linear->forward(x)));
  auto names = proj->named_parameters().keys();
  EXPECT_EQ(names, (std::vector<std::string>{"weight", "bias"}));
  remat::nn::Projection nobias(remat::nn::ProjectionOptions(8, 5).bias(false));
  EXPECT_EQ(nobias->named_parameters().size(), 1u);
}

TEST_F(LoraTest, AdapterShapesScalingAndClone) {
  remat::nn::Projection proj(remat::nn::ProjectionOptions(8, 6).bias(false));
  auto x = torch::randn({2, 8});
  auto before = proj->forward(x);
  proj->add_adapter(LoraOptions().rank(2).alpha(4));
  EXPECT_TRUE(torch::equal(proj->forward(x), before)); // B starts at zero
  auto names = proj->named_parameters();
  EXPECT_EQ(names["lora_A.weight"].sizes(), (std::vector<int64_t>{2, 8}));
  EXPECT_EQ(names["lora_B.weight"].sizes(), (std::vector<int64_t>{6, 2}));
  EXPECT_EQ(names["lora_B.weight"].abs().sum().item<float>(), 0.0f);
  EXPECT_GT(names["lora_A.weight"].abs().sum().item<float>(), 0.0f);
  perturb_adapters(proj);
  auto expected = before + torch::mm(torch::mm(x, proj->lora_A->weight.t()),
                                     proj->lora_B->weight.t()) * 2.0;
  EXPECT_LE((proj->forward(x) - expected).abs().max().item<double>(), 1e-6);
  auto copy = std::dynamic_pointer_cast<remat::nn::ProjectionImpl>(proj->clone());
  ASSERT_TRUE(copy && copy->has_adapter());
  EXPECT_TRUE(torch::equal(copy->forward(x), proj->forward(x)));
  auto msg = error_of([&] { proj->add_adapter(LoraOptions()); });
  EXPECT_NE(msg.find("already has one (rank 2)"), std::string::npos) << msg;
}

TEST_F(LoraTest, ApplyToLlamaNamesAndFreezes) {
  remat::nn::Llama model(tiny_llama());
  auto adapted = remat::nn::apply_lora(
      model, LoraOptions().rank(4).alpha(8).targets({"q_proj", "v_proj"}));
  EXPECT_EQ(adapted.size(), 6u);
  EXPECT_EQ(adapted[0], "model.layers.0.self_attn.q_proj");
  auto params = model->named_parameters();
  EXPECT_EQ(params["model.layers.0.self_attn.q_proj.lora_A.weight"].sizes(),
            (std::vector<int64_t>{4, 32}));
  EXPECT_EQ(params["model.layers.2.self_attn.v_proj.lora_B.weight"].sizes(),
            (std::vector<int64_t>{16, 4}));
  EXPECT_TRUE(params.contains("model.layers.0.self_attn.q_proj.weight"));
  auto trainable = remat::nn::trainable_parameters(model);
  EXPECT_EQ(trainable.size(), 12u);
  for (const auto& p : params) {
    EXPECT_EQ(p.value().requires_grad(), is_adapter(p.key())) << p.key();
  }
  for (const auto& name : trainable.keys()) {
    EXPECT_TRUE(is_adapter(name)) << name;
  }
}

TEST_F(LoraTest, ApplyToBertWithHuggingFaceTargets) {
  remat::nn::Bert model(tiny_bert());
  auto adapted = remat::nn::apply_lora(model, LoraOptions().targets({"query", "value"}));
  EXPECT_EQ(adapted.size(), 6u);
  auto params = model->named_parameters();
  EXPECT_TRUE(params.contains("encoder.layer.0.attention.self.query.lora_A.weight"));
  EXPECT_TRUE(params.contains("encoder.layer.0.attention.self.query.lora_B.weight"));
  EXPECT_TRUE(params.contains("encoder.layer.0.attention.self.query.weight"));
  EXPECT_TRUE(params.contains("encoder.layer.0.attention.self.query.bias"));
  // A dotted suffix picks a subset: the MLP's output dense, not the others.
  remat::nn::Bert other(tiny_bert());
  auto dense = remat::nn::apply_lora(other, LoraOptions().targets({"layer.1.output.dense"}));
  EXPECT_EQ(dense, (std::vector<std::string>{"encoder.layer.1.output.dense"}));
}

TEST_F(LoraTest, ApplyRefusesTargetsThatMatchNothing) {
  remat::nn::Llama model(tiny_llama());
  auto msg = error_of([&] { remat::nn::apply_lora(model, LoraOptions().targets({"query"})); });
  EXPECT_NE(msg.find("expected targets matching projections of the model (down_proj, "
                     "gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj), but "
                     "got query"),
            std::string::npos) << msg;
  msg = error_of([&] { remat::nn::apply_lora(model, LoraOptions()); });
  EXPECT_NE(msg.find("expected at least one target"), std::string::npos) << msg;
  msg = error_of([&] { remat::nn::apply_lora(model, LoraOptions().rank(0).targets({"q_proj"})); });
  EXPECT_NE(msg.find("expected rank > 0, but got 0"), std::string::npos) << msg;
}

TEST_F(LoraTest, MergeKeepsOutputs) {
  remat::nn::Llama model(tiny_llama());
  const auto names = model->named_parameters().keys();
  remat::nn::apply_lora(model, LoraOptions().targets({"q_proj", "v_proj", "down_proj"}));
  perturb_adapters(model);
  model->eval();
  auto ids = torch::randint(0, 50, {2, 10});
  torch::NoGradGuard no_grad;
  auto before = model->forward(ids);
  EXPECT_EQ(remat::nn::merge_lora(model), 9);
  EXPECT_LE((model->forward(ids) - before).abs().max().item<double>(), 1e-5);
  EXPECT_EQ(model->named_parameters().keys(), names);
  EXPECT_EQ(remat::nn::merge_lora(model), 0);

  remat::nn::Bert bert(tiny_bert());
  remat::nn::apply_lora(bert, LoraOptions().targets({"query", "dense"}));
  perturb_adapters(bert);
  bert->eval();
  auto b0 = bert->forward(ids).last_hidden_state;
  EXPECT_EQ(remat::nn::merge_lora(bert), 3 * 4 + 1);
  EXPECT_LE((bert->forward(ids).last_hidden_state - b0).abs().max().item<double>(), 1e-5);
}

// The Hugging Face pitfall (transformers#26221): with frozen embeddings the
// input of every checkpointed layer needs no grad, and a reentrant checkpoint
// then gives the adapters no gradient at all. remat's checkpoint passes the
// parameters to autograd explicitly, so the adapters' gradients must be
// exactly those of the run without checkpointing.
template <typename Model, typename Loss>
void expect_adapter_grads_survive_checkpointing(Model& model, const Loss& loss_of) {
  perturb_adapters(model);
  model->train();
  auto run = [&](const CheckpointPolicy& policy) {
    model->gradient_checkpointing_enable(policy);
    model->zero_grad();
    torch::manual_seed(11);
    loss_of().backward();
    std::vector<std::pair<std::string, torch::Tensor>> grads;
    for (const torch::OrderedDict<std::string, torch::Tensor>::Item& p :
         model->named_parameters()) {
      if (is_adapter(p.key())) {
        EXPECT_TRUE(p.value().grad().defined()) << policy.name() << " " << p.key();
        if (p.value().grad().defined()) {
          EXPECT_GT(torch::Tensor(p.value().grad()).abs().sum().template item<double>(), 0.0)
              << policy.name() << " " << p.key();
          grads.emplace_back(p.key(), p.value().grad().clone());
        }
      } else {
        EXPECT_FALSE(p.value().grad().defined()) << policy.name() << " " << p.key();
      }
    }
    return grads;
  };
  const auto reference = run(CheckpointPolicy::none());
  ASSERT_FALSE(reference.empty());
  for (const auto& policy :
       {CheckpointPolicy::every_layer(), CheckpointPolicy::full(),
        CheckpointPolicy::selective_attention(), CheckpointPolicy::selective_mlp()}) {
    const auto before = remat::recompute_count();
    const auto grads = run(policy);
    EXPECT_GT(remat::recompute_count(), before) << policy.name();
    ASSERT_EQ(grads.size(), reference.size()) << policy.name();
    for (size_t i = 0; i < grads.size(); ++i) {
      EXPECT_LE(torch::Tensor(grads[i].second - reference[i].second).abs().max().template item<double>(), 1e-6)
          << policy.name() << " " << grads[i].first;
    }
  }
}

TEST_F(LoraTest, LlamaAdapterGradientsSurviveCheckpointingWithFrozenEmbeddings) {
  remat::nn::Llama model(tiny_llama().attention_dropout(0.1));
  remat::nn::apply_lora(
      model, LoraOptions().rank(4).alpha(8).dropout(0.05).targets({"q_proj", "v_proj"}));
  ASSERT_FALSE(model->model->embed_tokens->weight.requires_grad());
  auto ids = torch::randint(0, 50, {2, 12});
  expect_adapter_grads_survive_checkpointing(
      model, [&] { return model->loss(model->forward(ids), ids); });
}

TEST_F(LoraTest, BertAdapterGradientsSurviveCheckpointingWithFrozenEmbeddings) {
  remat::nn::Bert model(tiny_bert());
  remat::nn::apply_lora(
      model, LoraOptions().rank(4).alpha(8).dropout(0.05).targets({"query", "value"}));
  ASSERT_FALSE(model->embeddings->word_embeddings->weight.requires_grad());
  auto ids = torch::randint(0, 50, {2, 12});
  auto mask = torch::ones({2, 12}, torch::kLong);
  mask.index_put_({1, torch::indexing::Slice(9)}, 0);
  expect_adapter_grads_survive_checkpointing(model, [&] {
    return model->forward(ids, mask).last_hidden_state.pow(2).mean();
  });
}

} // namespace
