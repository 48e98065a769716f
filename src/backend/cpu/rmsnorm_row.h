// The per-row arithmetic of the RMSNorm reference (rmsnorm.cpp), shared with the fused residual add + RMSNorm
// (add_rmsnorm.cpp): both call these, so the fused op computes the same bits as the separate add and norm by
// construction (same expressions, same order, same roundings; the x86-64 build does not contract to FMA).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace am::cpu::rms_row {

// One row: x [H], w [H] -> y [H] = (x * r) * w; returns r = 1 / sqrt(mean(x^2) + eps).
// HF computes the mean in fp32 and adds eps in fp32; the sum here is in double, which differs only by the fp32
// rounding of that sum.
inline float fwd(const float* x, const float* w, float eps, float* y, int64_t h) {
  double ss = 0.0;
  for (int64_t j = 0; j < h; ++j) ss += static_cast<double>(x[j]) * x[j];
  const float ms = h > 0 ? static_cast<float>(ss / static_cast<double>(h)) : 0.f;
  const float r = 1.0f / std::sqrt(ms + eps);
  for (int64_t j = 0; j < h; ++j) y[j] = (x[j] * r) * w[j];
  return r;
}

// One row of dx with r = rstd, y_j = w_j x_j r and dr/dx_i = -r^3 x_i / H:
//   dx_i = r w_i dy_i - (r^3 / H) x_i sum_j(dy_j w_j x_j)      (in double, rounded once to fp32)
// store(j, v) receives element j (plain: dx[j] = v; fused: dx[j] = v + dres[j]).
template <typename Store>
inline void dx(const float* x, const float* w, double r, const float* dy, int64_t h, Store&& store) {
  double dot = 0.0;
  for (int64_t j = 0; j < h; ++j) dot += static_cast<double>(dy[j]) * w[j] * x[j];
  const double c = h > 0 ? r * r * r * dot / static_cast<double>(h) : 0.0;
  for (int64_t j = 0; j < h; ++j) store(j, static_cast<float>(r * w[j] * dy[j] - c * x[j]));
}

// dw [H] += sum over the N rows of dy x r. Threads own column slices of dw and walk every row (no races,
// deterministic order, independent of the thread count).
inline void dw_accumulate(const float* x, const float* rstd, const float* dy, float* dw, int64_t n, int64_t h) {
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

}  // namespace am::cpu::rms_row
