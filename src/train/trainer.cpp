// The Trainer: data, model, AdamW, schedule; one optimizer step at a time,
// evaluation, the instrumented memory step, and its state on disk.
#include "remat/train/trainer.h"

#include "remat/autocast.h"
#include "remat/io/json_text.h"
#include "remat/model_sizes.h"
#include "remat/distributed/data_parallel.h"
#include "remat/device.h"
#include "remat/distributed/process_group.h"
#include "remat/io/file.h"
#include "remat/io/tokenizer.h"
#include "remat/memory.h"
#include "remat/nn/lora.h"
#include "remat/rng_state.h"
#include "remat/plan/estimate.h"
#include "remat/plan/shape_plans.h"
#include "remat/train/data.h"
#include "remat/train/metrics.h"
#include "remat/train/train_state.h"
#include "train/step_faults.h"
#include "train/task.h"

#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>
#include <torch/version.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cmath>
#include <deque>
#include <limits>
#include <sstream>

namespace remat {
namespace train {

namespace {

using Clock = std::chrono::steady_clock;

// The fault tests install (train/step_faults.h); empty otherwise.
detail::StepFault& step_fault() {
  static detail::StepFault fault;
  return fault;
}

// A batch's tensors on `device` (batches are cut and sharded on the CPU).
Batch to_device(Batch batch, c10::Device device) {
  if (!device.is_cpu()) {
    batch.input_ids = batch.input_ids.to(device);
    batch.attention_mask = batch.attention_mask.to(device);
    batch.labels = batch.labels.to(device);
  }
  return batch;
}

// Rows [begin, end) of `batch`, cut to their longest row (unless
// `keep_length`, --pad-to-seq): micro-batches of one padded batch need not
// carry its padding.
Batch slice_rows(const Batch& batch, int64_t begin, int64_t end, bool lm, bool keep_length) {
  Batch out;
  out.attention_mask = batch.attention_mask.slice(0, begin, end);
  // Tokens come first in a row, then padding (0); a packed row numbers its
  // documents 1, 2, ..., so count what is not padding.
  const int64_t len = keep_length
      ? batch.attention_mask.size(1)
      : std::max<int64_t>(out.attention_mask.ne(0).sum(1).max().item<int64_t>(), 2);
  out.attention_mask = out.attention_mask.narrow(1, 0, len);
  out.input_ids = batch.input_ids.slice(0, begin, end).narrow(1, 0, len);
  out.labels = batch.labels.slice(0, begin, end);
  if (lm) {
    out.labels = out.labels.narrow(1, 0, len);
  }
  out.indices.assign(batch.indices.begin() + begin, batch.indices.begin() + end);
  out.global_size = batch.global_size;
  out.epoch = batch.epoch;
  out.index = batch.index;
  return out;
}

// Rows rank, rank + world, ... of `batch`: this rank's share of a global
// batch. Strided rather than contiguous so that every rank gets rows of
// every part of the batch.
Batch shard_rows(const Batch& batch, int64_t rank, int64_t world) {
  Batch out;
  const int64_t rows = batch.input_ids.size(0);
  out.input_ids = batch.input_ids.slice(0, rank, rows, world);
  out.attention_mask = batch.attention_mask.slice(0, rank, rows, world);
  out.labels = batch.labels.slice(0, rank, rows, world);
  for (int64_t i = rank; i < rows; i += world) {
    out.indices.push_back(batch.indices[static_cast<size_t>(i)]);
  }
  out.global_size = batch.global_size;
  out.epoch = batch.epoch;
  out.index = batch.index;
  return out;
}

// "1.13" of "1.13.1": the LibTorch release whose optimizer archive a state
// holds (patch releases keep the format).
std::string libtorch_release(const std::string& version) {
  const auto first = version.find('.');
  return version.substr(0, version.find('.', first == std::string::npos ? 0 : first + 1));
}

// torch::optim's archive changes across LibTorch releases, and its loader
// does not say so: LibTorch 2.x reading 1.13's AdamW throws a shape mismatch
// or crashes. A state says which LibTorch saved it, and another release is
// refused. States saved before they said so: an archive without the
// serialization id LibTorch 2.1 and later write is an older LibTorch's.
void check_optimizer_libtorch(
    const nlohmann::json& info,
    const torch::Tensor& archive,
    const std::string& path) {
  std::string saved;
  if (info.contains("libtorch") && info.at("libtorch").is_string()) {
    saved = info.at("libtorch").get<std::string>();
  } else if (TORCH_VERSION_MAJOR >= 2) {
    const auto* bytes = static_cast<const char*>(archive.data_ptr());
    const std::string text(bytes, static_cast<size_t>(archive.numel()));
    if (text.find("serialization_id") == std::string::npos) {
      saved = "1.x";
    }
  }
  TORCH_CHECK(
      saved.empty() || libtorch_release(saved) == libtorch_release(TORCH_VERSION), "'", path,
      "' was saved with LibTorch ", saved, ", but this remat runs LibTorch ", TORCH_VERSION,
      ", whose AdamW loader cannot read it: resume with the LibTorch that saved it");
}

// The option fields that a resumed run may change: where and how often it
// saves and evaluates, what it records, threads. The rest shape the loss
// curve and must match the saved run's.
bool may_change_on_resume(const std::string& key) {
  for (const char* k : {"out_dir", "save_every", "eval_every", "compare_policy",
                        "compare_steps", "memory_timeline", "threads", "max_bad_steps",
                        "budget_plans", "plan_share"}) {
    if (key == k) {
      return true;
    }
  }
  return false;
}

} // namespace

namespace detail {

StepFault set_step_fault(StepFault fault) {
  std::swap(step_fault(), fault);
  return fault;
}

int64_t exit_after_step() {
  const char* text = std::getenv("REMAT_TEST_EXIT_AFTER_STEP");
  if (text == nullptr) {
    return 0;
  }
  char* end = nullptr;
  const long long step = std::strtoll(text, &end, 10);
  return end != text && *end == '\0' && step > 0 ? step : 0;
}

} // namespace detail

void check_resume_options(
    const TrainOptions& saved_options,
    const TrainOptions& resumed,
    const std::string& path) {
  const auto saved = saved_options.to_json();
  const auto mine = resumed.to_json();
  for (auto it = saved.begin(); it != saved.end(); ++it) {
    if (may_change_on_resume(it.key())) {
      continue;
    }
    // A FieldError: the option that differs is named, so the CLI turns it
    // into its flag.
    check_field(
        mine.contains(it.key()) && mine.at(it.key()) == it.value(), it.key(),
        c10::str(it.key(), ": the state in '", path, "' was saved by a run with ",
                 it.value().dump(), ", but this run has ",
                 mine.value(it.key(), nlohmann::json()).dump(),
                 "; a resumed run must keep the settings that shape its loss curve"));
  }
}

struct Trainer::Impl {
  TrainOptions options;
  std::shared_ptr<io::Tokenizer> tokenizer;
  std::shared_ptr<Dataset> train_set;
  std::shared_ptr<Dataset> valid_set;
  std::unique_ptr<DataLoader> loader;
  std::unique_ptr<TaskModel> task;
  std::vector<torch::Tensor> trainable;
  std::unique_ptr<torch::optim::AdamW> optimizer;
  std::unique_ptr<LrSchedule> schedule;
  int64_t step = 0;
  int64_t total_steps = 0;
  int64_t skipped_in_a_row = 0; ///< bad steps up to the last (see step())
  History history;
  std::string init_note; ///< what --init loaded
  /// This run's random stream: its CPU generator's state, and its CUDA
  /// device's. Each step draws from it in an RngScope that moves it on, so
  /// trainers in one process do not draw from each other's.
  RngState rng;
  c10::Device device = c10::kCPU; ///< resolved: cuda -> cuda:N
  /// Data parallelism (both null when alone).
  std::shared_ptr<dist::ProcessGroup> group;
  std::unique_ptr<dist::GradReducer> reducer;

