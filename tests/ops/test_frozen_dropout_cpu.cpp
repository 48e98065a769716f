// LoRA support in the CPU reference ops:
//   - frozen weights: a weight gradient passed undefined is not computed (ops.h). linear_bwd, rmsnorm_bwd,
//     grouped_linear_bwd and embedding_bwd then still give the same activation gradients (bit for bit: the
//     same kernels run for dx) and touch nothing else;
//   - dropout_: the keep-mask is the documented counter-based hash (recomputed here from the ops.h formula),
//     the kept fraction is about 1 - p, survivors are scaled by exactly fp32(1 / (1 - p)), the mask depends
//     only on (seed, index), p == 0 is a no-op and p outside [0, 1) is a UsageError naming the op.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <utility>
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

// Byte-for-byte equality (NaN-poisoned outputs must have been overwritten identically).
void expect_same_bits(const Tensor& a, const Tensor& b, const std::string& what) {
  ASSERT_EQ(a.nbytes(), b.nbytes()) << what;
  if (std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0) return;
  for (int64_t i = 0; i < a.numel(); ++i)
    if (std::memcmp(static_cast<const char*>(a.raw()) + i * dtype_size(a.dtype()),
                    static_cast<const char*>(b.raw()) + i * dtype_size(b.dtype()), dtype_size(a.dtype())) != 0) {
      ADD_FAILURE() << what << ": first difference at element " << i;
      return;
    }
}

}  // namespace

// ============================== frozen weights ==============================

TEST(OpsCpuFrozenWeights, LinearBwdUndefinedDwSkipsDwKeepsDxAndDbias) {
  std::mt19937 rng(21);
  for (auto [n, k, m] : {std::tuple<int64_t, int64_t, int64_t>{7, 5, 3}, {64, 48, 80}, {1, 1, 1}, {0, 4, 3}}) {
    const std::string what = "N=" + std::to_string(n) + " K=" + std::to_string(k) + " M=" + std::to_string(m);
    Tensor x = randn({n, k}, rng), w = randn({m, k}, rng), dy = randn({n, m}, rng);
    Tensor db0 = randn({m}, rng);
    // Reference: dw defined.
    Tensor dx_ref = filled({n, k}, std::numeric_limits<float>::quiet_NaN()), dw_ref = Tensor::zeros({m, k}, DType::F32);
    Tensor db_ref = db0.clone();
    ops::linear_bwd(x, w, dy, &dx_ref, dw_ref, &db_ref);
    // Frozen: dw undefined.
    Tensor dx = filled({n, k}, std::numeric_limits<float>::quiet_NaN()), db = db0.clone();
    Tensor frozen;
    ASSERT_NO_THROW(ops::linear_bwd(x, w, dy, &dx, frozen, &db)) << what;
    EXPECT_FALSE(frozen.defined()) << what;
    expect_same_bits(dx, dx_ref, "linear_bwd dx " + what);
    expect_same_bits(db, db_ref, "linear_bwd dbias " + what);
    // No dbias either, and with dx == nullptr the call has nothing to do: no crash, nothing written.
    Tensor dx2 = filled({n, k}, std::numeric_limits<float>::quiet_NaN());
    ASSERT_NO_THROW(ops::linear_bwd(x, w, dy, &dx2, frozen, nullptr)) << what;
    expect_same_bits(dx2, dx_ref, "linear_bwd dx (no dbias) " + what);
    ASSERT_NO_THROW(ops::linear_bwd(x, w, dy, nullptr, frozen, nullptr)) << what;
  }
  // The other arguments are still checked.
  Tensor x = Tensor::zeros({4, 3}, DType::F32), w = Tensor::zeros({2, 3}, DType::F32), frozen;
  Tensor dy_bad = Tensor::zeros({4, 5}, DType::F32), dx_bad = Tensor::zeros({3, 4}, DType::F32);
  Tensor dy = Tensor::zeros({4, 2}, DType::F32);
  EXPECT_THROW(ops::linear_bwd(x, w, dy_bad, nullptr, frozen, nullptr), ShapeError);
  EXPECT_THROW(ops::linear_bwd(x, w, dy, &dx_bad, frozen, nullptr), ShapeError);
  Tensor undefined_x;
  EXPECT_THROW(ops::linear_bwd(undefined_x, w, dy, nullptr, frozen, nullptr), ShapeError);
}

