// CPU reference ops: every op against a naive reference written here (double precision, random shapes,
// several seeds), gradients against central finite differences of sum(out * R), the parameter-gradient
// += / activation-gradient = contract, and the errors thrown for bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../common/tolerance.h"
#include "core/error.h"
#include "core/tensor.h"
#include "ops/ops.h"

using namespace am;
using am::test::fd_step;
using am::test::fd_tolerance;
using am::test::tolerance;
using am::test::Tolerance;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

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

Tensor randint(const Shape& shape, int32_t lo, int32_t hi, std::mt19937& rng) {
  std::uniform_int_distribution<int32_t> d(lo, hi - 1);
  Tensor t = Tensor::empty(shape, DType::I32);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<int32_t>()[i] = d(rng);
  return t;
}

int64_t rand_in(std::mt19937& rng, int64_t lo, int64_t hi) {  // inclusive
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

std::vector<double> values(const Tensor& t) {
  std::vector<double> v(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) v[static_cast<size_t>(i)] = t.f32()[i];
  return v;
}

// got - base, elementwise: what a += op added.
std::vector<double> delta(const Tensor& got, const Tensor& base) {
  std::vector<double> v = values(got);
  for (size_t i = 0; i < v.size(); ++i) v[i] -= base.f32()[i];
  return v;
}

// Elementwise comparison; reports the worst element and the first few mismatches.
void expect_close(const std::vector<double>& got, const std::vector<double>& want, Tolerance tol,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int bad = 0;
  double worst = 0.0;
  size_t worst_i = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const bool both_neg_inf = got[i] == -kInf && want[i] == -kInf;
    const double err = both_neg_inf ? 0.0 : std::abs(got[i] - want[i]);
    if (!(err <= tol.atol + tol.rtol * std::abs(want[i]))) {  // NaN fails too
      if (++bad <= 5) ADD_FAILURE() << what << "[" << i << "]: got " << got[i] << ", want " << want[i];
    }
    if (!(err <= worst)) {
      worst = err;
      worst_i = i;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " mismatches; worst at [" << worst_i
                    << "] abs err " << worst;
}
void expect_close(const Tensor& got, const std::vector<double>& want, Tolerance tol,
                  const std::string& what) {
  expect_close(values(got), want, tol, what);
}

// sum(out * r) in double: the scalar objective whose gradient wrt out is r.
double objective(const Tensor& out, const Tensor& r) {
  double s = 0.0;
  for (int64_t i = 0; i < out.numel(); ++i) s += static_cast<double>(out.f32()[i]) * r.f32()[i];
  return s;
}

// Central finite differences of f() wrt every element of `param` (perturbed in place and restored).
std::vector<double> numeric_grad(Tensor& param, const std::function<double()>& f,
                                 double h = fd_step(DType::F32)) {
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

const Tolerance kF32 = tolerance(DType::F32);
const Tolerance kFd = fd_tolerance(DType::F32);

// Host buffer labelled as CUDA memory: only used to check that front-ends refuse it before reading it.
Tensor fake_cuda(const Shape& shape, DType dt) {
  auto buf =
      std::make_shared<std::vector<char>>(static_cast<size_t>(shape_numel(shape)) * dtype_size(dt) + 1);
  return Tensor::wrap(buf->data(), shape, dt, buf, DeviceType::CUDA);
}

}  // namespace

// ============================== elementwise ==============================

TEST(OpsCpuElementwise, AddScaleCopyMatchReference) {
  std::mt19937 rng(1);
  for (int64_t n : {1, 7, 1000, 70000}) {  // 70000 crosses the parallel threshold
    Tensor a = randn({n}, rng), b = randn({n}, rng);
    std::vector<double> want(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) want[i] = (static_cast<double>(a.f32()[i]) + b.f32()[i]) * 0.5;
    ops::add_(a, b);
    ops::scale_(a, 0.5f);
    expect_close(a, want, kF32, "add+scale n=" + std::to_string(n));
    Tensor c = filled({n}, kNaN);
    ops::copy_(c, a);
    EXPECT_EQ(values(c), values(a));
  }
}

TEST(OpsCpuElementwise, MixedFloatDtypes) {
  std::mt19937 rng(2);
  Tensor master = randn({4, 33}, rng);
  Tensor g32 = randn({4, 33}, rng);
  Tensor g16 = g32.to(DType::BF16);
  std::vector<double> want = values(master);
  for (size_t i = 0; i < want.size(); ++i) want[i] += bf16_to_f32(g16.data<uint16_t>()[i]);
  ops::add_(master, g16);  // fp32 master += bf16 grad
  expect_close(master, want, kF32, "f32 += bf16");

  // bf16 in place: fp32 math, rounded once.
  Tensor b = g32.to(DType::BF16);
  ops::scale_(b, 3.f);
  for (int64_t i = 0; i < b.numel(); ++i)
    EXPECT_EQ(b.data<uint16_t>()[i], f32_to_bf16(bf16_to_f32(g16.data<uint16_t>()[i]) * 3.f));

  // copy_ converts like Tensor::to.
  Tensor c = Tensor::empty({4, 33}, DType::BF16);
  ops::copy_(c, g32);
  for (int64_t i = 0; i < c.numel(); ++i) EXPECT_EQ(c.data<uint16_t>()[i], g16.data<uint16_t>()[i]);
  Tensor h = Tensor::empty({132}, DType::F16);  // shape may differ, numel may not
  ops::copy_(h, g32);
  for (int64_t i = 0; i < h.numel(); ++i) EXPECT_EQ(h.data<uint16_t>()[i], f32_to_f16(g32.f32()[i]));

  // Integer tensors copy byte for byte, but never convert.
  Tensor i1 = ints({3}, {1, -2, 3}), i2 = ints({3}, {0, 0, 0});
  ops::copy_(i2, i1);
  EXPECT_EQ(i2.data<int32_t>()[1], -2);
  Tensor f = Tensor::empty({3}, DType::F32);
  EXPECT_THROW(ops::copy_(f, i1), ShapeError);
  EXPECT_THROW(ops::add_(i2, i1), ShapeError);
}

TEST(OpsCpuElementwise, SumSquares) {
  std::mt19937 rng(3);
  for (int64_t n : {0, 1, 5, 16384, 100003}) {
    Tensor a = randn({n}, rng);
    double want = 0.0;
    for (int64_t i = 0; i < n; ++i) want += static_cast<double>(a.f32()[i]) * a.f32()[i];
    EXPECT_NEAR(ops::sum_squares(a), want, 1e-12 * std::max(1.0, want)) << n;
    Tensor b = a.to(DType::BF16);
    double want16 = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      double v = bf16_to_f32(b.data<uint16_t>()[i]);
      want16 += v * v;
    }
    EXPECT_NEAR(ops::sum_squares(b), want16, 1e-12 * std::max(1.0, want16)) << n;
  }
}

TEST(OpsCpuElementwise, ShapeErrors) {
  Tensor a = Tensor::zeros({3}, DType::F32), b = Tensor::zeros({4}, DType::F32);
  EXPECT_THROW(ops::add_(a, b), ShapeError);
  EXPECT_THROW(ops::copy_(a, b), ShapeError);
  Tensor undefined;
  EXPECT_THROW(ops::add_(a, undefined), ShapeError);
  EXPECT_THROW(ops::scale_(undefined, 2.f), ShapeError);
  EXPECT_THROW(ops::sum_squares(ints({1}, {1})), ShapeError);
}

// ============================== embedding ==============================

TEST(OpsCpuEmbedding, ForwardMatchesGather) {
  for (uint32_t seed : {1u, 2u, 3u}) {
    std::mt19937 rng(seed);
    const int64_t V = rand_in(rng, 1, 50), H = rand_in(rng, 1, 40), N = rand_in(rng, 1, 30);
    Tensor w = randn({V, H}, rng);
    Tensor ids = randint({N}, 0, static_cast<int32_t>(V), rng);
    Tensor out = filled({N, H}, kNaN);
    ops::embedding_fwd(ids, w, out);
    std::vector<double> want;
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < H; ++j) want.push_back(w.f32()[ids.data<int32_t>()[i] * H + j]);
    expect_close(out, want, {0, 0}, "embedding");
  }
  // ids [B, T] with out [B, T, H] is accepted too.
  std::mt19937 rng(4);
  Tensor w = randn({10, 3}, rng);
  Tensor ids = randint({2, 5}, 0, 10, rng);
  Tensor out = Tensor::empty({2, 5, 3}, DType::F32);
  ops::embedding_fwd(ids, w, out);
  EXPECT_EQ(out.f32()[7 * 3 + 2], w.f32()[ids.data<int32_t>()[7] * 3 + 2]);
}

