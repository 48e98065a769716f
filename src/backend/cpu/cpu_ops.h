// CPU reference kernels. These are the oracle every other backend is tested against, so they favour
// obviously-correct code: fp32 storage, fp32 math, reductions (dot products, row sums, softmax
// denominators) accumulated in double. Parallel loops use OpenMP and are written so that no two threads
// ever write the same output element (no atomics, results independent of the thread count).
//
// The kernels take raw host pointers and sizes: shape, dtype and device checks are the op front-ends'
// job (src/ops/ops.cpp). Every tensor is dense, contiguous and row-major; shapes below use the names of
// src/ops/ops.h. Sizes are int64_t; BLAS calls additionally need each dimension to fit in an int, which
// the front-end checks.
#pragma once
#include <cmath>
#include <cstdint>

#include "core/dtype.h"
#include "core/linear_out.h"

namespace am::cpu {

// ---------------- elementwise (any float dtype: F32 / BF16 / F16; math in fp32) ----------------
void add(void* a, DType ta, const void* b, DType tb, int64_t n);  // a[i] += b[i]
void scale(void* a, DType ta, float s, int64_t n);                // a[i] *= s
void add_scalar(void* a, DType ta, float s, int64_t n);           // a[i] += s
// dst[i] = src[i]; float dtypes convert (round-to-nearest-even), equal dtypes are a byte copy.
void copy(void* dst, DType td, const void* src, DType ts, int64_t n);
// rows x bytes_per_row: dst + r * dst_pitch <- src + r * src_pitch (byte strides)
void copy_2d(void* dst, int64_t dst_pitch, const void* src, int64_t src_pitch, int64_t bytes_per_row, int64_t rows);
double sum_squares(const void* a, DType ta, int64_t n);  // sum a[i]^2 in double
// a[i] = keep(seed, i) ? a[i] * scale : 0, keep from dropout_mask.h with drop probability p (scale =
// 1 / (1 - p) computed by the caller in fp32).
void dropout(void* a, DType ta, float p, float scale, uint64_t seed, int64_t n);

// ---------------- embedding ----------------
// Index of the first id outside [0, vocab), or -1 when all are valid.
int64_t first_out_of_range(const int32_t* ids, int64_t n, int64_t vocab);
// ids [N], w [V, H] -> out [N, H]. ids must be valid (checked by the caller).
void embedding_fwd(const int32_t* ids, int64_t n, const float* w, int64_t hidden, float* out);
// dw [V, H] += scatter of dout [N, H] by ids [N].
void embedding_bwd(const int32_t* ids, int64_t n, const float* dout, int64_t hidden, float* dw);

// ---------------- linear (cblas_sgemm) ----------------
// x [N, K], w [M, K], bias [M] or nullptr -> y [N, M] = yo.alpha * x w^T + bias (+ y when yo.accumulate), as
// separate passes in the order of core/linear_out.h (GEMM, scale, bias, add of a temporary): bit-identical to
// the plain call followed by scale() and add().
void linear_fwd(const float* x, const float* w, const float* bias, float* y, int64_t n, int64_t k, int64_t m,
                const LinearOut& yo = {});
// dx [N, K] = dxo.alpha * dy w (+ dx when dxo.accumulate; skipped when dx is null); dw [M, K] += dy^T x
// (skipped when dw is null: frozen weight); dbias [M] += column sums of dy (when non-null).
void linear_bwd(const float* x, const float* w, const float* dy, float* dx, float* dw, float* dbias,
                int64_t n, int64_t k, int64_t m, const LinearOut& dxo = {});

// ---------------- RMSNorm ----------------
// x [N, H], w [H] -> y [N, H] = (x * rstd) * w, rstd [N] = 1 / sqrt(mean(x^2) + eps)
void rmsnorm_fwd(const float* x, const float* w, float eps, float* y, float* rstd, int64_t n, int64_t h);
// dx [N, H] assigned, dw [H] accumulated (skipped when dw is null: frozen weight).
void rmsnorm_bwd(const float* x, const float* w, const float* rstd, const float* dy, float* dx, float* dw,
                 int64_t n, int64_t h);
// Fused residual add + RMSNorm (add_rmsnorm.cpp): x_out [N, H] = x + delta (x_out may be x; delta of dtype td,
// any float), then rmsnorm_fwd of x_out. Bit-identical to add() followed by rmsnorm_fwd().
void add_rmsnorm_fwd(const float* x, const void* delta, DType td, const float* w, float eps, float* x_out, float* y,
                     float* rstd, int64_t n, int64_t h);
// dx [N, H] = rmsnorm_bwd's dx + dres (not overlapping dx), dw as rmsnorm_bwd. Bit-identical to rmsnorm_bwd() then
// add(dx, dres).
void add_rmsnorm_bwd(const float* x, const float* w, const float* rstd, const float* dy, const float* dres,
                     float* dx, float* dw, int64_t n, int64_t h);

// ---------------- RoPE (rotate_half convention) ----------------
// x [N, heads, D] in place; cos/sin [N, R/2] with R <= D even: the first R features of each head are
// rotated (pairs i and i + R/2), the rest pass through (partial rotary; R == D is the usual case).
void rope_fwd(float* x, const float* cos, const float* sin, int64_t n, int64_t heads, int64_t d,
              int64_t rot_half);
// The transpose rotation (rotation by -theta), in place on dx [N, heads, D].
void rope_bwd(float* dx, const float* cos, const float* sin, int64_t n, int64_t heads, int64_t d,
              int64_t rot_half);
// Fused q/k/v projection output (ops.h qkv_split_rope / qkv_merge_rope_bwd): packed [N, (nh + 2 nkv) D] rows
// q | k | v <-> q [N, nh, D], k [N, nkv, D], v [N, nkv, D]. merge = false: packed -> q, k, v with q and k rotated
// forward; merge = true: q, k, v -> packed with q and k rotated backward. rot_half = 0: no rotation.
void qkv_rope_pack(float* packed, float* q, float* k, float* v, const float* cos, const float* sin, int64_t n,
                   int64_t nh, int64_t nkv, int64_t d, int64_t rot_half, bool merge);

// ---------------- SwiGLU ----------------
// gate, up, h: n elements; h = silu(gate) * up
void swiglu_fwd(const float* gate, const float* up, float* h, int64_t n);
void swiglu_bwd(const float* gate, const float* up, const float* dh, float* dgate, float* dup, int64_t n);
// x = cap tanh(x / cap); dy *= 1 - (y / cap)^2 (ops.h: softcap_)
void softcap(float* x, float cap, int64_t n);
void softcap_bwd(const float* y, float* dy, float cap, int64_t n);
// h = gelu_tanh(gate) * up (ops.h: GeGLU)
void geglu_fwd(const float* gate, const float* up, float* h, int64_t n);
void geglu_bwd(const float* gate, const float* up, const float* dh, float* dgate, float* dup, int64_t n);
// GeGLU on gu [M, 2I] rows gate | up -> h [M, I]; backward dgu [M, 2I] (may alias gu)
void geglu_fused_fwd(const float* gu, int64_t m, int64_t i, float* h);
void geglu_fused_bwd(const float* gu, const float* dh, int64_t m, int64_t i, float* dgu);

// ---------------- attention ----------------
struct AttnDims {
  int64_t batch = 0, seq = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
  float scale = 0.f;
  int64_t sliding_window = 0;            // 0: none; else key j visible to query i iff i - j < window
  const int32_t* segment_ids = nullptr;  // [B, T] or null; < 0 marks padding
  const float* sinks = nullptr;          // [nh] or null: gpt_oss attention sink logits (ops.h AttnParams)
  float softcap = 0.f;                   // 0: off; else scores -> softcap * tanh(score / softcap) (Gemma 2)
  int64_t v_head_dim = 0;                // Dv of v / out / dv (0: head_dim)
  int64_t dv() const { return v_head_dim > 0 ? v_head_dim : head_dim; }
};
// Gemma 2's attention logit soft-capping, shared by the training and KV-cache kernels: the score as the
// softmax sees it (softcap <= 0: the raw score) and d(capped)/d(raw) = 1 - tanh^2, in float32 as HF.
inline float softcapped(float raw, float softcap) { return softcap > 0.f ? softcap * std::tanh(raw / softcap) : raw; }
inline double softcap_grad(float raw, float softcap) {
  if (!(softcap > 0.f)) return 1.0;
  const float t = std::tanh(raw / softcap);
  return 1.0 - static_cast<double>(t) * t;
}
// q [B, T, nh, D], k [B, T, nkv, D], v [B, T, nkv, Dv] -> out [B, T, nh, Dv], lse [B, nh, T]. Causal, GQA.
void attention_fwd(const float* q, const float* k, const float* v, const AttnDims& p, float* out, float* lse);
// dq, dk, dv assigned; probabilities are recomputed from lse. dsinks [nh] (null: none) accumulated.
void attention_bwd(const float* q, const float* k, const float* v, const float* out, const float* lse,
                   const float* dout, const AttnDims& p, float* dq, float* dk, float* dv, float* dsinks = nullptr);

// ---------------- cross-entropy ----------------
// Index of the first target that is neither -100 nor in [0, vocab), or -1.
int64_t first_bad_target(const int32_t* targets, int64_t n, int64_t vocab);
// logits [N, V], targets [N] (valid, checked by the caller) -> sum of token losses over targets != -100.
// dlogits [N, V] (nullable; may alias logits) = grad_scale * (softmax - onehot), 0 on ignored rows.
double cross_entropy(const float* logits, const int32_t* targets, int64_t n, int64_t vocab, float grad_scale,
                     float* dlogits);

}  // namespace am::cpu

