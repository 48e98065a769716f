// ParquetReader against files written by DuckDB and arrow-rs (tools/make_parquet_fixtures.js): every fixture's
// rows must equal the expected JSON beside it (read back by DuckDB when the fixtures were made); row ranges
// across row groups, column selection, early stop; legacy list layouts no current writer produces (built by
// hand at the level of the schema and the level streams); errors that name the file, column, row group and
// page; and corrupt files (truncated, mutated) that must throw am::Error, never crash or hang.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/parquet.h"
#include "io/parquet_internal.h"

using namespace am;
using am::io::ParquetReader;
using Json = nlohmann::ordered_json;
namespace fs = std::filesystem;

namespace {

std::string fixture(const std::string& name) { return std::string(AM_SOURCE_DIR) + "/tests/fixtures/parquet/" + name; }

std::string slurp(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

Json expected(const std::string& dataset) { return Json::parse(slurp(fixture(dataset + ".json"))); }

// A scratch file, removed afterwards.
struct TempFile {
  std::string path;
  TempFile() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    // tmpfs when there is one: these tests rewrite the file hundreds of times.
    const fs::path dir = fs::is_directory("/dev/shm") ? fs::path("/dev/shm") : fs::temp_directory_path();
    path = (dir / ("am_pq_" + std::to_string(::getpid()) + "_" + info->name())).string();
  }
  ~TempFile() { fs::remove(path); }
  const std::string& write(const std::string& bytes) const {
    std::ofstream(path, std::ios::binary | std::ios::trunc).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    return path;
  }
};

template <class Reader>
std::vector<std::pair<int64_t, Json>> read(const Reader& r, int64_t begin, int64_t end,
                                           const std::vector<std::string>& cols = {}) {
  std::vector<std::pair<int64_t, Json>> out;
  r.read_rows(begin, end, [&](int64_t i, Json&& row) {
    out.emplace_back(i, std::move(row));
    return true;
  }, cols);
  return out;
}

void expect_rows(const std::string& file, const Json& want) {
  SCOPED_TRACE(file);
  const ParquetReader r(fixture(file));
  ASSERT_EQ(r.num_rows(), static_cast<int64_t>(want.size()));
  std::vector<std::string> names;
  for (const auto& [k, v] : want[0].items()) names.push_back(k);
  EXPECT_EQ(r.column_names(), names);
  const auto rows = read(r, 0, r.num_rows());
  ASSERT_EQ(rows.size(), want.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    EXPECT_EQ(rows[i].first, static_cast<int64_t>(i));
    EXPECT_EQ(rows[i].second, want[i]) << "row " << i << ": got " << rows[i].second.dump();
  }
}

template <class E>
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  ADD_FAILURE() << "no exception";
  return {};
}

}  // namespace

// Every writer, page version, encoding and codec of the fixtures gives the same rows.
TEST(Parquet, SquadFromEveryWriterAndCodec) {
  const Json want = expected("squad");
  for (const char* f : {"squad_arrowrs_snappy.parquet", "squad_arrowrs_none.parquet", "squad_arrowrs_gzip.parquet",
                        "squad_arrowrs_zstd.parquet", "squad_arrowrs_brotli.parquet", "squad_arrowrs_lz4raw.parquet",
                        "squad_duckdb_v1_snappy.parquet", "squad_duckdb_v2_gzip.parquet"})
    expect_rows(f, want);
}

TEST(Parquet, ChatMessagesWithEmptyAndNullLists) {
  const Json want = expected("chat");
  ASSERT_EQ(want[2]["messages"], Json::array());
  ASSERT_TRUE(want[3]["messages"].is_null());
  ASSERT_TRUE(want[4]["messages"][1]["content"].is_null());
  for (const char* f : {"chat_arrowrs_v2_zstd.parquet", "chat_duckdb_v1_zstd.parquet", "chat_duckdb_v2_uncompressed.parquet"})
    expect_rows(f, want);
}

TEST(Parquet, EveryScalarType) {
  // arrow-rs: int8..64 and uint8..64 annotations, float16, DATE, TIMESTAMP(MILLIS), binary, fixed-size list,
  // null type, dictionary, map; v2 pages (RLE booleans, DELTA_*) and explicit BYTE_STREAM_SPLIT / DELTA_*.
  expect_rows("types_arrowrs_v2.parquet", expected("types"));
  expect_rows("types_arrowrs_encodings.parquet", expected("types"));
  // DuckDB: the same plus UUID (FIXED_LEN_BYTE_ARRAY[16]) and TIMESTAMP(MICROS), v1 brotli and v2 LZ4_RAW.
  expect_rows("types_duckdb_v1_brotli.parquet", expected("types_duckdb"));
  expect_rows("types_duckdb_v2_lz4.parquet", expected("types_duckdb"));
}

