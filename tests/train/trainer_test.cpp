// The trainer as a library: checkpointing leaves the loss curve bit for bit,
// accumulation equals one big batch, BF16 autocast, LoRA, export and import,
// in-process resume, the memory timeline.
#include "remat/train/trainer.h"

#include "remat/train/run.h"
#include "remat/train/train_state.h"
#include "io/io_testing.h"
#include "temp_dir.h"
#include "testing.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <fstream>

namespace {

namespace fs = std::filesystem;
using namespace remat::train;
using remat::CheckpointPolicy;

const std::string kData = std::string(REMAT_SOURCE_DIR) + "/data/routing";

// A model small enough for a few steps in well under a second.
TrainOptions tiny() {
  return TrainOptions()
      .train_path(kData + "/train.jsonl")
      .vocab_path(kData + "/vocab.txt")
      .valid_fraction(0.05)
      .model(remat::nn::ModelConfig().layers(2).hidden(16).heads(2).seq(32).batch(8).dropout(0))
      .max_steps(4)
      .threads(1);
}

// tiny() with its model changed by `edit`: tiny([](auto& m) { m.batch(4); }).
template <typename Edit>
TrainOptions tiny(Edit edit) {
  auto o = tiny();
  edit(o.model());
  return o;
}

std::string temp_dir(const std::string& name) {
  return remat_test::fresh_temp_dir("trainer_" + name, /*create=*/false);
}

std::vector<double> losses(const History& h) {
  std::vector<double> out;
  for (const auto& s : h.steps) {
    out.push_back(s.loss);
  }
  return out;
}

TEST(Trainer, CheckpointingLeavesTheLossCurveBitForBit) {
  // Dropout is on: the recompute must draw the same masks.
  auto r = run_training(tiny([](auto& m) { m.dropout(0.1); }).policy(CheckpointPolicy::every_layer())
                            .compare_policy(CheckpointPolicy::none()).compare_steps(3));
  ASSERT_EQ(r.history.compare_steps.size(), 3u);
  EXPECT_EQ(r.history.compare_policy, "none");
  ASSERT_TRUE(r.history.steps[2].compare_loss.has_value());
  EXPECT_FALSE(r.history.steps[3].compare_loss.has_value());
  EXPECT_EQ(r.history.max_compare_diff(), 0.0);
  EXPECT_GT(r.history.steps[0].loss, 0.0);
}

TEST(Trainer, CheckpointingLeavesTheLmLossCurveBitForBitToo) {
  auto r = run_training(tiny([](auto& m) { m.dropout(0.1).kv_heads(1); })
                            .task(Task::kCausalLm)
                            .policy(CheckpointPolicy::parse("selective-attention"))
                            .compare_policy(CheckpointPolicy::parse("sqrt")).compare_steps(2)
                            .max_steps(2));
  EXPECT_EQ(r.history.max_compare_diff(), 0.0);
  ASSERT_TRUE(r.has_eval);
  EXPECT_NEAR(r.final_eval.perplexity, std::exp(r.final_eval.loss), 1e-9);
  EXPECT_GT(r.final_eval.perplexity, 1.0);
}

TEST(Trainer, BudgetPolicyIsPlannedOnTheModelAndLeavesTheCurve) {
  // A budget everything fits in: planned on the trained model at start,
  // and, checkpointing being exact, the same losses as none.
  auto r = run_training(tiny([](auto& m) { m.dropout(0.1); }).policy(CheckpointPolicy::parse("budget:1GiB"))
                            .compare_policy(CheckpointPolicy::none()).compare_steps(2)
                            .max_steps(2));
  EXPECT_EQ(r.history.max_compare_diff(), 0.0);
  EXPECT_EQ(r.history.steps.back().policy.rfind("budget:", 0), 0u);
  // Below what any schedule needs: refused, naming the least budget.
  EXPECT_THROW_WITH(
      run_training(tiny().task(Task::kCausalLm).policy(CheckpointPolicy::parse("budget:1KiB"))),
      "expected a memory budget of at least");
}

TEST(Trainer, AccumulationEqualsOneBigBatch) {
  // Without dropout the only difference is the order of float additions.
  Trainer big(tiny([](auto& m) { m.batch(16); }).accumulate(1));
  Trainer small(tiny([](auto& m) { m.batch(8); }).accumulate(2));
  Trainer odd(tiny([](auto& m) { m.batch(5); }).accumulate(4)); // 5 + 5 + 5 + 1 rows
  for (int i = 0; i < 2; ++i) {
    auto a = big.step();
    auto b = small.step();
    EXPECT_NEAR(a.loss, b.loss, 1e-5);
    EXPECT_EQ(a.tokens, b.tokens);
    EXPECT_NEAR(a.grad_norm, b.grad_norm, 1e-4 * a.grad_norm);
  }
  auto pa = big.model().parameters();
  auto pb = small.model().parameters();
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_TRUE(torch::allclose(pa[i], pb[i], 1e-4, 1e-5)) << i;
  }
  // Rows per step are batch * accumulate, the last micro-batch short.
  Trainer ref(tiny([](auto& m) { m.batch(20); }).accumulate(1));
  EXPECT_NEAR(odd.step().loss, ref.step().loss, 1e-5);
}

