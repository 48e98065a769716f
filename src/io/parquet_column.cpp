// The pages of one column chunk -> repetition/definition levels and values (data pages v1 and v2, one optional
// dictionary page first; index pages are skipped). Page counts are checked against what the chunk metadata
// promises before anything is decoded, and the chunk must hold exactly its row group's rows.
#include <algorithm>

#include "core/error.h"
#include "io/parquet_internal.h"

namespace am::io::pq {
namespace {

int bit_width(int max_level) {
  int w = 0;
  while (max_level >> w) ++w;
  return w;
}

void check_levels(const std::vector<uint8_t>& lv, size_t start, int max_level, const char* what) {
  for (size_t i = start; i < lv.size(); ++i)
    if (lv[i] > max_level)
      throw FormatError(std::string(what) + " level " + std::to_string(lv[i]) + " exceeds the maximum " +
                        std::to_string(max_level));
}

// Appends n levels decoded with the RLE hybrid from `data` (the whole of it is theirs), or n zeros when the
// column has no such levels.
void append_levels(std::string_view data, int max_level, size_t n, std::vector<uint8_t>* out, const char* what) {
  const size_t start = out->size();
  out->resize(start + n, 0);
  if (max_level == 0) return;
  RleDecoder(data, bit_width(max_level)).read(out->data() + start, n);
  check_levels(*out, start, max_level, what);
}

// Data page v1 levels: 4-byte length, then the hybrid. Advances *pos past them.
void append_levels_v1(std::string_view page, size_t* pos, int encoding, int max_level, size_t n,
                      std::vector<uint8_t>* out, const char* what) {
  if (max_level == 0) return append_levels({}, 0, n, out, what);
  if (encoding != kRle)
    throw FormatError(std::string(what) + " levels use encoding " + encoding_name(encoding) +
                      ", only RLE is supported");
  if (page.size() - *pos < 4) throw FormatError(std::string(what) + " levels: page too short");
  const uint32_t len = load_le<uint32_t>(page.data() + *pos);
  if (len > page.size() - *pos - 4) throw FormatError(std::string(what) + " levels run past the page");
  append_levels(page.substr(*pos + 4, len), max_level, n, out, what);
  *pos += 4 + size_t(len);
}

size_t count_defined(const std::vector<uint8_t>& def, size_t start, int max_def) {
  return static_cast<size_t>(std::count(def.begin() + static_cast<ptrdiff_t>(start), def.end(), max_def));
}

struct ChunkReader {
  const ColumnMeta& meta;
  const LeafInfo& leaf;
  ColumnData* out;
  Codec codec;
  ValueType vt;
  Values dict;
  bool have_dict = false;

  // A page body, decompressed into the arena when the chunk is compressed (views into it must stay valid).
  std::string_view body(std::string_view stored, int64_t size, bool compressed) {
    if (!compressed || codec == Codec::kUncompressed) {
      if (static_cast<int64_t>(stored.size()) != size)
        throw FormatError("stored page size " + std::to_string(stored.size()) + " differs from its uncompressed size " +
                          std::to_string(size));
      return stored;
    }
    return out->arena.emplace_back(decompress(codec, stored, static_cast<size_t>(size)));
  }

  void dictionary_page(const PageHeader& h, std::string_view stored) {
    if (!h.has_dict) throw FormatError("dictionary page without a dictionary page header");
    if (have_dict) throw FormatError("a second dictionary page");
    if (!out->def.empty()) throw FormatError("dictionary page after data pages");
    if (h.encoding != kPlain && h.encoding != kPlainDictionary)
      throw FormatError(std::string("dictionary page encoding ") + encoding_name(h.encoding) + " is not supported");
    if (h.num_values < 0) throw FormatError("negative dictionary size");
    const std::string_view data = body(stored, h.uncompressed_size, true);
    decode_values(kPlain, vt, data, static_cast<size_t>(h.num_values), nullptr, &dict, &out->arena);
    have_dict = true;
  }

  void values(int encoding, std::string_view data, size_t start) {
    const size_t n = count_defined(out->def, start, leaf.max_def);
    decode_values(encoding, vt, data, n, have_dict ? &dict : nullptr, &out->values, &out->arena);
  }

