// `remat plan`: profiles a model on this machine, plans its checkpointing to
// one or more memory budgets, and prints each plan (what every stage keeps
// or recomputes) with its predicted peak and step time, next to the fixed
// policies'; with --measure, runs each (in a process of its own) and prints the
// measured figures beside the predictions.
#include "command.h"
#include "isolate.h"
#include "model_flags.h"

#include "remat/memory.h"
#include "remat/timing.h"
#include "remat/nn/profile.h"
#include "remat/plan/solver.h"
#include "remat/policy.h"

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <thread>

namespace remat {
namespace cli {
namespace {

struct PlanConfig {
  ModelFlags model;
  RunFlags run = [] {
    RunFlags r;
    r.steps = 2;
    return r;
  }();
  std::string budgets = "50%";
  bool measure = false;
  int64_t repeats = 3;
  bool no_selective = false;
  // A child of the "process" mode: the one schedule to measure (hidden).
  std::string child_schedule, child_name;
};

// A budget as given: a size, or a percentage of the predicted peak without
// checkpointing.
struct BudgetSpec {
  std::string text;
  bool percent = false;
  double value = 0; ///< percent, or bytes
  int64_t bytes = 0;
};

std::vector<BudgetSpec> parse_budgets(const std::string& list) {
  std::vector<BudgetSpec> out;
  for (const auto& item : split_list(list, "--budget")) {
    BudgetSpec b;
    b.text = item;
    if (!item.empty() && item.back() == '%') {
      const std::string number = item.substr(0, item.size() - 1);
      char* end = nullptr;
      b.value = std::strtod(number.c_str(), &end);
      require(!number.empty() && end == number.c_str() + number.size() && b.value > 0 &&
                  std::isfinite(b.value),
              "--budget", "expected a percentage above 0 such as 50%, but got '" + item + "'");
      b.percent = true;
    } else {
      b.value = static_cast<double>(parse_size_flag(item, "--budget"));
    }
    out.push_back(b);
  }
  require(!out.empty(), "--budget", "expected at least one budget, but got '" + list + "'");
  return out;
}

void validate(const PlanConfig& c) {
  validate(c.model);
  validate(c.run);
  require_count(c.repeats, 1, "--repeats");
}

// The model, its batch and the loss of a step.
struct Workload {
  nn::Bert bert{nullptr};
  nn::Llama llama{nullptr};
  torch::Tensor ids, mask, target;

  explicit Workload(const PlanConfig& c) {
    const auto& f = c.model;
    const auto config = f.config();
    torch::manual_seed(c.run.seed);
    const auto dtype = config.dtype();
    ids = torch::randint(config.vocab_size(), {f.batch, f.seq}, torch::kLong);
    if (config.llama()) {
      llama = nn::Llama(config.llama_options());
      llama->to(dtype);
      llama->train();
      return;
    }
    bert = nn::Bert(config.bert_options());
    bert->to(dtype);
    bert->train();
    mask = torch::ones({f.batch, f.seq}, torch::kLong);
    // As `remat bench`: a regression target for the last hidden state.
    target = torch::randn({f.batch, f.seq, f.hidden}).to(dtype);
  }

  nn::BertStep bert_step() const {
    auto t = target;
    return nn::BertStep(ids).attention_mask(mask).loss(
        [t](const nn::BertOutput& o) { return torch::mse_loss(o.last_hidden_state, t); });
  }

  plan::Chain profile(const plan::ProfileOptions& o) {
    return llama ? nn::profile_model(llama, nn::LlamaStep(ids), o)
                 : nn::profile_model(bert, bert_step(), o);
  }

  nn::StepMeasurement measure(const Schedule& s, const std::string& name) {
    const auto policy = CheckpointPolicy::custom(s, name);
    if (llama) {
      llama->gradient_checkpointing_enable(policy);
      return nn::measure_step(*llama, nn::LlamaStep(ids));
    }
    bert->gradient_checkpointing_enable(policy);
    return nn::measure_step(*bert, bert_step());
  }

  int64_t parameter_count() {
    auto& m = llama ? static_cast<torch::nn::Module&>(*llama) : *bert;
    int64_t n = 0;
    for (const auto& p : m.parameters()) {
      n += p.numel();
    }
    return n;
  }

