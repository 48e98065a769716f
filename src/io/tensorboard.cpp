// TensorBoard event-file writer: see tensorboard.h for the format.
#include "io/tensorboard.h"

#include <unistd.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <system_error>

#include "core/error.h"

namespace am::io {

namespace {

constexpr std::array<uint32_t, 256> make_crc32c_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? (c >> 1) ^ 0x82F63B78u : (c >> 1);
    t[i] = c;
  }
  return t;
}
constexpr std::array<uint32_t, 256> kCrcTable = make_crc32c_table();

void append_le(std::string& out, uint64_t v, int nbytes) {
  for (int i = 0; i < nbytes; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}
// Protobuf field key: (field_number << 3) | wire_type.
void append_key(std::string& out, uint32_t field, uint32_t wire) { append_varint(out, (field << 3) | wire); }
void append_bytes_field(std::string& out, uint32_t field, const std::string& bytes) {
  append_key(out, field, 2);
  append_varint(out, bytes.size());
  out += bytes;
}

double now_seconds() {
  using namespace std::chrono;
  return duration_cast<duration<double>>(system_clock::now().time_since_epoch()).count();
}

// Summary.Value { tag = 1; simple_value = 2 (fixed32) }
std::string encode_value(const std::string& tag, double value) {
  std::string v;
  append_bytes_field(v, 1, tag);
  append_key(v, 2, 5);
  const float f = static_cast<float>(value);
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  append_le(v, bits, 4);
  return v;
}

}  // namespace

uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = kCrcTable[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

uint32_t masked_crc32c(const void* data, size_t n) {
  const uint32_t c = crc32c(data, n);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

void append_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}

TensorBoardWriter::TensorBoardWriter(const std::string& log_dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(log_dir, ec);
  if (ec || !fs::is_directory(log_dir))
    throw IoError("tensorboard: cannot create log directory '" + log_dir + "'" +
                  (ec ? ": " + ec.message() : std::string()));
  char host[256] = {0};
  if (gethostname(host, sizeof(host) - 1) != 0 || host[0] == '\0') std::strcpy(host, "localhost");
  const double t = now_seconds();
  path_ = (fs::path(log_dir) / ("events.out.tfevents." + std::to_string(static_cast<long long>(t)) + "." +
                                host + "." + std::to_string(static_cast<long long>(getpid()))))
              .string();
  f_ = std::fopen(path_.c_str(), "wb");
  if (!f_) throw IoError("tensorboard: cannot create event file '" + path_ + "': " + std::strerror(errno));
  std::string fields;
  append_bytes_field(fields, 3, "brain.Event:2");
  write_event(t, 0, fields);
}

TensorBoardWriter::~TensorBoardWriter() {
  if (f_) std::fclose(f_);
}

void TensorBoardWriter::add_scalar(const std::string& tag, double value, int64_t step, double wall_time) {
  std::string summary;
  append_bytes_field(summary, 1, encode_value(tag, value));
  std::string fields;
  append_bytes_field(fields, 5, summary);
  write_event(wall_time < 0 ? now_seconds() : wall_time, step, fields);
}

void TensorBoardWriter::add_scalars(const std::vector<std::pair<std::string, double>>& tag_values,
                                    int64_t step) {
  std::string summary;
  for (const auto& [tag, value] : tag_values) append_bytes_field(summary, 1, encode_value(tag, value));
  std::string fields;
  append_bytes_field(fields, 5, summary);
  write_event(now_seconds(), step, fields);
}

void TensorBoardWriter::write_event(double wall_time, int64_t step, const std::string& payload_fields) {
  std::string ev;
  append_key(ev, 1, 1);
  uint64_t wbits;
  std::memcpy(&wbits, &wall_time, 8);
  append_le(ev, wbits, 8);
  append_key(ev, 2, 0);
  append_varint(ev, static_cast<uint64_t>(step));
  ev += payload_fields;

  std::string rec;
  append_le(rec, ev.size(), 8);
  append_le(rec, masked_crc32c(rec.data(), 8), 4);
  rec += ev;
  append_le(rec, masked_crc32c(ev.data(), ev.size()), 4);
  if (std::fwrite(rec.data(), 1, rec.size(), f_) != rec.size())
    throw IoError("tensorboard: cannot write event file '" + path_ + "': " + std::strerror(errno));
  flush();
}

void TensorBoardWriter::flush() {
  if (std::fflush(f_) != 0)
    throw IoError("tensorboard: cannot flush event file '" + path_ + "': " + std::strerror(errno));
}

}  // namespace am::io
