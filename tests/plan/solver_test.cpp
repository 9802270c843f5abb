#include "remat/plan/compare.h"
#include "remat/plan/estimate.h"
#include "remat/plan/solver.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <random>

namespace {

using remat::CheckpointPolicy;
using remat::Schedule;
using remat::SegmentMode;
using remat::plan::Chain;
using remat::plan::SelectiveCost;
using remat::plan::StageCost;
using remat::plan::StageKind;

// A toy chain whose peaks are worked out by hand below: an embedding, three
// identical layers and a head whose output is the loss.
Chain toy_chain() {
  Chain c;
  c.base_bytes = 1000;
  c.stages.push_back(StageCost("emb", StageKind::kEmbedding)
                         .forward_seconds(1).backward_seconds(1)
                         .output_bytes(10).stored_bytes(10));
  for (int i = 0; i < 3; ++i) {
    c.stages.push_back(StageCost("layer." + std::to_string(i))
                           .forward_seconds(2).backward_seconds(4)
                           .output_bytes(10).stored_bytes(100)
                           .forward_transient_bytes(5)
                           .nograd_transient_bytes(5)
                           .backward_transient_bytes(20));
  }
  c.stages.push_back(StageCost("head", StageKind::kHead)
                         .forward_seconds(3).backward_seconds(3)
                         .output_bytes(1).stored_bytes(50)
                         .forward_transient_bytes(30)
                         .backward_transient_bytes(40));
  return c;
}

TEST(PlanEvaluate, ToyChainByHand) {
  const auto chain = toy_chain();
  // none: forward holds 1000 + 10 + 3*100 + 50 = 1360. Backward starts with
  // the loss gradient (1): the head's backward holds 1361 + its input's
  // gradient 10 + its transient 40 = 1411, the peak.
  auto none = remat::plan::evaluate(chain, CheckpointPolicy::none().schedule(3));
  EXPECT_EQ(none.peak_bytes, 1411);
  EXPECT_EQ(none.activation_bytes, 360);
  EXPECT_DOUBLE_EQ(none.step_seconds, 2 + 3 * 6 + 6);
  EXPECT_EQ(none.peak_event, "backward of head");

  // every-layer: forward holds 1000 + 10 + 3*10 + 50 = 1090. Backward of the
  // last group: held 1000 + 10 (emb) + 10 + 10 (two group inputs) + 10 (its
  // incoming gradient) = 1040; recomputing adds 100; backprop adds the input
  // gradient 10 and the transient 20: 1170.
  auto every = remat::plan::evaluate(chain, CheckpointPolicy::every_layer().schedule(3));
  EXPECT_EQ(every.peak_bytes, 1170);
  EXPECT_EQ(every.activation_bytes, 90);
  EXPECT_DOUBLE_EQ(every.step_seconds, 26 + 3 * 2);
  EXPECT_EQ(every.peak_event, "backward of layer.2 (checkpointed layer.2)");

  // full: the group's backward holds 1000 + 10 + 10 (incoming gradient) +
  // 3*100 recomputed; layer 2's backward adds 10 + 20: 1350.
  auto full = remat::plan::evaluate(chain, CheckpointPolicy::full().schedule(3));
  EXPECT_EQ(full.peak_bytes, 1350);
  EXPECT_EQ(full.activation_bytes, 70);
  EXPECT_EQ(remat::plan::predicted_peak_bytes(chain, CheckpointPolicy::full().schedule(3)), 1350);
  EXPECT_DOUBLE_EQ(remat::plan::predicted_step_seconds(chain, CheckpointPolicy::full().schedule(3)), 32);
}

TEST(PlanEvaluate, ParameterGradientsAndSelectiveModesByHand) {
  auto chain = toy_chain();
  for (int i = 1; i <= 3; ++i) {
    chain.stages[i].parameter_gradient_bytes(7);
  }
  // Run normally, a layer's parameter gradients go straight into .grad
  // (part of the base): none is unchanged.
  EXPECT_EQ(remat::plan::predicted_peak_bytes(chain, CheckpointPolicy::none().schedule(3)), 1411);
  // A checkpointed group holds its layers' until it returns: every-layer's
  // peak (1170 above) grows by one layer's, full's by all three at layer 0
  // but peaks at layer 2: 1350 + 7.
  EXPECT_EQ(remat::plan::predicted_peak_bytes(chain, CheckpointPolicy::every_layer().schedule(3)), 1177);
  EXPECT_EQ(remat::plan::predicted_peak_bytes(chain, CheckpointPolicy::full().schedule(3)), 1357);

  // Layer 1 recomputes its attention: keeps 40 instead of 100, costs 0.5 s,
  // and its backward needs 80 above what it keeps and the two gradients.
  chain.stages[2].recompute_attention(
      SelectiveCost(40, 0.5).forward_transient_bytes(5).backward_transient_bytes(80));
  Schedule s;
  s.segments = {{0, 1, SegmentMode::kStore},
                {1, 2, SegmentMode::kRecomputeAttention},
                {2, 3, SegmentMode::kStore}};
  auto ev = remat::plan::evaluate(chain, s);
  // Forward holds 1000 + 10 + 100 + 40 + 100 + 50 = 1300; the head's
  // backward: 1301 + 10 + 40 = 1351. Layer 1's backward: 1160 (held, with
  // its 40 and its output's gradient) + 10 + 80 = 1250.
  EXPECT_EQ(ev.activation_bytes, 300);
  EXPECT_EQ(ev.peak_bytes, 1351);
  EXPECT_DOUBLE_EQ(ev.step_seconds, 26.5);
  // With a recompute needing 200, layer 1's backward is the peak.
  chain.stages[2].recompute_attention(
      SelectiveCost(40, 0.5).forward_transient_bytes(5).backward_transient_bytes(200));
  ev = remat::plan::evaluate(chain, s);
  EXPECT_EQ(ev.peak_bytes, 1160 + 10 + 200);
  EXPECT_EQ(ev.peak_event, "backward of layer.1");
}

TEST(PlanEvaluate, RejectsModesTheChainDoesNotOffer) {
  const auto chain = toy_chain();
  try {
    remat::plan::evaluate(chain, CheckpointPolicy::selective_attention().schedule(3));
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("'layer.0') to offer recompute-attention"),
              std::string::npos)
        << e.what();
  }
  try {
    remat::plan::evaluate(chain, CheckpointPolicy::none().schedule(4));
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("schedule for 3 layers"), std::string::npos)
        << e.what();
  }
}

