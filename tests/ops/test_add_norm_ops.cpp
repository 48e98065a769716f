// The fused residual add + RMSNorm (ops.h add_rmsnorm_fwd / add_rmsnorm_bwd) on the CPU reference: BIT-identical
// to the separate ops it replaces, as the decoder's AM_FUSED_ADD_NORM switch needs (on or off, CPU training must not
// move by a bit):
//   forward   copy_(x_out, x); add_(x_out, delta); rmsnorm_fwd(x_out, w, eps, y, rstd)   -> x_out, y, rstd
//   backward  rmsnorm_bwd(x, w, rstd, dy, dx, dw); add_(dx, dres)                        -> dx, dw (accumulated)
// over random shapes (H of 1, odd sizes, W1's 2048; leading dimensions [B, T, H]), delta dtypes fp32 / bf16 / fp16
// (the CPU add_ widens them), several eps values, in place (x_out = x) and out of place, Gemma's (1 + w) weights,
// a frozen weight (dw undefined), and the argument checks (shapes, overlap, dtypes).
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "core/error.h"
#include "core/tensor.h"
#include "ops/ops.h"

using namespace am;

namespace {

Tensor randn(const Shape& shape, std::mt19937& rng, float mean = 0.f, float stddev = 1.f) {
  Tensor t = Tensor::empty(shape, DType::F32);
  std::normal_distribution<float> d(mean, stddev);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = d(rng);
  return t;
}

void expect_same_bits(const Tensor& got, const Tensor& want, const std::string& what) {
  ASSERT_EQ(got.nbytes(), want.nbytes()) << what;
  if (got.nbytes() == 0 || std::memcmp(got.raw(), want.raw(), got.nbytes()) == 0) return;
  for (int64_t i = 0; i < got.numel(); ++i)
    if (std::memcmp(got.f32() + i, want.f32() + i, sizeof(float)) != 0) {
      ADD_FAILURE() << what << ": first difference at element " << i << ": " << got.f32()[i] << " vs "
                    << want.f32()[i];
      return;
    }
}

const DType kDeltaTypes[] = {DType::F32, DType::BF16, DType::F16};

// (leading shape, H): rows from 1 up, H from 1 to W1's 2048 and a size that is no multiple of any vector width.
std::vector<std::tuple<Shape, int64_t>> shapes() {
  return {{{1}, 1}, {{3}, 1}, {{5}, 37}, {{64}, 64}, {{2, 7}, 96}, {{33}, 2048}, {{4, 3}, 257}, {{300}, 130}};
}

// Gemma's zero-centred norms multiply by 1 + w formed in fp32 (models/blocks/norm.h).
Tensor plus_one(const Tensor& w) {
  Tensor w1 = w.clone();
  ops::add_scalar_(w1, 1.0f);
  return w1;
}

}  // namespace

TEST(OpsCpuAddRmsNorm, ForwardBitIdenticalToAddThenNorm) {
  std::mt19937 rng(11);
  int cases = 0;
  for (auto [lead, h] : shapes()) {
    for (DType dt : kDeltaTypes) {
      for (float eps : {1e-5f, 1e-6f, 0.f}) {
        for (bool in_place : {false, true}) {
          for (bool gemma : {false, true}) {
            Shape s = lead;
            s.push_back(h);
            const int64_t n = shape_numel(s) / h;
            // Residual of a few units, block output an order smaller (as in a decoder), rounded to delta's dtype.
            const Tensor x = randn(s, rng, 0.f, 3.f);
            const Tensor delta = randn(s, rng, 0.f, 0.5f).to(dt);
            Tensor w = randn({h}, rng, gemma ? 0.f : 1.f, 0.2f);
            if (gemma) w = plus_one(w);
            const std::string what = shape_str(s) + " delta " + dtype_name(dt) + " eps " + std::to_string(eps) +
                                     (in_place ? " in place" : "") + (gemma ? " (1 + w)" : "");
            // The separate ops.
            Tensor want_x = x.clone(), want_y = Tensor::empty(s, DType::F32), want_r = Tensor::empty({n}, DType::F32);
            ops::add_(want_x, delta);
            ops::rmsnorm_fwd(want_x, w, eps, want_y, want_r);
            // Fused.
            Tensor xin = x.clone();
            Tensor x_out = in_place ? xin : Tensor::empty(s, DType::F32);
            Tensor y = Tensor::empty(s, DType::F32), r = Tensor::empty({n}, DType::F32);
            ops::add_rmsnorm_fwd(xin, delta, w, eps, x_out, y, r);
            expect_same_bits(x_out, want_x, "x_out " + what);
            expect_same_bits(y, want_y, "y " + what);
            expect_same_bits(r, want_r, "rstd " + what);
            if (!in_place) expect_same_bits(xin, x, "x untouched " + what);
            ++cases;
            if (::testing::Test::HasFailure()) return;
          }
        }
      }
    }
  }
  EXPECT_EQ(cases, 8 * 3 * 3 * 2 * 2);
}

