// Fused residual add + RMSNorm (ops.h add_rmsnorm_fwd / add_rmsnorm_bwd; CPU reference backend/cpu/add_rmsnorm.cpp).
//
// The pre-norm decoder step, with the residual stream x [N, H] in T (fp32 at W1: ExecContext::residual_dtype) and
// the block output delta [N, H] in T or bf16:
//   x_out = x + delta          (rounded to T; x_out may be x)
//   y     = (x_out * rstd) * w (TY: T or, for an fp32 T, bf16 - the next matmul's input), rstd [N] fp32 saved
// Unfused that is copy_ (when x is kept) + add_ + rmsnorm_fwd: at W1 (T fp32, delta bf16, y bf16) 4+4 + 4+2+4 + 4+2
// = 24 bytes per element; fused 4 + 2 + 4 + 2 = 12. The saving is pure memory traffic: an [8192, 2048] site moves
// 201 MB less, ~60 us at 3.35 TB/s (docs/cuda_kernels.md).
//
// Bit-identical to the unfused kernels, by construction: one block per row with exactly the launch shape
// rmsnorm_fwd would pick for (x_out, w, y) (rms::fwd_shape), each thread summing x_out^2 over the same columns in the
// same order, the same block_sum, the same rstd and output expressions. The add is add_'s (fp32 sum, one rounding to
// T) and the square is taken of the rounded value, as rmsnorm_fwd reads it back. Where that shape cannot be used
// (rows too long for registers: rmsnorm's looped path; the fused instance holding fewer threads; x or delta not
// aligned for the vector width the plain kernel would use) the op runs the separate kernels.
//
// The backward, dx = dres + rmsnorm_dx, is rmsnorm_bwd's own launcher with the add switched on (rmsnorm.cu, ADD
// instances): dres [N, H] in dx's dtype is read in the store loop, saving the write and re-read of dx that add_ would
// need (at W1, fp32 dx: 16 -> 8 bytes per element on top of the norm's own traffic).
#include <type_traits>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/kernel_utils.cuh"
#include "backend/cuda/rmsnorm_internal.h"
#include "backend/cuda/tuning.h"

namespace am::cuda {
namespace {

// One block per row; thread t owns the CH column vectors (c * blockDim + t) * VEC .. + VEC (rmsnorm_fwd_kernel's
// layout). x, x_out [N, H] T (may be the same buffer: each element is read before the same thread writes it, so no
// __restrict__ on them), delta [N, H] TA, w [H] TW, y [N, H] TY, rstd [N].
template <typename T, typename TA, typename TW, typename TY, int VEC, int CH>
__global__ void add_rmsnorm_fwd_kernel(const T* x, const TA* __restrict__ delta, const TW* __restrict__ w, float eps,
                                       T* x_out, TY* __restrict__ y, float* __restrict__ rstd, int64_t h) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  float xv[CH][VEC];
  float ss = 0.f;
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const int64_t col = (static_cast<int64_t>(c) * blockDim.x + threadIdx.x) * VEC;
    if (col < h) {
      const Vec<T, VEC> v = load_vec<T, VEC>(x + row * h + col);
      const Vec<TA, VEC> d = load_vec<TA, VEC>(delta + row * h + col);
      Vec<T, VEC> o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        o.v[k] = from_f<T>(to_f(v.v[k]) + to_f(d.v[k]));  // add_'s rounding
        xv[c][k] = to_f(o.v[k]);                         // what rmsnorm_fwd would read back
        ss += xv[c][k] * xv[c][k];
      }
      store_vec<T, VEC>(x_out + row * h + col, o);
    }
  }
  ss = block_sum(ss, scratch);
  const float r = 1.0f / sqrtf(ss / static_cast<float>(h) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const int64_t col = (static_cast<int64_t>(c) * blockDim.x + threadIdx.x) * VEC;
    if (col < h) {
      const Vec<TW, VEC> wv = load_vec<TW, VEC>(w + col);
      Vec<TY, VEC> o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) o.v[k] = from_f<TY>((xv[c][k] * r) * to_f(wv.v[k]));
      store_vec<TY, VEC>(y + row * h + col, o);
    }
  }
}

// Launches the fused kernel in shape s (rmsnorm_fwd's for these tensors); false (nothing launched) when x or delta
// is not aligned for s's vector width or the fused instance cannot hold s.threads.
template <typename T, typename TA, typename TW, typename TY>
bool fwd_launch(const Tensor& x, const Tensor& delta, const Tensor& w, float eps, Tensor& x_out, Tensor& y,
                Tensor& rstd, int64_t n, int64_t h, const rms::Shape& s, CudaContext& ctx) {
  constexpr int NV = 16 / sizeof(T);
  if (s.vec == NV && !(aligned_to(x.raw(), 16) && aligned_to(delta.raw(), sizeof(TA) * NV))) return false;
  bool ok = false;
  rms::with_shape<NV>(s, [&](auto vc, auto cc) {
    constexpr int V = decltype(vc)::value, C = decltype(cc)::value;
    auto kernel = add_rmsnorm_fwd_kernel<T, TA, TW, TY, V, C>;
    if (rms::kernel_max_threads(reinterpret_cast<const void*>(kernel)) < s.threads) return;
    kernel<<<static_cast<unsigned>(n), s.threads, 0, ctx.stream()>>>(x.data<T>(), delta.data<TA>(), w.data<TW>(), eps,
                                                                     x_out.data<T>(), y.data<TY>(),
                                                                     rstd.data<float>(), h);
    ok = true;
  });
  return ok;
}