TEST(OpsCpuEmbedding, BackwardAccumulatesRepeatedIds) {
  for (uint32_t seed : {5u, 6u}) {
    std::mt19937 rng(seed);
    const int64_t V = rand_in(rng, 2, 8), H = rand_in(rng, 1, 300),
                  N = rand_in(rng, 5, 40);                       // H > 256: two column blocks
    Tensor ids = randint({N}, 0, static_cast<int32_t>(V), rng);  // few ids: many repeats
    Tensor dout = randn({N, H}, rng);
    Tensor dw0 = randn({V, H}, rng);
    Tensor dw = dw0.clone();
    ops::embedding_bwd(ids, dout, dw);
    std::vector<double> want = values(dw0);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < H; ++j) want[ids.data<int32_t>()[i] * H + j] += dout.f32()[i * H + j];
    expect_close(dw, want, kF32, "embedding dweight");
  }
}

TEST(OpsCpuEmbedding, GradientFiniteDifference) {
  std::mt19937 rng(7);
  const int64_t V = 6, H = 5, N = 9;
  Tensor w = randn({V, H}, rng);
  Tensor ids = randint({N}, 0, V, rng);
  Tensor r = randn({N, H}, rng);
  Tensor out = Tensor::empty({N, H}, DType::F32);
  auto f = [&] {
    ops::embedding_fwd(ids, w, out);
    return objective(out, r);
  };
  Tensor dw = Tensor::zeros({V, H}, DType::F32);
  ops::embedding_bwd(ids, r, dw);
  expect_close(dw, numeric_grad(w, f), kFd, "embedding FD");
}

TEST(OpsCpuEmbedding, OutOfRangeIdThrowsDataError) {
  Tensor w = Tensor::zeros({10, 4}, DType::F32);
  Tensor out = Tensor::empty({4, 4}, DType::F32);
  for (int32_t bad : {10, -1, 1 << 30}) {
    Tensor ids = ints({4}, {0, 9, 3, bad});
    try {
      ops::embedding_fwd(ids, w, out);
      ADD_FAILURE() << "no DataError for id " << bad;
    } catch (const DataError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(std::to_string(bad)), std::string::npos) << msg;
      EXPECT_NE(msg.find("position 3"), std::string::npos) << msg;
      EXPECT_NE(msg.find("10"), std::string::npos) << msg;
    }
    // The backward checks too, before writing anything.
    Tensor dw = Tensor::zeros({10, 4}, DType::F32);
    EXPECT_THROW(ops::embedding_bwd(ids, filled({4, 4}, 1.f), dw), DataError);
    EXPECT_EQ(ops::sum_squares(dw), 0.0);
  }
}

TEST(OpsCpuEmbedding, ShapeErrors) {
  Tensor w = Tensor::zeros({10, 4}, DType::F32);
  Tensor ids = ints({3}, {1, 2, 3});
  Tensor out_bad = Tensor::empty({3, 5}, DType::F32);
  EXPECT_THROW(ops::embedding_fwd(ids, w, out_bad), ShapeError);
  Tensor out = Tensor::empty({3, 4}, DType::F32);
  Tensor ids64 = Tensor::zeros({3}, DType::I64);
  EXPECT_THROW(ops::embedding_fwd(ids64, w, out), ShapeError);
  EXPECT_THROW(ops::embedding_fwd(ids, w.to(DType::BF16), out), ShapeError);
  Tensor w1 = Tensor::zeros({40}, DType::F32);
  EXPECT_THROW(ops::embedding_fwd(ids, w1, out), ShapeError);
}

// ============================== linear ==============================

namespace {
std::vector<double> linear_ref(const Tensor& x, const Tensor& w, const Tensor* b) {
  const int64_t M = w.dim(0), K = w.dim(1), N = x.numel() / K;
  std::vector<double> y(static_cast<size_t>(N * M));
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < M; ++j) {
      double acc = b ? b->f32()[j] : 0.0;
      for (int64_t k = 0; k < K; ++k) acc += static_cast<double>(x.f32()[i * K + k]) * w.f32()[j * K + k];
      y[i * M + j] = acc;
    }
  return y;
}
}  // namespace

TEST(OpsCpuLinear, ForwardMatchesNaive) {
  for (uint32_t seed : {1u, 2u, 3u, 4u}) {
    std::mt19937 rng(seed);
    const int64_t N = rand_in(rng, 1, 40), K = rand_in(rng, 1, 70), M = rand_in(rng, 1, 50);
    Tensor x = randn({N, K}, rng), w = randn({M, K}, rng), b = randn({M}, rng);
    Tensor y = filled({N, M}, kNaN);
    ops::linear_fwd(x, w, &b, y);
    expect_close(y, linear_ref(x, w, &b), kF32, "linear+bias seed " + std::to_string(seed));
    ops::linear_fwd(x, w, nullptr, y);
    expect_close(y, linear_ref(x, w, nullptr), kF32, "linear seed " + std::to_string(seed));
  }
  // Leading dimensions flatten: x [B, T, K] -> y [B, T, M].
  std::mt19937 rng(9);
  Tensor x = randn({2, 3, 8}, rng), w = randn({5, 8}, rng);
  Tensor y = Tensor::empty({2, 3, 5}, DType::F32);
  ops::linear_fwd(x, w, nullptr, y);
  expect_close(y, linear_ref(x, w, nullptr), kF32, "linear 3d");
}

TEST(OpsCpuLinear, GradientsFiniteDifferenceAndAccumulate) {
  for (uint32_t seed : {11u, 12u, 13u}) {
    std::mt19937 rng(seed);
    const int64_t N = rand_in(rng, 1, 6), K = rand_in(rng, 1, 7), M = rand_in(rng, 1, 5);
    Tensor x = randn({N, K}, rng), w = randn({M, K}, rng), b = randn({M}, rng), r = randn({N, M}, rng);
    Tensor y = Tensor::empty({N, M}, DType::F32);
    auto f = [&] {
      ops::linear_fwd(x, w, &b, y);
      return objective(y, r);
    };
    Tensor dx = filled({N, K}, kNaN);                        // assigned: old contents must not leak in
    Tensor dw0 = randn({M, K}, rng), db0 = randn({M}, rng);  // accumulated onto
    Tensor dw = dw0.clone(), db = db0.clone();
    ops::linear_bwd(x, w, r, &dx, dw, &db);
    const std::string tag = " seed " + std::to_string(seed);
    expect_close(dx, numeric_grad(x, f), kFd, "linear dx" + tag);
    expect_close(delta(dw, dw0), numeric_grad(w, f), kFd, "linear dw" + tag);
    expect_close(delta(db, db0), numeric_grad(b, f), kFd, "linear dbias" + tag);
  }
}

