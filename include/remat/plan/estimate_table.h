// The estimator's answers for several policies of one model, side by side:
// what `remat estimate` prints and writes. Each row is remat::plan::estimate
// under one policy (and, with a device size, the largest batch or sequence
// that fits it); the text and JSON are made here, the command only prints.
//
// Example:
//   auto t = remat::plan::estimate_table(
//       remat::plan::ModelSpec::llama2_7b()
//           .precision(remat::plan::Precision::kBf16Mixed),
//       {remat::CheckpointPolicy::none(),
//        remat::CheckpointPolicy::every_layer()},
//       remat::plan::EstimateTableOptions()
//           .fit_bytes(int64_t(80) << 30));  // 80 GiB
//   std::cout << remat::plan::describe(t.spec) << "\n"
//             << t.summary_text() << t.str();
#pragma once

#include "remat/plan/estimate.h"
#include "remat/policy.h"

#include <nlohmann/json.hpp>
#include <torch/arg.h>

#include <cstdint>
#include <string>
#include <vector>

namespace remat {
namespace plan {

/// "llama, 32 layers, hidden 4096, 32 heads (32 kv), intermediate 11008,
/// vocab 32000, seq 4096, batch 1, bf16-mixed, eager attention, AdamW, head
/// lm, dropout off, cpu[, LoRA rank 16 on q,v]": the spec in one line.
std::string describe(const ModelSpec& spec);

/// The spec as a JSON object (family, sizes, precision, attention,
/// optimizer, head, dropout, backend, LoRA).
nlohmann::json spec_json(const ModelSpec& spec);

/// What a table adds to the estimates.
struct EstimateTableOptions {
  /// Device bytes: each row also gives the largest batch (or sequence) that
  /// fits them; 0: no fit column.
  TORCH_ARG(int64_t, fit_bytes) = 0;
  /// The fit is the sequence length instead of the batch.
  TORCH_ARG(bool, fit_seq) = false;
  /// With fit_seq: sequences in steps of this many tokens.
  TORCH_ARG(int64_t, seq_multiple) = 1;
};

/// One policy's estimate.
struct EstimateRow {
  std::string policy;
  bool ok = true;
  std::string error;   ///< one line, when the estimator refused the policy
  Estimate estimate;
  int64_t fit = -1;    ///< the largest batch or sequence; -1: not asked
};

/// The estimates of one spec under several policies.
struct EstimateTable {
  explicit EstimateTable(ModelSpec s) : spec(std::move(s)) {}
  ModelSpec spec;
  EstimateTableOptions options;
  Estimate none;                 ///< under no checkpointing, the reference
  std::vector<EstimateRow> rows;

  /// Parameters, weights, gradients, optimizer state and inputs (bytes for
  /// people), one line, then a blank one.
  std::string summary_text() const;
  /// The rows (activations, activations at the peak, peak, step FLOPs
  /// against none, the fit, where the peak is) and what the columns mean.
  std::string str() const;
  /// One object per row: bytes as integers, step_flops_relative_to_none.
  nlohmann::json rows_json() const;
};

/// Estimates `spec` under each policy. A policy the estimator refuses (a
/// budget below what fits) is a row with its error, not a throw.
EstimateTable estimate_table(
    const ModelSpec& spec,
    const std::vector<CheckpointPolicy>& policies,
    const EstimateTableOptions& options = {});

} // namespace plan
} // namespace remat
