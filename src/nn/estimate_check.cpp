// check_estimate: the model a ModelSpec describes, built with remat::nn and
// measured one step per policy.
#include "remat/nn/estimate_check.h"

#include "remat/memory.h"
#include "remat/nn/lora.h"
#include "remat/nn/model_config.h"
#include "remat/nn/profile.h"

#include <torch/torch.h>

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
      "remat::nn::check_estimate: expected precision fp32 or bf16 (remat's models do not "
      "run mixed precision), but got bf16-mixed");
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
              [](const BertOutput& o) { return o.last_hidden_state.mean(); }));
    } else {
      l->gradient_checkpointing_enable(CheckpointPolicy::custom(schedule, policy.name()));
      m = measure_step(*l, LlamaStep(ids));
    }
    c.measured_fixed_bytes = m.base_bytes - held_before;
    c.measured_activation_bytes = m.activation_bytes;
    c.measured_peak_bytes = m.peak_bytes - held_before;
    out.push_back(c);
  }
  return out;
}

} // namespace nn
} // namespace remat
