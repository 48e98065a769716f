#include "models/blocks/lora.h"

#include "io/nf4.h"
#include "ops/moe_ops.h"
#include "ops/nf4_ops.h"
#include "ops/ops.h"

namespace am {

namespace {

// The dropout seed of one adapter in the current pass (splitmix64 finaliser of the pass seed and the key).
uint64_t dropout_seed(const LoraAdapter& l) {
  uint64_t z = l.pass->seed ^ (l.key + 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

bool dropping(const LoraAdapter& l) { return l.pass && l.pass->training && l.dropout > 0.f; }

// The LoRA branch's input: x itself, or (dropout "pre" while training) a dropped copy.
Tensor branch_input(const ExecContext& ex, const LoraAdapter& l, const Tensor& x) {
  if (!dropping(l) || l.dropout_post) return x;
  Tensor xd = ex.clone(x);
  ops::dropout_(xd, l.dropout, dropout_seed(l));
  return xd;
}

// s * (xin A^T): [N, r]. The scale is applied to the rank-r intermediate (cheap) instead of the [N, out]
// output; for the power-of-two scales of the usual alpha / r the two are bit-identical. It is the GEMM's alpha
// (LinearOut): on the CPU the same separate scale pass as ops::scale_, on CUDA inside the cuBLASLt GEMM (one
// rounding of the bf16 u, no scale kernel).
Tensor scaled_down(const ExecContext& ex, const LoraAdapter& l, const Tensor& xin) {
  Tensor u = ex.empty({xin.dim(0), l.A->shape[0]});
  ops::linear_fwd(xin, l.A->work, nullptr, u, {.alpha = l.scale});
  return u;
}

}  // namespace

// The branch's adds into y and dx are the GEMMs' accumulate option (LinearOut): on the CPU a temporary plus
// ops::add_'s pass (bit-identical to the separate add), on CUDA beta = 1 in the cuBLASLt GEMM (no [N, out]
// temporary, no add kernel, one rounding). Only dropout on the added term (post: z; pre: dxin) still needs the
// temporary: the mask must see the branch alone.
void lora_fwd_add(const ExecContext& ex, const LoraAdapter& l, const Tensor& x, Tensor& y) {
  const Tensor xin = branch_input(ex, l, x);
  const Tensor u = scaled_down(ex, l, xin);
  if (!(dropping(l) && l.dropout_post)) {
    ops::linear_fwd(u, l.B->work, nullptr, y, {.accumulate = true});  // y += u B^T
    return;
  }
  Tensor z = ex.empty({x.dim(0), l.B->shape[0]});
  ops::linear_fwd(u, l.B->work, nullptr, z);
  ops::dropout_(z, l.dropout, dropout_seed(l));
  ops::add_(y, z);
}

void lora_bwd_add(const ExecContext& ex, const LoraAdapter& l, const Tensor& x, const Tensor& dy, Tensor* dx) {
  // Recompute the branch's input and s * u (same kernels, same mask: identical to forward's).
  const Tensor xin = branch_input(ex, l, x);
  const Tensor u = scaled_down(ex, l, xin);
  Tensor g = dy;  // gradient at B's output
  if (dropping(l) && l.dropout_post) {
    g = ex.clone(dy);
    ops::dropout_(g, l.dropout, dropout_seed(l));
  }
  // z = (s u) B^T:  dB += g^T (s u),  d(s u) = g B,  du = s g B  (s: the dX GEMM's alpha)
  Tensor du = ex.empty({x.dim(0), l.A->shape[0]});
  ops::linear_bwd(u, l.B->work, g, &du, l.B->grad, nullptr, {.alpha = l.scale});
  // u = xin A^T:  dA += du^T xin,  dxin = du A
  if (!dx) {
    ops::linear_bwd(xin, l.A->work, du, nullptr, l.A->grad, nullptr);
    return;
  }
  if (!(dropping(l) && !l.dropout_post)) {
    ops::linear_bwd(xin, l.A->work, du, dx, l.A->grad, nullptr, {.accumulate = true});  // dx += du A
    return;
  }
  Tensor dxin = ex.empty(x.shape());
  ops::linear_bwd(xin, l.A->work, du, &dxin, l.A->grad, nullptr);
  ops::dropout_(dxin, l.dropout, dropout_seed(l));  // same mask and 1/(1-p)
  ops::add_(*dx, dxin);
}

namespace {

// The weight the GEMM reads: the working copy, or (QLoRA) the 4-bit weight dequantised into a scratch
// buffer in the compute dtype, [out, in], freed when the caller drops it (one layer weight at a time).
Tensor compute_weight(const ExecContext& ex, const Param& w) {
  if (!w.nf4) return w.work;
  Tensor W = ex.empty(w.shape);
  ops::nf4_dequantize(*w.nf4, W);
  return W;
}

}  // namespace

void proj_fwd(const ExecContext& ex, const Param& w, const Param* b, const Tensor& x, Tensor& y, bool accumulate) {
  if (accumulate && w.lora && y.device() == DeviceType::CPU) {
    // The CPU reference adds base + branch first, then the sum into y (without a LoRA pair the GEMM's own
    // accumulate below is that temporary + add already).
    Tensor t = ex.empty(y.shape(), y.dtype());
    proj_fwd(ex, w, b, x, t);
    ops::add_(y, t);
    return;
  }
  ops::linear_fwd(x, compute_weight(ex, w), work_or_null(b), y, {.accumulate = accumulate});
  if (w.lora) lora_fwd_add(ex, *w.lora, x, y);
}

void proj_bwd(const ExecContext& ex, const Param& w, Param* b, const Tensor& x, const Tensor& dy, Tensor* dx,
              bool accumulate_dx) {
  if (accumulate_dx && dx && w.lora && dx->device() == DeviceType::CPU) {
    // The CPU reference adds base + branch first, then the sum into dx (the order before the fold; without a LoRA
    // pair the GEMM's own accumulate below is that temporary + add already).
    Tensor t = ex.empty(dx->shape(), dx->dtype());
    proj_bwd(ex, w, b, x, dy, &t);
    ops::add_(*dx, t);
    return;
  }
  // A frozen W has no gradient tensor: linear_bwd then computes dx only. QLoRA dequantises W again (as
  // bitsandbytes' backward does) instead of keeping the bf16 copy from forward.
  Tensor none;
  ops::linear_bwd(x, compute_weight(ex, w), dy, dx, w.nf4 ? none : const_cast<Tensor&>(w.grad), grad_or_null(b),
                  {.accumulate = accumulate_dx});
  if (w.lora) lora_bwd_add(ex, *w.lora, x, dy, dx);
}

// As the dense branch: s is the first GEMM's alpha (and the du GEMM's), the adds into y / dx are the last GEMMs'
// accumulate (LinearOut in moe_ops.h; CPU bit-identical to the separate scale_ / add_, CUDA inside the GEMMs).
void grouped_lora_fwd_add(const ExecContext& ex, const LoraAdapter& l, const Tensor& x, const Tensor& offsets,
                          const std::vector<int64_t>* counts, Tensor& y) {
  const int64_t R = x.dim(0), r = l.A->shape[1];
  Tensor u = ex.empty({R, r});
  ops::grouped_linear_fwd(x, l.A->work, offsets, u, counts, {.alpha = l.scale});
  ops::grouped_linear_fwd(u, l.B->work, offsets, y, counts, {.accumulate = true});
}

void grouped_lora_bwd_add(const ExecContext& ex, const LoraAdapter& l, const Tensor& x, const Tensor& offsets,
                          const std::vector<int64_t>* counts, const Tensor& dy, Tensor* dx) {
  const int64_t R = x.dim(0), r = l.A->shape[1];
  Tensor u = ex.empty({R, r});
  ops::grouped_linear_fwd(x, l.A->work, offsets, u, counts, {.alpha = l.scale});
  Tensor du = ex.empty({R, r});
  ops::grouped_linear_bwd(u, l.B->work, offsets, dy, &du, l.B->grad, counts, {.alpha = l.scale});
  ops::grouped_linear_bwd(x, l.A->work, offsets, du, dx, l.A->grad, counts, {.accumulate = true});
}

}  // namespace am
