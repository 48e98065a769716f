// Rotary position embedding in place, HF rotate_half convention: feature i pairs with i + R/2.
//   forward  (a, b) -> (a c - b s, b c + a s);  backward (a, b) -> (a c + b s, b c - a s)
// x [N, heads, D] (bf16 or fp32), cos/sin [N, R/2] fp32, R <= D (features >= R pass through).
// One thread per VEC consecutive pairs of one (token, head): two 16-byte loads/stores of x (the i and
// i + R/2 halves) plus VEC cos and sin values, which all heads of a token share through L1.
// W1 q: [8192, 32, 64] bf16, R/2 = 32 -> VEC 8, 4 threads per head.
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/kernel_utils.cuh"

namespace am::cuda {
namespace {

template <typename T, int VEC>
__global__ void rope_kernel(T* __restrict__ x, const float* __restrict__ cosv, const float* __restrict__ sinv,
                            int64_t n, int64_t heads, int64_t d, int64_t half, float sign) {
  const int64_t per_head = half / VEC;
  const int64_t total = n * heads * per_head;
  for (int64_t it = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; it < total;
       it += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t iv = it % per_head;
    const int64_t th = it / per_head;  // token * heads + head
    const int64_t t = th / heads;
    const int64_t i = iv * VEC;
    T* xh = x + th * d;
    const Vec<T, VEC> a = load_vec<T, VEC>(xh + i);
    const Vec<T, VEC> b = load_vec<T, VEC>(xh + i + half);
    Vec<T, VEC> oa, ob;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float c = cosv[t * half + i + k], s = sign * sinv[t * half + i + k];
      const float av = to_f(a.v[k]), bv = to_f(b.v[k]);
      oa.v[k] = from_f<T>(av * c - bv * s);
      ob.v[k] = from_f<T>(bv * c + av * s);
    }
    store_vec<T, VEC>(xh + i, oa);
    store_vec<T, VEC>(xh + i + half, ob);
  }
}

void rope(const char* op, Tensor& x, const Tensor& cos, const Tensor& sin, float sign, CudaContext& ctx) {
  need_cuda(op, "x", x);
  need_cuda(op, "cos", cos);
  need_cuda(op, "sin", sin);
  need_dtype(op, "cos", cos, DType::F32);
  need_dtype(op, "sin", sin, DType::F32);
  if (x.ndim() < 3) op_error(op, describe("x", x) + ": expected [N, heads, D]");
  const int64_t d = x.dim(-1), heads = x.dim(-2);
  const int64_t n = heads * d > 0 ? x.numel() / (heads * d) : 0;
  if (cos.ndim() < 1 || cos.shape() != sin.shape())
    op_error(op, describe("cos", cos) + " and " + describe("sin", sin) + ": expected equal shapes [N, D/2]");
  const int64_t half = cos.dim(-1);
  if (half == 0 || 2 * half > d)
    op_error(op, describe("cos", cos) + ": last dimension must be D/2 = " + std::to_string(d / 2) +
                     " (or less, for partial rotary) for " + describe("x", x));
  if (cos.numel() != n * half)
    op_error(op, describe("cos", cos) + ": expected one row per token of " + describe("x", x));
  if (n == 0) return;
  AM_DISPATCH_BF16_F32(x.dtype(), op, T, {
    constexpr int NV = 16 / sizeof(T);
    T* p = x.data<T>();
    // The vector path needs every (token, head) row and both halves aligned to 16 bytes.
    const bool vec_ok = half % NV == 0 && d % NV == 0 && aligned_to(p, 16) && aligned_to(cos.raw(), 16) &&
                        aligned_to(sin.raw(), 16);
    const int vec = vec_ok ? NV : 1;
    const int64_t items = n * heads * (half / vec);
    const unsigned grid = grid_for(items, 256, static_cast<int64_t>(ctx.sm_count()) * 16);
    if (vec_ok)
      rope_kernel<T, NV><<<grid, 256, 0, ctx.stream()>>>(p, cos.data<float>(), sin.data<float>(), n, heads, d, half, sign);
    else
      rope_kernel<T, 1><<<grid, 256, 0, ctx.stream()>>>(p, cos.data<float>(), sin.data<float>(), n, heads, d, half, sign);
  });
  AM_CUDA_CHECK_LAUNCH();
}

}  // namespace

void rope_fwd_(Tensor& x, const Tensor& cos, const Tensor& sin, CudaContext& ctx) {
  rope("rope_fwd_", x, cos, sin, 1.f, ctx);
}
void rope_bwd_(Tensor& dx, const Tensor& cos, const Tensor& sin, CudaContext& ctx) {
  rope("rope_bwd_", dx, cos, sin, -1.f, ctx);
}

}  // namespace am::cuda