// A random heterogeneous chain: optional embedding and head, `layers` layers,
// selective options on some layers. Sizes are small integers so that ties and
// exact comparisons happen.
Chain random_chain(std::mt19937& rng, int layers, bool emb, bool head) {
  std::uniform_int_distribution<int64_t> small(1, 60), big(20, 400), tmp(0, 80);
  std::uniform_real_distribution<double> secs(0.5, 4.0);
  std::bernoulli_distribution coin(0.5);
  Chain c;
  c.base_bytes = small(rng) * 10;
  auto stage = [&](std::string name, StageKind kind) {
    const int64_t out = small(rng);
    auto s = StageCost(std::move(name), kind)
                 .forward_seconds(secs(rng))
                 .backward_seconds(secs(rng))
                 .output_bytes(out)
                 .stored_bytes(out + big(rng))
                 .forward_transient_bytes(tmp(rng))
                 .nograd_transient_bytes(tmp(rng))
                 .backward_transient_bytes(tmp(rng));
    if (kind == StageKind::kLayer) {
      std::uniform_int_distribution<int64_t> kept(out, s.stored_bytes());
      if (coin(rng)) {
        s.recompute_attention(SelectiveCost(kept(rng), 0.1 * secs(rng))
                                  .forward_transient_bytes(tmp(rng))
                                  .backward_transient_bytes(tmp(rng) + 50));
      }
      if (coin(rng)) {
        s.recompute_mlp(SelectiveCost(kept(rng), 0.3 * secs(rng))
                            .forward_transient_bytes(tmp(rng))
                            .backward_transient_bytes(tmp(rng) + 50));
      }
      s.parameter_gradient_bytes(small(rng) / 2);
    }
    return s;
  };
  if (emb) {
    c.stages.push_back(stage("emb", StageKind::kEmbedding));
  }
  for (int i = 0; i < layers; ++i) {
    c.stages.push_back(stage("layer." + std::to_string(i), StageKind::kLayer));
  }
  if (head) {
    c.stages.push_back(stage("head", StageKind::kHead));
  }
  return c;
}

