#include "remat/train/metrics.h"

#include <c10/util/Exception.h>
#include <torch/torch.h>

#include <cmath>

namespace remat {
namespace train {

namespace {

double f1(int64_t tp, int64_t fp, int64_t fn) {
  const auto denominator = 2 * tp + fp + fn;
  return denominator == 0
      ? 0.0
      : 2.0 * static_cast<double>(tp) / static_cast<double>(denominator);
}

// [3, L] counts of one batch.
torch::Tensor batch_counts(
    const torch::Tensor& logits,
    const torch::Tensor& targets,
    double threshold) {
  TORCH_CHECK(
      logits.dim() == 2 && logits.sizes() == targets.sizes(),
      "multilabel F1: expected logits "
      "and targets of the same shape [N, num_labels], but got ",
      logits.sizes(), " and ", targets.sizes());
  TORCH_CHECK(
      threshold > 0 && threshold < 1,
      "multilabel F1: expected a threshold in (0, 1), but got ", threshold);
  // sigmoid(x) >= t  <=>  x >= log(t / (1 - t)); compare logits, which is
  // exact.
  const double cut = std::log(threshold / (1.0 - threshold));
  auto pred = logits.detach().to(torch::kCPU, torch::kDouble) >= cut;
  auto truth = targets.detach().to(torch::kCPU, torch::kDouble) >= 0.5;
  auto tp = (pred & truth).sum(0);
  auto fp = (pred & ~truth).sum(0);
  auto fn = (~pred & truth).sum(0);
  return torch::stack({tp, fp, fn}).to(torch::kLong);
}

} // namespace

F1Scores MultilabelF1::from_counts(const torch::Tensor& counts) {
  TORCH_CHECK(
      counts.dim() == 2 && counts.size(0) == 3,
      "multilabel F1: expected counts of shape "
      "[3, num_labels], but got ",
      counts.sizes());
  auto c = counts.to(torch::kCPU, torch::kLong).contiguous();
  auto a = c.accessor<int64_t, 2>();
  F1Scores s;
  int64_t tp_all = 0, fp_all = 0, fn_all = 0;
  for (int64_t l = 0; l < c.size(1); ++l) {
    s.true_positives.push_back(a[0][l]);
    s.false_positives.push_back(a[1][l]);
    s.false_negatives.push_back(a[2][l]);
    s.per_label.push_back(f1(a[0][l], a[1][l], a[2][l]));
    s.macro += s.per_label.back();
    tp_all += a[0][l], fp_all += a[1][l], fn_all += a[2][l];
  }
  if (!s.per_label.empty()) {
    s.macro /= static_cast<double>(s.per_label.size());
  }
  s.micro = f1(tp_all, fp_all, fn_all);
  return s;
}

F1Scores multilabel_f1(
    const torch::Tensor& logits,
    const torch::Tensor& targets,
    double threshold) {
  return MultilabelF1::from_counts(batch_counts(logits, targets, threshold));
}

MultilabelF1::MultilabelF1(int64_t num_labels, double threshold)
    : num_labels_(num_labels), threshold_(threshold) {
  TORCH_CHECK(
      num_labels > 0, "MultilabelF1: expected num_labels > 0, but got ",
      num_labels);
  TORCH_CHECK(
      threshold > 0 && threshold < 1,
      "MultilabelF1: expected a threshold in (0, 1), but got ", threshold);
  reset();
}

void MultilabelF1::update(
    const torch::Tensor& logits,
    const torch::Tensor& targets) {
  TORCH_CHECK(
      logits.dim() == 2 && logits.size(1) == num_labels_,
      "MultilabelF1: expected logits of "
      "shape [N, ",
      num_labels_, "], but got ", logits.sizes());
  counts_ += batch_counts(logits, targets, threshold_);
}

F1Scores MultilabelF1::compute() const {
  return from_counts(counts_);
}

void MultilabelF1::reset() {
  counts_ = torch::zeros({3, num_labels_}, torch::kLong);
}

} // namespace train
} // namespace remat
