// Run-time element types and host-side conversions (bf16/fp16 <-> fp32, round-to-nearest-even as torch).
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

namespace am {

enum class DType : uint8_t { F32, BF16, F16, I32, I64 };

size_t dtype_size(DType t);
const char* dtype_name(DType t);           // "float32", "bfloat16", ... (torch names)
const char* dtype_safetensors_name(DType t);  // "F32", "BF16", ...
DType dtype_from_safetensors(const std::string& s);  // throws FormatError on unknown
DType dtype_from_name(const std::string& s);         // accepts torch names ("bfloat16", "torch.bfloat16", "bf16"); throws RecipeError

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// Converts n elements between any two float dtypes (F32/BF16/F16) on the host.
void convert_floats(const void* src, DType st, void* dst, DType dt, size_t n);

}  // namespace am