// Every schedule remat can execute on the chain's layers: each layer run
// normally in one of its offered modes, or part of a checkpointed group.
std::vector<Schedule> all_schedules(const Chain& chain) {
  const int64_t first = chain.first_layer();
  const int64_t n = chain.num_layers();
  std::vector<Schedule> out;
  Schedule cur;
  std::function<void(int64_t)> go = [&](int64_t l) {
    if (l == n) {
      out.push_back(cur);
      return;
    }
    const auto& s = chain.stages[first + l];
    for (auto m : {SegmentMode::kStore, SegmentMode::kRecomputeAttention,
                   SegmentMode::kRecomputeMlp}) {
      if (m != SegmentMode::kStore && !s.selective(m)) {
        continue;
      }
      cur.segments.push_back({l, l + 1, m});
      go(l + 1);
      cur.segments.pop_back();
    }
    for (int64_t e = l + 1; e <= n; ++e) {
      cur.segments.push_back({l, e, SegmentMode::kRecompute});
      go(e);
      cur.segments.pop_back();
    }
  };
  go(0);
  return out;
}

bool near(double a, double b) {
  return std::abs(a - b) <= 1e-9 * std::max(1.0, std::abs(b));
}

TEST(PlanSolve, MatchesBruteForceOnRandomChains) {
  std::mt19937 rng(12345);
  int checked = 0;
  for (int trial = 0; trial < 90; ++trial) {
    const bool emb = trial % 2 == 0;
    const bool head = trial % 3 != 0;
    const int max_layers = 8 - emb - head;
    const int layers = 1 + trial % max_layers;
    auto chain = random_chain(rng, layers, emb, head);
    // A third of the chains start the step without gradients: each stage's
    // appear in its backward, and the planner must count them there.
    if (trial % 3 == 1) {
      chain.gradients = remat::plan::GradientReset::kNone;
    }

    struct Cost {
      int64_t peak;
      double seconds;
    };
    std::vector<Cost> costs;
    for (const auto& s : all_schedules(chain)) {
      auto ev = remat::plan::evaluate(chain, s);
      costs.push_back({ev.peak_bytes, ev.step_seconds});
    }
    int64_t lo = std::numeric_limits<int64_t>::max();
    int64_t hi = 0;
    for (const auto& c : costs) {
      lo = std::min(lo, c.peak);
      hi = std::max(hi, c.peak);
    }
    ASSERT_EQ(remat::plan::min_feasible_budget(chain), lo) << chain.str();

    // Budgets: every distinct peak (the edges) and points in between.
    std::vector<int64_t> budgets;
    for (const auto& c : costs) {
      budgets.push_back(c.peak);
      budgets.push_back(c.peak + 1);
    }
    std::sort(budgets.begin(), budgets.end());
    budgets.erase(std::unique(budgets.begin(), budgets.end()), budgets.end());
    if (budgets.size() > 80) {
      std::shuffle(budgets.begin(), budgets.end(), rng);
      budgets.resize(80);
    }
    for (int64_t budget : budgets) {
      double best = std::numeric_limits<double>::infinity();
      for (const auto& c : costs) {
        if (c.peak <= budget) {
          best = std::min(best, c.seconds);
        }
      }
      auto plan = remat::plan::solve(chain, budget);
      EXPECT_LE(plan.peak_bytes, budget);
      EXPECT_TRUE(near(plan.step_seconds, best))
          << "budget " << budget << ": planner " << plan.str() << " vs best "
          << best << "\n" << chain.str();
      // The plan's own figures are the evaluator's.
      auto ev = remat::plan::evaluate(chain, plan.schedule);
      EXPECT_EQ(ev.peak_bytes, plan.peak_bytes);
      EXPECT_DOUBLE_EQ(ev.step_seconds, plan.step_seconds);
      ++checked;
    }

    // The frontier is the brute-force Pareto set: every schedule is matched
    // or beaten by a frontier plan, and each frontier plan is optimal at its
    // own peak.
    auto front = remat::plan::frontier(chain);
    ASSERT_FALSE(front.empty());
    EXPECT_EQ(front.front().peak_bytes, lo);
    for (const auto& c : costs) {
      bool covered = false;
      for (const auto& p : front) {
        covered = covered ||
            (p.peak_bytes <= c.peak && p.step_seconds <= c.seconds + 1e-9 * c.seconds);
      }
      EXPECT_TRUE(covered) << "schedule with peak " << c.peak << " and "
                           << c.seconds << " s is not covered";
    }
    for (size_t k = 1; k < front.size(); ++k) {
      EXPECT_GT(front[k].peak_bytes, front[k - 1].peak_bytes);
      EXPECT_LT(front[k].step_seconds, front[k - 1].step_seconds);
    }
  }
  EXPECT_GT(checked, 500);
}

