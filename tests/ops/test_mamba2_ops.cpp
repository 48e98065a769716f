// Nemotron-H CPU ops (ops/mamba2_ops.h): the depthwise causal conv1d + SiLU, the Mamba2 selective scan, the
// grouped gated RMSNorm and relu2, against naive references written here (the scan in SSD's quadratic dual
// form, a different algorithm from the op's recurrence) and central finite differences; packing (segment
// ids) against each segment run alone; the backward recomputing its states; the dt chain and A = -exp(A_log); the
// decay-gradient identity the CUDA backward relies on (backend/cuda/mamba2.h).
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>
#include <vector>

#include "core/error.h"
#include "ops/mamba2_ops.h"

using namespace am;

namespace {

Tensor randn(const Shape& shape, std::mt19937& rng, float sd = 1.f, float mean = 0.f) {
  Tensor t = Tensor::empty(shape, DType::F32);
  std::normal_distribution<float> n(mean, sd);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = n(rng);
  return t;
}
Tensor clone(const Tensor& t) {
  Tensor c = Tensor::empty(t.shape(), t.dtype());
  std::copy(t.f32(), t.f32() + t.numel(), c.f32());
  return c;
}
double dot(const Tensor& a, const Tensor& b) {
  double s = 0;
  for (int64_t i = 0; i < a.numel(); ++i) s += double(a.f32()[i]) * b.f32()[i];
  return s;
}
// Central finite difference of L(t) = <f(t), w> at element i of t.
double fd(Tensor& t, int64_t i, const std::function<double()>& L, float h = 1e-3f) {
  const float v = t.f32()[i];
  t.f32()[i] = v + h;
  const double lp = L();
  t.f32()[i] = v - h;
  const double lm = L();
  t.f32()[i] = v;
  return (lp - lm) / (2.0 * h);
}
void expect_close(double got, double want, double rel, const std::string& what) {
  EXPECT_NEAR(got, want, rel * (1.0 + std::fabs(want))) << what;
}

struct ScanCase {
  int64_t B = 2, T = 7, nh = 4, P = 3, G = 2, S = 5;
  Tensor x, dt, A, Bm, Cm, D;
  explicit ScanCase(uint32_t seed) {
    std::mt19937 rng(seed);
    x = randn({B, T, nh, P}, rng);
    dt = Tensor::empty({B, T, nh}, DType::F32);
    std::uniform_real_distribution<float> u(0.05f, 0.6f);
    for (int64_t i = 0; i < dt.numel(); ++i) dt.f32()[i] = u(rng);
    A = Tensor::empty({nh}, DType::F32);
    for (int64_t h = 0; h < nh; ++h) A.f32()[h] = -0.5f - 0.7f * static_cast<float>(h);
    Bm = randn({B, T, G, S}, rng);
    Cm = randn({B, T, G, S}, rng);
    D = randn({nh}, rng, 0.3f, 1.f);
  }
};

// y_t = sum_{s<=t, same segment} exp(sum_{r=s+1..t} dt_r A) (C_t . B_s) dt_s x_s + D x_t, in double.
std::vector<double> naive_scan(const ScanCase& c, const std::vector<int32_t>& seg) {
  std::vector<double> y(static_cast<size_t>(c.x.numel()));
  const int64_t rep = c.nh / c.G;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.nh; ++h)
      for (int64_t t = 0; t < c.T; ++t)
        for (int64_t p = 0; p < c.P; ++p) {
          double acc = 0;
          for (int64_t s = t; s >= 0; --s) {
            if (!seg.empty() && seg[b * c.T + s] != seg[b * c.T + t]) break;
            double decay = 0;
            for (int64_t r = s + 1; r <= t; ++r) decay += double(c.dt.f32()[(b * c.T + r) * c.nh + h]) * c.A.f32()[h];
            double cb = 0;
            for (int64_t n = 0; n < c.S; ++n)
              cb += double(c.Cm.f32()[((b * c.T + t) * c.G + h / rep) * c.S + n]) * c.Bm.f32()[((b * c.T + s) * c.G + h / rep) * c.S + n];
            acc += std::exp(decay) * cb * c.dt.f32()[(b * c.T + s) * c.nh + h] * c.x.f32()[((b * c.T + s) * c.nh + h) * c.P + p];
          }
          const int64_t i = ((b * c.T + t) * c.nh + h) * c.P + p;
          y[static_cast<size_t>(i)] = acc + double(c.D.f32()[h]) * c.x.f32()[i];
        }
  return y;
}

}  // namespace

