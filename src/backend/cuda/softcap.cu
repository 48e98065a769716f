// Logit soft-capping (Gemma 2 final_logit_softcapping; contract in ops.h softcap_ / softcap_bwd_):
//   forward   x = cap * tanh(x / cap)              in place, x [any shape] bf16 / fp32 / fp16
//   backward  dy *= 1 - (y / cap)^2                in place, y the capped values (any float dtype), dy likewise
// Memory-bound elementwise maps: 16-byte vectors per thread where every pointer allows it, a grid-stride loop
// and a scalar tail (as elementwise.cu). Math is fp32 with explicitly rounded operations (no FMA contraction),
// so the only difference from the host reference (backend/cpu/gated_act.cpp) is tanhf's last-bit error in the
// forward; the backward is bit-identical in fp32.
#include <cmath>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/kernel_utils.cuh"

namespace am::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float capped(float x, float cap) { return __fmul_rn(cap, tanhf(__fdiv_rn(x, cap))); }
__device__ __forceinline__ float capped_grad(float y, float dy, float cap) {
  const float t = __fdiv_rn(y, cap);
  return __fmul_rn(dy, __fsub_rn(1.0f, __fmul_rn(t, t)));
}

template <typename T, int VEC>
__global__ void softcap_kernel(T* __restrict__ x, float cap, int64_t n) {
  const int64_t nvec = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < nvec; i += stride) {
    Vec<T, VEC> v = load_vec<T, VEC>(x + i * VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v.v[j] = from_f<T>(capped(to_f(v.v[j]), cap));
    store_vec<T, VEC>(x + i * VEC, v);
  }
  for (int64_t i = nvec * VEC + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride)
    x[i] = from_f<T>(capped(to_f(x[i]), cap));
}

template <typename TY, typename TD, int VEC>
__global__ void softcap_bwd_kernel(const TY* __restrict__ y, TD* __restrict__ dy, float cap, int64_t n) {
  const int64_t nvec = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < nvec; i += stride) {
    const Vec<TY, VEC> vy = load_vec<TY, VEC>(y + i * VEC);
    Vec<TD, VEC> vd = load_vec<TD, VEC>(dy + i * VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) vd.v[j] = from_f<TD>(capped_grad(to_f(vy.v[j]), to_f(vd.v[j]), cap));
    store_vec<TD, VEC>(dy + i * VEC, vd);
  }
  for (int64_t i = nvec * VEC + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride)
    dy[i] = from_f<TD>(capped_grad(to_f(y[i]), to_f(dy[i]), cap));
}

void need_cap(const char* op, float cap) {
  if (!(cap > 0.f) || !std::isfinite(cap)) op_error(op, "cap = " + std::to_string(cap) + " must be positive and finite");
}

unsigned grid(const CudaContext& ctx, int64_t items) {
  return grid_for(items, kThreads, static_cast<int64_t>(ctx.sm_count()) * 16);
}

}  // namespace

void softcap_(Tensor& x, float cap, CudaContext& ctx) {
  const char* op = "softcap_";
  need_cuda(op, "x", x);
  need_float(op, "x", x);
  need_cap(op, cap);
  const int64_t n = x.numel();
  if (n == 0) return;
  AM_DISPATCH_FLOAT(x.dtype(), op, T, {
    T* p = x.data<T>();
    constexpr int V = 16 / sizeof(T);
    if (aligned_to(p, 16))
      softcap_kernel<T, V><<<grid(ctx, n / V + 1), kThreads, 0, ctx.stream()>>>(p, cap, n);
    else
      softcap_kernel<T, 1><<<grid(ctx, n), kThreads, 0, ctx.stream()>>>(p, cap, n);
  });
  AM_CUDA_CHECK_LAUNCH();
}

void softcap_bwd_(const Tensor& y, Tensor& dy, float cap, CudaContext& ctx) {
  const char* op = "softcap_bwd_";
  need_cuda(op, "y", y);
  need_cuda(op, "dy", dy);
  need_float(op, "y", y);
  need_float(op, "dy", dy);
  need_cap(op, cap);
  if (y.numel() != dy.numel()) op_error(op, describe("y", y) + ", " + describe("dy", dy) + ": element counts differ");
  const int64_t n = y.numel();
  if (n == 0) return;
  AM_DISPATCH_FLOAT(y.dtype(), op, TY, {
    AM_DISPATCH_FLOAT(dy.dtype(), op, TD, {
      const TY* py = y.data<TY>();
      TD* pd = dy.data<TD>();
      // 8 elements per vector when both are 2-byte dtypes, else 4 (16 bytes of the wider one).
      constexpr int V = (sizeof(TY) == 2 && sizeof(TD) == 2) ? 8 : 4;
      if (aligned_to(py, sizeof(TY) * V) && aligned_to(pd, sizeof(TD) * V))
        softcap_bwd_kernel<TY, TD, V><<<grid(ctx, n / V + 1), kThreads, 0, ctx.stream()>>>(py, pd, cap, n);
      else
        softcap_bwd_kernel<TY, TD, 1><<<grid(ctx, n), kThreads, 0, ctx.stream()>>>(py, pd, cap, n);
    });
  });
  AM_CUDA_CHECK_LAUNCH();
}

}  // namespace am::cuda
