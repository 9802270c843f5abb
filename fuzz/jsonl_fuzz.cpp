// libFuzzer harness for the JSONL data reader (remat/train/data.h). The
// first byte picks the reading (bit 0: classification or language
// modelling; bit 1: a given label set or the file's own), the rest is the
// file. A data set that reads is batched (split, collate with the byte
// tokenizer), written with write_jsonl and read back: the texts, and labels
// rounded to 0/1, must come back.
#include "fuzz_input.h"

#include "remat/io/tokenizer.h"
#include "remat/train/data.h"

#include <torch/torch.h>

namespace {

using remat::train::Dataset;
using remat_fuzz::require;

void use(const Dataset& data) {
  if (data.size() == 0) {
    return;
  }
  const auto split = remat::train::split_dataset(data, 0.25, /*seed=*/1);
  require(
      split.train.size() + split.valid.size() == data.size(),
      "split_dataset lost or added documents");
  remat::io::ByteTokenizer bytes;
  std::vector<int64_t> indices;
  for (int64_t i = 0; i < std::min<int64_t>(data.size(), 8); ++i) {
    indices.push_back(i);
  }
  const auto batch = remat::train::collate(
      data, indices, bytes, remat::train::CollateOptions().max_len(16));
  require(
      batch.input_ids.size(0) == static_cast<int64_t>(indices.size()),
      "collate made a batch of another size");
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) {
    return 0;
  }
  const bool classification = data[0] & 1;
  auto options = remat::train::JsonlOptions();
  if (data[0] & 2) {
    options.label_names({"legal", "spam", "0", "1"});
  }
  const auto& path = remat_fuzz::write_input(data + 1, size - 1, ".jsonl");
  remat_fuzz::expect_refusal_or_success([&] {
    const auto read = classification
        ? remat::train::read_classification_jsonl(path, options)
        : remat::train::read_text_jsonl(path, options);
    use(read);

    const std::string again = path + ".again";
    remat::train::write_jsonl(again, read);
    auto back_options = remat::train::JsonlOptions().label_names(read.label_names);
    const auto back = classification
        ? remat::train::read_classification_jsonl(again, back_options)
        : remat::train::read_text_jsonl(again, back_options);
    std::remove(again.c_str());
    require(back.size() == read.size(), "write_jsonl then read lost documents");
    for (int64_t i = 0; i < read.size(); ++i) {
      const auto& a = read.examples[static_cast<size_t>(i)];
      const auto& b = back.examples[static_cast<size_t>(i)];
      require(a.text == b.text, "write_jsonl then read changed a text");
      require(a.labels.size() == b.labels.size(), "labels changed length");
      for (size_t k = 0; k < a.labels.size(); ++k) {
        require(
            (a.labels[k] >= 0.5f ? 1.0f : 0.0f) == b.labels[k],
            "write_jsonl then read changed a label");
      }
    }
  });
  return 0;
}
