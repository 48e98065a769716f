// DeepSeek's CPU ops: attention whose v head dim differs from the q/k one (MLA: 192 vs 128), the
// grouped sigmoid / softmax routers (moe_ops.h moe_router_grouped_*) and MLA's rope-column ops (mla_ops.h),
// against naive references written here and finite differences.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "ops/mla_ops.h"
#include "ops/moe_ops.h"
#include "ops/ops.h"

using namespace am;

namespace {

Tensor randn(const Shape& shape, std::mt19937& rng, float sd = 1.f) {
  Tensor t = Tensor::empty(shape, DType::F32);
  std::normal_distribution<float> n(0.f, sd);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = n(rng);
  return t;
}

// Naive causal attention in double, q/k [B, T, nh, D], v [B, T, nh, Dv] (no GQA), with optional segments.
std::vector<double> naive_attention(const Tensor& q, const Tensor& k, const Tensor& v, const ops::AttnParams& p,
                                    const std::vector<int32_t>& seg) {
  const int64_t B = p.batch, T = p.seq, H = p.n_heads, D = p.head_dim, DV = p.dv();
  std::vector<double> out(static_cast<size_t>(B * T * H * DV), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < T; ++i) {
        const int32_t si = seg.empty() ? 0 : seg[b * T + i];
        if (si < 0) continue;
        std::vector<double> s;
        std::vector<int64_t> js;
        for (int64_t j = 0; j <= i; ++j) {
          if (!seg.empty() && seg[b * T + j] != si) continue;
          double d = 0;
          for (int64_t x = 0; x < D; ++x)
            d += double(q.f32()[((b * T + i) * H + h) * D + x]) * k.f32()[((b * T + j) * H + h) * D + x];
          s.push_back(d * p.scale);
          js.push_back(j);
        }
        const double m = *std::max_element(s.begin(), s.end());
        double z = 0;
        for (double& e : s) z += (e = std::exp(e - m));
        for (size_t a = 0; a < js.size(); ++a)
          for (int64_t x = 0; x < DV; ++x)
            out[((b * T + i) * H + h) * DV + x] += s[a] / z * v.f32()[((b * T + js[a]) * H + h) * DV + x];
      }
  return out;
}

}  // namespace

TEST(DeepseekAttention, VHeadDimDiffersFromQkForwardMatchesNaive) {
  std::mt19937 rng(11);
  ops::AttnParams p;
  p.batch = 2, p.seq = 7, p.n_heads = 3, p.n_kv_heads = 3, p.head_dim = 12, p.v_head_dim = 5;
  p.scale = 0.37f;
  Tensor seg = Tensor::empty({2, 7}, DType::I32);
  std::vector<int32_t> sv = {0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, -1, -1};
  std::copy(sv.begin(), sv.end(), seg.data<int32_t>());
  p.segment_ids = &seg;
  Tensor q = randn({2, 7, 3, 12}, rng), k = randn({2, 7, 3, 12}, rng), v = randn({2, 7, 3, 5}, rng);
  Tensor out = Tensor::empty({2, 7, 3, 5}, DType::F32), lse = Tensor::empty({2, 3, 7}, DType::F32);
  ops::attention_fwd(q, k, v, p, out, lse);
  auto want = naive_attention(q, k, v, p, sv);
  for (int64_t i = 0; i < out.numel(); ++i) EXPECT_NEAR(out.f32()[i], want[static_cast<size_t>(i)], 1e-5) << i;
  // a v / out of the q/k head dim is a shape error now
  Tensor bad = Tensor::empty({2, 7, 3, 12}, DType::F32);
  EXPECT_THROW(ops::attention_fwd(q, k, bad, p, out, lse), ShapeError);
}

