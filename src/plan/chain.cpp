#include "remat/plan/chain.h"

#include "remat/memory.h"

#include <c10/util/Exception.h>

#include <cstdio>
#include <sstream>

namespace remat {
namespace plan {

const char* to_string(StageKind kind) {
  switch (kind) {
    case StageKind::kEmbedding:
      return "embedding";
    case StageKind::kLayer:
      return "layer";
    case StageKind::kHead:
      return "head";
  }
  return "?";
}

const char* to_string(GradientReset reset) {
  return reset == GradientReset::kZero ? "zeroed" : "none";
}

c10::optional<SelectiveCost> StageCost::selective(SegmentMode mode) const {
  switch (mode) {
    case SegmentMode::kRecomputeAttention:
      return recompute_attention_;
    case SegmentMode::kRecomputeMlp:
      return recompute_mlp_;
    case SegmentMode::kSaveMatmuls:
      return save_matmuls_;
    case SegmentMode::kSaveProjections:
      return save_projections_;
    case SegmentMode::kCompress:
      return compress_;
    default:
      return c10::nullopt;
  }
}

StageCost& StageCost::selective(SegmentMode mode, SelectiveCost cost) {
  switch (mode) {
    case SegmentMode::kRecomputeAttention:
      recompute_attention_ = cost;
      break;
    case SegmentMode::kRecomputeMlp:
      recompute_mlp_ = cost;
      break;
    case SegmentMode::kSaveMatmuls:
      save_matmuls_ = cost;
      break;
    case SegmentMode::kSaveProjections:
      save_projections_ = cost;
      break;
    case SegmentMode::kCompress:
      compress_ = cost;
      break;
    default:
      TORCH_CHECK(
          false, "remat::plan: expected a partial mode (",
          "recompute-attention, recompute-mlp, save-matmuls, save-projections, compress)",
          ", but got ", remat::to_string(mode));
  }
  return *this;
}

void Chain::validate() const {
  TORCH_CHECK(!stages.empty(), "remat::plan: expected a chain with stages, but got none");
  TORCH_CHECK(
      base_bytes >= 0, "remat::plan: expected base_bytes >= 0, but got ", base_bytes);
  TORCH_CHECK(
      checkpoint_bytes >= 0, "remat::plan: expected checkpoint_bytes >= 0, but got ",
      checkpoint_bytes);
  // Kinds must read embedding* layer+ head*.
  int phase = 0;
  int64_t layers = 0;
  for (size_t i = 0; i < stages.size(); ++i) {
    const auto& s = stages[i];
    const int p = s.kind() == StageKind::kEmbedding ? 0 : s.kind() == StageKind::kLayer ? 1 : 2;
    TORCH_CHECK(
        p >= phase,
        "remat::plan: expected stages ordered embeddings, layers, heads, but stage ",
        i, " ('", s.name(), "') is a ", to_string(s.kind()), " after a ",
        phase == 1 ? "layer" : "head");
    phase = p;
    layers += p == 1;
    TORCH_CHECK(
        s.forward_seconds() >= 0 && s.backward_seconds() >= 0,
        "remat::plan: expected non-negative times, but stage ", i, " ('", s.name(),
        "') has forward ", s.forward_seconds(), " s and backward ",
        s.backward_seconds(), " s");
    TORCH_CHECK(
        s.output_bytes() >= 0 && s.forward_transient_bytes() >= 0 &&
            s.nograd_transient_bytes() >= 0 && s.backward_transient_bytes() >= 0,
        "remat::plan: expected non-negative sizes, but stage ", i, " ('", s.name(),
        "') has output ", s.output_bytes(), ", forward transient ",
        s.forward_transient_bytes(), ", no-grad transient ",
        s.nograd_transient_bytes(), " and backward transient ",
        s.backward_transient_bytes(), " bytes");
    TORCH_CHECK(
        !s.group_backward_transient_bytes() || *s.group_backward_transient_bytes() >= 0,
        "remat::plan: expected group_backward_transient_bytes >= 0, but stage ", i,
        " ('", s.name(), "') has ", s.group_backward_transient_bytes().value_or(0));
    TORCH_CHECK(
        s.parameter_gradient_bytes() >= 0,
        "remat::plan: expected parameter_gradient_bytes >= 0, but stage ", i, " ('",
        s.name(), "') has ", s.parameter_gradient_bytes());
    TORCH_CHECK(
        s.stored_bytes() >= s.output_bytes(),
        "remat::plan: expected stored_bytes >= output_bytes (the output is kept "
        "for backward), but stage ", i, " ('", s.name(), "') stores ",
        s.stored_bytes(), " bytes with an output of ", s.output_bytes());
    for (auto mode : partial_modes()) {
      auto sel = s.selective(mode);
      if (!sel) {
        continue;
      }
      TORCH_CHECK(
          p == 1, "remat::plan: expected selective costs only on layers, but ",
          to_string(s.kind()), " stage ", i, " ('", s.name(), "') has ",
          remat::to_string(mode));
      TORCH_CHECK(
          sel->forward_transient_bytes() >= 0 && sel->backward_transient_bytes() >= 0,
          "remat::plan: expected non-negative transients for ", remat::to_string(mode),
          " of stage ", i, " ('", s.name(), "'), but got ", sel->forward_transient_bytes(),
          " and ", sel->backward_transient_bytes(), " bytes");
      TORCH_CHECK(
          sel->stored_bytes() >= s.output_bytes() && sel->recompute_seconds() >= 0,
          "remat::plan: expected ", remat::to_string(mode), " of stage ", i, " ('",
          s.name(), "') to store at least its output (", s.output_bytes(),
          " bytes) and take >= 0 s, but got ", sel->stored_bytes(), " bytes and ",
          sel->recompute_seconds(), " s");
    }
  }
  TORCH_CHECK(layers >= 1, "remat::plan: expected at least one layer stage, but got none");
}

int64_t Chain::num_layers() const {
  int64_t n = 0;
  for (const auto& s : stages) {
    n += s.kind() == StageKind::kLayer;
  }
  return n;
}

int64_t Chain::first_layer() const {
  for (size_t i = 0; i < stages.size(); ++i) {
    if (stages[i].kind() == StageKind::kLayer) {
      return static_cast<int64_t>(i);
    }
  }
  return -1;
}

std::string Chain::str() const {
  std::ostringstream out;
  out << "base " << memory::format_size(base_bytes) << " (gradients "
      << (gradients == GradientReset::kZero ? "included" : "held from each stage's backward")
      << ")";
  if (checkpoint_bytes > 0) {
    out << ", per checkpointed group " << memory::format_size(checkpoint_bytes);
  }
  out << "\n";
  char line[256];
  for (const auto& s : stages) {
    std::snprintf(
        line, sizeof(line),
        "%-14s %-9s fwd %9.4f s  bwd %9.4f s  out %10s  stored %10s  "
        "tmp %10s / %10s / %10s",
        s.name().c_str(), to_string(s.kind()), s.forward_seconds(),
        s.backward_seconds(), memory::format_size(s.output_bytes()).c_str(),
        memory::format_size(s.stored_bytes()).c_str(),
        memory::format_size(s.forward_transient_bytes()).c_str(),
        memory::format_size(s.nograd_transient_bytes()).c_str(),
        memory::format_size(s.backward_transient_bytes()).c_str());
    out << line;
    for (auto mode : partial_modes()) {
      if (auto sel = s.selective(mode)) {
        out << "  " << remat::to_string(mode) << " " << memory::format_size(sel->stored_bytes());
      }
    }
    out << "\n";
  }
  return out.str();
}

} // namespace plan
} // namespace remat
