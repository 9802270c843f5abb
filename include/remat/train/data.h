// Training data: JSONL documents for classification or language modelling,
// a seeded train/validation split, padding into batches, and a shuffling
// loader that resumes exactly where it stopped and shards each global batch
// over data-parallel ranks.
//
// clang-format off
// Example:
//   auto tok = remat::io::make_tokenizer("data/routing/vocab.txt");
//   auto train = std::make_shared<remat::train::Dataset>(
//       remat::train::read_classification_jsonl("data/routing/train.jsonl"));
//   remat::train::DataLoader loader(train, tok,
//       remat::train::DataLoaderOptions(/*batch_size=*/32).seed(1)
//           .max_len(128));
//   while (auto batch = loader.next()) {       // one epoch
//     // batch->input_ids, batch->attention_mask: [B, S] int64
//     // batch->labels: [B, 4] float multi-hot
//   }
//   auto pos = loader.position();    // save with pos.to_json() ...
//   loader.set_position(pos);        // ... and resume on the same batch
// clang-format on
#pragma once

#include "remat/io/tokenizer.h"

#include <nlohmann/json_fwd.hpp>
#include <torch/arg.h>
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace remat {
namespace train {

/// One document.
struct Example {
  std::string text;
  /// Multi-hot over Dataset::label_names; empty for language modelling.
  std::vector<float> labels;
};

/// Documents and, for classification, the names of their labels.
struct Dataset {
  std::vector<Example> examples;
  std::vector<std::string> label_names; ///< empty for a language-modelling set

  int64_t size() const {
    return static_cast<int64_t>(examples.size());
  }
  int64_t num_labels() const {
    return static_cast<int64_t>(label_names.size());
  }
  bool is_classification() const {
    return !label_names.empty();
  }
};

/// How JSONL lines are read.
struct JsonlOptions {
  TORCH_ARG(std::string, text_key) = "text";
  TORCH_ARG(std::string, labels_key) = "labels";
  /// The label set, in output order. Empty: the sorted label strings seen in
  /// the file, or "0".."k-1" for multi-hot lists. A validation file must be
  /// read with its training file's label_names.
  TORCH_ARG(std::vector<std::string>, label_names) = {};
};

/// Reads {"text": "...", "labels": ["legal", "spam"]} lines (or a multi-hot
/// "labels": [1, 0, 0, 1], or a single "labels": "spam"). Blank lines are
/// skipped. Throws c10::Error with file:line for a malformed line, an unknown
/// label, or a multi-hot list of the wrong length.
Dataset read_classification_jsonl(
    const std::string& path,
    const JsonlOptions& options = {});

/// Reads {"text": "..."} lines for language modelling.
Dataset read_text_jsonl(
    const std::string& path,
    const JsonlOptions& options = {});

/// Writes `data` as JSONL ({"text", "labels": [names]}), atomically.
void write_jsonl(const std::string& path, const Dataset& data);

/// A training and a validation set.
struct Split {
  Dataset train;
  Dataset valid;
};

/// Puts round(size * valid_fraction) documents, chosen by a permutation that
/// depends only on `seed`, into `valid`; both keep the file's order.
Split split_dataset(const Dataset& data, double valid_fraction, uint64_t seed);

/// A padded batch.
struct Batch {
  torch::Tensor input_ids; ///< [B, S] int64
  torch::Tensor attention_mask; ///< [B, S] int64: 1 token, 0 padding
  /// Classification: [B, num_labels] float32 multi-hot. LM: [B, S] int64,
  /// input_ids with -100 on padding (the model shifts them, as Hugging
  /// Face's causal LMs do).
  torch::Tensor labels;
  std::vector<int64_t> indices; ///< rows' positions in the data set
  /// Rows of this step over all ranks (divide a summed loss by it).
  int64_t global_size = 0;
  int64_t epoch = 0;
  int64_t index = 0; ///< batch number within the epoch
};

struct CollateOptions {
  /// Tokens per row, the begin and end tokens included; longer texts are cut.
  TORCH_ARG(int64_t, max_len) = 128;
  /// Pad every batch to max_len rather than to its longest row.
  TORCH_ARG(bool, pad_to_max_len) = false;
};

/// Tokenizes `indices` of `data` and pads them into one batch.
Batch collate(
    const Dataset& data,
    const std::vector<int64_t>& indices,
    const io::Tokenizer& tokenizer,
    const CollateOptions& options = {});

struct DataLoaderOptions {
  /* implicit */ DataLoaderOptions(int64_t batch_size)
      : batch_size_(batch_size) {}
  /// Documents per step over all ranks (the global batch).
  TORCH_ARG(int64_t, batch_size);
  TORCH_ARG(bool, shuffle) = true;
  /// Seeds the permutation of every epoch.
  TORCH_ARG(uint64_t, seed) = 0;
  /// Leave out the last batch of an epoch when it is short.
  TORCH_ARG(bool, drop_last) = false;
  /// This process's data-parallel rank, and how many ranks there are.
  TORCH_ARG(int64_t, rank) = 0;
  TORCH_ARG(int64_t, world_size) = 1;
  TORCH_ARG(int64_t, max_len) = 128; ///< tokens per row (see CollateOptions)
  TORCH_ARG(bool, pad_to_max_len) = false;
};

/// Where a loader stands: enough to resume on exactly the same batches.
struct LoaderPosition {
  int64_t epoch = 0; ///< epochs finished
  int64_t index = 0; ///< batches already returned in this epoch
  uint64_t seed = 0; ///< the shuffling seed

  nlohmann::json to_json() const;
  /// Throws c10::Error naming the field when one is missing or mistyped.
  static LoaderPosition from_json(const nlohmann::json& j);
  bool operator==(const LoaderPosition& o) const {
    return epoch == o.epoch && index == o.index && seed == o.seed;
  }
};

/// Deterministic, resumable, shardable batches. Epoch e visits the documents
/// in a permutation that depends only on (seed, e). With world_size w, each
/// global batch of batch_size documents is dealt out: rank r takes its
/// documents r, r + w, r + 2w, ... so that the ranks' batches together are
/// the single-process batch. A last global batch with fewer than w documents
/// is left out, so that every rank runs the same number of steps.
class DataLoader {
 public:
  /// Throws c10::Error for an empty data set or invalid options.
  DataLoader(
      std::shared_ptr<const Dataset> data,
      std::shared_ptr<const io::Tokenizer> tokenizer,
      DataLoaderOptions options);

  /// This rank's next batch, or nullopt at the end of an epoch (the position
  /// then moves on to the next epoch, so the next call starts it).
  std::optional<Batch> next();

  int64_t batches_per_epoch() const {
    return batches_per_epoch_;
  }
  LoaderPosition position() const {
    return position_;
  }
  /// Resumes at `position` (its seed replaces the options' seed).
  void set_position(const LoaderPosition& position);

  /// Data-set indices of global batch `index` of `epoch`, over all ranks.
  std::vector<int64_t> global_batch(int64_t epoch, int64_t index) const;
  const DataLoaderOptions& options() const {
    return options_;
  }

 private:
  std::shared_ptr<const Dataset> data_;
  std::shared_ptr<const io::Tokenizer> tokenizer_;
  DataLoaderOptions options_;
  int64_t batches_per_epoch_ = 0;
  LoaderPosition position_;
  // The permutation of one epoch, computed once per epoch.
  mutable int64_t cached_epoch_ = -1;
  mutable std::vector<int64_t> order_;
};

/// The order in which epoch `epoch` visits `n` documents: a Fisher-Yates
/// shuffle with a generator of our own, the same on every platform.
std::vector<int64_t> epoch_permutation(int64_t n, uint64_t seed, int64_t epoch);

} // namespace train
} // namespace remat
