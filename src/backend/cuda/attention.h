// Flash attention (forward and backward) on CUDA, bf16 in/out, fp32 softmax statistics. Same contract as
// am::ops::attention_fwd/bwd (src/ops/ops.h): causal, GQA, optional sliding window, optional segment ids
// (packing / variable-length batches; segment < 0 = padding that sees nothing).
//
//   q [B, T, nh, D], k [B, T, nkv, D], v [B, T, nkv, Dv], out/dout [B, T, nh, Dv], dq [B, T, nh, D],
//   dk [B, T, nkv, D], dv [B, T, nkv, Dv]: bf16, CUDA (Dv = p.dv(): D, or 128 with D 192)
//   lse [B, nh, T] fp32 (natural-log logsumexp of the scaled scores; -inf for rows that see no key)
//   segment_ids [B, T] int32 on the device (or nullptr)
//
// Head dims 64 and 128 run tensor-core kernels (wgmma on H100/H200 = sm_90a, mma.sync elsewhere), 96 (Phi-3),
// 256 (Gemma 2 / 3) and DeepSeek MLA's D 192 / Dv 128 the mma.sync kernels on every GPU (D > 128: Q re-read from
// shared memory per k-step in the forward, dK / dV columns split over two warp groups in the backward); other head
// dims and Dv != D pairs throw DeviceError here (so does soft-capping with Dv != D): ops::attention_fwd/bwd
// (src/ops/ops_cuda.cpp) sends those to the generic kernels (attention_generic.h: any head dim up to 256, any
// Dv, fp32).
//
// Gemma 2 soft-capping (p.softcap > 0; AttnParams in core/attn_params.h): every score becomes
// cap tanh(scale q.k / cap) before the mask and softmax. A compile-time variant of each kernel takes t = tanh(.)
// of the raw scores straight after Q K^T (1 - 2 / (2^(2 scale log2(e) x / cap) + 1): two special-function ops,
// absolute error ~1e-7) and folds cap log2(e) into the softmax's multiplier; the backward recomputes t and
// multiplies dS by 1 - t^2. lse is that of the capped scores (as the CPU reference's). The kernels without it
// are the ones that existed before (identical SASS).
//
// Soft-capping, head dims 96 / 256 and 192 / 128 are NOT YET RUN ON A GPU (written 2026-12-06 without one): ops::
// routes them here only with AM_ALLOW_UNVERIFIED_CUDA=1, as the sinks below; CudaAttention.FlashSoftcap*,
// FlashHeadDim96*, FlashHeadDim256* and FlashMlaDims* (tests/gpu/test_cuda_attention.cpp) check them against the
// CPU reference.
//
// gpt_oss sinks (p.sinks [nh] fp32 or bf16 on the device; AttnParams in core/attn_params.h): head h's logit s_h
// joins each row's normaliser as one value-less column, so out and lse include it (lse_i = log(sum_j e^(x_ij) +
// e^(s_h))); the backward's P = exp(x - lse) is then already the sinked softmax and only the sink's own gradient
// is extra: dsinks[h] += -sum_i e^(s_h - lse_i) Dsum_i (Dsum_i = dout_i . out_i), ADDED to dsinks [nh] fp32
// (nullptr: not wanted), deterministically (one fixed-order reduction per head, no atomics). NOT YET RUN ON A
// GPU: ops:: routes sinks here only with AM_ALLOW_UNVERIFIED_CUDA=1 (ops::unverified_cuda_allowed), else to the
// generic kernels. Work is queued on `stream` (nullptr: the legacy default stream); nothing synchronises. Scratch memory: the *_workspace_bytes functions say how much the call needs; pass that
// much device memory (e.g. from the caching allocator), or nullptr to let the call take it stream-ordered
// from cudaMallocAsync.
//
// Numerics: scores and softmax statistics fp32 (exp2 with the scale folded in), P and dS rounded to bf16
// before the tensor-core products (as FlashAttention), dQ accumulated in fp32 with atomics (so dq's last
// bits depend on the order of the atomics; out/lse/dk/dv are deterministic unless the backward splits a
// GQA group across blocks, see AttnTuning::bwd_split).
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/tensor.h"
#include "core/attn_params.h"

