// CPU reference for bitsandbytes' 4-bit (NF4/FP4) and 8-bit dynamic blockwise quantisation; the contract
// and the bitsandbytes behaviour it reproduces are in nf4.h.
//
// The one place where the GPU can differ from this file: bitsandbytes' kernels are built with
// --use_fast_math, so `1.0f / absmax` compiles to rcp.approx.ftz.f32 (MUFU.RCP), an approximate reciprocal
// (at most 1 ulp off), while bnb_reciprocal() here is correctly rounded. A code can only differ where
// x * (1/absmax) lies within an ulp of a threshold; see tests/unit/test_nf4.cpp for what was measured.
#include "backend/cpu/nf4.h"
#include "backend/cpu/float_io.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

namespace am::cpu {
namespace {

// max |x| over x[begin, end), as bitsandbytes' block reduction computes it: fmaxf from -FLT_MAX over the
// flushed inputs (NaN never wins), and a partial block also sees the zeros its missing elements load as.
template <typename Load>
float block_absmax(Load load, int64_t begin, int64_t end, bool partial) {
  float m = partial ? 0.f : -FLT_MAX;
  for (int64_t i = begin; i < end; ++i) m = std::fmax(m, std::fabs(ftz(load(i))));
  return m;
}

// torch.linspace(start, end, steps) in float32 on the CPU, as torch 2.11 computes it on the GPU machine (checked
// there against bitsandbytes' own map, tests/fixtures/nf4/dynamic_map.safetensors, AVX512): step = (end - start)
// / (steps - 1) in fp32; element idx is fma(step, idx, start) below steps / 2 and fma(-step, steps - idx - 1, end)
// from there on, each a single rounding (ATen's kernel, compiled with FMA contraction). Emulating its older
// vectorised path (a base per 8- or 16-lane vector plus j * step) misses 16-46 of the 256 map entries by an ulp;
// this form hits all 256.
std::vector<float> torch_linspace_f32(float start, float end, int64_t steps) {
  std::vector<float> r(static_cast<size_t>(steps));
  const float step = (end - start) / static_cast<float>(steps - 1);
  const int64_t halfway = steps / 2;
  for (int64_t idx = 0; idx < steps; ++idx)
    r[static_cast<size_t>(idx)] = idx < halfway ? std::fmaf(step, static_cast<float>(idx), start)
                                                : std::fmaf(-step, static_cast<float>(steps - idx - 1), end);
  return r;
}

}  // namespace

float bnb_reciprocal(float absmax) { return ftz(1.0f / ftz(absmax)); }

void bnb_dynamic_map(float out[256]) {
  // create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for i in 0..6, the midpoints of
  // linspace(0.1, 1, 2^i + 1) scaled by 10^(i-6) (the scale is a Python number that torch rounds to fp32),
  // with both signs; then 0 and 1.0; sorted.
  std::vector<float> data;
  data.reserve(256);
  for (int i = 0; i < 7; ++i) {
    const int64_t items = (int64_t(1) << i) + 1;
    const std::vector<float> b = torch_linspace_f32(0.1f, 1.0f, items);
    const float scale = static_cast<float>(std::pow(10.0, i - 6));
    std::vector<float> means;
    for (int64_t k = 0; k + 1 < items; ++k) means.push_back((b[size_t(k)] + b[size_t(k + 1)]) / 2.0f);
    for (float m : means) data.push_back(scale * m);
    for (float m : means) data.push_back(-(scale * m));
  }
  data.push_back(0.f);
  data.push_back(1.0f);
  std::sort(data.begin(), data.end());
  std::copy(data.begin(), data.end(), out);
}

uint8_t quantize_8bit_code(const float* code, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = code[pivot];
  for (int i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > val) {
    const float midpoint = ftz((upper + val) * 0.5f);
    return static_cast<uint8_t>(x > midpoint ? upper_pivot : pivot);
  }
  const float midpoint = ftz((lower + val) * 0.5f);
  return static_cast<uint8_t>(x < midpoint ? lower_pivot : pivot);
}

void quantize_4bit(const void* x, DType tx, int64_t n, int64_t blocksize, Quant4Type type, uint8_t* packed,
                   float* absmax) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  auto load = [&](int64_t i) { return load_float(x, tx, i); };
  const bool nf4 = type == Quant4Type::NF4;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t begin = b * blocksize, end = std::min(n, begin + blocksize);
    const float m = block_absmax(load, begin, end, end - begin < blocksize);
    absmax[b] = m;
    const float r = bnb_reciprocal(m);
    // blocksize is even, so a block starts on a byte; the odd tail's partner is the padding value 0.
    for (int64_t i = begin; i < end; i += 2) {
      const float a = ftz(ftz(load(i)) * r);
      const float c = i + 1 < end ? ftz(ftz(load(i + 1)) * r) : 0.f * r;
      const uint8_t hi = nf4 ? nf4_code(a) : fp4_code(a);
      const uint8_t lo = nf4 ? nf4_code(c) : fp4_code(c);
      packed[i / 2] = static_cast<uint8_t>(hi << 4 | lo);
    }
  }
}

void quantize_blockwise_8bit(const float* x, int64_t n, int64_t blocksize, const float* map256, uint8_t* codes,
                             float* absmax) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  auto load = [&](int64_t i) { return x[i]; };
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t begin = b * blocksize, end = std::min(n, begin + blocksize);
    const float m = block_absmax(load, begin, end, end - begin < blocksize);
    absmax[b] = m;
    const float r = bnb_reciprocal(m);
    for (int64_t i = begin; i < end; ++i) codes[i] = quantize_8bit_code(map256, ftz(ftz(x[i]) * r));
  }
}

float mean_f32(const float* x, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += x[i];
  return static_cast<float>(s) * (1.0f / static_cast<float>(n));
}

void dequantize_absmax(const uint8_t* codes, int64_t n, const float* nested_absmax, int64_t nested_blocksize,
                       const float* map256, float offset, float* absmax) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    // ftz() materialises the product, so no compiler can fuse the two roundings into one fma.
    const float p = ftz(map256[codes[i]] * nested_absmax[i / nested_blocksize]);
    absmax[i] = p + offset;
  }
}

void dequantize_4bit(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize, Quant4Type type,
                     void* out, DType to) {
  const float* values = quant4_code_values(type);
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t begin = b * blocksize, end = std::min(n, begin + blocksize);
    const float s = absmax[b];
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t byte = packed[i / 2];
      const uint8_t c = (i & 1) ? (byte & 0x0f) : (byte >> 4);
      store_float(out, to, i, ftz(values[c] * s));
    }
  }
}

}  // namespace am::cpu
