// Token-budget batches (DataLoaderOptions::max_tokens) and packed rows
// (DataLoaderOptions::pack) of the data loader.
#include "io/io_testing.h"
#include "remat/io/tokenizer.h"
#include "remat/train/data.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <functional>
#include <numeric>

namespace {

using remat::train::Batch;
using remat::train::DataLoader;
using remat::train::DataLoaderOptions;
using remat::train::Dataset;

const std::vector<std::string> kVocab{
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c", "d", "e"};
constexpr int64_t kMaxLen = 32;

std::shared_ptr<remat::io::Tokenizer> tokenizer() {
  return std::make_shared<remat::io::WordPieceTokenizer>(kVocab);
}

std::string words(int64_t count) {
  const std::vector<std::string> w{"a", "b", "c", "d", "e"};
  std::string text;
  for (int64_t i = 0; i < count; ++i) {
    text += (i ? " " : "") + w[static_cast<size_t>(i % 5)];
  }
  return text;
}

// n language-modelling documents, mostly short, every 5th long (some longer
// than kMaxLen tokens), as real corpora are skewed.
std::shared_ptr<Dataset> skewed(int64_t n) {
  auto d = std::make_shared<Dataset>();
  for (int64_t i = 0; i < n; ++i) {
    d->examples.push_back({words(i % 5 == 0 ? 18 + i % 17 : 1 + i % 3), {}});
  }
  return d;
}

// n documents of `count` words each.
std::shared_ptr<Dataset> uniform(int64_t n, int64_t count) {
  auto d = std::make_shared<Dataset>();
  for (int64_t i = 0; i < n; ++i) {
    d->examples.push_back({words(count), {}});
  }
  return d;
}

// Document i's tokens after the cut to max_len.
int64_t tokens(const Dataset& d, int64_t i, int64_t max_len = kMaxLen) {
  return static_cast<int64_t>(
      tokenizer()
          ->encode(d.examples[static_cast<size_t>(i)].text, max_len)
          .input_ids.size());
}

std::vector<int64_t> all(int64_t n) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), int64_t{0});
  return v;
}

std::vector<int64_t> sorted(std::vector<int64_t> v) {
  std::sort(v.begin(), v.end());
  return v;
}

// One epoch's batches.
std::vector<Batch> epoch(DataLoader& loader) {
  std::vector<Batch> out;
  while (auto b = loader.next()) {
    out.push_back(std::move(*b));
  }
  return out;
}

// Padding tokens of a batch (attention mask 0).
int64_t padding(const Batch& b) {
  return (b.attention_mask == 0).sum().item<int64_t>();
}

TEST(BatchingTest, BudgetHoldsAndEveryDocumentIsSeenOncePerEpoch) {
  auto d = skewed(200);
  const int64_t max_tokens = 160;
  DataLoader loader(
      d, tokenizer(),
      DataLoaderOptions(24).seed(4).max_len(kMaxLen).max_tokens(max_tokens));
  std::vector<std::vector<int64_t>> orders;
  for (int e = 0; e < 3; ++e) {
    auto batches = epoch(loader);
    EXPECT_EQ(static_cast<int64_t>(batches.size()), loader.batches_per_epoch())
        << "the same every epoch";
    std::vector<int64_t> seen, longest_rows;
    for (const auto& b : batches) {
      const auto rows = static_cast<int64_t>(b.indices.size());
      int64_t longest = 0;
      for (auto i : b.indices) {
        longest = std::max(longest, tokens(*d, i));
      }
      longest_rows.push_back(longest);
      EXPECT_LE(rows, 24) << "batch_size is the most rows";
      EXPECT_LE(rows * longest, max_tokens);
      EXPECT_EQ(b.input_ids.size(0), rows);
      EXPECT_EQ(b.input_ids.size(1), longest);
      EXPECT_EQ(b.global_size, rows);
      EXPECT_EQ(b.indices, loader.global_batch(b.epoch, b.index));
      seen.insert(seen.end(), b.indices.begin(), b.indices.end());
    }
    EXPECT_EQ(sorted(seen), all(d->size())) << "epoch " << e;
    EXPECT_FALSE(std::is_sorted(
        longest_rows.begin(), longest_rows.end(), std::greater<int64_t>()))
        << "the batches are shuffled, not in order of length";
    orders.push_back(seen);
  }
  EXPECT_NE(orders[0], orders[1]) << "each epoch has its own order";
  EXPECT_NE(orders[1], orders[2]);
}