TEST(PlanSolve, RestrictedOptionsMatchBruteForce) {
  // Without selective modes the planner must find the best plain
  // store/recompute schedule.
  std::mt19937 rng(7);
  for (int trial = 0; trial < 10; ++trial) {
    auto chain = random_chain(rng, 6, true, true);
    const auto opts = remat::plan::PlannerOptions().selective(false);
    const int64_t none = remat::plan::predicted_peak_bytes(chain, CheckpointPolicy::none().schedule(6));
    const int64_t lo = remat::plan::min_feasible_budget(chain, opts);
    std::vector<remat::plan::Evaluation> plain;
    for (const auto& s : all_schedules(chain)) {
      if (std::all_of(s.segments.begin(), s.segments.end(), [](const auto& g) {
            return g.mode == SegmentMode::kStore || g.mode == SegmentMode::kRecompute;
          })) {
        plain.push_back(remat::plan::evaluate(chain, s));
      }
    }
    int64_t plain_lo = std::numeric_limits<int64_t>::max();
    for (const auto& ev : plain) {
      plain_lo = std::min(plain_lo, ev.peak_bytes);
    }
    EXPECT_EQ(lo, plain_lo);
    for (int64_t budget = lo; budget <= none; budget += std::max<int64_t>(1, (none - lo) / 17)) {
      double best = std::numeric_limits<double>::infinity();
      for (const auto& ev : plain) {
        if (ev.peak_bytes <= budget) {
          best = std::min(best, ev.step_seconds);
        }
      }
      auto plan = remat::plan::solve(chain, budget, opts);
      EXPECT_TRUE(near(plan.step_seconds, best)) << budget;
      for (const auto& g : plan.schedule.segments) {
        EXPECT_TRUE(g.mode == SegmentMode::kStore || g.mode == SegmentMode::kRecompute);
      }
    }
  }
}

TEST(PlanSolve, BudgetSweepIsFeasibleAndMonotonic) {
  std::mt19937 rng(2024);
  for (int trial = 0; trial < 3; ++trial) {
    auto chain = random_chain(rng, 32, true, true);
    const int64_t layers = chain.num_layers();
    const auto none = remat::plan::evaluate(chain, CheckpointPolicy::none().schedule(layers));
    const int64_t lo = remat::plan::min_feasible_budget(chain);
    ASSERT_LE(lo, none.peak_bytes);
    double previous = std::numeric_limits<double>::infinity();
    const int steps = 60;
    for (int k = 0; k <= steps; ++k) {
      const int64_t budget = lo + (none.peak_bytes - lo) * k / steps;
      auto plan = remat::plan::solve(chain, budget);
      EXPECT_LE(plan.peak_bytes, budget);
      EXPECT_LE(plan.step_seconds, previous * (1 + 1e-12)) << "budget " << budget;
      previous = plan.step_seconds;
    }
    // With the no-checkpoint peak as budget nothing needs recomputing.
    EXPECT_TRUE(near(previous, none.step_seconds));
    // Fixed policies never beat the plan at their own peak.
    for (const auto& name : {"every-layer", "every-2", "every-4", "sqrt", "full"}) {
      auto s = CheckpointPolicy::parse(name).schedule(layers);
      auto ev = remat::plan::evaluate(chain, s);
      auto plan = remat::plan::solve(chain, ev.peak_bytes);
      EXPECT_LE(plan.step_seconds, ev.step_seconds * (1 + 1e-12)) << name;
    }
  }
}

