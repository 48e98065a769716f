// CUDA flash attention against the CPU reference (am::ops::attention_fwd/bwd on fp32 copies of the same
// bf16 inputs). Random shapes with T not a multiple of any tile, GQA ratios 1/4/8, head dims 64/128,
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
  am::ops::AttnParams p;
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
  am::ops::AttnParams dp = p;
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

TEST_F(CudaAttention, RejectsUnsupportedHeadDim) {
  am::ops::AttnParams p;
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
  am::ops::AttnParams p;
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
