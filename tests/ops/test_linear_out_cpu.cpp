// LinearOut (core/linear_out.h) on the CPU reference: ops::linear_fwd's y, ops::linear_bwd's dx and
// ops::grouped_linear_fwd / _bwd's y / dx with an alpha scale and / or accumulation must be BIT-identical to the
// separate calls they replace (the plain GEMM into a temporary, ops::scale_, the bias, ops::add_): the LoRA branch
// and the blocks' summed input gradients use them, and the CPU is the bit-exact reference (HF goldens, bit-equality
// tests). Parameter gradients (dw, dbias) must not be touched by the options.
#include <gtest/gtest.h>

#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "core/error.h"
#include "core/tensor.h"
#include "ops/moe_ops.h"
#include "ops/ops.h"

using namespace am;

namespace {

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
Tensor offsets_of(const std::vector<int64_t>& counts) {
  Tensor off = Tensor::empty({static_cast<int64_t>(counts.size()) + 1}, DType::I32);
  int32_t acc = 0;
  off.data<int32_t>()[0] = 0;
  for (size_t e = 0; e < counts.size(); ++e) off.data<int32_t>()[e + 1] = acc += static_cast<int32_t>(counts[e]);
  return off;
}

void expect_same_bits(const Tensor& a, const Tensor& b, const std::string& what) {
  ASSERT_EQ(a.nbytes(), b.nbytes()) << what;
  if (a.nbytes() == 0 || std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0) return;
  for (int64_t i = 0; i < a.numel(); ++i)
    if (std::memcmp(a.f32() + i, b.f32() + i, sizeof(float)) != 0) {
      ADD_FAILURE() << what << ": first difference at element " << i << ": " << a.f32()[i] << " vs " << b.f32()[i];
      return;
    }
}

// The LoRA scales: alpha / r for r = 8, 16 (powers of two), rsLoRA's alpha / sqrt(r) and an odd one.
const float kAlphas[] = {2.f, 0.5f, 16.f / 2.828427f, 0.3f};

}  // namespace

TEST(OpsCpuLinearOut, ForwardAlphaAccumulateBitIdenticalToSeparateOps) {
  std::mt19937 rng(7);
  for (auto [n, k, m] : {std::tuple<int64_t, int64_t, int64_t>{7, 5, 3}, {64, 48, 80}, {33, 8, 200}, {1, 1, 1},
                         {0, 4, 3}}) {
    for (float alpha : kAlphas) {
      for (bool bias : {false, true}) {
        const std::string what = "N=" + std::to_string(n) + " K=" + std::to_string(k) + " M=" + std::to_string(m) +
                                 " alpha=" + std::to_string(alpha) + (bias ? " bias" : "");
        Tensor x = randn({n, k}, rng), w = randn({m, k}, rng), b = randn({m}, rng), y0 = randn({n, m}, rng);
        // Reference: the plain GEMM into z, ops::scale_, the bias (a float add per element, as the op's own),
        // ops::add_ into y.
        Tensor z = filled({n, m}, std::numeric_limits<float>::quiet_NaN());
        ops::linear_fwd(x, w, nullptr, z);
        ops::scale_(z, alpha);
        if (bias)
          for (int64_t i = 0; i < n; ++i)
            for (int64_t j = 0; j < m; ++j) z.f32()[i * m + j] += b.f32()[j];
        Tensor want_acc = y0.clone();
        ops::add_(want_acc, z);
        // Assigned with alpha.
        Tensor y = filled({n, m}, std::numeric_limits<float>::quiet_NaN());
        ops::linear_fwd(x, w, bias ? &b : nullptr, y, {.alpha = alpha});
        expect_same_bits(y, z, "assigned " + what);
        // Accumulated with alpha.
        Tensor ya = y0.clone();
        ops::linear_fwd(x, w, bias ? &b : nullptr, ya, {.alpha = alpha, .accumulate = true});
        expect_same_bits(ya, want_acc, "accumulated " + what);
      }
      // Accumulate alone = linear_fwd into a temporary + add_ (the LoRA branch's y += u B^T), bias included.
      Tensor x = randn({n, k}, rng), w = randn({m, k}, rng), b = randn({m}, rng), y0 = randn({n, m}, rng);
      Tensor z = Tensor::empty({n, m}, DType::F32);
      ops::linear_fwd(x, w, &b, z);
      Tensor want = y0.clone();
      ops::add_(want, z);
      Tensor y = y0.clone();
      ops::linear_fwd(x, w, &b, y, {.accumulate = true});
      expect_same_bits(y, want, "accumulate only N=" + std::to_string(n) + " K=" + std::to_string(k));
    }
  }
  // Leading dimensions flatten as for the plain op.
  Tensor x = randn({2, 3, 8}, rng), w = randn({5, 8}, rng), y0 = randn({2, 3, 5}, rng);
  Tensor z = Tensor::empty({2, 3, 5}, DType::F32);
  ops::linear_fwd(x, w, nullptr, z);
  Tensor want = y0.clone();
  ops::add_(want, z);
  ops::linear_fwd(x, w, nullptr, y0, {.accumulate = true});
  expect_same_bits(y0, want, "3-D accumulate");
}

