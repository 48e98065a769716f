// Token cross-entropy, torch F.cross_entropy(reduction='sum', ignore_index=-100) semantics, fused with
// its gradient. Per row: m = max_j x_j, lse = m + log sum_j exp(x_j - m) (in double), loss = lse - x_t,
// dlogits_j = grad_scale * (exp(x_j - lse) - [j == t]).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "backend/cpu/cpu_ops.h"

namespace am::cpu {

int64_t first_bad_target(const int32_t* targets, int64_t n, int64_t vocab) {
  for (int64_t i = 0; i < n; ++i)
    if (targets[i] != -100 && (targets[i] < 0 || targets[i] >= vocab)) return i;
  return -1;
}

// logits [N, V], targets [N], dlogits [N, V] or null (may be the same memory as logits: each row is
// fully read before it is overwritten).
double cross_entropy(const float* logits, const int32_t* targets, int64_t n, int64_t vocab, float grad_scale,
                     float* dlogits) {
  // Per-row losses summed serially afterwards: the total does not depend on the thread count.
  std::vector<double> row_loss(static_cast<size_t>(n), 0.0);
#pragma omp parallel for schedule(static) if (n * vocab >= (1 << 15))
  for (int64_t i = 0; i < n; ++i) {
    const float* x = logits + i * vocab;
    float* g = dlogits ? dlogits + i * vocab : nullptr;
    const int32_t t = targets[i];
    if (t == -100 || vocab == 0) {
      if (g) std::memset(g, 0, static_cast<size_t>(vocab) * sizeof(float));
      continue;
    }
    float m = x[0];
    for (int64_t j = 1; j < vocab; ++j) m = std::max(m, x[j]);
    // exp in fp32 (glibc expf is accurate to about 1 ulp; arguments are <= 0), summed in double.
    double l = 0.0;
    for (int64_t j = 0; j < vocab; ++j) l += std::exp(x[j] - m);
    const double lse = m + std::log(l);
    row_loss[static_cast<size_t>(i)] = lse - x[t];
    if (g) {
      // (p_t - 1) in double: avoids cancellation in fp32 when p_t is close to 1.
      for (int64_t j = 0; j < vocab; ++j)
        g[j] = static_cast<float>(grad_scale *
                                  (std::exp(static_cast<float>(x[j] - lse)) - (j == t ? 1.0 : 0.0)));
    }
  }
  double total = 0.0;
  for (double r : row_loss) total += r;
  return total;
}

}  // namespace am::cpu
