// See mamba2_state.h. Heads are independent (each owns its [P, S] block of the state and its [n, P] block of y),
// so they run in parallel with no shared writes; within a head the tokens are sequential by nature.
#include "backend/cpu/mamba2_state.h"

#include <cmath>

namespace am::cpu {

void mamba_ssm_scan_carry(const float* x, const float* dt, const float* A, const float* Bm, const float* Cm,
                          const float* D, const SsmCarryDims& d, float* state, float* y) {
  const int64_t nh = d.nh, P = d.P, S = d.S, G = d.G, heads_per_group = nh / G;
#pragma omp parallel for schedule(static) if (nh * P * S * d.n >= (int64_t{1} << 18))  // a decode step of a small state: serial
  for (int64_t hd = 0; hd < nh; ++hd) {
    const int64_t g = hd / heads_per_group;
    float* h = state + hd * P * S;  // this head's state [P, S]
    for (int64_t t = 0; t < d.n; ++t) {
      const float dtv = dt[t * nh + hd];
      const float a = std::exp(dtv * A[hd]);  // decay of the carried state over this token
      const float* xt = x + (t * nh + hd) * P;
      const float* Bt = Bm + (t * G + g) * S;
      const float* Ct = Cm + (t * G + g) * S;
      for (int64_t p = 0; p < P; ++p) {
        const float dx = dtv * xt[p];
        float* hp = h + p * S;
        double acc = 0.0;
        for (int64_t s = 0; s < S; ++s) {
          hp[s] = a * hp[s] + dx * Bt[s];
          acc += static_cast<double>(hp[s]) * Ct[s];
        }
        y[(t * nh + hd) * P + p] = static_cast<float>(acc) + D[hd] * xt[p];
      }
    }
  }
}

}  // namespace am::cpu
