// The seeds' worked example (a 13B LoRA fine-tune at 8k tokens, batch 2, on
// an 80 GB A100) set against remat's estimator: what `remat estimate
// --preset llama-13b-lora-8k` prints. docs/estimate.md discusses the rows.
#include "worked_example.h"

#include "remat/plan/estimate.h"

#include <cstdio>
#include <sstream>

namespace remat {
namespace cli {
namespace {

using plan::AttentionImpl;
using plan::Head;
using plan::ModelSpec;
using plan::estimate;

double gib(int64_t bytes) {
  return static_cast<double>(bytes) / double(int64_t(1) << 30);
}

} // namespace

std::vector<WorkedExampleRow> worked_example_comparison() {
  const auto spec = ModelSpec::llama_13b_lora_8k();
  const auto none = CheckpointPolicy::none();
  const auto every = CheckpointPolicy::every_layer();
  const auto n = estimate(spec, none);
  const auto e = estimate(spec, every);
  const int64_t fixed = n.weight_bytes + n.gradient_bytes + n.optimizer_bytes + n.input_bytes;
  std::vector<WorkedExampleRow> rows = {
      {"parameters", "billion", 13, n.parameters.total / 1e9},
      {"trainable parameters (LoRA)", "billion", -1, n.parameters.trainable / 1e9},
      {"weights", "GiB", -1, gib(n.weight_bytes)},
      {"gradients + optimizer state", "GiB", -1, gib(n.gradient_bytes + n.optimizer_bytes)},
      {"non-activation memory (seed: peak - activations), none", "GiB", 74 - 48, gib(fixed)},
      {"non-activation memory (seed: peak - activations), every-layer", "GiB", 52 - 18, gib(fixed)},
      {"activations held after forward, none", "GiB", -1, gib(n.activation_bytes)},
      {"activations held after forward, every-layer", "GiB", -1, gib(e.activation_bytes)},
      {"activations at peak, none", "GiB", 48, gib(n.peak_activation_bytes)},
      {"activations at peak, every-layer", "GiB", 18, gib(e.peak_activation_bytes)},
      {"activation reduction at peak", "%", 62,
       100.0 * (1 - double(e.peak_activation_bytes) / double(n.peak_activation_bytes))},
      {"total peak, none", "GiB", 74, gib(n.peak_bytes)},
      {"total peak, every-layer", "GiB", 52, gib(e.peak_bytes)},
      {"step time added by every-layer", "%", 34,
       100.0 * (e.step_seconds / n.step_seconds - 1)},
  };
  struct Variant {
    const char* name;
    ModelSpec spec;
  };
  const Variant variants[] = {
      {"LM head (32000-way logits) instead of a classifier",
       ModelSpec(spec).head(Head::kLanguageModel)},
      {"eager attention instead of blockwise", ModelSpec(spec).attention(AttentionImpl::kEager)},
      {"LoRA dropout on", ModelSpec(spec).lora_dropout(true)},
      {"batch 1 (half the tokens)", ModelSpec(spec).batch(1)},
      {"full fine-tuning instead of LoRA", ModelSpec(spec).lora_rank(0)},
  };
  for (const auto& v : variants) {
    const auto vn = estimate(v.spec, none);
    const auto ve = estimate(v.spec, every);
    rows.push_back({std::string(v.name) + ": total peak, none", "GiB", -1, gib(vn.peak_bytes)});
    rows.push_back(
        {std::string(v.name) + ": total peak, every-layer", "GiB", -1, gib(ve.peak_bytes)});
  }
  return rows;
}

std::string worked_example_table() {
  std::ostringstream out;
  out << "| quantity | unit | seed | remat |\n|---|---|---:|---:|\n";
  char seed[32];
  char ours[32];
  for (const auto& r : worked_example_comparison()) {
    if (r.seed < 0) {
      std::snprintf(seed, sizeof(seed), "-");
    } else {
      std::snprintf(seed, sizeof(seed), "%.4g", r.seed);
    }
    std::snprintf(ours, sizeof(ours), r.unit == "billion" ? "%.3f" : "%.1f", r.remat);
    out << "| " << r.quantity << " | " << r.unit << " | " << seed << " | " << ours << " |\n";
  }
  return out.str();
}

} // namespace cli
} // namespace remat
