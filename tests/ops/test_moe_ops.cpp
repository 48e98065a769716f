// MoE ops (src/ops/moe_ops.h) on the CPU reference: router against a naive softmax/top-k, gradients against
// central finite differences of sum(out * R), the dispatch plan against its definition, grouped linear against
// per-expert linear_fwd/linear_bwd (ops.h), the fused SwiGLU against swiglu_fwd/bwd on the split halves, a whole
// MoE block by finite differences, and the errors thrown for bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../common/tolerance.h"
#include "core/error.h"
#include "core/tensor.h"
#include "ops/moe_ops.h"
#include "ops/ops.h"

using namespace am;
using am::test::fd_step;
using am::test::fd_tolerance;
using am::test::tolerance;
using am::test::Tolerance;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
const Tolerance kF32 = tolerance(DType::F32);
const Tolerance kFd = fd_tolerance(DType::F32);

Tensor randn(const Shape& shape, std::mt19937& rng, float stddev = 1.f) {
  Tensor t = Tensor::empty(shape, DType::F32);
  std::normal_distribution<float> d(0.f, stddev);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = d(rng);
  return t;
}
Tensor filled(const Shape& shape, float v) {
  Tensor t = Tensor::empty(shape, DType::F32);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = v;
  return t;
}
Tensor ints(const Shape& shape, const std::vector<int32_t>& v) {
  Tensor t = Tensor::empty(shape, DType::I32);
  EXPECT_EQ(static_cast<int64_t>(v.size()), t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) t.data<int32_t>()[i] = v[static_cast<size_t>(i)];
  return t;
}
Tensor iempty(const Shape& shape) { return Tensor::empty(shape, DType::I32); }
int64_t rand_in(std::mt19937& rng, int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }

std::vector<double> values(const Tensor& t) {
  std::vector<double> v(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) v[static_cast<size_t>(i)] = t.f32()[i];
  return v;
}
std::vector<int32_t> ivalues(const Tensor& t) {
  return std::vector<int32_t>(t.data<int32_t>(), t.data<int32_t>() + t.numel());
}
std::vector<double> delta(const Tensor& got, const Tensor& base) {
  std::vector<double> v = values(got);
  for (size_t i = 0; i < v.size(); ++i) v[i] -= base.f32()[i];
  return v;
}

void expect_close(const std::vector<double>& got, const std::vector<double>& want, Tolerance tol,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::abs(got[i] - want[i]);
    if (!(err <= tol.atol + tol.rtol * std::abs(want[i])) && ++bad <= 5)
      ADD_FAILURE() << what << "[" << i << "]: got " << got[i] << ", want " << want[i];
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " mismatches";
}
void expect_close(const Tensor& got, const std::vector<double>& want, Tolerance tol, const std::string& what) {
  expect_close(values(got), want, tol, what);
}

double objective(const Tensor& out, const Tensor& r) {
  double s = 0.0;
  for (int64_t i = 0; i < out.numel(); ++i) s += static_cast<double>(out.f32()[i]) * r.f32()[i];
  return s;
}

std::vector<double> numeric_grad(Tensor& param, const std::function<double()>& f, double h = fd_step(DType::F32)) {
  std::vector<double> g(static_cast<size_t>(param.numel()));
  float* p = param.f32();
  for (int64_t i = 0; i < param.numel(); ++i) {
    const float orig = p[i];
    const float up = static_cast<float>(orig + h), down = static_cast<float>(orig - h);
    p[i] = up;
    const double fp = f();
    p[i] = down;
    const double fm = f();
    p[i] = orig;
    g[static_cast<size_t>(i)] = (fp - fm) / (static_cast<double>(up) - static_cast<double>(down));
  }
  return g;
}

// Router logits whose probabilities are well separated (gaps of >= 0.3 in logit space), so that finite-difference
// steps of 1e-2 never change the top-k set or its order.
Tensor separated_logits(int64_t n, int64_t e, std::mt19937& rng) {
  Tensor t = Tensor::empty({n, e}, DType::F32);
  std::vector<int> order(static_cast<size_t>(e));
  std::uniform_real_distribution<float> jitter(-0.05f, 0.05f);
  for (int64_t r = 0; r < n; ++r) {
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    for (int64_t j = 0; j < e; ++j) t.f32()[r * e + j] = 0.4f * static_cast<float>(order[j]) - 1.f + jitter(rng);
  }
  return t;
}

