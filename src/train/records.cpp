// TrainOptions checks, and the JSON of options and records (saved in the
// training state and written to --metrics).
#include "remat/train/trainer.h"

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

const json& field(const json& j, const char* key, const char* what) {
  TORCH_CHECK(j.is_object(), what, ": expected a JSON object, but got ", j.type_name());
  auto it = j.find(key);
  TORCH_CHECK(it != j.end(), what, ": expected a field \"", key, "\", but it is missing");
  return *it;
}

int64_t get_int(const json& j, const char* key, const char* what) {
  const auto& v = field(j, key, what);
  TORCH_CHECK(
      v.is_number_integer(), what, ": expected an integer \"", key, "\", but got ",
      io::describe_json(v));
  return v.get<int64_t>();
}

// NaN and infinity are written as null by nlohmann::json; read them back as NaN.
double get_double(const json& j, const char* key, const char* what) {
  const auto& v = field(j, key, what);
  if (v.is_null()) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  TORCH_CHECK(
      v.is_number(), what, ": expected a number \"", key, "\", but got ",
      io::describe_json(v));
  return v.get<double>();
}

std::string get_string(const json& j, const char* key, const char* what) {
  const auto& v = field(j, key, what);
  TORCH_CHECK(
      v.is_string(), what, ": expected a string \"", key, "\", but got ",
      io::describe_json(v));
  return v.get<std::string>();
}

bool get_bool(const json& j, const char* key, const char* what) {
  const auto& v = field(j, key, what);
  TORCH_CHECK(
      v.is_boolean(), what, ": expected true or false for \"", key, "\", but got ",
      io::describe_json(v));
  return v.get<bool>();
}

std::vector<double> get_doubles(const json& j, const char* key, const char* what) {
  const auto& v = field(j, key, what);
  TORCH_CHECK(v.is_array(), what, ": expected an array \"", key, "\"");
  std::vector<double> out;
  for (const auto& x : v) {
    TORCH_CHECK(
        x.is_null() || x.is_number(), what, ": expected numbers in \"", key, "\", but got ",
        io::describe_json(x));
    out.push_back(x.is_null() ? std::numeric_limits<double>::quiet_NaN() : x.get<double>());
  }
  return out;
}

std::vector<std::string> get_strings(const json& j, const char* key, const char* what) {
  const auto& v = field(j, key, what);
  TORCH_CHECK(v.is_array(), what, ": expected an array \"", key, "\"");
  std::vector<std::string> out;
  for (const auto& x : v) {
    TORCH_CHECK(
        x.is_string(), what, ": expected strings in \"", key, "\", but got ",
        io::describe_json(x));
    out.push_back(x.get<std::string>());
  }
  return out;
}

// A seed is any 64-bit unsigned value; a negative one is a crafted file.
uint64_t get_seed(const json& j, const char* what) {
  const auto& v = field(j, "seed", what);
  TORCH_CHECK(
      v.is_number_unsigned(), what, ": expected an integer \"seed\" >= 0, but got ",
      io::describe_json(v));
  return v.get<uint64_t>();
}

const char* dtype_name(torch::Dtype d) {
  return d == torch::kBFloat16 ? "bf16" : "f32";
}

torch::Dtype parse_dtype(const std::string& s) {
  TORCH_CHECK(
      s == "f32" || s == "bf16", "dtype: expected f32 or bf16, but got '", s, "'");
  return s == "bf16" ? torch::kBFloat16 : torch::kFloat;
}

template <typename Record>
json records_json(const std::vector<Record>& records) {
  json out = json::array();
  for (const auto& r : records) {
    out.push_back(r.to_json());
  }
  return out;
}

template <typename Record>
std::vector<Record> records_from(const json& j, const char* key) {
  const auto& v = field(j, key, "history");
  TORCH_CHECK(v.is_array(), "history: expected an array \"", key, "\"");
  std::vector<Record> out;
  for (const auto& r : v) {
    out.push_back(Record::from_json(r));
  }
  return out;
}

} // namespace

const char* to_string(Task task) {
  return task == Task::kClassification ? "classify" : "lm";
}

Task parse_task(const std::string& text) {
  TORCH_CHECK(
      text == "classify" || text == "lm",
      "task: expected classify or lm, but got '", text, "'");
  return text == "classify" ? Task::kClassification : Task::kCausalLm;
}

// ---------------------------------------------------------------- options

