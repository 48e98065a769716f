// Harness shared by the GPU micro-benchmarks in bench/gpu/*.cu: deterministic device-side inputs, the CUDA-event
// timer and the two measured ceilings (device-to-device copy bandwidth, bf16 GEMM). One copy of each, so that every
// benchmark draws its inputs and measures its times and ceilings the same way. The variants below exist because the
// benchmarks were written with them and their inputs must not change: pick the one a benchmark used.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <vector>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/gemm.h"
#include "core/tensor.h"

namespace am::bench {

// ---------------- inputs: uniform values from a hash of the element index ----------------
// Device-side fills: no host transfer for multi-GB buffers, and the same values on every run and device.

// The two index hashes in use (each with its own float mapping, kept to the bit so that inputs do not change).
enum class Hash {
  Lowbias32,  // lowbias32 of (i * 2654435761 ^ seed), 32-bit: gpt_oss, mamba2, attention, attention_generic
  Fmix64,     // MurmurHash3 fmix64 of (seed * 2^64 / phi + i), low 32 bits: cuda_ops, moe
};

__device__ __forceinline__ uint32_t hash_lowbias32(int64_t i, uint32_t seed) {
  uint32_t x = static_cast<uint32_t>(i) * 2654435761u ^ seed;
  x = (x ^ (x >> 16)) * 0x7feb352du;
  x = (x ^ (x >> 15)) * 0x846ca68bu;
  return x ^ (x >> 16);
}

__device__ __forceinline__ uint32_t hash_fmix64(int64_t i, uint64_t seed) {
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(i);
  x = (x ^ (x >> 33)) * 0xff51afd7ed558ccdull;
  x = (x ^ (x >> 33)) * 0xc4ceb9fe1a85ec53ull;
  return static_cast<uint32_t>(x ^ (x >> 33));
}

// p[i] from the top 24 bits of element i's hash, u in [0, 1): uniform in [a, b) = [lo, hi), or with Centered
// (u - 0.5) * a (a = scale, b unused). Each expression is the one its benchmarks were written with, to the letter,
// so the fp32 rounding (fused multiply-adds included) and the inputs stay the same. T: float or __nv_bfloat16
// (round to nearest). Grid-stride: any launch shape gives the same values.
template <Hash H, bool Centered, typename T>
__global__ void fill_kernel(T* p, int64_t n, uint64_t seed, float a, float b) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v;
    if constexpr (Centered) {
      static_assert(H == Hash::Lowbias32, "centered values come from the lowbias32 hash only");
      const float u = (hash_lowbias32(i, static_cast<uint32_t>(seed)) >> 8) * (1.f / 16777216.f);  // [0, 1)
      v = (u - 0.5f) * a;
    } else if constexpr (H == Hash::Lowbias32) {
      const uint32_t x = hash_lowbias32(i, static_cast<uint32_t>(seed));
      v = a + (b - a) * static_cast<float>(x >> 8) * (1.0f / 16777216.0f);
    } else {
      const float u = (hash_fmix64(i, seed) >> 8) * (1.0f / 16777216.0f);
      v = a + (b - a) * u;
    }
    if constexpr (sizeof(T) == 4) p[i] = v;
    else p[i] = __float2bfloat16_rn(v);
  }
}

// Fills an F32 or BF16 CUDA tensor with uniform values in [lo, hi), on the default context's stream
// (SMs x 8 blocks of 256).
inline void fill_uniform(Tensor& t, Hash hash, uint64_t seed, float lo = -1.f, float hi = 1.f) {
  auto& ctx = cuda::default_context();
  const unsigned grid = static_cast<unsigned>(ctx.sm_count()) * 8;
  auto launch = [&](auto kernel, auto* p) { kernel<<<grid, 256, 0, ctx.stream()>>>(p, t.numel(), seed, lo, hi); };
  if (t.dtype() == DType::F32) {
    if (hash == Hash::Lowbias32) launch(fill_kernel<Hash::Lowbias32, false, float>, t.data<float>());
    else launch(fill_kernel<Hash::Fmix64, false, float>, t.data<float>());
  } else {
    if (hash == Hash::Lowbias32) launch(fill_kernel<Hash::Lowbias32, false, __nv_bfloat16>, t.data<__nv_bfloat16>());
    else launch(fill_kernel<Hash::Fmix64, false, __nv_bfloat16>, t.data<__nv_bfloat16>());
  }
  AM_CUDA_CHECK_LAUNCH();
}

// `filled(shape, dtype, seed, lo, hi)`: a new CUDA tensor (cuda::empty, the context's allocator) filled by
// fill_uniform with this filler's hash. A benchmark names the one its inputs were drawn with:
// `constexpr bench::Filler dev = bench::filled_fmix64;`, or `using am::bench::filled;`.
struct Filler {
  Hash hash;
  Tensor operator()(const Shape& s, DType dt, uint64_t seed, float lo = -1.f, float hi = 1.f) const {
    Tensor t = cuda::empty(s, dt);
    fill_uniform(t, hash, seed, lo, hi);
    return t;
  }
};
inline constexpr Filler filled{Hash::Lowbias32};
inline constexpr Filler filled_fmix64{Hash::Fmix64};

