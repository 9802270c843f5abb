// run_training: the comparison run, the training loop with its evaluations
// and state saves, and resuming.
#include "remat/dist/process_group.h"
#include "remat/io/file.h"
#include "remat/io/json_text.h"
#include "remat/io/tokenizer.h"
#include "remat/model_sizes.h"
#include "remat/train/data.h"
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

} // namespace

TrainResult run_training(
    const TrainOptions& options,
    const TrainCallbacks& callbacks,
    bool resume,
    int64_t stop_after_step,
    std::shared_ptr<dist::ProcessGroup> group) {
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

  History compared;
  if (options.compare_policy() && !resume) {
    run_comparison(options, cb, compared, group);
  }
  Trainer t(options, group);
  say(cb, t.summary());
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
  } else {
    t.history().compare_policy = compared.compare_policy;
    t.history().compare_steps = compared.compare_steps;
    t.history().timelines = compared.timelines;
    if (options.memory_timeline()) {
      t.history().timelines.push_back(t.memory_timeline());
    }
  }
  if (cb.on_start) {
    cb.on_start(t);
  }

  const int64_t total = t.total_steps();
  const int64_t per_epoch = t.steps_per_epoch();
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
    const bool last = r.step == total;
    const bool eval_now = options.eval_every() > 0 ? r.step % options.eval_every() == 0
                                                   : r.step % per_epoch == 0;
    if (!last && eval_now && t.has_validation()) {
      auto e = t.evaluate();
      if (cb.on_eval) {
        cb.on_eval(e);
      }
    }
    if (writer && !last && options.save_every() > 0 && r.step % options.save_every() == 0) {
      t.save_state(options.out_dir());
      if (cb.on_save) {
        cb.on_save(state_path(options.out_dir()), r.step);
      }
    }
  }

  TrainResult result;
  if (t.has_validation()) {
    const auto& evals = t.history().evals;
    if (!evals.empty() && evals.back().step == total) {
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

TrainOptions saved_run_options(const std::string& out_dir) {
  const auto path = state_path(out_dir);
  check_field(
      std::ifstream(path).good(), "resume",
      "no training state in '" + out_dir + "' (expected " + path + ")");
  TrainState state;
  try {
    state = load_train_state(path);
  } catch (const c10::Error& e) {
    std::string what = e.what_without_backtrace();
    what = what.substr(0, what.find('\n'));
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
    const std::string what = e.what_without_backtrace();
    TORCH_CHECK(
        false, "'", path, "' holds no usable run options: ", what.substr(0, what.find('\n')));
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
      const std::string what = e.what_without_backtrace();
      throw FieldError(field, what.substr(0, what.find('\n')));
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
  }
}

} // namespace train
} // namespace remat
