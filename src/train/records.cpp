// TrainOptions checks, and the JSON of options and records (saved in the
// training state and written to --metrics).
#include "remat/train/options.h"
#include "remat/train/records.h"

#include "remat/io/json_text.h"
#include "remat/model_sizes.h"
#include "remat/device.h"

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <limits>

namespace remat {
namespace train {

namespace {

using nlohmann::json;

template <typename Record>
json records_json(const std::vector<Record>& records) {
  json out = json::array();
  for (const auto& r : records) {
    out.push_back(r.to_json());
  }
  return out;
}

template <typename Record>
std::vector<Record> records_from(const io::JsonReader& history, const char* key) {
  std::vector<Record> out;
  for (const auto& r : history.array(key)) {
    out.push_back(Record::from_json(r));
  }
  return out;
}

} // namespace

plan::Family family_of(Task task) {
  return task == Task::kClassification ? plan::Family::kBert : plan::Family::kLlama;
}

const char* to_string(Task task) {
  return task == Task::kClassification ? "classify" : "lm";
}

Task parse_task(const std::string& text) {
  TORCH_CHECK(
      text == "classify" || text == "lm",
      "task: expected classify or lm, but got '", text, "'");
  return text == "classify" ? Task::kClassification : Task::kCausalLm;
}

const char* to_string(BudgetPlans plans) {
  return plans == BudgetPlans::kPerShape ? "per-shape" : "worst-case";
}

BudgetPlans parse_budget_plans(const std::string& text) {
  TORCH_CHECK(
      text == "per-shape" || text == "worst-case",
      "expected per-shape or worst-case, but got '", text, "'");
  return text == "per-shape" ? BudgetPlans::kPerShape : BudgetPlans::kWorstCase;
}

// ---------------------------------------------------------------- options

TrainOptions::TrainOptions()
    : model_(nn::ModelConfig(plan::Family::kBert)
                 .layers(4)
                 .hidden(128)
                 .heads(4)
                 .seq(64)
                 .batch(16)
                 // Measured on data/routing, 3 epochs of batch 32: macro-F1
                 // 0.91 without dropout, 0.23 with 0.1. Fine-tuning a
                 // pretrained BERT usually takes 0.1.
                 .dropout(0.0)) {}

Task TrainOptions::task() const {
  return model_.llama() ? Task::kCausalLm : Task::kClassification;
}

TrainOptions& TrainOptions::task(Task task) {
  model_.family(family_of(task));
  return *this;
}

namespace {

// Below the least: the message callers know; above the bound: past what
// remat accepts (remat/model_sizes.h), so no count or size overflows.
void check_range(int64_t v, int64_t min, int64_t max, const char* name) {
  check_field(
      v >= min, name,
      std::string(name) + ": expected a value >= " + std::to_string(min) + ", but got " +
          std::to_string(v));
  check_field(
      v <= max, name,
      std::string(name) + ": expected a value <= " + std::to_string(max) + ", but got " +
          std::to_string(v));
}

// The rows' length and how batches are made of them.
void check_batching(const TrainOptions& o) {
  const auto& m = o.model();
  // A row needs a token and the one after it (the LM's shift).
  check_range(m.seq(), 2, limits::kMaxSeq, "seq");
  check_range(o.accumulate(), 1, limits::kMaxCount, "accumulate");
  check_range(o.epochs(), 1, limits::kMaxCount, "epochs");
  check_range(o.max_steps(), 0, limits::kMaxCount, "max_steps");
  check_range(o.max_tokens(), 0, limits::kMaxCount, "max_tokens");
  check_field(o.max_tokens() == 0 || o.max_tokens() >= m.seq(), "max_tokens",
              c10::str("max_tokens: expected at least seq (", m.seq(),
                       ") tokens, the longest row, but got ", o.max_tokens()));
  check_field(!o.pack() || m.llama(), "pack",
              "pack: expected the lm task (a classifier has one label vector per row), but got "
              "classify");
  check_field(!o.pack() || o.max_tokens() == 0, "pack",
              c10::str("pack: expected no max_tokens (packed rows are all seq tokens long), but "
                       "got ", o.max_tokens()));
}

// The counts of the run, and the model's tables that follow seq and --init.
void check_counts(const TrainOptions& o) {
  check_range(o.warmup(), -1, limits::kMaxCount, "warmup");
  check_range(o.lora_rank(), 0, limits::kMaxLoraRank, "lora_rank");
  check_range(o.eval_every(), 0, limits::kMaxCount, "eval_every");
  check_range(o.save_every(), 0, limits::kMaxCount, "save_every");
  check_range(o.compare_steps(), 1, limits::kMaxCount, "compare_steps");
  check_range(o.threads(), 0, 4096, "threads");
  check_range(o.max_bad_steps(), 0, limits::kMaxCount, "max_bad_steps");
  check_field(o.plan_share() >= 0 && o.plan_share() <= 1, "plan_share",
              c10::str("plan_share: expected a share in [0, 1] of the run's time, but got ",
                       o.plan_share()));
  // The position table follows seq and the --init folder; the embedding is
  // untied unless the folder's config ties it.
  check_field(o.model().max_positions() == 0, "max_positions",
              c10::str("max_positions: expected 0 (seq or the init folder's), but got ",
                       o.model().max_positions()));
  check_field(!o.model().tie_embeddings(), "tie_embeddings",
              "tie_embeddings: expected false (an init folder's config.json may tie them)");
}

// Where it runs, its data, and the optimizer's numbers.
void check_run(const TrainOptions& o) {
  try {
    parse_device(o.device());
  } catch (const c10::Error& e) {
    throw FieldError("device", c10::str("device: ", e.what_without_backtrace()));
  }
  check_field(!o.train_path().empty(), "train_path",
              c10::str("train_path: expected a JSONL file, but got none"));
  check_field(o.valid_fraction() >= 0 && o.valid_fraction() < 1, "valid_fraction",
              c10::str("valid_fraction: expected a value in [0, 1), but got ",
                       o.valid_fraction()));
  check_field(std::isfinite(o.lr()) && o.lr() > 0, "lr",
              c10::str("lr: expected a learning rate above 0, but got ", o.lr()));
  check_field(std::isfinite(o.weight_decay()) && o.weight_decay() >= 0, "weight_decay",
              c10::str("weight_decay: expected a value >= 0, but got ", o.weight_decay()));
  check_field(std::isfinite(o.clip()) && o.clip() >= 0, "clip",
              c10::str("clip: expected a gradient norm >= 0 (0: no clipping), but got ",
                       o.clip()));
  check_field(std::isfinite(o.lora_alpha()) && o.lora_alpha() > 0, "lora_alpha",
              c10::str("lora_alpha: expected a value above 0, but got ", o.lora_alpha()));
  check_field(o.save_every() == 0 || !o.out_dir().empty(), "save_every",
              c10::str("save_every: expected an out_dir to save into, but got none"));
}

// The policy and the comparison's: named ones only.
void check_policies(const TrainOptions& o) {
  const auto& compare = o.compare_policy();
  for (const auto* p : {&o.policy(), compare ? &*compare : nullptr}) {
    if (p == nullptr) {
      continue;
    }
    const char* name = p == &o.policy() ? "policy" : "compare_policy";
    // A budget is planned by the Trainer on its model; a custom schedule has
    // no name that a resumed run could parse back.
    check_field(
        p->kind() != CheckpointPolicy::Kind::kCustom, name,
        c10::str(name,
                 ": expected a named policy (none, every-layer, every-K, sqrt, full, "
                 "selective-attention, selective-mlp, budget:SIZE), but got the custom schedule '",
                 p->name(), "'"));
  }
}

} // namespace

void TrainOptions::validate() const {
  // The model's sizes, their rules and bounds: nn::ModelConfig's, the ones
  // every command checks (FieldError names the field, which is the flag's).
  model_.validate();
  check_batching(*this);
  check_counts(*this);
  check_run(*this);
  check_policies(*this);
}

nlohmann::json TrainOptions::to_json() const {
  const auto& m = model_;
  return {
      {"task", to_string(task())},
      {"train_path", train_path_},
      {"valid_path", valid_path_},
      {"valid_fraction", valid_fraction_},
      {"vocab_path", vocab_path_},
      {"seq", m.seq()},
      {"batch", m.batch()},
      {"accumulate", accumulate_},
      {"epochs", epochs_},
      {"max_steps", max_steps_},
      {"max_tokens", max_tokens_},
      {"pack", pack_},
      {"pad_to_seq", pad_to_seq_},
      {"layers", m.layers()},
      {"hidden", m.hidden()},
      {"heads", m.heads()},
      {"kv_heads", m.kv_heads()},
      {"intermediate", m.intermediate()},
      {"vocab", m.vocab()},
      {"attention", nn::to_string(m.attention())},
      {"dropout", m.dropout()},
      {"init_dir", init_dir_},
      {"policy", policy_.name()},
      {"budget_plans", to_string(budget_plans_)},
      {"plan_share", plan_share_},
      {"dtype", nn::model_dtype_name(m.dtype())},
      {"lr", lr_},
      {"weight_decay", weight_decay_},
      {"warmup", warmup_},
      {"schedule", train::to_string(schedule_)},
      {"clip", clip_},
      {"lora_rank", lora_rank_},
      {"lora_alpha", lora_alpha_},
      {"lora_targets", lora_targets_},
      {"seed", seed_},
      {"eval_every", eval_every_},
      {"out_dir", out_dir_},
      {"save_every", save_every_},
      {"compare_policy", compare_policy_ ? json(compare_policy_->name()) : json()},
      {"compare_steps", compare_steps_},
      {"memory_timeline", memory_timeline_},
      {"threads", threads_},
      {"device", device_},
      {"max_bad_steps", max_bad_steps_},
  };
}

namespace {

// What a saved state's option fields are called in refusals.
constexpr const char* kSavedOptions = "training options";

// The model's fields of a saved state into `m`.
void read_model_fields(const io::JsonReader& in, const nlohmann::json& j, nn::ModelConfig& m) {
  const char* what = kSavedOptions;
  m.layers(in.integer("layers"))
      .hidden(in.integer("hidden"))
      .heads(in.integer("heads"))
      .kv_heads(in.integer("kv_heads"))
      .intermediate(in.integer("intermediate"))
      .seq(in.integer("seq"))
      .batch(in.integer("batch"))
      .dropout(in.number("dropout"));
  // "f32" in states saved before the one spelling of --dtype ("fp32").
  const auto dtype = in.string("dtype");
  try {
    m.dtype(nn::parse_model_dtype(dtype));
  } catch (const c10::Error&) {
    TORCH_CHECK(false, what, " field \"dtype\": expected fp32 or bf16, but got '", dtype, "'");
  }
  // States saved before TrainOptions held a ModelConfig have neither: the
  // tokenizer's vocabulary and eager attention, as they trained with.
  if (j.contains("vocab")) {
    m.vocab(in.integer("vocab"));
  }
  if (j.contains("attention")) {
    const auto text = in.string("attention");
    try {
      m.attention(nn::parse_attention(text));
    } catch (const c10::Error&) {
      TORCH_CHECK(false, what, " field \"attention\": expected eager, blockwise or sdpa, but got '",
                  text, "'");
    }
  }
}

// The fields added after the first saved states, each read with its
// default when a state has none.
void read_later_fields(const io::JsonReader& in, const nlohmann::json& j, TrainOptions& o) {
  const char* what = kSavedOptions;
  // States saved before --device existed trained on the CPU.
  if (j.contains("device")) {
    o.device(in.string("device"));
  }
  // And those saved before token budgets and packing, without them.
  if (j.contains("max_tokens")) {
    o.max_tokens(in.integer("max_tokens"));
  }
  if (j.contains("pack")) {
    o.pack(in.boolean("pack"));
  }
  // And those saved before per-shape plans and --pad-to-seq: a budget was
  // planned once, for the worst case, and rows padded to their batch's.
  if (j.contains("pad_to_seq")) {
    o.pad_to_seq(in.boolean("pad_to_seq"));
  }
  if (j.contains("budget_plans")) {
    const auto text = in.string("budget_plans");
    try {
      o.budget_plans(parse_budget_plans(text));
    } catch (const c10::Error&) {
      TORCH_CHECK(false, what, " field \"budget_plans\": expected per-shape or worst-case, but got '",
                  text, "'");
    }
  }
  // And those saved before --plan-share, with its default.
  if (j.contains("plan_share")) {
    o.plan_share(in.number("plan_share"));
  }
  // And those saved before --max-bad-steps, with its default.
  if (j.contains("max_bad_steps")) {
    o.max_bad_steps(in.integer("max_bad_steps"));
  }
}

} // namespace

TrainOptions TrainOptions::from_json(const nlohmann::json& j) {
  const io::JsonReader in(j, kSavedOptions);
  TrainOptions o;
  o.task(parse_task(in.string("task")));
  read_model_fields(in, j, o.model());
  o.train_path(in.string("train_path"))
      .valid_path(in.string("valid_path"))
      .valid_fraction(in.number("valid_fraction"))
      .vocab_path(in.string("vocab_path"))
      .accumulate(in.integer("accumulate"))
      .epochs(in.integer("epochs"))
      .max_steps(in.integer("max_steps"))
      .init_dir(in.string("init_dir"))
      .policy(CheckpointPolicy::parse(in.string("policy")))
      .lr(in.number("lr"))
      .weight_decay(in.number("weight_decay"))
      .warmup(in.integer("warmup"))
      .schedule(parse_lr_schedule_kind(in.string("schedule")))
      .clip(in.number("clip"))
      .lora_rank(in.integer("lora_rank"))
      .lora_alpha(in.number("lora_alpha"))
      .seed(in.unsigned_integer("seed"))
      .eval_every(in.integer("eval_every"))
      .out_dir(in.string("out_dir"))
      .save_every(in.integer("save_every"))
      .compare_steps(in.integer("compare_steps"))
      .memory_timeline(in.boolean("memory_timeline"))
      .threads(in.integer("threads"));
  o.lora_targets(in.strings("lora_targets"));
  read_later_fields(in, j, o);
  const auto& compare = in.at("compare_policy");
  if (!compare.is_null()) {
    o.compare_policy(CheckpointPolicy::parse(in.string("compare_policy")));
  }
  return o;
}

// ---------------------------------------------------------------- records

std::string describe_skipped_step(const StepRecord& r, int64_t max_bad_steps) {
  // What was not finite, the loss first: a NaN loss makes a NaN gradient.
  const std::string what = !std::isfinite(r.loss)
      ? c10::str("loss is ", r.loss)
      : c10::str("gradient norm is ", r.grad_norm, " (loss ", r.loss, ")");
  return c10::str(
      "step ", r.step, ": ", what, "; update skipped (", r.skipped_in_a_row, " of ",
      max_bad_steps, " allowed in a row)");
}

nlohmann::json StepRecord::to_json() const {
  json j{
      {"type", "step"},
      {"step", step},
      {"epoch", epoch},
      {"loss", loss},
      {"lr", lr},
      {"grad_norm", grad_norm},
      {"tokens", tokens},
      {"tokens_per_s", tokens_per_s},
      {"peak_bytes", peak_bytes},
      {"step_seconds", step_seconds},
      {"policy", policy},
      {"rows", rows},
      {"row_tokens", row_tokens},
      {"micro_batches", micro_batches},
  };
  if (!planned.empty()) {
    j["planned"] = planned;
    j["schedule"] = schedule;
    j["predicted_peak_bytes"] = predicted_peak_bytes;
    j["plan_seconds"] = plan_seconds;
    j["covered"] = covered;
  }
  if (reduced_in_backward_bytes > 0 || reduced_after_backward_bytes > 0) {
    j["reduced_in_backward_bytes"] = reduced_in_backward_bytes;
    j["reduced_after_backward_bytes"] = reduced_after_backward_bytes;
  }
  if (compare_loss) {
    j["compare_loss"] = *compare_loss;
    j["loss_diff"] = std::abs(loss - *compare_loss);
  }
  // Only on bad steps: a good step's line is as it always was.
  if (skipped) {
    j["skipped"] = true;
    j["skipped_in_a_row"] = skipped_in_a_row;
  }
  return j;
}

StepRecord StepRecord::from_json(const nlohmann::json& j) {
  const char* what = "step record";
  const io::JsonReader in(j, what);
  StepRecord r;
  r.step = in.integer("step");
  r.epoch = in.integer("epoch");
  r.loss = in.number("loss");
  r.lr = in.number("lr");
  r.grad_norm = in.number("grad_norm");
  r.tokens = in.integer("tokens");
  r.tokens_per_s = in.number("tokens_per_s");
  r.peak_bytes = in.integer("peak_bytes");
  r.step_seconds = in.number("step_seconds");
  r.policy = in.string("policy");
  // Records saved before shapes were recorded have none.
  if (j.contains("rows")) {
    r.rows = in.integer("rows");
    r.row_tokens = in.integer("row_tokens");
    r.micro_batches = in.integer("micro_batches");
  }
  if (j.contains("planned")) {
    r.planned = in.string("planned");
    r.schedule = in.string("schedule");
    r.predicted_peak_bytes = in.integer("predicted_peak_bytes");
    r.plan_seconds = in.number("plan_seconds");
    // Records saved before plan_share ran every batch under its own plan.
    if (j.contains("covered")) {
      r.covered = in.integer("covered");
    }
  }
  if (j.contains("reduced_in_backward_bytes")) {
    r.reduced_in_backward_bytes = in.integer("reduced_in_backward_bytes");
    r.reduced_after_backward_bytes = in.integer("reduced_after_backward_bytes");
  }
  if (j.contains("compare_loss")) {
    r.compare_loss = in.number("compare_loss");
  }
  if (j.contains("skipped")) {
    r.skipped = in.boolean("skipped");
    r.skipped_in_a_row = in.integer("skipped_in_a_row");
  }
  return r;
}

nlohmann::json EvalRecord::to_json() const {
  return {
      {"type", "eval"},
      {"step", step},
      {"epoch", epoch},
      {"loss", loss},
      {"macro_f1", macro_f1},
      {"micro_f1", micro_f1},
      {"per_label_f1", per_label_f1},
      {"perplexity", perplexity},
  };
}

EvalRecord EvalRecord::from_json(const nlohmann::json& j) {
  const char* what = "eval record";
  const io::JsonReader in(j, what);
  EvalRecord r;
  r.step = in.integer("step");
  r.epoch = in.integer("epoch");
  r.loss = in.number("loss");
  r.macro_f1 = in.number("macro_f1");
  r.micro_f1 = in.number("micro_f1");
  r.per_label_f1 = in.numbers("per_label_f1");
  r.perplexity = in.number("perplexity");
  return r;
}

nlohmann::json MemoryTimeline::to_json() const {
  json labels = json::array();
  json bytes = json::array();
  for (const auto& p : points) {
    labels.push_back(p.label);
    bytes.push_back(p.bytes);
  }
  return {{"policy", policy}, {"labels", labels}, {"bytes", bytes}};
}

MemoryTimeline MemoryTimeline::from_json(const nlohmann::json& j) {
  const char* what = "memory timeline";
  const io::JsonReader in(j, what);
  MemoryTimeline t;
  t.policy = in.string("policy");
  const auto& labels = in.at("labels");
  const auto& bytes = in.at("bytes");
  TORCH_CHECK(
      labels.is_array() && bytes.is_array() && labels.size() == bytes.size(), what,
      ": expected arrays \"labels\" and \"bytes\" of one length");
  for (size_t i = 0; i < labels.size(); ++i) {
    TORCH_CHECK(
        labels[i].is_string() && bytes[i].is_number_integer(), what,
        ": expected a string label and an integer byte count at point ", i, ", but got ",
        io::describe_json(labels[i]), " and ", io::describe_json(bytes[i]));
    t.points.push_back({labels[i].get<std::string>(), bytes[i].get<int64_t>()});
  }
  return t;
}

double History::max_compare_diff() const {
  double worst = -1;
  for (const auto& s : steps) {
    if (s.compare_loss) {
      worst = std::max(worst, std::abs(s.loss - *s.compare_loss));
    }
  }
  return worst;
}

nlohmann::json History::to_json() const {
  json timelines_json = json::array();
  for (const auto& t : timelines) {
    timelines_json.push_back(t.to_json());
  }
  return {
      {"steps", records_json(steps)},
      {"evals", records_json(evals)},
      {"compare_policy", compare_policy},
      {"compare_steps", records_json(compare_steps)},
      {"timelines", timelines_json},
      {"label_names", label_names},
  };
}

History History::from_json(const nlohmann::json& j) {
  const io::JsonReader in(j, "history");
  History h;
  h.steps = records_from<StepRecord>(in, "steps");
  h.evals = records_from<EvalRecord>(in, "evals");
  h.compare_policy = in.string("compare_policy");
  h.compare_steps = records_from<StepRecord>(in, "compare_steps");
  h.timelines = records_from<MemoryTimeline>(in, "timelines");
  h.label_names = in.strings("label_names");
  return h;
}

} // namespace train
} // namespace remat
