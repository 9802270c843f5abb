// run_training: the comparison run, the training loop with its evaluations
// and state saves, and resuming; and a run as a program runs it
// (remat/train/run.h): its options made ready, its outputs checked and wired.
#include "remat/train/run.h"

#include "train/step_faults.h"

#include "remat/distributed/process_group.h"
#include "remat/io/file.h"
#include "remat/io/json_text.h"
#include "remat/io/tokenizer.h"
#include "remat/model_sizes.h"
#include "remat/train/data.h"
#include "remat/train/log.h"
#include "remat/train/report.h"
#include "remat/train/train_state.h"
#include "remat/train/trainer.h"

#include <torch/torch.h>

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <cstdio>
#include <iostream>
#include <thread>

namespace remat {
namespace train {

namespace {

void say(const TrainCallbacks& cb, const std::string& text) {
  if (cb.on_message) {
    cb.on_message(text);
  }
}

// The comparison run: the first steps of the same run under another policy.
// Same options (so the same weights, data order, dropout masks and learning
// rates) but for the policy; nothing of it is saved.
void run_comparison(
    const TrainOptions& options,
    const TrainCallbacks& cb,
    History& out,
    const std::shared_ptr<dist::ProcessGroup>& group) {
  const auto& policy = *options.compare_policy();
  TrainOptions other = options;
  other.policy(policy).compare_policy(c10::nullopt).out_dir("").save_every(0);
  Trainer shadow(other, group);
  const int64_t steps = std::min(options.compare_steps(), shadow.total_steps());
  say(cb, "comparison: " + std::to_string(steps) + " steps under " + policy.name() +
          ", then the run under " + options.policy().name() + " from the same state");
  if (options.memory_timeline()) {
    out.timelines.push_back(shadow.memory_timeline());
  }
  for (int64_t i = 0; i < steps; ++i) {
    auto r = shadow.step();
    if (cb.on_compare_step) {
      cb.on_compare_step(r, steps);
    }
  }
  out.compare_policy = policy.name();
  out.compare_steps = shadow.history().steps;
}

// A new run gets the comparison's records and its own memory timeline; a
// resumed one its state, and a timeline when it asks for one it lacks.
void start_run(
    Trainer& t,
    const TrainOptions& options,
    bool resume,
    const History& compared,
    const TrainCallbacks& cb) {
  if (resume) {
    const auto path = state_path(options.out_dir());
    t.load_state(path);
    say(cb, "resumed from " + path + " at step " + std::to_string(t.step_count()) +
            " of " + std::to_string(t.total_steps()));
    auto& timelines = t.history().timelines;
    const bool have = std::any_of(timelines.begin(), timelines.end(), [&](const auto& m) {
      return m.policy == options.policy().name();
    });
    if (options.memory_timeline() && !have) {
      timelines.push_back(t.memory_timeline()); // changes nothing of the run
    }
    return;
  }
  t.history().compare_policy = compared.compare_policy;
  t.history().compare_steps = compared.compare_steps;
  t.history().timelines = compared.timelines;
  if (options.memory_timeline()) {
    t.history().timelines.push_back(t.memory_timeline());
  }
}

// A bad step is said; one past max_bad_steps in a row stops the run, saying
// which state is left. Every rank has the same record (see Trainer::step),
// so every rank stops at the same step, and none waits for another.
void check_bad_step(
    const StepRecord& r,
    const TrainOptions& options,
    int64_t saved_step,
    const TrainCallbacks& cb) {
  if (!r.skipped) {
    return;
  }
  const int64_t allowed = options.max_bad_steps();
  if (r.skipped_in_a_row > allowed) {
    const std::string what = describe_skipped_step(r, allowed);
    const std::string kept = options.out_dir().empty() ? "nothing saved (no out_dir)"
        : saved_step < 0
        ? "no state saved yet"
        : "the last state saved, " + state_path(options.out_dir()) + " (step " +
            std::to_string(saved_step) + "), is left as it is";
    TORCH_CHECK(
        false, "max_bad_steps: expected at most ", allowed, " bad steps in a row, but got ",
        r.skipped_in_a_row, " (", what.substr(0, what.find(';')), "); training stopped, ",
        kept);
  }
  say(cb, describe_skipped_step(r, allowed));
}

// The end of a run: the final evaluation (unless a finished run was
// resumed), the last state, the callbacks' end, and the result.
TrainResult finish_run(
    Trainer& t,
    const TrainOptions& options,
    bool writer,
    const TrainCallbacks& cb,
    const std::shared_ptr<dist::ProcessGroup>& group) {
  TrainResult result;
  if (t.has_validation()) {
    const auto& evals = t.history().evals;
    if (!evals.empty() && evals.back().step == t.total_steps()) {
      result.final_eval = evals.back(); // a finished run, resumed again
    } else {
      result.final_eval = t.evaluate();
      if (cb.on_eval) {
        cb.on_eval(result.final_eval);
      }
    }
    result.has_eval = true;
  }
  if (writer && !options.out_dir().empty()) {
    t.save_state(options.out_dir());
    if (cb.on_save) {
      cb.on_save(state_path(options.out_dir()), t.step_count());
    }
  }
  if (cb.on_end) {
    cb.on_end(t);
  }
  if (group) {
    // No rank leaves (taking its end of the connections with it) while
    // rank 0 still writes.
    group->barrier();
  }
  result.history = t.history();
  result.steps = t.step_count();
  result.parameters = t.parameter_count();
  result.trainable_parameters = t.trainable_parameter_count();
  return result;
}

} // namespace

TrainResult run_training(
    const TrainOptions& options,
    const TrainCallbacks& callbacks,
    bool resume,
    std::shared_ptr<dist::ProcessGroup> group) {
  const int64_t stop_after_step = detail::exit_after_step();
  options.validate();
  if (group && group->world_size() == 1) {
    group = nullptr;
  }
  // Only rank 0 speaks and writes; the others train in silence.
  const bool writer = !group || group->rank() == 0;
  const TrainCallbacks silent;
  const TrainCallbacks& cb = writer ? callbacks : silent;
  check_field(!resume || !options.out_dir().empty(), "resume",
              c10::str("resume: expected an out_dir holding the state to resume, but got none"));
  torch::set_num_threads(static_cast<int>(options.threads() > 0
                                              ? options.threads()
                                              : std::max(1u, std::thread::hardware_concurrency())));

  if (writer && !options.out_dir().empty()) {
    // What an earlier process killed mid-save left (NAME.tmp.<pid>); a
    // live process's temporary files are left alone.
    for (const auto& path : io::remove_stale_temp_files(options.out_dir())) {
      say(cb, "removed " + path + ", left by a save that was killed");
    }
  }

  History compared;
  if (options.compare_policy() && !resume) {
    run_comparison(options, cb, compared, group);
  }
  Trainer t(options, group);
  say(cb, t.summary());
  start_run(t, options, resume, compared, cb);
  if (cb.on_start) {
    cb.on_start(t);
  }

  const int64_t total = t.total_steps();
  const int64_t per_epoch = t.steps_per_epoch();
  // The step of the state in out_dir (-1: none yet), for the message that
  // stops a run on bad steps.
  int64_t saved_step = resume ? t.step_count() : -1;
  bool save_due = false; // a save fell on a bad step: at the next good one
  while (t.step_count() < total) {
    auto r = t.step();
    if (cb.on_step) {
      cb.on_step(r, total);
    }
    if (r.step == stop_after_step) {
      // A stand-in for kill -9 at a known step (tests): no destructors, no
      // flushing, no state saved after the last regular save.
      std::fflush(nullptr);
      ::_exit(137);
    }
    check_bad_step(r, options, saved_step, cb);
    const bool last = r.step == total;
    const bool eval_now = options.eval_every() > 0 ? r.step % options.eval_every() == 0
                                                   : r.step % per_epoch == 0;
    if (!last && eval_now && t.has_validation()) {
      auto e = t.evaluate();
      if (cb.on_eval) {
        cb.on_eval(e);
      }
    }
    save_due = save_due || (options.save_every() > 0 && r.step % options.save_every() == 0);
    if (writer && !last && save_due && !r.skipped) {
      t.save_state(options.out_dir());
      saved_step = r.step;
      save_due = false;
      if (cb.on_save) {
        cb.on_save(state_path(options.out_dir()), r.step);
      }
    }
  }

  return finish_run(t, options, writer, cb, group);
}

TrainOptions saved_run_options(const std::string& out_dir) {
  const auto path = state_path(out_dir);
  check_field(
      std::ifstream(path).good(), "resume",
      "no training state in '" + out_dir + "' (expected " + path + ")");
  TrainState state;
  try {
    state = load_train_state(path);
  } catch (const c10::Error& e) {
    std::string what = first_line(e);
    const auto prev = previous_state_path(out_dir);
    const auto prev_step = peek_train_state_step(prev);
    if (prev_step >= 0) {
      what += "; it was left as it is. The state before it, " + prev + " (step " +
          std::to_string(prev_step) + "), is readable: copy it over " + path +
          " to resume from there";
    } else {
      what += "; it was left as it is";
    }
    // A damaged file, not a mistake on the command line.
    TORCH_CHECK(false, what);
  }
  TORCH_CHECK(
      state.info.contains("options"), "'", path,
      "' is not a complete training state (no \"options\")");
  try {
    return TrainOptions::from_json(state.info.at("options"));
  } catch (const c10::Error& e) {
    std::string what = first_line(e);
    TORCH_CHECK(
        false, "'", path, "' holds no usable run options: ", what);
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, "'", path, "' holds no usable run options: ", io::json_error_text(e));
  }
}

void check_run_files(const TrainOptions& o) {
  const bool lm = o.task() == Task::kCausalLm;
  // A reader's error, as the error of the option that named the file.
  auto as_field = [](const std::string& field, const auto& read) {
    try {
      return read();
    } catch (const FieldError&) {
      throw;
    } catch (const c10::Error& e) {
      std::string what = first_line(e);
      throw FieldError(field, what);
    }
  };
  auto data = as_field("train_path", [&] {
    return lm ? read_text_jsonl(o.train_path()) : read_classification_jsonl(o.train_path());
  });
  check_field(data.size() > 0, "train_path",
              "expected at least one document in '" + o.train_path() + "', but got none");
  if (!o.valid_path().empty()) {
    as_field("valid_path", [&] {
      return lm ? read_text_jsonl(o.valid_path())
                : read_classification_jsonl(
                      o.valid_path(), JsonlOptions().label_names(data.label_names));
    });
  }
  if (!o.vocab_path().empty()) {
    as_field("vocab_path", [&] { return io::make_tokenizer(o.vocab_path()); });
  }
  if (!o.init_dir().empty()) {
    check_field(std::filesystem::is_directory(o.init_dir()), "init_dir",
                "'" + o.init_dir() + "' is not a folder");
    const std::string config = o.init_dir() + "/config.json";
    const auto problem = io::regular_file_problem(config);
    check_field(problem.empty(), "init_dir", "cannot read '" + config + "': " + problem);
    if (o.vocab_path().empty()) {
      as_field("init_dir", [&] { return io::folder_tokenizer(o.init_dir()); });
    }
  }
}

std::string find_bundled_data(const std::vector<std::string>& also) {
  namespace fs = std::filesystem;
  const fs::path data = "data/routing";
  std::vector<fs::path> starts{fs::current_path()};
  std::error_code ec;
  const auto exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    starts.push_back(exe.parent_path());
  }
  for (auto dir : starts) {
    for (; !dir.empty(); dir = dir.parent_path()) {
      if (fs::exists(dir / data / "train.jsonl")) {
        return (dir / data).string();
      }
      if (dir == dir.parent_path()) {
        break;
      }
    }
  }
  for (const auto& dir : also) {
    if (fs::exists(fs::path(dir) / data / "train.jsonl")) {
      return (fs::path(dir) / data).string();
    }
  }
  return "";
}

