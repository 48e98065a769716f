// bitsandbytes 4-bit weights (src/io/nf4.h, src/backend/cpu/nf4.h, src/ops/nf4_ops.h), on the CPU.
//
//  * hand-computed cases of the documented format: the NF4 table and thresholds, packing order (high nibble
//    = even element), ties at a threshold going to the lower code, an all-zero block (bitsandbytes' CUDA
//    kernel: 0 * (1/0) = NaN -> code 0, dequantised to -0.0), the padded odd tail, partial blocks, FP4
//  * the 8-bit dynamic map and bitsandbytes' binary-search quantiser, the double-quantised absmax formula
//  * properties: dequant(quant(w)) within half a code gap of w, quant(dequant(quant(w))) == quant(w)
//  * the on-disk layout: write what bitsandbytes saves, read it back, and every inconsistency is an error
//    naming the tensor
//  * goldens from bitsandbytes itself (tools/make_nf4_golden.py, run on a GPU machine with bitsandbytes):
//    tests/fixtures/nf4/*.safetensors; skipped with a message while the fixtures are absent.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "backend/cpu/nf4.h"
#include "core/error.h"
#include "core/tensor.h"
#include "io/nf4.h"
#include "ops/nf4_ops.h"

using namespace am;
namespace fs = std::filesystem;

