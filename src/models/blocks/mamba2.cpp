#include "models/blocks/mamba2.h"

#include <cmath>

#include "core/error.h"
#include "models/blocks/lora.h"
#include "ops/mamba2_ops.h"
#include "ops/ops.h"

namespace am {

void add_hub_layout(Param& p, const std::string& hub_name) {
  if (hub_name == p.name) return;
  p.layouts.insert(p.layouts.begin(), SourceLayout{SourceSlice{hub_name, 0, p.shape}});
}

Mamba2Weights register_mamba2(ParamStore& ps, const std::string& pre, const std::string& hub, const io::ModelConfig& c) {
  const auto& n = c.nh;
  const int64_t H = c.hidden_size, Din = n.mamba_inner(), Cd = n.conv_dim(), nh = n.mamba_num_heads;
  auto add = [&](const std::string& suffix, const Shape& shape) -> Param* {
    Param& p = ps.add(pre + suffix, shape);
    add_hub_layout(p, hub + suffix);
    return &p;
  };
  Mamba2Weights w;
  w.conv_w = add("conv1d.weight", {Cd, 1, n.conv_kernel});
  if (n.use_conv_bias) w.conv_b = add("conv1d.bias", {Cd});
  w.in_proj = add("in_proj.weight", {Din + Cd + nh, H});
  if (n.use_bias) w.in_bias = add("in_proj.bias", {Din + Cd + nh});
  w.dt_bias = add("dt_bias", {nh});
  w.A_log = add("A_log", {nh});
  w.norm = add("norm.weight", {Din});
  w.D = add("D", {nh});
  w.out_proj = add("out_proj.weight", {H, Din});
  if (n.use_bias) w.out_bias = add("out_proj.bias", {H});
  return w;
}

namespace {

// The columns [c0, c0 + w) of src [N, ld] as a new [N, w] tensor on src's device, in src's dtype.
Tensor cols(const ExecContext& ex, const Tensor& src, int64_t c0, int64_t w) {
  Tensor d = ex.empty({src.dim(0), w}, src.dtype());
  ops::copy_cols_(d, 0, src, c0, w);
  return d;
}
// dst[:, c0 : c0 + w] = src [N, w]
void put_cols(Tensor& dst, int64_t c0, const Tensor& src) { ops::copy_cols_(dst, c0, src, 0, src.dim(1)); }

// The fp32 copy of a small mixer weight (conv, dt_bias, A_log, D, gated norm): the master `value` on CUDA (HF keeps
// these in the model dtype; fp32 keeps the dt / decay chain and the norm as exact as the CPU reference), the one
// tensor there is on the CPU.
const Tensor& f32_weight(const Param& p) { return p.value.defined() ? p.value : p.work; }

float dt_lo(const io::ModelConfig::NemotronH& n) { return static_cast<float>(n.time_step_min); }
float dt_hi(const io::ModelConfig::NemotronH& n) {
  return std::isinf(n.time_step_max) ? INFINITY : static_cast<float>(n.time_step_max);
}

}  // namespace

Tensor mamba2_forward(const ExecContext& ex, const Mamba2Weights& w, const io::ModelConfig& c, const Tensor& x, int64_t B,
                      int64_t T, const Tensor* seg, Mamba2Saved* s) {
  const auto& n = c.nh;
  const int64_t N = x.dim(0), H = c.hidden_size, Din = n.mamba_inner(), Cd = n.conv_dim(), nh = n.mamba_num_heads,
                P = n.mamba_head_dim, G = n.n_groups, S = n.ssm_state_size;
  // Activations in the compute dtype (bf16 on CUDA, fp32 on the CPU); dt, A and rstd in fp32 everywhere.
  Tensor z, xbc_in, dt_raw;
  {
    Tensor proj = ex.empty({N, Din + Cd + nh});
    proj_fwd(ex, *w.in_proj, w.in_bias, x, proj);
    z = cols(ex, proj, 0, Din);
    xbc_in = cols(ex, proj, Din, Cd);
    dt_raw = cols(ex, proj, Din + Cd, nh);
  }
  Tensor pre = ex.empty({B, T, Cd}), xbc = ex.empty({B, T, Cd});
  ops::mamba_conv1d_silu_fwd(xbc_in.view({B, T, Cd}), f32_weight(*w.conv_w), w.conv_b ? &f32_weight(*w.conv_b) : nullptr,
                             seg, pre, xbc);
  xbc = xbc.view({N, Cd});
  Tensor xs = cols(ex, xbc, 0, Din), Bm = cols(ex, xbc, Din, G * S), Cm = cols(ex, xbc, Din + G * S, G * S);
  xbc = Tensor();
  Tensor dt_in = ex.empty({N, nh}, DType::F32), dt = ex.empty({N, nh}, DType::F32), A = ex.empty({nh}, DType::F32);
  ops::mamba_dt_fwd(dt_raw, f32_weight(*w.dt_bias), dt_lo(n), dt_hi(n), dt_in, dt);
  dt_raw = Tensor();
  ops::mamba_a_log_fwd(f32_weight(*w.A_log), A);
  Tensor y = ex.empty({B, T, nh, P});
  ops::mamba_ssm_scan_fwd(xs.view({B, T, nh, P}), dt, A, Bm.view({B, T, G, S}), Cm.view({B, T, G, S}), f32_weight(*w.D),
                          seg, y, nullptr);
  y = y.view({N, Din});
  Tensor g = ex.empty({N, Din}), rstd = ex.empty({N * G}, DType::F32);
  ops::gated_rmsnorm_fwd(y, z, f32_weight(*w.norm), Din / G, static_cast<float>(c.rms_norm_eps), g, rstd);
  Tensor out = ex.empty({N, H});
  proj_fwd(ex, *w.out_proj, w.out_bias, g, out);
  if (s) {
    *s = Mamba2Saved{};
    s->x = x;
    s->xbc_in = xbc_in;
    s->conv_pre = pre;
    s->dt_in = dt_in;
    s->dt = dt;
    s->A = A;
    s->xs = xs;
    s->Bm = Bm;
    s->Cm = Cm;
    s->z = z;
    s->y = y;
    s->rstd = rstd;
    s->g = g;
  }
  return out;
}

Tensor mamba2_backward(const ExecContext& ex, const Mamba2Weights& w, const io::ModelConfig& c, const Mamba2Saved& s,
                       int64_t B, int64_t T, const Tensor* seg, const Tensor& dy) {
  const auto& n = c.nh;
  const int64_t N = dy.dim(0), H = c.hidden_size, Din = n.mamba_inner(), Cd = n.conv_dim(), nh = n.mamba_num_heads,
                P = n.mamba_head_dim, G = n.n_groups, S = n.ssm_state_size;
  Tensor dg = ex.empty({N, Din});
  proj_bwd(ex, *w.out_proj, w.out_bias, s.g, dy, &dg);
  Tensor dyy = ex.empty({N, Din}), dz = ex.empty({N, Din});
  ops::gated_rmsnorm_bwd(s.y, s.z, f32_weight(*w.norm), s.rstd, Din / G, dg, dyy, dz, w.norm->grad);
  dg = Tensor();
  Tensor dxs = ex.empty({N, Din}), ddt = ex.empty({N, nh}, DType::F32), dB = ex.empty({N, G * S}), dC = ex.empty({N, G * S}),
         dA = ex.zeros({nh}, DType::F32);
  Tensor dD = w.D->grad.defined() ? w.D->grad : ex.zeros({nh}, DType::F32);
  // No saved states: the scan's backward recomputes them (ops/mamba2_ops.h).
  ops::mamba_ssm_scan_bwd(s.xs.view({B, T, nh, P}), s.dt, s.A, s.Bm.view({B, T, G, S}), s.Cm.view({B, T, G, S}),
                          f32_weight(*w.D), seg, Tensor(), dyy.view({B, T, nh, P}), dxs, ddt, dA, dB, dC, dD);
  dyy = Tensor();
  // A = -exp(A_log): dA_log += dA * A
  if (w.A_log->grad.defined()) ops::mamba_a_log_bwd(s.A, dA, w.A_log->grad);
  // dt = clamp(softplus(v)): gradient through where the clamp passes (torch: lo <= value <= hi)
  Tensor ddt_raw = ex.empty({N, nh});
  Tensor* ddt_bias = w.dt_bias->grad.defined() ? &w.dt_bias->grad : nullptr;
  ops::mamba_dt_bwd(s.dt_in, ddt, dt_lo(n), dt_hi(n), ddt_raw, ddt_bias);
  Tensor dxbc = ex.empty({N, Cd});
  put_cols(dxbc, 0, dxs);
  put_cols(dxbc, Din, dB);
  put_cols(dxbc, Din + G * S, dC);
  dxs = dB = dC = Tensor();
  Tensor dxbc_in = ex.empty({B, T, Cd});
  ops::mamba_conv1d_silu_bwd(s.xbc_in.view({B, T, Cd}), f32_weight(*w.conv_w), s.conv_pre, seg, dxbc.view({B, T, Cd}),
                             dxbc_in, w.conv_w->grad.defined() ? &w.conv_w->grad : nullptr,
                             w.conv_b && w.conv_b->grad.defined() ? &w.conv_b->grad : nullptr);
  dxbc = Tensor();
  Tensor dproj = ex.empty({N, Din + Cd + nh});
  put_cols(dproj, 0, dz);
  put_cols(dproj, Din, dxbc_in.view({N, Cd}));
  put_cols(dproj, Din + Cd, ddt_raw);
  Tensor dx = ex.empty({N, H});
  proj_bwd(ex, *w.in_proj, w.in_bias, s.x, dproj, &dx);
  return dx;
}

}  // namespace am
