// Self-attention block shared by every dense and MoE family:
//   q = x Wq^T (+bq), k = x Wk^T (+bk), v = x Wv^T (+bv)      q [N, nh, D], k/v [N, nkv, D]
//   (phi3) [q | k | v] = x Wqkv^T: one fused GEMM, split (and rotated) by qkv_split_rope  [N, (nh + 2 nkv) D]
//   (the rest, by default) the same single GEMM on the row-stacked view of the separate q/k/v weights when they
//   lie back to back (blocks/fused_proj.h; AM_FUSED_PROJ=0: three GEMMs)
//   (qwen3) q = RMSNorm_D(q) * q_norm, k = RMSNorm_D(k) * k_norm   per head  (gemma3: * (1 + q_norm))
//   (olmoe) q = RMSNorm(q) * q_norm over the whole [nh*D] projection, k likewise over [nkv*D]
//   q, k = RoPE(q, k; cos, sin)
//   o = causal GQA attention (sliding window / segments)   o [N, nh*D]
//   (gpt_oss) + a learned sink logit per head in every softmax row (self_attn.sinks [nh])
//   y = o Wo^T (+bo)                                        y [N, H]
#pragma once
#include <string>

#include "io/model_config.h"
#include "models/exec.h"
#include "models/kv_cache.h"
#include "models/params.h"
#include "ops/ops.h"

namespace am {

struct AttentionWeights {
  Param *q = nullptr, *k = nullptr, *v = nullptr, *o = nullptr;  // [nh*D, H], [nkv*D, H], [nkv*D, H], [H, nh*D]
  Param* qkv = nullptr;  // fused (phi3) [(nh + 2 nkv) D, H], rows q | k | v; q, k, v are then null
  Param *q_bias = nullptr, *k_bias = nullptr, *v_bias = nullptr, *o_bias = nullptr;
  Param *q_norm = nullptr, *k_norm = nullptr;  // [D] per head, or [nh*D] / [nkv*D] (olmoe)
  Param* sinks = nullptr;                      // [nh] gpt_oss attention sink logits
  // q, k, v (and their biases) colocated at build (ParamStore::colocate): one GEMM for the three when they are
  // still back to back at use (fused_proj.h stack_proj); false: AM_FUSED_PROJ=0 or phi3's own fused qkv.
  bool fuse_qkv = false;
};

// What forward keeps for backward.
struct AttentionSaved {
  Tensor x;             // [N, H] block input (aliases the caller's tensor)
  Tensor q_pre, k_pre;  // [N, nh, D], [N, nkv, D] before q/k norm (qk_norm only)
  Tensor q_rstd, k_rstd;  // one per normalised row: [N*nh], [N*nkv] per head; [N], [N] whole projection
  Tensor q, k, v;       // after norm + RoPE
  Tensor o;             // [N, nh*D]
  Tensor lse;           // [B, nh, T]
};

struct AttentionGeometry {
  int64_t n_heads, n_kv_heads, head_dim, hidden;
  float norm_eps;
  const ExecContext* ex;  // device + activation dtype for every buffer the block allocates
  bool norm_plus_one = false;  // Gemma: q/k norms are zero-centred, y = x_hat * (1 + w) (blocks/norm.h)
};

AttentionWeights register_attention(ParamStore& ps, const std::string& prefix, const io::ModelConfig& cfg);

// x [N, H]; cos/sin [N, D/2]; p carries B, T, window, segments. Returns y [N, H].
// residual non-null ([N, H], the activation dtype): the output projection accumulates into it instead (*residual +=
// y: proj_fwd's accumulate, beta = 1 on CUDA, no [N, H] output tensor and no add kernel), and *residual is returned.
Tensor attention_forward(const AttentionWeights& w, const AttentionGeometry& g, const Tensor& x, const Tensor& cos,
                         const Tensor& sin, const ops::AttnParams& p, AttentionSaved* saved,
                         Tensor* residual = nullptr);
// Inference with a KV cache: x [N, H] holds the next N tokens of one sequence (cos/sin [N, D/2] at their
// positions cache.length() ...; p: batch 1, seq N, the layer's window). Their k/v go into layer `layer` of
// the cache (rows cache.length() .. + N; the caller advances it once every layer is done) and q attends
// over every cached row before them plus themselves. The projections, q/k norm and RoPE are
// attention_forward's (one shared code path); with an empty cache (prefill) the attention itself is also
// the training kernel. Returns y [N, H].
Tensor attention_forward_cached(const AttentionWeights& w, const AttentionGeometry& g, const Tensor& x,
                                const Tensor& cos, const Tensor& sin, const ops::AttnParams& p, KvCache& cache,
                                int64_t layer);
// dy [N, H] -> dx [N, H] (assigned); parameter grads accumulated.
Tensor attention_backward(const AttentionWeights& w, const AttentionGeometry& g, const AttentionSaved& s,
                          const Tensor& cos, const Tensor& sin, const ops::AttnParams& p, const Tensor& dy);

}  // namespace am
