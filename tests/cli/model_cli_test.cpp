// The shared model flags through the built program: the same flags describe
// the same model in bench, plan, estimate and train, and every size or
// count past its bound is refused on one line, at once, exit code 2.
#include "cli_runner.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>
#include <regex>

namespace {

using remat::test::run_cli;
using remat::test::run_json;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

// The defect of issue #14: with --hidden 128, plan and estimate described a
// 512-wide Llama MLP while train built a 344-wide one.
TEST(ModelCli, TheSameFlagsGiveTheSameLlamaInBenchPlanEstimateAndTrain) {
  // 259: the byte tokenizer's vocabulary, which train takes from its data.
  const std::string flags =
      " --model llama --layers 1 --hidden 128 --heads 4 --vocab 259 --seq 16 --batch 2";
  const auto estimate = run_json("estimate" + flags, "same_estimate");
  const auto plan = run_json("plan --threads 1 --repeats 1 --budget 1GiB" + flags, "same_plan");
  const auto bench = run_json(
      "bench --threads 1 --steps 1 --warmup 0 --policy none --isolation in-process" + flags,
      "same_bench");
  EXPECT_EQ(estimate["config"]["intermediate"], 512);
  EXPECT_EQ(plan["config"]["intermediate"], 512);
  EXPECT_EQ(bench["config"]["intermediate"], 512);
  const int64_t params = estimate["parameters"].get<int64_t>();
  EXPECT_EQ(plan["config"]["parameters"].get<int64_t>(), params);
  EXPECT_EQ(bench["config"]["trainable_parameters"].get<int64_t>(), params);

  const std::string dir = ::testing::TempDir() + "/same_train";
  std::system(("mkdir -p " + dir).c_str());
  {
    std::ofstream f(dir + "/corpus.jsonl");
    for (int i = 0; i < 16; ++i) {
      f << "{\"text\": \"the cat sat on the mat number " << i << "\"}\n";
    }
  }
  auto r = run_cli("train --task lm --train " + dir +
                   "/corpus.jsonl --layers 1 --hidden 128 --heads 4 --seq 16 --batch 2 "
                   "--max-steps 1 --threads 1");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("intermediate=512"));
  EXPECT_THAT(r.err, HasSubstr("vocab=259"));
  EXPECT_THAT(r.err, HasSubstr(", " + std::to_string(params) + " parameters"));
}

// One vocabulary: --lora-targets takes the estimator's short names and the
// model's own in estimate and train alike, --dropout is a probability in
// estimate too, and train has --attention.
TEST(ModelCli, EachFlagTakesTheSameValuesInEveryCommand) {
  const std::string llama =
      "estimate --model llama --layers 2 --hidden 64 --heads 4 --seq 32 --batch 1 --lora-rank 4";
  const auto short_names = run_json(llama + " --lora-targets q,v", "vocab_short");
  const auto long_names = run_json(llama + " --lora-targets q_proj,v_proj", "vocab_long");
  EXPECT_EQ(short_names["trainable_parameters"], long_names["trainable_parameters"]);
  EXPECT_EQ(run_json(llama + " --dropout 0.1", "vocab_p")["policies"],
            run_json(llama + " --dropout on", "vocab_on")["policies"]);
  auto refused = run_cli(llama + " --dropout 2");
  EXPECT_EQ(refused.exit_code, 2);
  EXPECT_THAT(refused.err, HasSubstr("--dropout: expected a probability in [0, 1), but got 2"));
  refused = run_cli(llama + " --lora-targets query");
  EXPECT_EQ(refused.exit_code, 2);
  EXPECT_THAT(refused.err, HasSubstr("--lora-targets: expected LoRA targets of llama among q "
                                     "(q_proj), k (k_proj)"));

  // train: "q,v" are BERT's query and value, as the default; and --attention.
  const std::string train =
      "train --layers 1 --hidden 16 --heads 2 --seq 16 --batch 4 --max-steps 1 --threads 1 "
      "--valid-fraction 0 --lora-rank 2";
  auto by_short = run_cli(train + " --lora-targets q,v");
  auto by_default = run_cli(train);
  ASSERT_EQ(by_short.exit_code, 0) << by_short.err;
  ASSERT_EQ(by_default.exit_code, 0) << by_default.err;
  const std::regex trainable("\\(([0-9]+) trainable\\)");
  std::smatch a, b;
  ASSERT_TRUE(std::regex_search(by_short.err, a, trainable)) << by_short.err;
  ASSERT_TRUE(std::regex_search(by_default.err, b, trainable)) << by_default.err;
  EXPECT_EQ(a[1], b[1]);
  auto blockwise = run_cli("train --task lm --layers 1 --hidden 16 --heads 2 --seq 16 "
                           "--batch 4 --max-steps 1 --threads 1 --attention blockwise");
  ASSERT_EQ(blockwise.exit_code, 0) << blockwise.err;
  EXPECT_THAT(blockwise.err, HasSubstr("attention=blockwise"));

  // --vocab is a vocabulary size in train too (a file there is the
  // tokenizer, its old meaning); it must cover the tokenizer's ids.
  auto sized = run_cli("train --task lm --layers 1 --hidden 16 --heads 2 --seq 16 --batch 4 "
                       "--max-steps 1 --threads 1 --vocab 400");
  ASSERT_EQ(sized.exit_code, 0) << sized.err;
  EXPECT_THAT(sized.err, HasSubstr("vocab=400"));
  auto small = run_cli("train --task lm --layers 1 --hidden 16 --heads 2 --seq 16 --batch 4 "
                       "--max-steps 1 --threads 1 --vocab 100");
  EXPECT_EQ(small.exit_code, 2) << small.err;
  EXPECT_THAT(small.err, HasSubstr("--vocab: expected an embedding of at least the "
                                   "tokenizer's 318 token ids, but got 100"));
}