TEST(Mamba2Ops, ScanMatchesQuadraticForm) {
  ScanCase c(1);
  for (bool packed : {false, true}) {
    std::vector<int32_t> seg;
    Tensor segt;
    if (packed) {  // row 0: segments 0 0 0 1 1 2 2; row 1: 0 .. 0 then padding
      seg = {0, 0, 0, 1, 1, 2, 2, 0, 0, 0, 0, 0, -1, -1};
      segt = Tensor::empty({c.B, c.T}, DType::I32);
      std::copy(seg.begin(), seg.end(), segt.data<int32_t>());
    }
    Tensor y = Tensor::empty(c.x.shape(), DType::F32);
    ops::mamba_ssm_scan_fwd(c.x, c.dt, c.A, c.Bm, c.Cm, c.D, packed ? &segt : nullptr, y, nullptr);
    const auto want = naive_scan(c, seg);
    for (int64_t i = 0; i < y.numel(); ++i) expect_close(y.f32()[i], want[static_cast<size_t>(i)], 1e-5, "y[" + std::to_string(i) + "]");
  }
}

TEST(Mamba2Ops, ScanBackwardMatchesFiniteDifferences) {
  ScanCase c(2);
  std::vector<int32_t> seg = {0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0};
  Tensor segt = Tensor::empty({c.B, c.T}, DType::I32);
  std::copy(seg.begin(), seg.end(), segt.data<int32_t>());
  std::mt19937 rng(3);
  Tensor w = randn(c.x.shape(), rng);  // L = <y, w>
  auto L = [&] {
    Tensor y = Tensor::empty(c.x.shape(), DType::F32);
    ops::mamba_ssm_scan_fwd(c.x, c.dt, c.A, c.Bm, c.Cm, c.D, &segt, y, nullptr);
    return dot(y, w);
  };
  Tensor y = Tensor::empty(c.x.shape(), DType::F32), st = Tensor::empty({c.B, c.T, c.nh, c.P, c.S}, DType::F32);
  ops::mamba_ssm_scan_fwd(c.x, c.dt, c.A, c.Bm, c.Cm, c.D, &segt, y, &st);
  Tensor dx = Tensor::empty(c.x.shape(), DType::F32), ddt = Tensor::empty(c.dt.shape(), DType::F32),
         dA = Tensor::zeros({c.nh}, DType::F32), dB = Tensor::empty(c.Bm.shape(), DType::F32),
         dC = Tensor::empty(c.Cm.shape(), DType::F32), dD = Tensor::zeros({c.nh}, DType::F32);
  ops::mamba_ssm_scan_bwd(c.x, c.dt, c.A, c.Bm, c.Cm, c.D, &segt, st, w, dx, ddt, dA, dB, dC, dD);
  struct G {
    Tensor* t;
    Tensor* g;
    const char* name;
  };
  for (G g : {G{&c.x, &dx, "x"}, G{&c.dt, &ddt, "dt"}, G{&c.A, &dA, "A"}, G{&c.Bm, &dB, "B"}, G{&c.Cm, &dC, "C"}, G{&c.D, &dD, "D"}})
    for (int64_t i = 0; i < g.t->numel(); i += std::max<int64_t>(1, g.t->numel() / 23))
      expect_close(g.g->f32()[i], fd(*g.t, i, L), 2e-3, std::string("d") + g.name + "[" + std::to_string(i) + "]");
}