namespace {

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

Tensor f32_tensor(const std::vector<float>& v, Shape shape = {}) {
  if (shape.empty()) shape = {static_cast<int64_t>(v.size())};
  Tensor t = Tensor::empty(shape, DType::F32);
  std::memcpy(t.raw(), v.data(), v.size() * 4);
  return t;
}

// Code of element i of a packed buffer.
int code_at(const uint8_t* packed, int64_t i) { return (i & 1) ? (packed[i / 2] & 15) : (packed[i / 2] >> 4); }

std::vector<float> randn(size_t n, float scale, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

struct TempDir {
  fs::path path;
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path = fs::temp_directory_path() / ("am_nf4_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
};

}  // namespace

// ---------------- the tables ----------------

TEST(Nf4Table, CodesThresholdsAndBuckets) {
  const float* v = cpu::kNf4CodeValues;
  EXPECT_EQ(v[0], -1.0f);
  EXPECT_EQ(v[7], 0.0f);
  EXPECT_EQ(v[15], 1.0f);
  for (int i = 0; i < 15; ++i) {
    ASSERT_LT(v[i], v[i + 1]);
    const float t = cpu::kNf4Thresholds[i];
    // bitsandbytes' pivots are the midpoints of neighbouring code values (to float precision)
    EXPECT_NEAR(t, 0.5 * (double(v[i]) + double(v[i + 1])), 1e-7) << i;
    // x > t is the test: a tie goes to the lower code, one ulp above to the upper one
    EXPECT_EQ(cpu::nf4_code(t), i) << i;
    EXPECT_EQ(cpu::nf4_code(std::nextafter(t, 2.f)), i + 1) << i;
  }
  for (int i = 0; i < 16; ++i) EXPECT_EQ(cpu::nf4_code(v[i]), i) << "code value " << v[i];
  EXPECT_EQ(cpu::nf4_code(NAN), 0);  // every comparison false: dQuantizeNF4's last leaf
  EXPECT_EQ(cpu::nf4_code(2.f), 15);
  EXPECT_EQ(cpu::nf4_code(-2.f), 0);
  EXPECT_EQ(cpu::nf4_code(-0.f), 7);
}

TEST(Nf4Table, Fp4CodesAreBitsandbytesTree) {
  // dQuantizeFP4: sign bit 8, magnitude codes 0 (0), 1 (0.0052), 6 (1/6), 7 (0.25), 4 (1/3), 5 (0.5),
  // 2 (2/3), 3 (1.0); every magnitude value quantises to its own code.
  for (int c = 0; c < 16; ++c) {
    if (c == 8) continue;  // -0.0 is "not < 0": code 0
    EXPECT_EQ(cpu::fp4_code(cpu::kFp4CodeValues[c]), c) << c;
  }
  EXPECT_EQ(cpu::fp4_code(-0.f), 0);
  EXPECT_EQ(cpu::fp4_code(0.29166667f), 7);                          // tie: lower
  EXPECT_EQ(cpu::fp4_code(std::nextafter(0.29166667f, 1.f)), 4);
  EXPECT_EQ(cpu::fp4_code(-0.9f), 8 + 3);
  EXPECT_EQ(cpu::fp4_code(NAN), 0);
}

TEST(Nf4Table, DynamicMap) {
  float m[256];
  cpu::bnb_dynamic_map(m);
  for (int i = 0; i < 255; ++i) ASSERT_LT(m[i], m[i + 1]) << i;
  EXPECT_EQ(m[127], 0.f);
  EXPECT_EQ(m[255], 1.f);
  EXPECT_EQ(m[0], -m[254]);
  EXPECT_FLOAT_EQ(m[254], 0.99296875f);  // 1 * mean of the last interval of linspace(0.1, 1, 65)
  EXPECT_FLOAT_EQ(m[128], 5.5e-7f);      // 1e-6 * (0.1 + 1) / 2
  // bitsandbytes' binary search returns the index of each map value, 127 for 0
  for (int i = 0; i < 256; ++i) EXPECT_EQ(cpu::quantize_8bit_code(m, m[i]), i) << i;
  EXPECT_EQ(cpu::quantize_8bit_code(m, 0.f), 127);
  EXPECT_EQ(cpu::quantize_8bit_code(m, NAN), 0);
  // between two neighbours: the nearer one; at their exact midpoint the search's side decides
  const float lo = m[200], hi = m[201], mid = (lo + hi) * 0.5f;
  EXPECT_EQ(cpu::quantize_8bit_code(m, std::nextafter(mid, 0.f)), 200);
  EXPECT_EQ(cpu::quantize_8bit_code(m, std::nextafter(mid, 2.f)), 201);
}

// ---------------- quantisation by hand ----------------

TEST(Nf4Quantize, PackingOrderAndKnownCodes) {
  // One block of 64, absmax 1: element 0 = 1.0 (code 15), 1 = -1.0 (0), 2 = 0 (7), 3 = 0.5 (12: 0.5 is
  // above the pivot 0.3893 and below 0.5017), 4 = -0.3 (4: between -0.3397 and -0.2346), 5 = 0.04 (8).
  std::vector<float> x(64, 0.f);
  x[0] = 1.f, x[1] = -1.f, x[2] = 0.f, x[3] = 0.5f, x[4] = -0.3f, x[5] = 0.04f;
  Nf4Weight q = ops::nf4_quantize(f32_tensor(x, {1, 64}));
  ASSERT_EQ(q.packed.nbytes, 32);
  ASSERT_EQ(q.absmax.numel(), 1);
  EXPECT_EQ(q.absmax.f32()[0], 1.f);
  const uint8_t* p = q.packed.data();
  EXPECT_EQ(p[0], 0xF0);  // high nibble = even element
  EXPECT_EQ(p[1], 0x7C);
  EXPECT_EQ(p[2], 0x48);
  for (int i = 3; i < 32; ++i) EXPECT_EQ(p[i], 0x77) << i;
  // dequantised: code value * absmax exactly
  Tensor d = ops::nf4_dequantize(q, DType::F32);
  EXPECT_EQ(d.f32()[0], 1.f);
  EXPECT_EQ(d.f32()[3], cpu::kNf4CodeValues[12]);
  EXPECT_EQ(d.f32()[4], cpu::kNf4CodeValues[4]);
  EXPECT_EQ(d.shape(), (Shape{1, 64}));
}

TEST(Nf4Quantize, TiesAtThresholdsGoToTheLowerCode) {
  // absmax 4 (a power of two: x * (1/4) is exact), elements 4 * threshold land exactly on the pivots.
  std::vector<float> x(64, 0.f);
  x[0] = 4.f;
  for (int i = 0; i < 15; ++i) {
    x[1 + i] = 4.f * cpu::kNf4Thresholds[i];
    x[16 + i] = 4.f * std::nextafter(cpu::kNf4Thresholds[i], 2.f);
  }
  Nf4Weight q = ops::nf4_quantize(f32_tensor(x));
  EXPECT_EQ(q.absmax.f32()[0], 4.f);
  for (int i = 0; i < 15; ++i) {
    EXPECT_EQ(code_at(q.packed.data(), 1 + i), i) << "tie at threshold " << i;
    EXPECT_EQ(code_at(q.packed.data(), 16 + i), i + 1) << "one ulp above threshold " << i;
  }
}

TEST(Nf4Quantize, ZeroBlockOddTailAndPartialBlock) {
  // 64 zeros, then 37 values: a partial block, an odd count (the last byte's low nibble pads with the
  // code of 0.0, i.e. 7).
  std::vector<float> x(64 + 37, 0.f);
  for (int i = 0; i < 37; ++i) x[64 + i] = 0.01f * (i - 18);
  Nf4Weight q = ops::nf4_quantize(f32_tensor(x));
  ASSERT_EQ(q.nblocks(), 2);
  ASSERT_EQ(q.packed.nbytes, 51);
  EXPECT_EQ(q.absmax.f32()[0], 0.f);
  EXPECT_EQ(q.absmax.f32()[1], 0.01f * 18.f);
  // all-zero block: bitsandbytes' CUDA kernel scales by 1/0 = inf, 0 * inf = NaN -> code 0 (value -1)
  for (int i = 0; i < 32; ++i) EXPECT_EQ(q.packed.data()[i], 0x00) << i;
  EXPECT_EQ(q.packed.data()[50] & 15, 7);                // padding
  EXPECT_EQ(q.packed.data()[50] >> 4, code_at(q.packed.data(), 100));
  EXPECT_EQ(code_at(q.packed.data(), 100), 15);          // 0.18 / 0.18
  EXPECT_EQ(code_at(q.packed.data(), 64), 0);            // -0.18
  EXPECT_EQ(code_at(q.packed.data(), 64 + 18), 7);       // 0
  // dequantised zeros are -1 * 0 = -0.0 (bf16 0x8000)
  Tensor d = ops::nf4_dequantize(q, DType::BF16);
  for (int i = 0; i < 64; ++i) ASSERT_EQ(d.data<uint16_t>()[i], 0x8000) << i;
  EXPECT_EQ(d.data<uint16_t>()[100], f32_to_bf16(0.01f * 18.f));
}

TEST(Nf4Quantize, Bf16InputAndFp4) {
  std::vector<float> v = randn(256, 0.05f, 7);
  Tensor w = f32_tensor(v).to(DType::BF16);
  Nf4Weight q = ops::nf4_quantize(w);
  EXPECT_EQ(q.dtype, DType::BF16);
  // the same as quantising the bf16 values given in fp32
  Nf4Weight q32 = ops::nf4_quantize(w.to(DType::F32));
  EXPECT_EQ(std::memcmp(q.packed.data(), q32.packed.data(), 128), 0);
  EXPECT_EQ(std::memcmp(q.absmax.raw(), q32.absmax.raw(), q.absmax.nbytes()), 0);

  Nf4Weight f = ops::nf4_quantize(w, {.type = Quant4Type::FP4});
  Tensor d = ops::nf4_dequantize(f, DType::F32);
  for (int64_t i = 0; i < 256; ++i) {
    const int c = code_at(f.packed.data(), i);
    EXPECT_EQ(c, cpu::fp4_code(bf16_to_f32(w.data<uint16_t>()[i]) * (1.f / f.absmax.f32()[i / 64]))) << i;
    EXPECT_EQ(d.f32()[i], cpu::kFp4CodeValues[c] * f.absmax.f32()[i / 64]);
  }
}

// ---------------- properties ----------------

TEST(Nf4Quantize, RoundTripErrorAndIdempotence) {
  for (int64_t bs : {32, 64, 256}) {
    for (bool dq : {false, true}) {
      std::vector<float> v = randn(96 * 80 + 5, 0.02f, 11 + static_cast<uint32_t>(bs));
      Nf4Weight q = ops::nf4_quantize(f32_tensor(v), {.blocksize = bs, .double_quant = dq});
      const Tensor absmax = ops::nf4_absmax(q);
      Tensor d = ops::nf4_dequantize(q, DType::F32);
      // the largest gap between NF4 values is 1 - 0.7230 (and -0.6962 - -1): half of it bounds the error,
      // plus the double-quantised absmax's own error
      for (size_t i = 0; i < v.size(); ++i) {
        const float a = absmax.f32()[i / bs];
        ASSERT_LE(std::fabs(d.f32()[i] - v[i]), 0.16f * a + (dq ? 0.01f * std::fabs(v[i]) + 1e-4f : 0.f))
            << "bs " << bs << " nested " << dq << " i " << i;
      }
      if (!dq) {
        // code values * absmax quantise back to the same codes
        Nf4Weight q2 = ops::nf4_quantize(d, {.blocksize = bs});
        EXPECT_EQ(std::memcmp(q.packed.data(), q2.packed.data(), q.packed.nbytes), 0) << bs;
        EXPECT_EQ(std::memcmp(q.absmax.raw(), q2.absmax.raw(), q.absmax.nbytes()), 0) << bs;
      }
    }
  }
}

TEST(Nf4DoubleQuant, AbsmaxFormulaAndOffset) {
  std::vector<float> v = randn(64 * 600, 0.02f, 3);  // 600 blocks -> 3 nested blocks, the last partial
  Nf4Weight q = ops::nf4_quantize(f32_tensor(v), {.double_quant = true});
  ASSERT_TRUE(q.is_nested());
  Nf4Weight plain = ops::nf4_quantize(f32_tensor(v));
  const Nf4Nested& z = *q.nested;
  EXPECT_EQ(z.blocksize, 256);
  EXPECT_EQ(z.absmax.numel(), 3);
  EXPECT_EQ(std::memcmp(q.packed.data(), plain.packed.data(), q.packed.nbytes), 0);  // codes do not depend on it
  // offset = mean of the plain absmax
  double s = 0;
  for (int64_t b = 0; b < 600; ++b) s += plain.absmax.f32()[b];
  EXPECT_EQ(z.offset, float(s) * (1.f / 600.f));
  float map[256];
  cpu::bnb_dynamic_map(map);
  EXPECT_EQ(std::memcmp(map, z.map.raw(), 1024), 0);
  const Tensor a = ops::nf4_absmax(q);
  for (int64_t b = 0; b < 600; ++b) {
    const float c = map[z.codes.data()[b]];
    const float p = c * z.absmax.f32()[b / 256];
    ASSERT_EQ(bits(a.f32()[b]), bits(p + z.offset)) << b;
    // the nested absmax of each group is max |absmax - offset| over it, and the codes are its 8-bit buckets
    ASSERT_NEAR(a.f32()[b], plain.absmax.f32()[b], 0.01 * z.absmax.f32()[b / 256] + 1e-7) << b;
  }
  for (int g = 0; g < 3; ++g) {
    float m = 0;
    for (int64_t b = g * 256; b < std::min<int64_t>(600, g * 256 + 256); ++b)
      m = std::max(m, std::fabs(plain.absmax.f32()[b] - z.offset));
    EXPECT_EQ(z.absmax.f32()[g], m) << g;
  }
  // dequantisation uses exactly those absmax
  Tensor d = ops::nf4_dequantize(q, DType::F32);
  for (int64_t i = 0; i < 64 * 600; i += 97)
    ASSERT_EQ(bits(d.f32()[i]), bits(cpu::kNf4CodeValues[code_at(q.packed.data(), i)] * a.f32()[i / 64])) << i;
}

TEST(Nf4DoubleQuant, ConstantAbsmax) {
  // every block has absmax 0.5: absmax - offset == 0, nested absmax 0, codes 0 (NaN), absmax back = offset
  std::vector<float> v(4 * 64, 0.25f);
  for (int b = 0; b < 4; ++b) v[size_t(b) * 64] = 0.5f;
  Nf4Weight q = ops::nf4_quantize(f32_tensor(v), {.double_quant = true});
  EXPECT_EQ(q.nested->offset, 0.5f);
  EXPECT_EQ(q.nested->absmax.f32()[0], 0.f);
  for (int b = 0; b < 4; ++b) EXPECT_EQ(q.nested->codes.data()[b], 0);
  Tensor a = ops::nf4_absmax(q);
  for (int b = 0; b < 4; ++b) EXPECT_EQ(a.f32()[b], 0.5f);
}

TEST(Nf4Ops, ArgumentErrors) {
  Tensor w = f32_tensor(randn(128, 1.f, 1));
  EXPECT_THROW(ops::nf4_quantize(w, {.blocksize = 48}), ShapeError);
  EXPECT_THROW(ops::nf4_quantize(w, {.blocksize = 8192}), ShapeError);
  EXPECT_THROW(ops::nf4_quantize(Tensor::zeros({4}, DType::I32)), ShapeError);
  Nf4Weight q = ops::nf4_quantize(w);
  Tensor out = Tensor::empty({127}, DType::F32);
  EXPECT_THROW(ops::nf4_dequantize(q, out), ShapeError);
  Nf4Weight bad = q;
  bad.shape = {130};
  try {
    ops::nf4_dequantize(bad, DType::F32);
    FAIL() << "no error";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("packed codes hold 64 bytes"), std::string::npos) << e.what();
  }
  bad = q;
  bad.absmax = Tensor::empty({3}, DType::F32);
  EXPECT_THROW(ops::nf4_dequantize(bad, DType::F32), ShapeError);
}

// ---------------- on-disk layout ----------------

TEST(Nf4Format, WriteReadRoundTrip) {
  TempDir tmp;
  const std::string name = "model.layers.0.mlp.down_proj.weight";
  for (bool dq : {false, true}) {
    for (Quant4Type t : {Quant4Type::NF4, Quant4Type::FP4}) {
      Tensor w = f32_tensor(randn(48 * 64, 0.02f, 5), {48, 64}).to(DType::BF16);
      Nf4Weight q = ops::nf4_quantize(w, {.double_quant = dq, .type = t});
      const auto sd = io::bnb_4bit_state_dict(q, name);
      std::vector<std::string> keys;
      for (const auto& e : sd) keys.push_back(e.name);
      std::vector<std::string> want = {name, name + ".absmax", name + ".quant_map"};
      if (dq) want.insert(want.end(), {name + ".nested_absmax", name + ".nested_quant_map"});
      want.push_back(name + ".quant_state.bitsandbytes__" + quant4_type_name(t));
      EXPECT_EQ(keys, want);
      EXPECT_EQ(sd[0].shape, (Shape{48 * 32, 1}));
      const std::string path = (tmp.path / "m.safetensors").string();
      io::save_raw_safetensors(path, sd);
      auto src = io::RawSafetensors::open(path);
      ASSERT_TRUE(io::is_bnb_4bit(*src, name));
      EXPECT_FALSE(io::is_bnb_4bit(*src, "other.weight"));
      Nf4Weight r = io::read_bnb_4bit(*src, name);
      EXPECT_EQ(r.shape, (Shape{48, 64}));
      EXPECT_EQ(r.dtype, DType::BF16);
      EXPECT_EQ(r.type, t);
      EXPECT_EQ(r.blocksize, 64);
      ASSERT_EQ(r.is_nested(), dq);
      EXPECT_EQ(std::memcmp(r.packed.data(), q.packed.data(), q.packed.nbytes), 0);
      Tensor a = ops::nf4_dequantize(q, DType::BF16), b = ops::nf4_dequantize(r, DType::BF16);
      EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0);
      if (dq) EXPECT_EQ(r.nested->offset, q.nested->offset);
      // memory: n/2 bytes of codes + 4 bytes per block, or 1 byte per block + 4 per 256 blocks + the 1 KiB map
      const size_t nb = 48, words = 4 * ((48 * 32 + 3) / 4);
      EXPECT_EQ(r.nbytes(), dq ? words + 4 * ((nb + 3) / 4) + 4 + 1024 : words + 4 * nb);
    }
  }
}

