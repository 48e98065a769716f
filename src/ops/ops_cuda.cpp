#ifdef AM_WITH_CUDA
#include "ops/ops_cuda.h"

#include "ops/device.h"  // unverified_cuda_allowed: the gate for flash attention with sinks

namespace am::ops {

static Tensor workspace(size_t bytes) {
  return cuda::empty({static_cast<int64_t>((bytes + 3) / 4)}, DType::F32);
}

// The flash kernels (tensor cores) cover bf16 with head_dim 64 and 128, Dv == D and no soft-capping: every W1/W2
// shape and most real models. Everything else (Gemma 3's 256, Phi-3's 96, DeepSeek MLA's 192 / 128, Gemma 2
// soft-capping, fp32 tensors, the tiny golden models' 16 and 32) runs the generic CUDA-core kernels
// (attention_generic.h: any head dim up to 256 that is a multiple of 4; beyond that a DeviceError naming the
// limit). Checked on an H200 on 2026-12-05 against the CPU reference (tests/gpu/test_cuda_attention.cpp, worst
// bf16 error 5e-3) and through the tiny HF goldens on CUDA.
// gpt_oss sinks (D 64): the flash kernels take them too (the sink in the forward's final normaliser and lse,
// dsinks from a small reduction kernel), but that code has never run on a GPU, so it is used only when
// AM_ALLOW_UNVERIFIED_CUDA=1 (ops::unverified_cuda_allowed(); the GPU tests set it). Without it sinks go to the
// generic kernels, as before. The choice depends only on p, q and the process-wide flag, so a forward and its
// backward always take the same path (the backward reads the forward's lse, which includes the sinks either way).
// Move sinks out of the gate once CudaAttention.FlashSinks* has passed on a device (docs/device_runbook.md).
static bool flash_supports(const AttnParams& p, const Tensor& q) {
  return (p.head_dim == 64 || p.head_dim == 128) && p.dv() == p.head_dim && !(p.softcap > 0.f) &&
         q.dtype() == DType::BF16 && (!p.sinks || unverified_cuda_allowed());
}

void cuda_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const AttnParams& p, Tensor& out,
                        Tensor& lse) {
  auto& ctx = cuda::default_context();
  if (!flash_supports(p, q)) {
    cuda::attention_generic_fwd(q, k, v, p, out, lse, ctx.stream());
    return;
  }
  size_t ws = cuda::attention_fwd_workspace_bytes(p);
  Tensor w = ws ? workspace(ws) : Tensor();
  cuda::attention_fwd(q, k, v, p, out, lse, ctx.stream(), ws ? w.raw() : nullptr, ws);
}

void cuda_attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                        const Tensor& dout, const AttnParams& p, Tensor& dq, Tensor& dk, Tensor& dv,
                        Tensor* dsinks) {
  auto& ctx = cuda::default_context();
  if (!flash_supports(p, q)) {
    const size_t ws = cuda::attention_generic_bwd_workspace_bytes(p);
    Tensor w = ws ? workspace(ws) : Tensor();
    cuda::attention_generic_bwd(q, k, v, out, lse, dout, p, dq, dk, dv, dsinks, ctx.stream(),
                                ws ? w.raw() : nullptr, ws);
    return;
  }
  size_t ws = cuda::attention_bwd_workspace_bytes(p);
  Tensor w = ws ? workspace(ws) : Tensor();
  cuda::attention_bwd(q, k, v, out, lse, dout, p, dq, dk, dv, dsinks, ctx.stream(), ws ? w.raw() : nullptr, ws);
}

}  // namespace am::ops
#endif
