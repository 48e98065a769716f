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

// The rotation of one pair, with the rounding spelled out (one product rounded, then one fma) so that every kernel
// that rotates (rope_kernel, qkv_rope_pack_kernel) produces the same bits: left to the compiler, `a c - b s` was
// contracted differently where the sign is a compile-time constant, and the fused merge differed in the last bit.
__device__ __forceinline__ float rot_lo(float a, float b, float c, float s) { return __fmaf_rn(a, c, -__fmul_rn(b, s)); }
__device__ __forceinline__ float rot_hi(float a, float b, float c, float s) { return __fmaf_rn(b, c, __fmul_rn(a, s)); }

// Rotates VEC pairs (i + k, i + half + k) of one head row: src -> dst (may be the same row). cs / sn: the token's
// cos / sin rows [R/2]; sign -1 rotates backward.
template <typename T, int VEC>
__device__ __forceinline__ void rotate_pairs(const T* src, T* dst, int64_t i, int64_t half, const float* cs,
                                             const float* sn, float sign) {
  const Vec<T, VEC> a = load_vec<T, VEC>(src + i);
  const Vec<T, VEC> b = load_vec<T, VEC>(src + i + half);
  Vec<T, VEC> oa, ob;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float c = cs[i + k], s = sign * sn[i + k];
    const float av = to_f(a.v[k]), bv = to_f(b.v[k]);
    oa.v[k] = from_f<T>(rot_lo(av, bv, c, s));
    ob.v[k] = from_f<T>(rot_hi(av, bv, c, s));
  }
  store_vec<T, VEC>(dst + i, oa);
  store_vec<T, VEC>(dst + i + half, ob);
}

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
    rotate_pairs<T, VEC>(xh, xh, i, half, cosv + t * half, sinv + t * half, sign);
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

