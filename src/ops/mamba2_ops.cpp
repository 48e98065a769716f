// CPU reference kernels of ops/mamba2_ops.h: plain loops in fp32 (double accumulators where a sum runs over
// a whole group or window), written for exactness against HF's torch path, not speed.
#include "ops/mamba2_ops.h"

#include <cmath>
#include <string>
#include <vector>

#include "core/error.h"

namespace am::ops {

namespace {

void host_f32(const char* op, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts) {
    if (!t || !t->defined()) continue;
    if (t->device() != DeviceType::CPU)
      throw DeviceError(std::string("op ") + op + ": Nemotron-H Mamba2 ops are not implemented on CUDA yet (run on the CPU)");
    if (t->dtype() != DType::F32) throw ShapeError(std::string("op ") + op + ": expected float32 tensors (CPU reference)");
  }
}

void need_numel(const char* op, const char* name, const Tensor& t, int64_t n) {
  if (t.numel() != n)
    throw ShapeError(std::string("op ") + op + ": " + name + " has " + std::to_string(t.numel()) + " elements, expected " + std::to_string(n));
}

// Segment id of token (b, t), or 0 without packing information.
struct Seg {
  const int32_t* p = nullptr;
  int64_t T = 0;
  explicit Seg(const Tensor* s, int64_t T_) : p(s && s->defined() ? s->data<int32_t>() : nullptr), T(T_) {}
  int32_t at(int64_t b, int64_t t) const { return p ? p[b * T + t] : 0; }
  // true when token t starts a new sequence (its state starts from zero)
  bool starts(int64_t b, int64_t t) const { return t == 0 || at(b, t) != at(b, t - 1); }
};

inline float sigmoidf(float v) { return 1.0f / (1.0f + std::exp(-v)); }

}  // namespace

void mamba_conv1d_silu_fwd(const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor* seg, Tensor& pre, Tensor& y) {
  host_f32("mamba_conv1d_silu_fwd", {&x, &w, bias, &pre, &y});
  if (x.ndim() != 3) throw ShapeError("op mamba_conv1d_silu_fwd: x must be [B, T, C]");
  const int64_t B = x.dim(0), T = x.dim(1), C = x.dim(2), K = w.numel() / (C ? C : 1);
  need_numel("mamba_conv1d_silu_fwd", "w", w, C * K);
  need_numel("mamba_conv1d_silu_fwd", "pre", pre, B * T * C);
  need_numel("mamba_conv1d_silu_fwd", "y", y, B * T * C);
  if (bias) need_numel("mamba_conv1d_silu_fwd", "bias", *bias, C);
  if (seg) need_numel("mamba_conv1d_silu_fwd", "segment_ids", *seg, B * T);
  const Seg sg(seg, T);
  const float *px = x.f32(), *pw = w.f32(), *pb = bias ? bias->f32() : nullptr;
  float *pp = pre.f32(), *py = y.f32();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      // first source position still in t's segment
      int64_t s0 = t;
      while (s0 > 0 && t - s0 < K - 1 && sg.at(b, s0 - 1) == sg.at(b, t)) --s0;
      for (int64_t c = 0; c < C; ++c) {
        float acc = pb ? pb[c] : 0.f;
        for (int64_t s = s0; s <= t; ++s) acc += pw[c * K + (K - 1 - (t - s))] * px[(b * T + s) * C + c];
        pp[(b * T + t) * C + c] = acc;
        py[(b * T + t) * C + c] = acc * sigmoidf(acc);
      }
    }
}