TEST(Mamba2Ops, ScanBackwardRecomputesStatesWhenNoneAreGiven) {
  // The model keeps no states: an undefined `states` makes the backward re-run the recurrence, bit for bit.
  ScanCase c(5);
  Tensor segt = Tensor::empty({c.B, c.T}, DType::I32);
  for (int64_t i = 0; i < c.B * c.T; ++i) segt.data<int32_t>()[i] = (i % c.T) < 4 ? 0 : 1;
  std::mt19937 rng(6);
  Tensor w = randn(c.x.shape(), rng);
  Tensor y = Tensor::empty(c.x.shape(), DType::F32), st = Tensor::empty({c.B, c.T, c.nh, c.P, c.S}, DType::F32);
  ops::mamba_ssm_scan_fwd(c.x, c.dt, c.A, c.Bm, c.Cm, c.D, &segt, y, &st);
  auto run = [&](const Tensor& states) {
    std::vector<Tensor> g = {Tensor::empty(c.x.shape(), DType::F32), Tensor::empty(c.dt.shape(), DType::F32),
                             Tensor::zeros({c.nh}, DType::F32),       Tensor::empty(c.Bm.shape(), DType::F32),
                             Tensor::empty(c.Cm.shape(), DType::F32), Tensor::zeros({c.nh}, DType::F32)};
    ops::mamba_ssm_scan_bwd(c.x, c.dt, c.A, c.Bm, c.Cm, c.D, &segt, states, w, g[0], g[1], g[2], g[3], g[4], g[5]);
    return g;
  };
  const auto given = run(st), recomputed = run(Tensor());
  for (size_t k = 0; k < given.size(); ++k)
    for (int64_t i = 0; i < given[k].numel(); ++i) ASSERT_EQ(given[k].f32()[i], recomputed[k].f32()[i]) << k << " " << i;
}

TEST(Mamba2Ops, DecayGradientIdentityTheCudaBackwardUses) {
  // backend/cuda/mamba2.h never stores state_{t-1}: it forms dL/dlog a_t = <g_t, a_t state_{t-1}> as the
  // within-segment suffix sum of r_tau - q_tau, r = <dy, y - D x>, q = dt <x, g B> = <x, dx - D dy>. Checked here
  // from the reference's own outputs: ddt_t = <x_t, g_t B_t> + A L_t and dA = sum_t dt_t L_t (L = 0 at a start).
  ScanCase c(8);
  Tensor segt = Tensor::empty({c.B, c.T}, DType::I32);
  for (int64_t i = 0; i < c.B * c.T; ++i) segt.data<int32_t>()[i] = (i % c.T) < 3 ? 0 : (i % c.T) < 6 ? 1 : -1;
  std::mt19937 rng(9);
  Tensor dy = randn(c.x.shape(), rng);
  Tensor y = Tensor::empty(c.x.shape(), DType::F32);
  ops::mamba_ssm_scan_fwd(c.x, c.dt, c.A, c.Bm, c.Cm, c.D, &segt, y, nullptr);
  Tensor dx = Tensor::empty(c.x.shape(), DType::F32), ddt = Tensor::empty(c.dt.shape(), DType::F32),
         dA = Tensor::zeros({c.nh}, DType::F32), dB = Tensor::empty(c.Bm.shape(), DType::F32),
         dC = Tensor::empty(c.Cm.shape(), DType::F32), dD = Tensor::zeros({c.nh}, DType::F32);
  ops::mamba_ssm_scan_bwd(c.x, c.dt, c.A, c.Bm, c.Cm, c.D, &segt, Tensor(), dy, dx, ddt, dA, dB, dC, dD);
  std::vector<double> gA(static_cast<size_t>(c.nh), 0.0);  // dA = sum over rows and steps of dt_t L_t
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.nh; ++h) {
      double R = 0, Q = 0;
      for (int64_t t = c.T; t-- > 0;) {
        const int64_t bt = b * c.T + t, row = (bt * c.nh + h) * c.P;
        const bool start = t == 0 || segt.data<int32_t>()[bt] != segt.data<int32_t>()[bt - 1];
        double r = 0, q = 0;
        for (int64_t p = 0; p < c.P; ++p) {
          const double xv = c.x.f32()[row + p], dyv = dy.f32()[row + p], Dh = c.D.f32()[h];
          r += dyv * (y.f32()[row + p] - Dh * xv);
          q += xv * (dx.f32()[row + p] - Dh * dyv);
        }
        const double dtv = c.dt.f32()[bt * c.nh + h];
        R += r;
        Q += q;
        const double lam = start ? 0.0 : R - Q;
        expect_close(ddt.f32()[bt * c.nh + h], q / dtv + lam * c.A.f32()[h], 1e-4, "ddt via the identity");
        gA[static_cast<size_t>(h)] += lam * dtv;
        if (start) R = Q = 0;
      }
    }
  for (int64_t h = 0; h < c.nh; ++h)
    expect_close(dA.f32()[h], gA[static_cast<size_t>(h)], 1e-4, "dA via the identity, head " + std::to_string(h));
}

