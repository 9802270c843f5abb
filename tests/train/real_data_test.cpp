// Training on real data through the Trainer: pre-tokenized documents checked
// against the model's vocabulary, token-budget steps over length-bucketed
// documents, packed rows (each resumes on exactly the same curve), and a
// memory budget planned per batch shape that holds for every step.
#include "remat/train/trainer.h"

#include "remat/policy.h"
#include "remat/train/summary.h"

#include "remat/train/train_state.h"
#include "temp_dir.h"
#include "testing.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <cmath>
#include <fstream>
#include <random>
#include <regex>
#include <set>
#include <string>
#include <vector>

namespace {

using namespace remat::train;

// Documents whose lengths are drawn log-normally (median about 12 words,
// some past 100), as real text is: what bucketing and packing are for.
std::string write_skewed_corpus(const std::string& name, bool ids) {
  const auto dir = remat_test::fresh_temp_dir("real_data_" + name, /*create=*/true);
  const std::string path = dir + "/corpus.jsonl";
  std::ofstream f(path);
  std::mt19937 gen(7);
  std::lognormal_distribution<double> length(2.5, 0.9);
  std::uniform_int_distribution<int> word(0, 49);
  for (int d = 0; d < 60; ++d) {
    const int n = std::max(2, std::min(200, static_cast<int>(length(gen))));
    nlohmann::json line;
    if (ids) {
      std::vector<int64_t> v;
      for (int i = 0; i < n; ++i) {
        v.push_back(word(gen));
      }
      line["input_ids"] = v;
    } else {
      std::string text;
      for (int i = 0; i < n; ++i) {
        text += (i ? " w" : "w") + std::to_string(word(gen));
      }
      line["text"] = text;
    }
    f << line.dump() << "\n";
  }
  return path;
}

TrainOptions lm(const std::string& path) {
  auto o = TrainOptions().task(Task::kCausalLm).train_path(path).valid_fraction(0.1).threads(1);
  o.model().layers(1).hidden(16).heads(2).seq(64).batch(8).dropout(0.1);
  return o;
}

std::vector<double> losses(const History& h) {
  std::vector<double> out;
  for (const auto& s : h.steps) {
    out.push_back(s.loss);
  }
  return out;
}

// A run of `steps`, and the same run saved after `saved` steps and resumed
// by a new Trainer: the same losses, bit for bit, and the same weights.
void expect_resumes_exactly(TrainOptions options, int64_t steps, int64_t saved) {
  const auto dir = remat_test::fresh_temp_dir("real_data_resume", /*create=*/false);
  options.max_steps(steps).out_dir(dir);
  Trainer whole(options);
  while (whole.step_count() < steps) {
    whole.step();
  }
  {
    Trainer first(options);
    while (first.step_count() < saved) {
      first.step();
    }
    first.save_state(dir);
  }
  Trainer second(options);
  second.load_state(state_path(dir));
  while (second.step_count() < steps) {
    second.step();
  }
  EXPECT_EQ(losses(second.history()), losses(whole.history()));
  auto pa = whole.model().parameters();
  auto pb = second.model().parameters();
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_TRUE(torch::equal(pa[i], pb[i])) << i;
  }
}

TEST(TrainRealData, PreTokenizedIdsTrainWithinTheModelsVocabulary) {
  const auto path = write_skewed_corpus("ids", /*ids=*/true);
  auto options = lm(path).max_steps(2);
  // No tokenizer names the vocabulary: the model must.
  EXPECT_THROW_WITH(Trainer{options},
                    "vocab: expected the model's vocabulary size with pre-tokenized data (its "
                    "largest id is 49), but got none");
  options.model().vocab(40);
  EXPECT_THROW_WITH(Trainer{options},
                    "vocab: expected more than the data's largest token id, 49, but got 40");
  options.model().vocab(64);
  Trainer t(options);
  // The embedding has the model's 64 rows, not the byte tokenizer's 259.
  EXPECT_EQ(t.model().named_parameters()["model.embed_tokens.weight"].size(0), 64);
  const auto r = t.step();
  EXPECT_TRUE(std::isfinite(r.loss));
  // The ids are the tokens: no begin or end token is added.
  EXPECT_GT(r.tokens, 0);
  expect_resumes_exactly(options, 4, 2);
}

