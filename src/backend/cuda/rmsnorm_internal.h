// Shared by rmsnorm.cu and add_rmsnorm.cu (the fused residual add + RMSNorm). Internal to backend/cuda.
//
// The fused ops must be BIT-identical to the separate add_ + rmsnorm_fwd (rmsnorm_bwd + add_) on the device. A row's
// sum of squares (backward: its dot product) is a block reduction whose order depends on the launch shape (vector
// width, vectors per thread, block size), and the backward's dw partials depend on the grid. So the fused forward
// takes the very shape rmsnorm_fwd would pick for the same tensors (fwd_shape), and the fused backward is
// rmsnorm_bwd's own launcher with the residual-gradient add switched on (bwd).
#pragma once
#include <cstdint>
#include <type_traits>

#include "backend/cuda/context.h"
#include "backend/cuda/tuning.h"
#include "core/tensor.h"

namespace am::cuda::rms {

// A row block: `threads` threads, each owning `ch` column vectors of `vec` elements.
struct Shape {
  int vec, ch, threads;
};

// Most threads per block a kernel instance can launch with (its registers and shared memory decide), cached.
int kernel_max_threads(const void* fn);

// Expands a run-time (vec, ch) into template constants: f(integral_constant<V>, integral_constant<C>) with V = NV (16
// bytes of T) or 1 and C in {1, 2, 4, 8}.
template <int NV, typename F>
void with_shape(const Shape& s, F&& f) {
  auto by_ch = [&](auto vec_c) {
    constexpr int V = decltype(vec_c)::value;
    switch (s.ch) {
      case 1: f(std::integral_constant<int, V>{}, std::integral_constant<int, 1>{}); break;
      case 2: f(std::integral_constant<int, V>{}, std::integral_constant<int, 2>{}); break;
      case 4: f(std::integral_constant<int, V>{}, std::integral_constant<int, 4>{}); break;
      default: f(std::integral_constant<int, V>{}, std::integral_constant<int, 8>{}); break;
    }
  };
  if (s.vec == NV) by_ch(std::integral_constant<int, NV>{});
  else by_ch(std::integral_constant<int, 1>{});
}

// The one-block-per-row shape rmsnorm_fwd_tuned(x, w, ..., y, ..., tu) launches for these tensors (x [N, H], w [H],
// y [N, H] of the dtypes rmsnorm_fwd accepts); false when it takes the looped path (rows too long for registers).
bool fwd_shape(const Tensor& x, const Tensor& w, const Tensor& y, const RmsNormTuning& tu, Shape& s);

// rmsnorm_bwd_tuned, with dx = dres + (RMSNorm's dx) when dres is non-null (dres: dx's shape and dtype, not
// overlapping dx, 16-byte aligned). Checks the arguments under the name `op`. Returns false, having launched nothing,
// when the fused form cannot run the launch shape and grid the plain backward would (its instance holds fewer
// threads); the caller then runs rmsnorm_bwd and add_.
bool bwd(const char* op, const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, const Tensor* dres,
         Tensor& dx, Tensor& dw, const RmsNormTuning& tu, CudaContext& ctx);

}  // namespace am::cuda::rms
