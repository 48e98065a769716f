// Token embedding lookup and its scatter-add backward.
#include <algorithm>
#include <cstring>

#include "backend/cpu/cpu_ops.h"

namespace am::cpu {

int64_t first_out_of_range(const int32_t* ids, int64_t n, int64_t vocab) {
  for (int64_t i = 0; i < n; ++i)
    if (ids[i] < 0 || ids[i] >= vocab) return i;
  return -1;
}

// ids [N], w [V, H] -> out [N, H]: a row copy per token.
void embedding_fwd(const int32_t* ids, int64_t n, const float* w, int64_t hidden, float* out) {
#pragma omp parallel for if (n * hidden >= (1 << 15))
  for (int64_t i = 0; i < n; ++i)
    std::memcpy(out + i * hidden, w + static_cast<int64_t>(ids[i]) * hidden,
                static_cast<size_t>(hidden) * sizeof(float));
}

// dw [V, H] += dout [N, H] scattered by ids [N]. Repeated ids make a row-parallel loop racy, so threads
// split the hidden dimension instead: each owns a column slice of dw and walks every token in order
// (which also makes the summation order, hence the result, deterministic).
void embedding_bwd(const int32_t* ids, int64_t n, const float* dout, int64_t hidden, float* dw) {
  constexpr int64_t kCols = 256;
  const int64_t nblocks = (hidden + kCols - 1) / kCols;
#pragma omp parallel for schedule(static) if (n * hidden >= (1 << 15))
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t c0 = blk * kCols, c1 = std::min(hidden, c0 + kCols);
    for (int64_t i = 0; i < n; ++i) {
      float* dst = dw + static_cast<int64_t>(ids[i]) * hidden;
      const float* src = dout + i * hidden;
      for (int64_t c = c0; c < c1; ++c) dst[c] += src[c];
    }
  }
}

}  // namespace am::cpu
