// The guard on bad steps (TrainOptions::max_bad_steps): a NaN or infinite
// loss or gradient norm skips the update and leaves weights and AdamW state
// as they were, is said in one line, is recorded, and more than
// max_bad_steps of them in a row stop the run with the last good state kept.
// Faults come from the private hook train/step_faults.h.
#include "remat/distributed/process_group.h"
#include "remat/train/run.h"
#include "remat/train/train_state.h"
#include "remat/train/trainer.h"
#include "temp_dir.h"
#include "testing.h"
#include "train/step_faults.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <exception>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <thread>

#include <unistd.h>

namespace {

using namespace remat::train;
using remat::train::detail::ScopedStepFault;
using remat::train::detail::StepFault;
using ::testing::HasSubstr;

const std::string kData = std::string(REMAT_SOURCE_DIR) + "/data/routing";
const double kNan = std::numeric_limits<double>::quiet_NaN();
const double kInf = std::numeric_limits<double>::infinity();

TrainOptions tiny() {
  return TrainOptions()
      .train_path(kData + "/train.jsonl")
      .vocab_path(kData + "/vocab.txt")
      .valid_fraction(0.05)
      .model(remat::nn::ModelConfig().layers(1).hidden(16).heads(2).seq(32).batch(8).dropout(0))
      .max_steps(8)
      .threads(1);
}

std::string temp_dir(const std::string& name) {
  return remat_test::fresh_temp_dir("bad_steps_" + name, /*create=*/false);
}

// A fault that makes the loss NaN on the steps in `steps` (any rank).
StepFault nan_loss_on(std::set<int64_t> steps) {
  return [steps](int64_t step, int64_t, double& loss, const std::vector<torch::Tensor>&) {
    if (steps.count(step) > 0) {
      loss = kNan;
    }
  };
}

std::vector<torch::Tensor> weights(Trainer& t) {
  std::vector<torch::Tensor> out;
  for (const auto& p : t.model().parameters()) {
    out.push_back(p.detach().clone());
  }
  return out;
}

bool same(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  if (a.size() != b.size()) {
    return false;
  }
  for (size_t i = 0; i < a.size(); ++i) {
    if (!torch::equal(a[i], b[i])) {
      return false;
    }
  }
  return true;
}

// The serialized AdamW state (moments and step counts) of `t`.
torch::Tensor optimizer_bytes(Trainer& t, const std::string& dir) {
  t.save_state(dir);
  return load_train_state(state_path(dir)).tensors.at("optimizer");
}

TEST(TrainBadSteps, ANanLossSkipsTheUpdateAndLeavesWeightsAndOptimizerAsTheyWere) {
  ScopedStepFault fault(nan_loss_on({2}));
  Trainer t(tiny());
  const auto dir = temp_dir("skip");
  auto r1 = t.step();
  EXPECT_FALSE(r1.skipped);
  EXPECT_EQ(r1.skipped_in_a_row, 0);
  const auto before = weights(t);
  const auto adam_before = optimizer_bytes(t, dir + "/before");

  auto r2 = t.step();
  EXPECT_TRUE(r2.skipped);
  EXPECT_EQ(r2.skipped_in_a_row, 1);
  EXPECT_TRUE(std::isnan(r2.loss));
  EXPECT_EQ(r2.step, 2);
  EXPECT_EQ(t.step_count(), 2); // the step counts
  EXPECT_GT(r2.lr, 0.0);        // and the schedule moved on
  EXPECT_TRUE(same(before, weights(t)));
  EXPECT_TRUE(torch::equal(adam_before, optimizer_bytes(t, dir + "/after")));
  for (const auto& p : t.model().parameters()) {
    EXPECT_FALSE(p.grad().defined()); // gradients dropped
  }
  EXPECT_EQ(describe_skipped_step(r2, 3), "step 2: loss is nan; update skipped (1 of 3 allowed in a row)");

  // A good step trains again and starts the count afresh.
  auto r3 = t.step();
  EXPECT_FALSE(r3.skipped);
  EXPECT_EQ(r3.skipped_in_a_row, 0);
  EXPECT_TRUE(std::isfinite(r3.loss));
  EXPECT_FALSE(same(before, weights(t)));
  ASSERT_EQ(t.history().steps.size(), 3u);
  EXPECT_TRUE(t.history().steps[1].skipped);
}

TEST(TrainBadSteps, AnInfiniteGradientNormSkipsTheUpdateToo) {
  // The loss is finite, one gradient is not: the norm before clipping is inf.
  ScopedStepFault fault(
      [](int64_t step, int64_t, double&, const std::vector<torch::Tensor>& params) {
        if (step == 2) {
          torch::NoGradGuard no_grad;
          params.front().grad().fill_(kInf);
        }
      });
  Trainer t(tiny());
  t.step();
  const auto before = weights(t);
  auto r = t.step();
  EXPECT_TRUE(r.skipped);
  EXPECT_TRUE(std::isfinite(r.loss));
  EXPECT_TRUE(std::isinf(r.grad_norm));
  EXPECT_TRUE(same(before, weights(t)));
  EXPECT_THAT(describe_skipped_step(r, 3), HasSubstr("step 2: gradient norm is inf (loss "));
  EXPECT_THAT(describe_skipped_step(r, 3), HasSubstr("; update skipped (1 of 3 allowed in a row)"));
}

TEST(TrainBadSteps, GoodStepsBetweenBadOnesStartTheCountAgainAndTheRunFinishes) {
  ScopedStepFault fault(nan_loss_on({2, 3, 5, 6}));
  std::vector<std::string> lines;
  TrainCallbacks cb;
  cb.on_message = [&](const std::string& text) { lines.push_back(text); };
  auto r = run_training(tiny().max_steps(7).max_bad_steps(2).valid_fraction(0), cb);
  EXPECT_EQ(r.steps, 7);
  std::vector<int64_t> in_a_row;
  for (const auto& s : r.history.steps) {
    in_a_row.push_back(s.skipped_in_a_row);
  }
  EXPECT_EQ(in_a_row, (std::vector<int64_t>{0, 1, 2, 0, 1, 2, 0}));
  std::vector<std::string> said;
  for (const auto& l : lines) {
    if (l.find("update skipped") != std::string::npos) {
      said.push_back(l);
    }
  }
  EXPECT_EQ(said, (std::vector<std::string>{
                      "step 2: loss is nan; update skipped (1 of 2 allowed in a row)",
                      "step 3: loss is nan; update skipped (2 of 2 allowed in a row)",
                      "step 5: loss is nan; update skipped (1 of 2 allowed in a row)",
                      "step 6: loss is nan; update skipped (2 of 2 allowed in a row)"}));
}

TEST(TrainBadSteps, MoreThanMaxBadStepsInARowStopTheRunAndKeepTheLastGoodState) {
  const auto dir = temp_dir("stop");
  ScopedStepFault fault(nan_loss_on({4, 5, 6, 7, 8}));
  std::vector<StepRecord> seen;
  TrainCallbacks cb;
  cb.on_step = [&](const StepRecord& r, int64_t) { seen.push_back(r); };
  const auto o = tiny().out_dir(dir).save_every(1).max_bad_steps(2);
  const auto what = remat_test::thrown_message([&] { run_training(o, cb); });
  EXPECT_EQ(
      what,
      "max_bad_steps: expected at most 2 bad steps in a row, but got 3 (step 6: loss is nan); "
      "training stopped, the last state saved, " +
          state_path(dir) + " (step 3), is left as it is");
  // The bad steps were heard (the metrics log gets them), and no state was
  // saved at a bad step: the state and the one before are steps 3 and 2.
  ASSERT_EQ(seen.size(), 6u);
  EXPECT_TRUE(seen.back().skipped);
  EXPECT_EQ(peek_train_state_step(state_path(dir)), 3);
  EXPECT_EQ(peek_train_state_step(previous_state_path(dir)), 2);
  // max_bad_steps may change on resume: the run goes on from step 3.
  auto saved = saved_run_options(dir);
  EXPECT_EQ(saved.max_bad_steps(), 2);
  check_resume_options(saved, TrainOptions(saved).max_bad_steps(10), state_path(dir));
}

TEST(TrainBadSteps, ZeroMaxBadStepsStopsAtTheFirstWithNothingSaved) {
  ScopedStepFault fault(nan_loss_on({2}));
  EXPECT_THROW_WITH(
      (run_training(tiny().max_bad_steps(0))),
      "max_bad_steps: expected at most 0 bad steps in a row, but got 1 (step 2: loss is nan); "
      "training stopped, nothing saved (no out_dir)");
  EXPECT_THROW_WITH((run_training(tiny().max_bad_steps(-1))), "max_bad_steps: expected a value >= 0, but got -1");
}

TEST(TrainBadSteps, AResumedRunKeepsTheCountAndTheCurve) {
  // Steps 2 and 3 are bad; a state saved after step 2 resumes with one bad
  // step in a row, so step 3 is the second, as in the run never stopped.
  ScopedStepFault fault(nan_loss_on({2, 3}));
  const auto dir = temp_dir("resume");
  auto o = tiny().out_dir(dir);
  o.model().dropout(0.1);
  Trainer a(o);
  a.step();
  a.step();
  a.save_state(dir);
  Trainer b(o);
  b.load_state(state_path(dir));
  for (int i = 0; i < 3; ++i) {
    auto ra = a.step();
    auto rb = b.step();
    EXPECT_EQ(ra.skipped_in_a_row, rb.skipped_in_a_row) << ra.step;
    EXPECT_EQ(ra.skipped, rb.skipped) << ra.step;
    if (!ra.skipped) {
      EXPECT_EQ(ra.loss, rb.loss) << ra.step;
    }
  }
  EXPECT_EQ(b.history().steps[2].skipped_in_a_row, 2);
  EXPECT_TRUE(same(weights(a), weights(b)));
}

TEST(TrainBadSteps, RecordsAndOptionsRoundTripAndOldOnesStillLoad) {
  StepRecord r;
  r.step = 4;
  r.loss = kNan;
  r.skipped = true;
  r.skipped_in_a_row = 2;
  // As written to --metrics and the state: NaN becomes null, and back.
  const auto j = nlohmann::json::parse(r.to_json().dump());
  EXPECT_TRUE(j.at("loss").is_null());
  EXPECT_EQ(j.at("skipped"), true);
  auto back = StepRecord::from_json(j);
  EXPECT_TRUE(back.skipped);
  EXPECT_EQ(back.skipped_in_a_row, 2);
  EXPECT_TRUE(std::isnan(back.loss));
  // A good step's line is as before, and one written before the guard reads.
  StepRecord good;
  auto gj = good.to_json();
  EXPECT_FALSE(gj.contains("skipped"));
  EXPECT_FALSE(StepRecord::from_json(gj).skipped);

  auto oj = tiny().max_bad_steps(7).to_json();
  EXPECT_EQ(TrainOptions::from_json(oj).max_bad_steps(), 7);
  oj.erase("max_bad_steps"); // a state saved before --max-bad-steps
  EXPECT_EQ(TrainOptions::from_json(oj).max_bad_steps(), TrainOptions().max_bad_steps());
}

TEST(TrainBadSteps, ANanOnOneRankSkipsTheStepOnEveryRank) {
  // Two ranks as two threads (Gloo on 127.0.0.1): rank 1's loss is NaN at
  // step 2, rank 0's is not, and both skip it and stay in step.
  ScopedStepFault fault(
      [](int64_t step, int64_t rank, double& loss, const std::vector<torch::Tensor>&) {
        if (step == 2 && rank == 1) {
          loss = kNan;
        }
      });
  const std::string store = ::testing::TempDir() + "/bad_steps_store_" + std::to_string(::getpid());
  std::remove(store.c_str());
  std::vector<std::vector<StepRecord>> records(2);
  std::vector<std::vector<torch::Tensor>> after(2);
  std::exception_ptr errors[2];
  std::vector<std::thread> threads;
  for (int rank = 0; rank < 2; ++rank) {
    threads.emplace_back([&, rank] {
      try {
        auto group = std::make_shared<remat::dist::ProcessGroup>(
            remat::dist::DistOptions().rank(rank).world_size(2).store_path(store).timeout_seconds(30));
        Trainer t(tiny(), group);
        for (int i = 0; i < 3; ++i) {
          records[rank].push_back(t.step());
        }
        after[rank] = weights(t);
      } catch (...) {
        errors[rank] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) {
    t.join();
  }
  std::remove(store.c_str());
  for (int rank = 0; rank < 2; ++rank) {
    if (errors[rank]) {
      FAIL() << "rank " << rank << ": "
             << remat_test::thrown_message([&] { std::rethrow_exception(errors[rank]); });
    }
  }
  for (int rank = 0; rank < 2; ++rank) {
    ASSERT_EQ(records[rank].size(), 3u);
    EXPECT_FALSE(records[rank][0].skipped) << rank;
    EXPECT_TRUE(records[rank][1].skipped) << rank;
    EXPECT_FALSE(records[rank][2].skipped) << rank;
  }
  EXPECT_TRUE(same(after[0], after[1]));
}

} // namespace
