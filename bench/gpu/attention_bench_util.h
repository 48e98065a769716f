// Shared by the attention micro-benchmarks (bench_attention*.cu): the device check and banner, the call parameters,
// the causal FLOP count, inputs and timer (bench_util.cuh's centered lowbias32 fill, each tensor on its own
// cudaMalloc, the timer on the legacy default stream where these kernels run, device sync after warm-up), and the
// agreement check of one kernel's result against another's. Everything in am::bench::attn.
#pragma once
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "../../tests/common/attn_params.h"
#include "backend/cuda/cuda_check.h"
#include "bench_util.cuh"
#include "core/attn_params.h"
#include "core/dtype.h"
#include "core/tensor.h"

namespace am::bench::attn {

inline constexpr auto& dev = cuda_malloc_tensor;
inline constexpr auto& median_ms = median_ms_legacy_stream;
// Centered values (u - 0.5) * scale: the default scale (~sqrt(12)) gives variance 1.
inline void randomize(Tensor& t, uint32_t seed, float scale = 3.4641f) { fill_centered_bf16(t, seed, scale); }
// q, k, v and dout from seeds seed, seed + 1, seed + 2, seed + 3.
inline void randomize_inputs(Tensor& q, Tensor& k, Tensor& v, Tensor& dout, uint32_t seed, float scale = 3.4641f) {
  randomize(q, seed, scale);
  randomize(k, seed + 1, scale);
  randomize(v, seed + 2, scale);
  randomize(dout, seed + 3, scale);
}

// False (after printing "<name> bench: no CUDA device") where no CUDA device is visible.
inline bool have_device(const char* name) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::printf("%s bench: no CUDA device\n", name);
    return false;
  }
  return true;
}
inline cudaDeviceProp device_props() {
  cudaDeviceProp prop{};
  AM_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  return prop;
}

using test::attn_params;  // tests/common/attn_params.h

// The causal forward count 4 B nh T^2 D / 2 (QK^T and PV over the visible half); the backward counts 2.5x.
inline double causal_fwd_flop(int64_t B, int64_t T, int64_t nh, int64_t D) {
  return 4.0 * B * nh * static_cast<double>(T) * T * D / 2;
}
inline double tflops(double flop, double ms) { return flop / (ms * 1e-3) / 1e12; }

// A bf16 or fp32 CUDA tensor as host fp32.
inline std::vector<float> download(const Tensor& t) {
  std::vector<float> f(static_cast<size_t>(t.numel()));
  if (t.dtype() == DType::F32) {
    AM_CUDA_CHECK(cudaMemcpy(f.data(), t.raw(), f.size() * 4, cudaMemcpyDeviceToHost));
    return f;
  }
  std::vector<uint16_t> h(f.size());
  AM_CUDA_CHECK(cudaMemcpy(h.data(), t.raw(), h.size() * 2, cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < h.size(); ++i) f[i] = bf16_to_f32(h[i]);
  return f;
}
// ||a - r|| / ||r|| (||a - r|| where r is 0); infinity when a has a non-finite element.
inline double rel(const std::vector<float>& a, const std::vector<float>& r) {
  double n = 0, d = 0;
  for (size_t i = 0; i < r.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    const double x = static_cast<double>(a[i]) - r[i];
    n += x * x;
    d += static_cast<double>(r[i]) * r[i];
  }
  return d > 0 ? std::sqrt(n / d) : std::sqrt(n);
}

}  // namespace am::bench::attn
