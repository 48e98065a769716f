// CPU reference kernels for bitsandbytes' 4-bit blockwise quantisation (NF4, and FP4 since it differs only
// in its table) and for the 8-bit "dynamic" blockwise quantiser that bitsandbytes' double quantisation
// applies to the absmax. They reproduce what bitsandbytes' CUDA kernels compute (csrc/kernels.cu,
// built with --use_fast_math), which is what a checkpoint saved by bitsandbytes holds:
//
//   quantise (kQuantizeBlockwise / kQuantizeBlockwiseSmall):
//     absmax[b] = max |x| over block b (fp32; the last block may be partial, missing elements read as 0)
//     r         = 1 / absmax[b]        (fp32 reciprocal; 0 -> inf, see bnb_reciprocal)
//     code      = tree(x * r)          (fp32 product; NF4: number of thresholds t with x*r > t, so a tie
//                                        at a threshold goes to the LOWER code; NaN -> code 0)
//     packed[i/2] = code(2i) << 4 | code(2i+1)   (high nibble = even element; an odd tail is padded
//                                                  with the code of 0.0)
//   dequantise (kDequantizeBlockwise): out = T(code_value[code] * absmax[b]), one fp32 product rounded
//     once to the output dtype (round to nearest even)
//   double quantisation (quantize_4bit(compress_statistics=True)):
//     offset = mean(absmax); the fp32 absmax - offset are 8-bit quantised in blocks of 256 against the
//     signed dynamic map (dQuantize<0>: bitsandbytes' 7-step binary search + midpoint rule, reproduced
//     as is); dequantised as absmax = fp32(code8[q] * nested_absmax[b / 256]) + offset (two roundings:
//     a CUDA product, then torch's `absmax += offset`)
//
// Flush-to-zero: the bitsandbytes kernels run with --use_fast_math, so fp32 subnormals are flushed to
// (signed) zero on input and output of their arithmetic; the functions here do the same (it only matters
// for subnormal weights or absmax, or absmax above 2^126 whose reciprocal is subnormal).
//
// Raw host pointers only (the op front door, src/ops/nf4_ops.cpp, checks shapes and dtypes). Loops over
// blocks run under OpenMP; every output element is written by one thread (results are independent of the
// thread count).
#pragma once
#include <cstdint>
#include <cstring>

#include "core/dtype.h"

// bitsandbytes' NF4 code values (csrc/kernels.cu nf4_dequantization_lut; functional.py get_4bit_type), by
// 4-bit code. One macro so the CUDA backend builds its __constant__ table from the same literals.
#define AM_NF4_CODE_VALUES                                                                                 \
  -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,        \
      -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,      \
      0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,               \
      0.7229568362236023f, 1.0f
// bitsandbytes' FP4 (e2m1, bias 3) values by 4-bit code: bit 3 is the sign, the magnitude is
// fp4_dequantization_lut[code & 7] (values / 12, so 1.0 is the largest). dDequantizeFP4Tree computes
// lut * (1 - 2 * sign), which is exactly these signed values (-0.0 for code 8).
#define AM_FP4_CODE_VALUES                                                                                 \
  0.0f, 0.005208333333f, 0.66666667f, 1.0f, 0.33333333f, 0.5f, 0.16666667f, 0.25f, -0.0f, -0.005208333333f, \
      -0.66666667f, -1.0f, -0.33333333f, -0.5f, -0.16666667f, -0.25f

