// Thrift compact protocol (apache/thrift doc/specs/thrift-compact-protocol.md) and the parts of parquet.thrift the
// reader needs. Unknown fields, including whole unknown structs, are skipped by their wire type, so files
// from newer writers (statistics, size statistics, geospatial types...) read. Every length and count is checked
// against the bytes left before anything is allocated, and nesting is bounded.
#include <limits>

#include "core/error.h"
#include "io/parquet_internal.h"

namespace am::io::pq {
namespace {

// Compact wire types (field headers and container elements).
enum WireType {
  kStop = 0, kTrue = 1, kFalse = 2, kI8 = 3, kI16 = 4, kI32 = 5, kI64 = 6, kDouble = 7, kBinary = 8,
  kListT = 9, kSetT = 10, kMapT = 11, kStructT = 12, kUuid = 13
};

class Thrift {
 public:
  explicit Thrift(std::string_view bytes) : b_(bytes) {}
  size_t pos() const { return pos_; }

  // Calls on_field(id, wire_type) for each field of a struct; on_field must consume the value (a typed read
  // or skip()).
  template <class F>
  void read_struct(F&& on_field) {
    Depth d(this);
    int last = 0;
    for (;;) {
      const uint8_t h = byte();
      if (h == kStop) return;
      const int type = h & 0x0f, delta = h >> 4;
      const int id = delta ? last + delta : static_cast<int>(zigzag());
      last = id;
      on_field(id, type);
    }
  }
  // Calls on_elem(element_type) for each element of a list/set field.
  template <class F>
  void read_list(int type, F&& on_elem) {
    if (type != kListT && type != kSetT) bad_type(type, "list");
    Depth d(this);
    const uint8_t h = byte();
    uint64_t n = h >> 4;
    if (n == 15) n = varint();
    if (n > left()) throw FormatError("thrift list of " + std::to_string(n) + " elements exceeds the data");
    for (uint64_t i = 0; i < n; ++i) on_elem(h & 0x0f);
  }

  int64_t integer(int type) {
    if (type == kI8) return static_cast<int8_t>(byte());
    if (type == kI16 || type == kI32 || type == kI64) return zigzag();
    bad_type(type, "integer");
  }
  int32_t i32(int type) {
    const int64_t v = integer(type);
    if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max())
      throw FormatError("thrift i32 value " + std::to_string(v) + " out of range");
    return static_cast<int32_t>(v);
  }
  bool boolean(int type) {  // a struct field: the value is the wire type
    if (type == kTrue) return true;
    if (type == kFalse) return false;
    bad_type(type, "bool");
  }
  std::string_view binary(int type) {
    if (type != kBinary) bad_type(type, "binary");
    const uint64_t n = varint();
    need(n);
    std::string_view s = b_.substr(pos_, n);
    pos_ += n;
    return s;
  }

  // Skips a value of `type`; `element` tells a container element (bools are a byte there) from a field.
  void skip(int type, bool element = false) {
    Depth d(this);
    switch (type) {
      case kTrue:
      case kFalse:
        if (element) byte();
        return;
      case kI8: byte(); return;
      case kI16: case kI32: case kI64: varint(); return;
      case kDouble: need(8); pos_ += 8; return;
      case kUuid: need(16); pos_ += 16; return;
      case kBinary: binary(type); return;
      case kListT: case kSetT: read_list(type, [&](int et) { skip(et, true); }); return;
      case kMapT: {
        const uint64_t n = varint();
        if (n == 0) return;
        const uint8_t kv = byte();
        if (n > left() / 2 + 1) throw FormatError("thrift map of " + std::to_string(n) + " entries exceeds the data");
        for (uint64_t i = 0; i < n; ++i) {
          skip(kv >> 4, true);
          skip(kv & 0x0f, true);
        }
        return;
      }
      case kStructT: read_struct([&](int, int t) { skip(t); }); return;
      default: throw FormatError("thrift: unknown wire type " + std::to_string(type));
    }
  }

