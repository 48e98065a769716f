// The MoE routing statistics and load-balancing aux loss ops (src/ops/moe_ops.h: moe_routing_stats, moe_aux_loss)
// on the CPU reference, against plain loops: the per-expert counts and prob sums over real tokens (padding:
// segment id -1), accumulated over several layers, and the aux loss with its gradient on the probabilities against
// the host formula DecoderLM::aux_loss used before these ops existed (HF load_balancing_loss_func with the mask).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "../common/tolerance.h"
#include "core/error.h"
#include "core/tensor.h"
#include "ops/moe_ops.h"

using namespace am;
using am::test::tolerance;
using am::test::Tolerance;

namespace {

const Tolerance kF32 = tolerance(DType::F32);

int64_t rand_in(std::mt19937& rng, int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }

// probs [n, e] (rows sum to 1), topk_idx [n, k] distinct experts per row.
struct Layer {
  Tensor probs, idx;
};
Layer random_layer(int64_t n, int64_t e, int64_t k, std::mt19937& rng) {
  Layer l{Tensor::empty({n, e}, DType::F32), Tensor::empty({n, k}, DType::I32)};
  std::uniform_real_distribution<float> u(0.01f, 1.f);
  for (int64_t t = 0; t < n; ++t) {
    double s = 0;
    for (int64_t j = 0; j < e; ++j) s += l.probs.f32()[t * e + j] = u(rng);
    for (int64_t j = 0; j < e; ++j) l.probs.f32()[t * e + j] = static_cast<float>(l.probs.f32()[t * e + j] / s);
    std::vector<int32_t> pool(static_cast<size_t>(e));
    for (int64_t j = 0; j < e; ++j) pool[static_cast<size_t>(j)] = static_cast<int32_t>(j);
    std::shuffle(pool.begin(), pool.end(), rng);
    for (int64_t s2 = 0; s2 < k; ++s2) l.idx.data<int32_t>()[t * k + s2] = pool[static_cast<size_t>(s2)];
  }
  return l;
}
// Segment ids [b, t] right-padded as collate makes them: rows of packed samples, then -1.
Tensor random_seg(int64_t b, int64_t t, std::mt19937& rng, bool all_pad = false) {
  Tensor s = Tensor::empty({b, t}, DType::I32);
  for (int64_t r = 0; r < b; ++r) {
    const int64_t real = all_pad ? 0 : rand_in(rng, 0, t);
    int32_t id = 0;
    for (int64_t i = 0; i < t; ++i) {
      if (i > 0 && i < real && rand_in(rng, 0, 7) == 0) ++id;
      s.data<int32_t>()[r * t + i] = i < real ? id : -1;
    }
  }
  return s;
}
Tensor izeros(int64_t n) { return Tensor::zeros({n}, DType::I32); }

// DecoderLM::aux_loss as it was on the host (downloaded probs, host top-k indices, double F and P over every layer).
double host_aux(const std::vector<Layer>& layers, const Tensor& seg, int64_t e, float scale, Tensor* dprobs) {
  const int64_t n = seg.numel(), k = layers[0].idx.dim(1);
  const double L = static_cast<double>(layers.size());
  std::vector<char> real(static_cast<size_t>(n));
  int64_t n_real = 0;
  for (int64_t t = 0; t < n; ++t) n_real += real[static_cast<size_t>(t)] = seg.data<int32_t>()[t] >= 0;
  if (n_real == 0) {
    *dprobs = Tensor::zeros({n, e}, DType::F32);
    return 0.0;
  }
  const double denom = L * static_cast<double>(n_real);
  std::vector<double> F(static_cast<size_t>(e), 0.0), P(static_cast<size_t>(e), 0.0);
  for (const Layer& r : layers)
    for (int64_t t = 0; t < n; ++t) {
      if (!real[static_cast<size_t>(t)]) continue;
      for (int64_t s = 0; s < k; ++s) F[static_cast<size_t>(r.idx.data<int32_t>()[t * k + s])] += 1.0;
      for (int64_t j = 0; j < e; ++j) P[static_cast<size_t>(j)] += r.probs.f32()[t * e + j];
    }
  double aux = 0.0;
  for (int64_t j = 0; j < e; ++j) aux += (F[static_cast<size_t>(j)] / denom) * (P[static_cast<size_t>(j)] / denom);
  aux *= static_cast<double>(e);
  Tensor g = Tensor::zeros({n, e}, DType::F32);
  for (int64_t t = 0; t < n; ++t) {
    if (!real[static_cast<size_t>(t)]) continue;
    for (int64_t j = 0; j < e; ++j) g.f32()[t * e + j] = static_cast<float>(scale * e * (F[static_cast<size_t>(j)] / denom) / denom);
  }
  *dprobs = g;
  return aux;
}

}  // namespace