TEST(OpsCpuLinearOut, BackwardDxAlphaAccumulateBitIdenticalDwDbiasUntouched) {
  std::mt19937 rng(8);
  for (auto [n, k, m] : {std::tuple<int64_t, int64_t, int64_t>{7, 5, 3}, {64, 48, 80}, {40, 200, 8}, {1, 1, 1},
                         {0, 4, 3}}) {
    for (float alpha : {1.f, kAlphas[0], kAlphas[2], kAlphas[3]}) {
      for (bool acc : {false, true}) {
        const std::string what = "N=" + std::to_string(n) + " K=" + std::to_string(k) + " M=" + std::to_string(m) +
                                 " alpha=" + std::to_string(alpha) + (acc ? " accumulate" : "");
        Tensor x = randn({n, k}, rng), w = randn({m, k}, rng), dy = randn({n, m}, rng);
        Tensor dw0 = randn({m, k}, rng), db0 = randn({m}, rng), dx0 = randn({n, k}, rng);
        // Reference: the plain backward into a temporary, then scale_, then add_ (or assign).
        Tensor t = filled({n, k}, std::numeric_limits<float>::quiet_NaN());
        Tensor dw_ref = dw0.clone(), db_ref = db0.clone();
        ops::linear_bwd(x, w, dy, &t, dw_ref, &db_ref);
        ops::scale_(t, alpha);
        Tensor want = t;
        if (acc) {
          want = dx0.clone();
          ops::add_(want, t);
        }
        Tensor dx = acc ? dx0.clone() : filled({n, k}, std::numeric_limits<float>::quiet_NaN());
        Tensor dw = dw0.clone(), db = db0.clone();
        ops::linear_bwd(x, w, dy, &dx, dw, &db, {.alpha = alpha, .accumulate = acc});
        expect_same_bits(dx, want, "dx " + what);
        expect_same_bits(dw, dw_ref, "dw " + what);
        expect_same_bits(db, db_ref, "dbias " + what);
        // Frozen weight (dw undefined) and no dx: the options change nothing else.
        Tensor frozen, dx2 = acc ? dx0.clone() : filled({n, k}, std::numeric_limits<float>::quiet_NaN());
        ops::linear_bwd(x, w, dy, &dx2, frozen, nullptr, {.alpha = alpha, .accumulate = acc});
        expect_same_bits(dx2, want, "dx (frozen w) " + what);
        Tensor dw3 = dw0.clone();
        ops::linear_bwd(x, w, dy, nullptr, dw3, nullptr, {.alpha = alpha, .accumulate = acc});
        expect_same_bits(dw3, dw_ref, "dw (no dx) " + what);
      }
    }
  }
}