// The attention benchmarks' inputs, which do not use the context: a BF16 tensor gets (u - 0.5) * scale (variance
// scale^2 / 12) from the lowbias32 hash, one thread per element on the legacy default stream.
inline void fill_centered_bf16(Tensor& t, uint32_t seed, float scale) {
  const int64_t n = t.numel();
  fill_kernel<Hash::Lowbias32, true><<<static_cast<unsigned>((n + 255) / 256), 256>>>(
      static_cast<__nv_bfloat16*>(t.raw()), n, seed, scale, 0.f);
  AM_CUDA_CHECK_LAUNCH();
}

// A CUDA tensor on its own cudaMalloc (at least 16 bytes), freed with its last reference: for the attention
// benchmarks, which time the kernels without the context's caching allocator.
inline Tensor cuda_malloc_tensor(const Shape& s, DType dt) {
  void* p = nullptr;
  AM_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(16, static_cast<size_t>(shape_numel(s)) * dtype_size(dt))));
  std::shared_ptr<void> keep(p, [](void* q) { cudaFree(q); });
  return Tensor::wrap(p, s, dt, keep, DeviceType::CUDA);
}

// ---------------- timing ----------------

// Median time in ms of fn() over `reps` runs, after `warmup` untimed ones, each run bracketed by CUDA events on
// `stream` (so it is GPU time of the work fn queues there). sync_after_warmup: wait for the whole device before the
// first timed run. The median ignores the odd slow run (clock ramp, a neighbour on the device).
inline double median_ms_on(cudaStream_t stream, bool sync_after_warmup, const std::function<void()>& fn, int reps,
                           int warmup) {
  for (int i = 0; i < warmup; ++i) fn();
  if (sync_after_warmup) AM_CUDA_CHECK(cudaDeviceSynchronize());
  cudaEvent_t a, b;
  AM_CUDA_CHECK(cudaEventCreate(&a));
  AM_CUDA_CHECK(cudaEventCreate(&b));
  std::vector<float> ts;
  for (int i = 0; i < reps; ++i) {
    AM_CUDA_CHECK(cudaEventRecord(a, stream));
    fn();
    AM_CUDA_CHECK(cudaEventRecord(b, stream));
    AM_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    AM_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    ts.push_back(ms);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

// The benchmarks that run on the default context: its stream, no device sync after the warm-up.
inline double median_ms(const std::function<void()>& fn, int reps = 20, int warmup = 3) {
  return median_ms_on(cuda::default_context().stream(), false, fn, reps, warmup);
}

// The attention benchmarks (no context; kernels on the legacy default stream): that stream, device sync after the
// warm-up.
inline double median_ms_legacy_stream(const std::function<void()>& fn, int reps, int warmup) {
  return median_ms_on(nullptr, true, fn, reps, warmup);
}

// ---------------- ceilings, measured in the same run as the ops ----------------

// Memory ceiling: GB/s (bytes read + written) of a device-to-device cudaMemcpyAsync of all of src into a new
// tensor on the context's stream, timed by median_ms; prints the "ceiling:" line. Memory-bound rows report their
// share of it. The benchmarks pass a 2 GiB fp32 src (kCopyElems), however they filled it.
inline constexpr int64_t kCopyElems = int64_t((size_t(2) << 30) / 4);
inline double copy_bandwidth_gbs(const Tensor& src, int reps = 20, int warmup = 3) {
  auto& ctx = cuda::default_context();
  const size_t bytes = src.nbytes();
  Tensor dst = cuda::empty(src.shape(), src.dtype());
  const double ms = median_ms([&] {
    AM_CUDA_CHECK(cudaMemcpyAsync(dst.raw(), src.raw(), bytes, cudaMemcpyDeviceToDevice, ctx.stream()));
  }, reps, warmup);
  const double gbs = 2.0 * bytes / (ms * 1e-3) / 1e9;
  std::printf("ceiling: device-to-device copy %g GiB: %.3f ms = %.1f GB/s (read + write)\n",
              bytes / double(size_t(1) << 30), ms, gbs);
  return gbs;
}

// Compute ceiling: TFLOP/s of a bf16 8192^3 cuBLASLt GEMM (TN, bf16 out) through cuda::gemm on inputs from
// filled_fmix64 (seeds 1, 2, 3), timed by median_ms; prints the "ceiling:" line. GEMM rows report their share.
inline double gemm_ceiling_tflops(int reps = 20) {
  auto& ctx = cuda::default_context();
  const int64_t s = 8192;
  Tensor a = filled_fmix64({s, s}, DType::BF16, 1), b = filled_fmix64({s, s}, DType::BF16, 2),
         c = filled_fmix64({s, s}, DType::BF16, 3);
  const cuda::GemmDesc g{
      .trans_a = true, .m = s, .n = s, .k = s, .a = a.raw(), .lda = s, .b = b.raw(), .ldb = s, .d = c.raw(), .ldd = s};
  const double ms = median_ms([&] { cuda::gemm(ctx, g); }, reps);
  const double tf = 2.0 * s * s * s / (ms * 1e-3) / 1e12;
  std::printf("ceiling: bf16 GEMM 8192^3 (cuBLASLt, TN): %.3f ms = %.1f TFLOP/s\n", ms, tf);
  return tf;
}

}  // namespace am::bench
