// The analytic estimate against measured steps of the models it describes:
// small BERT and Llama configurations that run here, under each policy.
#include "testing.h"

#include "remat/nn/estimate_check.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <iostream>

namespace {

using remat::CheckpointPolicy;
using remat::plan::AttentionImpl;
using remat::plan::Family;
using remat::plan::Head;
using remat::plan::ModelSpec;

std::vector<CheckpointPolicy> policies() {
  std::vector<CheckpointPolicy> out;
  for (const char* n : {"none", "every-layer", "every-2", "sqrt", "full", "selective-attention",
                        "selective-mlp", "save-matmuls", "save-projections", "compress"}) {
    out.push_back(CheckpointPolicy::parse(n));
  }
  return out;
}

void expect_within(const ModelSpec& spec, const std::string& what, double tolerance = 0.10) {
  for (const auto& c : remat::nn::check_estimate(spec, policies())) {
    std::cout << what << " " << c.policy << ": fixed " << c.estimated_fixed_bytes << " / "
              << c.measured_fixed_bytes << ", activations " << c.estimated_activation_bytes
              << " / " << c.measured_activation_bytes << ", peak " << c.estimated_peak_bytes
              << " / " << c.measured_peak_bytes << " ("
              << 100.0 * (c.estimated_peak_bytes - c.measured_peak_bytes) / c.measured_peak_bytes
              << "%)\n";
    EXPECT_LE(std::abs(c.estimated_peak_bytes - c.measured_peak_bytes),
              tolerance * c.measured_peak_bytes)
        << what << " " << c.policy;
    EXPECT_LE(std::abs(c.estimated_fixed_bytes - c.measured_fixed_bytes),
              tolerance * c.measured_fixed_bytes)
        << what << " " << c.policy;
  }
}

ModelSpec bert() {
  return ModelSpec(Family::kBert, 4, 64, 4, 100).seq(64).batch(2).max_positions(64);
}

ModelSpec llama() {
  return ModelSpec(Family::kLlama, 4, 64, 4, 128)
      .kv_heads(2)
      .intermediate(172)
      .seq(64)
      .batch(2)
      .head(Head::kLanguageModel);
}

TEST(PlanEstimateCheck, Bert) { expect_within(bert(), "bert"); }
TEST(PlanEstimateCheck, BertLora) { expect_within(bert().lora_rank(4).lora_targets({"q", "v"}), "bert-lora"); }
TEST(PlanEstimateCheck, BertBlockwise) { expect_within(bert().attention(AttentionImpl::kBlockwise), "bert-blockwise"); }
TEST(PlanEstimateCheck, Llama) { expect_within(llama(), "llama"); }
TEST(PlanEstimateCheck, LlamaLora) { expect_within(llama().lora_rank(4), "llama-lora"); }
TEST(PlanEstimateCheck, LlamaBlockwise) { expect_within(llama().attention(AttentionImpl::kBlockwise), "llama-blockwise"); }

// check_table: the error is the peak's, relative to the measured one; the
// last line says whether all are within the tolerance.
TEST(PlanEstimateCheck, TableSaysWhetherEveryPeakIsWithinTolerance) {
  remat::nn::EstimateCheck a;
  a.policy = "none";
  a.estimated_peak_bytes = 105;
  a.measured_peak_bytes = 100;
  EXPECT_DOUBLE_EQ(a.peak_error_percent(), 5);
  EXPECT_EQ(a.to_json()["peak_error_percent"], 5.0);
  EXPECT_TRUE(remat::nn::checks_within({a}));
  EXPECT_NE(remat::nn::check_table({a}).find("+5.0%"), std::string::npos);
  EXPECT_NE(remat::nn::check_table({a}).find("every peak within 10% of the measured one"),
            std::string::npos);
  auto b = a;
  b.estimated_peak_bytes = 80;
  EXPECT_FALSE(remat::nn::checks_within({a, b}));
  EXPECT_NE(remat::nn::check_table({a, b}).find("SOME PEAKS ARE MORE THAN 10% OFF"),
            std::string::npos);
}

} // namespace
