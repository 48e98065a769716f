#include "models/blocks/mamba2.h"

#include <cmath>

#include "core/error.h"
#include "models/blocks/lora.h"
#include "ops/mamba2_ops.h"

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

// dst [N, w] = src[:, c0 : c0 + w] of src [N, ld]
Tensor cols(const Tensor& src, int64_t c0, int64_t w) {
  const int64_t N = src.dim(0), ld = src.dim(1);
  Tensor d = Tensor::empty({N, w}, DType::F32);
  for (int64_t r = 0; r < N; ++r) std::copy(src.f32() + r * ld + c0, src.f32() + r * ld + c0 + w, d.f32() + r * w);
  return d;
}
// dst[:, c0 : c0 + w] = src [N, w]
void put_cols(Tensor& dst, int64_t c0, const Tensor& src) {
  const int64_t N = dst.dim(0), ld = dst.dim(1), w = src.dim(1);
  for (int64_t r = 0; r < N; ++r) std::copy(src.f32() + r * w, src.f32() + r * w + w, dst.f32() + r * ld + c0);
}

// torch.nn.functional.softplus (beta 1, threshold 20) and its derivative
inline float softplus(float v) { return v > 20.f ? v : std::log1p(std::exp(v)); }
inline float softplus_grad(float v) { return v > 20.f ? 1.f : 1.f / (1.f + std::exp(-v)); }

}  // namespace

