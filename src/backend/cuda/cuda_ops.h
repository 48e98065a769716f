// The CUDA backend's ops: the same names and semantics as am::ops (src/ops/ops.h), on CUDA tensors, run
// on the context's stream (asynchronous unless a function says it synchronises).
//
// Numerics (DESIGN.md, BENCH.md W1): activations and working weights are bf16, master weights, optimizer
// state and parameter gradients fp32; all math is fp32 (reductions fp32 per thread/block, fp64 where a
// sum over the whole tensor is returned). Conventions as in ops.h: row-major, Linear.weight [out, in],
// parameter gradients ACCUMULATE (+=), activation gradients ASSIGN (=). Where ops.h writes [N, X], any
// tensor whose last dimension is X is accepted and its leading dimensions are flattened into N.
//
// Accepted dtypes per op are listed with it ("T" = bf16 or fp32 unless noted). Shapes and dtypes are
// checked on the host (ShapeError / DeviceError naming the op); data errors found by kernels (token ids,
// targets out of range) go to the context's error slot and are raised by ctx.check_device_errors() (the
// synchronous cross_entropy_fwd_bwd checks it itself).
#pragma once
#include <cstdint>
#include <vector>

#include "backend/cuda/context.h"
#include "core/adamw_params.h"
#include "core/linear_out.h"
#include "core/tensor.h"

