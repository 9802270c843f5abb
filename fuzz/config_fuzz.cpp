// libFuzzer harness for the Hugging Face config.json readers
// (remat/io/hf.h): each input is a config file, read as a BERT and as a
// Llama config. A config that reads is converted back to JSON and read
// again; the second reading must give the same JSON.
#include "fuzz_input.h"

#include "remat/io/hf.h"

#include <nlohmann/json.hpp>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto& path = remat_fuzz::write_input(data, size, ".json");
  remat_fuzz::expect_refusal_or_success([&] {
    const auto options = remat::io::read_bert_config(path);
    const auto json = remat::io::bert_config_to_json(options);
    remat_fuzz::require(
        remat::io::bert_config_to_json(remat::io::bert_options_from_json(json)) == json,
        "a BERT config read back from its JSON differs");
  });
  remat_fuzz::expect_refusal_or_success([&] {
    const auto config = remat::io::read_llama_config(path);
    const auto json = remat::io::llama_config_to_json(config);
    remat_fuzz::require(
        remat::io::llama_config_to_json(remat::io::llama_config_from_json(json)) == json,
        "a Llama config read back from its JSON differs");
    // What `remat train --init` builds from it.
    const auto options = remat::io::llama_options(config);
    remat_fuzz::require(
        remat::io::llama_config_to_json(remat::io::llama_config(options)) == json,
        "LlamaOptions <-> LlamaConfig does not round-trip");
  });
  return 0;
}
