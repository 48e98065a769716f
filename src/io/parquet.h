// Parquet reader for Hugging Face hub datasets (files written by pyarrow, arrow-rs, DuckDB, parquet-mr):
// no Arrow/Parquet library, only the codecs (snappy, zlib, zstd, lz4, brotli). docs/parquet.md lists what is
// supported and what is refused.
//
// Rows come out as JSON objects {column: value} in file order: LIST -> array, group -> object, MAP -> object
// with string keys, null -> null, BYTE_ARRAY (string or plain binary) -> string, INT32/INT64 (whatever their
// INT/DATE/TIME/TIMESTAMP annotation) -> the integer (unsigned when annotated so), FLOAT/DOUBLE/FLOAT16 ->
// number, BOOLEAN -> bool, FIXED_LEN_BYTE_ARRAY -> string (UUID -> its canonical text). INT96 and DECIMAL are
// refused with a FormatError naming the column, when that column is read.
//
// The reader is immutable after construction: read_rows may run concurrently on one object, and copies share
// the mapped file.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace am::io {

class ParquetReader {
 public:
  // Maps the file, reads and checks the footer and schema. IoError (missing, unreadable, not a regular file)
  // or FormatError (bad magic, truncated, corrupt or encrypted footer), always naming the file.
  explicit ParquetReader(const std::string& path);

  int64_t num_rows() const;
  // Top-level fields, in schema order.
  const std::vector<std::string>& column_names() const;

  // Calls fn(row_index, row) for rows [begin, end) (clamped to [0, num_rows())) in order, decoding only the row
  // groups that overlap and only the top-level `columns` asked for (empty = all; an unknown name is a
  // FormatError). fn returns false to stop early. Memory: one row group's selected columns at a time.
  // FormatError names the file and, where one is at fault, the column, row group and page.
  void read_rows(int64_t begin, int64_t end, const std::function<bool(int64_t, nlohmann::ordered_json&&)>& fn,
                 const std::vector<std::string>& columns = {}) const;

  struct Impl;

 private:
  std::shared_ptr<const Impl> impl_;
};

}  // namespace am::io
