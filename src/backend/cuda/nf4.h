// CUDA kernels for bitsandbytes' 4-bit blockwise formats (NF4/FP4) and the 8-bit dynamic blockwise
// quantiser of double quantisation. Semantics (bit for bit) are those of the CPU reference,
// src/backend/cpu/nf4.h; the op front door is src/ops/nf4_ops.h. Raw device pointers: the front door
// checks shapes, dtypes and devices. Everything runs on the context's stream, asynchronously.
#pragma once
#ifdef AM_WITH_CUDA
#include <cstdint>

#include "backend/cuda/context.h"
#include "core/dtype.h"

namespace am::cuda {

// What a dequantisation reads (device pointers). Plain: `absmax` [nblocks]. Double-quantised (absmax
// null): absmax[b] = fp32(fp32(map[codes[b]] * absmax2[b / blocksize2]) + offset), computed on the fly.
struct Dequant4Args {
  const uint8_t* packed = nullptr;  // [ceil(n/2)]: element 2i in the high nibble of byte i
  int64_t n = 0;                    // elements
  int64_t blocksize = 64;           // 32, 64, ..., 4096
  bool fp4 = false;                 // false: NF4 values, true: FP4 values
  const float* absmax = nullptr;    // [nblocks], or null when double-quantised
  const uint8_t* codes = nullptr;   // [nblocks]
  const float* absmax2 = nullptr;   // [ceil(nblocks / blocksize2)]
  const float* map = nullptr;       // [256]
  float offset = 0.f;
  int64_t blocksize2 = 256;
};

// out[i] = to(ftz(value[code(i)] * absmax[i / blocksize])), out F32 / BF16 / F16 [n].
void dequantize_4bit(const Dequant4Args& a, void* out, DType out_dtype, CudaContext& ctx = default_context());

// 4-bit blockwise quantisation, as bitsandbytes' kQuantizeBlockwise: x [n] (F32 / BF16 / F16) ->
// packed [ceil(n/2)], absmax [ceil(n / blocksize)] fp32.
void quantize_4bit(const void* x, DType tx, int64_t n, int64_t blocksize, bool fp4, uint8_t* packed, float* absmax,
                   CudaContext& ctx = default_context());

// 8-bit blockwise quantisation of (x - offset) against map [256] (bitsandbytes' quantize_blockwise of
// `absmax - offset` in double quantisation): x fp32 [n] -> codes [n], absmax [ceil(n / blocksize)].
void quantize_blockwise_8bit(const float* x, float offset, int64_t n, int64_t blocksize, const float* map,
                             uint8_t* codes, float* absmax, CudaContext& ctx = default_context());

}  // namespace am::cuda
#endif