TEST(OpsCpuLinearOut, ShapeChecksUnchanged) {
  Tensor x = Tensor::zeros({4, 3}, DType::F32), w = Tensor::zeros({2, 3}, DType::F32);
  Tensor y_bad = Tensor::zeros({5, 2}, DType::F32), dx_bad = Tensor::zeros({3, 4}, DType::F32);
  Tensor dy = Tensor::zeros({4, 2}, DType::F32), dw = Tensor::zeros({2, 3}, DType::F32);
  EXPECT_THROW(ops::linear_fwd(x, w, nullptr, y_bad, {.accumulate = true}), ShapeError);
  EXPECT_THROW(ops::linear_bwd(x, w, dy, &dx_bad, dw, nullptr, {.accumulate = true}), ShapeError);
  Tensor yb = Tensor::zeros({4, 2}, DType::BF16);
  EXPECT_THROW(ops::linear_fwd(x, w, nullptr, yb, {.alpha = 2.f, .accumulate = true}), ShapeError);  // CPU: fp32
}

TEST(OpsCpuLinearOut, GroupedAlphaAccumulateBitIdenticalToSeparateOps) {
  for (uint32_t seed : {50u, 51u, 52u}) {
    std::mt19937 rng(seed);
    const int64_t E = 5, K = 4 + seed % 3 * 13, Nout = 3 + seed % 2 * 30;
    std::vector<int64_t> counts{0, 7, 0, 19, seed == 51u ? 0 : 3};  // empty experts first, between, last
    int64_t M = 0;
    for (int64_t c : counts) M += c;
    Tensor off = offsets_of(counts);
    Tensor x = randn({M, K}, rng), w = randn({E, Nout, K}, rng), dy = randn({M, Nout}, rng);
    Tensor y0 = randn({M, Nout}, rng), dx0 = randn({M, K}, rng), dw0 = randn({E, Nout, K}, rng);
    for (float alpha : {1.f, 0.5f, 0.3f}) {
      for (bool acc : {false, true}) {
        const std::string what = "seed " + std::to_string(seed) + " alpha=" + std::to_string(alpha) +
                                 (acc ? " accumulate" : "");
        // forward: grouped into z, scale_, add_
        Tensor z = Tensor::empty({M, Nout}, DType::F32);
        ops::grouped_linear_fwd(x, w, off, z, &counts);
        ops::scale_(z, alpha);
        Tensor want_y = z;
        if (acc) {
          want_y = y0.clone();
          ops::add_(want_y, z);
        }
        Tensor y = acc ? y0.clone() : filled({M, Nout}, std::numeric_limits<float>::quiet_NaN());
        ops::grouped_linear_fwd(x, w, off, y, seed % 2 ? &counts : nullptr, {.alpha = alpha, .accumulate = acc});
        expect_same_bits(y, want_y, "grouped y " + what);
        // backward: dx into a temporary, scale_, add_; dw as the plain call's
        Tensor t = Tensor::empty({M, K}, DType::F32), dw_ref = dw0.clone();
        ops::grouped_linear_bwd(x, w, off, dy, &t, dw_ref, &counts);
        ops::scale_(t, alpha);
        Tensor want_dx = t;
        if (acc) {
          want_dx = dx0.clone();
          ops::add_(want_dx, t);
        }
        Tensor dx = acc ? dx0.clone() : filled({M, K}, std::numeric_limits<float>::quiet_NaN());
        Tensor dw = dw0.clone();
        ops::grouped_linear_bwd(x, w, off, dy, &dx, dw, &counts, {.alpha = alpha, .accumulate = acc});
        expect_same_bits(dx, want_dx, "grouped dx " + what);
        expect_same_bits(dw, dw_ref, "grouped dw " + what);
      }
    }
  }
}