TEST(OpsCpuAddRmsNorm, BackwardBitIdenticalToNormBwdThenAdd) {
  std::mt19937 rng(12);
  for (auto [lead, h] : shapes()) {
    for (bool frozen : {false, true}) {
      Shape s = lead;
      s.push_back(h);
      const int64_t n = shape_numel(s) / h;
      const Tensor x = randn(s, rng, 0.f, 3.f), w = randn({h}, rng, 1.f, 0.2f);
      Tensor y = Tensor::empty(s, DType::F32), rstd = Tensor::empty({n}, DType::F32);
      ops::rmsnorm_fwd(x, w, 1e-6f, y, rstd);
      const Tensor dy = randn(s, rng), dres = randn(s, rng, 0.f, 2.f), dw0 = randn({h}, rng);
      const std::string what = shape_str(s) + (frozen ? " frozen w" : "");
      Tensor want_dx = Tensor::empty(s, DType::F32), want_dw = frozen ? Tensor() : dw0.clone();
      ops::rmsnorm_bwd(x, w, rstd, dy, want_dx, want_dw);
      ops::add_(want_dx, dres);
      Tensor dx = Tensor::empty(s, DType::F32), dw = frozen ? Tensor() : dw0.clone();
      const Tensor dres_before = dres.clone();
      ops::add_rmsnorm_bwd(x, w, rstd, dy, dres, dx, dw);
      expect_same_bits(dx, want_dx, "dx " + what);
      if (!frozen) expect_same_bits(dw, want_dw, "dw (accumulated onto its old value) " + what);
      expect_same_bits(dres, dres_before, "dres untouched " + what);
      if (::testing::Test::HasFailure()) return;
    }
  }
}

// A decoder's two sites chained: forward x1 = x + a -> norm2, out = x1 + m -> the next norm; backward through both.
// The fused chain and the separate chain give the same bits everywhere (what the decoder test relies on per layer).
TEST(OpsCpuAddRmsNorm, ChainedSitesMatchSeparateOps) {
  std::mt19937 rng(13);
  const int64_t n = 24, h = 48;
  const Tensor x = randn({n, h}, rng, 0.f, 3.f), a = randn({n, h}, rng), m = randn({n, h}, rng);
  const Tensor w2 = randn({h}, rng, 1.f, 0.1f), w3 = plus_one(randn({h}, rng, 0.f, 0.1f));
  const Tensor dh2 = randn({n, h}, rng), dh3 = randn({n, h}, rng), dout = randn({n, h}, rng);
  struct Out {
    Tensor x1, out, h2, h3, r2, r3, dx1, dx, dw2, dw3;
  };
  auto run = [&](bool fused) {
    Out o;
    o.x1 = Tensor::empty({n, h}, DType::F32);
    o.out = Tensor::empty({n, h}, DType::F32);
    o.h2 = Tensor::empty({n, h}, DType::F32);
    o.h3 = Tensor::empty({n, h}, DType::F32);
    o.r2 = Tensor::empty({n}, DType::F32);
    o.r3 = Tensor::empty({n}, DType::F32);
    o.dx1 = Tensor::empty({n, h}, DType::F32);
    o.dx = Tensor::empty({n, h}, DType::F32);
    o.dw2 = Tensor::zeros({h}, DType::F32);
    o.dw3 = Tensor::zeros({h}, DType::F32);
    if (fused) {
      ops::add_rmsnorm_fwd(x, a, w2, 1e-6f, o.x1, o.h2, o.r2);
      ops::add_rmsnorm_fwd(o.x1, m, w3, 1e-6f, o.out, o.h3, o.r3);
      ops::add_rmsnorm_bwd(o.out, w3, o.r3, dh3, dout, o.dx1, o.dw3);
      ops::add_rmsnorm_bwd(o.x1, w2, o.r2, dh2, o.dx1, o.dx, o.dw2);
    } else {
      ops::copy_(o.x1, x);
      ops::add_(o.x1, a);
      ops::rmsnorm_fwd(o.x1, w2, 1e-6f, o.h2, o.r2);
      ops::copy_(o.out, o.x1);
      ops::add_(o.out, m);
      ops::rmsnorm_fwd(o.out, w3, 1e-6f, o.h3, o.r3);
      ops::rmsnorm_bwd(o.out, w3, o.r3, dh3, o.dx1, o.dw3);
      ops::add_(o.dx1, dout);
      ops::rmsnorm_bwd(o.x1, w2, o.r2, dh2, o.dx, o.dw2);
      ops::add_(o.dx, o.dx1);
    }
    return o;
  };
  const Out f = run(true), p = run(false);
  expect_same_bits(f.x1, p.x1, "x1");
  expect_same_bits(f.out, p.out, "out");
  expect_same_bits(f.h2, p.h2, "h2");
  expect_same_bits(f.h3, p.h3, "h3");
  expect_same_bits(f.r2, p.r2, "rstd2");
  expect_same_bits(f.r3, p.r3, "rstd3");
  expect_same_bits(f.dx1, p.dx1, "dx1");
  expect_same_bits(f.dx, p.dx, "dx");
  expect_same_bits(f.dw2, p.dw2, "dw2");
  expect_same_bits(f.dw3, p.dw3, "dw3 (1 + w)");
}

