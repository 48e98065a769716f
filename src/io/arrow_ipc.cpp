// Arrow IPC reader (apache/arrow format/Columnar.rst "Serialization and Interprocess Communication",
// Message.fbs, Schema.fbs, File.fbs). Flatbuffers are read by hand: every table, vtable, offset, vector and
// string is bounds-checked against its buffer before use. Buffers of a record batch are views into the mapped
// file (or decompressed copies); every length, offset array and child length is validated when a batch is
// decoded, so building a row never reads out of bounds.
#include "io/arrow_ipc.h"

#include <algorithm>
#include <map>
#include <new>

#include "core/error.h"
#include "io/parquet_internal.h"

namespace am::io {

using pq::load_le;
using Json = nlohmann::ordered_json;

namespace {

constexpr int64_t kMaxArrayLength = int64_t(1) << 31;

// ---------------------------------------------------------------------------------------------------------
// Flatbuffers: a table is an int32 offset back to its vtable; the vtable is [vtable size, table size,
// field offsets...] (uint16); a field offset of 0 means the field takes its default.
struct FbTable {
  std::string_view buf;
  size_t pos = 0, vt = 0;
  uint16_t vt_size = 0, tbl_size = 0;
  bool valid = false;

  static void need(std::string_view b, size_t pos, size_t n) {
    if (pos > b.size() || n > b.size() - pos) throw FormatError("flatbuffer offset out of bounds");
  }
  static FbTable at(std::string_view b, size_t pos) {
    need(b, pos, 4);
    const int64_t vt = static_cast<int64_t>(pos) - load_le<int32_t>(b.data() + pos);
    if (vt < 0) throw FormatError("flatbuffer vtable out of bounds");
    need(b, static_cast<size_t>(vt), 4);
    FbTable t{b, pos, static_cast<size_t>(vt), load_le<uint16_t>(b.data() + vt), load_le<uint16_t>(b.data() + vt + 2),
              true};
    if (t.vt_size < 4 || t.tbl_size < 4) throw FormatError("flatbuffer vtable too small");
    need(b, t.vt, t.vt_size);
    need(b, pos, t.tbl_size);
    return t;
  }
  static FbTable root(std::string_view b) {
    need(b, 0, 4);
    return at(b, load_le<uint32_t>(b.data()));
  }

