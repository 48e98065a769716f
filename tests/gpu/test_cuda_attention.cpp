// CUDA flash attention (and, further down, the generic kernels: other head dims, sinks, soft-capping,
// Dv != D, fp32) against the CPU reference (am::ops::attention_fwd/bwd on fp32 copies of the same bf16 inputs). Random shapes with T not a multiple of any tile, GQA ratios 1/4/8, head dims 64/128,
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
      {1, 150, 8, 2, 96, 96, 0, 2, 0.f, 0, bf, false},      // Phi-3's 96, packed + padding tail
      {2, 130, 4, 4, 96, 96, 40, 0, 0.f, 0, bf, false},     // 96 + sliding window
      {2, 100, 4, 4, 192, 128, 0, 1, 0.f, 0, bf, false},    // DeepSeek MLA: D 192, Dv 128
      {1, 210, 8, 8, 192, 128, 0, 3, 0.f, 0, bf, false},    // MLA + padding runs
      {1, 200, 8, 4, 256, 256, 64, 0, 0.f, 0, bf, false},   // Gemma 3's 256 + window
      {1, 257, 4, 1, 256, 256, 0, 3, 0.f, 0, bf, false},    // 256, GQA 4, padding runs
      {2, 90, 8, 4, 256, 256, 32, 3, 1.5f, 0, bf, false},   // Gemma 2: 256 + soft-cap + window + padding
      {1, 70, 4, 1, 96, 96, 0, 0, 5.f, 1, bf, false},       // soft-cap + sinks + GQA 4
      {1, 130, 8, 2, 64, 64, 0, 0, 0.f, 1, bf, false},      // gpt_oss: 64 + sinks
      {2, 120, 8, 2, 64, 64, 16, 3, 0.f, 2, bf, false},     // sinks (bf16) + window + padding runs
      {1, 1, 2, 1, 256, 256, 0, 0, 0.f, 1, bf, false},      // T = 1
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

// The flash kernels themselves still take only head dims 64 and 128 (ops::attention_fwd routes the others to
// the generic kernels).
TEST_F(CudaAttention, RejectsUnsupportedHeadDim) {
  am::AttnParams p;
  p.batch = 1;
  p.seq = 8;
  p.n_heads = 2;
  p.n_kv_heads = 1;
  p.head_dim = 96;
  p.scale = 0.1f;
  Tensor q = dev_empty({1, 8, 2, 96}, DType::BF16), k = dev_empty({1, 8, 1, 96}, DType::BF16),
         v = dev_empty({1, 8, 1, 96}, DType::BF16), o = dev_empty({1, 8, 2, 96}, DType::BF16),
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

}  // namespace