// ---------------- fused q/k/v projection output <-> q, k, v (ops.h qkv_split_rope / qkv_merge_rope_bwd) ------
// packed [N, (nh + 2 nkv) D] rows q | k | v. One thread per VEC consecutive features of one (token, head slot):
// in the rotated part (features < R) a thread owns VEC pairs (i, i + R/2) and does rope_kernel's arithmetic
// term for term (bit-identical to a copy + rope_fwd_ / rope_bwd_); features >= R and v are copied. MERGE = false:
// packed -> q / k / v, rotation +theta; MERGE = true: q / k / v -> packed, rotation -theta (the backward).
// W1: [8192, 48 slots, 64] bf16, R/2 = 32 -> VEC 8: 8 threads per slot, 4 of them idle partners in q / k.
namespace {

template <typename T, int VEC, bool MERGE>
__global__ void qkv_rope_pack_kernel(T* packed, T* q, T* k, T* v, const float* __restrict__ cosv,
                                     const float* __restrict__ sinv, int64_t n, int64_t nh, int64_t nkv, int64_t d,
                                     int64_t half) {
  const int64_t slots = nh + 2 * nkv, per_slot = d / VEC;
  const int64_t total = n * slots * per_slot;
  const float sign = MERGE ? -1.f : 1.f;
  for (int64_t it = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; it < total;
       it += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = (it % per_slot) * VEC;
    const int64_t ts = it / per_slot;  // token * slots + slot
    const int64_t t = ts / slots, slot = ts - t * slots;
    T* p = packed + ts * d;
    T* x = slot < nh         ? q + (t * nh + slot) * d
           : slot < nh + nkv ? k + (t * nkv + slot - nh) * d
                             : v + (t * nkv + slot - nh - nkv) * d;
    const T* src = MERGE ? x : p;
    T* dst = MERGE ? p : x;
    const bool rotated = half > 0 && slot < nh + nkv;
    if (rotated && i < half) {
      rotate_pairs<T, VEC>(src, dst, i, half, cosv + t * half, sinv + t * half, sign);
    } else if (!rotated || i >= 2 * half) {
      store_vec<T, VEC>(dst + i, load_vec<T, VEC>(src + i));
    }
  }
}

void qkv_pack(const char* op, Tensor& packed, Tensor& q, Tensor& k, Tensor& v, const Tensor* cos, const Tensor* sin,
              bool merge, CudaContext& ctx) {
  need_cuda(op, merge ? "dqkv" : "qkv", packed);
  need_cuda(op, merge ? "dq" : "q", q);
  need_cuda(op, merge ? "dk" : "k", k);
  need_cuda(op, merge ? "dv" : "v", v);
  if (q.ndim() < 3 || k.ndim() < 3 || v.ndim() < 3) op_error(op, "expected q [N, nh, D], k and v [N, nkv, D]");
  const int64_t d = q.dim(-1), nh = q.dim(-2), nkv = k.dim(-2);
  const int64_t n = nh * d > 0 ? q.numel() / (nh * d) : 0;
  if (k.dim(-1) != d || v.dim(-1) != d || v.dim(-2) != nkv || k.numel() != n * nkv * d || v.numel() != k.numel() ||
      packed.dim(-1) != (nh + 2 * nkv) * d || packed.numel() != n * (nh + 2 * nkv) * d)
    op_error(op, describe("packed", packed) + ", " + describe("q", q) + ", " + describe("k", k) + ", " +
                     describe("v", v) + ": expected [N, (nh + 2 nkv) D], [N, nh, D], [N, nkv, D], [N, nkv, D]");
  for (const Tensor* t : {&q, &k, &v})
    if (t->dtype() != packed.dtype())
      op_error(op, describe("q/k/v", *t) + ": expected the dtype of " + describe("packed", packed));
  int64_t half = 0;
  if (cos || sin) {
    if (!cos || !sin) op_error(op, "cos and sin: give both or neither");
    need_cuda(op, "cos", *cos);
    need_cuda(op, "sin", *sin);
    need_dtype(op, "cos", *cos, DType::F32);
    need_dtype(op, "sin", *sin, DType::F32);
    half = cos->dim(-1);
    if (cos->shape() != sin->shape() || half == 0 || 2 * half > d || cos->numel() != n * half)
      op_error(op, describe("cos", *cos) + ": expected [N, R/2] with 0 < R <= D = " + std::to_string(d));
  }
  if (n == 0 || d == 0) return;
  AM_DISPATCH_BF16_F32(packed.dtype(), op, T, {
    constexpr int NV = 16 / sizeof(T);
    const bool vec_ok = d % NV == 0 && half % NV == 0 && aligned_to(packed.raw(), 16) && aligned_to(q.raw(), 16) &&
                        aligned_to(k.raw(), 16) && aligned_to(v.raw(), 16);
    const int vec = vec_ok ? NV : 1;
    const int64_t items = n * (nh + 2 * nkv) * (d / vec);
    const unsigned grid = grid_for(items, 256, static_cast<int64_t>(ctx.sm_count()) * 16);
    const float* c = cos ? cos->data<float>() : nullptr;
    const float* s = sin ? sin->data<float>() : nullptr;
    T *pp = packed.data<T>(), *qp = q.data<T>(), *kp = k.data<T>(), *vp = v.data<T>();
    if (vec_ok && merge)
      qkv_rope_pack_kernel<T, NV, true><<<grid, 256, 0, ctx.stream()>>>(pp, qp, kp, vp, c, s, n, nh, nkv, d, half);
    else if (vec_ok)
      qkv_rope_pack_kernel<T, NV, false><<<grid, 256, 0, ctx.stream()>>>(pp, qp, kp, vp, c, s, n, nh, nkv, d, half);
    else if (merge)
      qkv_rope_pack_kernel<T, 1, true><<<grid, 256, 0, ctx.stream()>>>(pp, qp, kp, vp, c, s, n, nh, nkv, d, half);
    else
      qkv_rope_pack_kernel<T, 1, false><<<grid, 256, 0, ctx.stream()>>>(pp, qp, kp, vp, c, s, n, nh, nkv, d, half);
  });
  AM_CUDA_CHECK_LAUNCH();
}

}  // namespace

void qkv_split_rope(const Tensor& qkv, const Tensor* cos, const Tensor* sin, Tensor& q, Tensor& k, Tensor& v,
                    CudaContext& ctx) {
  qkv_pack("qkv_split_rope", const_cast<Tensor&>(qkv), q, k, v, cos, sin, /*merge=*/false, ctx);
}
void qkv_merge_rope_bwd(const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor* cos, const Tensor* sin,
                        Tensor& dqkv, CudaContext& ctx) {
  qkv_pack("qkv_merge_rope_bwd", dqkv, const_cast<Tensor&>(dq), const_cast<Tensor&>(dk), const_cast<Tensor&>(dv), cos,
           sin, /*merge=*/true, ctx);
}

}  // namespace am::cuda
