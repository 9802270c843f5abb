// Schedules compared on one cost chain: every fixed policy (each schedule
// once, its other names kept as aliases) and the fastest plan under each
// memory budget, with what the chain predicts for each and, once measured,
// what a real step held and took. `remat plan` is flags, the measurement and
// printing over this; the text and JSON it prints are made here.
//
// Budgets are total bytes as remat::memory counts them (weights, gradients,
// batch, activations), or a percentage of the peak predicted without
// checkpointing.
//
// Example:
//   // given: auto spec = remat::plan::ModelSpec::llama2_7b().seq(4096);
//   auto chain = remat::plan::estimate_chain(spec);
//   auto c = remat::plan::compare_schedules(chain,
//       {remat::plan::parse_budget("50%"), remat::plan::parse_budget("2GiB")});
//   for (const auto& e : c.refused) std::cerr << e << "\n";  // too small
//   std::cout << c.budgets_text() << c.table();
#pragma once

#include "remat/plan/chain.h"
#include "remat/plan/solver.h"
#include "remat/policy.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace remat {
namespace plan {

/// A memory budget as given: a size, or a percentage of the peak predicted
/// without checkpointing.
struct Budget {
  std::string text;     ///< as given: "50%", "2GiB"
  bool percent = false;
  double value = 0;     ///< the percentage, or bytes
  int64_t bytes = 0;    ///< bytes, once resolved against a chain
};

/// Parses "50%" (a percentage above 0) or a size ("2GiB", "512MiB", bytes;
/// remat::memory::parse_size). Throws c10::Error naming the text.
Budget parse_budget(const std::string& text);

/// A schedule to report: a fixed policy or a plan.
struct ScheduleCandidate {
  std::string name;       ///< "every-2", "plan@50%"
  std::string aliases;    ///< other policies with the same schedule
  Schedule schedule;      ///< empty: a plan whose budget is infeasible
  bool planned = false;
  Evaluation predicted;
  bool measured = false;
  bool ok = true;         ///< false: infeasible, or its measurement failed
  std::string error;
  int64_t peak_bytes = 0;     ///< bytes, the largest measured peak
  double step_seconds = 0;    ///< seconds, median of `times`
  std::vector<double> times;  ///< seconds, one per timed step

  /// Its JSON record (predicted_*, and measured_* once measured).
  nlohmann::json to_json() const;
};

/// The fixed policies and the plans of one chain.
struct ScheduleComparison {
  Chain chain;
  Evaluation none;                 ///< predicted without checkpointing
  int64_t min_budget_bytes = 0;    ///< the smallest feasible budget, bytes
  std::vector<Budget> budgets;     ///< bytes resolved
  std::vector<ScheduleCandidate> fixed; ///< "none" first
  std::vector<ScheduleCandidate> plans; ///< one per budget
  /// One line per budget below min_budget_bytes, "--budget: expected ...".
  std::vector<std::string> refused;

  /// What a measurement has to run: every fixed policy, and each feasible
  /// plan whose schedule is not a fixed policy's (that one shares the fixed
  /// policy's measurement, see finish_measurements).
  std::vector<ScheduleCandidate*> to_measure();
  /// Sets each step_seconds to the median of its times, and copies a fixed
  /// policy's measurement to the plans with the same schedule.
  void finish_measurements();

  /// The header lines: predicted peak without checkpointing and the
  /// smallest feasible budget.
  std::string summary_text() const;
  /// Each budget: its plan stage by stage, predicted (and measured) peak and
  /// step, and the fastest fixed policy that fits it when measured.
  std::string budgets_text() const;
  /// Every schedule side by side, and which budgets it fits (measured when
  /// measured, else predicted).
  std::string table() const;
  nlohmann::json budgets_json() const;
  nlohmann::json policies_json() const;
  /// True once to_measure()'s candidates have been measured.
  bool measured = false;
};

/// Evaluates every fixed policy on `chain` and plans it to each budget
/// (a percentage resolved against the peak without checkpointing). A budget
/// below the smallest feasible one is kept, not planned, and named in
/// `refused`.
ScheduleComparison compare_schedules(
    const Chain& chain,
    std::vector<Budget> budgets,
    const PlannerOptions& options = {});

} // namespace plan
} // namespace remat
