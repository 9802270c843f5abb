#include "remat/plan/solver.h"

#include "remat/memory.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdio>
#include <limits>
#include <sstream>

namespace remat {
namespace plan {
namespace {

// One unit of execution: a stage run normally in `mode`, or a checkpointed
// group of layer stages [begin, end). Stage indices, not layer indices.
struct Unit {
  int64_t begin = 0;
  int64_t end = 0;
  SegmentMode mode = SegmentMode::kStore; // kRecompute: a group
};

bool is_group(const Unit& u) {
  return u.mode == SegmentMode::kRecompute;
}

// A stage's figures in one of its per-layer modes.
struct ModeCost {
  int64_t stored = 0;
  int64_t forward_transient = 0;
  int64_t backward_transient = 0;
  double seconds = 0;
};

ModeCost mode_cost(const Chain& chain, int64_t i, SegmentMode mode) {
  const auto& s = chain.stages[i];
  const double t = s.forward_seconds() + s.backward_seconds();
  if (mode == SegmentMode::kStore) {
    return {s.stored_bytes(), s.forward_transient_bytes(), s.backward_transient_bytes(), t};
  }
  auto sel = s.selective(mode);
  TORCH_CHECK(
      sel.has_value(), "remat::plan: expected stage ", i, " ('", s.name(),
      "') to offer ", to_string(mode), ", but the chain has no cost for it");
  return {sel->stored_bytes(), sel->forward_transient_bytes(),
          sel->backward_transient_bytes(), t + sel->recompute_seconds()};
}

// Bytes of stage i's backward temporaries inside a checkpointed group,
// including its own parameters' gradients (returned, not accumulated).
int64_t group_backward(const Chain& chain, int64_t i) {
  const auto& s = chain.stages[i];
  return s.group_backward_transient_bytes().value_or(
      s.backward_transient_bytes() + s.parameter_gradient_bytes());
}

// Bytes of the gradient that stage i's backward produces for its input; the
// first stage's input (token ids) takes none.
int64_t input_grad(const Chain& chain, int64_t i) {
  return i == 0 ? 0 : chain.stages[i - 1].output_bytes();
}

// later[e] = bytes of the parameter gradients of stages e.. (the ones whose
// backward has run before stage e - 1's) where a step starts without
// gradients (GradientReset::kNone), 0 where base_bytes holds them all.
std::vector<int64_t> later_gradients(const Chain& chain) {
  const size_t n = chain.stages.size();
  std::vector<int64_t> later(n + 1, 0);
  if (chain.gradients == GradientReset::kNone) {
    for (size_t i = n; i-- > 0;) {
      later[i] = later[i + 1] + chain.stages[i].parameter_gradient_bytes();
    }
  }
  return later;
}

std::vector<Unit> units_of(const Chain& chain, const Schedule& schedule) {
  const int64_t first = chain.first_layer();
  const int64_t layers = chain.num_layers();
  schedule.validate(layers);
  std::vector<Unit> units;
  for (int64_t i = 0; i < first; ++i) {
    units.push_back({i, i + 1, SegmentMode::kStore});
  }
  for (const auto& seg : schedule.segments) {
    if (seg.mode == SegmentMode::kRecompute) {
      units.push_back({first + seg.begin, first + seg.end, SegmentMode::kRecompute});
      continue;
    }
    for (int64_t l = seg.begin; l < seg.end; ++l) {
      mode_cost(chain, first + l, seg.mode); // checks the mode is offered
      units.push_back({first + l, first + l + 1, seg.mode});
    }
  }
  for (int64_t i = first + layers; i < static_cast<int64_t>(chain.stages.size()); ++i) {
    units.push_back({i, i + 1, SegmentMode::kStore});
  }
  return units;
}

Schedule schedule_of(const Chain& chain, const std::vector<Unit>& units) {
  const int64_t first = chain.first_layer();
  Schedule schedule;
  for (const auto& u : units) {
    if (chain.stages[u.begin].kind() != StageKind::kLayer) {
      continue;
    }
    auto& segs = schedule.segments;
    const int64_t b = u.begin - first;
    const int64_t e = u.end - first;
    if (!is_group(u) && !segs.empty() && segs.back().mode == u.mode &&
        segs.back().end == b) {
      segs.back().end = e;
    } else {
      segs.push_back({b, e, u.mode});
    }
  }
  return schedule;
}

// ---------------------------------------------------------------------------
// The evaluator: walks the step event by event, as remat runs it. It shares no
// code with the planner's per-unit costs below, so tests comparing the two
// check the planner's decomposition.

// The evaluator's state as it walks a step: bytes held now, the peak so far
// and where it came, and the seconds spent.
struct Walk {
  explicit Walk(const Chain& c)
      : chain(c),
        keep_grads(c.gradients == GradientReset::kNone),
        held(c.base_bytes),
        peak(held) {}

