// The stages interface (remat/nn/stages.h): Bert and Llama run stage by
// stage give exactly what their forward gives; a family of this test's own,
// neither Bert nor Llama, is checkpointed, profiled and planned through the
// interface alone; ObservedStack sees forward and recompute.
#include "testing.h"

#include "remat/memory.h"
#include "remat/nn/bert.h"
#include "remat/nn/llama.h"
#include "remat/nn/profile.h"
#include "remat/nn/stages.h"
#include "remat/plan/solver.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <vector>

namespace {

using remat::CheckpointPolicy;
using remat::SegmentMode;
using remat::nn::Embedded;
using remat::nn::LayerStack;
using remat::nn::SideInputs;
using remat::nn::StageBatch;
using remat::nn::StageHead;

// A third family: residual tanh-MLP layers scaled by a side input. It names
// nothing of remat's models and offers no selective modes.
class ToyStackImpl : public torch::nn::Module, public LayerStack {
 public:
  ToyStackImpl(int64_t n, int64_t hidden) {
    for (int64_t i = 0; i < n; ++i) {
      layers.push_back(register_module(
          "layer" + std::to_string(i), torch::nn::Linear(hidden, 4 * hidden)));
      outs.push_back(register_module(
          "out" + std::to_string(i), torch::nn::Linear(4 * hidden, hidden)));
    }
  }
  int64_t num_layers() const override {
    return static_cast<int64_t>(layers.size());
  }
  torch::Tensor layer_forward(
      int64_t i, const torch::Tensor& h, const SideInputs& side, SegmentMode) override {
    return h + side.at(0) * outs[i]->forward(torch::tanh(layers[i]->forward(h)));
  }
  std::vector<torch::Tensor> layer_parameters(int64_t i) const override {
    auto p = layers[i]->parameters();
    auto q = outs[i]->parameters();
    p.insert(p.end(), q.begin(), q.end());
    return p;
  }
  std::vector<torch::nn::Linear> layers, outs;
};

class ToyModelImpl : public torch::nn::Module, public remat::nn::StagedModel {
 public:
  ToyModelImpl(int64_t n, int64_t hidden, int64_t vocab)
      : stack(std::make_shared<ToyStackImpl>(n, hidden)) {
    emb = register_module("emb", torch::nn::Embedding(vocab, hidden));
    register_module("stack", stack);
    schedule = CheckpointPolicy::none().schedule(n);
  }
  Embedded embed(const StageBatch& batch) override {
    return Embedded{emb->forward(batch.input_ids()), {torch::full({1}, 0.5)}};
  }
  std::vector<torch::Tensor> embedding_parameters() const override {
    return emb->parameters();
  }
  std::shared_ptr<LayerStack> layer_stack() override {
    return stack;
  }
  const remat::Schedule& checkpoint_schedule() const override {
    return schedule;
  }
  StageHead head() {
    return StageHead{[](const torch::Tensor& h) { return h.pow(2).mean(); }, {}};
  }
  torch::Tensor loss(const torch::Tensor& ids) {
    auto e = embed(StageBatch(ids));
    return head().loss(
        remat::nn::run_stack(layer_stack(), e.hidden, e.side, checkpoint_schedule()));
  }

