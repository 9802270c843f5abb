// The planner on real models: a measured profile of small Bert and Llama
// models predicts the bytes of real steps, and a planned schedule's measured
// peak never exceeds its budget.
#include "testing.h"

#include "remat/memory.h"
#include "remat/nn/bert.h"
#include "remat/nn/llama.h"
#include "remat/nn/profile.h"
#include "remat/plan/solver.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <iostream>

namespace {

using remat::CheckpointPolicy;
using remat::nn::StepMeasurement;
using remat::plan::Chain;

// A model under test, with the step the planner predicts.
struct Subject {
  std::string name;
  int64_t layers = 0;
  std::function<Chain()> profile;
  std::function<StepMeasurement(const CheckpointPolicy&)> measure;
  std::function<remat::plan::Plan(int64_t)> plan;
};

class PlanProfile : public ::testing::Test {
 protected:
  PlanProfile() {
    torch::manual_seed(0);
  }

  // Llama: 4 layers, GQA, eager attention, next-token loss.
  Subject llama() {
    llama_ = remat::nn::Llama(remat::nn::LlamaOptions()
                                  .vocab_size(128)
                                  .hidden_size(64)
                                  .intermediate_size(172)
                                  .num_layers(4)
                                  .num_heads(4)
                                  .num_kv_heads(2));
    ids_ = torch::randint(128, {2, 64});
    Subject s;
    s.name = "llama";
    s.layers = 4;
    s.profile = [this] {
      return remat::nn::profile_model(
          llama_, remat::nn::LlamaStep(ids_), remat::plan::ProfileOptions().gradients(gradients_));
    };
    s.measure = [this](const CheckpointPolicy& p) {
      llama_->gradient_checkpointing_enable(p);
      return remat::nn::measure_step(*llama_, remat::nn::LlamaStep(ids_), 1, 0, gradients_);
    };
    s.plan = [this](int64_t budget) {
      return remat::nn::plan_checkpointing(llama_, remat::nn::LlamaStep(ids_), budget);
    };
    return s;
  }

  // Bert: 4 layers, dropout, a padded batch, a regression loss.
  Subject bert() {
    bert_ = remat::nn::Bert(remat::nn::BertOptions()
                                .vocab_size(100)
                                .hidden_size(64)
                                .num_layers(4)
                                .num_heads(4)
                                .max_position_embeddings(64));
    bert_->train();
    ids_ = torch::randint(100, {2, 64});
    mask_ = torch::ones({2, 64}, torch::kLong);
    mask_.index_put_({1, torch::indexing::Slice(48, torch::indexing::None)}, 0);
    target_ = torch::randn({2, 64, 64});
    auto step = [this] {
      auto target = target_;
      return remat::nn::BertStep(ids_).attention_mask(mask_).loss(
          [target](const remat::nn::BertOutput& o) {
            return torch::mse_loss(o.last_hidden_state, target);
          });
    };
    Subject s;
    s.name = "bert";
    s.layers = 4;
    s.profile = [this, step] {
      return remat::nn::profile_model(
          bert_, step(), remat::plan::ProfileOptions().gradients(gradients_));
    };
    s.measure = [this, step](const CheckpointPolicy& p) {
      bert_->gradient_checkpointing_enable(p);
      return remat::nn::measure_step(*bert_, step(), 1, 0, gradients_);
    };
    s.plan = [this, step](int64_t budget) {
      return remat::nn::plan_checkpointing(bert_, step(), budget);
    };
    return s;
  }