TEST(Nf4Format, QuantStorageBf16IsReinterpreted) {
  // bnb_4bit_quant_storage=bfloat16 stores the same bytes as a BF16 [n/4, 1] tensor
  TempDir tmp;
  Nf4Weight q = ops::nf4_quantize(f32_tensor(randn(256, 0.02f, 9)));
  auto sd = io::bnb_4bit_state_dict(q, "w.weight");
  sd[0].dtype = "BF16";
  sd[0].shape = {64, 1};
  const std::string path = (tmp.path / "m.safetensors").string();
  io::save_raw_safetensors(path, sd);
  Nf4Weight r = io::read_bnb_4bit(*io::RawSafetensors::open(path), "w.weight");
  EXPECT_EQ(std::memcmp(r.packed.data(), q.packed.data(), 128), 0);
}

TEST(Nf4Format, InconsistentFilesNameTheTensor) {
  TempDir tmp;
  const std::string name = "lm.q_proj.weight";
  Nf4Weight q = ops::nf4_quantize(f32_tensor(randn(64 * 20, 0.02f, 13), {20, 64}), {.double_quant = true});
  const auto good = io::bnb_4bit_state_dict(q, name);
  const std::string path = (tmp.path / "m.safetensors").string();
  auto expect_error = [&](std::vector<io::OwnedRawTensor> sd, const std::string& needle, const char* what) {
    io::save_raw_safetensors(path, sd);
    try {
      io::read_bnb_4bit(*io::RawSafetensors::open(path), name);
      ADD_FAILURE() << what << ": no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << what << ": " << e.what();
    }
  };
  auto with = [&](const std::string& key, auto edit) {
    auto sd = good;
    for (auto& e : sd)
      if (e.name == key) edit(e);
    return sd;
  };
  auto without = [&](const std::string& key) {
    auto sd = good;
    std::erase_if(sd, [&](const io::OwnedRawTensor& e) { return e.name == key; });
    return sd;
  };
  auto set_state = [&](const std::string& json) {
    return with(name + ".quant_state.bitsandbytes__nf4", [&](io::OwnedRawTensor& e) {
      e.bytes.assign(json.begin(), json.end());
      e.shape = {static_cast<int64_t>(json.size())};
    });
  };
  expect_error(with(name, [](io::OwnedRawTensor& e) {
                 e.bytes.resize(e.bytes.size() - 2);
                 e.shape = {static_cast<int64_t>(e.bytes.size()), 1};
               }),
               "'" + name + "' is U8 [638, 1] (638 bytes) but the quant_state shape [20, 64] needs", "short packed");
  expect_error(with(name + ".absmax", [](io::OwnedRawTensor& e) {
                 e.bytes.pop_back();
                 e.shape = {19};
               }),
               "'" + name + ".absmax' is U8 [19]", "absmax count");
  expect_error(without(name + ".nested_absmax"), "'" + name + ".nested_absmax' is missing", "missing nested");
  expect_error(without(name + ".quant_map"), "'" + name + ".quant_map' is missing", "missing quant_map");
  expect_error(with(name + ".quant_map", [](io::OwnedRawTensor& e) { e.bytes[0] ^= 0x40; }), "quant_map' entry 0",
               "quant_map");
  expect_error(with(name + ".nested_quant_map", [](io::OwnedRawTensor& e) {
                 e.bytes.resize(512);
                 e.shape = {128};
               }),
               "nested_quant_map' is F32 [128]", "map size");
  expect_error(set_state(R"({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16"})"), "no 'shape' list",
               "no shape");
  expect_error(set_state(R"({"quant_type": "nf4", "blocksize": 48, "dtype": "bfloat16", "shape": [20, 64]})"),
               "blocksize 48", "blocksize");
  expect_error(set_state(R"({"quant_type": "int4", "blocksize": 64, "dtype": "bfloat16", "shape": [20, 64]})"),
               "quant_type 'int4'", "quant type");
  expect_error(set_state(R"({"quant_type": "nf4", "blocksize": 64, "dtype": "int8", "shape": [20, 64]})"),
               "dtype 'int8'", "dtype");
  expect_error(set_state(R"({"quant_type": "fp4", "blocksize": 64, "dtype": "bfloat16", "shape": [20, 64]})"),
               "disagrees with the key", "type vs key");
  expect_error(set_state("{not json"), "quant_state.bitsandbytes__nf4", "bad json");
  // a plain (not double-quantised) state with U8 absmax: absmax must be F32 then
  expect_error(set_state(R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [20, 64]})"),
               "'" + name + ".absmax' is U8 [20], expected F32", "plain absmax dtype");
  io::save_raw_safetensors(path, good);
  try {
    io::read_bnb_4bit(*io::RawSafetensors::open(path), "lm.k_proj.weight");
    ADD_FAILURE() << "no error";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("'lm.k_proj.weight' is not a bitsandbytes 4-bit weight"), std::string::npos)
        << e.what();
  }
}

