// Packed documents in the Llama decoder: several documents in one row, an
// attention_mask of document numbers. Each document must come out as it does
// alone in a padded row: the same token losses and the same weight gradients,
// through forward, forward_loss and the stages, with and without
// checkpointing, for every attention kind this build runs.
#include "remat/nn/llama.h"

#include "remat/nn/stack_checkpointing.h"
#include "testing.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <iostream>
#include <limits>
#include <string>
#include <vector>

namespace {

using remat::CheckpointPolicy;
using remat::nn::AttentionKind;
using remat::nn::Llama;
using remat::nn::LlamaOptions;

// Relative tolerances in fp32; measured differences are printed by the tests.
constexpr double kLossTolerance = 2e-5;
constexpr double kGradTolerance = 1e-4;

// fp32, dropout 0. Documents of up to 100 tokens packed into rows of 170
// span two blockwise tiles (block_size 128).
LlamaOptions small(AttentionKind kind) {
  return LlamaOptions()
      .vocab_size(100)
      .hidden_size(64)
      .intermediate_size(128)
      .num_layers(2)
      .num_heads(4)
      .num_kv_heads(2)
      .max_position_embeddings(256)
      // Wider than the default 0.02, so that attention is far from uniform
      // and a token attending to the wrong keys shows in the losses.
      .initializer_range(0.1)
      .attention(kind);
}

std::vector<AttentionKind> runnable_kinds() {
  std::vector<AttentionKind> kinds{AttentionKind::kEager, AttentionKind::kBlockwise};
  try {
    remat::nn::check_attention_supported(AttentionKind::kSdpa);
    kinds.push_back(AttentionKind::kSdpa);
  } catch (const c10::Error&) {
    std::cout << "[ packing ] sdpa not run: this LibTorch has no sdpa\n";
  }
  return kinds;
}

// Where a document lies in a batch.
struct Place {
  int64_t row;
  int64_t start;
  int64_t length;
};

struct Batch {
  torch::Tensor ids;    // [B, S]
  torch::Tensor mask;   // [B, S]
  torch::Tensor labels; // [B, S]
  std::vector<Place> places; // per document
};

// One document per row, padded right: mask 1/0, labels -100 on padding.
Batch unpacked(const std::vector<torch::Tensor>& docs) {
  int64_t seq = 0;
  for (const auto& d : docs) {
    seq = std::max(seq, d.size(0));
  }
  const auto rows = static_cast<int64_t>(docs.size());
  Batch b;
  b.ids = torch::zeros({rows, seq}, torch::kLong);
  b.mask = torch::zeros({rows, seq}, torch::kLong);
  b.labels = torch::full({rows, seq}, -100, torch::kLong);
  for (int64_t r = 0; r < rows; ++r) {
    const auto n = docs[r].size(0);
    b.ids[r].narrow(0, 0, n).copy_(docs[r]);
    b.mask[r].narrow(0, 0, n).fill_(1);
    b.labels[r].narrow(0, 0, n).copy_(docs[r]);
    b.places.push_back({r, 0, n});
  }
  return b;
}

// Documents packed into rows as `rows` says (document indices per row),
// padded right: mask 1, 2, ... per document and 0 on padding; labels -100 on
// padding and on each document's first token.
Batch packed(const std::vector<torch::Tensor>& docs, const std::vector<std::vector<int>>& rows) {
  int64_t seq = 0;
  for (const auto& row : rows) {
    int64_t n = 0;
    for (int d : row) {
      n += docs[d].size(0);
    }
    seq = std::max(seq, n);
  }
  const auto count = static_cast<int64_t>(rows.size());
  Batch b;
  b.ids = torch::zeros({count, seq}, torch::kLong);
  b.mask = torch::zeros({count, seq}, torch::kLong);
  b.labels = torch::full({count, seq}, -100, torch::kLong);
  b.places.resize(docs.size());
  for (int64_t r = 0; r < count; ++r) {
    int64_t at = 0;
    int64_t number = 1;
    for (int d : rows[r]) {
      const auto n = docs[d].size(0);
      b.ids[r].narrow(0, at, n).copy_(docs[d]);
      b.mask[r].narrow(0, at, n).fill_(number++);
      b.labels[r].narrow(0, at + 1, n - 1).copy_(docs[d].narrow(0, 1, n - 1));
      b.places[d] = {r, at, n};
      at += n;
    }
  }
  return b;
}

// Token losses [B, S - 1] of logits [B, S, V] against the next labels, 0
// where the label is -100 (the shift of causal_lm_loss).
torch::Tensor token_losses(const torch::Tensor& logits, const torch::Tensor& labels) {
  const auto s = logits.size(1);
  auto logp = torch::log_softmax(logits.narrow(1, 0, s - 1).to(torch::kDouble), -1);
  auto next = labels.narrow(1, 1, s - 1);
  auto keep = next.ne(-100);
  auto picked = logp.gather(-1, next.clamp_min(0).unsqueeze(-1)).squeeze(-1);
  return -(picked * keep);
}

// Per document: the summed losses of its tokens 1..n-1.
std::vector<double> document_losses(const torch::Tensor& logits, const Batch& b) {
  auto t = token_losses(logits, b.labels);
  std::vector<double> out;
  for (const auto& p : b.places) {
    out.push_back(t[p.row].narrow(0, p.start, p.length - 1).sum().item<double>());
  }
  return out;
}

int64_t predicted(const Batch& b) {
  const auto s = b.labels.size(1);
  return b.labels.narrow(1, 1, s - 1).ne(-100).sum().item<int64_t>();
}

struct Step {
  double loss = 0; // summed over the predicted tokens
  std::vector<torch::Tensor> grads;
};

std::vector<torch::Tensor> grads_of(Llama& model) {
  std::vector<torch::Tensor> g;
  for (const auto& p : model->parameters()) {
    g.push_back(p.grad().defined() ? p.grad().clone() : torch::zeros_like(p));
  }
  return g;
}

// forward_loss (the trainer's training step), as a sum of token losses.
Step forward_loss_step(Llama& model, const Batch& b) {
  model->zero_grad();
  auto loss = model->forward_loss(b.ids, b.labels, b.mask) * static_cast<double>(predicted(b));
  loss.backward();
  return {loss.item<double>(), grads_of(model)};
}

// The trainer's staged step (TaskModel::instrumented_loss): embed, run_stack
// under the model's schedule, step_head.
Step staged_step(Llama& model, const Batch& b) {
  model->zero_grad();
  remat::nn::StagedModel& m = *model;
  auto e = m.embed(remat::nn::StageBatch(b.ids).attention_mask(b.mask));
  auto hidden = remat::nn::run_stack(m.layer_stack(), e.hidden, e.side, m.checkpoint_schedule());
  auto loss = model->step_head(b.labels).loss(hidden) * static_cast<double>(predicted(b));
  loss.backward();
  return {loss.item<double>(), grads_of(model)};
}

// Largest relative difference of the gradients, each tensor against its own
// largest magnitude.
double grad_difference(const Step& a, const Step& b) {
  double worst = 0;
  EXPECT_EQ(a.grads.size(), b.grads.size());
  for (size_t i = 0; i < a.grads.size() && i < b.grads.size(); ++i) {
    const auto scale = std::max(a.grads[i].abs().max().item<double>(), 1e-12);
    worst = std::max(worst, (a.grads[i] - b.grads[i]).abs().max().item<double>() / scale);
  }
  return worst;
}

double relative(double a, double b) {
  return std::abs(a - b) / std::max(std::abs(b), 1e-12);
}

class PackingTest : public ::testing::Test {
 protected:
  PackingTest() {
    torch::manual_seed(0);
    for (int64_t n : {70, 100, 45, 90, 30}) {
      docs_.push_back(torch::randint(0, 100, {n}, torch::kLong));
    }
    // Row 0: two documents, 170 tokens; row 1: three and 5 of padding.
    packed_ = packed(docs_, {{0, 1}, {2, 3, 4}});
    unpacked_ = unpacked(docs_);
  }

