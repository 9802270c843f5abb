// A model's own tokenizer: tokenizer.json (BpeTokenizer) and tokenizer.model
// (SentencePieceTokenizer). Hand-written fixtures with known ids always run;
// the cross-check against Hugging Face `tokenizers` and the `sentencepiece`
// package (tests/io/tokenizer_reference.py trains small tokenizers and
// writes their ids for a corpus of many scripts) needs REMAT_PYTHON with
// both, and skips with the reason elsewhere.
#include "io/io_testing.h"
#include "remat/io/bpe_tokenizer.h"
#include "remat/io/file.h"
#include "remat/io/sentencepiece_tokenizer.h"
#include "remat/io/tokenizer.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstring>

namespace {

using remat::io::BpeTokenizer;
using remat_io_test::TempDir;
using Ids = std::vector<int64_t>;
using json = nlohmann::json;

// GPT-2's byte -> character table, written out here so that the fixture
// does not borrow the code under test.
std::string byte_char(int b) {
  int next = 256;
  for (int x = 0; x < 256; ++x) {
    const bool printable = (x >= 33 && x <= 126) || (x >= 161 && x <= 172) ||
        (x >= 174 && x <= 255);
    const int c = printable ? x : next++;
    if (x == b) {
      std::string out;
      if (c < 0x80) {
        out.push_back(static_cast<char>(c));
      } else {
        out.push_back(static_cast<char>(0xC0 | (c >> 6)));
        out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
      }
      return out;
    }
  }
  return "";
}

// Byte-level BPE: ids 0..255 are the bytes, then he, ll, hell, Ġw; an added
// special token that the post-processor puts after the text.
json byte_level_fixture() {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) {
    vocab[byte_char(b)] = b;
  }
  vocab["he"] = 256;
  vocab["ll"] = 257;
  vocab["hell"] = 258;
  vocab[byte_char(' ') + "w"] = 259;
  json j;
  j["model"] = {
      {"type", "BPE"},
      {"vocab", vocab},
      {"merges",
       {"h e", json::array({"l", "l"}), "he ll", byte_char(' ') + " w"}}};
  j["added_tokens"] = {{{"id", 260},
                        {"content", "<|end|>"},
                        {"special", true},
                        {"normalized", false}}};
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = {
      {"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}};
  j["post_processor"] = {
      {"type", "TemplateProcessing"},
      {"single",
       {{{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
        {{"SpecialToken", {{"id", "<|end|>"}, {"type_id", 0}}}}}},
      {"special_tokens",
       {{"<|end|>", {{"id", "<|end|>"}, {"ids", {260}}, {"tokens", {"<|end|>"}}}}}}};
  j["decoder"] = {{"type", "ByteLevel"}};
  return j;
}

TEST(BpeTokenizerTest, EncodesAByteLevelFixtureWithExactIds) {
  auto tok = BpeTokenizer::from_json(byte_level_fixture(), "fixture");
  // hello -> hell o; " world" -> Ġw o r l d
  EXPECT_EQ(tok.tokenize("hello world"), (Ids{258, 'o', 259, 'o', 'r', 'l', 'd'}));
  EXPECT_EQ(tok.tokenize("hehe"), (Ids{256, 256}));
  EXPECT_EQ(tok.tokenize("héllo"), (Ids{'h', 0xC3, 0xA9, 257, 'o'}));
  // The special token is cut out of the text before the pre-tokenizer.
  EXPECT_EQ(tok.tokenize("hello<|end|> world"), (Ids{258, 'o', 260, 259, 'o', 'r', 'l', 'd'}));
  EXPECT_EQ(tok.begin_id(), -1) << "the template puts nothing before $A";
  EXPECT_EQ(tok.end_id(), 260);
  EXPECT_EQ(tok.pad_id(), 260) << "no padding.pad_id: the end token";
  EXPECT_EQ(tok.vocab_size(), 261);
  EXPECT_EQ(tok.encode("hello").input_ids, (Ids{258, 'o', 260}));
  EXPECT_EQ(tok.encode("hello world", 3).input_ids, (Ids{258, 'o', 260}));
  EXPECT_EQ(tok.encode("he", 4, true).attention_mask, (Ids{1, 1, 0, 0}));
  EXPECT_EQ(tok.token_to_id("hell"), 258);
  EXPECT_EQ(tok.id_to_token(259), byte_char(' ') + "w");
  EXPECT_EQ(tok.decode({258, 'o', 260}), "hello");
  EXPECT_EQ(tok.decode({258, 'o', 260}, /*skip_special=*/false), "hello<|end|>");
  EXPECT_ERROR_CONTAINS(tok.decode({261}), "expected an id in [0, 261), but got 261");
}

TEST(BpeTokenizerTest, RoundTripsAnyText) {
  auto tok = BpeTokenizer::from_json(byte_level_fixture(), "fixture");
  for (const std::string text :
       {"", " ", "hello  world\t\n\n", "Ἀθῆναι 中文 👨‍👩‍👧‍👦 مرحبا नमस्ते",
        "it's 1234567 ... !!", "<|end|><|end|>x<|end", "\xc2\xa0\xe3\x80\x80"}) {
    const auto ids = tok.tokenize(text);
    EXPECT_EQ(tok.decode(ids, /*skip_special=*/false), text);
  }
  EXPECT_EQ(tok.decode(tok.tokenize("a\xff" "b")), "a\xef\xbf\xbd" "b")
      << "invalid UTF-8 is read as U+FFFD, as Python would";
}

TEST(BpeTokenizerTest, AppliesMergeRanksAndAddedTokenOptions) {
  // Not byte-level: characters, an unknown token, and merge ranks that
  // decide between overlapping pairs.
  json j;
  j["model"] = {
      {"type", "BPE"},
      {"vocab", {{"a", 0}, {"b", 1}, {"c", 2}, {"ab", 3}, {"bc", 4}, {"abc", 5}, {"<unk>", 6}}},
      {"merges", {"b c", "a b", "a bc"}},
      {"unk_token", "<unk>"},
      {"fuse_unk", true}};
  j["pre_tokenizer"] = {{"type", "WhitespaceSplit"}};
  j["added_tokens"] = {
      {{"id", 7}, {"content", "[M]"}, {"lstrip", true}, {"rstrip", true}, {"special", true}, {"normalized", false}},
      {{"id", 8}, {"content", "cab"}, {"single_word", true}, {"normalized", true}}};
  auto tok = BpeTokenizer::from_json(j, "fixture");
  // "abc": b c (rank 0) before a b (rank 1), then a bc.
  EXPECT_EQ(tok.tokenize("abc ab ba"), (Ids{5, 3, 1, 0}));
  EXPECT_EQ(tok.tokenize("axyzb"), (Ids{0, 6, 1})) << "fuse_unk: one <unk>";
  EXPECT_EQ(tok.tokenize("ab  [M]  c"), (Ids{3, 7, 2})) << "lstrip, rstrip";
  EXPECT_EQ(tok.tokenize("cab cabc"), (Ids{8, 2, 5})) << "single_word";
  EXPECT_EQ(tok.begin_id(), -1);
  EXPECT_EQ(tok.end_id(), -1);
  EXPECT_EQ(tok.encode("ab").input_ids, Ids{3});
}

// A Split with a String pattern matches the string as it is: "." is a dot,
// not any character. (PCRE2 refuses UCP beside LITERAL: such a file once
// failed to load.)
TEST(BpeTokenizerTest, SplitsOnALiteralStringPattern) {
  json j;
  j["model"] = {{"type", "BPE"},
                {"vocab", {{"a", 0}, {"b", 1}, {".", 2}, {"ab", 3}}},
                {"merges", {"a b"}}};
  j["pre_tokenizer"] = {
      {"type", "Split"}, {"pattern", {{"String", "."}}}, {"behavior", "Isolated"}};
  auto tok = BpeTokenizer::from_json(j, "fixture");
  EXPECT_EQ(tok.tokenize("ab.ab"), (Ids{3, 2, 3}));
  EXPECT_EQ(tok.tokenize("abab"), (Ids{3, 3})) << "one piece: '.' matched no letter";
}

TEST(BpeTokenizerTest, RefusesWhatItDoesNotReadNamingTheField) {
  TempDir dir;
  auto refusal = [&](const std::function<void(json&)>& edit) {
    auto j = byte_level_fixture();
    edit(j);
    const auto path = dir.file("tokenizer.json");
    remat_io_test::write_text(path, j.dump());
    return remat_io_test::error_of([&] { BpeTokenizer::from_file(path); });
  };
  const std::string where = "tokenizer '" + dir.file("tokenizer.json") + "': ";
  EXPECT_EQ(
      refusal([](json& j) { j["normalizer"] = {{"type", "NFKC"}}; }),
      where + "normalizer: expected null (remat reads no normalizer), but got type \"NFKC\"");
  EXPECT_EQ(
      refusal([](json& j) { j["model"]["type"] = "WordPiece"; }),
      where + "model.type: expected \"BPE\" (remat reads BPE tokenizer.json), but got \"WordPiece\"");
  EXPECT_EQ(
      refusal([](json& j) { j["model"]["dropout"] = 0.1; }),
      where + "model.dropout: expected null (deterministic BPE), but got 0.1");
  EXPECT_EQ(
      refusal([](json& j) { j["model"]["merges"][1] = "l x"; }),
      where + "model.merges[1]: expected tokens of model.vocab, but \"lx\" is not one");
  EXPECT_NE(
      refusal([](json& j) {
        j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "▁"}};
      }).find(where + "pre_tokenizer.type: expected ByteLevel, Split, Digits"),
      std::string::npos);
  EXPECT_EQ(
      refusal([](json& j) { j["decoder"] = {{"type", "WordPiece"}}; }),
      where + "decoder.type: expected ByteLevel or null, but got \"WordPiece\"");
  EXPECT_NE(
      refusal([](json& j) {
        j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "(a"}}}, {"behavior", "Isolated"}};
      }).find(where + "pre_tokenizer: expected a pattern PCRE2 compiles, but at offset 2 of '(a'"),
      std::string::npos);
  remat_io_test::write_text(dir.file("bad.json"), "{\"model\": ");
  EXPECT_ERROR_CONTAINS(
      BpeTokenizer::from_file(dir.file("bad.json")),
      "tokenizer '" + dir.file("bad.json") + "': expected JSON, but got");
}

