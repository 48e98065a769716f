// ArrowIpcReader against files written by Arrow JS (tools/make_parquet_fixtures.js): the streaming format HF
// `datasets` caches, the file format (schema only in the footer), the pre-0.15 stream without continuation
// markers, zstd / lz4-frame compressed bodies, dictionaries replaced between batches; rows must equal the expected
// JSON (read back by Arrow JS when the fixtures were made). Then ranges across batches, column selection, early
// stop, and corrupt files: every truncation either throws am::Error or yields a prefix of the right rows, and
// random mutations throw am::Error or read, never crash.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/arrow_ipc.h"

using namespace am;
using am::io::ArrowIpcReader;
using Json = nlohmann::ordered_json;
namespace fs = std::filesystem;

namespace {

std::string fixture(const std::string& name) { return std::string(AM_SOURCE_DIR) + "/tests/fixtures/parquet/" + name; }

std::string slurp(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

Json expected(const std::string& dataset) { return Json::parse(slurp(fixture(dataset + ".json"))); }

struct TempFile {
  std::string path;
  TempFile() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    // tmpfs when there is one: these tests rewrite the file hundreds of times.
    const fs::path dir = fs::is_directory("/dev/shm") ? fs::path("/dev/shm") : fs::temp_directory_path();
    path = (dir / ("am_ipc_" + std::to_string(::getpid()) + "_" + info->name())).string();
  }
  ~TempFile() { fs::remove(path); }
  const std::string& write(const std::string& bytes) const {
    std::ofstream(path, std::ios::binary | std::ios::trunc).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    return path;
  }
};

std::vector<Json> read(const ArrowIpcReader& r, int64_t begin, int64_t end, const std::vector<std::string>& cols = {}) {
  std::vector<Json> out;
  r.read_rows(begin, end, [&](int64_t i, Json&& row) {
    EXPECT_EQ(i, std::max<int64_t>(begin, 0) + static_cast<int64_t>(out.size()));
    out.push_back(std::move(row));
    return true;
  }, cols);
  return out;
}

void expect_rows(const std::string& file, const Json& want) {
  SCOPED_TRACE(file);
  const ArrowIpcReader r(fixture(file));
  ASSERT_EQ(r.num_rows(), static_cast<int64_t>(want.size()));
  std::vector<std::string> names;
  for (const auto& [k, v] : want[0].items()) names.push_back(k);
  EXPECT_EQ(r.column_names(), names);
  const auto rows = read(r, 0, r.num_rows());
  ASSERT_EQ(rows.size(), want.size());
  for (size_t i = 0; i < rows.size(); ++i) EXPECT_EQ(rows[i], want[i]) << "row " << i << ": got " << rows[i].dump();
}

}  // namespace

TEST(ArrowIpc, HfSquadAndChatTables) {
  // squad: answers struct{text: list<string>, answer_start: list<int32>}, batches of 5 rows, HF schema metadata.
  for (const char* f : {"squad_stream.arrow", "squad_file.arrow", "squad_stream_zstd.arrow"}) expect_rows(f, expected("squad"));
  // chat: messages list<struct{role, content}> with empty and null lists; a dictionary column.
  for (const char* f : {"chat_stream.arrow", "chat_stream_lz4.arrow", "chat_legacy.arrow"}) expect_rows(f, expected("chat"));
}

TEST(ArrowIpc, EveryType) {
  // int8..64, uint8..64, float16/32/64, bool, utf8, large_utf8, binary, date32, timestamp, list, fixed-size list,
  // struct, null, dictionary (replaced every 2-row batch in the stream), map.
  expect_rows("types_file.arrow", expected("types"));
  expect_rows("types_stream.arrow", expected("types"));
}

// A dictionary extended by delta batches between record batches; a range in the last batch still sees every
// delta sent before it.
TEST(ArrowIpc, DeltaDictionaries) {
  const Json want = expected("dict_delta");
  for (const char* f : {"dict_delta_stream.arrow", "dict_delta_file.arrow"}) {
    expect_rows(f, want);
    const auto tail = read(ArrowIpcReader(fixture(f)), 5, 8);
    ASSERT_EQ(tail.size(), 3u);
    EXPECT_EQ(tail[0]["tag"], "épsilon");  // index 4: only in the second delta
    EXPECT_EQ(tail[2]["tag"], "gamma");
  }
}

