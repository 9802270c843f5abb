#include "io/io_testing.h"
#include "remat/io/file.h"
#include "remat/io/hf.h"
#include "remat/io/safetensors.h"
#include "remat/nn/bert.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>

namespace {

using remat_io_test::TempDir;

remat::nn::BertOptions small_bert() {
  return remat::nn::BertOptions()
      .vocab_size(100)
      .hidden_size(64)
      .num_layers(2)
      .num_heads(4)
      .intermediate_size(128)
      .max_position_embeddings(64)
      .hidden_dropout(0.0)
      .attention_dropout(0.0);
}

// Every parameter random and large enough that swapping two of them (a
// LayerNorm weight for its bias, say) changes the output visibly.
void randomize(torch::nn::Module& m) {
  torch::NoGradGuard no_grad;
  for (auto& p : m.parameters()) {
    p.normal_(0.0, 0.2);
  }
}

struct Inputs {
  torch::Tensor ids, mask;
};

Inputs fixed_inputs() {
  auto ids = torch::tensor(
      {{2, 15, 99, 42, 7, 7, 63, 3, 0, 0, 0, 0},
       {2, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 3}},
      torch::kLong);
  auto mask = torch::ones_like(ids);
  mask.index_put_({0, torch::indexing::Slice(8)}, 0);
  return {ids, mask};
}

// Runs the command, returning its exit status and output.
std::pair<int, std::string> run(const std::string& command) {
  std::string output;
  FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
  if (!pipe) {
    return {-1, "popen failed"};
  }
  char buffer[4096];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof buffer, pipe)) > 0) {
    output.append(buffer, n);
  }
  return {::pclose(pipe), output};
}

class HfTest : public ::testing::Test {
 protected:
  HfTest() {
    torch::manual_seed(0);
  }
};

TEST_F(HfTest, BertMatchesAPlainPyTorchReference) {
  remat::nn::Bert bert(small_bert());
  randomize(*bert);
  bert->eval();
  TempDir dir;
  remat::io::save_state(*bert, dir.file("model.safetensors"));
  remat::io::write_bert_config(dir.file("config.json"), bert->options);
  auto in = fixed_inputs();
  remat::io::save_safetensors(
      dir.file("inputs.safetensors"),
      {{"input_ids", in.ids}, {"attention_mask", in.mask}});

  auto result =
      run(std::string(REMAT_PYTHON) + " " + REMAT_SOURCE_DIR +
          "/tests/io/bert_reference.py " + dir.path());
  if (result.first != 0 &&
      result.second.find("No module named 'torch'") != std::string::npos) {
    GTEST_SKIP() << REMAT_PYTHON
                 << " has no torch (Debian: apt install python3-torch)";
  }
  ASSERT_EQ(result.first, 0) << result.second;
  auto expected = remat::io::load_safetensors(dir.file("outputs.safetensors"));

  torch::NoGradGuard no_grad;
  auto out = bert->forward(in.ids, in.mask);
  const auto& last = expected.at("last_hidden_state");
  const auto& pooled = expected.at("pooler_output");
  ASSERT_EQ(last.sizes(), out.last_hidden_state.sizes());
  ASSERT_EQ(pooled.sizes(), out.pooler_output.sizes());
  EXPECT_LT((last - out.last_hidden_state).abs().max().item<double>(), 1e-5);
  EXPECT_LT((pooled - out.pooler_output).abs().max().item<double>(), 1e-5);
}

