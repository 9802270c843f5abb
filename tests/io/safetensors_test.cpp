#include "io/io_testing.h"
#include "remat/io/file.h"
#include "remat/io/safetensors.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstring>
#include <filesystem>

#include <sys/stat.h>

namespace {

using remat_io_test::TempDir;

// The bytes of a safetensors file with `header` as its JSON, unpadded.
std::string make_file(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) {
    out[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  }
  return out + header + data;
}

remat::io::SafetensorsFile decode(const std::string& bytes) {
  return remat::io::decode_safetensors(
      bytes.data(), bytes.size(), "x.safetensors");
}

uint64_t header_length(const std::string& bytes) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) {
    n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  }
  return n;
}

class SafetensorsTest : public ::testing::Test {
 protected:
  SafetensorsTest() {
    torch::manual_seed(0);
  }
};

TEST_F(SafetensorsTest, RoundTripsEveryDtypeShapeAndMetadata) {
  std::map<std::string, torch::Tensor> tensors{
      {"f64", torch::randn({2, 3}, torch::kFloat64)},
      {"f32", torch::randn({4, 5})},
      {"f16", torch::randn({3}).to(torch::kFloat16)},
      {"bf16", torch::randn({2, 2, 2}).to(torch::kBFloat16)},
      {"i64", torch::arange(6, torch::kLong).view({3, 2})},
      {"i32", torch::arange(5, torch::kInt)},
      {"i16", torch::arange(3, torch::kShort)},
      {"i8", torch::tensor({-3, 0, 7}, torch::kChar)},
      {"u8", torch::tensor({0, 200, 255}, torch::kByte)},
      {"bool", torch::tensor({true, false, true})},
      {"scalar", torch::tensor(3.5)},
      {"empty", torch::zeros({0, 4})},
      {"transposed", torch::randn({3, 4}).t()}, // not contiguous
  };
  TempDir dir;
  const auto path = dir.file("all.safetensors");
  remat::io::save_safetensors(
      path, tensors, {{"format", "pt"}, {"note", "ünïcode"}});
  auto back = remat::io::read_safetensors(path);
  ASSERT_EQ(back.tensors.size(), tensors.size());
  for (const auto& kv : tensors) {
    const auto& got = back.tensors.at(kv.first);
    EXPECT_EQ(got.scalar_type(), kv.second.scalar_type()) << kv.first;
    EXPECT_EQ(got.sizes(), kv.second.sizes()) << kv.first;
    EXPECT_TRUE(got.is_contiguous()) << kv.first;
    EXPECT_TRUE(torch::equal(got, kv.second)) << kv.first;
  }
  EXPECT_EQ(back.metadata.at("format"), "pt");
  EXPECT_EQ(back.metadata.at("note"), "ünïcode");
  EXPECT_EQ(remat::io::load_safetensors_metadata(path), back.metadata);
  // Nothing but the file itself is left in the folder.
  EXPECT_EQ(
      std::distance(std::filesystem::directory_iterator(dir.path()), {}), 1);
}

TEST_F(SafetensorsTest, WritesTheReferenceLayout) {
  auto bytes = remat::io::encode_safetensors(
      {{"b", torch::ones({3}, torch::kFloat16)},
       {"a", torch::ones({2}, torch::kFloat16)},
       {"c", torch::zeros({1}, torch::kFloat64)}},
      {{"format", "pt"}});
  const auto n = header_length(bytes);
  EXPECT_EQ((8 + n) % 8, 0u) << "header padded to 8 bytes";
  const std::string header = bytes.substr(8, n);
  // Compact JSON, metadata first, then larger items first and names sorted;
  // padding with spaces.
  const std::string expected =
      "{\"__metadata__\":{\"format\":\"pt\"},"
      "\"c\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]},"
      "\"a\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[8,12]},"
      "\"b\":{\"dtype\":\"F16\",\"shape\":[3],\"data_offsets\":[12,18]}}";
  EXPECT_EQ(header.substr(0, expected.size()), expected);
  EXPECT_EQ(header.find_first_not_of(' ', expected.size()), std::string::npos);
  EXPECT_EQ(bytes.size(), 8 + n + 18);
}