TEST(OpsCpuLinear, BackwardMatchesNaiveAtLargerShapes) {
  std::mt19937 rng(21);
  const int64_t N = 300, K = 48, M = 270;  // M > 256: dbias spans two column blocks
  Tensor x = randn({N, K}, rng), w = randn({M, K}, rng), dy = randn({N, M}, rng);
  Tensor dx = filled({N, K}, kNaN), dw = Tensor::zeros({M, K}, DType::F32),
         db = Tensor::zeros({M}, DType::F32);
  ops::linear_bwd(x, w, dy, &dx, dw, &db);
  std::vector<double> wdx(N * K, 0.0), wdw(M * K, 0.0), wdb(M, 0.0);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < M; ++j) {
      const double g = dy.f32()[i * M + j];
      wdb[j] += g;
      for (int64_t k = 0; k < K; ++k) {
        wdx[i * K + k] += g * w.f32()[j * K + k];
        wdw[j * K + k] += g * x.f32()[i * K + k];
      }
    }
  const Tolerance t{kF32.rtol, 1e-4};  // sums of 300 terms
  expect_close(dx, wdx, t, "dx");
  expect_close(dw, wdw, t, "dw");
  expect_close(db, wdb, t, "dbias");
}

TEST(OpsCpuLinear, NullDxAndRepeatedAccumulation) {
  std::mt19937 rng(14);
  Tensor x = randn({4, 3}, rng), w = randn({2, 3}, rng), dy = randn({4, 2}, rng);
  Tensor dw1 = Tensor::zeros({2, 3}, DType::F32), dw2 = Tensor::zeros({2, 3}, DType::F32);
  ops::linear_bwd(x, w, dy, nullptr, dw1, nullptr);
  ops::linear_bwd(x, w, dy, nullptr, dw2, nullptr);
  ops::linear_bwd(x, w, dy, nullptr, dw2, nullptr);
  std::vector<double> twice = values(dw1);
  for (double& v : twice) v *= 2;
  expect_close(dw2, twice, kF32, "dw after two calls");
}

TEST(OpsCpuLinear, ShapeErrors) {
  Tensor x = Tensor::zeros({4, 3}, DType::F32), w = Tensor::zeros({2, 3}, DType::F32);
  Tensor y = Tensor::empty({4, 2}, DType::F32);
  Tensor w_bad = Tensor::zeros({2, 4}, DType::F32), y_bad = Tensor::empty({5, 2}, DType::F32);
  Tensor b_bad = Tensor::zeros({3}, DType::F32);
  EXPECT_THROW(ops::linear_fwd(x, w_bad, nullptr, y), ShapeError);
  EXPECT_THROW(ops::linear_fwd(x, w, nullptr, y_bad), ShapeError);
  EXPECT_THROW(ops::linear_fwd(x, w, &b_bad, y), ShapeError);
  try {
    ops::linear_fwd(x, w_bad, nullptr, y);
  } catch (const ShapeError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("linear_fwd"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[4, 3]"), std::string::npos) << msg;
  }
  Tensor dw_bad = Tensor::zeros({3, 2}, DType::F32), dx_bad = Tensor::zeros({3, 4}, DType::F32);
  Tensor dw = Tensor::zeros({2, 3}, DType::F32);
  EXPECT_THROW(ops::linear_bwd(x, w, y, nullptr, dw_bad, nullptr), ShapeError);
  EXPECT_THROW(ops::linear_bwd(x, w, y, &dx_bad, dw, nullptr), ShapeError);
}

// ============================== RMSNorm ==============================

namespace {
// HF LlamaRMSNorm in double: w * x / sqrt(mean(x^2) + eps)
std::vector<double> rmsnorm_ref(const Tensor& x, const Tensor& w, double eps, std::vector<double>* rstd) {
  const int64_t H = w.dim(0), N = x.numel() / H;
  std::vector<double> y(static_cast<size_t>(N * H));
  for (int64_t i = 0; i < N; ++i) {
    double ss = 0;
    for (int64_t j = 0; j < H; ++j) ss += static_cast<double>(x.f32()[i * H + j]) * x.f32()[i * H + j];
    const double r = 1.0 / std::sqrt(ss / H + eps);
    if (rstd) rstd->push_back(r);
    for (int64_t j = 0; j < H; ++j) y[i * H + j] = w.f32()[j] * x.f32()[i * H + j] * r;
  }
  return y;
}
}  // namespace

TEST(OpsCpuRmsNorm, ForwardMatchesNaive) {
  for (uint32_t seed : {1u, 2u, 3u}) {
    std::mt19937 rng(seed);
    const int64_t N = rand_in(rng, 1, 20), H = rand_in(rng, 1, 300);
    Tensor x = randn({N, H}, rng, 3.f), w = randn({H}, rng);
    Tensor y = filled({N, H}, kNaN), rstd = filled({N}, kNaN);
    for (float eps : {1e-6f, 1e-5f}) {
      std::vector<double> want_rstd;
      auto want = rmsnorm_ref(x, w, eps, &want_rstd);
      ops::rmsnorm_fwd(x, w, eps, y, rstd);
      expect_close(y, want, kF32, "rmsnorm y");
      expect_close(rstd, want_rstd, kF32, "rmsnorm rstd");
    }
  }
}

TEST(OpsCpuRmsNorm, GradientsFiniteDifferenceAndAccumulate) {
  for (uint32_t seed : {4u, 5u, 6u}) {
    std::mt19937 rng(seed);
    const int64_t N = rand_in(rng, 1, 5), H = rand_in(rng, 1, 9);
    Tensor x = randn({N, H}, rng), w = randn({H}, rng), r = randn({N, H}, rng);
    Tensor y = Tensor::empty({N, H}, DType::F32), rstd = Tensor::empty({N}, DType::F32);
    const float eps = 1e-5f;
    auto f = [&] {
      ops::rmsnorm_fwd(x, w, eps, y, rstd);
      return objective(y, r);
    };
    f();
    Tensor dx = filled({N, H}, kNaN), dw0 = randn({H}, rng), dw = dw0.clone();
    ops::rmsnorm_bwd(x, w, rstd, r, dx, dw);
    const std::string tag = " seed " + std::to_string(seed);
    // h smaller than usual: x is normalised, and a single-feature row (H = 1) is a step function of x.
    const double h = 1e-3;
    expect_close(dx, numeric_grad(x, f, h), {2e-2, 2e-3}, "rmsnorm dx" + tag);
    expect_close(delta(dw, dw0), numeric_grad(w, f), kFd, "rmsnorm dw" + tag);
  }
}

TEST(OpsCpuRmsNorm, BackwardMatchesAnalyticAtLargerShape) {
  // Double-precision closed form at a shape spanning two dw column blocks.
  std::mt19937 rng(8);
  const int64_t N = 7, H = 300;
  Tensor x = randn({N, H}, rng), w = randn({H}, rng), dy = randn({N, H}, rng);
  Tensor y = Tensor::empty({N, H}, DType::F32), rstd = Tensor::empty({N}, DType::F32);
  ops::rmsnorm_fwd(x, w, 1e-6f, y, rstd);
  Tensor dx = Tensor::empty({N, H}, DType::F32), dw = Tensor::zeros({H}, DType::F32);
  ops::rmsnorm_bwd(x, w, rstd, dy, dx, dw);
  std::vector<double> wdx(N * H), wdw(H, 0.0);
  for (int64_t i = 0; i < N; ++i) {
    double ss = 0, dot = 0;
    for (int64_t j = 0; j < H; ++j) {
      const double xv = x.f32()[i * H + j];
      ss += xv * xv;
      dot += static_cast<double>(dy.f32()[i * H + j]) * w.f32()[j] * xv;
    }
    const double r = 1.0 / std::sqrt(ss / H + 1e-6);
    for (int64_t j = 0; j < H; ++j) {
      const double xv = x.f32()[i * H + j];
      wdx[i * H + j] = r * w.f32()[j] * dy.f32()[i * H + j] - r * r * r * xv * dot / H;
      wdw[j] += dy.f32()[i * H + j] * xv * r;
    }
  }
  expect_close(dx, wdx, kF32, "rmsnorm dx");
  expect_close(dw, wdw, kF32, "rmsnorm dw");
}

TEST(OpsCpuRmsNorm, ShapeErrors) {
  Tensor x = Tensor::zeros({3, 4}, DType::F32), w = Tensor::zeros({5}, DType::F32);
  Tensor y = Tensor::empty({3, 4}, DType::F32), rstd = Tensor::empty({3}, DType::F32);
  EXPECT_THROW(ops::rmsnorm_fwd(x, w, 1e-6f, y, rstd), ShapeError);
  Tensor w4 = Tensor::zeros({4}, DType::F32), rstd_bad = Tensor::empty({4}, DType::F32);
  EXPECT_THROW(ops::rmsnorm_fwd(x, w4, 1e-6f, y, rstd_bad), ShapeError);
  Tensor dx_bad = Tensor::empty({4, 3}, DType::F32), dw = Tensor::zeros({4}, DType::F32);
  EXPECT_THROW(ops::rmsnorm_bwd(x, w4, rstd, y, dx_bad, dw), ShapeError);
}

// ============================== RoPE ==============================

namespace {
struct RopeCase {
  Tensor cos, sin;  // [N, half]
};
RopeCase rope_tables(int64_t n, int64_t half, std::mt19937& rng, float attn_scaling) {
  RopeCase c{Tensor::empty({n, half}, DType::F32), Tensor::empty({n, half}, DType::F32)};
  std::uniform_real_distribution<float> ang(-3.14159f, 3.14159f);
  for (int64_t i = 0; i < n * half; ++i) {
    const float a = ang(rng);
    c.cos.f32()[i] = std::cos(a) * attn_scaling;
    c.sin.f32()[i] = std::sin(a) * attn_scaling;
  }
  return c;
}
// HF: q * cos + rotate_half(q) * sin on the first R = 2*half features (cos/sin duplicated across halves).
std::vector<double> rope_ref(const Tensor& x, const RopeCase& t) {
  const int64_t D = x.dim(-1), heads = x.dim(-2), N = x.numel() / (heads * D), half = t.cos.dim(-1);
  std::vector<double> y = values(x);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < 2 * half; ++i) {
        const float* xh = x.f32() + (n * heads + h) * D;
        const double rot = i < half ? -static_cast<double>(xh[i + half]) : xh[i - half];  // rotate_half
        const int64_t f = i % half;
        y[(n * heads + h) * D + i] =
            static_cast<double>(xh[i]) * t.cos.f32()[n * half + f] + rot * t.sin.f32()[n * half + f];
      }
  return y;
}
}  // namespace

