// Gated activations of the MLP, h = act(g) * u (the CPU reference: backend/cpu/gated_act.cpp):
//   SwiGLU: act = silu(g) = g * sigmoid(g);  dgate = dh * u * sig(g) * (1 + g * (1 - sig(g))), dup = dh * silu(g)
//   GeGLU (Gemma): act = gelu_tanh(g) = 0.5 g (1 + tanh(k (g + c g^3))), k = sqrt(2/pi), c = 0.044715
// Elementwise and memory-bound (W1: [8192, 8192] bf16: 402 MB forward, 671 MB backward); 16-byte vectors,
// grid-stride. The backward computes both outputs before storing, so dgate/dup may alias gate/up.
// The fused [gate | up] layout has one kernel pair for every activation: geglu_fused_* (cuda_ops.h) and the MoE's
// swiglu_fused_* (moe.h) are gated_fused_*_kernel<Act>, so each equals its unfused op bit for bit.
#include <utility>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/kernel_utils.cuh"
#include "backend/cuda/moe.h"

namespace am::cuda {
namespace {

// 1 / (1 + e^-g): e^-g = inf for very negative g gives exactly 0, as on the CPU.
__device__ __forceinline__ float sigmoidf_(float g) { return 1.0f / (1.0f + expf(-g)); }

// fwd(g); dgate(g, a) = a * act'(g) with a = dh * u; dup(g, d) = d * act(g) (the CPU's rounding order). Unlike the
// CPU's (one bwd, as std::exp sets errno), SiLU's two sigmoids here are one after inlining: expf is pure math.
struct SiluAct {
  __device__ static float fwd(float g) { return g * sigmoidf_(g); }
  __device__ static float dgate(float g, float a) {
    const float sg = sigmoidf_(g);
    return a * sg * (1.0f + g * (1.0f - sg));
  }
  __device__ static float dup(float g, float d) { return d * g * sigmoidf_(g); }
};
struct GeluTanhAct {
  __device__ static float fwd(float g) { return 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g))); }
  __device__ static float dgate(float g, float a) {
    const float g2 = g * g;
    const float t = tanhf(0.7978845608028654f * (g + 0.044715f * g2 * g));
    return a * (0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * g2));
  }
  __device__ static float dup(float g, float d) { return d * fwd(g); }
};

template <typename Act, typename T, int VEC>
__global__ void gated_fwd_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ h,
                                  int64_t n) {
  const int64_t nvec = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < nvec; i += stride) {
    const Vec<T, VEC> g = load_vec<T, VEC>(gate + i * VEC);
    const Vec<T, VEC> u = load_vec<T, VEC>(up + i * VEC);
    Vec<T, VEC> o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      o.v[k] = from_f<T>(Act::fwd(to_f(g.v[k])) * to_f(u.v[k]));
    }
    store_vec<T, VEC>(h + i * VEC, o);
  }
  for (int64_t i = nvec * VEC + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    h[i] = from_f<T>(Act::fwd(to_f(gate[i])) * to_f(up[i]));
  }
}

template <typename Act, typename T, int VEC>
__global__ void gated_bwd_kernel(const T* gate, const T* up, const T* __restrict__ dh, T* dgate, T* dup, int64_t n) {
  const int64_t nvec = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < nvec; i += stride) {
    const Vec<T, VEC> g = load_vec<T, VEC>(gate + i * VEC);
    const Vec<T, VEC> u = load_vec<T, VEC>(up + i * VEC);
    const Vec<T, VEC> d = load_vec<T, VEC>(dh + i * VEC);
    Vec<T, VEC> og, ou;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float gv = to_f(g.v[k]), uv = to_f(u.v[k]), dv = to_f(d.v[k]);
      og.v[k] = from_f<T>(Act::dgate(gv, dv * uv));
      ou.v[k] = from_f<T>(Act::dup(gv, dv));
    }
    store_vec<T, VEC>(dgate + i * VEC, og);
    store_vec<T, VEC>(dup + i * VEC, ou);
  }
  for (int64_t i = nvec * VEC + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    const float gv = to_f(gate[i]), uv = to_f(up[i]), dv = to_f(dh[i]);
    const float a = Act::dgate(gv, dv * uv), b = Act::dup(gv, dv);
    dgate[i] = from_f<T>(a);
    dup[i] = from_f<T>(b);
  }
}

// The fused [gate | up] row layout (geglu_fused_*, swiglu_fused_*): gu [m, 2 inner] -> h [m, inner]; dgu may alias
// gu (each thread loads its elements before storing them). inner % VEC == 0 for the vector path.
template <typename Act, typename T, int VEC>
__global__ void gated_fused_fwd_kernel(const T* __restrict__ gu, int64_t m, int64_t inner, T* __restrict__ h) {
  const int64_t per_row = inner / VEC, total = m * per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row, c = (i - r * per_row) * VEC;
    const Vec<T, VEC> g = load_vec<T, VEC>(gu + r * 2 * inner + c);
    const Vec<T, VEC> u = load_vec<T, VEC>(gu + r * 2 * inner + inner + c);
    Vec<T, VEC> o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) o.v[k] = from_f<T>(Act::fwd(to_f(g.v[k])) * to_f(u.v[k]));
    store_vec<T, VEC>(h + r * inner + c, o);
  }
}