TrainOptions new_run_options(
    TrainOptions options,
    bool hold_out,
    const std::vector<std::string>& data_search) {
  if (options.train_path().empty()) {
    const auto dir = find_bundled_data(data_search);
    check_field(
        !dir.empty(), "train_path",
        "no data given and the bundled data set (data/routing/train.jsonl) is not above the "
        "current folder or the remat program; pass --train FILE");
    options.train_path(dir + "/train.jsonl");
    if (options.valid_path().empty() && !hold_out) {
      options.valid_path(dir + "/valid.jsonl");
    }
    if (options.vocab_path().empty()) {
      options.vocab_path(dir + "/vocab.txt");
    }
  }
  if (!options.out_dir().empty()) {
    const auto path = state_path(options.out_dir());
    check_field(
        !std::filesystem::exists(path), "out_dir",
        "'" + options.out_dir() + "' already holds a training state (step " +
            std::to_string(peek_train_state_step(path)) +
            "); pass --resume to continue it, or choose another folder");
  }
  return options;
}

TrainOptions resumed_run_options(
    const std::string& out_dir,
    const std::function<TrainOptions(TrainOptions)>& change) {
  const auto saved = saved_run_options(out_dir);
  auto options = change ? change(saved) : saved;
  options.out_dir(out_dir);
  check_resume_options(saved, options, state_path(out_dir));
  return options;
}

