#include "io/io_testing.h"
#include "remat/io/file.h"
#include "remat/io/tokenizer.h"
#include "remat/train/metrics.h"
#include "train/routing_data.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>

namespace {

using remat_io_test::TempDir;

const std::string kDataDir = std::string(REMAT_SOURCE_DIR) + "/data/routing";

TEST(RoutingDataTest, IsDeterministic) {
  auto a = remat::train::make_routing_dataset(50, 3);
  auto b = remat::train::make_routing_dataset(50, 3);
  auto c = remat::train::make_routing_dataset(50, 4);
  ASSERT_EQ(a.size(), 50);
  EXPECT_EQ(a.label_names, remat::train::routing_labels());
  int same_as_c = 0;
  for (int64_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a.examples[i].text, b.examples[i].text);
    EXPECT_EQ(a.examples[i].labels, b.examples[i].labels);
    same_as_c += a.examples[i].text == c.examples[i].text;
  }
  EXPECT_LT(same_as_c, 5);
}

// data/routing holds exactly what the generator makes. To regenerate after
// changing it: REMAT_UPDATE_DATA=1 remat_tests --gtest_filter='RoutingData*'
TEST(RoutingDataTest, CommittedFilesAreTheGeneratorsOutput) {
  if (std::getenv("REMAT_UPDATE_DATA")) {
    remat::train::write_routing_files(kDataDir);
  }
  TempDir dir;
  remat::train::write_routing_files(dir.path());
  for (const char* name : {"train.jsonl", "valid.jsonl", "vocab.txt"}) {
    EXPECT_EQ(
        remat::io::read_file(kDataDir + "/" + name),
        remat::io::read_file(dir.file(name)))
        << name
        << " differs from the generator's output (see the comment above)";
  }
  auto train =
      remat::train::read_classification_jsonl(kDataDir + "/train.jsonl");
  EXPECT_EQ(train.size(), 2000);
  EXPECT_EQ(train.label_names, remat::train::routing_labels());
}

TEST(RoutingDataTest, HasTheIntendedMix) {
  auto d = remat::train::make_routing_dataset(2000, 0);
  auto tok = remat::io::WordPieceTokenizer(remat::train::routing_vocab());
  std::vector<int64_t> per_label(4, 0);
  int64_t two = 0, none = 0, tokens = 0, unknown = 0;
  for (const auto& e : d.examples) {
    int n = 0;
    for (size_t l = 0; l < 4; ++l) {
      per_label[l] += e.labels[l] > 0.5f;
      n += e.labels[l] > 0.5f;
    }
    two += n == 2;
    none += n == 0;
    for (auto id : tok.tokenize(e.text)) {
      ++tokens;
      unknown += id == tok.unk_id();
    }
  }
  for (size_t l = 0; l < 4; ++l) {
    EXPECT_GT(per_label[l], 200) << remat::train::routing_labels()[l];
  }
  EXPECT_GT(two, 150);
  EXPECT_GT(none, 80);
  // Only typos fall outside the vocabulary.
  EXPECT_LT(unknown, tokens / 20);
  EXPECT_GT(unknown, 0);
}

// A bag-of-words logistic regression learns the task well but not perfectly:
// there is signal, and there is noise.
TEST(RoutingDataTest, BagOfWordsBeatsChance) {
  torch::manual_seed(0);
  auto tok = remat::io::WordPieceTokenizer(remat::train::routing_vocab());
  auto featurize = [&](const remat::train::Dataset& d) {
    auto x = torch::zeros({d.size(), tok.vocab_size()});
    auto y = torch::zeros({d.size(), 4});
    for (int64_t i = 0; i < d.size(); ++i) {
      for (auto id : tok.tokenize(d.examples[i].text)) {
        x[i][id] = 1.0;
      }
      y[i] = torch::tensor(d.examples[i].labels);
    }
    return std::make_pair(x, y);
  };
  auto train = featurize(remat::train::make_routing_dataset(2000, 0));
  auto valid = featurize(remat::train::make_routing_dataset(400, 1));
  auto linear = torch::nn::Linear(tok.vocab_size(), 4);
  torch::optim::Adam opt(linear->parameters(), torch::optim::AdamOptions(0.05));
  for (int step = 0; step < 150; ++step) {
    opt.zero_grad();
    auto loss = torch::binary_cross_entropy_with_logits(
        linear(train.first), train.second);
    loss.backward();
    opt.step();
  }
  torch::NoGradGuard no_grad;
  auto scores = remat::train::multilabel_f1(linear(valid.first), valid.second);
  // Always predicting every label scores about 0.45 here.
  auto chance =
      remat::train::multilabel_f1(torch::ones_like(valid.second), valid.second);
  EXPECT_LT(chance.macro, 0.55);
  EXPECT_GT(scores.macro, 0.8);
  EXPECT_LT(scores.macro, 0.995);
}

} // namespace
