// CPU reference of ops::attention_kv_fwd (contract in src/ops/kv_attention.h): raw fp32 host pointers,
// shapes already checked by the front-end.
#pragma once
#include <cstdint>

namespace am::cpu {

struct KvAttnDims {
  int64_t batch = 0, q_len = 0, kv_len = 0;  // B, Tq, Tk (Tk >= Tq)
  int64_t n_heads = 0, n_kv_heads = 0, head_dim = 0;
  int64_t v_head_dim = 0;      // Dv of v / out (0: head_dim; DeepSeek MLA: differs)
  float scale = 0.f;
  int64_t sliding_window = 0;  // 0: none
  const float* sinks = nullptr;  // [nh] or null: gpt_oss sink logits (one value-less softmax column per head)
  float softcap = 0.f;           // 0: off; else scores -> softcap * tanh(score / softcap) (Gemma 2)
};
// q [B, Tq, nh, D], k [B, Tk, nkv, D], v [B, Tk, nkv, Dv] -> out [B, Tq, nh, Dv].
void attention_kv_fwd(const float* q, const float* k, const float* v, const KvAttnDims& p, float* out);

}  // namespace am::cpu