// Random top-k expert ids (distinct within a row, as a router produces).
Tensor random_topk(int64_t n, int64_t e, int64_t k, std::mt19937& rng) {
  Tensor t = iempty({n, k});
  std::vector<int32_t> ids(static_cast<size_t>(e));
  for (int64_t r = 0; r < n; ++r) {
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    for (int64_t s = 0; s < k; ++s) t.data<int32_t>()[r * k + s] = ids[static_cast<size_t>(s)];
  }
  return t;
}

struct Plan {
  Tensor offsets, perm, inv;
  std::vector<int64_t> counts;
};
Plan make_plan(const Tensor& topk_idx, int64_t e) {
  Plan p{iempty({e + 1}), iempty({topk_idx.numel()}), iempty({topk_idx.numel()}), {}};
  ops::moe_dispatch_plan(topk_idx, e, p.offsets, p.perm, p.inv, &p.counts);
  return p;
}

// Offsets [E+1] for the given per-expert counts.
Tensor offsets_of(const std::vector<int64_t>& counts) {
  Tensor o = iempty({static_cast<int64_t>(counts.size()) + 1});
  o.data<int32_t>()[0] = 0;
  for (size_t j = 0; j < counts.size(); ++j)
    o.data<int32_t>()[j + 1] = o.data<int32_t>()[j] + static_cast<int32_t>(counts[j]);
  return o;
}

}  // namespace

// ============================== router ==============================

TEST(MoeOpsRouter, ForwardMatchesNaiveSoftmaxTopk) {
  for (uint32_t seed : {1u, 2u, 3u, 4u}) {
    std::mt19937 rng(seed);
    const int64_t N = rand_in(rng, 1, 9), E = rand_in(rng, 1, 70), k = rand_in(rng, 1, std::min<int64_t>(E, 9));
    Tensor logits = randn({N, E}, rng, 2.f);
    for (bool norm : {false, true}) {
      Tensor probs = filled({N, E}, kNaN), idx = iempty({N, k}), w = filled({N, k}, kNaN);
      ops::moe_router_fwd(logits, k, norm, probs, idx, w);
      std::vector<double> wp(static_cast<size_t>(N * E));
      for (int64_t t = 0; t < N; ++t) {
        double mx = -1e300, s = 0;
        for (int64_t j = 0; j < E; ++j) mx = std::max<double>(mx, logits.f32()[t * E + j]);
        for (int64_t j = 0; j < E; ++j) s += std::exp(logits.f32()[t * E + j] - mx);
        for (int64_t j = 0; j < E; ++j) wp[t * E + j] = std::exp(logits.f32()[t * E + j] - mx) / s;
      }
      const std::string tag = " seed " + std::to_string(seed) + " norm " + std::to_string(norm);
      expect_close(probs, wp, kF32, "probs" + tag);
      // Top-k of the returned probs: a stable sort by descending value (ties: lower index first).
      std::vector<double> ww;
      for (int64_t t = 0; t < N; ++t) {
        std::vector<int32_t> order(static_cast<size_t>(E));
        std::iota(order.begin(), order.end(), 0);
        const float* p = probs.f32() + t * E;
        std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return p[a] > p[b]; });
        double s = 0;
        for (int64_t j = 0; j < k; ++j) s += p[order[j]];
        for (int64_t j = 0; j < k; ++j) {
          EXPECT_EQ(idx.data<int32_t>()[t * k + j], order[j]) << "row " << t << " slot " << j << tag;
          ww.push_back(norm ? p[order[j]] / s : p[order[j]]);
        }
      }
      expect_close(w, ww, kF32, "topk_w" + tag);
    }
  }
}