  torch::nn::Embedding emb{nullptr};
  std::shared_ptr<ToyStackImpl> stack;
  remat::Schedule schedule;
};

std::vector<torch::Tensor> grads_of(torch::nn::Module& m) {
  std::vector<torch::Tensor> g;
  for (const auto& p : m.parameters()) {
    g.push_back(p.grad().clone());
  }
  return g;
}

TEST(Stages, LlamaRunStageByStageIsItsForward) {
  torch::manual_seed(0);
  remat::nn::Llama llama(remat::nn::LlamaOptions()
                             .vocab_size(64).hidden_size(32).intermediate_size(64)
                             .num_layers(3).num_heads(4).num_kv_heads(2));
  llama->gradient_checkpointing_enable(CheckpointPolicy::every_layer());
  auto ids = torch::randint(64, {2, 12});
  auto mask = torch::ones({2, 12}, torch::kLong);
  mask.index_put_({1, torch::indexing::Slice(8, torch::indexing::None)}, 0);

  auto expected = llama->forward_loss(ids, ids, mask);
  expected.backward();
  const auto expected_grads = grads_of(*llama);
  llama->zero_grad();

  remat::nn::StagedModel& m = *llama;
  auto e = m.embed(StageBatch(ids).attention_mask(mask));
  ASSERT_EQ(e.side.size(), 3u); // cos, sin, the additive mask
  auto h = remat::nn::run_stack(m.layer_stack(), e.hidden, e.side, m.checkpoint_schedule());
  auto loss = llama->step_head(ids).loss(h);
  loss.backward();
  EXPECT_TRUE(torch::equal(loss, expected));
  const auto grads = grads_of(*llama);
  for (size_t i = 0; i < grads.size(); ++i) {
    EXPECT_TRUE(torch::equal(grads[i], expected_grads[i])) << i;
  }
}

TEST(Stages, BertRunStageByStageIsItsForward) {
  torch::manual_seed(0);
  remat::nn::Bert bert(remat::nn::BertOptions()
                           .vocab_size(50).hidden_size(32).num_layers(2).num_heads(4)
                           .max_position_embeddings(16));
  bert->eval(); // no dropout: both runs draw nothing
  auto ids = torch::randint(50, {2, 10});
  auto types = torch::ones_like(ids);
  auto out = bert->forward(ids, {}, types);
  auto expected = remat::nn::default_bert_loss(out);

  auto e = bert->embed(StageBatch(ids).token_type_ids(types));
  EXPECT_TRUE(e.side.empty()); // no mask given, none made
  auto h = remat::nn::run_stack(
      bert->layer_stack(), e.hidden, e.side, bert->checkpoint_schedule());
  EXPECT_TRUE(torch::equal(h, out.last_hidden_state));
  EXPECT_TRUE(torch::equal(bert->step_head().loss(h), expected));
}

TEST(Stages, StagesCheckTheirBatch) {
  remat::nn::Llama llama(remat::nn::LlamaOptions()
                             .vocab_size(64).hidden_size(32).intermediate_size(64)
                             .num_layers(1).num_heads(4).max_position_embeddings(8));
  EXPECT_THROW_WITH(
      llama->embed(StageBatch(torch::zeros({2, 4}))),
      "remat::nn::Llama: expected input_ids of shape [batch, seq] and dtype int64, but got "
      "shape [2, 4] and dtype Float");
  EXPECT_THROW_WITH(
      llama->embed(StageBatch(torch::zeros({1, 4}, torch::kLong))
                       .token_type_ids(torch::zeros({1, 4}, torch::kLong))),
      "expected no token_type_ids (a Llama has no token types)");
  EXPECT_THROW_WITH(
      llama->embed(StageBatch(torch::zeros({1, 9}, torch::kLong))),
      "expected at most max_position_embeddings = 8 tokens, but got 9");
  auto e = llama->embed(StageBatch(torch::zeros({1, 4}, torch::kLong)));
  EXPECT_THROW_WITH(
      remat::nn::run_stack(llama->layer_stack(), e.hidden, e.side,
                           CheckpointPolicy::every_layer().schedule(3)),
      "remat::nn::run_stack: expected a schedule over the stack's 1 layers, but it has a "
      "segment [1, 2)");
}

TEST(Stages, ObservedStackSeesEachLayerInForwardAndRecompute) {
  torch::manual_seed(0);
  remat::nn::Llama llama(remat::nn::LlamaOptions()
                             .vocab_size(64).hidden_size(32).intermediate_size(64)
                             .num_layers(4).num_heads(4));
  llama->gradient_checkpointing_enable(CheckpointPolicy::parse("every-2"));
  auto ids = torch::randint(64, {1, 8});
  std::vector<std::string> seen;
  auto watched = std::make_shared<remat::nn::ObservedStack>(
      llama->layer_stack(),
      [&](int64_t i, const torch::Tensor&, SegmentMode) {
        seen.push_back("in " + std::to_string(i));
      },
      [&](int64_t i, const torch::Tensor&) { seen.push_back("out " + std::to_string(i)); });
  EXPECT_EQ(watched->num_layers(), 4);
  EXPECT_EQ(watched->selective_modes(0).size(), 2u);
  auto e = llama->embed(StageBatch(ids));
  auto h = remat::nn::run_stack(watched, e.hidden, e.side, llama->checkpoint_schedule());
  EXPECT_EQ(seen.size(), 8u); // forward: each layer once
  llama->step_head(ids).loss(h).backward();
  // Backward recomputes the two checkpointed pairs, last pair first. Each
  // recompute stops early inside its pair's second layer, once the tensors
  // backward needs are back: at the residual add after the MLP, which saves
  // nothing.
  const std::vector<std::string> expected{
      "in 0", "out 0", "in 1", "out 1", "in 2", "out 2", "in 3", "out 3",
      "in 2", "out 2", "in 3", "in 0", "out 0", "in 1"};
  EXPECT_EQ(seen, expected);

  // The reentrant checkpoint runs each pair to its end.
  seen.clear();
  llama->gradient_checkpointing_enable(CheckpointPolicy::parse("every-2+reentrant"));
  e = llama->embed(StageBatch(ids));
  h = remat::nn::run_stack(watched, e.hidden, e.side, llama->checkpoint_schedule());
  llama->step_head(ids).loss(h).backward();
  const std::vector<std::string> whole{
      "in 0", "out 0", "in 1", "out 1", "in 2", "out 2", "in 3", "out 3",
      "in 2", "out 2", "in 3", "out 3", "in 0", "out 0", "in 1", "out 1"};
  EXPECT_EQ(seen, whole);
}

TEST(Stages, AFamilyOfItsOwnIsCheckpointedThroughTheInterface) {
  torch::manual_seed(0);
  auto toy = std::make_shared<ToyModelImpl>(4, 16, 32);
  auto ids = torch::randint(32, {2, 8});
  toy->loss(ids).backward();
  const auto stored = grads_of(*toy);
  for (const auto& policy : {"every-layer", "every-2", "sqrt"}) {
    toy->zero_grad();
    toy->schedule = CheckpointPolicy::parse(policy).schedule(4);
    toy->loss(ids).backward();
    const auto g = grads_of(*toy);
    for (size_t i = 0; i < g.size(); ++i) {
      EXPECT_TRUE(torch::allclose(g[i], stored[i], 1e-6, 1e-7)) << policy << " " << i;
    }
  }
}

TEST(Stages, AFamilyOfItsOwnIsProfiledAndPlannedThroughTheInterface) {
  remat::memory::install();
  torch::manual_seed(0);
  auto toy = std::make_shared<ToyModelImpl>(4, 32, 32);
  auto ids = torch::randint(32, {4, 256});
  const auto chain = remat::nn::profile_model(*toy, StageBatch(ids), toy->head());
  ASSERT_EQ(chain.num_layers(), 4);
  ASSERT_EQ(chain.stages.size(), 6u);
  EXPECT_EQ(chain.stages.front().name(), "embeddings");
  EXPECT_EQ(chain.stages[1].name(), "layer.0");
  EXPECT_EQ(chain.stages.back().name(), "head");
  for (int64_t i = 1; i <= 4; ++i) {
    // Each layer keeps its hidden-wide output and a 4x-wide activation.
    EXPECT_GE(chain.stages[i].stored_bytes(), 4 * 256 * 32 * 4 * 4) << i;
    // The toy offers no selective modes, so none is profiled.
    EXPECT_FALSE(chain.stages[i].recompute_attention().has_value()) << i;
    EXPECT_FALSE(chain.stages[i].recompute_mlp().has_value()) << i;
  }
  // A generous budget stores all; the smallest feasible one recomputes.
  const auto roomy = remat::nn::plan_checkpointing(
      *toy, StageBatch(ids), toy->head(), int64_t(1) << 40);
  EXPECT_EQ(roomy.schedule.str(), "store[0,4)");
  const auto tight_budget = remat::plan::min_feasible_budget(chain) + (int64_t(64) << 10);
  const auto tight = remat::nn::plan_checkpointing(
      *toy, StageBatch(ids), toy->head(), tight_budget);
  EXPECT_NE(tight.schedule.str(), "store[0,4)");
  // The planned schedule runs and its measured peak stays within the budget.
  toy->schedule = tight.schedule;
  const auto m = remat::nn::measure_step(*toy, [&] { return toy->loss(ids); });
  EXPECT_LE(m.peak_bytes, tight_budget);
}

} // namespace
