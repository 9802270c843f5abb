// remat::CheckpointPolicy: parsing names and turning them into schedules.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "remat/policy.h"
#include "testing.h"

#include <string>
#include <vector>

namespace {

using remat::CheckpointPolicy;
using remat::Schedule;
using remat::ScheduleSegment;
using remat::SegmentMode;
using Kind = CheckpointPolicy::Kind;

class PolicyTest : public ::testing::Test {
 protected:
  PolicyTest() {
    torch::manual_seed(0);
  }
};

std::vector<ScheduleSegment> recompute_chunks(
    std::vector<std::pair<int64_t, int64_t>> ranges) {
  std::vector<ScheduleSegment> out;
  for (const auto& r : ranges) {
    out.push_back({r.first, r.second, SegmentMode::kRecompute});
  }
  return out;
}

TEST_F(PolicyTest, ParsesEveryName) {
  EXPECT_EQ(CheckpointPolicy::parse("none").kind(), Kind::kNone);
  EXPECT_FALSE(CheckpointPolicy::parse("none").enabled());

  auto every_layer = CheckpointPolicy::parse("every-layer");
  EXPECT_EQ(every_layer.kind(), Kind::kEvery);
  EXPECT_EQ(every_layer.every_k(), 1);
  EXPECT_EQ(every_layer.name(), "every-layer");
  EXPECT_TRUE(every_layer.enabled());

  auto every3 = CheckpointPolicy::parse("every-3");
  EXPECT_EQ(every3.kind(), Kind::kEvery);
  EXPECT_EQ(every3.every_k(), 3);
  EXPECT_EQ(every3.name(), "every-3");
  EXPECT_EQ(CheckpointPolicy::parse("every-1").name(), "every-layer");

  EXPECT_EQ(CheckpointPolicy::parse("sqrt").kind(), Kind::kSqrt);
  EXPECT_EQ(CheckpointPolicy::parse("full").kind(), Kind::kFull);
  EXPECT_EQ(
      CheckpointPolicy::parse("selective-attention").kind(),
      Kind::kSelectiveAttention);
  EXPECT_EQ(
      CheckpointPolicy::parse("selective-mlp").kind(), Kind::kSelectiveMlp);

  auto budget = CheckpointPolicy::parse("budget:2GiB");
  EXPECT_EQ(budget.kind(), Kind::kBudget);
  EXPECT_EQ(budget.budget_bytes(), int64_t{2} << 30);
  EXPECT_EQ(budget.name(), "budget:2GiB");
  EXPECT_EQ(
      CheckpointPolicy::budget(int64_t{2} << 30).name(), "budget:2.00GiB");
}

TEST_F(PolicyTest, SuffixesSayHowSegmentsAreCheckpointed) {
  auto plain = CheckpointPolicy::parse("every-2");
  EXPECT_FALSE(plain.checkpoint().has_value());
  EXPECT_FALSE(plain.schedule(4).checkpoint.has_value());

  auto reentrant = CheckpointPolicy::parse("every-2+reentrant");
  EXPECT_EQ(reentrant.kind(), Kind::kEvery);
  EXPECT_EQ(reentrant.every_k(), 2);
  EXPECT_EQ(reentrant.name(), "every-2+reentrant");
  ASSERT_TRUE(reentrant.checkpoint().has_value());
  EXPECT_EQ(reentrant.checkpoint()->implementation, remat::CheckpointImpl::kReentrant);
  EXPECT_EQ(reentrant.checkpoint()->determinism_check, remat::DeterminismCheck::kMetadata);
  ASSERT_TRUE(reentrant.schedule(4).checkpoint.has_value());
  EXPECT_EQ(reentrant.schedule(4).checkpoint->implementation, remat::CheckpointImpl::kReentrant);

  auto values = CheckpointPolicy::parse("budget:1GiB+values");
  EXPECT_EQ(values.kind(), Kind::kBudget);
  EXPECT_EQ(values.budget_bytes(), int64_t{1} << 30);
  EXPECT_EQ(values.name(), "budget:1GiB+values");
  EXPECT_EQ(values.checkpoint()->implementation, remat::CheckpointImpl::kSavedTensorHooks);
  EXPECT_EQ(values.checkpoint()->determinism_check, remat::DeterminismCheck::kValues);

  auto back = CheckpointPolicy::parse("sqrt").with_checkpoint(
      {remat::CheckpointImpl::kReentrant, remat::DeterminismCheck::kMetadata});
  EXPECT_EQ(back.name(), "sqrt+reentrant");
  EXPECT_EQ(CheckpointPolicy::parse(back.name()).checkpoint(), back.checkpoint());

  // A planner's schedule made a policy under the budget policy's name (as
  // bench, train and a resume do) keeps what the name says.
  auto planned = CheckpointPolicy::custom(CheckpointPolicy::every(2).schedule(4), values.name());
  ASSERT_TRUE(planned.checkpoint().has_value());
  EXPECT_EQ(planned.checkpoint()->determinism_check, remat::DeterminismCheck::kValues);
  EXPECT_EQ(planned.schedule(4).checkpoint, values.checkpoint());
  EXPECT_FALSE(CheckpointPolicy::custom(plain.schedule(4), "plan").checkpoint().has_value());

  EXPECT_THROW_WITH(
      CheckpointPolicy::parse("every-layer+reentrant+values"),
      "expected +values without +reentrant");
  EXPECT_THROW_WITH(
      CheckpointPolicy::parse("none+reentrant"),
      "expected a policy that checkpoints before '+', but got 'none+reentrant'");
  EXPECT_THROW_WITH(
      CheckpointPolicy::parse("every-x+values"),
      "expected every-K with an integer K >= 1, but got 'every-x+values'");
  EXPECT_THROW_WITH(CheckpointPolicy::parse("+values"), "but got '+values'");
}

TEST_F(PolicyTest, NamesRoundTrip) {
  for (const std::string name :
       {"none",
        "every-layer",
        "every-4",
        "sqrt",
        "full",
        "selective-attention",
        "selective-mlp",
        "budget:512MiB"}) {
    EXPECT_EQ(CheckpointPolicy::parse(name).name(), name);
  }
}

TEST_F(PolicyTest, EveryLayerScheduleForTwelveLayers) {
  auto s = CheckpointPolicy::parse("every-layer").schedule(12);
  ASSERT_EQ(s.segments.size(), 12u);
  for (int64_t i = 0; i < 12; ++i) {
    EXPECT_EQ(
        s.segments[i], (ScheduleSegment{i, i + 1, SegmentMode::kRecompute}));
  }
}

TEST_F(PolicyTest, EveryFiveScheduleKeepsTheRemainder) {
  auto s = CheckpointPolicy::parse("every-5").schedule(12);
  EXPECT_EQ(s.segments, recompute_chunks({{0, 5}, {5, 10}, {10, 12}}));
  EXPECT_EQ(s.str(), "recompute[0,5) recompute[5,10) recompute[10,12)");
}

TEST_F(PolicyTest, EveryKLargerThanStackIsOneSegment) {
  auto s = CheckpointPolicy::every(20).schedule(12);
  EXPECT_EQ(s.segments, recompute_chunks({{0, 12}}));
}

TEST_F(PolicyTest, SqrtScheduleForTwelveLayers) {
  // ceil(sqrt(12)) = 4 layers per segment.
  auto s = CheckpointPolicy::parse("sqrt").schedule(12);
  EXPECT_EQ(s.segments, recompute_chunks({{0, 4}, {4, 8}, {8, 12}}));
  // A perfect square: 16 layers -> 4 segments of 4.
  EXPECT_EQ(CheckpointPolicy::sqrt().schedule(16).segments.size(), 4u);
  EXPECT_EQ(
      CheckpointPolicy::sqrt().schedule(1).segments,
      recompute_chunks({{0, 1}}));
}

TEST_F(PolicyTest, FullNoneAndSelectiveSchedules) {
  EXPECT_EQ(
      CheckpointPolicy::parse("full").schedule(12).segments,
      recompute_chunks({{0, 12}}));
  EXPECT_EQ(
      CheckpointPolicy::parse("none").schedule(12).segments,
      (std::vector<ScheduleSegment>{{0, 12, SegmentMode::kStore}}));
  EXPECT_EQ(
      CheckpointPolicy::parse("selective-attention").schedule(12).segments,
      (std::vector<ScheduleSegment>{
          {0, 12, SegmentMode::kRecomputeAttention}}));
  EXPECT_EQ(
      CheckpointPolicy::parse("selective-mlp").schedule(12).segments,
      (std::vector<ScheduleSegment>{{0, 12, SegmentMode::kRecomputeMlp}}));
}

TEST_F(PolicyTest, BudgetNeedsAPlanner) {
  EXPECT_THROW_WITH(
      CheckpointPolicy::parse("budget:2GiB").schedule(12), "needs a planner");
}

TEST_F(PolicyTest, ZeroLayersIsRefused) {
  EXPECT_THROW_WITH(
      CheckpointPolicy::full().schedule(0), "expected at least one layer");
}

TEST_F(PolicyTest, BadNamesAreRefusedWithTheirText) {
  for (const std::string bad :
       {"every-0",
        "every-x",
        "every-",
        "every--2",
        "bogus",
        "Every-layer",
        ""}) {
    SCOPED_TRACE(bad);
    EXPECT_THROW_WITH(CheckpointPolicy::parse(bad), "but got '" + bad + "'");
  }
  EXPECT_THROW_WITH(CheckpointPolicy::parse("bogus"), "selective-attention");
  // parse_size reports the size part of "budget:abc".
  EXPECT_THROW_WITH(CheckpointPolicy::parse("budget:abc"), "'abc'");
  EXPECT_THROW_WITH(CheckpointPolicy::parse("budget:0"), "'budget:0'");
  EXPECT_THROW_WITH(CheckpointPolicy::every(0), "K >= 1, but got 0");
  EXPECT_THROW_WITH(
      CheckpointPolicy::budget(-1), "budget > 0 bytes, but got -1");
}

TEST_F(PolicyTest, ValidateRejectsGapsOverlapsAndShortCover) {
  Schedule gap{{{0, 4, SegmentMode::kStore}, {5, 12, SegmentMode::kRecompute}}};
  EXPECT_THROW_WITH(gap.validate(12), "segment [5, 12) follows layer 4");

  Schedule overlap{
      {{0, 6, SegmentMode::kStore}, {4, 12, SegmentMode::kRecompute}}};
  EXPECT_THROW_WITH(overlap.validate(12), "segment [4, 12) follows layer 6");

  Schedule empty_segment{
      {{0, 0, SegmentMode::kStore}, {0, 12, SegmentMode::kStore}}};
  EXPECT_THROW_WITH(empty_segment.validate(12), "segment [0, 0)");

  Schedule short_cover{{{0, 8, SegmentMode::kRecompute}}};
  EXPECT_THROW_WITH(short_cover.validate(12), "for 12 layers, but it covers 8");

  Schedule ok{{{0, 4, SegmentMode::kStore}, {4, 12, SegmentMode::kRecompute}}};
  EXPECT_NO_THROW(ok.validate(12));
}

TEST_F(PolicyTest, CustomScheduleIsValidatedAgainstTheStack) {
  Schedule s{{{0, 4, SegmentMode::kStore}, {4, 12, SegmentMode::kRecompute}}};
  auto policy = CheckpointPolicy::custom(s, "planned");
  EXPECT_EQ(policy.kind(), Kind::kCustom);
  EXPECT_EQ(policy.name(), "planned");
  EXPECT_EQ(policy.schedule(12).segments, s.segments);
  EXPECT_THROW_WITH(policy.schedule(10), "for 10 layers, but it covers 12");
}

} // namespace

namespace {

TEST(ScheduleText, ParsesWhatStrWrites) {
  remat::Schedule s;
  s.segments = {{0, 2, remat::SegmentMode::kStore},
                {2, 5, remat::SegmentMode::kRecompute},
                {5, 6, remat::SegmentMode::kRecomputeAttention},
                {6, 8, remat::SegmentMode::kRecomputeMlp}};
  const auto text = s.str();
  EXPECT_EQ(text, "store[0,2) recompute[2,5) recompute-attention[5,6) recompute-mlp[6,8)");
  auto back = remat::Schedule::parse(text);
  EXPECT_EQ(back.segments, s.segments);
  back.validate(8);
  EXPECT_TRUE(remat::Schedule::parse("").segments.empty());
}

TEST(ScheduleText, RefusesMalformedPiecesNamingThem) {
  for (const std::string bad :
       {"keep[0,2)", "store[0,2]", "store[a,2)", "store(0,2)", "store[0;2)", "store[0,2x)",
        "store[,2)"}) {
    EXPECT_THROW_WITH(remat::Schedule::parse("store[0,1) " + bad), "but got '" + bad + "'");
  }
}

} // namespace
