// One element of torch.optim.AdamW / Adam over bf16 parameters, gradients and state (SPEC "Precision",
// model.dtype: bfloat16), shared by the CPU reference (train/optimizer.cpp) and the CUDA kernel
// (backend/cuda/optimizer.cu) so both round identically: integer bit operations for bf16 rounding, and on the
// device the _rn intrinsics, so no fused multiply-add changes a rounding on one side only.
//
// Default (stochastic = false): torch's single-tensor AdamW (foreach=False) on bf16 tensors, where every
// in-place op computes in fp32 and rounds its result to bf16 (round to nearest even):
//   param.mul_(1 - lr * wd)                                   (AdamW; Adam adds wd * param to the gradient)
//   exp_avg.lerp_(grad, 1 - beta1)
//   exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
//   denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
//   param.addcdiv_(exp_avg, denom, value=-step_size)
// Stochastic rounding (optimizer.stochastic_rounding: true): the same update in fp32 from the bf16 inputs with
// no intermediate rounding; exp_avg and exp_avg_sq round to nearest, the new parameter rounds stochastically
// (up with probability equal to the discarded fraction), so updates smaller than half a bf16 ulp survive in
// expectation instead of vanishing. The random bits are a pure function of (seed, element), see sr_bits.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "backend/cpu/dropout_mask.h"  // AM_HOST_DEVICE, splitmix64
#include "core/adamw_params.h"

namespace am::adamw_bf16 {

#if defined(__CUDA_ARCH__)
AM_HOST_DEVICE float mul(float a, float b) { return __fmul_rn(a, b); }
AM_HOST_DEVICE float add(float a, float b) { return __fadd_rn(a, b); }
AM_HOST_DEVICE float sub(float a, float b) { return __fsub_rn(a, b); }
AM_HOST_DEVICE float div(float a, float b) { return __fdiv_rn(a, b); }
AM_HOST_DEVICE float sqrt_(float a) { return __fsqrt_rn(a); }
AM_HOST_DEVICE uint32_t bits(float f) { return __float_as_uint(f); }
AM_HOST_DEVICE float from_bits(uint32_t u) { return __uint_as_float(u); }
#else
// Separate statements with volatile-free plain operators: x86-64 without -mfma never contracts them.
AM_HOST_DEVICE float mul(float a, float b) { return a * b; }
AM_HOST_DEVICE float add(float a, float b) { return a + b; }
AM_HOST_DEVICE float sub(float a, float b) { return a - b; }
AM_HOST_DEVICE float div(float a, float b) { return a / b; }
AM_HOST_DEVICE float sqrt_(float a) { return std::sqrt(a); }
AM_HOST_DEVICE uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
AM_HOST_DEVICE float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
#endif

// fp32 -> the nearest bf16 value (ties to even), returned as fp32; NaN stays NaN (as am::f32_to_bf16).
AM_HOST_DEVICE float round_rne(float f) {
  uint32_t u = bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return from_bits((u | 0x00400000u) & 0xffff0000u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return from_bits(u & 0xffff0000u);
}

// fp32 -> bf16 rounding up (away from zero in magnitude) with probability (discarded bits) / 2^16: add 16
// random bits below the kept ones and truncate. Infinities and NaN round to nearest (never carried into).
AM_HOST_DEVICE float round_stochastic(float f, uint32_t rnd16) {
  const uint32_t u = bits(f);
  if ((u & 0x7f800000u) == 0x7f800000u) return round_rne(f);
  const uint32_t r = u + (rnd16 & 0xffffu);
  // A carry into the exponent that would make a finite value infinite falls back to truncation.
  if ((r & 0x7f800000u) == 0x7f800000u) return from_bits(u & 0xffff0000u);
  return from_bits(r & 0xffff0000u);
}

// The random bits of element i of the tensor whose salt is `salt` (a hash of its name) at optimizer step `step`:
// independent of how the work is split into launches or threads, so the CPU and the GPU draw the same.
AM_HOST_DEVICE uint32_t sr_bits(uint64_t seed, uint64_t salt, int64_t step, int64_t i) {
  const uint64_t s = dropout_mask::splitmix64(seed ^ salt, static_cast<uint64_t>(step));
  return static_cast<uint32_t>(dropout_mask::splitmix64(s, static_cast<uint64_t>(i)) >> 48);
}

struct Scalars {
  float omb1, b2, omb2, step_size, bc2_sqrt, eps, decay, wd;
  int has_wd, decoupled, stochastic;
};

// The fp32 scalars of step h, rounded from doubles as torch passes Python floats (train/optimizer.cpp's fp32
// path does the same).
inline Scalars scalars_of(double lr, double beta1, double beta2, double eps, double wd, int64_t step, bool decoupled,
                          bool stochastic) {
  Scalars s{};
  s.omb1 = static_cast<float>(1.0 - beta1);
  s.b2 = static_cast<float>(beta2);
  s.omb2 = static_cast<float>(1.0 - beta2);
  s.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, static_cast<double>(step))));
  s.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  s.eps = static_cast<float>(eps);
  s.decay = static_cast<float>(1.0 - lr * wd);
  s.wd = static_cast<float>(wd);
  s.has_wd = wd != 0.0;
  s.decoupled = decoupled;
  s.stochastic = stochastic;
  return s;
}

// w, m, v: the bf16 values (as fp32) in and out; g: the bf16 gradient (as fp32); rnd16: sr_bits of the element.
AM_HOST_DEVICE void step(float& w, float g, float& m, float& v, const Scalars& s, uint32_t rnd16) {
  if (!s.stochastic) {
    if (s.has_wd) {
      if (s.decoupled) w = round_rne(mul(w, s.decay));
      else g = round_rne(add(g, mul(s.wd, w)));  // grad.add(param, alpha=wd): a new bf16 tensor
    }
    m = round_rne(add(m, mul(s.omb1, sub(g, m))));  // lerp with weight < 0.5: self + weight * (end - self)
    v = round_rne(mul(v, s.b2));
    v = round_rne(add(v, mul(s.omb2, mul(g, g))));  // CUDA addcmul: a + alpha * (b * c)
    float d = round_rne(sqrt_(v));
    d = round_rne(div(d, s.bc2_sqrt));
    d = round_rne(add(d, s.eps));
    w = round_rne(add(w, mul(-s.step_size, div(m, d))));  // CUDA addcdiv: a + alpha * (b / c)
    return;
  }
  float w32 = w;
  if (s.has_wd) {
    if (s.decoupled) w32 = mul(w32, s.decay);
    else g = add(g, mul(s.wd, w32));
  }
  const float m32 = add(m, mul(s.omb1, sub(g, m)));
  const float v32 = add(mul(v, s.b2), mul(s.omb2, mul(g, g)));
  const float d = add(div(sqrt_(v32), s.bc2_sqrt), s.eps);
  w32 = add(w32, mul(-s.step_size, div(m32, d)));
  m = round_rne(m32);
  v = round_rne(v32);
  w = round_stochastic(w32, rnd16);
}

}  // namespace am::adamw_bf16

namespace am::cpu {
// The host loop over host tensors (value fp32 or bf16; grad and state bf16), checked by ops::adamw_bf16_step.
void adamw_bf16(const std::vector<AdamWBf16Tensors>& slots, const AdamWBf16Hyper& h);
}  // namespace am::cpu
