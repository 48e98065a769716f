// Nemotron-H ops on the CPU (fp32 host tensors; a CUDA tensor throws DeviceError): the Mamba2 mixer's
// depthwise causal conv1d + SiLU, its selective scan as the plain sequential recurrence, the grouped gated
// RMSNorm (HF Zamba2RMSNormGated / MambaRMSNormGated with norm_before_gate=False), and relu2.
// Packing: seg [B, T] int32 (Batch::segment_ids, or nullptr = one sequence per row). The conv window and the
// scan state never cross a change of segment id: each packed sample starts from a zero state, exactly as if
// it were alone in its row.
#pragma once
#include "core/tensor.h"

namespace am::ops {

// pre[b,t,c] = bias[c] + sum_{j<K} w[c,j] * x[b, t-K+1+j, c]   (terms with t-K+1+j < 0 or in another segment
// are 0: HF's left zero padding), y = silu(pre). x, pre, y [B, T, C]; w [C, K] or [C, 1, K] (nn.Conv1d
// groups=C); bias [C] or nullptr.
void mamba_conv1d_silu_fwd(const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor* seg, Tensor& pre, Tensor& y);
// dx [B, T, C] (assigned); dw, dbias accumulated (+=) when non-null.
void mamba_conv1d_silu_bwd(const Tensor& x, const Tensor& w, const Tensor& pre, const Tensor* seg, const Tensor& dy,
                           Tensor& dx, Tensor* dw, Tensor* dbias);

// Selective scan per head h (G groups share B/C: head h reads group h / (nh / G)):
//   state_t = exp(dt_t A_h) state_{t-1} + dt_t x_t B_t^T        state [P, S], x_t [P], B_t, C_t [S]
//   y_t = state_t C_t + D_h x_t
// x [B, T, nh, P], dt [B, T, nh] (after softplus / clamp), A [nh] (= -exp(A_log)), Bm, Cm [B, T, G, S],
// D [nh], y [B, T, nh, P]. states (when non-null) receives every state_t [B, T, nh, P, S] for the backward.
void mamba_ssm_scan_fwd(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                        const Tensor& D, const Tensor* seg, Tensor& y, Tensor* states);
// Reverse-mode through the recurrence. dx, ddt, dB, dC assigned; dA, dD [nh] accumulated (+=).
void mamba_ssm_scan_bwd(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                        const Tensor& D, const Tensor* seg, const Tensor& states, const Tensor& dy, Tensor& dx,
                        Tensor& ddt, Tensor& dA, Tensor& dB, Tensor& dC, Tensor& dD);

// g = y * silu(z); out = w * g / sqrt(mean_group(g^2) + eps) over groups of `group` channels.
// y, z, out [N, Din]; w [Din]; rstd [N * Din / group] (saved).
void gated_rmsnorm_fwd(const Tensor& y, const Tensor& z, const Tensor& w, int64_t group, float eps, Tensor& out, Tensor& rstd);
// dy, dz assigned; dw accumulated when defined.
void gated_rmsnorm_bwd(const Tensor& y, const Tensor& z, const Tensor& w, const Tensor& rstd, int64_t group,
                       const Tensor& dout, Tensor& dy, Tensor& dz, Tensor& dw);

// relu2 (transformers ACT2FN["relu2"]): y = relu(x)^2; dx = dy * 2 relu(x).
void relu2_fwd(const Tensor& x, Tensor& y);
void relu2_bwd(const Tensor& x, const Tensor& dy, Tensor& dx);

}  // namespace am::ops
