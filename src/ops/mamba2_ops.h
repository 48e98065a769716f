// Nemotron-H ops: the Mamba2 mixer's depthwise causal conv1d + SiLU, its selective scan as the plain sequential
// recurrence, the grouped gated RMSNorm (HF Zamba2RMSNormGated / MambaRMSNormGated with norm_before_gate=False),
// the dt chain (softplus + clamp), A = -exp(A_log), and relu2.
//
// Devices and dtypes. CPU: float32 host tensors only (the reference: plain loops in mamba2_ops.cpp). CUDA
// (src/backend/cuda/mamba2.cu): the activations marked T below are bf16 or fp32, one dtype per call; weights marked
// W are bf16 or fp32 (the model passes its fp32 master copies); dt, A, D, rstd and every parameter gradient are
// fp32. All math is fp32 on both devices (the CPU accumulates some sums in double). Every tensor of a call lives on
// one device (the segment ids too); a mismatch throws DeviceError, a wrong shape ShapeError naming the op.
//
// Packing: seg [B, T] int32 (Batch::segment_ids, or nullptr = one sequence per row). The conv window and the
// scan state never cross a change of segment id: each packed sample starts from a zero state, exactly as if
// it were alone in its row.
//
// Conventions as ops.h: parameter gradients ACCUMULATE (+=), activation gradients ASSIGN (=).
#pragma once
#include "core/tensor.h"

namespace am::ops {

// pre[b,t,c] = bias[c] + sum_{j<K} w[c,j] * x[b, t-K+1+j, c]   (terms with t-K+1+j < 0 or in another segment
// are 0: HF's left zero padding), y = silu(pre). x, pre, y [B, T, C] (T); w [C, K] or [C, 1, K] (nn.Conv1d
// groups=C) (W); bias [C] (W) or nullptr. CUDA: K <= 8.
void mamba_conv1d_silu_fwd(const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor* seg, Tensor& pre, Tensor& y);
// dx [B, T, C] (T, assigned); dw [C, K], dbias [C] (fp32) accumulated (+=) when non-null.
void mamba_conv1d_silu_bwd(const Tensor& x, const Tensor& w, const Tensor& pre, const Tensor* seg, const Tensor& dy,
                           Tensor& dx, Tensor* dw, Tensor* dbias);

// Selective scan per head h (G groups share B/C: head h reads group h / (nh / G)):
//   state_t = exp(dt_t A_h) state_{t-1} + dt_t x_t B_t^T        state [P, S], x_t [P], B_t, C_t [S]
//   y_t = state_t C_t + D_h x_t
// x [B, T, nh, P] (T), dt [B, T, nh] fp32 (after softplus / clamp), A [nh] fp32 (= -exp(A_log)), Bm, Cm
// [B, T, G, S] (T), D [nh] fp32, y [B, T, nh, P] (T). states (when non-null) receives every state_t
// [B, T, nh, P, S] fp32 (B * T * nh * P * S values: tests and small shapes only; the model never asks for it).
// CUDA: P <= 128, S <= 256.
void mamba_ssm_scan_fwd(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                        const Tensor& D, const Tensor* seg, Tensor& y, Tensor* states);
// The same scan for one sequence (B = 1, no segments) over n tokens, starting from `state` [nh, P, S] and leaving
// the state after the last token in it (generate's Mamba2 state cache, models/blocks/mamba2.h). x [n, nh, P],
// dt [n, nh], A [nh], Bm / Cm [n, G, S], D [nh], y [n, nh, P]: host fp32 only (DeviceError otherwise: no
// state-carrying CUDA kernel yet), ShapeError on a shape mismatch. From a zero state, y and the final state equal
// mamba_ssm_scan_fwd's y and last per-step state bit for bit (backend/cpu/mamba2_state.h).
void mamba_ssm_scan_carry(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                          const Tensor& D, Tensor& state, Tensor& y);
// Reverse-mode through the recurrence. dx, dB, dC (T) and ddt (fp32) assigned; dA, dD [nh] fp32 accumulated (+=).
// `states`: the forward's per-step states, or an undefined Tensor, and then the states are recomputed from the
// inputs (what the model does: keeping [B, T, nh, P, S] is out of reach at real sizes). The CPU uses given
// states; CUDA always recomputes them (a defined `states` is not read; see backend/cuda/mamba2.h for how the
// backward avoids storing per-step states at all). dB / dC on CUDA sum over the heads of a group with fp32
// atomics when nh > G (rounding may then differ from run to run in the last bit).
void mamba_ssm_scan_bwd(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                        const Tensor& D, const Tensor* seg, const Tensor& states, const Tensor& dy, Tensor& dx,
                        Tensor& ddt, Tensor& dA, Tensor& dB, Tensor& dC, Tensor& dD);

// g = y * silu(z); out = w * g / sqrt(mean_group(g^2) + eps) over groups of `group` channels.
// y, z, out [N, Din] (T); w [Din] (W); rstd [N * Din / group] fp32 (saved).
void gated_rmsnorm_fwd(const Tensor& y, const Tensor& z, const Tensor& w, int64_t group, float eps, Tensor& out, Tensor& rstd);
// dy, dz (T) assigned; dw (fp32) accumulated when defined.
void gated_rmsnorm_bwd(const Tensor& y, const Tensor& z, const Tensor& w, const Tensor& rstd, int64_t group,
                       const Tensor& dout, Tensor& dy, Tensor& dz, Tensor& dw);

// The dt chain of the mixer (HF torch_forward): dt_in = dt_raw + dt_bias, dt = min(max(softplus(dt_in), lo), hi)
// with torch's softplus (beta 1, threshold 20: x > 20 -> x). dt_raw [N, nh] (T), dt_bias [nh] (W), dt_in, dt
// [N, nh] fp32 (dt_in saved for the backward). hi may be +inf.
void mamba_dt_fwd(const Tensor& dt_raw, const Tensor& dt_bias, float lo, float hi, Tensor& dt_in, Tensor& dt);
// ddt_raw [N, nh] (T) assigned = ddt * softplus'(dt_in) where lo <= softplus(dt_in) <= hi (torch.clamp's
// gradient), else 0; ddt_bias [nh] fp32 accumulated with its column sums when non-null.
void mamba_dt_bwd(const Tensor& dt_in, const Tensor& ddt, float lo, float hi, Tensor& ddt_raw, Tensor* ddt_bias);

// A = -exp(A_log): A_log [nh] (W), A [nh] fp32. Backward: dA_log [nh] fp32 += dA * A.
void mamba_a_log_fwd(const Tensor& A_log, Tensor& A);
void mamba_a_log_bwd(const Tensor& A, const Tensor& dA, Tensor& dA_log);

// relu2 (transformers ACT2FN["relu2"]): y = relu(x)^2; dx = dy * 2 relu(x). x, y, dy, dx (T), same numel.
void relu2_fwd(const Tensor& x, Tensor& y);
void relu2_bwd(const Tensor& x, const Tensor& dy, Tensor& dx);

}  // namespace am::ops