 private:
  struct Depth {  // bounds recursion on hostile input
    Thrift* t;
    explicit Depth(Thrift* th) : t(th) {
      if (++t->depth_ > kMaxThriftDepth) throw FormatError("thrift structures nested too deeply");
    }
    ~Depth() { --t->depth_; }
  };
  size_t left() const { return b_.size() - pos_; }
  void need(uint64_t n) const {
    if (n > left()) throw FormatError("thrift data truncated (needs " + std::to_string(n) + " more bytes)");
  }
  uint8_t byte() {
    need(1);
    return static_cast<uint8_t>(b_[pos_++]);
  }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      const uint8_t c = byte();
      v |= static_cast<uint64_t>(c & 0x7f) << shift;
      if (!(c & 0x80)) return v;
    }
    throw FormatError("thrift varint longer than 10 bytes");
  }
  int64_t zigzag() {
    const uint64_t v = varint();
    return static_cast<int64_t>(v >> 1) ^ -static_cast<int64_t>(v & 1);
  }
  [[noreturn]] static void bad_type(int type, const char* want) {
    throw FormatError("thrift field has wire type " + std::to_string(type) + ", expected " + want);
  }

  std::string_view b_;
  size_t pos_ = 0;
  int depth_ = 0;
};

LogicalType read_logical_type(Thrift& t) {
  LogicalType lt;
  t.read_struct([&](int id, int type) {
    if (type != kStructT) return t.skip(type);
    lt.kind = id;
    if (id != kLtInteger) return t.skip(type);
    t.read_struct([&](int fid, int ft) {
      if (fid == 1) lt.bit_width = static_cast<int>(t.integer(ft));
      else if (fid == 2) lt.is_signed = t.boolean(ft);
      else t.skip(ft);
    });
  });
  return lt;
}

SchemaElement read_schema_element(Thrift& t) {
  SchemaElement e;
  t.read_struct([&](int id, int type) {
    switch (id) {
      case 1: e.type = t.i32(type); break;
      case 2: e.type_length = t.i32(type); break;
      case 3: e.repetition = t.i32(type); break;
      case 4: e.name = std::string(t.binary(type)); break;
      case 5: e.num_children = t.i32(type); break;
      case 6: e.converted_type = t.i32(type); break;
      case 10: e.logical = read_logical_type(t); break;
      default: t.skip(type);
    }
  });
  return e;
}

ColumnMeta read_column_meta(Thrift& t) {
  ColumnMeta m;
  t.read_struct([&](int id, int type) {
    switch (id) {
      case 1: m.type = t.i32(type); break;
      case 3: t.read_list(type, [&](int et) { m.path.emplace_back(t.binary(et)); }); break;
      case 4: m.codec = t.i32(type); break;
      case 5: m.num_values = t.integer(type); break;
      case 7: m.total_compressed_size = t.integer(type); break;
      case 9: m.data_page_offset = t.integer(type); break;
      case 11: m.dictionary_page_offset = t.integer(type); break;
      default: t.skip(type);
    }
  });
  return m;
}

ColumnChunk read_column_chunk_meta(Thrift& t) {
  ColumnChunk c;
  t.read_struct([&](int id, int type) {
    switch (id) {
      case 1: c.has_file_path = true; t.skip(type); break;
      case 3: c.has_meta = true; c.meta = read_column_meta(t); break;
      case 8: case 9: c.encrypted = true; t.skip(type); break;
      default: t.skip(type);
    }
  });
  return c;
}

RowGroup read_row_group(Thrift& t) {
  RowGroup g;
  t.read_struct([&](int id, int type) {
    switch (id) {
      case 1: t.read_list(type, [&](int et) {
          if (et != kStructT) throw FormatError("thrift: RowGroup.columns is not a list of structs");
          g.columns.push_back(read_column_chunk_meta(t));
        });
        break;
      case 3: g.num_rows = t.integer(type); break;
      default: t.skip(type);
    }
  });
  return g;
}

}  // namespace

