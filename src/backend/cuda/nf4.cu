// bitsandbytes 4-bit (NF4/FP4) dequantisation and quantisation, and the 8-bit dynamic blockwise quantiser
// of double quantisation. Contract in nf4.h; the math is the CPU reference's (src/backend/cpu/nf4.h),
// written with explicit _rn intrinsics so that nvcc never fuses a product and a sum into one fma, and with
// bitsandbytes' --use_fast_math flush-to-zero emulated by ftz() (this project builds without fast math).
//
// Dequantisation is the hot path (QLoRA: each layer's weight is expanded into a bf16 scratch buffer just
// before its GEMM, in forward and again for dX in backward). It is purely memory-bound: per element it reads
// half a byte of codes (+ 4 bytes of absmax, or 1 code byte, per block of 64) and writes 2 bytes of bf16,
// so ~2.56 bytes/element; a 4096 x 14336 projection (58.7 M elements) moves ~150 MB, ~35 us at the
// H200's ~4.3 TB/s achievable bandwidth. Each thread takes 8 packed bytes (one 8-byte load) -> 16 outputs
// (two 16-byte bf16 stores), computes its block's scale once (the 16 elements always share a block, since
// blocksizes are multiples of 32), and looks the 16 code values up in a shared-memory table (16 distinct
// banks: no conflicts). Grid-stride over groups of 16; a scalar tail covers n % 16 and unaligned buffers.
//
// Quantisation (load time: making a QLoRA base from a bf16 checkpoint) uses one warp per absmax block and
// the same reciprocal instruction as bitsandbytes' kernels (rcp.approx.ftz.f32, what nvcc emits for
// `1.0f / x` under --use_fast_math), so its codes equal bitsandbytes' own on the GPU.
#include <cfloat>

#include "backend/cpu/nf4.h"
#include "backend/cuda/kernel_utils.cuh"
#include "backend/cuda/nf4.h"

namespace am::cuda {
namespace {

__constant__ float c_nf4_values[16] = {AM_NF4_CODE_VALUES};
__constant__ float c_fp4_values[16] = {AM_FP4_CODE_VALUES};
__constant__ float c_nf4_thresholds[15] = {
    -0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f,  -0.33967943489551544f,
    -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
    0.1202552504837513f,  0.2035212516784668f,  0.2920137718319893f,   0.3893125355243683f,
    0.5016634166240692f,  0.6427869200706482f,  0.8614784181118011f};
__constant__ float c_fp4_thresholds[7] = {0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f,
                                          0.4166667f,  0.583333f,  0.8333333f};

// fp32 subnormal -> zero of the same sign (the .ftz of bitsandbytes' fast-math build).
__device__ __forceinline__ float ftz(float x) { return fabsf(x) < FLT_MIN ? copysignf(0.f, x) : x; }

// bitsandbytes' per-block reciprocal: `1.0f / absmax` compiled with --use_fast_math.
__device__ __forceinline__ float bnb_rcp(float a) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(a));
  return r;
}

__device__ __forceinline__ uint8_t nf4_code(float x) {
  uint8_t c = 0;
#pragma unroll
  for (int i = 0; i < 15; ++i) c += x > c_nf4_thresholds[i];
  return c;
}
__device__ __forceinline__ uint8_t fp4_code(float x) {
  constexpr uint8_t rank_to_code[8] = {0, 1, 6, 7, 4, 5, 2, 3};
  const uint8_t sign = x < 0.f ? 8 : 0;
  const float a = x < 0.f ? -x : x;
  int k = 0;
#pragma unroll
  for (int i = 0; i < 7; ++i) k += a > c_fp4_thresholds[i];
  return static_cast<uint8_t>(rank_to_code[k] + sign);
}

// The scale of block b.
__device__ __forceinline__ float block_scale(const Dequant4Args& a, int64_t b) {
  if (a.absmax) return __ldg(a.absmax + b);
  const float p = ftz(__fmul_rn(__ldg(a.map + __ldg(a.codes + b)), __ldg(a.absmax2 + b / a.blocksize2)));
  return __fadd_rn(p, a.offset);
}