TEST(MoeOpsRouter, TiesPickLowerIndexFirstAndBf16Logits) {
  Tensor logits = Tensor::empty({2, 5}, DType::F32);
  const float v[] = {1, 3, 3, 0, 3, /**/ 2, 2, 2, 2, 2};
  std::copy(v, v + 10, logits.f32());
  Tensor probs = Tensor::empty({2, 5}, DType::F32), idx = iempty({2, 3}), w = Tensor::empty({2, 3}, DType::F32);
  ops::moe_router_fwd(logits, 3, true, probs, idx, w);
  EXPECT_EQ(ivalues(idx), (std::vector<int32_t>{1, 2, 4, 0, 1, 2}));
  for (int i = 0; i < 6; ++i) EXPECT_NEAR(w.f32()[i], 1.0 / 3.0, 1e-6);
  ops::moe_router_fwd(logits, 3, false, probs, idx, w);
  for (int i = 3; i < 6; ++i) EXPECT_NEAR(w.f32()[i], 0.2, 1e-6);
  // bf16 logits (the CUDA model's dtype) are accepted and converted.
  Tensor probs2 = Tensor::empty({2, 5}, DType::F32), idx2 = iempty({2, 3}), w2 = Tensor::empty({2, 3}, DType::F32);
  ops::moe_router_fwd(logits.to(DType::BF16), 3, false, probs2, idx2, w2);
  EXPECT_EQ(ivalues(idx2), ivalues(idx));
  expect_close(probs2, values(probs), kF32, "bf16 logits");
}

TEST(MoeOpsRouter, BackwardFiniteDifference) {
  for (uint32_t seed : {5u, 6u, 7u}) {
    for (bool norm : {false, true}) {
      for (bool extra : {false, true}) {
        std::mt19937 rng(seed * 4 + norm * 2 + extra);
        const int64_t N = rand_in(rng, 1, 4), E = rand_in(rng, 2, 9), k = rand_in(rng, 1, E);
        Tensor logits = separated_logits(N, E, rng);
        Tensor r = randn({N, k}, rng), rp = randn({N, E}, rng);
        Tensor probs = Tensor::empty({N, E}, DType::F32), idx = iempty({N, k}), w = Tensor::empty({N, k}, DType::F32);
        auto f = [&] {
          ops::moe_router_fwd(logits, k, norm, probs, idx, w);
          return objective(w, r) + (extra ? objective(probs, rp) : 0.0);
        };
        f();
        Tensor dl = filled({N, E}, kNaN);
        ops::moe_router_bwd(probs, idx, w, norm, r, extra ? &rp : nullptr, dl);
        Tensor idx0 = idx.clone();
        const std::vector<double> num = numeric_grad(logits, f);
        f();
        ASSERT_EQ(ivalues(idx), ivalues(idx0)) << "finite differences changed the top-k set";
        expect_close(dl, num, kFd,
                     "dlogits seed " + std::to_string(seed) + " norm " + std::to_string(norm) + " extra " +
                         std::to_string(extra) + " N=" + std::to_string(N) + " E=" + std::to_string(E) +
                         " k=" + std::to_string(k));
      }
    }
  }
}

TEST(MoeOpsRouter, BackwardBf16DlogitsAndNaiveLargerShape) {
  std::mt19937 rng(8);
  const int64_t N = 37, E = 64, k = 8;
  Tensor logits = randn({N, E}, rng);
  Tensor probs = Tensor::empty({N, E}, DType::F32), idx = iempty({N, k}), w = Tensor::empty({N, k}, DType::F32);
  ops::moe_router_fwd(logits, k, true, probs, idx, w);
  Tensor dw = randn({N, k}, rng), dpe = randn({N, E}, rng);
  Tensor dl = filled({N, E}, kNaN);
  ops::moe_router_bwd(probs, idx, w, true, dw, &dpe, dl);
  // Naive: dense Jacobian of the normalised top-k weights wrt probs, then the softmax Jacobian.
  std::vector<double> want(static_cast<size_t>(N * E));
  for (int64_t t = 0; t < N; ++t) {
    std::vector<double> dp(static_cast<size_t>(E));
    for (int64_t j = 0; j < E; ++j) dp[j] = dpe.f32()[t * E + j];
    double S = 0;
    for (int64_t s = 0; s < k; ++s) S += probs.f32()[t * E + idx.data<int32_t>()[t * k + s]];
    for (int64_t s = 0; s < k; ++s)      // w_s = p_{i_s} / S
      for (int64_t q = 0; q < k; ++q) {  // d w_s / d p_{i_q} = [s==q]/S - p_{i_s}/S^2
        const double ps = probs.f32()[t * E + idx.data<int32_t>()[t * k + s]];
        dp[idx.data<int32_t>()[t * k + q]] += dw.f32()[t * k + s] * ((s == q ? 1.0 / S : 0.0) - ps / (S * S));
      }
    for (int64_t j = 0; j < E; ++j) {
      double acc = 0;
      for (int64_t m = 0; m < E; ++m) {
        const double pj = probs.f32()[t * E + j], pm = probs.f32()[t * E + m];
        acc += dp[m] * pm * ((m == j ? 1.0 : 0.0) - pj);  // d p_m / d l_j
      }
      want[t * E + j] = acc;
    }
  }
  expect_close(dl, want, kF32, "dlogits vs dense Jacobian");
  Tensor dl16 = Tensor::empty({N, E}, DType::BF16);
  ops::moe_router_bwd(probs, idx, w, true, dw, &dpe, dl16);
  expect_close(dl16.to(DType::F32), want, tolerance(DType::BF16), "bf16 dlogits");
}

