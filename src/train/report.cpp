#include "remat/train/report.h"

#include "remat/io/file.h"
#include "remat/memory.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

namespace remat {
namespace train {

namespace {

std::string escape(const std::string& text) {
  std::string out;
  for (char c : text) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string num(double v, const char* format = "%.4g") {
  if (!std::isfinite(v)) {
    return "-";
  }
  char buf[48];
  std::snprintf(buf, sizeof(buf), format, v);
  return buf;
}

double mib(int64_t bytes) {
  return static_cast<double>(bytes) / (1 << 20);
}

struct Series {
  Series(std::string name_, std::string color_)
      : name(std::move(name_)), color(std::move(color_)) {}
  std::string name;
  std::string color;
  std::vector<std::pair<double, double>> points;
  std::vector<std::string> tips; ///< per point, optional
  bool dashed = false;
  bool markers = false;
};

// A step of 1, 2 or 5 times a power of ten giving about `count` ticks.
double nice_step(double span, int count) {
  if (span <= 0) {
    return 1;
  }
  const double raw = span / count;
  const double p = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0, 10.0}) {
    if (m * p >= raw) {
      return m * p;
    }
  }
  return 10 * p;
}

// A line chart's SVG box, the data ranges it shows and the map between them.
struct Frame {
  // Width and height; the margins left, right, top and bottom of the plot.
  static constexpr double W = 760, H = 300, L = 72, R = 16, T = 34, B = 46;
  double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
  double xstep = 0, ystep = 0; ///< between ticks, in data units