TEST(OpsCpuAddRmsNorm, RejectsBadArguments) {
  std::mt19937 rng(14);
  const int64_t n = 6, h = 8;
  Tensor x = randn({n, h}, rng), d = randn({n, h}, rng), w = randn({h}, rng);
  Tensor xo = Tensor::empty({n, h}, DType::F32), y = Tensor::empty({n, h}, DType::F32),
         r = Tensor::empty({n}, DType::F32);
  EXPECT_NO_THROW(ops::add_rmsnorm_fwd(x, d, w, 1e-6f, xo, y, r));
  // Shapes.
  Tensor d_bad = randn({n, h + 1}, rng), r_bad = Tensor::empty({n + 1}, DType::F32), w_bad = randn({h, 1}, rng);
  EXPECT_THROW(ops::add_rmsnorm_fwd(x, d_bad, w, 1e-6f, xo, y, r), ShapeError);
  EXPECT_THROW(ops::add_rmsnorm_fwd(x, d, w, 1e-6f, xo, y, r_bad), ShapeError);
  EXPECT_THROW(ops::add_rmsnorm_fwd(x, d, w_bad, 1e-6f, xo, y, r), ShapeError);
  EXPECT_THROW(ops::add_rmsnorm_fwd(x, d, w, -1.f, xo, y, r), ShapeError);
  // The CPU reference keeps the residual stream and the norm in fp32.
  Tensor x16 = x.to(DType::BF16), y16 = y.to(DType::BF16);
  EXPECT_THROW(ops::add_rmsnorm_fwd(x16, d, w, 1e-6f, xo, y, r), ShapeError);
  EXPECT_THROW(ops::add_rmsnorm_fwd(x, d, w, 1e-6f, xo, y16, r), ShapeError);
  // x_out partly over x (one row further), or over delta: refused; x_out = x is the in-place form.
  Tensor buf = randn({n + 1, h}, rng);
  Tensor xa = buf.slice_rows(0, n), xb = buf.slice_rows(1, n + 1);
  EXPECT_THROW(ops::add_rmsnorm_fwd(xa, d, w, 1e-6f, xb, y, r), ShapeError);
  EXPECT_THROW(ops::add_rmsnorm_fwd(x, d, w, 1e-6f, d, y, r), ShapeError);
  EXPECT_NO_THROW(ops::add_rmsnorm_fwd(xa, d, w, 1e-6f, xa, y, r));
  // Backward: dres shape, dx over dres.
  Tensor dy = randn({n, h}, rng), dres = randn({n, h}, rng), dx = Tensor::empty({n, h}, DType::F32),
         dw = Tensor::zeros({h}, DType::F32);
  EXPECT_NO_THROW(ops::add_rmsnorm_bwd(x, w, r, dy, dres, dx, dw));
  EXPECT_THROW(ops::add_rmsnorm_bwd(x, w, r, dy, d_bad, dx, dw), ShapeError);
  EXPECT_THROW(ops::add_rmsnorm_bwd(x, w, r, dy, dres, dres, dw), ShapeError);
  Tensor dw_bad = Tensor::zeros({h + 1}, DType::F32);
  EXPECT_THROW(ops::add_rmsnorm_bwd(x, w, r, dy, dres, dx, dw_bad), ShapeError);
}
