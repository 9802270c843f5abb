#include "io/io_testing.h"
#include "remat/io/tokenizer.h"
#include "remat/train/data.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <numeric>
#include <set>

namespace {

using remat::train::DataLoader;
using remat::train::DataLoaderOptions;
using remat::train::Dataset;
using remat_io_test::TempDir;
using remat_io_test::write_text;

const std::vector<std::string> kVocab{
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c", "d", "e"};

std::shared_ptr<remat::io::Tokenizer> tokenizer() {
  return std::make_shared<remat::io::WordPieceTokenizer>(kVocab);
}

// n documents "a", "a b", "a b c", ... cycling, label i % 3.
std::shared_ptr<Dataset> numbered(int64_t n) {
  auto d = std::make_shared<Dataset>();
  d->label_names = {"x", "y", "z"};
  const std::vector<std::string> words{"a", "b", "c", "d", "e"};
  for (int64_t i = 0; i < n; ++i) {
    std::string text;
    for (int64_t w = 0; w <= i % 5; ++w) {
      text += (w ? " " : "") + words[static_cast<size_t>(w)];
    }
    std::vector<float> labels(3, 0.0f);
    labels[static_cast<size_t>(i % 3)] = 1.0f;
    d->examples.push_back({text, labels});
  }
  return d;
}

TEST(DataTest, ReadsClassificationJsonl) {
  TempDir dir;
  write_text(
      dir.file("t.jsonl"),
      "\xEF\xBB\xBF{\"text\": \"first\", \"labels\": [\"spam\"]}\n"
      "\n"
      "{\"text\": \"second\", \"labels\": [\"legal\", \"finance\"], \"id\": 7}\r\n"
      "{\"text\": \"third\", \"labels\": []}\n"
      "{\"text\": \"fourth\", \"labels\": \"ops\"}");
  auto d = remat::train::read_classification_jsonl(dir.file("t.jsonl"));
  EXPECT_EQ(
      d.label_names,
      (std::vector<std::string>{"finance", "legal", "ops", "spam"}));
  ASSERT_EQ(d.size(), 4);
  EXPECT_EQ(d.examples[0].text, "first");
  EXPECT_EQ(d.examples[0].labels, (std::vector<float>{0, 0, 0, 1}));
  EXPECT_EQ(d.examples[1].labels, (std::vector<float>{1, 1, 0, 0}));
  EXPECT_EQ(d.examples[2].labels, (std::vector<float>{0, 0, 0, 0}));
  EXPECT_EQ(d.examples[3].labels, (std::vector<float>{0, 0, 1, 0}));

  // Written back and read again: the same.
  remat::train::write_jsonl(dir.file("back.jsonl"), d);
  auto back = remat::train::read_classification_jsonl(
      dir.file("back.jsonl"),
      remat::train::JsonlOptions().label_names(d.label_names));
  ASSERT_EQ(back.size(), d.size());
  for (int64_t i = 0; i < d.size(); ++i) {
    EXPECT_EQ(back.examples[i].text, d.examples[i].text);
    EXPECT_EQ(back.examples[i].labels, d.examples[i].labels);
  }

  write_text(
      dir.file("hot.jsonl"),
      "{\"text\": \"a\", \"labels\": [0, 1, 1]}\n{\"text\": \"b\", \"labels\": [1, 0, 0]}\n");
  auto hot = remat::train::read_classification_jsonl(dir.file("hot.jsonl"));
  EXPECT_EQ(hot.label_names, (std::vector<std::string>{"0", "1", "2"}));
  EXPECT_EQ(hot.examples[0].labels, (std::vector<float>{0, 1, 1}));

  write_text(
      dir.file("lm.jsonl"),
      "{\"text\": \"one\"}\n{\"text\": \"two\", \"labels\": [\"x\"]}\n");
  auto lm = remat::train::read_text_jsonl(dir.file("lm.jsonl"));
  EXPECT_EQ(lm.size(), 2);
  EXPECT_FALSE(lm.is_classification());
}

TEST(DataTest, MalformedLinesNameFileAndLine) {
  TempDir dir;
  const auto path = dir.file("bad.jsonl");
  auto fails = [&](const std::string& content, const std::string& message,
                   std::vector<std::string> names = {}) {
    write_text(path, content);
    EXPECT_ERROR_CONTAINS(
        remat::train::read_classification_jsonl(
            path, remat::train::JsonlOptions().label_names(names)),
        message);
  };
  const std::string ok = "{\"text\": \"fine\", \"labels\": [\"ops\"]}\n";
  fails(
      ok + ok + "{\"text\": \"broken\", \n",
      path + ":3: expected a JSON object, but the line is not valid JSON");
  // nlohmann's own "[json.exception...]" tag and its "line 1" (each line is
  // parsed alone) never reach the user.
  fails(
      ok + "{\"text\": tru}\n",
      path + ":2: expected a JSON object, but the line is not valid JSON (at column ");
  fails(
      "{\"text\": \"x\", \"labels\": [1e999]}\n",
      path + ":1: expected a JSON object, but the line is not valid JSON (number "
             "overflow parsing '1e999')");
  fails(ok + "[1, 2]\n", path + ":2: expected a JSON object, but got array");
  fails(
      ok + "{\"labels\": [\"ops\"]}\n",
      path + ":2: expected a string field \"text\", but got none");
  fails(
      ok + "{\"text\": 5, \"labels\": []}\n",
      path + ":2: expected a string field \"text\", but got 5");
  fails(ok + "{\"text\": \"x\"}\n", path + ":2: expected a field \"labels\"");
  fails(
      ok + ok + ok + "{\"text\": \"x\", \"labels\": [\"sales\"]}\n",
      path +
          ":4: expected a label among finance, legal, ops, spam, but got 'sales'",
      {"finance", "legal", "ops", "spam"});
  fails(
      "{\"text\": \"x\", \"labels\": [1, 0]}\n{\"text\": \"y\", \"labels\": [1, 0, 1]}\n",
      path + ":2: expected a multi-hot list of 2 values, but got 3");
  fails(
      "{\"text\": \"x\", \"labels\": [2, 0]}\n",
      path +
          ":1: expected label names or multi-hot values in [0, 1], but got 2");
  fails(
      "{\"text\": \"x\", \"labels\": [\"a\", 1]}\n",
      path +
          ":1: expected \"labels\" to hold label names or numbers, not both");
  fails(
      "{\"text\": \"x\", \"labels\": {\"a\": 1}}\n",
      path + ":1: expected \"labels\" to be a list");
  EXPECT_ERROR_CONTAINS(
      remat::train::read_text_jsonl(dir.file("absent.jsonl")),
      "could not open '" + dir.file("absent.jsonl"));
}

TEST(DataTest, ReadsTokenIds) {
  TempDir dir;
  write_text(
      dir.file("ids.jsonl"),
      "{\"input_ids\": [5, 6, 7, 8]}\n"
      "\n"
      "{\"input_ids\": [9], \"text\": \"kept for reading\"}\n");
  auto d = remat::train::read_text_jsonl(dir.file("ids.jsonl"));
  ASSERT_EQ(d.size(), 2);
  EXPECT_EQ(d.examples[0].ids, (std::vector<int64_t>{5, 6, 7, 8}));
  EXPECT_EQ(d.examples[0].text, "");
  EXPECT_EQ(d.examples[1].ids, (std::vector<int64_t>{9}));
  EXPECT_EQ(d.examples[1].text, "kept for reading");
  EXPECT_TRUE(d.pretokenized());
  EXPECT_EQ(d.max_token_id(), 9);

  // The ids as given: no [CLS]/[SEP] added, cut to max_len.
  auto tok = tokenizer();
  auto b = remat::train::collate(
      d, {0, 1}, *tok, remat::train::CollateOptions().max_len(3));
  EXPECT_TRUE(torch::equal(
      b.input_ids, torch::tensor({{5, 6, 7}, {9, 0, 0}}, torch::kLong)));
  EXPECT_TRUE(torch::equal(
      b.attention_mask, torch::tensor({{1, 1, 1}, {1, 0, 0}}, torch::kLong)));
  EXPECT_TRUE(torch::equal(
      b.labels, torch::tensor({{5, 6, 7}, {9, -100, -100}}, torch::kLong)));

  remat::train::write_jsonl(dir.file("back.jsonl"), d);
  auto back = remat::train::read_text_jsonl(dir.file("back.jsonl"));
  ASSERT_EQ(back.size(), 2);
  for (int64_t i = 0; i < 2; ++i) {
    EXPECT_EQ(back.examples[i].ids, d.examples[i].ids);
    EXPECT_EQ(back.examples[i].text, d.examples[i].text);
  }

  write_text(
      dir.file("cls.jsonl"),
      "{\"input_ids\": [2, 5, 3], \"labels\": [\"spam\"]}\n"
      "{\"input_ids\": [2, 3], \"labels\": []}\n");
  auto cls = remat::train::read_classification_jsonl(dir.file("cls.jsonl"));
  EXPECT_EQ(cls.label_names, (std::vector<std::string>{"spam"}));
  EXPECT_EQ(cls.examples[0].ids, (std::vector<int64_t>{2, 5, 3}));
  EXPECT_EQ(cls.examples[0].labels, (std::vector<float>{1}));
  remat::train::write_jsonl(dir.file("cls_back.jsonl"), cls);
  auto cls_back = remat::train::read_classification_jsonl(
      dir.file("cls_back.jsonl"),
      remat::train::JsonlOptions().label_names(cls.label_names));
  EXPECT_EQ(cls_back.examples[1].ids, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(cls_back.examples[1].labels, (std::vector<float>{0}));

  auto text = numbered(3);
  EXPECT_FALSE(text->pretokenized());
  EXPECT_EQ(text->max_token_id(), -1);
}

TEST(DataTest, RefusesBadTokenIds) {
  TempDir dir;
  const auto path = dir.file("bad.jsonl");
  auto fails = [&](const std::string& content, const std::string& message) {
    write_text(path, content);
    EXPECT_ERROR_CONTAINS(remat::train::read_text_jsonl(path), message);
  };
  fails(
      "{\"text\": \"a\"}\n{\"input_ids\": [1]}\n",
      path +
          ":2: expected every line to give text (\"text\") as line 1 does, "
          "but this line gives token ids (\"input_ids\")");
  fails(
      "\n{\"input_ids\": [1]}\n{\"input_ids\": [2]}\n{\"text\": \"a\"}\n",
      path +
          ":4: expected every line to give token ids (\"input_ids\") as line "
          "2 does, but this line gives text (\"text\")");
  fails(
      "{\"input_ids\": [1, 1.5]}\n",
      path +
          ":1: expected \"input_ids\" to hold non-negative integer token ids, "
          "but item 1 is 1.5");
  fails(
      "{\"input_ids\": [1, 2.0]}\n",
      path + ":1: expected \"input_ids\" to hold non-negative integer token "
             "ids, but item 1 is 2.0");
  fails(
      "{\"input_ids\": [-3]}\n",
      path + ":1: expected \"input_ids\" to hold non-negative integer token "
             "ids, but item 0 is -3");
  fails(
      "{\"input_ids\": [\"7\"]}\n",
      path + ":1: expected \"input_ids\" to hold non-negative integer token "
             "ids, but item 0 is \"7\"");
  fails(
      "{\"input_ids\": [18446744073709551615]}\n",
      path + ":1: expected \"input_ids\" to hold non-negative integer token "
             "ids, but item 0 is 18446744073709551615");
  fails(
      "{\"input_ids\": []}\n",
      path + ":1: expected \"input_ids\" to be a non-empty list of token ids, "
             "but got an empty list");
  fails(
      "{\"input_ids\": 5}\n",
      path + ":1: expected \"input_ids\" to be a non-empty list of token ids, "
             "but got 5");
  fails(
      "{\"input_ids\": [1], \"text\": 5}\n",
      path + ":1: expected a string field \"text\", but got 5");
  write_text(
      path,
      "{\"input_ids\": [1], \"labels\": [\"x\"]}\n"
      "{\"text\": \"a\", \"labels\": [\"x\"]}\n");
  EXPECT_ERROR_CONTAINS(
      remat::train::read_classification_jsonl(path),
      path + ":2: expected every line to give token ids");

  Dataset mixed;
  mixed.examples = {{"a", {}, {}}, {"", {}, {4, 5}}};
  EXPECT_FALSE(mixed.pretokenized());
  EXPECT_EQ(mixed.max_token_id(), 5);
  EXPECT_ERROR_CONTAINS(
      remat::train::write_jsonl(dir.file("mixed.jsonl"), mixed),
      "write_jsonl: expected every example to have token ids or none to (a "
      "file is all ids or all text), but example 0 has none and example 1 "
      "has some");
}

TEST(DataTest, SplitIsSeededDisjointAndOrdered) {
  auto d = numbered(101);
  auto a = remat::train::split_dataset(*d, 0.2, 7);
  auto b = remat::train::split_dataset(*d, 0.2, 7);
  auto c = remat::train::split_dataset(*d, 0.2, 8);
  EXPECT_EQ(a.valid.size(), 20);
  EXPECT_EQ(a.train.size(), 81);
  EXPECT_EQ(a.valid.label_names, d->label_names);
  auto texts = [](const Dataset& x) {
    std::vector<std::string> t;
    for (const auto& e : x.examples) {
      t.push_back(
          e.text + "|" +
          std::to_string(
              std::max_element(e.labels.begin(), e.labels.end()) -
              e.labels.begin()));
    }
    return t;
  };
  EXPECT_EQ(texts(a.valid), texts(b.valid));
  EXPECT_NE(texts(a.valid), texts(c.valid));
  EXPECT_ERROR_CONTAINS(
      remat::train::split_dataset(*d, 1.0, 0),
      "expected valid_fraction in [0, 1), but got 1");
}

TEST(DataTest, CollatePadsToTheLongestRow) {
  auto d = numbered(5);
  auto tok = tokenizer();
  auto b = remat::train::collate(
      *d, {0, 2}, *tok, remat::train::CollateOptions().max_len(16));
  // "a" -> [CLS] a [SEP]; "a b c" -> [CLS] a b c [SEP]
  EXPECT_TRUE(torch::equal(
      b.input_ids,
      torch::tensor({{2, 5, 3, 0, 0}, {2, 5, 6, 7, 3}}, torch::kLong)));
  EXPECT_TRUE(torch::equal(
      b.attention_mask,
      torch::tensor({{1, 1, 1, 0, 0}, {1, 1, 1, 1, 1}}, torch::kLong)));
  EXPECT_EQ(b.labels.scalar_type(), torch::kFloat);
  EXPECT_TRUE(torch::equal(
      b.labels, torch::tensor({{1.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 1.0f}})));

  auto fixed = remat::train::collate(
      *d, {4}, *tok,
      remat::train::CollateOptions().max_len(4).pad_to_max_len(true));
  EXPECT_TRUE(torch::equal(
      fixed.input_ids, torch::tensor({{2, 5, 6, 3}}, torch::kLong)))
      << "cut to max_len";
  auto wide = remat::train::collate(
      *d, {0}, *tok,
      remat::train::CollateOptions().max_len(6).pad_to_max_len(true));
  EXPECT_EQ(wide.input_ids.sizes(), (std::vector<int64_t>{1, 6}));

  Dataset lm;
  lm.examples = {{"a b", {}}, {"c", {}}};
  auto l = remat::train::collate(lm, {0, 1}, *tok);
  EXPECT_EQ(l.labels.scalar_type(), torch::kLong);
  EXPECT_TRUE(torch::equal(
      l.labels, torch::tensor({{2, 5, 6, 3}, {2, 7, 3, -100}}, torch::kLong)));
}

TEST(DataTest, LoaderVisitsEveryDocumentOncePerEpoch) {
  auto d = numbered(23);
  DataLoader loader(d, tokenizer(), DataLoaderOptions(5).seed(3));
  EXPECT_EQ(loader.batches_per_epoch(), 5);
  std::vector<std::vector<int64_t>> epochs(2);
  for (auto& seen : epochs) {
    while (auto batch = loader.next()) {
      EXPECT_EQ(
          batch->input_ids.size(0),
          static_cast<int64_t>(batch->indices.size()));
      seen.insert(seen.end(), batch->indices.begin(), batch->indices.end());
    }
    auto sorted = seen;
    std::sort(sorted.begin(), sorted.end());
    std::vector<int64_t> all(23);
    std::iota(all.begin(), all.end(), 0);
    EXPECT_EQ(sorted, all);
  }
  EXPECT_NE(epochs[0], epochs[1]) << "each epoch has its own order";
  EXPECT_EQ(loader.position().epoch, 2);

  DataLoader in_order(
      d, tokenizer(), DataLoaderOptions(10).shuffle(false).drop_last(true));
  EXPECT_EQ(in_order.batches_per_epoch(), 2);
  EXPECT_EQ(
      in_order.next()->indices,
      (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}));
}

TEST(DataTest, ResumedLoaderSeesTheSameBatches) {
  auto d = numbered(17);
  auto options = DataLoaderOptions(4).seed(11);
  DataLoader first(d, tokenizer(), options);
  // Stop after 7 steps (inside epoch 1), as a run killed there would.
  std::vector<std::vector<int64_t>> before;
  for (int i = 0; i < 7; ++i) {
    auto b = first.next();
    if (b) {
      before.push_back(b->indices);
    }
  }
  const std::string saved = first.position().to_json().dump();

  DataLoader resumed(
      d, tokenizer(), DataLoaderOptions(4).seed(999)); // the saved seed wins
  resumed.set_position(
      remat::train::LoaderPosition::from_json(nlohmann::json::parse(saved)));
  EXPECT_EQ(resumed.position(), first.position());
  for (int i = 0; i < 12; ++i) {
    auto a = first.next();
    auto b = resumed.next();
    ASSERT_EQ(a.has_value(), b.has_value()) << i;
    if (a) {
      EXPECT_EQ(a->indices, b->indices);
      EXPECT_EQ(a->epoch, b->epoch);
      EXPECT_EQ(a->index, b->index);
      EXPECT_TRUE(torch::equal(a->input_ids, b->input_ids));
    }
  }
  EXPECT_ERROR_CONTAINS(
      remat::train::LoaderPosition::from_json(
          {{"epoch", 1}, {"index", "2"}, {"seed", 0}}),
      "expected an integer field \"index\"");
  EXPECT_ERROR_CONTAINS(
      resumed.set_position({0, 99, 11}),
      "expected a position with 0 <= index <= 5");
}

TEST(DataTest, ShardsTogetherMakeTheSingleProcessBatch) {
  auto d = numbered(30);
  const int64_t world = 3;
  DataLoader single(d, tokenizer(), DataLoaderOptions(8).seed(5));
  std::vector<std::unique_ptr<DataLoader>> ranks;
  for (int64_t r = 0; r < world; ++r) {
    ranks.push_back(std::make_unique<DataLoader>(
        d, tokenizer(),
        DataLoaderOptions(8).seed(5).rank(r).world_size(world)));
    EXPECT_EQ(ranks.back()->batches_per_epoch(), 4)
        << "30 = 3 * 8 + 6, and 6 >= world";
  }
  for (int step = 0; step < 4; ++step) {
    auto whole = single.next();
    ASSERT_TRUE(whole);
    std::vector<int64_t> dealt(whole->indices.size());
    for (int64_t r = 0; r < world; ++r) {
      auto part = ranks[r]->next();
      ASSERT_TRUE(part);
      EXPECT_EQ(part->global_size, static_cast<int64_t>(whole->indices.size()));
      for (size_t i = 0; i < part->indices.size(); ++i) {
        dealt[static_cast<size_t>(r) + i * world] = part->indices[i];
      }
    }
    EXPECT_EQ(dealt, whole->indices) << "step " << step;
  }
  for (auto& r : ranks) {
    EXPECT_FALSE(r->next()) << "every rank ends the epoch together";
  }
  // 25 = 3 * 8 + 1: the last global batch has 1 document for 3 ranks and is
  // left out.
  DataLoader short_tail(
      numbered(25), tokenizer(), DataLoaderOptions(8).rank(0).world_size(3));
  EXPECT_EQ(short_tail.batches_per_epoch(), 3);
  EXPECT_ERROR_CONTAINS(
      DataLoader(d, tokenizer(), DataLoaderOptions(2).world_size(4)),
      "expected batch_size (the global batch) >= world_size");
  EXPECT_ERROR_CONTAINS(
      DataLoader(d, tokenizer(), DataLoaderOptions(8).rank(3).world_size(3)),
      "expected 0 <= rank < world_size, but got rank 3 and world_size 3");
}

// Pinned so that a change of generator (which would silently change what a
// resumed run sees) fails here.
TEST(DataTest, PermutationsArePinned) {
  EXPECT_EQ(
      remat::train::epoch_permutation(10, 0, 0),
      (std::vector<int64_t>{6, 9, 7, 1, 3, 4, 5, 2, 0, 8}));
}

} // namespace
