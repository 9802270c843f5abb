// libFuzzer harness for the WordPiece vocabulary reader and tokenizer
// (remat/io/tokenizer.h) and the SentencePiece .model reader
// (remat/io/sentencepiece_tokenizer.h). An input is one byte of options,
// then: with bit 1 clear, the vocab.txt, a 0 byte, and a text to tokenize
// (bit 0: lower case); with bit 1 set, a .model file (protobuf: it may hold
// 0 bytes), which tokenizes a few fixed texts. The ids must lie in the
// vocabulary, encode must respect max_len, decode must accept what tokenize
// gave, and the byte tokenizer must give the text back.
#include "fuzz_input.h"

#include "remat/io/sentencepiece_tokenizer.h"
#include "remat/io/tokenizer.h"

#include <cstring>

using remat_fuzz::require;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) {
    return 0;
  }
  if (data[0] & 2) {
    const auto& path = remat_fuzz::write_input(data + 1, size - 1, ".model");
    remat_fuzz::expect_refusal_or_success([&] {
      const auto tok = remat::io::SentencePieceTokenizer::from_file(path);
      for (const std::string text :
           {"", "  Hello,  w\xc3\xb6rld!\t\xe4\xbd\xa0\xe5\xa5\xbd ",
            "\xef\xbc\xa1\xe2\x91\xa0 <s> \xff\xc3 x\xe2\x96\x81y"}) {
        const auto ids = tok.tokenize(text);
        for (auto id : ids) {
          require(id >= 0 && id < tok.vocab_size(), "a token id outside the vocabulary");
        }
        (void)tok.decode(ids, /*skip_special=*/true);
        (void)tok.decode(ids, /*skip_special=*/false);
        const auto enc = tok.encode(text, /*max_len=*/8, /*pad=*/true);
        require(enc.input_ids.size() == 8, "encode(max_len 8, pad) is not 8 long");
      }
    });
    return 0;
  }
  const bool lower_case = data[0] & 1;
  const char* begin = reinterpret_cast<const char*>(data + 1);
  const char* end = reinterpret_cast<const char*>(data + size);
  const char* zero = static_cast<const char*>(std::memchr(begin, 0, end - begin));
  const std::string vocab_text(begin, zero ? zero : end);
  const std::string text = zero ? std::string(zero + 1, end) : "Hello, wörld! 你好 ##x";

  remat::io::ByteTokenizer bytes;
  require(bytes.decode(bytes.tokenize(text)) == text, "ByteTokenizer lost bytes");

  const auto& path = remat_fuzz::write_input(
      reinterpret_cast<const uint8_t*>(vocab_text.data()), vocab_text.size(), ".txt");
  remat_fuzz::expect_refusal_or_success([&] {
    const auto tok = remat::io::WordPieceTokenizer::from_file(
        path, remat::io::WordPieceOptions().lower_case(lower_case).max_chars_per_word(40));
    const auto ids = tok.tokenize(text);
    for (auto id : ids) {
      require(id >= 0 && id < tok.vocab_size(), "a token id outside the vocabulary");
    }
    require(
        tok.tokenize_to_strings(text).size() == ids.size(),
        "tokenize_to_strings and tokenize disagree");
    (void)tok.decode(ids, /*skip_special=*/true);
    (void)tok.decode(ids, /*skip_special=*/false);
    const auto enc = tok.encode(text, /*max_len=*/8, /*pad=*/true);
    require(
        enc.input_ids.size() == 8 && enc.attention_mask.size() == 8,
        "encode(max_len 8, pad) is not 8 long");
    require(enc.input_ids.front() == tok.begin_id(), "encode lost the begin token");
  });
  return 0;
}
