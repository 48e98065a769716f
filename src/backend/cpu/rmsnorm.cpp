// RMSNorm with HF LlamaRMSNorm semantics in fp32: y = (x * rstd) * w, rstd = rsqrt(mean(x^2) + eps).
#include <algorithm>
#include <cmath>

#include "backend/cpu/cpu_ops.h"

namespace am::cpu {

// x [N, H], w [H] -> y [N, H], rstd [N]
void rmsnorm_fwd(const float* x, const float* w, float eps, float* y, float* rstd, int64_t n, int64_t h) {
#pragma omp parallel for if (n * h >= (1 << 15))
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * h;
    double ss = 0.0;
    for (int64_t j = 0; j < h; ++j) ss += static_cast<double>(xi[j]) * xi[j];
    // HF computes the mean in fp32 and adds eps in fp32; doing the sum in double differs only by the
    // fp32 rounding of that sum.
    const float ms = h > 0 ? static_cast<float>(ss / static_cast<double>(h)) : 0.f;
    const float r = 1.0f / std::sqrt(ms + eps);
    rstd[i] = r;
    float* yi = y + i * h;
    for (int64_t j = 0; j < h; ++j) yi[j] = (xi[j] * r) * w[j];
  }
}

// With r = rstd, y_j = w_j x_j r and dr/dx_i = -r^3 x_i / H:
//   dx_i = r w_i dy_i - (r^3 / H) x_i sum_j(dy_j w_j x_j)
//   dw_j += sum_rows dy_j x_j r   (skipped when dw is null)
void rmsnorm_bwd(const float* x, const float* w, const float* rstd, const float* dy, float* dx, float* dw,
                 int64_t n, int64_t h) {
#pragma omp parallel for if (n * h >= (1 << 15))
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x + i * h;
    const float* gi = dy + i * h;
    float* dxi = dx + i * h;
    const double r = rstd[i];
    double dot = 0.0;
    for (int64_t j = 0; j < h; ++j) dot += static_cast<double>(gi[j]) * w[j] * xi[j];
    const double c = h > 0 ? r * r * r * dot / static_cast<double>(h) : 0.0;
    for (int64_t j = 0; j < h; ++j) dxi[j] = static_cast<float>(r * w[j] * gi[j] - c * xi[j]);
  }
  if (!dw) return;  // frozen weight
  // dw: threads own column slices of dw and walk every row (no races, deterministic order).
  constexpr int64_t kCols = 256;
  const int64_t nblocks = (h + kCols - 1) / kCols;
#pragma omp parallel for schedule(static) if (n * h >= (1 << 15))
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t c0 = blk * kCols, c1 = std::min(h, c0 + kCols);
    double acc[kCols] = {};
    for (int64_t i = 0; i < n; ++i) {
      const float* xi = x + i * h;
      const float* gi = dy + i * h;
      const double r = rstd[i];
      for (int64_t c = c0; c < c1; ++c) acc[c - c0] += static_cast<double>(gi[c]) * xi[c] * r;
    }
    for (int64_t c = c0; c < c1; ++c) dw[c] = static_cast<float>(dw[c] + acc[c - c0]);
  }
}

}  // namespace am::cpu