TEST(DeepseekAttention, VHeadDimDiffersGradientsFiniteDifference) {
  std::mt19937 rng(12);
  ops::AttnParams p;
  p.batch = 1, p.seq = 5, p.n_heads = 2, p.n_kv_heads = 2, p.head_dim = 6, p.v_head_dim = 4;
  p.scale = 0.5f;
  Tensor q = randn({1, 5, 2, 6}, rng), k = randn({1, 5, 2, 6}, rng), v = randn({1, 5, 2, 4}, rng);
  Tensor w = randn({1, 5, 2, 4}, rng);  // loss = <out, w>
  auto loss = [&]() {
    Tensor out = Tensor::empty({1, 5, 2, 4}, DType::F32), lse = Tensor::empty({1, 2, 5}, DType::F32);
    ops::attention_fwd(q, k, v, p, out, lse);
    double l = 0;
    for (int64_t i = 0; i < out.numel(); ++i) l += double(out.f32()[i]) * w.f32()[i];
    return l;
  };
  Tensor out = Tensor::empty({1, 5, 2, 4}, DType::F32), lse = Tensor::empty({1, 2, 5}, DType::F32);
  ops::attention_fwd(q, k, v, p, out, lse);
  Tensor dq = Tensor::empty(q.shape(), DType::F32), dk = Tensor::empty(k.shape(), DType::F32),
         dv = Tensor::empty(v.shape(), DType::F32);
  ops::attention_bwd(q, k, v, out, lse, w, p, dq, dk, dv);
  const float eps = 1e-2f;
  for (auto [t, g] : {std::pair<Tensor*, Tensor*>{&q, &dq}, {&k, &dk}, {&v, &dv}})
    for (int64_t i = 0; i < t->numel(); ++i) {
      const float x = t->f32()[i];
      t->f32()[i] = x + eps;
      const double lp = loss();
      t->f32()[i] = x - eps;
      const double lm = loss();
      t->f32()[i] = x;
      EXPECT_NEAR(g->f32()[i], (lp - lm) / (2 * eps), 2e-3) << i;
    }
}

namespace {

// The router of HF DeepseekV3MoE / DeepseekV2Moe, literally: group scores, masks, top-k, gather.
void naive_router(const std::vector<float>& logits, const std::vector<float>& bias, int64_t E, int64_t k,
                  const ops::GroupedRouterOptions& o, std::vector<int32_t>& idx, std::vector<double>& w) {
  const int64_t N = static_cast<int64_t>(logits.size()) / E, G = o.n_group, per = E / G;
  idx.assign(static_cast<size_t>(N * k), -1);
  w.assign(static_cast<size_t>(N * k), 0.0);
  for (int64_t t = 0; t < N; ++t) {
    std::vector<double> s(static_cast<size_t>(E)), c(static_cast<size_t>(E));
    double z = 0, mx = -1e30;
    for (int64_t e = 0; e < E; ++e) mx = std::max<double>(mx, logits[t * E + e]);
    for (int64_t e = 0; e < E; ++e) z += std::exp(logits[t * E + e] - mx);
    for (int64_t e = 0; e < E; ++e) {
      const double l = logits[t * E + e];
      s[e] = o.sigmoid ? 1 / (1 + std::exp(-l)) : std::exp(l - mx) / z;
      c[e] = s[e] + (bias.empty() ? 0.0 : bias[e]);
    }
    if (o.group != ops::GroupedRouterOptions::Group::None) {
      std::vector<std::pair<double, int64_t>> gs;
      for (int64_t g = 0; g < G; ++g) {
        std::vector<double> v(c.begin() + g * per, c.begin() + (g + 1) * per);
        std::sort(v.rbegin(), v.rend());
        gs.push_back({o.group == ops::GroupedRouterOptions::Group::Top2Sum ? v[0] + v[1] : v[0], -g});
      }
      std::sort(gs.rbegin(), gs.rend());  // by score, then lower group index first
      std::vector<bool> keep(static_cast<size_t>(G), false);
      for (int64_t i = 0; i < o.topk_group; ++i) keep[static_cast<size_t>(-gs[i].second)] = true;
      for (int64_t e = 0; e < E; ++e)
        if (!keep[e / per]) c[e] = 0.0;
    }
    std::vector<int64_t> order(static_cast<size_t>(E));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return c[a] > c[b]; });
    double sum = 0;
    for (int64_t j = 0; j < k; ++j) sum += s[order[j]];
    for (int64_t j = 0; j < k; ++j) {
      idx[t * k + j] = static_cast<int32_t>(order[j]);
      w[t * k + j] = (o.norm_topk_prob ? s[order[j]] / (sum + 1e-20) : s[order[j]]) * o.routed_scaling_factor;
    }
  }
}

struct RouterCase {
  const char* name;
  ops::GroupedRouterOptions o;
  bool bias;
};

std::vector<RouterCase> router_cases() {
  using G = ops::GroupedRouterOptions::Group;
  return {
      {"v3_noaux_tc", {true, G::Top2Sum, 4, 2, true, 2.5f}, true},
      {"v3_no_norm", {true, G::Top2Sum, 2, 1, false, 1.5f}, true},
      {"v2_greedy", {false, G::None, 1, 1, false, 16.f}, false},
      {"v2_group_limited", {false, G::Max, 4, 3, false, 1.f}, false},
  };
}

}  // namespace

