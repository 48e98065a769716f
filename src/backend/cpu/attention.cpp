// Causal grouped-query attention, flash-attention style: nothing of size T x T is ever materialised.
//
// Layouts: q [B, T, nh, D], k [B, T, nkv, D], v [B, T, nkv, Dv], out [B, T, nh, Dv], lse [B, nh, T]
// (Dv = head_dim except DeepSeek MLA). Query head h reads
// kv head h / (nh / nkv). Key j is visible to query i iff
//   j <= i                                      (causal)
//   and i - j < window            when window > 0 (sliding window)
//   and seg[i] >= 0 and seg[j] == seg[i]  when segment ids are given (packing; seg < 0 = padding)
// A query row that sees no key gets out = 0 and lse = -inf, and contributes no gradient.
//
// Forward, per (b, h, i): scores s_j = scale q_i.k_j over the visible j (kept in a per-thread buffer of
// length T), then a two-pass softmax: m = max s_j, l = sum exp(s_j - m), lse = m + log l,
// out_i = sum_j exp(s_j - lse) v_j.
//
// Backward recomputes P_ij = exp(s_ij - lse_i) and, with D_i = dout_i . out_i and dP_ij = dout_i . v_j,
// uses dS_ij = P_ij (dP_ij - D_i):
//   dq_i = scale sum_j dS_ij k_j          (one pass over query rows)
//   dk_j = scale sum_{h in group, i} dS_ij q_i,  dv_j = sum_{h in group, i} P_ij dout_i
//                                         (a second pass over key rows)
// Splitting into a query-row pass and a key-row pass recomputes the scores twice but means every thread
// owns the rows it writes: no atomics, no per-thread gradient copies, deterministic results.
//
// Sinks (gpt_oss): head h's logit s_h is one more softmax column without a value: it enters m and l in the
// forward (so lse includes it), and nothing else changes: P_ij = exp(s_ij - lse_i) are already the sinked
// probabilities, and the sink column's own gradient is dS_sink = P_sink (0 - D_i) since it has no value, so
// d s_h = -sum_i exp(s_h - lse_i) D_i. Without sinks every path is unchanged.
//
// Soft-capping (Gemma 2): s_ij = c tanh(scale q_i.k_j / c) replaces the score everywhere (forward and the
// backward's recomputation), and dS_ij gains the factor 1 - tanh^2 before the scale.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "backend/cpu/cpu_ops.h"

namespace am::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Tiny problems (unit tests, finite differences) run serially: a parallel region costs more than they do,
// and far more when the cores are oversubscribed.
inline bool worth_parallel(const AttnDims& p) {
  return p.batch * p.n_heads * p.seq * p.seq * p.head_dim >= (int64_t{1} << 16);
}

inline double dot(const float* a, const float* b, int64_t d) {
  double acc = 0.0;
  for (int64_t x = 0; x < d; ++x) acc += static_cast<double>(a[x]) * b[x];
  return acc;
}

// Index helpers for the [B, T, heads, D] layouts and the [B, nh, T] lse layout. q/k rows are head_dim
// wide, v / out rows Dv = p.dv() wide (DeepSeek MLA: 192 vs 128).
struct Idx {
  const AttnDims& p;
  int64_t q(int64_t b, int64_t t, int64_t h) const { return ((b * p.seq + t) * p.n_heads + h) * p.head_dim; }
  int64_t kv(int64_t b, int64_t t, int64_t h) const {
    return ((b * p.seq + t) * p.n_kv_heads + h) * p.head_dim;
  }
  int64_t o(int64_t b, int64_t t, int64_t h) const { return ((b * p.seq + t) * p.n_heads + h) * p.dv(); }
  int64_t v(int64_t b, int64_t t, int64_t h) const { return ((b * p.seq + t) * p.n_kv_heads + h) * p.dv(); }
  int64_t row(int64_t b, int64_t h, int64_t t) const { return (b * p.n_heads + h) * p.seq + t; }
  int32_t seg(int64_t b, int64_t t) const { return p.segment_ids ? p.segment_ids[b * p.seq + t] : 0; }
  // First key a query at position i may see (causal + sliding window); the segment test is separate.
  int64_t first_key(int64_t i) const {
    return p.sliding_window > 0 ? std::max<int64_t>(0, i - p.sliding_window + 1) : 0;
  }
  // One past the last query that may see key j.
  int64_t last_query_end(int64_t j) const {
    return p.sliding_window > 0 ? std::min(p.seq, j + p.sliding_window) : p.seq;
  }
};

}  // namespace

