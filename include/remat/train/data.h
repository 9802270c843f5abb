// Training data: JSONL documents (text, or token ids already tokenized) for
// classification or language modelling, a seeded train/validation split,
// padding into batches, and a shuffling loader that resumes exactly where it
// stopped and shards each global batch over data-parallel ranks. The loader
// makes batches of a fixed number of documents, batches under a token budget
// with documents of like length together (max_tokens), or rows packed with
// several documents each (pack).
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
//   // Language modelling: {"text": ...} or {"input_ids": [...]} lines.
//   auto lm = std::make_shared<remat::train::Dataset>(
//       remat::train::read_text_jsonl("data/lm/train.jsonl"));
//   // Batches of at most 8192 tokens (rows * longest row), at most 64 rows:
//   remat::train::DataLoader budget(lm, tok,
//       remat::train::DataLoaderOptions(64).max_len(512).max_tokens(8192));
//   // Or 8 rows of 512 tokens, each packed with whole documents:
//   remat::train::DataLoader packed(lm, tok,
//       remat::train::DataLoaderOptions(8).max_len(512).pack(true));
//   if (auto b = packed.next()) {
//     // b->attention_mask: each token's document number in its row, 1, 2, ...
//   }
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
  /// Token ids of a pre-tokenized document, used as given (no begin or end
  /// token is added) instead of `text`; empty: tokenize `text`.
  std::vector<int64_t> ids;
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
  /// Every document is token ids (Example::ids), none is text; false for an
  /// empty set.
  bool pretokenized() const;
  /// The largest token id of any document, to check against a model's
  /// vocabulary; -1 for a text set.
  int64_t max_token_id() const;
};

/// How JSONL lines are read.
struct JsonlOptions {
  TORCH_ARG(std::string, text_key) = "text";
  /// A line with this field is a pre-tokenized document: a non-empty list of
  /// non-negative integer token ids. A file is all ids or all text.
  TORCH_ARG(std::string, ids_key) = "input_ids";
  TORCH_ARG(std::string, labels_key) = "labels";
  /// The label set, in output order. Empty: the sorted label strings seen in
  /// the file, or "0".."k-1" for multi-hot lists. A validation file must be
  /// read with its training file's label_names.
  TORCH_ARG(std::vector<std::string>, label_names) = {};
};

/// Reads {"text": "...", "labels": ["legal", "spam"]} lines (or a multi-hot
/// "labels": [1, 0, 0, 1], or a single "labels": "spam"); a line may give
/// {"input_ids": [101, 7, 102], ...} instead of "text". Blank lines are
/// skipped. Throws c10::Error with file:line for a malformed line, an unknown
/// label, a multi-hot list of the wrong length, ids that are not non-negative
/// integers, or a file that mixes text lines and ids lines.
Dataset read_classification_jsonl(
    const std::string& path,
    const JsonlOptions& options = {});

/// Reads {"text": "..."} or {"input_ids": [1, 5, 9]} lines for language
/// modelling, with the same refusals as read_classification_jsonl.
Dataset read_text_jsonl(
    const std::string& path,
    const JsonlOptions& options = {});

/// Writes `data` as JSONL ({"text", "labels": [names]}, with "input_ids"
/// for a pre-tokenized set), atomically. Throws c10::Error for a set that
/// mixes text and ids documents, which no reader would take back.
void write_jsonl(const std::string& path, const Dataset& data);

/// A training and a validation set.
struct Split {
  Dataset train;
  Dataset valid;
};

/// Puts round(size * valid_fraction) documents, chosen by a permutation that
/// depends only on `seed`, into `valid`; both keep the file's order.
Split split_dataset(const Dataset& data, double valid_fraction, uint64_t seed);

/// A padded batch. A row is one document, or with DataLoaderOptions::pack
/// several whole documents one after another.
struct Batch {
  torch::Tensor input_ids; ///< [B, S] int64
  /// [B, S] int64: 1 token, 0 padding. Packed rows: each token's document
  /// number within its row (1, 2, ...), 0 padding.
  torch::Tensor attention_mask;
  /// Classification: [B, num_labels] float32 multi-hot. LM: [B, S] int64,
  /// input_ids with -100 on padding (the model shifts them, as Hugging
  /// Face's causal LMs do); packed rows also have -100 on each document's
  /// first token, so that no token learns to predict the next document.
  torch::Tensor labels;
  /// The documents' positions in the data set, row by row (packed rows: all
  /// of each row's documents, in order).
  std::vector<int64_t> indices;
  /// Rows of this step over all ranks (divide a summed loss by it).
  int64_t global_size = 0;
  int64_t epoch = 0;
  int64_t index = 0; ///< batch number within the epoch
};

