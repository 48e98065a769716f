#include "models/blocks/mla.h"

#include <algorithm>

#include "core/error.h"
#include "models/blocks/lora.h"
#include "ops/kv_attention.h"

namespace am {

namespace {

constexpr float kInnerEps = 1e-6f;  // DeepseekV3RMSNorm(q_lora_rank) / (kv_lora_rank): the class default eps

// Rope dims within a head: position j of the (rotated) rope block reads stored dim src_dim(j). Interleaved
// (HF view(d/2, 2).transpose): [x0, x2, .., x_{d-2}, x1, x3, ..]; else the identity.
inline int64_t src_dim(int64_t j, int64_t d, bool interleave) {
  if (!interleave) return j;
  return j < d / 2 ? 2 * j : 2 * (j - d / 2) + 1;
}

float* host_f32(const Tensor& t, const char* what) {
  if (t.device() != DeviceType::CPU || t.dtype() != DType::F32)
    throw DeviceError(std::string("deepseek MLA attention (") + what + ") is not implemented on CUDA yet");
  return const_cast<Tensor&>(t).f32();
}

// dst[r, d_off + j] = src[r, s_off + j] for r < R, j < w (rows d_ld / s_ld wide).
void copy_cols(const Tensor& dst, int64_t d_ld, int64_t d_off, const Tensor& src, int64_t s_ld, int64_t s_off,
               int64_t R, int64_t w) {
  float* d = host_f32(dst, "column copy");
  const float* s = host_f32(src, "column copy");
  for (int64_t r = 0; r < R; ++r) std::copy(s + r * s_ld + s_off, s + r * s_ld + s_off + w, d + r * d_ld + d_off);
}

// Rope block gather: dst [R, w] row r = the w rope dims of src row r starting at s_off, in rotation order.
void gather_rope(const Tensor& dst, const Tensor& src, int64_t s_ld, int64_t s_off, int64_t R, int64_t w, bool il) {
  float* d = host_f32(dst, "rope gather");
  const float* s = host_f32(src, "rope gather");
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < w; ++j) d[r * w + j] = s[r * s_ld + s_off + src_dim(j, w, il)];
}

// Its transpose: dst row r at d_off + src_dim(j) = src [R, w] (assigned).
void scatter_rope(const Tensor& dst, int64_t d_ld, int64_t d_off, const Tensor& src, int64_t R, int64_t w, bool il) {
  float* d = host_f32(dst, "rope scatter");
  const float* s = host_f32(src, "rope scatter");
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < w; ++j) d[r * d_ld + d_off + src_dim(j, w, il)] = s[r * w + j];
}

}  // namespace

MlaGeometry MlaGeometry::of(const io::ModelConfig& c, const ExecContext* ex) {
  const auto& d = c.ds;
  return MlaGeometry{c.num_attention_heads, c.hidden_size, d.q_lora_rank, d.kv_lora_rank, d.qk_nope_head_dim,
                     d.qk_rope_head_dim, d.v_head_dim, d.rope_interleave, ex};
}

MlaWeights register_mla(ParamStore& ps, const std::string& pre, const io::ModelConfig& c) {
  const MlaGeometry g = MlaGeometry::of(c, nullptr);
  const int64_t H = c.hidden_size, nh = g.n_heads;
  MlaWeights w;
  if (g.q_lora_rank == 0) {
    w.q = &ps.add(pre + "q_proj.weight", {nh * g.qk_dim(), H});
  } else {
    w.q_a = &ps.add(pre + "q_a_proj.weight", {g.q_lora_rank, H});
    if (c.attention_bias) w.q_a_bias = &ps.add(pre + "q_a_proj.bias", {g.q_lora_rank});
    w.q_a_norm = &ps.add(pre + "q_a_layernorm.weight", {g.q_lora_rank});
    w.q_b = &ps.add(pre + "q_b_proj.weight", {nh * g.qk_dim(), g.q_lora_rank});
  }
  w.kv_a = &ps.add(pre + "kv_a_proj_with_mqa.weight", {g.kv_lora_rank + g.rope, H});
  if (c.attention_bias) w.kv_a_bias = &ps.add(pre + "kv_a_proj_with_mqa.bias", {g.kv_lora_rank + g.rope});
  w.kv_a_norm = &ps.add(pre + "kv_a_layernorm.weight", {g.kv_lora_rank});
  w.kv_b = &ps.add(pre + "kv_b_proj.weight", {nh * (g.nope + g.v_dim), g.kv_lora_rank});
  w.o = &ps.add(pre + "o_proj.weight", {H, nh * g.v_dim});
  if (c.attention_bias) w.o_bias = &ps.add(pre + "o_proj.bias", {H});
  return w;
}

