// CUDA flash attention (with gpt_oss sinks, soft-capping and head dims 96 / 256 further down, and the generic
// kernels: other head dims, sinks, soft-capping, Dv != D, fp32) against the CPU reference (am::ops::attention_fwd/bwd on fp32 copies of the same bf16 inputs). Random shapes with T not a multiple of any tile, GQA ratios 1/4/8, head dims 64/128,
// sliding windows, packed segments with padding; every kernel variant and both backward modes (whole GQA
// group per block, group split with fp32 atomics). Outputs are poisoned with NaN before each call, so an
// unwritten element fails. Errors are ||got - ref|| / ||ref|| (bf16 budget ~1e-2); every case prints its
// numbers. Runs only where a CUDA device is visible (GTEST_SKIP otherwise).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "backend/cuda/attention.h"
#include "backend/cuda/attention_generic.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/tensor.h"
#include "ops/device.h"
#include "ops/ops.h"

namespace {

using am::DType;
using am::Shape;
using am::Tensor;

bool have_device() {
  int n = 0;
  const bool ok = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
  cudaGetLastError();
  return ok;
}

#define CK(x)                                                                            \
  do {                                                                                   \
    cudaError_t e_ = (x);                                                                \
    ASSERT_EQ(e_, cudaSuccess) << #x << ": " << cudaGetErrorString(e_);                 \
  } while (0)

// Device tensor from raw cudaMalloc, freed with the last reference.
Tensor dev_empty(const Shape& s, DType dt) {
  void* p = nullptr;
  const size_t bytes = std::max<size_t>(16, static_cast<size_t>(am::shape_numel(s)) * am::dtype_size(dt));
  if (cudaMalloc(&p, bytes) != cudaSuccess) throw am::DeviceError("test: cudaMalloc failed");
  std::shared_ptr<void> keep(p, [](void* q) { cudaFree(q); });
  return Tensor::wrap(p, s, dt, keep, am::DeviceType::CUDA);
}

std::vector<uint16_t> to_bf16(const std::vector<float>& x) {
  std::vector<uint16_t> r(x.size());
  for (size_t i = 0; i < x.size(); ++i) r[i] = am::f32_to_bf16(x[i]);
  return r;
}
std::vector<float> from_bf16(const std::vector<uint16_t>& x) {
  std::vector<float> r(x.size());
  for (size_t i = 0; i < x.size(); ++i) r[i] = am::bf16_to_f32(x[i]);
  return r;
}

// Random N(0, 1) values already rounded to bf16 (so host and device see identical inputs).
std::vector<float> randn_bf16(size_t n, std::mt19937& rng, float sd = 1.f) {
  std::normal_distribution<float> nd(0.f, sd);
  std::vector<float> x(n);
  for (auto& v : x) v = am::bf16_to_f32(am::f32_to_bf16(nd(rng)));
  return x;
}

Tensor upload_bf16(const std::vector<float>& x, const Shape& s) {
  Tensor t = dev_empty(s, DType::BF16);
  auto h = to_bf16(x);
  if (cudaMemcpy(t.raw(), h.data(), h.size() * 2, cudaMemcpyHostToDevice) != cudaSuccess)
    throw am::DeviceError("test: upload failed");
  return t;
}
std::vector<float> download_bf16(const Tensor& t) {
  std::vector<uint16_t> h(static_cast<size_t>(t.numel()));
  if (cudaMemcpy(h.data(), t.raw(), h.size() * 2, cudaMemcpyDeviceToHost) != cudaSuccess)
    throw am::DeviceError("test: download failed");
  return from_bf16(h);
}
std::vector<float> download_f32(const Tensor& t) {
  std::vector<float> h(static_cast<size_t>(t.numel()));
  if (cudaMemcpy(h.data(), t.raw(), h.size() * 4, cudaMemcpyDeviceToHost) != cudaSuccess)
    throw am::DeviceError("test: download failed");
  return h;
}
void poison(Tensor& t) {  // 0xFF bytes: NaN in bf16 and fp32
  cudaMemset(t.raw(), 0xFF, t.nbytes());
}

Tensor host_f32(const std::vector<float>& x, const Shape& s) {
  Tensor t = Tensor::empty(s, DType::F32);
  std::memcpy(t.raw(), x.data(), x.size() * 4);
  return t;
}
std::vector<float> host_vec(const Tensor& t) {
  const float* p = t.data<float>();
  return std::vector<float>(p, p + t.numel());
}

double rel_err(const std::vector<float>& got, const std::vector<float>& ref, size_t* nonfinite = nullptr) {
  double num = 0, den = 0;
  size_t bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) {
      ++bad;
      continue;
    }
    const double d = static_cast<double>(got[i]) - ref[i];
    num += d * d;
    den += static_cast<double>(ref[i]) * ref[i];
  }
  if (nonfinite) *nonfinite = bad;
  if (bad) return std::numeric_limits<double>::infinity();
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

struct Case {
  int B, T, nh, nkv, D, window, seg_mode;  // seg_mode: 0 none, 1 packed docs, 2 docs + padding tail,
                                           // 3 docs with padding runs in the middle and at the end
};

std::string case_name(const Case& c) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "B%d T%d nh%d nkv%d D%d win%d seg%d", c.B, c.T, c.nh, c.nkv, c.D, c.window,
                c.seg_mode);
  return buf;
}

std::vector<int32_t> make_segments(const Case& c, std::mt19937& rng) {
  std::vector<int32_t> seg(static_cast<size_t>(c.B) * c.T, 0);
  std::uniform_int_distribution<int> len(1, std::max(2, c.T / 3));
  for (int b = 0; b < c.B; ++b) {
    int t = 0, id = 0;
    // mode 2: last quarter is padding; mode 3: random padding runs, and a long one in the middle
    const int pad_from = c.seg_mode == 2 ? c.T - c.T / 4 : c.T;
    while (t < c.T) {
      int n = len(rng);
      const bool pad = (c.seg_mode == 3 && (rng() % 4 == 0)) || t >= pad_from;
      for (int x = 0; x < n && t < c.T; ++x, ++t) seg[static_cast<size_t>(b) * c.T + t] = pad ? -1 : id;
      if (!pad) ++id;
    }
    if (c.seg_mode == 3 && c.T >= 200)  // a padding stretch longer than a query tile
      for (int t2 = c.T / 3; t2 < c.T / 3 + 140 && t2 < c.T; ++t2) seg[static_cast<size_t>(b) * c.T + t2] = -1;
  }
  return seg;
}

// Kernel variants (AttnTuning; 0 = auto picks one of them): all by default; AM_ATTN_FWD_VARIANTS /
// AM_ATTN_BWD_VARIANTS ("1,4") narrow them.
std::vector<int> variants(const char* env, int n) {
  std::vector<int> v;
  if (const char* e = std::getenv(env)) {
    for (const char* p = e; *p;) {
      char* end = nullptr;
      const long x = std::strtol(p, &end, 10);
      if (end == p) break;
      v.push_back(static_cast<int>(x));
      p = *end ? end + 1 : end;
    }
  }
  if (v.empty())
    for (int i = 1; i <= n; ++i) v.push_back(i);
  return v;
}

struct Errors {
  double out = 0, lse = 0, dq = 0, dk = 0, dv = 0;
};

class CudaAttention : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!have_device()) GTEST_SKIP() << "no CUDA device visible";
    saved_ = am::cuda::attention_tuning();
  }
  void TearDown() override { am::cuda::attention_tuning() = saved_; }
  am::cuda::AttnTuning saved_;
};

