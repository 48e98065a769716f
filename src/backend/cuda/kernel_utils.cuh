// Device-side helpers shared by the kernels of this backend (included only by .cu files):
// dtype <-> fp32 conversions, 16-byte vector loads/stores, warp/block reductions, dtype dispatch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "backend/cuda/cuda_check.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/tensor.h"

namespace am::cuda {

using bf16 = __nv_bfloat16;
using fp16 = __half;

// ---- scalar conversions (math is always fp32; stores round to nearest even like the host's f32_to_bf16) ----
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(fp16 v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ bf16 from_f<bf16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ fp16 from_f<fp16>(float v) { return __float2half_rn(v); }

// ---- N elements of T moved as one aligned access (N * sizeof(T) is 4, 8 or 16 bytes) ----
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};
template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// ---- reductions ----
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Sum over the whole block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
// `scratch` holds 32 floats; the leading barrier makes back-to-back calls with one scratch safe.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < nwarps ? scratch[lane] : 0.f;
  return warp_sum(t);
}

// Error slot written by kernels that find invalid data (token ids, targets) so that no host sync is needed
// on the hot path; CudaContext::check_device_errors() reads and clears it.
struct DeviceErrorSlot {
  int code;         // 0: none; see DeviceErrorCode
  int pad;
  long long index;  // position of the first offending element seen
  long long value;  // its value
};
enum DeviceErrorCode : int { kErrNone = 0, kErrTokenId = 1, kErrTarget = 2 };
__device__ __forceinline__ void report_device_error(DeviceErrorSlot* s, int code, long long index,
                                                    long long value) {
  if (s && atomicCAS(&s->code, 0, code) == 0) {
    s->index = index;
    s->value = value;
  }
}

// ---- host helpers ----
inline unsigned grid_for(int64_t work_items, int threads, int64_t max_blocks = 1 << 20) {
  int64_t b = (work_items + threads - 1) / threads;
  if (b < 1) b = 1;
  if (b > max_blocks) b = max_blocks;
  return static_cast<unsigned>(b);
}
inline bool aligned_to(const void* p, size_t bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

inline std::string describe(const char* name, const Tensor& t) {
  return std::string(name) + " " + shape_str(t.shape()) + " " + dtype_name(t.dtype());
}
[[noreturn]] inline void op_error(const char* op, const std::string& msg) {
  throw ShapeError(std::string("cuda op ") + op + ": " + msg);
}
inline void need_cuda(const char* op, const char* name, const Tensor& t) {
  if (!t.defined()) op_error(op, std::string(name) + " is an undefined (empty) tensor");
  if (t.device() != DeviceType::CUDA)
    throw DeviceError(std::string("cuda op ") + op + ": " + describe(name, t) + " is not a CUDA tensor");
}
inline bool is_float_dtype(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }
inline void need_float(const char* op, const char* name, const Tensor& t) {
  if (!is_float_dtype(t.dtype())) op_error(op, describe(name, t) + ": expected a float tensor");
}
inline void need_dtype(const char* op, const char* name, const Tensor& t, DType d) {
  if (t.dtype() != d) op_error(op, describe(name, t) + ": expected " + dtype_name(d));
}

}  // namespace am::cuda

// Calls `body` with `using T = <C++ type of dtype>` for the float dtypes. Usage:
//   AM_DISPATCH_FLOAT(t.dtype(), "add_", T, { kernel<T><<<...>>>(...); });
#define AM_DISPATCH_FLOAT(dtype, opname, T, ...)                                                        \
  do {                                                                                                  \
    switch (dtype) {                                                                                    \
      case ::am::DType::F32: {                                                                          \
        using T = float;                                                                                \
        __VA_ARGS__;                                                                                    \
      } break;                                                                                          \
      case ::am::DType::BF16: {                                                                         \
        using T = ::am::cuda::bf16;                                                                     \
        __VA_ARGS__;                                                                                    \
      } break;                                                                                          \
      case ::am::DType::F16: {                                                                          \
        using T = ::am::cuda::fp16;                                                                     \
        __VA_ARGS__;                                                                                    \
      } break;                                                                                          \
      default:                                                                                          \
        throw ::am::ShapeError(std::string("cuda op ") + (opname) + ": unsupported dtype " +          \
                               ::am::dtype_name(dtype));                                                \
    }                                                                                                   \
  } while (0)

// bf16 or fp32 only (the dtypes the model's activations and master weights use).
#define AM_DISPATCH_BF16_F32(dtype, opname, T, ...)                                                     \
  do {                                                                                                  \
    switch (dtype) {                                                                                    \
      case ::am::DType::F32: {                                                                          \
        using T = float;                                                                                \
        __VA_ARGS__;                                                                                    \
      } break;                                                                                          \
      case ::am::DType::BF16: {                                                                         \
        using T = ::am::cuda::bf16;                                                                     \
        __VA_ARGS__;                                                                                    \
      } break;                                                                                          \
      default:                                                                                          \
        throw ::am::ShapeError(std::string("cuda op ") + (opname) + ": unsupported dtype " +          \
                               ::am::dtype_name(dtype) + " (expected bfloat16 or float32)");           \
    }                                                                                                   \
  } while (0)
