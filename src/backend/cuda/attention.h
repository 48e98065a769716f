// Flash attention (forward and backward) on CUDA, bf16 in/out, fp32 softmax statistics. Same contract as
// am::ops::attention_fwd/bwd (src/ops/ops.h): causal, GQA, optional sliding window, optional segment ids
// (packing / variable-length batches; segment < 0 = padding that sees nothing).
//
//   q [B, T, nh, D], k/v [B, T, nkv, D], out/dout/dq [B, T, nh, D], dk/dv [B, T, nkv, D]: bf16, CUDA
//   lse [B, nh, T] fp32 (natural-log logsumexp of the scaled scores; -inf for rows that see no key)
//   segment_ids [B, T] int32 on the device (or nullptr)
//
// Head dims 64 and 128 run tensor-core kernels (wgmma on H100/H200 = sm_90a, mma.sync elsewhere); other
// head dims throw DeviceError here, and so do soft-capping and a v head dim other than D, which these kernels
// ignore: ops::attention_fwd/bwd (src/ops/ops_cuda.cpp) sends all of those to the generic kernels
// (attention_generic.h: any head dim up to 256, sinks, soft-capping, Dv != D, fp32).
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
// Row t of batch b, head h of tensor X starts at X + (b * T + t) * X_rs + h * D (element strides, each a
// multiple of 8). Shapes/dtypes are the caller's responsibility; head_dim, scale and pointer alignment are
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