TEST(MoeAuxOps, RoutingStatsMatchNaiveLoopsAndAccumulate) {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 12; ++trial) {
    const int64_t b = rand_in(rng, 1, 3), t = rand_in(rng, 1, 70), n = b * t, e = rand_in(rng, 2, 40),
                  k = rand_in(rng, 1, std::min<int64_t>(e, 8));
    const Layer l = random_layer(n, e, k, rng);
    const Tensor seg = random_seg(b, t, rng);
    // Start from non-zero buffers: the op adds.
    Tensor counts = izeros(e), counts2 = izeros(e), psum = Tensor::empty({e}, DType::F32);
    std::vector<int64_t> want_c(static_cast<size_t>(e));
    std::vector<double> want_p(static_cast<size_t>(e));
    for (int64_t j = 0; j < e; ++j) {
      counts.data<int32_t>()[j] = static_cast<int32_t>(j % 3);
      counts2.data<int32_t>()[j] = 100;
      psum.f32()[j] = 0.25f * static_cast<float>(j);
      want_c[static_cast<size_t>(j)] = j % 3;
      want_p[static_cast<size_t>(j)] = 0.25 * static_cast<double>(j);
    }
    for (int64_t i = 0; i < n; ++i) {
      if (seg.data<int32_t>()[i] < 0) continue;
      for (int64_t s = 0; s < k; ++s) ++want_c[static_cast<size_t>(l.idx.data<int32_t>()[i * k + s])];
      for (int64_t j = 0; j < e; ++j) want_p[static_cast<size_t>(j)] += l.probs.f32()[i * e + j];
    }
    ops::moe_routing_stats(l.idx, l.probs, seg, &counts, &psum, &counts2);
    const std::string what = "trial " + std::to_string(trial) + " N=" + std::to_string(n) + " E=" + std::to_string(e) +
                             " k=" + std::to_string(k);
    for (int64_t j = 0; j < e; ++j) {
      EXPECT_EQ(counts.data<int32_t>()[j], want_c[static_cast<size_t>(j)]) << what << " expert " << j;
      EXPECT_EQ(counts2.data<int32_t>()[j], want_c[static_cast<size_t>(j)] - j % 3 + 100) << what << " expert " << j;
      const double w = want_p[static_cast<size_t>(j)];
      EXPECT_NEAR(psum.f32()[j], w, kF32.atol + kF32.rtol * std::abs(w)) << what << " expert " << j;
    }
    // Optional outputs: counts only, psum only.
    Tensor c3 = izeros(e), p3 = Tensor::zeros({e}, DType::F32);
    ops::moe_routing_stats(l.idx, l.probs, seg, &c3, nullptr);
    ops::moe_routing_stats(l.idx, l.probs, seg, nullptr, &p3);
    for (int64_t j = 0; j < e; ++j) {
      EXPECT_EQ(c3.data<int32_t>()[j], want_c[static_cast<size_t>(j)] - j % 3) << what;
      const double w = want_p[static_cast<size_t>(j)] - 0.25 * static_cast<double>(j);
      EXPECT_NEAR(p3.f32()[j], w, kF32.atol + kF32.rtol * std::abs(w)) << what;
    }
  }
}

TEST(MoeAuxOps, OutOfRangeIndicesAreNotCounted) {
  Tensor probs = Tensor::zeros({2, 3}, DType::F32), idx = Tensor::empty({2, 2}, DType::I32);
  const int32_t v[4] = {0, 7, -1, 2};
  for (int i = 0; i < 4; ++i) idx.data<int32_t>()[i] = v[i];
  Tensor seg = Tensor::zeros({2}, DType::I32), counts = izeros(3);
  ops::moe_routing_stats(idx, probs, seg, &counts, nullptr);
  EXPECT_EQ(counts.data<int32_t>()[0], 1);
  EXPECT_EQ(counts.data<int32_t>()[1], 0);
  EXPECT_EQ(counts.data<int32_t>()[2], 1);
}