// ---------------- Mixture-of-Experts (moe.cpp; contracts in src/ops/moe_ops.h) ----------------
namespace am::cpu {
// logits [N, E] -> probs [N, E] = softmax (double denominators), topk_idx/topk_w [N, k] (ties: lower index
// first; weights renormalised to sum 1 when norm).
void moe_router_fwd(const float* logits, int64_t n, int64_t e, int64_t k, bool norm, float* probs,
                    int32_t* topk_idx, float* topk_w);
// dlogits [N, E] assigned. dprobs_extra [N, E] or null.
void moe_router_bwd(const float* probs, const int32_t* topk_idx, const float* topk_w, bool norm,
                    const float* dtopk_w, const float* dprobs_extra, int64_t n, int64_t e, int64_t k,
                    float* dlogits);
// Index of the first topk_idx entry outside [0, e), or -1.
int64_t moe_first_bad_expert(const int32_t* topk_idx, int64_t nk, int64_t e);
// Stable counting sort of the nk = N*k pairs by expert: counts [E], offsets [E+1], perm [nk], inv_perm [nk].
// Indices must be valid (checked by the caller).
void moe_dispatch_plan(const int32_t* topk_idx, int64_t nk, int64_t e, int64_t* counts, int32_t* offsets,
                       int32_t* perm, int32_t* inv_perm);
// xg [N*k, H]: xg[j] = x[perm[j] / k]
void moe_gather(const float* x, const int32_t* perm, int64_t n, int64_t k, int64_t h, float* xg);
// dx [N, H] = sum_s dxg[inv_perm[t*k + s]]
void moe_gather_bwd(const float* dxg, const int32_t* inv_perm, int64_t n, int64_t k, int64_t h, float* dx);
// y [N, H] = sum_s w[t, s] * yg[inv_perm[t*k + s]]
void moe_combine(const float* yg, const int32_t* inv_perm, const float* w, int64_t n, int64_t k, int64_t h,
                 float* y);
// dyg [N*k, H] assigned, dw [N, k] assigned.
void moe_combine_bwd(const float* yg, const int32_t* inv_perm, const float* w, const float* dy, int64_t n,
                     int64_t k, int64_t h, float* dyg, float* dw);
// Per expert e: rows offsets[e]..offsets[e+1] of x [M, K] times w[e] [Nout, K]^T -> y [M, Nout].
// yo: as linear_fwd's, per expert's rows (elementwise passes: the same bits as over all of y at once).
void grouped_linear_fwd(const float* x, const float* w, const int32_t* offsets, int64_t e, int64_t k,
                        int64_t nout, float* y, const LinearOut& yo = {});
// dx [M, K] assigned (skipped when null; dxo as linear_bwd's), dw [E, Nout, K] += (skipped when null: frozen
// experts).
void grouped_linear_bwd(const float* x, const float* w, const int32_t* offsets, const float* dy, int64_t e,
                        int64_t k, int64_t nout, float* dx, float* dw, const LinearOut& dxo = {});
// gu [M, 2I] -> h [M, I] = silu(gate) * up; backward assigns dgu [M, 2I] (may alias gu). In gated_act.cpp (the
// geglu_fused_* kernel, templated on the activation).
void swiglu_fused_fwd(const float* gu, int64_t m, int64_t i, float* h);
void swiglu_fused_bwd(const float* gu, const float* dh, int64_t m, int64_t i, float* dgu);
}  // namespace am::cpu