// ============================== dispatch plan ==============================

TEST(MoeOpsPlan, StableSortByExpert) {
  for (uint32_t seed : {10u, 11u, 12u}) {
    std::mt19937 rng(seed);
    const int64_t E = rand_in(rng, 1, 20), k = rand_in(rng, 1, std::min<int64_t>(E, 4)), N = rand_in(rng, 0, 50);
    Tensor idx = random_topk(N, E, k, rng);
    Plan p = make_plan(idx, E);
    const int32_t* id = idx.data<int32_t>();
    ASSERT_EQ(static_cast<int64_t>(p.counts.size()), E);
    std::vector<int32_t> want_perm;
    int32_t off = 0;
    for (int64_t e = 0; e < E; ++e) {
      EXPECT_EQ(p.offsets.data<int32_t>()[e], off);
      int64_t c = 0;
      for (int64_t i = 0; i < N * k; ++i)
        if (id[i] == e) {
          want_perm.push_back(static_cast<int32_t>(i));
          ++c;
        }
      EXPECT_EQ(p.counts[e], c);
      off += static_cast<int32_t>(c);
    }
    EXPECT_EQ(p.offsets.data<int32_t>()[E], N * k);
    EXPECT_EQ(ivalues(p.perm), want_perm);
    for (int64_t j = 0; j < N * k; ++j) EXPECT_EQ(p.inv.data<int32_t>()[p.perm.data<int32_t>()[j]], j);
  }
  // Repeated experts in a row (not what a router makes, but allowed) and unused experts.
  Tensor idx = ints({3, 2}, {2, 2, 0, 2, 2, 0});
  Plan p = make_plan(idx, 4);
  EXPECT_EQ(ivalues(p.offsets), (std::vector<int32_t>{0, 2, 2, 6, 6}));
  EXPECT_EQ(ivalues(p.perm), (std::vector<int32_t>{2, 5, 0, 1, 3, 4}));
  EXPECT_EQ(p.counts, (std::vector<int64_t>{2, 0, 4, 0}));
  // No host counts requested.
  Tensor o = iempty({5}), pe = iempty({6}), iv = iempty({6});
  ops::moe_dispatch_plan(idx, 4, o, pe, iv, nullptr);
  EXPECT_EQ(ivalues(pe), ivalues(p.perm));
}

TEST(MoeOpsPlan, OutOfRangeExpertThrowsDataError) {
  Tensor o = iempty({5}), pe = iempty({4}), iv = iempty({4});
  EXPECT_THROW(ops::moe_dispatch_plan(ints({2, 2}, {0, 1, 4, 2}), 4, o, pe, iv, nullptr), DataError);
  EXPECT_THROW(ops::moe_dispatch_plan(ints({2, 2}, {0, -1, 3, 2}), 4, o, pe, iv, nullptr), DataError);
  try {
    ops::moe_dispatch_plan(ints({2, 2}, {0, 1, 7, 2}), 4, o, pe, iv, nullptr);
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("moe_dispatch_plan"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("7"), std::string::npos) << e.what();
  }
}

// ============================== gather / combine ==============================

TEST(MoeOpsPermute, GatherAndBackwardMatchNaive) {
  for (uint32_t seed : {20u, 21u, 22u}) {
    std::mt19937 rng(seed);
    const int64_t E = rand_in(rng, 1, 8), k = rand_in(rng, 1, E), N = rand_in(rng, 1, 40), H = rand_in(rng, 1, 33);
    Plan p = make_plan(random_topk(N, E, k, rng), E);
    Tensor x = randn({N, H}, rng), xg = filled({N * k, H}, kNaN);
    ops::moe_gather(x, p.perm, k, xg);
    std::vector<double> want;
    for (int64_t j = 0; j < N * k; ++j)
      for (int64_t c = 0; c < H; ++c) want.push_back(x.f32()[(p.perm.data<int32_t>()[j] / k) * H + c]);
    EXPECT_EQ(values(xg), want);
    // Backward: dx[t] = sum over the rows gathered from t, by a scatter loop over the grouped rows.
    Tensor dxg = randn({N * k, H}, rng), dx = filled({N, H}, kNaN);
    ops::moe_gather_bwd(dxg, p.inv, k, dx);
    std::vector<double> wdx(static_cast<size_t>(N * H), 0.0);
    for (int64_t j = 0; j < N * k; ++j)
      for (int64_t c = 0; c < H; ++c) wdx[(p.perm.data<int32_t>()[j] / k) * H + c] += dxg.f32()[j * H + c];
    expect_close(dx, wdx, kF32, "gather_bwd seed " + std::to_string(seed));
  }
}

