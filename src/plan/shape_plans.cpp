#include "remat/plan/shape_plans.h"

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <chrono>
#include <cmath>
#include <tuple>

namespace remat {
namespace plan {

std::string BatchShape::str() const {
  return c10::str(rows, "x", tokens, accumulating ? "+grads" : "");
}

bool BatchShape::operator<(const BatchShape& o) const {
  return std::tie(rows, tokens, accumulating) < std::tie(o.rows, o.tokens, o.accumulating);
}

ShapePlans::ShapePlans(Planner planner, ShapePlansOptions options)
    : planner_(std::move(planner)), options_(options) {
  TORCH_CHECK(planner_, "ShapePlans: expected a planner, but got null");
  TORCH_CHECK(
      options_.max_length() >= 1, "ShapePlans: expected max_length >= 1 token, but got ",
      options_.max_length());
  TORCH_CHECK(
      options_.min_length() >= 1, "ShapePlans: expected min_length >= 1 token, but got ",
      options_.min_length());
  TORCH_CHECK(
      options_.lengths_per_octave() >= 1 && options_.lengths_per_octave() <= 64,
      "ShapePlans: expected lengths_per_octave in [1, 64], but got ",
      options_.lengths_per_octave());
  TORCH_CHECK(
      options_.capacity() >= 1, "ShapePlans: expected capacity >= 1 plan, but got ",
      options_.capacity());
  TORCH_CHECK(
      options_.plan_share() >= 0 && options_.plan_share() <= 1,
      "ShapePlans: expected a plan_share in [0, 1], but got ", options_.plan_share());
}

void ShapePlans::ran(double seconds) {
  TORCH_CHECK(std::isfinite(seconds) && seconds >= 0,
              "ShapePlans::ran: expected seconds >= 0, but got ", seconds);
  stats_.run_seconds += seconds;
}

// A plan for micro-batches of R rows of L tokens (accumulating or not)
// bounds the peak of r <= R rows of l <= L tokens (accumulating only if it
// was): the smallest such by R x L, the most recent of equals. Only a plan
// that runs all r rows in one micro-batch: the shape's own plan would not
// split them either (they fit), so the batch's micro-batches, and its
// gradients bit for bit, are what its own plan would give.
std::list<std::pair<BatchShape, ShapePlan>>::iterator ShapePlans::cover(const BatchShape& shape) {
  auto best = entries_.end();
  for (auto it = entries_.begin(); it != entries_.end(); ++it) {
    const BatchShape& k = it->second.shape; // as planned: split rows
    if (k.rows >= shape.rows && k.tokens >= shape.tokens &&
        (k.accumulating || !shape.accumulating) &&
        (best == entries_.end() ||
         k.rows * k.tokens < best->second.shape.rows * best->second.shape.tokens)) {
      best = it;
    }
  }
  return best;
}

int64_t ShapePlans::bucket(int64_t tokens) const {
  const int64_t max = options_.max_length();
  TORCH_CHECK(
      tokens >= 1 && tokens <= max, "ShapePlans: expected a row of 1 to ", max,
      " tokens, but got ", tokens);
  const int64_t target = std::max(tokens, options_.min_length());
  if (target >= max) {
    return max;
  }
  // The grid: 2^k * 2^(j / n), rounded up to a multiple of 8.
  const int64_t n = options_.lengths_per_octave();
  for (double base = 1;; base *= 2) {
    for (int64_t j = 0; j < n; ++j) {
      const double length = base * std::pow(2.0, static_cast<double>(j) / static_cast<double>(n));
      const int64_t v = (static_cast<int64_t>(std::ceil(length - 1e-9)) + 7) / 8 * 8;
      if (v >= target) {
        return std::min(v, max);
      }
    }
  }
}

const ShapePlan& ShapePlans::get(const BatchShape& shape) {
  TORCH_CHECK(shape.rows >= 1, "ShapePlans: expected a batch of at least one row, but got ",
              shape.rows);
  BatchShape key = shape;
  key.tokens = bucket(shape.tokens);
  auto found = index_.find(key);
  if (found != index_.end()) {
    ++stats_.hits;
    entries_.splice(entries_.begin(), entries_, found->second); // most recent
    return entries_.front().second;
  }
  if (stats_.seconds > options_.plan_share() * (stats_.seconds + stats_.run_seconds)) {
    const auto covering = cover(key);
    if (covering != entries_.end()) {
      ++stats_.covered;
      entries_.splice(entries_.begin(), entries_, covering);
      return entries_.front().second;
    }
  }

  // Plan it, halving the rows until a schedule fits; one row that does not
  // fit is the planner's refusal.
  const auto t0 = std::chrono::steady_clock::now();
  ShapePlan made;
  made.shape = key;
  for (;;) {
    try {
      made.plan = planner_(made.shape);
      ++stats_.plans;
      break;
    } catch (const c10::Error&) {
      if (made.shape.rows == 1) {
        stats_.seconds +=
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        throw;
      }
      made.shape.rows = (made.shape.rows + 1) / 2;
    }
  }
  if (made.shape.rows < key.rows) {
    ++stats_.splits;
  }
  made.plan_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  stats_.seconds += made.plan_seconds;

  if (static_cast<int64_t>(entries_.size()) >= options_.capacity()) {
    index_.erase(entries_.back().first);
    entries_.pop_back();
    ++stats_.evicted;
  }
  entries_.emplace_front(key, std::move(made));
  index_[key] = entries_.begin();
  return entries_.front().second;
}

} // namespace plan
} // namespace remat