TEST(BpeTokenizerTest, FolderTokenizerPrefersTokenizerJsonThenModelThenVocab) {
  TempDir dir;
  EXPECT_EQ(remat::io::folder_tokenizer(dir.path()), "");
  remat_io_test::write_text(dir.file("vocab.txt"), "[PAD]\n[UNK]\n[CLS]\n[SEP]\nhi\n");
  EXPECT_EQ(remat::io::folder_tokenizer(dir.path()), dir.file("vocab.txt"));
  // BERT's folders have a WordPiece tokenizer.json beside vocab.txt: the
  // one remat reads is taken.
  auto wordpiece = byte_level_fixture();
  wordpiece["model"]["type"] = "WordPiece";
  remat_io_test::write_text(dir.file("tokenizer.json"), wordpiece.dump());
  EXPECT_EQ(remat::io::folder_tokenizer(dir.path()), dir.file("vocab.txt"));
  remat_io_test::write_text(dir.file("tokenizer.json"), byte_level_fixture().dump());
  EXPECT_EQ(remat::io::folder_tokenizer(dir.path()), dir.file("tokenizer.json"));
  EXPECT_EQ(remat::io::make_tokenizer(dir.path())->vocab_size(), 261);
  // Alone, a tokenizer.json remat refuses is the folder's refusal.
  TempDir lone;
  remat_io_test::write_text(lone.file("tokenizer.json"), wordpiece.dump());
  EXPECT_ERROR_CONTAINS(
      remat::io::folder_tokenizer(lone.path()),
      "tokenizer '" + lone.file("tokenizer.json") +
          "': model.type: expected \"BPE\" (remat reads BPE tokenizer.json), but got "
          "\"WordPiece\"; expected a folder whose tokenizer remat reads");
  remat_io_test::write_text(lone.file("tokenizer.model"), "not a model");
  EXPECT_ERROR_CONTAINS(
      remat::io::make_tokenizer(lone.file("tokenizer.model")),
      "tokenizer '" + lone.file("tokenizer.model") +
          "': expected a SentencePiece model, but byte 0 starts field 13 of wire "
          "type 6, which a ModelProto does not have");
}

