// CPU reference of the bf16 AdamW step (adamw_bf16.h has the element math, shared with the CUDA kernel).
#include "backend/cpu/adamw_bf16.h"

#include "backend/cpu/float_io.h"

namespace am::cpu {

void adamw_bf16(const std::vector<AdamWBf16Tensors>& slots, const AdamWBf16Hyper& h) {
  const adamw_bf16::Scalars s = adamw_bf16::scalars_of(h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.step,
                                                       h.decoupled, h.stochastic);
  for (const AdamWBf16Tensors& t : slots) {
    Tensor& w = *t.value;
    Tensor& m = *t.exp_avg;
    Tensor& v = *t.exp_avg_sq;
    const Tensor& g = *t.grad;
    const int64_t n = w.numel();
#pragma omp parallel for if (n > 65536)
    for (int64_t i = 0; i < n; ++i) {
      float wi = load_float(w.raw(), w.dtype(), i), mi = load_float(m.raw(), m.dtype(), i);
      float vi = load_float(v.raw(), v.dtype(), i);
      const uint32_t rnd = s.stochastic ? adamw_bf16::sr_bits(h.seed, t.salt, h.step, i) : 0u;
      adamw_bf16::step(wi, load_float(g.raw(), g.dtype(), i), mi, vi, s, rnd);
      store_float(w.raw(), w.dtype(), i, wi);  // each a bf16 value already: stored exactly
      store_float(m.raw(), m.dtype(), i, mi);
      store_float(v.raw(), v.dtype(), i, vi);
    }
  }
}

}  // namespace am::cpu