  // The step profiled and measured: gradients freed (remat's bench and
  // trainer) or zeroed and kept.
  remat::plan::GradientReset gradients_ = remat::plan::GradientReset::kNone;
  remat::nn::Llama llama_{nullptr};
  remat::nn::Bert bert_{nullptr};
  torch::Tensor ids_, mask_, target_;
};

const char* kPolicies[] = {"none", "every-layer", "every-2", "sqrt", "full",
                           "selective-attention", "selective-mlp", "save-matmuls",
                           "save-projections"};

void expect_fixed_policies_predicted(const Subject& s) {
  const auto chain = s.profile();
  for (const char* name : kPolicies) {
    const auto policy = CheckpointPolicy::parse(name);
    const auto ev = remat::plan::evaluate(chain, policy.schedule(s.layers));
    const auto m = s.measure(policy);
    // The base also counts the loss and its gradient (4 bytes each), and
    // what the loss's graph keeps until the step ends.
    EXPECT_GE(chain.base_bytes - m.base_bytes, 8) << s.name << " " << name;
    // The model errs high where it simplifies, never low.
    EXPECT_GE(ev.peak_bytes, m.peak_bytes) << s.name << " " << name;
    EXPECT_LE(ev.peak_bytes, m.peak_bytes * 1.05) << s.name << " " << name;
    std::cout << s.name << " " << name << ": predicted peak " << ev.peak_bytes
              << ", measured " << m.peak_bytes << " (" << ev.peak_event << ")\n";
  }
}

TEST_F(PlanProfile, LlamaFixedPoliciesPeaksArePredicted) {
  expect_fixed_policies_predicted(llama());
}

TEST_F(PlanProfile, BertFixedPoliciesPeaksArePredicted) {
  expect_fixed_policies_predicted(bert());
}

// From the smallest feasible budget to the peak without checkpointing: the
// planned schedule's measured peak stays within the budget, the prediction
// within 5% of it, and a larger budget never gives a slower predicted step.
void expect_budget_sweep_holds(const Subject& s) {
  const auto chain = s.profile();
  const int64_t lo = remat::plan::min_feasible_budget(chain);
  const int64_t hi = remat::plan::predicted_peak_bytes(chain, CheckpointPolicy::none().schedule(s.layers));
  ASSERT_LT(lo, hi);
  double previous_seconds = std::numeric_limits<double>::infinity();
  const int n = 10;
  for (int k = 0; k <= n; ++k) {
    const int64_t budget = lo + (hi - lo) * k / n;
    const auto plan = remat::plan::solve(chain, budget);
    EXPECT_LE(plan.peak_bytes, budget);
    EXPECT_LE(plan.step_seconds, previous_seconds * (1 + 1e-12)) << s.name << " budget " << budget;
    previous_seconds = plan.step_seconds;
    const auto m = s.measure(CheckpointPolicy::custom(plan.schedule, "planned"));
    EXPECT_LE(m.peak_bytes, budget) << s.name << " " << plan.str();
    EXPECT_LE(std::abs(plan.peak_bytes - m.peak_bytes), m.peak_bytes * 0.05)
        << s.name << " " << plan.str() << ": measured " << m.peak_bytes;
    std::cout << s.name << " budget " << budget << ": " << plan.str() << ", measured peak "
              << m.peak_bytes << "\n";
  }
}

// The step that keeps zeroed gradients holds them from the start: its chain
// puts them in the base, and predicts that step as closely.
TEST_F(PlanProfile, ZeroedGradientStepsArePredictedToo) {
  gradients_ = remat::plan::GradientReset::kZero;
  expect_fixed_policies_predicted(llama());
  expect_fixed_policies_predicted(bert());
}

TEST_F(PlanProfile, FreedGradientsPeakBelowZeroedOnesAndArePlannedSo) {
  auto s = llama();
  const auto freed = s.profile();
  gradients_ = remat::plan::GradientReset::kZero;
  const auto zeroed = s.profile();
  EXPECT_EQ(freed.gradients, remat::plan::GradientReset::kNone);
  int64_t grads = 0;
  for (const auto& st : zeroed.stages) {
    grads += st.parameter_gradient_bytes();
  }
  EXPECT_EQ(zeroed.base_bytes - freed.base_bytes, grads);
  const auto none = CheckpointPolicy::none().schedule(s.layers);
  EXPECT_LT(remat::plan::predicted_peak_bytes(freed, none), remat::plan::predicted_peak_bytes(zeroed, none));
  // A budget that the freed step meets without checkpointing stores all.
  const auto plan = remat::plan::solve(freed, remat::plan::predicted_peak_bytes(freed, none));
  EXPECT_EQ(plan.schedule.str(), none.str());
}

TEST_F(PlanProfile, LlamaBudgetSweepStaysWithinBudget) {
  expect_budget_sweep_holds(llama());
}

TEST_F(PlanProfile, BertBudgetSweepStaysWithinBudget) {
  expect_budget_sweep_holds(bert());
}

TEST_F(PlanProfile, BudgetBelowTheSmallestIsRefusedWithIt) {
  auto s = llama();
  const auto chain = s.profile();
  const int64_t lo = remat::plan::min_feasible_budget(chain);
  // A fresh profile measures the same bytes (times differ; bytes do not).
  EXPECT_THROW_WITH(
      s.plan(lo - 1),
      "expected a memory budget of at least " + std::to_string(lo) + " bytes");
  EXPECT_NO_THROW(s.plan(lo));
  EXPECT_THROW_WITH(
      llama_->gradient_checkpointing_enable(CheckpointPolicy::budget(lo - 1), chain),
      "expected a memory budget of at least " + std::to_string(lo) + " bytes");
}

TEST_F(PlanProfile, BudgetPolicyIsPlannedAtTheFirstForward) {
  bert();
  // Reference: no checkpointing, the same dropout masks.
  bert_->gradient_checkpointing_enable(CheckpointPolicy::none());
  torch::manual_seed(7);
  remat::nn::default_bert_loss(bert_->forward(ids_, mask_)).backward();
  std::vector<torch::Tensor> reference;
  for (const auto& p : bert_->parameters()) {
    reference.push_back(p.grad().clone());
  }

  // The lazy plan profiles with the default loss; so does this test.
  const auto step = remat::nn::BertStep(ids_).attention_mask(mask_);
  const auto chain = remat::nn::profile_model(bert_, step);
  const int64_t lo = remat::plan::min_feasible_budget(chain);
  const int64_t hi = remat::plan::predicted_peak_bytes(chain, CheckpointPolicy::none().schedule(4));
  const int64_t budget = lo + (hi - lo) / 3;

  const auto policy = CheckpointPolicy::parse("budget:" + std::to_string(budget));
  bert_->gradient_checkpointing_enable(policy);
  EXPECT_EQ(bert_->checkpoint_schedule().str(), "store[0,4)");
  bert_->zero_grad();
  torch::manual_seed(7);
  remat::nn::default_bert_loss(bert_->forward(ids_, mask_)).backward();
  const auto planned = bert_->checkpoint_schedule();
  EXPECT_NE(planned.str(), "store[0,4)");
  EXPECT_LE(remat::plan::predicted_peak_bytes(chain, planned), budget) << planned.str();
  EXPECT_EQ(bert_->checkpoint_policy().name(), policy.name());
  // Planning ran the model, yet left the generator where it was: the step
  // drew the same masks and gave the same gradients.
  auto params = bert_->parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_TRUE(torch::allclose(params[i].grad(), reference[i], 1e-5, 1e-6)) << i;
  }
  // Planned once: the same shape does not plan again, and the step fits.
  const auto m = remat::nn::measure_step(*bert_, step);
  EXPECT_LE(m.peak_bytes, budget);
  EXPECT_EQ(bert_->checkpoint_schedule().str(), planned.str());
}