TEST_F(HfTest, SaveThenLoadGivesTheSameModel) {
  remat::nn::Bert a(small_bert());
  randomize(*a);
  a->eval();
  TempDir dir;
  remat::io::save_state(*a, dir.file("model.safetensors"));
  EXPECT_EQ(
      remat::io::load_safetensors_metadata(dir.file("model.safetensors"))
          .at("format"),
      "pt");

  remat::io::write_bert_config(dir.file("config.json"), a->options);
  torch::manual_seed(1);
  remat::nn::Bert b(remat::io::read_bert_config(dir.file("config.json")));
  b->eval();
  auto report = remat::io::load_state(*b, dir.file("model.safetensors"));
  EXPECT_EQ(report.loaded.size(), a->parameters().size());
  EXPECT_TRUE(report.missing.empty());
  EXPECT_TRUE(report.unexpected.empty());
  EXPECT_TRUE(report.tied.empty());

  auto in = fixed_inputs();
  torch::NoGradGuard no_grad;
  auto oa = a->forward(in.ids, in.mask);
  auto ob = b->forward(in.ids, in.mask);
  EXPECT_TRUE(torch::equal(oa.last_hidden_state, ob.last_hidden_state));
  EXPECT_TRUE(torch::equal(oa.pooler_output, ob.pooler_output));
}

TEST_F(HfTest, BertConfigRoundTripsWithHuggingFaceNames) {
  TempDir dir;
  auto options =
      small_bert().hidden_dropout(0.1).attention_dropout(0.2).layer_norm_eps(
          1e-7);
  remat::io::write_bert_config(dir.file("config.json"), options);
  auto j = nlohmann::json::parse(remat::io::read_file(dir.file("config.json")));
  EXPECT_EQ(j.at("model_type"), "bert");
  EXPECT_EQ(j.at("architectures"), nlohmann::json::array({"BertModel"}));
  EXPECT_EQ(j.at("num_hidden_layers"), 2);
  EXPECT_EQ(j.at("num_attention_heads"), 4);
  EXPECT_EQ(j.at("intermediate_size"), 128);
  EXPECT_EQ(j.at("hidden_dropout_prob"), 0.1);
  EXPECT_EQ(j.at("attention_probs_dropout_prob"), 0.2);
  auto back = remat::io::read_bert_config(dir.file("config.json"));
  EXPECT_EQ(back.vocab_size(), 100);
  EXPECT_EQ(back.hidden_size(), 64);
  EXPECT_EQ(back.num_layers(), 2);
  EXPECT_EQ(back.num_heads(), 4);
  EXPECT_EQ(back.intermediate_size(), 128);
  EXPECT_EQ(back.max_position_embeddings(), 64);
  EXPECT_EQ(back.type_vocab_size(), 2);
  EXPECT_DOUBLE_EQ(back.hidden_dropout(), 0.1);
  EXPECT_DOUBLE_EQ(back.attention_dropout(), 0.2);
  EXPECT_DOUBLE_EQ(back.layer_norm_eps(), 1e-7);
  EXPECT_EQ(back.pad_token_id(), 0);
  // pad_token_id: BertConfig's default 0; null means no padding token.
  EXPECT_EQ(
      remat::io::bert_options_from_json({{"pad_token_id", 3}}).pad_token_id(), 3);
  EXPECT_EQ(
      remat::io::bert_options_from_json({{"pad_token_id", nullptr}}).pad_token_id(),
      -1);

  // Absent fields take BertConfig's defaults (bert-base).
  auto base = remat::io::bert_options_from_json(nlohmann::json::object());
  EXPECT_EQ(base.hidden_size(), 768);
  EXPECT_EQ(base.intermediate_size(), 3072);
  EXPECT_EQ(base.vocab_size(), 30522);
}