TEST(MoeOpsPermute, CombineMatchesNaiveAndBackwardFiniteDifference) {
  for (uint32_t seed : {30u, 31u, 32u}) {
    std::mt19937 rng(seed);
    const int64_t E = rand_in(rng, 1, 6), k = rand_in(rng, 1, E), N = rand_in(rng, 1, 6), H = rand_in(rng, 1, 5);
    Plan p = make_plan(random_topk(N, E, k, rng), E);
    Tensor yg = randn({N * k, H}, rng), w = randn({N, k}, rng), y = filled({N, H}, kNaN);
    ops::moe_combine(yg, p.inv, w, y);
    std::vector<double> want(static_cast<size_t>(N * H), 0.0);
    for (int64_t t = 0; t < N; ++t)
      for (int64_t s = 0; s < k; ++s)
        for (int64_t c = 0; c < H; ++c)
          want[t * H + c] += static_cast<double>(w.f32()[t * k + s]) * yg.f32()[p.inv.data<int32_t>()[t * k + s] * H + c];
    const std::string tag = " seed " + std::to_string(seed);
    expect_close(y, want, kF32, "combine" + tag);

    Tensor r = randn({N, H}, rng);
    auto f = [&] {
      ops::moe_combine(yg, p.inv, w, y);
      return objective(y, r);
    };
    Tensor dyg = filled({N * k, H}, kNaN), dw = filled({N, k}, kNaN);
    ops::moe_combine_bwd(yg, p.inv, w, r, dyg, dw);
    expect_close(dyg, numeric_grad(yg, f), kFd, "combine dyg" + tag);
    expect_close(dw, numeric_grad(w, f), kFd, "combine dtopk_w" + tag);
  }
}

// ============================== grouped linear ==============================

TEST(MoeOpsGroupedLinear, MatchesPerExpertLinearIncludingEmptyExperts) {
  for (uint32_t seed : {40u, 41u, 42u, 43u}) {
    std::mt19937 rng(seed);
    const int64_t E = rand_in(rng, 2, 7), K = rand_in(rng, 1, 40), Nout = rand_in(rng, 1, 40);
    std::vector<int64_t> counts(static_cast<size_t>(E));
    for (auto& c : counts) c = rng() % 3 == 0 ? 0 : rand_in(rng, 1, 30);
    counts[0] = 0;  // first and (seed-dependent) last experts empty
    if (seed % 2) counts[static_cast<size_t>(E - 1)] = 0;
    const int64_t M = std::accumulate(counts.begin(), counts.end(), int64_t{0});
    Tensor off = offsets_of(counts);
    Tensor x = randn({M, K}, rng), w = randn({E, Nout, K}, rng), dy = randn({M, Nout}, rng);
    Tensor y = filled({M, Nout}, kNaN);
    ops::grouped_linear_fwd(x, w, off, y, seed % 2 ? &counts : nullptr);
    Tensor dx = filled({M, K}, kNaN), dw0 = randn({E, Nout, K}, rng), dw = dw0.clone();
    ops::grouped_linear_bwd(x, w, off, dy, &dx, dw, &counts);
    // Per-expert reference through ops.h.
    Tensor wy = Tensor::zeros({M, Nout}, DType::F32), wdx = Tensor::zeros({M, K}, DType::F32), wdw = dw0.clone();
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = off.data<int32_t>()[e], r1 = off.data<int32_t>()[e + 1];
      if (r1 == r0) continue;
      Tensor xe = x.slice_rows(r0, r1), ye = wy.slice_rows(r0, r1), dye = dy.slice_rows(r0, r1),
             dxe = wdx.slice_rows(r0, r1);
      Tensor we = w.slice_rows(e, e + 1).view({Nout, K}), dwe = wdw.slice_rows(e, e + 1).view({Nout, K});
      ops::linear_fwd(xe, we, nullptr, ye);
      ops::linear_bwd(xe, we, dye, &dxe, dwe, nullptr);
    }
    const std::string tag = " seed " + std::to_string(seed);
    expect_close(y, values(wy), kF32, "y" + tag);
    expect_close(dx, values(wdx), kF32, "dx" + tag);
    expect_close(dw, values(wdw), kF32, "dw" + tag);
    // Empty experts' dw untouched (bit for bit).
    for (int64_t e = 0; e < E; ++e)
      if (counts[static_cast<size_t>(e)] == 0)
        for (int64_t i = 0; i < Nout * K; ++i) ASSERT_EQ(dw.f32()[e * Nout * K + i], dw0.f32()[e * Nout * K + i]);
    // dx == nullptr: only dw, accumulated once more.
    ops::grouped_linear_bwd(x, w, off, dy, nullptr, dw, nullptr);
    std::vector<double> twice = values(wdw);
    for (size_t i = 0; i < twice.size(); ++i) twice[i] = 2 * twice[i] - dw0.f32()[i];
    expect_close(dw, twice, Tolerance{kF32.rtol, 1e-4}, "dw twice" + tag);
  }
}