TEST(Mamba2Ops, DtChainAndALogMatchFiniteDifferences) {
  // dt = min(max(softplus(raw + bias), lo), hi): the gradient passes where the clamp does, and dt_bias sums it.
  std::mt19937 rng(7);
  const int64_t N = 9, nh = 4;
  const float lo = 0.05f, hi = 2.0f;
  Tensor raw = randn({N, nh}, rng, 3.f), bias = randn({nh}, rng, 0.5f);
  raw.f32()[0] = 30.f;  // softplus's linear branch (then clamped at hi)
  raw.f32()[1] = -6.f;  // below lo
  Tensor w = randn({N, nh}, rng);  // L = <dt, w>
  auto L = [&] {
    Tensor di = Tensor::empty({N, nh}, DType::F32), d = Tensor::empty({N, nh}, DType::F32);
    ops::mamba_dt_fwd(raw, bias, lo, hi, di, d);
    return dot(d, w);
  };
  Tensor di = Tensor::empty({N, nh}, DType::F32), d = Tensor::empty({N, nh}, DType::F32);
  ops::mamba_dt_fwd(raw, bias, lo, hi, di, d);
  for (int64_t i = 0; i < N * nh; ++i) {
    const float v = raw.f32()[i] + bias.f32()[i % nh];
    EXPECT_EQ(di.f32()[i], v);
    EXPECT_GE(d.f32()[i], lo);
    EXPECT_LE(d.f32()[i], hi);
  }
  Tensor draw = Tensor::empty({N, nh}, DType::F32), dbias = Tensor::zeros({nh}, DType::F32);
  ops::mamba_dt_bwd(di, w, lo, hi, draw, &dbias);
  EXPECT_EQ(draw.f32()[0], 0.f);  // clamped: no gradient
  EXPECT_EQ(draw.f32()[1], 0.f);
  for (int64_t i = 0; i < N * nh; ++i) {
    const float sp = di.f32()[i] > 20.f ? di.f32()[i] : std::log1p(std::exp(di.f32()[i]));
    if (std::fabs(sp - lo) < 2e-2f || std::fabs(sp - hi) < 2e-2f) continue;  // FD across a clamp edge
    expect_close(draw.f32()[i], fd(raw, i, L), 2e-3, "ddt_raw[" + std::to_string(i) + "]");
  }
  for (int64_t h = 0; h < nh; ++h) {
    double s = 0;
    for (int64_t n = 0; n < N; ++n) s += draw.f32()[n * nh + h];
    expect_close(dbias.f32()[h], s, 1e-5, "ddt_bias[" + std::to_string(h) + "]");
  }
  // A = -exp(A_log), dA_log += dA * A
  Tensor alog = randn({nh}, rng), A = Tensor::empty({nh}, DType::F32), dA = randn({nh}, rng), g = Tensor::zeros({nh}, DType::F32);
  ops::mamba_a_log_fwd(alog, A);
  ops::mamba_a_log_bwd(A, dA, g);
  auto LA = [&] {
    Tensor a = Tensor::empty({nh}, DType::F32);
    ops::mamba_a_log_fwd(alog, a);
    return dot(a, dA);
  };
  for (int64_t h = 0; h < nh; ++h) {
    EXPECT_EQ(A.f32()[h], -std::exp(alog.f32()[h]));
    expect_close(g.f32()[h], fd(alog, h, LA), 2e-3, "dA_log[" + std::to_string(h) + "]");
  }
}

