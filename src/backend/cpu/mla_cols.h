// CPU reference of MLA's rope-column ops (contracts in src/ops/mla_ops.h): raw fp32 host pointers, shapes
// checked by the front-end. wide is [R, G, C] row-major, narrow [R, w].
#pragma once
#include <cstdint>

namespace am::cpu {

// Stored column (relative to the rope block) of rope dim j of w: HF's rope_interleave reads [x0, x2, .., x1, x3, ..].
inline int64_t mla_rope_perm(int64_t j, int64_t w, bool interleave) {
  if (!interleave) return j;
  return j < w / 2 ? 2 * j : 2 * (j - w / 2) + 1;
}

// narrow[r, j] = sum_g wide[r, g, col + perm(j)]: fp32, g in increasing order (G = 1: an exact copy).
void mla_gather_cols(const float* wide, int64_t R, int64_t G, int64_t C, int64_t col, bool interleave, int64_t w,
                     float* narrow);
// wide[r, g, col + perm(j)] = narrow[r, j] for every g; the other columns of wide are left as they are.
void mla_scatter_cols(const float* narrow, int64_t R, int64_t w, bool interleave, float* wide, int64_t G, int64_t C,
                      int64_t col);

}  // namespace am::cpu