  int64_t rank() const {
    return reducer ? group->rank() : 0;
  }
  int64_t world() const {
    return reducer ? group->world_size() : 1;
  }

  bool lm() const {
    return options.task() == Task::kCausalLm;
  }

  std::unique_ptr<torch::optim::AdamW> make_optimizer() const {
    // Decoupled weight decay for matrices only: biases and norm weights
    // (every 1-D parameter) get none, as in BERT and Hugging Face.
    std::vector<torch::Tensor> decay, no_decay;
    for (const auto& p : trainable) {
      (p.dim() >= 2 ? decay : no_decay).push_back(p);
    }
    auto base = torch::optim::AdamWOptions(options.lr()).weight_decay(0.0);
    std::vector<torch::optim::OptimizerParamGroup> groups;
    groups.emplace_back(
        decay, std::make_unique<torch::optim::AdamWOptions>(
                   torch::optim::AdamWOptions(options.lr()).weight_decay(options.weight_decay())));
    groups.emplace_back(no_decay, std::make_unique<torch::optim::AdamWOptions>(base));
    return std::make_unique<torch::optim::AdamW>(std::move(groups), base);
  }

  std::unique_ptr<torch::optim::AdamW> load_optimizer(
      const TrainState& state,
      const std::string& path) const;

  void read_data();
  int64_t data_vocab_size() const;
  void build_model();
  void add_lora();

  // ---- budget:SIZE (see BudgetPlans)
  /// Per-shape plans; null for other policies and worst-case planning.
  std::unique_ptr<plan::ShapePlans> shape_plans;
  /// Worst-case planning's one plan, and the shape it was made for.
  plan::ShapePlan worst_plan;
  std::string schedule_set; ///< the schedule the model runs now
  double unreported_plan_seconds = 0; ///< planning not yet in a StepRecord

  bool budget() const {
    return options.policy().kind() == CheckpointPolicy::Kind::kBudget;
  }
  int64_t reserve_bytes(const plan::BatchShape& shape) const;
  plan::Plan plan_shape(const plan::BatchShape& shape);
  void plan_budget();
  void plan_worst_case();

  /// A micro-batch with the plan it runs under (none without a budget).
  struct PlannedBatch {
    Batch batch;
    c10::optional<plan::ShapePlan> plan;
    bool covered = false; ///< under a larger shape's plan (plan_share)
  };
  std::vector<PlannedBatch> plan_micro_batches(std::vector<Batch> micros);
  void set_schedule(const plan::ShapePlan& p);

  // ---- a step (Trainer::step)
  std::vector<Batch> step_micro_batches(const Batch& batch, int64_t& units);
  double forward_backward(const std::vector<PlannedBatch>& planned, int64_t units);
  double reduce(double loss);
  double gradient_norm();
  bool update(double loss, double grad_norm, double lr);
  /// The step's shape and plans, into `r`.
  static void describe_plans(const std::vector<PlannedBatch>& planned, StepRecord& r);

  std::optional<Batch> next_batch() {
    auto batch = loader->next();
    if (!batch) { // the end of an epoch: the loader has moved to the next
      batch = loader->next();
    }
    return batch;
  }

  /// Micro-batches of `rows_per` rows (default: options.model().batch()).
  std::vector<Batch> micro_batches(const Batch& batch, int64_t rows_per = 0) const {
    if (rows_per <= 0) {
      rows_per = options.model().batch();
    }
    std::vector<Batch> out;
    const int64_t rows = batch.input_ids.size(0);
    for (int64_t begin = 0; begin < rows; begin += rows_per) {
      out.push_back(
          slice_rows(batch, begin, std::min(rows, begin + rows_per), lm(), options.pad_to_seq()));
    }
    return out;
  }

