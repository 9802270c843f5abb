// check_estimate: the model a ModelSpec describes, built with remat::nn and
// measured one step per policy.
#include "remat/nn/estimate_check.h"

#include "remat/memory.h"
#include "remat/nn/lora.h"
#include "remat/nn/model_config.h"
#include "remat/nn/profile.h"

#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <sstream>

namespace remat {
namespace nn {
namespace {

// Projection names of each LoRA target in remat's models. BERT's MLP
// output is "output.dense", which also ends "attention.output.dense", so it
// is named per layer.
std::vector<std::string> lora_targets(const plan::ModelSpec& s) {
  std::vector<std::string> out;
  const bool bert = s.family() == plan::Family::kBert;
  for (const auto& t : s.lora_targets()) {
    if (!bert) {
      out.push_back(t + "_proj");
    } else if (t == "q" || t == "k" || t == "v") {
      out.push_back(t == "q" ? "query" : t == "k" ? "key" : "value");
    } else if (t == "o") {
      out.push_back("attention.output.dense");
    } else if (t == "up") {
      out.push_back("intermediate.dense");
    } else {
      for (int64_t i = 0; i < s.layers(); ++i) {
        out.push_back("layer." + std::to_string(i) + ".output.dense");
      }
    }
  }
  return out;
}

} // namespace

std::vector<EstimateCheck> check_estimate(
    const plan::ModelSpec& spec,
    const std::vector<CheckpointPolicy>& policies,
    uint64_t seed) {
  spec.validate();
  const bool bert = spec.family() == plan::Family::kBert;
  TORCH_CHECK(
      spec.backend() == plan::Backend::kCpu,
      "remat::nn::check_estimate: expected backend cpu (the check runs here), but got cuda");
  TORCH_CHECK(
      spec.precision() != plan::Precision::kBf16Mixed,
      "remat::nn::check_estimate: expected precision fp32 or bf16-pure (remat's models do "
      "not keep bf16 weights with fp32 master copies), but got bf16-mixed");
  TORCH_CHECK(
      spec.head() == (bert ? plan::Head::kNone : plan::Head::kLanguageModel),
      "remat::nn::check_estimate: expected head ", bert ? "none for BERT" : "lm for Llama",
      " (the heads remat's models have), but got ", plan::to_string(spec.head()));
  TORCH_CHECK(
      !spec.lora_dropout(),
      "remat::nn::check_estimate: expected lora_dropout off, but got on");
  TORCH_CHECK(
      memory::installed(),
      "remat::nn::check_estimate: expected remat::memory::install() to have run, but it has not");

  const int64_t held_before = memory::current_bytes();
  torch::manual_seed(seed);
  const auto dtype = spec.precision() == plan::Precision::kFp32 ? torch::kFloat : torch::kBFloat16;
  auto ids = torch::randint(spec.vocab(), {spec.batch(), spec.seq()}, torch::kLong);
  Bert b{nullptr};
  Llama l{nullptr};
  torch::nn::Module* module = nullptr;
  torch::Tensor mask, types;
  // The model the spec describes, through the one description every
  // command builds from.
  const auto config = ModelConfig::from_spec(spec);
  if (bert) {
    b = Bert(config.bert_options().type_vocab_size(spec.type_vocab()));
    module = b.get();
    mask = torch::ones_like(ids);
    types = torch::zeros_like(ids);
  } else {
    l = Llama(config.llama_options());
    module = l.get();
  }
  module->to(dtype);
  module->train();
  if (spec.lora_rank() > 0) {
    apply_lora(*module, LoraOptions().rank(spec.lora_rank()).targets(lora_targets(spec)));
  }

  const auto est_spec = plan::ModelSpec(spec).optimizer(plan::Optimizer::kSgd);
  std::vector<EstimateCheck> out;
  for (const auto& policy : policies) {
    EstimateCheck c;
    c.policy = policy.name();
    const auto e = plan::estimate(est_spec, policy);
    c.estimated_fixed_bytes = e.weight_bytes + e.gradient_bytes + e.optimizer_bytes + e.input_bytes;
    c.estimated_activation_bytes = e.activation_bytes;
    c.estimated_peak_bytes = e.peak_bytes;
    const auto schedule = e.schedule; // a budget policy: the estimator's plan
    StepMeasurement m;
    if (bert) {
      b->gradient_checkpointing_enable(CheckpointPolicy::custom(schedule, policy.name()));
      m = measure_step(
          *b,
          BertStep(ids).attention_mask(mask).token_type_ids(types).loss(
              [](const BertOutput& o) { return o.last_hidden_state.mean(); }),
          1, 0, plan::GradientReset::kZero); // the estimator models zeroed gradients
    } else {
      l->gradient_checkpointing_enable(CheckpointPolicy::custom(schedule, policy.name()));
      m = measure_step(*l, LlamaStep(ids), 1, 0, plan::GradientReset::kZero);
    }
    c.measured_fixed_bytes = m.base_bytes - held_before;
    c.measured_activation_bytes = m.activation_bytes;
    c.measured_peak_bytes = m.peak_bytes - held_before;
    out.push_back(c);
  }
  return out;
}

double EstimateCheck::peak_error_percent() const {
  return 100.0 * static_cast<double>(estimated_peak_bytes - measured_peak_bytes) /
      static_cast<double>(std::max<int64_t>(1, measured_peak_bytes));
}

nlohmann::json EstimateCheck::to_json() const {
  return {{"policy", policy},
          {"estimated_fixed_bytes", estimated_fixed_bytes},
          {"measured_fixed_bytes", measured_fixed_bytes},
          {"estimated_activation_bytes", estimated_activation_bytes},
          {"measured_activation_bytes", measured_activation_bytes},
          {"estimated_peak_bytes", estimated_peak_bytes},
          {"measured_peak_bytes", measured_peak_bytes},
          {"peak_error_percent", peak_error_percent()}};
}

bool checks_within(const std::vector<EstimateCheck>& checks, double tolerance_percent) {
  for (const auto& c : checks) {
    if (std::abs(c.peak_error_percent()) > tolerance_percent) {
      return false;
    }
  }
  return true;
}

std::string check_table(const std::vector<EstimateCheck>& checks, double tolerance_percent) {
  std::ostringstream out;
  char line[512];
  std::snprintf(line, sizeof(line), "%-22s %23s %23s %23s %8s\n", "policy", "fixed est / meas",
                "activations est / meas", "peak est / meas", "peak err");
  out << line;
  auto pair = [](int64_t a, int64_t b) {
    return memory::format_size(a) + " / " + memory::format_size(b);
  };
  for (const auto& r : checks) {
    char err[32];
    std::snprintf(err, sizeof(err), "%+.1f%%", r.peak_error_percent());
    std::snprintf(line, sizeof(line), "%-22s %23s %23s %23s %8s\n", r.policy.c_str(),
                  pair(r.estimated_fixed_bytes, r.measured_fixed_bytes).c_str(),
                  pair(r.estimated_activation_bytes, r.measured_activation_bytes).c_str(),
                  pair(r.estimated_peak_bytes, r.measured_peak_bytes).c_str(), err);
    out << line;
  }
  char tail[96];
  std::snprintf(tail, sizeof(tail), checks_within(checks, tolerance_percent)
                    ? "every peak within %g%% of the measured one"
                    : "SOME PEAKS ARE MORE THAN %g%% OFF",
                tolerance_percent);
  out << "\n" << tail << "\n";
  return out.str();
}

} // namespace nn
} // namespace remat