// ----------------------------------------------------------- SentencePiece

// sentencepiece_model.proto written out by hand, so that these tests need
// neither the sentencepiece package nor a protobuf library.
std::string varint(uint64_t v) {
  std::string out;
  for (; v >= 0x80; v >>= 7) {
    out.push_back(static_cast<char>(0x80 | (v & 0x7F)));
  }
  out.push_back(static_cast<char>(v));
  return out;
}
std::string pb_varint(int field, uint64_t v) {
  return varint(uint64_t(field) << 3) + varint(v);
}
std::string pb_bytes(int field, const std::string& bytes) {
  return varint(uint64_t(field) << 3 | 2) + varint(bytes.size()) + bytes;
}
std::string pb_float(int field, float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  std::string out = varint(uint64_t(field) << 3 | 5);
  for (int i = 0; i < 4; ++i) {
    out.push_back(static_cast<char>(bits >> (8 * i)));
  }
  return out;
}
enum { kNormal = 1, kUnknown = 2, kControl = 3, kByte = 6 };
std::string sp_piece(const std::string& piece, float score, int type = kNormal) {
  return pb_bytes(1, pb_bytes(1, piece) + pb_float(2, score) + pb_varint(3, type));
}
const std::string kSpace = "\xe2\x96\x81"; // U+2581