namespace {

// Everything before the attention op: Q, K [N, nh*dq], V [N, nh*dv] as attention reads them, and (when s is
// non-null) what backward needs of the projections.
struct MlaQkv {
  Tensor Q, K, V;
};
MlaQkv mla_project(const MlaWeights& w, const MlaGeometry& g, const Tensor& x, const Tensor& cos, const Tensor& sin,
                   MlaSaved* s) {
  const ExecContext& ex = *g.ex;
  const int64_t N = x.dim(0), nh = g.n_heads, dq = g.qk_dim(), dn = g.nope, dr = g.rope, dv = g.v_dim;
  const int64_t rkv = g.kv_lora_rank, ckw = rkv + dr, kvw = dn + dv;
  // q [N, nh*dq]
  Tensor q = ex.empty({N, nh * dq}), qa, qa_rstd, qan;
  if (w.q) {
    proj_fwd(ex, *w.q, nullptr, x, q);
  } else {
    qa = ex.empty({N, g.q_lora_rank});
    proj_fwd(ex, *w.q_a, w.q_a_bias, x, qa);
    qan = ex.empty({N, g.q_lora_rank});
    qa_rstd = ex.empty({N}, DType::F32);
    ops::rmsnorm_fwd(qa, w.q_a_norm->work, kInnerEps, qan, qa_rstd);
    proj_fwd(ex, *w.q_b, nullptr, qan, q);
  }
  // ckv [N, rkv + dr] -> latent -> kv [N, nh*(dn+dv)]
  Tensor ckv = ex.empty({N, ckw});
  proj_fwd(ex, *w.kv_a, w.kv_a_bias, x, ckv);
  Tensor latent = ex.empty({N, rkv}), latn = ex.empty({N, rkv}), lat_rstd = ex.empty({N}, DType::F32);
  copy_cols(latent, rkv, 0, ckv, ckw, 0, N, rkv);
  ops::rmsnorm_fwd(latent, w.kv_a_norm->work, kInnerEps, latn, lat_rstd);
  Tensor kv = ex.empty({N, nh * kvw});
  proj_fwd(ex, *w.kv_b, nullptr, latn, kv);
  // RoPE on the rope dims (gathered in rotation order), written back as the tail of each head.
  Tensor qr = ex.empty({N, nh, dr}), kr = ex.empty({N, 1, dr});
  gather_rope(qr, q, dq, dn, N * nh, dr, g.interleave);
  gather_rope(kr, ckv, ckw, rkv, N, dr, g.interleave);
  ops::rope_fwd_(qr, cos, sin);
  ops::rope_fwd_(kr, cos, sin);
  Tensor Q = q;  // [N, nh, dq]: the nope part in place, the tail replaced by the rotated rope dims
  copy_cols(Q, dq, dn, qr, dr, 0, N * nh, dr);
  Tensor K = ex.empty({N, nh * dq}), V = ex.empty({N, nh * dv});
  copy_cols(K, dq, 0, kv, kvw, 0, N * nh, dn);   // k_nope
  copy_cols(V, dv, 0, kv, kvw, dn, N * nh, dv);  // v
  {
    float* k = host_f32(K, "k_pe broadcast");
    const float* r = host_f32(kr, "k_pe broadcast");
    for (int64_t t = 0; t < N; ++t)
      for (int64_t h = 0; h < nh; ++h) std::copy(r + t * dr, r + (t + 1) * dr, k + (t * nh + h) * dq + dn);
  }
  if (s) {
    s->x = x;
    s->qa = qa;
    s->qa_rstd = qa_rstd;
    s->qan = qan;
    s->latent = latent;
    s->lat_rstd = lat_rstd;
    s->latn = latn;
    s->q = Q;
    s->k = K;
    s->v = V;
  }
  return {Q, K, V};
}

}  // namespace

Tensor mla_forward(const MlaWeights& w, const MlaGeometry& g, const Tensor& x, const Tensor& cos, const Tensor& sin,
                   const ops::AttnParams& p, MlaSaved* s) {
  const ExecContext& ex = *g.ex;
  const int64_t N = x.dim(0), nh = g.n_heads, dq = g.qk_dim(), dv = g.v_dim;
  auto [Q, K, V] = mla_project(w, g, x, cos, sin, s);
  Tensor o = ex.empty({N, nh * dv});
  Tensor lse = ex.empty({p.batch, nh, p.seq}, DType::F32);
  Tensor o4 = o.view({p.batch, p.seq, nh, dv});
  ops::attention_fwd(Q.view({p.batch, p.seq, nh, dq}), K.view({p.batch, p.seq, nh, dq}),
                     V.view({p.batch, p.seq, nh, dv}), p, o4, lse);
  Tensor y = ex.empty({N, g.hidden});
  proj_fwd(ex, *w.o, w.o_bias, o, y);
  if (s) {
    s->o = o;
    s->lse = lse;
  }
  return y;
}