// A measured recompute costs more than nothing, even where it hides in the
// noise: a budget that storing everything fits plans to store everything,
// every time, instead of breaking a tie by memory.
TEST_F(PlanProfile, RecomputeIsNeverFreeSoABudgetThatStoringFitsStores) {
  // One model at a time: each builds on this fixture's inputs.
  auto check = [](const Subject& s) {
    const auto chain = s.profile();
    for (const auto& stage : chain.stages) {
      for (auto mode : remat::partial_modes()) {
        if (const auto sel = stage.selective(mode)) {
          EXPECT_GT(sel->recompute_seconds(), 0.0) << s.name << " " << stage.name();
        }
      }
    }
    const auto store = CheckpointPolicy::none().schedule(s.layers);
    const auto plan = remat::plan::solve(chain, remat::plan::predicted_peak_bytes(chain, store));
    EXPECT_EQ(plan.schedule.str(), store.str()) << s.name;
  };
  check(llama());
  check(bert());
}

// Every layer is measured under the per-op policies too, whatever the model
// offers itself, and the planner mixes them with the other modes per layer.
TEST_F(PlanProfile, PerOpPoliciesAreMeasuredOnEveryLayerAndPlanned) {
  auto s = llama();
  const auto chain = s.profile();
  int64_t layers = 0;
  for (const auto& stage : chain.stages) {
    const bool layer = stage.kind() == remat::plan::StageKind::kLayer;
    layers += layer;
    for (auto mode : {remat::SegmentMode::kSaveMatmuls, remat::SegmentMode::kSaveProjections}) {
      const auto sel = stage.selective(mode);
      ASSERT_EQ(sel.has_value(), layer) << stage.name() << " " << remat::to_string(mode);
      if (layer) {
        // It keeps its output and some products, less than storing keeps.
        EXPECT_GE(sel->stored_bytes(), stage.output_bytes()) << stage.name();
        EXPECT_LT(sel->stored_bytes(), stage.stored_bytes()) << stage.name();
      }
    }
    EXPECT_FALSE(stage.selective(remat::SegmentMode::kCompress)) << "lossy: only when asked";
  }
  EXPECT_EQ(layers, 4);
  // Projections keep fewer bytes than every product (scores are products).
  const auto& l0 = chain.stages[chain.first_layer()];
  EXPECT_LT(l0.save_projections()->stored_bytes(), l0.save_matmuls()->stored_bytes());

  // Whether a per-op layer is on the frontier depends on the measured times
  // (on a model this small the dispatcher's per-op cost outweighs the ops);
  // made cheap, the planner takes it, and its plan runs within the budget.
  auto cheap = chain;
  for (auto& stage : cheap.stages) {
    if (auto sel = stage.save_projections()) {
      stage.save_projections(sel->recompute_seconds(1e-9));
    }
  }
  const int64_t budget = remat::plan::predicted_peak_bytes(
      cheap, CheckpointPolicy::parse("save-projections").schedule(s.layers));
  const auto plan = remat::plan::solve(cheap, budget);
  EXPECT_NE(plan.schedule.str().find("save-projections"), std::string::npos) << plan.str();
  const auto m = s.measure(CheckpointPolicy::custom(plan.schedule, "planned"));
  EXPECT_LE(m.peak_bytes, budget) << plan.str();
  // Without partial modes, the planner does not use them.
  for (const auto& plan :
       remat::plan::frontier(chain, remat::plan::PlannerOptions().selective(false))) {
    for (auto mode : plan.stage_modes) {
      EXPECT_TRUE(mode == remat::SegmentMode::kStore || mode == remat::SegmentMode::kRecompute)
          << plan.str();
    }
  }
}

