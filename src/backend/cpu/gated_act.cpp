// Gated activations of the MLP: h = act(g) * u.
//   SwiGLU: act = silu(g) = g * sigmoid(g)
//     dh/du = silu(g),  dh/dg = u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
//   GeGLU (Gemma, gelu_pytorch_tanh): act = 0.5 g (1 + tanh(k (g + c g^3))), k = sqrt(2/pi), c = 0.044715
//     dh/du = act(g),  dh/dg = u * (0.5 (1 + t) + 0.5 g (1 - t^2) k (1 + 3 c g^2)),  t = tanh(k (g + c g^3))
//   (PyTorch's GeluType::Tanh forward and backward, term for term.)
#include <cmath>

#include "backend/cpu/cpu_ops.h"

namespace am::cpu {
namespace {

// 1 / (1 + e^-g) overflows harmlessly: e^-g = inf for very negative g gives exactly 0.
inline float sigmoid(float g) { return 1.0f / (1.0f + std::exp(-g)); }

// Each activation gives fwd(g) and bwd(g, a, d) -> (dgate, dup) = (a * act'(g), d * act(g)) with a = dh * u, in
// the rounding order of the first implementation (the SwiGLU goldens and the CUDA kernels were matched against it).
// One bwd for both products so SiLU evaluates its sigmoid once (std::exp sets errno, so the compiler cannot merge
// two calls); GeGLU's two tanh arguments round differently (c g g g vs c (g g) g), so it keeps both.
struct Silu {
  static float fwd(float g) { return g * sigmoid(g); }
  static void bwd(float g, float a, float d, float& dgate, float& dup) {
    const float sg = sigmoid(g);
    dgate = a * sg * (1.0f + g * (1.0f - sg));
    dup = d * g * sg;
  }
};

struct GeluTanh {
  static constexpr float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
  static constexpr float kKappa = 0.044715f;
  static float fwd(float g) {
    const float inner = kBeta * (g + kKappa * g * g * g);
    return 0.5f * g * (1.0f + std::tanh(inner));
  }
  static void bwd(float g, float a, float d, float& dgate, float& dup) {
    const float g2 = g * g;
    const float t = std::tanh(kBeta * (g + kKappa * g2 * g));
    dgate = a * (0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * kBeta * (1.0f + 3.0f * kKappa * g2));
    dup = d * fwd(g);
  }
};

template <typename Act>
void gated_fwd(const float* gate, const float* up, float* h, int64_t n) {
#pragma omp parallel for if (n >= (1 << 15))
  for (int64_t i = 0; i < n; ++i) h[i] = Act::fwd(gate[i]) * up[i];
}

template <typename Act>
void gated_bwd(const float* gate, const float* up, const float* dh, float* dgate, float* dup, int64_t n) {
#pragma omp parallel for if (n >= (1 << 15))
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i], u = up[i], d = dh[i];
    // Computed before the stores so dgate/dup may alias gate/up.
    float dg, du;
    Act::bwd(g, d * u, d, dg, du);
    dgate[i] = dg;
    dup[i] = du;
  }
}

// The same element math on a fused [gate | up] row layout: gu [m, 2i] -> h [m, i]; dgu may alias gu.
// One kernel for every activation: swiglu_fused_* (the MoE experts and the stacked gate/up MLP) and
// geglu_fused_* are this template, so each equals its unfused op bit for bit.
template <typename Act>
void gated_fused_fwd(const float* gu, int64_t m, int64_t i, float* h) {
#pragma omp parallel for if (m * i >= (1 << 15))
  for (int64_t r = 0; r < m; ++r) {
    const float* g = gu + r * 2 * i;
    const float* u = g + i;
    float* o = h + r * i;
    for (int64_t c = 0; c < i; ++c) o[c] = Act::fwd(g[c]) * u[c];
  }
}

template <typename Act>
void gated_fused_bwd(const float* gu, const float* dh, int64_t m, int64_t i, float* dgu) {
#pragma omp parallel for if (m * i >= (1 << 15))
  for (int64_t r = 0; r < m; ++r) {
    const float* g = gu + r * 2 * i;
    const float* u = g + i;
    const float* d = dh + r * i;
    float* dg = dgu + r * 2 * i;
    float* du = dg + i;
    for (int64_t c = 0; c < i; ++c) {
      const float gv = g[c], uv = u[c], dv = d[c];
      float a, b;
      Act::bwd(gv, dv * uv, dv, a, b);  // before the stores: dgu may alias gu
      dg[c] = a;
      du[c] = b;
    }
  }
}

}  // namespace

// Soft-capping (not a gated activation, but the same kind of elementwise map): y = c tanh(x / c), dy/dx = 1 - (y/c)^2.
void softcap(float* x, float cap, int64_t n) {
#pragma omp parallel for if (n >= (1 << 15))
  for (int64_t i = 0; i < n; ++i) x[i] = cap * std::tanh(x[i] / cap);
}
void softcap_bwd(const float* y, float* dy, float cap, int64_t n) {
#pragma omp parallel for if (n >= (1 << 15))
  for (int64_t i = 0; i < n; ++i) {
    const float t = y[i] / cap;
    dy[i] *= 1.0f - t * t;
  }
}

void swiglu_fwd(const float* gate, const float* up, float* h, int64_t n) { gated_fwd<Silu>(gate, up, h, n); }
void swiglu_bwd(const float* gate, const float* up, const float* dh, float* dgate, float* dup, int64_t n) {
  gated_bwd<Silu>(gate, up, dh, dgate, dup, n);
}
void geglu_fwd(const float* gate, const float* up, float* h, int64_t n) { gated_fwd<GeluTanh>(gate, up, h, n); }
void geglu_bwd(const float* gate, const float* up, const float* dh, float* dgate, float* dup, int64_t n) {
  gated_bwd<GeluTanh>(gate, up, dh, dgate, dup, n);
}
void swiglu_fused_fwd(const float* gu, int64_t m, int64_t i, float* h) { gated_fused_fwd<Silu>(gu, m, i, h); }
void swiglu_fused_bwd(const float* gu, const float* dh, int64_t m, int64_t i, float* dgu) {
  gated_fused_bwd<Silu>(gu, dh, m, i, dgu);
}
void geglu_fused_fwd(const float* gu, int64_t m, int64_t i, float* h) { gated_fused_fwd<GeluTanh>(gu, m, i, h); }
void geglu_fused_bwd(const float* gu, const float* dh, int64_t m, int64_t i, float* dgu) {
  gated_fused_bwd<GeluTanh>(gu, dh, m, i, dgu);
}

}  // namespace am::cpu
