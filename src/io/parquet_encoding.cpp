// Value encodings of Parquet data and dictionary pages (apache/parquet-format Encodings.md). Each decoder
// checks the bytes it needs before reading and the count it is asked for before allocating; counts stored in
// the data (run lengths, DELTA headers) are never trusted beyond what was asked for.
#include <algorithm>

#include "core/error.h"
#include "io/parquet_internal.h"

namespace am::io::pq {
namespace {

// The `bw`-bit value starting at bit `bit` of `base[0, len)`, bits packed least significant first (the order
// of the RLE hybrid and DELTA_BINARY_PACKED). The caller guarantees bit + bw <= 8 * len.
uint64_t unpack_bits(const uint8_t* base, size_t len, size_t bit, int bw) {
  if (bw == 0) return 0;
  const size_t byte = bit >> 3;
  const int shift = static_cast<int>(bit & 7);
  uint64_t w = 0;
  std::memcpy(&w, base + byte, std::min<size_t>(8, len - byte));
  uint64_t v = w >> shift;
  if (shift + bw > 64) v |= static_cast<uint64_t>(base[byte + 8]) << (64 - shift);
  return bw == 64 ? v : v & ((uint64_t(1) << bw) - 1);
}

const uint8_t* u8(std::string_view s) { return reinterpret_cast<const uint8_t*>(s.data()); }

// ULEB128 / zigzag readers over a string_view with a cursor.
uint64_t uleb(std::string_view d, size_t* pos) {
  uint64_t v = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    if (*pos >= d.size()) throw FormatError("varint runs past the end of the data");
    const uint8_t c = static_cast<uint8_t>(d[(*pos)++]);
    v |= static_cast<uint64_t>(c & 0x7f) << shift;
    if (!(c & 0x80)) return v;
  }
  throw FormatError("varint longer than 10 bytes");
}
int64_t zigzag(std::string_view d, size_t* pos) {
  const uint64_t v = uleb(d, pos);
  return static_cast<int64_t>(v >> 1) ^ -static_cast<int64_t>(v & 1);
}

[[noreturn]] void short_data(const char* what, size_t need, size_t have) {
  throw FormatError(std::string(what) + ": needs " + std::to_string(need) + " bytes, the page holds " +
                    std::to_string(have));
}

enum class Kind { kInt, kReal, kBytes };
Kind kind_of(Type t) {
  switch (t) {
    case Type::kBoolean: case Type::kInt32: case Type::kInt64: return Kind::kInt;
    case Type::kFloat: case Type::kDouble: return Kind::kReal;
    default: return Kind::kBytes;
  }
}
size_t fixed_width(const ValueType& vt) {
  switch (vt.type) {
    case Type::kInt32: case Type::kFloat: return 4;
    case Type::kInt64: case Type::kDouble: return 8;
    case Type::kInt96: return 12;
    case Type::kFixedLenByteArray: return static_cast<size_t>(vt.type_length);
    default: return 0;
  }
}

// One little-endian fixed-width value of `vt` at `p` appended to `out`.
void push_fixed(const ValueType& vt, const char* p, Values* out) {
  switch (vt.type) {
    case Type::kInt32: out->ints.push_back(load_le<int32_t>(p)); break;
    case Type::kInt64: out->ints.push_back(load_le<int64_t>(p)); break;
    case Type::kFloat: out->reals.push_back(load_le<float>(p)); break;
    case Type::kDouble: out->reals.push_back(load_le<double>(p)); break;
    default: out->bytes.emplace_back(p, fixed_width(vt)); break;
  }
}

void reserve(Values* out, Kind k, size_t n) {
  if (k == Kind::kInt) out->ints.reserve(out->ints.size() + n);
  else if (k == Kind::kReal) out->reals.reserve(out->reals.size() + n);
  else out->bytes.reserve(out->bytes.size() + n);
}

void decode_plain(const ValueType& vt, std::string_view d, size_t n, Values* out) {
  if (vt.type == Type::kBoolean) {
    if ((n + 7) / 8 > d.size()) short_data("PLAIN booleans", (n + 7) / 8, d.size());
    reserve(out, Kind::kInt, n);
    for (size_t i = 0; i < n; ++i) out->ints.push_back((u8(d)[i >> 3] >> (i & 7)) & 1);
    return;
  }
  if (vt.type == Type::kByteArray) {
    if (n > d.size() / 4) short_data("PLAIN byte arrays", n * 4, d.size());
    reserve(out, Kind::kBytes, n);
    size_t pos = 0;
    for (size_t i = 0; i < n; ++i) {
      if (d.size() - pos < 4) short_data("PLAIN byte arrays", pos + 4, d.size());
      const uint32_t len = load_le<uint32_t>(d.data() + pos);
      pos += 4;
      if (len > d.size() - pos) short_data("PLAIN byte array value", pos + len, d.size());
      out->bytes.push_back(d.substr(pos, len));
      pos += len;
    }
    return;
  }
  const size_t w = fixed_width(vt);
  if (w == 0 || n > d.size() / w) short_data("PLAIN values", n * w, d.size());
  reserve(out, kind_of(vt.type), n);
  for (size_t i = 0; i < n; ++i) push_fixed(vt, d.data() + i * w, out);
}

// BYTE_STREAM_SPLIT: byte j of value i is at j * n + i.
void decode_byte_stream_split(const ValueType& vt, std::string_view d, size_t n, Values* out, Arena* arena) {
  const size_t w = fixed_width(vt);
  if (w == 0 || vt.type == Type::kInt96) throw FormatError("BYTE_STREAM_SPLIT is not defined for this type");
  if (n > d.size() / w || d.size() != n * w) short_data("BYTE_STREAM_SPLIT values", n * w, d.size());
  std::string& buf = arena->emplace_back(d.size(), '\0');  // values re-assembled; FLBA views point here
  for (size_t i = 0; i < n; ++i)
    for (size_t j = 0; j < w; ++j) buf[i * w + j] = d[j * n + i];
  reserve(out, kind_of(vt.type), n);
  for (size_t i = 0; i < n; ++i) push_fixed(vt, buf.data() + i * w, out);
}

// DELTA_BINARY_PACKED: returns the bytes consumed. Values wrap modulo 2^64 (INT32 columns take the low 32
// bits, which is the same as wrapping modulo 2^32).
size_t decode_delta_binary(std::string_view d, size_t n, std::vector<int64_t>* out) {
  size_t pos = 0;
  const uint64_t block = uleb(d, &pos), minis = uleb(d, &pos), total = uleb(d, &pos);
  uint64_t prev = static_cast<uint64_t>(zigzag(d, &pos));
  if (block == 0 || block % 128 != 0 || block > (1u << 20) || minis == 0 || block % minis != 0 ||
      (block / minis) % 32 != 0)
    throw FormatError("DELTA_BINARY_PACKED: bad block header (block " + std::to_string(block) + ", miniblocks " +
                      std::to_string(minis) + ")");
  if (total != n)
    throw FormatError("DELTA_BINARY_PACKED: holds " + std::to_string(total) + " values, the page needs " +
                      std::to_string(n));
  if (n == 0) return pos;
  const size_t per_mini = block / minis;
  out->reserve(out->size() + n);
  out->push_back(static_cast<int64_t>(prev));
  size_t produced = 1;
  while (produced < n) {
    const uint64_t min_delta = static_cast<uint64_t>(zigzag(d, &pos));
    if (d.size() - pos < minis) short_data("DELTA_BINARY_PACKED bit widths", pos + minis, d.size());
    const size_t widths = pos;
    pos += minis;
    for (size_t m = 0; m < minis && produced < n; ++m) {
      const int bw = static_cast<uint8_t>(d[widths + m]);
      if (bw > 64) throw FormatError("DELTA_BINARY_PACKED: bit width " + std::to_string(bw));
      const size_t bytes = per_mini * bw / 8;
      if (d.size() - pos < bytes) short_data("DELTA_BINARY_PACKED miniblock", pos + bytes, d.size());
      const uint8_t* base = u8(d) + pos;
      for (size_t j = 0; j < per_mini && produced < n; ++j, ++produced) {
        prev += min_delta + unpack_bits(base, bytes, j * bw, bw);
        out->push_back(static_cast<int64_t>(prev));
      }
      pos += bytes;
    }
  }
  return pos;
}

// Lengths (DELTA_BINARY_PACKED) then the concatenated bytes; returns the bytes consumed.
size_t decode_delta_length(std::string_view d, size_t n, std::vector<std::string_view>* out) {
  std::vector<int64_t> lens;
  size_t pos = decode_delta_binary(d, n, &lens);
  out->reserve(out->size() + n);
  for (int64_t len : lens) {
    if (len < 0 || static_cast<uint64_t>(len) > d.size() - pos)
      throw FormatError("DELTA_LENGTH_BYTE_ARRAY: value length " + std::to_string(len) + " exceeds the page");
    out->push_back(d.substr(pos, static_cast<size_t>(len)));
    pos += static_cast<size_t>(len);
  }
  return pos;
}

// Prefix lengths (DELTA_BINARY_PACKED), then suffixes (DELTA_LENGTH_BYTE_ARRAY); each value is the previous
// value's prefix + its suffix. The values are rebuilt into one arena string.
void decode_delta_byte_array(const ValueType& vt, std::string_view d, size_t n, Values* out, Arena* arena) {
  std::vector<int64_t> prefix;
  const size_t pos = decode_delta_binary(d, n, &prefix);
  std::vector<std::string_view> suffix;
  decode_delta_length(d.substr(pos), n, &suffix);
  size_t total = 0, prev_len = 0;
  for (size_t i = 0; i < n; ++i) {
    if (prefix[i] < 0 || static_cast<uint64_t>(prefix[i]) > prev_len)
      throw FormatError("DELTA_BYTE_ARRAY: prefix length " + std::to_string(prefix[i]) +
                        " longer than the previous value");
    prev_len = static_cast<size_t>(prefix[i]) + suffix[i].size();
    if (vt.type == Type::kFixedLenByteArray && prev_len != static_cast<size_t>(vt.type_length))
      throw FormatError("DELTA_BYTE_ARRAY: value length differs from the fixed length");
    total += prev_len;
    if (total > kMaxPageBytes) throw FormatError("DELTA_BYTE_ARRAY: values exceed the page size limit");
  }
  std::string& buf = arena->emplace_back();
  buf.reserve(total);  // no reallocation below: the views stay valid
  reserve(out, Kind::kBytes, n);
  size_t prev_begin = 0;
  for (size_t i = 0; i < n; ++i) {
    const size_t begin = buf.size();
    buf.append(buf.data() + prev_begin, static_cast<size_t>(prefix[i]));
    buf.append(suffix[i]);
    out->bytes.emplace_back(buf.data() + begin, buf.size() - begin);
    prev_begin = begin;
  }
}

void decode_dictionary_indices(std::string_view d, size_t n, const Values* dict, Values* out) {
  if (!dict) throw FormatError("dictionary-encoded page but the column chunk has no dictionary page");
  if (n == 0) return;
  if (d.empty()) short_data("dictionary indices", 1, 0);
  const int bw = static_cast<uint8_t>(d[0]);
  if (bw > 32) throw FormatError("dictionary index bit width " + std::to_string(bw));
  std::vector<uint32_t> idx(n);
  RleDecoder(d.substr(1), bw).read(idx.data(), n);
  const size_t size = dict->size();
  for (uint32_t i : idx)
    if (i >= size)
      throw FormatError("dictionary index " + std::to_string(i) + " out of range (dictionary of " +
                        std::to_string(size) + ")");
  if (!dict->ints.empty()) {
    reserve(out, Kind::kInt, n);
    for (uint32_t i : idx) out->ints.push_back(dict->ints[i]);
  } else if (!dict->reals.empty()) {
    reserve(out, Kind::kReal, n);
    for (uint32_t i : idx) out->reals.push_back(dict->reals[i]);
  } else {
    reserve(out, Kind::kBytes, n);
    for (uint32_t i : idx) out->bytes.push_back(dict->bytes[i]);
  }
}

}  // namespace