FileMeta parse_file_meta(std::string_view footer) {
  Thrift t(footer);
  FileMeta m;
  t.read_struct([&](int id, int type) {
    switch (id) {
      case 2: t.read_list(type, [&](int et) {
          if (et != kStructT) throw FormatError("thrift: FileMetaData.schema is not a list of structs");
          m.schema.push_back(read_schema_element(t));
        });
        break;
      case 3: m.num_rows = t.integer(type); break;
      case 4: t.read_list(type, [&](int et) {
          if (et != kStructT) throw FormatError("thrift: FileMetaData.row_groups is not a list of structs");
          m.row_groups.push_back(read_row_group(t));
        });
        break;
      case 6: m.created_by = std::string(t.binary(type)); break;
      case 8: m.encrypted = true; t.skip(type); break;
      default: t.skip(type);
    }
  });
  return m;
}

size_t parse_page_header(std::string_view bytes, PageHeader* h) {
  Thrift t(bytes);
  *h = PageHeader{};
  t.read_struct([&](int id, int type) {
    switch (id) {
      case 1: h->type = t.i32(type); break;
      case 2: h->uncompressed_size = t.i32(type); break;
      case 3: h->compressed_size = t.i32(type); break;
      case 5:
        h->has_v1 = true;
        t.read_struct([&](int fid, int ft) {
          switch (fid) {
            case 1: h->num_values = t.i32(ft); break;
            case 2: h->encoding = t.i32(ft); break;
            case 3: h->def_encoding = t.i32(ft); break;
            case 4: h->rep_encoding = t.i32(ft); break;
            default: t.skip(ft);
          }
        });
        break;
      case 7:
        h->has_dict = true;
        t.read_struct([&](int fid, int ft) {
          switch (fid) {
            case 1: h->num_values = t.i32(ft); break;
            case 2: h->encoding = t.i32(ft); break;
            default: t.skip(ft);
          }
        });
        break;
      case 8:
        h->has_v2 = true;
        t.read_struct([&](int fid, int ft) {
          switch (fid) {
            case 1: h->num_values = t.i32(ft); break;
            case 2: h->num_nulls = t.i32(ft); break;
            case 3: h->num_rows = t.i32(ft); break;
            case 4: h->encoding = t.i32(ft); break;
            case 5: h->def_bytes = t.i32(ft); break;
            case 6: h->rep_bytes = t.i32(ft); break;
            case 7: h->is_compressed = t.boolean(ft); break;
            default: t.skip(ft);
          }
        });
        break;
      default: t.skip(type);
    }
  });
  return t.pos();
}

const char* type_name(int type) {
  static const char* const names[] = {"BOOLEAN", "INT32", "INT64", "INT96", "FLOAT", "DOUBLE", "BYTE_ARRAY",
                                      "FIXED_LEN_BYTE_ARRAY"};
  return type >= 0 && type < 8 ? names[type] : "unknown type";
}

const char* encoding_name(int e) {
  switch (e) {
    case kPlain: return "PLAIN";
    case kPlainDictionary: return "PLAIN_DICTIONARY";
    case kRle: return "RLE";
    case kBitPacked: return "BIT_PACKED";
    case kDeltaBinaryPacked: return "DELTA_BINARY_PACKED";
    case kDeltaLengthByteArray: return "DELTA_LENGTH_BYTE_ARRAY";
    case kDeltaByteArray: return "DELTA_BYTE_ARRAY";
    case kRleDictionary: return "RLE_DICTIONARY";
    case kByteStreamSplit: return "BYTE_STREAM_SPLIT";
    case 10: return "ALP";
    default: return "unknown encoding";
  }
}

const char* codec_name(Codec c) {
  switch (c) {
    case Codec::kUncompressed: return "UNCOMPRESSED";
    case Codec::kSnappy: return "SNAPPY";
    case Codec::kGzip: return "GZIP";
    case Codec::kLzo: return "LZO";
    case Codec::kBrotli: return "BROTLI";
    case Codec::kLz4Hadoop: return "LZ4";
    case Codec::kZstd: return "ZSTD";
    case Codec::kLz4Raw: return "LZ4_RAW";
    case Codec::kLz4Frame: return "LZ4_FRAME";
  }
  return "unknown codec";
}

}  // namespace am::io::pq
