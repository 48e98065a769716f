// Page decompression (Parquet's Compression.md codecs) and Arrow IPC buffer decompression (LZ4 frame, ZSTD).
// Every codec must yield exactly the size the header declares. Streaming codecs (gzip, zstd, brotli, lz4
// frame) write into a buffer that grows with the output actually produced, so a corrupt declared size costs
// nothing; the block codecs (snappy, lz4 raw) are checked against their format's maximum ratio first.
#include <brotli/decode.h>
#include <lz4.h>
#include <lz4frame.h>
#include <snappy.h>
#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <climits>
#include <memory>

#include "core/error.h"
#include "io/parquet_internal.h"

namespace am::io::pq {
namespace {

// The output of a streaming decoder: grows geometrically up to one byte past the declared size, so that a
// stream producing more than declared is seen as such. Not `exact`: `size` is only an upper bound.
class Sink {
 public:
  Sink(size_t size, size_t src_size, bool exact) : size_(size), cap_(size + 1), exact_(exact) {
    out_.resize(std::min(cap_, std::max<size_t>(size_t(1) << 16, src_size * 8)));
  }
  // Space available at next(); call before next() (it may reallocate).
  size_t avail() {
    if (used_ == out_.size()) out_.resize(std::min(cap_, out_.size() * 2));
    return out_.size() - used_;
  }
  char* next() { return out_.data() + used_; }
  void advance(size_t n) {
    used_ += n;
    if (used_ > size_) throw FormatError("decompresses to more than the declared " + std::to_string(size_) + " bytes");
  }
  std::string finish() {
    if (exact_ && used_ != size_)
      throw FormatError("decompresses to " + std::to_string(used_) + " bytes, the header declares " +
                        std::to_string(size_));
    out_.resize(used_);
    return std::move(out_);
  }

