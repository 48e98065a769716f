// Attention over a KV cache, for inference (automodel generate; src/models/kv_cache.h). Kept apart from
// ops.h's training attention because it has no backward and saves nothing: the queries are the newest Tq
// tokens of a sequence whose keys and values (Tk >= Tq of them, the queries' own included) sit in a cache.
//
//   q [B, Tq, nh, D], k [B, Tk, nkv, D], v [B, Tk, nkv, Dv] -> out [B, Tq, nh, Dv]   (Dv = p.dv())
//   query i sits at position pos_i = Tk - Tq + i and sees key j iff  j <= pos_i  (causal)
//                                                       and  pos_i - j < window  when window > 0
//   out_i = softmax_j(scale q_i . k_j) v_j over the visible j; query head h reads kv head h / (nh / nkv).
//
// p: n_heads, n_kv_heads, head_dim, v_head_dim, scale, sliding_window, softcap and sinks as in
// ops::AttnParams (sinks on q's device; on CUDA fp32 or bf16); p.batch = B, p.seq = Tq;
// p.segment_ids must be null (one sequence per batch row, no packing). With Tq == Tk this is exactly
// ops::attention_fwd's output (the lse is not produced). CPU: fp32 tensors, the same arithmetic as the
// training kernel (double dot products and softmax sums); CUDA: bf16, fp16 or fp32 tensors (all alike),
// fp32 math, D and Dv <= 256 (src/backend/cuda/kv_attention.cu).
#pragma once
#include "ops/ops.h"

namespace am::ops {

void attention_kv_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const AttnParams& p, Tensor& out);

}  // namespace am::ops
