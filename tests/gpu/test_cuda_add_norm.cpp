// The fused residual add + RMSNorm on CUDA (backend/cuda/add_rmsnorm.cu; ops.h add_rmsnorm_fwd / _bwd):
//   - BIT-identical to the separate kernels it replaces on the device (copy_ + add_ + rmsnorm_fwd; rmsnorm_bwd +
//     add_), for every dtype combination the decoder uses (W1: fp32 residual, bf16 block output / norm output /
//     gradient, fp32 norm weight; a bf16 stream; Gemma's fp32 (1 + w) with bf16 activations) and fp32 throughout,
//     over the H set of the RMSNorm tests (one-block rows, 8216 / 16384 near the looped limit, 73536 / 70001 on the
//     looped path, where the fused op runs the separate kernels), in place and out of place, with misaligned views
//     (scalar shapes, or the separate kernels when only x / delta / dres is misaligned), frozen weights;
//   - within the tolerance table of the CPU reference (the same values in fp32);
//   - the am::ops front-ends route CUDA tensors here;
//   - a few training steps with AM_FUSED_ADD_NORM on and off agree (not to the bit: embedding_bwd's fp32 atomics and
//     the loss's fp64 atomics are order-dependent run to run, docs/cuda_kernels.md).
// Runs only where a CUDA device is visible.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "backend/cuda/cuda_ops.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/tensor.h"
#include "gpu_test_util.h"
#include "models/blocks/norm.h"
#include "ops/ops.h"

namespace {

using am::DType;
using am::Shape;
using am::Tensor;
using am::gpu_test::down;
using am::gpu_test::expect_close;
using am::gpu_test::expect_close_dt;
using am::gpu_test::poisoned;
using am::gpu_test::rand_host;
using am::gpu_test::up;
namespace cu = am::cuda;

int64_t rint(std::mt19937& rng, int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }

// The RMSNorm tests' H set: fast path (2048, odd, tiny), near the register limits, and the looped path.
const int64_t kHs[] = {2048, 37, 64, 4104, 1, 8192 + 24, 16384, 73536, 70001};
int64_t rows_for(std::mt19937& rng, int64_t h) {
  return h > 20000 ? rint(rng, 1, 40) : h > 8192 ? rint(rng, 300, 1300) : rint(rng, 1, 700);
}

// A device copy of host `t` in dtype dt, optionally one element off 16-byte alignment (a view into a larger buffer).
Tensor placed(const Tensor& host, DType dt, bool misalign) {
  const int64_t n = host.numel();
  Tensor buf = cu::empty({n + 1, 1}, dt);
  Tensor v = buf.slice_rows(misalign ? 1 : 0, misalign ? n + 1 : n).view(host.shape());
  cu::copy_(v, up(host, dt).view(host.shape()));
  return v;
}
Tensor placed_empty(const Shape& s, DType dt, bool misalign) {
  const int64_t n = am::shape_numel(s);
  Tensor buf = cu::empty({n + 1, 1}, dt);
  cu::fill_(buf, am::gpu_test::kNaN);
  return buf.slice_rows(misalign ? 1 : 0, misalign ? n + 1 : n).view(s);
}

void expect_same_bits(const Tensor& got_dev, const Tensor& want_dev, const std::string& what) {
  const Tensor g = cu::to_host(got_dev), w = cu::to_host(want_dev);
  ASSERT_EQ(g.nbytes(), w.nbytes()) << what;
  if (g.nbytes() == 0 || std::memcmp(g.raw(), w.raw(), g.nbytes()) == 0) return;
  const size_t es = am::dtype_size(g.dtype());
  for (int64_t i = 0; i < g.numel(); ++i)
    if (std::memcmp(static_cast<const char*>(g.raw()) + i * es, static_cast<const char*>(w.raw()) + i * es, es) != 0) {
      const Tensor gf = g.to(DType::F32), wf = w.to(DType::F32);
      ADD_FAILURE() << what << ": not bit-identical, first difference at element " << i << ": " << gf.f32()[i]
                    << " vs " << wf.f32()[i];
      return;
    }
}

std::string dn(DType d) { return am::dtype_name(d); }

struct FwdCase {
  DType t, ta, tw, ty;  // residual stream x / x_out, block output delta, norm weight, norm output
};
const FwdCase kFwdCases[] = {
    {DType::F32, DType::BF16, DType::F32, DType::BF16},    // W1
    {DType::F32, DType::F32, DType::F32, DType::F32},      // fp32 compute
    {DType::F32, DType::BF16, DType::BF16, DType::BF16},   // frozen embedding / bf16 norm weight
    {DType::F32, DType::F32, DType::F32, DType::BF16},     //
    {DType::F32, DType::BF16, DType::F32, DType::F32},     //
    {DType::BF16, DType::BF16, DType::BF16, DType::BF16},  // bf16 stream
    {DType::BF16, DType::BF16, DType::F32, DType::BF16},   // bf16 stream, Gemma's fp32 (1 + w)
};

enum class Layout { Apart, InPlace, MisalignedX, MisalignedDelta, MisalignedAll };
const char* lname(Layout l) {
  switch (l) {
    case Layout::Apart: return "apart";
    case Layout::InPlace: return "in place";
    case Layout::MisalignedX: return "x misaligned";
    case Layout::MisalignedDelta: return "delta misaligned";
    default: return "x, delta, x_out, y misaligned";
  }
}

}  // namespace