 private:
  std::string out_;
  size_t size_, cap_, used_ = 0;
  bool exact_;
};

[[noreturn]] void stalled(const char* codec) {
  throw FormatError(std::string(codec) + " data is truncated or corrupt");
}

std::string gunzip(std::string_view src, size_t size, bool exact) {
  z_stream zs{};
  if (inflateInit2(&zs, 15 + 32) != Z_OK) throw FormatError("GZIP: inflateInit failed");  // gzip or zlib header
  std::unique_ptr<z_stream, int (*)(z_stream*)> guard(&zs, inflateEnd);
  zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(src.data()));
  zs.avail_in = static_cast<uInt>(src.size());
  Sink sink(size, src.size(), exact);
  for (;;) {
    const size_t a = std::min<size_t>(sink.avail(), UINT_MAX);
    zs.next_out = reinterpret_cast<Bytef*>(sink.next());
    zs.avail_out = static_cast<uInt>(a);
    const uInt in_before = zs.avail_in;
    const int r = inflate(&zs, Z_NO_FLUSH);
    sink.advance(a - zs.avail_out);
    if (r == Z_STREAM_END) {
      if (zs.avail_in == 0) break;
      inflateReset(&zs);  // pages may hold several gzip members
      continue;
    }
    if (r == Z_BUF_ERROR && zs.avail_in == in_before && a == zs.avail_out) stalled("GZIP");
    if (r != Z_OK && r != Z_BUF_ERROR) throw FormatError(std::string("GZIP: ") + (zs.msg ? zs.msg : "inflate failed"));
  }
  return sink.finish();
}

std::string unzstd(std::string_view src, size_t size, bool exact) {
  std::unique_ptr<ZSTD_DCtx, size_t (*)(ZSTD_DCtx*)> d(ZSTD_createDCtx(), ZSTD_freeDCtx);
  if (!d) throw FormatError("ZSTD: cannot create a decoder");
  ZSTD_inBuffer in{src.data(), src.size(), 0};
  Sink sink(size, src.size(), exact);
  for (;;) {
    const size_t a = sink.avail();
    ZSTD_outBuffer out{sink.next(), a, 0};
    const size_t in_before = in.pos;
    const size_t r = ZSTD_decompressStream(d.get(), &out, &in);
    if (ZSTD_isError(r)) throw FormatError(std::string("ZSTD: ") + ZSTD_getErrorName(r));
    sink.advance(out.pos);
    if (r == 0 && in.pos == in.size) break;  // last frame complete
    if (out.pos == 0 && in.pos == in_before) stalled("ZSTD");
  }
  return sink.finish();
}

std::string unbrotli(std::string_view src, size_t size, bool exact) {
  std::unique_ptr<BrotliDecoderState, void (*)(BrotliDecoderState*)> s(
      BrotliDecoderCreateInstance(nullptr, nullptr, nullptr), BrotliDecoderDestroyInstance);
  if (!s) throw FormatError("BROTLI: cannot create a decoder");
  const uint8_t* next_in = reinterpret_cast<const uint8_t*>(src.data());
  size_t avail_in = src.size();
  Sink sink(size, src.size(), exact);
  for (;;) {
    const size_t a = sink.avail();
    uint8_t* next_out = reinterpret_cast<uint8_t*>(sink.next());
    size_t avail_out = a;
    const auto r = BrotliDecoderDecompressStream(s.get(), &avail_in, &next_in, &avail_out, &next_out, nullptr);
    sink.advance(a - avail_out);
    if (r == BROTLI_DECODER_RESULT_SUCCESS) {
      if (avail_in != 0) throw FormatError("BROTLI: trailing bytes after the stream");
      break;
    }
    if (r == BROTLI_DECODER_RESULT_ERROR)
      throw FormatError(std::string("BROTLI: ") + BrotliDecoderErrorString(BrotliDecoderGetErrorCode(s.get())));
    if (r == BROTLI_DECODER_RESULT_NEEDS_MORE_INPUT) stalled("BROTLI");
  }
  return sink.finish();
}

std::string unlz4_frame(std::string_view src, size_t size, bool exact) {
  LZ4F_dctx* raw = nullptr;
  if (LZ4F_isError(LZ4F_createDecompressionContext(&raw, LZ4F_VERSION))) throw FormatError("LZ4: no decoder");
  std::unique_ptr<LZ4F_dctx, LZ4F_errorCode_t (*)(LZ4F_dctx*)> ctx(raw, LZ4F_freeDecompressionContext);
  size_t in_pos = 0;
  Sink sink(size, src.size(), exact);
  for (;;) {
    size_t dst = sink.avail();
    char* out = sink.next();
    size_t consumed = src.size() - in_pos;
    const size_t r = LZ4F_decompress(ctx.get(), out, &dst, src.data() + in_pos, &consumed, nullptr);
    if (LZ4F_isError(r)) throw FormatError(std::string("LZ4_FRAME: ") + LZ4F_getErrorName(r));
    in_pos += consumed;
    sink.advance(dst);
    if (r == 0 && in_pos == src.size()) break;  // frame complete, input consumed
    if (dst == 0 && consumed == 0) stalled("LZ4_FRAME");
  }
  return sink.finish();
}

std::string unsnappy(std::string_view src, size_t size) {
  size_t n = 0;
  if (!snappy::GetUncompressedLength(src.data(), src.size(), &n)) throw FormatError("SNAPPY: corrupt length header");
  if (n != size)
    throw FormatError("SNAPPY: stream holds " + std::to_string(n) + " bytes, the header declares " +
                      std::to_string(size));
  // Validates the whole stream without writing: only then is the (now trusted) size allocated.
  if (!snappy::IsValidCompressedBuffer(src.data(), src.size())) throw FormatError("SNAPPY: corrupt data");
  std::string out(size, '\0');
  if (!snappy::RawUncompress(src.data(), src.size(), out.data())) throw FormatError("SNAPPY: corrupt data");
  return out;
}

std::string unlz4_raw(std::string_view src, size_t size) {
  // An LZ4 block expands at most ~255x (a match length byte of 255 per input byte).
  if (size > src.size() * 255 + 64) throw FormatError("LZ4_RAW: declared size impossible for the input size");
  std::string out(size, '\0');
  const int r = LZ4_decompress_safe(src.data(), out.data(), static_cast<int>(src.size()), static_cast<int>(size));
  if (r < 0 || static_cast<size_t>(r) != size) throw FormatError("LZ4_RAW: corrupt data");
  return out;
}

}  // namespace

std::string decompress(Codec codec, std::string_view src, size_t size, bool exact) {
  if (size > kMaxPageBytes)
    throw FormatError("declared uncompressed size " + std::to_string(size) + " exceeds the limit of " +
                      std::to_string(kMaxPageBytes) + " bytes");
  if (src.size() > INT_MAX) throw FormatError("compressed block over 2 GiB");
  switch (codec) {
    case Codec::kUncompressed:
      if (src.size() != size) throw FormatError("uncompressed page size differs from its stored size");
      return std::string(src);
    case Codec::kSnappy: return unsnappy(src, size);
    case Codec::kGzip: return gunzip(src, size, exact);
    case Codec::kZstd: return unzstd(src, size, exact);
    case Codec::kBrotli: return unbrotli(src, size, exact);
    case Codec::kLz4Raw: return unlz4_raw(src, size);
    case Codec::kLz4Frame: return unlz4_frame(src, size, exact);
    case Codec::kLzo:
    case Codec::kLz4Hadoop:
      throw FormatError(std::string("compression codec ") + codec_name(codec) +
                        " is not supported (rewrite the file with ZSTD, SNAPPY, GZIP, BROTLI or LZ4_RAW)");
  }
  throw FormatError("unknown compression codec " + std::to_string(static_cast<int>(codec)));
}

}  // namespace am::io::pq