TEST(Parquet, RangesAcrossRowGroups) {
  const Json want = expected("squad");
  const ParquetReader r(fixture("squad_arrowrs_snappy.parquet"));  // row groups of 5 rows, several pages each
  for (auto [b, e] : std::vector<std::pair<int64_t, int64_t>>{{3, 12}, {5, 10}, {4, 6}, {21, 22}, {20, 100},
                                                              {-5, 2}, {7, 7}, {30, 40}, {0, 22}}) {
    const auto rows = read(r, b, e);
    const int64_t lo = std::max<int64_t>(b, 0), hi = std::min<int64_t>(e, 22);
    ASSERT_EQ(static_cast<int64_t>(rows.size()), std::max<int64_t>(hi - lo, 0)) << b << ".." << e;
    for (size_t i = 0; i < rows.size(); ++i) {
      EXPECT_EQ(rows[i].first, lo + static_cast<int64_t>(i));
      EXPECT_EQ(rows[i].second, want[lo + i]);
    }
  }
}

TEST(Parquet, ColumnSelectionAndEarlyStop) {
  const Json want = expected("chat");
  const ParquetReader r(fixture("chat_duckdb_v1_zstd.parquet"));
  const auto rows = read(r, 4, 11, {"source", "messages"});
  ASSERT_EQ(rows.size(), 7u);
  for (size_t i = 0; i < rows.size(); ++i) {
    const Json& row = rows[i].second;
    ASSERT_EQ(row.size(), 2u);
    EXPECT_EQ(row.begin().key(), "source");  // in the order asked for
    EXPECT_EQ(row["messages"], want[4 + i]["messages"]);
    EXPECT_EQ(row["source"], want[4 + i]["source"]);
  }
  int calls = 0;
  r.read_rows(0, 13, [&](int64_t i, Json&&) { return ++calls < 3; });
  EXPECT_EQ(calls, 3);
  const std::string msg = error_of<FormatError>([&] { read(r, 0, 1, {"nope"}); });
  EXPECT_NE(msg.find("no column 'nope'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("chat_duckdb_v1_zstd.parquet"), std::string::npos) << msg;
}

TEST(Parquet, DecimalIsRefusedNamingTheColumn) {
  const ParquetReader r(fixture("decimal_duckdb.parquet"));
  const auto rows = read(r, 0, 2, {"n"});
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[1].second["n"], 2);
  const std::string msg = error_of<FormatError>([&] { read(r, 0, 2); });
  EXPECT_NE(msg.find("column 'price'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("DECIMAL"), std::string::npos) << msg;
}

TEST(Parquet, BadFilesNameTheFile) {
  TempFile t;
  EXPECT_NE(error_of<IoError>([&] { ParquetReader("/nonexistent/x.parquet"); }).find("/nonexistent/x.parquet"),
            std::string::npos);
  EXPECT_NE(error_of<IoError>([&] { ParquetReader(fixture("")); }).find("not a regular file"), std::string::npos);
  const std::string good = slurp(fixture("types_duckdb_v1_brotli.parquet"));
  for (const std::string& bad : {std::string(), std::string("PAR1"), "XAR1" + good.substr(4),
                                 good.substr(0, good.size() - 1) + "X", good.substr(0, good.size() / 2)}) {
    const std::string msg = error_of<FormatError>([&] { ParquetReader(t.write(bad)); });
    EXPECT_NE(msg.find(t.path), std::string::npos) << msg;
  }
  for (size_t n = 0; n < good.size(); n += good.size() / 40 + 1)  // cut anywhere: the footer is at the end
    EXPECT_THROW(ParquetReader(t.write(good.substr(0, n))), FormatError) << n;
  // A footer length past the start of the file.
  std::string b = good;
  b[b.size() - 5] = '\x7f';
  EXPECT_NE(error_of<FormatError>([&] { ParquetReader(t.write(b)); }).find("footer length"), std::string::npos);
}

// A corrupt page is reported with its column, row group and page.
TEST(Parquet, PageErrorsNameColumnRowGroupAndPage) {
  const std::string good = slurp(fixture("squad_arrowrs_none.parquet"));
  const uint32_t len = am::io::pq::load_le<uint32_t>(good.data() + good.size() - 8);
  const auto meta = am::io::pq::parse_file_meta(std::string_view(good).substr(good.size() - 8 - len, len));
  ASSERT_GE(meta.row_groups.size(), 2u);
  const auto& col = meta.row_groups[1].columns[2].meta;  // 'context' of row group 1
  ASSERT_EQ(col.path, std::vector<std::string>{"context"});
  std::string bad = good;
  const int64_t page = col.dictionary_page_offset > 0 ? col.dictionary_page_offset : col.data_page_offset;
  for (int i = 0; i < 4; ++i) bad[page + i] = '\x3c';  // a page header that makes no sense
  TempFile t;
  const ParquetReader r(t.write(bad));
  EXPECT_EQ(read(r, 0, 8, {"id"}).size(), 8u);  // other columns and row groups still read
  const std::string msg = error_of<FormatError>([&] { read(r, 0, 22); });
  for (const char* want : {"column 'context'", "row group 1", "page 0", t.path.c_str()})
    EXPECT_NE(msg.find(want), std::string::npos) << msg;
}

// Random byte mutations of real files: each read either throws am::Error or returns rows; never anything else.
TEST(Parquet, MutatedFilesThrowOrRead) {
  TempFile t;
  std::mt19937 rng(1234);
  int errors = 0, reads = 0;
  for (const char* f : {"squad_arrowrs_snappy.parquet", "chat_arrowrs_v2_zstd.parquet", "types_duckdb_v2_lz4.parquet",
                        "chat_duckdb_v1_zstd.parquet", "types_arrowrs_encodings.parquet", "squad_arrowrs_none.parquet"}) {
    const std::string good = slurp(fixture(f));
    const uint32_t footer = am::io::pq::load_le<uint32_t>(good.data() + good.size() - 8) + 8;
    for (int m = 0; m < 60; ++m) {
      std::string bad = good;
      const int flips = 1 + static_cast<int>(rng() % 4);
      for (int k = 0; k < flips; ++k) {
        // Half the mutations hit the footer, where one byte changes the meaning of everything after it.
        const size_t pos = m % 2 ? bad.size() - 1 - rng() % footer : rng() % bad.size();
        bad[pos] = static_cast<char>(bad[pos] ^ (1 + rng() % 255));
      }
      try {
        const ParquetReader r(t.write(bad));
        read(r, 0, r.num_rows());
        ++reads;
      } catch (const am::Error&) {
        ++errors;
      } catch (const std::exception& e) {
        ADD_FAILURE() << f << " mutation " << m << ": " << typeid(e).name() << ": " << e.what();
      }
    }
  }
  EXPECT_GT(errors, 100);  // the mutations do reach the checks
  EXPECT_GT(reads, 10);
}

// ---- internals: layouts that no current writer produces, and the RLE hybrid on the spec's example.
namespace pq = am::io::pq;

namespace {

pq::SchemaElement group(const std::string& name, int rep, int children, int converted = -1) {
  pq::SchemaElement e;
  e.name = name;
  e.repetition = rep;
  e.num_children = children;
  e.converted_type = converted;
  return e;
}
pq::SchemaElement leaf(const std::string& name, int rep, pq::Type type, int converted = -1) {
  pq::SchemaElement e = group(name, rep, 0, converted);
  e.type = static_cast<int>(type);
  return e;
}

// Rows of one top-level field from hand-written levels: (rep, def) per entry plus the defined values.
Json assemble(const std::vector<pq::SchemaElement>& schema, const std::vector<std::vector<std::pair<int, int>>>& levels,
              const std::vector<std::vector<int64_t>>& ints, int64_t rows) {
  std::vector<pq::LeafInfo> leaves;
  const auto shapes = pq::build_shapes(schema, &leaves);
  EXPECT_EQ(leaves.size(), levels.size());
  std::vector<pq::ColumnData> data(leaves.size());
  std::vector<const pq::ColumnData*> cols;
  for (size_t l = 0; l < leaves.size(); ++l) {
    for (auto [r, d] : levels[l]) {
      data[l].rep.push_back(static_cast<uint8_t>(r));
      data[l].def.push_back(static_cast<uint8_t>(d));
    }
    data[l].values.ints = ints[l];
    cols.push_back(&data[l]);
  }
  pq::RowAssembler a(shapes[0], leaves, cols);
  Json out = Json::array();
  for (int64_t i = 0; i < rows; ++i) out.push_back(a.next_row());
  return out;
}

}  // namespace

TEST(Parquet, LegacyTwoLevelListsAndBareRepeatedFields) {
  using pq::Type;
  // optional group l (LIST) { repeated int32 element; }: rule 1, the repeated primitive is the element.
  EXPECT_EQ(assemble({group("schema", -1, 1), group("l", pq::kOptional, 1, pq::kList), leaf("element", pq::kRepeated, Type::kInt32)},
                     {{{0, 2}, {1, 2}, {0, 1}, {0, 0}}}, {{1, 2}}, 3),
            Json::parse("[[1,2],[],null]"));
  // optional group l (LIST) { repeated group array { required int32 x; } }: rule 4, elements are one-field structs.
  EXPECT_EQ(assemble({group("schema", -1, 1), group("l", pq::kOptional, 1, pq::kList), group("array", pq::kRepeated, 1),
                      leaf("x", pq::kRequired, Type::kInt32)},
                     {{{0, 2}, {1, 2}, {0, 0}}}, {{7, 8}}, 2),
            Json::parse(R"([[{"x":7},{"x":8}],null])"));
  // optional group l (LIST) { repeated group list { optional int32 element; } }: the standard 3 levels.
  EXPECT_EQ(assemble({group("schema", -1, 1), group("l", pq::kOptional, 1, pq::kList), group("list", pq::kRepeated, 1),
                      leaf("element", pq::kOptional, Type::kInt32)},
                     {{{0, 3}, {1, 2}, {0, 1}}}, {{5}}, 2),
            Json::parse("[[5,null],[]]"));
  // repeated int32 x (no annotation): a non-null list of required elements.
  EXPECT_EQ(assemble({group("schema", -1, 1), leaf("x", pq::kRepeated, Type::kInt32)}, {{{0, 1}, {1, 1}, {0, 0}}},
                     {{3, 4}}, 2),
            Json::parse("[[3,4],[]]"));
  // optional group m (MAP_KEY_VALUE) { repeated group map { required int32 key; optional int32 value; } }
  EXPECT_EQ(assemble({group("schema", -1, 1), group("m", pq::kOptional, 1, pq::kMapKeyValue), group("map", pq::kRepeated, 2),
                      leaf("key", pq::kRequired, Type::kInt32), leaf("value", pq::kOptional, Type::kInt32)},
                     {{{0, 2}, {1, 2}, {0, 0}}, {{0, 3}, {1, 2}, {0, 0}}}, {{1, 2}, {10}}, 2),
            Json::parse(R"([{"1":10,"2":null},null])"));
}

TEST(Parquet, InconsistentLevelsAreFormatErrors) {
  using pq::Type;
  // A value entry for a row the other leaf of the struct does not have.
  EXPECT_THROW(assemble({group("schema", -1, 1), group("s", pq::kRequired, 2), leaf("a", pq::kRequired, Type::kInt32),
                         leaf("b", pq::kRequired, Type::kInt32)},
                        {{{0, 0}, {0, 0}}, {{0, 0}}}, {{1, 2}, {3}}, 2),
               FormatError);
  // A repeated entry (rep 1) under a non-repeated field does not line up with the row.
  EXPECT_THROW(assemble({group("schema", -1, 1), leaf("a", pq::kOptional, Type::kInt32)}, {{{0, 1}, {1, 1}}}, {{1, 2}}, 1),
               FormatError);
}

TEST(Parquet, RleHybridSpecExample) {
  // Encodings.md: 0..7 bit-packed with width 3 -> one group: header (1 << 1 | 1), bytes 0x88 0xC6 0xFA;
  // then an RLE run of 4 x 5: header (4 << 1), value byte 5.
  const std::string data = std::string("\x03\x88\xC6\xFA\x08\x05", 6);
  std::vector<uint32_t> out(12);
  pq::RleDecoder d(data, 3);
  d.read(out.data(), out.size());
  EXPECT_EQ(out, (std::vector<uint32_t>{0, 1, 2, 3, 4, 5, 6, 7, 5, 5, 5, 5}));
  EXPECT_THROW(d.read(out.data(), 1), FormatError);  // nothing left
}