  std::vector<torch::Tensor> docs_;
  Batch packed_;
  Batch unpacked_;
};

TEST_F(PackingTest, ForwardGivesEachDocumentItsUnpackedLosses) {
  for (auto kind : runnable_kinds()) {
    SCOPED_TRACE(remat::nn::to_string(kind));
    torch::manual_seed(1);
    Llama model(small(kind));
    torch::NoGradGuard no_grad;
    auto alone = document_losses(model->forward(unpacked_.ids, unpacked_.mask), unpacked_);
    auto together = document_losses(model->forward(packed_.ids, packed_.mask), packed_);
    double worst = 0;
    for (size_t d = 0; d < alone.size(); ++d) {
      worst = std::max(worst, relative(together[d], alone[d]));
      EXPECT_LE(relative(together[d], alone[d]), kLossTolerance) << "document " << d;
    }
    std::cout << "[ packing ] forward " << remat::nn::to_string(kind)
              << ": max relative document-loss difference " << worst << "\n";
    // The comparison can tell: the same rows under a plain 1/0 mask (one
    // document per row, positions running on) give later documents other
    // losses.
    auto merged =
        document_losses(model->forward(packed_.ids, packed_.mask.clamp_max(1)), packed_);
    EXPECT_GT(relative(merged[1], alone[1]), 10 * kLossTolerance);
    std::cout << "[ packing ] forward " << remat::nn::to_string(kind)
              << ": unseparated, document 1 differs by " << relative(merged[1], alone[1])
              << "\n";
  }
}

TEST_F(PackingTest, LossAndGradientsMatchUnpackedUnderEveryEntry) {
  struct Entry {
    const char* name;
    CheckpointPolicy policy;
    bool staged;
  };
  const std::vector<Entry> entries{
      {"forward_loss none", CheckpointPolicy::none(), false},
      {"forward_loss every_layer", CheckpointPolicy::every_layer(), false},
      {"forward_loss selective_attention", CheckpointPolicy::selective_attention(), false},
      {"forward_loss budget", CheckpointPolicy::budget(int64_t{1} << 40), false},
      {"staged every_layer", CheckpointPolicy::every_layer(), true},
      {"staged selective_attention", CheckpointPolicy::selective_attention(), true},
  };
  for (auto kind : runnable_kinds()) {
    for (const auto& entry : entries) {
      const std::string what = std::string(remat::nn::to_string(kind)) + ", " + entry.name;
      SCOPED_TRACE(what);
      torch::manual_seed(1);
      Llama model(small(kind));
      model->gradient_checkpointing_enable(entry.policy);
      auto run = [&](const Batch& b) {
        return entry.staged ? staged_step(model, b) : forward_loss_step(model, b);
      };
      auto alone = run(unpacked_);
      auto together = run(packed_);
      const auto loss_diff = relative(together.loss, alone.loss);
      const auto grad_diff = grad_difference(together, alone);
      EXPECT_LE(loss_diff, kLossTolerance);
      EXPECT_LE(grad_diff, kGradTolerance);
      std::cout << "[ packing ] " << what << ": relative loss difference " << loss_diff
                << ", gradients " << grad_diff << "\n";
    }
  }
}

// Packing must equal the documents' own forward, not only agree with the
// padded batch: a document alone in an unpadded row of its own length.
TEST_F(PackingTest, DocumentLossesMatchEachDocumentAlone) {
  torch::manual_seed(1);
  Llama model(small(AttentionKind::kEager));
  torch::NoGradGuard no_grad;
  auto together = document_losses(model->forward(packed_.ids, packed_.mask), packed_);
  for (size_t d = 0; d < docs_.size(); ++d) {
    auto ids = docs_[d].unsqueeze(0);
    auto alone = token_losses(model->forward(ids), ids).sum().item<double>();
    EXPECT_LE(relative(together[d], alone), kLossTolerance) << "document " << d;
  }
}

TEST_F(PackingTest, PositionsRestartAndMaskIsBlockDiagonal) {
  Llama model(small(AttentionKind::kEager));
  // Row 0: documents of 2 and 3 tokens then a pad; row 1: 4 tokens, 2 pads.
  auto mask = torch::tensor({1, 1, 2, 2, 2, 0, 1, 1, 1, 1, 0, 0}, torch::kLong).view({2, 6});
  auto ids = torch::zeros({2, 6}, torch::kLong);
  auto side = model->model->side_inputs(ids, mask, 0, torch::TensorOptions(torch::kFloat));
  ASSERT_EQ(side.size(), 3u);
  const auto d = model->options.head_dim();
  auto tables = remat::nn::rotary_tables(d, model->options.rope_theta(), 0, 6, torch::kFloat);
  EXPECT_EQ(side[0].sizes(), (std::vector<int64_t>{2, 1, 6, d}));
  auto positions = torch::tensor({0, 1, 0, 1, 2, 0, 0, 1, 2, 3, 0, 1}, torch::kLong);
  EXPECT_TRUE(torch::equal(side[0].view({12, d}), tables.first.index_select(0, positions)));
  EXPECT_TRUE(torch::equal(side[1].view({12, d}), tables.second.index_select(0, positions)));
  EXPECT_EQ(side[2].sizes(), (std::vector<int64_t>{2, 1, 6, 6}));
  auto kept = side[2].squeeze(1).eq(0);
  auto same = mask.unsqueeze(2).eq(mask.unsqueeze(1));
  EXPECT_TRUE(torch::equal(kept, same));
  EXPECT_EQ(side[2].min().item<float>(), std::numeric_limits<float>::lowest());
}

// A 1/0 mask is the padding mask it always was: [B, 1, 1, S], shared
// [S, head_dim] tables, and with all ones the very numbers of no mask.
TEST_F(PackingTest, OneZeroMaskIsUnchanged) {
  Llama model(small(AttentionKind::kEager));
  auto ids = torch::randint(0, 100, {2, 9}, torch::kLong);
  auto mask = torch::ones({2, 9}, torch::kLong);
  mask[1].narrow(0, 6, 3).fill_(0);
  const auto f32 = torch::TensorOptions(torch::kFloat);
  auto side = model->model->side_inputs(ids, mask, 0, f32);
  ASSERT_EQ(side.size(), 3u);
  auto tables =
      remat::nn::rotary_tables(model->options.head_dim(), model->options.rope_theta(), 0, 9, f32);
  EXPECT_TRUE(torch::equal(side[0], tables.first));
  EXPECT_TRUE(torch::equal(side[1], tables.second));
  auto expected =
      (1.0 - mask.to(torch::kFloat).view({2, 1, 1, 9})) * std::numeric_limits<float>::lowest();
  EXPECT_TRUE(torch::equal(side[2], expected));
  auto as_bool = model->model->side_inputs(ids, mask.to(torch::kBool), 0, f32);
  EXPECT_TRUE(torch::equal(as_bool[2], expected));

  // Eager and blockwise add the zero mask exactly; sdpa would swap its
  // is_causal kernel for an explicit bias, so it is not bit-compared.
  for (auto kind : {AttentionKind::kEager, AttentionKind::kBlockwise}) {
    SCOPED_TRACE(remat::nn::to_string(kind));
    torch::manual_seed(1);
    Llama m(small(kind));
    m->gradient_checkpointing_enable(CheckpointPolicy::every_layer());
    auto ones = torch::ones({2, 9}, torch::kLong);
    m->zero_grad();
    auto with_mask = m->forward_loss(ids, ids, ones);
    with_mask.backward();
    auto grads_mask = grads_of(m);
    m->zero_grad();
    auto without = m->forward_loss(ids, ids);
    without.backward();
    auto grads_none = grads_of(m);
    EXPECT_TRUE(torch::equal(with_mask, without));
    for (size_t i = 0; i < grads_none.size(); ++i) {
      EXPECT_TRUE(torch::equal(grads_mask[i], grads_none[i])) << "param " << i;
    }
    torch::NoGradGuard no_grad;
    EXPECT_TRUE(torch::equal(m->forward(ids, ones), m->forward(ids)));
  }
}

TEST_F(PackingTest, RefusedWithKvCache) {
  Llama model(small(AttentionKind::kEager));
  torch::NoGradGuard no_grad;
  remat::nn::KvCache cache;
  EXPECT_THROW_WITH(
      model->forward(packed_.ids, packed_.mask, &cache),
      "expected an attention_mask of 1 (keep) / 0 (pad) with a KV cache, but got "
      "document numbers");
  auto ids = torch::zeros({1, 2}, torch::kLong);
  EXPECT_THROW_WITH(
      model->model->side_inputs(
          ids, torch::tensor({{1, 1, 2, 2}}, torch::kLong), 2, torch::kFloat),
      "but got document numbers up to 2 (packed documents) after 2 cached tokens");
}

} // namespace
