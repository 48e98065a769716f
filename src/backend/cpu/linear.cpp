// Linear layer on OpenBLAS. Weight is [out, in] = [M, K] as in PyTorch, so the forward is x w^T.
// The GEMMs run outside OpenMP regions (OpenBLAS has its own thread pool); only the bias reductions use
// OpenMP.
#include <cblas.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "backend/cpu/cpu_ops.h"

namespace am::cpu {
namespace {

// BLAS leading dimensions must be >= 1 even for empty matrices.
inline int ld(int64_t v) { return static_cast<int>(std::max<int64_t>(v, 1)); }

}  // namespace

// x [N, K], w [M, K], bias [M] -> y [N, M]
void linear_fwd(const float* x, const float* w, const float* bias, float* y, int64_t n, int64_t k,
                int64_t m) {
  if (n == 0 || m == 0) return;
  if (k == 0) {
    std::memset(y, 0, static_cast<size_t>(n * m) * sizeof(float));
  } else {
    // y[N, M] = x[N, K] * (w[M, K])^T
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(n), static_cast<int>(m),
                static_cast<int>(k), 1.0f, x, ld(k), w, ld(k), 0.0f, y, ld(m));
  }
  if (bias) {
#pragma omp parallel for if (n * m >= (1 << 15))
    for (int64_t i = 0; i < n; ++i) {
      float* row = y + i * m;
      for (int64_t j = 0; j < m; ++j) row[j] += bias[j];
    }
  }
}

void linear_bwd(const float* x, const float* w, const float* dy, float* dx, float* dw, float* dbias,
                int64_t n, int64_t k, int64_t m) {
  if (dx && n > 0 && k > 0) {
    if (m == 0) {
      std::memset(dx, 0, static_cast<size_t>(n * k) * sizeof(float));
    } else {
      // dx[N, K] = dy[N, M] * w[M, K]
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(n), static_cast<int>(k),
                  static_cast<int>(m), 1.0f, dy, ld(m), w, ld(k), 0.0f, dx, ld(k));
    }
  }
  if (dw && n > 0 && m > 0 && k > 0) {
    // dw[M, K] += dy^T[M, N] * x[N, K]   (beta = 1: accumulate; null dw: frozen weight, skipped)
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, static_cast<int>(m), static_cast<int>(k),
                static_cast<int>(n), 1.0f, dy, ld(m), x, ld(k), 1.0f, dw, ld(k));
  }
  if (dbias && n > 0 && m > 0) {
    // dbias[M] += sum over rows of dy[N, M], in double. Threads own column slices (no races); each
    // walks the rows in order, so the result is deterministic.
    constexpr int64_t kCols = 256;
    const int64_t nblocks = (m + kCols - 1) / kCols;
#pragma omp parallel for schedule(static) if (n * m >= (1 << 15))
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t c0 = blk * kCols, c1 = std::min(m, c0 + kCols);
      double acc[kCols] = {};
      for (int64_t i = 0; i < n; ++i) {
        const float* row = dy + i * m;
        for (int64_t c = c0; c < c1; ++c) acc[c - c0] += row[c];
      }
      for (int64_t c = c0; c < c1; ++c) dbias[c] = static_cast<float>(dbias[c] + acc[c - c0]);
    }
  }
}

}  // namespace am::cpu
