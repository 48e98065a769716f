// GPT-OSS expert ops on CUDA tensors (the same names and semantics as src/ops/gpt_oss_ops.h; run on the context's
// stream, no host synchronisation). The grouped GEMMs themselves are the shared ones of moe.h; these are the
// pieces gpt_oss adds around them: the clamped interleaved SwiGLU and the per-expert biases.
//
// Dtypes: gu / h / dh / dgu bf16 or fp32 (one dtype per call); y / dy bf16 or fp32; bias bf16 or fp32 (the model's
// working copy; need not match y); dbias fp32 (a parameter gradient, ACCUMULATED); offsets [E+1] int32 on the
// device (the dispatch plan's, never read back: rows outside [offsets[0], offsets[E]) are left alone).
// Math fp32, one rounding at each store.
#pragma once

#include "backend/cuda/context.h"
#include "core/tensor.h"

namespace am::cuda {

// gu [M, 2I] (gate = even columns, up = odd) -> h [M, I]:
//   g = min(gate, limit), u = clamp(up, -limit, limit), h = (u + 1) * g * sigmoid(alpha * g)
void gpt_oss_glu_fwd(const Tensor& gu, float alpha, float limit, Tensor& h, CudaContext& ctx = default_context());
// dgu [M, 2I] assigned (may alias gu); zero where the input was clamped (gate > limit, |up| > limit).
void gpt_oss_glu_bwd(const Tensor& gu, const Tensor& dh, float alpha, float limit, Tensor& dgu,
                     CudaContext& ctx = default_context());
// y [R, C] += bias[e] on the rows offsets[e] .. offsets[e+1] of each expert e (bias [E, C]).
void grouped_bias_add(Tensor& y, const Tensor& bias, const Tensor& offsets, CudaContext& ctx = default_context());
// dbias [E, C] fp32 += the column sums of each expert's rows of dy [R, C] (fixed summation order: deterministic).
void grouped_bias_bwd(const Tensor& dy, const Tensor& offsets, Tensor& dbias, CudaContext& ctx = default_context());

}  // namespace am::cuda
