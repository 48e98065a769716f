// Internals of the Parquet reader (parquet.h), split by concern:
//   parquet_file.cpp      the read-only mapped file (also used by arrow_ipc.cpp)
//   parquet_thrift.cpp    Thrift compact protocol -> FileMetaData and PageHeader
//   parquet_compress.cpp  page (and Arrow IPC buffer) decompression
//   parquet_encoding.cpp  PLAIN, dictionary, RLE/bit-packed hybrid, DELTA_*, BYTE_STREAM_SPLIT
//   parquet_column.cpp    the pages of one column chunk -> levels + values
//   parquet_assemble.cpp  schema tree -> field shapes; levels + values -> nested JSON (Dremel record assembly)
//   parquet_reader.cpp    ParquetReader
// Everything here throws FormatError with a message that lacks the file name; the reader adds the file, column,
// row group and page where it catches them.
#pragma once
#include <cstdint>
#include <cstring>
#include <deque>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace am::io::pq {

// Sanity limits, checked before anything is allocated from a count or length read from the file.
constexpr size_t kMaxPageBytes = size_t(1) << 30;        // one decompressed page (page sizes are i32 anyway)
constexpr int64_t kMaxChunkValues = int64_t(1) << 31;     // level entries of one column chunk
constexpr int kMaxSchemaDepth = 64;                       // nesting of groups (keeps row JSON shallow too)
constexpr int kMaxThriftDepth = 64;                       // nesting of Thrift structs/containers

// ---------------------------------------------------------------------------------------------------------
// The file, mapped read-only.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);  // IoError naming the file
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const std::string& path() const { return path_; }
  std::string_view bytes() const { return {static_cast<const char*>(base_), size_}; }
  size_t size() const { return size_; }

 private:
  std::string path_;
  void* base_ = nullptr;
  size_t size_ = 0;
};