  // Absolute position of field `id`, or 0 when absent.
  size_t field(int id, size_t width) const {
    if (!valid) return 0;
    const size_t slot = 4 + 2 * static_cast<size_t>(id);
    if (slot + 2 > vt_size) return 0;
    const uint16_t off = load_le<uint16_t>(buf.data() + vt + slot);
    if (off == 0) return 0;
    if (off + width > tbl_size) throw FormatError("flatbuffer field out of its table");
    return pos + off;
  }
  template <class T>
  T scalar(int id, T def) const {
    const size_t p = field(id, sizeof(T));
    return p ? load_le<T>(buf.data() + p) : def;
  }
  size_t target(int id) const {  // where an offset field points, or 0
    const size_t p = field(id, 4);
    if (!p) return 0;
    const size_t t = p + load_le<uint32_t>(buf.data() + p);
    need(buf, t, 4);
    return t;
  }
  FbTable table(int id) const {
    const size_t t = target(id);
    return t ? at(buf, t) : FbTable{};
  }
  std::string_view string(int id) const {
    const size_t t = target(id);
    if (!t) return {};
    const uint32_t n = load_le<uint32_t>(buf.data() + t);
    need(buf, t + 4, n);
    return buf.substr(t + 4, n);
  }
  struct Vec {
    size_t start = 0;
    uint32_t n = 0;
  };
  Vec vector(int id, size_t elem) const {
    const size_t t = target(id);
    if (!t) return {};
    const uint32_t n = load_le<uint32_t>(buf.data() + t);
    if (n > (buf.size() - t - 4) / elem) throw FormatError("flatbuffer vector out of bounds");
    return {t + 4, n};
  }
  FbTable table_at(const Vec& v, size_t i) const {
    const size_t p = v.start + 4 * i;
    return at(buf, p + load_le<uint32_t>(buf.data() + p));
  }
};

// ---------------------------------------------------------------------------------------------------------
// Schema.fbs
enum TypeId {
  kNull = 1, kInt, kFloatingPoint, kBinary, kUtf8, kBool, kDecimal, kDate, kTime, kTimestamp, kInterval, kList,
  kStruct, kUnion, kFixedSizeBinary, kFixedSizeList, kMap, kDuration, kLargeBinary, kLargeUtf8, kLargeList,
  kRunEndEncoded, kBinaryView, kUtf8View, kListView, kLargeListView
};
enum MessageType { kSchemaMsg = 1, kDictionaryBatchMsg = 2, kRecordBatchMsg = 3 };
constexpr int16_t kMetadataV4 = 3, kMetadataV5 = 4;

struct Field {
  std::string name;
  int type = 0;
  int bit_width = 0;       // Int, Time, Decimal
  bool is_signed = false;  // Int
  int16_t precision = 0;   // FloatingPoint: HALF, SINGLE, DOUBLE
  int16_t unit = 0;        // Date, Interval
  int16_t union_mode = 0;  // Sparse, Dense
  int32_t width = 0;       // FixedSizeBinary bytes, FixedSizeList items
  bool dict = false;
  int64_t dict_id = 0;
  int index_bits = 32;
  bool index_signed = true;
  std::vector<Field> children;
};

const char* type_label(int t) {
  static const char* const names[] = {"none", "null", "int", "float", "binary", "utf8", "bool", "decimal", "date",
                                      "time", "timestamp", "interval", "list", "struct", "union",
                                      "fixed_size_binary", "fixed_size_list", "map", "duration", "large_binary",
                                      "large_utf8", "large_list", "run_end_encoded", "binary_view", "utf8_view",
                                      "list_view", "large_list_view"};
  return t >= 0 && t <= kLargeListView ? names[t] : "unknown";
}

Field parse_field(const FbTable& t, int depth) {
  if (depth > pq::kMaxSchemaDepth) throw FormatError("schema nested too deeply");
  Field f;
  f.name = std::string(t.string(0));
  f.type = t.scalar<uint8_t>(2, 0);
  const FbTable ty = t.table(3);
  switch (f.type) {
    case kInt:
      f.bit_width = ty.scalar<int32_t>(0, 0);
      f.is_signed = ty.scalar<uint8_t>(1, 0) != 0;
      if (f.bit_width != 8 && f.bit_width != 16 && f.bit_width != 32 && f.bit_width != 64)
        throw FormatError("field '" + f.name + "': int of " + std::to_string(f.bit_width) + " bits");
      break;
    case kFloatingPoint: f.precision = ty.scalar<int16_t>(0, 0); break;
    case kDate: f.unit = ty.scalar<int16_t>(0, 1); break;
    case kTime: f.bit_width = ty.scalar<int32_t>(1, 32); break;
    case kInterval: f.unit = ty.scalar<int16_t>(0, 0); break;
    case kDecimal: f.bit_width = ty.scalar<int32_t>(2, 128); break;
    case kUnion: f.union_mode = ty.scalar<int16_t>(0, 0); break;
    case kFixedSizeBinary:
    case kFixedSizeList:
      f.width = ty.scalar<int32_t>(0, 0);
      if (f.width < 0) throw FormatError("field '" + f.name + "': negative fixed size");
      break;
    default: break;
  }
  const FbTable de = t.table(4);
  if (de.valid) {
    f.dict = true;
    f.dict_id = de.scalar<int64_t>(0, 0);
    const FbTable it = de.table(1);
    if (it.valid) {
      f.index_bits = it.scalar<int32_t>(0, 0);
      f.index_signed = it.scalar<uint8_t>(1, 0) != 0;
    }
    if (f.index_bits != 8 && f.index_bits != 16 && f.index_bits != 32 && f.index_bits != 64)
      throw FormatError("field '" + f.name + "': dictionary index of " + std::to_string(f.index_bits) + " bits");
  }
  const FbTable::Vec kids = t.vector(5, 4);
  for (uint32_t i = 0; i < kids.n; ++i) f.children.push_back(parse_field(t.table_at(kids, i), depth + 1));
  const size_t want = (f.type == kList || f.type == kLargeList || f.type == kFixedSizeList || f.type == kMap ||
                       f.type == kListView || f.type == kLargeListView) ? 1
                      : f.type == kRunEndEncoded ? 2 : f.children.size();
  if (f.children.size() != want || (f.type == kMap && f.children[0].children.size() != 2))
    throw FormatError("field '" + f.name + "': wrong number of children for a " + type_label(f.type));
  return f;
}

// Bytes per value of a fixed-width type (0: not fixed width; bool is counted in bits elsewhere).
size_t value_width(const Field& f) {
  switch (f.type) {
    case kInt: return static_cast<size_t>(f.bit_width / 8);
    case kFloatingPoint: return f.precision == 0 ? 2 : f.precision == 1 ? 4 : 8;
    case kDate: return f.unit == 0 ? 4 : 8;
    case kTime: return f.bit_width == 32 ? 4 : 8;
    case kTimestamp: case kDuration: return 8;
    case kDecimal: return static_cast<size_t>(std::max(f.bit_width, 0) / 8);
    case kInterval: return f.unit == 0 ? 4 : f.unit == 1 ? 8 : 16;
    case kFixedSizeBinary: return static_cast<size_t>(f.width);
    default: return 0;
  }
}

// Buffers of one field in a record batch, not counting its children.
int buffer_count(const Field& f, bool as_values, int16_t version) {
  if (f.dict && !as_values) return 2;  // validity + indices
  switch (f.type) {
    case kNull: case kRunEndEncoded: return 0;
    case kStruct: case kFixedSizeList: return 1;
    case kBinary: case kUtf8: case kLargeBinary: case kLargeUtf8: case kListView: case kLargeListView: return 3;
    case kUnion: return (f.union_mode == 1 ? 2 : 1) + (version < kMetadataV5 ? 1 : 0);
    default: return 2;  // validity + values/offsets (fixed width, list, large list, map, views + variadic)
  }
}

// ---------------------------------------------------------------------------------------------------------
// Decoded arrays: views into the file or into a batch's arena, all validated.
struct Dictionary;

struct Array {
  const Field* field = nullptr;
  int64_t length = 0, null_count = 0;
  std::string_view validity, offsets, data;
  std::vector<Array> children;
  const Dictionary* dict = nullptr;
  bool as_values = false;  // a dictionary's values: the field's own dictionary encoding does not apply
};

struct Batch {
  std::vector<Array> columns;  // top-level fields (unselected ones left empty)
  pq::Arena arena;             // decompressed buffers
};

// A dictionary: its batches in order (deltas append). Shared so a replaced dictionary stays alive while used.
struct Dictionary {
  std::vector<std::shared_ptr<const Batch>> chunks;
  int64_t length = 0;
};

bool bit(std::string_view bits, int64_t i) { return (static_cast<uint8_t>(bits[static_cast<size_t>(i >> 3)]) >> (i & 7)) & 1; }

int64_t offset_at(std::string_view offsets, bool large, int64_t i) {
  return large ? load_le<int64_t>(offsets.data() + 8 * i) : load_le<int32_t>(offsets.data() + 4 * i);
}

std::string key_text(const Json& k) {
  return k.is_string() ? k.get<std::string>() : k.dump(-1, ' ', false, Json::error_handler_t::replace);
}

// Decodes the nodes and buffers of one record batch (or dictionary batch) into arrays.
class BatchDecoder {
 public:
  BatchDecoder(std::string_view body, const FbTable& rb, int16_t version, const std::map<int64_t, std::shared_ptr<Dictionary>>& dicts,
               Batch* out)
      : body_(body), rb_(rb), version_(version), dicts_(dicts), out_(out) {
    nodes_ = rb.vector(1, 16);
    buffers_ = rb.vector(2, 16);
    variadic_ = rb.vector(4, 8);
    const FbTable comp = rb.table(3);
    if (comp.valid) {
      const int8_t codec = comp.scalar<int8_t>(0, 0);
      if (comp.scalar<int8_t>(1, 0) != 0) throw FormatError("unsupported body compression method");
      if (codec == 0) codec_ = pq::Codec::kLz4Frame;
      else if (codec == 1) codec_ = pq::Codec::kZstd;
      else throw FormatError("unknown body compression codec " + std::to_string(codec));
      compressed_ = true;
    }
  }

