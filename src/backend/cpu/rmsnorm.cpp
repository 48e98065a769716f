// RMSNorm with HF LlamaRMSNorm semantics in fp32: y = (x * rstd) * w, rstd = rsqrt(mean(x^2) + eps).
// The row arithmetic is in rmsnorm_row.h (shared with the fused residual add + RMSNorm, add_rmsnorm.cpp).
#include "backend/cpu/cpu_ops.h"
#include "backend/cpu/rmsnorm_row.h"

namespace am::cpu {

// x [N, H], w [H] -> y [N, H], rstd [N]
void rmsnorm_fwd(const float* x, const float* w, float eps, float* y, float* rstd, int64_t n, int64_t h) {
#pragma omp parallel for if (n * h >= (1 << 15))
  for (int64_t i = 0; i < n; ++i) rstd[i] = rms_row::fwd(x + i * h, w, eps, y + i * h, h);
}

// dx assigned (rms_row::dx), dw += sum_rows dy x r (skipped when dw is null: frozen weight).
void rmsnorm_bwd(const float* x, const float* w, const float* rstd, const float* dy, float* dx, float* dw,
                 int64_t n, int64_t h) {
#pragma omp parallel for if (n * h >= (1 << 15))
  for (int64_t i = 0; i < n; ++i) {
    float* dxi = dx + i * h;
    rms_row::dx(x + i * h, w, rstd[i], dy + i * h, h, [dxi](int64_t j, float v) { dxi[j] = v; });
  }
  if (dw) rms_row::dw_accumulate(x, rstd, dy, dw, n, h);
}

}  // namespace am::cpu