// ---------------- goldens from bitsandbytes ----------------

namespace {

fs::path fixture_dir() { return fs::path(AM_SOURCE_DIR) / "tests" / "fixtures" / "nf4"; }

std::vector<fs::path> golden_files() {
  std::vector<fs::path> out;
  std::error_code ec;
  if (!fs::is_directory(fixture_dir(), ec)) return out;
  for (const auto& e : fs::directory_iterator(fixture_dir(), ec))
    if (e.path().extension() == ".safetensors" && e.path().stem() != "dynamic_map") out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

Tensor raw_to_tensor(const io::RawTensor& r) {
  const DType d = r.dtype == "BF16" ? DType::BF16 : DType::F32;
  Tensor t = Tensor::empty(r.shape, d);
  EXPECT_EQ(t.nbytes(), r.nbytes);
  std::memcpy(t.raw(), r.data, r.nbytes);
  return t;
}

}  // namespace

TEST(Nf4Golden, DynamicMapMatchesTorch) {
  const fs::path p = fixture_dir() / "dynamic_map.safetensors";
  if (!fs::exists(p)) GTEST_SKIP() << p << " is absent: run tools/make_nf4_golden.py on a GPU machine with bitsandbytes";
  auto src = io::RawSafetensors::open(p.string());
  const io::RawTensor m = src->get("dynamic_map");
  ASSERT_EQ(m.nbytes, 1024u);
  float mine[256];
  cpu::bnb_dynamic_map(mine);
  for (int i = 0; i < 256; ++i) {
    float theirs;
    std::memcpy(&theirs, m.data + 4 * i, 4);
    EXPECT_EQ(bits(mine[i]), bits(theirs)) << "entry " << i << ": " << mine[i] << " vs torch " << theirs
                                           << " (torch CPU capability " << src->metadata()["torch_cpu_capability"] << ")";
  }
}

TEST(Nf4Golden, MatchesBitsandbytes) {
  const auto files = golden_files();
  if (files.empty())
    GTEST_SKIP() << "no bitsandbytes goldens in " << fixture_dir()
                 << ": run tools/make_nf4_golden.py on a GPU machine with bitsandbytes";
  for (const fs::path& f : files) {
    SCOPED_TRACE(f.filename().string());
    auto src = io::RawSafetensors::open(f.string());
    auto meta = src->metadata();
    const Tensor input = raw_to_tensor(src->get("input"));
    // 1. reading what bitsandbytes saved
    Nf4Weight theirs = io::read_bnb_4bit(*src, "w.weight");
    EXPECT_EQ(theirs.shape, input.shape());
    EXPECT_EQ(theirs.dtype, input.dtype());
    EXPECT_EQ(theirs.blocksize, std::stoll(meta["blocksize"]));
    EXPECT_EQ(theirs.is_nested(), meta["nested"] == "True");
    EXPECT_EQ(quant4_type_name(theirs.type), meta["quant_type"]);
    // 2. dequantising it: absmax and outputs bit for bit
    const Tensor want_absmax = raw_to_tensor(src->get("absmax_f32"));
    const Tensor absmax = ops::nf4_absmax(theirs);
    ASSERT_EQ(absmax.numel(), want_absmax.numel());
    EXPECT_EQ(std::memcmp(absmax.raw(), want_absmax.raw(), absmax.nbytes()), 0) << "absmax";
    for (DType dt : {DType::F32, DType::BF16}) {
      const Tensor want = raw_to_tensor(src->get(dt == DType::F32 ? "dequant_f32" : "dequant_bf16"));
      const Tensor got = ops::nf4_dequantize(theirs, dt);
      ASSERT_EQ(got.nbytes(), want.nbytes());
      int64_t bad = 0, first = -1;
      for (int64_t i = 0; i < got.numel(); ++i) {
        const bool same = dt == DType::F32 ? bits(got.f32()[i]) == bits(want.f32()[i])
                                           : got.data<uint16_t>()[i] == want.data<uint16_t>()[i];
        if (!same && bad++ == 0) first = i;
      }
      EXPECT_EQ(bad, 0) << dtype_name(dt) << " dequant differs at " << bad << " elements, first " << first;
    }
    // 3. quantising the input ourselves: the same bytes
    ops::Nf4QuantizeOptions opt{.blocksize = theirs.blocksize, .double_quant = theirs.is_nested(), .type = theirs.type};
    Nf4Weight ours = ops::nf4_quantize(input, opt);
    int64_t code_diff = 0;
    for (int64_t i = 0; i < input.numel(); ++i)
      code_diff += code_at(ours.packed.data(), i) != code_at(theirs.packed.data(), i);
    EXPECT_EQ(code_diff, 0) << "4-bit codes differ";
    EXPECT_EQ(std::memcmp(ours.packed.data(), theirs.packed.data(), ours.packed.nbytes), 0) << "packed bytes";
    if (!theirs.is_nested()) {
      EXPECT_EQ(std::memcmp(ours.absmax.raw(), theirs.absmax.raw(), ours.absmax.nbytes()), 0) << "absmax";
    } else {
      const Tensor unnested = raw_to_tensor(src->get("unnested_absmax"));
      const Tensor plain = ops::nf4_quantize(input, {.blocksize = theirs.blocksize, .type = theirs.type}).absmax;
      EXPECT_EQ(std::memcmp(plain.raw(), unnested.raw(), plain.nbytes()), 0) << "fp32 absmax before double quant";
      // offset = absmax.mean(): bitsandbytes takes it on the GPU, where torch's reduction sums in fp32 in its own
      // tree order; ours sums in double. Measured on the H200 (2026-12-05): equal in 6 of 7 nested cases, one ulp
      // apart in the seventh (odd_f32_nested), so one ulp is allowed and more fails.
      const int64_t ulps = std::abs(static_cast<int64_t>(bits(ours.nested->offset)) - static_cast<int64_t>(bits(theirs.nested->offset)));
      EXPECT_LE(ulps, 1) << "offset " << ours.nested->offset << " vs " << theirs.nested->offset;
      // the 8-bit codes given bitsandbytes' own offset (torch's fp32 mean may differ from ours in the last bit)
      const int64_t nb = theirs.nblocks();
      std::vector<float> centred(static_cast<size_t>(nb));
      for (int64_t b = 0; b < nb; ++b) centred[size_t(b)] = unnested.f32()[b] - theirs.nested->offset;
      std::vector<uint8_t> codes(static_cast<size_t>(nb));
      std::vector<float> absmax2(static_cast<size_t>(theirs.nested->absmax.numel()));
      cpu::quantize_blockwise_8bit(centred.data(), nb, 256, theirs.nested->map.f32(), codes.data(), absmax2.data());
      EXPECT_EQ(std::memcmp(codes.data(), theirs.nested->codes.data(), codes.size()), 0) << "8-bit absmax codes";
      EXPECT_EQ(std::memcmp(absmax2.data(), theirs.nested->absmax.raw(), absmax2.size() * 4), 0) << "nested_absmax";
      EXPECT_EQ(std::memcmp(ours.nested->map.raw(), theirs.nested->map.raw(), 1024), 0) << "nested_quant_map";
    }
  }
}
