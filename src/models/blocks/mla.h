// DeepSeek multi-head latent attention (HF DeepseekV3Attention / DeepseekV2Attention), training path:
//   q   = x Wq^T                                  (q_lora_rank null)           [N, nh*dq], dq = dn + dr
//       = RMSNorm(x Wqa^T (+bqa); q_a_layernorm) Wqb^T                         ([N, rq] in between)
//   ckv = x Wkva^T (+bkva)                        kv_a_proj_with_mqa           [N, rkv + dr]
//   latent = ckv[:, :rkv], k_pe = ckv[:, rkv:]    (one rope key shared by all heads)
//   kv  = RMSNorm(latent; kv_a_layernorm) Wkvb^T  kv_b_proj                    [N, nh*(dn + dv)]
//   per head: k_nope = kv[h, :dn], v = kv[h, dn:]; q_nope = q[h, :dn], q_rot = q[h, dn:]
//   q_rot, k_pe = RoPE(q_rot, k_pe) on the dr rope dims. rope_interleave (v3 default): HF first permutes
//     the dims to [x0, x2, .., x1, x3, ..] and then applies rotate_half, leaving them permuted; q and k get
//     the same permutation, so the scores are exactly HF's. (v2's complex rotation of adjacent pairs gives
//     the same scores.)
//   Q = [q_nope | q_rot], K = [k_nope | k_pe] per head (dq), V (dv): causal attention, scale
//     qk_head_dim^-0.5 (* yarn mscale^2, v3), out [N, nh*dv];  y = out Wo^T (+bo)            [N, H]
// The two inner RMSNorms use eps 1e-6 (HF builds them without rms_norm_eps). Every projection goes through
// proj_fwd / proj_bwd, so LoRA adapters on them work. The column splits (ops::copy_cols_), the rope
// permutation and the k_pe broadcast / its head sum (ops::mla_gather_cols / mla_scatter_cols, ops/mla_ops.h) are
// ops with CPU and CUDA kernels, so the block runs on either device (bf16 activations on CUDA).
#pragma once
#include <string>

#include "io/model_config.h"
#include "models/exec.h"
#include "models/kv_cache.h"
#include "models/params.h"
#include "ops/ops.h"

namespace am {

struct MlaWeights {
  Param* q = nullptr;                                                // q_proj [nh*dq, H] (q_lora_rank null)
  Param *q_a = nullptr, *q_a_bias = nullptr, *q_a_norm = nullptr;   // [rq, H], [rq], [rq]
  Param* q_b = nullptr;                                              // [nh*dq, rq]
  Param *kv_a = nullptr, *kv_a_bias = nullptr, *kv_a_norm = nullptr;  // [rkv+dr, H], [rkv+dr], [rkv]
  Param* kv_b = nullptr;                                             // [nh*(dn+dv), rkv]
  Param *o = nullptr, *o_bias = nullptr;                             // [H, nh*dv], [H]
};

struct MlaSaved {
  Tensor x;                     // [N, H] block input
  Tensor qa, qa_rstd, qan;      // [N, rq], [N], [N, rq] (q_lora_rank set)
  Tensor latent, lat_rstd, latn;  // [N, rkv], [N], [N, rkv]
  Tensor q, k, v;               // [N, nh, dq], [N, nh, dq], [N, nh, dv] as attention read them
  Tensor o;                     // [N, nh*dv]
  Tensor lse;                   // [B, nh, T]
};

struct MlaGeometry {
  int64_t n_heads, hidden, q_lora_rank, kv_lora_rank, nope, rope, v_dim;
  bool interleave;
  const ExecContext* ex;
  int64_t qk_dim() const { return nope + rope; }
  static MlaGeometry of(const io::ModelConfig& c, const ExecContext* ex);
};

// prefix: "model.layers.{i}.self_attn." Registration order = HF state_dict order.
MlaWeights register_mla(ParamStore& ps, const std::string& prefix, const io::ModelConfig& cfg);
// x [N, H], cos/sin [N, dr/2]; p: B, T, head_dim dq, v_head_dim dv, scale, segments. Returns y [N, H].
Tensor mla_forward(const MlaWeights& w, const MlaGeometry& g, const Tensor& x, const Tensor& cos, const Tensor& sin,
                   const ops::AttnParams& p, MlaSaved* saved);
// Inference with a KV cache (as attention_forward_cached): the per-head K [N, nh, dq] and V [N, nh, dv] of the
// N new tokens go into layer `layer` of the cache, which MLA-configured KvCaches size so.
Tensor mla_forward_cached(const MlaWeights& w, const MlaGeometry& g, const Tensor& x, const Tensor& cos,
                          const Tensor& sin, const ops::AttnParams& p, KvCache& cache, int64_t layer);
// dy [N, H] -> dx [N, H] (assigned); parameter gradients accumulated.
Tensor mla_backward(const MlaWeights& w, const MlaGeometry& g, const MlaSaved& s, const Tensor& cos,
                    const Tensor& sin, const ops::AttnParams& p, const Tensor& dy);

}  // namespace am