TEST(OpsCpuFrozenWeights, RmsNormBwdUndefinedDwGivesSameDx) {
  std::mt19937 rng(22);
  for (auto [n, h] : {std::pair<int64_t, int64_t>{5, 7}, {300, 512}, {1, 1}, {17, 1000}}) {
    const std::string what = "N=" + std::to_string(n) + " H=" + std::to_string(h);
    Tensor x = randn({n, h}, rng), w = randn({h}, rng), dy = randn({n, h}, rng);
    Tensor y = Tensor::empty({n, h}, DType::F32), rstd = Tensor::empty({n}, DType::F32);
    ops::rmsnorm_fwd(x, w, 1e-6f, y, rstd);
    Tensor dx_ref = filled({n, h}, std::numeric_limits<float>::quiet_NaN()), dw_ref = Tensor::zeros({h}, DType::F32);
    ops::rmsnorm_bwd(x, w, rstd, dy, dx_ref, dw_ref);
    Tensor dx = filled({n, h}, std::numeric_limits<float>::quiet_NaN()), frozen;
    ASSERT_NO_THROW(ops::rmsnorm_bwd(x, w, rstd, dy, dx, frozen)) << what;
    EXPECT_FALSE(frozen.defined());
    expect_same_bits(dx, dx_ref, "rmsnorm_bwd dx " + what);
  }
  Tensor x = Tensor::zeros({3, 4}, DType::F32), w = Tensor::zeros({4}, DType::F32), rstd = Tensor::zeros({3}, DType::F32);
  Tensor dy = Tensor::zeros({3, 4}, DType::F32), dx_bad = Tensor::zeros({4, 3}, DType::F32), frozen;
  EXPECT_THROW(ops::rmsnorm_bwd(x, w, rstd, dy, dx_bad, frozen), ShapeError);
}

TEST(OpsCpuFrozenWeights, GroupedLinearBwdUndefinedDwGivesSameDx) {
  std::mt19937 rng(23);
  const int64_t e = 5, k = 24, nout = 40;
  const std::vector<int32_t> counts = {3, 0, 11, 1, 7};  // an expert with no rows
  Tensor off = Tensor::empty({e + 1}, DType::I32);
  off.data<int32_t>()[0] = 0;
  for (int64_t j = 0; j < e; ++j) off.data<int32_t>()[j + 1] = off.data<int32_t>()[j] + counts[j];
  const int64_t m = off.data<int32_t>()[e];
  std::vector<int64_t> host_counts(counts.begin(), counts.end());
  Tensor x = randn({m, k}, rng), w = randn({e, nout, k}, rng), dy = randn({m, nout}, rng);
  Tensor dx_ref = filled({m, k}, std::numeric_limits<float>::quiet_NaN()), dw_ref = Tensor::zeros({e, nout, k}, DType::F32);
  ops::grouped_linear_bwd(x, w, off, dy, &dx_ref, dw_ref, &host_counts);
  for (bool with_counts : {true, false}) {
    Tensor dx = filled({m, k}, std::numeric_limits<float>::quiet_NaN()), frozen;
    ASSERT_NO_THROW(ops::grouped_linear_bwd(x, w, off, dy, &dx, frozen, with_counts ? &host_counts : nullptr));
    EXPECT_FALSE(frozen.defined());
    expect_same_bits(dx, dx_ref, std::string("grouped_linear_bwd dx") + (with_counts ? "" : " (no host counts)"));
    ASSERT_NO_THROW(ops::grouped_linear_bwd(x, w, off, dy, nullptr, frozen, with_counts ? &host_counts : nullptr));
  }
  // Offsets are still validated.
  Tensor bad_off = off.clone();
  bad_off.data<int32_t>()[e] = static_cast<int32_t>(m + 1);
  Tensor dx = Tensor::empty({m, k}, DType::F32), frozen;
  EXPECT_ANY_THROW(ops::grouped_linear_bwd(x, w, bad_off, dy, &dx, frozen, nullptr));
}

TEST(OpsCpuFrozenWeights, EmbeddingBwdUndefinedDweightIsANoOp) {
  Tensor ids = Tensor::empty({3}, DType::I32);
  for (int i = 0; i < 3; ++i) ids.data<int32_t>()[i] = i;
  Tensor dout = filled({3, 4}, 1.f), frozen;
  EXPECT_NO_THROW(ops::embedding_bwd(ids, dout, frozen));
  EXPECT_FALSE(frozen.defined());
  Tensor undefined_dout;
  EXPECT_THROW(ops::embedding_bwd(ids, undefined_dout, frozen), ShapeError);
}

// ============================== dropout_ ==============================

namespace {
// The mask exactly as ops.h documents it, written independently of the library.
bool spec_keep(uint64_t seed, uint64_t i, float p) {
  uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  const float u = static_cast<float>(z >> 40) / 16777216.0f;
  return u >= p;
}
}  // namespace