TEST(DeepseekRouter, GroupLimitedTopKMatchesNaive) {
  std::mt19937 rng(21);
  const int64_t N = 64, E = 8, k = 2;
  for (const RouterCase& rc : router_cases()) {
    Tensor logits = randn({N, E}, rng, 2.f), bias = randn({E}, rng, 0.3f);
    std::vector<float> lv(logits.f32(), logits.f32() + N * E), bv;
    if (rc.bias) bv.assign(bias.f32(), bias.f32() + E);
    Tensor scores = Tensor::empty({N, E}, DType::F32), idx = Tensor::empty({N, k}, DType::I32),
           w = Tensor::empty({N, k}, DType::F32);
    ops::moe_router_grouped_fwd(logits, rc.bias ? &bias : nullptr, k, rc.o, scores, idx, w);
    std::vector<int32_t> ni;
    std::vector<double> nw;
    naive_router(lv, bv, E, k, rc.o, ni, nw);
    int bias_changed = 0;
    for (int64_t t = 0; t < N; ++t)
      for (int64_t j = 0; j < k; ++j) {
        EXPECT_EQ(idx.data<int32_t>()[t * k + j], ni[t * k + j]) << rc.name << " token " << t << " slot " << j;
        EXPECT_NEAR(w.f32()[t * k + j], nw[t * k + j], 1e-5 * rc.o.routed_scaling_factor) << rc.name << " " << t;
      }
    if (rc.bias) {  // the bias must matter in this draw, or the test would not see it
      std::vector<int32_t> ub;
      std::vector<double> uw;
      naive_router(lv, {}, E, k, rc.o, ub, uw);
      for (size_t i = 0; i < ub.size(); ++i) bias_changed += ub[i] != ni[i];
      EXPECT_GT(bias_changed, 0) << rc.name;
    }
  }
}

TEST(DeepseekRouter, GradientFiniteDifference) {
  std::mt19937 rng(22);
  const int64_t N = 16, E = 8, k = 3;
  for (const RouterCase& rc : router_cases()) {
    Tensor logits = randn({N, E}, rng, 1.5f), bias = randn({E}, rng, 0.3f), dw = randn({N, k}, rng);
    const Tensor* b = rc.bias ? &bias : nullptr;
    Tensor scores = Tensor::empty({N, E}, DType::F32), idx = Tensor::empty({N, k}, DType::I32),
           w = Tensor::empty({N, k}, DType::F32);
    ops::moe_router_grouped_fwd(logits, b, k, rc.o, scores, idx, w);
    Tensor dl = Tensor::empty({N, E}, DType::F32);
    ops::moe_router_grouped_bwd(scores, idx, rc.o, dw, dl);
    // L = sum dw * topk_w, with the selection held fixed (it is piecewise constant).
    const std::vector<int32_t> sel(idx.data<int32_t>(), idx.data<int32_t>() + N * k);
    auto loss = [&]() {
      Tensor s2 = Tensor::empty({N, E}, DType::F32), i2 = Tensor::empty({N, k}, DType::I32),
             w2 = Tensor::empty({N, k}, DType::F32);
      ops::moe_router_grouped_fwd(logits, b, k, rc.o, s2, i2, w2);
      double l = 0;
      for (int64_t i = 0; i < N * k; ++i) {
        if (i2.data<int32_t>()[i] != sel[static_cast<size_t>(i)]) return double(NAN);  // selection moved: skip
        l += double(dw.f32()[i]) * w2.f32()[i];
      }
      return l;
    };
    const float eps = 1e-3f;
    int checked = 0;
    for (int64_t i = 0; i < N * E; ++i) {
      const float x = logits.f32()[i];
      logits.f32()[i] = x + eps;
      const double lp = loss();
      logits.f32()[i] = x - eps;
      const double lm = loss();
      logits.f32()[i] = x;
      if (std::isnan(lp) || std::isnan(lm)) continue;
      EXPECT_NEAR(dl.f32()[i], (lp - lm) / (2 * eps), 2e-3 * rc.o.routed_scaling_factor) << rc.name << " " << i;
      ++checked;
    }
    EXPECT_GT(checked, N * E / 2) << rc.name;
  }
}