TEST(CudaAddRmsNorm, ForwardBitIdenticalToSeparateKernels) {
  AM_REQUIRE_DEVICE();
  std::mt19937 rng(21);
  const float eps = 1e-5f;
  for (const FwdCase& c : kFwdCases) {
    for (int64_t h : kHs) {
      for (Layout lay : {Layout::Apart, Layout::InPlace, Layout::MisalignedX, Layout::MisalignedDelta,
                         Layout::MisalignedAll}) {
        if (lay != Layout::Apart && h > 20000) continue;
        const int64_t n = rows_for(rng, h);
        const std::string what = "x " + dn(c.t) + " delta " + dn(c.ta) + " w " + dn(c.tw) + " y " + dn(c.ty) +
                                 " N=" + std::to_string(n) + " H=" + std::to_string(h) + " " + lname(lay);
        const Tensor x = rand_host({n, h}, rng, c.t, -2.f, 2.f), d = rand_host({n, h}, rng, c.ta, -0.5f, 0.5f);
        const Tensor w = rand_host({h}, rng, c.tw, 0.5f, 1.5f);
        const bool mis_all = lay == Layout::MisalignedAll;
        const Tensor dx_in = placed(x, c.t, lay == Layout::MisalignedX || mis_all);
        const Tensor dd = placed(d, c.ta, lay == Layout::MisalignedDelta || mis_all);
        const Tensor dw = up(w, c.tw);
        // The separate kernels (x_out and y laid out as the fused call's).
        Tensor ref_x = placed_empty({n, h}, c.t, mis_all), ref_y = placed_empty({n, h}, c.ty, mis_all);
        Tensor ref_r = poisoned({n}, DType::F32);
        cu::copy_(ref_x, dx_in);
        cu::add_(ref_x, dd);
        cu::rmsnorm_fwd(ref_x, dw, eps, ref_y, ref_r);
        // Fused.
        Tensor xin = placed(x, c.t, lay == Layout::MisalignedX || mis_all);
        Tensor xo = lay == Layout::InPlace ? xin : placed_empty({n, h}, c.t, mis_all);
        Tensor y = placed_empty({n, h}, c.ty, mis_all), r = poisoned({n}, DType::F32);
        cu::add_rmsnorm_fwd(xin, dd, dw, eps, xo, y, r);
        expect_same_bits(xo, ref_x, "x_out " + what);
        expect_same_bits(y, ref_y, "y " + what);
        expect_same_bits(r, ref_r, "rstd " + what);
        if (lay != Layout::InPlace) expect_same_bits(xin, dx_in, "x untouched " + what);
        // The CPU reference on the same values (fp32 sum; a bf16 stream rounds it, hence the bf16 tolerance there).
        Tensor want_x = Tensor::empty({n, h}, DType::F32), want_y = Tensor::empty({n, h}, DType::F32),
               want_r = Tensor::empty({n}, DType::F32);
        am::ops::add_rmsnorm_fwd(x, d, w, eps, want_x, want_y, want_r);
        expect_close_dt(xo, want_x, c.t, "x_out vs CPU " + what);
        expect_close_dt(y, want_y, c.t == DType::BF16 ? DType::BF16 : c.ty, "y vs CPU " + what);
        expect_close(r, want_r, am::test::tolerance(c.t), c.t == DType::F32 ? 1e-5 : 1e-2, "rstd vs CPU " + what);
        if (::testing::Test::HasFailure()) return;
      }
    }
  }
}