template <typename Act, typename T, int VEC>
__global__ void gated_fused_bwd_kernel(const T* gu, const T* __restrict__ dh, int64_t m, int64_t inner, T* dgu) {
  const int64_t per_row = inner / VEC, total = m * per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row, c = (i - r * per_row) * VEC;
    const Vec<T, VEC> g = load_vec<T, VEC>(gu + r * 2 * inner + c);
    const Vec<T, VEC> u = load_vec<T, VEC>(gu + r * 2 * inner + inner + c);
    const Vec<T, VEC> d = load_vec<T, VEC>(dh + r * inner + c);
    Vec<T, VEC> og, ou;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float gv = to_f(g.v[k]), uv = to_f(u.v[k]), dv = to_f(d.v[k]);
      og.v[k] = from_f<T>(Act::dgate(gv, dv * uv));
      ou.v[k] = from_f<T>(Act::dup(gv, dv));
    }
    store_vec<T, VEC>(dgu + r * 2 * inner + c, og);
    store_vec<T, VEC>(dgu + r * 2 * inner + inner + c, ou);
  }
}

void check_same(const char* op, const Tensor& ref, std::initializer_list<std::pair<const char*, const Tensor*>> ts) {
  need_cuda(op, "gate", ref);
  for (auto& [name, t] : ts) {
    need_cuda(op, name, *t);
    if (t->shape() != ref.shape() || t->dtype() != ref.dtype())
      op_error(op, describe(name, *t) + ": expected the shape and dtype of " + describe("gate", ref));
  }
}

unsigned grid_of(const CudaContext& ctx, int64_t items) {
  return grid_for(items, 256, static_cast<int64_t>(ctx.sm_count()) * 16);
}

template <typename Act>
void gated_fwd(const char* op, const Tensor& gate, const Tensor& up, Tensor& h, CudaContext& ctx) {
  check_same(op, gate, {{"up", &up}, {"h", &h}});
  const int64_t n = gate.numel();
  if (n == 0) return;
  AM_DISPATCH_BF16_F32(gate.dtype(), op, T, {
    constexpr int NV = 16 / sizeof(T);
    if (aligned_to(gate.raw(), 16) && aligned_to(up.raw(), 16) && aligned_to(h.raw(), 16))
      gated_fwd_kernel<Act, T, NV><<<grid_of(ctx, n / NV + 1), 256, 0, ctx.stream()>>>(gate.data<T>(), up.data<T>(),
                                                                                        h.data<T>(), n);
    else
      gated_fwd_kernel<Act, T, 1><<<grid_of(ctx, n), 256, 0, ctx.stream()>>>(gate.data<T>(), up.data<T>(),
                                                                              h.data<T>(), n);
  });
  AM_CUDA_CHECK_LAUNCH();
}

template <typename Act>
void gated_bwd(const char* op, const Tensor& gate, const Tensor& up, const Tensor& dh, Tensor& dgate, Tensor& dup,
               CudaContext& ctx) {
  check_same(op, gate, {{"up", &up}, {"dh", &dh}, {"dgate", &dgate}, {"dup", &dup}});
  const int64_t n = gate.numel();
  if (n == 0) return;
  AM_DISPATCH_BF16_F32(gate.dtype(), op, T, {
    constexpr int NV = 16 / sizeof(T);
    const bool ok = aligned_to(gate.raw(), 16) && aligned_to(up.raw(), 16) && aligned_to(dh.raw(), 16) &&
                    aligned_to(dgate.raw(), 16) && aligned_to(dup.raw(), 16);
    if (ok)
      gated_bwd_kernel<Act, T, NV><<<grid_of(ctx, n / NV + 1), 256, 0, ctx.stream()>>>(
          gate.data<T>(), up.data<T>(), dh.data<T>(), dgate.data<T>(), dup.data<T>(), n);
    else
      gated_bwd_kernel<Act, T, 1><<<grid_of(ctx, n), 256, 0, ctx.stream()>>>(
          gate.data<T>(), up.data<T>(), dh.data<T>(), dgate.data<T>(), dup.data<T>(), n);
  });
  AM_CUDA_CHECK_LAUNCH();
}

// gu [M, 2I], `h_name` [M, I] (one dtype) -> (M, I)
std::pair<int64_t, int64_t> fused_dims(const char* op, const Tensor& gu, const char* h_name, const Tensor& h) {
  need_cuda(op, "gu", gu);
  need_cuda(op, h_name, h);
  if (gu.ndim() < 2 || gu.dim(-1) % 2) op_error(op, describe("gu", gu) + ": expected [M, 2I]");
  const int64_t inner = gu.dim(-1) / 2, m = inner ? gu.numel() / (2 * inner) : 0;
  if (h.ndim() < 2 || h.dim(-1) != inner || h.numel() != m * inner || h.dtype() != gu.dtype())
    op_error(op, describe(h_name, h) + ": expected [M, I] of the dtype of " + describe("gu", gu));
  return {m, inner};
}

