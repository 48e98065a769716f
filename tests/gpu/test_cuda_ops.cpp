// CUDA backend ops (am::cuda, src/backend/cuda/cuda_ops.h) against the CPU reference ops (am::ops on host
// fp32 tensors holding the same, already bf16-rounded, inputs).
//
// Every op x {fp32, bf16} where it applies, random shapes including sizes that are not multiples of any
// vector width or GEMM tile, misaligned views (scalar fallbacks), several seeds. Outputs are poisoned with
// NaN before each call so unwritten elements fail; parameter gradients start from random values to check
// the += contract. Comparison: the shared tolerance table (tests/common/tolerance.h) element by element,
// with the absolute part scaled by the reference's RMS, plus ||got - ref|| / ||ref||. AdamW is compared
// bit for bit with am::Optimizer. Runs only where a CUDA device is visible (GTEST_SKIP otherwise).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "../common/tolerance.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/tuning.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/tensor.h"
#include "models/params.h"
#include "ops/device.h"
#include "ops/ops.h"
#include "train/optimizer.h"

namespace {

using am::DType;
using am::Shape;
using am::Tensor;
namespace cu = am::cuda;

bool have_device() {
  int n = 0;
  const bool ok = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
  cudaGetLastError();
  return ok;
}

#define REQUIRE_DEVICE() \
  if (!have_device()) GTEST_SKIP() << "no CUDA device visible"

const float kNaN = std::numeric_limits<float>::quiet_NaN();

// Host fp32 tensor of uniform values in [lo, hi), rounded to `dt` (so the CPU reference sees exactly the
// values the device sees).
Tensor rand_host(const Shape& s, std::mt19937& rng, DType dt = DType::F32, float lo = -1.f, float hi = 1.f) {
  Tensor t = Tensor::empty(s, DType::F32);
  std::uniform_real_distribution<float> u(lo, hi);
  float* p = t.f32();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = u(rng);
  if (dt != DType::F32) t = t.to(dt).to(DType::F32);
  return t;
}

// Device copy of a host fp32 tensor in dtype dt.
Tensor up(const Tensor& host_f32, DType dt) {
  return cu::to_device(dt == DType::F32 ? host_f32 : host_f32.to(dt));
}
// Host fp32 copy of a device tensor.
Tensor down(const Tensor& dev) {
  Tensor h = cu::to_host(dev);
  return h.dtype() == DType::F32 ? h : h.to(DType::F32);
}
Tensor dev_poisoned(const Shape& s, DType dt) {
  Tensor t = cu::empty(s, dt);
  cu::fill_(t, kNaN);
  return t;
}

struct Err {
  double rel_l2 = 0, max_abs = 0;
  int64_t bad = 0, nonfinite = 0, first_bad = -1;
};

// Element i passes when |got - want| <= atol * max(1, rms(want)) + rtol * |want|.
Err compare(const Tensor& got, const Tensor& want, am::test::Tolerance tol) {
  Err e;
  const float* g = got.f32();
  const float* w = want.f32();
  const int64_t n = want.numel();
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) den += double(w[i]) * w[i];
  const double rms = n ? std::sqrt(den / n) : 0.0;
  const double atol = tol.atol * std::max(1.0, rms);
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(g[i])) {
      ++e.nonfinite;
      if (e.first_bad < 0) e.first_bad = i;
      continue;
    }
    const double d = std::abs(double(g[i]) - w[i]);
    num += d * d;
    e.max_abs = std::max(e.max_abs, d);
    if (d > atol + tol.rtol * std::abs(double(w[i]))) {
      ++e.bad;
      if (e.first_bad < 0) e.first_bad = i;
    }
  }
  e.rel_l2 = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return e;
}

void expect_close(const Tensor& got_dev_or_host, const Tensor& want, DType dt, const std::string& what,
                  double rel_l2_budget = -1) {
  Tensor got = got_dev_or_host.device() == am::DeviceType::CUDA ? down(got_dev_or_host) : got_dev_or_host;
  ASSERT_EQ(got.numel(), want.numel()) << what;
  const auto tol = am::test::tolerance(dt);
  const Err e = compare(got, want, tol);
  if (rel_l2_budget < 0) rel_l2_budget = dt == DType::F32 ? 1e-5 : 1e-2;
  EXPECT_EQ(e.nonfinite, 0) << what << ": non-finite (unwritten?) element at " << e.first_bad;
  EXPECT_EQ(e.bad, 0) << what << ": " << e.bad << " of " << want.numel() << " outside tolerance, first at "
                      << e.first_bad << " (got " << (e.first_bad >= 0 ? got.f32()[e.first_bad] : 0.f) << ", want "
                      << (e.first_bad >= 0 ? want.f32()[e.first_bad] : 0.f) << "), max abs err " << e.max_abs;
  EXPECT_LE(e.rel_l2, rel_l2_budget) << what << ": relative L2 error";
}

const DType kFloatTypes[] = {DType::F32, DType::BF16};
const char* dname(DType d) { return am::dtype_name(d); }

int64_t rint(std::mt19937& rng, int64_t lo, int64_t hi) {  // [lo, hi]
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

// ---------------------------------------------------------------------------------------------------------
TEST(CudaAllocator, ReusesBlocksAndCounts) {
  REQUIRE_DEVICE();
  cu::CachingAllocator a(0);
  EXPECT_EQ(cu::CachingAllocator::round_size(1), 512u);
  EXPECT_EQ(cu::CachingAllocator::round_size(513), 1024u);
  EXPECT_EQ(cu::CachingAllocator::round_size((1 << 20) + 1), size_t(2) << 20);
  EXPECT_EQ(cu::CachingAllocator::round_size(size_t(5) << 20), size_t(6) << 20);
  EXPECT_EQ(a.allocate(0), nullptr);
  void* p = a.allocate(1000);
  EXPECT_EQ(a.current_bytes(), 1024u);
  a.deallocate(p, 1000);
  EXPECT_EQ(a.current_bytes(), 0u);
  EXPECT_EQ(a.cached_bytes(), 1024u);
  void* q = a.allocate(700);  // same size class: served from the cache
  EXPECT_EQ(q, p);
  EXPECT_EQ(a.stats().cache_hits, 1u);
  void* big = a.allocate(size_t(3) << 20);
  EXPECT_EQ(a.current_bytes(), 1024u + (size_t(4) << 20));
  EXPECT_EQ(a.peak_bytes(), 1024u + (size_t(4) << 20));
  EXPECT_EQ(a.reserved_bytes(), 1024u + (size_t(4) << 20));
  a.deallocate(big, size_t(3) << 20);
  a.deallocate(q, 700);
  EXPECT_EQ(a.current_bytes(), 0u);
  EXPECT_EQ(a.reserved_bytes(), 1024u + (size_t(4) << 20));
  a.empty_cache();
  EXPECT_EQ(a.reserved_bytes(), 0u);
  EXPECT_EQ(a.peak_reserved_bytes(), 1024u + (size_t(4) << 20));
  // Out of memory: a readable DeviceError with the numbers.
  try {
    a.allocate(size_t(1) << 50);
    FAIL() << "expected DeviceError";
  } catch (const am::DeviceError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("out of memory"), std::string::npos) << m;
    EXPECT_NE(m.find("requested"), std::string::npos) << m;
    EXPECT_NE(m.find("reserved"), std::string::npos) << m;
  }
  // Tensors through the allocator.
  Tensor t = Tensor::empty({1000, 3}, DType::F32, a);
  EXPECT_EQ(t.device(), am::DeviceType::CUDA);
  EXPECT_EQ(a.current_bytes(), 12288u);
}

TEST(CudaContext, ErrorsCarryCallSite) {
  REQUIRE_DEVICE();
  try {
    AM_CUDA_CHECK(cudaMemcpy(nullptr, reinterpret_cast<void*>(16), 64, cudaMemcpyDeviceToDevice));
    FAIL() << "expected DeviceError";
  } catch (const am::DeviceError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("cudaMemcpy"), std::string::npos) << m;
    EXPECT_NE(m.find("test_cuda_ops.cpp"), std::string::npos) << m;
    EXPECT_NE(m.find("device"), std::string::npos) << m;
  }
}

