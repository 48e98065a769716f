// Linear layer on OpenBLAS. Weight is [out, in] = [M, K] as in PyTorch, so the forward is x w^T.
// The GEMMs run outside OpenMP regions (OpenBLAS has its own thread pool); only the bias reductions use
// OpenMP.
#include <cblas.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "backend/cpu/cpu_ops.h"

namespace am::cpu {
namespace {

// BLAS leading dimensions must be >= 1 even for empty matrices.
inline int ld(int64_t v) { return static_cast<int>(std::max<int64_t>(v, 1)); }

// The temporary of an accumulating GEMM (LinearOut::accumulate): n floats, 64-byte aligned like a tensor's
// storage, uninitialised (the GEMM assigns every element).
struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using Scratch = std::unique_ptr<float[], FreeDeleter>;
Scratch scratch(int64_t n) {
  const size_t bytes = (static_cast<size_t>(n) * sizeof(float) + 63) / 64 * 64;
  auto* p = static_cast<float*>(std::aligned_alloc(64, bytes));
  if (!p) throw std::bad_alloc();
  return Scratch(p);
}

}  // namespace

// x [N, K], w [M, K], bias [M] -> y [N, M] = yo.alpha * x w^T + bias (+ y when yo.accumulate). The options are
// the passes they replace, in the order ops::linear_fwd + ops::scale_ + ops::add_ ran them (core/linear_out.h):
// the GEMM (into a temporary when accumulating), scale(), the bias, add(). Bit-identical to those calls.
void linear_fwd(const float* x, const float* w, const float* bias, float* y, int64_t n, int64_t k, int64_t m,
                const LinearOut& yo) {
  if (n == 0 || m == 0) return;
  Scratch tmp;
  float* out = y;
  if (yo.accumulate) {
    tmp = scratch(n * m);
    out = tmp.get();
  }
  if (k == 0) {
    std::memset(out, 0, static_cast<size_t>(n * m) * sizeof(float));
  } else {
    // out[N, M] = x[N, K] * (w[M, K])^T
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(n), static_cast<int>(m),
                static_cast<int>(k), 1.0f, x, ld(k), w, ld(k), 0.0f, out, ld(m));
  }
  if (yo.alpha != 1.f) scale(out, DType::F32, yo.alpha, n * m);
  if (bias) {
#pragma omp parallel for if (n * m >= (1 << 15))
    for (int64_t i = 0; i < n; ++i) {
      float* row = out + i * m;
      for (int64_t j = 0; j < m; ++j) row[j] += bias[j];
    }
  }
  if (yo.accumulate) add(y, DType::F32, out, DType::F32, n * m);
}

// dx = dxo.alpha * dy w (+ dx when dxo.accumulate): the GEMM (into a temporary when accumulating), scale(),
// add(), as for linear_fwd's y.
void linear_bwd(const float* x, const float* w, const float* dy, float* dx, float* dw, float* dbias,
                int64_t n, int64_t k, int64_t m, const LinearOut& dxo) {
  if (dx && n > 0 && k > 0) {
    Scratch tmp;
    float* out = dx;
    if (dxo.accumulate) {
      tmp = scratch(n * k);
      out = tmp.get();
    }
    if (m == 0) {
      std::memset(out, 0, static_cast<size_t>(n * k) * sizeof(float));
    } else {
      // out[N, K] = dy[N, M] * w[M, K]
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(n), static_cast<int>(k),
                  static_cast<int>(m), 1.0f, dy, ld(m), w, ld(k), 0.0f, out, ld(k));
    }
    if (dxo.alpha != 1.f) scale(out, DType::F32, dxo.alpha, n * k);
    if (dxo.accumulate) add(dx, DType::F32, out, DType::F32, n * k);
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
