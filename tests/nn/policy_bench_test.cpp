// Policies compared on one model (remat/nn/policy_bench.h): none is the
// gradients' reference, and runs of several rounds pool their samples and
// keep each round's ratio to none.
#include "remat/nn/policy_bench.h"

#include "remat/memory.h"
#include "remat/timing.h"
#include "testing.h"

#include <gtest/gtest.h>

namespace {

using remat::CheckpointPolicy;
using remat::nn::PolicyRounds;
using remat::nn::PolicyRun;

PolicyRun run_of(const std::string& policy, std::vector<double> times) {
  PolicyRun r;
  r.policy = policy;
  r.times = times;
  r.forward_times = times;
  r.step_seconds = remat::median(times);
  return r;
}

PolicyRun failed(const std::string& policy) {
  PolicyRun r;
  r.policy = policy;
  r.ok = false;
  r.error = "out of memory";
  return r;
}

TEST(PolicyBench, RoundsPoolTheSamplesAndKeepEachRoundsRatioToNone) {
  PolicyRounds pool(2, 2);
  auto first = run_of("every-layer", {3, 3, 3});
  first.peak = 1000;
  pool.add(0, run_of("none", {1, 1, 1}));
  pool.add(1, first);
  // The second round, in the other order and on a machine twice as slow.
  auto second = run_of("every-layer", {6, 6, 6});
  second.peak = 999; // bytes repeat exactly; the first round's are kept
  pool.add(1, second);
  pool.add(0, run_of("none", {2, 2, 2}));
  const auto runs = pool.runs();
  ASSERT_EQ(runs.size(), 2u);
  EXPECT_EQ(runs[1].policy, "every-layer");
  EXPECT_EQ(runs[1].times, (std::vector<double>{3, 3, 3, 6, 6, 6}));
  EXPECT_EQ(runs[1].forward_times.size(), 6u);
  EXPECT_EQ(runs[1].step_seconds, 4.5); // the median of the pooled samples
  EXPECT_EQ(runs[1].peak, 1000);
  EXPECT_EQ(runs[1].round_ratios, (std::vector<double>{3, 3}));
  EXPECT_EQ(runs[0].round_ratios, (std::vector<double>{1, 1}));
}

TEST(PolicyBench, OneRoundIsTheRunsAsTheyCame) {
  PolicyRounds pool(1, 1);
  auto r = run_of("none", {1, 2, 9});
  r.step_seconds = 7; // what the run said, not recomputed
  pool.add(0, r);
  const auto runs = pool.runs();
  EXPECT_EQ(runs[0].step_seconds, 7);
  EXPECT_TRUE(runs[0].round_ratios.empty());
}

TEST(PolicyBench, APolicyThatFailsIsThatFailureFromThenOn) {
  PolicyRounds pool(3, 3);
  pool.add(0, run_of("none", {1}));
  pool.add(1, failed("every-layer"));
  pool.add(2, run_of("every-2", {2}));
  EXPECT_TRUE(pool.wants(0));
  EXPECT_FALSE(pool.wants(1));
  EXPECT_THROW_WITH(pool.add(1, run_of("every-layer", {1})),
                    "policy 1 (every-layer) failed in an earlier round");
  pool.add(0, run_of("none", {1}));
  pool.add(2, failed("every-2")); // fails in the second round
  EXPECT_FALSE(pool.wants(2));
  pool.add(0, run_of("none", {1}));
  const auto runs = pool.runs();
  EXPECT_FALSE(runs[1].ok);
  EXPECT_FALSE(runs[2].ok);
  EXPECT_TRUE(runs[2].round_ratios.empty());
  EXPECT_EQ(runs[0].times.size(), 3u);
  EXPECT_THROW_WITH(PolicyRounds(1, 0), "rounds: expected at least 1, but got 0");
}

remat::nn::ModelConfig small_bert() {
  return remat::nn::ModelConfig().layers(2).hidden(32).heads(2).seq(16).batch(2);
}

TEST(PolicyBench, NoneIsTheReferenceOfThePoliciesAfterIt) {
  torch::manual_seed(0);
  remat::nn::BenchWorkload w(small_bert(), remat::nn::BenchOptions().warmup(0).steps(2));
  remat::nn::ReferenceGradients none_grads;
  const auto runs = remat::nn::run_policies(
      w, {CheckpointPolicy::none(), CheckpointPolicy::every_layer()}, nullptr, &none_grads);
  ASSERT_EQ(runs.size(), 2u);
  ASSERT_TRUE(runs[0].ok) << runs[0].error;
  ASSERT_TRUE(runs[1].ok) << runs[1].error;
  EXPECT_EQ(runs[0].max_abs_grad_diff, 0);
  EXPECT_GE(runs[1].max_abs_grad_diff, 0);
  EXPECT_LT(runs[1].max_abs_grad_diff, 1e-5);
  EXPECT_EQ(none_grads.size(), w.trainable().size());
  EXPECT_EQ(runs[1].times.size(), 2u); // the measured step and one interleaved

  // With a reference from elsewhere, none is compared with it too.
  const auto again =
      remat::nn::run_policies(w, {CheckpointPolicy::none()}, &none_grads, nullptr);
  EXPECT_EQ(again[0].max_abs_grad_diff, 0);
  // No none: nothing to compare with.
  const auto alone = remat::nn::run_policies(w, {CheckpointPolicy::every_layer()});
  EXPECT_EQ(alone[0].max_abs_grad_diff, -1);
}

TEST(PolicyBench, WorkloadJsonSaysWhatWasMeasured) {
  remat::nn::BenchWorkload w(
      small_bert(), remat::nn::BenchOptions().warmup(2).steps(5).limit_bytes(1 << 30));
  const auto j = remat::nn::workload_json(w);
  EXPECT_EQ(j.at("steps"), 5);
  EXPECT_EQ(j.at("warmup"), 2);
  EXPECT_EQ(j.at("memory_limit_bytes"), 1 << 30);
  EXPECT_EQ(j.at("trainable_parameters"), w.parameter_count());
  EXPECT_EQ(j.at("weight_bytes"), w.weight_bytes());
  EXPECT_GT(w.weight_bytes(), 0);
  EXPECT_EQ(j.at("device"), "cpu");
  EXPECT_EQ(j.at("memory_source"), "remat counting CPU allocator");

  EXPECT_EQ(remat::nn::default_limit_bytes(c10::Device(c10::kCUDA, 0)), 0);
  EXPECT_EQ(remat::nn::default_limit_bytes(c10::kCPU),
            remat::memory::physical_bytes() / 10 * 9);
}

} // namespace