  Array decode(const Field& f, bool as_values, bool skip) {
    Array a;
    a.field = &f;
    a.as_values = as_values;
    if (node_ >= nodes_.n) throw FormatError("record batch has fewer field nodes than the schema");
    const char* n = rb_.buf.data() + nodes_.start + 16 * node_++;
    a.length = load_le<int64_t>(n);
    a.null_count = load_le<int64_t>(n + 8);
    if (a.length < 0 || a.length > kMaxArrayLength || a.null_count < 0 || a.null_count > a.length)
      throw FormatError("field '" + f.name + "': bad length " + std::to_string(a.length) + " / null count " +
                        std::to_string(a.null_count));
    int nb = buffer_count(f, as_values, version_);
    if (!(f.dict && !as_values) && (f.type == kBinaryView || f.type == kUtf8View)) {
      if (variadic_used_ >= variadic_.n) throw FormatError("field '" + f.name + "': no variadic buffer count");
      const int64_t extra = load_le<int64_t>(rb_.buf.data() + variadic_.start + 8 * variadic_used_++);
      if (extra < 0 || extra > buffers_.n) throw FormatError("field '" + f.name + "': bad variadic buffer count");
      nb += static_cast<int>(extra);
    }
    std::string_view bufs[3];
    for (int i = 0; i < nb; ++i) {
      std::string_view b = buffer(skip);
      if (i < 3) bufs[i] = b;
    }
    const bool dict_indices = f.dict && !as_values;
    if (!dict_indices)
      for (const Field& c : f.children) a.children.push_back(decode(c, false, skip));
    if (skip || (f.type == kNull && !dict_indices)) return a;  // null arrays have no buffers at all
    a.validity = bufs[0];
    if (a.null_count > 0 && a.validity.size() < static_cast<size_t>((a.length + 7) / 8))
      throw FormatError("field '" + f.name + "': validity bitmap too short");
    if (dict_indices) return dictionary_indices(f, a, bufs[1]);
    validate(f, a, bufs);
    return a;
  }

