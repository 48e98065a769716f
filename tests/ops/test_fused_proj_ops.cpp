// The ops of the fused projections (docs/fused_projections.md; models/blocks/fused_proj.h):
//   - qkv_split_rope: one pass splitting a [N, (nh + 2 nkv) D] GEMM output into q, k, v and rotating q and k
//     equals column copies + rope_fwd_ bit for bit (full and partial rotary, and without rotation);
//   - qkv_merge_rope_bwd: equals rope_bwd_ + column copies into [N, dq | dk | dv] bit for bit;
//   - geglu_fused_* (and swiglu_fused_*, which the stacked gate/up view uses for SwiGLU): the gated activation on
//     the halves of each [gate | up] row equals geglu_* / swiglu_* on separate tensors bit for bit, in place too;
//   - shape errors name the op.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>

#include "core/error.h"
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

bool bit_equal(const Tensor& a, const Tensor& b) {
  return a.numel() == b.numel() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

struct QkvCase {
  int64_t n, nh, nkv, d, half;  // half 0: no rotation
};

class QkvPack : public ::testing::TestWithParam<QkvCase> {};

TEST_P(QkvPack, SplitEqualsCopiesAndRope) {
  const QkvCase c = GetParam();
  std::mt19937 rng(7);
  const int64_t W = (c.nh + 2 * c.nkv) * c.d;
  Tensor qkv = randn({c.n, W}, rng), cos = randn({c.n, std::max<int64_t>(c.half, 1)}, rng),
         sin = randn({c.n, std::max<int64_t>(c.half, 1)}, rng);
  const Tensor* cp = c.half ? &cos : nullptr;
  const Tensor* sp = c.half ? &sin : nullptr;
  // Reference: today's path (column copies, then RoPE in place on q and k).
  Tensor rq = Tensor::empty({c.n, c.nh * c.d}, DType::F32), rk = Tensor::empty({c.n, c.nkv * c.d}, DType::F32),
         rv = Tensor::empty({c.n, c.nkv * c.d}, DType::F32);
  ops::copy_cols_(rq, 0, qkv, 0, c.nh * c.d);
  ops::copy_cols_(rk, 0, qkv, c.nh * c.d, c.nkv * c.d);
  ops::copy_cols_(rv, 0, qkv, (c.nh + c.nkv) * c.d, c.nkv * c.d);
  if (c.half) {
    Tensor q3 = rq.view({c.n, c.nh, c.d}), k3 = rk.view({c.n, c.nkv, c.d});
    ops::rope_fwd_(q3, cos, sin);
    ops::rope_fwd_(k3, cos, sin);
  }
  Tensor q = Tensor::empty({c.n, c.nh, c.d}, DType::F32), k = Tensor::empty({c.n, c.nkv, c.d}, DType::F32),
         v = Tensor::empty({c.n, c.nkv, c.d}, DType::F32);
  const Tensor before = qkv.clone();
  ops::qkv_split_rope(qkv, cp, sp, q, k, v);
  EXPECT_TRUE(bit_equal(q, rq));
  EXPECT_TRUE(bit_equal(k, rk));
  EXPECT_TRUE(bit_equal(v, rv));
  EXPECT_TRUE(bit_equal(qkv, before)) << "the input is read only";
}

TEST_P(QkvPack, MergeEqualsRopeBwdAndCopies) {
  const QkvCase c = GetParam();
  std::mt19937 rng(11);
  const int64_t W = (c.nh + 2 * c.nkv) * c.d;
  Tensor dq = randn({c.n, c.nh, c.d}, rng), dk = randn({c.n, c.nkv, c.d}, rng), dv = randn({c.n, c.nkv, c.d}, rng);
  Tensor cos = randn({c.n, std::max<int64_t>(c.half, 1)}, rng), sin = randn({c.n, std::max<int64_t>(c.half, 1)}, rng);
  Tensor rq = dq.clone(), rk = dk.clone();
  if (c.half) {
    ops::rope_bwd_(rq, cos, sin);
    ops::rope_bwd_(rk, cos, sin);
  }
  Tensor ref = Tensor::empty({c.n, W}, DType::F32);
  ops::copy_cols_(ref, 0, rq.view({c.n, c.nh * c.d}), 0, c.nh * c.d);
  ops::copy_cols_(ref, c.nh * c.d, rk.view({c.n, c.nkv * c.d}), 0, c.nkv * c.d);
  ops::copy_cols_(ref, (c.nh + c.nkv) * c.d, dv.view({c.n, c.nkv * c.d}), 0, c.nkv * c.d);
  Tensor dqkv = Tensor::empty({c.n, W}, DType::F32);
  const Tensor dq0 = dq.clone(), dk0 = dk.clone();
  ops::qkv_merge_rope_bwd(dq, dk, dv, c.half ? &cos : nullptr, c.half ? &sin : nullptr, dqkv);
  EXPECT_TRUE(bit_equal(dqkv, ref));
  EXPECT_TRUE(bit_equal(dq, dq0) && bit_equal(dk, dk0)) << "the inputs are read only";
}

INSTANTIATE_TEST_SUITE_P(Shapes, QkvPack,
                         ::testing::Values(QkvCase{5, 4, 2, 8, 4},     // full rotary, GQA
                                           QkvCase{3, 2, 2, 16, 4},    // partial rotary (R = 8 of 16)
                                           QkvCase{4, 3, 1, 6, 0},     // no rotation (q/k-norm families)
                                           QkvCase{1, 1, 1, 2, 1},     // smallest
                                           QkvCase{0, 4, 2, 8, 4}));   // no tokens

TEST(QkvPack, RoundTripIsTheIdentityForPureRotations) {
  std::mt19937 rng(3);
  const int64_t n = 6, nh = 4, nkv = 2, d = 8, half = 4;
  Tensor qkv = randn({n, (nh + 2 * nkv) * d}, rng), cos = Tensor::empty({n, half}, DType::F32),
         sin = Tensor::empty({n, half}, DType::F32);
  for (int64_t i = 0; i < n * half; ++i) {
    cos.f32()[i] = std::cos(0.3f * static_cast<float>(i));
    sin.f32()[i] = std::sin(0.3f * static_cast<float>(i));
  }
  Tensor q = Tensor::empty({n, nh, d}, DType::F32), k = Tensor::empty({n, nkv, d}, DType::F32),
         v = Tensor::empty({n, nkv, d}, DType::F32), back = Tensor::empty(qkv.shape(), DType::F32);
  ops::qkv_split_rope(qkv, &cos, &sin, q, k, v);
  ops::qkv_merge_rope_bwd(q, k, v, &cos, &sin, back);
  for (int64_t i = 0; i < qkv.numel(); ++i) EXPECT_NEAR(back.f32()[i], qkv.f32()[i], 1e-5) << i;
}

TEST(QkvPack, ShapeErrors) {
  Tensor qkv = Tensor::zeros({2, 32}, DType::F32), q = Tensor::zeros({2, 2, 8}, DType::F32),
         k = Tensor::zeros({2, 1, 8}, DType::F32), v = Tensor::zeros({2, 1, 8}, DType::F32),
         cos = Tensor::zeros({2, 4}, DType::F32), sin = Tensor::zeros({2, 4}, DType::F32);
  EXPECT_NO_THROW(ops::qkv_split_rope(qkv, &cos, &sin, q, k, v));
  Tensor wide = Tensor::zeros({2, 40}, DType::F32);
  EXPECT_THROW(ops::qkv_split_rope(wide, &cos, &sin, q, k, v), ShapeError);
  EXPECT_THROW(ops::qkv_split_rope(qkv, &cos, nullptr, q, k, v), ShapeError);
  Tensor big_cos = Tensor::zeros({2, 5}, DType::F32);
  EXPECT_THROW(ops::qkv_split_rope(qkv, &big_cos, &big_cos, q, k, v), ShapeError);
  Tensor v_bad = Tensor::zeros({2, 2, 8}, DType::F32);
  EXPECT_THROW(ops::qkv_split_rope(qkv, &cos, &sin, q, k, v_bad), ShapeError);
  Tensor flat = Tensor::zeros({2, 16}, DType::F32);
  EXPECT_THROW(ops::qkv_split_rope(qkv, &cos, &sin, flat, k, v), ShapeError);
  Tensor q16 = Tensor::zeros({2, 2, 8}, DType::BF16);
  EXPECT_THROW(ops::qkv_split_rope(qkv, &cos, &sin, q16, k, v), ShapeError);
  try {
    ops::qkv_merge_rope_bwd(q, k, v, &cos, &sin, wide);
    FAIL() << "no error";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("qkv_merge_rope_bwd"), std::string::npos) << e.what();
  }
}

