// CPU reference of the bf16 AdamW step (adamw_bf16.h has the element math, shared with the CUDA kernel).
#include "backend/cpu/adamw_bf16.h"

#include "core/dtype.h"

namespace am::cpu {

namespace {
float load(const Tensor& t, int64_t i) {
  return t.dtype() == DType::BF16 ? bf16_to_f32(t.data<uint16_t>()[i]) : t.data<float>()[i];
}
void store(Tensor& t, int64_t i, float v) {  // v is a bf16 value: its low 16 bits are zero
  if (t.dtype() == DType::BF16) t.data<uint16_t>()[i] = static_cast<uint16_t>(adamw_bf16::bits(v) >> 16);
  else t.data<float>()[i] = v;
}
}  // namespace

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
      float wi = load(w, i), mi = load(m, i), vi = load(v, i);
      const uint32_t rnd = s.stochastic ? adamw_bf16::sr_bits(h.seed, t.salt, h.step, i) : 0u;
      adamw_bf16::step(wi, load(g, i), mi, vi, s, rnd);
      store(w, i, wi);
      store(m, i, mi);
      store(v, i, vi);
    }
  }
}

}  // namespace am::cpu