TEST(BatchingTest, RanksTogetherMakeTheGlobalBudgetBatch) {
  auto d = skewed(101);
  const int64_t world = 2;
  auto options = DataLoaderOptions(16).seed(9).max_len(kMaxLen).max_tokens(
      world * kMaxLen + 10);
  DataLoader single(d, tokenizer(), options);
  std::vector<std::unique_ptr<DataLoader>> ranks;
  for (int64_t r = 0; r < world; ++r) {
    ranks.push_back(std::make_unique<DataLoader>(
        d, tokenizer(), DataLoaderOptions(options).rank(r).world_size(world)));
    EXPECT_EQ(ranks.back()->batches_per_epoch(), single.batches_per_epoch());
  }
  for (int e = 0; e < 2; ++e) {
    std::vector<int64_t> seen;
    for (int64_t step = 0; step < single.batches_per_epoch(); ++step) {
      const auto global = single.global_batch(e, step);
      ASSERT_GE(static_cast<int64_t>(global.size()), world);
      std::vector<int64_t> dealt(global.size());
      for (int64_t r = 0; r < world; ++r) {
        auto part = ranks[static_cast<size_t>(r)]->next();
        ASSERT_TRUE(part);
        EXPECT_EQ(part->global_size, static_cast<int64_t>(global.size()));
        EXPECT_EQ(part->index, step);
        for (size_t i = 0; i < part->indices.size(); ++i) {
          dealt[static_cast<size_t>(r) + i * world] = part->indices[i];
        }
      }
      EXPECT_EQ(dealt, global) << "epoch " << e << " step " << step;
      seen.insert(seen.end(), global.begin(), global.end());
    }
    for (auto& r : ranks) {
      EXPECT_FALSE(r->next()) << "every rank ends the epoch together";
    }
    EXPECT_EQ(sorted(seen), all(d->size()));
  }
}

TEST(BatchingTest, ShortLastBatchIsMendedForRanksOrLeftOut) {
  // Every document is cut to 8 tokens: a budget of 24 takes 3 rows.
  const int64_t len = 8;
  auto options = DataLoaderOptions(16).max_len(len).max_tokens(3 * len);
  // 7 = 3 + 3 + 1: the last batch takes a row from the one before.
  auto seven = uniform(7, 20);
  ASSERT_EQ(tokens(*seven, 0, len), len);
  DataLoader mended(
      seven, tokenizer(), DataLoaderOptions(options).world_size(2));
  EXPECT_EQ(mended.batches_per_epoch(), 3);
  std::vector<int64_t> sizes, seen;
  for (int64_t i = 0; i < 3; ++i) {
    auto g = mended.global_batch(0, i);
    sizes.push_back(static_cast<int64_t>(g.size()));
    seen.insert(seen.end(), g.begin(), g.end());
  }
  EXPECT_EQ(sorted(sizes), (std::vector<int64_t>{2, 2, 3}));
  EXPECT_EQ(sorted(seen), all(7));
  // 5 = 3 + 2 with world_size 3: a batch of 5 rows is over the budget, and
  // one of 3 would leave 2 rows for 3 ranks: the last 2 are left out.
  DataLoader left_out(
      uniform(5, 20), tokenizer(),
      DataLoaderOptions(options).rank(2).world_size(3).max_tokens(3 * len));
  EXPECT_EQ(left_out.batches_per_epoch(), 1);
  EXPECT_EQ(left_out.global_batch(0, 0).size(), 3u);
  // Without ranks nothing is ever left out.
  DataLoader one(uniform(5, 20), tokenizer(), options);
  EXPECT_EQ(one.batches_per_epoch(), 2);
}