Tensor mla_forward_cached(const MlaWeights& w, const MlaGeometry& g, const Tensor& x, const Tensor& cos,
                          const Tensor& sin, const ops::AttnParams& p, KvCache& cache, int64_t layer) {
  const ExecContext& ex = *g.ex;
  const int64_t N = x.dim(0), nh = g.n_heads, dq = g.qk_dim(), dv = g.v_dim, past = cache.length();
  if (p.batch != 1 || p.seq != N)
    throw ShapeError("mla_forward_cached: expected one sequence of " + std::to_string(N) + " tokens, got B = " +
                     std::to_string(p.batch) + ", T = " + std::to_string(p.seq));
  auto [Q, K, V] = mla_project(w, g, x, cos, sin, nullptr);
  cache.write(layer, K, V);
  Tensor o = ex.empty({N, nh * dv});
  Tensor o4 = o.view({1, N, nh, dv});
  if (past == 0) {  // prefill: the training kernel
    Tensor lse = ex.empty({1, nh, N}, DType::F32);
    ops::attention_fwd(Q.view({1, N, nh, dq}), K.view({1, N, nh, dq}), V.view({1, N, nh, dv}), p, o4, lse);
  } else {
    ops::attention_kv_fwd(Q.view({1, N, nh, dq}), cache.keys(layer, past + N), cache.values(layer, past + N), p, o4);
  }
  Tensor y = ex.empty({N, g.hidden});
  proj_fwd(ex, *w.o, w.o_bias, o, y);
  return y;
}

Tensor mla_backward(const MlaWeights& w, const MlaGeometry& g, const MlaSaved& s, const Tensor& cos,
                    const Tensor& sin, const ops::AttnParams& p, const Tensor& dy) {
  const ExecContext& ex = *g.ex;
  const int64_t N = dy.dim(0), nh = g.n_heads, dq = g.qk_dim(), dn = g.nope, dr = g.rope, dv = g.v_dim;
  const int64_t rkv = g.kv_lora_rank, ckw = rkv + dr, kvw = dn + dv;
  Tensor d_o = ex.empty({N, nh * dv});
  proj_bwd(ex, *w.o, w.o_bias, s.o, dy, &d_o);
  Tensor dQ = ex.empty({N, nh * dq}), dK = ex.empty({N, nh * dq}), dV = ex.empty({N, nh * dv});
  Tensor dQ4 = dQ.view({p.batch, p.seq, nh, dq}), dK4 = dK.view({p.batch, p.seq, nh, dq}),
         dV4 = dV.view({p.batch, p.seq, nh, dv});
  ops::attention_bwd(s.q.view({p.batch, p.seq, nh, dq}), s.k.view({p.batch, p.seq, nh, dq}),
                     s.v.view({p.batch, p.seq, nh, dv}), s.o.view({p.batch, p.seq, nh, dv}), s.lse,
                     d_o.view({p.batch, p.seq, nh, dv}), p, dQ4, dK4, dV4);
  d_o = Tensor();
  // q: the rope tail back through RoPE and the permutation; dq [N, nh*dq] reuses dQ.
  Tensor dqr = ex.empty({N, nh, dr});
  copy_cols(dqr, dr, 0, dQ, dq, dn, N * nh, dr);
  ops::rope_bwd_(dqr, cos, sin);
  scatter_rope(dQ, dq, dn, dqr, N * nh, dr, g.interleave);
  // k_pe: summed over the heads it was broadcast to, then back through RoPE.
  Tensor dkr = ex.zeros({N, 1, dr}, ex.act_dtype);
  {
    float* d = host_f32(dkr, "k_pe gradient");
    const float* k = host_f32(dK, "k_pe gradient");
    for (int64_t t = 0; t < N; ++t)
      for (int64_t h = 0; h < nh; ++h)
        for (int64_t j = 0; j < dr; ++j) d[t * dr + j] += k[(t * nh + h) * dq + dn + j];
  }
  ops::rope_bwd_(dkr, cos, sin);
  // kv [N, nh*(dn+dv)] <- dk_nope, dv
  Tensor dkv = ex.empty({N, nh * kvw});
  copy_cols(dkv, kvw, 0, dK, dq, 0, N * nh, dn);
  copy_cols(dkv, kvw, dn, dV, dv, 0, N * nh, dv);
  dK = dV = Tensor();
  Tensor dlatn = ex.empty({N, rkv}), dlatent = ex.empty({N, rkv});
  proj_bwd(ex, *w.kv_b, nullptr, s.latn, dkv, &dlatn);
  ops::rmsnorm_bwd(s.latent, w.kv_a_norm->work, s.lat_rstd, dlatn, dlatent, w.kv_a_norm->grad);
  Tensor dckv = ex.empty({N, ckw});
  copy_cols(dckv, ckw, 0, dlatent, rkv, 0, N, rkv);
  scatter_rope(dckv, ckw, rkv, dkr, N, dr, g.interleave);
  Tensor dx = ex.empty({N, g.hidden}), tmp = ex.empty({N, g.hidden});
  proj_bwd(ex, *w.kv_a, w.kv_a_bias, s.x, dckv, &dx);
  if (w.q) {
    proj_bwd(ex, *w.q, nullptr, s.x, dQ, &tmp);
  } else {
    Tensor dqan = ex.empty({N, g.q_lora_rank}), dqa = ex.empty({N, g.q_lora_rank});
    proj_bwd(ex, *w.q_b, nullptr, s.qan, dQ, &dqan);
    ops::rmsnorm_bwd(s.qa, w.q_a_norm->work, s.qa_rstd, dqan, dqa, w.q_a_norm->grad);
    proj_bwd(ex, *w.q_a, w.q_a_bias, s.x, dqa, &tmp);
  }
  ops::add_(dx, tmp);
  return dx;
}

}  // namespace am
