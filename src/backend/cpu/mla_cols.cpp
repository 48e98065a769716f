// CPU reference of MLA's rope-column gather / scatter (src/ops/mla_ops.h). Each output element is written by
// one iteration (rows are independent), so the OpenMP loops need no atomics.
#include "backend/cpu/mla_cols.h"

namespace am::cpu {

void mla_gather_cols(const float* wide, int64_t R, int64_t G, int64_t C, int64_t col, bool interleave, int64_t w,
                     float* narrow) {
#pragma omp parallel for if (R * G * w >= (1 << 15))
  for (int64_t r = 0; r < R; ++r) {
    const float* row = wide + r * G * C + col;
    for (int64_t j = 0; j < w; ++j) {
      const int64_t c = mla_rope_perm(j, w, interleave);
      float acc = row[c];  // start from head 0 (not 0.f + x, which would turn -0 into +0): G = 1 copies exactly
      for (int64_t g = 1; g < G; ++g) acc += row[g * C + c];
      narrow[r * w + j] = acc;
    }
  }
}

void mla_scatter_cols(const float* narrow, int64_t R, int64_t w, bool interleave, float* wide, int64_t G, int64_t C,
                      int64_t col) {
#pragma omp parallel for if (R * G * w >= (1 << 15))
  for (int64_t r = 0; r < R; ++r) {
    float* row = wide + r * G * C + col;
    for (int64_t j = 0; j < w; ++j) {
      const int64_t c = mla_rope_perm(j, w, interleave);
      for (int64_t g = 0; g < G; ++g) row[g * C + c] = narrow[r * w + j];
    }
  }
}

}  // namespace am::cpu
