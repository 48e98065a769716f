#include "models/blocks/mamba2.h"

#include <cmath>
#include <initializer_list>
#include <string>

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

namespace {

// in_proj and its split (HF: gate, hidden_states_B_C, dt): z [N, Din], xbc_in [N, Cd] (the conv input), dt_raw [N, nh],
// in the activation dtype.
struct InProj {
  Tensor z, xbc_in, dt_raw;
};
InProj in_project(const ExecContext& ex, const Mamba2Weights& w, const io::ModelConfig& c, const Tensor& x) {
  const auto& n = c.nh;
  const int64_t N = x.dim(0), Din = n.mamba_inner(), Cd = n.conv_dim(), nh = n.mamba_num_heads;
  Tensor proj = ex.empty({N, Din + Cd + nh});
  proj_fwd(ex, *w.in_proj, w.in_bias, x, proj);
  return {cols(ex, proj, 0, Din), cols(ex, proj, Din, Cd), cols(ex, proj, Din + Cd, nh)};
}

// out_proj(RMSNorm_grouped(y * silu(z)) * norm.weight): y, z [N, Din] -> [N, H]. g [N, Din] / rstd [N * G] (what
// the backward needs) are stored when asked for.
Tensor out_project(const ExecContext& ex, const Mamba2Weights& w, const io::ModelConfig& c, const Tensor& y,
                   const Tensor& z, Tensor* g_out, Tensor* rstd_out) {
  const int64_t N = y.dim(0), Din = c.nh.mamba_inner(), G = c.nh.n_groups;
  Tensor g = ex.empty({N, Din}), rstd = ex.empty({N * G}, DType::F32);
  ops::gated_rmsnorm_fwd(y, z, f32_weight(*w.norm), Din / G, static_cast<float>(c.rms_norm_eps), g, rstd);
  Tensor out = ex.empty({N, c.hidden_size});
  proj_fwd(ex, *w.out_proj, w.out_bias, g, out);
  if (g_out) *g_out = g;
  if (rstd_out) *rstd_out = rstd;
  return out;
}

}  // namespace

Tensor mamba2_forward(const ExecContext& ex, const Mamba2Weights& w, const io::ModelConfig& c, const Tensor& x, int64_t B,
                      int64_t T, const Tensor* seg, Mamba2Saved* s) {
  const auto& n = c.nh;
  const int64_t N = x.dim(0), Din = n.mamba_inner(), Cd = n.conv_dim(), nh = n.mamba_num_heads, P = n.mamba_head_dim,
                G = n.n_groups, S = n.ssm_state_size;
  // Activations in the compute dtype (bf16 on CUDA, fp32 on the CPU); dt, A and rstd in fp32 everywhere.
  auto [z, xbc_in, dt_raw] = in_project(ex, w, c, x);
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
  Tensor g, rstd;
  Tensor out = out_project(ex, w, c, y, z, &g, &rstd);
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

Mamba2State mamba2_initial_state(const ExecContext& ex, const io::ModelConfig& c) {
  const auto& n = c.nh;
  Mamba2State st;
  if (n.conv_kernel > 1) st.conv = ex.zeros({n.conv_kernel - 1, n.conv_dim()}, ex.act_dtype);
  st.ssm = ex.zeros({n.mamba_num_heads, n.mamba_head_dim, n.ssm_state_size}, DType::F32);
  return st;
}

Tensor mamba2_forward_cached(const ExecContext& ex, const Mamba2Weights& w, const io::ModelConfig& c, const Tensor& x,
                             Mamba2State& st) {
  const auto& n = c.nh;
  const int64_t N = x.dim(0), Din = n.mamba_inner(), Cd = n.conv_dim(), nh = n.mamba_num_heads, P = n.mamba_head_dim,
                G = n.n_groups, S = n.ssm_state_size, K = n.conv_kernel, W = K - 1 + N;
  if (ex.on_cuda())
    throw DeviceError("mamba2_forward_cached: the Mamba2 state cache runs on the CPU only (CUDA: generate recomputes)");
  if (!st.ssm.defined() || (K > 1 && !st.conv.defined()))
    throw ShapeError("mamba2_forward_cached: the state was not made by mamba2_initial_state");
  auto [z, xbc_in, dt_raw] = in_project(ex, w, c, x);
  // Causal conv over the window [the last K - 1 inputs; the N new ones] [W, Cd]: output row K - 1 + i is token i's,
  // with exactly the full forward's terms (the zero rows of a fresh state stand for its left padding and add +-0).
  Tensor win = ex.empty({W, Cd});
  if (K > 1) {
    Tensor old_rows = win.slice_rows(0, K - 1);
    ops::copy_(old_rows, st.conv);
  }
  Tensor new_rows = win.slice_rows(K - 1, W);
  ops::copy_(new_rows, xbc_in);
  Tensor pre = ex.empty({1, W, Cd}), xbc_w = ex.empty({1, W, Cd});
  ops::mamba_conv1d_silu_fwd(win.view({1, W, Cd}), f32_weight(*w.conv_w), w.conv_b ? &f32_weight(*w.conv_b) : nullptr,
                             nullptr, pre, xbc_w);
  if (K > 1) ops::copy_(st.conv, win.slice_rows(N, W));  // shift: keep the last K - 1 inputs for the next step
  const Tensor xbc = xbc_w.view({W, Cd}).slice_rows(K - 1, W);  // [N, Cd] the new tokens' conv outputs
  Tensor xs = cols(ex, xbc, 0, Din), Bm = cols(ex, xbc, Din, G * S), Cm = cols(ex, xbc, Din + G * S, G * S);
  Tensor dt_in = ex.empty({N, nh}, DType::F32), dt = ex.empty({N, nh}, DType::F32), A = ex.empty({nh}, DType::F32);
  ops::mamba_dt_fwd(dt_raw, f32_weight(*w.dt_bias), dt_lo(n), dt_hi(n), dt_in, dt);
  ops::mamba_a_log_fwd(f32_weight(*w.A_log), A);
  Tensor y = ex.empty({N, Din});
  Tensor y3 = y.view({N, nh, P});
  ops::mamba_ssm_scan_carry(xs.view({N, nh, P}), dt, A, Bm.view({N, G, S}), Cm.view({N, G, S}), f32_weight(*w.D), st.ssm, y3);
  return out_project(ex, w, c, y, z, nullptr, nullptr);
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