Tensor mamba2_forward(const ExecContext& ex, const Mamba2Weights& w, const io::ModelConfig& c, const Tensor& x, int64_t B,
                      int64_t T, const Tensor* seg, Mamba2Saved* s) {
  if (ex.on_cuda()) throw DeviceError("nemotron_h Mamba2 mixer: not implemented on CUDA yet (run on the CPU)");
  const auto& n = c.nh;
  const int64_t N = x.dim(0), H = c.hidden_size, Din = n.mamba_inner(), Cd = n.conv_dim(), nh = n.mamba_num_heads,
                P = n.mamba_head_dim, G = n.n_groups, S = n.ssm_state_size;
  Tensor proj = Tensor::empty({N, Din + Cd + nh}, DType::F32);
  proj_fwd(ex, *w.in_proj, w.in_bias, x, proj);
  Tensor z = cols(proj, 0, Din), xbc_in = cols(proj, Din, Cd), dt_raw = cols(proj, Din + Cd, nh);
  Tensor pre = Tensor::empty({B, T, Cd}, DType::F32), xbc = Tensor::empty({B, T, Cd}, DType::F32);
  ops::mamba_conv1d_silu_fwd(xbc_in.view({B, T, Cd}), w.conv_w->work, w.conv_b ? &w.conv_b->work : nullptr, seg, pre, xbc);
  xbc = xbc.view({N, Cd});
  Tensor xs = cols(xbc, 0, Din), Bm = cols(xbc, Din, G * S), Cm = cols(xbc, Din + G * S, G * S);
  Tensor dt_in = Tensor::empty({N, nh}, DType::F32), dt = Tensor::empty({N, nh}, DType::F32), A = Tensor::empty({nh}, DType::F32);
  const float lo = static_cast<float>(n.time_step_min), hi = std::isinf(n.time_step_max) ? INFINITY : static_cast<float>(n.time_step_max);
  for (int64_t i = 0; i < N * nh; ++i) {
    const float v = dt_raw.f32()[i] + w.dt_bias->work.f32()[i % nh];
    dt_in.f32()[i] = v;
    dt.f32()[i] = std::min(std::max(softplus(v), lo), hi);
  }
  for (int64_t h = 0; h < nh; ++h) A.f32()[h] = -std::exp(w.A_log->work.f32()[h]);
  Tensor y = Tensor::empty({B, T, nh, P}, DType::F32);
  Tensor states = s ? Tensor::empty({N, nh, P, S}, DType::F32) : Tensor();
  ops::mamba_ssm_scan_fwd(xs.view({B, T, nh, P}), dt, A, Bm.view({B, T, G, S}), Cm.view({B, T, G, S}), w.D->work, seg, y,
                          s ? &states : nullptr);
  y = y.view({N, Din});
  Tensor g = Tensor::empty({N, Din}, DType::F32), rstd = Tensor::empty({N * G}, DType::F32);
  ops::gated_rmsnorm_fwd(y, z, w.norm->work, Din / G, static_cast<float>(c.rms_norm_eps), g, rstd);
  Tensor out = Tensor::empty({N, H}, DType::F32);
  proj_fwd(ex, *w.out_proj, w.out_bias, g, out);
  if (s) {
    *s = Mamba2Saved{};
    s->x = x;
    s->proj = proj;
    s->xbc_in = xbc_in;
    s->conv_pre = pre;
    s->xbc = xbc;
    s->dt_in = dt_in;
    s->dt = dt;
    s->A = A;
    s->xs = xs;
    s->Bm = Bm;
    s->Cm = Cm;
    s->z = z;
    s->y = y;
    s->states = states;
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
  Tensor dg = Tensor::empty({N, Din}, DType::F32);
  proj_bwd(ex, *w.out_proj, w.out_bias, s.g, dy, &dg);
  Tensor dyy = Tensor::empty({N, Din}, DType::F32), dz = Tensor::empty({N, Din}, DType::F32);
  ops::gated_rmsnorm_bwd(s.y, s.z, w.norm->work, s.rstd, Din / G, dg, dyy, dz, w.norm->grad);
  Tensor dxs = Tensor::empty({N, Din}, DType::F32), ddt = Tensor::empty({N, nh}, DType::F32),
         dB = Tensor::empty({N, G * S}, DType::F32), dC = Tensor::empty({N, G * S}, DType::F32),
         dA = Tensor::zeros({nh}, DType::F32);
  Tensor dD = w.D->grad.defined() ? w.D->grad : Tensor::zeros({nh}, DType::F32);
  ops::mamba_ssm_scan_bwd(s.xs.view({B, T, nh, P}), s.dt, s.A, s.Bm.view({B, T, G, S}), s.Cm.view({B, T, G, S}), w.D->work,
                          seg, s.states, dyy.view({B, T, nh, P}), dxs, ddt, dA, dB, dC, dD);
  // A = -exp(A_log): dA_log = dA * A
  if (w.A_log->grad.defined())
    for (int64_t h = 0; h < nh; ++h) w.A_log->grad.f32()[h] += dA.f32()[h] * s.A.f32()[h];
  // dt = clamp(softplus(v)): gradient through where the clamp passes (torch: lo <= value <= hi)
  const float lo = static_cast<float>(n.time_step_min), hi = std::isinf(n.time_step_max) ? INFINITY : static_cast<float>(n.time_step_max);
  Tensor ddt_raw = Tensor::empty({N, nh}, DType::F32);
  for (int64_t i = 0; i < N * nh; ++i) {
    const float v = s.dt_in.f32()[i], sp = softplus(v);
    const float gd = (sp >= lo && sp <= hi) ? ddt.f32()[i] * softplus_grad(v) : 0.f;
    ddt_raw.f32()[i] = gd;
    if (w.dt_bias->grad.defined()) w.dt_bias->grad.f32()[i % nh] += gd;
  }
  Tensor dxbc = Tensor::empty({N, Cd}, DType::F32);
  put_cols(dxbc, 0, dxs);
  put_cols(dxbc, Din, dB);
  put_cols(dxbc, Din + G * S, dC);
  Tensor dxbc_in = Tensor::empty({B, T, Cd}, DType::F32);
  ops::mamba_conv1d_silu_bwd(s.xbc_in.view({B, T, Cd}), w.conv_w->work, s.conv_pre, seg, dxbc.view({B, T, Cd}), dxbc_in,
                             w.conv_w->grad.defined() ? &w.conv_w->grad : nullptr,
                             w.conv_b && w.conv_b->grad.defined() ? &w.conv_b->grad : nullptr);
  Tensor dproj = Tensor::empty({N, Din + Cd + nh}, DType::F32);
  put_cols(dproj, 0, dz);
  put_cols(dproj, Din, dxbc_in.view({N, Cd}));
  put_cols(dproj, Din + Cd, ddt_raw);
  Tensor dx = Tensor::empty({N, H}, DType::F32);
  proj_bwd(ex, *w.in_proj, w.in_bias, s.x, dproj, &dx);
  return dx;
}

}  // namespace am
