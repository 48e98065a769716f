// Arrow IPC reader: the streaming format (what Hugging Face `datasets` writes to its cache, *.arrow, with or
// without the 0xFFFFFFFF continuation marker) and the file format ("ARROW1" magic). Same row contract as
// ParquetReader (parquet.h): rows are JSON objects {column: value}; list/large_list/fixed_size_list -> array,
// struct -> object, map -> object with string keys, null -> null, utf8/binary (and large) -> string,
// int8..64/uint8..64, date, time, timestamp, duration -> the integer, float16/32/64 -> number, bool -> bool,
// dictionary-encoded -> the dictionary value. Decimal, interval, union, view and run-end-encoded columns are
// refused with a FormatError naming the column, when that column is read. Bodies compressed with LZ4_FRAME
// or ZSTD are decompressed. docs/parquet.md has the details.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace am::io {

class ArrowIpcReader {
 public:
  // Maps the file and reads every message header (not the bodies): schema, dictionary batches, record batch
  // lengths. IoError (missing, unreadable) or FormatError (not Arrow IPC, truncated, corrupt), naming the file.
  explicit ArrowIpcReader(const std::string& path);

  int64_t num_rows() const;
  const std::vector<std::string>& column_names() const;  // top-level fields, in schema order

  // Calls fn(row_index, row) for rows [begin, end) (clamped) in order, decoding only the record batches that
  // overlap (and the dictionaries before them) and only the top-level `columns` asked for (empty = all).
  // fn returns false to stop early. Memory: one record batch (plus dictionaries) at a time.
  void read_rows(int64_t begin, int64_t end, const std::function<bool(int64_t, nlohmann::ordered_json&&)>& fn,
                 const std::vector<std::string>& columns = {}) const;

  struct Impl;

 private:
  std::shared_ptr<const Impl> impl_;
};

}  // namespace am::io