struct CUstream_st;  // = cudaStream_t, without pulling cuda_runtime.h into host code

namespace am::cuda {

// 0 without segment ids and bf16 sinks (bf16 sinks are widened to fp32 in the workspace: nh floats).
size_t attention_fwd_workspace_bytes(const AttnParams& p);
size_t attention_bwd_workspace_bytes(const AttnParams& p);

void attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const AttnParams& p, Tensor& out,
                   Tensor& lse, CUstream_st* stream = nullptr, void* workspace = nullptr,
                   size_t workspace_bytes = 0);

// dq, dk, dv assigned; dsinks [nh] fp32 (only with p.sinks; nullptr: not wanted) accumulated. The argument
// order is attention_generic_bwd's.
void attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                   const Tensor& dout, const AttnParams& p, Tensor& dq, Tensor& dk, Tensor& dv,
                   Tensor* dsinks = nullptr, CUstream_st* stream = nullptr, void* workspace = nullptr,
                   size_t workspace_bytes = 0);

// ---- raw-pointer entry points: strided rows, so q/k/v can live inside a fused QKV projection ----
// Row t of batch b, head h of tensor X starts at X + (b * T + t) * X_rs + h * D (h * Dv for v, out, dout, dv;
// element strides, each a multiple of 8). Shapes/dtypes are the caller's responsibility; head_dim, scale and pointer alignment are
// still checked.
struct AttnRawArgs {
  const void* q = nullptr;  // bf16
  const void* k = nullptr;
  const void* v = nullptr;
  const void* out = nullptr;   // bf16; written by fwd, read by bwd
  const void* dout = nullptr;  // bf16 (bwd)
  void* dq = nullptr;          // bf16 (bwd)
  void* dk = nullptr;
  void* dv = nullptr;
  float* lse = nullptr;            // [B, nh, T] fp32, contiguous
  const int32_t* segment_ids = nullptr;  // [B, T] contiguous, or nullptr
  const float* sinks = nullptr;  // [nh] fp32 sink logits (natural log, not scaled), or nullptr: no sinks. The
                                 // forward folds them into out / lse; the backward reads them only for dsinks
  float* dsinks = nullptr;       // [nh] fp32, bwd only, needs sinks: += -sum_i e^(sink_h - lse_i) Dsum_i
  int64_t q_rs = 0, k_rs = 0, v_rs = 0, o_rs = 0, do_rs = 0, dq_rs = 0, dk_rs = 0, dv_rs = 0;
  int64_t batch = 0, seq = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, sliding_window = 0;
  float scale = 0.f;
  float softcap = 0.f;  // Gemma 2 attention logit soft-capping: 0 = off; else score = softcap tanh(scale q.k / softcap)
  int64_t v_head_dim = 0;  // Dv of v / out / dout / dv when it differs from head_dim (DeepSeek MLA: 192 / 128, the
                           // only such pair taken); 0 = head_dim. Row strides of those tensors are in Dv units
};
void attention_fwd_raw(const AttnRawArgs& a, CUstream_st* stream, void* workspace, size_t workspace_bytes);
void attention_bwd_raw(const AttnRawArgs& a, CUstream_st* stream, void* workspace, size_t workspace_bytes);

// Process-wide knobs for tests and benchmarks (not thread-safe to change while kernels are launched).
struct AttnTuning {
  int fwd_variant = 0;  // 0: the best for the device; 1-3: mma.sync tile shapes (any GPU); 4, 5: wgmma
  int bwd_variant = 0;  // 0: the best for the device; 1-3: mma.sync tile shapes; 4: wgmma (sm_90a:
                        // H100/H200; elsewhere wgmma variants fall back to 1). See attention_fwd/bwd.cu.
  int bwd_split = 0;    // blocks per GQA group in the backward: 0 = auto; 1 = one block does the whole
                        // group (dk/dv written directly); n > 1 must divide the group (fp32 atomics)
};
AttnTuning& attention_tuning();

}  // namespace am::cuda
