// CPU reference of attention over a KV cache (src/ops/kv_attention.h). Per (b, h, i) it does exactly what
// attention.cpp's forward does for one query row: scores scale * (q_i . k_j) with the dot product in double
// and stored as float, max, a double sum of exp(s_j - m), lse = m + log(l), then sum_j exp(s_j - lse) v_j in
// double. So a cached decode step sees the same numbers the full causal forward computes for that row
// (tests/unit/test_generate.cpp checks it), only the visible key range is offset by Tk - Tq.
#include "backend/cpu/kv_attention.h"

#include "backend/cpu/cpu_ops.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace am::cpu {

void attention_kv_fwd(const float* q, const float* k, const float* v, const KvAttnDims& p, float* out) {
  const int64_t B = p.batch, Tq = p.q_len, Tk = p.kv_len, NH = p.n_heads, NKV = p.n_kv_heads, D = p.head_dim;
  const int64_t DV = p.v_head_dim > 0 ? p.v_head_dim : D;
  const int64_t group = NH / NKV, offset = Tk - Tq;
  // One decode step of a small model is microseconds of work: a parallel region only pays from a few
  // hundred thousand multiply-adds up.
  const bool par = B * NH * Tq * Tk * D >= (int64_t{1} << 16);
#pragma omp parallel if (par)
  {
    std::vector<float> s(static_cast<size_t>(Tk));
    std::vector<double> acc(static_cast<size_t>(DV));
#pragma omp for collapse(3) schedule(dynamic, 4)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < NH; ++h)
        for (int64_t i = 0; i < Tq; ++i) {
          const int64_t kh = h / group, pos = offset + i;
          const int64_t j0 = p.sliding_window > 0 ? std::max<int64_t>(0, pos - p.sliding_window + 1) : 0;
          const float* qi = q + ((b * Tq + i) * NH + h) * D;
          float* oi = out + ((b * Tq + i) * NH + h) * DV;
          auto krow = [&](const float* base, int64_t j) { return base + ((b * Tk + j) * NKV + kh) * D; };
          auto vrow = [&](int64_t j) { return v + ((b * Tk + j) * NKV + kh) * DV; };
          float m = -std::numeric_limits<float>::infinity();
          for (int64_t j = j0; j <= pos; ++j) {
            double d = 0.0;
            const float* kj = krow(k, j);
            for (int64_t x = 0; x < D; ++x) d += static_cast<double>(qi[x]) * kj[x];
            s[static_cast<size_t>(j)] = softcapped(static_cast<float>(p.scale * d), p.softcap);
            m = std::max(m, s[static_cast<size_t>(j)]);
          }
          if (p.sinks) m = std::max(m, p.sinks[h]);  // as attention.cpp: the sink joins max and normaliser
          double l = 0.0;
          for (int64_t j = j0; j <= pos; ++j) l += std::exp(static_cast<double>(s[static_cast<size_t>(j)]) - m);
          if (p.sinks) l += std::exp(static_cast<double>(p.sinks[h]) - m);
          const double L = m + std::log(l);
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int64_t j = j0; j <= pos; ++j) {
            const double pj = std::exp(static_cast<double>(s[static_cast<size_t>(j)]) - L);
            const float* vj = vrow(j);
            for (int64_t x = 0; x < DV; ++x) acc[static_cast<size_t>(x)] += pj * vj[x];
          }
          for (int64_t x = 0; x < DV; ++x) oi[x] = static_cast<float>(acc[static_cast<size_t>(x)]);
        }
  }
}

}  // namespace am::cpu
