#include "models/blocks/attention.h"

#include <string>

#include "core/error.h"
#include "models/blocks/fused_proj.h"
#include "models/blocks/lora.h"
#include "models/blocks/norm.h"
#include "ops/kv_attention.h"

namespace am {

AttentionWeights register_attention(ParamStore& ps, const std::string& pre, const io::ModelConfig& c) {
  const int64_t H = c.hidden_size, D = c.head_dim, nh = c.num_attention_heads, nkv = c.num_key_value_heads;
  AttentionWeights w;
  // GptOssAttention's own parameter comes before its submodules' in its state_dict.
  if (c.attn_sinks) w.sinks = &ps.add(pre + "sinks", {nh});
  if (c.fused_qkv) {  // Phi3Attention registers o_proj, then qkv_proj; neither has a bias
    w.o = &ps.add(pre + "o_proj.weight", {H, nh * D});
    w.qkv = &ps.add(pre + "qkv_proj.weight", {(nh + 2 * nkv) * D, H});
    return w;
  }
  w.q = &ps.add(pre + "q_proj.weight", {nh * D, H});
  if (c.attention_bias) w.q_bias = &ps.add(pre + "q_proj.bias", {nh * D});
  w.k = &ps.add(pre + "k_proj.weight", {nkv * D, H});
  if (c.attention_bias) w.k_bias = &ps.add(pre + "k_proj.bias", {nkv * D});
  w.v = &ps.add(pre + "v_proj.weight", {nkv * D, H});
  if (c.attention_bias) w.v_bias = &ps.add(pre + "v_proj.bias", {nkv * D});
  w.o = &ps.add(pre + "o_proj.weight", {H, nh * D});
  if (c.o_proj_bias) w.o_bias = &ps.add(pre + "o_proj.bias", {H});
  if (c.qk_norm) {  // per head over D (qwen3), or over the whole projection (olmoe)
    w.q_norm = &ps.add(pre + "q_norm.weight", {c.qk_norm_full ? nh * D : D});
    w.k_norm = &ps.add(pre + "k_norm.weight", {c.qk_norm_full ? nkv * D : D});
  }
  if (fused_proj_enabled()) {  // one [(nh + 2 nkv) D, H] weight view, and one [(nh + 2 nkv) D] bias view
    w.fuse_qkv = true;
    ps.colocate({w.q, w.k, w.v});
    if (c.attention_bias) ps.colocate({w.q_bias, w.k_bias, w.v_bias});
  }
  return w;
}


namespace {

// q, k, v as one GEMM (fused_proj.h), or ok = false.
StackedProj stacked_qkv(const AttentionWeights& w, bool for_backward) {
  if (!w.fuse_qkv) return {};
  return stack_proj({w.q, w.k, w.v}, {w.q_bias, w.k_bias, w.v_bias}, for_backward);
}

// q, k, v of x [N, H] as attention reads them: projections (+ biases), q/k RMSNorm, RoPE.
// q [N, nh*D], k/v [N, nkv*D]. Fills the norm's saved tensors of s when non-null.
struct Qkv {
  Tensor q, k, v;
};
Qkv project_qkv(const AttentionWeights& w, const AttentionGeometry& g, const Tensor& x, const Tensor& cos,
                const Tensor& sin, AttentionSaved* s) {
  const int64_t N = x.dim(0), nh = g.n_heads, nkv = g.n_kv_heads, D = g.head_dim;
  Tensor q = g.ex->empty({N, nh * D}), k = g.ex->empty({N, nkv * D}),
         v = g.ex->empty({N, nkv * D});
  bool rotated = false;
  const StackedProj sp = stacked_qkv(w, false);
  if (w.qkv || sp.ok) {
    // One GEMM into [N, q | k | v], then one pass that splits it, rotating q and k unless a q/k norm comes first.
    Tensor qkv = g.ex->empty({N, (nh + 2 * nkv) * D});
    if (w.qkv) proj_fwd(*g.ex, *w.qkv, nullptr, x, qkv);
    else stacked_fwd(sp, x, qkv);
    Tensor q3 = q.view({N, nh, D}), k3 = k.view({N, nkv, D}), v3 = v.view({N, nkv, D});
    rotated = !w.q_norm;
    ops::qkv_split_rope(qkv, rotated ? &cos : nullptr, rotated ? &sin : nullptr, q3, k3, v3);
  } else {
    proj_fwd(*g.ex, *w.q, w.q_bias, x, q);
    proj_fwd(*g.ex, *w.k, w.k_bias, x, k);
    proj_fwd(*g.ex, *w.v, w.v_bias, x, v);
  }
  if (w.q_norm) {
    // RMSNorm over rows of the norm's width: per head (q as [N*nh, D]) or the whole projection ([N, nh*D]).
    const int64_t qw = w.q_norm->work.numel(), kw = w.k_norm->work.numel();
    const int64_t qrows = N * nh * D / qw, krows = N * nkv * D / kw;
    Tensor qn = g.ex->empty({qrows, qw}), kn = g.ex->empty({krows, kw});
    Tensor qr = g.ex->empty({qrows}, DType::F32), kr = g.ex->empty({krows}, DType::F32);
    ops::rmsnorm_fwd(q.view({qrows, qw}), norm_weight(*g.ex, w.q_norm->work, g.norm_plus_one), g.norm_eps, qn, qr);
    ops::rmsnorm_fwd(k.view({krows, kw}), norm_weight(*g.ex, w.k_norm->work, g.norm_plus_one), g.norm_eps, kn, kr);
    if (s) {
      s->q_pre = q;
      s->k_pre = k;
      s->q_rstd = qr;
      s->k_rstd = kr;
    }
    q = qn.view({N, nh * D});
    k = kn.view({N, nkv * D});
  }
  if (!rotated) {
    Tensor q3 = q.view({N, nh, D}), k3 = k.view({N, nkv, D});
    ops::rope_fwd_(q3, cos, sin);
    ops::rope_fwd_(k3, cos, sin);
  }
  return {q, k, v};
}

// p with the layer's sinks (gpt_oss), if any.
ops::AttnParams with_sinks(const AttentionWeights& w, const ops::AttnParams& p) {
  ops::AttnParams out = p;
  if (w.sinks) out.sinks = &w.sinks->work;
  return out;
}

}  // namespace

Tensor attention_forward(const AttentionWeights& w, const AttentionGeometry& g, const Tensor& x, const Tensor& cos,
                         const Tensor& sin, const ops::AttnParams& p0, AttentionSaved* s, Tensor* residual) {
  const int64_t N = x.dim(0), nh = g.n_heads, nkv = g.n_kv_heads, D = g.head_dim;
  const ops::AttnParams p = with_sinks(w, p0);
  auto [q, k, v] = project_qkv(w, g, x, cos, sin, s);
  Tensor o = g.ex->empty({N, nh * D});
  Tensor o4 = o.view({p.batch, p.seq, nh, D});
  Tensor lse = g.ex->empty({p.batch, nh, p.seq}, DType::F32);
  ops::attention_fwd(q.view({p.batch, p.seq, nh, D}), k.view({p.batch, p.seq, nkv, D}),
                     v.view({p.batch, p.seq, nkv, D}), p, o4, lse);
  Tensor y = residual ? *residual : g.ex->empty({N, g.hidden});
  proj_fwd(*g.ex, *w.o, w.o_bias, o, y, /*accumulate=*/residual != nullptr);
  if (s) {
    s->x = x;
    s->q = q;
    s->k = k;
    s->v = v;
    s->o = o;
    s->lse = lse;
  }
  return y;
}

Tensor attention_forward_cached(const AttentionWeights& w, const AttentionGeometry& g, const Tensor& x,
                                const Tensor& cos, const Tensor& sin, const ops::AttnParams& p0, KvCache& cache,
                                int64_t layer) {
  const ops::AttnParams p = with_sinks(w, p0);
  const int64_t N = x.dim(0), nh = g.n_heads, nkv = g.n_kv_heads, D = g.head_dim, past = cache.length();
  if (p.batch != 1 || p.seq != N)
    throw ShapeError("attention_forward_cached: expected one sequence of " + std::to_string(N) + " tokens, got B = " +
                     std::to_string(p.batch) + ", T = " + std::to_string(p.seq));
  auto [q, k, v] = project_qkv(w, g, x, cos, sin, nullptr);
  cache.write(layer, k, v);
  Tensor o = g.ex->empty({N, nh * D});
  Tensor o4 = o.view({1, N, nh, D});
  if (past == 0) {
    // Prefill: the prompt sees only itself, which is the training attention (flash kernels on CUDA).
    Tensor lse = g.ex->empty({1, nh, N}, DType::F32);
    ops::attention_fwd(q.view({1, N, nh, D}), k.view({1, N, nkv, D}), v.view({1, N, nkv, D}), p, o4, lse);
  } else {
    // Decode: the new queries at positions past .. past + N - 1 over the cache's past + N rows.
    ops::attention_kv_fwd(q.view({1, N, nh, D}), cache.keys(layer, past + N), cache.values(layer, past + N), p, o4);
  }
  Tensor y = g.ex->empty({N, g.hidden});
  proj_fwd(*g.ex, *w.o, w.o_bias, o, y);
  return y;
}

Tensor attention_backward(const AttentionWeights& w, const AttentionGeometry& g, const AttentionSaved& s,
                          const Tensor& cos, const Tensor& sin, const ops::AttnParams& p0, const Tensor& dy) {
  const int64_t N = dy.dim(0), nh = g.n_heads, nkv = g.n_kv_heads, D = g.head_dim;
  const ops::AttnParams p = with_sinks(w, p0);
  Tensor d_o = g.ex->empty({N, nh * D});
  proj_bwd(*g.ex, *w.o, w.o_bias, s.o, dy, &d_o);
  Tensor dq = g.ex->empty({N, nh * D}), dk = g.ex->empty({N, nkv * D}),
         dv = g.ex->empty({N, nkv * D});
  Tensor dq4 = dq.view({p.batch, p.seq, nh, D}), dk4 = dk.view({p.batch, p.seq, nkv, D}),
         dv4 = dv.view({p.batch, p.seq, nkv, D});
  ops::attention_bwd(s.q.view({p.batch, p.seq, nh, D}), s.k.view({p.batch, p.seq, nkv, D}),
                     s.v.view({p.batch, p.seq, nkv, D}), s.o.view({p.batch, p.seq, nh, D}), s.lse,
                     d_o.view({p.batch, p.seq, nh, D}), p, dq4, dk4, dv4, w.sinks ? grad_or_null(w.sinks) : nullptr);
  Tensor dx = g.ex->empty({N, g.hidden});
  const StackedProj sp = stacked_qkv(w, true);
  if ((w.qkv || sp.ok) && !w.q_norm) {
    // The fused GEMM's output gradient [N, dq | dk | dv] in one pass with the inverse rotation, then one dX GEMM
    // and one dW GEMM for the three weights.
    Tensor dqkv = g.ex->empty({N, (nh + 2 * nkv) * D});
    ops::qkv_merge_rope_bwd(dq.view({N, nh, D}), dk.view({N, nkv, D}), dv.view({N, nkv, D}), &cos, &sin, dqkv);
    if (w.qkv) proj_bwd(*g.ex, *w.qkv, nullptr, s.x, dqkv, &dx);
    else stacked_bwd(sp, s.x, dqkv, &dx);
    return dx;
  }
  Tensor dq3 = dq.view({N, nh, D}), dk3 = dk.view({N, nkv, D});
  ops::rope_bwd_(dq3, cos, sin);
  ops::rope_bwd_(dk3, cos, sin);
  if (w.q_norm) {
    const int64_t qw = w.q_norm->work.numel(), kw = w.k_norm->work.numel();
    const int64_t qrows = N * nh * D / qw, krows = N * nkv * D / kw;
    Tensor dqp = g.ex->empty({qrows, qw}), dkp = g.ex->empty({krows, kw});
    ops::rmsnorm_bwd(s.q_pre.view({qrows, qw}), norm_weight(*g.ex, w.q_norm->work, g.norm_plus_one), s.q_rstd,
                     dq.view({qrows, qw}), dqp, w.q_norm->grad);
    ops::rmsnorm_bwd(s.k_pre.view({krows, kw}), norm_weight(*g.ex, w.k_norm->work, g.norm_plus_one), s.k_rstd,
                     dk.view({krows, kw}), dkp, w.k_norm->grad);
    dq = dqp.view({N, nh * D});
    dk = dkp.view({N, nkv * D});
  }
  if (w.qkv || sp.ok) {  // q/k norm families: the fused GEMM's output gradient [N, dq | dk | dv], unrotated
    Tensor dqkv = g.ex->empty({N, (nh + 2 * nkv) * D});
    ops::qkv_merge_rope_bwd(dq.view({N, nh, D}), dk.view({N, nkv, D}), dv.view({N, nkv, D}), nullptr, nullptr, dqkv);
    if (w.qkv) proj_bwd(*g.ex, *w.qkv, nullptr, s.x, dqkv, &dx);
    else stacked_bwd(sp, s.x, dqkv, &dx);
    return dx;
  }
  // dx = dq Wq + dk Wk + dv Wv: k's and v's dX GEMMs accumulate into dx (proj_bwd's accumulate_dx: beta = 1 on
  // CUDA; on the CPU the same temporary + add as before).
  proj_bwd(*g.ex, *w.q, w.q_bias, s.x, dq, &dx);
  proj_bwd(*g.ex, *w.k, w.k_bias, s.x, dk, &dx, /*accumulate_dx=*/true);
  proj_bwd(*g.ex, *w.v, w.v_bias, s.x, dv, &dx, /*accumulate_dx=*/true);
  return dx;
}

}  // namespace am