void TrainOptions::validate() const {
  // Below the least: the message callers know; above the bound: past what
  // remat accepts (remat/model_sizes.h), so no count or size overflows.
  auto in_range = [](int64_t v, int64_t min, int64_t max, const char* name) {
    check_field(
        v >= min, name,
        std::string(name) + ": expected a value >= " + std::to_string(min) + ", but got " +
            std::to_string(v));
    check_field(
        v <= max, name,
        std::string(name) + ": expected a value <= " + std::to_string(max) + ", but got " +
            std::to_string(v));
  };
  in_range(seq_, 2, limits::kMaxSeq, "seq");
  in_range(batch_, 1, limits::kMaxBatch, "batch");
  in_range(accumulate_, 1, limits::kMaxCount, "accumulate");
  in_range(epochs_, 1, limits::kMaxCount, "epochs");
  in_range(max_steps_, 0, limits::kMaxCount, "max_steps");
  in_range(layers_, 1, limits::kMaxLayers, "layers");
  in_range(hidden_, 1, limits::kMaxHidden, "hidden");
  in_range(heads_, 1, limits::kMaxHeads, "heads");
  in_range(kv_heads_, 0, limits::kMaxHeads, "kv_heads");
  in_range(intermediate_, 0, limits::kMaxIntermediate, "intermediate");
  in_range(warmup_, -1, limits::kMaxCount, "warmup");
  in_range(lora_rank_, 0, limits::kMaxLoraRank, "lora_rank");
  in_range(eval_every_, 0, limits::kMaxCount, "eval_every");
  in_range(save_every_, 0, limits::kMaxCount, "save_every");
  in_range(compare_steps_, 1, limits::kMaxCount, "compare_steps");
  in_range(threads_, 0, 4096, "threads");
  in_range(max_bad_steps_, 0, limits::kMaxCount, "max_bad_steps");
  try {
    parse_device(device_);
  } catch (const c10::Error& e) {
    throw FieldError("device", c10::str("device: ", e.what_without_backtrace()));
  }
  check_field(!train_path_.empty(), "train_path",
              c10::str("train_path: expected a JSONL file, but got none"));
  check_field(hidden_ % heads_ == 0, "hidden",
              c10::str("hidden: expected a multiple of heads (", heads_, "), but got ", hidden_));
  check_field(
      kv_heads_ == 0 || heads_ % kv_heads_ == 0, "kv_heads",
      c10::str("kv_heads: expected a divisor of heads (", heads_, "), but got ", kv_heads_));
  check_field(valid_fraction_ >= 0 && valid_fraction_ < 1, "valid_fraction",
              c10::str("valid_fraction: expected a value in [0, 1), but got ", valid_fraction_));
  check_field(dropout_ >= 0 && dropout_ < 1, "dropout",
              c10::str("dropout: expected a probability in [0, 1), but got ", dropout_));
  check_field(std::isfinite(lr_) && lr_ > 0, "lr",
              c10::str("lr: expected a learning rate above 0, but got ", lr_));
  check_field(std::isfinite(weight_decay_) && weight_decay_ >= 0, "weight_decay",
              c10::str("weight_decay: expected a value >= 0, but got ", weight_decay_));
  check_field(std::isfinite(clip_) && clip_ >= 0, "clip",
              c10::str("clip: expected a gradient norm >= 0 (0: no clipping), but got ", clip_));
  check_field(std::isfinite(lora_alpha_) && lora_alpha_ > 0, "lora_alpha",
              c10::str("lora_alpha: expected a value above 0, but got ", lora_alpha_));
  check_field(dtype_ == torch::kFloat || dtype_ == torch::kBFloat16, "dtype",
              c10::str("dtype: expected fp32 or bf16, but got ", dtype_));
  check_field(save_every_ == 0 || !out_dir_.empty(), "save_every",
              c10::str("save_every: expected an out_dir to save into, but got none"));
  for (const auto* p : {&policy_, compare_policy_ ? &*compare_policy_ : nullptr}) {
    if (p == nullptr) {
      continue;
    }
    const char* name = p == &policy_ ? "policy" : "compare_policy";
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

nlohmann::json TrainOptions::to_json() const {
  return {
      {"task", to_string(task_)},
      {"train_path", train_path_},
      {"valid_path", valid_path_},
      {"valid_fraction", valid_fraction_},
      {"vocab_path", vocab_path_},
      {"seq", seq_},
      {"batch", batch_},
      {"accumulate", accumulate_},
      {"epochs", epochs_},
      {"max_steps", max_steps_},
      {"layers", layers_},
      {"hidden", hidden_},
      {"heads", heads_},
      {"kv_heads", kv_heads_},
      {"intermediate", intermediate_},
      {"dropout", dropout_},
      {"init_dir", init_dir_},
      {"policy", policy_.name()},
      {"dtype", dtype_name(dtype_)},
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

TrainOptions TrainOptions::from_json(const nlohmann::json& j) {
  const char* what = "training options";
  TrainOptions o;
  o.task(parse_task(get_string(j, "task", what)))
      .train_path(get_string(j, "train_path", what))
      .valid_path(get_string(j, "valid_path", what))
      .valid_fraction(get_double(j, "valid_fraction", what))
      .vocab_path(get_string(j, "vocab_path", what))
      .seq(get_int(j, "seq", what))
      .batch(get_int(j, "batch", what))
      .accumulate(get_int(j, "accumulate", what))
      .epochs(get_int(j, "epochs", what))
      .max_steps(get_int(j, "max_steps", what))
      .layers(get_int(j, "layers", what))
      .hidden(get_int(j, "hidden", what))
      .heads(get_int(j, "heads", what))
      .kv_heads(get_int(j, "kv_heads", what))
      .intermediate(get_int(j, "intermediate", what))
      .dropout(get_double(j, "dropout", what))
      .init_dir(get_string(j, "init_dir", what))
      .policy(CheckpointPolicy::parse(get_string(j, "policy", what)))
      .dtype(parse_dtype(get_string(j, "dtype", what)))
      .lr(get_double(j, "lr", what))
      .weight_decay(get_double(j, "weight_decay", what))
      .warmup(get_int(j, "warmup", what))
      .schedule(parse_lr_schedule_kind(get_string(j, "schedule", what)))
      .clip(get_double(j, "clip", what))
      .lora_rank(get_int(j, "lora_rank", what))
      .lora_alpha(get_double(j, "lora_alpha", what))
      .seed(get_seed(j, what))
      .eval_every(get_int(j, "eval_every", what))
      .out_dir(get_string(j, "out_dir", what))
      .save_every(get_int(j, "save_every", what))
      .compare_steps(get_int(j, "compare_steps", what))
      .memory_timeline(get_bool(j, "memory_timeline", what))
      .threads(get_int(j, "threads", what));
  o.lora_targets(get_strings(j, "lora_targets", what));
  // States saved before --device existed trained on the CPU.
  if (j.contains("device")) {
    o.device(get_string(j, "device", what));
  }
  // And those saved before --max-bad-steps, with its default.
  if (j.contains("max_bad_steps")) {
    o.max_bad_steps(get_int(j, "max_bad_steps", what));
  }
  const auto& compare = field(j, "compare_policy", what);
  if (!compare.is_null()) {
    o.compare_policy(CheckpointPolicy::parse(get_string(j, "compare_policy", what)));
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
  };
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
  StepRecord r;
  r.step = get_int(j, "step", what);
  r.epoch = get_int(j, "epoch", what);
  r.loss = get_double(j, "loss", what);
  r.lr = get_double(j, "lr", what);
  r.grad_norm = get_double(j, "grad_norm", what);
  r.tokens = get_int(j, "tokens", what);
  r.tokens_per_s = get_double(j, "tokens_per_s", what);
  r.peak_bytes = get_int(j, "peak_bytes", what);
  r.step_seconds = get_double(j, "step_seconds", what);
  r.policy = get_string(j, "policy", what);
  if (j.contains("reduced_in_backward_bytes")) {
    r.reduced_in_backward_bytes = get_int(j, "reduced_in_backward_bytes", what);
    r.reduced_after_backward_bytes = get_int(j, "reduced_after_backward_bytes", what);
  }
  if (j.contains("compare_loss")) {
    r.compare_loss = get_double(j, "compare_loss", what);
  }
  if (j.contains("skipped")) {
    r.skipped = get_bool(j, "skipped", what);
    r.skipped_in_a_row = get_int(j, "skipped_in_a_row", what);
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
  EvalRecord r;
  r.step = get_int(j, "step", what);
  r.epoch = get_int(j, "epoch", what);
  r.loss = get_double(j, "loss", what);
  r.macro_f1 = get_double(j, "macro_f1", what);
  r.micro_f1 = get_double(j, "micro_f1", what);
  r.per_label_f1 = get_doubles(j, "per_label_f1", what);
  r.perplexity = get_double(j, "perplexity", what);
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
  MemoryTimeline t;
  t.policy = get_string(j, "policy", what);
  const auto& labels = field(j, "labels", what);
  const auto& bytes = field(j, "bytes", what);
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
  History h;
  h.steps = records_from<StepRecord>(j, "steps");
  h.evals = records_from<EvalRecord>(j, "evals");
  h.compare_policy = get_string(j, "compare_policy", "history");
  h.compare_steps = records_from<StepRecord>(j, "compare_steps");
  h.timelines = records_from<MemoryTimeline>(j, "timelines");
  h.label_names = get_strings(j, "label_names", "history");
  return h;
}

} // namespace train
} // namespace remat
