// Hugging Face transformers as the peer: the same safetensors weights run in
// transformers (BertModel, LlamaForCausalLM; tests/io/hf_peer.py) and in
// remat (nn::Bert, nn::Llama), one training step each, with and without
// checkpointing; and folders go both ways through `remat train`. Needs
// REMAT_PYTHON with transformers (the 2.x leg); elsewhere the tests skip with
// the reason.
#include "cli/cli_runner.h"
#include "io/io_testing.h"
#include "remat/io/hf.h"
#include "remat/io/safetensors.h"
#include "remat/nn/bert.h"
#include "remat/nn/llama.h"
#include "remat/policy.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdio>
#include <iomanip>
#include <iostream>
#include <iterator>
#include <set>
#include <sstream>

namespace {

using remat_io_test::TempDir;

// Agreement bound, relative per tensor: max|remat - hf| / max|hf| <= 1e-5.
// Both sides compute in float32 with the same operations in the same order
// where it matters (eager attention); what remains is summation order inside
// matmuls and fused kernels, around 1e-7 relative on these sizes. One
// exception: the gradient of BERT's key bias is exactly zero in exact
// arithmetic (q . b_k is the same for every key, and softmax ignores it), so
// both sides hold rounding noise there; it is measured against the scale of
// the same layer's key weight gradient instead.
constexpr double kRelativeBound = 1e-5;

remat_io_test::ScriptRun run_peer(const std::string& args) {
  return remat_io_test::run_python_script("hf_peer.py", args);
}

#define RUN_PEER_OR_SKIP(var, args)          \
  const auto var = run_peer(args);           \
  if (var.skipped) {                         \
    GTEST_SKIP() << var.skip_reason;         \
  }                                          \
  ASSERT_EQ(var.status, 0) << var.output

/// Compares tensors by name and keeps the largest relative difference.
class Comparison {
 public:
  explicit Comparison(std::string label) : label_(std::move(label)) {}

  /// `scale` > 0 replaces max|hf| as the denominator.
  void expect_close(
      const std::string& name,
      const torch::Tensor& remat,
      const torch::Tensor& hf,
      double scale = -1) {
    ASSERT_TRUE(remat.defined()) << label_ << ": remat has no " << name;
    ASSERT_EQ(remat.sizes(), hf.sizes()) << label_ << ": " << name;
    const auto a = remat.detach().to(torch::kDouble);
    const auto b = hf.detach().to(torch::kDouble);
    if (scale <= 0) {
      scale = b.abs().max().item<double>();
    }
    const double diff = (a - b).abs().max().item<double>();
    // An all-zero gradient (rows no token uses) must be zero in both.
    const double rel = scale > 0 ? diff / scale : diff;
    EXPECT_LE(rel, kRelativeBound)
        << label_ << ": " << name << " differs by " << diff << " (max |hf| "
        << scale << ")";
    if (rel >= worst_) {
      worst_ = rel;
      worst_name_ = name;
    }
  }

  /// Prints and records the largest difference, for the test log.
  void report() const {
    std::ostringstream line;
    line << std::scientific << std::setprecision(2) << worst_ << " ("
         << worst_name_ << ")";
    std::cout << "[ peer     ] " << label_ << ": largest relative difference "
              << line.str() << std::endl;
    ::testing::Test::RecordProperty(label_, line.str());
  }