// A BPE model with byte fallback, as Llama 2's: 0 <unk>, 1 <s>, 2 </s>,
// 3 + b the byte b, then 259 ▁, 260 h, 261 e, 262 l, 263 o, 264 i, 265 ll,
// 266 ▁h, 267 ▁he. The identity normalizer, with the proto's defaults
// (dummy prefix, extra whitespace removed).
std::string bpe_model(bool byte_fallback = true, int model_type = 2) {
  std::string m = sp_piece("<unk>", 0, kUnknown) + sp_piece("<s>", 0, kControl) +
      sp_piece("</s>", 0, kControl);
  const char* hex = "0123456789ABCDEF";
  for (int b = 0; b < 256; ++b) {
    m += sp_piece(std::string("<0x") + hex[b >> 4] + hex[b & 15] + ">", 0, kByte);
  }
  m += sp_piece(kSpace, -1) + sp_piece("h", -2) + sp_piece("e", -3) +
      sp_piece("l", -4) + sp_piece("o", -5) + sp_piece("i", -6) +
      sp_piece("ll", -0.5) + sp_piece(kSpace + "h", -0.7) +
      sp_piece(kSpace + "he", -0.9);
  m += pb_bytes(2, pb_varint(3, model_type) + pb_varint(35, byte_fallback) +
          pb_varint(40, 0) + pb_varint(41, 1) + pb_varint(42, 2) +
          pb_varint(43, uint64_t(-1)));
  m += pb_bytes(3, pb_bytes(1, "identity"));
  return m;
}

TEST(SentencePieceTokenizerTest, BpeMergesByScoreWithByteFallback) {
  TempDir dir;
  remat_io_test::write_text(dir.file("tokenizer.model"), bpe_model());
  const auto tok = remat::io::SentencePieceTokenizer::from_file(dir.file("tokenizer.model"));
  EXPECT_EQ(tok.vocab_size(), 268);
  EXPECT_EQ(tok.begin_id(), 1);
  EXPECT_EQ(tok.end_id(), 2);
  EXPECT_EQ(tok.unk_id(), 0);
  EXPECT_EQ(tok.pad_id(), 2); // no pad piece: EOS
  // ▁hello▁hié: ll (-0.5) first, then both ▁h (-0.7, the left one first),
  // then ▁he; é is in no piece, so its bytes C3 A9.
  const Ids ids = {267, 265, 263, 266, 264, 3 + 0xC3, 3 + 0xA9};
  EXPECT_EQ(tok.tokenize("  hello   hi\xc3\xa9 "), ids);
  EXPECT_EQ(tok.decode(ids), "hello hi\xc3\xa9");
  EXPECT_EQ(tok.encode("hi").input_ids, (Ids{1, 266, 264, 2}));
  EXPECT_EQ(tok.decode({1, 266, 264, 2}, /*skip_special=*/false), "<s>hi</s>");
  EXPECT_EQ(tok.decode({1, 266, 264, 2}), "hi");
  // A lone continuation byte decodes as U+FFFD.
  EXPECT_EQ(tok.decode({266, 3 + 0xA9}), "h\xef\xbf\xbd");
  EXPECT_TRUE(tok.tokenize("").empty());
  EXPECT_ERROR_CONTAINS(
      tok.decode({268}), "tokenizer '" + dir.file("tokenizer.model") +
          "': expected an id in [0, 268), but got 268");
}