TEST(TrainRealData, TokenBudgetStepsTakeManyShortOrFewLongDocumentsAndResume) {
  const auto path = write_skewed_corpus("budget", /*ids=*/false);
  auto fixed = lm(path);
  auto budget = lm(path).max_tokens(256);
  budget.model().batch(16); // up to 16 rows, as the budget allows
  Trainer a(fixed);
  Trainer b(budget);
  EXPECT_NE(a.steps_per_epoch(), b.steps_per_epoch());
  // A whole epoch of budget steps (the loader's own tests check each
  // step's budget and that every document comes once per epoch).
  for (int64_t i = 0; i < b.steps_per_epoch(); ++i) {
    EXPECT_TRUE(std::isfinite(b.step().loss)) << "step " << i;
  }
  EXPECT_EQ(b.epoch(), 1);
  expect_resumes_exactly(budget, 5, 2);
  EXPECT_THROW_WITH((Trainer{lm(path).max_tokens(10)}),
                    "max_tokens: expected at least seq (64) tokens, the longest row, but got 10");
}

TEST(TrainRealData, PackedRowsTrainAndResume) {
  const auto path = write_skewed_corpus("pack", /*ids=*/false);
  auto packed = lm(path).pack(true);
  Trainer p(packed);
  Trainer u(lm(path));
  // Several documents share a row: fewer rows, so fewer steps per epoch.
  EXPECT_LT(p.steps_per_epoch(), u.steps_per_epoch());
  const auto r = p.step();
  EXPECT_TRUE(std::isfinite(r.loss));
  expect_resumes_exactly(packed, 4, 2);
  auto classify = TrainOptions().train_path(path).pack(true);
  EXPECT_THROW_WITH(classify.validate(), "pack: expected the lm task");
  EXPECT_THROW_WITH(lm(path).pack(true).max_tokens(128).validate(),
                    "pack: expected no max_tokens");
}

// Layers a step's schedule recomputes: in a checkpointed group, or partly
// (a selective mode).
int64_t recomputed_layers(const std::string& schedule) {
  int64_t n = 0;
  for (const auto& s : remat::Schedule::parse(schedule).segments) {
    n += s.mode != remat::SegmentMode::kStore ? s.end - s.begin : 0;
  }
  return n;
}

// The smallest budget of one plan for the worst shape (batch x seq), as the
// planner's refusal of a 1 KiB budget names it.
int64_t worst_case_minimum(TrainOptions o) {
  o.policy(remat::CheckpointPolicy::parse("budget:1KiB")).budget_plans(BudgetPlans::kWorstCase);
  const auto message = remat_test::thrown_message([&] { Trainer t(o); });
  std::smatch m;
  EXPECT_TRUE(std::regex_search(message, m, std::regex("at least ([0-9]+) bytes"))) << message;
  return m.empty() ? 0 : std::stoll(m[1]);
}

