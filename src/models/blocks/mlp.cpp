#include "models/blocks/mlp.h"

#include "core/error.h"
#include "models/blocks/fused_proj.h"
#include "models/blocks/lora.h"
#include "ops/mamba2_ops.h"
#include "ops/moe_ops.h"
#include "ops/ops.h"

namespace am {

MlpAct mlp_act_from_config(const std::string& name, const std::string& key) {
  if (name == "silu" || name == "swish") return MlpAct::Silu;
  // transformers' ACT2FN: "gelu_pytorch_tanh" and "gelu_new" are the same tanh approximation.
  if (name == "gelu_pytorch_tanh" || name == "gelu_new") return MlpAct::GeluTanh;
  throw FormatError("config.json: " + key + " '" + name + "' is not supported (silu, gelu_pytorch_tanh)");
}

namespace {
void act_fwd(MlpAct a, const Tensor& gate, const Tensor& up, Tensor& h) {
  if (a == MlpAct::GeluTanh) ops::geglu_fwd(gate, up, h);
  else ops::swiglu_fwd(gate, up, h);
}
void act_bwd(MlpAct a, const Tensor& gate, const Tensor& up, const Tensor& dh, Tensor& dgate, Tensor& dup) {
  if (a == MlpAct::GeluTanh) ops::geglu_bwd(gate, up, dh, dgate, dup);
  else ops::swiglu_bwd(gate, up, dh, dgate, dup);
}
// The same on the fused layout gu [N, 2I] (gate | up per row): element math identical to the above.
void act_fused_fwd(MlpAct a, const Tensor& gu, Tensor& h) {
  if (a == MlpAct::GeluTanh) ops::geglu_fused_fwd(gu, h);
  else ops::swiglu_fused_fwd(gu, h);
}
void act_fused_bwd(MlpAct a, const Tensor& gu, const Tensor& dh, Tensor& dgu) {
  if (a == MlpAct::GeluTanh) ops::geglu_fused_bwd(gu, dh, dgu);
  else ops::swiglu_fused_bwd(gu, dh, dgu);
}
}  // namespace

MlpWeights register_mlp(ParamStore& ps, const std::string& pre, int64_t H, int64_t I, bool bias, MlpAct act) {
  MlpWeights w;
  w.act = act;
  w.gate = &ps.add(pre + "gate_proj.weight", {I, H});
  if (bias) w.gate_bias = &ps.add(pre + "gate_proj.bias", {I});
  w.up = &ps.add(pre + "up_proj.weight", {I, H});
  if (bias) w.up_bias = &ps.add(pre + "up_proj.bias", {I});
  w.down = &ps.add(pre + "down_proj.weight", {H, I});
  if (bias) w.down_bias = &ps.add(pre + "down_proj.bias", {H});
  if (fused_proj_enabled()) {  // one [2I, H] weight view (and one [2I] bias view)
    w.fuse_gate_up = true;
    ps.colocate({w.gate, w.up});
    if (bias) ps.colocate({w.gate_bias, w.up_bias});
  }
  return w;
}


MlpWeights register_mlp_ungated(ParamStore& ps, const std::string& pre, int64_t H, int64_t I) {
  MlpWeights w;
  w.act = MlpAct::Relu2;
  w.up = &ps.add(pre + "up_proj.weight", {I, H});
  w.down = &ps.add(pre + "down_proj.weight", {H, I});
  return w;
}

MlpWeights register_mlp_fused(ParamStore& ps, const std::string& pre, int64_t H, int64_t I) {
  MlpWeights w;
  w.gate_up = &ps.add(pre + "gate_up_proj.weight", {2 * I, H});
  w.down = &ps.add(pre + "down_proj.weight", {H, I});
  return w;
}

namespace {
// The ungated path (nemotron_h): u = x Wu^T [N, I], h = relu(u)^2, y = h Wd^T.
Tensor ungated_forward(const ExecContext& ex, const MlpWeights& w, const Tensor& x, MlpSaved* s, Tensor* residual) {
  const int64_t N = x.dim(0), I = w.up->shape[0], H = w.down->shape[0];
  Tensor u = ex.empty({N, I}), h = ex.empty({N, I}), y = residual ? *residual : ex.empty({N, H});
  proj_fwd(ex, *w.up, w.up_bias, x, u);
  ops::relu2_fwd(u, h);
  proj_fwd(ex, *w.down, w.down_bias, h, y, /*accumulate=*/residual != nullptr);
  if (s) {
    *s = MlpSaved{};
    s->x = x;
    s->up = u;
  }
  return y;
}
Tensor ungated_backward(const ExecContext& ex, const MlpWeights& w, const MlpSaved& s, const Tensor& dy) {
  const int64_t N = dy.dim(0), I = w.up->shape[0], H = w.down->shape[0];
  Tensor h = ex.empty({N, I});
  ops::relu2_fwd(s.up, h);  // recomputed, as in the gated path
  Tensor dh = ex.empty({N, I});
  proj_bwd(ex, *w.down, w.down_bias, h, dy, &dh);
  Tensor du = ex.empty({N, I}), dx = ex.empty({N, H});
  ops::relu2_bwd(s.up, dh, du);
  proj_bwd(ex, *w.up, w.up_bias, s.x, du, &dx);
  return dx;
}
// gate and up as one GEMM (fused_proj.h), or ok = false.
StackedProj stacked_gate_up(const MlpWeights& w, bool for_backward) {
  if (!w.fuse_gate_up) return {};
  return stack_proj({w.gate, w.up}, {w.gate_bias, w.up_bias}, for_backward);
}
// The fused path: gu = x Wgu^T [N, 2I] (phi3's gate_up, or the stacked gate/up view sp) -> h = act(gu[:, :I]) *
// gu[:, I:] (the MoE experts' fused kernels for SwiGLU).
Tensor fused_forward(const ExecContext& ex, const MlpWeights& w, const StackedProj& sp, const Tensor& x, MlpSaved* s,
                     Tensor* residual) {
  const int64_t N = x.dim(0), I = w.down->shape[1], H = w.down->shape[0];
  Tensor gu = ex.empty({N, 2 * I}), h = ex.empty({N, I}), y = residual ? *residual : ex.empty({N, H});
  if (w.gate_up) proj_fwd(ex, *w.gate_up, nullptr, x, gu);
  else stacked_fwd(sp, x, gu);
  act_fused_fwd(w.act, gu, h);
  proj_fwd(ex, *w.down, w.down_bias, h, y, /*accumulate=*/residual != nullptr);
  if (s) {
    *s = MlpSaved{};
    s->x = x;
    s->gate_up = gu;
  }
  return y;
}
Tensor fused_backward(const ExecContext& ex, const MlpWeights& w, const MlpSaved& s, const Tensor& dy) {
  const int64_t N = dy.dim(0), I = w.down->shape[1], H = w.down->shape[0];
  Tensor h = ex.empty({N, I});
  act_fused_fwd(w.act, s.gate_up, h);  // recomputed, as in the unfused path
  Tensor dh = ex.empty({N, I});
  proj_bwd(ex, *w.down, w.down_bias, h, dy, &dh);
  h = Tensor();
  Tensor dgu = ex.empty({N, 2 * I}), dx = ex.empty({N, H});
  act_fused_bwd(w.act, s.gate_up, dh, dgu);
  if (w.gate_up) {
    proj_bwd(ex, *w.gate_up, nullptr, s.x, dgu, &dx);
    return dx;
  }
  const StackedProj sp = stacked_gate_up(w, true);
  if (sp.ok) {
    stacked_bwd(sp, s.x, dgu, &dx);
    return dx;
  }
  // The weights stopped being back to back between forward and backward (not expected: every layout that
  // moves parameters does it outside a pass); one GEMM each on the halves.
  Tensor dgate = ex.empty({N, I}), dup = ex.empty({N, I});
  ops::copy_cols_(dgate, 0, dgu, 0, I);
  ops::copy_cols_(dup, 0, dgu, I, I);
  proj_bwd(ex, *w.gate, w.gate_bias, s.x, dgate, &dx);
  proj_bwd(ex, *w.up, w.up_bias, s.x, dup, &dx, /*accumulate_dx=*/true);
  return dx;
}
}  // namespace

Tensor mlp_forward(const ExecContext& ex, const MlpWeights& w, const Tensor& x, MlpSaved* s, Tensor* residual) {
  if (w.gate_up) return fused_forward(ex, w, StackedProj{}, x, s, residual);
  if (!w.gate) return ungated_forward(ex, w, x, s, residual);
  if (const StackedProj sp = stacked_gate_up(w, false); sp.ok) return fused_forward(ex, w, sp, x, s, residual);
  const int64_t N = x.dim(0), I = w.gate->shape[0], H = w.down->shape[0];
  Tensor gate = ex.empty({N, I}), up = ex.empty({N, I}),
         h = ex.empty({N, I}), y = residual ? *residual : ex.empty({N, H});
  proj_fwd(ex, *w.gate, w.gate_bias, x, gate);
  proj_fwd(ex, *w.up, w.up_bias, x, up);
  act_fwd(w.act, gate, up, h);
  proj_fwd(ex, *w.down, w.down_bias, h, y, /*accumulate=*/residual != nullptr);
  if (s) *s = MlpSaved{x, gate, up};
  return y;
}

Tensor mlp_backward(const ExecContext& ex, const MlpWeights& w, const MlpSaved& s, const Tensor& dy) {
  if (s.gate_up.defined()) return fused_backward(ex, w, s, dy);
  if (!w.gate) return ungated_backward(ex, w, s, dy);
  const int64_t N = dy.dim(0), I = w.gate->shape[0], H = w.down->shape[0];
  Tensor h = ex.empty({N, I});
  act_fwd(w.act, s.gate, s.up, h);  // the same kernel on the same inputs: bit-identical to forward's h
  Tensor dh = ex.empty({N, I});
  proj_bwd(ex, *w.down, w.down_bias, h, dy, &dh);
  h = Tensor();
  Tensor dgate = ex.empty({N, I}), dup = ex.empty({N, I});
  act_bwd(w.act, s.gate, s.up, dh, dgate, dup);
  // dx = dgate Wg + dup Wu: up's dX GEMM accumulates into dx (beta = 1 on CUDA; CPU: temporary + add as before).
  Tensor dx = ex.empty({N, H});
  proj_bwd(ex, *w.gate, w.gate_bias, s.x, dgate, &dx);
  proj_bwd(ex, *w.up, w.up_bias, s.x, dup, &dx, /*accumulate_dx=*/true);
  return dx;
}

}  // namespace am
