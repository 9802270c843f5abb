// Encode throughput of remat's tokenizer.json / tokenizer.model readers:
//
//   tokenizer_throughput TOKENIZER CORPUS_JSON [PASSES]
//
// tokenizes every document of CORPUS_JSON (a JSON list of strings) PASSES
// times (default 5) after one warm-up pass, on one thread, and prints the
// input megabytes (10^6 bytes) per second and the tokens per pass.
// bench/tokenizer_throughput.py runs it beside Hugging Face `tokenizers`.
#include "remat/io/file.h"
#include "remat/io/tokenizer.h"

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s TOKENIZER CORPUS_JSON [PASSES]\n", argv[0]);
    return 2;
  }
  const auto tok = remat::io::make_tokenizer(argv[1]);
  const auto corpus = nlohmann::json::parse(remat::io::read_file(argv[2]))
                          .get<std::vector<std::string>>();
  const int passes = argc > 3 ? std::atoi(argv[3]) : 5;
  size_t bytes = 0, tokens = 0;
  for (const auto& text : corpus) { // warm-up: caches, page faults
    bytes += text.size();
    tokens += tok->tokenize(text).size();
  }
  const auto start = std::chrono::steady_clock::now();
  for (int p = 0; p < passes; ++p) {
    for (const auto& text : corpus) {
      tok->tokenize(text);
    }
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("remat: %.2f MB/s (%zu bytes, %zu tokens per pass, %d passes, %.3f s)\n",
              static_cast<double>(bytes) * passes / seconds / 1e6, bytes, tokens,
              passes, seconds);
  return 0;
}