TEST(SentencePieceTokenizerTest, UnigramTakesTheBestPathAndOneUnknownPerRun) {
  TempDir dir;
  const std::string model = sp_piece("<unk>", 0, kUnknown) +
      sp_piece(kSpace + "ab", -1) + sp_piece(kSpace + "a", -1) +
      sp_piece("b", -1.5) + sp_piece(kSpace, -2) + sp_piece("a", -2) +
      pb_bytes(2, pb_varint(3, 1)) + pb_bytes(3, pb_bytes(1, "identity"));
  remat_io_test::write_text(dir.file("spiece.model"), model);
  const auto tok = remat::io::SentencePieceTokenizer::from_file(dir.file("spiece.model"));
  EXPECT_EQ(tok.tokenize("ab"), (Ids{1}));       // ▁ab beats ▁a b
  EXPECT_EQ(tok.tokenize("abccb a"), (Ids{1, 0, 3, 2})); // ▁ab cc(unk) b ▁a
  EXPECT_EQ(tok.decode({1, 0, 3, 2}), "ab \xe2\x81\x87 b a");
  EXPECT_EQ(tok.begin_id(), -1);
  EXPECT_EQ(tok.pad_id(), 0); // neither pad nor EOS: the unknown piece
}

TEST(SentencePieceTokenizerTest, RefusesDamagedFilesNamingThem) {
  TempDir dir;
  const auto path = dir.file("tokenizer.model");
  const std::string prefix = "tokenizer '" + path + "': expected ";
  auto refusal = [&](const std::string& bytes) {
    remat_io_test::write_text(path, bytes);
    return remat_io_test::error_of(
        [&] { remat::io::SentencePieceTokenizer::from_file(path); });
  };
  const auto model = bpe_model();
  // Cut anywhere: a one-line error, never a crash.
  for (size_t cut : {size_t{1}, size_t{5}, model.size() / 2, model.size() - 1}) {
    const auto message = refusal(model.substr(0, cut));
    EXPECT_EQ(message.rfind(prefix + "a SentencePiece model, but ", 0), 0u)
        << "cut at " << cut << ": " << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << message;
  }
  EXPECT_EQ(
      refusal(model.substr(0, model.size() - 1)),
      prefix + "a SentencePiece model, but the field at byte " +
          std::to_string(model.size() - 12) +
          " is 10 bytes long, past the end of its message (9 bytes left)");
  // A length of 2^60: refused, not allocated.
  EXPECT_EQ(
      refusal("\x0a" + varint(uint64_t{1} << 60) + "xyz"),
      prefix + "a SentencePiece model, but the field at byte 0 is " +
          std::to_string(uint64_t{1} << 60) +
          " bytes long, past the end of its message (3 bytes left)");
  EXPECT_EQ(
      refusal(std::string(12, '\xff')),
      prefix + "a SentencePiece model, but the number at byte 0 is longer than 10 bytes");
  EXPECT_EQ(
      refusal(""), prefix + "a SentencePiece model, but it has no pieces (ModelProto field 1)");
  EXPECT_EQ(
      refusal(bpe_model(/*byte_fallback=*/false)),
      prefix + "a SentencePiece model, but piece 3 ('<0x00>') is a byte piece, but "
               "byte_fallback is off");
  EXPECT_EQ(
      refusal(bpe_model(true, /*model_type=*/3)),
      prefix + "a unigram or BPE SentencePiece model (the ones remat reads), but "
               "got model type WORD");
  EXPECT_EQ(
      refusal(sp_piece("a", 0) + sp_piece("a", 0, kUnknown) + sp_piece("a", 0)),
      prefix + "a SentencePiece model, but piece 2 ('a') is defined twice");
  // A charsmap whose trie size overruns it.
  EXPECT_EQ(
      refusal(sp_piece("<unk>", 0, kUnknown) +
              pb_bytes(3, pb_bytes(2, std::string("\xff\xff\x00\x00", 4) + "abc"))),
      prefix + "normalizer_spec.precompiled_charsmap to be a 4-byte trie size, "
               "the trie and its strings, but got 7 bytes for a trie of 65535");
}

