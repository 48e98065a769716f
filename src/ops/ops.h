// Op front-ends: each op's contract (shapes, what forward saves for backward) lives here; the body
// dispatches on the tensors' device to a backend (backend/cpu is the reference, backend/cuda the product).
//
// Conventions (DESIGN.md): row-major; Linear.weight is [out, in]; parameter gradients ACCUMULATE (+=),
// activation gradients ASSIGN (=). All float tensors here are float32 on the host unless the CUDA
// backend says otherwise; integer index tensors are int32.
//
// A weight gradient passed undefined is not computed: frozen weights (LoRA base weights, whose
// Param::grad is an undefined Tensor) skip their weight-gradient GEMM / reduction entirely (no work, no
// accumulation), while the activation gradients are still computed. This holds for every backward op
// here taking a weight gradient (embedding_bwd, linear_bwd, rmsnorm_bwd) and for grouped_linear_bwd in
// moe_ops.h, on every backend (am::cuda::linear_bwd, rmsnorm_bwd[_tuned] and grouped_linear_bwd accept an
// undefined dw too).
#pragma once
#include <cstdint>

#include "core/attn_params.h"
#include "core/linear_out.h"
#include "core/tensor.h"

namespace am::ops {

// ---------------- elementwise ----------------
void add_(Tensor& a, const Tensor& b);               // a += b (same numel)
void scale_(Tensor& a, float s);                     // a *= s
void add_scalar_(Tensor& a, float s);                // a += s (Gemma's (1 + w) norm weights)
void copy_(Tensor& dst, const Tensor& src);          // dst = src
void zero_(Tensor& a);                               // a = 0 (any dtype)
// A block of columns between 2-D row-major tensors of one dtype (the parts of a fused projection, e.g. Phi-3's
// qkv_proj output [N, q | k | v]): dst[:, dst_col + j] = src[:, src_col + j] for j < n. dst [R, Cd], src [R, Cs].
void copy_cols_(Tensor& dst, int64_t dst_col, const Tensor& src, int64_t src_col, int64_t n);

// Dropout in place (LoRA dropout), any float dtype (F32 / BF16 / F16 on both backends), math in fp32 and
// one rounding at the store:  x[i] = keep(seed, i) ? x[i] * (1 / (1 - p)) : 0,  where i is the flat
// element index within x (a view counts from its own first element), 1 / (1 - p) is computed once in
// fp32, and
//   keep(seed, i) = (splitmix64(seed, i) >> 40) * 2^-24 >= p        (24-bit uniform in [0, 1), in fp32)
//   splitmix64(seed, i) = mix(seed + (i + 1) * 0x9E3779B97F4A7C15)  (the i-th output of a splitmix64
//   stream seeded with `seed`; mix: z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27;
//   z *= 0x94D049BB133111EB; z ^= z >> 31; all mod 2^64).
// The mask is a pure function of (seed, i): the same bits on CPU and CUDA, for any launch shape, and
// recomputable in the backward, which is dropout_ of the gradient with the same seed and p.
// p == 0: no-op. p outside [0, 1) (or NaN): UsageError naming the op.
void dropout_(Tensor& x, float p, uint64_t seed);

// ---------------- embedding ----------------
// ids [N] int32 in [0, V), weight [V, H] -> out [N, H]. Throws DataError naming the id if out of range.
void embedding_fwd(const Tensor& ids, const Tensor& weight, Tensor& out);
// dweight[ids[i]] += dout[i]; dweight undefined (frozen embedding): nothing to do
void embedding_bwd(const Tensor& ids, const Tensor& dout, Tensor& dweight);

// ---------------- linear ----------------
// How y / dx are written (core/linear_out.h): LinearOut{.alpha = s} scales the product, {.accumulate = true}
// adds it to the tensor's contents instead of assigning. Default {}: assigned, unscaled.
using am::LinearOut;
// x [N, K], w [M, K], bias [M] (nullptr: none) -> y [N, M] = yo.alpha * x w^T + b (+ y when yo.accumulate).
// The options fold what would be ops::scale_(y, alpha) and ops::add_(y, product) into the GEMM: on the CPU
// bit-identical to those separate calls (same passes, same order); on CUDA alpha and beta = 1 run inside the
// one cuBLASLt GEMM, fp32 accumulation rounded once to y's dtype (bf16: slightly more accurate than the
// separate kernels, which round twice; no extra launches, no [N, M] temporary). Accumulation takes y of any
// float dtype on CUDA (e.g. an fp32 y with bf16 x / w).
void linear_fwd(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y, const LinearOut& yo = {});
// dx = dxo.alpha * dy w (assigned, or added to dx with dxo.accumulate; skipped when dx is nullptr), dw += dy^T x
// (skipped when dw is undefined: frozen weight), dbias += sum_rows(dy) (when non-null). dxo as linear_fwd's yo.
void linear_bwd(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor* dx, Tensor& dw, Tensor* dbias,
                const LinearOut& dxo = {});

// ---------------- RMSNorm (HF LlamaRMSNorm semantics) ----------------
// x [N, H], w [H] -> y [N, H] = w * x * rstd, rstd [N] = 1/sqrt(mean(x^2) + eps) (saved)
void rmsnorm_fwd(const Tensor& x, const Tensor& w, float eps, Tensor& y, Tensor& rstd);
// dx assigned, dw accumulated (dw undefined: frozen weight, the dw reduction is skipped)
void rmsnorm_bwd(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, Tensor& dx, Tensor& dw);

// ---------------- residual add + RMSNorm, fused (the pre-norm decoder step; docs/cuda_kernels.md) ----------------
// x_out [N, H] = x + delta, then rmsnorm_fwd(x_out, w, eps, y, rstd), in one pass over the rows. x_out is x (in
// place) or does not overlap it or delta. Bit-identical, on each backend, to the separate
//   copy_(x_out, x); add_(x_out, delta); rmsnorm_fwd(x_out, w, eps, y, rstd)
// (the adds round to x_out's dtype first; the norm reads the rounded x_out). Dtypes: CPU x / x_out / w / y / rstd
// fp32, delta any float; CUDA as rmsnorm_fwd for x (= x_out) / w / y, delta x's dtype or bf16 (the bf16 block output
// added to an fp32 residual stream). w: pass 1 + w for Gemma's zero-centred norms, as for rmsnorm_fwd
// (models/blocks/norm.h).
void add_rmsnorm_fwd(const Tensor& x, const Tensor& delta, const Tensor& w, float eps, Tensor& x_out, Tensor& y,
                     Tensor& rstd);
// Its backward at the residual stream: dx = dres + (rmsnorm_bwd's dx), assigned (dx must not overlap dres); dw
// accumulated as in rmsnorm_bwd (undefined: frozen weight). x is the norm's input (the forward's x_out); dres the
// gradient reaching x_out from its other use (the residual path), in dx's dtype; dx is then the gradient of both x
// and delta of the forward. Bit-identical to rmsnorm_bwd(x, w, rstd, dy, dx, dw); add_(dx, dres).
void add_rmsnorm_bwd(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, const Tensor& dres,
                     Tensor& dx, Tensor& dw);

// ---------------- RoPE (HF rotate_half convention) ----------------
// x [N, heads, D] in place; cos, sin [N, D/2] per token (already include attention_scaling).
// out[i] = x[i] c[i] - x[i+D/2] s[i];  out[i+D/2] = x[i+D/2] c[i] + x[i] s[i]
void rope_fwd_(Tensor& x, const Tensor& cos, const Tensor& sin);
// gradient of the above, in place on dx (the transpose rotation)
void rope_bwd_(Tensor& dx, const Tensor& cos, const Tensor& sin);

// ---------------- fused q/k/v projection output (blocks/attention.cpp, docs/fused_projections.md) ----------------
// The output of one GEMM on the row-stacked [Wq; Wk; Wv] weights, qkv [N, (nh + 2 nkv) D] with rows q | k | v,
// split into q [N, nh, D], k [N, nkv, D], v [N, nkv, D] (assigned), q and k rotated on the way exactly as
// rope_fwd_ does when cos and sin ([N, R/2], R <= D) are given; nullptr: copied as they are (q/k-norm families
// rotate after their norm). Bit-identical to column copies + rope_fwd_; one pass instead of five.
void qkv_split_rope(const Tensor& qkv, const Tensor* cos, const Tensor* sin, Tensor& q, Tensor& k, Tensor& v);
// Its backward: dqkv [N, (nh + 2 nkv) D] = [rope_bwd(dq) | rope_bwd(dk) | dv] (assigned; without cos / sin no
// rotation), dq / dk / dv unchanged. Feeds the stacked weight's one dX GEMM and one dW GEMM.
void qkv_merge_rope_bwd(const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor* cos, const Tensor* sin,
                        Tensor& dqkv);

// ---------------- SwiGLU ----------------
// gate, up [N, I] -> h [N, I] = silu(gate) * up
void swiglu_fwd(const Tensor& gate, const Tensor& up, Tensor& h);
// dgate, dup assigned
void swiglu_bwd(const Tensor& gate, const Tensor& up, const Tensor& dh, Tensor& dgate, Tensor& dup);

// ---------------- logit soft-capping (Gemma 2 / 3 final_logit_softcapping) ----------------
// x = cap * tanh(x / cap) in place; and its backward from the capped values y: dy *= 1 - (y / cap)^2.
// CPU: float32. CUDA (backend/cuda/softcap.cu): any float dtype (y and dy may differ), fp32 math, one rounding
// at the store. The CUDA LM head's fused loss kernel has no soft-capping: a soft-capped model's loss runs the
// chunked op path of models/decoder.cpp lm_head_cross_entropy on both devices.
void softcap_(Tensor& x, float cap);
void softcap_bwd_(const Tensor& y, Tensor& dy, float cap);

// ---------------- GeGLU (Gemma's MLP: hidden_activation gelu_pytorch_tanh) ----------------
// gate, up [N, I] -> h [N, I] = gelu_tanh(gate) * up, with PyTorch's tanh approximation
//   gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
void geglu_fwd(const Tensor& gate, const Tensor& up, Tensor& h);
// dgate, dup assigned (may alias gate, up)
void geglu_bwd(const Tensor& gate, const Tensor& up, const Tensor& dh, Tensor& dgate, Tensor& dup);
// GeGLU on a fused [gate | up] GEMM output (the stacked gate/up projection; SwiGLU's is swiglu_fused_fwd in
// moe_ops.h): gu [N, 2I], gate the first I columns of each row -> h [N, I]; backward assigns dgu [N, 2I]
// (may alias gu). Element math identical to geglu_fwd / geglu_bwd.
void geglu_fused_fwd(const Tensor& gu, Tensor& h);
void geglu_fused_bwd(const Tensor& gu, const Tensor& dh, Tensor& dgu);

// ---------------- attention ----------------
// AttnParams (core/attn_params.h): the attention call's geometry and options, shared with the backends.
using am::AttnParams;
// Causal attention. q [B, T, nh, D], k [B, T, nkv, D], v [B, T, nkv, Dv] -> out [B, T, nh, Dv], lse
// [B, nh, T] (saved, natural-log logsumexp of the scaled scores, and of the sink when p.sinks; rows that see
// no key get lse = -inf and out = 0). Dv = p.dv().
// Devices: CPU takes fp32 tensors (the reference). CUDA takes bf16 (or fp32) q/k/v/out/dout/dq/dk/dv, lse
// fp32: bf16 with D = Dv = 64 or 128 and neither sinks nor soft-capping runs the tensor-core flash kernels
// (src/backend/cuda/attention.h), everything else the generic CUDA-core kernels (attention_generic.h), which
// take D, Dv <= 256 (multiples of 4) with every feature above; larger head dims throw DeviceError.
void attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const AttnParams& p, Tensor& out,
                   Tensor& lse);
// dq [B, T, nh, D], dk [B, T, nkv, D], dv [B, T, nkv, Dv] assigned. dsinks [nh] fp32 (only with p.sinks;
// nullptr: not wanted) is a parameter gradient: ACCUMULATED, dsinks[h] += -sum_{b,i} exp(s_h - lse_i) *
// (dout_i . out_i) over rows that see a key.
void attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                   const Tensor& dout, const AttnParams& p, Tensor& dq, Tensor& dk, Tensor& dv,
                   Tensor* dsinks = nullptr);

// ---------------- cross-entropy ----------------
// logits [N, V], targets [N] int32 (-100 = ignored). Returns the SUM of token losses over non-ignored
// rows (in double). When dlogits is non-null it is assigned grad_scale * (softmax - onehot) for valid rows
// and 0 for ignored rows. Throws DataError if a target is outside [0, V).
double cross_entropy_fwd_bwd(const Tensor& logits, const Tensor& targets, float grad_scale, Tensor* dlogits);

// ---------------- reductions used by the optimizer ----------------
double sum_squares(const Tensor& a);  // sum of a^2 in double

}  // namespace am::ops