TEST_F(HfTest, BertConfigErrorsNameTheField) {
  TempDir dir;
  remat_io_test::write_text(
      dir.file("config.json"), "{\"hidden_size\": \"64\"}");
  EXPECT_ERROR_CONTAINS(
      remat::io::read_bert_config(dir.file("config.json")),
      "config file '" + dir.file("config.json") +
          "': config field \"hidden_size\": expected an integer, but got \"64\"");
  EXPECT_ERROR_CONTAINS(
      remat::io::bert_options_from_json({{"hidden_act", "relu"}}),
      "config field \"hidden_act\": expected \"gelu\"");
  EXPECT_ERROR_CONTAINS(
      remat::io::bert_options_from_json({{"model_type", "roberta"}}),
      "expected \"bert\", but got \"roberta\"");
  EXPECT_ERROR_CONTAINS(
      remat::io::bert_options_from_json(
          {{"hidden_size", 100}, {"num_attention_heads", 3}}),
      "expected hidden_size (100) to be a multiple of num_heads (3)");
  // What a config.json can break that a model would train on as NaN.
  EXPECT_ERROR_CONTAINS(
      remat::io::bert_options_from_json({{"layer_norm_eps", -1}}),
      "expected layer_norm_eps in (0, 1), but got -1");
  EXPECT_ERROR_CONTAINS(
      remat::io::llama_config_from_json({{"rms_norm_eps", 0}}).validate(),
      "expected rms_norm_eps in (0, 1), but got 0");
  EXPECT_ERROR_CONTAINS(
      remat::io::llama_config_from_json(
          {{"num_attention_heads", 32}, {"num_key_value_heads", 6}}).validate(),
      "expected num_key_value_heads dividing num_attention_heads (32; 0: as many), but got 6");
  remat_io_test::write_text(dir.file("bad.json"), "{oops");
  EXPECT_ERROR_CONTAINS(
      remat::io::read_bert_config(dir.file("bad.json")), "invalid JSON");
  // Found by fuzz/config_fuzz.cpp: 4 * hidden overflowed int64 in mlp_size().
  // The size bounds refuse such a hidden size before anything multiplies it.
  EXPECT_ERROR_CONTAINS(
      remat::io::bert_options_from_json(
          {{"hidden_size", int64_t{1} << 62}, {"num_attention_heads", 1},
           {"intermediate_size", 0}}),
      "expected hidden_size in [1, 65536], but got 4611686018427387904");
}

TEST_F(HfTest, LoadStateRefusesMismatchesAndChangesNothing) {
  remat::nn::Bert model(small_bert());
  auto state = model->named_parameters();
  std::map<std::string, torch::Tensor> file;
  for (const auto& kv : state) {
    file[kv.key()] = torch::randn(kv.value().sizes());
  }
  const auto before = model->embeddings->LayerNorm->weight.clone();

  auto wrong_shape = file;
  wrong_shape["embeddings.word_embeddings.weight"] = torch::zeros({50, 64});
  EXPECT_ERROR_CONTAINS(
      remat::io::load_state(*model, wrong_shape),
      "'embeddings.word_embeddings.weight' has shape [50, 64] in the file but [100, 64] in the module");
  EXPECT_TRUE(torch::equal(model->embeddings->LayerNorm->weight, before))
      << "nothing copied";

  auto missing = file;
  missing.erase("pooler.dense.bias");
  EXPECT_ERROR_CONTAINS(
      remat::io::load_state(*model, missing),
      "'pooler.dense.bias' with shape [64] is missing from the file");
  auto report = remat::io::load_state(
      *model, missing, remat::io::LoadStateOptions().ignore_missing(true));
  EXPECT_EQ(report.missing, std::vector<std::string>{"pooler.dense.bias"});

  auto half = file;
  half["pooler.dense.weight"] = file["pooler.dense.weight"].to(torch::kFloat16);
  EXPECT_ERROR_CONTAINS(
      remat::io::load_state(*model, half),
      "'pooler.dense.weight' has dtype Half in the file but Float in the module (cast_dtype(true) converts it)");
  remat::io::load_state(
      *model, half, remat::io::LoadStateOptions().cast_dtype(true));
  EXPECT_TRUE(torch::equal(
      model->pooler->dense->weight,
      half["pooler.dense.weight"].to(torch::kFloat)));

  auto extra = file;
  extra["classifier.weight"] = torch::zeros({2, 64});
  EXPECT_ERROR_CONTAINS(
      remat::io::load_state(*model, extra),
      "'classifier.weight' is in the file but not in the module");
}