TEST(OpsCpuRope, ForwardMatchesRotateHalf) {
  for (uint32_t seed : {1u, 2u, 3u}) {
    std::mt19937 rng(seed);
    const int64_t N = rand_in(rng, 1, 10), heads = rand_in(rng, 1, 4), D = 2 * rand_in(rng, 1, 8);
    for (int64_t half : {D / 2, std::max<int64_t>(1, D / 4)}) {  // full and partial rotary
      RopeCase t = rope_tables(N, half, rng, 1.25f);             // yarn-style attention scaling
      Tensor x = randn({N, heads, D}, rng);
      auto want = rope_ref(x, t);
      ops::rope_fwd_(x, t.cos, t.sin);
      expect_close(x, want, kF32, "rope half=" + std::to_string(half));
    }
  }
  // [B, T, heads, D] with cos [B*T, D/2] works too.
  std::mt19937 rng(4);
  RopeCase t = rope_tables(6, 4, rng, 1.f);
  Tensor x = randn({2, 3, 2, 8}, rng);
  auto want = rope_ref(x, t);
  ops::rope_fwd_(x, t.cos, t.sin);
  expect_close(x, want, kF32, "rope 4d");
}

TEST(OpsCpuRope, BackwardFiniteDifference) {
  for (uint32_t seed : {5u, 6u}) {
    std::mt19937 rng(seed);
    const int64_t N = 3, heads = 2, D = 8;
    for (int64_t half : {int64_t{4}, int64_t{2}}) {
      RopeCase t = rope_tables(N, half, rng, 1.1f);
      Tensor x = randn({N, heads, D}, rng), r = randn({N, heads, D}, rng);
      auto f = [&] {
        Tensor y = x.clone();
        ops::rope_fwd_(y, t.cos, t.sin);
        return objective(y, r);
      };
      Tensor dx = r.clone();
      ops::rope_bwd_(dx, t.cos, t.sin);
      expect_close(dx, numeric_grad(x, f), kFd, "rope dx half=" + std::to_string(half));
    }
  }
}

TEST(OpsCpuRope, BackwardInvertsForwardForPureRotation) {
  std::mt19937 rng(7);
  RopeCase t = rope_tables(5, 16, rng, 1.f);
  Tensor x = randn({5, 3, 32}, rng);
  Tensor y = x.clone();
  ops::rope_fwd_(y, t.cos, t.sin);
  ops::rope_bwd_(y, t.cos, t.sin);
  expect_close(y, values(x), kF32, "rope^T rope");
}

TEST(OpsCpuRope, ShapeErrors) {
  Tensor x = Tensor::zeros({3, 2, 8}, DType::F32);
  Tensor c5 = Tensor::zeros({3, 5}, DType::F32), c4 = Tensor::zeros({3, 4}, DType::F32);
  Tensor c4n = Tensor::zeros({2, 4}, DType::F32);
  EXPECT_THROW(ops::rope_fwd_(x, c5, c5), ShapeError);    // more than D/2
  EXPECT_THROW(ops::rope_fwd_(x, c4n, c4n), ShapeError);  // wrong token count
  EXPECT_THROW(ops::rope_fwd_(x, c4, c4n), ShapeError);   // cos/sin differ
  Tensor x2 = Tensor::zeros({3, 8}, DType::F32);
  EXPECT_THROW(ops::rope_bwd_(x2, c4, c4), ShapeError);
}

// ============================== SwiGLU ==============================

TEST(OpsCpuSwiGLU, ForwardMatchesNaive) {
  for (uint32_t seed : {1u, 2u}) {
    std::mt19937 rng(seed);
    const int64_t N = rand_in(rng, 1, 10), I = rand_in(rng, 1, 50);
    Tensor g = randn({N, I}, rng, 4.f), u = randn({N, I}, rng), h = filled({N, I}, kNaN);
    ops::swiglu_fwd(g, u, h);
    std::vector<double> want;
    for (int64_t i = 0; i < N * I; ++i) {
      const double gv = g.f32()[i];
      want.push_back(gv / (1.0 + std::exp(-gv)) * u.f32()[i]);
    }
    expect_close(h, want, kF32, "swiglu");
  }
  // Extreme gates stay finite: silu(-200) = 0, silu(200) = 200.
  Tensor g = Tensor::empty({2}, DType::F32), u = filled({2}, 1.f), h = Tensor::empty({2}, DType::F32);
  g.f32()[0] = -200.f;
  g.f32()[1] = 200.f;
  ops::swiglu_fwd(g, u, h);
  EXPECT_EQ(h.f32()[0], -0.f);
  EXPECT_EQ(h.f32()[1], 200.f);
  Tensor dg = Tensor::empty({2}, DType::F32), du = Tensor::empty({2}, DType::F32);
  ops::swiglu_bwd(g, u, u, dg, du);
  EXPECT_TRUE(std::isfinite(dg.f32()[0]) && std::isfinite(dg.f32()[1]));
}

TEST(OpsCpuSwiGLU, GradientsFiniteDifference) {
  for (uint32_t seed : {3u, 4u, 5u}) {
    std::mt19937 rng(seed);
    Tensor g = randn({3, 7}, rng, 2.f), u = randn({3, 7}, rng), r = randn({3, 7}, rng);
    Tensor h = Tensor::empty({3, 7}, DType::F32);
    auto f = [&] {
      ops::swiglu_fwd(g, u, h);
      return objective(h, r);
    };
    Tensor dg = filled({3, 7}, kNaN), du = filled({3, 7}, kNaN);
    ops::swiglu_bwd(g, u, r, dg, du);
    expect_close(dg, numeric_grad(g, f), kFd, "swiglu dgate");
    expect_close(du, numeric_grad(u, f), kFd, "swiglu dup");
  }
}

