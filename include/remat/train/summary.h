// What a finished training run prints: the summary (steps, policy, device,
// time, tokens per second, peak bytes), the validation line, the loss
// comparison with --compare-policy, and the throughput (data parallel: the
// ranks and the share of gradient bytes all-reduced during backward).
// `remat train` prints these; the HTML page is remat/train/report.h.
//
// Example:
//   // given: auto options = remat::train::TrainOptions().max_steps(100);
//   auto result = remat::train::run_training(options);
//   std::cout << remat::train::summary_text(result, options)
//             << remat::train::throughput_text(result, options, /*world=*/1);
#pragma once

#include "remat/train/trainer.h"

#include <cstdint>
#include <string>
#include <vector>

namespace remat {
namespace train {

/// Seconds, the median step time of the first `n` steps (0 for none).
double median_step_seconds(const std::vector<StepRecord>& steps, size_t n);
/// Bytes, the largest peak of the first `n` steps.
int64_t max_peak_bytes(const std::vector<StepRecord>& steps, size_t n);

/// "remat train: 20 steps under every-layer on cpu, 3.1 s of steps (median
/// 0.1500 s/step, 2100 tokens/s), peak 41.3 MiB"; under budget:SIZE a line
/// with the plan shapes, the planning time and the largest peak over the
/// budget; then the validation and,
/// when the run compared policies, the per-step loss table and both
/// policies' peaks and median steps. Lines end in "\n".
std::string summary_text(const TrainResult& result, const TrainOptions& options);

/// "throughput: ... samples/s (batch N rows)" alone, or with `world` > 1
/// "data parallel: N ranks, global batch ..., % of gradient bytes
/// all-reduced during backward". One line.
std::string throughput_text(const TrainResult& result, const TrainOptions& options, int64_t world);

/// "remat train: rank R of W: N steps, peak X MiB": what a rank other than
/// 0 says of its share. One line.
std::string rank_text(const TrainResult& result, int64_t rank, int64_t world);

} // namespace train
} // namespace remat