TEST(Trainer, Bf16AutocastTrainsWithFloat32MasterWeights) {
  Trainer f32(tiny());
  Trainer bf16(tiny([](auto& m) { m.dtype(torch::kBFloat16); }));
  auto a = f32.step();
  auto b = bf16.step();
  EXPECT_TRUE(std::isfinite(b.loss));
  EXPECT_NE(a.loss, b.loss); // BF16 matmuls round differently ...
  EXPECT_NEAR(a.loss, b.loss, 0.05); // ... but compute the same thing
  for (const auto& p : bf16.model().parameters()) {
    EXPECT_EQ(p.scalar_type(), torch::kFloat);
  }
  bf16.step();
  EXPECT_TRUE(std::isfinite(bf16.evaluate().loss));
}

TEST(Trainer, LoraTrainsTheAdaptersAndTheHeadOnly) {
  Trainer t(tiny().lora_rank(4));
  EXPECT_LT(t.trainable_parameter_count(), t.parameter_count() / 4);
  auto& m = t.model();
  auto base = m.named_parameters()["bert.encoder.layer.0.attention.self.query.weight"].clone();
  auto head = m.named_parameters()["classifier.weight"].clone();
  EXPECT_TRUE(m.named_parameters().contains(
      "bert.encoder.layer.0.attention.self.query.lora_A.weight"));
  t.step();
  t.step();
  EXPECT_TRUE(torch::equal(
      base, m.named_parameters()["bert.encoder.layer.0.attention.self.query.weight"]));
  EXPECT_FALSE(torch::equal(head, m.named_parameters()["classifier.weight"]));
}

TEST(Trainer, SavedModelLoadsBackWithInit) {
  for (int64_t rank : {0, 4}) {
    const auto dir = temp_dir("export_" + std::to_string(rank));
    Trainer t(tiny().lora_rank(rank));
    t.step();
    t.step();
    const double loss = t.evaluate().loss;
    fs::create_directories(dir);
    t.save_model(dir);
    EXPECT_TRUE(fs::exists(dir + "/model.safetensors"));
    EXPECT_TRUE(fs::exists(dir + "/vocab.txt"));
    std::ifstream config_file(dir + "/config.json");
    auto config = nlohmann::json::parse(config_file);
    EXPECT_EQ(config["architectures"][0], "BertForSequenceClassification");
    EXPECT_EQ(config["id2label"]["3"], "spam");
    // The folder's config replaces the sizes; adapters were merged.
    Trainer back(tiny([](auto& m) { m.layers(7).hidden(64); }).init_dir(dir));
    EXPECT_EQ(back.parameter_count(), Trainer(tiny()).parameter_count());
    EXPECT_NEAR(back.evaluate().loss, loss, 1e-5) << "rank " << rank;
  }
}

TEST(Trainer, InitRefusesAFolderOfAnotherModel) {
  const auto dir = temp_dir("init_lm");
  Trainer lm(tiny().task(Task::kCausalLm));
  fs::create_directories(dir);
  lm.save_model(dir);
  EXPECT_THROW_WITH(Trainer(tiny().init_dir(dir)), "expected \"bert\", but got \"llama\"");
}

