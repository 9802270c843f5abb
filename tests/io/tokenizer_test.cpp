#include "io/io_testing.h"
#include "remat/io/file.h"
#include "remat/io/tokenizer.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cstdio>

namespace {

using remat::io::ByteTokenizer;
using remat::io::WordPieceTokenizer;
using remat_io_test::TempDir;
using Ids = std::vector<int64_t>;
using Words = std::vector<std::string>;

const std::vector<std::string> kVocab{
    "[PAD]",  "[UNK]", "[CLS]", "[SEP]", "[MASK]", // 0-4
    "the",    "quick", "brown", "fox",   "##es",
    "jump",   "##ed",  "over", // 5-12
    "lazy",   "dog",   "cafe",  "!",     ",",
    ".",      "'",     "s",     "un",    "##aff", // 13-22
    "##able", "中",    "文",    "naive", "hello",
    "world",  "?",     "a",     "##a", // 23-31
};

class TokenizerTest : public ::testing::Test {
 protected:
  WordPieceTokenizer tok{kVocab};
};

TEST_F(TokenizerTest, EncodesASentenceWithExactIds) {
  auto enc = tok.encode("The quick brown foxes jumped over the lazy dog.");
  EXPECT_EQ(
      enc.input_ids, (Ids{2, 5, 6, 7, 8, 9, 10, 11, 12, 5, 13, 14, 18, 3}));
  EXPECT_EQ(enc.attention_mask, Ids(14, 1));
  EXPECT_EQ(
      tok.tokenize_to_strings("unaffable"), (Words{"un", "##aff", "##able"}));
  EXPECT_EQ(tok.vocab_size(), 32);
  EXPECT_EQ(tok.pad_id(), 0);
  EXPECT_EQ(tok.begin_id(), 2);
  EXPECT_EQ(tok.end_id(), 3);
}

TEST_F(TokenizerTest, LowerCasesAndStripsAccents) {
  EXPECT_EQ(tok.tokenize("Café"), Ids{15});
  EXPECT_EQ(tok.tokenize("CAFÉ"), Ids{15});
  EXPECT_EQ(tok.tokenize("cafe\u0301"), Ids{15}) << "a combining accent";
  EXPECT_EQ(tok.tokenize("NAÏVE"), Ids{26});
  EXPECT_EQ(
      tok.basic_tokenize("Ŝtŕåńġę Œuvre Łódź ß"),
      (Words{"strange", "œuvre", "łodz", "ß"}));
}

TEST_F(TokenizerTest, SplitsOnWhitespaceAndPunctuation) {
  EXPECT_EQ(
      tok.tokenize_to_strings("hello,world!"),
      (Words{"hello", ",", "world", "!"}));
  EXPECT_EQ(tok.tokenize_to_strings("dog's"), (Words{"dog", "'", "s"}));
  EXPECT_EQ(tok.tokenize_to_strings("  the\tdog\n\r"), (Words{"the", "dog"}));
  EXPECT_EQ(tok.tokenize_to_strings("the\u00a0dog"), (Words{"the", "dog"}))
      << "no-break space";
  EXPECT_EQ(tok.basic_tokenize("a$b^c"), (Words{"a", "$", "b", "^", "c"}))
      << "ASCII symbols";
  EXPECT_EQ(
      tok.basic_tokenize("«hi»—ok¿"), (Words{"«", "hi", "»", "—", "ok", "¿"}));
}

TEST_F(TokenizerTest, SeparatesCjkAndDropsControlCharacters) {
  EXPECT_EQ(
      tok.tokenize_to_strings("the中文dog"), (Words{"the", "中", "文", "dog"}));
  // Control and format characters vanish, joining their neighbours.
  EXPECT_EQ(
      tok.basic_tokenize("the\x01"
                         "dog"),
      Words{"thedog"});
  EXPECT_EQ(tok.basic_tokenize("the\u200bdog"), Words{"thedog"})
      << "zero-width space (Cf)";
  EXPECT_EQ(
      tok.basic_tokenize("\xff"
                         "dog"),
      Words{"dog"})
      << "invalid UTF-8";
  EXPECT_EQ(tok.basic_tokenize(std::string("a\0b", 3)), Words{"ab"});
}

TEST_F(TokenizerTest, UnknownWordsBecomeOneUnk) {
  EXPECT_EQ(tok.tokenize("xyzzy"), Ids{1});
  // "fox" matches, "##y" does not: the whole word is [UNK], not fox + [UNK].
  EXPECT_EQ(tok.tokenize("foxy dog"), (Ids{1, 14}));
  Ids hundred(100, 31); // a ##a ##a ...
  hundred[0] = 30;
  EXPECT_EQ(tok.tokenize(std::string(100, 'a')), hundred)
      << "100 characters still match";
  EXPECT_EQ(tok.tokenize(std::string(101, 'a')), Ids{1})
      << "over 100 characters";
  // Characters, not bytes, count: 60 two-byte letters are 60 characters.
  std::string accented;
  for (int i = 0; i < 60; ++i) {
    accented += "á";
  }
  EXPECT_NE(tok.tokenize(accented), Ids{1});
}

TEST_F(TokenizerTest, TruncatesKeepingSepAndPads) {
  auto enc = tok.encode("the quick brown fox jumped", 5);
  EXPECT_EQ(enc.input_ids, (Ids{2, 5, 6, 7, 3}));
  auto padded = tok.encode("the dog", 6, /*pad=*/true);
  EXPECT_EQ(padded.input_ids, (Ids{2, 5, 14, 3, 0, 0}));
  EXPECT_EQ(padded.attention_mask, (Ids{1, 1, 1, 1, 0, 0}));
  EXPECT_EQ(tok.encode("", 4).input_ids, (Ids{2, 3}));
  EXPECT_ERROR_CONTAINS(
      tok.encode("x", 1), "expected max_len 0 (no limit) or at least 2");
  EXPECT_ERROR_CONTAINS(tok.encode("x", 0, true), "padding needs max_len > 0");
}

TEST_F(TokenizerTest, Decodes) {
  EXPECT_EQ(tok.decode({2, 8, 9, 10, 11, 1, 3, 0}), "foxes jumped");
  EXPECT_EQ(
      tok.decode({2, 8, 9, 3}, /*skip_special=*/false), "[CLS] foxes [SEP]");
  EXPECT_ERROR_CONTAINS(
      tok.decode({99}), "expected an id in [0, 32), but got 99");
}

TEST(WordPieceFileTest, ReadsVocabFilesAndNamesMissingSpecials) {
  TempDir dir;
  remat_io_test::write_text(
      dir.file("vocab.txt"), "[PAD]\r\n[UNK]\r\n[CLS]\r\n[SEP]\r\nhi\r\n");
  auto tok = WordPieceTokenizer::from_file(dir.file("vocab.txt"));
  EXPECT_EQ(tok.vocab_size(), 5);
  EXPECT_EQ(tok.encode("Hi").input_ids, (Ids{2, 4, 3}));
  remat_io_test::write_text(dir.file("bad.txt"), "[PAD]\n[CLS]\n[SEP]\n");
  EXPECT_ERROR_CONTAINS(
      WordPieceTokenizer::from_file(dir.file("bad.txt")),
      "vocabulary '" + dir.file("bad.txt") +
          "': WordPieceTokenizer: expected the special token '[UNK]'");
  // A token that is not UTF-8 text, or holds a NUL, is a damaged file.
  const std::string specials = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n";
  remat_io_test::write_text(dir.file("latin1.txt"), specials + "ok\ncaf\xe9\n");
  EXPECT_ERROR_CONTAINS(
      WordPieceTokenizer::from_file(dir.file("latin1.txt")),
      "vocabulary '" + dir.file("latin1.txt") +
          "': line 6: expected a token of UTF-8 text, but byte 4 (0xE9) is not UTF-8");
  remat_io_test::write_text(
      dir.file("nul.txt"), specials + std::string("a\0b\n", 4));
  EXPECT_ERROR_CONTAINS(
      WordPieceTokenizer::from_file(dir.file("nul.txt")),
      "line 5: expected a token of UTF-8 text, but byte 2 is NUL");
  remat_io_test::write_text(dir.file("overlong.txt"), specials + "\xc0\xaf\n");
  EXPECT_ERROR_CONTAINS(
      WordPieceTokenizer::from_file(dir.file("overlong.txt")), "byte 1 (0xC0) is not UTF-8");
  remat_io_test::write_text(dir.file("surrogate.txt"), specials + "\xed\xa0\x80\n");
  EXPECT_ERROR_CONTAINS(
      WordPieceTokenizer::from_file(dir.file("surrogate.txt")), "byte 1 (0xED) is not UTF-8");
  EXPECT_EQ(remat::io::make_tokenizer("")->vocab_size(), 259);
  EXPECT_EQ(remat::io::make_tokenizer(dir.file("vocab.txt"))->vocab_size(), 5);
}

TEST(ByteTokenizerTest, RoundTripsAnyText) {
  ByteTokenizer tok;
  const std::string text = "héllo\n\x00\xff";
  auto enc = tok.encode(std::string(text.data(), 9));
  EXPECT_EQ(enc.input_ids.front(), ByteTokenizer::kBos);
  EXPECT_EQ(enc.input_ids.back(), ByteTokenizer::kEos);
  EXPECT_EQ(enc.input_ids[1], 'h');
  EXPECT_EQ(enc.input_ids[2], 0xC3);
  EXPECT_EQ(enc.input_ids[3], 0xA9);
  EXPECT_EQ(tok.decode(enc.input_ids), std::string(text.data(), 9));
  EXPECT_EQ(tok.decode({257, 104, 105, 258, 256}, false), "<bos>hi<eos><pad>");
  EXPECT_EQ(tok.encode("abcdef", 4).input_ids, (Ids{257, 'a', 'b', 258}));
  EXPECT_EQ(tok.pad_id(), 256);
}

// The Unicode tables against Python's unicodedata, through BERT's
// BasicTokenizer written in Python.
TEST(WordPieceCrossCheck, BasicTokenizerMatchesPythonUnicodedata) {
  if (std::system(
          (std::string(REMAT_PYTHON) + " -c 'import unicodedata' 2>/dev/null")
              .c_str()) != 0) {
    GTEST_SKIP() << REMAT_PYTHON << " is not there";
  }
  const std::vector<std::string> texts{
      "The Quick, brown fox's \"jump\"!",
      "Ærøskøbing, Ångström; façade — naïve résumé (déjà vu)",
      "Ĳssel Ŋoma ŉ Ŀl Ǆemal ǅ ǈ ǹ Ș ț Ạ ệ ỹ",
      "Αθήνα ΆΈΉ ϊΰ Ἀθῆναι",
      "Москва Ёлка Й й Ѓ",
      "中文字符 and 日本語のかな 한국어",
      "tab\there\u00a0nbsp\u3000ideo\u2009thin\u200bzw\u00adshy",
      "¿Qué? ¡Sí! «guillemets» „low” ‘single’ …ellipsis… •bullet",
      "e\u0301 o\u0308 combining",
      "emoji 😀 and symbols © ® ™ € £ ¥ ° ± × ÷",
      "math ∑ x² ½ and ﬁ ligature",
      "control\x07"
      "bell\x1b"
      "escape",
  };
  TempDir dir;
  remat_io_test::write_text(dir.file("in.json"), nlohmann::json(texts).dump());
  const std::string command = std::string(REMAT_PYTHON) + " " +
      REMAT_SOURCE_DIR + "/tests/io/basic_tokenizer_reference.py " +
      dir.file("in.json") + " " + dir.file("out.json");
  ASSERT_EQ(std::system(command.c_str()), 0) << command;
  auto expected =
      nlohmann::json::parse(remat::io::read_file(dir.file("out.json")));
  WordPieceTokenizer tok{kVocab};
  ASSERT_EQ(expected.size(), texts.size());
  for (size_t i = 0; i < texts.size(); ++i) {
    EXPECT_EQ(tok.basic_tokenize(texts[i]), expected[i].get<Words>())
        << texts[i];
  }
}

} // namespace
