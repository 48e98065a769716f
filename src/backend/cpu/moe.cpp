// Mixture-of-Experts reference kernels (contracts in src/ops/moe_ops.h, raw-pointer API in cpu_ops.h).
// Plain loops in fp32 with double reductions; the per-expert GEMMs reuse linear_fwd/linear_bwd (OpenBLAS).
// Row-parallel loops write disjoint outputs only (deterministic for any thread count).
// The experts' activation, swiglu_fused_*, is gated_act.cpp's (one kernel for every gated activation).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "backend/cpu/cpu_ops.h"

namespace am::cpu {

void moe_router_fwd(const float* logits, int64_t n, int64_t e, int64_t k, bool norm, float* probs,
                    int32_t* topk_idx, float* topk_w) {
#pragma omp parallel for if (n * e >= (1 << 14))
  for (int64_t t = 0; t < n; ++t) {
    const float* l = logits + t * e;
    float* p = probs + t * e;
    float mx = -INFINITY;
    for (int64_t j = 0; j < e; ++j) mx = std::max(mx, l[j]);
    double sum = 0.0;
    for (int64_t j = 0; j < e; ++j) sum += std::exp(static_cast<double>(l[j]) - mx);
    for (int64_t j = 0; j < e; ++j) p[j] = static_cast<float>(std::exp(static_cast<double>(l[j]) - mx) / sum);
    // k rounds of arg-max over the experts not yet taken; strict '>' keeps the lower index on ties.
    std::vector<char> taken(static_cast<size_t>(e), 0);
    int32_t* idx = topk_idx + t * k;
    float* w = topk_w + t * k;
    double wsum = 0.0;
    for (int64_t s = 0; s < k; ++s) {
      int64_t best = -1;
      for (int64_t j = 0; j < e; ++j)
        if (!taken[static_cast<size_t>(j)] && (best < 0 || p[j] > p[best])) best = j;
      taken[static_cast<size_t>(best)] = 1;
      idx[s] = static_cast<int32_t>(best);
      w[s] = p[best];
      wsum += p[best];
    }
    if (norm)
      for (int64_t s = 0; s < k; ++s) w[s] = static_cast<float>(w[s] / wsum);
  }
}

void moe_router_bwd(const float* probs, const int32_t* topk_idx, const float* topk_w, bool norm,
                    const float* dtopk_w, const float* dprobs_extra, int64_t n, int64_t e, int64_t k,
                    float* dlogits) {
#pragma omp parallel for if (n * e >= (1 << 14))
  for (int64_t t = 0; t < n; ++t) {
    const float* p = probs + t * e;
    const int32_t* idx = topk_idx + t * k;
    const float* w = topk_w + t * k;
    const float* dw = dtopk_w + t * k;
    std::vector<double> dp(static_cast<size_t>(e), 0.0);
    if (dprobs_extra)
      for (int64_t j = 0; j < e; ++j) dp[static_cast<size_t>(j)] = dprobs_extra[t * e + j];
    if (norm) {
      // w_s = p_s / S, S = sum_s p_s  =>  dp_s = (dw_s - sum_r dw_r w_r) / S
      double s_sum = 0.0, c = 0.0;
      for (int64_t s = 0; s < k; ++s) {
        s_sum += p[idx[s]];
        c += static_cast<double>(dw[s]) * w[s];
      }
      for (int64_t s = 0; s < k; ++s) dp[static_cast<size_t>(idx[s])] += (dw[s] - c) / s_sum;
    } else {
      for (int64_t s = 0; s < k; ++s) dp[static_cast<size_t>(idx[s])] += dw[s];
    }
    double dot = 0.0;
    for (int64_t j = 0; j < e; ++j) dot += p[j] * dp[static_cast<size_t>(j)];
    for (int64_t j = 0; j < e; ++j)
      dlogits[t * e + j] = static_cast<float>(p[j] * (dp[static_cast<size_t>(j)] - dot));
  }
}

int64_t moe_first_bad_expert(const int32_t* topk_idx, int64_t nk, int64_t e) {
  for (int64_t i = 0; i < nk; ++i)
    if (topk_idx[i] < 0 || topk_idx[i] >= e) return i;
  return -1;
}

void moe_dispatch_plan(const int32_t* topk_idx, int64_t nk, int64_t e, int64_t* counts, int32_t* offsets,
                       int32_t* perm, int32_t* inv_perm) {
  std::fill(counts, counts + e, int64_t{0});
  for (int64_t i = 0; i < nk; ++i) ++counts[topk_idx[i]];
  offsets[0] = 0;
  for (int64_t j = 0; j < e; ++j) offsets[j + 1] = static_cast<int32_t>(offsets[j] + counts[j]);
  std::vector<int32_t> cursor(offsets, offsets + e);
  for (int64_t i = 0; i < nk; ++i) {
    const int32_t j = cursor[static_cast<size_t>(topk_idx[i])]++;
    perm[j] = static_cast<int32_t>(i);
    inv_perm[i] = j;
  }
}

void moe_gather(const float* x, const int32_t* perm, int64_t n, int64_t k, int64_t h, float* xg) {
  (void)n;
#pragma omp parallel for if (n * k * h >= (1 << 15))
  for (int64_t j = 0; j < n * k; ++j)
    std::memcpy(xg + j * h, x + static_cast<int64_t>(perm[j] / k) * h, static_cast<size_t>(h) * sizeof(float));
}

void moe_gather_bwd(const float* dxg, const int32_t* inv_perm, int64_t n, int64_t k, int64_t h, float* dx) {
#pragma omp parallel for if (n * k * h >= (1 << 15))
  for (int64_t t = 0; t < n; ++t) {
    float* out = dx + t * h;
    for (int64_t c = 0; c < h; ++c) {
      double acc = 0.0;
      for (int64_t s = 0; s < k; ++s) acc += dxg[static_cast<int64_t>(inv_perm[t * k + s]) * h + c];
      out[c] = static_cast<float>(acc);
    }
  }
}

void moe_combine(const float* yg, const int32_t* inv_perm, const float* w, int64_t n, int64_t k, int64_t h,
                 float* y) {
#pragma omp parallel for if (n * k * h >= (1 << 15))
  for (int64_t t = 0; t < n; ++t) {
    float* out = y + t * h;
    for (int64_t c = 0; c < h; ++c) {
      double acc = 0.0;
      for (int64_t s = 0; s < k; ++s)
        acc += static_cast<double>(w[t * k + s]) * yg[static_cast<int64_t>(inv_perm[t * k + s]) * h + c];
      out[c] = static_cast<float>(acc);
    }
  }
}

void moe_combine_bwd(const float* yg, const int32_t* inv_perm, const float* w, const float* dy, int64_t n,
                     int64_t k, int64_t h, float* dyg, float* dw) {
#pragma omp parallel for if (n * k * h >= (1 << 15))
  for (int64_t t = 0; t < n; ++t) {
    const float* g = dy + t * h;
    for (int64_t s = 0; s < k; ++s) {
      const int64_t j = inv_perm[t * k + s];
      const float ws = w[t * k + s];
      const float* row = yg + j * h;
      float* drow = dyg + j * h;
      double dot = 0.0;
      for (int64_t c = 0; c < h; ++c) {
        dot += static_cast<double>(row[c]) * g[c];
        drow[c] = ws * g[c];
      }
      dw[t * k + s] = static_cast<float>(dot);
    }
  }
}

void grouped_linear_fwd(const float* x, const float* w, const int32_t* offsets, int64_t e, int64_t k,
                        int64_t nout, float* y, const LinearOut& yo) {
  for (int64_t j = 0; j < e; ++j) {
    const int64_t r0 = offsets[j], r1 = offsets[j + 1];
    if (r1 > r0) linear_fwd(x + r0 * k, w + j * nout * k, nullptr, y + r0 * nout, r1 - r0, k, nout, yo);
  }
}

void grouped_linear_bwd(const float* x, const float* w, const int32_t* offsets, const float* dy, int64_t e,
                        int64_t k, int64_t nout, float* dx, float* dw, const LinearOut& dxo) {
  if (!dx && !dw) return;
  for (int64_t j = 0; j < e; ++j) {
    const int64_t r0 = offsets[j], r1 = offsets[j + 1];
    if (r1 > r0)
      linear_bwd(x + r0 * k, w + j * nout * k, dy + r0 * nout, dx ? dx + r0 * k : nullptr,
                 dw ? dw + j * nout * k : nullptr, nullptr, r1 - r0, k, nout, dxo);
  }
}

}  // namespace am::cpu