TEST(OpsCpuSwiGLU, ShapeErrors) {
  Tensor g = Tensor::zeros({3, 4}, DType::F32), u = Tensor::zeros({4, 3}, DType::F32);
  Tensor h = Tensor::empty({3, 4}, DType::F32);
  EXPECT_THROW(ops::swiglu_fwd(g, u, h), ShapeError);
  Tensor d = Tensor::empty({3, 4}, DType::F32), bad = Tensor::empty({12}, DType::F32);
  EXPECT_THROW(ops::swiglu_bwd(g, g, d, bad, d), ShapeError);
}

// ============================== GeGLU (Gemma) ==============================

TEST(OpsCpuGeGLU, ForwardMatchesNaive) {
  for (uint32_t seed : {11u, 12u}) {
    std::mt19937 rng(seed);
    const int64_t N = rand_in(rng, 1, 10), I = rand_in(rng, 1, 50);
    Tensor g = randn({N, I}, rng, 4.f), u = randn({N, I}, rng), h = filled({N, I}, kNaN);
    ops::geglu_fwd(g, u, h);
    std::vector<double> want;
    const double k = std::sqrt(2.0 / M_PI);
    for (int64_t i = 0; i < N * I; ++i) {
      const double gv = g.f32()[i];
      want.push_back(0.5 * gv * (1.0 + std::tanh(k * (gv + 0.044715 * gv * gv * gv))) * u.f32()[i]);
    }
    expect_close(h, want, kF32, "geglu");
  }
  // gelu_tanh(-20) underflows to (-)0, gelu_tanh(20) = 20; gradients stay finite.
  Tensor g = Tensor::empty({2}, DType::F32), u = filled({2}, 1.f), h = Tensor::empty({2}, DType::F32);
  g.f32()[0] = -20.f;
  g.f32()[1] = 20.f;
  ops::geglu_fwd(g, u, h);
  EXPECT_EQ(std::abs(h.f32()[0]), 0.f);
  EXPECT_EQ(h.f32()[1], 20.f);
  Tensor dg = Tensor::empty({2}, DType::F32), du = Tensor::empty({2}, DType::F32);
  ops::geglu_bwd(g, u, u, dg, du);
  EXPECT_TRUE(std::isfinite(dg.f32()[0]) && std::isfinite(dg.f32()[1]));
  EXPECT_NEAR(dg.f32()[1], 1.f, 1e-6);
}

TEST(OpsCpuGeGLU, GradientsFiniteDifference) {
  for (uint32_t seed : {13u, 14u, 15u}) {
    std::mt19937 rng(seed);
    Tensor g = randn({3, 7}, rng, 2.f), u = randn({3, 7}, rng), r = randn({3, 7}, rng);
    Tensor h = Tensor::empty({3, 7}, DType::F32);
    auto f = [&] {
      ops::geglu_fwd(g, u, h);
      return objective(h, r);
    };
    Tensor dg = filled({3, 7}, kNaN), du = filled({3, 7}, kNaN);
    ops::geglu_bwd(g, u, r, dg, du);
    expect_close(dg, numeric_grad(g, f), kFd, "geglu dgate");
    expect_close(du, numeric_grad(u, f), kFd, "geglu dup");
  }
  Tensor g = Tensor::zeros({3, 4}, DType::F32), u = Tensor::zeros({4, 3}, DType::F32), h = Tensor::empty({3, 4}, DType::F32);
  EXPECT_THROW(ops::geglu_fwd(g, u, h), ShapeError);
}

TEST(OpsCpuElementwise, AddScalar) {
  Tensor a = Tensor::empty({3}, DType::F32);
  for (int i = 0; i < 3; ++i) a.f32()[i] = static_cast<float>(i) - 1.f;
  ops::add_scalar_(a, 1.f);
  EXPECT_EQ(a.f32()[0], 0.f);
  EXPECT_EQ(a.f32()[2], 2.f);
  Tensor i32 = Tensor::zeros({2}, DType::I32);
  EXPECT_THROW(ops::add_scalar_(i32, 1.f), ShapeError);
}

// ============================== attention ==============================

namespace {

struct AttnCase {
  int64_t B, T, nh, nkv, D, window;
  bool segments;
};

std::string name_of(const AttnCase& c) {
  return "B" + std::to_string(c.B) + " T" + std::to_string(c.T) + " nh" + std::to_string(c.nh) + " nkv" +
         std::to_string(c.nkv) + " D" + std::to_string(c.D) + " win" + std::to_string(c.window) +
         (c.segments ? " seg" : "");
}

// Packed rows: a few segments of random length, then right padding (-1) on some rows.
Tensor make_segments(int64_t B, int64_t T, std::mt19937& rng) {
  Tensor s = Tensor::empty({B, T}, DType::I32);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t pad = b % 2 == 0 ? rand_in(rng, 1, std::max<int64_t>(1, T / 3)) : 0;
    int32_t seg = 0;
    int64_t left = rand_in(rng, 1, 4);
    for (int64_t t = 0; t < T; ++t) {
      if (t >= T - pad) {
        s.data<int32_t>()[b * T + t] = -1;
        continue;
      }
      if (left == 0) {
        ++seg;
        left = rand_in(rng, 1, 4);
      }
      s.data<int32_t>()[b * T + t] = seg;
      --left;
    }
  }
  return s;
}

// Full [T, T] masked score matrix per (b, h), softmax in double.
void attention_ref(const Tensor& q, const Tensor& k, const Tensor& v, const ops::AttnParams& p,
                   std::vector<double>& out, std::vector<double>& lse) {
  const int64_t B = p.batch, T = p.seq, NH = p.n_heads, NKV = p.n_kv_heads, D = p.head_dim;
  out.assign(static_cast<size_t>(B * T * NH * D), 0.0);
  lse.assign(static_cast<size_t>(B * NH * T), -kInf);
  auto seg = [&](int64_t b, int64_t t) {
    return p.segment_ids ? p.segment_ids->data<int32_t>()[b * T + t] : 0;
  };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h) {
      const int64_t kh = h / (NH / NKV);
      std::vector<std::vector<double>> S(T, std::vector<double>(T, -kInf));
      for (int64_t i = 0; i < T; ++i)
        for (int64_t j = 0; j < T; ++j) {
          bool vis = j <= i;
          if (p.sliding_window > 0) vis = vis && i - j < p.sliding_window;
          if (p.segment_ids) vis = vis && seg(b, i) >= 0 && seg(b, j) == seg(b, i);
          if (!vis) continue;
          double s = 0;
          for (int64_t d = 0; d < D; ++d)
            s += static_cast<double>(q.f32()[((b * T + i) * NH + h) * D + d]) *
                 k.f32()[((b * T + j) * NKV + kh) * D + d];
          S[i][j] = s * p.scale;
          if (p.softcap > 0) S[i][j] = p.softcap * std::tanh(S[i][j] / p.softcap);  // Gemma 2
        }
      for (int64_t i = 0; i < T; ++i) {
        double m = -kInf;
        for (int64_t j = 0; j < T; ++j) m = std::max(m, S[i][j]);
        if (m == -kInf) continue;
        double l = 0;
        for (int64_t j = 0; j < T; ++j) l += std::exp(S[i][j] - m);
        lse[(b * NH + h) * T + i] = m + std::log(l);
        for (int64_t j = 0; j < T; ++j) {
          const double P = std::exp(S[i][j] - m) / l;
          for (int64_t d = 0; d < D; ++d)
            out[((b * T + i) * NH + h) * D + d] += P * v.f32()[((b * T + j) * NKV + kh) * D + d];
        }
      }
    }
}

const std::vector<AttnCase> kAttnCases = {
    {1, 5, 2, 2, 4, 0, false},  // MHA
    {2, 7, 4, 2, 8, 0, false},  // GQA 2
    {2, 6, 4, 1, 4, 0, false},  // GQA 4 (MQA)
    {1, 9, 4, 2, 4, 3, false},  // sliding window
    {2, 8, 2, 2, 4, 1, false},  // window 1: each query sees only itself
    {2, 10, 4, 2, 4, 0, true},  // packed segments with padding
    {3, 9, 4, 1, 8, 4, true},   // everything at once
};

}  // namespace

