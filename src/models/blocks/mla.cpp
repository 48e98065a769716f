#include "models/blocks/mla.h"

#include <string>

#include "core/error.h"
#include "models/blocks/lora.h"
#include "ops/kv_attention.h"
#include "ops/mla_ops.h"

namespace am {

namespace {

constexpr float kInnerEps = 1e-6f;  // DeepseekV3RMSNorm(q_lora_rank) / (kv_lora_rank): the class default eps

// dst[r, d_off + j] = src[r, s_off + j] for r < R, j < w, with dst / src read as [R, d_ld] / [R, s_ld] row-major
// (ops::copy_cols_: a host copy, cudaMemcpy2DAsync on CUDA).
void copy_cols(const Tensor& dst, int64_t d_ld, int64_t d_off, const Tensor& src, int64_t s_ld, int64_t s_off,
               int64_t R, int64_t w) {
  Tensor d = dst.view({R, d_ld});
  ops::copy_cols_(d, d_off, src.view({R, s_ld}), s_off, w);
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
  ops::mla_gather_cols(q.view({N * nh, dq}), dn, g.interleave, qr);
  ops::mla_gather_cols(ckv, rkv, g.interleave, kr);
  ops::rope_fwd_(qr, cos, sin);
  ops::rope_fwd_(kr, cos, sin);
  Tensor Q = q;  // [N, nh, dq]: the nope part in place, the tail replaced by the rotated rope dims
  copy_cols(Q, dq, dn, qr, dr, 0, N * nh, dr);
  Tensor K = ex.empty({N, nh * dq}), V = ex.empty({N, nh * dv});
  copy_cols(K, dq, 0, kv, kvw, 0, N * nh, dn);   // k_nope
  copy_cols(V, dv, 0, kv, kvw, dn, N * nh, dv);  // v
  Tensor K3 = K.view({N, nh, dq});
  ops::mla_scatter_cols(kr, false, K3, dn);  // k_pe (already in rotation order) to the tail of every head
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
  Tensor dQ2 = dQ.view({N * nh, dq});
  ops::mla_scatter_cols(dqr, g.interleave, dQ2, dn);
  // k_pe: summed over the heads it was broadcast to (fp32, head order), then back through RoPE.
  Tensor dkr = ex.empty({N, 1, dr});
  ops::mla_gather_cols(dK.view({N, nh, dq}), dn, false, dkr);
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
  ops::mla_scatter_cols(dkr, g.interleave, dckv, rkv);
  // dx = dckv Wkv_a + (the q path's input gradient): the q path's last dX GEMM accumulates into dx (beta = 1 on
  // CUDA; CPU: temporary + add as before).
  Tensor dx = ex.empty({N, g.hidden});
  proj_bwd(ex, *w.kv_a, w.kv_a_bias, s.x, dckv, &dx);
  if (w.q) {
    proj_bwd(ex, *w.q, nullptr, s.x, dQ, &dx, /*accumulate_dx=*/true);
  } else {
    Tensor dqan = ex.empty({N, g.q_lora_rank}), dqa = ex.empty({N, g.q_lora_rank});
    proj_bwd(ex, *w.q_b, nullptr, s.qan, dQ, &dqan);
    ops::rmsnorm_bwd(s.qa, w.q_a_norm->work, s.qa_rstd, dqan, dqa, w.q_a_norm->grad);
    proj_bwd(ex, *w.q_a, w.q_a_bias, s.x, dqa, &dx, /*accumulate_dx=*/true);
  }
  return dx;
}

}  // namespace am