  double px(double x) const {
    return L + (x - x0) / (x1 - x0) * (W - L - R);
  }
  double py(double y) const {
    return H - B - (y - y0) / (y1 - y0) * (H - T - B);
  }
};

// The series with at least one finite point, widening `f`'s ranges to hold
// every finite point.
std::vector<const Series*> plotted_series(
    const std::vector<Series>& all_series,
    Frame& f) {
  std::vector<const Series*> series;
  for (const auto& s : all_series) {
    bool any = false;
    for (const auto& p : s.points) {
      if (!std::isfinite(p.first) || !std::isfinite(p.second)) {
        continue;
      }
      any = true;
      f.x0 = std::min(f.x0, p.first);
      f.x1 = std::max(f.x1, p.first);
      f.y0 = std::min(f.y0, p.second);
      f.y1 = std::max(f.y1, p.second);
    }
    if (any) {
      series.push_back(&s);
    }
  }
  return series;
}

// Gives `f`'s data ranges a nonzero span, rounds the y range out to whole
// ticks, and picks the tick steps.
void fit_frame(Frame& f) {
  if (f.x1 <= f.x0) {
    f.x1 = f.x0 + 1;
  }
  if (f.y1 <= f.y0) {
    const double pad = std::max(std::abs(f.y0) * 0.05, 1e-9);
    f.y0 -= pad;
    f.y1 += pad;
  }
  f.ystep = nice_step(f.y1 - f.y0, 5);
  f.y0 = std::floor(f.y0 / f.ystep) * f.ystep;
  f.y1 = std::ceil(f.y1 / f.ystep) * f.ystep;
  f.xstep = nice_step(f.x1 - f.x0, 8);
}

// Writes the grid, the ticks, the axes and their labels.
void draw_axes(
    std::ostream& out,
    const Frame& f,
    const std::string& x_label,
    const std::string& y_label) {
  for (double y = f.y0; y <= f.y1 + f.ystep * 0.5; y += f.ystep) {
    out << "<line class=\"grid\" x1=\"" << f.L << "\" x2=\"" << f.W - f.R
        << "\" y1=\"" << num(f.py(y), "%.1f") << "\" y2=\"" << num(f.py(y), "%.1f")
        << "\"/>" << "<text class=\"tick\" x=\"" << f.L - 6 << "\" y=\""
        << num(f.py(y) + 4, "%.1f") << "\" text-anchor=\"end\">" << num(y, "%.4g")
        << "</text>\n";
  }
  for (double x = std::ceil(f.x0 / f.xstep) * f.xstep;
       x <= f.x1 + f.xstep * 0.01; x += f.xstep) {
    out << "<text class=\"tick\" x=\"" << num(f.px(x), "%.1f") << "\" y=\""
        << f.H - f.B + 16 << "\" text-anchor=\"middle\">" << num(x, "%.6g")
        << "</text>\n";
  }
  out << "<line class=\"axis\" x1=\"" << f.L << "\" y1=\"" << f.H - f.B
      << "\" x2=\"" << f.W - f.R << "\" y2=\"" << f.H - f.B
      << "\"/><line class=\"axis\" x1=\"" << f.L << "\" y1=\"" << f.T
      << "\" x2=\"" << f.L << "\" y2=\"" << f.H - f.B << "\"/>\n";
  out << "<text class=\"label\" x=\"" << (f.L + f.W - f.R) / 2 << "\" y=\""
      << f.H - 8 << "\" text-anchor=\"middle\">" << escape(x_label)
      << "</text>\n";
  out << "<text class=\"label\" transform=\"translate(16,"
      << (f.T + f.H - f.B) / 2 << ") rotate(-90)\" text-anchor=\"middle\">"
      << escape(y_label) << "</text>\n";
}

// Writes one series' line through its finite points, and a circle with a
// tooltip on each when it has markers or tips.
void draw_series(std::ostream& out, const Frame& f, const Series& s) {
  out << "<polyline class=\"series\" data-series=\"" << escape(s.name)
      << "\" fill=\"none\" stroke=\"" << s.color << "\" stroke-width=\"1.8\""
      << (s.dashed ? " stroke-dasharray=\"6 4\"" : "") << " points=\"";
  bool first = true;
  for (const auto& p : s.points) {
    if (std::isfinite(p.first) && std::isfinite(p.second)) {
      out << (first ? "" : " ") << num(f.px(p.first), "%.1f") << ","
          << num(f.py(p.second), "%.1f");
      first = false;
    }
  }
  out << "\"/>\n";
  if (!s.markers && s.tips.empty()) {
    return;
  }
  for (size_t i = 0; i < s.points.size(); ++i) {
    const auto& p = s.points[i];
    if (!std::isfinite(p.first) || !std::isfinite(p.second)) {
      continue;
    }
    out << "<circle cx=\"" << num(f.px(p.first), "%.1f") << "\" cy=\""
        << num(f.py(p.second), "%.1f") << "\" r=\"" << (s.markers ? 3.5 : 2.2)
        << "\" fill=\"" << s.color << "\"><title>"
        << escape(i < s.tips.size() ? s.tips[i]
                                    : s.name + ": " + num(p.second))
        << "</title></circle>\n";
  }
}

// Writes the legend, one swatch and name per series, left to right.
void draw_legend(std::ostream& out, const std::vector<const Series*>& series) {
  double lx = Frame::L + 10;
  for (const auto* s : series) {
    out << "<rect x=\"" << lx << "\" y=\"" << 10 << "\" width=\"14\" height=\"4\" fill=\""
        << s->color << "\"/><text class=\"legend\" x=\"" << lx + 18 << "\" y=\"" << 16
        << "\">" << escape(s->name) << "</text>\n";
    lx += 30 + 7.0 * static_cast<double>(s->name.size());
  }
}

std::string line_chart(
    const std::string& id,
    const std::string& title,
    const std::string& x_label,
    const std::string& y_label,
    const std::vector<Series>& all_series) {
  Frame f;
  const auto series = plotted_series(all_series, f);
  std::ostringstream out;
  out << "<figure><figcaption>" << escape(title) << "</figcaption>\n";
  if (series.empty()) {
    out << "<p class=\"empty\">no data</p></figure>\n";
    return out.str();
  }
  fit_frame(f);

  out << "<svg class=\"chart\" id=\"" << id << "\" viewBox=\"0 0 " << f.W << " "
      << f.H << "\" role=\"img\" aria-label=\"" << escape(title) << "\">\n";
  draw_axes(out, f, x_label, y_label);
  // Series, then the legend.
  for (const auto* s : series) {
    draw_series(out, f, *s);
  }
  draw_legend(out, series);
  out << "</svg></figure>\n";
  return out.str();
}

const char* kMain = "#1f6feb";
const char* kCompare = "#d9480f";
const char* kEval = "#2b8a3e";

std::string table(
    const std::vector<std::string>& header,
    const std::vector<std::vector<std::string>>& rows) {
  std::ostringstream out;
  out << "<table><thead><tr>";
  for (const auto& h : header) {
    out << "<th>" << escape(h) << "</th>";
  }
  out << "</tr></thead><tbody>\n";
  for (const auto& row : rows) {
    out << "<tr>";
    for (const auto& c : row) {
      out << "<td>" << escape(c) << "</td>";
    }
    out << "</tr>\n";
  }
  out << "</tbody></table>\n";
  return out.str();
}

double median_seconds(const std::vector<StepRecord>& steps, size_t limit) {
  std::vector<double> t;
  for (size_t i = 0; i < steps.size() && i < limit; ++i) {
    t.push_back(steps[i].step_seconds);
  }
  if (t.empty()) {
    return NAN;
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int64_t max_peak(const std::vector<StepRecord>& steps, size_t limit) {
  int64_t peak = 0;
  for (size_t i = 0; i < steps.size() && i < limit; ++i) {
    peak = std::max(peak, steps[i].peak_bytes);
  }
  return peak;
}

// What every section of the report reads.
struct Report {
  const History& h;
  const TrainOptions& options;
  std::string main_name; ///< the run's policy
  std::string cmp_name;  ///< the comparison's, when there is one
  bool compared = false;
  bool classification = false;
};

void write_head(std::ostream& out, const Report& r, const std::string& summary) {
  out << "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
      << "<title>remat train: " << escape(to_string(r.options.task())) << ", "
      << escape(r.main_name) << "</title>\n<style>\n"
      << "body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:820px;"
         "color:#1b1f24}\n"
      << "h1{font-size:22px}h2{font-size:17px;margin-top:28px}\n"
      << "figure{margin:12px 0}figcaption{font-weight:600;margin-bottom:4px}\n"
      << "svg.chart{width:100%;height:auto;background:#fbfbfc;border:1px solid #e3e6ea}\n"
      << ".grid{stroke:#e6e8eb}.axis{stroke:#5b636d}.tick,.legend{font-size:11px;"
         "fill:#444}.label{font-size:12px;fill:#222}\n"
      << "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #d6d9dd;"
         "padding:2px 8px;text-align:right}th{background:#f1f3f5}\n"
      << "code{font-size:12px}.summary{font-family:monospace;font-size:12px;"
         "white-space:pre-wrap}\n</style></head><body>\n";
  out << "<h1>remat train: " << escape(to_string(r.options.task())) << " under "
      << escape(r.main_name) << "</h1>\n<p class=\"summary\">" << escape(summary) << "</p>\n";
}

// The headline figures of the run and its comparison, and the final scores.
void write_figures(std::ostream& out, const Report& r) {
  const auto& h = r.h;
  std::vector<std::vector<std::string>> figures;
  if (!h.steps.empty()) {
    auto med = median_seconds(h.steps, h.steps.size());
    figures.push_back({r.main_name, std::to_string(h.steps.size()),
                       memory::format_size(max_peak(h.steps, h.steps.size())),
                       num(med, "%.4f"), num(h.steps.back().loss)});
  }
  if (r.compared) {
    const size_t n = h.compare_steps.size();
    figures.push_back({r.cmp_name + " (comparison)", std::to_string(n),
                       memory::format_size(max_peak(h.compare_steps, n)),
                       num(median_seconds(h.compare_steps, n), "%.4f"),
                       num(h.compare_steps.back().loss)});
    figures.push_back({r.main_name + " (same steps)", std::to_string(std::min(n, h.steps.size())),
                       memory::format_size(max_peak(h.steps, n)),
                       num(median_seconds(h.steps, n), "%.4f"),
                       h.steps.size() >= n ? num(h.steps[n - 1].loss) : "-"});
  }
  out << "<h2>Figures</h2>\n"
      << table({"policy", "steps", "peak memory", "median step (s)", "last loss"}, figures);
  if (r.compared) {
    out << "<p>Largest |loss difference| per step, " << escape(r.main_name) << " vs "
        << escape(r.cmp_name) << ": <b id=\"max-loss-diff\">"
        << num(h.max_compare_diff(), "%.3g") << "</b></p>\n";
  }
  if (!h.evals.empty()) {
    const auto& e = h.evals.back();
    out << "<p>Final validation (step " << e.step << "): loss " << num(e.loss);
    if (r.classification) {
      out << ", macro-F1 <b>" << num(e.macro_f1, "%.4f") << "</b>, micro-F1 "
          << num(e.micro_f1, "%.4f");
    } else {
      out << ", perplexity <b>" << num(e.perplexity, "%.4g") << "</b>";
    }
    out << "</p>\n";
  }
}

void write_loss(std::ostream& out, const Report& r) {
  const auto& h = r.h;
  std::vector<Series> loss;
  Series train{r.main_name + " train loss", kMain};
  for (const auto& s : h.steps) {
    train.points.emplace_back(static_cast<double>(s.step), s.loss);
  }
  loss.push_back(train);
  if (r.compared) {
    Series c{r.cmp_name + " train loss", kCompare};
    c.dashed = true;
    for (const auto& s : h.compare_steps) {
      c.points.emplace_back(static_cast<double>(s.step), s.loss);
    }
    loss.push_back(c);
  }
  if (!h.evals.empty()) {
    Series v{"validation loss", kEval};
    v.markers = true;
    for (const auto& e : h.evals) {
      v.points.emplace_back(static_cast<double>(e.step), e.loss);
    }
    loss.push_back(v);
  }
  out << "<h2>Loss</h2>\n" << line_chart("loss", "Loss per step", "step", "loss", loss);
}

// Peak memory and step time per step, the comparison's beside; under a
// budget, the plans' predicted peaks too.
void write_memory_and_time(std::ostream& out, const Report& r) {
  const auto& h = r.h;
  auto per_step = [&](const char* id, const char* title, const char* unit, auto value,
                      bool predicted) {
    std::vector<Series> s;
    Series a{r.main_name, kMain};
    Series plan{"predicted by the plan", kEval};
    plan.dashed = true;
    for (const auto& step : h.steps) {
      a.points.emplace_back(static_cast<double>(step.step), value(step));
      if (predicted && step.predicted_peak_bytes > 0) {
        plan.points.emplace_back(static_cast<double>(step.step), mib(step.predicted_peak_bytes));
      }
    }
    s.push_back(a);
    if (!plan.points.empty()) {
      s.push_back(plan);
    }
    if (r.compared) {
      Series b{r.cmp_name, kCompare};
      b.dashed = true;
      for (const auto& step : h.compare_steps) {
        b.points.emplace_back(static_cast<double>(step.step), value(step));
      }
      s.push_back(b);
    }
    return line_chart(id, title, "step", unit, s);
  };
  out << "<h2>Memory and time</h2>\n"
      << per_step("memory", "Peak memory per step (weights, gradients, optimizer state "
                            "and activations)", "MiB",
                  [](const StepRecord& step) { return mib(step.peak_bytes); }, true)
      << per_step("time", "Step time (forward, backward, optimizer)", "seconds",
                  [](const StepRecord& step) { return step.step_seconds; }, false);
}

// Bytes held through one instrumented step, event by event, per policy.
void write_timeline(std::ostream& out, const Report& r) {
  const auto& h = r.h;
  const auto& main_name = r.main_name;
  out << "<h2>Memory through one step, layer by layer</h2>\n"
      << "<p>Bytes held after each layer's forward and backward and, for "
         "checkpointed layers, as each recompute starts (and as it ends, where it "
         "does not stop early), in the order they happen, for one micro-batch.</p>\n";
  std::vector<Series> timeline;
  for (const auto& t : h.timelines) {
    Series s{t.policy, t.policy == main_name ? kMain : kCompare};
    s.dashed = t.policy != main_name;
    for (size_t i = 0; i < t.points.size(); ++i) {
      s.points.emplace_back(static_cast<double>(i), mib(t.points[i].bytes));
      s.tips.push_back(t.policy + ": " + t.points[i].label + ", " +
                       memory::format_size(t.points[i].bytes));
    }
    timeline.push_back(s);
  }
  out << line_chart("timeline", "Held memory during one step", "event", "MiB", timeline);
  for (const auto& t : h.timelines) {
    std::string peak_label;
    int64_t peak = 0;
    for (const auto& p : t.points) {
      if (p.bytes > peak) {
        peak = p.bytes;
        peak_label = p.label;
      }
    }
    out << "<p>" << escape(t.policy) << ": highest at <i>" << escape(peak_label) << "</i>, "
        << memory::format_size(peak) << ".</p>\n";
  }
}

void write_evaluations(std::ostream& out, const Report& r) {
  const auto& h = r.h;
  if (h.evals.empty()) {
    return;
  }
  std::vector<std::string> header{"step", "epoch", "loss"};
  if (r.classification) {
    header.push_back("macro-F1");
    for (const auto& name : h.label_names) {
      header.push_back("F1 " + name);
    }
  } else {
    header.push_back("perplexity");
  }
  std::vector<std::vector<std::string>> rows;
  for (const auto& e : h.evals) {
    std::vector<std::string> row{std::to_string(e.step), std::to_string(e.epoch),
                                 num(e.loss)};
    if (r.classification) {
      row.push_back(num(e.macro_f1, "%.4f"));
      for (double f : e.per_label_f1) {
        row.push_back(num(f, "%.4f"));
      }
    } else {
      row.push_back(num(e.perplexity));
    }
    rows.push_back(row);
  }
  out << "<h2>Evaluations</h2>\n" << table(header, rows);
}

// The run's first steps against the comparison's, step by step.
void write_comparison(std::ostream& out, const Report& r) {
  const auto& h = r.h;
  const auto& main_name = r.main_name;
  const auto& cmp_name = r.cmp_name;
  const double n = static_cast<double>(h.compare_steps.size());
  auto first_steps = [&](const char* id, const char* title, const char* unit, auto value) {
    Series a{main_name, kMain};
    Series b{cmp_name, kCompare};
    b.dashed = true;
    for (const auto& step : h.steps) {
      if (static_cast<double>(step.step) <= n) {
        a.points.emplace_back(static_cast<double>(step.step), value(step));
      }
    }
    for (const auto& step : h.compare_steps) {
      b.points.emplace_back(static_cast<double>(step.step), value(step));
    }
    return line_chart(id, title, "step", unit, {a, b});
  };
  out << "<h2>Comparison, step by step</h2>\n"
      << first_steps("compare-loss", "Loss over the compared steps (the curves coincide "
                                     "when the losses are equal)", "loss",
                     [](const StepRecord& step) { return step.loss; })
      << first_steps("compare-memory", "Peak memory over the compared steps", "MiB",
                     [](const StepRecord& step) { return mib(step.peak_bytes); });
  std::vector<std::vector<std::string>> rows;
  for (const auto& s : h.steps) {
    if (!s.compare_loss) {
      continue;
    }
    rows.push_back({std::to_string(s.step), num(s.loss, "%.9g"),
                    num(*s.compare_loss, "%.9g"),
                    num(std::abs(s.loss - *s.compare_loss), "%.3g")});
  }
  out << table({"step", "loss " + main_name, "loss " + cmp_name, "|difference|"}, rows);
}

void write_settings(std::ostream& out, const Report& r) {
  std::vector<std::vector<std::string>> settings;
  auto j = r.options.to_json();
  for (auto it = j.begin(); it != j.end(); ++it) {
    settings.push_back({it.key(), it.value().is_string() ? it.value().get<std::string>()
                                                         : it.value().dump()});
  }
  out << "<h2>Settings</h2>\n" << table({"option", "value"}, settings);
  out << "<p><small>Written by remat train. Memory is counted to the byte by remat's "
         "allocator (remat::memory).</small></p>\n</body></html>\n";
}

} // namespace

std::string render_report(
    const History& h,
    const TrainOptions& options,
    const std::string& summary) {
  Report r{h, options, options.policy().name(), h.compare_policy, !h.compare_steps.empty(),
           options.task() == Task::kClassification};
  std::ostringstream out;
  write_head(out, r, summary);
  write_figures(out, r); // figures first
  write_loss(out, r);
  write_memory_and_time(out, r);
  write_timeline(out, r);
  write_evaluations(out, r);
  if (r.compared) {
    write_comparison(out, r);
  }
  write_settings(out, r);
  return out.str();
}

void write_report(
    const std::string& path,
    const History& history,
    const TrainOptions& options,
    const std::string& summary) {
  io::write_file_atomic(path, render_report(history, options, summary));
}

} // namespace train
} // namespace remat
