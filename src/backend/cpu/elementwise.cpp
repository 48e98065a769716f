// Elementwise ops and the sum-of-squares reduction, for any float dtype (F32 / BF16 / F16). Mixed
// dtypes are allowed (e.g. an fp32 master gradient += a bf16 gradient): values are widened to fp32, the
// arithmetic is fp32, and the result is rounded back to the destination dtype.
#include <algorithm>
#include <cstring>
#include <vector>

#include "backend/cpu/cpu_ops.h"
#include "backend/cpu/dropout_mask.h"
#include "backend/cpu/float_io.h"

namespace am::cpu {
namespace {

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelMin = 1 << 15;


}  // namespace

void add(void* a, DType ta, const void* b, DType tb, int64_t n) {
  if (ta == DType::F32 && tb == DType::F32) {
    float* x = static_cast<float*>(a);
    const float* y = static_cast<const float*>(b);
#pragma omp parallel for if (n >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) x[i] += y[i];
    return;
  }
#pragma omp parallel for if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) store_float(a, ta, i, load_float(a, ta, i) + load_float(b, tb, i));
}

void scale(void* a, DType ta, float s, int64_t n) {
  if (ta == DType::F32) {
    float* x = static_cast<float*>(a);
#pragma omp parallel for if (n >= kParallelMin)
    for (int64_t i = 0; i < n; ++i) x[i] *= s;
    return;
  }
#pragma omp parallel for if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) store_float(a, ta, i, load_float(a, ta, i) * s);
}

void add_scalar(void* a, DType ta, float s, int64_t n) {
#pragma omp parallel for if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i) store_float(a, ta, i, load_float(a, ta, i) + s);
}

void copy_2d(void* dst, int64_t dst_pitch, const void* src, int64_t src_pitch, int64_t bytes_per_row, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(static_cast<char*>(dst) + r * dst_pitch, static_cast<const char*>(src) + r * src_pitch,
                static_cast<size_t>(bytes_per_row));
}

void copy(void* dst, DType td, const void* src, DType ts, int64_t n) {
  if (n <= 0 || dst == src) return;
  if (td == ts) {
    std::memmove(dst, src, static_cast<size_t>(n) * dtype_size(td));
    return;
  }
  convert_floats(src, ts, dst, td, static_cast<size_t>(n));
}

void dropout(void* a, DType ta, float p, float scale, uint64_t seed, int64_t n) {
  if (ta == DType::F32) {
    float* x = static_cast<float*>(a);
#pragma omp parallel for if (n >= kParallelMin)
    for (int64_t i = 0; i < n; ++i)
      x[i] = dropout_mask::keep(seed, static_cast<uint64_t>(i), p) ? x[i] * scale : 0.0f;
    return;
  }
#pragma omp parallel for if (n >= kParallelMin)
  for (int64_t i = 0; i < n; ++i)
    store_float(a, ta, i, dropout_mask::keep(seed, static_cast<uint64_t>(i), p) ? load_float(a, ta, i) * scale : 0.0f);
}

double sum_squares(const void* a, DType ta, int64_t n) {
  // Fixed-size blocks summed in a fixed order: the result does not depend on the thread count.
  constexpr int64_t kBlock = 1 << 14;
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(static_cast<size_t>(nblocks), 0.0);
#pragma omp parallel for schedule(static) if (nblocks > 1)
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t end = std::min(n, (blk + 1) * kBlock);
    double acc = 0.0;
    if (ta == DType::F32) {
      const float* x = static_cast<const float*>(a);
      for (int64_t i = blk * kBlock; i < end; ++i) acc += static_cast<double>(x[i]) * x[i];
    } else {
      for (int64_t i = blk * kBlock; i < end; ++i) {
        const double v = load_float(a, ta, i);
        acc += v * v;
      }
    }
    partial[static_cast<size_t>(blk)] = acc;
  }
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

}  // namespace am::cpu