// ---------------------------------------------------------------- reference

// Every document of the corpus, through each tokenizer: the same ids and the
// same decoded text as the Python libraries.
TEST(TokenizerCrossCheck, IdsMatchHuggingFaceTokenizersAndSentencePiece) {
  TempDir dir;
  const auto ref = remat_io_test::run_python_script("tokenizer_reference.py", dir.path());
  if (ref.skipped) {
    GTEST_SKIP() << ref.skip_reason;
  }
  ASSERT_EQ(ref.status, 0) << ref.output;
  const auto corpus = json::parse(remat::io::read_file(dir.file("corpus.json")))
                          .get<std::vector<std::string>>();
  const auto expected = json::parse(remat::io::read_file(dir.file("expected.json")));
  ASSERT_GE(corpus.size(), 1000u);
  for (const std::string name : {"gpt2", "llama3", "roberta", "sp-bpe", "sp-unigram"}) {
    const bool sp = name.rfind("sp-", 0) == 0;
    const auto path = remat::io::folder_tokenizer(dir.file(name));
    ASSERT_EQ(path, dir.file(name) + (sp ? "/tokenizer.model" : "/tokenizer.json"));
    const auto tok = remat::io::make_tokenizer(path);
    const auto& e = expected[name];
    EXPECT_EQ(tok->vocab_size(), e["vocab_size"].get<int64_t>()) << name;
    if (sp) {
      EXPECT_EQ(tok->begin_id(), e["bos"].get<int64_t>()) << name;
      EXPECT_EQ(tok->end_id(), e["eos"].get<int64_t>()) << name;
      const auto pad = e["pad"].get<int64_t>();
      EXPECT_EQ(tok->pad_id(), pad >= 0 ? pad : e["eos"].get<int64_t>()) << name;
    }
    size_t id_mismatches = 0, text_mismatches = 0;
    for (size_t i = 0; i < corpus.size(); ++i) {
      const auto want = e["ids"][i].get<Ids>();
      // tokenizers' encode() adds the post-processor's tokens, as
      // remat's encode() does; sentencepiece's encode() adds none.
      const auto got = sp ? tok->tokenize(corpus[i]) : tok->encode(corpus[i]).input_ids;
      if (got != want && ++id_mismatches <= 3) {
        ADD_FAILURE() << name << ": document " << i << " \"" << corpus[i]
                      << "\": remat " << json(got).dump() << ", reference "
                      << json(want).dump();
      }
      const auto text = tok->decode(want);
      if (text != e["decoded"][i].get<std::string>() && ++text_mismatches <= 3) {
        ADD_FAILURE() << name << ": decode of document " << i << ": remat \""
                      << text << "\", reference \""
                      << e["decoded"][i].get<std::string>() << "\"";
      }
    }
    EXPECT_EQ(id_mismatches, 0u) << name << ", of " << corpus.size() << " documents";
    EXPECT_EQ(text_mismatches, 0u) << name << ", of " << corpus.size() << " documents";
    std::printf("[ tokenizer ] %s: %zu documents, %zu id mismatches, %zu decode mismatches\n",
                name.c_str(), corpus.size(), id_mismatches, text_mismatches);
  }
}

} // namespace
