// One model description: the same sizes give the same model (parameter
// count and every parameter's shape) on each of the five paths that build
// or describe one: bench and plan (remat::nn::ModelConfig from their flags),
// estimate (a plan::ModelSpec from sizes, intermediate left to the rule),
// estimate --check (ModelConfig::from_spec) and train (train::model_config).
#include "testing.h"

#include "remat/model_sizes.h"
#include "remat/nn/model_config.h"
#include "remat/nn/policy_bench.h"
#include "remat/plan/estimate.h"
#include "remat/plan/solver.h"
#include "remat/train/trainer.h"
#include "train/task.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>

namespace {

using remat::FieldError;
using remat::nn::ModelConfig;
using remat::plan::Family;
using ::testing::HasSubstr;

using Shapes = std::map<std::string, std::vector<int64_t>>;

// Parameter shapes by name; `prefix` (when given) keeps those under it,
// without it.
Shapes shapes_of(const torch::nn::Module& m, const std::string& prefix = "") {
  Shapes out;
  for (const auto& p : m.named_parameters()) {
    if (p.key().compare(0, prefix.size(), prefix) == 0) {
      out[p.key().substr(prefix.size())] = p.value().sizes().vec();
    }
  }
  return out;
}

int64_t count(const Shapes& s) {
  int64_t n = 0;
  for (const auto& kv : s) {
    int64_t e = 1;
    for (auto d : kv.second) {
      e *= d;
    }
    n += e;
  }
  return n;
}

// The sizes as every command's flags give them: --layers 2 --hidden 128
// --heads 4 --seq 64 --batch 2 --vocab 1000, no --intermediate.
ModelConfig flags_config(Family family) {
  return ModelConfig(family).layers(2).hidden(128).heads(4).seq(64).batch(2).vocab(1000);
}

Shapes built(const ModelConfig& c) {
  if (c.llama()) {
    return shapes_of(*remat::nn::Llama(c.llama_options()));
  }
  return shapes_of(*remat::nn::Bert(c.bert_options()));
}

class SameModel : public ::testing::TestWithParam<Family> {
 protected:
  SameModel() {
    torch::manual_seed(0);
  }
};

TEST_P(SameModel, InAllFiveCommands) {
  const Family family = GetParam();
  const bool llama = family == Family::kLlama;
  // bench and plan: the model their flags describe.
  const auto config = flags_config(family);
  config.validate();
  const Shapes bench = built(config);
  const int64_t params = count(bench);

  // estimate: a spec from the same sizes, intermediate left to the rule.
  const auto spec = remat::plan::ModelSpec(family, 2, 128, 4, 1000)
                        .seq(64)
                        .batch(2)
                        .head(llama ? remat::plan::Head::kLanguageModel
                                    : remat::plan::Head::kNone);
  EXPECT_EQ(remat::plan::count_parameters(spec).total, params);
  EXPECT_EQ(remat::plan::count_parameters(config.spec()).total, params);

  // estimate --check: the model the spec describes.
  EXPECT_EQ(built(ModelConfig::from_spec(spec)), bench);

  // train: the task's model (BERT under a classifier head).
  auto options = remat::train::TrainOptions().task(
      llama ? remat::train::Task::kCausalLm : remat::train::Task::kClassification);
  options.model().layers(2).hidden(128).heads(4).seq(64).batch(2);
  auto task = remat::train::make_task_model(options, 1000, 3);
  EXPECT_EQ(shapes_of(task->module(), llama ? "" : "bert."), bench);

  // The defect the description fixed: Llama's MLP is 8h/3 rounded up to
  // 256 everywhere (512 for hidden 128), not to 8 in train (344).
  const int64_t mlp = 512; // Llama: 8 x 128 / 3 up to 256; BERT: 4 x 128
  EXPECT_EQ(config.mlp_size(), mlp);
  EXPECT_EQ(spec.mlp_size(), mlp);
  const std::string up = llama ? "model.layers.0.mlp.up_proj.weight"
                               : "encoder.layer.0.intermediate.dense.weight";
  ASSERT_TRUE(bench.count(up)) << up;
  EXPECT_EQ(bench.at(up), (std::vector<int64_t>{mlp, 128}));
}

INSTANTIATE_TEST_SUITE_P(
    Families,
    SameModel,
    ::testing::Values(Family::kBert, Family::kLlama),
    [](const auto& info) { return std::string(remat::plan::to_string(info.param)); });

TEST(ModelConfig, FamilyDefaultsLiveInOnePlace) {
  EXPECT_EQ(remat::nn::LlamaOptions().hidden_size(4096).mlp_size(), 11008);
  EXPECT_EQ(remat::nn::LlamaOptions().hidden_size(5120).mlp_size(), 13824);
  EXPECT_EQ(remat::nn::BertOptions().hidden_size(768).mlp_size(), 3072);
  EXPECT_EQ(ModelConfig(Family::kLlama).hidden(128).mlp_size(), 512);
  EXPECT_EQ(ModelConfig(Family::kLlama).vocab_size(), 32000);
  EXPECT_EQ(ModelConfig(Family::kBert).vocab_size(), 30522);
  EXPECT_EQ(ModelConfig(Family::kBert).dropout_p(), 0.1);
  EXPECT_EQ(ModelConfig(Family::kLlama).dropout_p(), 0.0);
  EXPECT_EQ(ModelConfig(Family::kBert).seq(1024).positions(), 1024);
}

TEST(ModelConfig, SizesPastTheirBoundNameTheField) {
  struct Case {
    ModelConfig config;
    std::string field;
    std::string text;
  };
  const auto bert = ModelConfig(Family::kBert);
  for (const auto& c : std::vector<Case>{
           {ModelConfig(bert).layers(1000000000000000000), "layers", "expected layers in [1, 1024]"},
           {ModelConfig(bert).layers(0), "layers", "expected layers in [1, 1024]"},
           {ModelConfig(bert).hidden(65540).heads(4), "hidden", "expected hidden in [1, 65536]"},
           {ModelConfig(bert).heads(2048), "heads", "expected heads in [1, 1024]"},
           {ModelConfig(bert).seq(1 << 21), "seq", "expected seq in [1, 1048576]"},
           {ModelConfig(bert).batch(1 << 20), "batch", "expected batch in [1, 65536]"},
           {ModelConfig(bert).vocab(1LL << 40), "vocab", "expected vocab in [0, 4194304]"},
           {ModelConfig(bert).intermediate(-1), "intermediate", "expected intermediate in"},
           {ModelConfig(bert).hidden(130), "hidden", "expected hidden (130) to be a multiple of heads (4)"},
           {ModelConfig(bert).kv_heads(2), "kv_heads", "expected kv_heads == heads for BERT"},
           {ModelConfig(Family::kLlama).heads(4).kv_heads(3), "kv_heads",
            "expected kv_heads dividing heads (4; 0: as many), but got 3"},
           {ModelConfig(bert).dtype(torch::kHalf), "dtype", "expected fp32 or bf16"},
           // Each size within its bound, their product not.
           {ModelConfig(bert).layers(1024).hidden(65536).heads(1024).seq(1 << 20).batch(65536),
            "batch", "expected a step of at most 64 PiB"},
       }) {
    try {
      c.config.validate();
      ADD_FAILURE() << "accepted: expected " << c.text;
    } catch (const FieldError& e) {
      EXPECT_EQ(e.field(), c.field) << e.what_without_backtrace();
      EXPECT_THAT(e.what_without_backtrace(), HasSubstr(c.text));
    }
  }
}

TEST(ModelConfig, OptionsValidateTheSameBoundsForLoaders) {
  try {
    remat::nn::LlamaOptions().num_layers(5000).validate();
    ADD_FAILURE() << "accepted 5000 layers";
  } catch (const FieldError& e) {
    EXPECT_EQ(e.field(), "num_layers");
    EXPECT_THAT(e.what_without_backtrace(), HasSubstr("expected num_layers in [1, 1024], but got 5000"));
  }
  try {
    remat::nn::BertOptions().hidden_size(1 << 20).num_heads(1).validate();
    ADD_FAILURE() << "accepted hidden 2^20";
  } catch (const FieldError& e) {
    EXPECT_EQ(e.field(), "hidden_size");
  }
}

TEST(ModelConfig, TheEstimatorRefusesAStepPastTheLimitBeforeAnythingIsBuilt) {
  const auto spec = ModelConfig(Family::kLlama).layers(32).hidden(4096).heads(32).spec();
  try {
    remat::plan::check_fits(spec, 1LL << 30, "the --memory-limit");
    ADD_FAILURE() << "a 7B step fit 1 GiB";
  } catch (const FieldError& e) {
    EXPECT_EQ(e.field(), "memory_limit");
    EXPECT_THAT(e.what_without_backtrace(),
                HasSubstr("expected a step that fits the --memory-limit (1.00 GiB)"));
  }
  const auto bert = flags_config(Family::kBert).spec();
  const int64_t least = remat::plan::check_fits(bert, 1LL << 40, "x");
  EXPECT_GT(least, 0);
  // A bound from below: the estimator's step holds zeroed gradients, a step
  // that sets them to none may peak before most exist.
  const auto none = remat::plan::estimate(bert, remat::CheckpointPolicy::none());
  EXPECT_EQ(least + none.gradient_bytes,
            remat::plan::min_feasible_budget(remat::plan::estimate_chain(bert)));
}

// --dtype bf16 means one thing in bench, plan and train: float32 master
// weights, forward and loss under bf16 autocast.
TEST(ModelConfig, Bf16IsAutocastOverFloat32MasterWeights) {
  const auto config = ModelConfig(Family::kLlama).layers(2).hidden(64).heads(4).vocab(64)
                          .seq(8).batch(2).dtype(torch::kBFloat16);
  EXPECT_TRUE(config.autocast(c10::kCPU).cpu_enabled);
  EXPECT_FALSE(config.autocast(c10::kCPU).cuda_enabled);
  EXPECT_FALSE(ModelConfig(config).dtype(torch::kFloat).autocast(c10::kCPU).any());

  remat::nn::BenchWorkload w(config, remat::nn::BenchOptions().warmup(0).steps(1));
  for (const auto& p : w.module().parameters()) {
    EXPECT_EQ(p.scalar_type(), torch::kFloat);
  }
  // The step `plan --measure` runs: gradients float32, the matrix products bf16.
  remat::plan::ScheduleCandidate cand;
  cand.name = "none";
  cand.schedule = remat::CheckpointPolicy::none().schedule(2);
  remat::nn::measure_schedule(w, cand, /*timed=*/true);
  ASSERT_TRUE(cand.ok) << cand.error;
  EXPECT_GT(cand.peak_bytes, 0);
  EXPECT_EQ(cand.times.size(), 1u);
  for (const auto& p : w.trainable()) {
    ASSERT_TRUE(p.grad().defined());
    EXPECT_EQ(p.grad().scalar_type(), torch::kFloat);
  }
  {
    remat::AutocastScope bf16(config.autocast(c10::kCPU));
    EXPECT_EQ(torch::matmul(torch::ones({2, 2}), torch::ones({2, 2})).scalar_type(),
              torch::kBFloat16);
  }
  // The profile runs under the same autocast, and leaves no policy behind.
  const auto chain = w.profile(remat::plan::ProfileOptions().warmup(0).repeats(1));
  EXPECT_EQ(chain.num_layers(), 2);
}

} // namespace