// MLA's rope-column ops (ops/mla_ops.h) on the host: against their definition, as each other's transpose
// (<gather(W), n> == <W, scatter(n)> summed over the rope block for G heads), and their shape errors.
TEST(DeepseekMlaCols, GatherScatterMatchDefinitionAndAreTransposes) {
  std::mt19937 rng(23);
  struct Case {
    int64_t R, G, C, col, w;
    bool il;
  };
  for (const Case c : {Case{5, 1, 24, 16, 8, true}, Case{7, 4, 24, 16, 8, false}, Case{3, 1, 20, 16, 4, false},
                       Case{6, 3, 10, 2, 6, true}, Case{4, 1, 8, 0, 8, true}}) {
    auto perm = [&](int64_t j) { return !c.il ? j : (j < c.w / 2 ? 2 * j : 2 * (j - c.w / 2) + 1); };
    Tensor wide = randn({c.R, c.G, c.C}, rng), narrow = Tensor::empty({c.R, c.w}, DType::F32);
    ops::mla_gather_cols(c.G == 1 ? wide.view({c.R, c.C}) : wide, c.col, c.il, narrow);
    for (int64_t r = 0; r < c.R; ++r)
      for (int64_t j = 0; j < c.w; ++j) {
        float want = wide.f32()[(r * c.G) * c.C + c.col + perm(j)];
        for (int64_t g = 1; g < c.G; ++g) want += wide.f32()[(r * c.G + g) * c.C + c.col + perm(j)];
        ASSERT_EQ(narrow.f32()[r * c.w + j], want) << "gather r " << r << " j " << j << " G " << c.G;
      }
    // scatter: the rope block of every head gets the narrow row, the other columns keep their values
    Tensor n2 = randn({c.R, c.w}, rng), w2 = randn({c.R, c.G, c.C}, rng);
    const Tensor before = w2.clone();
    ops::mla_scatter_cols(n2, c.il, w2, c.col);
    std::vector<char> hit(static_cast<size_t>(c.C), 0);
    for (int64_t j = 0; j < c.w; ++j) hit[static_cast<size_t>(c.col + perm(j))] = 1;
    for (int64_t r = 0; r < c.R; ++r)
      for (int64_t g = 0; g < c.G; ++g)
        for (int64_t x = 0; x < c.C; ++x) {
          const int64_t i = (r * c.G + g) * c.C + x;
          if (!hit[static_cast<size_t>(x)]) {
            ASSERT_EQ(w2.f32()[i], before.f32()[i]) << "scatter touched column " << x;
            continue;
          }
          int64_t j = 0;
          while (c.col + perm(j) != x) ++j;
          ASSERT_EQ(w2.f32()[i], n2.f32()[r * c.w + j]) << "scatter r " << r << " g " << g << " j " << j;
        }
    // transposes: <gather(W), n> == <W restricted to the block, scatter(n)>
    double lhs = 0, rhs = 0;
    for (int64_t i = 0; i < c.R * c.w; ++i) lhs += double(narrow.f32()[i]) * n2.f32()[i];
    for (int64_t r = 0; r < c.R; ++r)
      for (int64_t g = 0; g < c.G; ++g)
        for (int64_t x = 0; x < c.C; ++x)
          if (hit[static_cast<size_t>(x)]) {
            const int64_t i = (r * c.G + g) * c.C + x;
            rhs += double(wide.f32()[i]) * w2.f32()[i];
          }
    EXPECT_NEAR(lhs, rhs, 1e-4 * (1 + std::abs(lhs)));
  }
  // Errors name the op: block outside the row, odd interleaved width, dtype mismatch, row count mismatch.
  Tensor wide = Tensor::zeros({4, 2, 10}, DType::F32), narrow = Tensor::empty({4, 6}, DType::F32);
  EXPECT_THROW(ops::mla_gather_cols(wide, 5, false, narrow), ShapeError);
  Tensor odd = Tensor::empty({4, 5}, DType::F32);
  EXPECT_THROW(ops::mla_scatter_cols(odd, true, wide, 0), ShapeError);
  Tensor bf = Tensor::empty({4, 6}, DType::BF16);
  EXPECT_THROW(ops::mla_gather_cols(wide, 0, false, bf), ShapeError);
  Tensor rows = Tensor::empty({3, 6}, DType::F32);
  try {
    ops::mla_scatter_cols(rows, false, wide, 0);
    ADD_FAILURE() << "no error for a row count mismatch";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("mla_scatter_cols"), std::string::npos) << e.what();
  }
}