TEST(Mamba2Ops, ConvMatchesNaiveAndFiniteDifferences) {
  std::mt19937 rng(4);
  const int64_t B = 2, T = 6, C = 5, K = 4;
  Tensor x = randn({B, T, C}, rng), w = randn({C, 1, K}, rng, 0.5f), b = randn({C}, rng, 0.2f);
  std::vector<int32_t> seg = {0, 0, 1, 1, 1, 1, 0, 0, 0, 0, -1, -1};
  Tensor segt = Tensor::empty({B, T}, DType::I32);
  std::copy(seg.begin(), seg.end(), segt.data<int32_t>());
  Tensor pre = Tensor::empty({B, T, C}, DType::F32), y = Tensor::empty({B, T, C}, DType::F32);
  ops::mamba_conv1d_silu_fwd(x, w, &b, &segt, pre, y);
  for (int64_t bb = 0; bb < B; ++bb)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) {
        double a = b.f32()[c];
        for (int64_t j = 0; j < K; ++j) {  // torch conv1d(padding=K-1)[..., :T]: tap j reads x[t - (K-1) + j]
          const int64_t s = t - (K - 1) + j;
          if (s < 0 || seg[bb * T + s] != seg[bb * T + t]) continue;
          a += double(w.f32()[c * K + j]) * x.f32()[(bb * T + s) * C + c];
        }
        const double want = a / (1 + std::exp(-a));
        expect_close(y.f32()[(bb * T + t) * C + c], want, 1e-5, "conv y");
      }
  Tensor wt = randn({B, T, C}, rng);
  auto L = [&] {
    Tensor p2 = Tensor::empty({B, T, C}, DType::F32), y2 = Tensor::empty({B, T, C}, DType::F32);
    ops::mamba_conv1d_silu_fwd(x, w, &b, &segt, p2, y2);
    return dot(y2, wt);
  };
  Tensor dx = Tensor::empty({B, T, C}, DType::F32), dw = Tensor::zeros({C, 1, K}, DType::F32), db = Tensor::zeros({C}, DType::F32);
  ops::mamba_conv1d_silu_bwd(x, w, pre, &segt, wt, dx, &dw, &db);
  for (int64_t i = 0; i < x.numel(); ++i) expect_close(dx.f32()[i], fd(x, i, L), 2e-3, "conv dx");
  for (int64_t i = 0; i < w.numel(); ++i) expect_close(dw.f32()[i], fd(w, i, L), 2e-3, "conv dw");
  for (int64_t i = 0; i < b.numel(); ++i) expect_close(db.f32()[i], fd(b, i, L), 2e-3, "conv db");
}

TEST(Mamba2Ops, GatedRmsNormMatchesNaiveAndFiniteDifferences) {
  std::mt19937 rng(5);
  const int64_t N = 3, Din = 8, group = 4;
  Tensor y = randn({N, Din}, rng), z = randn({N, Din}, rng), w = randn({Din}, rng, 0.2f, 1.f);
  Tensor out = Tensor::empty({N, Din}, DType::F32), rstd = Tensor::empty({N * Din / group}, DType::F32);
  const float eps = 1e-5f;
  ops::gated_rmsnorm_fwd(y, z, w, group, eps, out, rstd);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < Din / group; ++k) {
      std::vector<double> g(group);
      double ss = 0;
      for (int64_t i = 0; i < group; ++i) {
        const double zv = z.f32()[n * Din + k * group + i];
        g[i] = y.f32()[n * Din + k * group + i] * zv / (1 + std::exp(-zv));  // y * silu(z), then the norm
        ss += g[i] * g[i];
      }
      const double r = 1 / std::sqrt(ss / group + eps);
      for (int64_t i = 0; i < group; ++i)
        expect_close(out.f32()[n * Din + k * group + i], w.f32()[k * group + i] * g[i] * r, 1e-5, "gated norm");
    }
  Tensor wt = randn({N, Din}, rng);
  auto L = [&] {
    Tensor o2 = Tensor::empty({N, Din}, DType::F32), r2 = Tensor::empty({N * Din / group}, DType::F32);
    ops::gated_rmsnorm_fwd(y, z, w, group, eps, o2, r2);
    return dot(o2, wt);
  };
  Tensor dy = Tensor::empty({N, Din}, DType::F32), dz = Tensor::empty({N, Din}, DType::F32), dw = Tensor::zeros({Din}, DType::F32);
  ops::gated_rmsnorm_bwd(y, z, w, rstd, group, wt, dy, dz, dw);
  for (int64_t i = 0; i < y.numel(); ++i) expect_close(dy.f32()[i], fd(y, i, L), 2e-3, "gated norm dy");
  for (int64_t i = 0; i < z.numel(); ++i) expect_close(dz.f32()[i], fd(z, i, L), 2e-3, "gated norm dz");
  for (int64_t i = 0; i < w.numel(); ++i) expect_close(dw.f32()[i], fd(w, i, L), 2e-3, "gated norm dw");
}

