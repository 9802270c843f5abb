// estimate_table: the estimator's rows for several policies, as text and JSON.
#include "remat/plan/estimate_table.h"
#include "remat/field_error.h"

#include "remat/memory.h"

#include <c10/util/Exception.h>

#include <cstdio>
#include <sstream>

namespace remat {
namespace plan {
namespace {

// A parameter count for people: 13.02 billion, 110.1 million, 328,960.
std::string count_text(int64_t n) {
  char b[48];
  if (n >= 1000000000) {
    std::snprintf(b, sizeof(b), "%.2f billion", static_cast<double>(n) / 1e9);
  } else if (n >= 1000000) {
    std::snprintf(b, sizeof(b), "%.1f million", static_cast<double>(n) / 1e6);
  } else {
    std::string digits = std::to_string(n);
    for (int i = static_cast<int>(digits.size()) - 3; i > 0; i -= 3) {
      digits.insert(static_cast<size_t>(i), ",");
    }
    return digits;
  }
  return b;
}

std::string percent_cell(double v) {
  char b[32];
  std::snprintf(b, sizeof(b), "%+.1f%%", v);
  return b;
}

const char* optimizer_name(Optimizer o) {
  return o == Optimizer::kAdamW ? "adamw" : "sgd";
}

const char* backend_name(Backend b) {
  return b == Backend::kCpu ? "cpu" : "cuda";
}

} // namespace

std::string describe(const ModelSpec& s) {
  std::ostringstream o;
  o << to_string(s.family()) << ", " << s.layers() << " layers, hidden " << s.hidden() << ", "
    << s.heads() << " heads";
  if (s.family() == Family::kLlama) {
    o << " (" << s.kv_heads_or_heads() << " kv)";
  }
  o << ", intermediate " << s.mlp_size() << ", vocab " << s.vocab() << ", seq " << s.seq()
    << ", batch " << s.batch() << ", " << to_string(s.precision()) << ", "
    << to_string(s.attention()) << " attention, "
    << (s.optimizer() == Optimizer::kAdamW ? "AdamW" : "SGD") << ", head "
    << to_string(s.head()) << ", dropout " << (s.dropout() ? "on" : "off") << ", "
    << backend_name(s.backend());
  if (s.lora_rank() > 0) {
    o << ", LoRA rank " << s.lora_rank() << " on ";
    for (size_t i = 0; i < s.lora_targets().size(); ++i) {
      o << (i ? "," : "") << s.lora_targets()[i];
    }
    if (s.lora_dropout()) {
      o << " with dropout";
    }
  }
  return o.str();
}

nlohmann::json spec_json(const ModelSpec& spec) {
  return {{"family", to_string(spec.family())},
          {"layers", spec.layers()},
          {"hidden", spec.hidden()},
          {"heads", spec.heads()},
          {"kv_heads", spec.kv_heads_or_heads()},
          {"intermediate", spec.mlp_size()},
          {"vocab", spec.vocab()},
          {"seq", spec.seq()},
          {"batch", spec.batch()},
          {"precision", to_string(spec.precision())},
          {"attention", to_string(spec.attention())},
          {"optimizer", optimizer_name(spec.optimizer())},
          {"head", to_string(spec.head())},
          {"dropout", spec.dropout()},
          {"backend", backend_name(spec.backend())},
          {"lora_rank", spec.lora_rank()},
          {"lora_targets", spec.lora_targets()},
          {"lora_dropout", spec.lora_dropout()}};
}

EstimateTable estimate_table(
    const ModelSpec& spec,
    const std::vector<CheckpointPolicy>& policies,
    const EstimateTableOptions& options) {
  EstimateTable t(spec);
  t.options = options;
  t.none = estimate(spec, CheckpointPolicy::none());
  for (const auto& policy : policies) {
    EstimateRow row;
    row.policy = policy.name();
    try {
      row.estimate = estimate(spec, policy);
    } catch (const c10::Error& err) {
      row.ok = false;
      row.error = first_line(err);
    }
    if (options.fit_bytes() > 0) {
      row.fit = options.fit_seq()
          ? fit_seq(spec, policy, options.fit_bytes(), options.seq_multiple())
          : fit_batch(spec, policy, options.fit_bytes());
    }
    t.rows.push_back(row);
  }
  return t;
}

std::string EstimateTable::summary_text() const {
  std::ostringstream out;
  out << "parameters " << count_text(none.parameters.total) << " ("
      << count_text(none.parameters.trainable) << " trainable); weights "
      << memory::format_size(none.weight_bytes) << ", gradients "
      << memory::format_size(none.gradient_bytes) << ", optimizer state "
      << memory::format_size(none.optimizer_bytes) << ", inputs "
      << memory::format_size(none.input_bytes) << "\n\n";
  return out.str();
}

std::string EstimateTable::str() const {
  const bool fits = options.fit_bytes() > 0;
  const char* fit_name = options.fit_seq() ? "max seq" : "max batch";
  std::ostringstream out;
  char line[512];
  std::snprintf(line, sizeof(line), "%-22s %12s %12s %12s %9s", "policy", "activations",
                "act. at peak", "peak", "step");
  out << line;
  if (fits) {
    std::snprintf(line, sizeof(line), " %10s", fit_name);
    out << line;
  }
  out << "  peak at\n";
  for (const auto& r : rows) {
    if (!r.ok) {
      std::snprintf(line, sizeof(line), "%-22s %s", r.policy.c_str(), r.error.c_str());
      out << line << "\n";
      continue;
    }
    const auto& e = r.estimate;
    std::snprintf(line, sizeof(line), "%-22s %12s %12s %12s %9s", r.policy.c_str(),
                  memory::format_size(e.activation_bytes).c_str(),
                  memory::format_size(e.peak_activation_bytes).c_str(),
                  memory::format_size(e.peak_bytes).c_str(),
                  percent_cell(100.0 * (e.step_seconds / none.step_seconds - 1)).c_str());
    out << line;
    if (r.fit >= 0) {
      std::snprintf(line, sizeof(line), " %10lld", static_cast<long long>(r.fit));
      out << line;
    }
    out << "  " << e.peak_event << "\n";
  }
  out << "\nactivations: held after forward; act. at peak: peak minus weights, "
         "gradients, optimizer state and inputs; step: matrix-product FLOPs against none.\n";
  if (fits) {
    out << fit_name << ": the largest that fits " << memory::format_size(options.fit_bytes())
        << " (0: not even "
        << (options.fit_seq() ? std::to_string(options.seq_multiple()) + " tokens" : "batch 1")
        << ").\n";
  }
  return out.str();
}

nlohmann::json EstimateTable::rows_json() const {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& r : rows) {
    nlohmann::json row{{"policy", r.policy}};
    if (!r.ok) {
      row["error"] = r.error;
    } else {
      const auto& e = r.estimate;
      row["schedule"] = e.schedule.str();
      row["weight_bytes"] = e.weight_bytes;
      row["gradient_bytes"] = e.gradient_bytes;
      row["optimizer_bytes"] = e.optimizer_bytes;
      row["input_bytes"] = e.input_bytes;
      row["activation_bytes"] = e.activation_bytes;
      row["peak_activation_bytes"] = e.peak_activation_bytes;
      row["peak_bytes"] = e.peak_bytes;
      row["step_flops_relative_to_none"] = e.step_seconds / none.step_seconds;
      row["peak_event"] = e.peak_event;
    }
    if (r.fit >= 0) {
      row[options.fit_seq() ? "max_seq" : "max_batch"] = r.fit;
    }
    out.push_back(row);
  }
  return out;
}

} // namespace plan
} // namespace remat