TEST(OpsCpuAttention, ForwardMatchesFullMatrixReference) {
  uint32_t seed = 100;
  for (const AttnCase& c : kAttnCases)
    for (int rep = 0; rep < 2; ++rep) {
      std::mt19937 rng(seed++);
      Tensor q = randn({c.B, c.T, c.nh, c.D}, rng), k = randn({c.B, c.T, c.nkv, c.D}, rng),
             v = randn({c.B, c.T, c.nkv, c.D}, rng);
      Tensor seg = make_segments(c.B, c.T, rng);
      ops::AttnParams p{.batch = c.B,
                        .seq = c.T,
                        .n_heads = c.nh,
                        .n_kv_heads = c.nkv,
                        .head_dim = c.D,
                        .scale = 1.f / std::sqrt(static_cast<float>(c.D)),
                        .sliding_window = c.window,
                        .segment_ids = c.segments ? &seg : nullptr};
      Tensor out = filled({c.B, c.T, c.nh, c.D}, kNaN), lse = filled({c.B, c.nh, c.T}, kNaN);
      ops::attention_fwd(q, k, v, p, out, lse);
      std::vector<double> wout, wlse;
      attention_ref(q, k, v, p, wout, wlse);
      expect_close(out, wout, kF32, "attn out " + name_of(c));
      expect_close(lse, wlse, kF32, "attn lse " + name_of(c));
    }
}

TEST(OpsCpuAttention, LongerSequenceMatchesReference) {
  std::mt19937 rng(7);
  const int64_t B = 1, T = 200, nh = 4, nkv = 2, D = 16;
  Tensor q = randn({B, T, nh, D}, rng), k = randn({B, T, nkv, D}, rng), v = randn({B, T, nkv, D}, rng);
  ops::AttnParams p{.batch = B,
                    .seq = T,
                    .n_heads = nh,
                    .n_kv_heads = nkv,
                    .head_dim = D,
                    .scale = 0.25f,
                    .sliding_window = 50};
  Tensor out = Tensor::empty({B, T, nh, D}, DType::F32), lse = Tensor::empty({B, nh, T}, DType::F32);
  ops::attention_fwd(q, k, v, p, out, lse);
  std::vector<double> wout, wlse;
  attention_ref(q, k, v, p, wout, wlse);
  expect_close(out, wout, kF32, "attn out T=200");
  expect_close(lse, wlse, kF32, "attn lse T=200");
}

TEST(OpsCpuAttention, GradientsFiniteDifference) {
  uint32_t seed = 200;
  for (const AttnCase& c : kAttnCases) {
    std::mt19937 rng(seed++);
    Tensor q = randn({c.B, c.T, c.nh, c.D}, rng), k = randn({c.B, c.T, c.nkv, c.D}, rng),
           v = randn({c.B, c.T, c.nkv, c.D}, rng), r = randn({c.B, c.T, c.nh, c.D}, rng);
    Tensor seg = make_segments(c.B, c.T, rng);
    ops::AttnParams p{.batch = c.B,
                      .seq = c.T,
                      .n_heads = c.nh,
                      .n_kv_heads = c.nkv,
                      .head_dim = c.D,
                      .scale = 1.f / std::sqrt(static_cast<float>(c.D)),
                      .sliding_window = c.window,
                      .segment_ids = c.segments ? &seg : nullptr};
    Tensor out = Tensor::empty({c.B, c.T, c.nh, c.D}, DType::F32),
           lse = Tensor::empty({c.B, c.nh, c.T}, DType::F32);
    auto f = [&] {
      ops::attention_fwd(q, k, v, p, out, lse);
      return objective(out, r);
    };
    f();
    Tensor dq = filled(q.shape(), kNaN), dk = filled(k.shape(), kNaN), dv = filled(v.shape(), kNaN);
    ops::attention_bwd(q, k, v, out, lse, r, p, dq, dk, dv);
    expect_close(dq, numeric_grad(q, f), kFd, "attn dq " + name_of(c));
    expect_close(dk, numeric_grad(k, f), kFd, "attn dk " + name_of(c));
    expect_close(dv, numeric_grad(v, f), kFd, "attn dv " + name_of(c));
  }
}

// Gemma 2's soft-capped scores (cap * tanh(s / cap)): forward against the full-matrix reference and every
// gradient against finite differences, with a cap small enough to bend these scores (|s| up to ~3).
TEST(OpsCpuAttention, SoftcapForwardAndGradients) {
  uint32_t seed = 300;
  for (const AttnCase& c : kAttnCases) {
    std::mt19937 rng(seed++);
    Tensor q = randn({c.B, c.T, c.nh, c.D}, rng), k = randn({c.B, c.T, c.nkv, c.D}, rng),
           v = randn({c.B, c.T, c.nkv, c.D}, rng), r = randn({c.B, c.T, c.nh, c.D}, rng);
    Tensor seg = make_segments(c.B, c.T, rng);
    ops::AttnParams p{.batch = c.B,
                      .seq = c.T,
                      .n_heads = c.nh,
                      .n_kv_heads = c.nkv,
                      .head_dim = c.D,
                      .scale = 1.f / std::sqrt(static_cast<float>(c.D)),
                      .sliding_window = c.window,
                      .segment_ids = c.segments ? &seg : nullptr,
                      .softcap = 1.5f};
    Tensor out = Tensor::empty({c.B, c.T, c.nh, c.D}, DType::F32),
           lse = Tensor::empty({c.B, c.nh, c.T}, DType::F32);
    ops::attention_fwd(q, k, v, p, out, lse);
    std::vector<double> wout, wlse;
    attention_ref(q, k, v, p, wout, wlse);
    expect_close(out, wout, kF32, "softcap attn out " + name_of(c));
    expect_close(lse, wlse, kF32, "softcap attn lse " + name_of(c));
    auto f = [&] {
      ops::attention_fwd(q, k, v, p, out, lse);
      return objective(out, r);
    };
    f();
    Tensor dq = filled(q.shape(), kNaN), dk = filled(k.shape(), kNaN), dv = filled(v.shape(), kNaN);
    ops::attention_bwd(q, k, v, out, lse, r, p, dq, dk, dv);
    expect_close(dq, numeric_grad(q, f), kFd, "softcap attn dq " + name_of(c));
    expect_close(dk, numeric_grad(k, f), kFd, "softcap attn dk " + name_of(c));
    expect_close(dv, numeric_grad(v, f), kFd, "softcap attn dv " + name_of(c));
  }
}

TEST(OpsCpuSoftcap, LogitsForwardAndGradient) {
  std::mt19937 rng(17);
  Tensor x = randn({3, 5}, rng, 3.f), r = randn({3, 5}, rng), y = Tensor::empty({3, 5}, DType::F32);
  auto f = [&] {
    ops::copy_(y, x);
    ops::softcap_(y, 2.f);
    return objective(y, r);
  };
  f();
  for (int64_t i = 0; i < 15; ++i) EXPECT_NEAR(y.f32()[i], 2.0 * std::tanh(x.f32()[i] / 2.0), 1e-6);
  Tensor dy = Tensor::empty({3, 5}, DType::F32);
  ops::copy_(dy, r);
  ops::softcap_bwd_(y, dy, 2.f);
  expect_close(dy, numeric_grad(x, f), kFd, "softcap dx");
  EXPECT_THROW(ops::softcap_(y, 0.f), ShapeError);
}