TEST(BatchingTest, LengthSkewedDataIsLessPadded) {
  auto d = skewed(400);
  // About the same tokens per step: 24 rows of the longest documents.
  DataLoader fixed(
      d, tokenizer(), DataLoaderOptions(8).seed(1).max_len(kMaxLen));
  DataLoader budget(
      d, tokenizer(),
      DataLoaderOptions(64).seed(1).max_len(kMaxLen).max_tokens(8 * kMaxLen));
  int64_t fixed_pad = 0, budget_pad = 0, fixed_real = 0, budget_real = 0;
  for (const auto& b : epoch(fixed)) {
    fixed_pad += padding(b);
    fixed_real += b.attention_mask.sum().item<int64_t>();
  }
  for (const auto& b : epoch(budget)) {
    budget_pad += padding(b);
    budget_real += b.attention_mask.sum().item<int64_t>();
    EXPECT_LE(b.input_ids.numel(), 8 * kMaxLen);
  }
  EXPECT_EQ(budget_real, fixed_real) << "the same documents";
  EXPECT_LT(budget_pad * 10, fixed_pad)
      << "sorted by length, rows of a batch hardly need padding ("
      << budget_pad << " against " << fixed_pad << ")";
  EXPECT_LT(budget.batches_per_epoch(), fixed.batches_per_epoch())
      << "short documents share a batch";
}

TEST(BatchingTest, ResumedBudgetLoaderSeesTheSameBatches) {
  auto d = skewed(90);
  auto options =
      DataLoaderOptions(16).seed(21).max_len(kMaxLen).max_tokens(128);
  DataLoader first(d, tokenizer(), options);
  const auto per_epoch = first.batches_per_epoch();
  // Stop inside epoch 1, as a run killed there would.
  for (int64_t i = 0; i < per_epoch + 1 + per_epoch / 2; ++i) {
    first.next();
  }
  ASSERT_EQ(first.position().epoch, 1);
  ASSERT_GT(first.position().index, 0);
  const std::string saved = first.position().to_json().dump();

  DataLoader resumed(d, tokenizer(), DataLoaderOptions(options).seed(999));
  resumed.set_position(
      remat::train::LoaderPosition::from_json(nlohmann::json::parse(saved)));
  for (int64_t i = 0; i < 2 * per_epoch + 2; ++i) {
    auto a = first.next();
    auto b = resumed.next();
    ASSERT_EQ(a.has_value(), b.has_value()) << i;
    if (a) {
      EXPECT_EQ(a->indices, b->indices) << i;
      EXPECT_EQ(a->epoch, b->epoch);
      EXPECT_EQ(a->index, b->index);
      EXPECT_TRUE(torch::equal(a->input_ids, b->input_ids));
    }
  }
}

TEST(BatchingTest, RefusesBudgetsThatCannotHoldARow) {
  auto d = skewed(20);
  auto tok = tokenizer();
  EXPECT_ERROR_CONTAINS(
      DataLoader(d, tok, DataLoaderOptions(8).max_len(128).max_tokens(100)),
      "DataLoader: max_tokens: expected at least max_len (128) tokens, so "
      "that a row of any length fits, but got 100");
  EXPECT_ERROR_CONTAINS(
      DataLoader(
          d, tok,
          DataLoaderOptions(8).max_len(32).max_tokens(63).world_size(2)),
      "DataLoader: max_tokens: expected at least world_size * max_len (2 * "
      "32) tokens, so that every rank gets a row of any length, but got 63");
  EXPECT_ERROR_CONTAINS(
      DataLoader(d, tok, DataLoaderOptions(8).max_tokens(-1)),
      "DataLoader: max_tokens: expected 0 (off) or a token count, but got -1");
  EXPECT_ERROR_CONTAINS(
      DataLoader(
          d, tok, DataLoaderOptions(8).max_len(32).max_tokens(64).drop_last(
                      true)),
      "DataLoader: drop_last: expected false with max_tokens");
  EXPECT_ERROR_CONTAINS(
      DataLoader(
          d, tok,
          DataLoaderOptions(8).max_len(32).max_tokens(64).pack(true)),
      "DataLoader: pack: expected max_tokens 0 (a packed batch is batch_size "
      "rows of max_len tokens), but got max_tokens 64");
  auto cls = std::make_shared<Dataset>(*d);
  cls->label_names = {"x"};
  EXPECT_ERROR_CONTAINS(
      DataLoader(cls, tok, DataLoaderOptions(8).pack(true)),
      "DataLoader: pack: expected a language-modelling set (a packed row has "
      "no single label vector), but got a classification set with 1 labels");
}

