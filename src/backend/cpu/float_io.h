// Element i of a host float tensor of run-time dtype t (F32, BF16 or F16), read as fp32 or written from fp32
// (round to nearest even): the one copy the CPU kernels share.
#pragma once
#include <cstdint>

#include "core/dtype.h"

namespace am::cpu {

inline float load_float(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);  // F16 (front-ends admit floats only)
  }
}

inline void store_float(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::F32: static_cast<float*>(p)[i] = v; break;
    case DType::BF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    default: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
  }
}

}  // namespace am::cpu