 private:
  std::string label_;
  double worst_ = 0;
  std::string worst_name_ = "-";
};

/// Every parameter's gradient against transformers' "grad.<name>", and the
/// names both ways: no HF gradient without a remat parameter, no remat
/// parameter without an HF gradient.
void compare_gradients(
    const torch::nn::Module& model,
    const std::map<std::string, torch::Tensor>& hf,
    Comparison& comparison) {
  std::set<std::string> hf_names;
  for (const auto& kv : hf) {
    if (kv.first.rfind("grad.", 0) == 0) {
      hf_names.insert(kv.first.substr(5));
    }
  }
  std::set<std::string> remat_names;
  for (const auto& kv : model.named_parameters()) {
    remat_names.insert(kv.key());
    if (hf_names.count(kv.key())) {
      double scale = -1;
      const std::string key_bias = "attention.self.key.bias";
      const auto& name = kv.key();
      if (name.size() > key_bias.size() &&
          name.compare(name.size() - key_bias.size(), key_bias.size(), key_bias) == 0) {
        const auto weight = "grad." + name.substr(0, name.size() - 4) + "weight";
        scale = hf.at(weight).abs().max().item<double>();
      }
      comparison.expect_close(
          "grad." + name, kv.value().grad(), hf.at("grad." + name), scale);
    }
  }
  std::vector<std::string> only_hf, only_remat;
  std::set_difference(
      hf_names.begin(), hf_names.end(), remat_names.begin(), remat_names.end(),
      std::back_inserter(only_hf));
  std::set_difference(
      remat_names.begin(), remat_names.end(), hf_names.begin(), hf_names.end(),
      std::back_inserter(only_remat));
  EXPECT_TRUE(only_hf.empty()) << "HF gradients remat lacks: "
                               << torch::ArrayRef<std::string>(only_hf);
  EXPECT_TRUE(only_remat.empty()) << "remat parameters HF has no gradient for: "
                                  << torch::ArrayRef<std::string>(only_remat);
}

/// Loads an HF folder strictly: every tensor of the file is a parameter of
/// the module and every parameter is in the file.
void load_strict(torch::nn::Module& model, const std::string& dir) {
  auto report = remat::io::load_state(model, remat::io::read_hf_weights(dir));
  EXPECT_EQ(report.loaded.size(), model.parameters().size());
  EXPECT_TRUE(report.unexpected.empty());
}

class HfPeerTest : public ::testing::Test {
 protected:
  HfPeerTest() {
    torch::manual_seed(0);
  }
};

TEST_F(HfPeerTest, BertStepMatchesTransformersWithAndWithoutCheckpointing) {
  TempDir dir;
  RUN_PEER_OR_SKIP(peer, "step bert " + dir.path());

  const auto options = remat::io::read_bert_config(dir.file("config.json"));
  EXPECT_EQ(options.hidden_dropout(), 0.0);
  EXPECT_EQ(options.attention_dropout(), 0.0);
  remat::nn::Bert bert(options);
  load_strict(*bert, dir.path());
  bert->train();
  auto in = remat::io::load_safetensors(dir.file("inputs.safetensors"));

  for (const std::string policy : {"none", "every-layer"}) {
    SCOPED_TRACE(policy);
    // HF's every-layer run is activation_checkpointing_enable(): each
    // BertLayer recomputed in the backward (hf_peer.py checks it was).
    auto hf = remat::io::load_safetensors(
        dir.file("hf_" + policy + ".safetensors"));
    EXPECT_EQ(hf.at("layer0_calls").item<int64_t>(), policy == "none" ? 1 : 2);
    bert->gradient_checkpointing_enable(remat::CheckpointPolicy::parse(policy));
    bert->zero_grad();
    auto out = bert->forward(in.at("input_ids"), in.at("attention_mask"));
    auto loss = (out.last_hidden_state * in.at("proj_last")).sum() +
        (out.pooler_output * in.at("proj_pooled")).sum();
    loss.backward();

    Comparison c("bert " + policy);
    c.expect_close("last_hidden_state", out.last_hidden_state, hf.at("last_hidden_state"));
    c.expect_close("pooler_output", out.pooler_output, hf.at("pooler_output"));
    c.expect_close("loss", loss.reshape({1}), hf.at("loss"));
    compare_gradients(*bert, hf, c);
    c.report();
  }
}

TEST_F(HfPeerTest, LlamaStepMatchesTransformersWithAndWithoutCheckpointing) {
  TempDir dir;
  RUN_PEER_OR_SKIP(peer, "step llama " + dir.path());

  // transformers 5 writes rope_theta inside "rope_parameters".
  const auto config = remat::io::read_llama_config(dir.file("config.json"));
  EXPECT_EQ(config.rope_theta, 500000.0);
  remat::nn::Llama llama(remat::io::llama_options(config));
  load_strict(*llama, dir.path());
  llama->train();
  auto in = remat::io::load_safetensors(dir.file("inputs.safetensors"));
  const auto& ids = in.at("input_ids");
  const auto& mask = in.at("attention_mask");
  const auto& labels = in.at("labels");

  for (const std::string policy : {"none", "every-layer"}) {
    SCOPED_TRACE(policy);
    auto hf = remat::io::load_safetensors(
        dir.file("hf_" + policy + ".safetensors"));
    EXPECT_EQ(hf.at("layer0_calls").item<int64_t>(), policy == "none" ? 1 : 2);
    llama->gradient_checkpointing_enable(remat::CheckpointPolicy::parse(policy));

    // Logits, then HF's loss on them.
    llama->zero_grad();
    auto logits = llama->forward(ids, mask);
    auto loss = llama->loss(logits, labels);
    loss.backward();
    Comparison c("llama " + policy);
    c.expect_close("logits", logits, hf.at("logits"));
    c.expect_close("loss", loss.reshape({1}), hf.at("loss"));
    compare_gradients(*llama, hf, c);
    c.report();

    // forward_loss, what `remat train --task lm` runs: no logits kept.
    llama->zero_grad();
    auto fused = llama->forward_loss(ids, labels, mask);
    fused.backward();
    Comparison f("llama forward_loss " + policy);
    f.expect_close("loss", fused.reshape({1}), hf.at("loss"));
    compare_gradients(*llama, hf, f);
    f.report();
  }
}

const std::string kTrainTiny =
    "train --layers 1 --hidden 32 --heads 4 --seq 32 --batch 4 --max-steps 1 "
    "--valid-fraction 0.05 --threads 1 ";

// What `remat train --save` writes, transformers reads with nothing missing
// or unexpected. The classify task saves its BertClassifier: "bert." before
// the encoder's names, the pooler, and "classifier.{weight,bias}", which is
// BertForSequenceClassification's layout (BertModel would report the
// classifier as unexpected). The lm task saves LlamaForCausalLM's names.
TEST_F(HfPeerTest, TrainSaveLoadsInTransformers) {
  TempDir dir;
  auto bert = remat::test::run_cli(kTrainTiny + "--save " + dir.file("bert"));
  ASSERT_EQ(bert.exit_code, 0) << bert.err;
  auto llama = remat::test::run_cli(
      kTrainTiny + "--task lm --kv-heads 2 --save " + dir.file("llama"));
  ASSERT_EQ(llama.exit_code, 0) << llama.err;

  RUN_PEER_OR_SKIP(
      peer,
      "load " + dir.file("bert") + " BertForSequenceClassification " +
          dir.file("llama") + " LlamaForCausalLM");
  std::cout << peer.output;
}

// What transformers' save_pretrained writes, `remat train --init` starts
// from and trains a step on.
TEST_F(HfPeerTest, TrainInitStartsFromTransformersFolders) {
  TempDir dir;
  RUN_PEER_OR_SKIP(peer, "save " + dir.path());

  auto bert = remat::test::run_cli(kTrainTiny + "--init " + dir.file("bert"));
  ASSERT_EQ(bert.exit_code, 0) << bert.err;
  // A BertModel folder: every encoder tensor (2 layers: 5 + 2 * 16 + 2) and
  // a new head.
  EXPECT_NE(bert.err.find("loaded 39 tensors from " + dir.file("bert") +
                          " with a new classifier head"),
            std::string::npos)
      << bert.err;

  auto llama = remat::test::run_cli(
      kTrainTiny + "--task lm --init " + dir.file("llama"));
  ASSERT_EQ(llama.exit_code, 0) << llama.err;
  // 2 layers of 9 tensors, embeddings, final norm, lm_head.
  EXPECT_NE(llama.err.find("loaded 21 tensors from " + dir.file("llama")),
            std::string::npos)
      << llama.err;
}

} // namespace
