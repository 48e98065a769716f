// 4-bit (QLoRA NF4, also FP4) op front door: quantise a weight the way bitsandbytes does, dequantise it
// into a float buffer, move it between host and device. The data structure and the file layout are in
// src/io/nf4.h; the bitsandbytes semantics (bit for bit) in src/backend/cpu/nf4.h (the reference) and
// src/backend/cuda/nf4.cu.
//
//   quantise:   absmax[b] = max |w| over block b;  code = NF4 bucket of w * (1/absmax[b])  (ties: lower)
//               packed byte i = code(2i) << 4 | code(2i+1)
//               double_quant: offset = mean(absmax); absmax - offset -> 8-bit dynamic codes in blocks of 256
//   dequantise: out = dtype(value[code] * absmax[b]), one fp32 product rounded once; double-quantised
//               absmax[b] = fp32(fp32(map[code8[b]] * absmax2[b / 256]) + offset)
//
// On the GPU the quantiser uses bitsandbytes' own reciprocal instruction and so reproduces bitsandbytes'
// CUDA codes exactly; the CPU reference divides correctly rounded, which can move an element whose scaled
// value lies within an ulp of a threshold (tests/gpu/test_cuda_nf4.cpp measures how often). Dequantisation
// is bit-identical on both.
#pragma once
#include "core/tensor.h"
#include "io/nf4.h"

namespace am::ops {

struct Nf4QuantizeOptions {
  int64_t blocksize = 64;            // bnb_4bit blocksize: 32, 64, ..., 4096
  bool double_quant = false;         // bnb_4bit_use_double_quant (compress_statistics)
  Quant4Type type = Quant4Type::NF4; // bnb_4bit_quant_type
  int64_t nested_blocksize = 256;    // bitsandbytes always uses 256
};

// w: F32 / BF16 / F16, any shape (Linear.weight [out, in]), host or CUDA -> the 4-bit weight on the same
// device; shape and original dtype are w's. Throws ShapeError for a bad blocksize or an empty tensor.
Nf4Weight nf4_quantize(const Tensor& w, const Nf4QuantizeOptions& opt = {});

// out (F32 / BF16 / F16, numel == w.numel(), on w's device; e.g. a bf16 [out, in] scratch buffer) =
// the dequantised weight. On CUDA: asynchronous on the default context's stream.
void nf4_dequantize(const Nf4Weight& w, Tensor& out);
// The same into a new host tensor of w's shape (w on the host).
Tensor nf4_dequantize(const Nf4Weight& w, DType dtype);

// The per-block absmax as dequantisation uses it: fp32 [nblocks] (double-quantised ones expanded). Host.
Tensor nf4_absmax(const Nf4Weight& w);

// Copies of all parts on the given device (CUDA: the default context's allocator; synchronous).
Nf4Weight nf4_to_device(const Nf4Weight& w, DeviceType device);

}  // namespace am::ops
