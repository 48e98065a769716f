// Fused residual add + RMSNorm, the CPU reference (ops.h add_rmsnorm_fwd / add_rmsnorm_bwd).
//
// The pre-norm decoder step  x_out = x + delta;  y = rmsnorm(x_out) w  as one pass over the rows, and its backward
// at the residual stream  dx = dres + rmsnorm_dx. The row arithmetic is rmsnorm.cpp's (rmsnorm_row.h) and the add
// is cpu::add's (fp32 sum of fp32 x and delta read as fp32), so both are BIT-identical to the separate calls
// add(); rmsnorm_fwd() and rmsnorm_bwd(); add(): the CPU training path with AM_FUSED_ADD_NORM=1 must equal the
// one without (tests/models/test_add_norm.cpp). On the CPU the fusion saves little (the row is in cache between
// the add and the norm); it exists so that the CUDA kernel (backend/cuda/add_rmsnorm.cu) has a reference and the
// decoder one code path.
#include "backend/cpu/cpu_ops.h"
#include "backend/cpu/float_io.h"
#include "backend/cpu/rmsnorm_row.h"

namespace am::cpu {

// x, x_out [N, H] fp32 (x_out may be x), delta [N, H] of dtype td (any float), w [H] -> y [N, H], rstd [N].
void add_rmsnorm_fwd(const float* x, const void* delta, DType td, const float* w, float eps, float* x_out, float* y,
                     float* rstd, int64_t n, int64_t h) {
#pragma omp parallel for if (n * h >= (1 << 15))
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * h;
    float* oi = x_out + i * h;
    if (td == DType::F32) {
      const float* di = static_cast<const float*>(delta) + i * h;
      for (int64_t j = 0; j < h; ++j) oi[j] = xi[j] + di[j];
    } else {
      for (int64_t j = 0; j < h; ++j) oi[j] = xi[j] + load_float(delta, td, i * h + j);
    }
    rstd[i] = rms_row::fwd(oi, w, eps, y + i * h, h);
  }
}

// x [N, H] (the norm's input: the forward's x_out), w [H], rstd [N], dy [N, H], dres [N, H] -> dx [N, H] =
// rmsnorm_dx + dres (the front-end keeps dx and dres apart, as the CUDA kernel needs); dw [H] += as rmsnorm_bwd
// (null: frozen weight).
void add_rmsnorm_bwd(const float* x, const float* w, const float* rstd, const float* dy, const float* dres,
                     float* dx, float* dw, int64_t n, int64_t h) {
#pragma omp parallel for if (n * h >= (1 << 15))
  for (int64_t i = 0; i < n; ++i) {
    float* dxi = dx + i * h;
    const float* ri = dres + i * h;
    rms_row::dx(x + i * h, w, rstd[i], dy + i * h, h, [dxi, ri](int64_t j, float v) { dxi[j] = v + ri[j]; });
  }
  if (dw) rms_row::dw_accumulate(x, rstd, dy, dw, n, h);
}

}  // namespace am::cpu