// Compressed layers (bf16 saves) only when asked for; then their bytes are
// predicted like the others' and a plan that mixes them stays within budget.
TEST_F(PlanProfile, CompressedLayersArePlannedWhenAskedFor) {
  auto s = llama();
  auto options = remat::plan::ProfileOptions();
  options.layer_modes({remat::SegmentMode::kCompress});
  const auto chain = remat::nn::profile_model(llama_, remat::nn::LlamaStep(ids_), options);
  const auto& l0 = chain.stages[chain.first_layer()];
  ASSERT_TRUE(l0.compress().has_value());
  EXPECT_FALSE(l0.save_matmuls().has_value());
  EXPECT_LT(l0.compress()->stored_bytes(), l0.stored_bytes());

  const auto policy = CheckpointPolicy::parse("compress");
  const auto ev = remat::plan::evaluate(chain, policy.schedule(s.layers));
  const auto m = s.measure(policy);
  EXPECT_GE(ev.peak_bytes, m.peak_bytes);
  EXPECT_LE(ev.peak_bytes, m.peak_bytes * 1.05);

  const int64_t lo = remat::plan::min_feasible_budget(chain);
  const int64_t hi = remat::plan::predicted_peak_bytes(chain, CheckpointPolicy::none().schedule(s.layers));
  for (int k = 1; k <= 3; ++k) {
    const int64_t budget = lo + (hi - lo) * k / 4;
    const auto plan = remat::plan::solve(chain, budget);
    const auto got = s.measure(CheckpointPolicy::custom(plan.schedule, "planned"));
    EXPECT_LE(got.peak_bytes, budget) << plan.str();
    std::cout << "budget " << budget << ": " << plan.str() << ", measured peak "
              << got.peak_bytes << "\n";
  }
}

TEST_F(PlanProfile, ProfilingLeavesGradientsAlone) {
  auto s = llama();
  auto params = llama_->parameters();
  // One with a gradient of its own, the others without.
  params[0].mutable_grad() = torch::full_like(params[0], 3.0);
  const int64_t before = remat::memory::current_bytes();
  s.profile();
  EXPECT_EQ(remat::memory::current_bytes(), before);
  EXPECT_TRUE(torch::equal(params[0].grad(), torch::full_like(params[0], 3.0)));
  for (size_t i = 1; i < params.size(); ++i) {
    EXPECT_FALSE(params[i].grad().defined()) << i;
  }
}

TEST_F(PlanProfile, ProfileChecksItsArguments) {
  EXPECT_THROW_WITH(
      remat::plan::profile_stages({}, torch::zeros({1})), "expected at least one stage");
  remat::plan::StageRunner r;
  r.name = "layer.0";
  EXPECT_THROW_WITH(
      remat::plan::profile_stages({r}, torch::zeros({1})),
      "expected stage 'layer.0' to have a forward function");
  r.forward = [](const torch::Tensor& x, remat::SegmentMode) { return x * 2; };
  r.kind = remat::plan::StageKind::kHead;
  r.modes = {remat::SegmentMode::kRecomputeMlp};
  EXPECT_THROW_WITH(
      remat::plan::profile_stages({r}, torch::zeros({1})),
      "expected selective modes only on layers, but stage 'layer.0' (head)");
  EXPECT_THROW_WITH(
      remat::plan::profile_stages({r}, torch::zeros({1}), remat::plan::ProfileOptions().repeats(0)),
      "expected warmup >= 0 and repeats >= 1");
  EXPECT_THROW_WITH(
      remat::plan::profile_stages(
          {r}, torch::zeros({1}),
          remat::plan::ProfileOptions().layer_modes({remat::SegmentMode::kRecomputeMlp})),
      "expected layer modes that profile runs itself (save-matmuls, save-projections, "
      "compress), but got recompute-mlp");
}

} // namespace
