// A training run as one self-contained HTML page: loss curves, memory and
// time per step, the per-layer memory timeline of one step, evaluations and
// the policy comparison. Charts are inline SVG: the page needs no network,
// no script and no other file, so it can be mailed or attached to a ticket.
//
// Example:
//   // given: auto options = remat::train::TrainOptions().max_steps(100);
//   auto result = remat::train::run_training(options);
//   remat::train::write_report("run.html", result.history, options,
//                              "bert classifier, 4 layers");
#pragma once

#include "remat/train/trainer.h"

#include <string>

namespace remat {
namespace train {

/// The page for `history` of a run with `options`; `summary` is a line
/// describing the model and data (Trainer::summary()).
///
/// Each chart is an <svg class="chart" id="..."> whose series are
/// <polyline class="series" data-series="NAME" points="x,y ..."> in the
/// chart's pixel coordinates; ids: loss, memory, time, timeline.
std::string render_report(
    const History& history,
    const TrainOptions& options,
    const std::string& summary);

/// Writes render_report(...) to `path` atomically.
void write_report(
    const std::string& path,
    const History& history,
    const TrainOptions& options,
    const std::string& summary);

} // namespace train
} // namespace remat
