// An analytic estimate of training memory for BERT-family and Llama-family
// transformers of any size, including ones that cannot run here (7B, 13B,
// 70B): weights, gradients, optimizer state, activations, and the peak under
// each checkpoint policy; and the largest batch or sequence that fits a
// device.
//
// Activations are derived from the op sequence of one layer as PyTorch eager
// autograd runs it, tensor by tensor (which tensors each op saves for
// backward, and when temporaries die); `layer_activations` lists them by name
// so that measured bytes can be compared per tensor. The peak comes from the
// same memory model the planner uses (remat/plan/solver.h), on the Chain that
// `estimate_chain` builds.
//
// Assumptions (per tensor details in src/plan/model_trace.cpp):
//   - ops run in the activation dtype (fp32, or bf16 under both bf16
//     precisions); LayerNorm and softmax are not upcast, as remat's models
//     compute them; RMSNorm is (remat's Llama computes it in fp32); the LM
//     loss casts bf16 logits to fp32 first;
//   - autograd saves an input only when the gradient that needs it is
//     required (PyTorch's generated code does this), so a frozen Linear does
//     not keep its input, and LoRA's A keeps it instead; a mean over a
//     dimension keeps its input on LibTorch 1.13 (the build's version
//     decides);
//   - Llama's RMSNorm and SwiGLU MLP are remat's fused Functions
//     (remat/nn/fused.h): a norm keeps its input and an fp32 rstd, the MLP
//     gate and up (not SiLU's output nor the product);
//   - dropout: remat's models keep a 1-byte mask (remat::nn::dropout);
//     LoRA's adapter dropout is LibTorch's, which on CPU keeps a noise tensor
//     of the input's dtype and on CUDA a 1-byte mask;
//   - eager attention keeps B*heads*S*S probabilities (and dropout's mask
//     and output where dropout is on); blockwise attention keeps q, k, v, the
//     output and a B*heads*S float log-sum-exp, as FlashAttention does in the
//     activation dtype (remat's own blockwise kernel upcasts bf16 q, k, v to
//     fp32 and keeps those); GQA keys and values are repeated inside the
//     attention core for eager attention and not at all for blockwise;
//   - gradients of all trainable parameters are held for the whole step.
//
// Example:
//   auto spec = remat::plan::ModelSpec::llama2_7b().seq(4096).batch(1)
//                   .precision(remat::plan::Precision::kBf16Mixed);
//   auto e =
//       remat::plan::estimate(spec, remat::CheckpointPolicy::every_layer());
//   std::cout << e.str() << "\n";
//   int64_t b = remat::plan::fit_batch(spec,
//       remat::CheckpointPolicy::every_layer(), 80LL << 30);  // 80 GiB device
#pragma once

#include "remat/model_sizes.h"
#include "remat/plan/chain.h"
#include "remat/policy.h"

#include <torch/arg.h>

#include <cstdint>
#include <string>
#include <vector>