// A BertForSequenceClassification file: "bert." before every name, a classifier
// head, and (in the original checkpoints) LayerNorm.gamma / .beta.
TEST_F(HfTest, LoadsAPrefixedCheckpointWithLegacyNames) {
  remat::nn::Bert source(small_bert());
  randomize(*source);
  std::map<std::string, torch::Tensor> file;
  for (const auto& kv : source->named_parameters()) {
    std::string name = "bert." + kv.key();
    const auto ln = name.find("LayerNorm.");
    if (ln != std::string::npos) {
      name = name.substr(0, ln) +
          (name.substr(ln + 10) == "weight" ? "LayerNorm.gamma"
                                            : "LayerNorm.beta");
    }
    file[name] = kv.value().detach().clone();
  }
  file["classifier.weight"] = torch::zeros({3, 64});
  file["classifier.bias"] = torch::zeros({3});

  remat::nn::Bert target(small_bert());
  EXPECT_ERROR_CONTAINS(
      remat::io::load_state(
          *target, file,
          remat::io::LoadStateOptions().strip_prefixes({"bert."})),
      "(ignore_unexpected(true) skips extra tensors");
  auto report = remat::io::load_state(
      *target, file,
      remat::io::LoadStateOptions().strip_prefixes({"bert."}).ignore_unexpected(
          true));
  EXPECT_EQ(
      report.unexpected,
      (std::vector<std::string>{"classifier.bias", "classifier.weight"}));
  EXPECT_EQ(report.loaded.size(), source->parameters().size());
  for (const auto& kv : source->named_parameters()) {
    EXPECT_TRUE(torch::equal(kv.value(), target->named_parameters()[kv.key()]))
        << kv.key();
  }
}

// Tied weights: one tensor under two names is written once and loads back.
TEST_F(HfTest, TiedWeightsAreWrittenOnce) {
  auto make = [] {
    auto m = std::make_shared<torch::nn::Module>();
    auto w = torch::randn({5, 3});
    m->register_parameter("embed", w);
    auto head =
        m->register_module("head", std::make_shared<torch::nn::Module>());
    head->register_parameter("weight", w);
    return m;
  };
  auto a = make();
  TempDir dir;
  remat::io::save_state(*a, dir.file("model.safetensors"));
  auto written = remat::io::load_safetensors(dir.file("model.safetensors"));
  EXPECT_EQ(written.size(), 1u);
  EXPECT_EQ(written.count("embed"), 1u);
  auto b = make();
  auto report = remat::io::load_state(*b, dir.file("model.safetensors"));
  EXPECT_EQ(report.tied, std::vector<std::string>{"head.weight"});
  EXPECT_TRUE(report.missing.empty());
  EXPECT_TRUE(torch::equal(
      b->named_parameters()["head.weight"], a->named_parameters()["embed"]));
}

TEST_F(HfTest, ReadsShardedFolders) {
  TempDir dir;
  remat::io::save_safetensors(
      dir.file("model-00001-of-00002.safetensors"), {{"a", torch::ones({2})}});
  remat::io::save_safetensors(
      dir.file("model-00002-of-00002.safetensors"),
      {{"b", torch::zeros({3})}, {"c", torch::ones({1})}});
  nlohmann::json index = {
      {"metadata", {{"total_size", 24}}},
      {"weight_map",
       {{"a", "model-00001-of-00002.safetensors"},
        {"b", "model-00002-of-00002.safetensors"},
        {"c", "model-00002-of-00002.safetensors"}}}};
  remat_io_test::write_text(
      dir.file("model.safetensors.index.json"), index.dump());
  auto w = remat::io::read_hf_weights(dir.path());
  EXPECT_EQ(w.size(), 3u);
  EXPECT_TRUE(torch::equal(w.at("b"), torch::zeros({3})));

  index["weight_map"]["d"] = "model-00001-of-00002.safetensors";
  remat_io_test::write_text(
      dir.file("model.safetensors.index.json"), index.dump());
  EXPECT_ERROR_CONTAINS(
      remat::io::read_hf_weights(dir.path()),
      "places tensor 'd' in 'model-00001-of-00002.safetensors', but that shard does not hold it");

  TempDir pickle;
  remat_io_test::write_text(pickle.file("pytorch_model.bin"), "PK");
  EXPECT_ERROR_CONTAINS(
      remat::io::read_hf_weights(pickle.path()),
      "pytorch_model.bin is a pickle");
}

