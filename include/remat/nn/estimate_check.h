// The analytic estimate (remat/plan/estimate.h) next to a measured step of
// the model it describes: builds the remat::nn model a ModelSpec names, runs
// one training step per policy with the counting allocator, and returns both
// sets of bytes. `remat estimate --check` prints check_table(); a test
// holds them within 10% of each other.
//
// Example:
//   remat::memory::install();
//   auto spec = remat::plan::ModelSpec(remat::plan::Family::kLlama,
//       /*layers=*/4, /*hidden=*/64, /*heads=*/4, /*vocab=*/128)
//       .kv_heads(2).seq(64).batch(2)
//       .head(remat::plan::Head::kLanguageModel);
//   for (const auto& c : remat::nn::check_estimate(spec,
//            {remat::CheckpointPolicy::none(),
//             remat::CheckpointPolicy::every_layer()})) {
//     std::cout << c.policy << ": " << c.estimated_peak_bytes << " estimated, "
//               << c.measured_peak_bytes << " measured\n";
//   }
#pragma once

#include "remat/plan/estimate.h"
#include "remat/policy.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace remat {
namespace nn {

/// One policy's estimate and measurement. All in bytes. Fixed bytes are
/// weights, gradients and the batch (no optimizer runs: the estimate is
/// taken with Optimizer::kSgd, which keeps no state); measured figures are
/// above what the process held before the model was built.
struct EstimateCheck {
  std::string policy;
  int64_t estimated_fixed_bytes = 0;
  int64_t measured_fixed_bytes = 0;
  int64_t estimated_activation_bytes = 0; ///< held after forward and loss
  int64_t measured_activation_bytes = 0;
  int64_t estimated_peak_bytes = 0;       ///< total, fixed bytes included
  int64_t measured_peak_bytes = 0;

  /// (estimated - measured) / measured peak, in percent.
  double peak_error_percent() const;
  /// Every field, and peak_error_percent.
  nlohmann::json to_json() const;
};

/// The checks as a table (fixed, activation and peak bytes, estimated /
/// measured, and the peak's error), then one line saying whether every peak
/// is within `tolerance_percent` of the measured one.
std::string check_table(const std::vector<EstimateCheck>& checks, double tolerance_percent = 10);

/// Whether every check's peak is within `tolerance_percent` of its
/// measured peak.
bool checks_within(const std::vector<EstimateCheck>& checks, double tolerance_percent = 10);

/// Builds the model `spec` describes with remat::nn (BERT with head kNone,
/// whose loss is the mean of the last hidden state; Llama with head
/// kLanguageModel and next-token labels; LoRA adapters on the spec's
/// targets; fp32 or bf16-pure, the model cast to bf16; on the CPU), runs one
/// training step per policy and returns the estimates and measurements side
/// by side. Throws c10::Error naming the field for a spec it cannot run
/// (bf16-mixed precision, a CUDA backend, other heads). bf16 autocast is
/// not checked: the estimator does not model it.
std::vector<EstimateCheck> check_estimate(
    const plan::ModelSpec& spec,
    const std::vector<CheckpointPolicy>& policies,
    uint64_t seed = 0);

} // namespace nn
} // namespace remat
