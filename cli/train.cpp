// `remat train`: fine-tune with checkpointing, end to end. The flags become a
// remat::train::TrainOptions; the loop, the state and the report are the
// library's (remat/train/).
#include "command.h"

#include "launch.h"
#include "model_flags.h"
#include "device_flag.h"

#include "remat/distributed/process_group.h"
#include "remat/io/file.h"
#include "remat/train/run.h"
#include "remat/train/summary.h"
#include "remat/train/train_state.h"
#include "remat/train/trainer.h"

#include <c10/util/Exception.h>
#include <torch/cuda.h>

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <iostream>

namespace remat {
namespace cli {
namespace {

using train::TrainOptions;

// The flags as typed. Defaults are TrainOptions' own.
struct TrainFlags {
  TrainOptions defaults;
  std::string task = "classify";
  std::string train, valid, tokenizer, init, save, out, metrics, report;
  /// A vocabulary size, as in the other commands; a file here is the
  /// tokenizer (the flag's old meaning, kept as an alias of --tokenizer).
  std::string vocab;
  double valid_fraction = defaults.valid_fraction();
  /// The shared model flags (cli/model_flags.h), TrainOptions' defaults;
  /// the task decides the family.
  ModelFlags model = ModelFlags::of(defaults.model());
  int64_t accumulate = defaults.accumulate();
  int64_t epochs = defaults.epochs(), max_steps = defaults.max_steps();
  int64_t max_tokens = defaults.max_tokens();
  bool pack = defaults.pack();
  bool pad_to_seq = defaults.pad_to_seq();
  std::string policy = defaults.policy().name();
  std::string budget_plans = train::to_string(defaults.budget_plans());
  double plan_share = defaults.plan_share();
  double lr = defaults.lr(), weight_decay = defaults.weight_decay(), clip = defaults.clip();
  int64_t warmup = defaults.warmup();
  std::string schedule = "linear";
  int64_t lora_rank = defaults.lora_rank();
  double lora_alpha = defaults.lora_alpha();
  std::string lora_targets;
  uint64_t seed = defaults.seed();
  int64_t eval_every = defaults.eval_every(), save_every = defaults.save_every();
  bool resume = false;
  std::string compare_policy;
  int64_t compare_steps = defaults.compare_steps();
  int64_t threads = defaults.threads();
  std::string device = defaults.device();
  int64_t max_bad_steps = defaults.max_bad_steps();
  int64_t log_every = 10;
  int64_t stop_after_step = 0;
  int64_t stop_rank = -1; ///< with stop_after_step: only this rank stops
  int64_t nproc = 0;
  double dist_timeout = 60;
};

// The flag of an option: "--" + name with '-' for '_' (flag_of_field),
// except where the flag is named otherwise.
std::string flag_of(const std::string& field) {
  static const std::map<std::string, std::string> special{
      {"train_path", "--train"},   {"valid_path", "--valid"}, {"vocab_path", "--tokenizer"},
      {"init_dir", "--init"},      {"out_dir", "--out"},      {"memory_timeline", "--report"},
      {"resume", "--resume"}};
  auto it = special.find(field);
  return it != special.end() ? it->second : flag_of_field(field);
}

// A library error about an option (remat::FieldError names it) is a bad
// flag: "--batch: ...". Anything else goes on as it is.
[[noreturn]] void rethrow_as_flag_error(const c10::Error& e) {
  const auto* field = dynamic_cast<const FieldError*>(&e);
  if (field == nullptr) {
    throw;
  }
  // The message may carry "field: " already.
  std::string what = first_line(e);
  const std::string prefix = field->field() + ": ";
  if (what.compare(0, prefix.size(), prefix) == 0) {
    what = what.substr(prefix.size());
  }
  // The estimator's refusal of a step too large for this machine: the
  // batch is the first knob to turn.
  throw UsageError(
      (field->field() == "memory_limit" ? "--batch" : flag_of(field->field())) + ": " + what);
}

template <typename F>
auto as_flag(const std::string& flag, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const c10::Error& e) {
    std::string what = first_line(e);
    throw UsageError(flag + ": " + what);
  }
}

void require_file(const std::string& path, const std::string& flag) {
  if (path.empty()) {
    return;
  }
  // A missing file, a folder, a device or a FIFO is each said as what it is.
  const auto problem = io::regular_file_problem(path);
  require(problem.empty(), flag, "cannot read '" + path + "': " + problem);
}

// --vocab as a vocabulary size (an integer), or nullopt: a file name.
// Throws UsageError for an integer that is not a size.
c10::optional<int64_t> vocab_size_of(const std::string& text) {
  const size_t digits = !text.empty() && text[0] == '-' ? 1 : 0;
  if (text.size() == digits ||
      !std::all_of(text.begin() + digits, text.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return c10::nullopt;
  }
  require(digits == 0 && text.size() <= 9, "--vocab",
          "expected a vocabulary size in [0, " + std::to_string(limits::kMaxVocab) +
              "] (0: the tokenizer's), but got " + text);
  return std::stoll(text);
}

// Sets the options the user gave (all of them for a new run; on --resume
// only the flags on the command line, over the saved run's options).
TrainOptions apply_flags(const TrainFlags& f, TrainOptions o, const CLI::App& app, bool all) {
  auto given = [&](const char* flag) { return all || app.count(flag) > 0; };
  if (given("--task")) o.task(as_flag("--task", [&] { return train::parse_task(f.task); }));
  if (given("--train")) o.train_path(f.train);
  if (given("--valid")) o.valid_path(f.valid);
  if (given("--valid-fraction")) o.valid_fraction(f.valid_fraction);
  if (given("--tokenizer")) o.vocab_path(f.tokenizer);
  if (given("--vocab") && !f.vocab.empty()) {
    if (const auto size = vocab_size_of(f.vocab)) {
      o.model().vocab(*size);
    } else {
      require(f.tokenizer.empty(), "--vocab",
              "expected a vocabulary size with --tokenizer, but got the file '" + f.vocab + "'");
      o.vocab_path(f.vocab);
    }
  }
  if (given("--accumulate")) o.accumulate(f.accumulate);
  if (given("--epochs")) o.epochs(f.epochs);
  if (given("--max-steps")) o.max_steps(f.max_steps);
  if (given("--max-tokens")) o.max_tokens(f.max_tokens);
  if (given("--pack")) o.pack(f.pack);
  if (given("--pad-to-seq")) o.pad_to_seq(f.pad_to_seq);
  // The model's flags, onto its one description (the family is the task's).
  with_flag_errors([&] { apply_model_flags(f.model, o.model(), given); });
  if (given("--init")) o.init_dir(f.init);
  if (given("--policy")) {
    o.policy(as_flag("--policy", [&] { return CheckpointPolicy::parse(f.policy); }));
  }
  if (given("--budget-plans")) {
    o.budget_plans(
        as_flag("--budget-plans", [&] { return train::parse_budget_plans(f.budget_plans); }));
  }
  if (given("--plan-share")) o.plan_share(f.plan_share);
  if (given("--lr")) o.lr(f.lr);
  if (given("--weight-decay")) o.weight_decay(f.weight_decay);
  if (given("--warmup")) o.warmup(f.warmup);
  if (given("--schedule")) {
    o.schedule(as_flag("--schedule", [&] { return train::parse_lr_schedule_kind(f.schedule); }));
  }
  if (given("--clip")) o.clip(f.clip);
  if (given("--lora-rank")) o.lora_rank(f.lora_rank);
  if (given("--lora-alpha")) o.lora_alpha(f.lora_alpha);
  if (given("--lora-targets")) o.lora_targets(split_list(f.lora_targets, "--lora-targets"));
  if (given("--seed")) o.seed(f.seed);
  if (given("--eval-every")) o.eval_every(f.eval_every);
  if (given("--out")) o.out_dir(f.out);
  if (given("--save-every")) o.save_every(f.save_every);
  if (given("--compare-policy")) {
    if (f.compare_policy.empty()) {
      o.compare_policy(c10::nullopt);
    } else {
      o.compare_policy(
          as_flag("--compare-policy", [&] { return CheckpointPolicy::parse(f.compare_policy); }));
    }
  }
  if (given("--compare-steps")) o.compare_steps(f.compare_steps);
  if (given("--threads")) o.threads(f.threads);
  if (given("--device")) o.device(f.device);
  if (given("--max-bad-steps")) o.max_bad_steps(f.max_bad_steps);
  o.memory_timeline(!f.report.empty());
  return o;
}

// Where the bundled data set is looked for last: the source tree this
// program was built from.
std::vector<std::string> source_tree() {
#ifdef REMAT_SOURCE_DIR
  return {REMAT_SOURCE_DIR};
#else
  return {};
#endif
}

// What the run writes besides its state, and how it shows its progress.
train::RunOutputs run_outputs(const TrainFlags& f) {
  return train::RunOutputs()
      .metrics_path(f.metrics)
      .report_path(f.report)
      .save_dir(f.save)
      .terminal(::isatty(STDERR_FILENO) != 0)
      .log_every(f.log_every);
}

// The options of the run, with every flag and file checked: a mistake is a
// UsageError before any training (or any worker) starts.
TrainOptions prepare(const TrainFlags& f, const CLI::App& app) {
  // Each rank is a whole process on this machine (a LibTorch and a model copy).
  require(f.nproc >= 0 && f.nproc <= 64, "--nproc",
          "expected a number of local processes in [0, 64], but got " +
              std::to_string(f.nproc));
  require(f.dist_timeout > 0, "--dist-timeout",
          "expected a number of seconds > 0, but got " + std::to_string(f.dist_timeout));
  require(f.log_every >= 1, "--log-every",
          "expected a value >= 1, but got " + std::to_string(f.log_every));
  require(f.stop_after_step >= 0, "--stop-after-step", "expected a value >= 0");
  require_file(f.train, "--train");
  require_file(f.valid, "--valid");
  require_file(f.tokenizer, "--tokenizer");
  if (!vocab_size_of(f.vocab)) {
    require_file(f.vocab, "--vocab");
  }
  if (f.resume) {
    require(!f.out.empty(), "--resume", "expected --out DIR, the folder of the run to continue");
  }
  TrainOptions options;
  try {
    if (f.resume) {
      options = train::resumed_run_options(
          f.out, [&](TrainOptions saved) { return apply_flags(f, saved, app, /*all=*/false); });
    } else {
      // Without --train, the bundled data set (also in the source tree).
      options = train::new_run_options(apply_flags(f, TrainOptions(), app, /*all=*/true),
                                       /*hold_out=*/app.count("--valid-fraction") > 0,
                                       source_tree());
    }
    options.validate();
    // A GPU that is not there is refused now, in one line, before any data
    // is read or any worker starts.
    parse_device_flag(options.device());
    train::check_run_files(options);
    // Where the run writes: fail now, not after an hour of training.
    train::check_run_outputs(options, run_outputs(f));
  } catch (const c10::Error& e) {
    rethrow_as_flag_error(e);
  }
  return options;
}

// This process's place in a data-parallel group (nullopt: alone).
c10::optional<dist::DistOptions> dist_options(const TrainFlags& f) {
  c10::optional<dist::DistOptions> d;
  try {
    d = dist::DistOptions::from_env();
    if (d) {
      d->timeout_seconds(f.dist_timeout);
      d->validate();
    }
  } catch (const c10::Error& e) {
    std::string what = first_line(e);
    throw UsageError("data parallel: " + what);
  }
  if (d && d->world_size() == 1) {
    return c10::nullopt;
  }
  return d;
}

int run_train(const TrainFlags& f, const CLI::App& app) {
  auto place = dist_options(f);
  require(!(place && f.nproc > 0), "--nproc",
          "this process was started as rank " + std::to_string(place ? place->rank() : 0) +
              " of a group (WORLD_SIZE is set); start it either way, not both");
  TrainOptions options = prepare(f, app);
  if (f.nproc > 1 && parse_device(options.device()).is_cuda()) {
    const int64_t gpus = torch::cuda::device_count();
    require(f.nproc <= gpus, "--nproc",
            "data parallel on CUDA runs one rank per GPU (NCCL), but " +
                std::to_string(f.nproc) + " ranks were asked for and " + std::to_string(gpus) +
                " GPU" + (gpus == 1 ? " is" : "s are") + " visible");
  }
  if (f.nproc > 1) {
    // Checked above, once; each worker checks again, quickly.
    return launch_workers(f.nproc, "--nproc");
  }
  std::shared_ptr<dist::ProcessGroup> group;
  if (place) {
    // On CUDA the group is NCCL's too, rank r on cuda:(r % GPUs).
    place->device(parse_device_flag(options.device()));
    try {
      place->validate();
    } catch (const c10::Error& e) {
      std::string what = first_line(e);
      throw UsageError("--device: data parallel: " + what);
    }
    group = std::make_shared<dist::ProcessGroup>(*place);
  }
  const bool writer = !group || group->rank() == 0;

  const bool stops = f.stop_rank < 0 || (group ? group->rank() : 0) == f.stop_rank;
  if (stops && f.stop_after_step > 0) {
    // The library's private test hook (src/train/step_faults.h).
    ::setenv("REMAT_TEST_EXIT_AFTER_STEP", std::to_string(f.stop_after_step).c_str(), 1);
  }
  const auto outputs = run_outputs(f);
  train::TrainResult result;
  try {
    result = train::run_with_outputs(options, outputs, f.resume, group);
  } catch (const FieldError& e) {
    // What the trainer refuses before training (the model's sizes, a step
    // too large for this machine) is about a flag.
    rethrow_as_flag_error(e);
  }
  if (!writer) {
    // The other ranks' share of the measurements, one line each.
    std::cerr << train::rank_text(result, group->rank(), group->world_size());
    return 0;
  }
  std::cout << train::summary_text(result, options)
            << train::throughput_text(result, options, group ? group->world_size() : 1);
  std::cout << train::outputs_text(result, options, outputs);
  return 0;
}

// train's flags of its data and how batches are made of it.
void add_data_flags(CLI::App* app, TrainFlags* f) {
  app->add_option("--task", f->task, "classify (BERT, multi-label) or lm (Llama, causal)")
      ->capture_default_str();
  app->add_option("--train", f->train, "training JSONL (default: data/routing)");
  app->add_option("--valid", f->valid, "validation JSONL");
  app->add_option("--valid-fraction", f->valid_fraction,
                  "share of --train held out when there is no --valid (0: none)")
      ->capture_default_str();
  app->add_option("--tokenizer", f->tokenizer,
                  "tokenizer.json (BPE), tokenizer.model (SentencePiece) or BERT vocab.txt; "
                  "default: the --init folder's, else byte-level");
  app->add_option("--vocab", f->vocab,
                  "vocabulary size, as in bench, plan and estimate (default: the tokenizer's); "
                  "a file is taken as --tokenizer, the flag's old meaning");
  add_model_flags(app, f->model,
                  kModelLayers | kModelHidden | kModelHeads | kModelKvHeads | kModelIntermediate |
                      kModelSeq | kModelBatch | kModelAttention | kModelDtype | kModelDropout);
  app->add_option("--accumulate", f->accumulate,
                  "micro-batches per optimizer step (gradient accumulation)")
      ->capture_default_str();
  app->add_option("--epochs", f->epochs, "passes over the training set")->capture_default_str();
  app->add_option("--max-steps", f->max_steps, "optimizer steps (0: --epochs decides)")
      ->capture_default_str();
  app->add_option("--max-tokens", f->max_tokens,
                  "token budget of a step: documents bucketed by length, rows x longest row "
                  "<= N, at most --batch x --accumulate rows (0: off)")
      ->capture_default_str();
  app->add_flag("--pack", f->pack,
                "lm: several documents per row of --seq tokens, each attending only to itself "
                "with its own positions");
  app->add_flag("--pad-to-seq", f->pad_to_seq,
                "pad every row to --seq tokens (one batch shape) instead of to its batch's "
                "longest row");
}

// Where the model starts and ends, and how it is checkpointed.
void add_policy_flags(CLI::App* app, TrainFlags* f) {
  app->add_option("--init", f->init, "start from a Hugging Face folder (config.json, "
                                     "model.safetensors)");
  app->add_option("--save", f->save, "write model.safetensors + config.json here at the end");
  app->add_option("--policy", f->policy, "checkpoint policy: " + CheckpointPolicy::names())
      ->capture_default_str();
  app->add_option("--budget-plans", f->budget_plans,
                  "with --policy budget:SIZE: per-shape (a plan per batch shape, made as it "
                  "comes) or worst-case (one plan for --batch x --seq)")
      ->capture_default_str();
  app->add_option("--plan-share", f->plan_share,
                  "per-shape plans: the share of the run's time planning may take, in [0, 1]; "
                  "past it a new shape runs under a larger shape's plan (1: plan every shape)")
      ->capture_default_str();
}

// The optimizer, its schedule and LoRA.
void add_optimizer_flags(CLI::App* app, TrainFlags* f) {
  app->add_option("--lr", f->lr, "peak learning rate")->capture_default_str();
  app->add_option("--weight-decay", f->weight_decay, "AdamW weight decay")
      ->capture_default_str();
  app->add_option("--warmup", f->warmup, "warm-up steps (-1: 10% of the run)")
      ->capture_default_str();
  app->add_option("--schedule", f->schedule, "after warm-up: constant, linear or cosine")
      ->capture_default_str();
  app->add_option("--clip", f->clip, "largest gradient norm (0: no clipping)")
      ->capture_default_str();
  app->add_option("--lora-rank", f->lora_rank, "LoRA rank (0: full fine-tuning)")
      ->capture_default_str();
  app->add_option("--lora-alpha", f->lora_alpha, "LoRA alpha")->capture_default_str();
  app->add_option("--lora-targets", f->lora_targets,
                  "comma-separated projections: q, k, v, o, gate, up, down (as estimate "
                  "takes them) or the model's names (default: query,value or q_proj,v_proj)");
}

// The run: seeds, saving, comparison, records, device, data parallelism.
void add_run_flags(CLI::App* app, TrainFlags* f) {
  app->add_option("--seed", f->seed, "seed for weights, data order and dropout")
      ->capture_default_str();
  app->add_option("--eval-every", f->eval_every, "evaluate every N steps (0: every epoch)")
      ->capture_default_str();
  app->add_option("--out", f->out, "folder for the training state (state.safetensors)");
  app->add_option("--save-every", f->save_every, "save the state every N steps (0: at the end)")
      ->capture_default_str();
  app->add_flag("--resume", f->resume, "continue the run in --out from its state");
  app->add_option("--compare-policy", f->compare_policy,
                  "first run --compare-steps steps under this policy, and compare losses");
  app->add_option("--compare-steps", f->compare_steps, "steps of the comparison")
      ->capture_default_str();
  app->add_option("--metrics", f->metrics, "JSONL: one line per step and evaluation");
  app->add_option("--report", f->report, "self-contained HTML report");
  app->add_option("--threads", f->threads, "intra-op threads (0: all cores)")
      ->capture_default_str();
  app->add_option("--device", f->device,
                  "cpu, cuda or cuda:N (a CUDA build and a visible GPU); data parallel on "
                  "CUDA: rank r on cuda:(r % GPUs), NCCL")
      ->capture_default_str();
  app->add_option("--max-bad-steps", f->max_bad_steps,
                  "a step with a NaN or infinite loss or gradient norm is skipped; stop at "
                  "more than N such steps in a row (0: at the first)")
      ->capture_default_str();
  app->add_option("--log-every", f->log_every, "plain-line progress every N steps")
      ->capture_default_str();
  app->add_option("--nproc", f->nproc,
                  "data parallel: start this many local worker processes (0, 1: none)")
      ->capture_default_str();
  app->add_option("--dist-timeout", f->dist_timeout,
                  "data parallel: seconds to wait for a peer rank before failing")
      ->capture_default_str();
  // For tests: _exit(137) right after this step, as if killed (with
  // --stop-rank: only that rank).
  app->add_option("--stop-after-step", f->stop_after_step)->group("");
  app->add_option("--stop-rank", f->stop_rank)->group("");
}

} // namespace

Run add_train(CLI::App& root) {
  auto f = std::make_shared<TrainFlags>();
  auto* app = root.add_subcommand(
      "train",
      "Fine-tune a BERT classifier or a Llama LM with activation checkpointing; "
      "with no data flags, the bundled document-routing set");
  add_data_flags(app, f.get());
  add_policy_flags(app, f.get());
  add_optimizer_flags(app, f.get());
  add_run_flags(app, f.get());
  return [f, app] { return run_train(*f, *app); };
}

} // namespace cli
} // namespace remat
