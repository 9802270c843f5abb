// Traces of the stages of BERT- and Llama-family models as PyTorch eager
// autograd runs them: the op sequence, what each op saves, FLOPs. The
// estimator (estimate.cpp) turns them into a Chain. Private to src/plan.
#pragma once

#include "plan/op_trace.h"
#include "remat/plan/estimate.h"

namespace remat {
namespace plan {
namespace detail {

/// Token (and position, type) embeddings; input: token ids.
Trace trace_embedding(const ModelSpec& spec);
/// One transformer layer; `input_requires_grad` is false for the first layer
/// when nothing before it trains (LoRA, frozen embeddings).
Trace trace_layer(const ModelSpec& spec, bool input_requires_grad);
/// Final norm, head and loss; output: the loss.
Trace trace_head(const ModelSpec& spec, bool input_requires_grad);
/// Whether stage input of layer `layer` requires grad.
bool layer_input_requires_grad(const ModelSpec& spec, int64_t layer);

} // namespace detail
} // namespace plan
} // namespace remat
