// Rotary position embedding, HF rotate_half convention: feature i pairs with i + R/2 (not i with i+1).
// For each token and head, with c = cos[i], s = sin[i], i < R/2:
//   forward:  (a, b) -> (a c - b s,  b c + a s)          rotation by +theta
//   backward: (a, b) -> (a c + b s,  b c - a s)          its transpose (rotation by -theta)
// Features at index >= R pass through unchanged (partial rotary).
#include "backend/cpu/cpu_ops.h"

namespace am::cpu {
namespace {

// x [N, heads, D], cos/sin [N, R/2]; sign = +1 forward, -1 backward.
void rotate(float* x, const float* cos, const float* sin, int64_t n, int64_t heads, int64_t d, int64_t half,
            float sign) {
#pragma omp parallel for if (n * heads * d >= (1 << 15))
  for (int64_t t = 0; t < n; ++t) {
    const float* c = cos + t * half;
    const float* s = sin + t * half;
    for (int64_t hd = 0; hd < heads; ++hd) {
      float* xh = x + (t * heads + hd) * d;
      for (int64_t i = 0; i < half; ++i) {
        const float a = xh[i], b = xh[i + half];
        const float si = sign * s[i];
        xh[i] = a * c[i] - b * si;
        xh[i + half] = b * c[i] + a * si;
      }
    }
  }
}

}  // namespace

void rope_fwd(float* x, const float* cos, const float* sin, int64_t n, int64_t heads, int64_t d,
              int64_t rot_half) {
  rotate(x, cos, sin, n, heads, d, rot_half, 1.0f);
}

void rope_bwd(float* dx, const float* cos, const float* sin, int64_t n, int64_t heads, int64_t d,
              int64_t rot_half) {
  rotate(dx, cos, sin, n, heads, d, rot_half, -1.0f);
}

// One token's head at a time: the rotation of rotate() above, term for term (so bit-identical to a copy
// followed by rope_fwd / rope_bwd), from src to dst; the unrotated features are copied.
void qkv_rope_pack(float* packed, float* q, float* k, float* v, const float* cos, const float* sin, int64_t n,
                   int64_t nh, int64_t nkv, int64_t d, int64_t half, bool merge) {
  const int64_t slots = nh + 2 * nkv;
  const float sign = merge ? -1.0f : 1.0f;
#pragma omp parallel for if (n * slots * d >= (1 << 15))
  for (int64_t t = 0; t < n; ++t) {
    const float* c = cos ? cos + t * half : nullptr;
    const float* s = sin ? sin + t * half : nullptr;
    for (int64_t slot = 0; slot < slots; ++slot) {
      float* p = packed + (t * slots + slot) * d;
      float* x = slot < nh         ? q + (t * nh + slot) * d
                 : slot < nh + nkv ? k + (t * nkv + slot - nh) * d
                                   : v + (t * nkv + slot - nh - nkv) * d;
      const float* src = merge ? x : p;
      float* dst = merge ? p : x;
      const int64_t r = half > 0 && slot < nh + nkv ? half : 0;
      for (int64_t i = 0; i < r; ++i) {
        const float a = src[i], b = src[i + half];
        const float si = sign * s[i];
        dst[i] = a * c[i] - b * si;
        dst[i + half] = b * c[i] + a * si;
      }
      for (int64_t i = 2 * r; i < d; ++i) dst[i] = src[i];
    }
  }
}

}  // namespace am::cpu