// Length-skewed documents under a budget just below what one plan for the
// worst shape needs: worst-case planning refuses it; per-shape planning
// trains, every step at or under it, short batches recomputing less than
// long ones, and the longest batches split into micro-batches that fit,
// with the same losses as a run without checkpointing. Every shape is
// planned (plan_share 1); with plan_share 0 the run makes fewer plans and
// runs most batches under a plan for a larger shape, still within the
// budget.
TEST(TrainRealData, BudgetPlannedPerShapeHoldsForEveryStep) {
  const auto path = write_skewed_corpus("shape_budget", /*ids=*/false);
  auto base = lm(path).valid_fraction(0);
  base.model().layers(4).hidden(32).heads(2).seq(256).batch(4).dropout(0);
  const int64_t minimum = worst_case_minimum(base);
  ASSERT_GT(minimum, 0);
  const int64_t budget = minimum - 1;
  auto o = base;
  o.policy(remat::CheckpointPolicy::parse("budget:" + std::to_string(budget) + "B"))
      .plan_share(1);
  EXPECT_THROW_WITH(
      (Trainer{TrainOptions(o).budget_plans(BudgetPlans::kWorstCase)}),
      "expected a memory budget of at least");

  // One trainer at a time: memory is counted per process, and a second
  // trainer's weights and moments would be bytes the first never planned.
  std::vector<StepRecord> records;
  History history;
  {
    Trainer t(o);
    for (int64_t i = 0; i < t.steps_per_epoch(); ++i) {
      records.push_back(t.step());
    }
    history = t.history();
  }
  std::vector<StepRecord> shared;
  {
    Trainer t(TrainOptions(o).plan_share(0));
    for (int64_t i = 0; i < t.steps_per_epoch(); ++i) {
      shared.push_back(t.step());
    }
    TrainResult result;
    result.history = t.history();
    result.steps = t.steps_per_epoch();
    EXPECT_NE(summary_text(result, o).find("step(s) under a larger shape's plan"),
              std::string::npos);
  }
  Trainer plain(TrainOptions(base).policy(remat::CheckpointPolicy::none()));
  int64_t split = 0, shortest = 0, longest = 0;
  int64_t short_recomputed = 0, long_recomputed = 0;
  for (const auto& r : records) {
    const auto p = plain.step();
    EXPECT_LE(r.peak_bytes, budget) << "step " << r.step << " " << r.to_json().dump();
    EXPECT_LE(r.predicted_peak_bytes, budget) << "step " << r.step;
    EXPECT_FALSE(r.planned.empty());
    EXPECT_EQ(r.rows, p.rows);
    EXPECT_NEAR(r.loss, p.loss, 1e-5 * std::abs(p.loss)) << "step " << r.step;
    split += r.micro_batches > 1 ? 1 : 0;
    const auto recomputed = recomputed_layers(r.schedule.substr(0, r.schedule.find(" | ")));
    if (shortest == 0 || r.row_tokens < shortest) {
      shortest = r.row_tokens;
      short_recomputed = recomputed;
    }
    if (r.row_tokens > longest && r.micro_batches == 1) {
      longest = r.row_tokens;
      long_recomputed = recomputed;
    }
  }
  EXPECT_GT(split, 0) << "no batch needed fewer rows";
  // plan_share 0: a plan only for shapes no kept plan covers.
  auto plan_shapes = [](const std::vector<StepRecord>& steps) {
    std::set<std::string> shapes;
    for (const auto& r : steps) {
      shapes.insert(r.planned);
    }
    return shapes.size();
  };
  int64_t covered = 0;
  for (size_t i = 0; i < shared.size(); ++i) {
    EXPECT_LE(shared[i].peak_bytes, budget) << "step " << shared[i].step;
    EXPECT_LE(shared[i].predicted_peak_bytes, budget) << "step " << shared[i].step;
    EXPECT_NEAR(shared[i].loss, records[i].loss, 1e-5 * std::abs(records[i].loss));
    covered += shared[i].covered;
    const auto planned = shared[i].planned.substr(0, shared[i].planned.find(" | "));
    const auto x = planned.find('x');
    EXPECT_GE(std::stoll(planned.substr(x + 1)), shared[i].row_tokens) << planned;
  }
  EXPECT_GT(covered, 0);
  EXPECT_LT(plan_shapes(shared), plan_shapes(records));
  EXPECT_LT(shortest, longest);
  EXPECT_LT(short_recomputed, long_recomputed)
      << shortest << " tokens recompute " << short_recomputed << " layers, " << longest
      << " tokens " << long_recomputed;
  TrainResult result;
  result.history = history;
  result.steps = static_cast<int64_t>(records.size());
  EXPECT_NE(summary_text(result, o).find("per-shape"), std::string::npos);
  // The record a --metrics line carries.
  const auto j = records.back().to_json();
  for (const char* key : {"rows", "row_tokens", "planned", "schedule", "predicted_peak_bytes",
                          "plan_seconds"}) {
    EXPECT_TRUE(j.contains(key)) << key;
  }
  EXPECT_EQ(StepRecord::from_json(j).planned, records.back().planned);
}

// --pad-to-seq: every batch one shape, so one plan.
TEST(TrainRealData, PaddedToSeqEveryBatchHasOneShape) {
  const auto path = write_skewed_corpus("pad_to_seq", /*ids=*/false);
  auto o = lm(path).pad_to_seq(true).max_steps(3);
  o.policy(remat::CheckpointPolicy::parse("budget:64MiB"));
  Trainer t(o);
  for (int i = 0; i < 3; ++i) {
    const auto r = t.step();
    EXPECT_EQ(r.row_tokens, 64);
    EXPECT_EQ(r.planned, "8x64");
  }
}

} // namespace