  void finish() const {
    if (node_ != nodes_.n || buffer_ != buffers_.n)
      throw FormatError("record batch has " + std::to_string(nodes_.n) + " field nodes and " +
                        std::to_string(buffers_.n) + " buffers, the schema needs " + std::to_string(node_) + " and " +
                        std::to_string(buffer_));
  }

 private:
  std::string_view buffer(bool skip) {
    if (buffer_ >= buffers_.n) throw FormatError("record batch has fewer buffers than the schema needs");
    const char* b = rb_.buf.data() + buffers_.start + 16 * buffer_++;
    const int64_t off = load_le<int64_t>(b), len = load_le<int64_t>(b + 8);
    if (off < 0 || len < 0 || off > static_cast<int64_t>(body_.size()) || len > static_cast<int64_t>(body_.size()) - off)
      throw FormatError("buffer [" + std::to_string(off) + ", +" + std::to_string(len) + ") outside the message body");
    std::string_view raw = body_.substr(static_cast<size_t>(off), static_cast<size_t>(len));
    if (skip || !compressed_ || raw.empty()) return raw;
    // Compressed bodies: each buffer is its uncompressed length (int64, -1 = stored as is) + the codec's data.
    if (raw.size() < 8) throw FormatError("compressed buffer shorter than its length prefix");
    const int64_t size = load_le<int64_t>(raw.data());
    if (size == -1) return raw.substr(8);
    if (size < 0) throw FormatError("compressed buffer with negative length");
    // Arrow JS (up to 21 at least) writes the compressed length there instead of the uncompressed one; its own
    // reader ignores the prefix. Accept that signature with the frame deciding the size; the array checks
    // below still validate what comes out.
    const bool js_prefix = static_cast<size_t>(size) == raw.size() - 8;
    return out_->arena.emplace_back(pq::decompress(codec_, raw.substr(8), js_prefix ? pq::kMaxPageBytes : static_cast<size_t>(size),
                                                   /*exact=*/!js_prefix));
  }

  Array dictionary_indices(const Field& f, Array& a, std::string_view indices) {
    if (indices.size() / (f.index_bits / 8) < static_cast<size_t>(a.length))
      throw FormatError("field '" + f.name + "': dictionary indices buffer too short");
    const auto it = dicts_.find(f.dict_id);
    if (it == dicts_.end())
      throw FormatError("field '" + f.name + "': dictionary " + std::to_string(f.dict_id) + " not sent before use");
    a.data = indices;
    a.dict = it->second.get();
    return std::move(a);
  }

  // Offsets: length + 1 entries, non-decreasing, inside [0, limit].
  void check_offsets(const Field& f, Array& a, std::string_view offsets, bool large, int64_t limit) {
    const size_t w = large ? 8 : 4;
    if (a.length == 0) return;
    if (offsets.size() / w < static_cast<size_t>(a.length) + 1) throw FormatError("field '" + f.name + "': offsets buffer too short");
    int64_t prev = offset_at(offsets, large, 0);
    if (prev < 0) throw FormatError("field '" + f.name + "': negative offset");
    for (int64_t i = 1; i <= a.length; ++i) {
      const int64_t o = offset_at(offsets, large, i);
      if (o < prev) throw FormatError("field '" + f.name + "': offsets decrease");
      prev = o;
    }
    if (prev > limit) throw FormatError("field '" + f.name + "': offsets run past the values");
    a.offsets = offsets;
  }

  void validate(const Field& f, Array& a, const std::string_view* bufs) {
    const auto n = static_cast<size_t>(a.length);
    switch (f.type) {
      case kNull: return;
      case kBool:
        if (bufs[1].size() < (n + 7) / 8) throw FormatError("field '" + f.name + "': bool buffer too short");
        a.data = bufs[1];
        return;
      case kBinary: case kUtf8: case kLargeBinary: case kLargeUtf8:
        a.data = bufs[2];
        check_offsets(f, a, bufs[1], f.type == kLargeBinary || f.type == kLargeUtf8,
                      static_cast<int64_t>(bufs[2].size()));
        return;
      case kList: case kLargeList: case kMap:
        check_offsets(f, a, bufs[1], f.type == kLargeList, a.children[0].length);
        return;
      case kFixedSizeList:
        if (a.children[0].length / std::max<int64_t>(f.width, 1) < a.length && f.width > 0)
          throw FormatError("field '" + f.name + "': child shorter than the fixed-size lists");
        return;
      case kStruct:
        for (const Array& c : a.children)
          if (c.length < a.length) throw FormatError("field '" + f.name + "': child shorter than the struct");
        return;
      default: {
        const size_t w = value_width(f);
        if (w == 0) return;  // unions, views, run-end encoded: refused when read
        if (bufs[1].size() / w < n) throw FormatError("field '" + f.name + "': values buffer too short");
        a.data = bufs[1];
      }
    }
  }