// The gated activations on the fused [gate | up] layout equal the separate ones bit for bit.
TEST(GatedFused, GegluAndSwigluEqualTheSeparateOps) {
  std::mt19937 rng(5);
  const int64_t m = 7, i = 12;
  Tensor gu = randn({m, 2 * i}, rng, 2.f), dh = randn({m, i}, rng);
  Tensor gate = Tensor::empty({m, i}, DType::F32), up = Tensor::empty({m, i}, DType::F32);
  ops::copy_cols_(gate, 0, gu, 0, i);
  ops::copy_cols_(up, 0, gu, i, i);
  for (int geglu = 0; geglu < 2; ++geglu) {
    SCOPED_TRACE(geglu ? "geglu" : "swiglu");
    Tensor h = Tensor::empty({m, i}, DType::F32), rh = Tensor::empty({m, i}, DType::F32);
    Tensor dgu = Tensor::empty({m, 2 * i}, DType::F32), rdg = Tensor::empty({m, i}, DType::F32),
           rdu = Tensor::empty({m, i}, DType::F32);
    if (geglu) {
      ops::geglu_fused_fwd(gu, h);
      ops::geglu_fwd(gate, up, rh);
      ops::geglu_fused_bwd(gu, dh, dgu);
      ops::geglu_bwd(gate, up, dh, rdg, rdu);
    } else {
      ops::swiglu_fused_fwd(gu, h);
      ops::swiglu_fwd(gate, up, rh);
      ops::swiglu_fused_bwd(gu, dh, dgu);
      ops::swiglu_bwd(gate, up, dh, rdg, rdu);
    }
    EXPECT_TRUE(bit_equal(h, rh));
    Tensor ref = Tensor::empty({m, 2 * i}, DType::F32);
    ops::copy_cols_(ref, 0, rdg, 0, i);
    ops::copy_cols_(ref, i, rdu, 0, i);
    EXPECT_TRUE(bit_equal(dgu, ref));
    // In place (dgu aliasing gu), as the contract allows.
    Tensor inplace = gu.clone();
    if (geglu) ops::geglu_fused_bwd(inplace, dh, inplace);
    else ops::swiglu_fused_bwd(inplace, dh, inplace);
    EXPECT_TRUE(bit_equal(inplace, ref));
  }
}

TEST(GatedFused, ShapeErrors) {
  Tensor gu = Tensor::zeros({3, 8}, DType::F32), h = Tensor::zeros({3, 4}, DType::F32);
  EXPECT_NO_THROW(ops::geglu_fused_fwd(gu, h));
  Tensor odd = Tensor::zeros({3, 7}, DType::F32), h5 = Tensor::zeros({3, 5}, DType::F32);
  EXPECT_THROW(ops::geglu_fused_fwd(odd, h), ShapeError);
  EXPECT_THROW(ops::geglu_fused_fwd(gu, h5), ShapeError);
  Tensor dgu_bad = Tensor::zeros({3, 6}, DType::F32);
  EXPECT_THROW(ops::geglu_fused_bwd(gu, h, dgu_bad), ShapeError);
}

}  // namespace