void attention_fwd(const float* q, const float* k, const float* v, const AttnDims& p, float* out,
                   float* lse) {
  const Idx ix{p};
  const int64_t B = p.batch, T = p.seq, NH = p.n_heads, D = p.head_dim, DV = p.dv();
  const int64_t group = p.n_heads / p.n_kv_heads;
  const bool par = worth_parallel(p);
#pragma omp parallel if (par)
  {
    std::vector<float> s(static_cast<size_t>(T));      // scores of one query row, indexed by key position
    std::vector<double> acc(static_cast<size_t>(DV));  // output accumulator of one query row
#pragma omp for collapse(3) schedule(dynamic, 16)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < NH; ++h)
        for (int64_t i = 0; i < T; ++i) {
          const int64_t kh = h / group;
          const float* qi = q + ix.q(b, i, h);
          float* oi = out + ix.o(b, i, h);
          const int32_t si = ix.seg(b, i);
          const int64_t j0 = ix.first_key(i);
          // Pass 1: scores and their max over the visible keys.
          float m = kNegInf;
          bool any = false;  // not m == -inf: NaN scores must propagate, not look like padding
          if (si >= 0) {
            for (int64_t j = j0; j <= i; ++j) {
              if (ix.seg(b, j) != si) {
                s[j] = kNegInf;
                continue;
              }
              s[j] = softcapped(static_cast<float>(p.scale * dot(qi, k + ix.kv(b, j, kh), D)), p.softcap);
              m = std::max(m, s[j]);
              any = true;
            }
          }
          if (!any) {  // no visible key (padding row)
            std::fill(oi, oi + DV, 0.f);
            lse[ix.row(b, h, i)] = kNegInf;
            continue;
          }
          if (p.sinks) m = std::max(m, p.sinks[h]);
          // Pass 2: normaliser, then the probability-weighted sum of values.
          double l = 0.0;
          for (int64_t j = j0; j <= i; ++j)
            if (s[j] != kNegInf) l += std::exp(static_cast<double>(s[j]) - m);
          if (p.sinks) l += std::exp(static_cast<double>(p.sinks[h]) - m);
          const double L = m + std::log(l);
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int64_t j = j0; j <= i; ++j) {
            if (s[j] == kNegInf) continue;
            const double pj = std::exp(static_cast<double>(s[j]) - L);
            const float* vj = v + ix.v(b, j, kh);
            for (int64_t x = 0; x < DV; ++x) acc[x] += pj * vj[x];
          }
          for (int64_t x = 0; x < DV; ++x) oi[x] = static_cast<float>(acc[x]);
          lse[ix.row(b, h, i)] = static_cast<float>(L);
        }
  }
}

void attention_bwd(const float* q, const float* k, const float* v, const float* out, const float* lse,
                   const float* dout, const AttnDims& p, float* dq, float* dk, float* dv, float* dsinks) {
  const Idx ix{p};
  const int64_t B = p.batch, T = p.seq, NH = p.n_heads, NKV = p.n_kv_heads, D = p.head_dim, DV = p.dv();
  const int64_t group = NH / NKV;
  const bool par = worth_parallel(p);

  // D_i = dout_i . out_i, one per query row: [B, nh, T].
  std::vector<double> Drow(static_cast<size_t>(B * NH * T));
#pragma omp parallel for collapse(3) if (par)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h)
      for (int64_t i = 0; i < T; ++i)
        Drow[ix.row(b, h, i)] = dot(dout + ix.o(b, i, h), out + ix.o(b, i, h), DV);

  // Sink gradients: serial over the [B, nh, T] rows (cheap next to the passes below), deterministic.
  if (p.sinks && dsinks)
    for (int64_t h = 0; h < NH; ++h) {
      double g = 0.0;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < T; ++i) {
          const float L = lse[ix.row(b, h, i)];
          if (L == kNegInf) continue;  // padding: no key seen, no sink either
          g -= std::exp(static_cast<double>(p.sinks[h]) - L) * Drow[ix.row(b, h, i)];
        }
      dsinks[h] += static_cast<float>(g);
    }

        // Pass A: dq, one query row per iteration.
