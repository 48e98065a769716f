// The parameters of an attention call (ops::attention_fwd/bwd, ops::attention_kv_fwd and the backends'
// kernels). In core/ so that backend headers need not include ops/ (ops/ is the door to the backends, not
// the other way round).
#pragma once
#include <cstdint>

#include "core/tensor.h"

namespace am {

struct AttnParams {
  int64_t batch = 0, seq = 0;            // B, T
  int64_t n_heads = 0, n_kv_heads = 0;   // GQA: n_heads % n_kv_heads == 0
  int64_t head_dim = 0;
  float scale = 0.f;                     // usually 1/sqrt(head_dim)
  int64_t sliding_window = 0;            // 0: none; else key j visible to query i iff i - j < window
  const Tensor* segment_ids = nullptr;   // [B, T] int32 or nullptr. Query sees key only within the same
                                         // segment (packing); segment < 0 marks padding (sees nothing)
  // gpt_oss attention sinks: [nh] fp32 or nullptr. Head h's learned logit s_h joins every softmax row's
  // denominator as one more (value-less) column, dropped after the softmax (HF GptOss eager_attention_forward):
  //   P_ij = exp(score_ij - lse_i), lse_i = log(sum_j exp(score_ij) + exp(s_h)), out_i = sum_j P_ij v_j
  // so a row's probabilities sum to 1 - exp(s_h - lse_i). On q's device; on CUDA fp32 or bf16 (the model's
  // working copy).
  const Tensor* sinks = nullptr;
  int64_t v_head_dim = 0;                // Dv of v / out when it differs from the q/k head_dim (DeepSeek MLA:
                                         // 192 vs 128); 0 = head_dim.
  // Gemma 2 attn_logit_softcapping: 0 = off; else every score s = scale q.k becomes softcap * tanh(s / softcap)
  // before the mask and softmax (and the backward multiplies by 1 - tanh^2).
  float softcap = 0.f;
  int64_t dv() const { return v_head_dim > 0 ? v_head_dim : head_dim; }
};

}  // namespace am
