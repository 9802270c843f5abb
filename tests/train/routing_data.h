// A small generated data set for trying `remat train` out of the box:
// document routing, multi-label over {finance, legal, ops, spam}. Texts mix
// label-specific words with shared filler, words that several labels use,
// typos and numbers; some documents carry two labels, some none, and a few
// labels are flipped, so a small model learns it well but not perfectly.
// data/routing/ in the repository holds the files write_routing_files makes.
// A test fixture: it lives in tests/, not in the library.
//
// Example:
//   auto train = remat::train::make_routing_dataset(/*n=*/2000, /*seed=*/0);
//   // train.label_names == {"finance", "legal", "ops", "spam"}
//   remat::train::write_routing_files("data/routing");   // train, valid, vocab
#pragma once

#include "remat/train/data.h"

#include <cstdint>
#include <string>
#include <vector>

namespace remat {
namespace train {

/// The label names, sorted as reading the JSONL back sorts them.
const std::vector<std::string>& routing_labels();

/// `n` documents; the same (n, seed) gives the same documents everywhere.
Dataset make_routing_dataset(int64_t n, uint64_t seed);

/// A BERT vocabulary covering every generated word: [PAD] [UNK] [CLS] [SEP]
/// [MASK] (ids 0..4), punctuation, digits, "##" digits and suffixes, words.
std::vector<std::string> routing_vocab();

/// Writes dir/train.jsonl (n_train documents, seed), dir/valid.jsonl
/// (n_valid, another seed derived from `seed`) and dir/vocab.txt, atomically.
void write_routing_files(
    const std::string& dir,
    int64_t n_train = 2000,
    int64_t n_valid = 400,
    uint64_t seed = 0);

} // namespace train
} // namespace remat
