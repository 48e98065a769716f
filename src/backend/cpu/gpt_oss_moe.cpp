// GPT-OSS expert activation and per-expert biases, CPU reference. Arithmetic in float32 as HF's fp32 run:
//   g = min(gate, L), u = clamp(up, -L, L), s = sigmoid(alpha g), h = (u + 1) * (g * s)
// Backward (d h = dh):
//   du = dh * g * s                      where -L <= up <= L, else 0
//   dg = dh * (u + 1) * (s + alpha g s (1 - s))   where gate <= L, else 0
#include "backend/cpu/gpt_oss_moe.h"

#include <cmath>

namespace am::cpu {

namespace {
inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }
}  // namespace

void gpt_oss_glu_fwd(const float* gu, int64_t m, int64_t i, float alpha, float limit, float* h) {
#pragma omp parallel for if (m * i >= (int64_t{1} << 16))
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < i; ++c) {
      const float gate = gu[r * 2 * i + 2 * c], up = gu[r * 2 * i + 2 * c + 1];
      const float g = std::fmin(gate, limit);
      const float u = std::fmax(std::fmin(up, limit), -limit);
      const float glu = g * sigmoid(g * alpha);
      h[r * i + c] = (u + 1.f) * glu;
    }
}

void gpt_oss_glu_bwd(const float* gu, const float* dh, int64_t m, int64_t i, float alpha, float limit, float* dgu) {
#pragma omp parallel for if (m * i >= (int64_t{1} << 16))
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < i; ++c) {
      const float gate = gu[r * 2 * i + 2 * c], up = gu[r * 2 * i + 2 * c + 1];
      const float g = std::fmin(gate, limit);
      const float u = std::fmax(std::fmin(up, limit), -limit);
      const float s = sigmoid(g * alpha);
      const float d = dh[r * i + c];
      const float dg = d * (u + 1.f) * (s + alpha * g * s * (1.f - s));
      const float du = d * g * s;
      dgu[r * 2 * i + 2 * c] = gate <= limit ? dg : 0.f;
      dgu[r * 2 * i + 2 * c + 1] = (up >= -limit && up <= limit) ? du : 0.f;
    }
}

void grouped_bias_add(float* y, const float* bias, const int32_t* offsets, int64_t n_experts, int64_t c) {
  for (int64_t e = 0; e < n_experts; ++e)
    for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r)
      for (int64_t x = 0; x < c; ++x) y[r * c + x] += bias[e * c + x];
}

void grouped_bias_bwd(const float* dy, const int32_t* offsets, int64_t n_experts, int64_t c, float* dbias) {
  for (int64_t e = 0; e < n_experts; ++e) {
    if (offsets[e + 1] == offsets[e]) continue;
    // Columns in parallel: each thread owns its dbias entries and sums its rows in order (deterministic).
#pragma omp parallel for if ((offsets[e + 1] - offsets[e]) * c >= (int64_t{1} << 16))
    for (int64_t x = 0; x < c; ++x) {
      double acc = 0.0;
      for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) acc += dy[r * c + x];
      dbias[e * c + x] += static_cast<float>(acc);
    }
  }
}

}  // namespace am::cpu
