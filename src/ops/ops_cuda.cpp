#ifdef AM_WITH_CUDA
#include "ops/ops_cuda.h"

#include <cstdlib>
#include <cstring>

#include "backend/cuda/cudnn_attention.h"
#include "ops/device.h"  // unverified_cuda_allowed: the gate for the unverified flash attention variants

namespace am::ops {

static Tensor workspace(size_t bytes) {
  return cuda::empty({static_cast<int64_t>((bytes + 3) / 4)}, DType::F32);
}

// The flash kernels (tensor cores) cover bf16 with head_dim 64 and 128, Dv == D and no soft-capping: every W1/W2
// shape and most real models. Checked on an H200 on 2026-12-05 against the CPU reference
// (tests/gpu/test_cuda_attention.cpp, worst bf16 error 5e-3) and through the tiny HF goldens on CUDA.
// The flash kernels also take, in code that has never run on a GPU (written 2026-12-06 without one):
//   - gpt_oss sinks (the sink in the forward's final normaliser and lse, dsinks from a small reduction kernel);
//   - Gemma 2 soft-capping (p.softcap; tanh of the raw scores inside the kernels, 1 - tanh^2 in the backward);
//   - head_dim 96 (Phi-3) and 256 (Gemma 2 / 3) on the mma.sync kernels;
//   - DeepSeek MLA's head dims 192 / Dv 128 (mma.sync, without soft-capping);
// so those are used only when AM_ALLOW_UNVERIFIED_CUDA=1 (ops::unverified_cuda_allowed(); the GPU tests set it).
// Without it they go to the generic CUDA-core kernels, as before (attention_generic.h: any head dim up to 256 that
// is a multiple of 4, other Dv != D pairs, fp32 tensors, the tiny golden models' 16 and 32; beyond that a
// DeviceError naming the limit). The choice depends only on p, q and the process-wide flag, so a forward and
// its backward always take the same path (the backward reads the forward's lse, which includes the sinks either way).
// Move a variant out of the gate once its CudaAttention.Flash* test (FlashSinks*, FlashSoftcap*, FlashHeadDim96*,
// FlashHeadDim256*, FlashMlaDims*) has passed on a device (docs/device_runbook.md).
static bool flash_supports(const AttnParams& p, const Tensor& q) {
  if (q.dtype() != DType::BF16) return false;
  const bool cap = p.softcap > 0.f;
  if (p.dv() != p.head_dim)  // DeepSeek MLA only
    return p.head_dim == 192 && p.dv() == 128 && !cap && unverified_cuda_allowed();
  const bool proven_dim = p.head_dim == 64 || p.head_dim == 128;
  if (proven_dim && !p.sinks && !cap) return true;  // verified on a device
  const bool flash_dim = proven_dim || p.head_dim == 96 || p.head_dim == 256;
  return flash_dim && unverified_cuda_allowed();
}

// cuDNN's fused attention (backend/cuda/cudnn_attention.h) is opt-in until it has been measured and checked on a
// device: only with AM_ATTENTION=cudnn (read at every call, so tests can switch it), for what it takes (bf16,
// head dims 64 / 128, causal, GQA, sliding window; no segments, sinks or soft-capping), and only when its plan
// builds and executes; otherwise (the first failure is logged once) the kernels below run as before. Its lse is
// the same natural-log logsumexp, so a cuDNN forward pairs with either backward.
static bool cudnn_attention_wanted(const AttnParams& p, const Tensor& q) {
  if (!cuda::kCudnnAttentionCompiled) return false;
  const char* e = std::getenv("AM_ATTENTION");
  return e && std::strcmp(e, "cudnn") == 0 && cuda::cudnn_attention_supports(p, q.dtype());
}

void cuda_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const AttnParams& p, Tensor& out,
                        Tensor& lse) {
  auto& ctx = cuda::default_context();
  if (cudnn_attention_wanted(p, q)) {
    size_t ws = 0;
    if (cuda::cudnn_attention_fwd_workspace(p, &ws, ctx.stream())) {
      Tensor w = ws ? workspace(ws) : Tensor();
      if (cuda::cudnn_attention_fwd(q, k, v, p, out, lse, ctx.stream(), ws ? w.raw() : nullptr, ws)) return;
    }
  }
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
  if (cudnn_attention_wanted(p, q)) {
    size_t ws = 0;
    if (cuda::cudnn_attention_bwd_workspace(p, &ws, ctx.stream())) {
      Tensor w = ws ? workspace(ws) : Tensor();
      if (cuda::cudnn_attention_bwd(q, k, v, out, lse, dout, p, dq, dk, dv, ctx.stream(), ws ? w.raw() : nullptr,
                                    ws))
        return;
    }
  }
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
