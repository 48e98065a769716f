#ifdef AM_WITH_CUDA
#include "ops/ops_cuda.h"

#include <compare>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

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

// cuDNN's fused attention (backend/cuda/cudnn_attention.h) for what it takes (bf16, head dims 64 / 128, causal, GQA,
// sliding window; no segment ids, sinks or soft-capping), chosen by AM_ATTENTION (read at every call, so tests can
// switch it):
//   unset / "auto": cuDNN for a shape of at least kAutoMinSeq positions once that shape has been seen kAutoAfter
//                   times, for at most kAutoPlans shapes per pass in a process; every other call runs the built-in
//                   kernels. cuDNN builds (and NVRTC-compiles) an execution plan per (B, T, heads, window), which
//                   takes up to seconds: worth it for the long fixed shapes of full-row or packed training, where one
//                   plan serves every step (W1 on an H100, 2026-12-06: 56,158 -> 59,249 tok/s, step -7.6 ms,
//                   docs/performance.md), not for shapes seen once (a generate prefill) nor for short rows, where
//                   attention is a few percent of the step and a plan's build can outweigh everything it saves
//                   (dynamic padding's hundreds of lengths, a validation set's few batches).
//   "cudnn":        cuDNN for every shape it takes (a plan per new shape).
//   "flash" / "builtin": never cuDNN.
// If a plan fails to build or execute, the first failure is logged once and the built-in kernels run. Its lse is the
// same natural-log logsumexp, so a cuDNN forward pairs with either backward: the forward and backward of one call
// may take different paths (the backward's shape count is its own).
static constexpr int kAutoAfter = 3;
static constexpr int kAutoPlans = 8;
static constexpr int64_t kAutoMinSeq = 1024;

static bool cudnn_attention_wanted(const AttnParams& p, const Tensor& q, bool backward) {
  if (!cuda::kCudnnAttentionCompiled) return false;
  const char* e = std::getenv("AM_ATTENTION");
  const bool forced = e && std::strcmp(e, "cudnn") == 0;
  if (e && !forced && *e && std::strcmp(e, "auto") != 0) return false;  // "flash", "builtin", anything else
  if (!cuda::cudnn_attention_supports(p, q.dtype())) return false;
  if (forced) return true;
  if (p.seq < kAutoMinSeq) return false;
  // auto: count this shape's calls (per pass); take cuDNN from the kAutoAfter-th on, for kAutoPlans shapes at most
  struct Shape {
    bool backward;
    int64_t B, T, H, HK, D, window;
    auto operator<=>(const Shape&) const = default;
  };
  static std::mutex mu;
  static std::map<Shape, int> seen;
  static int taken[2] = {0, 0};
  const Shape key{backward, p.batch, p.seq, p.n_heads, p.n_kv_heads, p.head_dim, p.sliding_window};
  std::lock_guard<std::mutex> lock(mu);
  int& n = seen[key];
  if (n >= kAutoAfter) return true;  // already taken (counts stop at kAutoAfter)
  if (++n < kAutoAfter) return false;
  if (taken[backward] >= kAutoPlans) {
    seen.erase(key);  // stays with the built-in kernels, counted again from zero
    return false;
  }
  ++taken[backward];
  return true;
}

void cuda_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const AttnParams& p, Tensor& out,
                        Tensor& lse) {
  auto& ctx = cuda::default_context();
  if (cudnn_attention_wanted(p, q, false)) {
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
  if (cudnn_attention_wanted(p, q, true)) {
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
