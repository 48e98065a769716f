// TensorBoard event files (src/io/tensorboard.h): CRC-32C and its mask, varints, and files written by
// TensorBoardWriter parsed back by a small reader here (framing, both CRCs, Event/Summary/Value fields)
// and, when python3 is on PATH, by tools/read_tb_events.py.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/tensorboard.h"

using namespace am;
namespace fs = std::filesystem;

namespace {

struct TbValue {
  std::string tag;
  float value = 0;
};
struct TbEvent {
  double wall_time = 0;
  int64_t step = 0;
  std::string file_version;
  std::vector<TbValue> values;
};

uint64_t le(const std::string& s, size_t pos, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= uint64_t(static_cast<unsigned char>(s.at(pos + i))) << (8 * i);
  return v;
}
uint64_t varint(const std::string& s, size_t& pos) {
  uint64_t v = 0;
  for (int shift = 0;; shift += 7) {
    const unsigned char b = static_cast<unsigned char>(s.at(pos++));
    v |= uint64_t(b & 0x7F) << shift;
    if (!(b & 0x80)) return v;
  }
}
// Walks a message, calling f(field, wire, varint value, bytes view); fixed fields arrive as bytes.
template <class F>
void walk(const std::string& msg, F f) {
  size_t pos = 0;
  while (pos < msg.size()) {
    const uint64_t key = varint(msg, pos);
    const int field = int(key >> 3), wire = int(key & 7);
    if (wire == 0) {
      f(field, wire, varint(msg, pos), std::string());
    } else {
      size_t n = wire == 1 ? 8 : wire == 5 ? 4 : 0;
      if (wire == 2) n = varint(msg, pos);
      ASSERT_TRUE(wire == 1 || wire == 2 || wire == 5) << "wire type " << wire;
      ASSERT_LE(pos + n, msg.size());
      f(field, wire, 0, msg.substr(pos, n));
      pos += n;
    }
  }
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::vector<TbEvent> read_events(const std::string& path) {
  const std::string raw = slurp(path);
  std::vector<TbEvent> out;
  size_t pos = 0;
  while (pos < raw.size()) {
    EXPECT_LE(pos + 12, raw.size());
    const uint64_t len = le(raw, pos, 8);
    EXPECT_EQ(le(raw, pos + 8, 4), io::masked_crc32c(raw.data() + pos, 8)) << "length crc at " << pos;
    const std::string data = raw.substr(pos + 12, len);
    EXPECT_EQ(le(raw, pos + 12 + len, 4), io::masked_crc32c(data.data(), data.size())) << "data crc at " << pos;
    pos += 12 + len + 4;
    TbEvent ev;
    walk(data, [&](int field, int wire, uint64_t v, const std::string& b) {
      if (field == 1) {
        EXPECT_EQ(wire, 1);
        const uint64_t bits = le(b, 0, 8);
        std::memcpy(&ev.wall_time, &bits, 8);
      } else if (field == 2) {
        EXPECT_EQ(wire, 0);
        ev.step = static_cast<int64_t>(v);
      } else if (field == 3) {
        EXPECT_EQ(wire, 2);
        ev.file_version = b;
      } else if (field == 5) {
        EXPECT_EQ(wire, 2);
        walk(b, [&](int sf, int sw, uint64_t, const std::string& sb) {
          EXPECT_EQ(sf, 1);
          EXPECT_EQ(sw, 2);
          TbValue val;
          walk(sb, [&](int vf, int vw, uint64_t, const std::string& vb) {
            if (vf == 1) {
              EXPECT_EQ(vw, 2);
              val.tag = vb;
            } else if (vf == 2) {
              EXPECT_EQ(vw, 5);
              const uint32_t bits = uint32_t(le(vb, 0, 4));
              std::memcpy(&val.value, &bits, 4);
            } else {
              ADD_FAILURE() << "unexpected Value field " << vf;
            }
          });
          ev.values.push_back(val);
        });
      } else {
        ADD_FAILURE() << "unexpected Event field " << field;
      }
    });
    out.push_back(ev);
  }
  EXPECT_EQ(pos, raw.size());
  return out;
}

std::string fresh_dir(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / ("am_tb_" + name + "_" + std::to_string(getpid()));
  fs::remove_all(d);
  return d.string();
}

bool have_python() { return std::system("python3 -c 'pass' >/dev/null 2>&1") == 0; }

// Runs tools/read_tb_events.py; returns its stdout, sets rc.
std::string run_reader(const std::string& file, int& rc) {
  const std::string cmd =
      std::string("python3 '") + AM_SOURCE_DIR + "/tools/read_tb_events.py' '" + file + "' 2>/dev/null";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  if (!p) {
    rc = -1;
    return out;
  }
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  const int st = pclose(p);
  rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return out;
}

// Pulls `"key": <number>` or `"key": "<string>"` out of one JSON line (no escapes expected here).
std::string json_field(const std::string& line, const std::string& key) {
  const std::string k = "\"" + key + "\": ";
  size_t p = line.find(k);
  if (p == std::string::npos) return "<missing>";
  p += k.size();
  if (line[p] == '"') return line.substr(p + 1, line.find('"', p + 1) - p - 1);
  return line.substr(p, line.find_first_of(",}", p) - p);
}

}  // namespace

TEST(TensorBoard, Crc32cKnownVectors) {
  EXPECT_EQ(io::crc32c("123456789", 9), 0xE3069283u);
  const std::vector<unsigned char> zeros(32, 0), ones(32, 0xFF);
  EXPECT_EQ(io::crc32c(zeros.data(), zeros.size()), 0x8A9136AAu);
  EXPECT_EQ(io::crc32c(ones.data(), ones.size()), 0x62A8AB43u);  // RFC 3720 B.4
  EXPECT_EQ(io::crc32c("", 0), 0u);
  // Incremental == one shot.
  EXPECT_EQ(io::crc32c("6789", 4, io::crc32c("12345", 5)), 0xE3069283u);
}

TEST(TensorBoard, MaskedCrc) {
  const uint32_t c = 0xE3069283u;
  const uint32_t want = ((c >> 15) | (c << 17)) + 0xa282ead8u;
  EXPECT_EQ(io::masked_crc32c("123456789", 9), want);
  // masked(crc32c("")) = rotr(0, 15) + delta.
  EXPECT_EQ(io::masked_crc32c("", 0), 0xa282ead8u);
}

TEST(TensorBoard, Varint) {
  auto enc = [](uint64_t v) {
    std::string s;
    io::append_varint(s, v);
    return s;
  };
  EXPECT_EQ(enc(0), std::string(1, '\0'));
  EXPECT_EQ(enc(1), "\x01");
  EXPECT_EQ(enc(127), "\x7f");
  EXPECT_EQ(enc(128), "\x80\x01");
  EXPECT_EQ(enc(300), "\xac\x02");
  EXPECT_EQ(enc(~uint64_t(0)), std::string("\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"));
  EXPECT_EQ(enc(static_cast<uint64_t>(int64_t(-1))).size(), 10u);  // negative int64: 10 bytes
}

TEST(TensorBoard, FileNameAndVersionEvent) {
  const std::string dir = fresh_dir("name") + "/nested/run1";  // created if missing
  std::string path;
  {
    io::TensorBoardWriter w(dir);
    path = w.path();
  }
  const std::string base = fs::path(path).filename().string();
  EXPECT_EQ(fs::path(path).parent_path(), fs::path(dir));
  EXPECT_EQ(base.rfind("events.out.tfevents.", 0), 0u) << base;
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  EXPECT_NE(base.find(std::string(".") + host + "." + std::to_string(getpid())), std::string::npos) << base;
  const auto evs = read_events(path);
  ASSERT_EQ(evs.size(), 1u);
  EXPECT_EQ(evs[0].file_version, "brain.Event:2");
  EXPECT_TRUE(evs[0].values.empty());
  EXPECT_GT(evs[0].wall_time, 1.6e9);
  fs::remove_all(fs::path(dir).parent_path().parent_path());
}

TEST(TensorBoard, ScalarsRoundTrip) {
  const std::string dir = fresh_dir("rt");
  io::TensorBoardWriter w(dir);
  w.add_scalar("train/loss", 2.5, 1, 1700000000.25);
  w.add_scalar("train/lr", 1e-4, 2, 1700000001.5);
  w.add_scalar("grad_norm", 0.1, 1234567890123LL, 1700000002.0);
  w.add_scalar("neg", -3.75, -1, 1700000003.0);
  w.add_scalars({{"eval/loss", 1.0 / 3.0}, {"損失/ü", 42.0}, {"🚀", -0.0}}, 7);
  w.add_scalar("now", 1.0, 8);
  const auto evs = read_events(w.path());  // readable while the writer is open: add_* flushes
  ASSERT_EQ(evs.size(), 7u);
  EXPECT_EQ(evs[0].file_version, "brain.Event:2");

  EXPECT_EQ(evs[1].step, 1);
  EXPECT_EQ(evs[1].wall_time, 1700000000.25);
  ASSERT_EQ(evs[1].values.size(), 1u);
  EXPECT_EQ(evs[1].values[0].tag, "train/loss");
  EXPECT_EQ(evs[1].values[0].value, 2.5f);
  EXPECT_EQ(evs[2].values[0].value, static_cast<float>(1e-4));  // simple_value is float32
  EXPECT_NE(static_cast<double>(evs[2].values[0].value), 1e-4);
  EXPECT_EQ(evs[3].step, 1234567890123LL);
  EXPECT_EQ(evs[3].values[0].value, static_cast<float>(0.1));
  EXPECT_EQ(evs[4].step, -1);
  EXPECT_EQ(evs[4].values[0].value, -3.75f);
  EXPECT_TRUE(evs[1].file_version.empty());

  EXPECT_EQ(evs[5].step, 7);
  ASSERT_EQ(evs[5].values.size(), 3u);
  EXPECT_EQ(evs[5].values[0].tag, "eval/loss");
  EXPECT_EQ(evs[5].values[0].value, static_cast<float>(1.0 / 3.0));
  EXPECT_EQ(evs[5].values[1].tag, "損失/ü");
  EXPECT_EQ(evs[5].values[1].value, 42.0f);
  EXPECT_EQ(evs[5].values[2].tag, "🚀");
  EXPECT_TRUE(std::signbit(evs[5].values[2].value));
  EXPECT_GT(evs[5].wall_time, 1.6e9);
  EXPECT_GE(evs[6].wall_time, evs[5].wall_time);
  fs::remove_all(dir);
}

TEST(TensorBoard, PythonReaderAgrees) {
  if (!have_python()) GTEST_SKIP() << "python3 not on PATH";
  const std::string dir = fresh_dir("py");
  io::TensorBoardWriter w(dir);
  w.add_scalar("train/loss", 0.1, 3, 1700000000.125);
  w.add_scalars({{"a", 1.0 / 3.0}, {"損失/ü🚀", -2.0}}, 4);
  int rc = -1;
  const std::string out = run_reader(w.path(), rc);
  ASSERT_EQ(rc, 0) << out;
  std::vector<std::string> lines;
  std::istringstream ss(out);
  for (std::string l; std::getline(ss, l);) lines.push_back(l);
  ASSERT_EQ(lines.size(), 3u) << out;
  EXPECT_EQ(json_field(lines[0], "step"), "3");
  EXPECT_EQ(std::strtod(json_field(lines[0], "wall_time").c_str(), nullptr), 1700000000.125);
  EXPECT_EQ(json_field(lines[0], "tag"), "train/loss");
  EXPECT_EQ(std::strtod(json_field(lines[0], "value").c_str(), nullptr), double(float(0.1)));
  EXPECT_EQ(json_field(lines[1], "step"), "4");
  EXPECT_EQ(json_field(lines[1], "tag"), "a");
  EXPECT_EQ(std::strtod(json_field(lines[1], "value").c_str(), nullptr), double(float(1.0 / 3.0)));
  EXPECT_EQ(json_field(lines[2], "tag"), "損失/ü🚀");
  EXPECT_EQ(std::strtod(json_field(lines[2], "value").c_str(), nullptr), -2.0);

  // A flipped data byte: the reader reports a CRC error and exits 1.
  std::string raw = slurp(w.path());
  raw[raw.size() - 6] ^= 0x01;
  const std::string bad = dir + "/events.out.tfevents.0.corrupt";
  std::ofstream(bad, std::ios::binary) << raw;
  run_reader(bad, rc);
  EXPECT_EQ(rc, 1);
  fs::remove_all(dir);
}

TEST(TensorBoard, UncreatableDirThrowsNamingPath) {
  const std::string dir = fresh_dir("err");
  fs::create_directories(dir);
  const std::string file = dir + "/plain_file";
  std::ofstream(file) << "x";
  try {
    io::TensorBoardWriter w(file + "/sub");
    FAIL() << "expected IoError";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find(file), std::string::npos) << e.what();
  }
  fs::remove_all(dir);
}