TEST(PlanSolve, BelowMinimumBudgetGivesTheMinimum) {
  const auto chain = toy_chain();
  const int64_t min = remat::plan::min_feasible_budget(chain);
  EXPECT_EQ(remat::plan::solve(chain, min).peak_bytes, min);
  try {
    remat::plan::solve(chain, min - 1);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("at least " + std::to_string(min) + " bytes"), std::string::npos) << msg;
    EXPECT_NE(msg.find("but got " + std::to_string(min - 1) + " bytes"), std::string::npos) << msg;
  }
  // Human-readable too, on a chain large enough for units.
  Chain big = chain;
  big.base_bytes = int64_t(3) << 30;
  const int64_t big_min = remat::plan::min_feasible_budget(big);
  try {
    remat::plan::solve(big, 1 << 30);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(std::to_string(big_min) + " bytes (3.00 GiB)"), std::string::npos) << msg;
  }
}

TEST(PlanSolve, ToyChainPlans) {
  const auto chain = toy_chain();
  // At the no-checkpoint peak: store everything.
  auto plan = remat::plan::solve(chain, 1411);
  EXPECT_EQ(plan.schedule.str(), "store[0,3)");
  EXPECT_DOUBLE_EQ(plan.step_seconds, 26);
  ASSERT_EQ(plan.stage_modes.size(), 5u);
  EXPECT_EQ(plan.stage_modes[0], SegmentMode::kStore);
  // The minimum needs checkpointing; the head's backward (1141 with three
  // groups of one, see above) bounds it from below.
  const int64_t min = remat::plan::min_feasible_budget(chain);
  EXPECT_LT(min, 1411);
  EXPECT_GE(min, 1141);
  auto tight = remat::plan::solve(chain, min);
  EXPECT_GT(tight.step_seconds, 26);
}

TEST(PlanSolve, MemoryResolutionStaysWithinBudget) {
  std::mt19937 rng(99);
  auto chain = random_chain(rng, 24, true, true);
  const int64_t none = remat::plan::predicted_peak_bytes(chain, CheckpointPolicy::none().schedule(24));
  const int64_t lo = remat::plan::min_feasible_budget(chain);
  const auto coarse = remat::plan::PlannerOptions().memory_resolution_bytes(16);
  for (int k = 0; k <= 10; ++k) {
    const int64_t budget = lo + (none - lo) * k / 10 + 200;
    auto exact = remat::plan::solve(chain, budget);
    auto approx = remat::plan::solve(chain, budget, coarse);
    EXPECT_LE(approx.peak_bytes, budget);
    EXPECT_GE(approx.step_seconds, exact.step_seconds * (1 - 1e-12));
  }
}

TEST(PlanChain, ValidateNamesTheStage) {
  auto chain = toy_chain();
  chain.stages[2].stored_bytes(5);
  try {
    chain.validate();
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("stage 2 ('layer.1') stores 5 bytes"),
              std::string::npos)
        << e.what();
  }
  chain = toy_chain();
  std::swap(chain.stages[0], chain.stages[1]);
  try {
    chain.validate();
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("stage 1 ('emb') is a embedding after a layer"),
              std::string::npos)
        << e.what();
  }
}

// A chain whose layers offer the selective modes every fixed policy uses:
// the estimator's, of a small BERT.
Chain selective_chain() {
  return remat::plan::estimate_chain(
      remat::plan::ModelSpec::bert_base().layers(3).seq(64).batch(2));
}