TEST_F(HfTest, LlamaConfigReadsHuggingFaceFields) {
  auto c = remat::io::llama_config_from_json(nlohmann::json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 5632, "max_position_embeddings": 2048, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 22, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-05, "rope_scaling": null, "rope_theta": 10000.0,
    "tie_word_embeddings": false, "torch_dtype": "bfloat16", "vocab_size": 32000})"));
  EXPECT_EQ(c.hidden_size, 2048);
  EXPECT_EQ(c.intermediate_size, 5632);
  EXPECT_EQ(c.num_hidden_layers, 22);
  EXPECT_EQ(c.num_attention_heads, 32);
  EXPECT_EQ(c.num_key_value_heads, 4);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_FALSE(c.tie_word_embeddings);

  // num_key_value_heads absent: as many as attention heads.
  auto mha = remat::io::llama_config_from_json(
      {{"num_attention_heads", 8}, {"hidden_size", 64}});
  EXPECT_EQ(mha.num_key_value_heads, 8);

  TempDir dir;
  remat::io::LlamaConfig tiny;
  tiny.vocab_size = 300;
  tiny.hidden_size = 64;
  tiny.intermediate_size = 172;
  tiny.num_hidden_layers = 2;
  tiny.num_attention_heads = 4;
  tiny.num_key_value_heads = 2;
  tiny.rope_theta = 500000.0;
  tiny.tie_word_embeddings = true;
  remat::io::write_llama_config(dir.file("config.json"), tiny);
  auto back = remat::io::read_llama_config(dir.file("config.json"));
  EXPECT_EQ(back.vocab_size, 300);
  EXPECT_EQ(back.num_key_value_heads, 2);
  EXPECT_DOUBLE_EQ(back.rope_theta, 500000.0);
  EXPECT_TRUE(back.tie_word_embeddings);

  EXPECT_ERROR_CONTAINS(
      remat::io::llama_config_from_json(
          {{"rope_scaling", {{"rope_type", "llama3"}, {"factor", 8.0}}}}),
      "config field \"rope_scaling\": expected null");
  // transformers 5 writes rope_theta inside "rope_parameters".
  EXPECT_DOUBLE_EQ(
      remat::io::llama_config_from_json(nlohmann::json::parse(
                                            R"({"rope_parameters":
          {"rope_theta": 500000.0, "rope_type": "default"}})"))
          .rope_theta,
      500000.0);
  EXPECT_ERROR_CONTAINS(
      remat::io::llama_config_from_json(nlohmann::json::parse(
          R"({"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3"}})")),
      "config field \"rope_parameters\": expected rope_type \"default\"");
  EXPECT_ERROR_CONTAINS(
      remat::io::llama_config_from_json(nlohmann::json::parse(
          R"({"rope_theta": 1e4, "rope_parameters": {"rope_theta": 5e5}})")),
      "config fields \"rope_theta\" 10000 and \"rope_parameters\".rope_theta 500000 disagree");
  EXPECT_ERROR_CONTAINS(
      remat::io::llama_config_from_json(
          {{"num_attention_heads", 32}, {"num_key_value_heads", 3}}),
      "expected num_key_value_heads dividing num_attention_heads (32; 0: as many), but got 3");
  EXPECT_ERROR_CONTAINS(
      remat::io::llama_config_from_json({{"head_dim", 256}}),
      "config field \"head_dim\": expected");
  EXPECT_ERROR_CONTAINS(
      remat::io::llama_config_from_json({{"tie_word_embeddings", 1}}),
      "config field \"tie_word_embeddings\": expected true or false, but got 1");
}

} // namespace
