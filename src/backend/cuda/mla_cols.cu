// MLA's rope-column ops on CUDA (contract in src/ops/mla_ops.h; CPU reference backend/cpu/mla_cols.cpp).
// Memory-bound index maps: one thread per narrow element (r, j) in a grid-stride loop; the gather sums its G
// heads in fp32 in increasing g from head 0 (as the reference: bit-identical in fp32, one rounding in bf16),
// the scatter writes its value to the G heads. The narrow side is read / written contiguously; the wide side
// at the permuted column (interleave: even dims first, then odd), which stays within one row's rope block.
#include <string>

#include "backend/cuda/kernel_utils.cuh"
#include "backend/cuda/mla_cols.h"

namespace am::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ int64_t rope_perm(int64_t j, int64_t w, bool il) {
  return !il ? j : (j < w / 2 ? 2 * j : 2 * (j - w / 2) + 1);
}

template <typename T>
__global__ void gather_cols_kernel(const T* __restrict__ wide, int64_t R, int64_t G, int64_t C, int64_t col, bool il,
                                   int64_t w, T* __restrict__ narrow) {
  const int64_t total = R * w;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / w, j = i - r * w;
    const T* p = wide + r * G * C + col + rope_perm(j, w, il);
    float acc = to_f(p[0]);
    for (int64_t g = 1; g < G; ++g) acc = __fadd_rn(acc, to_f(p[g * C]));
    narrow[i] = from_f<T>(acc);
  }
}

template <typename T>
__global__ void scatter_cols_kernel(const T* __restrict__ narrow, int64_t R, int64_t w, bool il, T* __restrict__ wide,
                                    int64_t G, int64_t C, int64_t col) {
  const int64_t total = R * w;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / w, j = i - r * w;
    T* p = wide + r * G * C + col + rope_perm(j, w, il);
    const T v = narrow[i];
    for (int64_t g = 0; g < G; ++g) p[g * C] = v;
  }
}

struct ColDims {
  int64_t R, G, C, w;
};
ColDims check(const char* op, const Tensor& wide, int64_t col, bool il, const Tensor& narrow) {
  need_cuda(op, "wide", wide);
  need_cuda(op, "narrow", narrow);
  need_float(op, "wide", wide);
  if (wide.ndim() != 2 && wide.ndim() != 3) op_error(op, describe("wide", wide) + ": expected [R, C] or [R, G, C]");
  const ColDims d{wide.dim(0), wide.ndim() == 3 ? wide.dim(1) : 1, wide.dim(-1), narrow.ndim() >= 1 ? narrow.dim(-1) : 0};
  if (narrow.ndim() < 2 || d.w < 1 || narrow.numel() != d.R * d.w)
    op_error(op, describe("narrow", narrow) + ": expected [R = " + std::to_string(d.R) + ", w]");
  if (col < 0 || col + d.w > d.C) op_error(op, "columns [" + std::to_string(col) + ", " + std::to_string(col + d.w) +
                                                   ") are outside " + describe("wide", wide));
  if (il && d.w % 2 != 0) op_error(op, describe("narrow", narrow) + ": an interleaved rope block needs an even width");
  if (wide.dtype() != narrow.dtype())
    op_error(op, describe("wide", wide) + ", " + describe("narrow", narrow) + ": dtypes differ");
  return d;
}

unsigned grid(const CudaContext& ctx, int64_t items) {
  return grid_for(items, kThreads, static_cast<int64_t>(ctx.sm_count()) * 16);
}

}  // namespace

void mla_gather_cols(const Tensor& wide, int64_t col, bool interleave, Tensor& narrow, CudaContext& ctx) {
  const char* op = "mla_gather_cols";
  const ColDims d = check(op, wide, col, interleave, narrow);
  if (d.R * d.w == 0) return;
  AM_DISPATCH_FLOAT(wide.dtype(), op, T, {
    gather_cols_kernel<T><<<grid(ctx, d.R * d.w), kThreads, 0, ctx.stream()>>>(wide.data<T>(), d.R, d.G, d.C, col,
                                                                              interleave, d.w, narrow.data<T>());
  });
  AM_CUDA_CHECK_LAUNCH();
}

void mla_scatter_cols(const Tensor& narrow, bool interleave, Tensor& wide, int64_t col, CudaContext& ctx) {
  const char* op = "mla_scatter_cols";
  const ColDims d = check(op, wide, col, interleave, narrow);
  if (d.R * d.w == 0) return;
  AM_DISPATCH_FLOAT(wide.dtype(), op, T, {
    scatter_cols_kernel<T><<<grid(ctx, d.R * d.w), kThreads, 0, ctx.stream()>>>(narrow.data<T>(), d.R, d.w, interleave,
                                                                               wide.data<T>(), d.G, d.C, col);
  });
  AM_CUDA_CHECK_LAUNCH();
}

}  // namespace am::cuda
