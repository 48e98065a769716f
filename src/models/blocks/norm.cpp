#include "models/blocks/norm.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "ops/ops.h"

namespace am {

Tensor norm_weight(const ExecContext& ex, const Tensor& w, bool plus_one) {
  if (!plus_one) return w;
  Tensor w1 = ex.empty(w.shape(), DType::F32);
  ops::copy_(w1, w);  // widened first: 1 + w is rounded once, in float32, as in HF
  ops::add_scalar_(w1, 1.0f);
  return w1;
}

namespace {
std::atomic<bool>& fused_add_norm_flag() {
  static std::atomic<bool> on{[] {
    const char* e = std::getenv("AM_FUSED_ADD_NORM");
    // Off by default until bench/gpu/bench_add_norm.cu and a W1 A/B have run on a GPU (docs/cuda_kernels.md).
    return e && (std::strcmp(e, "1") == 0 || std::strcmp(e, "on") == 0 || std::strcmp(e, "true") == 0);
  }()};
  return on;
}
std::atomic<int64_t> g_fused_add_norm_count{0};
}  // namespace

bool fused_add_norm_enabled() { return fused_add_norm_flag().load(); }
void set_fused_add_norm(bool on) { fused_add_norm_flag().store(on); }
void note_fused_add_norm() { g_fused_add_norm_count.fetch_add(1, std::memory_order_relaxed); }
int64_t fused_add_norm_count() { return g_fused_add_norm_count.load(std::memory_order_relaxed); }

}  // namespace am