RleDecoder::RleDecoder(std::string_view data, int bit_width) : data_(data), bit_width_(bit_width) {
  if (bit_width < 0 || bit_width > 32) throw FormatError("RLE bit width " + std::to_string(bit_width));
}

bool RleDecoder::next_run() {
  if (pos_ >= data_.size()) return false;
  const uint64_t header = uleb(data_, &pos_);
  if (header & 1) {  // bit-packed: (header >> 1) groups of 8 values
    const size_t left = data_.size() - pos_;
    const uint64_t groups = std::min<uint64_t>(header >> 1, left + 1);  // more than the bytes hold is cut below
    // A final run may be cut short by the writer; take what the bytes hold.
    packed_left_ = std::min<uint64_t>(groups * 8, left * 8 / bit_width_);
    packed_bit_ = pos_ * 8;
    pos_ += static_cast<size_t>(std::min<uint64_t>(groups * bit_width_, left));
  } else {
    rle_left_ = header >> 1;
    const size_t nbytes = (bit_width_ + 7) / 8;
    if (data_.size() - pos_ < nbytes) throw FormatError("RLE run value runs past the end of the data");
    uint64_t v = 0;
    std::memcpy(&v, data_.data() + pos_, nbytes);
    pos_ += nbytes;
    if (bit_width_ < 64 && (v >> bit_width_) != 0) throw FormatError("RLE run value wider than the bit width");
    rle_value_ = v;
  }
  return true;
}