TEST(ArrowIpc, RangesSelectionEarlyStop) {
  const Json want = expected("squad");
  for (const char* f : {"squad_stream.arrow", "squad_file.arrow"}) {
    const ArrowIpcReader r(fixture(f));  // batches of 5 rows
    for (auto [b, e] : std::vector<std::pair<int64_t, int64_t>>{{3, 12}, {5, 10}, {21, 22}, {19, 50}, {-3, 1}, {8, 8}}) {
      const auto rows = read(r, b, e, {"answers", "id"});
      const int64_t lo = std::max<int64_t>(b, 0), hi = std::min<int64_t>(e, 22);
      ASSERT_EQ(static_cast<int64_t>(rows.size()), std::max<int64_t>(hi - lo, 0)) << f << " " << b << ".." << e;
      for (size_t i = 0; i < rows.size(); ++i) {
        EXPECT_EQ(rows[i].begin().key(), "answers");
        EXPECT_EQ(rows[i].size(), 2u);
        EXPECT_EQ(rows[i]["answers"], want[lo + i]["answers"]);
        EXPECT_EQ(rows[i]["id"], want[lo + i]["id"]);
      }
    }
    int calls = 0;
    r.read_rows(2, 20, [&](int64_t, Json&&) { return ++calls < 4; });
    EXPECT_EQ(calls, 4);
    EXPECT_THROW(read(r, 0, 1, {"nope"}), FormatError);
  }
}

TEST(ArrowIpc, BadFilesNameTheFile) {
  TempFile t;
  EXPECT_THROW(ArrowIpcReader("/nonexistent/x.arrow"), IoError);
  EXPECT_THROW(ArrowIpcReader(fixture("")), IoError);
  const std::string good = slurp(fixture("squad_file.arrow"));
  for (const std::string& bad : {std::string(), std::string("ARROW1\0\0", 8), "PAR1" + good.substr(4),
                                 good.substr(0, good.size() - 3), std::string(12, '\xff')}) {
    try {
      ArrowIpcReader r(t.write(bad));
      read(r, 0, r.num_rows());
      ADD_FAILURE() << "no error for a " << bad.size() << "-byte file";
    } catch (const FormatError& e) {
      EXPECT_NE(std::string(e.what()).find(t.path), std::string::npos) << e.what();
    }
  }
}

// Truncations of streams and files (200 cuts spread over each, plus every cut in the last 16 bytes) throw
// am::Error or read a prefix of the right rows: a stream cut exactly between messages is a shorter valid stream.
TEST(ArrowIpc, TruncatedFiles) {
  TempFile t;
  for (auto [f, dataset] : {std::pair{"chat_stream.arrow", "chat"}, std::pair{"types_stream.arrow", "types"},
                            std::pair{"squad_file.arrow", "squad"}, std::pair{"chat_legacy.arrow", "chat"}}) {
    const Json want = expected(dataset);
    const std::string good = slurp(fixture(f));
    std::vector<size_t> cuts;
    for (size_t i = 0; i < 200; ++i) cuts.push_back(i * good.size() / 200 + i % 7);  // jitter hits odd offsets
    for (size_t k = 1; k <= 16; ++k) cuts.push_back(good.size() - k);
    int prefixes = 0;
    for (size_t n : cuts) {
      try {
        const ArrowIpcReader r(t.write(good.substr(0, n)));
        const auto rows = read(r, 0, r.num_rows());
        for (size_t i = 0; i < rows.size(); ++i) ASSERT_EQ(rows[i], want[i]) << f << " cut at " << n;
        ++prefixes;
      } catch (const am::Error&) {
      }
    }
    if (std::string(f).find("_file") != std::string::npos) {
      EXPECT_EQ(prefixes, 0);  // the footer is at the end
    }
  }
}

TEST(ArrowIpc, MutatedFilesThrowOrRead) {
  TempFile t;
  std::mt19937 rng(99);
  int errors = 0, reads = 0;
  for (const char* f : {"squad_stream.arrow", "chat_stream_lz4.arrow", "types_file.arrow", "types_stream.arrow",
                        "squad_stream_zstd.arrow", "chat_legacy.arrow"}) {
    const std::string good = slurp(fixture(f));
    for (int m = 0; m < 50; ++m) {
      std::string bad = good;
      const int flips = 1 + static_cast<int>(rng() % 4);
      for (int k = 0; k < flips; ++k) {
        const size_t pos = rng() % bad.size();
        bad[pos] = static_cast<char>(bad[pos] ^ (1 + rng() % 255));
      }
      try {
        const ArrowIpcReader r(t.write(bad));
        read(r, 0, r.num_rows());
        ++reads;
      } catch (const am::Error&) {
        ++errors;
      } catch (const std::exception& e) {
        ADD_FAILURE() << f << " mutation " << m << ": " << typeid(e).name() << ": " << e.what();
      }
    }
  }
  EXPECT_GT(errors, 20);
  EXPECT_GT(reads, 20);
}