// compare_schedules (remat/plan/compare.h): what `remat plan` prints.
TEST(PlanCompare, FixedPoliciesOnceAndAPlanPerBudget) {
  using remat::plan::parse_budget;
  const auto chain = selective_chain();
  const int64_t least = remat::plan::min_feasible_budget(chain, {});
  const auto c = remat::plan::compare_schedules(
      chain, {parse_budget("100%"), parse_budget(std::to_string(least)), parse_budget("1")});
  EXPECT_EQ(c.none.peak_bytes,
            remat::plan::evaluate(chain, CheckpointPolicy::none().schedule(3)).peak_bytes);
  EXPECT_EQ(c.min_budget_bytes, least);
  EXPECT_EQ(c.fixed.front().name, "none");
  // Each schedule once: a policy with the schedule of an earlier one is its alias.
  std::vector<std::string> schedules;
  for (const auto& f : c.fixed) {
    schedules.push_back(f.schedule.str());
  }
  std::sort(schedules.begin(), schedules.end());
  EXPECT_EQ(std::unique(schedules.begin(), schedules.end()), schedules.end());
  ASSERT_EQ(c.budgets.size(), 3u);
  EXPECT_EQ(c.budgets[0].bytes, c.none.peak_bytes); // 100% of none's peak
  EXPECT_EQ(c.plans[0].name, "plan@100%");
  EXPECT_EQ(c.plans[0].schedule.str(), c.fixed.front().schedule.str());
  EXPECT_EQ(c.plans[0].aliases, "none");
  EXPECT_LE(c.plans[1].predicted.peak_bytes, least);
  // 1 byte is below the smallest feasible budget: kept, not planned, refused.
  EXPECT_FALSE(c.plans[2].ok);
  EXPECT_TRUE(c.plans[2].schedule.segments.empty());
  ASSERT_EQ(c.refused.size(), 1u);
  EXPECT_EQ(c.refused[0].rfind("--budget: expected at least the smallest feasible budget, ", 0),
            0u)
      << c.refused[0];
  EXPECT_NE(c.refused[0].find("but got 1 (1 bytes)"), std::string::npos) << c.refused[0];
  const auto text = c.budgets_text();
  EXPECT_NE(text.find("budget 1 = "), std::string::npos) << text;
  EXPECT_NE(text.find("; not planned"), std::string::npos) << text;
  EXPECT_NE(c.table().find("plan@" + std::to_string(least)), std::string::npos);
  EXPECT_EQ(c.budgets_json().size(), 3u);
  EXPECT_EQ(c.budgets_json()[2]["feasible"], false);
  EXPECT_EQ(c.policies_json().size(), c.fixed.size());
}

TEST(PlanCompare, APlanWithAFixedPolicysScheduleSharesItsMeasurement) {
  auto c = remat::plan::compare_schedules(selective_chain(), {remat::plan::parse_budget("100%")});
  auto todo = c.to_measure();
  // Every fixed policy; the plan is none's schedule, so not measured twice.
  EXPECT_EQ(todo.size(), c.fixed.size());
  for (auto* cand : todo) {
    cand->measured = true;
    cand->peak_bytes = 1000;
    cand->times = {3, 1, 2};
  }
  c.finish_measurements();
  EXPECT_TRUE(c.measured);
  EXPECT_DOUBLE_EQ(c.fixed.front().step_seconds, 2);
  EXPECT_TRUE(c.plans[0].measured);
  EXPECT_EQ(c.plans[0].peak_bytes, 1000);
  EXPECT_NE(c.table().find("pred/meas"), std::string::npos);
  EXPECT_EQ(c.plans[0].to_json()["measured_peak_bytes"], 1000);
}

TEST(PlanCompare, ParseBudgetNamesTheText) {
  using remat::plan::parse_budget;
  EXPECT_TRUE(parse_budget("50%").percent);
  EXPECT_DOUBLE_EQ(parse_budget("50%").value, 50);
  EXPECT_DOUBLE_EQ(parse_budget("1KiB").value, 1024);
  for (const char* bad : {"0%", "x%", "%", "-5%"}) {
    try {
      parse_budget(bad);
      FAIL() << bad;
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what_without_backtrace()).find(
                    "expected a percentage above 0 such as 50%, but got '" + std::string(bad) +
                    "'"),
                std::string::npos)
          << e.what_without_backtrace();
    }
  }
  EXPECT_THROW(parse_budget("lots"), c10::Error);
}

} // namespace