TEST_F(SafetensorsTest, ReadsKeysInAnyOrder) {
  std::string data(16, '\0');
  const int32_t values[] = {1, -2, 3, 400000};
  std::memcpy(&data[0], values, 16);
  auto file = decode(make_file(
      "{\"t\" : {\"shape\": [2, 2], \"data_offsets\": [0, 16], \"dtype\": \"I32\"},"
      " \"__metadata__\": {\"k\": \"v\"}}  ",
      data));
  EXPECT_TRUE(torch::equal(
      file.tensors.at("t"),
      torch::tensor({1, -2, 3, 400000}, torch::kInt).view({2, 2})));
  EXPECT_EQ(file.metadata.at("k"), "v");
}

struct BadCase {
  const char* what;
  std::string bytes;
  const char* message;
};

TEST_F(SafetensorsTest, RefusesMalformedFilesWithClearMessages) {
  const std::string f32x2 = "\"dtype\":\"F32\",\"shape\":[2]";
  std::string huge_length(8, '\xff');
  std::vector<BadCase> cases{
      {"shorter than the length field", std::string("\x10\0\0", 3),
       "is truncated: expected at least 8 bytes"},
      {"header beyond the file", make_file("{}", "").substr(0, 9),
       "the header length is 2 bytes but only 1"},
      {"absurd header length", huge_length + "{}",
       "expected a header of at most"},
      {"not JSON", make_file("{\"a\":", ""), "invalid JSON header"},
      {"not an object", make_file("[1, 2]", ""), "start with '{'"},
      {"leading space", make_file(" {}", ""), "start with '{', but got ' '"},
      {"unknown dtype",
       make_file(
           "{\"w\":{\"dtype\":\"F8\",\"shape\":[1],\"data_offsets\":[0,1]}}",
           "x"),
       "tensor 'w': expected dtype F64, F32"},
      {"offsets beyond the data",
       make_file("{\"w\":{" + f32x2 + ",\"data_offsets\":[0,8]}}", "1234"),
       "tensor 'w': data_offsets [0, 8] go beyond the 4 bytes"},
      {"end before begin",
       make_file(
           "{\"w\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,0]}}",
           "12345678"),
       "tensor 'w': expected data_offsets [begin, end] with end >= begin, but got [8, 0]"},
      {"wrong byte size",
       make_file(
           "{\"w\":{" + f32x2 + ",\"data_offsets\":[0,12]}}", "123456789012"),
       "tensor 'w': expected 8 bytes (shape [2] of F32), but data_offsets [0, 12] hold 12"},
      {"overlap",
       make_file(
           "{\"a\":{" + f32x2 + ",\"data_offsets\":[0,8]},\"b\":{" + f32x2 +
               ",\"data_offsets\":[4,12]}}",
           "123456789012"),
       "tensor 'b': data_offsets [4, 12] overlap tensor 'a'"},
      {"hole",
       make_file(
           "{\"a\":{" + f32x2 + ",\"data_offsets\":[4,12]}}", "123456789012"),
       "tensor 'a': expected data to start at byte 0 (tensors must cover the data without holes)"},
      {"trailing bytes",
       make_file(
           "{\"a\":{" + f32x2 + ",\"data_offsets\":[0,8]}}", "1234567890"),
       "expected the tensors to cover all 10 bytes of data, but they end at byte 8"},
      {"duplicate name",
       make_file(
           "{\"a\":{" + f32x2 + ",\"data_offsets\":[0,8]},\"a\":{" + f32x2 +
               ",\"data_offsets\":[8,16]}}",
           "1234567890123456"),
       "tensor 'a' appears twice"},
      {"negative size",
       make_file(
           "{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,0]}}",
           ""),
       "tensor 'a': expected every shape entry to be a non-negative integer, but got -1"},
      {"fractional offset",
       make_file(
           "{\"a\":{" + f32x2 + ",\"data_offsets\":[0,8.0]}}", "12345678"),
       "expected data_offsets to be a non-negative integer"},
      {"one offset",
       make_file("{\"a\":{" + f32x2 + ",\"data_offsets\":[0]}}", ""),
       "expected a field \"data_offsets\" of two integers"},
      {"no dtype",
       make_file("{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", "1234"),
       "tensor 'a': expected a string field \"dtype\""},
      {"shape overflow",
       make_file(
           "{\"a\":{\"dtype\":\"F64\",\"shape\":[4294967296,4294967296],"
           "\"data_offsets\":[0,8]}}",
           "12345678"),
       "overflows 64 bits"},
      {"metadata not strings", make_file("{\"__metadata__\":{\"k\":1}}", ""),
       "expected every \"__metadata__\" value to be a string"},
      {"deeply nested",
       make_file(
           "{\"a\":" + std::string(100000, '[') + std::string(100000, ']') +
               "}",
           ""),
       "tensor 'a': expected an object with dtype, shape and data_offsets"},
      {"bool byte 2",
       make_file(
           "{\"m\":{\"dtype\":\"BOOL\",\"shape\":[2],\"data_offsets\":[0,2]}}",
           std::string("\x01\x02", 2)),
       "tensor 'm': expected BOOL bytes 0 or 1, but got 2"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    EXPECT_ERROR_CONTAINS(decode(c.bytes), c.message);
    EXPECT_ERROR_CONTAINS(decode(c.bytes), "safetensors file 'x.safetensors'");
    const auto message = remat_io_test::error_of([&] { decode(c.bytes); });
    EXPECT_EQ(message.find('\n'), std::string::npos) << "one line: " << message;
  }
}

TEST_F(SafetensorsTest, NamesTheFileOnDisk) {
  TempDir dir;
  EXPECT_ERROR_CONTAINS(
      remat::io::load_safetensors(dir.file("absent.safetensors")),
      "could not open safetensors file '" + dir.file("absent.safetensors") +
          "'");
  remat_io_test::write_text(dir.file("short.safetensors"), "abc");
  EXPECT_ERROR_CONTAINS(
      remat::io::load_safetensors(dir.file("short.safetensors")),
      "safetensors file '" + dir.file("short.safetensors") + "' is truncated");
}

// Every prefix of a valid file, and the file with header bytes changed, either
// loads or throws c10::Error: nothing crashes or reads out of bounds.
TEST_F(SafetensorsTest, TruncatedOrCorruptedFilesLoadOrThrow) {
  const auto valid = remat::io::encode_safetensors(
      {{"w", torch::randn({3, 2})},
       {"b", torch::arange(4, torch::kLong)},
       {"m", torch::tensor({true, false})},
       {"h", torch::randn({5}).to(torch::kBFloat16)}},
      {{"format", "pt"}});
  auto outcome = [](const std::string& bytes) {
    try {
      auto f =
          remat::io::decode_safetensors(bytes.data(), bytes.size(), "fuzz");
      for (auto& kv : f.tensors) {
        (void)kv.second.sum().item<double>(); // touch every loaded byte
      }
      return 1;
    } catch (const c10::Error&) {
      return 0;
    }
  };
  ASSERT_EQ(outcome(valid), 1);
  for (size_t len = 0; len < valid.size(); ++len) {
    // Bounds-checked copies: a read past `len` would touch freed memory under
    // ASan.
    std::string cut = valid.substr(0, len);
    EXPECT_EQ(outcome(cut), 0)
        << "a file cut at " << len << " bytes must be refused";
  }
  const size_t header_end = 8 + header_length(valid);
  int loaded = 0, refused = 0;
  for (size_t pos = 0; pos < header_end; ++pos) {
    for (unsigned char mask : {0x01, 0x02, 0x10, 0x20, 0x80, 0xFF}) {
      std::string bad = valid;
      bad[pos] = static_cast<char>(bad[pos] ^ mask);
      (outcome(bad) ? loaded : refused)++;
    }
  }
  // Seeded random multi-byte corruption of the header and the data.
  uint64_t state = 12345;
  auto next = [&] {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return state >> 33;
  };
  for (int trial = 0; trial < 400; ++trial) {
    std::string bad = valid;
    const int changes = 1 + static_cast<int>(next() % 4);
    for (int c = 0; c < changes; ++c) {
      bad[next() % bad.size()] = static_cast<char>(next() & 0xFF);
    }
    (outcome(bad) ? loaded : refused)++;
  }
  EXPECT_GT(refused, 0);
  EXPECT_GT(loaded + refused, 6 * static_cast<int>(header_end));

  // The file reader too, on a few prefixes.
  TempDir dir;
  for (size_t len :
       {size_t(0), size_t(7), size_t(8), header_end - 1, header_end,
        valid.size() - 1}) {
    remat_io_test::write_text(
        dir.file("cut.safetensors"), valid.substr(0, len));
    EXPECT_ERROR_CONTAINS(
        remat::io::load_safetensors(dir.file("cut.safetensors")),
        "cut.safetensors");
  }
}

TEST_F(SafetensorsTest, RefusesWhatTheFormatCannotHold) {
  EXPECT_ERROR_CONTAINS(
      remat::io::encode_safetensors(
          {{"c", torch::zeros({2}, torch::kComplexFloat)}}),
      "safetensors: expected a dtype among F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, but got ComplexFloat");
  EXPECT_ERROR_CONTAINS(
      remat::io::encode_safetensors({{"__metadata__", torch::zeros({2})}}),
      "reserved \"__metadata__\"");
  EXPECT_ERROR_CONTAINS(
      remat::io::encode_safetensors({{"u", torch::Tensor()}}),
      "tensor 'u' is undefined");
}

// Files a user names can be anything: a device that never ends, a FIFO whose
// open would block, a folder. They are refused before they are opened.
TEST(ReadFileTest, RefusesWhatIsNotARegularFileAndFilesPastTheirBound) {
  TempDir dir;
  EXPECT_ERROR_CONTAINS(
      remat::io::read_file("/dev/zero"),
      "could not open '/dev/zero': expected a regular file, but it is a character device");
  EXPECT_ERROR_CONTAINS(
      remat::io::read_file(dir.path()), "expected a regular file, but it is a folder");
  const auto fifo = dir.file("fifo");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_ERROR_CONTAINS(
      remat::io::read_file(fifo), "expected a regular file, but it is a FIFO");
  EXPECT_ERROR_CONTAINS(
      remat::io::load_safetensors(fifo),
      "could not open safetensors file '" + fifo + "': expected a regular file");
  remat_io_test::write_text(dir.file("big"), std::string(100, 'x'));
  EXPECT_EQ(remat::io::read_file(dir.file("big"), 100).size(), 100u);
  EXPECT_ERROR_CONTAINS(
      remat::io::read_file(dir.file("big"), 99),
      "is 100 bytes; expected at most 99 bytes");
}

TEST(AtomicFileTest, ReplacesOrLeavesTheOldFile) {
  TempDir dir;
  const auto path = dir.file("w.safetensors");
  remat::io::save_safetensors(path, {{"x", torch::ones({2})}});
  const auto before = remat::io::read_file(path);
  // A failing save (unsupported dtype) leaves the old file and no temporary.
  EXPECT_ERROR_CONTAINS(
      remat::io::save_safetensors(
          path, {{"x", torch::zeros({2}, torch::kComplexDouble)}}),
      "expected a dtype among");
  EXPECT_EQ(remat::io::read_file(path), before);
  {
    remat::io::AtomicFile f(path);
    f.write("partial");
    EXPECT_TRUE(std::filesystem::exists(f.temp_path()));
    EXPECT_NE(f.temp_path().find(path + ".tmp."), std::string::npos);
    // Destroyed without commit(): as if the process died mid-write.
  }
  EXPECT_EQ(remat::io::read_file(path), before);
  EXPECT_EQ(
      std::distance(std::filesystem::directory_iterator(dir.path()), {}), 1);
  remat::io::write_file_atomic(path, "new");
  EXPECT_EQ(remat::io::read_file(path), "new");
  EXPECT_ERROR_CONTAINS(
      remat::io::write_file_atomic(dir.file("no/such/dir/f"), "x"),
      "could not create '");
}

} // namespace
