// compare_schedules: the fixed policies and the plans of one chain, and the
// text `remat plan` prints about them.
#include "remat/plan/compare.h"

#include "remat/memory.h"
#include "remat/timing.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <sstream>

namespace remat {
namespace plan {
namespace {

std::string seconds_cell(double s) {
  char b[32];
  std::snprintf(b, sizeof(b), "%.3f", s);
  return b;
}

std::string ratio_cell(double a, double b) {
  if (b <= 0) {
    return "-";
  }
  char c[32];
  std::snprintf(c, sizeof(c), "%.2fx", a / b);
  return c;
}

std::string bytes_text(int64_t bytes) {
  return memory::format_size(bytes) + " (" + std::to_string(bytes) + " bytes)";
}

// none's measured median; 0 when not measured.
double none_seconds(const ScheduleComparison& c) {
  const auto& none = c.fixed.front();
  return c.measured && none.ok ? none.step_seconds : 0;
}

// The fixed policy with the shortest measured step among those measured at
// a peak of at most `bytes`; null when none was.
const ScheduleCandidate* fastest_measured_within(
    const std::vector<ScheduleCandidate>& fixed,
    int64_t bytes) {
  const ScheduleCandidate* best = nullptr;
  for (const auto& fc : fixed) {
    if (fc.ok && fc.measured && fc.peak_bytes <= bytes &&
        (!best || fc.step_seconds < best->step_seconds)) {
      best = &fc;
    }
  }
  return best;
}

} // namespace

Budget parse_budget(const std::string& text) {
  Budget b;
  b.text = text;
  if (!text.empty() && text.back() == '%') {
    const std::string number = text.substr(0, text.size() - 1);
    char* end = nullptr;
    b.value = std::strtod(number.c_str(), &end);
    TORCH_CHECK(
        !number.empty() && end == number.c_str() + number.size() && b.value > 0 &&
            std::isfinite(b.value),
        "expected a percentage above 0 such as 50%, but got '", text, "'");
    b.percent = true;
    return b;
  }
  const int64_t bytes = memory::parse_size(text);
  TORCH_CHECK(bytes > 0, "expected a size above 0, but got '", text, "'");
  b.value = static_cast<double>(bytes);
  return b;
}

nlohmann::json ScheduleCandidate::to_json() const {
  nlohmann::json j{{"name", name},
                   {"schedule", schedule.str()},
                   {"predicted_peak_bytes", predicted.peak_bytes},
                   {"predicted_step_seconds", predicted.step_seconds},
                   {"predicted_activation_bytes", predicted.activation_bytes},
                   {"predicted_peak_event", predicted.peak_event}};
  if (!aliases.empty()) {
    j["same_schedule_as"] = aliases;
  }
  if (measured) {
    j["measured_ok"] = ok;
    j["measured_peak_bytes"] = peak_bytes;
    if (ok) {
      j["measured_step_seconds"] = step_seconds;
      j["measured_step_seconds_all"] = times;
    } else {
      j["error"] = error;
    }
  }
  return j;
}

namespace {

// Whether every layer offers the mode its segment asks for.
bool offers(const Chain& chain, const Schedule& schedule) {
  const int64_t first = chain.first_layer();
  for (const auto& seg : schedule.segments) {
    if (seg.mode == SegmentMode::kStore || seg.mode == SegmentMode::kRecompute) {
      continue;
    }
    for (int64_t l = seg.begin; l < seg.end; ++l) {
      if (!chain.stages[first + l].selective(seg.mode)) {
        return false;
      }
    }
  }
  return true;
}

} // namespace

ScheduleComparison compare_schedules(
    const Chain& chain,
    std::vector<Budget> budgets,
    const PlannerOptions& options) {
  TORCH_CHECK(!budgets.empty(), "remat::plan::compare_schedules: expected at least one budget, "
              "but got none");
  ScheduleComparison c;
  c.chain = chain;
  const int64_t layers = chain.num_layers();
  c.none = evaluate(chain, CheckpointPolicy::none().schedule(layers));
  c.min_budget_bytes = min_feasible_budget(chain, options);

  // The fixed policies, each schedule once.
  std::map<std::string, size_t> by_schedule;
  for (const auto& [name, schedule] : fixed_policy_schedules(layers)) {
    if (!offers(chain, schedule)) {
      continue; // a per-op mode on an estimated chain
    }
    auto it = by_schedule.find(schedule.str());
    if (it != by_schedule.end()) {
      auto& a = c.fixed[it->second].aliases;
      a += (a.empty() ? "" : ", ") + name;
      continue;
    }
    ScheduleCandidate cand;
    cand.name = name;
    cand.schedule = schedule;
    cand.predicted = evaluate(chain, schedule);
    by_schedule[schedule.str()] = c.fixed.size();
    c.fixed.push_back(cand);
  }

  // The plans.
  c.plans.resize(budgets.size());
  for (size_t k = 0; k < budgets.size(); ++k) {
    auto& b = budgets[k];
    b.bytes = b.percent
        ? static_cast<int64_t>(static_cast<double>(c.none.peak_bytes) * b.value / 100.0)
        : static_cast<int64_t>(b.value);
    auto& cand = c.plans[k];
    cand.name = "plan@" + b.text;
    cand.planned = true;
    if (b.bytes < c.min_budget_bytes) {
      cand.ok = false;
      cand.error = "below the smallest feasible budget, " + bytes_text(c.min_budget_bytes);
      c.refused.push_back("--budget: expected at least the smallest feasible budget, " +
                          bytes_text(c.min_budget_bytes) + ", but got " + b.text + " (" +
                          std::to_string(b.bytes) + " bytes)");
      continue;
    }
    const auto p = solve(chain, b.bytes, options);
    cand.schedule = p.schedule;
    cand.predicted = evaluate(chain, p.schedule);
    auto it = by_schedule.find(p.schedule.str());
    if (it != by_schedule.end()) {
      cand.aliases = c.fixed[it->second].name;
    }
  }
  c.budgets = std::move(budgets);
  return c;
}

std::vector<ScheduleCandidate*> ScheduleComparison::to_measure() {
  std::vector<ScheduleCandidate*> todo;
  for (auto& cand : fixed) {
    todo.push_back(&cand);
  }
  for (auto& cand : plans) {
    // A plan whose schedule is a fixed policy's is the same program: it
    // shares that measurement rather than adding noise of its own.
    if (cand.ok && cand.aliases.empty()) {
      todo.push_back(&cand);
    }
  }
  return todo;
}

void ScheduleComparison::finish_measurements() {
  measured = true;
  for (auto* cand : to_measure()) {
    cand->step_seconds = median(cand->times);
  }
  for (auto& cand : plans) {
    if (!cand.ok || cand.aliases.empty()) {
      continue;
    }
    for (const auto& same : fixed) {
      if (same.schedule.str() == cand.schedule.str()) {
        cand.measured = same.measured;
        cand.ok = same.ok;
        cand.error = same.error;
        cand.peak_bytes = same.peak_bytes;
        cand.step_seconds = same.step_seconds;
        cand.times = same.times;
      }
    }
  }
}

std::string ScheduleComparison::summary_text() const {
  char line[512];
  std::ostringstream out;
  std::snprintf(line, sizeof(line), "predicted without checkpointing: peak %s (%lld bytes), "
                "step %.3f s\n", memory::format_size(none.peak_bytes).c_str(),
                static_cast<long long>(none.peak_bytes), none.step_seconds);
  out << line;
  std::snprintf(line, sizeof(line), "smallest feasible budget: %s (%lld bytes, %.1f%% of that "
                "peak)\n\n", memory::format_size(min_budget_bytes).c_str(),
                static_cast<long long>(min_budget_bytes),
                100.0 * static_cast<double>(min_budget_bytes) /
                    static_cast<double>(none.peak_bytes));
  out << line;
  return out.str();
}

std::string ScheduleComparison::budgets_text() const {
  const double none_s = none_seconds(*this);
  std::ostringstream out;
  char line[1024];
  for (size_t k = 0; k < budgets.size(); ++k) {
    const auto& b = budgets[k];
    const auto& cand = plans[k];
    std::snprintf(line, sizeof(line), "budget %s = %s (%lld bytes)", b.text.c_str(),
                  memory::format_size(b.bytes).c_str(), static_cast<long long>(b.bytes));
    out << line;
    if (cand.schedule.segments.empty()) {
      out << ": " << cand.error << "; not planned\n\n";
      continue;
    }
    out << ": " << cand.schedule.str()
        << (cand.aliases.empty() ? "" : " (the schedule of " + cand.aliases + ")") << "\n";
    for (const auto& l : describe_schedule(chain, cand.schedule)) {
      out << l << "\n";
    }
    std::snprintf(line, sizeof(line), "  predicted: peak %s, step %.3f s (%s none's); peak at %s\n",
                  memory::format_size(cand.predicted.peak_bytes).c_str(),
                  cand.predicted.step_seconds,
                  ratio_cell(cand.predicted.step_seconds, none.step_seconds).c_str(),
                  cand.predicted.peak_event.c_str());
    out << line;
    if (cand.measured && cand.ok) {
      std::snprintf(line, sizeof(line),
                    "  measured:  peak %s (%s the budget), step %.3f s (%s none's)\n",
                    memory::format_size(cand.peak_bytes).c_str(),
                    cand.peak_bytes <= b.bytes ? "within" : "ABOVE", cand.step_seconds,
                    ratio_cell(cand.step_seconds, none_s).c_str());
      out << line;
      const ScheduleCandidate* best = fastest_measured_within(fixed, b.bytes);
      if (best != nullptr) {
        std::snprintf(line, sizeof(line),
                      "  fastest fixed policy within the budget (measured): %s, peak %s, step "
                      "%.3f s (%s none's); the plan takes %s its time\n",
                      best->name.c_str(), memory::format_size(best->peak_bytes).c_str(),
                      best->step_seconds, ratio_cell(best->step_seconds, none_s).c_str(),
                      ratio_cell(cand.step_seconds, best->step_seconds).c_str());
        out << line;
      } else {
        out << "  no fixed policy fits this budget (measured)\n";
      }
    } else if (cand.measured) {
      out << "  measured: failed: " << cand.error << "\n";
    }
    out << "\n";
  }
  return out.str();
}

nlohmann::json ScheduleComparison::budgets_json() const {
  nlohmann::json out = nlohmann::json::array();
  for (size_t k = 0; k < budgets.size(); ++k) {
    const auto& b = budgets[k];
    const auto& cand = plans[k];
    nlohmann::json bj{{"budget", b.text}, {"budget_bytes", b.bytes}};
    if (cand.schedule.segments.empty()) {
      bj["feasible"] = false;
      bj["error"] = cand.error;
      out.push_back(bj);
      continue;
    }
    bj["feasible"] = true;
    bj["plan"] = cand.to_json();
    if (cand.measured && cand.ok) {
      const ScheduleCandidate* best = fastest_measured_within(fixed, b.bytes);
      if (best != nullptr) {
        bj["best_fixed_policy"] = best->name;
        bj["best_fixed_peak_bytes"] = best->peak_bytes;
        bj["best_fixed_step_seconds"] = best->step_seconds;
      } else {
        bj["best_fixed_policy"] = nullptr;
      }
    }
    out.push_back(bj);
  }
  return out;
}

nlohmann::json ScheduleComparison::policies_json() const {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& cand : fixed) {
    out.push_back(cand.to_json());
  }
  return out;
}

std::string ScheduleComparison::table() const {
  const double none_s = none_seconds(*this);
  std::ostringstream out;
  char line[512];
  std::snprintf(line, sizeof(line), "%-22s %-44s %11s %9s", "policy", "schedule", "pred peak",
                "pred(s)");
  out << line;
  if (measured) {
    std::snprintf(line, sizeof(line), " %11s %9s %8s %9s", "meas peak", "meas(s)", "vs none",
                  "pred/meas");
    out << line;
  }
  out << "  fits\n";
  auto row = [&](const ScheduleCandidate& cand) {
    std::string sched = cand.schedule.str();
    if (sched.size() > 44) {
      sched = sched.substr(0, 41) + "...";
    }
    std::string name = cand.name;
    if (!cand.aliases.empty() && !cand.planned) {
      name += " (" + cand.aliases + ")";
    }
    std::snprintf(line, sizeof(line), "%-22s %-44s %11s %9s", name.c_str(), sched.c_str(),
                  memory::format_size(cand.predicted.peak_bytes).c_str(),
                  seconds_cell(cand.predicted.step_seconds).c_str());
    out << line;
    if (measured) {
      if (cand.ok && cand.measured) {
        std::snprintf(line, sizeof(line), " %11s %9s %8s %9s",
                      memory::format_size(cand.peak_bytes).c_str(),
                      seconds_cell(cand.step_seconds).c_str(),
                      ratio_cell(cand.step_seconds, none_s).c_str(),
                      ratio_cell(cand.predicted.step_seconds, cand.step_seconds).c_str());
      } else {
        std::snprintf(line, sizeof(line), " %11s %9s", "-", "failed");
      }
      out << line;
    }
    std::string fits;
    const int64_t peak =
        measured && cand.measured && cand.ok ? cand.peak_bytes : cand.predicted.peak_bytes;
    for (const auto& b : budgets) {
      if (peak <= b.bytes) {
        fits += (fits.empty() ? "" : ",") + b.text;
      }
    }
    out << "  " << (fits.empty() ? "-" : fits) << "\n";
  };
  for (const auto& cand : fixed) {
    row(cand);
  }
  for (const auto& cand : plans) {
    if (!cand.schedule.segments.empty()) {
      row(cand);
    }
  }
  if (measured) {
    out << "\npred/meas: predicted over measured step time. Peaks are total bytes "
           "(weights, gradients, batch, activations) as remat's allocator counts them.\n";
  }
  return out.str();
}

} // namespace plan
} // namespace remat