template <typename Act>
void gated_fused_fwd(const char* op, const Tensor& gu, Tensor& h, CudaContext& ctx) {
  const auto [m, inner] = fused_dims(op, gu, "h", h);
  if (m == 0 || inner == 0) return;
  AM_DISPATCH_BF16_F32(gu.dtype(), op, T, {
    constexpr int NV = 16 / sizeof(T);
    if (inner % NV == 0 && aligned_to(gu.raw(), 16) && aligned_to(h.raw(), 16))
      gated_fused_fwd_kernel<Act, T, NV><<<grid_of(ctx, m * inner / NV), 256, 0, ctx.stream()>>>(gu.data<T>(), m, inner,
                                                                                                h.data<T>());
    else
      gated_fused_fwd_kernel<Act, T, 1><<<grid_of(ctx, m * inner), 256, 0, ctx.stream()>>>(gu.data<T>(), m, inner,
                                                                                           h.data<T>());
  });
  AM_CUDA_CHECK_LAUNCH();
}

// dgu_same_shape: geglu_fused_bwd wants dgu of gu's shape; swiglu_fused_bwd (the MoE contract, moe_ops.h) takes any
// dgu of gu's element count, which is all the kernel needs (it addresses dgu as a contiguous [m, 2 inner]).
template <typename Act>
void gated_fused_bwd(const char* op, const Tensor& gu, const Tensor& dh, Tensor& dgu, bool dgu_same_shape,
                     CudaContext& ctx) {
  const auto [m, inner] = fused_dims(op, gu, "dh", dh);
  need_cuda(op, "dgu", dgu);
  if ((dgu_same_shape ? dgu.shape() != gu.shape() : dgu.numel() != gu.numel()) || dgu.dtype() != gu.dtype())
    op_error(op, describe("dgu", dgu) + ": expected the " + (dgu_same_shape ? "shape" : "element count") +
                     " and dtype of " + describe("gu", gu));
  if (m == 0 || inner == 0) return;
  AM_DISPATCH_BF16_F32(gu.dtype(), op, T, {
    constexpr int NV = 16 / sizeof(T);
    if (inner % NV == 0 && aligned_to(gu.raw(), 16) && aligned_to(dh.raw(), 16) && aligned_to(dgu.raw(), 16))
      gated_fused_bwd_kernel<Act, T, NV><<<grid_of(ctx, m * inner / NV), 256, 0, ctx.stream()>>>(
          gu.data<T>(), dh.data<T>(), m, inner, dgu.data<T>());
    else
      gated_fused_bwd_kernel<Act, T, 1><<<grid_of(ctx, m * inner), 256, 0, ctx.stream()>>>(
          gu.data<T>(), dh.data<T>(), m, inner, dgu.data<T>());
  });
  AM_CUDA_CHECK_LAUNCH();
}

}  // namespace

void geglu_fused_fwd(const Tensor& gu, Tensor& h, CudaContext& ctx) {
  gated_fused_fwd<GeluTanhAct>("geglu_fused_fwd", gu, h, ctx);
}
void geglu_fused_bwd(const Tensor& gu, const Tensor& dh, Tensor& dgu, CudaContext& ctx) {
  gated_fused_bwd<GeluTanhAct>("geglu_fused_bwd", gu, dh, dgu, /*dgu_same_shape=*/true, ctx);
}
void swiglu_fused_fwd(const Tensor& gu, Tensor& h, CudaContext& ctx) {
  gated_fused_fwd<SiluAct>("swiglu_fused_fwd", gu, h, ctx);
}
void swiglu_fused_bwd(const Tensor& gu, const Tensor& dh, Tensor& dgu, CudaContext& ctx) {
  gated_fused_bwd<SiluAct>("swiglu_fused_bwd", gu, dh, dgu, /*dgu_same_shape=*/false, ctx);
}

void swiglu_fwd(const Tensor& gate, const Tensor& up, Tensor& h, CudaContext& ctx) {
  gated_fwd<SiluAct>("swiglu_fwd", gate, up, h, ctx);
}
void swiglu_bwd(const Tensor& gate, const Tensor& up, const Tensor& dh, Tensor& dgate, Tensor& dup,
                CudaContext& ctx) {
  gated_bwd<SiluAct>("swiglu_bwd", gate, up, dh, dgate, dup, ctx);
}
void geglu_fwd(const Tensor& gate, const Tensor& up, Tensor& h, CudaContext& ctx) {
  gated_fwd<GeluTanhAct>("geglu_fwd", gate, up, h, ctx);
}
void geglu_bwd(const Tensor& gate, const Tensor& up, const Tensor& dh, Tensor& dgate, Tensor& dup,
               CudaContext& ctx) {
  gated_bwd<GeluTanhAct>("geglu_bwd", gate, up, dh, dgate, dup, ctx);
}

}  // namespace am::cuda