void mamba_conv1d_silu_bwd(const Tensor& x, const Tensor& w, const Tensor& pre, const Tensor* seg, const Tensor& dy,
                           Tensor& dx, Tensor* dw, Tensor* dbias) {
  host_f32("mamba_conv1d_silu_bwd", {&x, &w, &pre, &dy, &dx, dw, dbias});
  const int64_t B = x.dim(0), T = x.dim(1), C = x.dim(2), K = w.numel() / (C ? C : 1);
  need_numel("mamba_conv1d_silu_bwd", "dy", dy, B * T * C);
  need_numel("mamba_conv1d_silu_bwd", "dx", dx, B * T * C);
  const Seg sg(seg, T);
  const float *px = x.f32(), *pw = w.f32(), *pp = pre.f32(), *pdy = dy.f32();
  float* pdx = dx.f32();
  float* pdw = dw && dw->defined() ? dw->f32() : nullptr;
  float* pdb = dbias && dbias->defined() ? dbias->f32() : nullptr;
  std::fill(pdx, pdx + B * T * C, 0.f);
  std::vector<double> gw(static_cast<size_t>(C * K), 0.0), gb(static_cast<size_t>(C), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      int64_t s0 = t;
      while (s0 > 0 && t - s0 < K - 1 && sg.at(b, s0 - 1) == sg.at(b, t)) --s0;
      for (int64_t c = 0; c < C; ++c) {
        const float a = pp[(b * T + t) * C + c], sgm = sigmoidf(a);
        const float g = pdy[(b * T + t) * C + c] * sgm * (1.f + a * (1.f - sgm));  // silu'
        gb[static_cast<size_t>(c)] += g;
        for (int64_t s = s0; s <= t; ++s) {
          const int64_t j = K - 1 - (t - s);
          pdx[(b * T + s) * C + c] += pw[c * K + j] * g;
          gw[static_cast<size_t>(c * K + j)] += static_cast<double>(g) * px[(b * T + s) * C + c];
        }
      }
    }
  if (pdw)
    for (int64_t i = 0; i < C * K; ++i) pdw[i] += static_cast<float>(gw[static_cast<size_t>(i)]);
  if (pdb)
    for (int64_t c = 0; c < C; ++c) pdb[c] += static_cast<float>(gb[static_cast<size_t>(c)]);
}

namespace {
struct ScanDims {
  int64_t B, T, nh, P, G, S;
};
ScanDims scan_dims(const char* op, const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                   const Tensor& D) {
  if (x.ndim() != 4 || Bm.ndim() != 4) throw ShapeError(std::string("op ") + op + ": x [B, T, nh, P] and B/C [B, T, G, S] expected");
  ScanDims d{x.dim(0), x.dim(1), x.dim(2), x.dim(3), Bm.dim(2), Bm.dim(3)};
  if (d.G <= 0 || d.nh % d.G != 0) throw ShapeError(std::string("op ") + op + ": n_groups must divide the head count");
  need_numel(op, "dt", dt, d.B * d.T * d.nh);
  need_numel(op, "A", A, d.nh);
  need_numel(op, "D", D, d.nh);
  need_numel(op, "C", Cm, d.B * d.T * d.G * d.S);
  return d;
}
}  // namespace

void mamba_ssm_scan_fwd(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                        const Tensor& D, const Tensor* seg, Tensor& y, Tensor* states) {
  host_f32("mamba_ssm_scan_fwd", {&x, &dt, &A, &Bm, &Cm, &D, &y, states});
  const ScanDims d = scan_dims("mamba_ssm_scan_fwd", x, dt, A, Bm, Cm, D);
  need_numel("mamba_ssm_scan_fwd", "y", y, x.numel());
  if (states) need_numel("mamba_ssm_scan_fwd", "states", *states, x.numel() * d.S);
  const Seg sg(seg, d.T);
  const int64_t P = d.P, S = d.S, rep = d.nh / d.G;
  std::vector<float> h(static_cast<size_t>(P * S));
  const float *px = x.f32(), *pdt = dt.f32(), *pA = A.f32(), *pB = Bm.f32(), *pC = Cm.f32(), *pD = D.f32();
  float* py = y.f32();
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t hd = 0; hd < d.nh; ++hd) {
      const int64_t g = hd / rep;
      for (int64_t t = 0; t < d.T; ++t) {
        const int64_t bt = b * d.T + t;
        const float dtv = pdt[bt * d.nh + hd];
        const float a = sg.starts(b, t) ? 0.f : std::exp(dtv * pA[hd]);  // a new segment forgets the old state
        const float* xt = px + (bt * d.nh + hd) * P;
        const float* Bt = pB + (bt * d.G + g) * S;
        const float* Ct = pC + (bt * d.G + g) * S;
        float* yt = py + (bt * d.nh + hd) * P;
        for (int64_t p = 0; p < P; ++p) {
          const float dx = dtv * xt[p];
          double acc = 0.0;
          for (int64_t s = 0; s < S; ++s) {
            float& hv = h[static_cast<size_t>(p * S + s)];
            hv = a * hv + dx * Bt[s];
            acc += static_cast<double>(hv) * Ct[s];
          }
          yt[p] = static_cast<float>(acc) + pD[hd] * xt[p];
        }
        if (states) std::copy(h.begin(), h.end(), states->f32() + (bt * d.nh + hd) * P * S);
      }
    }
}