template <typename T>
__device__ __forceinline__ void store16(T* out, const float (&v)[16]);
template <>
__device__ __forceinline__ void store16<bf16>(bf16* out, const float (&v)[16]) {
  Vec<bf16, 8> a, b;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    a.v[k] = __float2bfloat16_rn(v[k]);
    b.v[k] = __float2bfloat16_rn(v[k + 8]);
  }
  store_vec<bf16, 8>(out, a);
  store_vec<bf16, 8>(out + 8, b);
}
template <>
__device__ __forceinline__ void store16<fp16>(fp16* out, const float (&v)[16]) {
  Vec<fp16, 8> a, b;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    a.v[k] = __float2half_rn(v[k]);
    b.v[k] = __float2half_rn(v[k + 8]);
  }
  store_vec<fp16, 8>(out, a);
  store_vec<fp16, 8>(out + 8, b);
}
template <>
__device__ __forceinline__ void store16<float>(float* out, const float (&v)[16]) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    Vec<float, 4> a;
#pragma unroll
    for (int k = 0; k < 4; ++k) a.v[k] = v[4 * q + k];
    store_vec<float, 4>(out + 4 * q, a);
  }
}

// `vec`: packed is 8-byte aligned and out 16-byte aligned, so groups of 16 elements use vector accesses;
// otherwise every element takes the scalar path.
template <typename T>
__global__ void dequant4_kernel(Dequant4Args a, T* __restrict__ out, int log2_bs, bool vec) {
  __shared__ float lut[16];
  if (threadIdx.x < 16) lut[threadIdx.x] = a.fp4 ? c_fp4_values[threadIdx.x] : c_nf4_values[threadIdx.x];
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t groups = vec ? a.n / 16 : 0;
  for (int64_t g = tid; g < groups; g += stride) {
    const uint2 w = __ldg(reinterpret_cast<const uint2*>(a.packed) + g);
    const float s = block_scale(a, (g * 16) >> log2_bs);
    float v[16];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      // little-endian: byte k of w.x is packed byte 8g + k (elements 16g + 2k, +1), w.y holds bytes 8g + 4 + k
      const uint32_t byte_x = (w.x >> (8 * k)) & 0xffu, byte_y = (w.y >> (8 * k)) & 0xffu;
      v[2 * k] = ftz(__fmul_rn(lut[byte_x >> 4], s));
      v[2 * k + 1] = ftz(__fmul_rn(lut[byte_x & 15], s));
      v[8 + 2 * k] = ftz(__fmul_rn(lut[byte_y >> 4], s));
      v[8 + 2 * k + 1] = ftz(__fmul_rn(lut[byte_y & 15], s));
    }
    store16<T>(out + g * 16, v);
  }
  for (int64_t i = groups * 16 + tid; i < a.n; i += stride) {
    const uint8_t byte = __ldg(a.packed + i / 2);
    const uint8_t c = (i & 1) ? (byte & 15) : (byte >> 4);
    out[i] = from_f<T>(ftz(__fmul_rn(lut[c], block_scale(a, i >> log2_bs))));
  }
}

// One warp per absmax block of `bs` elements (bs even): absmax, then the packed codes.
template <typename T>
__global__ void quant4_kernel(const T* __restrict__ x, int64_t n, int64_t bs, bool fp4, uint8_t* __restrict__ packed,
                              float* __restrict__ absmax) {
  const int lane = threadIdx.x & 31;
  const int64_t nblocks = (n + bs - 1) / bs;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x >> 5) + (threadIdx.x >> 5); b < nblocks; b += warps) {
    const int64_t begin = b * bs, end = min(n, begin + bs);
    // fmaxf from -FLT_MAX over flushed |x| (NaN never wins); a partial block also sees padding zeros.
    float m = end - begin < bs ? 0.f : -FLT_MAX;
    for (int64_t i = begin + lane; i < end; i += 32) m = fmaxf(m, fabsf(ftz(to_f(x[i]))));
    m = warp_max(m);
    if (lane == 0) absmax[b] = m;
    const float r = ftz(bnb_rcp(ftz(m)));
    for (int64_t i = begin + 2 * lane; i < end; i += 64) {
      const float p0 = ftz(__fmul_rn(ftz(to_f(x[i])), r));
      const float p1 = i + 1 < end ? ftz(__fmul_rn(ftz(to_f(x[i + 1])), r)) : __fmul_rn(0.f, r);
      const uint8_t hi = fp4 ? fp4_code(p0) : nf4_code(p0);
      const uint8_t lo = fp4 ? fp4_code(p1) : nf4_code(p1);
      packed[i / 2] = static_cast<uint8_t>(hi << 4 | lo);
    }
  }
}