// The silent wrong result this guards against: ids of one tokenizer fed to
// a model trained with another. A folder's tokenizer is taken when it can be
// read, refused by name when it cannot, and bytes only fit a model of bytes.
TEST(Trainer, InitTakesTheFoldersTokenizerOrRefusesIt) {
  const auto dir = temp_dir("init_tokenizer");
  const auto bytes_lm = tiny().task(Task::kCausalLm).vocab_path("");
  Trainer lm(bytes_lm);
  fs::create_directories(dir);
  lm.save_model(dir);
  ASSERT_FALSE(fs::exists(dir + "/vocab.txt")) << "a byte-level model has no tokenizer file";
  Trainer again(TrainOptions(bytes_lm).init_dir(dir));
  EXPECT_TRUE(std::isfinite(again.step().loss));

  { std::ofstream(dir + "/tokenizer.json") << "{}"; }
  EXPECT_THROW_WITH(
      Trainer(TrainOptions(bytes_lm).init_dir(dir)),
      "tokenizer '" + dir + "/tokenizer.json': the file: expected a field \"model\"");
  // A tokenizer.json with more ids than the model's 259 embedding rows.
  nlohmann::json vocab = nlohmann::json::object();
  for (int i = 0; i < 300; ++i) {
    vocab["t" + std::to_string(i)] = i;
  }
  nlohmann::json big = {{"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", nlohmann::json::array()}}}};
  { std::ofstream(dir + "/tokenizer.json") << big.dump(); }
  EXPECT_THROW_WITH(
      Trainer(TrainOptions(bytes_lm).init_dir(dir)),
      "init: the model in '" + dir + "' has 259 token ids, but the tokenizer has 300");
  fs::remove(dir + "/tokenizer.json");

  nlohmann::json config;
  {
    std::ifstream in(dir + "/config.json");
    config = nlohmann::json::parse(in);
  }
  config["vocab_size"] = 603;
  { std::ofstream(dir + "/config.json") << config.dump(); }
  EXPECT_THROW_WITH(
      Trainer(TrainOptions(bytes_lm).init_dir(dir)),
      "has 603 token ids and no tokenizer file; expected the byte-level tokenizer's 259 ids");
}

TEST(Trainer, InitWithoutVocabUsesTheFoldersVocab) {
  const auto dir = temp_dir("init_vocab");
  Trainer t(tiny());
  t.step();
  const double loss = t.evaluate().loss;
  fs::create_directories(dir);
  t.save_model(dir);
  ASSERT_TRUE(fs::exists(dir + "/vocab.txt"));
  // No vocab_path: the folder's WordPiece vocabulary, not bytes.
  Trainer back(tiny().vocab_path("").init_dir(dir));
  EXPECT_NEAR(back.evaluate().loss, loss, 1e-5);
}

TEST(Trainer, ResumedInProcessFollowsTheSameCurve) {
  const auto dir = temp_dir("resume");
  auto options = tiny([](auto& m) { m.dropout(0.1); }).max_steps(5).out_dir(dir);
  Trainer whole(options);
  for (int i = 0; i < 5; ++i) {
    whole.step();
  }
  {
    Trainer first(options);
    first.step();
    first.step();
    first.save_state(dir);
    first.step(); // lost: after the save
  }
  Trainer second(options);
  second.load_state(state_path(dir));
  EXPECT_EQ(second.step_count(), 2);
  EXPECT_EQ(second.history().steps.size(), 2u);
  while (second.step_count() < 5) {
    second.step();
  }
  EXPECT_EQ(losses(second.history()), losses(whole.history()));
  auto pa = whole.model().parameters();
  auto pb = second.model().parameters();
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_TRUE(torch::equal(pa[i], pb[i])) << i;
  }
}

TEST(Trainer, LoadStateRefusesAnotherRunsStateUnchanged) {
  const auto dir = temp_dir("other");
  Trainer a(tiny().out_dir(dir));
  a.step();
  a.save_state(dir);
  Trainer b(tiny([](auto& m) { m.batch(4); }));
  auto before = b.model().parameters()[0].clone();
  EXPECT_THROW_WITH(b.load_state(state_path(dir)), "batch: the state in '");
  EXPECT_EQ(b.step_count(), 0);
  EXPECT_TRUE(torch::equal(before, b.model().parameters()[0]));
  // Where it saves and how often may change.
  Trainer c(tiny().out_dir(dir + "_elsewhere").save_every(1).eval_every(3));
  c.load_state(state_path(dir));
  EXPECT_EQ(c.step_count(), 1);
  // A state whose document has a step of the wrong type (its checksum
  // correct) is refused with a c10::Error naming the field.
  auto state = load_train_state(state_path(dir));
  state.info["step"] = "1";
  save_train_state(dir + "_mistyped", state);
  Trainer d(tiny());
  EXPECT_ERROR_CONTAINS(
      d.load_state(state_path(dir + "_mistyped")), "is damaged: field \"step\": expected an integer, but got \"1\"");
  EXPECT_EQ(d.step_count(), 0);
}

