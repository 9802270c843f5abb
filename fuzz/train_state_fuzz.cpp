// libFuzzer harness for the training-state reader: load_train_state
// (remat/train/train_state.h) and the readers of its JSON document
// (TrainOptions, LoaderPosition, History in remat/train/), which `remat
// train --resume` runs on it. The first byte picks what the rest is:
//   bit 0 clear: a whole state file, read with load_train_state;
//   bit 0 set:   the JSON document alone (a file that passes its checksum
//                can hold any document, and a fuzzer cannot forge one).
// A document that reads is written back to JSON and read again: the same
// JSON must come back.
#include "fuzz_input.h"

#include "remat/train/data.h"
#include "remat/train/train_state.h"
#include "remat/train/trainer.h"

#include <nlohmann/json.hpp>
#include <torch/torch.h>

namespace {

using nlohmann::json;
using remat_fuzz::require;

// What Trainer::load_state reads from the document, each part on its own
// so that a refusal of one still lets the others run.
void read_document(const json& info) {
  if (!info.is_object()) {
    return;
  }
  if (info.contains("options")) {
    remat_fuzz::expect_refusal_or_success([&] {
      const auto options = remat::train::TrainOptions::from_json(info.at("options"));
      const auto again = options.to_json();
      require(
          remat::train::TrainOptions::from_json(again).to_json().dump() == again.dump(),
          "TrainOptions read back from its JSON differ");
      options.validate();
    });
  }
  if (info.contains("loader")) {
    remat_fuzz::expect_refusal_or_success([&] {
      const auto position = remat::train::LoaderPosition::from_json(info.at("loader"));
      require(
          remat::train::LoaderPosition::from_json(position.to_json()) == position,
          "a loader position read back from its JSON differs");
    });
  }
  if (info.contains("history")) {
    remat_fuzz::expect_refusal_or_success([&] {
      const auto history = remat::train::History::from_json(info.at("history"));
      const auto again = history.to_json();
      require(
          remat::train::History::from_json(again).to_json().dump() == again.dump(),
          "a history read back from its JSON differs");
      (void)history.max_compare_diff();
    });
  }
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) {
    return 0;
  }
  if (data[0] & 1) {
    const auto info = json::parse(data + 1, data + size, nullptr, /*allow_exceptions=*/false);
    if (!info.is_discarded()) {
      read_document(info);
    }
    return 0;
  }
  const auto& path = remat_fuzz::write_input(data + 1, size - 1, ".safetensors");
  remat_fuzz::expect_refusal_or_success([&] {
    const auto state = remat::train::load_train_state(path);
    require(state.info.is_object(), "load_train_state gave a document that is not an object");
    (void)remat::train::peek_train_state_step(path);
    read_document(state.info);
  });
  return 0;
}