  void drop_gradients() {
    auto& m = llama ? static_cast<torch::nn::Module&>(*llama) : *bert;
    m.zero_grad(/*set_to_none=*/true);
  }
};

// A schedule to report: a fixed policy or a plan.
struct Candidate {
  std::string name;       ///< "every-2", "plan@50%"
  std::string aliases;    ///< other policies with the same schedule
  Schedule schedule;
  bool planned = false;
  plan::Evaluation predicted;
  bool measured = false;
  bool ok = true;
  std::string error;
  int64_t peak = 0;       ///< measured, bytes
  double seconds = 0;     ///< measured, median
  std::vector<double> times;
};

std::string seconds_cell(double s) {
  char b[32];
  std::snprintf(b, sizeof(b), "%.3f", s);
  return b;
}

std::string ratio_cell(double a, double b) {
  if (b <= 0) {
    return "-";
  }
  char c[32];
  std::snprintf(c, sizeof(c), "%.2fx", a / b);
  return c;
}

nlohmann::json candidate_json(const Candidate& c) {
  nlohmann::json j{{"name", c.name},
                   {"schedule", c.schedule.str()},
                   {"predicted_peak_bytes", c.predicted.peak_bytes},
                   {"predicted_step_seconds", c.predicted.step_seconds},
                   {"predicted_activation_bytes", c.predicted.activation_bytes},
                   {"predicted_peak_event", c.predicted.peak_event}};
  if (!c.aliases.empty()) {
    j["same_schedule_as"] = c.aliases;
  }
  if (c.measured) {
    j["measured_ok"] = c.ok;
    j["measured_peak_bytes"] = c.peak;
    if (c.ok) {
      j["measured_step_seconds"] = c.seconds;
      j["measured_step_seconds_all"] = c.times;
    } else {
      j["error"] = c.error;
    }
  }
  return j;
}


// One step of `cand` (the first `warmup` rounds untimed); a failure marks it.
void measure_round(Workload& w, Candidate& cand, const PlanConfig& c, bool timed) {
  const int64_t limit = memory::physical_bytes() / 10 * 9;
  cand.measured = true;
  w.drop_gradients();
  // Every schedule draws the same dropout masks.
  torch::manual_seed(c.run.seed + 1);
  try {
    memory::LimitGuard guard(limit);
    const auto m = w.measure(cand.schedule, cand.name);
    cand.peak = std::max(cand.peak, m.peak_bytes);
    if (timed) {
      cand.times.push_back(m.step_seconds);
    }
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    cand.ok = false;
    cand.error = what.substr(0, what.find('\n'));
  }
}

// In-process: every candidate's step in turn, `warmup + steps` rounds, so
// that a machine whose load changes slows them alike.
void measure_interleaved(Workload& w, std::vector<Candidate*>& cands, const PlanConfig& c) {
  for (int64_t round = 0; round < c.run.warmup + c.run.steps; ++round) {
    for (auto* cand : cands) {
      if (cand->ok) {
        measure_round(w, *cand, c, round >= c.run.warmup);
      }
    }
  }
  w.drop_gradients();
}

// This command's model flags, for a child process.
std::vector<std::string> child_args(const PlanConfig& c, const Candidate& cand) {
  const auto& f = c.model;
  auto num = [](auto v) {
    std::ostringstream out;
    out << v;
    return out.str();
  };
  return {"plan", "--model", f.model, "--layers", num(f.layers), "--hidden", num(f.hidden),
          "--heads", num(f.heads), "--kv-heads", num(f.kv_heads), "--intermediate",
          num(f.intermediate), "--vocab", num(f.vocab), "--seq", num(f.seq), "--batch",
          num(f.batch), "--attention", f.attention, "--dtype", f.dtype, "--dropout",
          num(f.dropout), "--steps", num(c.run.steps), "--warmup", num(c.run.warmup), "--threads",
          num(c.run.threads), "--seed", num(c.run.seed), "--child-schedule", cand.schedule.str(),
          "--child-name", cand.name};
}

// Each candidate in a process of its own, one after another. With
// --rounds N every candidate's process runs N times, the order reversed
// every other round: this machine's speed drifts over minutes, and a fixed
// order charges the drift to the candidates that run later. Step samples
// pool across rounds; the peak is the highest seen.
void measure_isolated(std::vector<Candidate*>& cands, const PlanConfig& c) {
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
        cand.peak = std::max(cand.peak, j.at("peak_bytes").get<int64_t>());
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

void measure_all(Workload& w, std::vector<Candidate*>& cands, const PlanConfig& c) {
  if (c.run.isolation == "process") {
    measure_isolated(cands, c);
  } else {
    measure_interleaved(w, cands, c);
  }
  for (auto* cand : cands) {
    cand->seconds = median(cand->times);
  }
}

// A child of measure_isolated: builds the model, runs the one schedule
// `warmup + steps` times and writes what it measured.
int run_child(const PlanConfig& c) {
  Schedule schedule;
  try {
    schedule = Schedule::parse(c.child_schedule);
  } catch (const c10::Error& e) {
    throw UsageError("--child-schedule: " + std::string(e.what_without_backtrace()));
  }
  Workload w(c);
  Candidate cand;
  cand.name = c.child_name;
  cand.schedule = schedule;
  for (int64_t round = 0; round < c.run.warmup + c.run.steps && cand.ok; ++round) {
    measure_round(w, cand, c, round >= c.run.warmup);
  }
  nlohmann::json j{{"ok", cand.ok}, {"peak_bytes", cand.peak}, {"step_seconds_all", cand.times}};
  if (!cand.ok) {
    j["error"] = cand.error;
  }
  if (!c.run.json_path.empty()) {
    write_json_file(c.run.json_path, j);
  }
  return cand.ok ? 0 : 1;
}

int run_plan(const PlanConfig& c) {
  validate(c);
  torch::set_num_threads(static_cast<int>(
      c.run.threads > 0 ? c.run.threads : std::max(1u, std::thread::hardware_concurrency())));
  if (!c.child_schedule.empty()) {
    return run_child(c);
  }
  auto budgets = parse_budgets(c.budgets);
  const auto& f = c.model;
  // Refused before anything is built when even the leanest schedule would
  // not fit this machine (the step runs no optimizer).
  require_fits(f.config().spec().optimizer(plan::Optimizer::kSgd), 0);

  Workload w(c);
  std::cout << "remat plan: " << model_line(f) << ", threads " << torch::get_num_threads()
            << "\n";

  const auto t0 = std::chrono::steady_clock::now();
  auto chain = w.profile(plan::ProfileOptions().warmup(1).repeats(c.repeats));
  const double profile_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("profiled in %.1f s (1 warm-up and %lld timed runs per stage and mode)\n\n",
              profile_seconds, static_cast<long long>(c.repeats));
  std::cout << chain.str() << "\n";

  const auto options = plan::PlannerOptions().selective(!c.no_selective);
  const int64_t layers = chain.num_layers();
  const auto none = plan::evaluate(chain, CheckpointPolicy::none().schedule(layers));
  const int64_t min_budget = plan::min_feasible_budget(chain, options);
  std::printf("predicted without checkpointing: peak %s (%lld bytes), step %.3f s\n",
              memory::format_size(none.peak_bytes).c_str(),
              static_cast<long long>(none.peak_bytes), none.step_seconds);
  std::printf("smallest feasible budget: %s (%lld bytes, %.1f%% of that peak)\n\n",
              memory::format_size(min_budget).c_str(), static_cast<long long>(min_budget),
              100.0 * static_cast<double>(min_budget) / static_cast<double>(none.peak_bytes));

  // The fixed policies, each schedule once.
  std::vector<Candidate> fixed;
  std::map<std::string, size_t> by_schedule;
  for (const auto& [name, schedule] : plan::fixed_policy_schedules(layers)) {
    auto it = by_schedule.find(schedule.str());
    if (it != by_schedule.end()) {
      auto& a = fixed[it->second].aliases;
      a += (a.empty() ? "" : ", ") + name;
      continue;
    }
    Candidate cand;
    cand.name = name;
    cand.schedule = schedule;
    cand.predicted = plan::evaluate(chain, schedule);
    by_schedule[schedule.str()] = fixed.size();
    fixed.push_back(cand);
  }

  // The plans.
  std::vector<Candidate> plans(budgets.size());
  std::vector<std::string> refused;
  for (size_t k = 0; k < budgets.size(); ++k) {
    auto& b = budgets[k];
    b.bytes = b.percent
        ? static_cast<int64_t>(static_cast<double>(none.peak_bytes) * b.value / 100.0)
        : static_cast<int64_t>(b.value);
    auto& cand = plans[k];
    cand.name = "plan@" + b.text;
    cand.planned = true;
    if (b.bytes < min_budget) {
      cand.ok = false;
      cand.error = "below the smallest feasible budget, " + memory::format_size(min_budget) +
          " (" + std::to_string(min_budget) + " bytes)";
      refused.push_back("--budget: expected at least the smallest feasible budget, " +
                        memory::format_size(min_budget) + " (" + std::to_string(min_budget) +
                        " bytes), but got " + b.text + " (" + std::to_string(b.bytes) +
                        " bytes)");
      continue;
    }
    const auto p = plan::solve(chain, b.bytes, options);
    cand.schedule = p.schedule;
    cand.predicted = plan::evaluate(chain, p.schedule);
    auto it = by_schedule.find(p.schedule.str());
    if (it != by_schedule.end()) {
      cand.aliases = fixed[it->second].name;
    }
  }

  if (c.measure) {
    std::vector<Candidate*> todo;
    for (auto& cand : fixed) {
      todo.push_back(&cand);
    }
    for (auto& cand : plans) {
      // A plan whose schedule is a fixed policy's is the same program: it
      // shares that measurement rather than adding noise of its own.
      if (cand.ok && cand.aliases.empty()) {
        todo.push_back(&cand);
      }
    }
    std::printf("measuring %zu schedules %s: %lld warm-up and %lld timed steps each\n\n",
                todo.size(),
                c.run.isolation == "process" ? "each in its own process" : "in interleaved rounds",
                static_cast<long long>(c.run.warmup), static_cast<long long>(c.run.steps));
    measure_all(w, todo, c);
    for (auto& cand : plans) {
      if (cand.ok && !cand.aliases.empty()) {
        const auto& same = fixed[by_schedule.at(cand.schedule.str())];
        cand.measured = same.measured;
        cand.ok = same.ok;
        cand.error = same.error;
        cand.peak = same.peak;
        cand.seconds = same.seconds;
        cand.times = same.times;
      }
    }
  }
  const Candidate& none_cand = fixed.front();
  const double none_seconds = c.measure && none_cand.ok ? none_cand.seconds : 0;

  // Each budget: the plan, stage by stage.
  nlohmann::json budgets_json = nlohmann::json::array();
  for (size_t k = 0; k < budgets.size(); ++k) {
    const auto& b = budgets[k];
    const auto& cand = plans[k];
    std::printf("budget %s = %s (%lld bytes)", b.text.c_str(),
                memory::format_size(b.bytes).c_str(), static_cast<long long>(b.bytes));
    nlohmann::json bj{{"budget", b.text}, {"budget_bytes", b.bytes}};
    if (cand.schedule.segments.empty()) {
      std::printf(": %s; not planned\n\n", cand.error.c_str());
      bj["feasible"] = false;
      bj["error"] = cand.error;
      budgets_json.push_back(bj);
      continue;
    }
    bj["feasible"] = true;
    std::printf(": %s%s\n", cand.schedule.str().c_str(),
                cand.aliases.empty() ? "" : (" (the schedule of " + cand.aliases + ")").c_str());
    for (const auto& line : plan::describe_schedule(chain, cand.schedule)) {
      std::cout << line << "\n";
    }
    std::printf("  predicted: peak %s, step %.3f s (%s none's); peak at %s\n",
                memory::format_size(cand.predicted.peak_bytes).c_str(),
                cand.predicted.step_seconds,
                ratio_cell(cand.predicted.step_seconds, none.step_seconds).c_str(),
                cand.predicted.peak_event.c_str());
    bj["plan"] = candidate_json(cand);
    if (cand.measured && cand.ok) {
      std::printf("  measured:  peak %s (%s the budget), step %.3f s (%s none's)\n",
                  memory::format_size(cand.peak).c_str(),
                  cand.peak <= b.bytes ? "within" : "ABOVE", cand.seconds,
                  ratio_cell(cand.seconds, none_seconds).c_str());
      // The fastest fixed policy whose measured peak fits the same budget.
      const Candidate* best = nullptr;
      for (const auto& fc : fixed) {
        if (fc.ok && fc.measured && fc.peak <= b.bytes && (!best || fc.seconds < best->seconds)) {
          best = &fc;
        }
      }
      if (best != nullptr) {
        std::printf("  fastest fixed policy within the budget (measured): %s, peak %s, step "
                    "%.3f s (%s none's); the plan takes %s its time\n",
                    best->name.c_str(), memory::format_size(best->peak).c_str(), best->seconds,
                    ratio_cell(best->seconds, none_seconds).c_str(),
                    ratio_cell(cand.seconds, best->seconds).c_str());
        bj["best_fixed_policy"] = best->name;
        bj["best_fixed_peak_bytes"] = best->peak;
        bj["best_fixed_step_seconds"] = best->seconds;
      } else {
        std::printf("  no fixed policy fits this budget (measured)\n");
        bj["best_fixed_policy"] = nullptr;
      }
    } else if (cand.measured) {
      std::printf("  measured: failed: %s\n", cand.error.c_str());
    }
    std::printf("\n");
    budgets_json.push_back(bj);
  }

  // All schedules side by side.
  char line[512];
  std::snprintf(line, sizeof(line), "%-22s %-44s %11s %9s", "policy", "schedule",
                "pred peak", "pred(s)");
  std::cout << line;
  if (c.measure) {
    std::snprintf(line, sizeof(line), " %11s %9s %8s %9s", "meas peak", "meas(s)", "vs none",
                  "pred/meas");
    std::cout << line;
  }
  std::cout << "  fits\n";
  nlohmann::json policies_json = nlohmann::json::array();
  auto row = [&](const Candidate& cand) {
    std::string sched = cand.schedule.str();
    if (sched.size() > 44) {
      sched = sched.substr(0, 41) + "...";
    }
    std::string name = cand.name;
    if (!cand.aliases.empty() && !cand.planned) {
      name += " (" + cand.aliases + ")";
    }
    std::snprintf(line, sizeof(line), "%-22s %-44s %11s %9s", name.c_str(), sched.c_str(),
                  memory::format_size(cand.predicted.peak_bytes).c_str(),
                  seconds_cell(cand.predicted.step_seconds).c_str());
    std::cout << line;
    if (c.measure) {
      if (cand.ok && cand.measured) {
        std::snprintf(line, sizeof(line), " %11s %9s %8s %9s",
                      memory::format_size(cand.peak).c_str(), seconds_cell(cand.seconds).c_str(),
                      ratio_cell(cand.seconds, none_seconds).c_str(),
                      ratio_cell(cand.predicted.step_seconds, cand.seconds).c_str());
      } else {
        std::snprintf(line, sizeof(line), " %11s %9s", "-", "failed");
      }
      std::cout << line;
    }
    // Which budgets it fits: measured when measured, else predicted.
    std::string fits;
    const int64_t peak = c.measure && cand.measured && cand.ok ? cand.peak
                                                               : cand.predicted.peak_bytes;
    for (const auto& b : budgets) {
      if (peak <= b.bytes) {
        fits += (fits.empty() ? "" : ",") + b.text;
      }
    }
    std::cout << "  " << (fits.empty() ? "-" : fits) << "\n";
  };
  for (const auto& cand : fixed) {
    row(cand);
    policies_json.push_back(candidate_json(cand));
  }
  for (const auto& cand : plans) {
    if (!cand.schedule.segments.empty()) {
      row(cand);
    }
  }
  if (c.measure) {
    std::cout << "\npred/meas: predicted over measured step time. Peaks are total bytes "
                 "(weights, gradients, batch, activations) as remat's allocator counts them.\n";
  }

  if (!c.run.json_path.empty()) {
    nlohmann::json config = model_json(f);
    config.update({
        {"parameters", w.parameter_count()},
        {"threads", torch::get_num_threads()},
        {"repeats", c.repeats},
        {"steps", c.run.steps},
        {"warmup", c.run.warmup},
        {"selective", !c.no_selective},
        {"seed", c.run.seed},
        {"isolation", c.run.isolation},
        {"rounds", c.run.rounds}});
    nlohmann::json j{{"config", config},
                     {"profile_seconds", profile_seconds},
                     {"chain", plan::chain_json(chain)},
                     {"none_predicted_peak_bytes", none.peak_bytes},
                     {"min_feasible_budget_bytes", min_budget},
                     {"budgets", budgets_json},
                     {"policies", policies_json}};
    write_json_file(c.run.json_path, j);
  }
  for (const auto& r : refused) {
    std::cerr << "remat: error: " << r << "\n";
  }
  return refused.empty() ? 0 : 1;
}

} // namespace

Run add_plan(CLI::App& root) {
  auto c = std::make_shared<PlanConfig>();
  auto* app = root.add_subcommand(
      "plan",
      "Profile a model here and plan its checkpointing to a memory budget");
  add_model_flags(app, c->model);
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
                "plan without selective-attention and selective-mlp layers");
  // Hidden: the one schedule a child of --isolation process measures.
  app->add_option("--child-schedule", c->child_schedule)->group("");
  app->add_option("--child-name", c->child_name)->group("");
  return [c] { return run_plan(*c); };
}

} // namespace cli
} // namespace remat