  void data_page_v1(const PageHeader& h, std::string_view stored) {
    if (!h.has_v1) throw FormatError("data page without a data page header");
    const std::string_view page = body(stored, h.uncompressed_size, true);
    const size_t n = static_cast<size_t>(h.num_values), start = out->def.size();
    size_t pos = 0;
    append_levels_v1(page, &pos, h.rep_encoding, leaf.max_rep, n, &out->rep, "repetition");
    append_levels_v1(page, &pos, h.def_encoding, leaf.max_def, n, &out->def, "definition");
    values(h.encoding, page.substr(pos), start);
  }

  void data_page_v2(const PageHeader& h, std::string_view stored) {
    if (!h.has_v2) throw FormatError("data page v2 without its header");
    if (h.rep_bytes < 0 || h.def_bytes < 0 || int64_t(h.rep_bytes) + h.def_bytes > int64_t(stored.size()) ||
        int64_t(h.rep_bytes) + h.def_bytes > h.uncompressed_size)
      throw FormatError("data page v2 level lengths exceed the page");
    const size_t n = static_cast<size_t>(h.num_values), start = out->def.size();
    // v2 levels are never compressed and carry no length prefix.
    append_levels(stored.substr(0, h.rep_bytes), leaf.max_rep, n, &out->rep, "repetition");
    append_levels(stored.substr(h.rep_bytes, h.def_bytes), leaf.max_def, n, &out->def, "definition");
    const size_t levels = size_t(h.rep_bytes) + size_t(h.def_bytes);
    const std::string_view data =
        body(stored.substr(levels), int64_t(h.uncompressed_size) - int64_t(levels), h.is_compressed);
    values(h.encoding, data, start);
  }
};

}  // namespace

void read_column_chunk(std::string_view chunk, const ColumnMeta& meta, const LeafInfo& leaf, int64_t rows,
                       ColumnData* out) {
  if (meta.type != leaf.elem->type)
    throw FormatError(std::string("column metadata says ") + type_name(meta.type) + ", the schema says " +
                      type_name(leaf.elem->type));
  if (meta.codec < 0 || meta.codec > static_cast<int>(Codec::kLz4Raw))
    throw FormatError("unknown compression codec " + std::to_string(meta.codec));
  if (meta.num_values < 0 || meta.num_values > kMaxChunkValues)
    throw FormatError("column chunk value count " + std::to_string(meta.num_values) + " out of range");
  if (leaf.max_rep == 0 && meta.num_values != rows)
    throw FormatError("column chunk holds " + std::to_string(meta.num_values) + " values for " + std::to_string(rows) +
                      " rows");
  ChunkReader r{meta, leaf, out, static_cast<Codec>(meta.codec),
                ValueType{static_cast<Type>(leaf.elem->type), leaf.elem->type_length}, {}, false};
  const size_t expected = static_cast<size_t>(meta.num_values);
  size_t pos = 0;
  for (int page = 0; out->def.size() < expected; ++page) {
    try {
      if (pos >= chunk.size())
        throw FormatError("column chunk ends after " + std::to_string(out->def.size()) + " of " +
                          std::to_string(expected) + " values");
      PageHeader h;
      pos += parse_page_header(chunk.substr(pos), &h);
      if (h.compressed_size < 0 || size_t(h.compressed_size) > chunk.size() - pos || h.uncompressed_size < 0)
        throw FormatError("page size " + std::to_string(h.compressed_size) + " runs past the column chunk");
      const std::string_view stored = chunk.substr(pos, size_t(h.compressed_size));
      pos += size_t(h.compressed_size);
      if (h.type == kDataPage || h.type == kDataPageV2) {
        if (h.num_values < 0 || size_t(h.num_values) > expected - out->def.size())
          throw FormatError("page holds " + std::to_string(h.num_values) + " values, more than the chunk's " +
                            std::to_string(expected));
      }
      switch (h.type) {
        case kDictionaryPage: r.dictionary_page(h, stored); break;
        case kDataPage: r.data_page_v1(h, stored); break;
        case kDataPageV2: r.data_page_v2(h, stored); break;
        default: break;  // index pages: nothing the reader needs
      }
    } catch (const FormatError& e) {
      throw FormatError("page " + std::to_string(page) + ": " + e.what());
    }
  }
  if (leaf.max_rep > 0) {
    if (!out->rep.empty() && out->rep[0] != 0) throw FormatError("column chunk does not start at a row");
    const auto starts = static_cast<int64_t>(std::count(out->rep.begin(), out->rep.end(), 0));
    if (starts != rows)
      throw FormatError("column chunk holds " + std::to_string(starts) + " rows, the row group " + std::to_string(rows));
  }
}

}  // namespace am::io::pq
