#include "remat/train/lr_schedule.h"

#include "testing.h"

#include <gtest/gtest.h>

namespace {

using remat::train::LrSchedule;
using remat::train::LrScheduleKind;
using remat::train::LrScheduleOptions;

TEST(LrSchedule, WarmsUpLinearlyWithoutAZeroFirstStep) {
  LrSchedule s(LrScheduleOptions(1e-3, 100).warmup_steps(4));
  EXPECT_DOUBLE_EQ(s.lr(0), 0.25e-3);
  EXPECT_DOUBLE_EQ(s.lr(1), 0.50e-3);
  EXPECT_DOUBLE_EQ(s.lr(3), 1e-3);
  EXPECT_DOUBLE_EQ(s.lr(4), 1e-3); // the first decay step is the peak
}

TEST(LrSchedule, LinearAndCosineReachZeroAtTheEnd) {
  for (auto kind : {LrScheduleKind::kLinear, LrScheduleKind::kCosine}) {
    LrSchedule s(LrScheduleOptions(2.0, 110).warmup_steps(10).kind(kind));
    EXPECT_DOUBLE_EQ(s.lr(10), 2.0);
    EXPECT_NEAR(s.lr(60), 1.0, 1e-12) << to_string(kind); // halfway down
    EXPECT_NEAR(s.lr(110), 0.0, 1e-12);
    EXPECT_NEAR(s.lr(500), 0.0, 1e-12);
    EXPECT_GT(s.lr(109), 0.0);
  }
  // Cosine stays higher early and lower late than linear.
  LrSchedule lin(LrScheduleOptions(1.0, 100).kind(LrScheduleKind::kLinear));
  LrSchedule cos(LrScheduleOptions(1.0, 100).kind(LrScheduleKind::kCosine));
  EXPECT_GT(cos.lr(20), lin.lr(20));
  EXPECT_LT(cos.lr(80), lin.lr(80));
}

TEST(LrSchedule, ConstantStaysAtThePeak) {
  LrSchedule s(LrScheduleOptions(0.5, 10).warmup_steps(2).kind(LrScheduleKind::kConstant));
  EXPECT_DOUBLE_EQ(s.lr(0), 0.25);
  EXPECT_DOUBLE_EQ(s.lr(9), 0.5);
}

TEST(LrSchedule, RefusesBadSettingsAndNames) {
  EXPECT_THROW_WITH(LrSchedule(LrScheduleOptions(1e-3, 0)), "total_steps >= 1");
  EXPECT_THROW_WITH(LrSchedule(LrScheduleOptions(-1, 10)), "lr >= 0");
  EXPECT_THROW_WITH(remat::train::parse_lr_schedule_kind("step"),
                    "expected a schedule constant, linear or cosine, but got 'step'");
  EXPECT_EQ(remat::train::parse_lr_schedule_kind("cosine"), LrScheduleKind::kCosine);
}

} // namespace
