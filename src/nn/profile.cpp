// The stages of remat's models as the profiler runs them, and planning and
// measuring a step. The runners call the same module code as the models'
// forward (BertImpl::embed, LlamaModelImpl::side_inputs, the layers' forward
// with a mode, the head), so what is profiled is what runs.
#include "remat/nn/profile.h"

#include "remat/memory.h"
#include "remat/nn/step.h"
#include "remat/timing.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <memory>

namespace remat {
namespace nn {
namespace {

const std::vector<SegmentMode> kSelective{
    SegmentMode::kRecomputeAttention, SegmentMode::kRecomputeMlp};

void check_ids(const torch::Tensor& ids, const char* model) {
  TORCH_CHECK(
      ids.defined() && ids.dim() == 2 && ids.scalar_type() == torch::kLong,
      "remat::nn::", model, ": expected step input_ids of shape [batch, seq] and "
      "dtype int64, but got ", ids.defined() ? ids.sizes() : c10::IntArrayRef{},
      ids.defined() ? "" : " (undefined)");
}

// warmup + steps measured steps (remat/nn/step.h), gradients zeroed as the
// planner predicts.
StepMeasurement measure(
    torch::nn::Module& model,
    const std::function<torch::Tensor()>& loss_of_step,
    int64_t steps,
    int64_t warmup) {
  TORCH_CHECK(
      steps >= 1 && warmup >= 0,
      "remat::nn::measure_step: expected steps >= 1 and warmup >= 0, but got steps ",
      steps, " and warmup ", warmup);
  TORCH_CHECK(
      memory::installed(),
      "remat::nn::measure_step: expected remat::memory::install() to have run, but it has not");
  StepMeasurement m;
  std::vector<double> times;
  for (int64_t i = 0; i < warmup + steps; ++i) {
    const auto s = measured_step(model, loss_of_step);
    if (i < warmup) {
      continue;
    }
    m.base_bytes = std::max(m.base_bytes, s.before_forward_bytes);
    m.peak_bytes = std::max(m.peak_bytes, s.peak_bytes);
    m.activation_bytes =
        std::max(m.activation_bytes, s.before_backward_bytes - s.before_forward_bytes);
    times.push_back(s.step_seconds);
  }
  m.step_seconds = median(times);
  return m;
}

} // namespace

torch::Tensor default_bert_loss(const BertOutput& output) {
  return output.last_hidden_state.pow(2).mean() + output.pooler_output.pow(2).mean();
}

std::vector<plan::StageRunner> stage_runners(BertImpl& model, const BertStep& step) {
  check_ids(step.input_ids(), "Bert");
  // The additive attention mask: made by the embedding stage, read by the
  // layers, as in forward.
  auto mask = std::make_shared<torch::Tensor>();
  BertImpl* m = &model;
  const auto attention_mask = step.attention_mask();
  const auto types = step.token_type_ids();
  const BertLoss loss = step.loss() ? step.loss() : BertLoss(default_bert_loss);

  std::vector<plan::StageRunner> runners;
  plan::StageRunner emb;
  emb.name = "embeddings";
  emb.kind = plan::StageKind::kEmbedding;
  emb.forward = [m, mask, attention_mask, types](const torch::Tensor& ids, SegmentMode) {
    auto e = m->embed(ids, attention_mask, types);
    *mask = e.second;
    return e.first;
  };
  emb.reset = [mask] { *mask = torch::Tensor(); };
  emb.parameters = model.embeddings->parameters();
  runners.push_back(std::move(emb));

  const auto& layers = model.encoder->layers;
  for (size_t i = 0; i < layers.size(); ++i) {
    plan::StageRunner r;
    r.name = "layer." + std::to_string(i);
    BertLayer layer = layers[i];
    r.forward = [layer, mask](const torch::Tensor& h, SegmentMode mode) mutable {
      return layer->forward(h, *mask, mode);
    };
    r.modes = kSelective;
    r.parameters = layer->parameters();
    runners.push_back(std::move(r));
  }

  plan::StageRunner head;
  head.name = "head";
  head.kind = plan::StageKind::kHead;
  head.forward = [m, loss](const torch::Tensor& h, SegmentMode) {
    return loss(BertOutput{h, m->pooler->forward(h)});
  };
  head.parameters = model.pooler->parameters();
  runners.push_back(std::move(head));
  return runners;
}

std::vector<plan::StageRunner> stage_runners(LlamaImpl& model, const LlamaStep& step) {
  check_ids(step.input_ids(), "Llama");
  // Rotary tables (and the additive mask): made by the embedding stage,
  // read by the layers, as in forward.
  auto side = std::make_shared<std::vector<torch::Tensor>>();
  LlamaImpl* m = &model;
  const auto attention_mask = step.attention_mask();
  const auto labels = step.labels().defined() ? step.labels() : step.input_ids();

  std::vector<plan::StageRunner> runners;
  plan::StageRunner emb;
  emb.name = "embeddings";
  emb.kind = plan::StageKind::kEmbedding;
  emb.forward = [m, side, attention_mask](const torch::Tensor& ids, SegmentMode) {
    auto h = m->model->embed_tokens->forward(ids);
    *side = m->model->side_inputs(ids, attention_mask, 0, h.options());
    return h;
  };
  emb.reset = [side] { side->clear(); };
  emb.parameters = model.model->embed_tokens->parameters();
  runners.push_back(std::move(emb));

  const auto& layers = model.model->decoder_layers;
  for (size_t i = 0; i < layers.size(); ++i) {
    plan::StageRunner r;
    r.name = "layer." + std::to_string(i);
    LlamaDecoderLayer layer = layers[i];
    r.forward = [layer, side](const torch::Tensor& h, SegmentMode mode) mutable {
      const auto& s = *side;
      return layer->forward(h, s[0], s[1], s.size() > 2 ? s[2] : torch::Tensor(), mode);
    };
    r.modes = kSelective;
    r.parameters = layer->parameters();
    runners.push_back(std::move(r));
  }

  plan::StageRunner head;
  head.name = "head";
  head.kind = plan::StageKind::kHead;
  // What forward_loss runs after the layers: no [B, S, vocab] logits kept.
  head.forward = [m, labels](const torch::Tensor& h, SegmentMode) {
    return m->head_loss(m->model->norm->forward(h), labels);
  };
  head.parameters = model.model->norm->parameters();
  const auto out = model.lm_head ? model.lm_head->parameters()
                                 : std::vector<torch::Tensor>{model.model->embed_tokens->weight};
  head.parameters.insert(head.parameters.end(), out.begin(), out.end());
  runners.push_back(std::move(head));
  return runners;
}

plan::Chain profile_model(
    BertImpl& model,
    const BertStep& step,
    const plan::ProfileOptions& options) {
  return plan::profile(stage_runners(model, step), step.input_ids(), options);
}

plan::Chain profile_model(
    LlamaImpl& model,
    const LlamaStep& step,
    const plan::ProfileOptions& options) {
  return plan::profile(stage_runners(model, step), step.input_ids(), options);
}

namespace {

template <typename Impl, typename Step>
plan::Plan plan_model(
    Impl& model,
    const Step& step,
    int64_t budget_bytes,
    const PlanOptions& options) {
  TORCH_CHECK(
      options.reserve_bytes() >= 0,
      "remat::nn::plan_checkpointing: expected reserve_bytes >= 0, but got ",
      options.reserve_bytes());
  auto chain = profile_model(model, step, options.profile());
  chain.base_bytes += options.reserve_bytes();
  return plan::solve(chain, budget_bytes, options.planner());
}

} // namespace

plan::Plan plan_checkpointing(
    BertImpl& model,
    const BertStep& step,
    int64_t budget_bytes,
    const PlanOptions& options) {
  return plan_model(model, step, budget_bytes, options);
}

plan::Plan plan_checkpointing(
    LlamaImpl& model,
    const LlamaStep& step,
    int64_t budget_bytes,
    const PlanOptions& options) {
  return plan_model(model, step, budget_bytes, options);
}

StepMeasurement measure_step(
    BertImpl& model,
    const BertStep& step,
    int64_t steps,
    int64_t warmup) {
  check_ids(step.input_ids(), "Bert");
  const BertLoss loss = step.loss() ? step.loss() : BertLoss(default_bert_loss);
  return measure(
      model,
      [&] {
        return loss(model.forward(step.input_ids(), step.attention_mask(), step.token_type_ids()));
      },
      steps, warmup);
}

StepMeasurement measure_step(
    LlamaImpl& model,
    const LlamaStep& step,
    int64_t steps,
    int64_t warmup) {
  check_ids(step.input_ids(), "Llama");
  const auto labels = step.labels().defined() ? step.labels() : step.input_ids();
  return measure(
      model,
      [&] { return model.forward_loss(step.input_ids(), labels, step.attention_mask()); },
      steps, warmup);
}

} // namespace nn
} // namespace remat