  std::string_view body_;
  const FbTable& rb_;
  int16_t version_;
  const std::map<int64_t, std::shared_ptr<Dictionary>>& dicts_;
  Batch* out_;
  FbTable::Vec nodes_, buffers_, variadic_;
  uint32_t node_ = 0, buffer_ = 0, variadic_used_ = 0;
  bool compressed_ = false;
  pq::Codec codec_ = pq::Codec::kUncompressed;
};

// Refuses what value() cannot render, naming the column, before any row is built.
void check_supported(const Field& f, const std::string& path) {
  switch (f.type) {
    case kDecimal: case kInterval: case kUnion: case kBinaryView: case kUtf8View: case kListView:
    case kLargeListView: case kRunEndEncoded:
      throw FormatError("column '" + path + "': Arrow type " + type_label(f.type) + " is not supported");
    case kFloatingPoint:
      if (f.precision < 0 || f.precision > 2) throw FormatError("column '" + path + "': unknown float precision");
      break;
    case kTime:
      if (f.bit_width != 32 && f.bit_width != 64) throw FormatError("column '" + path + "': bad time width");
      break;
    default:
      if (f.type < kNull || f.type > kLargeListView)
        throw FormatError("column '" + path + "': unknown Arrow type id " + std::to_string(f.type));
  }
  for (const Field& c : f.children) check_supported(c, path + "." + c.name);
}

Json value(const Array& a, int64_t i);

Json dictionary_value(const Array& a, int64_t i) {
  const Field& f = *a.field;
  const size_t w = static_cast<size_t>(f.index_bits / 8);
  const char* p = a.data.data() + w * static_cast<size_t>(i);
  int64_t k;
  switch (w) {
    case 1: k = f.index_signed ? load_le<int8_t>(p) : load_le<uint8_t>(p); break;
    case 2: k = f.index_signed ? load_le<int16_t>(p) : load_le<uint16_t>(p); break;
    case 4: k = f.index_signed ? load_le<int32_t>(p) : load_le<uint32_t>(p); break;
    default: k = load_le<int64_t>(p);
  }
  if (k < 0 || k >= a.dict->length)
    throw FormatError("column '" + f.name + "': dictionary index " + std::to_string(k) + " out of range");
  for (const auto& chunk : a.dict->chunks) {
    const Array& values = chunk->columns[0];
    if (k < values.length) return value(values, k);
    k -= values.length;
  }
  throw FormatError("column '" + f.name + "': dictionary index out of range");
}

Json value(const Array& a, int64_t i) {
  const Field& f = *a.field;
  if (f.type == kNull || (a.null_count > 0 && !bit(a.validity, i))) return nullptr;
  if (f.dict && !a.as_values) return dictionary_value(a, i);
  const size_t u = static_cast<size_t>(i);
  switch (f.type) {
    case kNull: return nullptr;
    case kBool: return bit(a.data, i);
    case kInt: {
      const char* p = a.data.data() + u * (f.bit_width / 8);
      switch (f.bit_width) {
        case 8: return f.is_signed ? Json(load_le<int8_t>(p)) : Json(load_le<uint8_t>(p));
        case 16: return f.is_signed ? Json(load_le<int16_t>(p)) : Json(load_le<uint16_t>(p));
        case 32: return f.is_signed ? Json(load_le<int32_t>(p)) : Json(load_le<uint32_t>(p));
        default: return f.is_signed ? Json(load_le<int64_t>(p)) : Json(load_le<uint64_t>(p));
      }
    }
    case kFloatingPoint:
      if (f.precision == 0) return pq::half_to_float(load_le<uint16_t>(a.data.data() + 2 * u));
      if (f.precision == 1) return load_le<float>(a.data.data() + 4 * u);
      return load_le<double>(a.data.data() + 8 * u);
    case kDate: case kTime: case kTimestamp: case kDuration:
      if (value_width(f) == 4) return load_le<int32_t>(a.data.data() + 4 * u);
      return load_le<int64_t>(a.data.data() + 8 * u);
    case kFixedSizeBinary: return std::string(a.data.substr(u * f.width, static_cast<size_t>(f.width)));
    case kBinary: case kUtf8: case kLargeBinary: case kLargeUtf8: {
      const bool large = f.type == kLargeBinary || f.type == kLargeUtf8;
      const int64_t b = offset_at(a.offsets, large, i), e = offset_at(a.offsets, large, i + 1);
      return std::string(a.data.substr(static_cast<size_t>(b), static_cast<size_t>(e - b)));
    }
    case kList: case kLargeList: case kFixedSizeList: case kMap: {
      int64_t b, e;
      if (f.type == kFixedSizeList) {
        b = i * f.width;
        e = b + f.width;
      } else {
        b = offset_at(a.offsets, f.type == kLargeList, i);
        e = offset_at(a.offsets, f.type == kLargeList, i + 1);
      }
      const Array& child = a.children[0];
      if (f.type != kMap) {
        Json arr = Json::array();
        for (int64_t j = b; j < e; ++j) arr.push_back(value(child, j));
        return arr;
      }
      Json obj = Json::object();
      for (int64_t j = b; j < e; ++j) obj[key_text(value(child.children[0], j))] = value(child.children[1], j);
      return obj;
    }
    case kStruct: {
      Json obj = Json::object();
      for (size_t c = 0; c < a.children.size(); ++c) obj[f.children[c].name] = value(a.children[c], i);
      return obj;
    }
    default: throw FormatError("column '" + f.name + "': Arrow type " + type_label(f.type) + " is not supported");
  }
}

void collect_dict_fields(const Field& f, std::map<int64_t, const Field*>* out) {
  if (f.dict) (*out)[f.dict_id] = &f;
  for (const Field& c : f.children) collect_dict_fields(c, out);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
struct ArrowIpcReader::Impl {
  struct Message {
    int type = 0;
    size_t meta_pos = 0, meta_len = 0, body_pos = 0, body_len = 0;
    int64_t first_row = 0, rows = 0;  // record batches
  };

  std::unique_ptr<pq::MappedFile> file;
  std::vector<Field> fields;
  std::vector<std::string> names;
  std::map<int64_t, const Field*> dict_fields;
  std::vector<Message> messages;  // dictionary and record batches, in stream order
  int16_t version = kMetadataV5;
  int64_t rows = 0;

  [[noreturn]] void fail(const std::string& what) const { throw FormatError(file->path() + ": " + what); }

  FbTable header(const Message& m) const {
    const FbTable msg = FbTable::root(file->bytes().substr(m.meta_pos, m.meta_len));
    const FbTable h = msg.table(2);
    if (!h.valid) throw FormatError("message without a header");
    return h;
  }

  // Parses the encapsulated message at *pos ([0xFFFFFFFF] int32 metadata length, metadata, body), which must
  // end by `end`, and moves *pos past it. Returns false at an end-of-stream marker.
  bool parse_message(size_t* pos, size_t end, Message* m) {
    const std::string_view b = file->bytes();
    if (end - *pos < 4) throw FormatError("truncated message");
    int64_t len = load_le<int32_t>(b.data() + *pos);
    *pos += 4;
    if (len == -1) {  // continuation marker (format >= 0.15); without it, the pre-0.15 form
      if (end - *pos < 4) throw FormatError("truncated message");
      len = load_le<int32_t>(b.data() + *pos);
      *pos += 4;
    }
    if (len == 0) return false;
    if (len < 0 || static_cast<uint64_t>(len) > end - *pos)
      throw FormatError("metadata length " + std::to_string(len) + " runs past the end");
    m->meta_pos = *pos;
    m->meta_len = static_cast<size_t>(len);
    *pos += m->meta_len;
    const FbTable msg = FbTable::root(b.substr(m->meta_pos, m->meta_len));
    const int16_t v = msg.scalar<int16_t>(0, 0);
    if (v < kMetadataV4) throw FormatError("metadata version V" + std::to_string(v + 1) + " predates Arrow 0.8");
    version = std::min(version, v);
    m->type = msg.scalar<uint8_t>(1, 0);
    const int64_t body = msg.scalar<int64_t>(3, 0);
    if (body < 0 || static_cast<uint64_t>(body) > end - *pos) throw FormatError("body runs past the end");
    m->body_pos = *pos;
    m->body_len = static_cast<size_t>(body);
    *pos += m->body_len;
    if (m->type == kRecordBatchMsg) {
      m->rows = msg.table(2).scalar<int64_t>(0, 0);
      if (m->rows < 0 || m->rows > kMaxArrayLength) throw FormatError("bad record batch length");
    }
    return true;
  }

  void add(Message m) {
    if (m.type == kRecordBatchMsg) {
      m.first_row = rows;
      rows += m.rows;
    }
    if (m.type == kRecordBatchMsg || m.type == kDictionaryBatchMsg) messages.push_back(m);
    if (m.type == kSchemaMsg) throw FormatError("a second schema");
  }

  // The streaming format: a schema message, then dictionary and record batches, up to an end-of-stream marker
  // (or the end of the file).
  void scan_stream() {
    size_t pos = 0;
    const size_t end = file->size();
    bool have_schema = false;
    for (int index = 0; pos < end; ++index) {
      const std::string where = "message " + std::to_string(index) + " (byte " + std::to_string(pos) + "): ";
      try {
        Message m;
        if (!parse_message(&pos, end, &m)) break;
        if (index == 0) {
          if (m.type != kSchemaMsg) throw FormatError("the stream does not start with a schema");
          read_schema(header(m));
          have_schema = true;
        } else {
          add(m);
        }
      } catch (const FormatError& e) {
        fail(where + e.what());
      }
    }
    if (!have_schema) fail("no schema message");
  }

  // The file format: "ARROW1", padding, messages, footer (schema + blocks locating each dictionary and record
  // batch), int32 footer length, "ARROW1". Writers need not repeat the schema as a message, so the footer rules.
  void read_file() {
    const std::string_view b = file->bytes();
    if (b.size() < 18 || b.substr(b.size() - 6) != "ARROW1") fail("truncated Arrow file (no ARROW1 magic at the end)");
    const int32_t len = load_le<int32_t>(b.data() + b.size() - 10);
    if (len <= 0 || static_cast<size_t>(len) > b.size() - 18) fail("footer length out of range");
    const size_t footer_pos = b.size() - 10 - static_cast<size_t>(len);
    try {
      const FbTable footer = FbTable::root(b.substr(footer_pos, static_cast<size_t>(len)));
      version = footer.scalar<int16_t>(0, kMetadataV5);
      read_schema(footer.table(1));
      for (int list : {2, 3}) {  // dictionaries first, then record batches
        const FbTable::Vec blocks = footer.vector(list, 24);
        for (uint32_t i = 0; i < blocks.n; ++i) {
          const char* blk = footer.buf.data() + blocks.start + 24 * i;
          const int64_t off = load_le<int64_t>(blk);
          const std::string where = (list == 2 ? "dictionary block " : "record batch block ") + std::to_string(i) + ": ";
          try {
            if (off < 8 || static_cast<uint64_t>(off) >= footer_pos) throw FormatError("offset out of range");
            size_t pos = static_cast<size_t>(off);
            Message m;
            if (!parse_message(&pos, footer_pos, &m) || m.type != (list == 2 ? kDictionaryBatchMsg : kRecordBatchMsg))
              throw FormatError("does not point at a " + std::string(list == 2 ? "dictionary" : "record") + " batch");
            add(m);
          } catch (const FormatError& e) {
            throw FormatError(where + e.what());
          }
        }
      }
    } catch (const FormatError& e) {
      fail(std::string("footer: ") + e.what());
    }
  }

  void read_schema(const FbTable& s) {
    if (!s.valid) throw FormatError("no schema");
    if (s.scalar<int16_t>(0, 0) != 0) throw FormatError("big-endian data is not supported");
    const FbTable::Vec v = s.vector(1, 4);
    for (uint32_t i = 0; i < v.n; ++i) fields.push_back(parse_field(s.table_at(v, i), 0));
    for (const Field& f : fields) {
      names.push_back(f.name);
      collect_dict_fields(f, &dict_fields);
    }
  }

  void open() {
    const std::string_view b = file->bytes();
    if (b.size() >= 8 && b.substr(0, 6) == "ARROW1") return read_file();
    if (b.size() < 8) fail("not an Arrow IPC file (" + std::to_string(b.size()) + " bytes)");
    const uint32_t first = load_le<uint32_t>(b.data());
    if (first != 0xFFFFFFFFu && (first == 0 || first > b.size()))
      fail("not an Arrow IPC stream or file (no continuation marker or ARROW1 magic)");
    scan_stream();
  }

  std::vector<size_t> select(const std::vector<std::string>& columns) const {
    std::vector<size_t> out;
    if (columns.empty()) {
      for (size_t i = 0; i < fields.size(); ++i) out.push_back(i);
    }
    for (const std::string& c : columns) {
      const auto it = std::find(names.begin(), names.end(), c);
      if (it == names.end()) {
        std::string all;
        for (const auto& n : names) all += (all.empty() ? "" : ", ") + n;
        fail("no column '" + c + "' (columns: " + all + ")");
      }
      const size_t i = static_cast<size_t>(it - names.begin());
      if (std::find(out.begin(), out.end(), i) == out.end()) out.push_back(i);
    }
    for (size_t i : out) {
      try {
        check_supported(fields[i], fields[i].name);
      } catch (const FormatError& e) {
        fail(e.what());
      }
    }
    return out;
  }

  // Decodes a record batch's selected columns (others are walked over, not validated).
  std::shared_ptr<Batch> decode_batch(const Message& m, const std::vector<bool>& wanted,
                                      const std::map<int64_t, std::shared_ptr<Dictionary>>& dicts) const {
    auto batch = std::make_shared<Batch>();
    const FbTable h = header(m);
    BatchDecoder d(file->bytes().substr(m.body_pos, m.body_len), h, version, dicts, batch.get());
    for (size_t i = 0; i < fields.size(); ++i) {
      Array a = d.decode(fields[i], false, !wanted[i]);
      if (wanted[i] && a.length < m.rows) throw FormatError("column '" + fields[i].name + "' shorter than the batch");
      batch->columns.push_back(std::move(a));
    }
    d.finish();
    return batch;
  }

  void apply_dictionary(const Message& m, std::map<int64_t, std::shared_ptr<Dictionary>>* dicts) const {
    const FbTable h = header(m);
    const int64_t id = h.scalar<int64_t>(0, 0);
    const auto it = dict_fields.find(id);
    if (it == dict_fields.end()) throw FormatError("dictionary batch for unknown id " + std::to_string(id));
    const FbTable rb = h.table(1);
    if (!rb.valid) throw FormatError("dictionary batch without data");
    auto batch = std::make_shared<Batch>();
    BatchDecoder d(file->bytes().substr(m.body_pos, m.body_len), rb, version, *dicts, batch.get());
    batch->columns.push_back(d.decode(*it->second, true, false));
    d.finish();
    auto next = std::make_shared<Dictionary>();
    const bool delta = h.scalar<uint8_t>(2, 0) != 0;
    if (delta && dicts->count(id)) *next = *(*dicts)[id];  // copy: batches still holding the old one keep it
    next->length += batch->columns[0].length;
    next->chunks.push_back(std::move(batch));
    (*dicts)[id] = std::move(next);
  }
};

ArrowIpcReader::ArrowIpcReader(const std::string& path) {
  auto impl = std::make_shared<Impl>();
  impl->file = std::make_unique<pq::MappedFile>(path);
  try {
    impl->open();
  } catch (const std::bad_alloc&) {
    impl->fail("schema too large to load (corrupt?)");
  }
  impl_ = std::move(impl);
}

int64_t ArrowIpcReader::num_rows() const { return impl_->rows; }

const std::vector<std::string>& ArrowIpcReader::column_names() const { return impl_->names; }

void ArrowIpcReader::read_rows(int64_t begin, int64_t end, const std::function<bool(int64_t, Json&&)>& fn,
                               const std::vector<std::string>& columns) const {
  const Impl& m = *impl_;
  const std::vector<size_t> sel = m.select(columns);
  std::vector<bool> wanted(m.fields.size(), false);
  for (size_t i : sel) wanted[i] = true;
  begin = std::max<int64_t>(begin, 0);
  end = std::min(end, m.rows);
  std::map<int64_t, std::shared_ptr<Dictionary>> dicts;
  int batch_index = 0;
  for (const auto& msg : m.messages) {
    if (begin >= end) return;
    const std::string where = msg.type == kRecordBatchMsg ? "record batch " + std::to_string(batch_index++) + ": "
                                                          : "dictionary batch: ";
    if (msg.type == kRecordBatchMsg && (msg.first_row + msg.rows <= begin || msg.rows == 0)) continue;
    if (msg.type == kRecordBatchMsg && msg.first_row >= end) return;
    std::shared_ptr<Batch> batch;
    try {
      if (msg.type == kDictionaryBatchMsg) {
        m.apply_dictionary(msg, &dicts);
        continue;
      }
      batch = m.decode_batch(msg, wanted, dicts);
    } catch (const FormatError& e) {
      m.fail(where + e.what());
    } catch (const std::bad_alloc&) {
      m.fail(where + "out of memory decoding (corrupt sizes?)");
    }
    const int64_t lo = std::max(begin, msg.first_row), hi = std::min(end, msg.first_row + msg.rows);
    for (int64_t r = lo; r < hi; ++r) {
      Json row = Json::object();
      try {
        for (size_t i : sel) row[m.names[i]] = value(batch->columns[i], r - msg.first_row);
      } catch (const FormatError& e) {
        m.fail(where + e.what());
      }
      if (!fn(r, std::move(row))) return;
    }
    begin = hi;
  }
}

}  // namespace am::io
