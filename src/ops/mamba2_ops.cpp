// Front-ends of ops/mamba2_ops.h and their CPU reference kernels. Each op checks that its tensors are defined and
// on one device and the shapes the contract fixes (ShapeError / DeviceError naming the op), then routes CUDA
// tensors to src/backend/cuda/mamba2.cu (which checks its dtypes) and runs the CPU reference otherwise: plain loops
// in fp32 (double accumulators where a sum runs over a whole group or window), written for exactness against HF's
// torch path, not speed.
#include "ops/mamba2_ops.h"

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <string>
#include <vector>

#include "backend/cpu/mamba2_state.h"
#include "core/error.h"
#include "ops/op_checks.h"
#ifdef AM_WITH_CUDA
#include "backend/cuda/mamba2.h"
#endif
#define AM_MAMBA_ROUTE_CUDA(call) AM_OP_ROUTE_CUDA(call)

namespace am::ops {
using namespace detail;

namespace {

void host_f32(const char* op, std::initializer_list<Arg> args) {
  for (const Arg& a : args)
    if (a.t && a.t->defined() && a.t->dtype() != DType::F32)
      shape_error(op, describe(a.name, *a.t) + ": expected float32 (the CPU reference computes in float32)");
}

void need_numel(const char* op, const char* name, const Tensor& t, int64_t n) {
  if (t.numel() != n)
    shape_error(op, describe(name, t) + ": has " + std::to_string(t.numel()) + " elements, expected " + std::to_string(n));
}

void check_seg(const char* op, const Tensor* seg, int64_t B, int64_t T) {
  if (!seg) return;
  if (seg->dtype() != DType::I32) shape_error(op, describe("segment_ids", *seg) + ": expected int32");
  need_numel(op, "segment_ids", *seg, B * T);
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
// torch.nn.functional.softplus (beta 1, threshold 20) and its derivative
inline float softplus(float v) { return v > 20.f ? v : std::log1p(std::exp(v)); }
inline float softplus_grad(float v) { return v > 20.f ? 1.f : 1.f / (1.f + std::exp(-v)); }

struct ConvDims {
  int64_t B, T, C, K;
};
ConvDims conv_dims(const char* op, const Tensor& x, const Tensor& w) {
  if (x.ndim() != 3) shape_error(op, describe("x", x) + ": expected [B, T, C]");
  const int64_t C = x.dim(2);
  if (!(w.ndim() == 2 || (w.ndim() == 3 && w.dim(1) == 1)) || w.dim(0) != C)
    shape_error(op, describe("w", w) + ": expected [C = " + std::to_string(C) + ", K] or [C, 1, K]");
  return {x.dim(0), x.dim(1), C, w.dim(-1)};
}

}  // namespace

void mamba_conv1d_silu_fwd(const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor* seg, Tensor& pre, Tensor& y) {
  const char* op = "mamba_conv1d_silu_fwd";
  const DeviceType dev = device_of(op, {{"x", &x}, {"w", &w}, {"bias", bias}, {"segment_ids", seg}, {"pre", &pre}, {"y", &y}});
  const ConvDims d = conv_dims(op, x, w);
  const int64_t B = d.B, T = d.T, C = d.C, K = d.K;
  need_numel(op, "pre", pre, B * T * C);
  need_numel(op, "y", y, B * T * C);
  if (bias) need_numel(op, "bias", *bias, C);
  check_seg(op, seg, B, T);
  AM_MAMBA_ROUTE_CUDA(cuda::mamba_conv1d_silu_fwd(x, w, bias, seg, pre, y));
  host_f32(op, {{"x", &x}, {"w", &w}, {"bias", bias}, {"pre", &pre}, {"y", &y}});
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
  const char* op = "mamba_conv1d_silu_bwd";
  Tensor* dwd = dw && dw->defined() ? dw : nullptr;
  Tensor* dbd = dbias && dbias->defined() ? dbias : nullptr;
  const DeviceType dev = device_of(op, {{"x", &x}, {"w", &w}, {"pre", &pre}, {"segment_ids", seg}, {"dy", &dy}, {"dx", &dx},
                                        {"dw", dwd}, {"dbias", dbd}});
  const ConvDims d = conv_dims(op, x, w);
  const int64_t B = d.B, T = d.T, C = d.C, K = d.K;
  need_numel(op, "pre", pre, B * T * C);
  need_numel(op, "dy", dy, B * T * C);
  need_numel(op, "dx", dx, B * T * C);
  if (dwd) need_numel(op, "dw", *dwd, C * K);
  if (dbd) need_numel(op, "dbias", *dbd, C);
  check_seg(op, seg, B, T);
  AM_MAMBA_ROUTE_CUDA(cuda::mamba_conv1d_silu_bwd(x, w, pre, seg, dy, dx, dwd, dbd));
  host_f32(op, {{"x", &x}, {"w", &w}, {"pre", &pre}, {"dy", &dy}, {"dx", &dx}, {"dw", dwd}, {"dbias", dbd}});
  const Seg sg(seg, T);
  const float *px = x.f32(), *pw = w.f32(), *pp = pre.f32(), *pdy = dy.f32();
  float* pdx = dx.f32();
  float* pdw = dwd ? dwd->f32() : nullptr;
  float* pdb = dbd ? dbd->f32() : nullptr;
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
  if (x.ndim() != 4 || Bm.ndim() != 4)
    shape_error(op, describe("x", x) + ", " + describe("B", Bm) + ": x [B, T, nh, P] and B/C [B, T, G, S] expected");
  ScanDims d{x.dim(0), x.dim(1), x.dim(2), x.dim(3), Bm.dim(2), Bm.dim(3)};
  if (d.G <= 0 || d.nh % d.G != 0)
    shape_error(op, "n_groups " + std::to_string(d.G) + " must divide the head count " + std::to_string(d.nh));
  if (Bm.dim(0) != d.B || Bm.dim(1) != d.T) shape_error(op, describe("B", Bm) + ": batch / time differ from " + describe("x", x));
  need_numel(op, "dt", dt, d.B * d.T * d.nh);
  need_numel(op, "A", A, d.nh);
  need_numel(op, "D", D, d.nh);
  need_numel(op, "C", Cm, d.B * d.T * d.G * d.S);
  return d;
}

// The forward recurrence of one (batch row b, head hd) into hs [T, P, S] (every state_t), and y when non-null.
void scan_head(const ScanDims& d, const Seg& sg, int64_t b, int64_t hd, const float* px, const float* pdt, const float* pA,
               const float* pB, const float* pC, const float* pD, float* py, float* hs) {
  const int64_t P = d.P, S = d.S, g = hd / (d.nh / d.G);
  std::vector<float> h(static_cast<size_t>(P * S), 0.f);
  for (int64_t t = 0; t < d.T; ++t) {
    const int64_t bt = b * d.T + t;
    const float dtv = pdt[bt * d.nh + hd];
    const float a = sg.starts(b, t) ? 0.f : std::exp(dtv * pA[hd]);  // a new segment forgets the old state
    const float* xt = px + (bt * d.nh + hd) * P;
    const float* Bt = pB + (bt * d.G + g) * S;
    const float* Ct = pC + (bt * d.G + g) * S;
    for (int64_t p = 0; p < P; ++p) {
      const float dx = dtv * xt[p];
      double acc = 0.0;
      for (int64_t s = 0; s < S; ++s) {
        float& hv = h[static_cast<size_t>(p * S + s)];
        hv = a * hv + dx * Bt[s];
        acc += static_cast<double>(hv) * Ct[s];
      }
      if (py) py[(bt * d.nh + hd) * P + p] = static_cast<float>(acc) + pD[hd] * xt[p];
    }
    if (hs) std::copy(h.begin(), h.end(), hs + t * P * S);
  }
}
}  // namespace

void mamba_ssm_scan_fwd(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                        const Tensor& D, const Tensor* seg, Tensor& y, Tensor* states) {
  const char* op = "mamba_ssm_scan_fwd";
  const DeviceType dev = device_of(op, {{"x", &x}, {"dt", &dt}, {"A", &A}, {"B", &Bm}, {"C", &Cm}, {"D", &D},
                                        {"segment_ids", seg}, {"y", &y}, {"states", states}});
  const ScanDims d = scan_dims(op, x, dt, A, Bm, Cm, D);
  need_numel(op, "y", y, x.numel());
  if (states) need_numel(op, "states", *states, x.numel() * d.S);
  check_seg(op, seg, d.B, d.T);
  AM_MAMBA_ROUTE_CUDA(cuda::mamba_ssm_scan_fwd(x, dt, A, Bm, Cm, D, seg, y, states));
  host_f32(op, {{"x", &x}, {"dt", &dt}, {"A", &A}, {"B", &Bm}, {"C", &Cm}, {"D", &D}, {"y", &y}, {"states", states}});
  const Seg sg(seg, d.T);
  const int64_t PS = d.P * d.S;
  // states [B, T, nh, P, S]: one head's states [T, P, S] go through a buffer into their strided place
  std::vector<float> buf(states ? static_cast<size_t>(d.T * PS) : 0);
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t hd = 0; hd < d.nh; ++hd) {
      scan_head(d, sg, b, hd, x.f32(), dt.f32(), A.f32(), Bm.f32(), Cm.f32(), D.f32(), y.f32(), states ? buf.data() : nullptr);
      if (states)
        for (int64_t t = 0; t < d.T; ++t)
          std::copy(buf.begin() + t * PS, buf.begin() + (t + 1) * PS, states->f32() + ((b * d.T + t) * d.nh + hd) * PS);
    }
}