namespace remat {
namespace plan {

/// Model family: BERT (post-LN encoder, GELU MLP, learned positions) or Llama
/// (pre-RMSNorm decoder, SwiGLU MLP, grouped-query attention, rotary).
enum class Family { kBert, kLlama };
/// Number formats of weights, activations, gradients and optimizer state.
enum class Precision {
  kFp32,      ///< everything fp32: 4 + 4 + 8 bytes per trainable parameter
  kBf16Mixed, ///< bf16 weights, activations and gradients; AdamW keeps an fp32
              ///< master copy and fp32 moments: 2 + 2 + 12 bytes per trainable
  kBf16,      ///< pure bf16 ("bf16-pure"), optimizer state too: 2 + 2 + 4
              ///< bytes per trainable
  // bf16 autocast (fp32 weights, bf16 matrix products: what `--dtype bf16`
  // runs in bench, plan and train) is not modelled.
};
/// How attention is computed.
enum class AttentionImpl {
  kEager,     ///< matmul, softmax, matmul: keeps B*heads*S*S probabilities
  kBlockwise, ///< memory-efficient / flash: keeps O(B*heads*S)
};
enum class Optimizer {
  kAdamW, ///< two moments per trainable parameter
  kSgd,   ///< plain SGD, no state
};
/// What follows the last layer.
enum class Head {
  kNone,          ///< the loss reads the last hidden state (a mean): ~0 bytes
  kLanguageModel, ///< vocabulary logits and cross-entropy over every token
                  ///< (BERT: the MLM transform and tied decoder)
  kClassifier,    ///< BERT: pooler + linear; Llama: linear on every token,
                  ///< the last token's logits taken (Hugging Face style)
};
/// Where the model runs; decides how LoRA's adapter dropout (LibTorch's own)
/// saves its mask.
enum class Backend { kCpu, kCuda };

const char* to_string(Family f);
const char* to_string(Precision p);
const char* to_string(AttentionImpl a);
const char* to_string(Head h);
/// Parse "bert" / "llama", "fp32" / "bf16-mixed" / "bf16-pure", "eager" /
/// "blockwise", "none" / "lm" / "classifier". Throw c10::Error naming the
/// text and the accepted names.
Family parse_family(const std::string& text);

/// The one table of LoRA target names. The estimator's short names ("q",
/// "k", "v", "o", "gate", "up", "down") and each family's module names
/// (BERT: "query", "key", "value", "attention.output.dense",
/// "intermediate.dense"; Llama: "q_proj", "k_proj", "v_proj", "o_proj",
/// "gate_proj", "up_proj", "down_proj") are both accepted wherever a
/// command takes --lora-targets. lora_target_short gives the short name of
/// either; lora_target_module the module name nn::apply_lora matches. Each
/// throws remat::FieldError("lora_targets") naming the accepted names for
/// any other text, and for a short name the family lacks (BERT has no
/// "gate"; its "down", the layer's output.dense, is the estimator's only:
/// the attention's output.dense shares its name's end).
///
/// Example:
///   using remat::plan::Family;
///   remat::plan::lora_target_short(Family::kLlama, "q_proj");  // "q"
///   remat::plan::lora_target_module(Family::kBert, "v");       // "value"
std::string lora_target_short(Family family, const std::string& target);
std::string lora_target_module(Family family, const std::string& target);
Precision parse_precision(const std::string& text);
AttentionImpl parse_attention_impl(const std::string& text);
Head parse_head(const std::string& text);

/// The shape and training setup of a model to estimate.
///
/// Example:
///   auto spec = remat::plan::ModelSpec(remat::plan::Family::kLlama,
///       /*layers=*/32, /*hidden=*/4096, /*heads=*/32, /*vocab=*/32000)
///       .intermediate(11008).seq(4096).batch(2)
///       .precision(remat::plan::Precision::kBf16Mixed)
///       .lora_rank(16).lora_targets({"q", "v"});
struct ModelSpec {
  ModelSpec(Family family, int64_t layers, int64_t hidden, int64_t heads, int64_t vocab);