template <class T>
void RleDecoder::read(T* out, size_t n) {
  if (bit_width_ == 0) {  // a one-entry dictionary or an all-zero level: no data needed
    std::fill(out, out + n, T(0));
    return;
  }
  size_t i = 0;
  while (i < n) {
    if (rle_left_) {
      const size_t take = static_cast<size_t>(std::min<uint64_t>(rle_left_, n - i));
      std::fill(out + i, out + i + take, static_cast<T>(rle_value_));
      rle_left_ -= take;
      i += take;
    } else if (packed_left_) {
      const size_t take = static_cast<size_t>(std::min<uint64_t>(packed_left_, n - i));
      for (size_t k = 0; k < take; ++k, packed_bit_ += bit_width_)
        out[i + k] = static_cast<T>(unpack_bits(u8(data_), data_.size(), packed_bit_, bit_width_));
      packed_left_ -= take;
      i += take;
    } else if (!next_run()) {
      throw FormatError("RLE/bit-packed data ends after " + std::to_string(i) + " of " + std::to_string(n) +
                        " values");
    }
  }
}
template void RleDecoder::read<uint8_t>(uint8_t*, size_t);
template void RleDecoder::read<uint32_t>(uint32_t*, size_t);

void decode_values(int encoding, const ValueType& vt, std::string_view data, size_t n, const Values* dict,
                   Values* out, Arena* arena) {
  if (vt.type == Type::kFixedLenByteArray && vt.type_length <= 0)
    throw FormatError("FIXED_LEN_BYTE_ARRAY with type_length " + std::to_string(vt.type_length));
  if (n == 0) return;  // an all-null page may carry no value bytes at all
  switch (encoding) {
    case kPlain: return decode_plain(vt, data, n, out);
    case kPlainDictionary:
    case kRleDictionary: return decode_dictionary_indices(data, n, dict, out);
    case kRle: {  // booleans only: 4-byte length, then the hybrid with bit width 1
      if (vt.type != Type::kBoolean) break;
      if (data.size() < 4) short_data("RLE booleans", 4, data.size());
      const uint32_t len = load_le<uint32_t>(data.data());
      if (len > data.size() - 4) short_data("RLE booleans", size_t(len) + 4, data.size());
      std::vector<uint8_t> bits(n);
      RleDecoder(data.substr(4, len), 1).read(bits.data(), n);
      reserve(out, Kind::kInt, n);
      for (uint8_t b : bits) out->ints.push_back(b);
      return;
    }
    case kDeltaBinaryPacked: {
      if (vt.type != Type::kInt32 && vt.type != Type::kInt64) break;
      const size_t start = out->ints.size();
      decode_delta_binary(data, n, &out->ints);
      if (vt.type == Type::kInt32)
        for (size_t i = start; i < out->ints.size(); ++i)
          out->ints[i] = static_cast<int32_t>(static_cast<uint32_t>(out->ints[i]));
      return;
    }
    case kDeltaLengthByteArray:
      if (vt.type != Type::kByteArray) break;
      decode_delta_length(data, n, &out->bytes);
      return;
    case kDeltaByteArray:
      if (vt.type != Type::kByteArray && vt.type != Type::kFixedLenByteArray) break;
      return decode_delta_byte_array(vt, data, n, out, arena);
    case kByteStreamSplit: return decode_byte_stream_split(vt, data, n, out, arena);
    default:
      throw FormatError(std::string("encoding ") + encoding_name(encoding) + " (" + std::to_string(encoding) +
                        ") is not supported");
  }
  throw FormatError(std::string("encoding ") + encoding_name(encoding) + " is not valid for " +
                    type_name(static_cast<int>(vt.type)));
}

}  // namespace am::io::pq
