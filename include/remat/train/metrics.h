// Scores for multi-label classification: per-label and macro F1 of
// predictions sigmoid(logit) >= threshold, accumulated over batches.
//
// Example:
//   // given: std::vector<remat::train::Batch> eval_batches;  // data.h
//   // given: std::function<torch::Tensor(torch::Tensor)> model;  // -> [B, 4]
//   remat::train::MultilabelF1 f1(/*num_labels=*/4);
//   for (auto& batch : eval_batches) {
//     f1.update(model(batch.input_ids), batch.labels);   // [B, 4] each
//   }
//   auto scores = f1.compute();   // scores.macro, scores.per_label[i]
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <vector>

namespace remat {
namespace train {

/// F1 scores and the counts behind them.
struct F1Scores {
  /// 2tp / (2tp + fp + fn) per label; 0 when that is 0/0, as scikit-learn.
  std::vector<double> per_label;
  double macro = 0; ///< unweighted mean of per_label
  double micro = 0; ///< F1 of the counts summed over labels
  std::vector<int64_t> true_positives, false_positives, false_negatives;
};

/// Scores of `logits` [N, L] (before the sigmoid) against `targets` [N, L]
/// (1 or 0; >= 0.5 counts as positive). A prediction is positive when
/// sigmoid(logit) >= threshold. Throws c10::Error on a shape mismatch.
F1Scores multilabel_f1(
    const torch::Tensor& logits,
    const torch::Tensor& targets,
    double threshold = 0.5);

/// F1 accumulated over batches. counts() can be summed over data-parallel
/// ranks (an all-reduce) and turned into scores with from_counts().
class MultilabelF1 {
 public:
  explicit MultilabelF1(int64_t num_labels, double threshold = 0.5);

  void update(const torch::Tensor& logits, const torch::Tensor& targets);
  F1Scores compute() const;
  void reset();

  /// [3, num_labels] int64: true positives, false positives, false negatives.
  const torch::Tensor& counts() const {
    return counts_;
  }
  static F1Scores from_counts(const torch::Tensor& counts);

 private:
  int64_t num_labels_;
  double threshold_;
  torch::Tensor counts_;
};

} // namespace train
} // namespace remat