  // Every rank must train the same run: rank 0's options, but for the
  // fields that only say where and how often a rank writes, are the group's.
  // Every rank learns whether one differs, so that none waits for it.
  void check_same_options_as_rank0() {
    const auto mine = options.to_json();
    const auto theirs = nlohmann::json::parse(group->broadcast_string(mine.dump(), 0));
    std::string differs;
    for (auto it = theirs.begin(); it != theirs.end() && differs.empty(); ++it) {
      // max_bad_steps may change on resume, but every rank must stop at
      // the same bad step.
      const bool may_differ = may_change_on_resume(it.key()) && it.key() != "max_bad_steps";
      if (!may_differ && (!mine.contains(it.key()) || mine.at(it.key()) != it.value())) {
        differs = it.key() + ": rank " + std::to_string(group->rank()) + " was started with " +
            mine.value(it.key(), nlohmann::json()).dump() + ", but rank 0 with " +
            it.value().dump();
      }
    }
    std::vector<torch::Tensor> count{torch::full({1}, differs.empty() ? 0.0 : 1.0)};
    group->all_reduce_sum(count);
    TORCH_CHECK(
        differs.empty(), "data parallel: ", differs,
        "; every rank must be started with the same settings");
    const int64_t others = static_cast<int64_t>(count[0].item<double>());
    TORCH_CHECK(
        others == 0, "data parallel: ", others,
        " rank(s) were started with settings other than rank 0's (their errors name them)");
  }
};

// The data of the run: the training set, the validation set (a file, a
// seeded split, or nothing), the loader and the step count.
void Trainer::Impl::read_data() {
  Dataset train = lm() ? read_text_jsonl(options.train_path())
                        : read_classification_jsonl(options.train_path());
  check_field(train.size() > 0, "train_path",
              c10::str("train_path: expected at least one document in '", options.train_path(),
                       "', but got none"));
  check_field(
      lm() || train.num_labels() > 0, "train_path",
      c10::str("train_path: expected labels in '", options.train_path(), "', but got none"));
  Dataset valid;
  if (!options.valid_path().empty()) {
    valid = lm() ? read_text_jsonl(options.valid_path())
                 : read_classification_jsonl(options.valid_path(),
                                             JsonlOptions().label_names(train.label_names));
  } else if (options.valid_fraction() > 0) {
    auto split = split_dataset(train, options.valid_fraction(), options.seed());
    train = std::move(split.train);
    valid = std::move(split.valid);
    check_field(
        train.size() > 0, "valid_fraction",
        c10::str("valid_fraction: ", options.valid_fraction(), " leaves no training documents"));
  }
  history.label_names = train.label_names;
  train_set = std::make_shared<Dataset>(std::move(train));
  if (valid.size() > 0) {
    valid_set = std::make_shared<Dataset>(std::move(valid));
  }
  try {
    loader = std::make_unique<DataLoader>(
        train_set, tokenizer,
        DataLoaderOptions(options.model().batch() * options.accumulate())
            .seed(options.seed())
            .max_len(options.model().seq())
            .max_tokens(options.max_tokens())
            .pack(options.pack())
            .pad_to_max_len(options.pad_to_seq()));
  } catch (const c10::Error& e) {
    // The loader's refusals of a budget or of packing start with the option.
    const std::string what = first_line(e);
    for (const char* field : {"max_tokens", "pack"}) {
      if (what.rfind(std::string(field) + ":", 0) == 0) {
        throw FieldError(field, what);
      }
    }
    throw;
  }
  TORCH_CHECK(
      options.max_steps() > 0 ||
          options.epochs() <= std::numeric_limits<int64_t>::max() / loader->batches_per_epoch(),
      "epochs: expected at most ",
      std::numeric_limits<int64_t>::max() / loader->batches_per_epoch(), " epochs of ",
      loader->batches_per_epoch(), " steps (the step count is a 64-bit integer), but got ",
      options.epochs());
  total_steps = options.max_steps() > 0
      ? options.max_steps()
      : options.epochs() * loader->batches_per_epoch();
}

// The rows of the model's embedding that the data needs: the tokenizer's,
// or with pre-tokenized data its largest id + 1, which the model's
// vocabulary (model().vocab(), or the --init folder's) must hold.
int64_t Trainer::Impl::data_vocab_size() const {
  const bool ids = train_set->pretokenized();
  if (valid_set) {
    check_field(
        valid_set->pretokenized() == ids, "valid_path",
        c10::str("valid_path: expected ", ids ? "token ids (\"input_ids\")" : "text",
                 " as in the training file, but got ", ids ? "text" : "token ids"));
  }
  if (ids) {
    const int64_t largest = std::max(train_set->max_token_id(),
                                     valid_set ? valid_set->max_token_id() : -1);
    check_field(
        options.model().vocab() > 0 || !options.init_dir().empty(), "vocab",
        c10::str("vocab: expected the model's vocabulary size with pre-tokenized data (its "
                 "largest id is ", largest, "), but got none"));
    check_field(
        options.model().vocab() == 0 || options.model().vocab() > largest, "vocab",
        c10::str("vocab: expected more than the data's largest token id, ", largest,
                 ", but got ", options.model().vocab()));
    return largest + 1;
  }
  return tokenizer->vocab_size();
}

// The task's model, from the options' sizes or the --init folder (whose
// weights it then loads).
void Trainer::Impl::build_model() {
  task = make_task_model(options, data_vocab_size(), train_set->num_labels(),
                         train_set->pretokenized());
  if (!options.init_dir().empty()) {
    try {
      init_note = task->load_pretrained(options.init_dir());
    } catch (const c10::Error& e) {
      // The safetensors reader names its file already; a mismatch between
      // the weights and the model config.json describes does not.
      std::string what = first_line(e);
      TORCH_CHECK(
          what.find(options.init_dir()) != std::string::npos, "'", options.init_dir(),
          "': its weights do not fit the model its config.json describes: ", what);
      throw;
    }
  }
}

// LoRA adapters on the targets (the task's by default), the base frozen;
// a classification head, new, trains with them.
void Trainer::Impl::add_lora() {
  auto targets = options.lora_targets().empty() ? task->default_lora_targets()
                                                : options.lora_targets();
  // The estimator's short names ("q", "v") are the model's too (one table,
  // remat/plan/estimate.h); any other name is a module path of its own.
  for (auto& t : targets) {
    try {
      t = plan::lora_target_module(options.model().family(), t);
    } catch (const FieldError&) {
    }
  }
  try {
    nn::apply_lora(
        task->module(),
        nn::LoraOptions().rank(options.lora_rank()).alpha(options.lora_alpha()).targets(targets));
  } catch (const c10::Error& e) {
    // The targets are the user's: name their option, not the function.
    std::string what = first_line(e);
    const auto colon = what.find(": ");
    check_field(false, "lora_targets",
                "lora_targets: " + (colon == std::string::npos ? what : what.substr(colon + 2)));
  }
  // The classification head is new: it trains with the adapters.
  for (auto& kv : task->module().named_parameters()) {
    if (kv.key().rfind("classifier.", 0) == 0) {
      kv.value().set_requires_grad(true);
    }
  }
}

// What a plan made now must add to the bytes held now: AdamW's two moments
// per trainable element before the first update creates them, and for a
// micro-batch after the first of a step, the gradients the earlier ones
// left (the step starts with none).
int64_t Trainer::Impl::reserve_bytes(const plan::BatchShape& shape) const {
  int64_t reserve = 0;
  for (const auto& p : trainable) {
    const int64_t bytes = p.numel() * static_cast<int64_t>(p.element_size());
    reserve += (optimizer->state().empty() ? 2 * bytes : 0) + (shape.accumulating ? bytes : 0);
  }
  return reserve;
}

// The task's step on `shape` planned to the budget, its bytes counted on
// the run's device. Profiling leaves the generators, the gradients and the
// policy as they were. Per-shape plans are made while the run goes on, so
// they profile less: each stage once (no warm-up, one timed run; bytes are
// exact from one run, times noisier), in kStore and the stack's selective
// modes only (not the per-op modes, save-matmuls and save-projections):
// about a seventh of the default profile. The one worst-case plan takes
// the default's medians over every mode.
plan::Plan Trainer::Impl::plan_shape(const plan::BatchShape& shape) {
  const RngScope keep(RngState::capture(device));
  AutocastScope autocast(options.model().autocast(device));
  auto profile = plan::ProfileOptions().device(device);
  if (shape_plans) {
    profile.warmup(0).repeats(1).layer_modes({});
  }
  return task->plan_budget(
      options.policy().budget_bytes(), shape.rows, shape.tokens, reserve_bytes(shape), profile);
}

void Trainer::Impl::set_schedule(const plan::ShapePlan& p) {
  const auto text = p.plan.schedule.str();
  if (text != schedule_set) {
    task->set_policy(CheckpointPolicy::custom(p.plan.schedule, options.policy().name()));
    schedule_set = text;
  }
}

// A budget policy, planned before any optimizer step. Per shape: the
// largest shape this data makes is planned now, so that a budget not even
// one row of the longest document fits is refused before the run starts;
// other shapes are planned as they come (plan_micro_batches).
void Trainer::Impl::plan_budget() {
  if (group || options.budget_plans() == BudgetPlans::kWorstCase) {
    plan_worst_case();
    return;
  }
  const auto t0 = Clock::now();
  const int64_t seq = options.model().seq();
  shape_plans = std::make_unique<plan::ShapePlans>(
      [this](const plan::BatchShape& shape) { return plan_shape(shape); },
      plan::ShapePlansOptions(seq).plan_share(options.plan_share()));
  const int64_t longest = loader->longest_row();
  const int64_t rows = options.max_tokens() > 0
      ? std::max<int64_t>(1, std::min(options.model().batch(), options.max_tokens() / longest))
      : options.model().batch();
  try {
    set_schedule(shape_plans->get({rows, longest, false}));
  } catch (const c10::Error& e) {
    TORCH_CHECK(
        false, "policy '", options.policy().name(), "': one row of ", longest,
        " tokens (the longest ", options.pack() ? "packed row" : "document",
        " of the training set, planned as ", shape_plans->bucket(longest),
        ") fits no schedule: ", first_line(e));
  }
  unreported_plan_seconds += std::chrono::duration<double>(Clock::now() - t0).count();
}

// One plan for the worst shape: micro-batches of --batch rows of seq tokens
// (with a token budget, ceil(max_tokens / seq) rows: r rows of L <= seq
// tokens with r x L <= max_tokens hold no more, as activations grow with
// r x L and attention scores with r x L x L). Data-parallel: rank 0 plans
// for its share of a micro-batch (the largest) and every rank runs that
// plan; plans made apart could differ, since profiled times are noisy, and
// the ranks would no longer recompute in step.
void Trainer::Impl::plan_worst_case() {
  const auto t0 = Clock::now();
  const int64_t world = group ? group->world_size() : 1;
  const int64_t seq = options.model().seq();
  const int64_t micro_rows = options.max_tokens() > 0
      ? std::min(options.model().batch(), (options.max_tokens() + seq - 1) / seq)
      : options.model().batch();
  worst_plan.shape = {(micro_rows + world - 1) / world, seq, false};
  std::string planned; // "PEAK SCHEDULE"
  std::string error;
  if (!group || group->rank() == 0) {
    try {
      const auto p = plan_shape(worst_plan.shape);
      planned = c10::str(p.peak_bytes, " ", p.schedule.str());
    } catch (const c10::Error& e) {
      error = e.what_without_backtrace();
    }
  }
  if (group) {
    const auto shared = group->broadcast_string(error.empty() ? "plan " + planned : "error " + error);
    const auto space = shared.find(' ');
    (shared.compare(0, space, "plan") == 0 ? planned : error) = shared.substr(space + 1);
  }
  TORCH_CHECK(
      error.empty(), "policy '", options.policy().name(), "': ",
      group && group->rank() != 0 ? "rank 0 could not plan it: " : "", error);
  const auto space = planned.find(' ');
  worst_plan.plan.peak_bytes = std::stoll(planned.substr(0, space));
  worst_plan.plan.schedule = Schedule::parse(planned.substr(space + 1));
  set_schedule(worst_plan);
  worst_plan.plan_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  unreported_plan_seconds += worst_plan.plan_seconds;
}

void Trainer::Impl::describe_plans(const std::vector<PlannedBatch>& planned, StepRecord& r) {
  auto join = [](std::string& list, const std::string& item) {
    if (list.empty()) {
      list = item;
    } else if ((" | " + list + " | ").find(" | " + item + " | ") == std::string::npos) {
      list += " | " + item;
    }
  };
  r.micro_batches = static_cast<int64_t>(planned.size());
  for (const auto& m : planned) {
    r.rows += m.batch.input_ids.size(0);
    r.row_tokens = std::max(r.row_tokens, m.batch.input_ids.size(1));
    if (m.plan) {
      join(r.planned, m.plan->shape.str());
      join(r.schedule, m.plan->plan.schedule.str());
      r.predicted_peak_bytes = std::max(r.predicted_peak_bytes, m.plan->plan.peak_bytes);
      r.covered += m.covered ? 1 : 0;
    }
  }
}

// The step's micro-batches, each with the plan it runs under. Per shape, a
// shape no schedule fits comes back in fewer rows: the rest of its rows
// follow as micro-batches of their own (they hold the first's gradients,
// and are planned so). The losses are weighted by loss units, so the
// gradient is the batch's.
std::vector<Trainer::Impl::PlannedBatch> Trainer::Impl::plan_micro_batches(
    std::vector<Batch> micros) {
  std::vector<PlannedBatch> out;
  if (!budget()) {
    for (auto& m : micros) {
      out.push_back({std::move(m), c10::nullopt});
    }
    return out;
  }
  if (!shape_plans) {
    for (auto& m : micros) {
      out.push_back({std::move(m), worst_plan});
    }
    return out;
  }
  std::deque<Batch> todo(
      std::make_move_iterator(micros.begin()), std::make_move_iterator(micros.end()));
  while (!todo.empty()) {
    Batch m = std::move(todo.front());
    todo.pop_front();
    const int64_t rows = m.input_ids.size(0);
    const auto before = shape_plans->stats();
    const auto& p = shape_plans->get({rows, m.input_ids.size(1), !out.empty()});
    unreported_plan_seconds += shape_plans->stats().seconds - before.seconds;
    const bool covered = shape_plans->stats().covered > before.covered;
    if (p.shape.rows < rows) {
      todo.push_front(slice_rows(m, p.shape.rows, rows, lm(), options.pad_to_seq()));
      m = slice_rows(m, 0, p.shape.rows, lm(), options.pad_to_seq());
    }
    out.push_back({std::move(m), p, covered});
  }
  return out;
}

Trainer::Trainer(TrainOptions options, std::shared_ptr<dist::ProcessGroup> group)
    : impl_(std::make_unique<Impl>()) {
  auto& run = *impl_;
  options.validate();
  if (options.vocab_path().empty() && !options.init_dir().empty()) {
    // The model's own tokenizer, or a refusal naming the file remat cannot
    // read; bytes only for a folder with no tokenizer (checked against the
    // model's vocabulary by make_task_model).
    try {
      options.vocab_path(io::folder_tokenizer(options.init_dir()));
    } catch (const c10::Error& e) {
      std::string what = first_line(e);
      throw FieldError("init_dir", what);
    }
  }
  run.options = options;
  if (group && group->world_size() > 1) {
    run.group = std::move(group);
    run.check_same_options_as_rank0();
  }
  run.device = require_device(parse_device(options.device()));
  if (run.device.is_cuda() && run.group) {
    // One GPU per rank, as NCCL wants: the group's, cuda:(rank % GPUs).
    check_field(
        run.group->device().is_cuda(), "device",
        c10::str("device: data parallel training on ", run.device,
                 " needs a ProcessGroup on CUDA (DistOptions::device, NCCL), but this one is on ",
                 run.group->device(), " (Gloo only)"));
    run.device = run.group->device();
  }
  make_current(run.device);
  run.tokenizer = io::make_tokenizer(options.vocab_path());

  run.read_data();

  // Model: everything random comes from the seeded CPU generator, in a
  // fixed order, so that the same options build the same model. The
  // caller's generator state is given back afterwards.
  const RngScope keep_callers(RngState::capture(run.device));
  torch::manual_seed(options.seed()); // the CPU's generator and every GPU's
  run.build_model();
  if (options.lora_rank() > 0) {
    run.add_lora();
  }
  // Built on the CPU (the same weights on every device), then moved.
  run.task->module().to(run.device);
  run.task->set_policy(options.policy());
  run.task->module().train();
  for (const auto& p : run.task->module().parameters()) {
    if (p.requires_grad()) {
      run.trainable.push_back(p);
    }
  }
  run.optimizer = run.make_optimizer();
  if (options.policy().kind() == CheckpointPolicy::Kind::kBudget) {
    run.plan_budget();
  }
  run.rng = RngState::capture(run.device);
  if (run.group) {
    // The same seed builds the same weights everywhere; the broadcast makes
    // sure of it (an --init folder read differently, another build).
    dist::broadcast_parameters(*run.group, run.task->module(), 0);
    // Sums, not averages: each rank's loss is already scaled by its share
    // of the global batch (see step()).
    run.reducer = std::make_unique<dist::GradReducer>(
        run.group, run.trainable, dist::GradReducerOptions().average(false));
  }
  const int64_t warmup = options.warmup() >= 0 ? options.warmup() : run.total_steps / 10;
  run.schedule = std::make_unique<LrSchedule>(
      LrScheduleOptions(options.lr(), run.total_steps)
          .warmup_steps(std::min(warmup, run.total_steps))
          .kind(options.schedule()));
}

Trainer::~Trainer() = default;

// This rank's micro-batches of `batch`, on the device, and the loss units
// (rows or predicted tokens) of the whole global batch: every rank has all
// of it, so no collective is needed to weigh its part.
std::vector<Batch> Trainer::Impl::step_micro_batches(const Batch& batch, int64_t& units) {
  auto micros = micro_batches(batch);
  units = 0;
  for (const auto& m : micros) {
    units += task->loss_units(m);
  }
  if (reducer) {
    group->mark_progress(step + 1);
    // This rank's rows, in micro-batches of 1/world of --batch rows.
    const int64_t per = (options.model().batch() + world() - 1) / world();
    auto shard = shard_rows(batch, rank(), world());
    micros.clear();
    if (shard.input_ids.size(0) > 0) {
      micros = micro_batches(shard, per);
    }
  }
  for (auto& m : micros) {
    m = to_device(std::move(m), device);
  }
  return micros;
}

// Forward and backward of each micro-batch under its plan, its mean loss
// weighted by its share of the step's loss units (the sum is the mean over
// the whole batch). Returns the step's loss.
double Trainer::Impl::forward_backward(const std::vector<PlannedBatch>& planned, int64_t units) {
  double loss = 0;
  for (size_t i = 0; i < planned.size(); ++i) {
    const auto& m = planned[i].batch;
    if (planned[i].plan) {
      set_schedule(*planned[i].plan);
    }
    if (reducer) {
      // Only the last micro-batch's backward starts the all-reduces (the
      // others would reduce gradients that are still accumulating).
      reducer->prepare_for_backward(/*sync=*/i + 1 == planned.size());
    }
    torch::Tensor scaled;
    {
      AutocastScope autocast(options.model().autocast(device));
      const double weight = units > 0
          ? static_cast<double>(task->loss_units(m)) / static_cast<double>(units)
          : 0.0;
      scaled = task->loss(m) * weight;
    }
    scaled.backward();
    loss += scaled.item<double>();
  }
  return loss;
}

// Data parallel: the gradients summed over the ranks, and the loss (each
// rank's is its share's); a rank's failure named.
double Trainer::Impl::reduce(double loss) {
  try {
    reducer->reduce();
    std::vector<torch::Tensor> sum{torch::full({1}, loss, torch::kDouble)};
    group->all_reduce_sum(sum);
    return sum[0].item<double>();
  } catch (const c10::Error& e) {
    std::string what = first_line(e);
    const std::string who = group->describe_failure(step + 1);
    TORCH_CHECK(false, what, who.empty() ? "" : "; " + who, " (at step ", step + 1, ")");
  }
}

// The global L2 norm of the gradients before clipping (clipped when --clip).
double Trainer::Impl::gradient_norm() {
  if (options.clip() > 0) {
    return torch::nn::utils::clip_grad_norm_(trainable, options.clip());
  }
  torch::NoGradGuard no_grad;
  double sq = 0;
  for (const auto& p : trainable) {
    if (p.grad().defined()) {
      sq += p.grad().pow(2).sum().item<double>();
    }
  }
  return std::sqrt(sq);
}

// AdamW's update at `lr`, unless the loss or the gradient norm is NaN or
// infinite: they would spoil the weights and AdamW's moments for good, so
// the update is skipped instead, and the step still counts (batch, step
// counter, schedule), so the run keeps its length and data order. Every
// rank decides alike: `loss` is the sum over the ranks (non-finite on all
// when it is on one), `grad_norm` that of the summed gradients. Returns
// whether the step was bad.
bool Trainer::Impl::update(double loss, double grad_norm, double lr) {
  const bool bad = !std::isfinite(loss) || !std::isfinite(grad_norm);
  if (bad) {
    for (auto& p : trainable) {
      p.mutable_grad() = torch::Tensor();
    }
    ++skipped_in_a_row;
    return true;
  }
  for (auto& g : optimizer->param_groups()) {
    static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
  }
  optimizer->step();
  skipped_in_a_row = 0;
  return false;
}

StepRecord Trainer::step() {
  auto& run = *impl_;
  auto batch = run.next_batch();
  TORCH_INTERNAL_ASSERT(batch, "the data loader returned no batch");
  int64_t units = 0;
  auto micros = run.step_micro_batches(*batch, units);
  for (auto& p : run.trainable) {
    p.mutable_grad() = torch::Tensor();
  }
  // Planned before the clock starts and the peak is reset: a new shape's
  // profile is planning, not the step.
  const auto planned = run.plan_micro_batches(std::move(micros));
  RngScope rng(run.rng, /*advanced=*/&run.rng);
  synchronize(run.device);
  memory::reset_peak(run.device);
  const auto t0 = Clock::now();
  double loss = run.forward_backward(planned, units);
  if (step_fault()) {
    step_fault()(run.step + 1, run.rank(), loss, run.trainable);
  }
  if (run.reducer) {
    loss = run.reduce(loss);
  }
  const double grad_norm = run.gradient_norm();
  const double lr = run.schedule->lr(run.step);
  const bool bad = run.update(loss, grad_norm, lr);
  synchronize(run.device); // the clock stops when the GPU is done
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  ++run.step;

  StepRecord r;
  r.step = run.step;
  r.epoch = batch->epoch;
  r.loss = loss;
  r.lr = lr;
  r.grad_norm = grad_norm;
  // A packed row's mask numbers its documents: count what is not padding.
  r.tokens = batch->attention_mask.ne(0).sum().item<int64_t>();
  r.step_seconds = seconds;
  if (run.reducer) {
    r.reduced_in_backward_bytes = run.reducer->stats().bytes_in_backward;
    r.reduced_after_backward_bytes = run.reducer->stats().bytes_in_reduce;
  }
  r.tokens_per_s = seconds > 0 ? static_cast<double>(r.tokens) / seconds : 0;
  r.peak_bytes = memory::peak_bytes(run.device);
  r.policy = run.options.policy().name();
  Impl::describe_plans(planned, r);
  r.plan_seconds = run.unreported_plan_seconds;
  run.unreported_plan_seconds = 0;
  if (run.shape_plans) {
    run.shape_plans->ran(seconds);
  }
  const auto& compared = run.history.compare_steps;
  if (static_cast<size_t>(r.step) <= compared.size()) {
    r.compare_loss = compared[static_cast<size_t>(r.step - 1)].loss;
  }
  r.skipped = bad;
  r.skipped_in_a_row = run.skipped_in_a_row;
  run.history.steps.push_back(r);
  return r;
}

bool Trainer::has_validation() const {
  return impl_->valid_set != nullptr;
}

EvalRecord Trainer::evaluate() {
  auto& run = *impl_;
  TORCH_CHECK(has_validation(), "evaluate: this run has no validation set");
  RngScope rng(run.rng);
  torch::NoGradGuard no_grad;
  auto& module = run.task->module();
  const bool was_training = module.is_training();
  module.eval();
  AutocastScope autocast(run.options.model().autocast(run.device));

  const auto& valid = *run.valid_set;
  MultilabelF1 f1(std::max<int64_t>(valid.num_labels(), 1));
  double loss_sum = 0;
  int64_t units = 0;
  std::vector<int64_t> indices;
  for (int64_t begin = 0; begin < valid.size(); begin += run.options.model().batch()) {
    indices.clear();
    for (int64_t i = begin; i < std::min(valid.size(), begin + run.options.model().batch()); ++i) {
      indices.push_back(i);
    }
    auto batch = to_device(
        collate(valid, indices, *run.tokenizer, CollateOptions().max_len(run.options.model().seq())),
        run.device);
    torch::Tensor logits;
    auto loss = run.task->loss(batch, &logits);
    const int64_t n = run.task->loss_units(batch);
    loss_sum += loss.item<double>() * static_cast<double>(n);
    units += n;
    if (!run.lm()) {
      f1.update(logits.to(torch::kFloat), batch.labels);
    }
  }
  module.train(was_training);

  EvalRecord r;
  r.step = run.step;
  r.epoch = run.history.steps.empty() ? 0 : run.history.steps.back().epoch;
  r.loss = units > 0 ? loss_sum / static_cast<double>(units) : 0;
  if (run.lm()) {
    r.perplexity = std::exp(r.loss);
  } else {
    auto scores = f1.compute();
    r.macro_f1 = scores.macro;
    r.micro_f1 = scores.micro;
    r.per_label_f1 = scores.per_label;
  }
  run.history.evals.push_back(r);
  return r;
}

MemoryTimeline Trainer::memory_timeline() {
  auto& run = *impl_;
  // Nothing of this step may reach the run: RNG, data position and
  // gradients are put back afterwards.
  RngScope rng(run.rng);
  const auto position = run.loader->position();
  auto batch = run.next_batch();
  run.loader->set_position(position);
  TORCH_INTERNAL_ASSERT(batch);
  auto micro = to_device(run.micro_batches(*batch).front(), run.device);

  std::vector<torch::Tensor> grads;
  for (auto& p : run.trainable) {
    grads.push_back(p.grad());
    p.mutable_grad() = torch::Tensor();
  }
  MemoryTimeline timeline;
  timeline.policy = run.options.policy().name();
  auto points = std::make_shared<std::vector<TimelinePoint>>();
  const auto device = run.device;
  Sample sample = [points, device](const std::string& label) {
    points->push_back({label, memory::current_bytes(device)});
  };
  {
    torch::Tensor loss;
    {
      AutocastScope autocast(run.options.model().autocast(run.device));
      loss = run.task->instrumented_loss(micro, sample);
    }
    loss.backward();
  }
  for (auto& p : run.trainable) {
    p.mutable_grad() = torch::Tensor();
  }
  sample("end of backward");
  for (size_t i = 0; i < run.trainable.size(); ++i) {
    run.trainable[i].mutable_grad() = grads[i];
  }
  timeline.points = *points;
  return timeline;
}

void Trainer::save_state(const std::string& dir) {
  auto& run = *impl_;
  TrainState state;
  // The state file holds CPU tensors, whatever the device.
  for (const auto& kv : run.task->module().named_parameters()) {
    state.tensors["model." + kv.key()] = kv.value().detach().to(torch::kCPU);
  }
  for (const auto& kv : run.task->module().named_buffers()) {
    state.tensors["model." + kv.key()] = kv.value().detach().to(torch::kCPU);
  }
  torch::serialize::OutputArchive archive;
  run.optimizer->save(archive);
  std::string bytes;
  archive.save_to([&bytes](const void* data, size_t n) {
    bytes.append(static_cast<const char*>(data), n);
    return n;
  });
  state.tensors["optimizer"] =
      torch::from_blob(bytes.data(), {static_cast<int64_t>(bytes.size())}, torch::kUInt8)
          .clone();
  state.tensors["rng.cpu"] = run.rng.cpu.clone();
  if (run.rng.cuda.defined()) {
    state.tensors["rng.cuda"] = run.rng.cuda.clone();
  }
  state.info = {
      {"step", run.step},
      {"epoch", epoch()},
      {"total_steps", run.total_steps},
      {"loader", run.loader->position().to_json()},
      {"schedule",
       {{"kind", to_string(run.schedule->options().kind())},
        {"lr", run.schedule->options().lr()},
        {"warmup_steps", run.schedule->options().warmup_steps()},
        {"total_steps", run.schedule->options().total_steps()},
        {"next_lr", run.schedule->lr(run.step)}}},
      {"options", run.options.to_json()},
      {"history", run.history.to_json()},
      {"libtorch", TORCH_VERSION},
  };
  save_train_state(dir, state);
}

namespace {

// The state's tensor for each of the module's parameters and buffers,
// checked for shape and dtype: (the module's, the state's) pairs to copy.
std::vector<std::pair<torch::Tensor, torch::Tensor>> state_weights(
    const TrainState& state,
    const torch::nn::Module& module,
    const std::string& path) {
  std::vector<std::pair<torch::Tensor, torch::Tensor>> copies;
  auto take = [&](const std::string& name, const torch::Tensor& target) {
    auto it = state.tensors.find("model." + name);
    TORCH_CHECK(it != state.tensors.end(), "'", path, "' lacks the tensor ", name);
    TORCH_CHECK(
        it->second.sizes() == target.sizes() &&
            it->second.scalar_type() == target.scalar_type(),
        "'", path, "' holds ", name, " with shape ", it->second.sizes(), " and dtype ",
        it->second.scalar_type(), ", but the model has ", target.sizes(), " and ",
        target.scalar_type());
    copies.emplace_back(target, it->second);
  };
  for (const auto& kv : module.named_parameters()) {
    take(kv.key(), kv.value());
  }
  for (const auto& kv : module.named_buffers()) {
    take(kv.key(), kv.value());
  }
  return copies;
}

// A record of bytes in the state: a 1-D uint8 tensor.
const torch::Tensor& state_bytes(
    const TrainState& state,
    const char* key,
    const char* name,
    const std::string& path) {
  auto it = state.tensors.find(key);
  TORCH_CHECK(it != state.tensors.end(), "'", path, "' lacks the optimizer or RNG state");
  const auto& t = it->second;
  TORCH_CHECK(
      t.scalar_type() == torch::kByte && t.dim() == 1, "'", path, "' is damaged: the ", name,
      " record must be a 1-D U8 tensor, but it is ", t.scalar_type(), " with shape ", t.sizes());
  return t;
}

// The state's CPU generator state, checked by putting it in place once.
torch::Tensor state_rng(const TrainState& state, const std::string& path) {
  const auto& bytes = state_bytes(state, "rng.cpu", "RNG", path);
  const int64_t expected = RngState::capture(c10::Device(c10::kCPU)).cpu.numel();
  TORCH_CHECK(
      bytes.numel() == expected, "'", path, "' is damaged: its RNG record holds ",
      bytes.numel(), " bytes, but a CPU generator state is ", expected);
  RngState probe;
  probe.cpu = bytes.clone();
  try {
    RngScope check(probe); // throws for a malformed state
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "'", path, "' is damaged: its RNG record is not a CPU generator state");
  }
  return probe.cpu;
}

} // namespace

// A new AdamW holding the state's optimizer record.
std::unique_ptr<torch::optim::AdamW> Trainer::Impl::load_optimizer(
    const TrainState& state,
    const std::string& path) const {
  const auto& bytes = state_bytes(state, "optimizer", "optimizer", path);
  state_bytes(state, "rng.cpu", "RNG", path); // both named before either is read
  check_optimizer_libtorch(state.info, bytes, path);
  auto optimizer = make_optimizer();
  try {
    torch::serialize::InputArchive archive;
    archive.load_from(
        static_cast<const char*>(bytes.data_ptr()), static_cast<size_t>(bytes.numel()));
    optimizer->load(archive);
  } catch (const std::exception& e) {
    // LibTorch's reader says "PytorchStreamReader failed ..." and the like.
    TORCH_CHECK(
        false, "'", path, "' is damaged: its optimizer record (", bytes.numel(),
        " bytes) is not an AdamW state this model can load");
  }
  return optimizer;
}

void Trainer::load_state(const std::string& path) {
  auto& run = *impl_;
  auto state = load_train_state(path);
  const auto& info = state.info;
  auto need = [&](const char* key) -> const nlohmann::json& {
    TORCH_CHECK(
        info.contains(key), "'", path, "' is not a complete training state (no \"",
        key, "\")");
    return info.at(key);
  };
  // A field of the state document, read by `read`: whatever it throws (a
  // check of ours, or nlohmann's type errors) becomes one line naming the
  // file and the field.
  auto read_field = [&](const char* key, auto&& read) {
    const auto& value = need(key);
    try {
      return read(value);
    } catch (const c10::Error& e) {
      std::string what = first_line(e);
      TORCH_CHECK(
          false, "'", path, "' is damaged: field \"", key, "\": ",
          what);
    } catch (const nlohmann::json::exception& e) {
      TORCH_CHECK(
          false, "'", path, "' is damaged: field \"", key, "\": ", io::json_error_text(e));
    }
  };
  // Everything is read and checked before anything changes.
  auto saved = read_field(
      "options", [](const nlohmann::json& j) { return TrainOptions::from_json(j); });
  check_resume_options(saved, run.options, path);
  const int64_t step = read_field("step", [](const nlohmann::json& j) {
    TORCH_CHECK(
        j.is_number_integer(), "expected an integer, but got ", io::describe_json(j));
    return j.get<int64_t>();
  });
  TORCH_CHECK(
      step >= 0 && step <= run.total_steps, "'", path, "' is at step ", step,
      ", outside this run's ", run.total_steps, " steps");
  auto position = read_field(
      "loader", [](const nlohmann::json& j) { return LoaderPosition::from_json(j); });
  auto history =
      read_field("history", [](const nlohmann::json& j) { return History::from_json(j); });

  auto copies = state_weights(state, run.task->module(), path);
  auto optimizer = run.load_optimizer(state, path);
  const auto rng_cpu = state_rng(state, path);
  run.loader->set_position(position);

  // Commit.
  {
    torch::NoGradGuard no_grad;
    for (auto& c : copies) {
      c.first.copy_(c.second);
    }
  }
  run.optimizer = std::move(optimizer);
  run.rng.cpu = rng_cpu;
  auto cuda_it = state.tensors.find("rng.cuda");
  if (run.device.is_cuda() && cuda_it != state.tensors.end()) {
    run.rng.cuda_device = run.device.index();
    run.rng.cuda = cuda_it->second.clone();
  }
  run.step = step;
  // The count of bad steps in a row is the last record's.
  run.skipped_in_a_row = history.steps.empty() ? 0 : history.steps.back().skipped_in_a_row;
  history.label_names = run.history.label_names;
  run.history = std::move(history);
}

void Trainer::save_model(const std::string& dir) const {
  const auto& run = *impl_;
  run.task->save_pretrained(dir, run.history.label_names);
  if (!run.options.vocab_path().empty()) {
    io::write_file_atomic(dir + "/vocab.txt", io::read_file(run.options.vocab_path()));
  }
}

std::string Trainer::summary() const {
  const auto& run = *impl_;
  std::ostringstream out;
  out << run.task->describe() << ", " << parameter_count() << " parameters (" << trainable_parameter_count()
      << " trainable); " << run.train_set->size() << " training documents, "
      << (run.valid_set ? run.valid_set->size() : 0) << " validation; "
      << steps_per_epoch() << " steps per epoch of " << run.options.model().batch() << " x "
      << run.options.accumulate() << " rows";
  if (!run.init_note.empty()) {
    out << "; " << run.init_note;
  }
  return out.str();
}

int64_t Trainer::step_count() const {
  return impl_->step;
}
int64_t Trainer::total_steps() const {
  return impl_->total_steps;
}
int64_t Trainer::steps_per_epoch() const {
  return impl_->loader->batches_per_epoch();
}
int64_t Trainer::epoch() const {
  auto p = impl_->loader->position();
  return p.index >= impl_->loader->batches_per_epoch() ? p.epoch + 1 : p.epoch;
}
const TrainOptions& Trainer::options() const {
  return impl_->options;
}
History& Trainer::history() {
  return impl_->history;
}
const History& Trainer::history() const {
  return impl_->history;
}
torch::nn::Module& Trainer::model() {
  return impl_->task->module();
}
int64_t Trainer::parameter_count() const {
  int64_t n = 0;
  for (const auto& p : impl_->task->module().parameters()) {
    n += p.numel();
  }
  return n;
}
int64_t Trainer::trainable_parameter_count() const {
  int64_t n = 0;
  for (const auto& p : impl_->trainable) {
    n += p.numel();
  }
  return n;
}

} // namespace train
} // namespace remat
