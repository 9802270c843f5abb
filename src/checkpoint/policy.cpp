#include "remat/policy.h"

#include "remat/compress.h"
#include "remat/memory.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <sstream>

namespace remat {

const char* to_string(SegmentMode mode) {
  switch (mode) {
    case SegmentMode::kStore:
      return "store";
    case SegmentMode::kRecompute:
      return "recompute";
    case SegmentMode::kRecomputeAttention:
      return "recompute-attention";
    case SegmentMode::kRecomputeMlp:
      return "recompute-mlp";
    case SegmentMode::kSaveMatmuls:
      return "save-matmuls";
    case SegmentMode::kSaveProjections:
      return "save-projections";
    case SegmentMode::kCompress:
      return "compress";
  }
  return "?";
}

const std::vector<SegmentMode>& partial_modes() {
  static const std::vector<SegmentMode> modes{
      SegmentMode::kRecomputeAttention, SegmentMode::kRecomputeMlp,
      SegmentMode::kSaveMatmuls, SegmentMode::kSaveProjections, SegmentMode::kCompress};
  return modes;
}

OpPolicy op_policy_of(SegmentMode mode) {
  switch (mode) {
    case SegmentMode::kSaveMatmuls:
      return OpPolicy::matmuls();
    case SegmentMode::kSaveProjections:
      return OpPolicy::projections();
    default:
      return OpPolicy();
  }
}

void Schedule::validate(int64_t num_layers) const {
  int64_t next = 0;
  for (const auto& s : segments) {
    TORCH_CHECK(
        s.begin == next && s.end > s.begin,
        "remat: expected schedule segments to cover the layers in order, but "
        "segment [", s.begin, ", ", s.end, ") follows layer ", next);
    next = s.end;
  }
  TORCH_CHECK(
      next == num_layers,
      "remat: expected a schedule for ", num_layers, " layers, but it covers ",
      next);
}

std::string Schedule::str() const {
  std::ostringstream out;
  for (size_t i = 0; i < segments.size(); ++i) {
    const auto& s = segments[i];
    out << (i ? " " : "") << to_string(s.mode) << "[" << s.begin << "," << s.end
        << ")";
  }
  return out.str();
}

Schedule Schedule::parse(const std::string& text) {
  Schedule out;
  std::istringstream in(text);
  std::string piece;
  while (in >> piece) {
    const auto open = piece.find('[');
    const auto comma = piece.find(',', open == std::string::npos ? 0 : open);
    bool ok = open != std::string::npos && comma != std::string::npos &&
        piece.back() == ')' && comma > open + 1 && piece.size() > comma + 2;
    ScheduleSegment seg;
    if (ok) {
      const auto mode = piece.substr(0, open);
      bool known = false;
      std::vector<SegmentMode> modes{SegmentMode::kStore, SegmentMode::kRecompute};
      modes.insert(modes.end(), partial_modes().begin(), partial_modes().end());
      for (auto m : modes) {
        if (mode == to_string(m)) {
          seg.mode = m;
          known = true;
        }
      }
      try {
        size_t used_begin = 0;
        size_t used_end = 0;
        const auto begin_text = piece.substr(open + 1, comma - open - 1);
        const auto end_text = piece.substr(comma + 1, piece.size() - comma - 2);
        seg.begin = std::stoll(begin_text, &used_begin);
        seg.end = std::stoll(end_text, &used_end);
        ok = known && used_begin == begin_text.size() && used_end == end_text.size();
      } catch (const std::exception&) {
        ok = false;
      }
    }
    TORCH_CHECK(
        ok, "remat: expected schedule segments like 'store[0,4)' or 'recompute[4,8)' "
            "(modes store, recompute, recompute-attention, recompute-mlp, save-matmuls, "
            "save-projections, compress), but got '",
        piece, "'");
    out.segments.push_back(seg);
  }
  return out;
}

CheckpointPolicy CheckpointPolicy::none() {
  CheckpointPolicy p;
  return p;
}

CheckpointPolicy CheckpointPolicy::every(int64_t k) {
  TORCH_CHECK(k >= 1, "remat: expected every-K with K >= 1, but got ", k);
  CheckpointPolicy p;
  p.kind_ = Kind::kEvery;
  p.k_ = k;
  p.name_ = k == 1 ? "every-layer" : "every-" + std::to_string(k);
  return p;
}

CheckpointPolicy CheckpointPolicy::sqrt() {
  CheckpointPolicy p;
  p.kind_ = Kind::kSqrt;
  p.name_ = "sqrt";
  return p;
}

CheckpointPolicy CheckpointPolicy::full() {
  CheckpointPolicy p;
  p.kind_ = Kind::kFull;
  p.name_ = "full";
  return p;
}

CheckpointPolicy CheckpointPolicy::selective_attention() {
  CheckpointPolicy p;
  p.kind_ = Kind::kSelectiveAttention;
  p.name_ = "selective-attention";
  return p;
}

CheckpointPolicy CheckpointPolicy::selective_mlp() {
  CheckpointPolicy p;
  p.kind_ = Kind::kSelectiveMlp;
  p.name_ = "selective-mlp";
  return p;
}

CheckpointPolicy CheckpointPolicy::budget(int64_t bytes) {
  TORCH_CHECK(bytes > 0, "remat: expected a budget > 0 bytes, but got ", bytes);
  CheckpointPolicy p;
  p.kind_ = Kind::kBudget;
  p.budget_ = bytes;
  p.name_ = "budget:" + memory::format_size(bytes);
  // format_size has a space ("2.00 GiB"); names are single words.
  p.name_.erase(std::remove(p.name_.begin(), p.name_.end(), ' '), p.name_.end());
  return p;
}

CheckpointPolicy CheckpointPolicy::save_ops(const OpPolicy& ops) {
  TORCH_CHECK(!ops.empty(), "remat: expected an op policy that keeps some ops, but got none");
  // The presets are segment modes, which a planner can mix per layer; any
  // other op policy checkpoints every layer with it.
  for (auto mode : {SegmentMode::kSaveMatmuls, SegmentMode::kSaveProjections}) {
    if (ops == op_policy_of(mode)) {
      CheckpointPolicy p;
      p.kind_ = Kind::kSaveOps;
      p.k_ = 1;
      p.save_mode_ = mode;
      p.name_ = to_string(mode);
      return p;
    }
  }
  CheckpointDefaults how;
  how.op_policy = ops;
  CheckpointPolicy p = every_layer().with_checkpoint(how);
  p.kind_ = Kind::kSaveOps;
  return p;
}

CheckpointPolicy CheckpointPolicy::compress(c10::ScalarType to) {
  CompressHooks check(to); // refuses what cannot be compressed to
  CheckpointPolicy p;
  p.kind_ = Kind::kCompress;
  p.compress_ = to;
  p.name_ = to == c10::kBFloat16 ? "compress" : std::string("compress-") + compression_name(to);
  return p;
}

CheckpointPolicy CheckpointPolicy::offload() {
  CheckpointPolicy p;
  p.kind_ = Kind::kOffload;
  p.name_ = "offload";
  return p;
}

namespace {
const char* const kReentrantSuffix = "+reentrant";
const char* const kValuesSuffix = "+values";
const char* const kSavePrefix = "+save=";

bool strip_suffix(std::string& text, const std::string& suffix) {
  if (text.size() > suffix.size() &&
      text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0) {
    text.erase(text.size() - suffix.size());
    return true;
  }
  return false;
}

// Strips a last "+save=OPS" off `text`: OPS, or nothing.
std::optional<std::string> strip_save(std::string& text) {
  const auto at = text.rfind(kSavePrefix);
  if (at == std::string::npos || at == 0 || text.find('+', at + 1) != std::string::npos) {
    return std::nullopt;
  }
  std::string ops = text.substr(at + std::string(kSavePrefix).size());
  text.erase(at);
  return ops;
}

// Strips the suffixes off `text`: what they say, or nothing when it has none.
std::optional<CheckpointDefaults> strip_checkpoint_suffixes(std::string& text) {
  std::optional<CheckpointDefaults> how;
  for (bool more = true; more;) {
    more = false;
    if (auto ops = strip_save(text)) {
      how = how.value_or(CheckpointDefaults{});
      how->op_policy = OpPolicy::parse(*ops);
      more = true;
    }
    if (strip_suffix(text, kValuesSuffix)) {
      how = how.value_or(CheckpointDefaults{});
      how->determinism_check = DeterminismCheck::kValues;
      more = true;
    }
    if (strip_suffix(text, kReentrantSuffix)) {
      how = how.value_or(CheckpointDefaults{});
      how->implementation = CheckpointImpl::kReentrant;
      more = true;
    }
  }
  return how;
}
} // namespace

CheckpointPolicy CheckpointPolicy::custom(Schedule schedule, std::string name) {
  CheckpointPolicy p;
  p.kind_ = Kind::kCustom;
  p.custom_ = std::move(schedule);
  p.name_ = std::move(name);
  // A planner's schedule for "budget:1GiB+reentrant" checkpoints as that
  // name says, whoever turns it into a policy.
  if (!p.custom_.checkpoint) {
    std::string base = p.name_;
    p.custom_.checkpoint = strip_checkpoint_suffixes(base);
  }
  p.checkpoint_ = p.custom_.checkpoint;
  return p;
}

std::string CheckpointPolicy::names() {
  return "none, every-layer, every-K (K >= 1), sqrt, full, selective-attention, "
         "selective-mlp, save-matmuls, save-projections, compress, compress-fp8, offload, "
         "budget:SIZE, each that checkpoints optionally with +reentrant, "
         "+values and +save=OPS";
}


CheckpointPolicy CheckpointPolicy::with_checkpoint(CheckpointDefaults how) const {
  CheckpointPolicy p = *this;
  strip_checkpoint_suffixes(p.name_);
  p.checkpoint_ = how;
  TORCH_CHECK(
      how.op_policy.empty() || save_mode_ == SegmentMode::kRecompute,
      "expected +save=OPS on a policy without an op policy of its own, but '", p.name_,
      "' keeps ", op_policy_of(save_mode_).name());
  if (!how.op_policy.empty()) {
    p.name_ += kSavePrefix + how.op_policy.name();
  }
  if (how.implementation == CheckpointImpl::kReentrant) {
    p.name_ += kReentrantSuffix;
  }
  if (how.determinism_check == DeterminismCheck::kValues) {
    p.name_ += kValuesSuffix;
  }
  p.custom_.checkpoint = how;
  return p;
}

CheckpointPolicy CheckpointPolicy::parse(const std::string& text) {
  std::string base = text;
  const auto suffixed = strip_checkpoint_suffixes(base);
  if (suffixed) {
    CheckpointDefaults how = *suffixed;
    TORCH_CHECK(
        !(how.implementation == CheckpointImpl::kReentrant &&
          how.determinism_check == DeterminismCheck::kValues),
        "expected +values without +reentrant (value fingerprints need the "
        "saved-tensor hooks implementation), but got '", text, "'");
    TORCH_CHECK(
        !(how.implementation == CheckpointImpl::kReentrant && !how.op_policy.empty()),
        "expected +save=OPS without +reentrant (per-op policies need the "
        "saved-tensor hooks implementation), but got '", text, "'");
    auto p = parse_base(base, text);
    TORCH_CHECK(
        !(how.implementation == CheckpointImpl::kReentrant && p.kind() == Kind::kSaveOps),
        "expected a per-op policy without +reentrant (per-op policies need the "
        "saved-tensor hooks implementation), but got '", text, "'");
    TORCH_CHECK(
        p.kind() != Kind::kNone && p.kind() != Kind::kCompress && p.kind() != Kind::kOffload,
        "expected a policy that checkpoints before '+', but got '", text, "'");
    return p.with_checkpoint(how);
  }
  return parse_base(text, text);
}

CheckpointPolicy CheckpointPolicy::parse_base(const std::string& text, const std::string& given) {
  if (text == "none") {
    return none();
  }
  if (text == "every-layer") {
    return every_layer();
  }
  if (text == "sqrt") {
    return sqrt();
  }
  if (text == "full") {
    return full();
  }
  if (text == "selective-attention") {
    return selective_attention();
  }
  if (text == "selective-mlp") {
    return selective_mlp();
  }
  if (text == "save-matmuls") {
    return save_ops(OpPolicy::matmuls());
  }
  if (text == "save-projections") {
    return save_ops(OpPolicy::projections());
  }
  if (text == "compress") {
    return compress(c10::kBFloat16);
  }
  if (text == "compress-fp8") {
    return compress(parse_compression("fp8"));
  }
  if (text == "offload") {
    return offload();
  }
  const std::string every_prefix = "every-";
  if (text.rfind(every_prefix, 0) == 0) {
    const std::string k = text.substr(every_prefix.size());
    bool digits = !k.empty() && k.size() < 10 &&
        k.find_first_not_of("0123456789") == std::string::npos;
    TORCH_CHECK(
        digits && std::stoll(k) >= 1,
        "expected every-K with an integer K >= 1, but got '", given, "'");
    return every(std::stoll(k));
  }
  const std::string budget_prefix = "budget:";
  if (text.rfind(budget_prefix, 0) == 0) {
    int64_t bytes = memory::parse_size(text.substr(budget_prefix.size()));
    TORCH_CHECK(bytes > 0, "expected a budget above 0 bytes, but got '", given, "'");
    auto p = budget(bytes);
    p.name_ = text;
    return p;
  }
  TORCH_CHECK(
      false, "expected a checkpoint policy (", names(), "), but got '", given, "'");
}

Schedule CheckpointPolicy::schedule(int64_t num_layers) const {
  TORCH_CHECK(
      num_layers >= 1, "remat: expected at least one layer, but got ", num_layers);
  Schedule s;
  auto uniform = [&](int64_t per_segment, SegmentMode mode) {
    for (int64_t b = 0; b < num_layers; b += per_segment) {
      s.segments.push_back({b, std::min(num_layers, b + per_segment), mode});
    }
  };
  switch (kind_) {
    case Kind::kNone:
      s.segments.push_back({0, num_layers, SegmentMode::kStore});
      break;
    case Kind::kEvery:
      uniform(k_, SegmentMode::kRecompute);
      break;
    case Kind::kSaveOps:
      if (save_mode_ == SegmentMode::kRecompute) {
        uniform(1, SegmentMode::kRecompute); // with its op policy in checkpoint_
      } else {
        s.segments.push_back({0, num_layers, save_mode_});
      }
      break;
    case Kind::kCompress:
      s.segments.push_back({0, num_layers, SegmentMode::kCompress});
      s.compress = compress_;
      break;
    case Kind::kOffload:
      s.segments.push_back({0, num_layers, SegmentMode::kStore});
      s.offload = true;
      break;
    case Kind::kSqrt: {
      // ceil(sqrt(L)) layers per segment gives about sqrt(L) segments.
      const auto per = static_cast<int64_t>(
          std::ceil(std::sqrt(static_cast<double>(num_layers))));
      uniform(per, SegmentMode::kRecompute);
      break;
    }
    case Kind::kFull:
      s.segments.push_back({0, num_layers, SegmentMode::kRecompute});
      break;
    case Kind::kSelectiveAttention:
      s.segments.push_back({0, num_layers, SegmentMode::kRecomputeAttention});
      break;
    case Kind::kSelectiveMlp:
      s.segments.push_back({0, num_layers, SegmentMode::kRecomputeMlp});
      break;
    case Kind::kBudget:
      TORCH_CHECK(
          false, "remat: policy '", name_, "' needs a planner and a cost "
          "profile to become a schedule; call remat::plan first");
    case Kind::kCustom:
      s = custom_;
      break;
  }
  if (checkpoint_) {
    s.checkpoint = checkpoint_;
  }
  s.validate(num_layers);
  return s;
}

} // namespace remat