  // Records `bytes` as the peak if it is one, naming the event: `what` of
  // stage `stage`, inside checkpointed `group` when not null.
  void bump(
      int64_t bytes,
      const char* what,
      int64_t stage,
      const Unit* group) {
    const auto& st = chain.stages;
    if (bytes > peak) {
      peak = bytes;
      std::ostringstream s;
      s << what << " " << st[stage].name();
      if (group) {
        s << " (checkpointed " << st[group->begin].name();
        if (group->end - group->begin > 1) {
          s << ".." << st[group->end - 1].name();
        }
        s << ")";
      }
      where = s.str();
    }
  }

  const Chain& chain;
  // kNone: gradients stay held from their stage's backward on.
  const bool keep_grads;
  int64_t held;
  int64_t peak;
  std::string where = "start";
  double seconds = 0;
};

// Forward of a stage run normally: it keeps what its mode stores.
void forward_stage(Walk& w, const Unit& u) {
  const int64_t i = u.begin;
  const auto m = mode_cost(w.chain, i, u.mode);
  w.bump(w.held + m.stored + m.forward_transient, "forward of", i, nullptr);
  w.held += m.stored;
  w.seconds += m.seconds;
}

// Forward of a checkpointed group: its layers run without saving anything,
// and only its output and checkpoint_bytes stay held.
void forward_group(Walk& w, const Unit& u) {
  const auto& st = w.chain.stages;
  const int64_t kept = w.chain.checkpoint_bytes; // from here to its backward
  for (int64_t i = u.begin; i < u.end; ++i) {
    const int64_t in = i > u.begin ? st[i - 1].output_bytes() : 0;
    w.bump(
        w.held + kept + in + st[i].output_bytes() +
            st[i].nograd_transient_bytes(),
        "forward of", i, &u);
    w.seconds += 2 * st[i].forward_seconds() + st[i].backward_seconds();
  }
  w.held += st[u.end - 1].output_bytes() + kept;
}

// Backward of a stage run normally: frees what it stored and its output's
// gradient, and leaves its input's gradient.
void backward_stage(Walk& w, const Unit& u) {
  const auto& st = w.chain.stages;
  const int64_t i = u.begin;
  const auto m = mode_cost(w.chain, i, u.mode);
  w.bump(
      w.held + input_grad(w.chain, i) + m.backward_transient, "backward of", i,
      nullptr);
  w.held += input_grad(w.chain, i) - m.stored - st[i].output_bytes();
  if (w.keep_grads) {
    w.held += st[i].parameter_gradient_bytes();
    w.bump(w.held, "end of backward of", i, nullptr);
  }
}

// Backward of a checkpointed group: recomputes its layers' forward, then runs
// their backward last to first.
void backward_group(Walk& w, const Unit& u) {
  const auto& st = w.chain.stages;
  const int64_t last_out = st[u.end - 1].output_bytes();
  w.held -= last_out; // the output from forward; its gradient stays held
  int64_t acc = 0;
  for (int64_t i = u.begin; i < u.end; ++i) {
    w.bump(
        w.held + acc + st[i].stored_bytes() + st[i].forward_transient_bytes(),
        "recompute of", i, &u);
    acc += st[i].stored_bytes();
  }
  w.held += acc;
  int64_t param_grads = 0; // of the layers after i, done already
  for (int64_t i = u.end - 1; i >= u.begin; --i) {
    // Below the last layer: that layer's gradient, and the recomputed output
    // that remat's checkpoint holds until it returns; and the parameter
    // gradients of the layers done so far, returned all at once.
    const int64_t inner = i < u.end - 1 ? st[i].output_bytes() + last_out : 0;
    w.bump(
        w.held + inner + param_grads + input_grad(w.chain, i) +
            group_backward(w.chain, i),
        "backward of", i, &u);
    param_grads += st[i].parameter_gradient_bytes();
    w.held -= st[i].stored_bytes();
  }
  w.bump(w.held + last_out + param_grads + input_grad(w.chain, u.begin),
         "end of backward of", u.begin, &u);
  w.held +=
      input_grad(w.chain, u.begin) - last_out - w.chain.checkpoint_bytes;
  if (w.keep_grads) {
    w.held += param_grads; // taken into `.grad`, not added and freed
  }
}

Evaluation simulate(const Chain& chain, const std::vector<Unit>& units) {
  Walk w(chain);
  for (const auto& u : units) {
    if (is_group(u)) {
      forward_group(w, u);
    } else {
      forward_stage(w, u);
    }
  }
  const int64_t activations = w.held - chain.base_bytes;

  w.held += chain.stages.back().output_bytes(); // the loss gradient
  for (auto it = units.rbegin(); it != units.rend(); ++it) {
    if (is_group(*it)) {
      backward_group(w, *it);
    } else {
      backward_stage(w, *it);
    }
  }
  const int64_t end = chain.base_bytes + later_gradients(chain)[0];
  TORCH_INTERNAL_ASSERT(
      w.held == end, "remat::plan: memory walk ended at ", w.held,
      " bytes, expected ", end);
  return {w.peak, w.seconds, activations, w.where};
}

// ---------------------------------------------------------------------------
// The planner. A unit u started with `P` bytes held before it in forward
// reaches at most P + need(u) during the whole step (forward and backward,
// since in backward it runs with everything before it still held), and
// leaves P + held(u) for the units after it. So a schedule's peak is
// base + max_u (sum of held(v) for v before u + need(u)), and over suffixes
//   need(u then rest) = max(need(u), held(u) + need(rest)).
// Where gradients start as none, u's backward also holds the gradients of
// the stages after it, which depend only on where u ends: need(u) =
// max(forward need, backward need + later_gradients[end of u]).

struct UnitCost {
  int64_t held = 0;          // bytes the unit keeps from its forward to its backward
  int64_t need_forward = 0;  // bytes above what is held before it, at its worst in forward
  int64_t need_backward = 0; // the same in backward, without later stages' gradients
  double seconds = 0;
};

UnitCost stage_unit(const Chain& chain, int64_t i, SegmentMode mode) {
  const auto m = mode_cost(chain, i, mode);
  UnitCost c;
  c.held = m.stored;
  c.need_forward = m.stored + m.forward_transient;
  c.need_backward =
      m.stored + chain.stages[i].output_bytes() + input_grad(chain, i) + m.backward_transient;
  c.seconds = m.seconds;
  return c;
}

UnitCost group_unit(const Chain& chain, int64_t a, int64_t b) {
  const auto& st = chain.stages;
  UnitCost c;
  const int64_t last_out = st[b - 1].output_bytes();
  // Everything below is on top of the group's checkpoint_bytes, held from
  // its first forward to the end of its backward.
  const int64_t kept = chain.checkpoint_bytes;
  c.held = last_out + kept;
  int64_t acc = 0;
  for (int64_t i = a; i < b; ++i) {
    const int64_t in = i > a ? st[i - 1].output_bytes() : 0;
    c.need_forward = std::max(
        c.need_forward, in + st[i].output_bytes() + st[i].nograd_transient_bytes());
    // Recompute: the incoming gradient, the layers recomputed so far.
    c.need_backward = std::max(
        c.need_backward,
        last_out + acc + st[i].stored_bytes() + st[i].forward_transient_bytes());
    acc += st[i].stored_bytes();
    c.seconds += 2 * st[i].forward_seconds() + st[i].backward_seconds();
  }
  int64_t param_grads = 0;
  for (int64_t i = b - 1; i >= a; --i) {
    const int64_t inner = i < b - 1 ? st[i].output_bytes() + last_out : 0;
    c.need_backward = std::max(
        c.need_backward,
        last_out + acc + inner + param_grads + input_grad(chain, i) +
            group_backward(chain, i));
    param_grads += st[i].parameter_gradient_bytes();
    acc -= st[i].stored_bytes();
  }
  // The group's return (x_{b-1} + x_{a-1} + parameter gradients) is below
  // layer a's backward, which holds at least as much; no need to check it.
  c.need_forward += kept;
  c.need_backward += kept;
  return c;
}

int64_t round_up(int64_t bytes, int64_t resolution) {
  if (resolution <= 1) {
    return bytes;
  }
  return (bytes + resolution - 1) / resolution * resolution;
}

// A unit as the programme sees it: what it keeps, and its need with the
// later stages' gradients counted.
struct ChoiceCost {
  int64_t held = 0;
  int64_t need = 0;
  double seconds = 0;
};

// The units that may start at stage i, with their costs.
struct Choice {
  Unit unit;
  ChoiceCost cost;
};

std::vector<std::vector<Choice>> choices(const Chain& chain, const PlannerOptions& o) {
  const int64_t n = static_cast<int64_t>(chain.stages.size());
  const auto later = later_gradients(chain);
  std::vector<std::vector<Choice>> out(n);
  for (int64_t i = 0; i < n; ++i) {
    auto add = [&](Unit u, const UnitCost& c) {
      const int64_t need = std::max(c.need_forward, c.need_backward + later[u.end]);
      out[i].push_back({u,
                        {round_up(c.held, o.memory_resolution_bytes()),
                         round_up(need, o.memory_resolution_bytes()), c.seconds}});
    };
    add({i, i + 1, SegmentMode::kStore}, stage_unit(chain, i, SegmentMode::kStore));
    if (chain.stages[i].kind() != StageKind::kLayer) {
      continue;
    }
    if (o.selective()) {
      for (auto m : partial_modes()) {
        if (chain.stages[i].selective(m)) {
          add({i, i + 1, m}, stage_unit(chain, i, m));
        }
      }
    }
    if (o.recompute()) {
      for (int64_t e = i + 1; e <= n && chain.stages[e - 1].kind() == StageKind::kLayer; ++e) {
        add({i, e, SegmentMode::kRecompute}, group_unit(chain, i, e));
      }
    }
  }
  return out;
}

struct Point {
  int64_t need = 0;
  double seconds = 0;
  int32_t choice = -1; // index into choices[stage]
  int32_t next = -1;   // index into the front of the unit's end stage
};

// Pareto fronts of (need, seconds) over the suffixes of the chain, keeping
// only needs <= cap. fronts[i] is sorted by need ascending, seconds
// descending.
std::vector<std::vector<Point>> fronts(
    const std::vector<std::vector<Choice>>& ch,
    int64_t cap) {
  const int64_t n = static_cast<int64_t>(ch.size());
  std::vector<std::vector<Point>> f(n + 1);
  f[n].push_back({0, 0.0, -1, -1});
  std::vector<Point> cand;
  for (int64_t i = n - 1; i >= 0; --i) {
    cand.clear();
    for (size_t c = 0; c < ch[i].size(); ++c) {
      const auto& [unit, cost] = ch[i][c];
      if (cost.need > cap) {
        continue;
      }
      const auto& rest = f[unit.end];
      // Where held + rest.need <= need(u), the unit's own need decides and
      // the fastest such rest (the last of them) dominates the others.
      size_t j0 = 0;
      while (j0 + 1 < rest.size() && cost.held + rest[j0 + 1].need <= cost.need) {
        ++j0;
      }
      for (size_t j = j0; j < rest.size(); ++j) {
        const int64_t need = std::max(cost.need, cost.held + rest[j].need);
        if (need > cap) {
          break; // rest is sorted by need
        }
        cand.push_back({need, cost.seconds + rest[j].seconds,
                        static_cast<int32_t>(c), static_cast<int32_t>(j)});
      }
    }
    std::sort(cand.begin(), cand.end(), [](const Point& a, const Point& b) {
      return a.need != b.need ? a.need < b.need : a.seconds < b.seconds;
    });
    double best = 0;
    for (const auto& p : cand) {
      // Sums of the same times in another order differ in the last bits;
      // such near-ties are not worth a point on the front.
      if (f[i].empty() || p.seconds < best - 1e-12 * std::max(1.0, best)) {
        f[i].push_back(p);
        best = p.seconds;
      }
    }
  }
  return f;
}

std::vector<Unit> units_from(
    const std::vector<std::vector<Choice>>& ch,
    const std::vector<std::vector<Point>>& f,
    size_t index) {
  std::vector<Unit> units;
  int64_t stage = 0;
  const int64_t n = static_cast<int64_t>(ch.size());
  while (stage < n) {
    const auto& p = f[stage][index];
    const auto& unit = ch[stage][p.choice].unit;
    units.push_back(unit);
    stage = unit.end;
    index = static_cast<size_t>(p.next);
  }
  return units;
}

Plan plan_of(const Chain& chain, const std::vector<Unit>& units) {
  Plan plan;
  plan.schedule = schedule_of(chain, units);
  plan.stage_modes.assign(chain.stages.size(), SegmentMode::kStore);
  for (const auto& u : units) {
    for (int64_t i = u.begin; i < u.end; ++i) {
      plan.stage_modes[i] = u.mode;
    }
  }
  auto ev = simulate(chain, units);
  plan.peak_bytes = ev.peak_bytes;
  plan.step_seconds = ev.step_seconds;
  plan.activation_bytes = ev.activation_bytes;
  return plan;
}

void check_options(const PlannerOptions& o) {
  TORCH_CHECK(
      o.memory_resolution_bytes() >= 0,
      "remat::plan: expected memory_resolution_bytes >= 0, but got ",
      o.memory_resolution_bytes());
}

} // namespace

Evaluation evaluate(const Chain& chain, const Schedule& schedule) {
  chain.validate();
  return simulate(chain, units_of(chain, schedule));
}

int64_t predicted_peak_bytes(const Chain& chain, const Schedule& schedule) {
  return evaluate(chain, schedule).peak_bytes;
}

double predicted_step_seconds(const Chain& chain, const Schedule& schedule) {
  return evaluate(chain, schedule).step_seconds;
}

std::string Plan::str() const {
  char tail[96];
  std::snprintf(tail, sizeof(tail), ": peak %s, %.4g s",
                memory::format_size(peak_bytes).c_str(), step_seconds);
  return schedule.str() + tail;
}

int64_t min_feasible_budget(const Chain& chain, const PlannerOptions& options) {
  chain.validate();
  check_options(options);
  // need(i) = min over units u from i of max(need(u), held(u) + need(end(u))).
  auto ch = choices(chain, options);
  const int64_t n = static_cast<int64_t>(ch.size());
  std::vector<int64_t> need(n + 1, 0);
  for (int64_t i = n - 1; i >= 0; --i) {
    need[i] = std::numeric_limits<int64_t>::max();
    for (const auto& [unit, cost] : ch[i]) {
      need[i] = std::min(need[i], std::max(cost.need, cost.held + need[unit.end]));
    }
  }
  // At the end of a step that starts without gradients, all of them are held.
  return chain.base_bytes + std::max(need[0], later_gradients(chain)[0]);
}

Plan solve(const Chain& chain, int64_t budget_bytes, const PlannerOptions& options) {
  chain.validate();
  check_options(options);
  const int64_t cap = budget_bytes - chain.base_bytes;
  const int64_t all_gradients = later_gradients(chain)[0];
  auto ch = choices(chain, options);
  std::vector<std::vector<Point>> f;
  if (cap >= all_gradients) {
    f = fronts(ch, cap);
  }
  if (cap < all_gradients || f[0].empty()) {
    const int64_t min = min_feasible_budget(chain, options);
    TORCH_CHECK(
        false, "remat::plan: expected a memory budget of at least ", min,
        " bytes (", memory::format_size(min), "), the least any schedule of this ",
        "chain needs, but got ", budget_bytes, " bytes (",
        memory::format_size(budget_bytes), ")");
  }
  // The front is sorted by need ascending, time descending: the last point is
  // the fastest that fits.
  const size_t best = f[0].size() - 1;
  Plan plan = plan_of(chain, units_from(ch, f, best));
  TORCH_INTERNAL_ASSERT(
      plan.peak_bytes <= budget_bytes, "remat::plan: planned peak ", plan.peak_bytes,
      " exceeds the budget ", budget_bytes);
  TORCH_INTERNAL_ASSERT(
      options.memory_resolution_bytes() > 1 ||
          plan.peak_bytes == chain.base_bytes + std::max(f[0][best].need, all_gradients),
      "remat::plan: planner and evaluator disagree: ",
      chain.base_bytes + std::max(f[0][best].need, all_gradients),
      " vs ", plan.peak_bytes, " bytes");
  return plan;
}

std::vector<Plan> frontier(const Chain& chain, const PlannerOptions& options) {
  chain.validate();
  check_options(options);
  auto ch = choices(chain, options);
  auto f = fronts(ch, std::numeric_limits<int64_t>::max());
  // Points that need no more than all the gradients peak alike, at the end
  // of the step: the fastest of them (the last) stands for them all.
  const int64_t all_gradients = later_gradients(chain)[0];
  size_t first = 0;
  while (first + 1 < f[0].size() && f[0][first + 1].need <= all_gradients) {
    ++first;
  }
  std::vector<Plan> plans;
  for (size_t k = first; k < f[0].size(); ++k) {
    plans.push_back(plan_of(chain, units_from(ch, f, k)));
  }
  return plans;
}

std::vector<std::pair<std::string, Schedule>> fixed_policy_schedules(int64_t layers) {
  std::vector<std::string> names{"none"};
  for (int64_t k = 1; k < layers; ++k) {
    if (k <= 4 || layers % k == 0) {
      names.push_back(CheckpointPolicy::every(k).name());
    }
  }
  for (const char* n : {"sqrt", "full", "selective-attention", "selective-mlp", "save-matmuls",
                        "save-projections"}) {
    names.push_back(n);
  }
  std::vector<std::pair<std::string, Schedule>> out;
  for (const auto& n : names) {
    out.emplace_back(n, CheckpointPolicy::parse(n).schedule(layers));
  }
  return out;
}

std::vector<std::string> describe_schedule(const Chain& chain, const Schedule& schedule) {
  std::vector<std::string> lines;
  char line[256];
  auto name = [&](int64_t stage) { return chain.stages[stage].name(); };
  const int64_t first = chain.first_layer();
  for (int64_t i = 0; i < first; ++i) {
    std::snprintf(line, sizeof(line), "  %-22s runs normally", name(i).c_str());
    lines.push_back(line);
  }
  for (const auto& seg : schedule.segments) {
    const int64_t a = first + seg.begin;
    const int64_t b = first + seg.end - 1;
    const std::string range = a == b ? name(a) : name(a) + " .. " + name(b);
    const char* what = "";
    switch (seg.mode) {
      case SegmentMode::kStore:
        what = "keeps every activation";
        break;
      case SegmentMode::kRecompute:
        what = a == b ? "checkpointed: keeps its input only, recomputed in backward"
                      : "checkpointed as one group: keeps its input only, all recomputed "
                        "in backward";
        break;
      case SegmentMode::kRecomputeAttention:
        what = "keeps all but the attention core (scores, softmax, dropout, weighted "
               "sum), recomputed in backward";
        break;
      case SegmentMode::kRecomputeMlp:
        what = "keeps all but the MLP, recomputed in backward";
        break;
      case SegmentMode::kSaveMatmuls:
        what = "checkpointed per layer, keeping the outputs of its matrix products; the "
               "ops between them recomputed in backward";
        break;
      case SegmentMode::kSaveProjections:
        what = "checkpointed per layer, keeping the outputs of its products with "
               "weights; the rest (attention's batched products included) recomputed";
        break;
      case SegmentMode::kCompress:
        what = "keeps every activation, floating ones as bf16 (lossy)";
        break;
    }
    std::snprintf(line, sizeof(line), "  %-22s %s", range.c_str(), what);
    lines.push_back(line);
  }
  for (int64_t i = first + chain.num_layers(); i < static_cast<int64_t>(chain.stages.size()); ++i) {
    std::snprintf(line, sizeof(line), "  %-22s runs normally", name(i).c_str());
    lines.push_back(line);
  }
  return lines;
}

nlohmann::json chain_json(const Chain& chain) {
  nlohmann::json stages = nlohmann::json::array();
  for (const auto& s : chain.stages) {
    nlohmann::json j{
        {"name", s.name()},
        {"kind", to_string(s.kind())},
        {"forward_seconds", s.forward_seconds()},
        {"backward_seconds", s.backward_seconds()},
        {"output_bytes", s.output_bytes()},
        {"stored_bytes", s.stored_bytes()},
        {"forward_transient_bytes", s.forward_transient_bytes()},
        {"nograd_transient_bytes", s.nograd_transient_bytes()},
        {"backward_transient_bytes", s.backward_transient_bytes()},
        {"parameter_gradient_bytes", s.parameter_gradient_bytes()}};
    if (s.group_backward_transient_bytes()) {
      j["group_backward_transient_bytes"] = *s.group_backward_transient_bytes();
    }
    for (auto mode : partial_modes()) {
      if (auto sel = s.selective(mode)) {
        j[to_string(mode)] = {
            {"stored_bytes", sel->stored_bytes()},
            {"recompute_seconds", sel->recompute_seconds()},
            {"forward_transient_bytes", sel->forward_transient_bytes()},
            {"backward_transient_bytes", sel->backward_transient_bytes()}};
      }
    }
    stages.push_back(j);
  }
  return {{"base_bytes", chain.base_bytes},
          {"gradients", to_string(chain.gradients)},
          {"checkpoint_bytes", chain.checkpoint_bytes},
          {"stages", stages}};
}

} // namespace plan
} // namespace remat