TEST(CudaTensor, RoundTripZeroFill) {
  REQUIRE_DEVICE();
  std::mt19937 rng(1);
  for (DType dt : {DType::F32, DType::BF16, DType::F16, DType::I32}) {
    Tensor h = Tensor::empty({37, 5}, dt);
    for (size_t i = 0; i < h.nbytes(); ++i) static_cast<uint8_t*>(h.raw())[i] = static_cast<uint8_t>(rng() & 0x3f);
    Tensor d = cu::to_device(h);
    Tensor back = cu::to_host(d);
    EXPECT_EQ(std::memcmp(h.raw(), back.raw(), h.nbytes()), 0) << dname(dt);
    cu::zero_(d);
    back = cu::to_host(d);
    for (size_t i = 0; i < h.nbytes(); ++i) ASSERT_EQ(static_cast<uint8_t*>(back.raw())[i], 0);
  }
  for (DType dt : kFloatTypes) {
    for (int64_t n : {1, 7, 8, 1001, 70000}) {
      Tensor d = cu::empty({n}, dt);
      cu::fill_(d, 1.5f);
      Tensor h = down(d);
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(h.f32()[i], 1.5f) << dname(dt) << " n=" << n << " i=" << i;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
TEST(CudaOps, AddScaleCopy) {
  REQUIRE_DEVICE();
  for (int seed = 1; seed <= 3; ++seed) {
    std::mt19937 rng(seed);
    for (DType ta : kFloatTypes) {
      for (DType tb : kFloatTypes) {
        for (bool misalign : {false, true}) {
          const int64_t n = rint(rng, 1, 50000);
          // Misaligned: a view starting one element in (row slice of a [n + 1, 1] tensor).
          Tensor ha = rand_host({n}, rng, ta), hb = rand_host({n}, rng, tb);
          Tensor da_full = cu::empty({n + 1, 1}, ta), db_full = cu::empty({n + 1, 1}, tb);
          Tensor da = da_full.slice_rows(misalign ? 1 : 0, misalign ? n + 1 : n).view({n});
          Tensor db = db_full.slice_rows(misalign ? 1 : 0, misalign ? n + 1 : n).view({n});
          cu::copy_(da, up(ha, ta));
          cu::copy_(db, up(hb, tb));
          const std::string what = std::string(dname(ta)) + " += " + dname(tb) + " n=" + std::to_string(n) +
                                   (misalign ? " misaligned" : "");
          // add_
          Tensor want = ha.clone();
          am::ops::add_(want, hb);
          if (ta != DType::F32) want = want.to(ta).to(DType::F32);
          cu::add_(da, db);
          expect_close(da, want, ta, "add_ " + what);
          // scale_
          am::ops::scale_(want, -0.75f);
          if (ta != DType::F32) want = want.to(ta).to(DType::F32);
          cu::scale_(da, -0.75f);
          expect_close(da, want, ta, "scale_ " + what);
          // copy_ with conversion ta -> tb: bit-exact rounding (round to nearest even).
          cu::copy_(db, da);
          Tensor want_c = down(da);
          if (tb != DType::F32) want_c = want_c.to(tb).to(DType::F32);
          Tensor got_c = down(db);
          EXPECT_EQ(std::memcmp(got_c.raw(), want_c.raw(), want_c.nbytes()), 0) << "copy_ " << what;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
TEST(CudaOps, Embedding) {
  REQUIRE_DEVICE();
  for (int seed = 1; seed <= 3; ++seed) {
    std::mt19937 rng(seed);
    for (DType dt : kFloatTypes) {
      const int64_t vocab = rint(rng, 5, 3000), hidden = seed == 2 ? rint(rng, 1, 70) : 8 * rint(rng, 1, 100);
      const int64_t n = rint(rng, 1, 600);
      Tensor ids = Tensor::empty({n}, DType::I32);
      for (int64_t i = 0; i < n; ++i) ids.data<int32_t>()[i] = static_cast<int32_t>(rint(rng, 0, std::min<int64_t>(vocab - 1, 40)));  // repeats
      Tensor w = rand_host({vocab, hidden}, rng, dt);
      Tensor dids = cu::to_device(ids);
      const std::string what = std::string(dname(dt)) + " V=" + std::to_string(vocab) + " H=" + std::to_string(hidden) +
                               " N=" + std::to_string(n);
      Tensor want = Tensor::empty({n, hidden}, DType::F32);
      am::ops::embedding_fwd(ids, w, want);
      Tensor out = dev_poisoned({n, hidden}, dt);
      cu::embedding_fwd(dids, up(w, dt), out);
      expect_close(out, want, dt, "embedding_fwd " + what);
      // backward: fp32 dweight accumulates
      Tensor dout = rand_host({n, hidden}, rng, dt);
      Tensor dw0 = rand_host({vocab, hidden}, rng);
      Tensor want_dw = dw0.clone();
      am::ops::embedding_bwd(ids, dout, want_dw);
      Tensor ddw = up(dw0, DType::F32);
      cu::embedding_bwd(dids, up(dout, dt), ddw);
      expect_close(ddw, want_dw, DType::F32, "embedding_bwd " + what);
    }
  }
  // An id outside the vocabulary is reported at the next check.
  Tensor ids = Tensor::empty({3}, DType::I32);
  ids.data<int32_t>()[0] = 1;
  ids.data<int32_t>()[1] = 99;
  ids.data<int32_t>()[2] = 0;
  Tensor w = cu::empty({10, 8}, DType::BF16);
  cu::fill_(w, 1.f);
  Tensor out = cu::empty({3, 8}, DType::BF16);
  cu::embedding_fwd(cu::to_device(ids), w, out);
  try {
    cu::default_context().check_device_errors();
    FAIL() << "expected DataError";
  } catch (const am::DataError& e) {
    EXPECT_NE(std::string(e.what()).find("99"), std::string::npos) << e.what();
  }
  cu::default_context().check_device_errors();  // cleared
}

// ---------------------------------------------------------------------------------------------------------
TEST(CudaOps, Linear) {
  REQUIRE_DEVICE();
  for (int seed = 1; seed <= 4; ++seed) {
    std::mt19937 rng(seed);
    for (DType dt : kFloatTypes) {
      // Odd sizes on some seeds (cuBLASLt alignment fallbacks), tile-friendly on others.
      const bool odd = seed % 2 == 1;
      const int64_t n = odd ? rint(rng, 1, 300) : 64 * rint(rng, 1, 4);
      const int64_t k = odd ? rint(rng, 1, 200) : 8 * rint(rng, 1, 40);
      const int64_t m = odd ? rint(rng, 1, 200) : 8 * rint(rng, 1, 40);
      const bool with_bias = seed >= 3;
      const std::string what = std::string(dname(dt)) + " N=" + std::to_string(n) + " K=" + std::to_string(k) +
                               " M=" + std::to_string(m) + (with_bias ? " bias" : "");
      Tensor x = rand_host({n, k}, rng, dt), w = rand_host({m, k}, rng, dt), b = rand_host({m}, rng, dt);
      Tensor want = Tensor::empty({n, m}, DType::F32);
      am::ops::linear_fwd(x, w, with_bias ? &b : nullptr, want);
      Tensor dx_ = up(x, dt), dw_ = up(w, dt), db_ = up(b, dt);
      Tensor y = dev_poisoned({n, m}, dt);
      cu::linear_fwd(dx_, dw_, with_bias ? &db_ : nullptr, y);
      expect_close(y, want, dt, "linear_fwd " + what);
      // fp32 bias with a bf16 output (master-precision bias)
      if (with_bias && dt == DType::BF16) {
        Tensor b32 = up(b, DType::F32);
        Tensor y2 = dev_poisoned({n, m}, dt);
        cu::linear_fwd(dx_, dw_, &b32, y2);
        expect_close(y2, want, dt, "linear_fwd fp32 bias " + what);
      }
      // backward
      Tensor dy = rand_host({n, m}, rng, dt);
      Tensor gw0 = rand_host({m, k}, rng), gb0 = rand_host({m}, rng);
      Tensor want_dx = Tensor::empty({n, k}, DType::F32), want_dw = gw0.clone(), want_db = gb0.clone();
      am::ops::linear_bwd(x, w, dy, &want_dx, want_dw, with_bias ? &want_db : nullptr);
      Tensor gx = dev_poisoned({n, k}, dt);
      Tensor gw = up(gw0, DType::F32), gb = up(gb0, DType::F32);
      cu::linear_bwd(dx_, dw_, up(dy, dt), &gx, gw, with_bias ? &gb : nullptr);
      expect_close(gx, want_dx, dt, "linear_bwd dx " + what);
      // dw is fp32 accumulated from bf16 products: fp32 accumulation error only, but the sum over N of
      // O(1) terms is compared with the table for the input dtype.
      expect_close(gw, want_dw, dt == DType::F32 ? DType::F32 : DType::BF16, "linear_bwd dw " + what,
                   dt == DType::F32 ? 1e-5 : 1e-3);
      if (with_bias) expect_close(gb, want_db, DType::F32, "linear_bwd dbias " + what);
      // dx = nullptr: only dw accumulates (twice now)
      cu::linear_bwd(dx_, dw_, up(dy, dt), nullptr, gw, nullptr);
      Tensor want_dw2 = want_dw.clone();
      am::ops::linear_bwd(x, w, dy, nullptr, want_dw2, nullptr);
      expect_close(gw, want_dw2, dt == DType::F32 ? DType::F32 : DType::BF16, "linear_bwd dw twice " + what,
                   dt == DType::F32 ? 1e-5 : 1e-3);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// LinearOut (core/linear_out.h): y = alpha x w^T (+ b) (+ y) and dx = alpha dy w (+ dx) inside the cuBLASLt GEMM
// (alpha, beta = 1; the LoRA branch and the blocks' summed input gradients), against the CPU reference with the same
// options (itself bit-identical to the separate scale_ / add_). Also bf16 x / w into an fp32 y (accumulating in
// fp32), and through the am::ops front-end. dw / dbias must be what the plain call gives.
TEST(CudaOps, LinearAlphaAccumulate) {
  REQUIRE_DEVICE();
  for (int seed = 1; seed <= 4; ++seed) {
    std::mt19937 rng(100 + seed);
    for (DType dt : kFloatTypes) {
      const bool odd = seed % 2 == 1;
      const int64_t n = odd ? rint(rng, 1, 300) : 64 * rint(rng, 1, 4);
      const int64_t k = odd ? rint(rng, 1, 200) : 8 * rint(rng, 1, 40);
      const int64_t m = odd ? rint(rng, 1, 200) : 8 * rint(rng, 1, 40);
      const bool with_bias = seed >= 3;
      Tensor x = rand_host({n, k}, rng, dt), w = rand_host({m, k}, rng, dt), b = rand_host({m}, rng, dt);
      Tensor y0 = rand_host({n, m}, rng, dt), dy = rand_host({n, m}, rng, dt), dx0 = rand_host({n, k}, rng, dt);
      Tensor gw0 = rand_host({m, k}, rng), gb0 = rand_host({m}, rng);
      Tensor xd = up(x, dt), wd = up(w, dt), bd = up(b, dt), dyd = up(dy, dt);
      for (const am::LinearOut lo :
           {am::LinearOut{.alpha = 2.f}, am::LinearOut{.alpha = 0.3f}, am::LinearOut{.accumulate = true},
            am::LinearOut{.alpha = 0.5f, .accumulate = true}, am::LinearOut{.alpha = 1.7f, .accumulate = true}}) {
        const std::string what = std::string(dname(dt)) + " N=" + std::to_string(n) + " K=" + std::to_string(k) +
                                 " M=" + std::to_string(m) + (with_bias ? " bias" : "") +
                                 " alpha=" + std::to_string(lo.alpha) + (lo.accumulate ? " accumulate" : "");
        // forward
        Tensor want = lo.accumulate ? y0.clone() : Tensor::empty({n, m}, DType::F32);
        am::ops::linear_fwd(x, w, with_bias ? &b : nullptr, want, lo);
        Tensor y = lo.accumulate ? up(y0, dt) : dev_poisoned({n, m}, dt);
        cu::linear_fwd(xd, wd, with_bias ? &bd : nullptr, y, lo);
        expect_close(y, want, dt, "linear_fwd " + what);
        Tensor y2 = lo.accumulate ? up(y0, dt) : dev_poisoned({n, m}, dt);
        am::ops::linear_fwd(xd, wd, with_bias ? &bd : nullptr, y2, lo);  // through the front-end
        expect_close(y2, want, dt, "ops::linear_fwd " + what);
        if (dt == DType::BF16) {  // bf16 operands, fp32 output: accumulated without a bf16 rounding
          Tensor y3 = lo.accumulate ? up(y0, DType::F32) : dev_poisoned({n, m}, DType::F32);
          cu::linear_fwd(xd, wd, with_bias ? &bd : nullptr, y3, lo);
          expect_close(y3, want, DType::F32, "linear_fwd fp32 y " + what, 1e-5);
        }
        // backward: dx with the options, dw / dbias as the plain call's
        Tensor want_dx = lo.accumulate ? dx0.clone() : Tensor::empty({n, k}, DType::F32);
        Tensor want_dw = gw0.clone(), want_db = gb0.clone();
        am::ops::linear_bwd(x, w, dy, &want_dx, want_dw, with_bias ? &want_db : nullptr, lo);
        Tensor gx = lo.accumulate ? up(dx0, dt) : dev_poisoned({n, k}, dt);
        Tensor gw = up(gw0, DType::F32), gb = up(gb0, DType::F32);
        cu::linear_bwd(xd, wd, dyd, &gx, gw, with_bias ? &gb : nullptr, lo);
        expect_close(gx, want_dx, dt, "linear_bwd dx " + what);
        expect_close(gw, want_dw, dt == DType::F32 ? DType::F32 : DType::BF16, "linear_bwd dw " + what,
                     dt == DType::F32 ? 1e-5 : 1e-3);
        if (with_bias) expect_close(gb, want_db, DType::F32, "linear_bwd dbias " + what);
        Tensor gx2 = lo.accumulate ? up(dx0, dt) : dev_poisoned({n, k}, dt), frozen;
        am::ops::linear_bwd(xd, wd, dyd, &gx2, frozen, nullptr, lo);  // frozen weight, through the front-end
        expect_close(gx2, want_dx, dt, "ops::linear_bwd frozen dx " + what);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
TEST(CudaOps, RmsNorm) {
  REQUIRE_DEVICE();
  // 8216 and 16384: the fp32 backward takes the looped path (the bf16 one still fits a block, at 8 vectors
  // per thread); 73536 (16-byte vectors) and 70001 (scalar) take the looped forward and backward in both
  // dtypes. Rows past the looped backward's grid (SMs x resident blocks) make its blocks accumulate dw
  // partials over several rows.
  const int64_t hs[] = {2048, 37, 64, 4104, 1, 8192 + 24, 16384, 73536, 70001};
  for (int seed = 1; seed <= 3; ++seed) {
    std::mt19937 rng(seed);
    for (DType dt : kFloatTypes) {
      for (int64_t h : hs) {
        const int64_t n = h > 20000 ? rint(rng, 1, 40) : h > 8192 ? rint(rng, 300, 1300) : rint(rng, 1, 700);
        const std::string what = std::string(dname(dt)) + " N=" + std::to_string(n) + " H=" + std::to_string(h);
        Tensor x = rand_host({n, h}, rng, dt, -2.f, 2.f), w = rand_host({h}, rng, dt, 0.5f, 1.5f);
        Tensor want_y = Tensor::empty({n, h}, DType::F32), want_r = Tensor::empty({n}, DType::F32);
        am::ops::rmsnorm_fwd(x, w, 1e-5f, want_y, want_r);
        Tensor dx = up(x, dt), dw = up(w, dt);
        Tensor y = dev_poisoned({n, h}, dt), r = dev_poisoned({n}, DType::F32);
        cu::rmsnorm_fwd(dx, dw, 1e-5f, y, r);
        expect_close(y, want_y, dt, "rmsnorm_fwd y " + what);
        expect_close(r, want_r, DType::F32, "rmsnorm_fwd rstd " + what, 1e-5);
        Tensor dy = rand_host({n, h}, rng, dt);
        Tensor gw0 = rand_host({h}, rng);
        Tensor want_dx = Tensor::empty({n, h}, DType::F32), want_dw = gw0.clone();
        am::ops::rmsnorm_bwd(x, w, want_r, dy, want_dx, want_dw);
        Tensor gx = dev_poisoned({n, h}, dt), gw = up(gw0, DType::F32);
        cu::rmsnorm_bwd(dx, dw, r, up(dy, dt), gx, gw);
        expect_close(gx, want_dx, dt, "rmsnorm_bwd dx " + what);
        expect_close(gw, want_dw, DType::F32, "rmsnorm_bwd dw " + what, 1e-5);
      }
    }
  }
}

// The fp32 residual stream (ExecContext::residual_dtype): x fp32 (not bf16-representable), w fp32 (the
// master) or bf16, y bf16; backward dy bf16 (a matmul's input gradient) -> dx fp32. Reference: the CPU op
// on the same values in fp32, y rounded once to bf16. Same H set as above (fast and looped paths, scalar
// fallback), plus a misaligned view of x (scalar path).
TEST(CudaOps, RmsNormMixedDtypes) {
  REQUIRE_DEVICE();
  const int64_t hs[] = {2048, 37, 64, 4104, 1, 8192 + 24, 16384, 73536, 70001};
  for (int seed = 1; seed <= 2; ++seed) {
    std::mt19937 rng(100 + seed);
    for (DType wt : kFloatTypes) {
      for (int64_t h : hs) {
        for (bool misalign : {false, true}) {
          if (misalign && h > 20000) continue;
          const int64_t n = h > 20000 ? rint(rng, 1, 40) : h > 8192 ? rint(rng, 300, 1300) : rint(rng, 1, 700);
          const std::string what = std::string("x float32 w ") + dname(wt) + " N=" + std::to_string(n) +
                                   " H=" + std::to_string(h) + (misalign ? " misaligned" : "");
          Tensor x = rand_host({n, h}, rng, DType::F32, -2.f, 2.f), w = rand_host({h}, rng, wt, 0.5f, 1.5f);
          Tensor want_y = Tensor::empty({n, h}, DType::F32), want_r = Tensor::empty({n}, DType::F32);
          am::ops::rmsnorm_fwd(x, w, 1e-5f, want_y, want_r);
          // x on the device, optionally as a view one element in (misaligned rows).
          Tensor xfull = cu::empty({n * h + 1, 1}, DType::F32);
          Tensor dx = xfull.slice_rows(misalign ? 1 : 0, misalign ? n * h + 1 : n * h).view({n, h});
          cu::copy_(dx, up(x, DType::F32).view({n, h}));
          Tensor dw = up(w, wt);
          Tensor y = dev_poisoned({n, h}, DType::BF16), r = dev_poisoned({n}, DType::F32);
          cu::rmsnorm_fwd(dx, dw, 1e-5f, y, r);
          expect_close(y, want_y, DType::BF16, "rmsnorm_fwd y bf16 " + what);
          expect_close(r, want_r, DType::F32, "rmsnorm_fwd rstd " + what, 1e-5);
          Tensor dy = rand_host({n, h}, rng, DType::BF16);
          Tensor gw0 = rand_host({h}, rng);
          Tensor want_dx = Tensor::empty({n, h}, DType::F32), want_dw = gw0.clone();
          am::ops::rmsnorm_bwd(x, w, want_r, dy, want_dx, want_dw);
          Tensor gx = dev_poisoned({n, h}, DType::F32), gw = up(gw0, DType::F32);
          cu::rmsnorm_bwd(dx, dw, r, up(dy, DType::BF16), gx, gw);
          // H = 1 is pure cancellation (dx = r w dy eps / (x^2 + eps)): fp32 on the device vs double on the
          // host differ by ~1e-2 relative there, whatever the dtypes; dw still checks the row pass.
          if (h > 1) expect_close(gx, want_dx, DType::F32, "rmsnorm_bwd dx float32 (dy bf16) " + what);
          expect_close(gw, want_dw, DType::F32, "rmsnorm_bwd dw " + what, 1e-5);
          if (::testing::Test::HasFailure()) return;
        }
      }
    }
  }
  // Combinations other than these are refused.
  std::mt19937 rng(9);
  Tensor x16 = cu::empty({4, 64}, DType::BF16), w = up(rand_host({64}, rng), DType::F32);
  Tensor y32 = cu::empty({4, 64}, DType::F32), r = cu::empty({4}, DType::F32);
  EXPECT_THROW(cu::rmsnorm_fwd(x16, w, 1e-5f, y32, r), am::ShapeError);
  Tensor x32 = cu::empty({4, 64}, DType::F32), dy16 = cu::empty({4, 64}, DType::BF16), dx16 = cu::empty({4, 64}, DType::BF16);
  Tensor gw = cu::empty({64}, DType::F32);
  EXPECT_THROW(cu::rmsnorm_bwd(x32, w, r, dy16, dx16, gw), am::ShapeError);
}

// Every launch shape the benchmark sweeps (tuning.h) must compute the same thing.
TEST(CudaOps, RmsNormTunedShapes) {
  REQUIRE_DEVICE();
  std::mt19937 rng(7);
  std::vector<cu::RmsNormTuning> cfgs;
  for (int th : {32, 64, 128, 256, 512})
    for (int bps : {2, 8})
      for (int lanes : {8, 32})
        for (bool pf : {false, true}) {
          cu::RmsNormTuning t;
          t.fwd_threads = th;
          t.bwd_threads = th;
          t.bwd_blocks_per_sm = bps;
          t.reduce_lanes = lanes;
          t.prefetch = pf;
          cfgs.push_back(t);
        }
  for (DType dt : kFloatTypes) {
    // n above SMs x blocks_per_sm for the first two, so blocks walk several rows (prefetch path); 8216 takes
    // the looped path (which ignores the launch knobs except reduce_lanes).
    for (int64_t h : {int64_t(2048), int64_t(37), int64_t(4104), int64_t(8216)}) {
      const int64_t n = h >= 4104 ? rint(rng, 1, 200) : rint(rng, 1100, 1500);
      Tensor x = rand_host({n, h}, rng, dt, -2.f, 2.f), w = rand_host({h}, rng, dt, 0.5f, 1.5f);
      Tensor dy = rand_host({n, h}, rng, dt), gw0 = rand_host({h}, rng);
      Tensor want_y = Tensor::empty({n, h}, DType::F32), want_r = Tensor::empty({n}, DType::F32);
      am::ops::rmsnorm_fwd(x, w, 1e-6f, want_y, want_r);
      Tensor want_dx = Tensor::empty({n, h}, DType::F32), want_dw = gw0.clone();
      am::ops::rmsnorm_bwd(x, w, want_r, dy, want_dx, want_dw);
      Tensor dx_ = up(x, dt), dw_ = up(w, dt), ddy = up(dy, dt);
      for (const auto& t : cfgs) {
        const std::string what = std::string(dname(dt)) + " N=" + std::to_string(n) + " H=" + std::to_string(h) +
                                 " threads=" + std::to_string(t.fwd_threads) + " bps=" + std::to_string(t.bwd_blocks_per_sm) +
                                 " lanes=" + std::to_string(t.reduce_lanes) + " pf=" + std::to_string(t.prefetch);
        Tensor y = dev_poisoned({n, h}, dt), r = dev_poisoned({n}, DType::F32);
        cu::rmsnorm_fwd_tuned(dx_, dw_, 1e-6f, y, r, t, cu::default_context());
        expect_close(y, want_y, dt, "rmsnorm_fwd_tuned " + what);
        Tensor gx = dev_poisoned({n, h}, dt), gw = up(gw0, DType::F32);
        cu::rmsnorm_bwd_tuned(dx_, dw_, r, ddy, gx, gw, t, cu::default_context());
        expect_close(gx, want_dx, dt, "rmsnorm_bwd_tuned dx " + what);
        expect_close(gw, want_dw, DType::F32, "rmsnorm_bwd_tuned dw " + what, 1e-5);
        if (::testing::Test::HasFailure()) return;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Frozen weights (LoRA base weights): a weight gradient passed undefined is not computed (ops.h). dx must be
// what the CPU computes (and what the same call with a defined dw computes), dbias still accumulates, and
// both the am::cuda entry points and the am::ops front-ends accept the undefined tensor.
TEST(CudaOps, FrozenWeightsLinearAndRmsNorm) {
  REQUIRE_DEVICE();
  for (int seed = 1; seed <= 3; ++seed) {
    std::mt19937 rng(500 + seed);
    for (DType dt : kFloatTypes) {
      const bool odd = seed % 2 == 1;
      const int64_t n = odd ? rint(rng, 1, 300) : 64 * rint(rng, 1, 4);
      const int64_t k = odd ? rint(rng, 1, 200) : 8 * rint(rng, 1, 40);
      const int64_t m = odd ? rint(rng, 1, 200) : 8 * rint(rng, 1, 40);
      const std::string what = std::string(dname(dt)) + " N=" + std::to_string(n) + " K=" + std::to_string(k) +
                               " M=" + std::to_string(m);
      Tensor x = rand_host({n, k}, rng, dt), w = rand_host({m, k}, rng, dt), dy = rand_host({n, m}, rng, dt);
      Tensor gb0 = rand_host({m}, rng);
      Tensor want_dx = Tensor::empty({n, k}, DType::F32), want_db = gb0.clone(), host_frozen;
      am::ops::linear_bwd(x, w, dy, &want_dx, host_frozen, &want_db);
      Tensor xd = up(x, dt), wd = up(w, dt), dyd = up(dy, dt);
      {
        Tensor gx = dev_poisoned({n, k}, dt), gb = up(gb0, DType::F32), frozen;
        cu::linear_bwd(xd, wd, dyd, &gx, frozen, &gb);
        EXPECT_FALSE(frozen.defined());
        expect_close(gx, want_dx, dt, "frozen linear_bwd dx " + what);
        expect_close(gb, want_db, DType::F32, "frozen linear_bwd dbias " + what);
      }
      {
        Tensor gx = dev_poisoned({n, k}, dt), frozen;
        am::ops::linear_bwd(xd, wd, dyd, &gx, frozen, nullptr);  // through the front-end
        expect_close(gx, want_dx, dt, "frozen ops::linear_bwd dx " + what);
        am::ops::linear_bwd(xd, wd, dyd, nullptr, frozen, nullptr);  // nothing to compute
      }
    }
  }
  // RMSNorm: fast path (37, 2048, 4104) and looped path (8216 fp32 / 16384+24 bf16 widths, 73536), plus the fp32
  // residual stream (x fp32, dy bf16 -> dx fp32) and every tuned launch shape at two widths.
  for (DType dt : kFloatTypes) {
    std::mt19937 rng(dt == DType::F32 ? 61 : 62);
    for (int64_t h : {int64_t(37), int64_t(2048), int64_t(4104), int64_t(8216), int64_t(16408), int64_t(73536)}) {
      const int64_t n = h > 20000 ? rint(rng, 1, 40) : rint(rng, 300, 1300);
      const std::string what = std::string(dname(dt)) + " N=" + std::to_string(n) + " H=" + std::to_string(h);
      Tensor x = rand_host({n, h}, rng, dt, -2.f, 2.f), w = rand_host({h}, rng, dt, 0.5f, 1.5f);
      Tensor dy = rand_host({n, h}, rng, dt);
      Tensor want_y = Tensor::empty({n, h}, DType::F32), want_r = Tensor::empty({n}, DType::F32);
      am::ops::rmsnorm_fwd(x, w, 1e-5f, want_y, want_r);
      Tensor want_dx = Tensor::empty({n, h}, DType::F32), host_frozen;
      am::ops::rmsnorm_bwd(x, w, want_r, dy, want_dx, host_frozen);
      Tensor xd = up(x, dt), wd = up(w, dt), dyd = up(dy, dt), r = up(want_r, DType::F32);
      Tensor gx = dev_poisoned({n, h}, dt), frozen;
      cu::rmsnorm_bwd(xd, wd, r, dyd, gx, frozen);
      expect_close(gx, want_dx, dt, "frozen rmsnorm_bwd dx " + what);
      Tensor gx2 = dev_poisoned({n, h}, dt);
      am::ops::rmsnorm_bwd(xd, wd, r, dyd, gx2, frozen);
      expect_close(gx2, want_dx, dt, "frozen ops::rmsnorm_bwd dx " + what);
      // Same dx as with dw defined (the row kernels are the same code; the dw partials are only skipped).
      Tensor gx3 = dev_poisoned({n, h}, dt), gw = up(rand_host({h}, rng), DType::F32);
      cu::rmsnorm_bwd(xd, wd, r, dyd, gx3, gw);
      Tensor a = down(gx), b = down(gx3);
      EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0) << "dx with / without dw differ: " << what;
      if (h == 2048 || h == 8216) {
        for (int th : {32, 128, 512})
          for (bool pf : {false, true}) {
            cu::RmsNormTuning t;
            t.bwd_threads = th;
            t.bwd_blocks_per_sm = 2;
            t.prefetch = pf;
            Tensor gt = dev_poisoned({n, h}, dt);
            cu::rmsnorm_bwd_tuned(xd, wd, r, dyd, gt, frozen, t, cu::default_context());
            expect_close(gt, want_dx, dt,
                         "frozen rmsnorm_bwd_tuned threads=" + std::to_string(th) + " pf=" + std::to_string(pf) + " " +
                             what);
          }
      }
      if (::testing::Test::HasFailure()) return;
    }
  }
  {
    std::mt19937 rng(63);
    const int64_t n = 333, h = 2048;
    Tensor x = rand_host({n, h}, rng, DType::F32, -2.f, 2.f), w = rand_host({h}, rng, DType::F32, 0.5f, 1.5f);
    Tensor dy = rand_host({n, h}, rng, DType::BF16);
    Tensor want_y = Tensor::empty({n, h}, DType::F32), want_r = Tensor::empty({n}, DType::F32);
    am::ops::rmsnorm_fwd(x, w, 1e-5f, want_y, want_r);
    Tensor want_dx = Tensor::empty({n, h}, DType::F32), host_frozen;
    am::ops::rmsnorm_bwd(x, w, want_r, dy, want_dx, host_frozen);
    Tensor gx = dev_poisoned({n, h}, DType::F32), frozen;
    cu::rmsnorm_bwd(up(x, DType::F32), up(w, DType::F32), up(want_r, DType::F32), up(dy, DType::BF16), gx, frozen);
    expect_close(gx, want_dx, DType::F32, "frozen rmsnorm_bwd x fp32, dy bf16");
  }
}

// dropout_: the device mask is bit-identical to the CPU reference (a hash of (seed, element index)), for fp32
// and bf16, vectorised and scalar (misaligned view, odd sizes) paths; p == 0 is a no-op; bad p is a UsageError.
TEST(CudaOps, DropoutMatchesCpuBitwise) {
  REQUIRE_DEVICE();
  std::mt19937 rng(71);
  for (DType dt : kFloatTypes) {
    for (int64_t n : {int64_t(1), int64_t(7), int64_t(4096), int64_t(100003), int64_t(1) << 22}) {
      for (bool misalign : {false, true}) {
        for (float p : {0.1f, 0.5f, 0.9f}) {
          const uint64_t seed = (static_cast<uint64_t>(rng()) << 32) | rng();
          const std::string what = std::string(dname(dt)) + " n=" + std::to_string(n) + " p=" + std::to_string(p) +
                                   (misalign ? " misaligned" : "") + " seed=" + std::to_string(seed);
          Tensor xh = rand_host({n}, rng, dt);  // dt-representable fp32 values
          Tensor host = dt == DType::F32 ? xh.clone() : xh.to(dt);
          am::ops::dropout_(host, p, seed);
          // Device copy, optionally a view one element in (the scalar path); the mask index is the view's.
          Tensor full = cu::empty({n + 1}, dt);
          Tensor xd = full.slice_rows(misalign ? 1 : 0, misalign ? n + 1 : n);
          cu::copy_(xd, up(xh, dt));
          am::ops::dropout_(xd, p, seed);
          Tensor got = cu::to_host(xd);
          ASSERT_EQ(got.nbytes(), host.nbytes()) << what;
          if (std::memcmp(got.raw(), host.raw(), host.nbytes()) != 0) {
            Tensor g32 = got.dtype() == DType::F32 ? got : got.to(DType::F32);
            Tensor h32 = host.dtype() == DType::F32 ? host : host.to(DType::F32);
            int64_t first = -1;
            for (int64_t i = 0; i < n && first < 0; ++i)
              if (std::memcmp(&g32.f32()[i], &h32.f32()[i], 4) != 0) first = i;
            ADD_FAILURE() << "dropout_ " << what << ": device differs from the CPU at " << first << " (got "
                          << g32.f32()[first] << ", want " << h32.f32()[first] << ")";
          }
          if (::testing::Test::HasFailure()) return;
        }
      }
    }
  }
  // Backward reuses the mask: an all-ones gradient comes back as exactly 0 or fp32(1 / (1 - p)) where the
  // forward dropped / kept.
  {
    const int64_t n = 65537;
    Tensor xh = rand_host({n}, rng, DType::F32, 0.5f, 1.5f);  // no zeros
    Tensor y = up(xh, DType::F32), g = up(Tensor::zeros({n}, DType::F32), DType::F32);
    cu::fill_(g, 1.f);
    cu::dropout_(y, 0.25f, 5);
    cu::dropout_(g, 0.25f, 5);
    Tensor yh = cu::to_host(y), gh = cu::to_host(g);
    const float scale = 1.0f / (1.0f - 0.25f);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(gh.f32()[i], yh.f32()[i] != 0.f ? scale : 0.f) << i;
  }
  // p == 0: untouched; bad p: UsageError naming the op, x untouched.
  Tensor xh = rand_host({1000}, rng);
  Tensor xd = up(xh, DType::F32);
  am::ops::dropout_(xd, 0.f, 3);
  Tensor back = cu::to_host(xd);
  EXPECT_EQ(std::memcmp(back.raw(), xh.raw(), xh.nbytes()), 0);
  for (float p : {-0.5f, 1.f, kNaN}) {
    try {
      am::ops::dropout_(xd, p, 3);
      ADD_FAILURE() << "no error for p = " << p;
    } catch (const am::UsageError& e) {
      EXPECT_NE(std::string(e.what()).find("dropout_"), std::string::npos) << e.what();
    }
    EXPECT_THROW(cu::dropout_(xd, p, 3), am::UsageError);
  }
  back = cu::to_host(xd);
  EXPECT_EQ(std::memcmp(back.raw(), xh.raw(), xh.nbytes()), 0);
}

// ---------------------------------------------------------------------------------------------------------
TEST(CudaOps, Rope) {
  REQUIRE_DEVICE();
  struct Case {
    int64_t heads, d, half;
  };
  const Case cases[] = {{32, 64, 32}, {8, 128, 64}, {3, 6, 3}, {4, 64, 16}, {5, 10, 4}};
  for (int seed = 1; seed <= 3; ++seed) {
    std::mt19937 rng(seed);
    for (DType dt : kFloatTypes) {
      for (const Case& c : cases) {
        const int64_t n = rint(rng, 1, 300);
        const std::string what = std::string(dname(dt)) + " N=" + std::to_string(n) + " heads=" +
                                 std::to_string(c.heads) + " D=" + std::to_string(c.d) + " R/2=" + std::to_string(c.half);
        Tensor x = rand_host({n, c.heads, c.d}, rng, dt, -2.f, 2.f);
        Tensor cs = rand_host({n, c.half}, rng), sn = rand_host({n, c.half}, rng);
        Tensor dcs = up(cs, DType::F32), dsn = up(sn, DType::F32);
        Tensor want = x.clone();
        am::ops::rope_fwd_(want, cs, sn);
        Tensor dx = up(x, dt);
        cu::rope_fwd_(dx, dcs, dsn);
        expect_close(dx, want, dt, "rope_fwd_ " + what);
        Tensor g = rand_host({n, c.heads, c.d}, rng, dt);
        Tensor want_g = g.clone();
        am::ops::rope_bwd_(want_g, cs, sn);
        Tensor dg = up(g, dt);
        cu::rope_bwd_(dg, dcs, dsn);
        expect_close(dg, want_g, dt, "rope_bwd_ " + what);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// SwiGLU and GeGLU (Gemma) share the gated kernels: both against the CPU reference, out of place and in place.
template <typename CpuF, typename CpuB, typename CuF, typename CuB>
void check_gated(const char* name, CpuF cpu_fwd, CpuB cpu_bwd, CuF cu_fwd, CuB cu_bwd) {
  for (int seed = 1; seed <= 3; ++seed) {
    std::mt19937 rng(seed);
    for (DType dt : kFloatTypes) {
      const int64_t n = rint(rng, 1, 64), i = seed == 2 ? rint(rng, 1, 999) : 8 * rint(rng, 1, 300);
      const std::string what = std::string(dname(dt)) + " N=" + std::to_string(n) + " I=" + std::to_string(i);
      Tensor g = rand_host({n, i}, rng, dt, -6.f, 6.f), u = rand_host({n, i}, rng, dt, -2.f, 2.f);
      Tensor want = Tensor::empty({n, i}, DType::F32);
      cpu_fwd(g, u, want);
      Tensor dg = up(g, dt), du = up(u, dt);
      Tensor h = dev_poisoned({n, i}, dt);
      cu_fwd(dg, du, h);
      expect_close(h, want, dt, std::string(name) + "_fwd " + what);
      Tensor dh = rand_host({n, i}, rng, dt);
      Tensor want_g = Tensor::empty({n, i}, DType::F32), want_u = Tensor::empty({n, i}, DType::F32);
      cpu_bwd(g, u, dh, want_g, want_u);
      Tensor gg = dev_poisoned({n, i}, dt), gu = dev_poisoned({n, i}, dt);
      cu_bwd(dg, du, up(dh, dt), gg, gu);
      expect_close(gg, want_g, dt, std::string(name) + "_bwd dgate " + what);
      expect_close(gu, want_u, dt, std::string(name) + "_bwd dup " + what);
      // in place: dgate, dup alias gate, up
      cu_bwd(dg, du, up(dh, dt), dg, du);
      expect_close(dg, want_g, dt, std::string(name) + "_bwd in place dgate " + what);
      expect_close(du, want_u, dt, std::string(name) + "_bwd in place dup " + what);
    }
  }
}

TEST(CudaOps, SwiGlu) {
  REQUIRE_DEVICE();
  check_gated(
      "swiglu", [](auto&&... a) { am::ops::swiglu_fwd(a...); }, [](auto&&... a) { am::ops::swiglu_bwd(a...); },
      [](auto&&... a) { cu::swiglu_fwd(a...); }, [](auto&&... a) { cu::swiglu_bwd(a...); });
}

TEST(CudaOps, GeGlu) {
  REQUIRE_DEVICE();
  check_gated(
      "geglu", [](auto&&... a) { am::ops::geglu_fwd(a...); }, [](auto&&... a) { am::ops::geglu_bwd(a...); },
      [](auto&&... a) { cu::geglu_fwd(a...); }, [](auto&&... a) { cu::geglu_bwd(a...); });
}

// ---------------------------------------------------------------------------------------------------------
TEST(CudaOps, CrossEntropy) {
  REQUIRE_DEVICE();
  for (int seed = 1; seed <= 3; ++seed) {
    std::mt19937 rng(seed);
    for (DType dt : kFloatTypes) {
      for (int64_t vocab : {int64_t(8), int64_t(1001), int64_t(32000), rint(rng, 2, 5000)}) {
        const int64_t n = rint(rng, 1, 40);
        const std::string what = std::string(dname(dt)) + " N=" + std::to_string(n) + " V=" + std::to_string(vocab);
        Tensor logits = rand_host({n, vocab}, rng, dt, -8.f, 8.f);
        Tensor tg = Tensor::empty({n}, DType::I32);
        for (int64_t r = 0; r < n; ++r) tg.data<int32_t>()[r] = rint(rng, 0, 5) == 0 ? -100 : static_cast<int32_t>(rint(rng, 0, vocab - 1));
        const float scale = 1.f / static_cast<float>(n);
        Tensor want_g = Tensor::empty({n, vocab}, DType::F32);
        const double want = am::ops::cross_entropy_fwd_bwd(logits, tg, scale, &want_g);
        Tensor dl = up(logits, dt), dt_ = cu::to_device(tg);
        Tensor g = dev_poisoned({n, vocab}, dt);
        const double got = cu::cross_entropy_fwd_bwd(dl, dt_, scale, &g);
        EXPECT_NEAR(got, want, 1e-5 * std::max(1.0, std::abs(want))) << "cross_entropy loss " << what;
        expect_close(g, want_g, dt, "cross_entropy dlogits " + what, dt == DType::F32 ? 1e-5 : 1e-2);
        // loss only
        const double got2 = cu::cross_entropy_fwd_bwd(dl, dt_, scale, nullptr);
        EXPECT_NEAR(got2, want, 1e-5 * std::max(1.0, std::abs(want))) << "cross_entropy loss-only " << what;
        // in place (dlogits aliases logits), async accumulation twice into one device scalar
        double* acc = cu::alloc_device_scalar();
        cu::cross_entropy_fwd_bwd_async(dl, dt_, scale, nullptr, acc);
        cu::cross_entropy_fwd_bwd_async(dl, dt_, scale, &dl, acc);
        const double got3 = cu::read_device_scalar(acc);
        cu::free_device_scalar(acc);
        EXPECT_NEAR(got3, 2 * want, 2e-5 * std::max(1.0, std::abs(want))) << "cross_entropy async " << what;
        expect_close(dl, want_g, dt, "cross_entropy in place " + what, dt == DType::F32 ? 1e-5 : 1e-2);
      }
    }
  }
  // A bad target is a DataError from the synchronous form.
  Tensor tg = Tensor::empty({2}, DType::I32);
  tg.data<int32_t>()[0] = 3;
  tg.data<int32_t>()[1] = 17;
  Tensor l = cu::empty({2, 10}, DType::BF16);
  cu::fill_(l, 0.f);
  EXPECT_THROW(cu::cross_entropy_fwd_bwd(l, cu::to_device(tg), 1.f, nullptr), am::DataError);
}

TEST(CudaOps, LmHeadCrossEntropy) {
  REQUIRE_DEVICE();
  for (int seed = 1; seed <= 3; ++seed) {
    std::mt19937 rng(seed);
    const int64_t n = rint(rng, 1, 300), h = 8 * rint(rng, 1, 24), vocab = rint(rng, 100, 3000);
    const int64_t chunk = seed == 1 ? 0 : rint(rng, 1, 128);
    const std::string what = "N=" + std::to_string(n) + " H=" + std::to_string(h) + " V=" + std::to_string(vocab) +
                             " chunk=" + std::to_string(chunk);
    Tensor x = rand_host({n, h}, rng, DType::BF16), w = rand_host({vocab, h}, rng, DType::BF16, -0.5f, 0.5f);
    Tensor tg = Tensor::empty({n}, DType::I32);
    for (int64_t r = 0; r < n; ++r) tg.data<int32_t>()[r] = rint(rng, 0, 7) == 0 ? -100 : static_cast<int32_t>(rint(rng, 0, vocab - 1));
    const float scale = 1.f / static_cast<float>(n);
    // CPU: logits = x w^T, CE, then dx = dlogits w, dw += dlogits^T x.
    Tensor logits = Tensor::empty({n, vocab}, DType::F32);
    am::ops::linear_fwd(x, w, nullptr, logits);
    Tensor dlog = Tensor::empty({n, vocab}, DType::F32);
    const double want = am::ops::cross_entropy_fwd_bwd(logits, tg, scale, &dlog);
    Tensor gw0 = rand_host({vocab, h}, rng, DType::F32, -0.01f, 0.01f);
    Tensor want_dx = Tensor::empty({n, h}, DType::F32), want_dw = gw0.clone();
    am::ops::linear_bwd(x, w, dlog, &want_dx, want_dw, nullptr);
    Tensor gx = dev_poisoned({n, h}, DType::BF16), gw = up(gw0, DType::F32);
    double* acc = cu::alloc_device_scalar();
    cu::LmHeadCeOptions opt;
    opt.chunk_rows = chunk;
    cu::lm_head_cross_entropy(up(x, DType::BF16), up(w, DType::BF16), cu::to_device(tg), scale, &gx, &gw, acc,
                              cu::default_context(), opt);
    cu::default_context().check_device_errors();
    const double got = cu::read_device_scalar(acc);
    cu::free_device_scalar(acc);
    // The device rounds logits and dlogits to bf16 (as HF does): relative budgets of bf16 size.
    EXPECT_NEAR(got, want, 2e-3 * std::max(1.0, std::abs(want))) << "lm_head_ce loss " << what;
    expect_close(gx, want_dx, DType::BF16, "lm_head_ce dx " + what, 2e-2);
    Tensor got_dw = down(gw);
    // compare the increment (dw - dw0), whose scale is much smaller than dw0
    for (int64_t i = 0; i < got_dw.numel(); ++i) {
      got_dw.f32()[i] -= gw0.f32()[i];
      want_dw.f32()[i] -= gw0.f32()[i];
    }
    expect_close(got_dw, want_dw, DType::BF16, "lm_head_ce dw " + what, 2e-2);
  }
}

// ---------------------------------------------------------------------------------------------------------
TEST(CudaOps, SumSquares) {
  REQUIRE_DEVICE();
  for (int seed = 1; seed <= 3; ++seed) {
    std::mt19937 rng(seed);
    std::vector<Tensor> host, dev;
    // 70 tensors (> 64 per launch), some over one 65536-element chunk, some misaligned views.
    for (int i = 0; i < 70; ++i) {
      const DType dt = (i % 3 == 0) ? DType::BF16 : DType::F32;
      const int64_t n = i % 10 == 0 ? rint(rng, 65536, 300000) : rint(rng, 1, 3000);
      Tensor h = rand_host({n}, rng, dt);
      host.push_back(h);
      if (i % 7 == 3) {
        Tensor full = cu::empty({n + 1, 1}, dt);
        Tensor v = full.slice_rows(1, n + 1).view({n});
        cu::copy_(v, up(h, dt));
        dev.push_back(v);
      } else {
        dev.push_back(up(h, dt));
      }
    }
    double want = 0;
    std::vector<const Tensor*> ptrs;
    for (size_t i = 0; i < host.size(); ++i) {
      want += am::ops::sum_squares(host[i]);
      ptrs.push_back(&dev[i]);
    }
    const double got = cu::sum_squares_multi(ptrs);
    EXPECT_NEAR(got, want, 1e-5 * want) << "seed " << seed;
    EXPECT_NEAR(cu::sum_squares(dev[0]), am::ops::sum_squares(host[0]), 1e-5 * am::ops::sum_squares(host[0]));
    // clip coefficient on the device
    double* d = cu::alloc_device_scalar();
    cu::sum_squares_multi_async(ptrs, d);
    float* coef = static_cast<float*>(cu::default_context().allocator().allocate(4));
    for (double max_norm : {0.5, 1e9}) {
      cu::clip_coef_async(d, max_norm, coef);
      float hc = 0;
      ASSERT_EQ(cudaMemcpy(&hc, coef, 4, cudaMemcpyDeviceToHost), cudaSuccess);
      const double want_c = std::min(1.0, max_norm / (std::sqrt(want) + 1e-6));
      EXPECT_NEAR(hc, want_c, 1e-5 * want_c);
    }
    cu::default_context().allocator().deallocate(coef, 4);
    cu::free_device_scalar(d);
  }
  std::vector<const Tensor*> none;
  EXPECT_EQ(cu::sum_squares_multi(none), 0.0);
}

// ---------------------------------------------------------------------------------------------------------
// AdamW: three steps against am::Optimizer, compared bit for bit (master, exp_avg, exp_avg_sq), and the bf16
// working copy against the host rounding of the master. 40 parameters (> 32 per launch), sizes over one
// chunk and odd sizes; a gradient scale on load equals a scale_ pass before the CPU step.
TEST(CudaOps, AdamWMatchesCpuOptimizerBitwise) {
  REQUIRE_DEVICE();
  for (int seed = 1; seed <= 2; ++seed) {
    std::mt19937 rng(seed);
    am::OptimizerConfig oc;
    oc.kind = "adamw";
    oc.beta1 = 0.9;
    oc.beta2 = 0.999;
    oc.eps = 1e-8;
    am::Optimizer cpu_opt(oc);
    am::ParamStore ps;
    const int np = 40;
    for (int i = 0; i < np; ++i) {
      const int64_t n = i == 5 ? 200003 : (i == 6 ? 65536 * 2 : rint(rng, 1, 5000));
      am::Param& p = ps.add("p" + std::to_string(i), {n});
      Tensor v = rand_host({n}, rng);
      std::memcpy(p.value.raw(), v.raw(), v.nbytes());
    }
    struct Dev {
      Tensor w, g, m, v, work;
    };
    std::vector<Dev> dev(np);
    for (int i = 0; i < np; ++i) {
      auto& p = ps.all()[i];
      dev[i].w = up(p.value, DType::F32);
      dev[i].g = cu::empty(p.value.shape(), DType::F32);
      dev[i].m = cu::empty(p.value.shape(), DType::F32);
      dev[i].v = cu::empty(p.value.shape(), DType::F32);
      cu::zero_(dev[i].m);
      cu::zero_(dev[i].v);
      dev[i].work = dev_poisoned(p.value.shape(), DType::BF16);
    }
    float* dscale = static_cast<float*>(cu::default_context().allocator().allocate(4));
    for (int step = 1; step <= 3; ++step) {
      const double lr = 1e-3 * step, wd = step == 2 ? 0.0 : 0.01;
      const float gscale = step == 3 ? 0.37f : 1.f;
      for (int i = 0; i < np; ++i) {
        auto& p = ps.all()[i];
        Tensor g = rand_host(p.value.shape(), rng, DType::F32, -1e-2f, 1e-2f);
        std::memcpy(p.grad.raw(), g.raw(), g.nbytes());
        cu::copy_(dev[i].g, up(g, DType::F32));
        if (gscale != 1.f) am::ops::scale_(p.grad, gscale);
      }
      cpu_opt.step(ps, lr, wd);
      ASSERT_EQ(cudaMemcpy(dscale, &gscale, 4, cudaMemcpyHostToDevice), cudaSuccess);
      std::vector<cu::AdamWTensors> list;
      for (auto& d : dev) list.push_back({&d.w, &d.g, &d.m, &d.v, &d.work});
      cu::AdamWConfig c;
      c.lr = lr;
      c.beta1 = oc.beta1;
      c.beta2 = oc.beta2;
      c.eps = oc.eps;
      c.weight_decay = wd;
      c.step = step;
      c.d_grad_scale = step == 3 ? dscale : nullptr;
      cu::adamw_step(list, c);
      auto state = cpu_opt.state_tensors();
      std::map<std::string, Tensor> st(state.begin(), state.end());
      for (int i = 0; i < np; ++i) {
        auto& p = ps.all()[i];
        const std::string what = "seed " + std::to_string(seed) + " step " + std::to_string(step) + " " + p.name;
        Tensor w = cu::to_host(dev[i].w), m = cu::to_host(dev[i].m), v = cu::to_host(dev[i].v);
        ASSERT_EQ(std::memcmp(w.raw(), p.value.raw(), w.nbytes()), 0) << "master differs: " << what;
        ASSERT_EQ(std::memcmp(m.raw(), st.at(p.name + ".exp_avg").raw(), m.nbytes()), 0) << "exp_avg differs: " << what;
        ASSERT_EQ(std::memcmp(v.raw(), st.at(p.name + ".exp_avg_sq").raw(), v.nbytes()), 0) << "exp_avg_sq: " << what;
        Tensor work = cu::to_host(dev[i].work);
        Tensor want_work = p.value.to(DType::BF16);
        ASSERT_EQ(std::memcmp(work.raw(), want_work.raw(), work.nbytes()), 0) << "bf16 copy differs: " << what;
      }
    }
    cu::default_context().allocator().deallocate(dscale, 4);
  }
}

// ---------------------------------------------------------------------------------------------------------
// optimizer_in_bwd's fused update (core/adamw_params.h AdamWFused): one pass that takes the gradients' sum of
// squares, scales them by the clip coefficient and (pure bf16) rounds fp32 gradients to bf16 as it reads them
// must give exactly what the separate passes give: sum_squares_multi's double bit for bit, and the same
// parameters and state as scale_ (+ copy_ to bf16) then the plain update. 40 tensors (> 32 per launch), sizes
// over a chunk and odd sizes (the scalar tail).
TEST(CudaOps, FusedAdamWSumOfSquaresEqualsSeparatePasses) {
  REQUIRE_DEVICE();
  std::mt19937 rng(11);
  const int np = 40;
  std::vector<int64_t> sizes;
  for (int i = 0; i < np; ++i) sizes.push_back(i == 3 ? 200003 : (i == 7 ? 65536 * 2 + 5 : rint(rng, 1, 5000)));
  for (bool bf16 : {false, true})
    for (float coef : {1.f, 0.37f}) {
      const std::string what = std::string(bf16 ? "bf16" : "fp32") + " update, coef " + std::to_string(coef);
      // Two identical device states: a = separate passes, b = fused.
      struct Dev {
        Tensor w, m, v, work, g32, g;  // g: what the separate path's update reads (bf16 copy or the fp32 grad)
      };
      std::vector<Dev> a(np), b(np);
      const DType pdt = bf16 ? DType::BF16 : DType::F32;
      for (int i = 0; i < np; ++i) {
        const Tensor w = rand_host({sizes[i]}, rng, pdt), g = rand_host({sizes[i]}, rng, DType::F32, -1e-2f, 1e-2f);
        const Tensor m = rand_host({sizes[i]}, rng, pdt, -1e-3f, 1e-3f), v = rand_host({sizes[i]}, rng, pdt, 0.f, 1e-5f);
        for (Dev* d : {&a[i], &b[i]}) {
          d->w = up(w, pdt);
          d->m = up(m, pdt);
          d->v = up(v, pdt);
          d->g32 = up(g, DType::F32);
          d->work = bf16 ? Tensor() : dev_poisoned({sizes[i]}, DType::BF16);
        }
        a[i].g = bf16 ? cu::empty({sizes[i]}, DType::BF16) : a[i].g32;
      }
      // Separate passes: (bf16: copy_ to bf16) -> sum of squares -> scale_ -> update.
      std::vector<const Tensor*> gs;
      for (int i = 0; i < np; ++i) {
        if (bf16) cu::copy_(a[i].g, a[i].g32);
        gs.push_back(&a[i].g);
      }
      const double want = cu::sum_squares_multi(gs);
      if (coef != 1.f)
        for (int i = 0; i < np; ++i) cu::scale_(a[i].g, coef);
      am::AdamWBf16Hyper h;
      h.lr = 3e-3;
      h.beta2 = 0.95;
      h.weight_decay = 0.1;
      h.step = 4;
      double* d_sum = cu::alloc_device_scalar();
      if (bf16) {
        std::vector<am::AdamWBf16Tensors> la, lb;
        for (int i = 0; i < np; ++i) {
          la.push_back({&a[i].w, &a[i].g, &a[i].m, &a[i].v, uint64_t(i)});
          lb.push_back({&b[i].w, &b[i].g32, &b[i].m, &b[i].v, uint64_t(i)});
        }
        am::ops::adamw_bf16_step(la, h);
        am::ops::adamw_bf16_step(lb, h, am::AdamWFused{coef, d_sum});
      } else {
        std::vector<am::AdamWTensors> la, lb;
        for (int i = 0; i < np; ++i) {
          la.push_back({&a[i].w, &a[i].g, &a[i].m, &a[i].v, &a[i].work});
          lb.push_back({&b[i].w, &b[i].g32, &b[i].m, &b[i].v, &b[i].work});
        }
        am::ops::adamw_step_cuda(la, h);
        am::ops::adamw_step_cuda(lb, h, am::AdamWFused{coef, d_sum});
      }
      const double got = cu::read_device_scalar(d_sum);
      cu::free_device_scalar(d_sum);
      EXPECT_EQ(std::memcmp(&got, &want, sizeof got), 0) << what << ": sum of squares " << got << " vs " << want;
      EXPECT_GT(want, 0.0);
      for (int i = 0; i < np; ++i)
        for (auto [name, x, y] : {std::tuple<const char*, Tensor*, Tensor*>{"param", &a[i].w, &b[i].w},
                                  {"exp_avg", &a[i].m, &b[i].m},
                                  {"exp_avg_sq", &a[i].v, &b[i].v},
                                  {"working copy", &a[i].work, &b[i].work}}) {
          if (!x->defined()) continue;
          const Tensor hx = cu::to_host(*x), hy = cu::to_host(*y);
          ASSERT_EQ(std::memcmp(hx.raw(), hy.raw(), hx.nbytes()), 0) << what << ": " << name << " of tensor " << i
                                                                     << " (" << sizes[i] << " elements) differs";
        }
    }
}

}  // namespace
