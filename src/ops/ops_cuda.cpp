#ifdef AM_WITH_CUDA
#include "ops/ops_cuda.h"

#include <cstdlib>
#include <cstring>

#include "backend/cuda/cudnn_attention.h"

namespace am::ops {

static Tensor workspace(size_t bytes) {
  return cuda::empty({static_cast<int64_t>((bytes + 3) / 4)}, DType::F32);
}

// The flash kernels (tensor cores) take bf16 with head_dim 64, 96, 128 or 256 (Dv == D), and DeepSeek MLA's
// 192 / Dv 128; causal, GQA, sliding window, segment ids; gpt_oss sinks; Gemma 2 soft-capping (not with Dv != D).
// D 64 / 128 were checked on an H200 on 2026-12-05; sinks, soft-capping, D 96 / 256 and 192 / 128 on an H100 on
// 2026-12-06 (tests/gpu/test_cuda_attention.cpp CudaAttention.Flash*: out / lse and dq / dk / dv / dsinks of every
// kernel variant against the CPU reference, and the Gemma 2 / Gemma 3 / Phi-3 / DeepSeek-V3 goldens on CUDA).
// Everything else (fp32 tensors, the tiny golden models' head dims 16 and 32, other Dv != D pairs) runs the
// generic CUDA-core kernels (attention_generic.h: any head dim up to 256 that is a multiple of 4; beyond that a
// DeviceError naming the limit). The choice depends only on p and q, so a forward and its backward always take the
// same path (the backward reads the forward's lse, which includes the sinks either way).
static bool flash_supports(const AttnParams& p, const Tensor& q) {
  if (q.dtype() != DType::BF16) return false;
  if (p.dv() != p.head_dim) return p.head_dim == 192 && p.dv() == 128 && !(p.softcap > 0.f);  // DeepSeek MLA
  return p.head_dim == 64 || p.head_dim == 96 || p.head_dim == 128 || p.head_dim == 256;
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