struct BwdCase {
  DType t, tw, tg;  // x / dres / dx, norm weight, dy (the norm output's gradient)
};
const BwdCase kBwdCases[] = {
    {DType::F32, DType::F32, DType::BF16},    // W1
    {DType::F32, DType::F32, DType::F32},     // fp32 compute
    {DType::F32, DType::BF16, DType::BF16},   //
    {DType::BF16, DType::BF16, DType::BF16},  // bf16 stream
    {DType::BF16, DType::F32, DType::BF16},   // bf16 stream, Gemma's fp32 (1 + w)
};

TEST(CudaAddRmsNorm, BackwardBitIdenticalToSeparateKernels) {
  AM_REQUIRE_DEVICE();
  std::mt19937 rng(22);
  for (const BwdCase& c : kBwdCases) {
    for (int64_t h : kHs) {
      for (int variant = 0; variant < 3; ++variant) {  // 0: dw; 1: frozen weight; 2: dres misaligned
        if (variant == 2 && h > 20000) continue;
        const bool frozen = variant == 1, mis = variant == 2;
        const int64_t n = rows_for(rng, h);
        const std::string what = "x " + dn(c.t) + " w " + dn(c.tw) + " dy " + dn(c.tg) + " N=" + std::to_string(n) +
                                 " H=" + std::to_string(h) + (frozen ? " frozen w" : "") +
                                 (mis ? " dres misaligned" : "");
        const Tensor x = rand_host({n, h}, rng, c.t, -2.f, 2.f), w = rand_host({h}, rng, c.tw, 0.5f, 1.5f);
        const Tensor dy = rand_host({n, h}, rng, c.tg), dres = rand_host({n, h}, rng, c.t, -2.f, 2.f);
        const Tensor gw0 = rand_host({h}, rng);
        const Tensor dx_ = up(x, c.t), dw_ = up(w, c.tw), ddy = up(dy, c.tg), dres_ = placed(dres, c.t, mis);
        Tensor r = poisoned({n}, DType::F32), y = cu::empty({n, h}, c.t == DType::F32 ? c.tg : c.t);
        cu::rmsnorm_fwd(dx_, dw_, 1e-5f, y, r);
        // Separate kernels.
        Tensor ref_dx = poisoned({n, h}, c.t), ref_dw = frozen ? Tensor() : up(gw0, DType::F32);
        cu::rmsnorm_bwd(dx_, dw_, r, ddy, ref_dx, ref_dw);
        cu::add_(ref_dx, dres_);
        // Fused.
        Tensor gx = poisoned({n, h}, c.t), gw = frozen ? Tensor() : up(gw0, DType::F32);
        cu::add_rmsnorm_bwd(dx_, dw_, r, ddy, dres_, gx, gw);
        expect_same_bits(gx, ref_dx, "dx " + what);
        if (!frozen) expect_same_bits(gw, ref_dw, "dw " + what);
        // CPU reference (H = 1: pure cancellation, see CudaOps.RmsNormMixedDtypes; dw still checked).
        Tensor want_y = Tensor::empty({n, h}, DType::F32), want_r = Tensor::empty({n}, DType::F32);
        am::ops::rmsnorm_fwd(x, w, 1e-5f, want_y, want_r);
        Tensor want_dx = Tensor::empty({n, h}, DType::F32), want_dw = frozen ? Tensor() : gw0.clone();
        am::ops::add_rmsnorm_bwd(x, w, want_r, dy, dres, want_dx, want_dw);
        if (h > 1) expect_close_dt(gx, want_dx, c.t, "dx vs CPU " + what);
        if (!frozen) expect_close(gw, want_dw, am::test::tolerance(DType::F32), 1e-5, "dw vs CPU " + what);
        if (::testing::Test::HasFailure()) return;
      }
    }
  }
}