// Sizes past their bound, counts that overflow, steps larger than memory:
// each one line naming the flag, exit code 2, in bounded time (these hung or
// crashed before: plan --repeats 1e18, estimate --layers 10^18).
TEST(ModelCli, SizesAndCountsPastTheirBoundAreRefusedOnOneLine) {
  struct Case {
    std::string args;
    std::string text;
  };
  for (const auto& c : std::vector<Case>{
           {"plan --repeats 99999999999999999999",
            "--repeats: expected a count in [1, 1000000000], but got a number past 2^63"},
           {"plan --repeats 1e18", "--repeats"},
           {"plan --repeats 2000000000", "--repeats: expected a count in [1, 1000000000]"},
           {"plan --steps 1e18", "--steps"},
           {"plan --layers 5000", "--layers: expected layers in [1, 1024], but got 5000"},
           {"plan --seq 99999999", "--seq: expected seq in [1, 1048576]"},
           {"plan --rounds 1000000", "--rounds: expected a count in [1, 10000]"},
           {"estimate --layers 1000000000000000000", "--layers: expected layers in [1, 1024]"},
           {"estimate --hidden 131072 --heads 1", "--hidden: expected hidden in [1, 65536]"},
           {"estimate --batch 100000", "--batch: expected batch in [1, 65536]"},
           {"estimate --vocab 99999999999", "--vocab"},
           {"estimate --layers 1024 --hidden 65536 --heads 1024 --seq 1048576 --batch 65536",
            "--batch: expected a step of at most 64 PiB"},
           {"bench --steps 99999999999999999999", "--steps"},
           {"bench --steps 1e18", "--steps"},
           {"bench --steps 2000000000", "--steps: expected a count in [1, 1000000000]"},
           {"bench --rounds 1e18", "--rounds"},
           {"bench --intermediate 99999999", "--intermediate"},
           {"bench --model llama --layers 32 --hidden 4096 --heads 32 --memory-limit 1GiB",
            "--memory-limit: expected a step that fits the --memory-limit (1.00 GiB)"},
           {"plan --layers 1024 --hidden 65536 --heads 512 --seq 64 --batch 1",
            "expected a step that fits this machine's memory"},
           {"train --max-steps 1e18", "--max-steps"},
           {"train --max-steps 2000000000", "--max-steps: expected a value <= 1000000000"},
           {"train --layers 5000", "--layers: expected layers in [1, 1024], but got 5000"},
           {"train --hidden 16384 --layers 1024 --heads 128 --task lm",
            "expected a step that fits this machine's memory"},
       }) {
    auto r = run_cli(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << "\n" << r.err;
    EXPECT_THAT(r.err, StartsWith("remat: error: ")) << c.args;
    EXPECT_THAT(r.err, HasSubstr(c.text)) << c.args << "\n" << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << c.args << "\n" << r.err;
  }
}

// The parser's own wording never reaches the user: a mistyped flag is named
// with the nearest real one, a repeated flag is named, and a missing or
// mistyped command lists the commands.
TEST(ModelCli, ParserMistakesGetOneLineNamingTheFlagOrTheCommands) {
  struct Case {
    std::string args;
    std::string message;
  };
  for (const auto& c : std::vector<Case>{
           {"bench --layer 4",
            "--layer: expected a flag of remat bench, but got '--layer'; did you mean --layers?"},
           {"estimate --polcy none", "did you mean --policy?"},
           {"plan --no-such-flag", "--no-such-flag: expected a flag of remat plan, but got "
                                   "'--no-such-flag'; see remat plan --help"},
           {"bench 4", "expected flags of remat bench, but got the value '4' after no flag"},
           {"train --lr 1 --lr 2", "--lr: expected the flag once, but it was given 2 times"},
           {"", "expected a command (bench, train, plan, estimate), but got none"},
           {"bnech", "expected a command (bench, train, plan, estimate), but got 'bnech'"},
           {"--layers 4", "but got '--layers'"},
       }) {
    auto r = run_cli(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << "\n" << r.err;
    EXPECT_THAT(r.err, StartsWith("remat: error: ")) << c.args;
    EXPECT_THAT(r.err, HasSubstr(c.message)) << c.args << "\n" << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << c.args << "\n" << r.err;
  }
  EXPECT_EQ(run_cli("--version").exit_code, 0);
}

// A flag is checked alike in every command, before anything is built,
// profiled or loaded, and the message names the flag.
TEST(ModelCli, FlagValuesAreCheckedAlikeAndBeforeAnyWork) {
  struct Case {
    std::string args;
    std::string message;
  };
  for (const auto& c : std::vector<Case>{
           {"bench --dropout -1", "--dropout: expected a probability in [0, 1), but got -1"},
           {"plan --dropout 1", "--dropout: expected a probability in [0, 1), but got 1"},
           {"train --dropout -1", "--dropout: expected a probability in [0, 1), but got -1"},
           {"bench --lora-rank 2 --lora-alpha nan", "--lora-alpha: expected a value above 0"},
           {"plan --budget 50", "--budget: expected a size with its unit (512MiB, 2GiB, 50B) "
                                "or a percentage (50%), but got '50'"},
           {"train --lora-rank 8 --lora-targets q_proj,v_proj --max-steps 1",
            "--lora-targets: expected targets matching projections of the model (dense, key, "
            "query, value), but got q_proj, v_proj"},
       }) {
    const bool train = c.args.rfind("train", 0) == 0;
    auto r = run_cli(train ? c.args + " --out " + ::testing::TempDir() + "remat_flag_values"
                           : c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << "\n" << r.err;
    EXPECT_THAT(r.err, HasSubstr(c.message)) << c.args << "\n" << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << c.args << "\n" << r.err;
    EXPECT_THAT(r.out, Not(HasSubstr("profiled"))) << c.args;
  }
  EXPECT_THAT(run_cli("estimate --help").out, HasSubstr("eager or blockwise (sdpa is not modelled)"));
}

TEST(ModelCli, DtypeHasOneSpellingAndTheOldOneIsAnAlias) {
  for (const char* args : {"train --dtype fp16", "bench --dtype f16", "plan --dtype fp16"}) {
    auto r = run_cli(args);
    EXPECT_EQ(r.exit_code, 2) << args;
    EXPECT_THAT(r.err, HasSubstr("--dtype: expected fp32 or bf16")) << args << "\n" << r.err;
  }
}

// --dtype bf16 means one thing: autocast over float32 master weights in
// bench, plan and train; estimate, which does not model autocast, refuses it
// and spells its own precisions bf16-pure and bf16-mixed.
TEST(ModelCli, Bf16IsAutocastOverFloat32WeightsAndEstimateRefusesIt) {
  const std::string flags =
      " --model llama --layers 1 --hidden 64 --heads 4 --vocab 64 --seq 8 --batch 2 --dtype bf16";
  const auto bench = run_json(
      "bench --threads 1 --steps 1 --warmup 0 --policy none --isolation in-process" + flags,
      "bf16_bench");
  EXPECT_EQ(bench["config"]["dtype"], "bf16");
  // Float32 weights: 4 bytes per parameter.
  EXPECT_EQ(bench["config"]["weight_bytes"].get<int64_t>(),
            4 * bench["config"]["trainable_parameters"].get<int64_t>());
  const auto plan = run_json(
      "plan --threads 1 --repeats 1 --steps 1 --warmup 0 --budget 100% --measure "
      "--isolation in-process" + flags,
      "bf16_plan");
  EXPECT_EQ(plan["config"]["dtype"], "bf16");
  // float32 weights held through the step; gradients (float32 too) only from
  // each stage's backward on, since the step starts without them.
  EXPECT_EQ(plan["chain"]["gradients"], "none");
  EXPECT_GE(plan["chain"]["base_bytes"].get<int64_t>(),
            4 * plan["config"]["parameters"].get<int64_t>());
  int64_t gradient_bytes = 0;
  for (const auto& stage : plan["chain"]["stages"]) {
    gradient_bytes += stage["parameter_gradient_bytes"].get<int64_t>();
  }
  EXPECT_EQ(gradient_bytes, 4 * plan["config"]["parameters"].get<int64_t>());
  EXPECT_EQ(plan["policies"][0]["measured_ok"], true);

  auto r = run_cli("estimate --dtype bf16");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_EQ(r.err,
            "remat: error: --dtype: expected fp32, bf16-pure (everything bf16) or bf16-mixed "
            "(bf16 weights, fp32 master weights and AdamW state), but got 'bf16': estimate "
            "does not model bf16 autocast (fp32 weights, bf16 compute), which is what --dtype "
            "bf16 runs in bench, plan and train\n");
  const auto pure = run_json("estimate --dtype bf16-pure --policy none", "bf16_pure");
  EXPECT_EQ(pure["config"]["precision"], "bf16-pure");
  const auto f32 = run_json("estimate --dtype f32 --policy none", "f32_estimate");
  EXPECT_EQ(f32["config"]["precision"], "fp32");
}

} // namespace