// Runs one case against the CPU reference for every forward variant x backward variant x split mode.
void run_case(const Case& c, uint32_t seed, double* worst_fwd, double* worst_bwd) {
  std::mt19937 rng(seed);
  const int64_t B = c.B, T = c.T, nh = c.nh, nkv = c.nkv, D = c.D;
  const Shape qs{B, T, nh, D}, ks{B, T, nkv, D}, ls{B, nh, T};
  auto q = randn_bf16(B * T * nh * D, rng), k = randn_bf16(B * T * nkv * D, rng),
       v = randn_bf16(B * T * nkv * D, rng), dout = randn_bf16(B * T * nh * D, rng);
  std::vector<int32_t> seg;
  if (c.seg_mode) seg = make_segments(c, rng);

  // ---- CPU reference ----
  am::AttnParams p;
  p.batch = B;
  p.seq = T;
  p.n_heads = nh;
  p.n_kv_heads = nkv;
  p.head_dim = D;
  p.scale = 1.f / std::sqrt(static_cast<float>(D));
  p.sliding_window = c.window;
  Tensor hseg;
  if (c.seg_mode) {
    hseg = Tensor::empty({B, T}, DType::I32);
    std::memcpy(hseg.raw(), seg.data(), seg.size() * 4);
    p.segment_ids = &hseg;
  }
  Tensor hq = host_f32(q, qs), hk = host_f32(k, ks), hv = host_f32(v, ks), hdo = host_f32(dout, qs);
  Tensor hout = Tensor::empty(qs, DType::F32), hlse = Tensor::empty(ls, DType::F32);
  am::ops::attention_fwd(hq, hk, hv, p, hout, hlse);
  Tensor hdq = Tensor::empty(qs, DType::F32), hdk = Tensor::empty(ks, DType::F32), hdv = Tensor::empty(ks, DType::F32);
  am::ops::attention_bwd(hq, hk, hv, hout, hlse, hdo, p, hdq, hdk, hdv);
  const auto ref_out = host_vec(hout), ref_lse = host_vec(hlse), ref_dq = host_vec(hdq), ref_dk = host_vec(hdk),
             ref_dv = host_vec(hdv);

  // ---- device ----
  Tensor dq_in = upload_bf16(q, qs), dk_in = upload_bf16(k, ks), dv_in = upload_bf16(v, ks),
         ddo = upload_bf16(dout, qs);
  Tensor dseg;
  am::AttnParams dp = p;
  dp.segment_ids = nullptr;
  if (c.seg_mode) {
    dseg = dev_empty({B, T}, DType::I32);
    ASSERT_EQ(cudaMemcpy(dseg.raw(), seg.data(), seg.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
    dp.segment_ids = &dseg;
  }
  Tensor dout_t = dev_empty(qs, DType::BF16), dlse = dev_empty(ls, DType::F32);
  Tensor gdq = dev_empty(qs, DType::BF16), gdk = dev_empty(ks, DType::BF16), gdv = dev_empty(ks, DType::BF16);

  const int group = c.nh / c.nkv;
  for (int fv : variants("AM_ATTN_FWD_VARIANTS", 5)) {
    am::cuda::attention_tuning().fwd_variant = fv;
    poison(dout_t);
    poison(dlse);
    am::cuda::attention_fwd(dq_in, dk_in, dv_in, dp, dout_t, dlse);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << case_name(c) << " fwd variant " << fv;
    const auto out = download_bf16(dout_t);
    const auto lse = download_f32(dlse);
    size_t nf = 0;
    Errors e;
    e.out = rel_err(out, ref_out, &nf);
    EXPECT_EQ(nf, 0u) << case_name(c) << " fwd variant " << fv << ": non-finite outputs (unwritten?)";
    size_t lse_bad = 0, pad_bad = 0;
    for (size_t i = 0; i < ref_lse.size(); ++i) {
      if (std::isinf(ref_lse[i])) {
        if (!(std::isinf(lse[i]) && lse[i] < 0)) ++lse_bad;
      } else if (!std::isfinite(lse[i])) {
        ++lse_bad;
      } else {
        e.lse = std::max(e.lse, static_cast<double>(std::fabs(lse[i] - ref_lse[i])));
      }
    }
    // rows that see nothing must be exactly zero
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < nh; ++h)
          if (std::isinf(ref_lse[(b * nh + h) * T + t]))
            for (int64_t d = 0; d < D; ++d)
              if (out[((b * T + t) * nh + h) * D + d] != 0.f) ++pad_bad;
    EXPECT_EQ(lse_bad, 0u) << case_name(c) << " fwd variant " << fv << ": lse -inf / finiteness mismatches";
    EXPECT_EQ(pad_bad, 0u) << case_name(c) << " fwd variant " << fv << ": padding rows not zero";
    EXPECT_LT(e.out, 1e-2) << case_name(c) << " fwd variant " << fv;
    EXPECT_LT(e.lse, 2e-3) << case_name(c) << " fwd variant " << fv;
    *worst_fwd = std::max(*worst_fwd, e.out);
    std::printf("  %-40s fwd v%d: out rel %.2e  lse max abs %.2e\n", case_name(c).c_str(), fv, e.out, e.lse);

    // Forward determinism (no atomics): a second run must match bit for bit.
    if (fv == 1 || fv == 4) {
      Tensor out2 = dev_empty(qs, DType::BF16), lse2 = dev_empty(ls, DType::F32);
      poison(out2);
      am::cuda::attention_fwd(dq_in, dk_in, dv_in, dp, out2, lse2);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const auto o2 = download_bf16(out2);
      EXPECT_EQ(std::memcmp(o2.data(), out.data(), o2.size() * 4), 0) << case_name(c) << ": forward not repeatable";
    }
  }

  // Backward from the device forward's out / lse (what training does).
  am::cuda::attention_tuning().fwd_variant = 0;
  am::cuda::attention_fwd(dq_in, dk_in, dv_in, dp, dout_t, dlse);
  std::vector<int> splits{1};
  if (group > 1) splits.push_back(0);  // auto: small cases split the whole group
  if (group >= 4) splits.push_back(2);
  for (int bv : variants("AM_ATTN_BWD_VARIANTS", 4))
    for (int sp : splits) {
      am::cuda::attention_tuning().bwd_variant = bv;
      am::cuda::attention_tuning().bwd_split = sp;
      poison(gdq);
      poison(gdk);
      poison(gdv);
      am::cuda::attention_bwd(dq_in, dk_in, dv_in, dout_t, dlse, ddo, dp, gdq, gdk, gdv);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << case_name(c) << " bwd variant " << bv << " split " << sp;
      Errors e;
      size_t n1 = 0, n2 = 0, n3 = 0;
      e.dq = rel_err(download_bf16(gdq), ref_dq, &n1);
      e.dk = rel_err(download_bf16(gdk), ref_dk, &n2);
      e.dv = rel_err(download_bf16(gdv), ref_dv, &n3);
      const std::string tag = case_name(c) + " bwd variant " + std::to_string(bv) + " split " + std::to_string(sp);
      EXPECT_EQ(n1 + n2 + n3, 0u) << tag << ": non-finite gradients (unwritten?) dq " << n1 << " dk " << n2
                                  << " dv " << n3;
      EXPECT_LT(e.dq, 2e-2) << tag;
      EXPECT_LT(e.dk, 2e-2) << tag;
      EXPECT_LT(e.dv, 2e-2) << tag;
      *worst_bwd = std::max({*worst_bwd, e.dq, e.dk, e.dv});
      std::printf("  %-40s bwd v%d split %d: dq %.2e dk %.2e dv %.2e\n", case_name(c).c_str(), bv, sp, e.dq, e.dk,
                  e.dv);
    }
}

TEST_F(CudaAttention, MatchesCpuReference) {
  const std::vector<Case> cases = {
      {2, 77, 4, 4, 64, 0, 0},     {1, 200, 8, 2, 64, 0, 0},   {2, 130, 8, 1, 128, 0, 0},
      {1, 300, 4, 1, 128, 50, 0},  {2, 257, 8, 2, 64, 17, 2},  {3, 190, 8, 1, 128, 0, 3},
      {1, 64, 2, 1, 64, 1, 0},     {1, 1, 2, 2, 64, 0, 0},     {1, 513, 4, 4, 128, 300, 1},
      {2, 384, 8, 1, 64, 0, 0},    {1, 333, 8, 8, 128, 0, 3},  {1, 700, 8, 1, 64, 0, 3},
      {1, 1100, 4, 1, 128, 0, 0},  {2, 999, 8, 2, 64, 256, 0},
  };
  double wf = 0, wb = 0;
  uint32_t seed = 1234;
  for (const auto& c : cases) {
    run_case(c, seed++, &wf, &wb);
    if (HasFatalFailure()) return;
  }
  std::printf("CudaAttention worst rel error: forward out %.3e, backward %.3e\n", wf, wb);
}

// ---------------- generic kernels (attention_generic.h) through ops::attention_fwd/bwd ----------------
// Head dims the flash kernels lack (16, 32, 40, 96, 256, 192 / 128), sinks (+ dsinks, accumulated), soft-capping,
// fp32 tensors; each with GQA, windows or packed segments with padding. Inputs are bf16-exact; the CPU
// reference runs on fp32 host copies. `direct` cases call am::cuda::attention_generic_* themselves (so the
// generic kernels are also checked on the flash kernels' head dims, which the router would send to flash).

struct GenCase {
  int B, T, nh, nkv, D, Dv, window, seg_mode;
  float softcap;
  int sinks;  // 0: none, 1: fp32 sinks, 2: bf16 sinks (the model's working copy)
  DType dt;
  bool direct;
};

std::string gen_name(const GenCase& c) {
  char buf[200];
  std::snprintf(buf, sizeof buf, "B%d T%d nh%d nkv%d D%d Dv%d win%d seg%d cap%g sinks%d %s%s", c.B, c.T, c.nh, c.nkv,
                c.D, c.Dv, c.window, c.seg_mode, c.softcap, c.sinks, am::dtype_name(c.dt),
                c.direct ? " direct" : "");
  return buf;
}

Tensor upload_as(const std::vector<float>& x, const Shape& s, DType dt) {
  if (dt == DType::BF16) return upload_bf16(x, s);
  Tensor t = dev_empty(s, DType::F32);
  if (cudaMemcpy(t.raw(), x.data(), x.size() * 4, cudaMemcpyHostToDevice) != cudaSuccess)
    throw am::DeviceError("test: upload failed");
  return t;
}
std::vector<float> download_as_f32(const Tensor& t) {
  return t.dtype() == DType::BF16 ? download_bf16(t) : download_f32(t);
}

void run_generic_case(const GenCase& c, uint32_t seed, double* worst) {
  std::mt19937 rng(seed);
  const int64_t B = c.B, T = c.T, nh = c.nh, nkv = c.nkv, D = c.D, Dv = c.Dv;
  const Shape qs{B, T, nh, D}, ks{B, T, nkv, D}, vs{B, T, nkv, Dv}, os{B, T, nh, Dv}, ls{B, nh, T};
  auto q = randn_bf16(B * T * nh * D, rng), k = randn_bf16(B * T * nkv * D, rng), v = randn_bf16(B * T * nkv * Dv, rng),
       dout = randn_bf16(B * T * nh * Dv, rng);
  // Sinks around the typical row logsumexp so they matter (gpt_oss's learned values are O(1)).
  std::vector<float> sinks = randn_bf16(nh, rng, 1.5f);
  std::vector<int32_t> seg;
  if (c.seg_mode) seg = make_segments(Case{c.B, c.T, c.nh, c.nkv, c.D, c.window, c.seg_mode}, rng);
  const std::string tag = gen_name(c);

  // ---- CPU reference ----
  am::AttnParams p;
  p.batch = B;
  p.seq = T;
  p.n_heads = nh;
  p.n_kv_heads = nkv;
  p.head_dim = D;
  p.v_head_dim = Dv == D ? 0 : Dv;
  p.scale = 1.f / std::sqrt(static_cast<float>(D));
  p.sliding_window = c.window;
  p.softcap = c.softcap;
  Tensor hseg, hsinks = host_f32(sinks, {nh}), hdsinks = Tensor::zeros({nh}, DType::F32);
  if (c.seg_mode) {
    hseg = Tensor::empty({B, T}, DType::I32);
    std::memcpy(hseg.raw(), seg.data(), seg.size() * 4);
    p.segment_ids = &hseg;
  }
  if (c.sinks) p.sinks = &hsinks;
  Tensor hq = host_f32(q, qs), hk = host_f32(k, ks), hv = host_f32(v, vs), hdo = host_f32(dout, os);
  Tensor hout = Tensor::empty(os, DType::F32), hlse = Tensor::empty(ls, DType::F32);
  am::ops::attention_fwd(hq, hk, hv, p, hout, hlse);
  Tensor hdq = Tensor::empty(qs, DType::F32), hdk = Tensor::empty(ks, DType::F32), hdv = Tensor::empty(vs, DType::F32);
  am::ops::attention_bwd(hq, hk, hv, hout, hlse, hdo, p, hdq, hdk, hdv, c.sinks ? &hdsinks : nullptr);
  const auto ref_out = host_vec(hout), ref_lse = host_vec(hlse), ref_dq = host_vec(hdq), ref_dk = host_vec(hdk),
             ref_dv = host_vec(hdv), ref_dsinks = host_vec(hdsinks);
  // Scale of each head's dsinks sum (its terms have both signs): sum_i e^(s_h - lse_i) |dout_i . out_i|.
  std::vector<double> dsink_scale(static_cast<size_t>(nh), 0.0);
  if (c.sinks)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < nh; ++h)
        for (int64_t t = 0; t < T; ++t) {
          const float L = ref_lse[(b * nh + h) * T + t];
          if (std::isinf(L)) continue;
          double dd = 0;
          for (int64_t x = 0; x < Dv; ++x)
            dd += static_cast<double>(dout[((b * T + t) * nh + h) * Dv + x]) * ref_out[((b * T + t) * nh + h) * Dv + x];
          dsink_scale[h] += std::exp(static_cast<double>(sinks[h]) - L) * std::fabs(dd);
        }

  // ---- device ----
  const bool f32 = c.dt == DType::F32;
  const double tol_out = f32 ? 1e-4 : 1e-2, tol_lse = f32 ? 1e-4 : 2e-3, tol_grad = f32 ? 1e-4 : 2e-2;
  Tensor dq_in = upload_as(q, qs, c.dt), dk_in = upload_as(k, ks, c.dt), dv_in = upload_as(v, vs, c.dt),
         ddo = upload_as(dout, os, c.dt);
  Tensor dseg, dsinks_t, ddsinks;
  am::AttnParams dp = p;
  dp.segment_ids = nullptr;
  dp.sinks = nullptr;
  if (c.seg_mode) {
    dseg = dev_empty({B, T}, DType::I32);
    ASSERT_EQ(cudaMemcpy(dseg.raw(), seg.data(), seg.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
    dp.segment_ids = &dseg;
  }
  constexpr float kDsinksInit = 0.25f;  // dsinks accumulate: start from a known non-zero value
  if (c.sinks) {
    dsinks_t = upload_as(sinks, {nh}, c.sinks == 2 ? DType::BF16 : DType::F32);
    dp.sinks = &dsinks_t;
    ddsinks = upload_as(std::vector<float>(static_cast<size_t>(nh), kDsinksInit), {nh}, DType::F32);
  }
  Tensor out = dev_empty(os, c.dt), lse = dev_empty(ls, DType::F32);
  poison(out);
  poison(lse);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  if (c.direct)
    am::cuda::attention_generic_fwd(dq_in, dk_in, dv_in, dp, out, lse);
  else
    am::ops::attention_fwd(dq_in, dk_in, dv_in, dp, out, lse);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << tag << " fwd";
  const auto got_out = download_as_f32(out), got_lse = download_f32(lse);
  size_t nf = 0, lse_bad = 0, pad_bad = 0;
  const double e_out = rel_err(got_out, ref_out, &nf);
  double e_lse = 0;
  for (size_t i = 0; i < ref_lse.size(); ++i) {
    if (std::isinf(ref_lse[i])) {
      if (!(std::isinf(got_lse[i]) && got_lse[i] < 0)) ++lse_bad;
    } else if (!std::isfinite(got_lse[i])) {
      ++lse_bad;
    } else {
      e_lse = std::max(e_lse, static_cast<double>(std::fabs(got_lse[i] - ref_lse[i])));
    }
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < nh; ++h)
        if (std::isinf(ref_lse[(b * nh + h) * T + t]))
          for (int64_t x = 0; x < Dv; ++x)
            if (got_out[((b * T + t) * nh + h) * Dv + x] != 0.f) ++pad_bad;
  EXPECT_EQ(nf, 0u) << tag << ": non-finite outputs (unwritten?)";
  EXPECT_EQ(lse_bad, 0u) << tag << ": lse -inf / finiteness mismatches";
  EXPECT_EQ(pad_bad, 0u) << tag << ": rows that see no key are not zero";
  EXPECT_LT(e_out, tol_out) << tag;
  EXPECT_LT(e_lse, tol_lse) << tag;

  // Backward from the device forward's out / lse (as training does), twice: dq/dk/dv use no atomics, so the
  // second run must match the first bit for bit.
  Tensor gdq = dev_empty(qs, c.dt), gdk = dev_empty(ks, c.dt), gdv = dev_empty(vs, c.dt);
  std::vector<float> first[3];
  for (int run = 0; run < 2; ++run) {
    poison(gdq);
    poison(gdk);
    poison(gdv);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    Tensor* dsp = c.sinks && run == 0 ? &ddsinks : nullptr;  // accumulate once
    if (c.direct)
      am::cuda::attention_generic_bwd(dq_in, dk_in, dv_in, out, lse, ddo, dp, gdq, gdk, gdv, dsp);
    else
      am::ops::attention_bwd(dq_in, dk_in, dv_in, out, lse, ddo, dp, gdq, gdk, gdv, dsp);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << tag << " bwd";
    const std::vector<float> g[3] = {download_as_f32(gdq), download_as_f32(gdk), download_as_f32(gdv)};
    if (run == 1) {
      const char* names[3] = {"dq", "dk", "dv"};
      for (int x = 0; x < 3; ++x)
        EXPECT_EQ(std::memcmp(g[x].data(), first[x].data(), g[x].size() * 4), 0)
            << tag << ": backward not repeatable (" << names[x] << ")";
      break;
    }
    size_t n1 = 0, n2 = 0, n3 = 0;
    const double edq = rel_err(g[0], ref_dq, &n1), edk = rel_err(g[1], ref_dk, &n2), edv = rel_err(g[2], ref_dv, &n3);
    EXPECT_EQ(n1 + n2 + n3, 0u) << tag << ": non-finite gradients (unwritten?) dq " << n1 << " dk " << n2 << " dv "
                                << n3;
    EXPECT_LT(edq, tol_grad) << tag;
    EXPECT_LT(edk, tol_grad) << tag;
    EXPECT_LT(edv, tol_grad) << tag;
    double e_sink = 0;
    if (c.sinks) {
      const auto got = download_f32(ddsinks);
      for (int64_t h = 0; h < nh; ++h) {
        const double err = std::fabs((static_cast<double>(got[h]) - kDsinksInit) - ref_dsinks[h]);
        const double scale = std::max(1e-6, dsink_scale[h]);
        e_sink = std::max(e_sink, err / scale);
        EXPECT_TRUE(std::isfinite(got[h])) << tag << ": dsinks[" << h << "]";
      }
      EXPECT_LT(e_sink, tol_grad) << tag << ": dsinks (error relative to the sum of |terms|)";
    }
    *worst = std::max({*worst, e_out, edq, edk, edv, e_sink});
    std::printf("  %-72s out %.2e lse %.2e dq %.2e dk %.2e dv %.2e dsinks %.2e\n", tag.c_str(), e_out, e_lse, edq,
                edk, edv, e_sink);
    for (int x = 0; x < 3; ++x) first[x] = g[x];
  }
}

TEST_F(CudaAttention, GenericMatchesCpuReference) {
  const DType bf = DType::BF16, f32 = DType::F32;
  const std::vector<GenCase> cases = {
      // B, T, nh, nkv, D, Dv, window, seg, softcap, sinks, dtype, direct
      {2, 77, 4, 4, 32, 32, 0, 0, 0.f, 0, bf, false},       // head dim 32 (the qwen3 golden's)
      {1, 33, 4, 2, 16, 16, 0, 1, 0.f, 0, bf, false},       // 16 (the tiny goldens)
      {1, 300, 4, 1, 40, 40, 0, 0, 0.f, 0, bf, false},      // 40: not a multiple of 32, GQA 4
      // bf16 D 96 / 256 with Dv == D: direct, because ops:: sends them to the flash kernels when
      // AM_ALLOW_UNVERIFIED_CUDA=1 (checked by FlashHeadDim96* / FlashHeadDim256* / FlashSoftcap* below).
      {1, 150, 8, 2, 96, 96, 0, 2, 0.f, 0, bf, true},       // Phi-3's 96, packed + padding tail
      {2, 130, 4, 4, 96, 96, 40, 0, 0.f, 0, bf, true},      // 96 + sliding window
      {2, 100, 4, 4, 192, 128, 0, 1, 0.f, 0, bf, true},     // DeepSeek MLA: D 192, Dv 128 (flash: FlashMlaDims*)
      {1, 210, 8, 8, 192, 128, 0, 3, 0.f, 0, bf, true},     // MLA + padding runs
      {1, 200, 8, 4, 256, 256, 64, 0, 0.f, 0, bf, true},    // Gemma 3's 256 + window
      {1, 257, 4, 1, 256, 256, 0, 3, 0.f, 0, bf, true},     // 256, GQA 4, padding runs
      {2, 90, 8, 4, 256, 256, 32, 3, 1.5f, 0, bf, true},    // Gemma 2: 256 + soft-cap + window + padding
      {1, 70, 4, 1, 96, 96, 0, 0, 5.f, 1, bf, true},        // soft-cap + sinks + GQA 4
      // D 64 + sinks: direct, because ops:: sends bf16 D 64 / 128 sinks to the flash kernels when
      // AM_ALLOW_UNVERIFIED_CUDA=1 (which these tests set); the flash path is checked by FlashSinks* below.
      {1, 130, 8, 2, 64, 64, 0, 0, 0.f, 1, bf, true},       // gpt_oss: 64 + sinks
      {1, 100, 4, 2, 64, 64, 0, 1, 3.f, 0, bf, true},       // soft-cap on a flash head dim
      {2, 120, 8, 2, 64, 64, 16, 3, 0.f, 2, bf, true},      // sinks (bf16) + window + padding runs
      {1, 1, 2, 1, 256, 256, 0, 0, 0.f, 1, bf, true},       // T = 1
      {1, 65, 4, 2, 128, 64, 0, 2, 0.f, 0, f32, false},     // fp32, Dv != D
      {1, 64, 4, 4, 64, 64, 0, 0, 2.f, 1, f32, false},      // fp32, soft-cap, sinks
      {2, 140, 8, 2, 64, 64, 0, 3, 0.f, 0, bf, true},       // the generic kernels on flash shapes
      {1, 170, 4, 1, 128, 128, 50, 0, 0.f, 0, bf, true},
  };
  double worst = 0;
  uint32_t seed = 777;
  for (const auto& c : cases) {
    run_generic_case(c, seed++, &worst);
    if (HasFatalFailure()) return;
  }
  std::printf("CudaAttention generic: worst error %.3e\n", worst);
}

// Head dims beyond the generic kernels' limit are refused with a DeviceError that names the limit; shape
// errors on CUDA tensors are still the front-end's ShapeError naming the op.
TEST_F(CudaAttention, GenericRejectsWhatItCannotTake) {
  am::AttnParams p;
  p.batch = 1;
  p.seq = 8;
  p.n_heads = 2;
  p.n_kv_heads = 1;
  p.head_dim = 512;
  p.scale = 0.05f;
  {
    Tensor q = dev_empty({1, 8, 2, 512}, DType::BF16), k = dev_empty({1, 8, 1, 512}, DType::BF16),
           v = dev_empty({1, 8, 1, 512}, DType::BF16), o = dev_empty({1, 8, 2, 512}, DType::BF16),
           l = dev_empty({1, 2, 8}, DType::F32);
    try {
      am::ops::attention_fwd(q, k, v, p, o, l);
      ADD_FAILURE() << "head_dim 512 was accepted";
    } catch (const am::DeviceError& e) {
      EXPECT_NE(std::string(e.what()).find("256"), std::string::npos) << e.what();
    }
  }
  p.head_dim = 96;
  Tensor q = dev_empty({1, 8, 2, 96}, DType::BF16), k = dev_empty({1, 8, 1, 96}, DType::BF16),
         v_bad = dev_empty({1, 8, 1, 64}, DType::BF16), o = dev_empty({1, 8, 2, 96}, DType::BF16),
         l = dev_empty({1, 2, 8}, DType::F32);
  try {
    am::ops::attention_fwd(q, k, v_bad, p, o, l);
    ADD_FAILURE() << "a v of the wrong shape was accepted";
  } catch (const am::ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("attention_fwd"), std::string::npos) << e.what();
  }
  Tensor v = dev_empty({1, 8, 1, 96}, DType::BF16), bad_sinks = dev_empty({3}, DType::F32);
  p.sinks = &bad_sinks;
  EXPECT_THROW(am::ops::attention_fwd(q, k, v, p, o, l), am::ShapeError);
  Tensor host_sinks = Tensor::zeros({2}, DType::F32);
  p.sinks = &host_sinks;
  EXPECT_THROW(am::ops::attention_fwd(q, k, v, p, o, l), am::DeviceError);
}

// The flash kernels themselves take only head dims 64, 96, 128 and 256 (ops::attention_fwd routes the others to
// the generic kernels).
TEST_F(CudaAttention, RejectsUnsupportedHeadDim) {
  am::AttnParams p;
  p.batch = 1;
  p.seq = 8;
  p.n_heads = 2;
  p.n_kv_heads = 1;
  p.head_dim = 80;
  p.scale = 0.1f;
  Tensor q = dev_empty({1, 8, 2, 80}, DType::BF16), k = dev_empty({1, 8, 1, 80}, DType::BF16),
         v = dev_empty({1, 8, 1, 80}, DType::BF16), o = dev_empty({1, 8, 2, 80}, DType::BF16),
         l = dev_empty({1, 2, 8}, DType::F32);
  EXPECT_THROW(am::cuda::attention_fwd(q, k, v, p, o, l), am::DeviceError);
}

TEST_F(CudaAttention, RejectsHostTensors) {
  am::AttnParams p;
  p.batch = 1;
  p.seq = 8;
  p.n_heads = 2;
  p.n_kv_heads = 1;
  p.head_dim = 64;
  p.scale = 0.125f;
  Tensor q = Tensor::empty({1, 8, 2, 64}, DType::BF16), k = dev_empty({1, 8, 1, 64}, DType::BF16),
         v = dev_empty({1, 8, 1, 64}, DType::BF16), o = dev_empty({1, 8, 2, 64}, DType::BF16),
         l = dev_empty({1, 2, 8}, DType::F32);
  EXPECT_THROW(am::cuda::attention_fwd(q, k, v, p, o, l), am::DeviceError);
}

// ---------------- flash kernels with gpt_oss sinks (written without a GPU: first device run pending) ----------------
// Head h's sink logit joins every row's softmax denominator (core/attn_params.h). The flash forward adds it to the
// final normaliser (finish_row in attention_common.cuh), so out and lse include it; the backward kernels are the
// unchanged ones (P = exp(S - lse) is already the sinked softmax) plus a reduction for
//   dsinks[h] += -sum_{b, i} e^(sink_h - lse_i) (dout_i . out_i).
// Checked against the CPU reference on the same bf16-exact inputs: out / lse from every forward variant (mma.sync
// 1-3, wgmma 4-5 on sm_90a; AM_ATTN_FWD_VARIANTS narrows them), dq / dk / dv / dsinks from every backward variant
// (mma.sync 1-3, wgmma 4) and split mode, with causal + sliding windows + packed segments with padding, GQA,
// D 64 (gpt_oss) and 128, fp32 and bf16 sinks (the model's CUDA working copy), sinks far above and far below
// the scores. dsinks must be ADDED (it starts from a non-zero value) and is bit-identical across all backward
// variants (its inputs, lse and Dsum, do not depend on them; the reduction has a fixed order).

struct SinkCase {
  int B, T, nh, nkv, D, window, seg_mode;
  float sink_shift;  // added to N(0, 1.5) sinks: +6 puts the sink above every score, -8 makes it negligible
  bool bf16_sinks;
};

std::string sink_name(const SinkCase& c) {
  char buf[200];
  std::snprintf(buf, sizeof buf, "B%d T%d nh%d nkv%d D%d win%d seg%d sink%+g %s", c.B, c.T, c.nh, c.nkv, c.D,
                c.window, c.seg_mode, c.sink_shift, c.bf16_sinks ? "bf16" : "f32");
  return buf;
}

void run_sink_case(const SinkCase& c, uint32_t seed, double* worst_fwd, double* worst_bwd) {
  std::mt19937 rng(seed);
  const int64_t B = c.B, T = c.T, nh = c.nh, nkv = c.nkv, D = c.D;
  const Shape qs{B, T, nh, D}, ks{B, T, nkv, D}, ls{B, nh, T};
  auto q = randn_bf16(B * T * nh * D, rng), k = randn_bf16(B * T * nkv * D, rng),
       v = randn_bf16(B * T * nkv * D, rng), dout = randn_bf16(B * T * nh * D, rng);
  std::vector<float> sinks = randn_bf16(nh, rng, 1.5f);
  for (auto& x : sinks) x = am::bf16_to_f32(am::f32_to_bf16(x + c.sink_shift));  // bf16-exact: fp32 == bf16 copy
  std::vector<int32_t> seg;
  if (c.seg_mode) seg = make_segments(Case{c.B, c.T, c.nh, c.nkv, c.D, c.window, c.seg_mode}, rng);
  const std::string name = sink_name(c);

  // ---- CPU reference (fp32 copies, fp64 accumulation) ----
  am::AttnParams p;
  p.batch = B;
  p.seq = T;
  p.n_heads = nh;
  p.n_kv_heads = nkv;
  p.head_dim = D;
  p.scale = 1.f / std::sqrt(static_cast<float>(D));
  p.sliding_window = c.window;
  Tensor hseg, hsinks = host_f32(sinks, {nh}), hdsinks = Tensor::zeros({nh}, DType::F32);
  if (c.seg_mode) {
    hseg = Tensor::empty({B, T}, DType::I32);
    std::memcpy(hseg.raw(), seg.data(), seg.size() * 4);
    p.segment_ids = &hseg;
  }
  p.sinks = &hsinks;
  Tensor hq = host_f32(q, qs), hk = host_f32(k, ks), hv = host_f32(v, ks), hdo = host_f32(dout, qs);
  Tensor hout = Tensor::empty(qs, DType::F32), hlse = Tensor::empty(ls, DType::F32);
  am::ops::attention_fwd(hq, hk, hv, p, hout, hlse);
  Tensor hdq = Tensor::empty(qs, DType::F32), hdk = Tensor::empty(ks, DType::F32), hdv = Tensor::empty(ks, DType::F32);
  am::ops::attention_bwd(hq, hk, hv, hout, hlse, hdo, p, hdq, hdk, hdv, &hdsinks);
  const auto ref_out = host_vec(hout), ref_lse = host_vec(hlse), ref_dq = host_vec(hdq), ref_dk = host_vec(hdk),
             ref_dv = host_vec(hdv), ref_dsinks = host_vec(hdsinks);
  // Scale of each head's dsinks sum (terms of both signs): sum_i e^(s_h - lse_i) |dout_i . out_i|.
  std::vector<double> dsink_scale(static_cast<size_t>(nh), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < nh; ++h)
      for (int64_t t = 0; t < T; ++t) {
        const float L = ref_lse[(b * nh + h) * T + t];
        if (std::isinf(L)) continue;
        double dd = 0;
        for (int64_t x = 0; x < D; ++x)
          dd += static_cast<double>(dout[((b * T + t) * nh + h) * D + x]) * ref_out[((b * T + t) * nh + h) * D + x];
        dsink_scale[h] += std::exp(static_cast<double>(sinks[h]) - L) * std::fabs(dd);
      }

  // ---- device ----
  Tensor dq_in = upload_bf16(q, qs), dk_in = upload_bf16(k, ks), dv_in = upload_bf16(v, ks),
         ddo = upload_bf16(dout, qs);
  Tensor dseg, dsinks_t = upload_as(sinks, {nh}, c.bf16_sinks ? DType::BF16 : DType::F32);
  am::AttnParams dp = p;
  dp.segment_ids = nullptr;
  dp.sinks = &dsinks_t;
  if (c.seg_mode) {
    dseg = dev_empty({B, T}, DType::I32);
    ASSERT_EQ(cudaMemcpy(dseg.raw(), seg.data(), seg.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
    dp.segment_ids = &dseg;
  }
  Tensor out = dev_empty(qs, DType::BF16), lse = dev_empty(ls, DType::F32);

  for (int fv : variants("AM_ATTN_FWD_VARIANTS", 5)) {
    am::cuda::attention_tuning().fwd_variant = fv;
    poison(out);
    poison(lse);
    am::cuda::attention_fwd(dq_in, dk_in, dv_in, dp, out, lse);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << name << " fwd variant " << fv;
    const auto got = download_bf16(out);
    const auto got_lse = download_f32(lse);
    const std::string tag = name + " fwd variant " + std::to_string(fv);
    size_t nf = 0, lse_bad = 0, pad_bad = 0;
    const double e_out = rel_err(got, ref_out, &nf);
    double e_lse = 0;
    for (size_t i = 0; i < ref_lse.size(); ++i) {
      if (std::isinf(ref_lse[i])) {
        if (!(std::isinf(got_lse[i]) && got_lse[i] < 0)) ++lse_bad;
      } else if (!std::isfinite(got_lse[i])) {
        ++lse_bad;
      } else {
        e_lse = std::max(e_lse, static_cast<double>(std::fabs(got_lse[i] - ref_lse[i])));
      }
    }
    for (int64_t b = 0; b < B; ++b)  // rows that see no key (padding) ignore the sink: out 0, lse -inf
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < nh; ++h)
          if (std::isinf(ref_lse[(b * nh + h) * T + t]))
            for (int64_t d = 0; d < D; ++d)
              if (got[((b * T + t) * nh + h) * D + d] != 0.f) ++pad_bad;
    EXPECT_EQ(nf, 0u) << tag << ": non-finite outputs (unwritten?)";
    EXPECT_EQ(lse_bad, 0u) << tag << ": lse -inf / finiteness mismatches";
    EXPECT_EQ(pad_bad, 0u) << tag << ": padding rows not zero";
    EXPECT_LT(e_out, 1e-2) << tag;
    EXPECT_LT(e_lse, 2e-3) << tag;
    *worst_fwd = std::max(*worst_fwd, e_out);
    std::printf("  %-52s fwd v%d: out rel %.2e  lse max abs %.2e\n", name.c_str(), fv, e_out, e_lse);
  }

  // Backward from the device forward's out / lse (what training does); dsinks starts at kInit and must come back
  // as kInit + ref, with the same bits from every variant and split.
  am::cuda::attention_tuning().fwd_variant = 0;
  am::cuda::attention_fwd(dq_in, dk_in, dv_in, dp, out, lse);
  constexpr float kInit = 0.25f;
  const std::vector<float> init(static_cast<size_t>(nh), kInit);
  Tensor gdq = dev_empty(qs, DType::BF16), gdk = dev_empty(ks, DType::BF16), gdv = dev_empty(ks, DType::BF16);
  Tensor gds = dev_empty({nh}, DType::F32);
  std::vector<float> first_dsinks;
  const int group = c.nh / c.nkv;
  std::vector<int> splits{1};
  if (group > 1) splits.push_back(0);
  if (group >= 4) splits.push_back(2);
  for (int bv : variants("AM_ATTN_BWD_VARIANTS", 4))
    for (int sp : splits) {
      am::cuda::attention_tuning().bwd_variant = bv;
      am::cuda::attention_tuning().bwd_split = sp;
      poison(gdq);
      poison(gdk);
      poison(gdv);
      ASSERT_EQ(cudaMemcpy(gds.raw(), init.data(), init.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
      am::cuda::attention_bwd(dq_in, dk_in, dv_in, out, lse, ddo, dp, gdq, gdk, gdv, &gds);
      const std::string tag = name + " bwd variant " + std::to_string(bv) + " split " + std::to_string(sp);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << tag;
      size_t n1 = 0, n2 = 0, n3 = 0;
      const double edq = rel_err(download_bf16(gdq), ref_dq, &n1), edk = rel_err(download_bf16(gdk), ref_dk, &n2),
                   edv = rel_err(download_bf16(gdv), ref_dv, &n3);
      EXPECT_EQ(n1 + n2 + n3, 0u) << tag << ": non-finite gradients (unwritten?) dq " << n1 << " dk " << n2
                                  << " dv " << n3;
      EXPECT_LT(edq, 2e-2) << tag;
      EXPECT_LT(edk, 2e-2) << tag;
      EXPECT_LT(edv, 2e-2) << tag;
      const auto ds = download_f32(gds);
      double e_sink = 0;
      for (int64_t h = 0; h < nh; ++h) {
        EXPECT_TRUE(std::isfinite(ds[h])) << tag << ": dsinks[" << h << "]";
        const double err = std::fabs((static_cast<double>(ds[h]) - kInit) - ref_dsinks[h]);
        e_sink = std::max(e_sink, err / std::max(1e-6, dsink_scale[h]));
      }
      EXPECT_LT(e_sink, 2e-2) << tag << ": dsinks (error relative to the sum of |terms|)";
      if (first_dsinks.empty())
        first_dsinks = ds;
      else
        EXPECT_EQ(std::memcmp(ds.data(), first_dsinks.data(), ds.size() * 4), 0)
            << tag << ": dsinks differ from the first backward variant (the reduction must be deterministic)";
      *worst_bwd = std::max({*worst_bwd, edq, edk, edv, e_sink});
      std::printf("  %-52s bwd v%d split %d: dq %.2e dk %.2e dv %.2e dsinks %.2e\n", name.c_str(), bv, sp, edq, edk,
                  edv, e_sink);
    }

  // Without dsinks the backward still takes the sinked lse (no sink gradient wanted, e.g. frozen sinks).
  am::cuda::attention_tuning().bwd_variant = 0;
  am::cuda::attention_tuning().bwd_split = 0;
  poison(gdq);
  am::cuda::attention_bwd(dq_in, dk_in, dv_in, out, lse, ddo, dp, gdq, gdk, gdv, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << name << " bwd without dsinks";
  EXPECT_LT(rel_err(download_bf16(gdq), ref_dq), 2e-2) << name << " bwd without dsinks";
}

TEST_F(CudaAttention, FlashSinksMatchCpuReference) {
  const std::vector<SinkCase> cases = {
      // B, T, nh, nkv, D, window, seg, sink shift, bf16 sinks
      {1, 130, 8, 2, 64, 0, 0, 0.f, false},    // gpt_oss head dim, GQA 4, causal
      {2, 257, 8, 1, 64, 17, 2, 0.f, true},    // window + padding tail, GQA 8, bf16 sinks
      {1, 300, 8, 2, 64, 128, 3, 0.f, true},   // gpt_oss's sliding window 128 + padding runs (one longer than a tile)
      {2, 190, 4, 4, 128, 0, 1, 0.f, false},   // D 128, packed documents
      {1, 333, 8, 1, 128, 50, 3, 0.f, false},  // D 128, window, padding runs, GQA 8
      {1, 200, 4, 2, 64, 0, 0, 6.f, false},    // sink above every score: the max of the final normaliser
      {1, 150, 4, 1, 64, 0, 0, -8.f, true},    // negligible sink
      {1, 1, 2, 1, 64, 0, 0, 0.f, false},      // T = 1
      {2, 999, 8, 2, 64, 128, 1, 0.f, true},   // many tiles: packed documents + window 128
  };
  double wf = 0, wb = 0;
  uint32_t seed = 4321;
  for (const auto& c : cases) {
    run_sink_case(c, seed++, &wf, &wb);
    if (HasFatalFailure()) return;
  }
  std::printf("CudaAttention flash + sinks worst rel error: forward out %.3e, backward %.3e\n", wf, wb);
}

// Sinks of -inf add e^(-inf) = 0 to every normaliser: the forward must give the no-sink result bit for bit (the
// sink epilogue then reduces to the plain one exactly: max(m, -inf) = m, 2^0 = 1), and dsinks must not move.
// Guards the sink path's arithmetic against drifting from the no-sink path, on every forward variant.
TEST_F(CudaAttention, FlashSinksOfMinusInfinityChangeNothing) {
  const int64_t B = 2, T = 200, nh = 8, nkv = 2, D = 64;
  const Shape qs{B, T, nh, D}, ks{B, T, nkv, D}, ls{B, nh, T};
  std::mt19937 rng(99);
  Case c{2, 200, 8, 2, 64, 64, 3};
  Tensor q = upload_bf16(randn_bf16(B * T * nh * D, rng), qs), k = upload_bf16(randn_bf16(B * T * nkv * D, rng), ks),
         v = upload_bf16(randn_bf16(B * T * nkv * D, rng), ks), dout = upload_bf16(randn_bf16(B * T * nh * D, rng), qs);
  const auto seg = make_segments(c, rng);
  Tensor dseg = dev_empty({B, T}, DType::I32);
  ASSERT_EQ(cudaMemcpy(dseg.raw(), seg.data(), seg.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
  Tensor sinks = upload_as(std::vector<float>(nh, -std::numeric_limits<float>::infinity()), {nh}, DType::F32);
  am::AttnParams p;
  p.batch = B;
  p.seq = T;
  p.n_heads = nh;
  p.n_kv_heads = nkv;
  p.head_dim = D;
  p.scale = 0.125f;
  p.sliding_window = c.window;
  p.segment_ids = &dseg;
  am::AttnParams ps = p;
  ps.sinks = &sinks;
  Tensor o1 = dev_empty(qs, DType::BF16), o2 = dev_empty(qs, DType::BF16), l1 = dev_empty(ls, DType::F32),
         l2 = dev_empty(ls, DType::F32);
  for (int fv : variants("AM_ATTN_FWD_VARIANTS", 5)) {
    am::cuda::attention_tuning().fwd_variant = fv;
    poison(o2);
    poison(l2);
    am::cuda::attention_fwd(q, k, v, p, o1, l1);
    am::cuda::attention_fwd(q, k, v, ps, o2, l2);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << "fwd variant " << fv;
    const auto a = download_bf16(o1), b = download_bf16(o2), la = download_f32(l1), lb = download_f32(l2);
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0) << "fwd variant " << fv << ": out";
    EXPECT_EQ(std::memcmp(la.data(), lb.data(), la.size() * 4), 0) << "fwd variant " << fv << ": lse";
  }
  am::cuda::attention_tuning().fwd_variant = 0;
  am::cuda::attention_fwd(q, k, v, ps, o2, l2);
  Tensor dq = dev_empty(qs, DType::BF16), dk = dev_empty(ks, DType::BF16), dv = dev_empty(ks, DType::BF16);
  const std::vector<float> init{0.5f, -1.f, 2.f, 0.f, 3.f, -0.25f, 1.f, 7.f};
  Tensor ds = upload_as(init, {nh}, DType::F32);
  am::cuda::attention_bwd(q, k, v, o2, l2, dout, ps, dq, dk, dv, &ds);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(download_f32(ds), init) << "sinks of -inf must leave dsinks as they were";
}

// ops::attention_fwd/bwd send bf16 D 64 / 128 attention with sinks to the flash kernels only when
// AM_ALLOW_UNVERIFIED_CUDA=1 (these tests set it unless the environment says 0), else to the generic kernels.
// Both forwards are deterministic, and so is dsinks on either path: compare bit for bit with the path the gate
// selects.
TEST_F(CudaAttention, FlashSinksRoutingFollowsTheUnverifiedGate) {
  const int64_t B = 1, T = 150, nh = 8, nkv = 2, D = 64;
  const Shape qs{B, T, nh, D}, ks{B, T, nkv, D}, ls{B, nh, T};
  std::mt19937 rng(7);
  Tensor q = upload_bf16(randn_bf16(B * T * nh * D, rng), qs), k = upload_bf16(randn_bf16(B * T * nkv * D, rng), ks),
         v = upload_bf16(randn_bf16(B * T * nkv * D, rng), ks), dout = upload_bf16(randn_bf16(B * T * nh * D, rng), qs);
  Tensor sinks = upload_as(randn_bf16(nh, rng, 1.5f), {nh}, DType::BF16);  // the model's working copy
  am::AttnParams p;
  p.batch = B;
  p.seq = T;
  p.n_heads = nh;
  p.n_kv_heads = nkv;
  p.head_dim = D;
  p.scale = 0.125f;
  p.sliding_window = 128;
  p.sinks = &sinks;
  const bool flash = am::ops::unverified_cuda_allowed();
  std::printf("  AM_ALLOW_UNVERIFIED_CUDA %s: sinks expected on the %s kernels\n", flash ? "on" : "off",
              flash ? "flash" : "generic");
  am::cuda::attention_tuning().fwd_variant = 0;
  Tensor o_ops = dev_empty(qs, DType::BF16), l_ops = dev_empty(ls, DType::F32), o_dir = dev_empty(qs, DType::BF16),
         l_dir = dev_empty(ls, DType::F32);
  am::ops::attention_fwd(q, k, v, p, o_ops, l_ops);
  if (flash)
    am::cuda::attention_fwd(q, k, v, p, o_dir, l_dir);
  else
    am::cuda::attention_generic_fwd(q, k, v, p, o_dir, l_dir);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto a = download_bf16(o_ops), b = download_bf16(o_dir), la = download_f32(l_ops), lb = download_f32(l_dir);
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0) << "ops:: forward is not the expected path's";
  EXPECT_EQ(std::memcmp(la.data(), lb.data(), la.size() * 4), 0) << "ops:: lse is not the expected path's";

  Tensor dq = dev_empty(qs, DType::BF16), dk = dev_empty(ks, DType::BF16), dv = dev_empty(ks, DType::BF16);
  Tensor ds_ops = upload_as(std::vector<float>(nh, 0.f), {nh}, DType::F32),
         ds_dir = upload_as(std::vector<float>(nh, 0.f), {nh}, DType::F32);
  am::ops::attention_bwd(q, k, v, o_ops, l_ops, dout, p, dq, dk, dv, &ds_ops);
  if (flash)
    am::cuda::attention_bwd(q, k, v, o_ops, l_ops, dout, p, dq, dk, dv, &ds_dir);
  else
    am::cuda::attention_generic_bwd(q, k, v, o_ops, l_ops, dout, p, dq, dk, dv, &ds_dir);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto da = download_f32(ds_ops), db = download_f32(ds_dir);
  if (flash)  // the flash dsinks reduction has a fixed order; the generic one adds per-block atomics
    EXPECT_EQ(da, db) << "ops:: dsinks is not the flash path's";
  else
    for (int64_t h = 0; h < nh; ++h) EXPECT_NEAR(da[h], db[h], 1e-4f * (1.f + std::fabs(db[h])));
}

// ---------------- flash kernels: soft-capping, head dims 96 and 256 (written without a GPU: first device run pending) --
// Gemma 2 soft-capping (score = cap tanh(scale q.k / cap); the kernels take tanh of the raw scores right after Q K^T
// and multiply dS by 1 - tanh^2) on D 64 / 128 (mma.sync variant 1 and the wgmma kernels; the other tile variants
// run those) and on the new head dims; Phi-3's 96 and Gemma's 256 on the mma.sync kernels (every variant; wgmma
// variants fall back to 1 for them). Called through am::cuda::attention_fwd/bwd, so the flash kernels run whatever
// AM_ALLOW_UNVERIFIED_CUDA says. Same checks and budgets as FlashSinks*: out / lse from every forward variant, dq /
// dk / dv from every backward variant and split mode, causal + windows + packed segments with padding, GQA, T not a
// multiple of any tile, outputs poisoned first; optional sinks (with soft-capping) to cover the combination.

struct FlashCase {
  int B, T, nh, nkv, D, window, seg_mode;
  float softcap;
  bool sinks;
  int Dv = 0;  // v head dim; 0 = D (DeepSeek MLA: 192 / 128)
};

std::string flash_name(const FlashCase& c) {
  char buf[200];
  std::snprintf(buf, sizeof buf, "B%d T%d nh%d nkv%d D%d Dv%d win%d seg%d cap%g%s", c.B, c.T, c.nh, c.nkv, c.D,
                c.Dv > 0 ? c.Dv : c.D, c.window, c.seg_mode, c.softcap, c.sinks ? " sinks" : "");
  return buf;
}

void run_flash_case(const FlashCase& c, uint32_t seed, double* worst_fwd, double* worst_bwd) {
  std::mt19937 rng(seed);
  const int64_t B = c.B, T = c.T, nh = c.nh, nkv = c.nkv, D = c.D, Dv = c.Dv > 0 ? c.Dv : c.D;
  const Shape qs{B, T, nh, D}, ks{B, T, nkv, D}, vs{B, T, nkv, Dv}, os{B, T, nh, Dv}, ls{B, nh, T};
  // sd 2: raw scores of a few units, so a small cap actually bends them (tanh far from linear).
  const float sd = c.softcap > 0.f ? 2.f : 1.f;
  auto q = randn_bf16(B * T * nh * D, rng, sd), k = randn_bf16(B * T * nkv * D, rng, sd),
       v = randn_bf16(B * T * nkv * Dv, rng), dout = randn_bf16(B * T * nh * Dv, rng);
  std::vector<float> sinks = randn_bf16(nh, rng, 1.5f);
  std::vector<int32_t> seg;
  if (c.seg_mode) seg = make_segments(Case{c.B, c.T, c.nh, c.nkv, c.D, c.window, c.seg_mode}, rng);
  const std::string name = flash_name(c);

  // ---- CPU reference ----
  am::AttnParams p;
  p.batch = B;
  p.seq = T;
  p.n_heads = nh;
  p.n_kv_heads = nkv;
  p.head_dim = D;
  p.v_head_dim = Dv == D ? 0 : Dv;
  p.scale = 1.f / std::sqrt(static_cast<float>(D));
  p.sliding_window = c.window;
  p.softcap = c.softcap;
  Tensor hseg, hsinks = host_f32(sinks, {nh});
  if (c.seg_mode) {
    hseg = Tensor::empty({B, T}, DType::I32);
    std::memcpy(hseg.raw(), seg.data(), seg.size() * 4);
    p.segment_ids = &hseg;
  }
  if (c.sinks) p.sinks = &hsinks;
  Tensor hq = host_f32(q, qs), hk = host_f32(k, ks), hv = host_f32(v, vs), hdo = host_f32(dout, os);
  Tensor hout = Tensor::empty(os, DType::F32), hlse = Tensor::empty(ls, DType::F32);
  am::ops::attention_fwd(hq, hk, hv, p, hout, hlse);
  Tensor hdq = Tensor::empty(qs, DType::F32), hdk = Tensor::empty(ks, DType::F32), hdv = Tensor::empty(vs, DType::F32);
  am::ops::attention_bwd(hq, hk, hv, hout, hlse, hdo, p, hdq, hdk, hdv);
  const auto ref_out = host_vec(hout), ref_lse = host_vec(hlse), ref_dq = host_vec(hdq), ref_dk = host_vec(hdk),
             ref_dv = host_vec(hdv);

  // ---- device ----
  Tensor dq_in = upload_bf16(q, qs), dk_in = upload_bf16(k, ks), dv_in = upload_bf16(v, vs),
         ddo = upload_bf16(dout, os);
  Tensor dseg, dsinks_t = upload_as(sinks, {nh}, DType::F32);
  am::AttnParams dp = p;
  dp.segment_ids = nullptr;
  dp.sinks = c.sinks ? &dsinks_t : nullptr;
  if (c.seg_mode) {
    dseg = dev_empty({B, T}, DType::I32);
    ASSERT_EQ(cudaMemcpy(dseg.raw(), seg.data(), seg.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
    dp.segment_ids = &dseg;
  }
  Tensor out = dev_empty(os, DType::BF16), lse = dev_empty(ls, DType::F32);
  for (int fv : variants("AM_ATTN_FWD_VARIANTS", 5)) {
    am::cuda::attention_tuning().fwd_variant = fv;
    poison(out);
    poison(lse);
    am::cuda::attention_fwd(dq_in, dk_in, dv_in, dp, out, lse);
    const std::string tag = name + " fwd variant " + std::to_string(fv);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << tag;
    const auto got = download_bf16(out);
    const auto got_lse = download_f32(lse);
    size_t nf = 0, lse_bad = 0, pad_bad = 0;
    const double e_out = rel_err(got, ref_out, &nf);
    double e_lse = 0;
    for (size_t i = 0; i < ref_lse.size(); ++i) {
      if (std::isinf(ref_lse[i])) {
        if (!(std::isinf(got_lse[i]) && got_lse[i] < 0)) ++lse_bad;
      } else if (!std::isfinite(got_lse[i])) {
        ++lse_bad;
      } else {
        e_lse = std::max(e_lse, static_cast<double>(std::fabs(got_lse[i] - ref_lse[i])));
      }
    }
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < nh; ++h)
          if (std::isinf(ref_lse[(b * nh + h) * T + t]))
            for (int64_t d = 0; d < Dv; ++d)
              if (got[((b * T + t) * nh + h) * Dv + d] != 0.f) ++pad_bad;
    EXPECT_EQ(nf, 0u) << tag << ": non-finite outputs (unwritten?)";
    EXPECT_EQ(lse_bad, 0u) << tag << ": lse -inf / finiteness mismatches";
    EXPECT_EQ(pad_bad, 0u) << tag << ": padding rows not zero";
    EXPECT_LT(e_out, 1e-2) << tag;
    EXPECT_LT(e_lse, 2e-3) << tag;
    *worst_fwd = std::max(*worst_fwd, e_out);
    std::printf("  %-52s fwd v%d: out rel %.2e  lse max abs %.2e\n", name.c_str(), fv, e_out, e_lse);
    if (fv == 1) {  // forward determinism (no atomics)
      Tensor out2 = dev_empty(os, DType::BF16), lse2 = dev_empty(ls, DType::F32);
      poison(out2);
      am::cuda::attention_fwd(dq_in, dk_in, dv_in, dp, out2, lse2);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      EXPECT_EQ(std::memcmp(download_bf16(out2).data(), got.data(), got.size() * 4), 0)
          << tag << ": forward not repeatable";
    }
  }

  // Backward from the device forward's out / lse (what training does).
  am::cuda::attention_tuning().fwd_variant = 0;
  am::cuda::attention_fwd(dq_in, dk_in, dv_in, dp, out, lse);
  Tensor gdq = dev_empty(qs, DType::BF16), gdk = dev_empty(ks, DType::BF16), gdv = dev_empty(vs, DType::BF16);
  const int group = c.nh / c.nkv;
  std::vector<int> splits{1};
  if (group > 1) splits.push_back(0);
  if (group >= 4) splits.push_back(2);
  for (int bv : variants("AM_ATTN_BWD_VARIANTS", 4))
    for (int sp : splits) {
      am::cuda::attention_tuning().bwd_variant = bv;
      am::cuda::attention_tuning().bwd_split = sp;
      poison(gdq);
      poison(gdk);
      poison(gdv);
      am::cuda::attention_bwd(dq_in, dk_in, dv_in, out, lse, ddo, dp, gdq, gdk, gdv);
      const std::string tag = name + " bwd variant " + std::to_string(bv) + " split " + std::to_string(sp);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << tag;
      size_t n1 = 0, n2 = 0, n3 = 0;
      const double edq = rel_err(download_bf16(gdq), ref_dq, &n1), edk = rel_err(download_bf16(gdk), ref_dk, &n2),
                   edv = rel_err(download_bf16(gdv), ref_dv, &n3);
      EXPECT_EQ(n1 + n2 + n3, 0u) << tag << ": non-finite gradients (unwritten?) dq " << n1 << " dk " << n2
                                  << " dv " << n3;
      EXPECT_LT(edq, 2e-2) << tag;
      EXPECT_LT(edk, 2e-2) << tag;
      EXPECT_LT(edv, 2e-2) << tag;
      *worst_bwd = std::max({*worst_bwd, edq, edk, edv});
      std::printf("  %-52s bwd v%d split %d: dq %.2e dk %.2e dv %.2e\n", name.c_str(), bv, sp, edq, edk, edv);
    }
}

void run_flash_cases(const std::vector<FlashCase>& cases, uint32_t seed, const char* what) {
  double wf = 0, wb = 0;
  for (const auto& c : cases) {
    run_flash_case(c, seed++, &wf, &wb);
    if (::testing::Test::HasFatalFailure()) return;
  }
  std::printf("CudaAttention flash %s worst rel error: forward out %.3e, backward %.3e\n", what, wf, wb);
}

TEST_F(CudaAttention, FlashSoftcapMatchesCpuReference) {
  run_flash_cases(
      {
          // B, T, nh, nkv, D, window, seg, softcap, sinks, Dv (0 = D)
          {1, 130, 8, 2, 64, 0, 0, 5.f, false, 0},     // causal, GQA 4, a cap that bends the scores
          {2, 257, 8, 1, 64, 17, 2, 2.f, false, 0},    // window + padding tail, GQA 8, strong cap
          {2, 190, 4, 4, 128, 0, 1, 5.f, false, 0},    // D 128, packed documents
          {1, 333, 8, 1, 128, 50, 3, 30.f, false, 0},  // D 128, window, padding runs (one longer than a tile), GQA 8
          {1, 200, 4, 2, 64, 0, 0, 50.f, false, 0},    // Gemma 2's cap of 50: nearly linear
          {1, 150, 4, 1, 128, 0, 0, 3.f, true, 0},     // soft-cap + sinks
          {1, 1, 2, 1, 64, 0, 0, 5.f, false, 0},       // T = 1
          {2, 999, 8, 2, 64, 256, 1, 10.f, false, 0},  // many tiles: packed documents + window
      },
      5150, "softcap");
}

TEST_F(CudaAttention, FlashHeadDim96MatchesCpuReference) {
  run_flash_cases(
      {
          {2, 77, 4, 4, 96, 0, 0, 0.f, false, 0},     // Phi-3's head dim, MHA
          {1, 200, 8, 2, 96, 0, 0, 0.f, false, 0},    // GQA 4
          {1, 300, 8, 1, 96, 50, 2, 0.f, false, 0},   // window + padding tail, GQA 8
          {3, 190, 8, 2, 96, 0, 3, 0.f, false, 0},    // padding runs (one longer than a tile)
          {1, 513, 4, 4, 96, 300, 1, 0.f, false, 0},  // packed documents + window
          {1, 129, 4, 2, 96, 0, 0, 5.f, false, 0},    // soft-capped
          {1, 1, 2, 1, 96, 0, 0, 0.f, false, 0},      // T = 1
          {1, 1100, 4, 1, 96, 0, 0, 0.f, false, 0},   // many tiles
      },
      9696, "D96");
}

TEST_F(CudaAttention, FlashHeadDim256MatchesCpuReference) {
  run_flash_cases(
      {
          {1, 77, 4, 4, 256, 0, 0, 0.f, false, 0},     // Gemma's head dim, MHA
          {1, 200, 8, 4, 256, 64, 0, 0.f, false, 0},   // Gemma 3 shape: GQA 2 + window
          {1, 257, 4, 1, 256, 0, 3, 0.f, false, 0},    // GQA 4, padding runs (one longer than a tile)
          {2, 150, 8, 4, 256, 32, 2, 50.f, false, 0},  // Gemma 2: soft-cap 50 + window + padding tail
          {1, 190, 8, 2, 256, 0, 1, 5.f, false, 0},    // strong cap + packed documents
          {1, 130, 4, 1, 256, 0, 0, 0.f, true, 0},     // + sinks
          {1, 1, 2, 1, 256, 0, 0, 0.f, false, 0},      // T = 1
          {1, 600, 4, 2, 256, 0, 0, 0.f, false, 0},    // many tiles
      },
      256256, "D256");
}

// DeepSeek MLA: q / k head dim 192, v / out head dim 128 (DeepSeek-V2-Lite / V3 attention after the MLA
// up-projections), the only D != Dv pair the flash kernels take (no soft-capping with it).
TEST_F(CudaAttention, FlashMlaDimsMatchCpuReference) {
  run_flash_cases(
      {
          // B, T, nh, nkv, D, window, seg, softcap, sinks, Dv
          {2, 77, 4, 4, 192, 0, 0, 0.f, false, 128},     // MHA, as DeepSeek (nkv = nh)
          {1, 200, 16, 16, 192, 0, 1, 0.f, false, 128},  // V2-Lite's 16 heads, packed documents
          {1, 257, 8, 2, 192, 0, 3, 0.f, false, 128},    // GQA 4 (not DeepSeek, covers the split path), padding runs
          {2, 150, 4, 4, 192, 40, 2, 0.f, false, 128},   // window + padding tail
          {1, 130, 4, 1, 192, 0, 0, 0.f, true, 128},     // sinks, GQA 4
          {1, 1, 2, 2, 192, 0, 0, 0.f, false, 128},      // T = 1
          {1, 700, 4, 4, 192, 0, 0, 0.f, false, 128},    // many tiles
      },
      192128, "MLA 192/128");
}

// ops::attention_fwd/bwd send bf16 soft-capping, head dims 96 / 256 and MLA's 192 / 128 to the flash kernels only when
// AM_ALLOW_UNVERIFIED_CUDA=1 (these tests set it unless the environment says 0), else to the generic kernels. Both
// forwards are deterministic: compare bit for bit with the path the gate selects; the backward's dq uses atomics on
// the flash path, so the gradients are compared within a bf16 budget.
TEST_F(CudaAttention, FlashNewVariantsRoutingFollowsTheUnverifiedGate) {
  const bool flash = am::ops::unverified_cuda_allowed();
  std::printf("  AM_ALLOW_UNVERIFIED_CUDA %s: soft-capping / D 96 / D 256 / D 192 Dv 128 expected on the %s kernels\n",
              flash ? "on" : "off", flash ? "flash" : "generic");
  struct R {
    int64_t D, Dv;
    float cap;
  };
  for (const R r : {R{64, 64, 5.f}, R{96, 96, 0.f}, R{256, 256, 0.f}, R{256, 256, 50.f}, R{192, 128, 0.f}}) {
    const int64_t B = 1, T = 150, nh = 8, nkv = 2, D = r.D, Dv = r.Dv;
    const Shape qs{B, T, nh, D}, ks{B, T, nkv, D}, vs{B, T, nkv, Dv}, os{B, T, nh, Dv}, ls{B, nh, T};
    std::mt19937 rng(static_cast<uint32_t>(D));
    Tensor q = upload_bf16(randn_bf16(B * T * nh * D, rng), qs), k = upload_bf16(randn_bf16(B * T * nkv * D, rng), ks),
           v = upload_bf16(randn_bf16(B * T * nkv * Dv, rng), vs),
           dout = upload_bf16(randn_bf16(B * T * nh * Dv, rng), os);
    am::AttnParams p;
    p.batch = B;
    p.seq = T;
    p.n_heads = nh;
    p.n_kv_heads = nkv;
    p.head_dim = D;
    p.v_head_dim = Dv == D ? 0 : Dv;
    p.scale = 1.f / std::sqrt(static_cast<float>(D));
    p.sliding_window = 100;
    p.softcap = r.cap;
    const std::string tag = "D" + std::to_string(D) + " Dv" + std::to_string(Dv) + " cap" + std::to_string(r.cap);
    am::cuda::attention_tuning().fwd_variant = 0;
    am::cuda::attention_tuning().bwd_variant = 0;
    Tensor o_ops = dev_empty(os, DType::BF16), l_ops = dev_empty(ls, DType::F32), o_dir = dev_empty(os, DType::BF16),
           l_dir = dev_empty(ls, DType::F32);
    am::ops::attention_fwd(q, k, v, p, o_ops, l_ops);
    if (flash)
      am::cuda::attention_fwd(q, k, v, p, o_dir, l_dir);
    else
      am::cuda::attention_generic_fwd(q, k, v, p, o_dir, l_dir);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << tag;
    const auto a = download_bf16(o_ops), b = download_bf16(o_dir), la = download_f32(l_ops), lb = download_f32(l_dir);
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0) << tag << ": ops:: forward is not the expected path's";
    EXPECT_EQ(std::memcmp(la.data(), lb.data(), la.size() * 4), 0) << tag << ": ops:: lse is not the expected path's";
    Tensor dq1 = dev_empty(qs, DType::BF16), dk1 = dev_empty(ks, DType::BF16), dv1 = dev_empty(vs, DType::BF16),
           dq2 = dev_empty(qs, DType::BF16), dk2 = dev_empty(ks, DType::BF16), dv2 = dev_empty(vs, DType::BF16);
    am::ops::attention_bwd(q, k, v, o_ops, l_ops, dout, p, dq1, dk1, dv1);
    if (flash)
      am::cuda::attention_bwd(q, k, v, o_ops, l_ops, dout, p, dq2, dk2, dv2);
    else
      am::cuda::attention_generic_bwd(q, k, v, o_ops, l_ops, dout, p, dq2, dk2, dv2);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << tag;
    // dk / dv: no atomics on either path when the whole GQA group is one block (B 1, nkv 2: bwd_split may split
    // it on a large GPU, hence the tolerance rather than bits).
    EXPECT_LT(rel_err(download_bf16(dq1), download_bf16(dq2)), 1e-2) << tag << ": dq";
    EXPECT_LT(rel_err(download_bf16(dk1), download_bf16(dk2)), 1e-2) << tag << ": dk";
    EXPECT_LT(rel_err(download_bf16(dv1), download_bf16(dv2)), 1e-2) << tag << ": dv";
  }
}

}  // namespace
