// The text a finished training run prints (remat/train/summary.h).
#include "remat/train/summary.h"

#include "remat/device.h"
#include "remat/timing.h"
#include "remat/train/log.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <set>
#include <sstream>

namespace remat {
namespace train {

namespace {

std::string mib(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f MiB", static_cast<double>(bytes) / (1 << 20));
  return buf;
}

} // namespace

double median_step_seconds(const std::vector<StepRecord>& steps, size_t n) {
  std::vector<double> t;
  for (size_t i = 0; i < steps.size() && i < n; ++i) {
    t.push_back(steps[i].step_seconds);
  }
  return median(t);
}

int64_t max_peak_bytes(const std::vector<StepRecord>& steps, size_t n) {
  int64_t peak = 0;
  for (size_t i = 0; i < steps.size() && i < n; ++i) {
    peak = std::max(peak, steps[i].peak_bytes);
  }
  return peak;
}

// "budget:64MiB, per-shape: 9 plan shape(s), ...": what budget plans cost
// and how close the steps came to the budget.
static std::string budget_text(const std::vector<StepRecord>& steps, const TrainOptions& o) {
  std::set<std::string> shapes;
  double plan_seconds = 0, step_seconds = 0;
  int64_t peak = 0, predicted = 0, covered = 0;
  for (const auto& s : steps) {
    // A step's micro-batches may run under several plans, joined by " | ".
    for (size_t at = 0; at <= s.planned.size();) {
      const size_t bar = std::min(s.planned.find(" | ", at), s.planned.size());
      shapes.insert(s.planned.substr(at, bar - at));
      at = bar + 3;
    }
    plan_seconds += s.plan_seconds;
    step_seconds += s.step_seconds;
    covered += s.covered > 0 ? 1 : 0;
    peak = std::max(peak, s.peak_bytes);
    predicted = std::max(predicted, s.predicted_peak_bytes);
  }
  const double budget = static_cast<double>(o.policy().budget_bytes());
  char line[512];
  std::snprintf(line, sizeof(line),
                "%s, %s: %zu plan shape(s), %.2f s of planning (%.1f%% of the steps' %.1f s; "
                "%lld step(s) under a larger shape's plan); largest step peak %s = %.3f of "
                "the budget (largest predicted %s)\n",
                o.policy().name().c_str(), to_string(o.budget_plans()), shapes.size(),
                plan_seconds, step_seconds > 0 ? 100.0 * plan_seconds / step_seconds : 0.0,
                step_seconds, static_cast<long long>(covered), mib(peak).c_str(),
                budget > 0 ? peak / budget : 0.0, mib(predicted).c_str());
  return line;
}

std::string summary_text(const TrainResult& r, const TrainOptions& o) {
  std::ostringstream out;
  const auto& h = r.history;
  const size_t n = h.steps.size();
  double seconds = 0;
  int64_t tokens = 0;
  for (const auto& s : h.steps) {
    seconds += s.step_seconds;
    tokens += s.tokens;
  }
  char line[512];
  std::snprintf(line, sizeof(line),
                "remat train: %lld steps under %s on %s, %.1f s of steps (median %.4f s/step, "
                "%.0f tokens/s), peak %s\n",
                static_cast<long long>(r.steps), o.policy().name().c_str(),
                describe_device(parse_device(o.device())).c_str(), seconds,
                median_step_seconds(h.steps, n), seconds > 0 ? tokens / seconds : 0.0,
                mib(max_peak_bytes(h.steps, n)).c_str());
  out << line;
  if (o.policy().kind() == CheckpointPolicy::Kind::kBudget && n > 0) {
    out << budget_text(h.steps, o);
  }
  if (r.has_eval) {
    out << "validation: " << describe_eval(r.final_eval, h.label_names) << "\n";
  }
  if (!h.compare_steps.empty()) {
    const size_t k = h.compare_steps.size();
    out << "\ncomparison over the first " << k << " steps, same weights, data and seed:\n";
    std::snprintf(line, sizeof(line), "%-6s %16s %16s %12s\n", "step",
                  ("loss " + o.policy().name()).c_str(), ("loss " + h.compare_policy).c_str(),
                  "|diff|");
    out << line;
    for (const auto& s : h.steps) {
      if (!s.compare_loss) {
        continue;
      }
      std::snprintf(line, sizeof(line), "%-6lld %16.9g %16.9g %12.3g\n",
                    static_cast<long long>(s.step), s.loss, *s.compare_loss,
                    std::abs(s.loss - *s.compare_loss));
      out << line;
    }
    std::snprintf(line, sizeof(line),
                  "largest |loss difference|: %.3g\n"
                  "%-22s peak %12s, median step %.4f s\n"
                  "%-22s peak %12s, median step %.4f s\n",
                  h.max_compare_diff(), o.policy().name().c_str(),
                  mib(max_peak_bytes(h.steps, k)).c_str(), median_step_seconds(h.steps, k),
                  h.compare_policy.c_str(), mib(max_peak_bytes(h.compare_steps, k)).c_str(),
                  median_step_seconds(h.compare_steps, k));
    out << line;
  }
  return out.str();
}

// Rows per second of the whole run (all ranks), as the step timings give it.
std::string throughput_text(const TrainResult& r, const TrainOptions& o, int64_t world) {
  double seconds = 0;
  for (const auto& s : r.history.steps) {
    seconds += s.step_seconds;
  }
  const double rows = static_cast<double>(r.history.steps.size()) *
      static_cast<double>(o.model().batch() * o.accumulate());
  char line[256];
  if (world == 1) {
    std::snprintf(line, sizeof(line), "throughput: %.1f samples/s (batch %lld rows)\n",
                  seconds > 0 ? rows / seconds : 0.0,
                  static_cast<long long>(o.model().batch() * o.accumulate()));
    return line;
  }
  double in_backward = 0, total = 0;
  for (const auto& s : r.history.steps) {
    in_backward += static_cast<double>(s.reduced_in_backward_bytes);
    total += static_cast<double>(s.reduced_in_backward_bytes + s.reduced_after_backward_bytes);
  }
  std::snprintf(line, sizeof(line),
                "data parallel: %lld ranks, global batch %lld rows (%lld per rank), "
                "%.1f samples/s, %.0f%% of gradient bytes all-reduced during backward\n",
                static_cast<long long>(world), static_cast<long long>(o.model().batch() * o.accumulate()),
                static_cast<long long>((o.model().batch() * o.accumulate() + world - 1) / world),
                seconds > 0 ? rows / seconds : 0.0, total > 0 ? 100.0 * in_backward / total : 0.0);
  return line;
}

std::string rank_text(const TrainResult& result, int64_t rank, int64_t world) {
  char line[256];
  std::snprintf(line, sizeof(line), "remat train: rank %lld of %lld: %lld steps, peak %s\n",
                static_cast<long long>(rank), static_cast<long long>(world),
                static_cast<long long>(result.steps),
                mib(max_peak_bytes(result.history.steps, result.history.steps.size())).c_str());
  return line;
}

} // namespace train
} // namespace remat
