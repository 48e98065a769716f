// MoE routing statistics and HF's load-balancing aux loss, the CPU reference (contracts in src/ops/moe_ops.h;
// raw-pointer API in moe_aux.h). Plain loops; double accumulation; deterministic.
#include "backend/cpu/moe_aux.h"

namespace am::cpu {

void moe_routing_stats(const int32_t* topk_idx, const float* probs, const int32_t* seg, int64_t n, int64_t e,
                       int64_t k, int32_t* counts, int32_t* counts2, float* psum) {
  if (counts || counts2) {
    for (int64_t t = 0; t < n; ++t) {
      if (seg[t] < 0) continue;
      for (int64_t s = 0; s < k; ++s) {
        const int32_t j = topk_idx[t * k + s];
        if (j < 0 || j >= e) continue;
        if (counts) ++counts[j];
        if (counts2) ++counts2[j];
      }
    }
  }
  if (psum) {
    // One running double per expert, continuing from the buffer's value, in token order.
    for (int64_t j = 0; j < e; ++j) {
      double acc = psum[j];
      for (int64_t t = 0; t < n; ++t)
        if (seg[t] >= 0) acc += probs[t * e + j];
      psum[j] = static_cast<float>(acc);
    }
  }
}

void moe_aux_loss(const int32_t* f, const float* psum, const int32_t* seg, int64_t n, int64_t e, int64_t num_layers,
                  float scale, float* aux, float* dprobs) {
  int64_t n_real = 0;
  for (int64_t t = 0; t < n; ++t) n_real += seg[t] >= 0;
  if (n_real == 0) {
    aux[0] = 0.f;
    if (dprobs)
      for (int64_t i = 0; i < n * e; ++i) dprobs[i] = 0.f;
    return;
  }
  const double denom = static_cast<double>(num_layers) * static_cast<double>(n_real);
  double a = 0.0;
  for (int64_t j = 0; j < e; ++j) a += (static_cast<double>(f[j]) / denom) * (static_cast<double>(psum[j]) / denom);
  a *= static_cast<double>(e);
  aux[0] = static_cast<float>(a);
  if (!dprobs) return;
  const float se = scale * static_cast<float>(e);  // fp32, as the host formula scale * E always rounded it
  for (int64_t t = 0; t < n; ++t) {
    float* row = dprobs + t * e;
    if (seg[t] < 0) {
      for (int64_t j = 0; j < e; ++j) row[j] = 0.f;
      continue;
    }
    for (int64_t j = 0; j < e; ++j)
      row[j] = static_cast<float>(static_cast<double>(se) * (static_cast<double>(f[j]) / denom) / denom);
  }
}

}  // namespace am::cpu