// bitsandbytes' dQuantize<0>: binary search over the sorted map, then the midpoint rule.
__device__ __forceinline__ uint8_t quant8_code(const float* code, float x) {
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
    const float midpoint = ftz(__fmul_rn(__fadd_rn(upper, val), 0.5f));
    return static_cast<uint8_t>(x > midpoint ? upper_pivot : pivot);
  }
  const float midpoint = ftz(__fmul_rn(__fadd_rn(lower, val), 0.5f));
  return static_cast<uint8_t>(x < midpoint ? lower_pivot : pivot);
}

__global__ void quant8_kernel(const float* __restrict__ x, float offset, int64_t n, int64_t bs,
                              const float* __restrict__ map, uint8_t* __restrict__ codes, float* __restrict__ absmax) {
  __shared__ float code[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) code[i] = map[i];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t nblocks = (n + bs - 1) / bs;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x >> 5) + (threadIdx.x >> 5); b < nblocks; b += warps) {
    const int64_t begin = b * bs, end = min(n, begin + bs);
    float m = end - begin < bs ? 0.f : -FLT_MAX;
    for (int64_t i = begin + lane; i < end; i += 32) m = fmaxf(m, fabsf(ftz(__fsub_rn(x[i], offset))));
    m = warp_max(m);
    if (lane == 0) absmax[b] = m;
    const float r = ftz(bnb_rcp(ftz(m)));
    for (int64_t i = begin + lane; i < end; i += 32)
      codes[i] = quant8_code(code, ftz(__fmul_rn(ftz(__fsub_rn(x[i], offset)), r)));
  }
}

int log2_exact(int64_t v) {
  int l = 0;
  while ((int64_t(1) << l) < v) ++l;
  return l;
}

}  // namespace

void dequantize_4bit(const Dequant4Args& a, void* out, DType out_dtype, CudaContext& ctx) {
  const char* op = "dequantize_4bit";
  if (a.n <= 0) return;
  if (a.blocksize < 32 || a.blocksize > 4096 || (a.blocksize & (a.blocksize - 1)))
    op_error(op, "blocksize " + std::to_string(a.blocksize) + " is not 32, 64, ..., 4096");
  if (!a.packed || !out || (!a.absmax && (!a.codes || !a.absmax2 || !a.map || a.blocksize2 <= 0)))
    op_error(op, "missing buffers");
  ctx.make_current();
  const bool vec = aligned_to(a.packed, 8) && aligned_to(out, 16);
  const int64_t work = vec ? a.n / 16 + a.n % 16 : a.n;
  const unsigned grid = grid_for(work, 256, static_cast<int64_t>(ctx.sm_count()) * 8);
  AM_DISPATCH_FLOAT(out_dtype, op, T, {
    dequant4_kernel<T><<<grid, 256, 0, ctx.stream()>>>(a, static_cast<T*>(out), log2_exact(a.blocksize), vec);
  });
  AM_CUDA_CHECK_LAUNCH();
}

void quantize_4bit(const void* x, DType tx, int64_t n, int64_t blocksize, bool fp4, uint8_t* packed, float* absmax,
                   CudaContext& ctx) {
  const char* op = "quantize_4bit";
  if (n <= 0) return;
  if (blocksize <= 0 || blocksize % 2) op_error(op, "blocksize must be positive and even");
  ctx.make_current();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const unsigned grid = grid_for(nblocks, 8, static_cast<int64_t>(ctx.sm_count()) * 32);
  AM_DISPATCH_FLOAT(tx, op, T, {
    quant4_kernel<T><<<grid, 256, 0, ctx.stream()>>>(static_cast<const T*>(x), n, blocksize, fp4, packed, absmax);
  });
  AM_CUDA_CHECK_LAUNCH();
}

void quantize_blockwise_8bit(const float* x, float offset, int64_t n, int64_t blocksize, const float* map,
                             uint8_t* codes, float* absmax, CudaContext& ctx) {
  if (n <= 0) return;
  if (blocksize <= 0) op_error("quantize_blockwise_8bit", "blocksize must be positive");
  ctx.make_current();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const unsigned grid = grid_for(nblocks, 8, static_cast<int64_t>(ctx.sm_count()) * 32);
  quant8_kernel<<<grid, 256, 0, ctx.stream()>>>(x, offset, n, blocksize, map, codes, absmax);
  AM_CUDA_CHECK_LAUNCH();
}

}  // namespace am::cuda