void mamba_ssm_scan_bwd(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                        const Tensor& D, const Tensor* seg, const Tensor& states, const Tensor& dy, Tensor& dx,
                        Tensor& ddt, Tensor& dA, Tensor& dB, Tensor& dC, Tensor& dD) {
  host_f32("mamba_ssm_scan_bwd", {&x, &dt, &A, &Bm, &Cm, &D, &states, &dy, &dx, &ddt, &dA, &dB, &dC, &dD});
  const ScanDims d = scan_dims("mamba_ssm_scan_bwd", x, dt, A, Bm, Cm, D);
  need_numel("mamba_ssm_scan_bwd", "states", states, x.numel() * d.S);
  need_numel("mamba_ssm_scan_bwd", "dy", dy, x.numel());
  const Seg sg(seg, d.T);
  const int64_t P = d.P, S = d.S, rep = d.nh / d.G;
  const float *px = x.f32(), *pdt = dt.f32(), *pA = A.f32(), *pB = Bm.f32(), *pC = Cm.f32(), *pD = D.f32(),
              *ph = states.f32(), *pdy = dy.f32();
  float *pdx = dx.f32(), *pddt = ddt.f32(), *pdB = dB.f32(), *pdC = dC.f32();
  std::fill(pdB, pdB + dB.numel(), 0.f);
  std::fill(pdC, pdC + dC.numel(), 0.f);
  std::vector<double> gA(static_cast<size_t>(d.nh), 0.0), gD(static_cast<size_t>(d.nh), 0.0);
  std::vector<float> gh(static_cast<size_t>(P * S));  // dL/dstate_t, carried backwards
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t hd = 0; hd < d.nh; ++hd) {
      const int64_t g = hd / rep;
      std::fill(gh.begin(), gh.end(), 0.f);
      for (int64_t t = d.T; t-- > 0;) {
        const int64_t bt = b * d.T + t;
        const float dtv = pdt[bt * d.nh + hd];
        const bool start = sg.starts(b, t);
        const float a = start ? 0.f : std::exp(dtv * pA[hd]);
        const float* xt = px + (bt * d.nh + hd) * P;
        const float* Bt = pB + (bt * d.G + g) * S;
        const float* Ct = pC + (bt * d.G + g) * S;
        const float* dyt = pdy + (bt * d.nh + hd) * P;
        const float* ht = ph + (bt * d.nh + hd) * P * S;
        const float* hprev = start ? nullptr : ph + ((bt - 1) * d.nh + hd) * P * S;
        float* dBt = pdB + (bt * d.G + g) * S;
        float* dCt = pdC + (bt * d.G + g) * S;
        // gh += dy_t C_t^T (y_t = state_t C_t); dC_t = state_t^T dy_t
        for (int64_t p = 0; p < P; ++p)
          for (int64_t s = 0; s < S; ++s) {
            gh[static_cast<size_t>(p * S + s)] += dyt[p] * Ct[s];
            dCt[s] += ht[p * S + s] * dyt[p];
          }
        double ddt_acc = 0.0, da_acc = 0.0;
        for (int64_t p = 0; p < P; ++p) {
          gD[static_cast<size_t>(hd)] += static_cast<double>(dyt[p]) * xt[p];
          double gx = 0.0;  // sum_s gh[p, s] B_t[s]
          for (int64_t s = 0; s < S; ++s) {
            const float gv = gh[static_cast<size_t>(p * S + s)];
            gx += static_cast<double>(gv) * Bt[s];
            dBt[s] += gv * dtv * xt[p];
            if (hprev) da_acc += static_cast<double>(gv) * hprev[p * S + s];
          }
          pdx[(bt * d.nh + hd) * P + p] = static_cast<float>(dtv * gx) + pD[hd] * dyt[p];
          ddt_acc += gx * xt[p];
        }
        // a = exp(dt A): d dt += da * a * A, d A += da * a * dt
        ddt_acc += da_acc * a * pA[hd];
        gA[static_cast<size_t>(hd)] += da_acc * a * dtv;
        pddt[bt * d.nh + hd] = static_cast<float>(ddt_acc);
        for (float& v : gh) v *= a;  // to state_{t-1} (0 at a segment start)
      }
    }
  for (int64_t h = 0; h < d.nh; ++h) {
    dA.f32()[h] += static_cast<float>(gA[static_cast<size_t>(h)]);
    dD.f32()[h] += static_cast<float>(gD[static_cast<size_t>(h)]);
  }
}

