// SwiGLU: h = silu(g) * u, silu(g) = g * sigmoid(g).
//   dh/du = silu(g)
//   dh/dg = u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
#include <cmath>

#include "backend/cpu/cpu_ops.h"

namespace am::cpu {
namespace {

// 1 / (1 + e^-g) overflows harmlessly: e^-g = inf for very negative g gives exactly 0.
inline float sigmoid(float g) { return 1.0f / (1.0f + std::exp(-g)); }

}  // namespace

// gate, up, h: n elements
void swiglu_fwd(const float* gate, const float* up, float* h, int64_t n) {
#pragma omp parallel for if (n >= (1 << 15))
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    h[i] = g * sigmoid(g) * up[i];
  }
}

void swiglu_bwd(const float* gate, const float* up, const float* dh, float* dgate, float* dup, int64_t n) {
#pragma omp parallel for if (n >= (1 << 15))
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i], u = up[i], d = dh[i];
    const float sg = sigmoid(g);
    // Computed before the stores so dgate/dup may alias gate/up.
    const float dg = d * u * sg * (1.0f + g * (1.0f - sg));
    const float du = d * g * sg;
    dgate[i] = dg;
    dup[i] = du;
  }
}

}  // namespace am::cpu