TEST(Trainer, MemoryTimelineShowsRecomputeAndChangesNothing) {
  auto options = tiny([](auto& m) { m.dropout(0.1).layers(3).seq(64).batch(16); });
  Trainer plain(options.policy(CheckpointPolicy::none()));
  Trainer ckpt(options.policy(CheckpointPolicy::every_layer()));
  auto a = plain.memory_timeline();
  auto b = ckpt.memory_timeline();
  auto count = [](const MemoryTimeline& t, const std::string& prefix) {
    int n = 0;
    for (const auto& p : t.points) {
      n += p.label.rfind(prefix, 0) == 0;
    }
    return n;
  };
  EXPECT_EQ(count(a, "forward layer"), 3);
  EXPECT_EQ(count(a, "recompute layer"), 0);
  EXPECT_EQ(count(a, "backward layer"), 3);
  EXPECT_EQ(count(b, "forward layer"), 3);
  EXPECT_EQ(count(b, "recompute layer"), 3);
  EXPECT_EQ(count(b, "backward layer"), 3);
  // Held after the forward pass: the stored activations, or only the inputs.
  auto at = [](const MemoryTimeline& t, const std::string& label) {
    for (const auto& p : t.points) {
      if (p.label == label) {
        return p.bytes - t.points.front().bytes;
      }
    }
    return int64_t(-1);
  };
  EXPECT_LT(at(b, "loss"), at(a, "loss") / 2);
  // The instrumented step leaves the run as it was.
  Trainer reference(options.policy(CheckpointPolicy::every_layer()));
  EXPECT_EQ(ckpt.step().loss, reference.step().loss);
}

TEST(Trainer, TrainersInOneProcessDoNotShareTheirRandomStream) {
  auto options = tiny([](auto& m) { m.dropout(0.1); });
  Trainer alone(options);
  std::vector<double> expected;
  for (int i = 0; i < 3; ++i) {
    expected.push_back(alone.step().loss);
  }
  Trainer a(options);
  Trainer b(options);
  torch::manual_seed(123);
  const auto caller = torch::rand({4});
  torch::manual_seed(123);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(a.step().loss, expected[i]);
    EXPECT_EQ(b.step().loss, expected[i]);
  }
  EXPECT_TRUE(torch::equal(torch::rand({4}), caller)) << "the caller's stream moved";
}

TEST(Trainer, OptionsRoundTripThroughJsonAndNameTheFieldWhenBad) {
  auto o = tiny([](auto& m) { m.dtype(torch::kBFloat16).attention(remat::nn::AttentionKind::kBlockwise); })
               .lora_rank(2).lora_targets({"query"})
               .compare_policy(CheckpointPolicy::parse("every-2"))
               .schedule(LrScheduleKind::kCosine);
  EXPECT_EQ(TrainOptions::from_json(o.to_json()).to_json(), o.to_json());
  EXPECT_THROW_WITH(tiny().accumulate(0).validate(), "accumulate: expected a value >= 1");
  EXPECT_THROW_WITH(tiny([](auto& m) { m.hidden(30).heads(4); }).validate(),
                    "expected hidden (30) to be a multiple of heads (4)");
  tiny().policy(CheckpointPolicy::parse("budget:1GiB")).validate();
  EXPECT_THROW_WITH(
      tiny().policy(CheckpointPolicy::custom(CheckpointPolicy::none().schedule(2))).validate(),
      "policy: expected a named policy");
  EXPECT_THROW_WITH(tiny().save_every(3).validate(), "save_every: expected an out_dir");
  EXPECT_THROW_WITH(tiny([](auto& m) { m.batch(0); }).validate(), "expected batch in [1, 65536], but got 0");
  EXPECT_THROW_WITH(tiny([](auto& m) { m.seq(1); }).validate(), "seq: expected a value >= 2");
  EXPECT_THROW_WITH(tiny().lr(0).validate(), "lr: expected a learning rate above 0");
  EXPECT_THROW_WITH(tiny().lora_rank(-1).validate(), "lora_rank: expected a value >= 0");
  EXPECT_THROW_WITH(tiny().valid_fraction(1.5).validate(), "valid_fraction: expected a value in");
  EXPECT_THROW_WITH(tiny([](auto& m) { m.dropout(1); }).validate(), "expected a probability in [0, 1)");
  EXPECT_THROW_WITH(tiny([](auto& m) { m.kv_heads(3).heads(4).hidden(16); }).validate(),
                    "expected kv_heads dividing heads (4; 0: as many), but got 3");
  EXPECT_THROW_WITH(tiny().train_path("").validate(), "train_path: expected a JSONL file");
  EXPECT_THROW_WITH(parse_task("regress"), "task: expected classify or lm");
}