#pragma omp parallel if (par)
  {
    std::vector<double> acc(static_cast<size_t>(D));
#pragma omp for collapse(3) schedule(dynamic, 16)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < NH; ++h)
        for (int64_t i = 0; i < T; ++i) {
          const int64_t kh = h / group;
          const float* qi = q + ix.q(b, i, h);
          const float* gi = dout + ix.o(b, i, h);
          float* dqi = dq + ix.q(b, i, h);
          const int32_t si = ix.seg(b, i);
          const float L = lse[ix.row(b, h, i)];
          std::fill(acc.begin(), acc.end(), 0.0);
          if (si >= 0 && L != kNegInf) {
            const double Di = Drow[ix.row(b, h, i)];
            for (int64_t j = ix.first_key(i); j <= i; ++j) {
              if (ix.seg(b, j) != si) continue;
              const float* kj = k + ix.kv(b, j, kh);
              const float raw = static_cast<float>(p.scale * dot(qi, kj, D));
              const double P = std::exp(static_cast<double>(softcapped(raw, p.softcap)) - L);
              const double dS = P * (dot(gi, v + ix.v(b, j, kh), DV) - Di) * softcap_grad(raw, p.softcap);
              for (int64_t x = 0; x < D; ++x) acc[x] += dS * kj[x];
            }
          }
          for (int64_t x = 0; x < D; ++x) dqi[x] = static_cast<float>(p.scale * acc[x]);
        }
  }

  // Pass B: dk, dv, one key row (of one kv head) per iteration, summing over the query heads of its group
  // and the queries that see it.
#pragma omp parallel if (par)
  {
    std::vector<double> ak(static_cast<size_t>(D)), av(static_cast<size_t>(DV));
#pragma omp for collapse(3) schedule(dynamic, 16)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t kh = 0; kh < NKV; ++kh)
        for (int64_t j = 0; j < T; ++j) {
          const float* kj = k + ix.kv(b, j, kh);
          const float* vj = v + ix.v(b, j, kh);
          const int32_t sj = ix.seg(b, j);
          std::fill(ak.begin(), ak.end(), 0.0);
          std::fill(av.begin(), av.end(), 0.0);
          if (sj >= 0) {
            const int64_t iend = ix.last_query_end(j);
            for (int64_t h = kh * group; h < (kh + 1) * group; ++h)
              for (int64_t i = j; i < iend; ++i) {
                if (ix.seg(b, i) != sj) continue;
                const float L = lse[ix.row(b, h, i)];
                if (L == kNegInf) continue;
                const float* qi = q + ix.q(b, i, h);
                const float* gi = dout + ix.o(b, i, h);
                const float raw = static_cast<float>(p.scale * dot(qi, kj, D));
                const double P = std::exp(static_cast<double>(softcapped(raw, p.softcap)) - L);
                const double dS = P * (dot(gi, vj, DV) - Drow[ix.row(b, h, i)]) * softcap_grad(raw, p.softcap);
                for (int64_t x = 0; x < D; ++x) ak[x] += dS * qi[x];
                for (int64_t x = 0; x < DV; ++x) av[x] += P * gi[x];
              }
          }
          float* dkj = dk + ix.kv(b, j, kh);
          float* dvj = dv + ix.v(b, j, kh);
          for (int64_t x = 0; x < D; ++x) dkj[x] = static_cast<float>(p.scale * ak[x]);
          for (int64_t x = 0; x < DV; ++x) dvj[x] = static_cast<float>(av[x]);
        }
  }
}

}  // namespace am::cpu
