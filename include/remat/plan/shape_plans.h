// Budget plans per batch shape: a bounded cache of checkpointing plans, one
// per (rows, row-length bucket), made on demand by a planner the caller
// gives (for a model: profile on a batch of that shape, then solve; see
// remat::nn::plan_checkpointing).
//
// Real data comes in batches of many shapes. A plan made once for the worst
// shape (rows x the longest row) makes every shorter batch pay its
// recomputation; a plan made for one shape and run on a longer one breaks
// the budget. ShapePlans plans each shape it meets, rounded up to a length
// bucket, and runs the batch under that plan:
//   - a batch of r rows of L tokens runs under the plan for r rows of
//     bucket(L) >= L tokens, whose predicted peak is at most the budget; a
//     step's memory grows with its rows and its length (activations with
//     r x L, attention scores with r x L x L), so the batch holds no more;
//   - a short batch gets a plan of its own, which recomputes less;
//   - a shape that no schedule fits is split: the planner is asked for
//     ceil(r / 2) rows, and so on down to one row, and the caller runs the
//     batch as micro-batches of the rows returned (the gradient of the
//     micro-batches' weighted losses is the batch's). Only a single row
//     that no schedule fits is refused.
//
// Buckets are geometric: `lengths_per_octave` lengths between each power of
// two, rounded up to a multiple of 8, at least `min_length`, at most
// `max_length` (which is always one). With 4 per octave a plan is made for
// at most 1.19x (+ 8 tokens) the batch's length, and lengths 16 to 2,048
// make 27 buckets. The cache keeps the `capacity` plans used most recently;
// the least recently used is dropped, and made again if its shape returns.
//
// Planning costs a profile of the shape (a trainer's: about a forward and
// backward per stage and mode), often more than a step. So a new shape is
// planned at once only while planning has taken at most `plan_share` of the
// time so far: planning's seconds plus the seconds the batches ran (told
// by ran()). Past that share it runs under the smallest kept plan that
// covers it: made for micro-batches of at least its rows (so it is split
// no more than its own plan would split it, and its gradients are the same
// bit for bit), for at least its length, and for accumulated gradients if
// it holds them. That plan's peak bounds the batch's as above, so the
// budget still holds; the batch only
// recomputes more than its own plan would, and its shape is planned when
// it comes again within the share. A shape no kept plan covers is planned
// whatever the share: planning then costs at most `plan_share` of the run,
// plus the shapes nothing covered.
//
// Example:
//   // given: remat::nn::Llama model(remat::nn::LlamaOptions().num_layers(8));
//   remat::plan::ShapePlans plans(
//       [&](const remat::plan::BatchShape& s) {
//         auto ids = torch::zeros({s.rows, s.tokens}, torch::kLong);
//         return remat::nn::plan_checkpointing(model,
//             remat::nn::LlamaStep(ids), int64_t(3) << 30);  // 3 GiB
//       },
//       remat::plan::ShapePlansOptions(2048));
//   const auto& p = plans.get({4, 700});  // planned for 4 x 720 tokens
//   // ... run the batch, then:  plans.ran(step_seconds);
//   model->gradient_checkpointing_enable(
//       remat::CheckpointPolicy::custom(p.plan.schedule, "budget:3GiB"));
//   // run micro-batches of p.shape.rows rows
#pragma once

#include "remat/plan/solver.h"

#include <torch/arg.h>

#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <string>
#include <utility>

namespace remat {
namespace plan {

/// A batch's shape: `rows` rows of `tokens` tokens each (padded).
struct BatchShape {
  int64_t rows = 0;
  int64_t tokens = 0;
  /// Planned for a micro-batch after the first of a step: the gradients of
  /// the earlier ones are held through it (the planner reserves them).
  bool accumulating = false;

  /// "4x512", or "4x512+grads" when accumulating.
  std::string str() const;
  bool operator<(const BatchShape& o) const;
  bool operator==(const BatchShape& o) const {
    return rows == o.rows && tokens == o.tokens && accumulating == o.accumulating;
  }
};

/// Options of ShapePlans; sizes in tokens.
struct ShapePlansOptions {
  /// The longest row (a trainer's seq): the last bucket.
  explicit ShapePlansOptions(int64_t max_length) : max_length_(max_length) {}
  TORCH_ARG(int64_t, max_length);
  TORCH_ARG(int64_t, min_length) = 16;
  TORCH_ARG(int64_t, lengths_per_octave) = 4;
  /// Plans kept (at least 1).
  TORCH_ARG(int64_t, capacity) = 32;
  /// The share of the time so far (planning + ran()'s seconds), in [0, 1],
  /// past which a new shape that a kept plan covers runs under that plan,
  /// unplanned. 0: only shapes nothing covers are planned; 1: every shape.
  TORCH_ARG(double, plan_share) = 0.1;
};

/// The plan a shape runs under.
struct ShapePlan {
  /// What was planned: the rows of each micro-batch to run (the shape's, or
  /// fewer when split) and the bucket's length.
  BatchShape shape;
  Plan plan;
  double plan_seconds = 0; ///< seconds spent planning it (splits included)
};

/// What a ShapePlans has done.
struct ShapePlansStats {
  int64_t plans = 0;     ///< plans made (a split's refused tries excluded)
  int64_t hits = 0;      ///< get() answered from the cache
  int64_t evicted = 0;   ///< plans dropped for capacity
  int64_t splits = 0;    ///< shapes planned as smaller micro-batches
  int64_t covered = 0;   ///< get() answered by a larger shape's plan
  double seconds = 0;    ///< seconds spent planning, in all
  double run_seconds = 0; ///< seconds batches ran, as ran() was told
};

class ShapePlans {
 public:
  /// Plans `shape` (shape.rows rows of shape.tokens tokens) to the budget,
  /// or throws c10::Error when no schedule fits it.
  using Planner = std::function<Plan(const BatchShape& shape)>;

  /// Throws c10::Error for a planner that is null or options out of range.
  ShapePlans(Planner planner, ShapePlansOptions options);

  /// The bucket of a row of `tokens` tokens: the smallest bucket length >=
  /// tokens (tokens in [1, max_length]; throws c10::Error outside).
  int64_t bucket(int64_t tokens) const;

  /// The plan for a micro-batch of `shape`: from the cache; else, when
  /// planning is over its share, the smallest kept plan that covers it
  /// (see above; its `shape` is the one it was planned for); else planned
  /// for {rows, bucket(tokens)} and kept. Throws c10::Error, as the
  /// planner's refusal of one row, when not even a single row fits.
  const ShapePlan& get(const BatchShape& shape);

  /// Counts `seconds` (>= 0) that batches ran under these plans: planning
  /// may take plan_share of them and itself.
  void ran(double seconds);

  const ShapePlansStats& stats() const {
    return stats_;
  }
  int64_t size() const {
    return static_cast<int64_t>(entries_.size());
  }
  const ShapePlansOptions& options() const {
    return options_;
  }

 private:
  Planner planner_;
  ShapePlansOptions options_;
  ShapePlansStats stats_;
  /// Most recently used first; the map points into it by bucketed shape.
  std::list<std::pair<BatchShape, ShapePlan>> entries_;
  std::map<BatchShape, std::list<std::pair<BatchShape, ShapePlan>>::iterator> index_;

  /// The smallest kept plan that covers `shape`; entries_.end() if none.
  std::list<std::pair<BatchShape, ShapePlan>>::iterator cover(const BatchShape& shape);
};

} // namespace plan
} // namespace remat