void check_run_outputs(const TrainOptions& options, const RunOutputs& outputs) {
  namespace fs = std::filesystem;
  auto folder_of = [](const std::string& file) {
    auto parent = fs::path(file).parent_path();
    return parent.empty() ? fs::path(".") : parent;
  };
  for (const auto& [path, field] :
       {std::pair<std::string, const char*>{outputs.metrics_path(), "metrics"},
        {outputs.report_path(), "report"}}) {
    if (path.empty()) {
      continue;
    }
    check_field(fs::is_directory(folder_of(path)), field,
                "cannot write '" + path + "': its folder does not exist");
    check_field(!fs::is_directory(path), field, "'" + path + "' is a folder, expected a file");
  }
  for (const auto& [dir, field] :
       {std::pair<std::string, const char*>{options.out_dir(), "out_dir"},
        {outputs.save_dir(), "save"}}) {
    if (dir.empty()) {
      continue;
    }
    std::error_code ec;
    fs::create_directories(dir, ec);
    check_field(fs::is_directory(dir), field,
                "cannot create the folder '" + dir + "'" + (ec ? ": " + ec.message() : ""));
  }
}

TrainResult run_with_outputs(
    const TrainOptions& options,
    const RunOutputs& outputs,
    bool resume,
    std::shared_ptr<dist::ProcessGroup> group) {
  const bool writer = !group || group->world_size() == 1 || group->rank() == 0;
  Progress progress(outputs.progress_stream(), outputs.terminal() && writer, outputs.log_every());
  std::unique_ptr<MetricsLog> metrics;
  if (!outputs.metrics_path().empty() && writer) {
    metrics = std::make_unique<MetricsLog>(outputs.metrics_path());
  }
  std::vector<std::string> label_names;
  TrainCallbacks cb;
  cb.on_message = [&](const std::string& text) { progress.line(text); };
  cb.on_compare_step = [&](const StepRecord& r, int64_t total) {
    progress.step(r, total, "compare " + r.policy);
  };
  cb.on_start = [&](const Trainer& t) {
    label_names = t.history().label_names;
    if (metrics) {
      metrics->start(t.history());
    }
  };
  cb.on_step = [&](const StepRecord& r, int64_t total) {
    if (metrics) {
      metrics->step(r);
    }
    progress.step(r, total, "train " + r.policy);
  };
  cb.on_eval = [&](const EvalRecord& e) {
    if (metrics) {
      metrics->eval(e);
    }
    progress.line(describe_eval(e, label_names));
  };
  cb.on_save = [&](const std::string& path, int64_t step) {
    // A bar shows the run going on; plain lines say each save.
    if (!outputs.terminal()) {
      progress.line("saved " + path + " at step " + std::to_string(step));
    }
  };
  cb.on_end = [&](Trainer& t) { // rank 0 only
    if (!outputs.save_dir().empty()) {
      t.save_model(outputs.save_dir());
    }
    if (!outputs.report_path().empty()) {
      write_report(outputs.report_path(), t.history(), t.options(), t.summary());
    }
  };
  TrainResult result;
  try {
    result = run_training(options, cb, resume, std::move(group));
  } catch (...) {
    progress.finish(); // the error goes on a line of its own
    throw;
  }
  progress.finish();
  return result;
}

std::string outputs_text(
    const TrainResult& result,
    const TrainOptions& options,
    const RunOutputs& outputs) {
  std::string text;
  if (!options.out_dir().empty()) {
    text += "state: " + state_path(options.out_dir()) + " (step " +
        std::to_string(result.steps) + ")\n";
  }
  if (!outputs.save_dir().empty()) {
    text += "model: " + outputs.save_dir() + "/model.safetensors, config.json\n";
  }
  if (!outputs.metrics_path().empty()) {
    text += "metrics: " + outputs.metrics_path() + "\n";
  }
  if (!outputs.report_path().empty()) {
    text += "report: " + outputs.report_path() + "\n";
  }
  return text;
}

} // namespace train
} // namespace remat