TEST(MoeAuxOps, AuxLossMatchesTheHostFormulaOverLayers) {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 10; ++trial) {
    const int64_t b = rand_in(rng, 1, 3), t = rand_in(rng, 1, 50), n = b * t, e = rand_in(rng, 2, 33),
                  k = rand_in(rng, 1, std::min<int64_t>(e, 6)), nl = rand_in(rng, 1, 4);
    const float scale = std::uniform_real_distribution<float>(0.001f, 0.5f)(rng);
    const Tensor seg = random_seg(b, t, rng, trial == 3);  // one micro-batch of padding only (n_real == 0)
    std::vector<Layer> layers;
    Tensor f = izeros(e), p = Tensor::zeros({e}, DType::F32);
    for (int64_t l = 0; l < nl; ++l) {
      layers.push_back(random_layer(n, e, k, rng));
      ops::moe_routing_stats(layers.back().idx, layers.back().probs, seg, &f, &p);
    }
    Tensor want_d;
    const double want = host_aux(layers, seg, e, scale, &want_d);
    Tensor aux = Tensor::empty({1}, DType::F32), dprobs = Tensor::empty({n, e}, DType::F32);
    dprobs.f32()[0] = std::nanf("");
    ops::moe_aux_loss(f, p, seg, nl, scale, aux, &dprobs);
    const std::string what = "trial " + std::to_string(trial) + " N=" + std::to_string(n) + " E=" + std::to_string(e) +
                             " k=" + std::to_string(k) + " L=" + std::to_string(nl);
    // aux: psum is rounded to fp32 once per layer (the host summed every layer in one double).
    EXPECT_NEAR(aux.f32()[0], want, 1e-6 * std::max(1.0, std::abs(want))) << what;
    if (trial == 3) EXPECT_EQ(aux.f32()[0], 0.f) << what;
    // dprobs depends on the exact counts only: bitwise the host formula's.
    for (int64_t i = 0; i < n * e; ++i) ASSERT_EQ(dprobs.f32()[i], want_d.f32()[i]) << what << " element " << i;
    // Without dprobs: the same value.
    Tensor aux2 = Tensor::empty({1}, DType::F32);
    ops::moe_aux_loss(f, p, seg, nl, scale, aux2, nullptr);
    EXPECT_EQ(aux2.f32()[0], aux.f32()[0]) << what;
  }
}

TEST(MoeAuxOps, ShapeAndDtypeErrors) {
  Tensor probs = Tensor::zeros({4, 3}, DType::F32), idx = Tensor::zeros({4, 2}, DType::I32);
  Tensor seg = Tensor::zeros({4}, DType::I32), counts = izeros(3), psum = Tensor::zeros({3}, DType::F32);
  EXPECT_THROW(ops::moe_routing_stats(idx, probs, Tensor::zeros({5}, DType::I32), &counts, &psum), ShapeError);
  EXPECT_THROW(ops::moe_routing_stats(idx, probs, seg, &psum, nullptr), ShapeError);  // counts must be int32
  Tensor c4 = izeros(4);
  EXPECT_THROW(ops::moe_routing_stats(idx, probs, seg, &c4, nullptr), ShapeError);
  EXPECT_THROW(ops::moe_routing_stats(Tensor::zeros({3, 2}, DType::I32), probs, seg, &counts, nullptr), ShapeError);
  Tensor aux = Tensor::zeros({1}, DType::F32), d = Tensor::zeros({4, 3}, DType::F32);
  EXPECT_THROW(ops::moe_aux_loss(counts, psum, seg, 0, 1.f, aux, &d), ShapeError);
  EXPECT_THROW(ops::moe_aux_loss(counts, Tensor::zeros({2}, DType::F32), seg, 1, 1.f, aux, &d), ShapeError);
  Tensor d2 = Tensor::zeros({4, 2}, DType::F32);
  EXPECT_THROW(ops::moe_aux_loss(counts, psum, seg, 1, 1.f, aux, &d2), ShapeError);
  Tensor aux2 = Tensor::zeros({2}, DType::F32);
  EXPECT_THROW(ops::moe_aux_loss(counts, psum, seg, 1, 1.f, aux2, &d), ShapeError);
}