// Full-matrix backward in double (dS = P * (dP - rowsum(P * dP))), at a size where the kernels run their
// OpenMP paths.
TEST(OpsCpuAttention, BackwardMatchesFullMatrixReference) {
  std::mt19937 rng(400);
  const int64_t B = 2, T = 64, NH = 4, NKV = 2, D = 16, G = NH / NKV;
  Tensor q = randn({B, T, NH, D}, rng), k = randn({B, T, NKV, D}, rng), v = randn({B, T, NKV, D}, rng);
  Tensor dout = randn({B, T, NH, D}, rng);
  Tensor seg = make_segments(B, T, rng);
  ops::AttnParams p{.batch = B,
                    .seq = T,
                    .n_heads = NH,
                    .n_kv_heads = NKV,
                    .head_dim = D,
                    .scale = 0.25f,
                    .sliding_window = 20,
                    .segment_ids = &seg};
  Tensor out = Tensor::empty({B, T, NH, D}, DType::F32), lse = Tensor::empty({B, NH, T}, DType::F32);
  ops::attention_fwd(q, k, v, p, out, lse);
  Tensor dq = filled(q.shape(), kNaN), dk = filled(k.shape(), kNaN), dv = filled(v.shape(), kNaN);
  ops::attention_bwd(q, k, v, out, lse, dout, p, dq, dk, dv);

  auto Q = [&](int64_t b, int64_t t, int64_t h) { return q.f32() + ((b * T + t) * NH + h) * D; };
  auto K = [&](int64_t b, int64_t t, int64_t h) { return k.f32() + ((b * T + t) * NKV + h) * D; };
  auto V = [&](int64_t b, int64_t t, int64_t h) { return v.f32() + ((b * T + t) * NKV + h) * D; };
  auto G_ = [&](int64_t b, int64_t t, int64_t h) { return dout.f32() + ((b * T + t) * NH + h) * D; };
  auto S = [&](int64_t b, int64_t t) { return seg.data<int32_t>()[b * T + t]; };
  std::vector<double> wdq(q.numel(), 0.0), wdk(k.numel(), 0.0), wdv(v.numel(), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < NH; ++h) {
      const int64_t kh = h / G;
      std::vector<std::vector<double>> P(T, std::vector<double>(T, 0.0)), dP = P;
      for (int64_t i = 0; i < T; ++i) {
        std::vector<double> s(T, -kInf);
        double m = -kInf;
        for (int64_t j = 0; j <= i; ++j) {
          if (i - j >= p.sliding_window || S(b, i) < 0 || S(b, j) != S(b, i)) continue;
          double acc = 0;
          for (int64_t d = 0; d < D; ++d) acc += static_cast<double>(Q(b, i, h)[d]) * K(b, j, kh)[d];
          s[j] = acc * p.scale;
          m = std::max(m, s[j]);
        }
        if (m == -kInf) continue;
        double l = 0;
        for (int64_t j = 0; j < T; ++j) l += std::exp(s[j] - m);
        double rowsum = 0;
        for (int64_t j = 0; j < T; ++j) {
          P[i][j] = std::exp(s[j] - m) / l;
          double acc = 0;
          for (int64_t d = 0; d < D; ++d) acc += static_cast<double>(G_(b, i, h)[d]) * V(b, j, kh)[d];
          dP[i][j] = acc;
          rowsum += P[i][j] * dP[i][j];
        }
        for (int64_t j = 0; j < T; ++j) {
          const double dS = P[i][j] * (dP[i][j] - rowsum);
          for (int64_t d = 0; d < D; ++d) {
            wdq[((b * T + i) * NH + h) * D + d] += p.scale * dS * K(b, j, kh)[d];
            wdk[((b * T + j) * NKV + kh) * D + d] += p.scale * dS * Q(b, i, h)[d];
            wdv[((b * T + j) * NKV + kh) * D + d] += P[i][j] * G_(b, i, h)[d];
          }
        }
      }
    }
  expect_close(dq, wdq, kF32, "attn dq full-matrix");
  expect_close(dk, wdk, kF32, "attn dk full-matrix");
  expect_close(dv, wdv, kF32, "attn dv full-matrix");
}

TEST(OpsCpuAttention, PaddingSeesNothingAndGetsNoGradient) {
  std::mt19937 rng(300);
  const int64_t B = 1, T = 6, nh = 2, nkv = 1, D = 4;
  Tensor seg = ints({B, T}, {0, 0, 1, 1, -1, -1});
  Tensor q = randn({B, T, nh, D}, rng), k = randn({B, T, nkv, D}, rng), v = randn({B, T, nkv, D}, rng);
  ops::AttnParams p{.batch = B,
                    .seq = T,
                    .n_heads = nh,
                    .n_kv_heads = nkv,
                    .head_dim = D,
                    .scale = 0.5f,
                    .segment_ids = &seg};
  Tensor out = filled({B, T, nh, D}, kNaN), lse = filled({B, nh, T}, kNaN);
  ops::attention_fwd(q, k, v, p, out, lse);
  for (int64_t h = 0; h < nh; ++h)
    for (int64_t t = 4; t < T; ++t) {
      EXPECT_EQ(lse.f32()[h * T + t], -std::numeric_limits<float>::infinity());
      for (int64_t d = 0; d < D; ++d) EXPECT_EQ(out.f32()[(t * nh + h) * D + d], 0.f);
    }
  // The first token of segment 1 attends only to itself: out = v of that token.
  for (int64_t d = 0; d < D; ++d) EXPECT_NEAR(out.f32()[(2 * nh + 0) * D + d], v.f32()[2 * D + d], 1e-6);
  Tensor dout = randn({B, T, nh, D}, rng);
  Tensor dq = filled(q.shape(), kNaN), dk = filled(k.shape(), kNaN), dv = filled(v.shape(), kNaN);
  ops::attention_bwd(q, k, v, out, lse, dout, p, dq, dk, dv);
  for (int64_t t = 4; t < T; ++t)
    for (int64_t d = 0; d < D; ++d) {
      EXPECT_EQ(dk.f32()[t * D + d], 0.f);
      EXPECT_EQ(dv.f32()[t * D + d], 0.f);
      for (int64_t h = 0; h < nh; ++h) EXPECT_EQ(dq.f32()[(t * nh + h) * D + d], 0.f);
    }
  for (int64_t i = 0; i < dq.numel(); ++i) ASSERT_TRUE(std::isfinite(dq.f32()[i]));
}

TEST(OpsCpuAttention, ShapeErrors) {
  const int64_t B = 1, T = 5, D = 4;  // T != n_heads, so a transposed layout is detectable
  Tensor q = Tensor::zeros({B, T, 4, D}, DType::F32), k = Tensor::zeros({B, T, 2, D}, DType::F32);
  Tensor out = Tensor::empty({B, T, 4, D}, DType::F32), lse = Tensor::empty({B, 4, T}, DType::F32);
  ops::AttnParams p{.batch = B, .seq = T, .n_heads = 4, .n_kv_heads = 2, .head_dim = D, .scale = 0.5f};
  EXPECT_NO_THROW(ops::attention_fwd(q, k, k, p, out, lse));
  ops::AttnParams bad = p;
  bad.n_kv_heads = 3;
  EXPECT_THROW(ops::attention_fwd(q, k, k, bad, out, lse), ShapeError);
  bad = p;
  bad.seq = T + 1;
  EXPECT_THROW(ops::attention_fwd(q, k, k, bad, out, lse), ShapeError);
  bad = p;
  bad.sliding_window = -1;
  EXPECT_THROW(ops::attention_fwd(q, k, k, bad, out, lse), ShapeError);
  Tensor lse_bad = Tensor::empty({B, T, 4}, DType::F32);  // [B, T, nh] instead of [B, nh, T]
  EXPECT_THROW(ops::attention_fwd(q, k, k, p, out, lse_bad), ShapeError);
  Tensor q_bhtd = Tensor::zeros({B, 4, T, D}, DType::F32);  // transposed layout
  EXPECT_THROW(ops::attention_fwd(q_bhtd, k, k, p, out, lse), ShapeError);
  Tensor seg_bad = Tensor::zeros({B, T + 1}, DType::I32), seg_f = Tensor::zeros({B, T}, DType::F32);
  bad = p;
  bad.segment_ids = &seg_bad;
  EXPECT_THROW(ops::attention_fwd(q, k, k, bad, out, lse), ShapeError);
  bad.segment_ids = &seg_f;
  EXPECT_THROW(ops::attention_fwd(q, k, k, bad, out, lse), ShapeError);
  Tensor dk_bad = Tensor::empty({B, T, 4, D}, DType::F32);
  Tensor dq = Tensor::empty({B, T, 4, D}, DType::F32), dv = Tensor::empty({B, T, 2, D}, DType::F32);
  EXPECT_THROW(ops::attention_bwd(q, k, k, out, lse, out, p, dq, dk_bad, dv), ShapeError);
}

