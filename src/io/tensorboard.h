// TensorBoard event files, written by hand (no protobuf / TensorFlow dependency).
//
// File: <log_dir>/events.out.tfevents.<unix seconds>.<hostname>.<pid> — the name TensorBoard globs for
// ("tfevents" in the basename); `tensorboard --logdir <log_dir>` reads it.
//
// Framing (TFRecord), one record per Event:
//   uint64 length (LE) | uint32 masked_crc32c(the 8 length bytes) (LE) | data | uint32 masked_crc32c(data) (LE)
//   masked_crc(c) = ((c >> 15) | (c << 17)) + 0xa282ead8, c = CRC-32C (Castagnoli, reflected poly 0x82F63B78).
//
// Event (tensorboard/compat/proto/event.proto):     Summary (summary.proto):
//   1 wall_time   double  (wire type 1, fixed64)      Summary { repeated Value value = 1; }
//   2 step        int64   (wire type 0, varint)       Value   { string tag = 1;
//   3 file_version string  ("brain.Event:2", first)            float simple_value = 2; (wire type 5) }
//   5 summary     Summary (wire type 2)
//
// Every add_* writes one record and flushes, so a killed run keeps everything it logged.
// tools/read_tb_events.py reads these files back (stdlib only) for tests.
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

namespace am::io {

// CRC-32C of `n` bytes (table driven), and TFRecord's masked form.
uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);
uint32_t masked_crc32c(const void* data, size_t n);
// Appends the protobuf base-128 varint of `v` (negative int64 go through as their 64-bit two's complement).
void append_varint(std::string& out, uint64_t v);

class TensorBoardWriter {
 public:
  // Creates log_dir if missing, opens a fresh event file and writes the file_version event.
  // Throws am::IoError naming the path when the directory or file cannot be created.
  explicit TensorBoardWriter(const std::string& log_dir);
  ~TensorBoardWriter();
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;

  // One Event with one Value (simple_value is a float32: value is rounded). wall_time < 0 means now.
  void add_scalar(const std::string& tag, double value, int64_t step, double wall_time = -1);
  // One Event (wall time now) with one Value per pair.
  void add_scalars(const std::vector<std::pair<std::string, double>>& tag_values, int64_t step);

  void flush();
  const std::string& path() const { return path_; }

 private:
  void write_event(double wall_time, int64_t step, const std::string& payload_fields);
  std::string path_;
  std::FILE* f_ = nullptr;
};

}  // namespace am::io