TEST(MoeOpsGroupedLinear, BadOffsetsAndCountsThrow) {
  Tensor x = Tensor::zeros({5, 3}, DType::F32), w = Tensor::zeros({2, 4, 3}, DType::F32);
  Tensor y = Tensor::empty({5, 4}, DType::F32);
  EXPECT_THROW(ops::grouped_linear_fwd(x, w, ints({3}, {0, 2, 4}), y), DataError);  // offsets[E] != M
  EXPECT_THROW(ops::grouped_linear_fwd(x, w, ints({3}, {0, 6, 5}), y), DataError);  // decreasing
  EXPECT_THROW(ops::grouped_linear_fwd(x, w, ints({3}, {1, 2, 5}), y), DataError);  // offsets[0] != 0
  std::vector<int64_t> wrong{3, 2};
  EXPECT_THROW(ops::grouped_linear_fwd(x, w, ints({3}, {0, 2, 5}), y, &wrong), DataError);
  std::vector<int64_t> short_counts{5};
  EXPECT_THROW(ops::grouped_linear_fwd(x, w, ints({3}, {0, 2, 5}), y, &short_counts), ShapeError);
  EXPECT_THROW(ops::grouped_linear_fwd(x, w, ints({2}, {0, 5}), y), ShapeError);  // offsets not E+1
  Tensor y_bad = Tensor::empty({5, 3}, DType::F32);
  EXPECT_THROW(ops::grouped_linear_fwd(x, w, ints({3}, {0, 2, 5}), y_bad), ShapeError);
  Tensor w2 = Tensor::zeros({4, 3}, DType::F32);
  EXPECT_THROW(ops::grouped_linear_fwd(x, w2, ints({3}, {0, 2, 5}), y), ShapeError);
  Tensor dw_bf16 = Tensor::zeros({2, 4, 3}, DType::BF16);
  EXPECT_THROW(ops::grouped_linear_bwd(x, w, ints({3}, {0, 2, 5}), y, nullptr, dw_bf16), ShapeError);
  Tensor xb = x.to(DType::BF16);
  EXPECT_THROW(ops::grouped_linear_fwd(xb, w, ints({3}, {0, 2, 5}), y), ShapeError);  // CPU: fp32 only
  ops::grouped_linear_fwd(x, w, ints({3}, {0, 2, 5}), y);                             // the good call works
}

// ============================== fused SwiGLU ==============================