  TORCH_ARG(Family, family);
  TORCH_ARG(int64_t, layers);
  TORCH_ARG(int64_t, hidden);
  TORCH_ARG(int64_t, heads);
  TORCH_ARG(int64_t, vocab);
  /// Key/value heads (GQA); 0: as many as `heads`.
  TORCH_ARG(int64_t, kv_heads) = 0;
  /// MLP width; 0: the family's rule (remat::bert_mlp_size,
  /// remat::llama_mlp_size in remat/model_sizes.h: 11008 for hidden 4096).
  TORCH_ARG(int64_t, intermediate) = 0;
  TORCH_ARG(int64_t, seq) = 512;            ///< tokens per sequence
  TORCH_ARG(int64_t, batch) = 1;            ///< sequences per micro-batch
  TORCH_ARG(int64_t, max_positions) = 512;  ///< BERT position table rows
  TORCH_ARG(int64_t, type_vocab) = 2;       ///< BERT token types
  TORCH_ARG(bool, pooler) = true;           ///< BERT pooler (kept for kNone)
  TORCH_ARG(bool, tie_embeddings) = false;  ///< Llama LM head shares the
                                            ///< embedding matrix
  TORCH_ARG(Head, head) = Head::kNone;
  TORCH_ARG(int64_t, num_labels) = 2;       ///< for kClassifier
  TORCH_ARG(Precision, precision) = Precision::kFp32;
  TORCH_ARG(Optimizer, optimizer) = Optimizer::kAdamW;
  TORCH_ARG(AttentionImpl, attention) = AttentionImpl::kEager;
  /// Dropout active in training (BERT: hidden and attention dropout). The
  /// constructor sets it for BERT and clears it for Llama.
  TORCH_ARG(bool, dropout) = false;
  TORCH_ARG(Backend, backend) = Backend::kCpu;
  /// LoRA rank; 0: full fine-tuning. With LoRA every base weight is frozen;
  /// the adapters (and a classifier head) train.
  TORCH_ARG(int64_t, lora_rank) = 0;
  /// Projections with adapters: "q", "k", "v", "o", "gate", "up", "down"
  /// (BERT's intermediate and output dense are "up" and "down").
  TORCH_ARG(std::vector<std::string>, lora_targets) =
      std::vector<std::string>{"q", "k", "v", "o"};
  /// Dropout on the adapters' input (PEFT lora_dropout > 0): each adapter
  /// then keeps its own dropped copy of the input and a mask.
  TORCH_ARG(bool, lora_dropout) = false;

 public: // TORCH_ARG leaves the access private
  /// Throws remat::FieldError naming the first invalid field ("layers",
  /// "kv_heads"), for a size past its bound in remat/model_sizes.h too, or
  /// "batch" when the sizes together would describe a step of over 64 PiB.
  void validate() const;
  int64_t kv_heads_or_heads() const { return kv_heads_ > 0 ? kv_heads_ : heads_; }
  int64_t mlp_size() const;                ///< intermediate or its default
  int64_t activation_bytes_per_element() const; ///< 4 (fp32) or 2 (bf16)

