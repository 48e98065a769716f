// GPT-OSS expert ops (HF GptOssExperts), contracts here, CPU reference in backend/cpu/gpt_oss_moe.cpp (fp32), CUDA
// kernels in backend/cuda/gpt_oss_moe.cu (bf16 or fp32 activations and biases, fp32 dbias, math in fp32).
// Conventions as ops.h / moe_ops.h: every tensor of a call, the offsets included, lives on one device.
//
// One GPT-OSS expert e on its grouped rows x [M_e, H] (W stored as the engine's [E, out, in]):
//   gu = x W_gu[e]^T + b_gu[e]         [M_e, 2I]   columns interleaved as on the hub: gate = 2i, up = 2i + 1
//   h  = gpt_oss_glu(gu)               [M_e, I]
//   y  = h W_down[e]^T + b_down[e]     [M_e, H]    (the routing weight multiplies y, bias included)
#pragma once
#include "core/tensor.h"

namespace am::ops {

// gu [M, 2I] (gate = even columns, up = odd) -> h [M, I] (assigned):
//   g = min(gate, limit), u = clamp(up, -limit, limit), h = (u + 1) * g * sigmoid(alpha * g)
void gpt_oss_glu_fwd(const Tensor& gu, float alpha, float limit, Tensor& h);
// dgu [M, 2I] assigned (may alias gu). As autograd through torch.clamp: zero gradient where the input was clamped (the bound
// itself passes: gate <= limit and -limit <= up <= limit keep their gradient).
void gpt_oss_glu_bwd(const Tensor& gu, const Tensor& dh, float alpha, float limit, Tensor& dgu);

// y [M, C] += bias[e] for the rows of each expert e (offsets [E+1] int32 on the data's device: the dispatch plan's;
// checked on the host, taken as given on CUDA; bias [E, C]).
void grouped_bias_add(Tensor& y, const Tensor& bias, const Tensor& offsets);
// dbias[e] += sum of dy's rows of expert e (dbias [E, C] fp32, ACCUMULATED: a parameter gradient).
void grouped_bias_bwd(const Tensor& dy, const Tensor& offsets, Tensor& dbias);

}  // namespace am::ops