// ============================== cross-entropy ==============================

namespace {
double ce_ref(const Tensor& logits, const Tensor& targets, double scale, std::vector<double>& grad) {
  const int64_t V = logits.dim(-1), N = logits.numel() / V;
  grad.assign(static_cast<size_t>(N * V), 0.0);
  double loss = 0;
  for (int64_t i = 0; i < N; ++i) {
    const int32_t t = targets.data<int32_t>()[i];
    if (t == -100) continue;
    const float* x = logits.f32() + i * V;
    double m = -kInf;
    for (int64_t j = 0; j < V; ++j) m = std::max(m, static_cast<double>(x[j]));
    double l = 0;
    for (int64_t j = 0; j < V; ++j) l += std::exp(x[j] - m);
    const double lse = m + std::log(l);
    loss += lse - x[t];
    for (int64_t j = 0; j < V; ++j) grad[i * V + j] = scale * (std::exp(x[j] - lse) - (j == t));
  }
  return loss;
}

Tensor targets_with_ignores(int64_t N, int64_t V, std::mt19937& rng) {
  Tensor t = randint({N}, 0, static_cast<int32_t>(V), rng);
  for (int64_t i = 0; i < N; ++i)
    if (rand_in(rng, 0, 3) == 0) t.data<int32_t>()[i] = -100;
  return t;
}
}  // namespace

TEST(OpsCpuCrossEntropy, MatchesNaiveSumWithIgnoreIndex) {
  for (uint32_t seed : {1u, 2u, 3u, 4u}) {
    std::mt19937 rng(seed);
    const int64_t N = rand_in(rng, 1, 30), V = rand_in(rng, 2, 500);
    Tensor logits = randn({N, V}, rng, 3.f);
    Tensor targets = targets_with_ignores(N, V, rng);
    const float gs = 1.f / 7.f;
    std::vector<double> wgrad;
    const double want = ce_ref(logits, targets, gs, wgrad);
    Tensor dl = filled({N, V}, kNaN);
    const double got = ops::cross_entropy_fwd_bwd(logits, targets, gs, &dl);
    EXPECT_NEAR(got, want, 1e-9 * std::max(1.0, std::abs(want))) << "seed " << seed;
    expect_close(dl, wgrad, kF32, "ce dlogits seed " + std::to_string(seed));
    EXPECT_DOUBLE_EQ(ops::cross_entropy_fwd_bwd(logits, targets, gs, nullptr), got);
  }
}

TEST(OpsCpuCrossEntropy, GradientFiniteDifference) {
  std::mt19937 rng(5);
  const int64_t N = 4, V = 7;
  Tensor logits = randn({N, V}, rng, 2.f);
  Tensor targets = ints({N}, {3, -100, 0, 6});
  const float gs = 0.5f;
  auto f = [&] { return gs * ops::cross_entropy_fwd_bwd(logits, targets, gs, nullptr); };
  Tensor dl = Tensor::empty({N, V}, DType::F32);
  ops::cross_entropy_fwd_bwd(logits, targets, gs, &dl);
  expect_close(dl, numeric_grad(logits, f), kFd, "ce FD");
  for (int64_t j = 0; j < V; ++j) EXPECT_EQ(dl.f32()[1 * V + j], 0.f);  // ignored row
}

TEST(OpsCpuCrossEntropy, StableForHugeLogitsAndInPlace) {
  std::mt19937 rng(6);
  const int64_t N = 5, V = 100;
  Tensor base = randn({N, V}, rng);
  Tensor shifted = base.clone();
  for (int64_t i = 0; i < shifted.numel(); ++i) shifted.f32()[i] += 3e4f;  // exp would overflow naively
  Tensor targets = randint({N}, 0, V, rng);
  Tensor g1 = Tensor::empty({N, V}, DType::F32);
  const double l1 = ops::cross_entropy_fwd_bwd(base, targets, 1.f, &g1);
  // In place: dlogits aliases logits.
  const double l2 = ops::cross_entropy_fwd_bwd(shifted, targets, 1.f, &shifted);
  ASSERT_TRUE(std::isfinite(l2));
  // Adding 3e4 in fp32 rounds the logits to multiples of 2^-9, so the comparison is loose.
  EXPECT_NEAR(l1, l2, 1e-2 * N);
  expect_close(shifted, values(g1), {1e-2, 1e-2}, "ce in place, shifted");
}

TEST(OpsCpuCrossEntropy, AllIgnoredAndLeadingDims) {
  Tensor logits = Tensor::zeros({2, 3, 4}, DType::F32);  // [B, T, V]
  Tensor targets = ints({2, 3}, {-100, -100, -100, -100, -100, -100});
  Tensor dl = filled({2, 3, 4}, kNaN);
  EXPECT_EQ(ops::cross_entropy_fwd_bwd(logits, targets, 1.f, &dl), 0.0);
  EXPECT_EQ(ops::sum_squares(dl), 0.0);
  Tensor t2 = ints({2, 3}, {0, 1, 2, 3, 0, 1});
  EXPECT_NEAR(ops::cross_entropy_fwd_bwd(logits, t2, 1.f, nullptr), 6 * std::log(4.0), 1e-6);
}

TEST(OpsCpuCrossEntropy, BadTargetThrowsDataError) {
  Tensor logits = Tensor::zeros({3, 5}, DType::F32);
  for (int32_t bad : {5, -1, -101}) {
    Tensor targets = ints({3}, {1, bad, -100});
    Tensor dl = filled({3, 5}, 7.f);
    try {
      ops::cross_entropy_fwd_bwd(logits, targets, 1.f, &dl);
      ADD_FAILURE() << "no DataError for target " << bad;
    } catch (const DataError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(std::to_string(bad)), std::string::npos) << msg;
      EXPECT_NE(msg.find("position 1"), std::string::npos) << msg;
    }
    EXPECT_EQ(dl.f32()[0], 7.f);  // nothing written
  }
  Tensor t_bad = ints({2}, {0, 1});
  EXPECT_THROW(ops::cross_entropy_fwd_bwd(logits, t_bad, 1.f, nullptr), ShapeError);
  Tensor dl_bad = Tensor::empty({3, 4}, DType::F32);
  EXPECT_THROW(ops::cross_entropy_fwd_bwd(logits, ints({3}, {0, 1, 2}), 1.f, &dl_bad), ShapeError);
}

// ============================== dispatch ==============================

TEST(OpsCpuDispatch, DeviceErrors) {
  Tensor a = Tensor::zeros({4}, DType::F32);
  Tensor c = fake_cuda({4}, DType::F32);
  // Mixing devices is always an error, with or without a CUDA backend.
  EXPECT_THROW(ops::add_(a, c), DeviceError);
  Tensor x = Tensor::zeros({2, 4}, DType::F32), w = fake_cuda({3, 4}, DType::F32);
  Tensor y = Tensor::empty({2, 3}, DType::F32);
  EXPECT_THROW(ops::linear_fwd(x, w, nullptr, y), DeviceError);
#ifndef AM_WITH_CUDA
  // All-CUDA arguments reach the dispatch point, which has no CUDA backend in this build.
  try {
    ops::scale_(c, 2.f);
    ADD_FAILURE() << "no DeviceError";
  } catch (const DeviceError& e) {
    EXPECT_NE(std::string(e.what()).find("scale_"), std::string::npos) << e.what();
  }
  Tensor ids = fake_cuda({3}, DType::I32), wc = fake_cuda({10, 4}, DType::F32),
         out = fake_cuda({3, 4}, DType::F32);
  EXPECT_THROW(ops::embedding_fwd(ids, wc, out), DeviceError);  // ids are never read on the host
#endif
}