void mamba_ssm_scan_bwd(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                        const Tensor& D, const Tensor* seg, const Tensor& states, const Tensor& dy, Tensor& dx,
                        Tensor& ddt, Tensor& dA, Tensor& dB, Tensor& dC, Tensor& dD) {
  const char* op = "mamba_ssm_scan_bwd";
  const Tensor* st = states.defined() ? &states : nullptr;
  const DeviceType dev =
      device_of(op, {{"x", &x}, {"dt", &dt}, {"A", &A}, {"B", &Bm}, {"C", &Cm}, {"D", &D}, {"segment_ids", seg},
                     {"states", st}, {"dy", &dy}, {"dx", &dx}, {"ddt", &ddt}, {"dA", &dA}, {"dB", &dB}, {"dC", &dC}, {"dD", &dD}});
  const ScanDims d = scan_dims(op, x, dt, A, Bm, Cm, D);
  if (st) need_numel(op, "states", *st, x.numel() * d.S);
  need_numel(op, "dy", dy, x.numel());
  need_numel(op, "dx", dx, x.numel());
  need_numel(op, "ddt", ddt, dt.numel());
  need_numel(op, "dA", dA, d.nh);
  need_numel(op, "dD", dD, d.nh);
  need_numel(op, "dB", dB, Bm.numel());
  need_numel(op, "dC", dC, Cm.numel());
  check_seg(op, seg, d.B, d.T);
  AM_MAMBA_ROUTE_CUDA(cuda::mamba_ssm_scan_bwd(x, dt, A, Bm, Cm, D, seg, dy, dx, ddt, dA, dB, dC, dD));
  host_f32(op, {{"x", &x}, {"dt", &dt}, {"A", &A}, {"B", &Bm}, {"C", &Cm}, {"D", &D}, {"states", st}, {"dy", &dy},
                {"dx", &dx}, {"ddt", &ddt}, {"dA", &dA}, {"dB", &dB}, {"dC", &dC}, {"dD", &dD}});
  const Seg sg(seg, d.T);
  const int64_t P = d.P, S = d.S, PS = P * S, rep = d.nh / d.G;
  const float *px = x.f32(), *pdt = dt.f32(), *pA = A.f32(), *pB = Bm.f32(), *pC = Cm.f32(), *pD = D.f32(),
              *pdy = dy.f32();
  float *pdx = dx.f32(), *pddt = ddt.f32(), *pdB = dB.f32(), *pdC = dC.f32();
  std::fill(pdB, pdB + dB.numel(), 0.f);
  std::fill(pdC, pdC + dC.numel(), 0.f);
  std::vector<double> gA(static_cast<size_t>(d.nh), 0.0), gD(static_cast<size_t>(d.nh), 0.0);
  std::vector<float> gh(static_cast<size_t>(PS));  // dL/dstate_t, carried backwards
  std::vector<float> hs(st ? 0 : static_cast<size_t>(d.T * PS));  // recomputed states of one head
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t hd = 0; hd < d.nh; ++hd) {
      const int64_t g = hd / rep;
      if (!st) scan_head(d, sg, b, hd, px, pdt, pA, pB, pC, pD, nullptr, hs.data());
      // state_t of this head: from the given states [B, T, nh, P, S] or the recomputed [T, P, S]
      auto state = [&](int64_t t) { return st ? st->f32() + ((b * d.T + t) * d.nh + hd) * PS : hs.data() + t * PS; };
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
        const float* ht = state(t);
        const float* hprev = start ? nullptr : state(t - 1);
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

namespace {
// Returns N (rows) for y [N, Din] and a group size dividing Din = w.numel().
int64_t norm_rows(const char* op, const Tensor& y, const Tensor& w, int64_t group) {
  const int64_t Din = w.numel();
  if (group <= 0 || Din == 0 || Din % group != 0)
    shape_error(op, "group size " + std::to_string(group) + " must divide the width of " + describe("w", w));
  if (y.numel() % Din != 0) shape_error(op, describe("y", y) + ": not a whole number of rows of " + describe("w", w));
  return y.numel() / Din;
}
}  // namespace

void gated_rmsnorm_fwd(const Tensor& y, const Tensor& z, const Tensor& w, int64_t group, float eps, Tensor& out, Tensor& rstd) {
  const char* op = "gated_rmsnorm_fwd";
  const DeviceType dev = device_of(op, {{"y", &y}, {"z", &z}, {"w", &w}, {"out", &out}, {"rstd", &rstd}});
  const int64_t N = norm_rows(op, y, w, group), Din = w.numel();
  need_numel(op, "z", z, N * Din);
  need_numel(op, "out", out, N * Din);
  need_numel(op, "rstd", rstd, N * (Din / group));
  AM_MAMBA_ROUTE_CUDA(cuda::gated_rmsnorm_fwd(y, z, w, group, eps, out, rstd));
  host_f32(op, {{"y", &y}, {"z", &z}, {"w", &w}, {"out", &out}, {"rstd", &rstd}});
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
  const char* op = "gated_rmsnorm_bwd";
  const Tensor* dwd = dw.defined() ? &dw : nullptr;
  const DeviceType dev = device_of(op, {{"y", &y}, {"z", &z}, {"w", &w}, {"rstd", &rstd}, {"dout", &dout}, {"dy", &dy},
                                        {"dz", &dz}, {"dw", dwd}});
  const int64_t N = norm_rows(op, y, w, group), Din = w.numel();
  need_numel(op, "z", z, N * Din);
  need_numel(op, "rstd", rstd, N * (Din / group));
  need_numel(op, "dout", dout, N * Din);
  need_numel(op, "dy", dy, N * Din);
  need_numel(op, "dz", dz, N * Din);
  if (dwd) need_numel(op, "dw", dw, Din);
  AM_MAMBA_ROUTE_CUDA(cuda::gated_rmsnorm_bwd(y, z, w, rstd, group, dout, dy, dz, dw));
  host_f32(op, {{"y", &y}, {"z", &z}, {"w", &w}, {"rstd", &rstd}, {"dout", &dout}, {"dy", &dy}, {"dz", &dz}, {"dw", dwd}});
  const float *py = y.f32(), *pz = z.f32(), *pw = w.f32(), *pr = rstd.f32(), *pdo = dout.f32();
  float *pdy = dy.f32(), *pdz = dz.f32();
  float* pdw = dwd ? dw.f32() : nullptr;
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

void mamba_dt_fwd(const Tensor& dt_raw, const Tensor& dt_bias, float lo, float hi, Tensor& dt_in, Tensor& dt) {
  const char* op = "mamba_dt_fwd";
  const DeviceType dev = device_of(op, {{"dt_raw", &dt_raw}, {"dt_bias", &dt_bias}, {"dt_in", &dt_in}, {"dt", &dt}});
  const int64_t nh = dt_bias.numel();
  if (nh == 0 || dt_raw.dim(-1) != nh) shape_error(op, describe("dt_raw", dt_raw) + ": expected [N, nh] for " + describe("dt_bias", dt_bias));
  need_numel(op, "dt_in", dt_in, dt_raw.numel());
  need_numel(op, "dt", dt, dt_raw.numel());
  AM_MAMBA_ROUTE_CUDA(cuda::mamba_dt_fwd(dt_raw, dt_bias, lo, hi, dt_in, dt));
  host_f32(op, {{"dt_raw", &dt_raw}, {"dt_bias", &dt_bias}, {"dt_in", &dt_in}, {"dt", &dt}});
  const float *pr = dt_raw.f32(), *pb = dt_bias.f32();
  float *pi = dt_in.f32(), *pd = dt.f32();
  for (int64_t i = 0; i < dt_raw.numel(); ++i) {
    const float v = pr[i] + pb[i % nh];
    pi[i] = v;
    pd[i] = std::min(std::max(softplus(v), lo), hi);
  }
}

void mamba_dt_bwd(const Tensor& dt_in, const Tensor& ddt, float lo, float hi, Tensor& ddt_raw, Tensor* ddt_bias) {
  const char* op = "mamba_dt_bwd";
  Tensor* db = ddt_bias && ddt_bias->defined() ? ddt_bias : nullptr;
  const DeviceType dev = device_of(op, {{"dt_in", &dt_in}, {"ddt", &ddt}, {"ddt_raw", &ddt_raw}, {"ddt_bias", db}});
  if (dt_in.ndim() < 2) shape_error(op, describe("dt_in", dt_in) + ": expected [N, nh]");
  const int64_t nh = dt_in.dim(-1);
  need_numel(op, "ddt", ddt, dt_in.numel());
  need_numel(op, "ddt_raw", ddt_raw, dt_in.numel());
  if (db) need_numel(op, "ddt_bias", *db, nh);
  AM_MAMBA_ROUTE_CUDA(cuda::mamba_dt_bwd(dt_in, ddt, lo, hi, ddt_raw, db));
  host_f32(op, {{"dt_in", &dt_in}, {"ddt", &ddt}, {"ddt_raw", &ddt_raw}, {"ddt_bias", db}});
  const float *pi = dt_in.f32(), *pd = ddt.f32();
  float* po = ddt_raw.f32();
  float* pb = db ? db->f32() : nullptr;
  for (int64_t i = 0; i < dt_in.numel(); ++i) {
    const float v = pi[i], sp = softplus(v);
    const float gd = (sp >= lo && sp <= hi) ? pd[i] * softplus_grad(v) : 0.f;
    po[i] = gd;
    if (pb) pb[i % nh] += gd;
  }
}

void mamba_a_log_fwd(const Tensor& A_log, Tensor& A) {
  const char* op = "mamba_a_log_fwd";
  const DeviceType dev = device_of(op, {{"A_log", &A_log}, {"A", &A}});
  need_numel(op, "A", A, A_log.numel());
  AM_MAMBA_ROUTE_CUDA(cuda::mamba_a_log_fwd(A_log, A));
  host_f32(op, {{"A_log", &A_log}, {"A", &A}});
  for (int64_t h = 0; h < A.numel(); ++h) A.f32()[h] = -std::exp(A_log.f32()[h]);
}

void mamba_a_log_bwd(const Tensor& A, const Tensor& dA, Tensor& dA_log) {
  const char* op = "mamba_a_log_bwd";
  const DeviceType dev = device_of(op, {{"A", &A}, {"dA", &dA}, {"dA_log", &dA_log}});
  need_numel(op, "dA", dA, A.numel());
  need_numel(op, "dA_log", dA_log, A.numel());
  AM_MAMBA_ROUTE_CUDA(cuda::mamba_a_log_bwd(A, dA, dA_log));
  host_f32(op, {{"A", &A}, {"dA", &dA}, {"dA_log", &dA_log}});
  for (int64_t h = 0; h < A.numel(); ++h) dA_log.f32()[h] += dA.f32()[h] * A.f32()[h];
}

void relu2_fwd(const Tensor& x, Tensor& y) {
  const char* op = "relu2_fwd";
  const DeviceType dev = device_of(op, {{"x", &x}, {"y", &y}});
  need_numel(op, "y", y, x.numel());
  AM_MAMBA_ROUTE_CUDA(cuda::relu2_fwd(x, y));
  host_f32(op, {{"x", &x}, {"y", &y}});
  const float* px = x.f32();
  float* py = y.f32();
  for (int64_t i = 0; i < x.numel(); ++i) {
    const float r = px[i] > 0.f ? px[i] : 0.f;
    py[i] = r * r;
  }
}

void relu2_bwd(const Tensor& x, const Tensor& dy, Tensor& dx) {
  const char* op = "relu2_bwd";
  const DeviceType dev = device_of(op, {{"x", &x}, {"dy", &dy}, {"dx", &dx}});
  need_numel(op, "dy", dy, x.numel());
  need_numel(op, "dx", dx, x.numel());
  AM_MAMBA_ROUTE_CUDA(cuda::relu2_bwd(x, dy, dx));
  host_f32(op, {{"x", &x}, {"dy", &dy}, {"dx", &dx}});
  const float *px = x.f32(), *pdy = dy.f32();
  float* pdx = dx.f32();
  for (int64_t i = 0; i < x.numel(); ++i) pdx[i] = px[i] > 0.f ? 2.f * px[i] * pdy[i] : 0.f;
}

void mamba_ssm_scan_carry(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                          const Tensor& D, Tensor& state, Tensor& y) {
  const char* op = "mamba_ssm_scan_carry";
  for (const Tensor* t : std::initializer_list<const Tensor*>{&x, &dt, &A, &Bm, &Cm, &D, &state, &y}) {
    if (!t->defined()) throw ShapeError(std::string(op) + ": an undefined tensor");
    if (t->device() != DeviceType::CPU)
      throw DeviceError(std::string(op) + ": the state-carrying scan runs on the CPU only (CUDA: generate recomputes)");
    if (t->dtype() != DType::F32) throw ShapeError(std::string(op) + ": expected float32 tensors");
  }
  if (x.ndim() != 3 || Bm.ndim() != 3 || state.ndim() != 3)
    throw ShapeError(std::string(op) + ": expected x [n, nh, P], B / C [n, G, S], state [nh, P, S]");
  cpu::SsmCarryDims d;
  d.n = x.dim(0);
  d.nh = x.dim(1);
  d.P = x.dim(2);
  d.G = Bm.dim(1);
  d.S = Bm.dim(2);
  const bool ok = d.G > 0 && d.nh % d.G == 0 && Bm.dim(0) == d.n && Cm.numel() == Bm.numel() && dt.numel() == d.n * d.nh &&
                  A.numel() == d.nh && D.numel() == d.nh && state.dim(0) == d.nh && state.dim(1) == d.P &&
                  state.dim(2) == d.S && y.numel() == x.numel();
  if (!ok)
    throw ShapeError(std::string(op) + ": inconsistent shapes (x " + std::to_string(d.n) + " x " + std::to_string(d.nh) +
                     " x " + std::to_string(d.P) + ", B " + std::to_string(Bm.dim(0)) + " x " + std::to_string(d.G) + " x " +
                     std::to_string(d.S) + ")");
  cpu::mamba_ssm_scan_carry(x.f32(), dt.f32(), A.f32(), Bm.f32(), Cm.f32(), D.f32(), d, state.f32(), y.f32());
}

}  // namespace am::ops