TEST(PackedBatchTest, RowsHoldWholeNumberedDocuments) {
  auto d = std::make_shared<Dataset>();
  // Tokens with [CLS] and [SEP]: 3, 4, 12 (cut to 8), 3, 4.
  d->examples = {
      {"a", {}}, {"b c", {}}, {words(10), {}}, {"e", {}}, {"a b", {}}};
  DataLoader loader(
      d, tokenizer(),
      DataLoaderOptions(3).max_len(8).pack(true).shuffle(false));
  EXPECT_EQ(loader.batches_per_epoch(), 1) << "3 rows: 3+4, 8, 3+4";
  auto b = loader.next();
  ASSERT_TRUE(b);
  EXPECT_TRUE(torch::equal(
      b->input_ids,
      torch::tensor(
          {{2, 5, 3, 2, 6, 7, 3, 0},
           {2, 5, 6, 7, 8, 9, 5, 3},
           {2, 9, 3, 2, 5, 6, 3, 0}},
          torch::kLong)));
  EXPECT_TRUE(torch::equal(
      b->attention_mask,
      torch::tensor(
          {{1, 1, 1, 2, 2, 2, 2, 0},
           {1, 1, 1, 1, 1, 1, 1, 1},
           {1, 1, 1, 2, 2, 2, 2, 0}},
          torch::kLong)));
  EXPECT_TRUE(torch::equal(
      b->labels,
      torch::tensor(
          {{-100, 5, 3, -100, 6, 7, 3, -100},
           {-100, 5, 6, 7, 8, 9, 5, 3},
           {-100, 9, 3, -100, 5, 6, 3, -100}},
          torch::kLong)))
      << "no token predicts the next document's first";
  EXPECT_EQ(b->indices, (std::vector<int64_t>{0, 1, 2, 3, 4}));
  EXPECT_EQ(b->global_size, 3);
  EXPECT_EQ(loader.global_batch(0, 0), b->indices);

  // Pre-tokenized documents are packed as given, without [CLS]/[SEP].
  Dataset ids;
  ids.examples = {{"", {}, {7, 8}}, {"", {}, {9, 9, 9}}, {"", {}, {5}}};
  DataLoader packed_ids(
      std::make_shared<Dataset>(ids), tokenizer(),
      DataLoaderOptions(1).max_len(5).pack(true).shuffle(false));
  auto first = packed_ids.next();
  EXPECT_TRUE(torch::equal(
      first->input_ids, torch::tensor({{7, 8, 9, 9, 9}}, torch::kLong)));
  EXPECT_TRUE(torch::equal(
      first->labels, torch::tensor({{-100, 8, -100, 9, 9}}, torch::kLong)));
  EXPECT_EQ(packed_ids.next()->indices, (std::vector<int64_t>{2}));
}

