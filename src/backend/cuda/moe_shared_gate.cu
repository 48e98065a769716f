// qwen2_moe's gated shared expert on the device: one block per token row (H is the hidden size, a few
// thousand), fp32 math. Memory-bound and small next to the expert GEMMs.
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/kernel_utils.cuh"
#include "backend/cuda/moe_shared_gate.h"

namespace am::cuda {
namespace {

__device__ __forceinline__ float sig(float v) { return 1.0f / (1.0f + expf(-v)); }

template <typename T, typename G>
__global__ void shared_gate_fwd_kernel(const T* __restrict__ sy, const G* __restrict__ g, T* __restrict__ y,
                                       int64_t H) {
  const int64_t n = blockIdx.x;
  const float s = sig(to_f(g[n]));
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x)
    y[n * H + h] = from_f<T>(to_f(y[n * H + h]) + s * to_f(sy[n * H + h]));
}

template <typename T, typename G>
__global__ void shared_gate_bwd_kernel(const T* __restrict__ sy, const G* __restrict__ g, const T* __restrict__ dy,
                                       T* __restrict__ dsy, G* __restrict__ dg, int64_t H) {
  const int64_t n = blockIdx.x;
  const float s = sig(to_f(g[n]));
  float dot = 0.f;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    const float d = to_f(dy[n * H + h]);
    dot += to_f(sy[n * H + h]) * d;
    dsy[n * H + h] = from_f<T>(s * d);
  }
  __shared__ float red[32];
  for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = dot;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) t += red[w];
    dg[n] = from_f<G>(s * (1.0f - s) * t);
  }
}

}  // namespace

void moe_shared_gate_fwd(const Tensor& sy, const Tensor& g, Tensor& y, CudaContext& ctx) {
  const char* op = "moe_shared_gate_fwd";
  need_cuda(op, "sy", sy);
  need_cuda(op, "g", g);
  need_cuda(op, "y", y);
  if (y.dtype() != sy.dtype()) op_error(op, "y and sy must share a dtype");
  const int64_t H = sy.dim(-1), N = sy.numel() / H;
  if (N == 0) return;
  AM_DISPATCH_BF16_F32(sy.dtype(), op, T, {
    if (g.dtype() == DType::F32)
      shared_gate_fwd_kernel<T, float><<<N, 256, 0, ctx.stream()>>>(sy.data<T>(), g.data<float>(), y.data<T>(), H);
    else if (g.dtype() == DType::BF16)
      shared_gate_fwd_kernel<T, __nv_bfloat16><<<N, 256, 0, ctx.stream()>>>(sy.data<T>(), g.data<__nv_bfloat16>(),
                                                                            y.data<T>(), H);
    else
      op_error(op, "g must be bf16 or fp32");
  });
  AM_CUDA_CHECK_LAUNCH();
}

void moe_shared_gate_bwd(const Tensor& sy, const Tensor& g, const Tensor& dy, Tensor& dsy, Tensor& dg,
                         CudaContext& ctx) {
  const char* op = "moe_shared_gate_bwd";
  need_cuda(op, "sy", sy);
  need_cuda(op, "g", g);
  need_cuda(op, "dy", dy);
  need_cuda(op, "dsy", dsy);
  need_cuda(op, "dg", dg);
  if (dy.dtype() != sy.dtype() || dsy.dtype() != sy.dtype() || dg.dtype() != g.dtype())
    op_error(op, "dy/dsy must share sy's dtype and dg g's");
  const int64_t H = sy.dim(-1), N = sy.numel() / H;
  if (N == 0) return;
  AM_DISPATCH_BF16_F32(sy.dtype(), op, T, {
    if (g.dtype() == DType::F32)
      shared_gate_bwd_kernel<T, float><<<N, 256, 0, ctx.stream()>>>(sy.data<T>(), g.data<float>(), dy.data<T>(),
                                                                    dsy.data<T>(), dg.data<float>(), H);
    else if (g.dtype() == DType::BF16)
      shared_gate_bwd_kernel<T, __nv_bfloat16><<<N, 256, 0, ctx.stream()>>>(
          sy.data<T>(), g.data<__nv_bfloat16>(), dy.data<T>(), dsy.data<T>(), dg.data<__nv_bfloat16>(), H);
    else
      op_error(op, "g must be bf16 or fp32");
  });
  AM_CUDA_CHECK_LAUNCH();
}

}  // namespace am::cuda
