// remat::plan::ShapePlans with a planner of our own: the length buckets, the
// cache and its bound, the split of a shape no schedule fits, and the
// larger plans a new shape runs under while planning is over its share.
#include "remat/plan/shape_plans.h"

#include "testing.h"

#include <gtest/gtest.h>

#include <chrono>
#include <set>
#include <thread>
#include <vector>

namespace {

using remat::plan::BatchShape;
using remat::plan::Plan;
using remat::plan::ShapePlans;
using remat::plan::ShapePlansOptions;

// A planner whose predicted peak is rows x tokens bytes, refusing a shape
// above `limit`; it counts its calls.
struct FakePlanner {
  int64_t limit = 1 << 30;
  std::chrono::milliseconds cost{0}; ///< each call sleeps this long
  std::vector<BatchShape> calls;

  ShapePlans::Planner fn() {
    return [this](const BatchShape& s) {
      calls.push_back(s);
      std::this_thread::sleep_for(cost);
      TORCH_CHECK(s.rows * s.tokens <= limit, "expected a memory budget of at least ",
                  s.rows * s.tokens, " bytes");
      Plan p;
      p.peak_bytes = s.rows * s.tokens;
      return p;
    };
  }
};

TEST(ShapePlans, BucketsCoverEveryLengthWithinAFifthAndEightTokens) {
  FakePlanner f;
  ShapePlans plans(f.fn(), ShapePlansOptions(2048));
  std::set<int64_t> buckets;
  int64_t last = 0;
  for (int64_t tokens = 1; tokens <= 2048; ++tokens) {
    const int64_t b = plans.bucket(tokens);
    EXPECT_GE(b, tokens);
    EXPECT_GE(b, last) << "buckets grow with the length";
    EXPECT_LE(b, std::max<int64_t>(16, static_cast<int64_t>(tokens * 1.19) + 8)) << tokens;
    EXPECT_EQ(b % 8, 0) << b;
    buckets.insert(b);
    last = b;
  }
  EXPECT_EQ(plans.bucket(2048), 2048);
  EXPECT_EQ(plans.bucket(1), 16);
  // 16 .. 2048 at 4 per octave, fewer where rounding to 8 merges them:
  // 16, 24, 32, 40, 48, 56, 64, 80, ..., 1728, 2048.
  EXPECT_EQ(buckets.size(), 27u);
  // A last bucket that is not on the grid: the longest row itself.
  ShapePlans odd(f.fn(), ShapePlansOptions(1000));
  EXPECT_EQ(odd.bucket(999), 1000);
  EXPECT_THROW_WITH(odd.bucket(1001), "expected a row of 1 to 1000 tokens, but got 1001");
  EXPECT_THROW_WITH(odd.bucket(0), "but got 0");
}

TEST(ShapePlans, PlansEachBucketOnceAndKeepsTheMostRecent) {
  FakePlanner f;
  ShapePlans plans(f.fn(), ShapePlansOptions(512).capacity(2).plan_share(1));
  const auto& a = plans.get({4, 100});
  EXPECT_EQ(a.shape.rows, 4);
  EXPECT_EQ(a.shape.tokens, plans.bucket(100));
  EXPECT_EQ(a.plan.peak_bytes, 4 * plans.bucket(100));
  plans.get({4, plans.bucket(100)}); // the same bucket
  EXPECT_EQ(f.calls.size(), 1u);
  EXPECT_EQ(plans.stats().hits, 1);
  plans.get({4, 100, /*accumulating=*/true}); // another key
  plans.get({2, 100});                        // a third: the oldest goes
  EXPECT_EQ(f.calls.size(), 3u);
  EXPECT_EQ(plans.size(), 2);
  EXPECT_EQ(plans.stats().evicted, 1);
  plans.get({4, 100}); // planned again
  EXPECT_EQ(f.calls.size(), 4u);
  EXPECT_EQ(plans.stats().plans, 4);
  EXPECT_GE(plans.stats().seconds, 0.0);
}

TEST(ShapePlans, SplitsAShapeNoScheduleFitsDownToOneRow) {
  FakePlanner f;
  f.limit = 3 * 512;
  ShapePlans plans(f.fn(), ShapePlansOptions(512).plan_share(1));
  const auto& p = plans.get({7, 512});
  // 7 rows refused, then 4, then 2 fits.
  EXPECT_EQ(p.shape.rows, 2);
  EXPECT_EQ(p.plan.peak_bytes, 2 * 512);
  EXPECT_EQ(f.calls.size(), 3u);
  EXPECT_EQ(plans.stats().splits, 1);
  EXPECT_EQ(plans.stats().plans, 1);
  EXPECT_EQ(plans.get({7, 500}).shape.rows, 2); // cached by its bucket
  EXPECT_EQ(f.calls.size(), 3u);

  f.limit = 10;
  ShapePlans none_fit(f.fn(), ShapePlansOptions(512));
  EXPECT_THROW_WITH(none_fit.get({2, 64}), "expected a memory budget of at least 64 bytes");
  EXPECT_EQ(none_fit.size(), 0);
}

// Past its share of the time, a new shape runs under the smallest kept plan
// made for at least its rows and length (and for held gradients if it holds
// them); a shape nothing covers is planned whatever the share.
TEST(ShapePlans, PastItsShareANewShapeRunsUnderTheSmallestCoveringPlan) {
  FakePlanner f;
  ShapePlans plans(f.fn(), ShapePlansOptions(512).plan_share(0));
  EXPECT_EQ(plans.get({4, 512}).shape.str(), "4x512"); // nothing covers it
  EXPECT_EQ(plans.get({2, 100}).shape.str(), "4x512");
  EXPECT_EQ(f.calls.size(), 1u);
  EXPECT_EQ(plans.stats().covered, 1);
  // Held gradients: only a plan that reserved them covers it.
  EXPECT_EQ(plans.get({2, 100, true}).shape.str(), "2x112+grads");
  EXPECT_EQ(f.calls.size(), 2u);
  // The smaller of the two that cover it, though it reserved gradients.
  EXPECT_EQ(plans.get({1, 50}).shape.str(), "2x112+grads");
  // More rows than any plan: planned.
  EXPECT_EQ(plans.get({8, 64}).shape.str(), "8x64");
  EXPECT_EQ(f.calls.size(), 3u);
  EXPECT_EQ(plans.stats().covered, 2);
  EXPECT_EQ(plans.stats().plans, 3);
  // A plan split to fewer rows covers no more rows than it runs at once:
  // 8 x 512 runs as micro-batches of 2, so 5 x 500 is planned itself.
  f.limit = 2 * 512;
  EXPECT_EQ(plans.get({8, 512}).shape.str(), "2x512");
  EXPECT_EQ(plans.get({5, 500}).shape.str(), "2x512");
  EXPECT_EQ(plans.stats().plans, 5);
  EXPECT_EQ(plans.stats().covered, 2);
  EXPECT_EQ(plans.get({2, 500}).shape.str(), "2x512"); // covered by either
  EXPECT_EQ(plans.stats().covered, 3);

  // A share of 0.1 with 20 ms a plan: before any run time a covered shape
  // waits; after 10 s of batches it is planned when it comes again.
  FakePlanner slow;
  slow.cost = std::chrono::milliseconds(20);
  ShapePlans shared(slow.fn(), ShapePlansOptions(512).plan_share(0.1));
  shared.get({4, 512});
  EXPECT_EQ(shared.get({2, 100}).shape.str(), "4x512");
  shared.ran(10.0);
  EXPECT_EQ(shared.get({2, 100}).shape.str(), "2x112");
  EXPECT_EQ(slow.calls.size(), 2u);
  EXPECT_EQ(shared.stats().covered, 1);
  EXPECT_DOUBLE_EQ(shared.stats().run_seconds, 10.0);
  EXPECT_GE(shared.stats().seconds, 0.04);
}

TEST(ShapePlans, RefusesBadOptions) {
  FakePlanner f;
  EXPECT_THROW_WITH(ShapePlans(nullptr, ShapePlansOptions(8)), "expected a planner");
  EXPECT_THROW_WITH(ShapePlans(f.fn(), ShapePlansOptions(0)),
                    "expected max_length >= 1 token, but got 0");
  EXPECT_THROW_WITH(ShapePlans(f.fn(), ShapePlansOptions(8).capacity(0)),
                    "expected capacity >= 1 plan, but got 0");
  EXPECT_THROW_WITH(ShapePlans(f.fn(), ShapePlansOptions(8).lengths_per_octave(0)),
                    "expected lengths_per_octave in [1, 64], but got 0");
  EXPECT_THROW_WITH(ShapePlans(f.fn(), ShapePlansOptions(8).plan_share(1.5)),
                    "expected a plan_share in [0, 1], but got 1.5");
  ShapePlans plans(f.fn(), ShapePlansOptions(8));
  EXPECT_THROW_WITH(plans.ran(-1), "expected seconds >= 0, but got -1");
  EXPECT_THROW_WITH(plans.get({0, 8}), "expected a batch of at least one row, but got 0");
  EXPECT_EQ(BatchShape({2, 64, true}).str(), "2x64+grads");
}

} // namespace