TEST(OpsCpuDropout, KeepFractionExactScalingAndDocumentedMask) {
  std::mt19937 rng(31);
  const int64_t n = 1 << 17;
  for (float p : {0.05f, 0.1f, 0.25f, 0.5f, 0.9f}) {
    for (uint64_t seed : {uint64_t{0}, uint64_t{1}, uint64_t{0xDEADBEEFCAFEull}}) {
      Tensor x = randn({n}, rng);
      for (int64_t i = 0; i < n; ++i)
        if (x.f32()[i] == 0.f) x.f32()[i] = 1.f;  // keep "dropped" and "zero" apart
      Tensor y = x.clone();
      ops::dropout_(y, p, seed);
      const float scale = 1.0f / (1.0f - p);
      int64_t kept = 0, bad = 0;
      for (int64_t i = 0; i < n; ++i) {
        const bool k = spec_keep(seed, static_cast<uint64_t>(i), p);
        const float want = k ? x.f32()[i] * scale : 0.f;
        kept += y.f32()[i] != 0.f;
        if (std::memcmp(&y.f32()[i], &want, sizeof(float)) != 0 && ++bad <= 3)
          ADD_FAILURE() << "p=" << p << " seed=" << seed << " [" << i << "]: got " << y.f32()[i] << " want " << want;
      }
      EXPECT_EQ(bad, 0) << "p=" << p << " seed=" << seed;
      const double frac = double(kept) / n, sigma = std::sqrt(p * (1.0 - p) / n);
      EXPECT_NEAR(frac, 1.0 - p, 5 * sigma) << "p=" << p << " seed=" << seed;
    }
  }
}

TEST(OpsCpuDropout, DeterministicPerSeedAndIndexAndBackwardReusesTheMask) {
  std::mt19937 rng(32);
  const int64_t n = 10007;  // odd size
  Tensor x = randn({7, n / 7 + 1}, rng);
  Tensor a = x.clone(), b = x.clone(), c = x.clone();
  ops::dropout_(a, 0.3f, 42);
  ops::dropout_(b, 0.3f, 42);
  ops::dropout_(c, 0.3f, 43);
  expect_same_bits(a, b, "same seed");
  int64_t differ = 0;
  for (int64_t i = 0; i < a.numel(); ++i) differ += (a.f32()[i] == 0.f) != (c.f32()[i] == 0.f);
  EXPECT_GT(differ, a.numel() / 10) << "another seed gives another mask";
  // The mask depends on (seed, index) only, not on the values or the shape: the gradient of the output
  // (here all ones) dropped with the same seed zeroes exactly the same elements and scales the others.
  Tensor g = filled({a.numel()}, 1.f);
  ops::dropout_(g, 0.3f, 42);
  const float scale = 1.0f / (1.0f - 0.3f);
  for (int64_t i = 0; i < a.numel(); ++i) {
    const bool kept = a.f32()[i] != 0.f;
    ASSERT_EQ(g.f32()[i], kept ? scale : 0.f) << i;
  }
  // Backward of y = dropout(x): dx = dropout(dy) with the same mask; check <y, r> = <x, dropout(r)>.
  Tensor r = randn(x.shape(), rng), dr = r.clone();
  ops::dropout_(dr, 0.3f, 42);
  double lhs = 0, rhs = 0;
  for (int64_t i = 0; i < x.numel(); ++i) {
    lhs += double(a.f32()[i]) * r.f32()[i];
    rhs += double(x.f32()[i]) * dr.f32()[i];
  }
  EXPECT_NEAR(lhs, rhs, 1e-6 * (std::abs(lhs) + 1.0));
}

TEST(OpsCpuDropout, ZeroProbabilityIsANoOpAndEmptyTensorIsFine) {
  std::mt19937 rng(33);
  Tensor x = randn({33, 17}, rng);
  x.f32()[5] = std::numeric_limits<float>::quiet_NaN();
  Tensor y = x.clone();
  ops::dropout_(y, 0.f, 7);
  expect_same_bits(y, x, "p = 0");
  Tensor e = Tensor::empty({0, 4}, DType::F32);
  EXPECT_NO_THROW(ops::dropout_(e, 0.5f, 7));
}

TEST(OpsCpuDropout, Bf16RoundsTheFp32Product) {
  std::mt19937 rng(34);
  const int64_t n = 4099;
  Tensor x32 = randn({n}, rng).to(DType::BF16).to(DType::F32);  // bf16-representable values
  Tensor xb = x32.to(DType::BF16);
  const float p = 0.3f;
  ops::dropout_(xb, p, 99);
  ops::dropout_(x32, p, 99);  // fp32 result: x * scale, then one rounding to bf16 must give xb
  expect_same_bits(xb, x32.to(DType::BF16), "bf16 dropout = round(fp32 dropout)");
}

TEST(OpsCpuDropout, BadProbabilityIsAUsageErrorNamingTheOp) {
  Tensor x = filled({8}, 1.f);
  for (float p : {-0.1f, 1.0f, 1.5f, std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity()}) {
    try {
      ops::dropout_(x, p, 1);
      ADD_FAILURE() << "no error for p = " << p;
    } catch (const UsageError& e) {
      EXPECT_NE(std::string(e.what()).find("dropout_"), std::string::npos) << e.what();
    }
  }
  for (int64_t i = 0; i < 8; ++i) EXPECT_EQ(x.f32()[i], 1.f) << "a refused call must not touch x";
  Tensor ids = Tensor::zeros({4}, DType::I32), undefined;
  EXPECT_THROW(ops::dropout_(ids, 0.5f, 1), ShapeError);
  EXPECT_THROW(ops::dropout_(undefined, 0.5f, 1), ShapeError);
}
