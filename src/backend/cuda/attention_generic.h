// Generic CUDA attention (forward and backward): everything the flash kernels (attention.h: bf16, Dv == D, head
// dims 64 and 128; and, behind AM_ALLOW_UNVERIFIED_CUDA=1 until a device has checked them, sinks, soft-capping,
// head dims 96 / 256 and DeepSeek MLA's 192 / Dv 128) do not take: fp32, other head dims and Dv != D pairs, and the
// gated variants while the gate is off (ops::attention_fwd/bwd route, src/ops/ops_cuda.cpp). Same contract as am::ops::attention_fwd/bwd
// (src/ops/ops.h), the CPU reference (src/backend/cpu/attention.cpp) being the oracle:
//
//   q [B, T, nh, D], k [B, T, nkv, D], v [B, T, nkv, Dv] -> out [B, T, nh, Dv], lse [B, nh, T] fp32
//   dout/out [B, T, nh, Dv] -> dq [B, T, nh, D], dk [B, T, nkv, D], dv [B, T, nkv, Dv] (assigned)
//   q/k/v/out/dout/dq/dk/dv: one dtype, bf16 or fp32, CUDA. D, Dv <= 256 and multiples of 4 (Dv may differ
//   from D: DeepSeek MLA 192 / 128). Causal, GQA, sliding window, segment ids [B, T] int32 on the device
//   (segment < 0 = padding that sees nothing), soft-capping (p.softcap), sinks [nh] (fp32, or bf16 as the
//   model's CUDA working copy is) on the device, dsinks [nh] fp32 on the device, ACCUMULATED.
//
// Algorithm (attention_generic.cu): CUDA-core fp32 math, not tensor cores. The forward is an online softmax
// over 32-key tiles held in shared memory, the backward a dsum = dout . out pre-pass, a query-row kernel for
// dq and a key-row kernel for dk/dv (probabilities recomputed from lse), so dq/dk/dv are written without
// atomics and are bit-for-bit repeatable; only dsinks uses fp32 atomics (one per block). Fully masked key or
// query tiles (causal, window, other segments) are skipped.
//
// Errors: DeviceError for what the kernels cannot take (head dims, dtypes, tensors off the device) and for
// inconsistent sizes (the ops:: front-end reports shapes as ShapeError before this is reached). Work is
// queued on `stream` (nullptr: the legacy default stream); nothing synchronises.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/tensor.h"
#include "core/attn_params.h"

struct CUstream_st;  // = cudaStream_t

namespace am::cuda {

constexpr int64_t kGenericAttnMaxHeadDim = 256;  // for both D and Dv

// True when the generic kernels take p's head dims (D, Dv <= 256, multiples of 4); else `why` (if given)
// says what is not supported.
bool attention_generic_supports(const AttnParams& p, std::string* why = nullptr);

// Scratch the backward needs (the dsum rows, B * nh * T fp32). Pass that much device memory to
// attention_generic_bwd, or nullptr to let it take the memory stream-ordered from cudaMallocAsync.
size_t attention_generic_bwd_workspace_bytes(const AttnParams& p);

void attention_generic_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const AttnParams& p, Tensor& out,
                           Tensor& lse, CUstream_st* stream = nullptr);

// dq, dk, dv assigned; dsinks (only with p.sinks; nullptr: not wanted) accumulated.
void attention_generic_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                           const Tensor& dout, const AttnParams& p, Tensor& dq, Tensor& dk, Tensor& dv,
                           Tensor* dsinks = nullptr, CUstream_st* stream = nullptr, void* workspace = nullptr,
                           size_t workspace_bytes = 0);

}  // namespace am::cuda