  /// bert-base-uncased (12 layers, hidden 768, 12 heads, vocab 30522).
  static ModelSpec bert_base();
  /// Llama-2-7B (32 layers, hidden 4096, 32 heads, intermediate 11008,
  /// vocab 32000, untied LM head), seq 4096.
  static ModelSpec llama2_7b();
  /// The 13B fine-tune worked in remat's source documents, as remat reads
  /// it: a 13B
  /// "Mistral-class" model treated as Llama-family with Llama-2-13B's shape
  /// (40 layers, hidden 5120, 40 heads, 40 KV heads, intermediate 13824,
  /// vocab 32000), seq 8192, batch 2, LoRA rank 64 on q, k, v, o, bf16
  /// weights with fp32 AdamW state for the adapters, blockwise attention, a
  /// 4-label classifier head (multi-label document routing), on CUDA.
  static ModelSpec llama_13b_lora_8k();
  /// One of "bert-base", "llama2-7b", "llama-13b-lora-8k" (or its old name,
  /// "harbor-13b"); throws naming the text.
  static ModelSpec preset(const std::string& name);
  /// The current name of a preset: an old name's new one, else `name`.
  static std::string preset_name(const std::string& name);
};

/// Parameter counts (numbers, not bytes).
struct ParameterCount {
  int64_t total = 0;     ///< base model plus adapters and head
  int64_t trainable = 0; ///< what the optimizer updates
};
ParameterCount count_parameters(const ModelSpec& spec);

/// One tensor a layer keeps for backward.
struct SavedTensor {
  std::string name;     ///< "attention.probs"
  std::string saved_by; ///< the op(s) that save it: "softmax"
  std::string shape;    ///< "[2, 12, 512, 512] x 4 B"
  int64_t bytes = 0;    ///< bytes
};

/// The tensors one layer (the second, whose input requires grad; the first
/// keeps a little less under LoRA) keeps from its forward to its backward in
/// `mode` (kStore, kRecomputeAttention or kRecomputeMlp), including its
/// output and excluding its input, in forward order. Their sum is the layer's
/// stored_bytes in estimate_chain.
std::vector<SavedTensor> layer_activations(
    const ModelSpec& spec,
    SegmentMode mode = SegmentMode::kStore);

/// The FLOP rate estimates are timed at (FLOP/s): times are for comparing.
constexpr double kEstimateFlopsPerSecond = 1e12;

/// The spec as a planner Chain: an embedding stage, one stage per layer and
/// a head stage (final norm, head, loss); base_bytes = weights + gradients +
/// optimizer state + input batch. Times are FLOPs / `flops_per_second`
/// (matrix products only), good for relative comparisons. Its layers carry
/// the selective and per-op modes' costs (not kCompress's: lossy, so never
/// planned unasked).
Chain estimate_chain(const ModelSpec& spec, double flops_per_second = kEstimateFlopsPerSecond);

/// Predicted memory of a training step. All sizes in bytes.
struct Estimate {
  ParameterCount parameters;
  int64_t weight_bytes = 0;
  int64_t gradient_bytes = 0;
  int64_t optimizer_bytes = 0;
  int64_t input_bytes = 0;            ///< token ids and labels
  int64_t activation_bytes = 0;       ///< held at the end of forward
  int64_t peak_activation_bytes = 0;  ///< peak minus the four above
  int64_t peak_bytes = 0;             ///< total at the peak
  double step_seconds = 0;            ///< at the chain's FLOP rate
  std::string peak_event;             ///< where the peak happens
  Schedule schedule;                  ///< what the policy became
  /// A few lines, sizes for people.
  std::string str() const;
};

/// The estimate under `policy`. A kBudget policy is planned with
/// remat::plan::solve on estimate_chain(spec), over every mode it models;
/// it throws if nothing fits. Per-op policies (save-matmuls,
/// save-projections, +save=OPS) keep each layer's outputs of the named
/// products and recompute the rest in its backward; compress and
/// compress-fp8 keep saved floating activations of at least 4 KiB in bf16
/// or fp8 (1 byte, with a per-tensor scale). Times count matrix-product
/// FLOPs only: a per-op policy's recompute of pointwise ops and
/// compression's casts are not in step_seconds. Offload (CUDA's copies to
/// host memory, overlapped with compute) is refused: remat bench measures
/// it on the GPU.
Estimate estimate(const ModelSpec& spec, const CheckpointPolicy& policy);

/// The largest batch whose estimated peak under `policy` is at most
/// `device_bytes` (0 when even batch 1 does not fit). For a kBudget policy, a
/// batch fits when some schedule fits the device.
int64_t fit_batch(
    const ModelSpec& spec,
    const CheckpointPolicy& policy,
    int64_t device_bytes);

/// The largest sequence length, a multiple of `multiple`, that fits as in
/// fit_batch (0 when even `multiple` does not). For BERT the position table
/// grows with it.
int64_t fit_seq(
    const ModelSpec& spec,
    const CheckpointPolicy& policy,
    int64_t device_bytes,
    int64_t multiple = 1);

/// A lower bound (bytes) on the smallest peak any checkpoint schedule reaches
/// on a step of `spec`: min_feasible_budget(estimate_chain(spec)) less the
/// gradients, which a step that sets them to none does not hold when its
/// backward starts. Throws remat::FieldError("memory_limit") naming both
/// figures when it is above `limit_bytes` (bytes), named by `limit_name`
/// ("the --memory-limit", "this machine's memory"). A bound from below: a
/// run that fits is never refused; one that cannot is refused in milliseconds.
///
/// Example:
///   // given: auto spec = remat::plan::ModelSpec::llama2_7b().seq(4096);
///   remat::plan::check_fits(spec.optimizer(remat::plan::Optimizer::kSgd),
///       remat::memory::physical_bytes(), "this machine's memory");
int64_t check_fits(
    const ModelSpec& spec,
    int64_t limit_bytes,
    const std::string& limit_name);

} // namespace plan
} // namespace remat