namespace am::cuda {

// ---------------- tensors ----------------
Tensor empty(const Shape& shape, DType dtype, CudaContext& ctx = default_context());
// Host -> device copy into memory from `alloc` (a CachingAllocator; default: the context's). Synchronous.
Tensor to_device(const Tensor& host, Allocator& alloc, CudaContext& ctx = default_context());
Tensor to_device(const Tensor& host, CudaContext& ctx = default_context());
// Device -> host copy (same dtype). Synchronous.
Tensor to_host(const Tensor& dev, CudaContext& ctx = default_context());
void zero_(Tensor& t, CudaContext& ctx = default_context());              // cudaMemsetAsync
void fill_(Tensor& t, float value, CudaContext& ctx = default_context());  // float dtypes

// ---------------- elementwise (any float dtypes, mixed allowed; math fp32) ----------------
void add_(Tensor& a, const Tensor& b, CudaContext& ctx = default_context());     // a += b
void scale_(Tensor& a, float s, CudaContext& ctx = default_context());           // a *= s
void add_scalar_(Tensor& a, float s, CudaContext& ctx = default_context());      // a += s
// rows x bytes_per_row between device buffers with byte pitches (ops::copy_cols_)
void copy_2d(void* dst, int64_t dst_pitch, const void* src, int64_t src_pitch, int64_t bytes_per_row, int64_t rows,
             CudaContext& ctx = default_context());
void copy_(Tensor& dst, const Tensor& src, CudaContext& ctx = default_context());  // converts bf16<->fp32
// In place: x[i] = keep(seed, i) ? x[i] * (1 / (1 - p)) : 0 (contract and mask in ops.h / backend/cpu/
// dropout_mask.h: the same bits as the CPU reference). p == 0: no-op; p outside [0, 1): UsageError.
void dropout_(Tensor& x, float p, uint64_t seed, CudaContext& ctx = default_context());

// ---------------- embedding ----------------
// ids [N] int32, weight [V, H] T -> out [N, H] T' (any float). Out-of-range ids write zeros and are
// reported through the error slot.
void embedding_fwd(const Tensor& ids, const Tensor& weight, Tensor& out, CudaContext& ctx = default_context());
// dweight [V, H] fp32 += scatter of dout [N, H] (bf16 or fp32). fp32 atomics (order-dependent rounding).
void embedding_bwd(const Tensor& ids, const Tensor& dout, Tensor& dweight, CudaContext& ctx = default_context());

// ---------------- linear (cuBLASLt, fp32 compute) ----------------
// x [N, K] bf16, w [M, K] bf16, bias [M] bf16/fp32 or null -> y [N, M] bf16 (bias fused as epilogue).
// The LinearOut overloads (core/linear_out.h) put yo.alpha / dxo.alpha into the GEMM's alpha and accumulate with
// beta = 1 (C = D = y / dx, read in place): y = alpha x w^T (+ bias) (+ y), one rounding at the store. y / dx may
// be any float dtype (bf16 x / w with an fp32 y accumulate in fp32).
void linear_fwd(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y,
                CudaContext& ctx = default_context());
void linear_fwd(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y, const LinearOut& yo,
                CudaContext& ctx = default_context());
// dx [N, K] bf16 = dy w (assigned; skipped when null); dw [M, K] fp32 += dy^T x (beta = 1 in the GEMM;
// dw undefined: frozen weight, no dW GEMM); dbias [M] fp32 += column sums of dy (when non-null). x, w, dy bf16.
// With dxo: dx = dxo.alpha * dy w (+ dx when dxo.accumulate) in the one dX GEMM.
void linear_bwd(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor* dx, Tensor& dw, Tensor* dbias,
                CudaContext& ctx = default_context());
void linear_bwd(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor* dx, Tensor& dw, Tensor* dbias,
                const LinearOut& dxo, CudaContext& ctx = default_context());

// ---------------- RMSNorm ----------------
// x [N, H] T, w [H] T' -> y [N, H] T (= w * (x * rstd)), rstd [N] fp32 (saved). Also x fp32 -> y bf16 (an
// fp32 residual stream feeding a bf16 matmul; math fp32, one rounding at the store).
void rmsnorm_fwd(const Tensor& x, const Tensor& w, float eps, Tensor& y, Tensor& rstd,
                 CudaContext& ctx = default_context());
// dy [N, H] T, dx [N, H] T assigned (also x fp32, dy bf16 -> dx fp32); dw [H] fp32 += (per-block partials,
// then a fixed-order reduction: deterministic). dw undefined: frozen weight, no partials, no reduction.
void rmsnorm_bwd(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, Tensor& dx, Tensor& dw,
                 CudaContext& ctx = default_context());
// Fused residual add + RMSNorm (add_rmsnorm.cu; ops.h add_rmsnorm_fwd / _bwd). Forward: x, x_out [N, H] T (x_out
// may be x), delta [N, H] T or bf16, w / y / rstd as rmsnorm_fwd; x_out = x + delta, then rmsnorm_fwd(x_out).
// Backward: dx = dres + (rmsnorm_bwd's dx), dres [N, H] in dx's dtype, not overlapping dx; dw as rmsnorm_bwd.
// Bit-identical to copy_ + add_ + rmsnorm_fwd (rmsnorm_bwd + add_) on the device, at the default tuning.
void add_rmsnorm_fwd(const Tensor& x, const Tensor& delta, const Tensor& w, float eps, Tensor& x_out, Tensor& y,
                     Tensor& rstd, CudaContext& ctx = default_context());
void add_rmsnorm_bwd(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, const Tensor& dres,
                     Tensor& dx, Tensor& dw, CudaContext& ctx = default_context());

// ---------------- RoPE (rotate_half) ----------------
// x [N, heads, D] T in place; cos, sin [N, R/2] fp32 with R <= D (R < D: partial rotary).
void rope_fwd_(Tensor& x, const Tensor& cos, const Tensor& sin, CudaContext& ctx = default_context());
void rope_bwd_(Tensor& dx, const Tensor& cos, const Tensor& sin, CudaContext& ctx = default_context());
// Fused q/k/v projection output (rope.cu; ops.h): qkv [N, (nh + 2 nkv) D] T -> q [N, nh, D], k / v [N, nkv, D] T,
// q and k rotated as rope_fwd_ when cos / sin are given (nullptr: copied); and the backward's merge with
// rope_bwd_. Bit-identical to column copies + rope_fwd_ / rope_bwd_.
void qkv_split_rope(const Tensor& qkv, const Tensor* cos, const Tensor* sin, Tensor& q, Tensor& k, Tensor& v,
                    CudaContext& ctx = default_context());
void qkv_merge_rope_bwd(const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor* cos, const Tensor* sin,
                        Tensor& dqkv, CudaContext& ctx = default_context());

// ---------------- SwiGLU ----------------
// gate, up [N, I] T -> h = silu(gate) * up;  backward assigns dgate, dup (may alias gate, up).
void swiglu_fwd(const Tensor& gate, const Tensor& up, Tensor& h, CudaContext& ctx = default_context());
void swiglu_bwd(const Tensor& gate, const Tensor& up, const Tensor& dh, Tensor& dgate, Tensor& dup,
                CudaContext& ctx = default_context());
// GeGLU (Gemma): h = gelu_tanh(gate) * up, same contract as SwiGLU.
void geglu_fwd(const Tensor& gate, const Tensor& up, Tensor& h, CudaContext& ctx = default_context());
void geglu_bwd(const Tensor& gate, const Tensor& up, const Tensor& dh, Tensor& dgate, Tensor& dup,
               CudaContext& ctx = default_context());
// GeGLU on a fused [gate | up] layout: gu [M, 2I] T -> h [M, I]; backward dgu [M, 2I] (may alias gu).
void geglu_fused_fwd(const Tensor& gu, Tensor& h, CudaContext& ctx = default_context());
void geglu_fused_bwd(const Tensor& gu, const Tensor& dh, Tensor& dgu, CudaContext& ctx = default_context());

// ---------------- logit soft-capping (Gemma 2 final_logit_softcapping; softcap.cu) ----------------
// x [any] (any float dtype) in place: x = cap * tanh(x / cap). cap > 0 and finite (else ShapeError).
void softcap_(Tensor& x, float cap, CudaContext& ctx = default_context());
// dy [any] (any float dtype) *= 1 - (y / cap)^2, in place, from the capped values y (any float dtype, same numel).
void softcap_bwd_(const Tensor& y, Tensor& dy, float cap, CudaContext& ctx = default_context());

// ---------------- cross-entropy ----------------
// logits [N, V] T, targets [N] int32 (-100 ignored). dlogits [N, V] T (nullable; may alias logits) =
// grad_scale * (softmax - onehot), zero rows for ignored targets.
// Synchronous form: returns the loss sum (double) and throws DataError on a bad target.
double cross_entropy_fwd_bwd(const Tensor& logits, const Tensor& targets, float grad_scale, Tensor* dlogits,
                             CudaContext& ctx = default_context());
// Asynchronous form: *d_loss_sum (device fp64) += the loss sum; no host sync.
void cross_entropy_fwd_bwd_async(const Tensor& logits, const Tensor& targets, float grad_scale, Tensor* dlogits,
                                 double* d_loss_sum, CudaContext& ctx = default_context());

// Fused LM head + cross-entropy (never materialises [N, V] logits): for row chunks of x,
//   logits_c = x_c w^T (cuBLASLt, into a [chunk, V] buffer), CE in place -> dlogits_c,
//   dx_c = dlogits_c w (assigned), dw += dlogits_c^T x_c (fp32, beta = 1).
// x [N, H] bf16, w [V, H] bf16, targets [N] int32; dx [N, H] bf16 (nullable), dw [V, H] fp32 (nullable:
// frozen head). *d_loss_sum (device fp64) += the loss sum.
struct LmHeadCeOptions {
  int64_t chunk_rows = 0;  // 0: automatic (logits chunk of about 512 MiB, at most N)
};
void lm_head_cross_entropy(const Tensor& x, const Tensor& w, const Tensor& targets, float grad_scale, Tensor* dx,
                           Tensor* dw, double* d_loss_sum, CudaContext& ctx = default_context(),
                           const LmHeadCeOptions& opt = {});

// Device fp64 scalars for the accumulators above (from the context's allocator).
double* alloc_device_scalar(CudaContext& ctx = default_context());  // zeroed
void free_device_scalar(double* p, CudaContext& ctx = default_context());
double read_device_scalar(const double* p, CudaContext& ctx = default_context());  // synchronises
void zero_device_scalar(double* p, CudaContext& ctx = default_context());

// ---------------- reductions used by the optimizer ----------------
double sum_squares(const Tensor& a, CudaContext& ctx = default_context());  // synchronous
// Sum of squares over many float tensors (any float dtypes) in one multi-tensor launch sequence:
// fp32 per-block partials, fp64 final sum written to *d_out (device). No sync.
void sum_squares_multi_async(const std::vector<const Tensor*>& tensors, double* d_out,
                             CudaContext& ctx = default_context());
double sum_squares_multi(const std::vector<const Tensor*>& tensors, CudaContext& ctx = default_context());
// torch.nn.utils.clip_grad_norm_: *d_coef = min(1, max_norm / (sqrt(*d_sumsq) + 1e-6)) computed in double,
// rounded to fp32 (feed it to adamw_step's d_grad_scale).
void clip_coef_async(const double* d_sumsq, double max_norm, float* d_coef, CudaContext& ctx = default_context());

// ---------------- fused multi-tensor AdamW ----------------
// torch.optim.AdamW (decoupled weight decay; Adam when decoupled = false) with exactly the arithmetic of
// am::Optimizer (src/train/optimizer.cpp): bias corrections in double on the host, fp32 element math in the
// same order, no FMA contraction -> bit-identical to the CPU optimizer in fp32.
using AdamWTensors = am::AdamWTensors;  // core/adamw_params.h
struct AdamWConfig : AdamWHyper {
  // Every gradient is multiplied as it is loaded by scale = grad_scale * (*d_grad_scale if given), one fp32
  // product per element (as a separate scale_ pass would do; skipped when scale == 1): clipping without a
  // separate pass and without a host sync (d_grad_scale from clip_coef_async).
  float grad_scale = 1.f;
  const float* d_grad_scale = nullptr;
  double* d_sumsq = nullptr;  // AdamWFused::d_sumsq (core/adamw_params.h): the gradients' sum of squares, before scaling
};
void adamw_step(const std::vector<AdamWTensors>& params, const AdamWConfig& cfg,
                CudaContext& ctx = default_context());
// bf16 parameters, gradients and state (checked by ops::adamw_bf16_step): backend/cpu/adamw_bf16.h per element.
// grad may be fp32 (rounded to bf16 as it is read); f: the fused clip scale and sum of squares (core/adamw_params.h).
void adamw_bf16_step(const std::vector<AdamWBf16Tensors>& params, const AdamWBf16Hyper& h, const AdamWFused& f = {},
                     CudaContext& ctx = default_context());

}  // namespace am::cuda