void need_same_shape(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  if (t.shape() != x.shape()) op_error(op, describe(name, t) + ": expected the shape of " + describe("x", x));
}

}  // namespace

void add_rmsnorm_fwd(const Tensor& x, const Tensor& delta, const Tensor& w, float eps, Tensor& x_out, Tensor& y,
                     Tensor& rstd, CudaContext& ctx) {
  const char* op = "add_rmsnorm_fwd";
  for (auto [name, t] : {std::pair<const char*, const Tensor*>{"x", &x}, {"delta", &delta}, {"w", &w},
                         {"x_out", &x_out}, {"y", &y}, {"rstd", &rstd}})
    need_cuda(op, name, *t);
  if (w.ndim() != 1) op_error(op, describe("w", w) + ": expected [H]");
  const int64_t h = w.dim(0);
  if (x.ndim() < 2 || x.dim(-1) != h) op_error(op, describe("x", x) + ": expected [N, H = " + std::to_string(h) + "]");
  need_same_shape(op, "delta", delta, x);
  need_same_shape(op, "x_out", x_out, x);
  need_same_shape(op, "y", y, x);
  if (x_out.dtype() != x.dtype())
    op_error(op, describe("x_out", x_out) + ": expected the dtype of " + describe("x", x));
  if (x.dtype() != DType::F32 && x.dtype() != DType::BF16)
    op_error(op, describe("x", x) + ": expected float32 or bfloat16");
  if (delta.dtype() != x.dtype() && delta.dtype() != DType::BF16)
    op_error(op, describe("delta", delta) + ": expected the dtype of " + describe("x", x) + " or bfloat16");
  // y, w, rstd: rmsnorm_fwd's rules (it checks them again on the fallback path).
  const bool same_y = y.dtype() == x.dtype();
  if (!same_y && !(x.dtype() == DType::F32 && y.dtype() == DType::BF16))
    op_error(op, describe("y", y) + ": expected the dtype of " + describe("x", x) + " (or bfloat16 for a float32 x)");
  need_dtype(op, "rstd", rstd, DType::F32);
  const int64_t n = h ? x.numel() / h : 0;
  if (rstd.numel() != n) op_error(op, describe("rstd", rstd) + ": expected one element per row of x");
  if (n == 0 || h == 0) return;
  rms::Shape s{};
  bool fused = rms::fwd_shape(x_out, w, y, default_rmsnorm_tuning(), s);
  if (fused) {
    AM_DISPATCH_BF16_F32(x.dtype(), op, T, {
      AM_DISPATCH_BF16_F32(w.dtype(), op, TW, {
        const bool bf16_delta = delta.dtype() != x.dtype();
        if constexpr (std::is_same_v<T, float>) {
          if (same_y)
            fused = bf16_delta ? fwd_launch<float, bf16, TW, float>(x, delta, w, eps, x_out, y, rstd, n, h, s, ctx)
                               : fwd_launch<float, float, TW, float>(x, delta, w, eps, x_out, y, rstd, n, h, s, ctx);
          else
            fused = bf16_delta ? fwd_launch<float, bf16, TW, bf16>(x, delta, w, eps, x_out, y, rstd, n, h, s, ctx)
                               : fwd_launch<float, float, TW, bf16>(x, delta, w, eps, x_out, y, rstd, n, h, s, ctx);
        } else {
          fused = fwd_launch<bf16, bf16, TW, bf16>(x, delta, w, eps, x_out, y, rstd, n, h, s, ctx);
        }
      });
    });
  }
  if (fused) {
    AM_CUDA_CHECK_LAUNCH();
    return;
  }
  // The separate kernels (long rows, misaligned views): the sequence the fused kernel reproduces.
  if (x_out.raw() != x.raw()) copy_(x_out, x, ctx);
  add_(x_out, delta, ctx);
  rmsnorm_fwd(x_out, w, eps, y, rstd, ctx);
}

void add_rmsnorm_bwd(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, const Tensor& dres,
                     Tensor& dx, Tensor& dw, CudaContext& ctx) {
  const char* op = "add_rmsnorm_bwd";
  need_cuda(op, "dres", dres);
  need_cuda(op, "dx", dx);
  if (dres.shape() != dx.shape() || dres.dtype() != dx.dtype())
    op_error(op, describe("dres", dres) + ": expected the shape and dtype of " + describe("dx", dx));
  // A misaligned dres could not use the vector width the plain backward picks: separate kernels then.
  if (aligned_to(dres.raw(), 16) &&
      rms::bwd(op, x, w, rstd, dy, &dres, dx, dw, default_rmsnorm_tuning(), ctx))
    return;
  rmsnorm_bwd(x, w, rstd, dy, dx, dw, ctx);
  add_(dx, dres, ctx);
}

}  // namespace am::cuda