// Found by fuzz/train_state_fuzz.cpp: values of the wrong type inside arrays
// escaped as nlohmann::json::type_error, naming no field.
TEST(Trainer, StateDocumentsWithMistypedValuesAreRefusedNamingTheField) {
  auto options = tiny().to_json();
  options["lora_targets"] = {"query", 3};
  EXPECT_ERROR_CONTAINS(
      TrainOptions::from_json(options),
      "training options field \"lora_targets\": expected strings, but got 3");
  options = tiny().to_json();
  options["compare_policy"] = 2;
  EXPECT_ERROR_CONTAINS(
      TrainOptions::from_json(options),
      "training options field \"compare_policy\": expected a string, but got 2");

  auto history = History().to_json();
  history["label_names"] = {"spam", nullptr};
  EXPECT_ERROR_CONTAINS(
      History::from_json(history),
      "history field \"label_names\": expected strings, but got null");
  auto eval = EvalRecord().to_json();
  eval["per_label_f1"] = {0.5, "x"};
  EXPECT_ERROR_CONTAINS(
      EvalRecord::from_json(eval),
      "eval record field \"per_label_f1\": expected numbers, but got \"x\"");
  MemoryTimeline timeline;
  timeline.points = {{"start", 10}};
  auto timeline_json = timeline.to_json();
  timeline_json["bytes"] = {"10"};
  EXPECT_ERROR_CONTAINS(
      MemoryTimeline::from_json(timeline_json),
      "memory timeline: expected a string label and an integer byte count at point 0");
}

} // namespace

namespace {

TEST(Trainer, DeviceIsAnOptionThatRoundTripsAndDefaultsToCpu) {
  EXPECT_EQ(tiny().device(), "cpu");
  auto o = tiny().device("cuda:1");
  EXPECT_EQ(TrainOptions::from_json(o.to_json()).device(), "cuda:1");
  auto old = tiny().to_json();
  old.erase("device"); // a state saved before --device existed
  EXPECT_EQ(TrainOptions::from_json(old).device(), "cpu");
  EXPECT_THROW_WITH(tiny().device("gpu").validate(), "device: expected cpu, cuda or cuda:N");
  if (!remat_test::no_cuda_reason().empty()) {
    // Valid text, but no GPU here: the Trainer refuses it, saying why.
    EXPECT_THROW_WITH(Trainer t(tiny().device("cuda")), "cuda");
  }
}

// On a GPU: the same loss curve under checkpointing as without (dropout's
// masks come from the CUDA generator, which checkpoint restores), and the
// step peaks are the GPU's.
TEST(TrainerCuda, CheckpointingLeavesTheLossCurveOnCuda) {
  REMAT_REQUIRE_CUDA();
  auto curve = [](const CheckpointPolicy& p) {
    Trainer t(tiny([](auto& m) { m.dropout(0.1); }).device("cuda").policy(p));
    std::vector<double> out;
    for (int i = 0; i < 3; ++i) {
      auto r = t.step();
      EXPECT_GT(r.peak_bytes, 0);
      out.push_back(r.loss);
    }
    EXPECT_TRUE(t.model().parameters().front().is_cuda());
    return out;
  };
  const auto none = curve(CheckpointPolicy::none());
  const auto every = curve(CheckpointPolicy::every_layer());
  ASSERT_EQ(none.size(), every.size());
  for (size_t i = 0; i < none.size(); ++i) {
    // CUDA's embedding backward adds with atomics: equal up to rounding.
    EXPECT_NEAR(none[i], every[i], 1e-5) << "step " << i + 1;
  }
}

} // namespace