TEST(MoeOpsSwiGLU, FusedMatchesSplitHalves) {
  for (uint32_t seed : {50u, 51u}) {
    std::mt19937 rng(seed);
    const int64_t M = rand_in(rng, 0, 30), I = rand_in(rng, 1, 50);
    Tensor gu = randn({M, 2 * I}, rng, 2.f), dh = randn({M, I}, rng);
    Tensor gate = Tensor::empty({M, I}, DType::F32), up = Tensor::empty({M, I}, DType::F32);
    for (int64_t r = 0; r < M; ++r)
      for (int64_t c = 0; c < I; ++c) {
        gate.f32()[r * I + c] = gu.f32()[r * 2 * I + c];
        up.f32()[r * I + c] = gu.f32()[r * 2 * I + I + c];
      }
    Tensor h = filled({M, I}, kNaN), wh = Tensor::empty({M, I}, DType::F32);
    ops::swiglu_fused_fwd(gu, h);
    ops::swiglu_fwd(gate, up, wh);
    EXPECT_EQ(values(h), values(wh));
    Tensor dgu = filled({M, 2 * I}, kNaN), dg = Tensor::empty({M, I}, DType::F32), du = Tensor::empty({M, I}, DType::F32);
    ops::swiglu_fused_bwd(gu, dh, dgu);
    ops::swiglu_bwd(gate, up, dh, dg, du);
    for (int64_t r = 0; r < M; ++r)
      for (int64_t c = 0; c < I; ++c) {
        ASSERT_EQ(dgu.f32()[r * 2 * I + c], dg.f32()[r * I + c]);
        ASSERT_EQ(dgu.f32()[r * 2 * I + I + c], du.f32()[r * I + c]);
      }
  }
  Tensor odd = Tensor::zeros({2, 5}, DType::F32), h = Tensor::empty({2, 2}, DType::F32);
  EXPECT_THROW(ops::swiglu_fused_fwd(odd, h), ShapeError);
  Tensor gu = Tensor::zeros({2, 4}, DType::F32), hbad = Tensor::empty({3, 2}, DType::F32);
  EXPECT_THROW(ops::swiglu_fused_fwd(gu, hbad), ShapeError);
}

// ============================== whole block ==============================

namespace {
// One HF-style sparse MoE block on the ops (what the model code composes): returns y [N, H].
struct Block {
  int64_t N = 0, E = 0, k = 0, H = 0, I = 0;
  bool norm = false;
  Tensor x, wr, wgu, wd;
  Tensor logits, probs, idx, tw, xg, gu, h, yg, y;
  Plan plan;
  void forward() {
    logits = Tensor::empty({N, E}, DType::F32);
    ops::linear_fwd(x, wr, nullptr, logits);
    probs = Tensor::empty({N, E}, DType::F32);
    idx = iempty({N, k});
    tw = Tensor::empty({N, k}, DType::F32);
    ops::moe_router_fwd(logits, k, norm, probs, idx, tw);
    plan = make_plan(idx, E);
    xg = Tensor::empty({N * k, H}, DType::F32);
    ops::moe_gather(x, plan.perm, k, xg);
    gu = Tensor::empty({N * k, 2 * I}, DType::F32);
    ops::grouped_linear_fwd(xg, wgu, plan.offsets, gu, &plan.counts);
    h = Tensor::empty({N * k, I}, DType::F32);
    ops::swiglu_fused_fwd(gu, h);
    yg = Tensor::empty({N * k, H}, DType::F32);
    ops::grouped_linear_fwd(h, wd, plan.offsets, yg, &plan.counts);
    y = Tensor::empty({N, H}, DType::F32);
    ops::moe_combine(yg, plan.inv, tw, y);
  }
  // dx (assigned), dwr/dwgu/dwd (+=) for dy.
  void backward(const Tensor& dy, Tensor& dx, Tensor& dwr, Tensor& dwgu, Tensor& dwd) {
    Tensor dyg = Tensor::empty({N * k, H}, DType::F32), dtw = Tensor::empty({N, k}, DType::F32);
    ops::moe_combine_bwd(yg, plan.inv, tw, dy, dyg, dtw);
    Tensor dh = Tensor::empty({N * k, I}, DType::F32);
    ops::grouped_linear_bwd(h, wd, plan.offsets, dyg, &dh, dwd, &plan.counts);
    Tensor dgu = Tensor::empty({N * k, 2 * I}, DType::F32);
    ops::swiglu_fused_bwd(gu, dh, dgu);
    Tensor dxg = Tensor::empty({N * k, H}, DType::F32);
    ops::grouped_linear_bwd(xg, wgu, plan.offsets, dgu, &dxg, dwgu, &plan.counts);
    ops::moe_gather_bwd(dxg, plan.inv, k, dx);
    Tensor dlogits = Tensor::empty({N, E}, DType::F32);
    ops::moe_router_bwd(probs, idx, tw, norm, dtw, nullptr, dlogits);
    Tensor dx_r = Tensor::empty({N, H}, DType::F32);
    ops::linear_bwd(x, wr, dlogits, &dx_r, dwr, nullptr);
    ops::add_(dx, dx_r);
  }
};
}  // namespace