// Little-endian loads from unaligned bytes (callers have checked the bounds).
template <class T>
inline T load_le(const void* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
float half_to_float(uint16_t h);

// ---------------------------------------------------------------------------------------------------------
// Metadata (the subset of parquet.thrift the reader needs; every other field is skipped).
enum class Type { kBoolean = 0, kInt32, kInt64, kInt96, kFloat, kDouble, kByteArray, kFixedLenByteArray };
enum Repetition { kRequired = 0, kOptional = 1, kRepeated = 2 };
enum ConvertedType {
  kUtf8 = 0, kMap = 1, kMapKeyValue = 2, kList = 3, kEnum = 4, kDecimal = 5,
  kUint8 = 11, kUint16 = 12, kUint32 = 13, kUint64 = 14, kJson = 19
};
// LogicalType is a Thrift union: `kind` is the id of the member that is set (0 = none).
enum LogicalKind {
  kLtNone = 0, kLtString = 1, kLtMap = 2, kLtList = 3, kLtEnum = 4, kLtDecimal = 5, kLtInteger = 10,
  kLtJson = 12, kLtUuid = 14, kLtFloat16 = 15
};
enum Encoding {
  kPlain = 0, kPlainDictionary = 2, kRle = 3, kBitPacked = 4, kDeltaBinaryPacked = 5, kDeltaLengthByteArray = 6,
  kDeltaByteArray = 7, kRleDictionary = 8, kByteStreamSplit = 9
};
enum PageType { kDataPage = 0, kIndexPage = 1, kDictionaryPage = 2, kDataPageV2 = 3 };
// Parquet's CompressionCodec values, plus Arrow IPC's LZ4 frame format.
enum class Codec { kUncompressed = 0, kSnappy, kGzip, kLzo, kBrotli, kLz4Hadoop, kZstd, kLz4Raw, kLz4Frame = 100 };

struct LogicalType {
  int kind = kLtNone;
  int bit_width = 0;     // INTEGER
  bool is_signed = true; // INTEGER
};

struct SchemaElement {
  int type = -1;  // Type, or -1 for a group
  int32_t type_length = 0;
  int repetition = -1;  // Repetition, or -1 (the root has none)
  std::string name;
  int32_t num_children = 0;
  int converted_type = -1;
  LogicalType logical;
};

struct ColumnMeta {
  int type = -1;
  std::vector<std::string> path;
  int codec = -1;
  int64_t num_values = -1;
  int64_t total_compressed_size = -1;
  int64_t data_page_offset = -1;
  int64_t dictionary_page_offset = -1;  // -1: absent
};

struct ColumnChunk {
  bool has_file_path = false;  // data in another file: refused
  bool encrypted = false;
  bool has_meta = false;
  ColumnMeta meta;
};

struct RowGroup {
  std::vector<ColumnChunk> columns;
  int64_t num_rows = -1;
};

struct FileMeta {
  std::vector<SchemaElement> schema;
  int64_t num_rows = -1;
  std::vector<RowGroup> row_groups;
  std::string created_by;
  bool encrypted = false;  // encryption_algorithm set (plaintext footer mode)
};

struct PageHeader {
  int type = -1;
  int32_t uncompressed_size = -1;
  int32_t compressed_size = -1;
  bool has_v1 = false, has_v2 = false, has_dict = false;
  // DataPageHeader / DataPageHeaderV2 / DictionaryPageHeader, whichever is set.
  int32_t num_values = -1;
  int encoding = -1;
  int def_encoding = kRle, rep_encoding = kRle;  // v1 only
  int32_t num_nulls = 0, num_rows = 0;            // v2 only
  int32_t def_bytes = 0, rep_bytes = 0;           // v2 only
  bool is_compressed = true;                      // v2 only
};

FileMeta parse_file_meta(std::string_view footer);
// Parses the header at the start of `bytes`; returns its size in bytes.
size_t parse_page_header(std::string_view bytes, PageHeader* out);
const char* type_name(int type);
const char* encoding_name(int encoding);
const char* codec_name(Codec codec);

// ---------------------------------------------------------------------------------------------------------
// Decompression of `src` into exactly `size` bytes (more or fewer is a FormatError). Output buffers grow with
// the data actually produced, so a corrupt size cannot make us allocate far beyond what the input holds.
// With exact = false, `size` is only an upper bound (streaming codecs: gzip, zstd, brotli, lz4 frame).
std::string decompress(Codec codec, std::string_view src, size_t size, bool exact = true);

// ---------------------------------------------------------------------------------------------------------
// Encodings. Every decoder reads exactly what it is asked for or throws; none trusts a count from the data.

// RLE/bit-packed hybrid (levels, dictionary indices, booleans), without the 4-byte length prefix.
class RleDecoder {
 public:
  RleDecoder(std::string_view data, int bit_width);
  template <class T>
  void read(T* out, size_t n);  // T = uint8_t, uint32_t
  size_t consumed() const { return pos_; }

 private:
  bool next_run();
  std::string_view data_;
  int bit_width_;
  size_t pos_ = 0;
  uint64_t rle_left_ = 0, rle_value_ = 0;
  uint64_t packed_left_ = 0;   // values left in the current bit-packed run
  size_t packed_bit_ = 0;      // bit position in data_ of the next packed value
};

// The decoded values of a leaf column, one kind per physical type.
struct Values {
  std::vector<int64_t> ints;             // BOOLEAN (0/1), INT32 (sign-extended), INT64
  std::vector<double> reals;             // FLOAT, DOUBLE
  std::vector<std::string_view> bytes;   // BYTE_ARRAY, FIXED_LEN_BYTE_ARRAY, INT96: views into an Arena or the file
  size_t size() const { return ints.size() + reals.size() + bytes.size(); }
};
// Owns decompressed pages and decoded strings; a deque never moves its elements, so views stay valid.
using Arena = std::deque<std::string>;

struct ValueType {
  Type type;
  int32_t type_length;  // FIXED_LEN_BYTE_ARRAY only
};
// Appends `count` values of `vt` encoded with `encoding` in `data` to `out`. `dict` is the column chunk's
// dictionary (null when none was read). New strings (DELTA_BYTE_ARRAY) go to `arena`.
void decode_values(int encoding, const ValueType& vt, std::string_view data, size_t count, const Values* dict,
                   Values* out, Arena* arena);

// ---------------------------------------------------------------------------------------------------------
// One column chunk, decoded: a (rep, def) pair per level entry and a value per entry whose def == max_def.
struct LeafInfo {
  std::string dotted;  // a.b.c, for messages
  const SchemaElement* elem = nullptr;
  int max_def = 0, max_rep = 0;
};

struct ColumnData {
  std::vector<uint8_t> def, rep;
  Values values;
  Arena arena;
};

// `chunk_bytes` is the column chunk's byte range in the file; pages that are not compressed stay views into it.
// Errors name the page (index within the chunk).
void read_column_chunk(std::string_view chunk_bytes, const ColumnMeta& meta, const LeafInfo& leaf,
                       int64_t row_group_rows, ColumnData* out);

// ---------------------------------------------------------------------------------------------------------
// Record assembly. The schema becomes a tree of field shapes (lists and maps recognised, including the legacy
// layouts); a row is assembled by walking the shape and consuming level entries of the leaves below it.
struct Shape {
  enum Kind { kLeaf, kStruct, kList, kMap } kind = kLeaf;
  std::string name;
  bool nullable = false;  // optional: null when def < def_present
  int def_present = 0;    // def level at which this value is non-null
  int rep_level = 0;      // list/map: rep level of the repeated node
  int def_elements = 0;   // list/map: def level at which the list has at least one element
  int leaf = -1;          // leaf: column index
  int first_leaf = 0, end_leaf = 0;  // leaves [first, end) under this shape
  std::vector<Shape> children;       // struct: fields; list: {element}; map: {key, value} (value may be absent)
};

// The top-level fields of `schema` (schema[0] is the root) and the leaf columns in file order.
std::vector<Shape> build_shapes(const std::vector<SchemaElement>& schema, std::vector<LeafInfo>* leaves);

// Assembles rows of one row group from the decoded leaves of one top-level field.
class RowAssembler {
 public:
  // `cols[i]` is the data of leaf shape.first_leaf + i; `leaves` all leaves of the file.
  RowAssembler(const Shape& shape, const std::vector<LeafInfo>& leaves, const std::vector<const ColumnData*>& cols);
  void skip_rows(int64_t n);
  nlohmann::ordered_json next_row();

 private:
  struct Cursor {
    const ColumnData* col;
    size_t level = 0, value = 0;
  };
  nlohmann::ordered_json value(const Shape& s);
  nlohmann::ordered_json leaf_value(const Shape& s);
  void skip_entry(const Shape& s);  // one level entry of every leaf below s
  Cursor& first(const Shape& s) { return cursors_[s.first_leaf - base_]; }
  uint8_t def_at(const Shape& s);

  const Shape& shape_;
  const std::vector<LeafInfo>& leaves_;
  std::vector<Cursor> cursors_;
  int base_;
};

}  // namespace am::io::pq