// Checks a packed batch against its documents: whole documents, cut to
// max_len, numbered in the mask, -100 on each one's first token.
void expect_packed_rows(const Batch& b, const Dataset& d, int64_t max_len) {
  ASSERT_LE(b.input_ids.size(1), max_len);
  size_t next_doc = 0;
  for (int64_t r = 0; r < b.input_ids.size(0); ++r) {
    auto ids = b.input_ids[r];
    auto mask = b.attention_mask[r];
    auto labels = b.labels[r];
    int64_t doc = 0;
    for (int64_t c = 0; c < ids.size(0); ++c) {
      const auto m = mask[c].item<int64_t>();
      if (m == 0) { // padding, to the row's end
        EXPECT_EQ(mask.slice(0, c).sum().item<int64_t>(), 0);
        EXPECT_EQ(labels.slice(0, c).ne(-100).sum().item<int64_t>(), 0);
        break;
      }
      if (m != doc) {
        EXPECT_EQ(m, doc + 1) << "documents are numbered 1, 2, ... in a row";
        doc = m;
        ASSERT_LT(next_doc, b.indices.size());
        const auto i = b.indices[next_doc++];
        const auto want = tokenizer()->encode(
            d.examples[static_cast<size_t>(i)].text, max_len);
        const auto n = static_cast<int64_t>(want.input_ids.size());
        EXPECT_TRUE(torch::equal(
            ids.slice(0, c, c + n), torch::tensor(want.input_ids)))
            << "a whole document, cut to max_len";
        EXPECT_EQ(labels[c].item<int64_t>(), -100);
      } else {
        EXPECT_EQ(labels[c].item<int64_t>(), ids[c].item<int64_t>());
      }
    }
  }
  EXPECT_EQ(next_doc, b.indices.size()) << "indices list every document";
}

TEST(PackedBatchTest, EveryDocumentOncePerEpochAndResumes) {
  auto d = skewed(150);
  auto options = DataLoaderOptions(4).seed(2).max_len(kMaxLen).pack(true);
  DataLoader loader(d, tokenizer(), options);
  int64_t rows = 0;
  std::vector<std::vector<int64_t>> orders;
  for (int e = 0; e < 2; ++e) {
    auto batches = epoch(loader);
    EXPECT_EQ(static_cast<int64_t>(batches.size()), loader.batches_per_epoch());
    std::vector<int64_t> seen;
    rows = 0;
    for (const auto& b : batches) {
      expect_packed_rows(b, *d, kMaxLen);
      EXPECT_EQ(b.indices, loader.global_batch(b.epoch, b.index));
      rows += b.input_ids.size(0);
      seen.insert(seen.end(), b.indices.begin(), b.indices.end());
    }
    EXPECT_EQ(sorted(seen), all(d->size())) << "epoch " << e;
    orders.push_back(seen);
  }
  EXPECT_NE(orders[0], orders[1]) << "each epoch shuffles the rows";
  EXPECT_LT(rows, d->size()) << "rows hold several documents";

  // Resume inside epoch 1.
  DataLoader first(d, tokenizer(), options);
  for (int64_t i = 0; i < first.batches_per_epoch() + 3; ++i) {
    first.next();
  }
  DataLoader resumed(d, tokenizer(), DataLoaderOptions(options).seed(7));
  resumed.set_position(first.position());
  for (int64_t i = 0; i < first.batches_per_epoch() + 2; ++i) {
    auto a = first.next();
    auto b = resumed.next();
    ASSERT_EQ(a.has_value(), b.has_value()) << i;
    if (a) {
      EXPECT_EQ(a->indices, b->indices);
      EXPECT_TRUE(torch::equal(a->attention_mask, b->attention_mask));
    }
  }

  // Two ranks' rows together are the global batch.
  DataLoader r0(d, tokenizer(), DataLoaderOptions(options).world_size(2));
  DataLoader r1(
      d, tokenizer(), DataLoaderOptions(options).rank(1).world_size(2));
  for (int64_t i = 0; i < r0.batches_per_epoch(); ++i) {
    auto a = r0.next();
    auto b = r1.next();
    ASSERT_TRUE(a && b);
    EXPECT_EQ(a->global_size, a->input_ids.size(0) + b->input_ids.size(0));
    auto both = a->indices;
    both.insert(both.end(), b->indices.begin(), b->indices.end());
    EXPECT_EQ(sorted(both), sorted(r0.global_batch(0, i)));
    expect_packed_rows(*a, *d, kMaxLen);
  }
}

} // namespace