void gated_rmsnorm_fwd(const Tensor& y, const Tensor& z, const Tensor& w, int64_t group, float eps, Tensor& out, Tensor& rstd) {
  host_f32("gated_rmsnorm_fwd", {&y, &z, &w, &out, &rstd});
  const int64_t Din = w.numel(), N = Din ? y.numel() / Din : 0;
  if (group <= 0 || Din % group != 0) throw ShapeError("op gated_rmsnorm_fwd: group size must divide the width");
  need_numel("gated_rmsnorm_fwd", "z", z, N * Din);
  need_numel("gated_rmsnorm_fwd", "rstd", rstd, N * (Din / group));
  const float *py = y.f32(), *pz = z.f32(), *pw = w.f32();
  float *po = out.f32(), *pr = rstd.f32();
  std::vector<float> g(static_cast<size_t>(group));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < Din / group; ++k) {
      const int64_t o = n * Din + k * group;
      double ss = 0.0;
      for (int64_t i = 0; i < group; ++i) {
        const float zv = pz[o + i];
        g[static_cast<size_t>(i)] = py[o + i] * (zv * sigmoidf(zv));
        ss += static_cast<double>(g[static_cast<size_t>(i)]) * g[static_cast<size_t>(i)];
      }
      const float r = 1.0f / std::sqrt(static_cast<float>(ss / static_cast<double>(group)) + eps);
      pr[n * (Din / group) + k] = r;
      for (int64_t i = 0; i < group; ++i) po[o + i] = pw[k * group + i] * (g[static_cast<size_t>(i)] * r);
    }
}

void gated_rmsnorm_bwd(const Tensor& y, const Tensor& z, const Tensor& w, const Tensor& rstd, int64_t group,
                       const Tensor& dout, Tensor& dy, Tensor& dz, Tensor& dw) {
  host_f32("gated_rmsnorm_bwd", {&y, &z, &w, &rstd, &dout, &dy, &dz, &dw});
  const int64_t Din = w.numel(), N = Din ? y.numel() / Din : 0;
  const float *py = y.f32(), *pz = z.f32(), *pw = w.f32(), *pr = rstd.f32(), *pdo = dout.f32();
  float *pdy = dy.f32(), *pdz = dz.f32();
  float* pdw = dw.defined() ? dw.f32() : nullptr;
  std::vector<double> gw(static_cast<size_t>(Din), 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < Din / group; ++k) {
      const int64_t o = n * Din + k * group;
      const float r = pr[n * (Din / group) + k];
      double dot = 0.0;  // sum_i dn_i n_i
      for (int64_t i = 0; i < group; ++i) {
        const float zv = pz[o + i], gv = py[o + i] * zv * sigmoidf(zv), nv = gv * r, dn = pdo[o + i] * pw[k * group + i];
        gw[static_cast<size_t>(k * group + i)] += static_cast<double>(pdo[o + i]) * nv;
        dot += static_cast<double>(dn) * nv;
      }
      const float mean = static_cast<float>(dot / static_cast<double>(group));
      for (int64_t i = 0; i < group; ++i) {
        const float zv = pz[o + i], s = sigmoidf(zv), silu = zv * s;
        const float nv = py[o + i] * silu * r, dn = pdo[o + i] * pw[k * group + i];
        const float dg = r * (dn - nv * mean);
        pdy[o + i] = dg * silu;
        pdz[o + i] = dg * py[o + i] * s * (1.f + zv * (1.f - s));
      }
    }
  if (pdw)
    for (int64_t i = 0; i < Din; ++i) pdw[i] += static_cast<float>(gw[static_cast<size_t>(i)]);
}

void relu2_fwd(const Tensor& x, Tensor& y) {
  host_f32("relu2_fwd", {&x, &y});
  need_numel("relu2_fwd", "y", y, x.numel());
  const float* px = x.f32();
  float* py = y.f32();
  for (int64_t i = 0; i < x.numel(); ++i) {
    const float r = px[i] > 0.f ? px[i] : 0.f;
    py[i] = r * r;
  }
}

void relu2_bwd(const Tensor& x, const Tensor& dy, Tensor& dx) {
  host_f32("relu2_bwd", {&x, &dy, &dx});
  need_numel("relu2_bwd", "dx", dx, x.numel());
  const float *px = x.f32(), *pdy = dy.f32();
  float* pdx = dx.f32();
  for (int64_t i = 0; i < x.numel(); ++i) pdx[i] = px[i] > 0.f ? 2.f * px[i] * pdy[i] : 0.f;
}

}  // namespace am::ops