namespace am::cpu {

// The two bitsandbytes 4-bit data types.
enum class Quant4Type : uint8_t { NF4, FP4 };

inline constexpr float kNf4CodeValues[16] = {AM_NF4_CODE_VALUES};
inline constexpr float kFp4CodeValues[16] = {AM_FP4_CODE_VALUES};
// dQuantizeNF4's decision-tree pivots in ascending order (the midpoints between neighbouring NF4 values,
// as bitsandbytes wrote them: float literals). code = #{t : x > t}.
inline constexpr float kNf4Thresholds[15] = {
    -0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f,  -0.33967943489551544f,
    -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
    0.1202552504837513f,  0.2035212516784668f,  0.2920137718319893f,   0.3893125355243683f,
    0.5016634166240692f,  0.6427869200706482f,  0.8614784181118011f};
// dQuantizeFP4's pivots on |x| in ascending order; k = #{t : |x| > t} picks kFp4CodeByRank[k], plus the
// sign bit 8 when x < 0.
inline constexpr float kFp4Thresholds[7] = {0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f,
                                            0.4166667f,  0.583333f,  0.8333333f};
inline constexpr uint8_t kFp4CodeByRank[8] = {0, 1, 6, 7, 4, 5, 2, 3};

inline const float* quant4_code_values(Quant4Type t) { return t == Quant4Type::NF4 ? kNf4CodeValues : kFp4CodeValues; }

// Flush a subnormal to zero of the same sign (the GPU's .ftz behaviour).
inline float ftz(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) == 0) u &= 0x80000000u;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

// NF4 code of an already scaled value (bnb dQuantizeNF4; NaN -> 0).
inline uint8_t nf4_code(float x) {
  uint8_t c = 0;
  for (float t : kNf4Thresholds) c += x > t;
  return c;
}
// FP4 code of an already scaled value (bnb dQuantizeFP4; NaN -> 0).
inline uint8_t fp4_code(float x) {
  const uint8_t sign = x < 0.f ? 8 : 0;
  const float a = x < 0.f ? -x : x;
  uint8_t k = 0;
  for (float t : kFp4Thresholds) k += a > t;
  return static_cast<uint8_t>(kFp4CodeByRank[k] + sign);
}

// The fp32 reciprocal bitsandbytes scales a block by (1.0f / absmax under --use_fast_math): 1/0 = inf,
// subnormal input or result flushed to zero. Computed here correctly rounded; the GPU's approximate
// reciprocal (rcp.approx.ftz.f32) is documented in nf4.cpp.
float bnb_reciprocal(float absmax);

// bitsandbytes' create_dynamic_map(signed=True) (functional.py): 256 sorted fp32 values in [-1, 1], the
// default code of quantize_blockwise and the nested_quant_map of double quantisation.
void bnb_dynamic_map(float out[256]);

// 8-bit code of an already scaled value against a sorted 256-entry map (bnb dQuantize<0>, reproduced
// step by step: a 7-step binary search from pivot 127, then the midpoint rule; NaN -> 0).
uint8_t quantize_8bit_code(const float* map256, float x);

// 4-bit blockwise quantisation of x [n] (F32 / BF16 / F16) -> packed [ceil(n/2)] bytes and
// absmax [ceil(n / blocksize)] fp32. blocksize is even.
void quantize_4bit(const void* x, DType tx, int64_t n, int64_t blocksize, Quant4Type type, uint8_t* packed,
                   float* absmax);

// 8-bit blockwise quantisation (bnb quantize_blockwise with `map256`): x fp32 [n] -> codes [n],
// absmax [ceil(n / blocksize)].
void quantize_blockwise_8bit(const float* x, int64_t n, int64_t blocksize, const float* map256, uint8_t* codes,
                             float* absmax);

// The offset of double quantisation, mean(absmax): the sum in double rounded to fp32, times fp32 1/n
// (torch's CUDA mean multiplies its fp32 sum by the fp32 factor 1/n; its sum is a tree of fp32 adds, so
// its result can differ from this one in the last bit).
float mean_f32(const float* x, int64_t n);

// absmax[i] = fp32(fp32(map256[codes[i]] * nested_absmax[i / nested_blocksize]) + offset), i < n.
void dequantize_absmax(const uint8_t* codes, int64_t n, const float* nested_absmax, int64_t nested_blocksize,
                       const float* map256, float offset, float* absmax);

// out[i] = to(ftz(values[code(i)] * absmax[i / blocksize])) for i < n, `to` F32 / BF16 / F16, where
// code(i) is the high nibble of packed[i/2] for even i and the low nibble for odd i.
void dequantize_4bit(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize, Quant4Type type,
                     void* out, DType to);

}  // namespace am::cpu