TEST(CudaAddRmsNorm, OpsFrontEndsRouteAndCheck) {
  AM_REQUIRE_DEVICE();
  std::mt19937 rng(23);
  const int64_t n = 40, h = 2048;
  const Tensor x = up(rand_host({n, h}, rng, DType::F32, -2.f, 2.f), DType::F32);
  const Tensor d = up(rand_host({n, h}, rng, DType::BF16), DType::BF16), w = up(rand_host({h}, rng), DType::F32);
  Tensor xo = cu::empty({n, h}, DType::F32), y = cu::empty({n, h}, DType::BF16), r = cu::empty({n}, DType::F32);
  Tensor xo2 = cu::empty({n, h}, DType::F32), y2 = cu::empty({n, h}, DType::BF16), r2 = cu::empty({n}, DType::F32);
  am::ops::add_rmsnorm_fwd(x, d, w, 1e-5f, xo, y, r);
  cu::add_rmsnorm_fwd(x, d, w, 1e-5f, xo2, y2, r2);
  expect_same_bits(xo, xo2, "ops x_out");
  expect_same_bits(y, y2, "ops y");
  expect_same_bits(r, r2, "ops rstd");
  const Tensor dy = up(rand_host({n, h}, rng, DType::BF16), DType::BF16), dres = up(rand_host({n, h}, rng), DType::F32);
  Tensor dx = cu::empty({n, h}, DType::F32), dx2 = cu::empty({n, h}, DType::F32);
  Tensor dw = cu::empty({h}, DType::F32), dw2 = cu::empty({h}, DType::F32);
  cu::zero_(dw);
  cu::zero_(dw2);
  am::ops::add_rmsnorm_bwd(xo, w, r, dy, dres, dx, dw);
  cu::add_rmsnorm_bwd(xo, w, r, dy, dres, dx2, dw2);
  expect_same_bits(dx, dx2, "ops dx");
  expect_same_bits(dw, dw2, "ops dw");
  // Refused: a bf16 stream with an fp32 delta, an fp16 stream, dres of another dtype, dx over dres.
  Tensor x16 = cu::empty({n, h}, DType::BF16), xo16 = cu::empty({n, h}, DType::BF16);
  Tensor y16 = cu::empty({n, h}, DType::BF16);
  Tensor d32 = cu::empty({n, h}, DType::F32);
  EXPECT_THROW(cu::add_rmsnorm_fwd(x16, d32, w, 1e-5f, xo16, y16, r), am::ShapeError);
  Tensor xh = cu::empty({n, h}, DType::F16);
  EXPECT_THROW(cu::add_rmsnorm_fwd(xh, d, w, 1e-5f, xh, y16, r), am::ShapeError);
  Tensor dres16 = cu::empty({n, h}, DType::BF16);
  EXPECT_THROW(cu::add_rmsnorm_bwd(xo, w, r, dy, dres16, dx, dw), am::ShapeError);
  EXPECT_THROW(am::ops::add_rmsnorm_bwd(xo, w, r, dy, dres, const_cast<Tensor&>(dres), dw), am::ShapeError);
}

// The decoder with the switch on and off on CUDA: the fp32 residual stream (fused forward and backward at every
// site), and a bf16 stream (the forward keeps its GEMM folds; Gemma's sandwich norms and MoE take the fused path).
TEST(CudaAddRmsNorm, TrainingOnAndOffAgree) {
  AM_REQUIRE_DEVICE();
  namespace fs = std::filesystem;
  const fs::path golden = fs::path(AM_SOURCE_DIR) / "tests/fixtures/golden";
  struct Case {
    const char* fixture;
    std::vector<std::string> extra;
  };
  const Case cases[] = {{"llama", {}},
                        {"qwen3_moe", {}},
                        {"gemma3_text", {"model.backend.residual_dtype=bfloat16"}},
                        {"llama", {"model.backend.residual_dtype=bfloat16"}}};
  const bool saved = am::fused_add_norm_enabled();
  for (const Case& c : cases) {
    const std::string tag = std::string(c.fixture) + (c.extra.empty() ? "" : " " + c.extra[0]);
    am::set_fused_add_norm(false);
    const auto plain = am::gpu_test::train_fixture(golden / c.fixture, "cuda", c.extra);
    am::set_fused_add_norm(true);
    const int64_t before = am::fused_add_norm_count();
    const auto fused = am::gpu_test::train_fixture(golden / c.fixture, "cuda", c.extra);
    EXPECT_GT(am::fused_add_norm_count(), before) << tag;
    ASSERT_EQ(fused.size(), plain.size()) << tag;
    for (size_t i = 0; i < plain.size(); ++i) {
      std::printf("[%s] step %zu loss %.9g / %.9g grad_norm %.9g / %.9g (plain / fused)\n", tag.c_str(), i + 1,
                  plain[i].loss, fused[i].loss, plain[i].grad_norm, fused[i].grad_norm);
      EXPECT_NEAR(fused[i].loss, plain[i].loss, 1e-5 * plain[i].loss) << tag << " step " << i + 1;
      EXPECT_NEAR(fused[i].grad_norm, plain[i].grad_norm, 1e-4 * plain[i].grad_norm) << tag << " step " << i + 1;
    }
  }
  am::set_fused_add_norm(saved);
}