struct CollateOptions {
  /// Tokens per row, the begin and end tokens included; longer texts (and
  /// longer lists of ids) are cut.
  TORCH_ARG(int64_t, max_len) = 128;
  /// Pad every batch to max_len rather than to its longest row.
  TORCH_ARG(bool, pad_to_max_len) = false;
};

/// Tokenizes `indices` of `data` (or takes their ids) and pads them into one
/// batch, one document per row.
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
  /// Tokens per global batch (rows * its longest row, over all ranks); 0:
  /// off. When on, batch_size is the most rows a batch may have, documents
  /// of like length go together, and the number of rows varies. At least
  /// world_size * max_len, so that every rank gets a row of any length.
  /// drop_last must be false.
  TORCH_ARG(int64_t, max_tokens) = 0;
  /// Packs whole documents, in the file's order, into rows of at most
  /// max_len tokens; a batch is batch_size such rows. Language modelling
  /// only; max_tokens must be 0.
  TORCH_ARG(bool, pack) = false;
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
/// global batch of batch_size rows is dealt out: rank r takes its rows r,
/// r + w, r + 2w, ... so that the ranks' batches together are the
/// single-process batch. A last global batch with fewer than w rows is left
/// out, so that every rank runs the same number of steps.
///
/// With max_tokens, each document's token count (after the cut to max_len)
/// is computed once, at construction. Epoch e stable-sorts its permutation
/// by token count, longest first (the permutation only breaks ties), cuts it
/// greedily into batches under the budget, and shuffles the order of the
/// batches with a generator seeded by (seed, e). The counts alone fix where
/// the cuts fall, so batches_per_epoch is the same every epoch. With w > 1
/// every batch has at least w rows: a last batch with fewer joins the one
/// before, or takes rows from it, and is left out (at most w - 1 of the
/// shortest documents) only when neither fits.
///
/// With pack, the rows are packed once, at construction, in the file's
/// order (as Hugging Face's group_texts does), and epoch e shuffles the
/// rows, not the documents: so batches_per_epoch is the same every epoch and
/// a position resumes exactly, but documents that share a row share it in
/// every epoch.
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

  /// Tokens in the longest row any batch can have (at most max_len):
  /// max_len with pad_to_max_len, the longest packed row with pack, else
  /// the longest document after the cut. The first call tokenizes every
  /// document when construction did not (neither max_tokens nor pack).
  int64_t longest_row() const;

  /// Data-set indices of global batch `index` of `epoch`, over all ranks,
  /// row by row.
  std::vector<int64_t> global_batch(int64_t epoch, int64_t index) const;
  const DataLoaderOptions& options() const {
    return options_;
  }

 private:
  // The rows of every global batch of `epoch`: documents, or with pack
  // indices into packed_.
  const std::vector<std::vector<int64_t>>& epoch_batches(int64_t epoch) const;

  std::shared_ptr<const Dataset> data_;
  std::shared_ptr<const io::Tokenizer> tokenizer_;
  DataLoaderOptions options_;
  int64_t batches_per_epoch_ = 0;
  LoaderPosition position_;
  // max_tokens and pack: each document's token count after the cut to
  // max_len (max_len for all with pad_to_max_len and max_tokens).
  std::vector<int64_t> lengths_;
  // max_tokens: the rows of each batch, in the order of the sorted epoch.
  std::vector<int64_t> budget_rows_;
  // pack: the documents of each row.
  std::vector<std::vector<int64_t>> packed_;
  // longest_row(), once known (0: not yet).
  mutable int64_t longest_row_ = 0;
  // The global batches of one epoch, computed once per epoch.
  mutable int64_t cached_epoch_ = -1;
  mutable std::vector<std::vector<int64_t>> batches_;
};

/// The order in which epoch `epoch` visits `n` documents: a Fisher-Yates
/// shuffle with a generator of our own, the same on every platform.
std::vector<int64_t> epoch_permutation(int64_t n, uint64_t seed, int64_t epoch);

} // namespace train
} // namespace remat
