// The Trainer: data, model, AdamW, schedule; one optimizer step at a time,
// evaluation, the instrumented memory step, and its state on disk.
#include "remat/train/trainer.h"

#include "remat/autocast.h"
#include "remat/io/json_text.h"
#include "remat/model_sizes.h"
#include "remat/dist/data_parallel.h"
#include "remat/device.h"
#include "remat/dist/process_group.h"
#include "remat/io/file.h"
#include "remat/io/tokenizer.h"
#include "remat/memory.h"
#include "remat/nn/lora.h"
#include "remat/train/data.h"
#include "remat/train/metrics.h"
#include "remat/train/train_state.h"
#include "train/step_faults.h"
#include "train/task.h"

#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
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

torch::Tensor rng_state() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_rng_state(const torch::Tensor& state) {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

/// Puts `state` into the CPU generator for its lifetime (dropout draws from
/// it), then stores what became of it back into `state` when `advance`, and
/// gives the generator back the state it had. Each trainer thus has a
/// random stream of its own: two trainers in one process, a comparison run
/// or an instrumented step, do not draw from each other's. On a CUDA device
/// the same for its generator, from `cuda_state` (dropout on CUDA draws
/// from that one).
class RngScope {
 public:
  RngScope(torch::Tensor& state, bool advance)
      : state_(state), advance_(advance), outer_(rng_state()) {
    set_rng_state(state_);
  }
  RngScope(torch::Tensor& state, torch::Tensor& cuda_state, c10::Device device, bool advance)
      : RngScope(state, advance) {
    if (device.is_cuda() && cuda_state.defined()) {
      cuda_state_ = &cuda_state;
      device_ = device;
      cuda_outer_ = cuda_rng_state(device);
      set_cuda_rng_state(device, cuda_state);
    }
  }
  ~RngScope() {
    if (cuda_state_ != nullptr) {
      if (advance_) {
        *cuda_state_ = cuda_rng_state(device_);
      }
      set_cuda_rng_state(device_, cuda_outer_);
    }
    if (advance_) {
      state_ = rng_state();
    }
    set_rng_state(outer_);
  }
  RngScope(const RngScope&) = delete;
  RngScope& operator=(const RngScope&) = delete;

 private:
  torch::Tensor& state_;
  bool advance_;
  torch::Tensor outer_;
  torch::Tensor* cuda_state_ = nullptr;
  c10::Device device_ = c10::kCPU;
  torch::Tensor cuda_outer_;
};

// BF16 autocast on the device the model is on (CPU or CUDA), float32
// master weights.
AutocastState autocast_for(torch::Dtype dtype, c10::Device device) {
  AutocastState s = AutocastState::capture();
  if (device.is_cuda()) {
    s.cuda_enabled = dtype == torch::kBFloat16;
    s.cuda_dtype = torch::kBFloat16;
  } else {
    s.cpu_enabled = dtype == torch::kBFloat16;
    s.cpu_dtype = torch::kBFloat16;
  }
  return s;
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

// Rows [begin, end) of `batch`, cut to their longest row: micro-batches of
// one padded batch need not carry its padding.
Batch slice_rows(const Batch& batch, int64_t begin, int64_t end, bool lm) {
  Batch out;
  out.attention_mask = batch.attention_mask.slice(0, begin, end);
  const int64_t len = std::max<int64_t>(
      out.attention_mask.sum(1).max().item<int64_t>(), 2);
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

// The option fields that a resumed run may change: where and how often it
// saves and evaluates, what it records, threads. The rest shape the loss
// curve and must match the saved run's.
bool may_change_on_resume(const std::string& key) {
  for (const char* k : {"out_dir", "save_every", "eval_every", "compare_policy",
                        "compare_steps", "memory_timeline", "threads", "max_bad_steps"}) {
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
  torch::Tensor rng; ///< this run's CPU generator state (see RngScope)
  torch::Tensor cuda_rng; ///< and its CUDA device's (undefined on the CPU)
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

  std::optional<Batch> next_batch() {
    auto batch = loader->next();
    if (!batch) { // the end of an epoch: the loader has moved to the next
      batch = loader->next();
    }
    return batch;
  }

  /// Micro-batches of `rows_per` rows (default: options.batch()).
  std::vector<Batch> micro_batches(const Batch& batch, int64_t rows_per = 0) const {
    if (rows_per <= 0) {
      rows_per = options.batch();
    }
    std::vector<Batch> out;
    const int64_t rows = batch.input_ids.size(0);
    for (int64_t begin = 0; begin < rows; begin += rows_per) {
      out.push_back(slice_rows(batch, begin, std::min(rows, begin + rows_per), lm()));
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

Trainer::Trainer(TrainOptions options, std::shared_ptr<dist::ProcessGroup> group)
    : impl_(std::make_unique<Impl>()) {
  auto& d = *impl_;
  options.validate();
  if (options.vocab_path().empty() && !options.init_dir().empty()) {
    // The model's own tokenizer, or a refusal naming the file remat cannot
    // read; bytes only for a folder with no tokenizer (checked against the
    // model's vocabulary by make_task_model).
    try {
      options.vocab_path(io::folder_tokenizer(options.init_dir()));
    } catch (const c10::Error& e) {
      const std::string what = e.what_without_backtrace();
      throw FieldError("init_dir", what.substr(0, what.find('\n')));
    }
  }
  d.options = options;
  if (group && group->world_size() > 1) {
    d.group = std::move(group);
    d.check_same_options_as_rank0();
  }
  d.device = require_device(parse_device(options.device()));
  if (d.device.is_cuda() && d.group) {
    // One GPU per rank, as NCCL wants: the group's, cuda:(rank % GPUs).
    check_field(
        d.group->device().is_cuda(), "device",
        c10::str("device: data parallel training on ", d.device,
                 " needs a ProcessGroup on CUDA (DistOptions::device, NCCL), but this one is on ",
                 d.group->device(), " (Gloo only)"));
    d.device = d.group->device();
  }
  make_current(d.device);
  d.tokenizer = io::make_tokenizer(options.vocab_path());

  // Data: the validation set is a file, a seeded split, or nothing.
  Dataset train = d.lm() ? read_text_jsonl(options.train_path())
                         : read_classification_jsonl(options.train_path());
  check_field(train.size() > 0, "train_path",
              c10::str("train_path: expected at least one document in '", options.train_path(),
                       "', but got none"));
  check_field(
      d.lm() || train.num_labels() > 0, "train_path",
      c10::str("train_path: expected labels in '", options.train_path(), "', but got none"));
  Dataset valid;
  if (!options.valid_path().empty()) {
    valid = d.lm() ? read_text_jsonl(options.valid_path())
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
  d.history.label_names = train.label_names;
  d.train_set = std::make_shared<Dataset>(std::move(train));
  if (valid.size() > 0) {
    d.valid_set = std::make_shared<Dataset>(std::move(valid));
  }
  d.loader = std::make_unique<DataLoader>(
      d.train_set, d.tokenizer,
      DataLoaderOptions(options.batch() * options.accumulate())
          .seed(options.seed())
          .max_len(options.seq()));
  TORCH_CHECK(
      options.max_steps() > 0 ||
          options.epochs() <= std::numeric_limits<int64_t>::max() / d.loader->batches_per_epoch(),
      "epochs: expected at most ",
      std::numeric_limits<int64_t>::max() / d.loader->batches_per_epoch(), " epochs of ",
      d.loader->batches_per_epoch(), " steps (the step count is a 64-bit integer), but got ",
      options.epochs());
  d.total_steps = options.max_steps() > 0
      ? options.max_steps()
      : options.epochs() * d.loader->batches_per_epoch();

  // Model: everything random comes from the seeded CPU generator, in a
  // fixed order, so that the same options build the same model. The
  // caller's generator state is given back afterwards.
  const torch::Tensor caller_rng = rng_state();
  const torch::Tensor caller_cuda_rng = cuda_rng_state(d.device);
  torch::manual_seed(options.seed()); // the CPU's generator and every GPU's
  d.task = make_task_model(options, d.tokenizer->vocab_size(), d.train_set->num_labels());
  if (!options.init_dir().empty()) {
    try {
      d.init_note = d.task->load_pretrained(options.init_dir());
    } catch (const c10::Error& e) {
      // The safetensors reader names its file already; a mismatch between
      // the weights and the model config.json describes does not.
      std::string what = e.what_without_backtrace();
      what = what.substr(0, what.find('\n'));
      TORCH_CHECK(
          what.find(options.init_dir()) != std::string::npos, "'", options.init_dir(),
          "': its weights do not fit the model its config.json describes: ", what);
      throw;
    }
  }
  if (options.lora_rank() > 0) {
    auto targets = options.lora_targets().empty() ? d.task->default_lora_targets()
                                                  : options.lora_targets();
    try {
      nn::apply_lora(
          d.task->module(),
          nn::LoraOptions().rank(options.lora_rank()).alpha(options.lora_alpha()).targets(targets));
    } catch (const c10::Error& e) {
      // The targets are the user's: name their option, not the function.
      std::string what = e.what_without_backtrace();
      what = what.substr(0, what.find('\n'));
      const auto colon = what.find(": ");
      check_field(false, "lora_targets",
                  "lora_targets: " + (colon == std::string::npos ? what : what.substr(colon + 2)));
    }
    // The classification head is new: it trains with the adapters.
    for (auto& kv : d.task->module().named_parameters()) {
      if (kv.key().rfind("classifier.", 0) == 0) {
        kv.value().set_requires_grad(true);
      }
    }
  }
  // Built on the CPU (the same weights on every device), then moved.
  d.task->module().to(d.device);
  d.task->set_policy(options.policy());
  d.task->module().train();
  for (const auto& p : d.task->module().parameters()) {
    if (p.requires_grad()) {
      d.trainable.push_back(p);
    }
  }
  d.optimizer = d.make_optimizer();
  if (options.policy().kind() == CheckpointPolicy::Kind::kBudget) {
    // Planned here, before any optimizer step: AdamW's two moments per
    // trainable element do not exist yet, so they are reserved. Profiling
    // leaves the generator as it was.
    int64_t moments = 0;
    for (const auto& p : d.trainable) {
      moments += 2 * p.numel() * static_cast<int64_t>(p.element_size());
    }
    // Data-parallel: rank 0 plans for its share of each micro-batch (the
    // largest one) and every rank runs that plan. Plans made apart could
    // differ, since profiled times are noisy, and the ranks would no
    // longer recompute in step.
    const int64_t world = d.group ? d.group->world_size() : 1;
    const int64_t rows = (options.batch() + world - 1) / world;
    std::string schedule;
    std::string error;
    if (!d.group || d.group->rank() == 0) {
      AutocastScope autocast(autocast_for(options.dtype(), d.device));
      try {
        schedule = d.task->plan_policy(options.policy(), rows, options.seq(), moments)
                       .custom_schedule()
                       .str();
      } catch (const c10::Error& e) {
        error = e.what_without_backtrace();
      }
    }
    if (d.group) {
      const auto shared = d.group->broadcast_string(error.empty() ? "plan " + schedule
                                                                  : "error " + error);
      const auto space = shared.find(' ');
      (shared.compare(0, space, "plan") == 0 ? schedule : error) = shared.substr(space + 1);
    }
    TORCH_CHECK(
        error.empty(), "policy '", options.policy().name(), "': ",
        d.group && d.group->rank() != 0 ? "rank 0 could not plan it: " : "", error);
    d.task->set_policy(
        CheckpointPolicy::custom(Schedule::parse(schedule), options.policy().name()));
  }
  d.rng = rng_state();
  set_rng_state(caller_rng);
  d.cuda_rng = cuda_rng_state(d.device);
  set_cuda_rng_state(d.device, caller_cuda_rng);
  if (d.group) {
    // The same seed builds the same weights everywhere; the broadcast makes
    // sure of it (an --init folder read differently, another build).
    dist::broadcast_parameters(*d.group, d.task->module(), 0);
    // Sums, not averages: each rank's loss is already scaled by its share
    // of the global batch (see step()).
    d.reducer = std::make_unique<dist::GradReducer>(
        d.group, d.trainable, dist::GradReducerOptions().average(false));
  }
  const int64_t warmup = options.warmup() >= 0 ? options.warmup() : d.total_steps / 10;
  d.schedule = std::make_unique<LrSchedule>(
      LrScheduleOptions(options.lr(), d.total_steps)
          .warmup_steps(std::min(warmup, d.total_steps))
          .kind(options.schedule()));
}

Trainer::~Trainer() = default;

StepRecord Trainer::step() {
  auto& d = *impl_;
  auto batch = d.next_batch();
  TORCH_INTERNAL_ASSERT(batch, "the data loader returned no batch");
  auto micros = d.micro_batches(*batch);
  // The loss units (rows or predicted tokens) of the whole global batch:
  // every rank has all of it, so no collective is needed to weigh its part.
  int64_t units = 0;
  for (const auto& m : micros) {
    units += d.task->loss_units(m);
  }
  if (d.reducer) {
    d.group->mark_progress(d.step + 1);
    // This rank's rows, in micro-batches of 1/world of --batch rows.
    const int64_t per = (d.options.batch() + d.world() - 1) / d.world();
    auto shard = shard_rows(*batch, d.rank(), d.world());
    micros.clear();
    if (shard.input_ids.size(0) > 0) {
      micros = d.micro_batches(shard, per);
    }
  }

  for (auto& m : micros) {
    m = to_device(std::move(m), d.device);
  }

  for (auto& p : d.trainable) {
    p.mutable_grad() = torch::Tensor();
  }
  RngScope rng(d.rng, d.cuda_rng, d.device, /*advance=*/true);
  synchronize(d.device);
  memory::reset_peak(d.device);
  const auto t0 = Clock::now();
  double loss = 0;
  for (size_t i = 0; i < micros.size(); ++i) {
    const auto& m = micros[i];
    if (d.reducer) {
      // Only the last micro-batch's backward starts the all-reduces (the
      // others would reduce gradients that are still accumulating).
      d.reducer->prepare_for_backward(/*sync=*/i + 1 == micros.size());
    }
    torch::Tensor scaled;
    {
      AutocastScope autocast(autocast_for(d.options.dtype(), d.device));
      // Each micro-batch's mean, weighted by its share of the step's rows
      // (or predicted tokens): the sum is the mean over the whole batch.
      const double weight = units > 0
          ? static_cast<double>(d.task->loss_units(m)) / static_cast<double>(units)
          : 0.0;
      scaled = d.task->loss(m) * weight;
    }
    scaled.backward();
    loss += scaled.item<double>();
  }
  if (step_fault()) {
    step_fault()(d.step + 1, d.rank(), loss, d.trainable);
  }
  if (d.reducer) {
    try {
      d.reducer->reduce();
      std::vector<torch::Tensor> sum{torch::full({1}, loss, torch::kDouble)};
      d.group->all_reduce_sum(sum);
      loss = sum[0].item<double>();
    } catch (const c10::Error& e) {
      std::string what = e.what_without_backtrace();
      what = what.substr(0, what.find('\n'));
      const std::string who = d.group->describe_failure(d.step + 1);
      TORCH_CHECK(false, what, who.empty() ? "" : "; " + who, " (at step ", d.step + 1, ")");
    }
  }
  double grad_norm = 0;
  if (d.options.clip() > 0) {
    grad_norm = torch::nn::utils::clip_grad_norm_(d.trainable, d.options.clip());
  } else {
    torch::NoGradGuard no_grad;
    double sq = 0;
    for (const auto& p : d.trainable) {
      if (p.grad().defined()) {
        sq += p.grad().pow(2).sum().item<double>();
      }
    }
    grad_norm = std::sqrt(sq);
  }
  const double lr = d.schedule->lr(d.step);
  // A NaN or infinite loss or gradient norm would spoil the weights and
  // AdamW's moments for good: the update is skipped instead, and the step
  // still counts (batch, step counter, schedule), so the run keeps its
  // length and data order. Every rank decides alike: `loss` is the sum
  // over the ranks (non-finite on all when it is on one), `grad_norm` that
  // of the summed gradients.
  const bool bad = !std::isfinite(loss) || !std::isfinite(grad_norm);
  if (bad) {
    for (auto& p : d.trainable) {
      p.mutable_grad() = torch::Tensor();
    }
    ++d.skipped_in_a_row;
  } else {
    for (auto& group : d.optimizer->param_groups()) {
      static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
    }
    d.optimizer->step();
    d.skipped_in_a_row = 0;
  }
  synchronize(d.device); // the clock stops when the GPU is done
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  ++d.step;

  StepRecord r;
  r.step = d.step;
  r.epoch = batch->epoch;
  r.loss = loss;
  r.lr = lr;
  r.grad_norm = grad_norm;
  r.tokens = batch->attention_mask.sum().item<int64_t>();
  r.step_seconds = seconds;
  if (d.reducer) {
    r.reduced_in_backward_bytes = d.reducer->stats().bytes_in_backward;
    r.reduced_after_backward_bytes = d.reducer->stats().bytes_in_reduce;
  }
  r.tokens_per_s = seconds > 0 ? static_cast<double>(r.tokens) / seconds : 0;
  r.peak_bytes = memory::peak_bytes(d.device);
  r.policy = d.options.policy().name();
  const auto& compared = d.history.compare_steps;
  if (static_cast<size_t>(r.step) <= compared.size()) {
    r.compare_loss = compared[static_cast<size_t>(r.step - 1)].loss;
  }
  r.skipped = bad;
  r.skipped_in_a_row = d.skipped_in_a_row;
  d.history.steps.push_back(r);
  return r;
}

bool Trainer::has_validation() const {
  return impl_->valid_set != nullptr;
}

EvalRecord Trainer::evaluate() {
  auto& d = *impl_;
  TORCH_CHECK(has_validation(), "evaluate: this run has no validation set");
  RngScope rng(d.rng, d.cuda_rng, d.device, /*advance=*/false);
  torch::NoGradGuard no_grad;
  auto& module = d.task->module();
  const bool was_training = module.is_training();
  module.eval();
  AutocastScope autocast(autocast_for(d.options.dtype(), d.device));

  const auto& valid = *d.valid_set;
  MultilabelF1 f1(std::max<int64_t>(valid.num_labels(), 1));
  double loss_sum = 0;
  int64_t units = 0;
  std::vector<int64_t> indices;
  for (int64_t begin = 0; begin < valid.size(); begin += d.options.batch()) {
    indices.clear();
    for (int64_t i = begin; i < std::min(valid.size(), begin + d.options.batch()); ++i) {
      indices.push_back(i);
    }
    auto batch = to_device(
        collate(valid, indices, *d.tokenizer, CollateOptions().max_len(d.options.seq())),
        d.device);
    torch::Tensor logits;
    auto loss = d.task->loss(batch, &logits);
    const int64_t n = d.task->loss_units(batch);
    loss_sum += loss.item<double>() * static_cast<double>(n);
    units += n;
    if (!d.lm()) {
      f1.update(logits.to(torch::kFloat), batch.labels);
    }
  }
  module.train(was_training);

  EvalRecord r;
  r.step = d.step;
  r.epoch = d.history.steps.empty() ? 0 : d.history.steps.back().epoch;
  r.loss = units > 0 ? loss_sum / static_cast<double>(units) : 0;
  if (d.lm()) {
    r.perplexity = std::exp(r.loss);
  } else {
    auto scores = f1.compute();
    r.macro_f1 = scores.macro;
    r.micro_f1 = scores.micro;
    r.per_label_f1 = scores.per_label;
  }
  d.history.evals.push_back(r);
  return r;
}

MemoryTimeline Trainer::memory_timeline() {
  auto& d = *impl_;
  // Nothing of this step may reach the run: RNG, data position and
  // gradients are put back afterwards.
  RngScope rng(d.rng, d.cuda_rng, d.device, /*advance=*/false);
  const auto position = d.loader->position();
  auto batch = d.next_batch();
  d.loader->set_position(position);
  TORCH_INTERNAL_ASSERT(batch);
  auto micro = to_device(d.micro_batches(*batch).front(), d.device);

  std::vector<torch::Tensor> grads;
  for (auto& p : d.trainable) {
    grads.push_back(p.grad());
    p.mutable_grad() = torch::Tensor();
  }
  MemoryTimeline timeline;
  timeline.policy = d.options.policy().name();
  auto points = std::make_shared<std::vector<TimelinePoint>>();
  const auto device = d.device;
  Sample sample = [points, device](const std::string& label) {
    points->push_back({label, memory::current_bytes(device)});
  };
  {
    torch::Tensor loss;
    {
      AutocastScope autocast(autocast_for(d.options.dtype(), d.device));
      loss = d.task->instrumented_loss(micro, sample);
    }
    loss.backward();
  }
  for (auto& p : d.trainable) {
    p.mutable_grad() = torch::Tensor();
  }
  sample("end of backward");
  for (size_t i = 0; i < d.trainable.size(); ++i) {
    d.trainable[i].mutable_grad() = grads[i];
  }
  timeline.points = *points;
  return timeline;
}

void Trainer::save_state(const std::string& dir) {
  auto& d = *impl_;
  TrainState state;
  // The state file holds CPU tensors, whatever the device.
  for (const auto& kv : d.task->module().named_parameters()) {
    state.tensors["model." + kv.key()] = kv.value().detach().to(torch::kCPU);
  }
  for (const auto& kv : d.task->module().named_buffers()) {
    state.tensors["model." + kv.key()] = kv.value().detach().to(torch::kCPU);
  }
  torch::serialize::OutputArchive archive;
  d.optimizer->save(archive);
  std::string bytes;
  archive.save_to([&bytes](const void* data, size_t n) {
    bytes.append(static_cast<const char*>(data), n);
    return n;
  });
  state.tensors["optimizer"] =
      torch::from_blob(bytes.data(), {static_cast<int64_t>(bytes.size())}, torch::kUInt8)
          .clone();
  state.tensors["rng.cpu"] = d.rng.clone();
  if (d.cuda_rng.defined()) {
    state.tensors["rng.cuda"] = d.cuda_rng.clone();
  }
  state.info = {
      {"step", d.step},
      {"epoch", epoch()},
      {"total_steps", d.total_steps},
      {"loader", d.loader->position().to_json()},
      {"schedule",
       {{"kind", to_string(d.schedule->options().kind())},
        {"lr", d.schedule->options().lr()},
        {"warmup_steps", d.schedule->options().warmup_steps()},
        {"total_steps", d.schedule->options().total_steps()},
        {"next_lr", d.schedule->lr(d.step)}}},
      {"options", d.options.to_json()},
      {"history", d.history.to_json()},
  };
  save_train_state(dir, state);
}

void Trainer::load_state(const std::string& path) {
  auto& d = *impl_;
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
      const std::string what = e.what_without_backtrace();
      TORCH_CHECK(
          false, "'", path, "' is damaged: field \"", key, "\": ",
          what.substr(0, what.find('\n')));
    } catch (const nlohmann::json::exception& e) {
      TORCH_CHECK(
          false, "'", path, "' is damaged: field \"", key, "\": ", io::json_error_text(e));
    }
  };
  // Everything is read and checked before anything changes.
  auto saved = read_field(
      "options", [](const nlohmann::json& j) { return TrainOptions::from_json(j); });
  check_resume_options(saved, d.options, path);
  const int64_t step = read_field("step", [](const nlohmann::json& j) {
    TORCH_CHECK(
        j.is_number_integer(), "expected an integer, but got ", io::describe_json(j));
    return j.get<int64_t>();
  });
  TORCH_CHECK(
      step >= 0 && step <= d.total_steps, "'", path, "' is at step ", step,
      ", outside this run's ", d.total_steps, " steps");
  auto position = read_field(
      "loader", [](const nlohmann::json& j) { return LoaderPosition::from_json(j); });
  auto history =
      read_field("history", [](const nlohmann::json& j) { return History::from_json(j); });

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
  for (const auto& kv : d.task->module().named_parameters()) {
    take(kv.key(), kv.value());
  }
  for (const auto& kv : d.task->module().named_buffers()) {
    take(kv.key(), kv.value());
  }
  auto opt_it = state.tensors.find("optimizer");
  auto rng_it = state.tensors.find("rng.cpu");
  TORCH_CHECK(
      opt_it != state.tensors.end() && rng_it != state.tensors.end(), "'", path,
      "' lacks the optimizer or RNG state");
  // The records are bytes: a 1-D uint8 tensor each.
  auto check_bytes = [&](const char* name, const torch::Tensor& t) {
    TORCH_CHECK(
        t.scalar_type() == torch::kByte && t.dim() == 1, "'", path,
        "' is damaged: the ", name, " record must be a 1-D U8 tensor, but it is ",
        t.scalar_type(), " with shape ", t.sizes());
  };
  check_bytes("optimizer", opt_it->second);
  check_bytes("RNG", rng_it->second);
  auto optimizer = d.make_optimizer();
  try {
    torch::serialize::InputArchive archive;
    const auto& bytes = opt_it->second;
    archive.load_from(
        static_cast<const char*>(bytes.data_ptr()), static_cast<size_t>(bytes.numel()));
    optimizer->load(archive);
  } catch (const std::exception& e) {
    // LibTorch's reader says "PytorchStreamReader failed ..." and the like.
    TORCH_CHECK(
        false, "'", path, "' is damaged: its optimizer record (", opt_it->second.numel(),
        " bytes) is not an AdamW state this model can load");
  }
  {
    const int64_t expected = rng_state().numel();
    TORCH_CHECK(
        rng_it->second.numel() == expected, "'", path,
        "' is damaged: its RNG record holds ", rng_it->second.numel(),
        " bytes, but a CPU generator state is ", expected);
    torch::Tensor probe = rng_it->second.clone();
    try {
      RngScope check(probe, /*advance=*/false); // throws for a malformed state
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "'", path, "' is damaged: its RNG record is not a CPU generator state");
    }
  }
  d.loader->set_position(position);

  // Commit.
  {
    torch::NoGradGuard no_grad;
    for (auto& c : copies) {
      c.first.copy_(c.second);
    }
  }
  d.optimizer = std::move(optimizer);
  d.rng = rng_it->second.clone();
  auto cuda_it = state.tensors.find("rng.cuda");
  if (d.device.is_cuda() && cuda_it != state.tensors.end()) {
    d.cuda_rng = cuda_it->second.clone();
  }
  d.step = step;
  // The count of bad steps in a row is the last record's.
  d.skipped_in_a_row = history.steps.empty() ? 0 : history.steps.back().skipped_in_a_row;
  history.label_names = d.history.label_names;
  d.history = std::move(history);
}

void Trainer::save_model(const std::string& dir) const {
  const auto& d = *impl_;
  d.task->save_pretrained(dir, d.history.label_names);
  if (!d.options.vocab_path().empty()) {
    io::write_file_atomic(dir + "/vocab.txt", io::read_file(d.options.vocab_path()));
  }
}

std::string Trainer::summary() const {
  const auto& d = *impl_;
  std::ostringstream out;
  out << d.task->describe() << ", " << parameter_count() << " parameters (" << trainable_parameter_count()
      << " trainable); " << d.train_set->size() << " training documents, "
      << (d.valid_set ? d.valid_set->size() : 0) << " validation; "
      << steps_per_epoch() << " steps per epoch of " << d.options.batch() << " x "
      << d.options.accumulate() << " rows";
  if (!d.init_note.empty()) {
    out << "; " << d.init_note;
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
