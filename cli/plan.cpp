// `remat plan`: profiles a model on this machine, plans its checkpointing to
// one or more memory budgets, and prints each plan (what every stage keeps
// or recomputes) with its predicted peak and step time, next to the fixed
// policies'; with --measure, runs each (in a process of its own) and prints the
// measured figures beside the predictions. The comparison is the library's
// (remat/plan/compare.h), the workload and its measured step nn's
// (remat/nn/policy_bench.h); this file is flags, processes and printing.
#include "command.h"
#include "isolate.h"
#include "model_flags.h"

#include "remat/memory.h"
#include "remat/field_error.h"
#include "remat/nn/policy_bench.h"
#include "remat/plan/compare.h"
#include "remat/policy.h"

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>

namespace remat {
namespace cli {
namespace {

struct PlanConfig {
  ModelFlags model;
  /// --seq: one length, or several ("128,512,2048"): a plan for each.
  std::string seqs = std::to_string(ModelFlags().seq);
  RunFlags run = [] {
    RunFlags r;
    r.steps = 2;
    return r;
  }();
  std::string budgets = "50%";
  bool measure = false;
  int64_t repeats = 3;
  bool no_selective = false;
  bool compress = false;
  // A child of the "process" mode: the one schedule to measure (hidden).
  std::string child_schedule, child_name;
};

std::vector<plan::Budget> parse_budgets(const std::string& list) {
  std::vector<plan::Budget> out;
  for (const auto& item : split_list(list, "--budget")) {
    // A bare number is bytes to the library; on the command line it is
    // almost always a percentage whose '%' was forgotten.
    require(
        item.find_first_not_of("0123456789. ") != std::string::npos, "--budget",
        "expected a size with its unit (512MiB, 2GiB, " + item + "B) or a percentage (" +
            item + "%), but got '" + item + "'");
    try {
      out.push_back(plan::parse_budget(item));
    } catch (const c10::Error& e) {
      std::string what = first_line(e);
      throw UsageError("--budget: " + what);
    }
  }
  require(!out.empty(), "--budget", "expected at least one budget, but got '" + list + "'");
  return out;
}

// The --seq values, each checked as the model's sequence length before
// anything is profiled.
std::vector<int64_t> parse_seqs(const PlanConfig& c) {
  std::vector<int64_t> out;
  for (const auto& item : split_list(c.seqs, "--seq")) {
    char* end = nullptr;
    const long long v = std::strtoll(item.c_str(), &end, 10);
    require(end != item.c_str() && *end == '\0' && v > 0, "--seq",
            "expected token counts (256, or 128,512,2048), but got '" + item + "'");
    auto model = c.model;
    model.seq = v;
    validate(model);
    out.push_back(v);
  }
  require(!out.empty(), "--seq", "expected at least one length, but got '" + c.seqs + "'");
  return out;
}

void validate(const PlanConfig& c) {
  validate(c.model);
  validate(c.run);
  require_count(c.repeats, 1, "--repeats");
}

// The model, its batch and its step: bench's workload, on the CPU, a step
// stopped cleanly at 90% of this machine's memory.
std::unique_ptr<nn::BenchWorkload> workload(const PlanConfig& c) {
  return std::make_unique<nn::BenchWorkload>(
      c.model.config(), nn::BenchOptions()
                            .seed(c.run.seed)
                            .warmup(c.run.warmup)
                            .steps(c.run.steps)
                            .limit_bytes(memory::physical_bytes() / 10 * 9));
}

// This command's flags for a child process measuring one schedule.
std::vector<std::string> child_args(const PlanConfig& c, const plan::ScheduleCandidate& cand) {
  auto args = model_args(c.model);
  args.insert(args.begin(), "plan");
  auto more = run_args(c.run);
  args.insert(args.end(), more.begin(), more.end());
  args.insert(args.end(), {"--child-schedule", cand.schedule.str(), "--child-name", cand.name});
  return args;
}

// Each candidate in a process of its own, one after another. With
// --rounds N every candidate's process runs N times, the order reversed
// every other round: this machine's speed drifts over minutes, and a fixed
// order charges the drift to the candidates that run later. Step samples
// pool across rounds; the peak is the highest seen.
void measure_isolated(const std::vector<plan::ScheduleCandidate*>& cands, const PlanConfig& c) {
  TempDir dir("remat-plan");
  const size_t total = cands.size() * static_cast<size_t>(c.run.rounds);
  size_t done = 0;
  for (int64_t round = 0; round < c.run.rounds; ++round) {
    for (const size_t k : round_order(round, cands.size())) {
      auto& cand = *cands[k];
      if (cand.measured && !cand.ok) {
        continue; // failed in an earlier round: it fails the same way again
      }
      const std::string json =
          dir.file("cand" + std::to_string(k) + "_" + std::to_string(round) + ".json");
      auto args = child_args(c, cand);
      args.insert(args.end(), {"--json", json});
      std::printf("%s", progress_label(++done, total, cand.name, round, c.run.rounds).c_str());
      std::fflush(stdout);
      const auto outcome = run_self(args);
      cand.measured = true;
      std::ifstream f(json);
      if (f) {
        const auto j = nlohmann::json::parse(f);
        cand.ok = j.at("ok").get<bool>();
        cand.peak_bytes = std::max(cand.peak_bytes, j.at("peak_bytes").get<int64_t>());
        const auto times = j.at("step_seconds_all").get<std::vector<double>>();
        cand.times.insert(cand.times.end(), times.begin(), times.end());
        if (!cand.ok) {
          cand.error = j.at("error").get<std::string>();
        }
      } else {
        cand.ok = false;
        cand.error = describe_exit(outcome);
      }
      std::printf("%s\n", cand.ok ? "done" : "failed");
    }
  }
  std::printf("\n");
}

// A child of measure_isolated: builds the model, runs the one schedule
// `warmup + steps` times and writes what it measured.
int run_child(const PlanConfig& c) {
  plan::ScheduleCandidate cand;
  try {
    cand.schedule = Schedule::parse(c.child_schedule);
  } catch (const c10::Error& e) {
    throw UsageError("--child-schedule: " + std::string(e.what_without_backtrace()));
  }
  cand.name = c.child_name;
  auto w = workload(c);
  for (int64_t round = 0; round < c.run.warmup + c.run.steps && cand.ok; ++round) {
    nn::measure_schedule(*w, cand, round >= c.run.warmup);
  }
  nlohmann::json j{
      {"ok", cand.ok}, {"peak_bytes", cand.peak_bytes}, {"step_seconds_all", cand.times}};
  if (!cand.ok) {
    j["error"] = cand.error;
  }
  if (!c.run.json_path.empty()) {
    write_json_file(c.run.json_path, j);
  }
  return cand.ok ? 0 : 1;
}

// What planning one sequence length gave: its JSON, the refused budgets,
// and a line per budget for the table of several lengths.
struct SeqOutcome {
  nlohmann::json json;
  std::vector<std::string> refused;
  std::vector<std::string> rows;
};

SeqOutcome plan_one(const PlanConfig& c, const std::vector<plan::Budget>& budgets) {
  // Refused before anything is built when even the leanest schedule would
  // not fit this machine (the step runs no optimizer).
  require_fits(c.model.config().spec().optimizer(plan::Optimizer::kSgd), 0);

  auto w = workload(c);
  std::cout << "remat plan: " << model_line(c.model) << ", threads " << torch::get_num_threads()
            << "\n";
  const auto t0 = std::chrono::steady_clock::now();
  auto profile_options = plan::ProfileOptions().warmup(1).repeats(c.repeats);
  if (c.compress) {
    auto modes = profile_options.layer_modes();
    modes.push_back(SegmentMode::kCompress);
    profile_options.layer_modes(modes);
  }
  auto chain = w->profile(profile_options);
  const double profile_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("profiled in %.1f s (1 warm-up and %lld timed runs per stage and mode)\n\n",
              profile_seconds, static_cast<long long>(c.repeats));
  std::cout << chain.str() << "\n";

  auto cmp = plan::compare_schedules(chain, budgets,
                                     plan::PlannerOptions().selective(!c.no_selective));
  std::cout << cmp.summary_text();
  if (c.measure) {
    auto todo = cmp.to_measure();
    std::printf("measuring %zu schedules %s: %lld warm-up and %lld timed steps each\n\n",
                todo.size(),
                c.run.isolation == "process" ? "each in its own process" : "in interleaved rounds",
                static_cast<long long>(c.run.warmup), static_cast<long long>(c.run.steps));
    if (c.run.isolation == "process") {
      measure_isolated(todo, c);
    } else {
      nn::measure_interleaved(*w, todo);
    }
    cmp.finish_measurements();
  }
  std::cout << cmp.budgets_text() << cmp.table();

  SeqOutcome out;
  nlohmann::json config = model_json(c.model);
  config.update({{"parameters", w->parameter_count()},
                 {"threads", torch::get_num_threads()},
                 {"repeats", c.repeats},
                 {"steps", c.run.steps},
                 {"warmup", c.run.warmup},
                 {"selective", !c.no_selective},
                 {"compress", c.compress},
                 {"seed", c.run.seed},
                 {"isolation", c.run.isolation},
                 {"rounds", c.run.rounds}});
  out.json = {{"config", config},
              {"profile_seconds", profile_seconds},
              {"chain", plan::chain_json(chain)},
              {"none_predicted_peak_bytes", cmp.none.peak_bytes},
              {"min_feasible_budget_bytes", cmp.min_budget_bytes},
              {"budgets", cmp.budgets_json()},
              {"policies", cmp.policies_json()}};
  out.refused = cmp.refused;
  for (size_t i = 0; i < cmp.plans.size(); ++i) {
    const auto& p = cmp.plans[i];
    char row[512];
    std::snprintf(row, sizeof(row), "| %lld | %s | %s | %s | %s | %.4f s |",
                  static_cast<long long>(c.model.seq), cmp.budgets[i].text.c_str(),
                  memory::format_size(cmp.min_budget_bytes).c_str(),
                  p.ok ? p.schedule.str().c_str() : "(does not fit)",
                  p.ok ? memory::format_size(p.predicted.peak_bytes).c_str() : "-",
                  p.ok ? p.predicted.step_seconds : 0.0);
    out.rows.push_back(row);
  }
  return out;
}

int run_plan(const PlanConfig& c) {
  validate(c);
  const auto seqs = parse_seqs(c);
  set_threads(c.run.threads);
  if (!c.child_schedule.empty()) {
    auto child = c;
    child.model.seq = seqs.front();
    return run_child(child);
  }
  auto budgets = parse_budgets(c.budgets);
  std::vector<SeqOutcome> outcomes;
  for (size_t i = 0; i < seqs.size(); ++i) {
    auto one = c;
    one.model.seq = seqs[i];
    if (i > 0) {
      std::cout << "\n";
    }
    outcomes.push_back(plan_one(one, budgets));
  }
  if (seqs.size() > 1) {
    // One table: how the plan for each budget changes with the length.
    std::cout << "\nplans by sequence length (predicted):\n"
              << "| seq | budget | smallest feasible | schedule | peak | step |\n"
              << "|---:|---|---:|---|---:|---:|\n";
    for (const auto& o : outcomes) {
      for (const auto& row : o.rows) {
        std::cout << row << "\n";
      }
    }
  }
  if (!c.run.json_path.empty()) {
    if (seqs.size() == 1) {
      write_json_file(c.run.json_path, outcomes.front().json);
    } else {
      nlohmann::json all = nlohmann::json::array();
      for (const auto& o : outcomes) {
        all.push_back(o.json);
      }
      write_json_file(c.run.json_path, {{"seqs", all}});
    }
  }
  bool refused = false;
  for (const auto& o : outcomes) {
    for (const auto& r : o.refused) {
      std::cerr << "remat: error: " << r << "\n";
      refused = true;
    }
  }
  return refused ? 1 : 0;
}

} // namespace

Run add_plan(CLI::App& root) {
  auto c = std::make_shared<PlanConfig>();
  auto* app = root.add_subcommand(
      "plan",
      "Profile a model here and plan its checkpointing to a memory budget");
  add_model_flags(app, c->model, kAllModelFlags & ~kModelSeq);
  app->add_option("--seq", c->seqs,
                  "sequence length (tokens); several, comma-separated (128,512,2048), plan each")
      ->capture_default_str();
  add_run_flags(app, c->run, "schedule (with --measure)");
  app->add_option("--budget", c->budgets,
                  "comma-separated budgets: total bytes (2GiB, 512MiB) or a percentage of "
                  "the predicted peak without checkpointing (50%)")
      ->capture_default_str();
  app->add_flag("--measure", c->measure,
                "also run every schedule and print measured peak and step time");
  app->add_option("--repeats", c->repeats, "timed profiling runs per stage and mode")
      ->capture_default_str();
  app->add_flag("--no-selective", c->no_selective,
                "plan without partial layers (selective-attention, selective-mlp, "
                "save-matmuls, save-projections, compress)");
  app->add_flag("--compress", c->compress,
                "also profile and plan layers whose saves are kept as bf16 (lossy)");
  // Hidden: the one schedule a child of --isolation process measures.
  app->add_option("--child-schedule", c->child_schedule)->group("");
  app->add_option("--child-name", c->child_name)->group("");
  return [c] { return run_plan(*c); };
}

} // namespace cli
} // namespace remat