TEST(Mamba2Ops, Relu2) {
  std::mt19937 rng(6);
  Tensor x = randn({3, 7}, rng), y = Tensor::empty({3, 7}, DType::F32), dy = randn({3, 7}, rng),
         dx = Tensor::empty({3, 7}, DType::F32);
  ops::relu2_fwd(x, y);
  ops::relu2_bwd(x, dy, dx);
  for (int64_t i = 0; i < x.numel(); ++i) {
    const float v = x.f32()[i];
    EXPECT_FLOAT_EQ(y.f32()[i], v > 0 ? v * v : 0.f);
    EXPECT_FLOAT_EQ(dx.f32()[i], v > 0 ? 2 * v * dy.f32()[i] : 0.f);
  }
}

TEST(Mamba2Ops, PackedScanEqualsEachSegmentAlone) {
  // Row [a a a | b b b b]: the second segment's outputs equal those of [b b b b] run alone.
  ScanCase c(7);
  c.B = 1;
  std::mt19937 rng(8);
  c.x = randn({1, 7, c.nh, c.P}, rng);
  c.dt = Tensor::empty({1, 7, c.nh}, DType::F32);
  for (int64_t i = 0; i < c.dt.numel(); ++i) c.dt.f32()[i] = 0.1f + 0.05f * static_cast<float>(i % 5);
  c.Bm = randn({1, 7, c.G, c.S}, rng);
  c.Cm = randn({1, 7, c.G, c.S}, rng);
  Tensor seg = Tensor::empty({1, 7}, DType::I32);
  const int32_t sv[7] = {0, 0, 0, 1, 1, 1, 1};
  std::copy(sv, sv + 7, seg.data<int32_t>());
  Tensor y = Tensor::empty(c.x.shape(), DType::F32);
  ops::mamba_ssm_scan_fwd(c.x, c.dt, c.A, c.Bm, c.Cm, c.D, &seg, y, nullptr);
  auto tail = [&](const Tensor& t, int64_t per) {  // rows 3..6 of a [1, 7, ...] tensor
    Tensor o = Tensor::empty({1, 4, t.numel() / 7 / per, per}, DType::F32);
    std::copy(t.f32() + 3 * (t.numel() / 7), t.f32() + t.numel(), o.f32());
    return o;
  };
  Tensor x2 = tail(c.x, c.P), B2 = tail(c.Bm, c.S), C2 = tail(c.Cm, c.S);
  Tensor dt2 = Tensor::empty({1, 4, c.nh}, DType::F32);
  std::copy(c.dt.f32() + 3 * c.nh, c.dt.f32() + 7 * c.nh, dt2.f32());
  Tensor y2 = Tensor::empty(x2.shape(), DType::F32);
  ops::mamba_ssm_scan_fwd(x2, dt2, c.A, B2, C2, c.D, nullptr, y2, nullptr);
  for (int64_t i = 0; i < y2.numel(); ++i) EXPECT_EQ(y.f32()[3 * c.nh * c.P + i], y2.f32()[i]) << i;
}

TEST(Mamba2Ops, RejectsBadShapes) {
  std::mt19937 rng(9);
  Tensor x = randn({1, 3, 4}, rng), w = randn({4, 1, 4}, rng), pre = Tensor::empty({1, 3, 5}, DType::F32),
         y = Tensor::empty({1, 3, 4}, DType::F32);
  EXPECT_THROW(ops::mamba_conv1d_silu_fwd(x, w, nullptr, nullptr, pre, y), ShapeError);
}
