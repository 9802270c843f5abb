#include "io/io_testing.h"
#include "remat/train/metrics.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

namespace {

// Worked by hand: predictions are logit >= 0 (sigmoid >= 0.5).
//   row  logits            preds   targets
//   0    [ 2, -1,  0.1]    1 0 1   1 0 0
//   1    [-3,  4, -0.5]    0 1 0   0 1 1
//   2    [ 1,  1, -2  ]    1 1 0   1 0 0
//   3    [-1, -1, -1  ]    0 0 0   0 1 0
// label 0: tp 2 fp 0 fn 0 -> F1 1
// label 1: tp 1 fp 1 fn 1 -> F1 2/4 = 0.5
// label 2: tp 0 fp 1 fn 1 -> F1 0
// macro 0.5; micro: tp 3 fp 2 fn 2 -> 6/10
torch::Tensor logits() {
  return torch::tensor(
      {{2.0, -1.0, 0.1},
       {-3.0, 4.0, -0.5},
       {1.0, 1.0, -2.0},
       {-1.0, -1.0, -1.0}});
}
torch::Tensor targets() {
  return torch::tensor(
      {{1.0, 0.0, 0.0}, {0.0, 1.0, 1.0}, {1.0, 0.0, 0.0}, {0.0, 1.0, 0.0}});
}

TEST(MetricsTest, HandComputedExample) {
  auto s = remat::train::multilabel_f1(logits(), targets());
  EXPECT_EQ(s.true_positives, (std::vector<int64_t>{2, 1, 0}));
  EXPECT_EQ(s.false_positives, (std::vector<int64_t>{0, 1, 1}));
  EXPECT_EQ(s.false_negatives, (std::vector<int64_t>{0, 1, 1}));
  ASSERT_EQ(s.per_label.size(), 3u);
  EXPECT_DOUBLE_EQ(s.per_label[0], 1.0);
  EXPECT_DOUBLE_EQ(s.per_label[1], 0.5);
  EXPECT_DOUBLE_EQ(s.per_label[2], 0.0);
  EXPECT_DOUBLE_EQ(s.macro, 0.5);
  EXPECT_DOUBLE_EQ(s.micro, 0.6);
}

TEST(MetricsTest, AccumulatesOverBatches) {
  remat::train::MultilabelF1 f1(3);
  f1.update(logits().slice(0, 0, 1), targets().slice(0, 0, 1));
  f1.update(logits().slice(0, 1, 4), targets().slice(0, 1, 4));
  auto s = f1.compute();
  EXPECT_DOUBLE_EQ(s.macro, 0.5);
  EXPECT_DOUBLE_EQ(s.micro, 0.6);
  // Counts add up across ranks.
  auto twice = remat::train::MultilabelF1::from_counts(f1.counts() * 2);
  EXPECT_DOUBLE_EQ(twice.macro, 0.5);
  f1.reset();
  EXPECT_EQ(f1.counts().sum().item<int64_t>(), 0);
}

TEST(MetricsTest, ThresholdAndEdgeCases) {
  // sigmoid(0) = 0.5 counts as positive.
  EXPECT_DOUBLE_EQ(
      remat::train::multilabel_f1(torch::zeros({1, 1}), torch::ones({1, 1}))
          .macro,
      1.0);
  // sigmoid(2) = 0.88 is negative at threshold 0.9.
  auto s = remat::train::multilabel_f1(
      torch::full({1, 1}, 2.0), torch::ones({1, 1}), 0.9);
  EXPECT_EQ(s.false_negatives[0], 1);
  // A label never present and never predicted scores 0, as in scikit-learn.
  auto absent = remat::train::multilabel_f1(
      torch::full({2, 2}, -5.0), torch::tensor({{1.0, 0.0}, {0.0, 0.0}}));
  EXPECT_DOUBLE_EQ(absent.per_label[1], 0.0);
  EXPECT_ERROR_CONTAINS(
      remat::train::multilabel_f1(torch::zeros({2, 3}), torch::zeros({2, 4})),
      "expected logits and targets of the same shape [N, num_labels], but got [2, 3] and [2, 4]");
  remat::train::MultilabelF1 f1(4);
  EXPECT_ERROR_CONTAINS(
      f1.update(torch::zeros({2, 3}), torch::zeros({2, 3})), "shape [N, 4]");
}

} // namespace
