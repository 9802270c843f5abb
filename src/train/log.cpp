#include "remat/train/log.h"

#include "remat/io/file.h"
#include "remat/memory.h"

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <sstream>

#include <sys/ioctl.h>
#include <unistd.h>

namespace remat {
namespace train {

namespace {

std::string fmt(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), format, v);
  return buf;
}

std::string rate(double tokens_per_s) {
  if (tokens_per_s >= 1e6) {
    return fmt("%.2fM", tokens_per_s / 1e6);
  }
  if (tokens_per_s >= 1e3) {
    return fmt("%.1fk", tokens_per_s / 1e3);
  }
  return fmt("%.0f", tokens_per_s);
}

} // namespace

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) {
    return "?";
  }
  auto s = static_cast<int64_t>(std::llround(seconds));
  char buf[32];
  if (s >= 3600) {
    std::snprintf(buf, sizeof(buf), "%lld:%02lld:%02lld", static_cast<long long>(s / 3600),
                  static_cast<long long>(s / 60 % 60), static_cast<long long>(s % 60));
  } else {
    std::snprintf(buf, sizeof(buf), "%lld:%02lld", static_cast<long long>(s / 60),
                  static_cast<long long>(s % 60));
  }
  return buf;
}

std::string describe_eval(const EvalRecord& e, const std::vector<std::string>& label_names) {
  std::ostringstream out;
  out << "eval step " << e.step << " (epoch " << e.epoch << "): loss " << fmt("%.4f", e.loss);
  if (e.per_label_f1.empty() && label_names.empty()) {
    out << ", perplexity " << fmt("%.4g", e.perplexity);
    return out.str();
  }
  out << ", macro-F1 " << fmt("%.4f", e.macro_f1) << ", micro-F1 " << fmt("%.4f", e.micro_f1)
      << " (";
  for (size_t i = 0; i < e.per_label_f1.size(); ++i) {
    out << (i ? ", " : "") << (i < label_names.size() ? label_names[i] : std::to_string(i))
        << " " << fmt("%.3f", e.per_label_f1[i]);
  }
  out << ")";
  return out.str();
}

// ---------------------------------------------------------------- Progress

Progress::Progress(std::FILE* stream, bool terminal, int64_t log_every)
    : stream_(stream), terminal_(terminal), log_every_(std::max<int64_t>(log_every, 1)) {}

void Progress::clear_bar() {
  if (bar_shown_) {
    std::fputs("\r\033[K", stream_);
    bar_shown_ = false;
  }
}

void Progress::step(const StepRecord& r, int64_t total, const std::string& phase) {
  const auto now = std::chrono::steady_clock::now();
  if (phase != phase_) {
    if (terminal_ && bar_shown_) {
      std::fputs("\n", stream_); // keep the finished phase's bar
      bar_shown_ = false;
    }
    phase_ = phase;
    phase_steps_ = 0;
    // The first step of a phase is timed from its own duration.
    phase_start_ = now - std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                             std::chrono::duration<double>(r.step_seconds));
  }
  ++phase_steps_;
  const double elapsed = std::chrono::duration<double>(now - phase_start_).count();
  const double eta = elapsed / static_cast<double>(phase_steps_) *
      static_cast<double>(std::max<int64_t>(total - r.step, 0));
  const std::string stats = "loss " + fmt("%.4f", r.loss) + " | " + rate(r.tokens_per_s) +
      " tok/s | peak " + memory::format_size(r.peak_bytes) +
      (r.planned.empty() ? std::string()
                         : " (plan " + memory::format_size(r.predicted_peak_bytes) + " for " +
               r.planned + ")") +
      " | ETA " + format_duration(eta);
  if (terminal_) {
    constexpr int kWidth = 20;
    const int filled = total > 0
        ? static_cast<int>(kWidth * std::min<int64_t>(r.step, total) / total)
        : kWidth;
    std::string bar = "[" + std::string(static_cast<size_t>(filled), '#') +
        std::string(static_cast<size_t>(kWidth - filled), '.') + "]";
    std::string text = phase + " " + std::to_string(r.step) + "/" + std::to_string(total) +
        " " + bar + " " + stats;
    // A line longer than the terminal wraps, and "\r" then rewrites only
    // its last row: cut it to the width.
    struct winsize ws {};
    const size_t cols = ::ioctl(::fileno(stream_), TIOCGWINSZ, &ws) == 0 && ws.ws_col > 1
        ? ws.ws_col - 1
        : 79;
    if (text.size() > cols) {
      text.resize(cols);
    }
    std::fprintf(stream_, "\r\033[K%s", text.c_str());
    bar_shown_ = true;
  } else if (r.step == 1 || r.step == total || r.step % log_every_ == 0) {
    std::fprintf(stream_, "%s step %lld/%lld epoch %lld | %s | lr %.2e | step %.3f s\n",
                 phase.c_str(), static_cast<long long>(r.step), static_cast<long long>(total),
                 static_cast<long long>(r.epoch), stats.c_str(), r.lr, r.step_seconds);
  }
  std::fflush(stream_);
}

void Progress::line(const std::string& text) {
  clear_bar(); // the next step draws it again
  std::fprintf(stream_, "%s\n", text.c_str());
  std::fflush(stream_);
}

void Progress::finish() {
  if (bar_shown_) {
    std::fputs("\n", stream_);
    bar_shown_ = false;
  }
  std::fflush(stream_);
}

// ---------------------------------------------------------------- MetricsLog

MetricsLog::MetricsLog(std::string path) : path_(std::move(path)) {}

std::string MetricsLog::eval_line(const EvalRecord& e) const {
  auto j = e.to_json();
  if (!label_names_.empty()) {
    nlohmann::json f1 = nlohmann::json::object();
    for (size_t i = 0; i < e.per_label_f1.size() && i < label_names_.size(); ++i) {
      f1[label_names_[i]] = e.per_label_f1[i];
    }
    j["f1"] = f1;
  }
  return j.dump();
}

void MetricsLog::start(const History& h) {
  label_names_ = h.label_names;
  std::string text;
  for (const auto& r : h.compare_steps) {
    auto j = r.to_json();
    j["type"] = "compare_step";
    text += j.dump() + "\n";
  }
  // Steps in order, each step's evaluation after it.
  size_t e = 0;
  for (const auto& r : h.steps) {
    while (e < h.evals.size() && h.evals[e].step < r.step) {
      text += eval_line(h.evals[e++]) + "\n";
    }
    text += r.to_json().dump() + "\n";
  }
  for (; e < h.evals.size(); ++e) {
    text += eval_line(h.evals[e]) + "\n";
  }
  io::write_file_atomic(path_, text);
  out_.open(path_, std::ios::app);
  TORCH_CHECK(out_, "could not open '", path_, "' to append: ", std::strerror(errno));
}

void MetricsLog::append(const std::string& line) {
  if (!out_.is_open()) {
    return;
  }
  out_ << line << "\n";
  out_.flush();
  TORCH_CHECK(out_, "could not write to '", path_, "'");
}

void MetricsLog::step(const StepRecord& r) {
  append(r.to_json().dump());
}

void MetricsLog::eval(const EvalRecord& r) {
  append(eval_line(r));
}

} // namespace train
} // namespace remat