TEST(MoeOpsBlock, WholeBlockGradientsFiniteDifference) {
  for (bool norm : {false, true}) {
    std::mt19937 rng(60 + norm);
    Block b;
    b.N = 5, b.E = 4, b.k = 2, b.H = 3, b.I = 2, b.norm = norm;
    b.x = randn({b.N, b.H}, rng);
    b.wr = randn({b.E, b.H}, rng, 2.f);
    b.wgu = randn({b.E, 2 * b.I, b.H}, rng);
    b.wd = randn({b.E, b.H, b.I}, rng);
    Tensor r = randn({b.N, b.H}, rng);
    auto f = [&] {
      b.forward();
      return objective(b.y, r);
    };
    f();
    const std::vector<int32_t> idx0 = ivalues(b.idx);
    Tensor dx = filled({b.N, b.H}, kNaN), dwr = Tensor::zeros({b.E, b.H}, DType::F32),
           dwgu = Tensor::zeros({b.E, 2 * b.I, b.H}, DType::F32), dwd = Tensor::zeros({b.E, b.H, b.I}, DType::F32);
    b.backward(r, dx, dwr, dwgu, dwd);
    const double step = 1e-3;  // small: keeps the routing fixed
    const Tolerance tol{1e-2, 2e-3};
    const std::string tag = std::string(" norm ") + (norm ? "1" : "0");
    expect_close(dwgu, numeric_grad(b.wgu, f, step), tol, "dW_gate_up" + tag);
    expect_close(dwd, numeric_grad(b.wd, f, step), tol, "dW_down" + tag);
    expect_close(dwr, numeric_grad(b.wr, f, step), tol, "dW_router" + tag);
    expect_close(dx, numeric_grad(b.x, f, step), tol, "dx" + tag);
    f();
    EXPECT_EQ(ivalues(b.idx), idx0) << "routing changed during finite differences";
  }
}

// ============================== errors ==============================

TEST(MoeOpsErrors, ShapeDtypeAndDeviceErrors) {
  Tensor logits = Tensor::zeros({3, 4}, DType::F32), probs = Tensor::empty({3, 4}, DType::F32);
  Tensor idx = iempty({3, 2}), w = Tensor::empty({3, 2}, DType::F32);
  EXPECT_THROW(ops::moe_router_fwd(logits, 3, false, probs, idx, w), ShapeError);  // k vs topk_idx
  Tensor idx5 = iempty({3, 5}), w5 = Tensor::empty({3, 5}, DType::F32);
  EXPECT_THROW(ops::moe_router_fwd(logits, 5, false, probs, idx5, w5), ShapeError);  // k > E
  Tensor idx_f = Tensor::empty({3, 2}, DType::F32);
  EXPECT_THROW(ops::moe_router_fwd(logits, 2, false, probs, idx_f, w), ShapeError);  // idx not int32
  Tensor probs_bad = Tensor::empty({2, 4}, DType::F32);
  EXPECT_THROW(ops::moe_router_fwd(logits, 2, false, probs_bad, idx, w), ShapeError);
  try {
    ops::moe_router_fwd(logits, 2, false, probs_bad, idx, w);
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("moe_router_fwd"), std::string::npos) << e.what();
  }
  Tensor x = Tensor::zeros({3, 8}, DType::F32), xg = Tensor::empty({5, 8}, DType::F32), perm = iempty({6});
  EXPECT_THROW(ops::moe_gather(x, perm, 2, xg), ShapeError);  // xg rows != N*k
  Tensor xg6 = Tensor::empty({6, 8}, DType::F32);
  Tensor perm_bad = ints({6}, {0, 1, 2, 3, 4, 6});
  EXPECT_THROW(ops::moe_gather(x, perm_bad, 2, xg6), DataError);
  Tensor undefined;
  EXPECT_THROW(ops::moe_gather(undefined, perm, 2, xg6), ShapeError);
  // A host buffer labelled as CUDA memory is refused (device mismatch) before being read.
  auto buf = std::make_shared<std::vector<char>>(6 * 4 + 1);
  Tensor fake = Tensor::wrap(buf->data(), {6}, DType::I32, buf, DeviceType::CUDA);
  EXPECT_THROW(ops::moe_gather(x, fake, 2, xg6), DeviceError);
}
