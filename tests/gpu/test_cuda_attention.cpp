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
#include "attention_test_util.h"

namespace {

using namespace am::attn_test;

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

class CudaAttention : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!have_device()) GTEST_SKIP() << "no CUDA device visible";
    saved_ = am::cuda::attention_tuning();
  }
  void TearDown() override { am::cuda::attention_tuning() = saved_; }
  am::cuda::AttnTuning saved_;
};

// A case's segment ids (host and device; none when seg_mode is 0), drawn from rng after its inputs.
SegmentIds case_segments(const Case& c, std::mt19937& rng) {
  return SegmentIds(c.seg_mode ? make_segments(c, rng) : std::vector<int32_t>{}, c.B, c.T);
}

// One flash forward (variant fv) into poisoned out / lse, checked against the reference with the bf16 budgets
// (out 1e-2, lse max abs 2e-3); prints the errors (name padded to `width`) and raises *worst_fwd. *got: the output
// as fp32, for the callers' further checks.
void check_flash_forward(int fv, const DeviceInputs& d, const am::AttnParams& dp, Tensor& out, Tensor& lse,
                         const Reference& ref, const std::string& name, int width, double* worst_fwd,
                         std::vector<float>* got) {
  const std::string tag = name + " fwd variant " + std::to_string(fv);
  am::cuda::attention_tuning().fwd_variant = fv;
  poison(out);
  poison(lse);
  am::cuda::attention_fwd(d.q, d.k, d.v, dp, out, lse);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << tag;
  *got = download_bf16(out);
  const FwdErrors e = check_forward(*got, download_f32(lse), ref, dp, tag, 1e-2, 2e-3);
  *worst_fwd = std::max(*worst_fwd, e.out);
  std::printf("  %-*s fwd v%d: out rel %.2e  lse max abs %.2e\n", width, name.c_str(), fv, e.out, e.lse);
}

// Forward determinism (no atomics): a second run of the current variant into fresh buffers matches `got` bit for bit.
void expect_forward_repeatable(const DeviceInputs& d, const am::AttnParams& dp, const std::vector<float>& got,
                               const std::string& what) {
  const AttnShapes s = attn_shapes(dp);
  Tensor out2 = dev_empty(s.o, DType::BF16), lse2 = dev_empty(s.lse, DType::F32);
  poison(out2);
  am::cuda::attention_fwd(d.q, d.k, d.v, dp, out2, lse2);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(std::memcmp(download_bf16(out2).data(), got.data(), got.size() * 4), 0)
      << what << ": forward not repeatable";
}

// The backward's input, as training has it: out / lse from the device forward's auto variant.
void forward_for_backward(const DeviceInputs& d, const am::AttnParams& dp, Tensor& out, Tensor& lse) {
  am::cuda::attention_tuning().fwd_variant = 0;
  am::cuda::attention_fwd(d.q, d.k, d.v, dp, out, lse);
}

// One flash backward (variant bv, split mode sp) from out / lse into poisoned dq / dk / dv (dsinks, when given,
// accumulated into as it is), checked against the reference with the bf16 budget 2e-2.
void check_flash_backward(int bv, int sp, const DeviceInputs& d, const am::AttnParams& dp, const Tensor& out,
                          const Tensor& lse, Tensor& gdq, Tensor& gdk, Tensor& gdv, Tensor* dsinks,
                          const Reference& ref, const std::string& tag, GradErrors* e) {
  am::cuda::attention_tuning().bwd_variant = bv;
  am::cuda::attention_tuning().bwd_split = sp;
  poison(gdq);
  poison(gdk);
  poison(gdv);
  am::cuda::attention_bwd(d.q, d.k, d.v, out, lse, d.dout, dp, gdq, gdk, gdv, dsinks);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << tag;
  *e = check_grads(download_bf16(gdq), download_bf16(gdk), download_bf16(gdv), ref, tag, 2e-2);
}

// Every backward variant x split mode (bwd_splits) without sinks' gradient from out / lse, each checked by
// check_flash_backward; prints the errors (name padded to `width`) and raises *worst_bwd.
void check_flash_backwards(const DeviceInputs& d, const am::AttnParams& dp, const Tensor& out, const Tensor& lse,
                           const Reference& ref, const std::string& name, int width, double* worst_bwd) {
  const AttnShapes s = attn_shapes(dp);
  Tensor gdq = dev_empty(s.q, DType::BF16), gdk = dev_empty(s.k, DType::BF16), gdv = dev_empty(s.v, DType::BF16);
  for (int bv : variants("AM_ATTN_BWD_VARIANTS", 4))
    for (int sp : bwd_splits(dp.n_heads, dp.n_kv_heads)) {  // split 0 (auto): small cases split the whole group
      GradErrors e;
      const std::string tag = name + " bwd variant " + std::to_string(bv) + " split " + std::to_string(sp);
      ASSERT_NO_FATAL_FAILURE(check_flash_backward(bv, sp, d, dp, out, lse, gdq, gdk, gdv, nullptr, ref, tag, &e));
      *worst_bwd = std::max({*worst_bwd, e.dq, e.dk, e.dv});
      std::printf("  %-*s bwd v%d split %d: dq %.2e dk %.2e dv %.2e\n", width, name.c_str(), bv, sp, e.dq, e.dk, e.dv);
    }
}

// The kernels ops:: should have chosen: flash (am::cuda::attention_bwd) or the generic ones.
void gated_backward(bool flash, const DeviceInputs& d, const Tensor& out, const Tensor& lse, const am::AttnParams& p,
                    Tensor& dq, Tensor& dk, Tensor& dv, Tensor* dsinks) {
  if (flash)
    am::cuda::attention_bwd(d.q, d.k, d.v, out, lse, d.dout, p, dq, dk, dv, dsinks);
  else
    am::cuda::attention_generic_bwd(d.q, d.k, d.v, out, lse, d.dout, p, dq, dk, dv, dsinks);
}

// ops::attention_fwd against the kernels the gate selects (as gated_backward), on the same inputs: both forwards
// are deterministic, so out and lse must match bit for bit. *o_ops / *l_ops: ops::'s out and lse, for the backward.
// `tag` (may be empty) names the case in the failure messages.
void expect_ops_forward_follows_gate(const DeviceInputs& d, const am::AttnParams& p, bool flash,
                                     const std::string& tag, Tensor* o_ops, Tensor* l_ops) {
  const AttnShapes s = attn_shapes(p);
  *o_ops = dev_empty(s.o, DType::BF16);
  *l_ops = dev_empty(s.lse, DType::F32);
  Tensor o_dir = dev_empty(s.o, DType::BF16), l_dir = dev_empty(s.lse, DType::F32);
  am::ops::attention_fwd(d.q, d.k, d.v, p, *o_ops, *l_ops);
  if (flash)
    am::cuda::attention_fwd(d.q, d.k, d.v, p, o_dir, l_dir);
  else
    am::cuda::attention_generic_fwd(d.q, d.k, d.v, p, o_dir, l_dir);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << tag;
  const std::string pre = tag.empty() ? "" : tag + ": ";
  const auto a = download_bf16(*o_ops), b = download_bf16(o_dir), la = download_f32(*l_ops), lb = download_f32(l_dir);
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0) << pre << "ops:: forward is not the expected path's";
  EXPECT_EQ(std::memcmp(la.data(), lb.data(), la.size() * 4), 0) << pre << "ops:: lse is not the expected path's";
}

// Runs one case against the CPU reference for every forward variant x backward variant x split mode.
void run_case(const Case& c, uint32_t seed, double* worst_fwd, double* worst_bwd) {
  std::mt19937 rng(seed);
  const am::AttnParams p = attn_params(c.B, c.T, c.nh, c.nkv, c.D, 0, c.window);
  const AttnShapes s = attn_shapes(p);
  const HostInputs in = random_inputs(p, rng);
  const SegmentIds seg = case_segments(c, rng);
  const std::string name = case_name(c);
  const Reference ref = cpu_reference(p, in, seg);

  // ---- device ----
  const DeviceInputs d = upload_inputs(in, p);
  const am::AttnParams dp = device_params(p, seg, nullptr);
  Tensor dout_t = dev_empty(s.o, DType::BF16), dlse = dev_empty(s.lse, DType::F32);
  for (int fv : variants("AM_ATTN_FWD_VARIANTS", 5)) {
    std::vector<float> out;
    ASSERT_NO_FATAL_FAILURE(check_flash_forward(fv, d, dp, dout_t, dlse, ref, name, 40, worst_fwd, &out));
    if (fv == 1 || fv == 4) ASSERT_NO_FATAL_FAILURE(expect_forward_repeatable(d, dp, out, name));
  }
  forward_for_backward(d, dp, dout_t, dlse);
  check_flash_backwards(d, dp, dout_t, dlse, ref, name, 40, worst_bwd);
}

TEST_F(CudaAttention, MatchesCpuReference) {
  const std::vector<Case> cases = {
      {2, 77, 4, 4, 64, 0, 0},     {1, 200, 8, 2, 64, 0, 0},   {2, 130, 8, 1, 128, 0, 0},
      {1, 300, 4, 1, 128, 50, 0},  {2, 257, 8, 2, 64, 17, 2},  {3, 190, 8, 1, 128, 0, 3},
      {1, 64, 2, 1, 64, 1, 0},     {1, 1, 2, 2, 64, 0, 0},     {1, 513, 4, 4, 128, 300, 1},
      {2, 384, 8, 1, 64, 0, 0},    {1, 333, 8, 8, 128, 0, 3},  {1, 700, 8, 1, 64, 0, 3},
      {1, 1100, 4, 1, 128, 0, 0},  {2, 999, 8, 2, 64, 256, 0},
  };
  run_cases(cases, 1234, "CudaAttention", run_case);
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

void run_generic_case(const GenCase& c, uint32_t seed, double* worst) {
  std::mt19937 rng(seed);
  const am::AttnParams p = attn_params(c.B, c.T, c.nh, c.nkv, c.D, c.Dv, c.window, c.softcap);
  const AttnShapes s = attn_shapes(p);
  const int64_t nh = c.nh;
  const HostInputs in = random_inputs(p, rng);
  // Sinks around the typical row logsumexp so they matter (gpt_oss's learned values are O(1)).
  const std::vector<float> sinks = randn_bf16(nh, rng, 1.5f);
  const SegmentIds seg = case_segments(Case{c.B, c.T, c.nh, c.nkv, c.D, c.window, c.seg_mode}, rng);
  const std::string tag = gen_name(c);
  const Reference ref = cpu_reference(p, in, seg, c.sinks ? &sinks : nullptr, c.sinks != 0);
  const std::vector<double> dsink_scale =
      c.sinks ? dsink_scales(p, ref, in.dout, sinks) : std::vector<double>(static_cast<size_t>(nh), 0.0);

  // ---- device ----
  const bool f32 = c.dt == DType::F32;
  const double tol_out = f32 ? 1e-4 : 1e-2, tol_lse = f32 ? 1e-4 : 2e-3, tol_grad = f32 ? 1e-4 : 2e-2;
  const DeviceInputs d = upload_inputs(in, p, c.dt);
  Tensor dsinks_t, ddsinks;
  constexpr float kDsinksInit = 0.25f;  // dsinks accumulate: start from a known non-zero value
  if (c.sinks) {
    dsinks_t = upload_as(sinks, {nh}, c.sinks == 2 ? DType::BF16 : DType::F32);
    ddsinks = upload_as(std::vector<float>(static_cast<size_t>(nh), kDsinksInit), {nh}, DType::F32);
  }
  const am::AttnParams dp = device_params(p, seg, c.sinks ? &dsinks_t : nullptr);
  Tensor out = dev_empty(s.o, c.dt), lse = dev_empty(s.lse, DType::F32);
  poison(out);
  poison(lse);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  if (c.direct)
    am::cuda::attention_generic_fwd(d.q, d.k, d.v, dp, out, lse);
  else
    am::ops::attention_fwd(d.q, d.k, d.v, dp, out, lse);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << tag << " fwd";
  const FwdErrors ef = check_forward(download_as_f32(out), download_f32(lse), ref, p, tag, tol_out, tol_lse,
                                     "rows that see no key are not zero");

  // Backward from the device forward's out / lse (as training does), twice: dq/dk/dv use no atomics, so the
  // second run must match the first bit for bit.
  Tensor gdq = dev_empty(s.q, c.dt), gdk = dev_empty(s.k, c.dt), gdv = dev_empty(s.v, c.dt);
  std::vector<float> first[3];
  for (int run = 0; run < 2; ++run) {
    poison(gdq);
    poison(gdk);
    poison(gdv);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    Tensor* dsp = c.sinks && run == 0 ? &ddsinks : nullptr;  // accumulate once
    if (c.direct)
      am::cuda::attention_generic_bwd(d.q, d.k, d.v, out, lse, d.dout, dp, gdq, gdk, gdv, dsp);
    else
      am::ops::attention_bwd(d.q, d.k, d.v, out, lse, d.dout, dp, gdq, gdk, gdv, dsp);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << tag << " bwd";
    const std::vector<float> g[3] = {download_as_f32(gdq), download_as_f32(gdk), download_as_f32(gdv)};
    if (run == 1) {
      const char* names[3] = {"dq", "dk", "dv"};
      for (int x = 0; x < 3; ++x)
        EXPECT_EQ(std::memcmp(g[x].data(), first[x].data(), g[x].size() * 4), 0)
            << tag << ": backward not repeatable (" << names[x] << ")";
      break;
    }
    const GradErrors e = check_grads(g[0], g[1], g[2], ref, tag, tol_grad);
    const double e_sink =
        c.sinks ? check_dsinks(download_f32(ddsinks), kDsinksInit, ref, dsink_scale, tag, tol_grad) : 0.0;
    *worst = std::max({*worst, ef.out, e.dq, e.dk, e.dv, e_sink});
    std::printf("  %-72s out %.2e lse %.2e dq %.2e dk %.2e dv %.2e dsinks %.2e\n", tag.c_str(), ef.out, ef.lse, e.dq,
                e.dk, e.dv, e_sink);
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
      // bf16 D 96 / 256 with Dv == D: direct, because ops:: sends them to the flash kernels (checked by
      // FlashHeadDim96* / FlashHeadDim256* / FlashSoftcap* below).
      {1, 150, 8, 2, 96, 96, 0, 2, 0.f, 0, bf, true},       // Phi-3's 96, packed + padding tail
      {2, 130, 4, 4, 96, 96, 40, 0, 0.f, 0, bf, true},      // 96 + sliding window
      {2, 100, 4, 4, 192, 128, 0, 1, 0.f, 0, bf, true},     // DeepSeek MLA: D 192, Dv 128 (flash: FlashMlaDims*)
      {1, 210, 8, 8, 192, 128, 0, 3, 0.f, 0, bf, true},     // MLA + padding runs
      {1, 200, 8, 4, 256, 256, 64, 0, 0.f, 0, bf, true},    // Gemma 3's 256 + window
      {1, 257, 4, 1, 256, 256, 0, 3, 0.f, 0, bf, true},     // 256, GQA 4, padding runs
      {2, 90, 8, 4, 256, 256, 32, 3, 1.5f, 0, bf, true},    // Gemma 2: 256 + soft-cap + window + padding
      {1, 70, 4, 1, 96, 96, 0, 0, 5.f, 1, bf, true},        // soft-cap + sinks + GQA 4
      // D 64 + sinks: direct, because ops:: sends bf16 D 64 / 128 sinks to the flash kernels; the flash path is
      // checked by FlashSinks* below.
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
  const am::AttnParams p = attn_params(c.B, c.T, c.nh, c.nkv, c.D, 0, c.window);
  const AttnShapes s = attn_shapes(p);
  const int64_t nh = c.nh;
  const HostInputs in = random_inputs(p, rng);
  std::vector<float> sinks = randn_bf16(nh, rng, 1.5f);
  for (auto& x : sinks) x = am::bf16_to_f32(am::f32_to_bf16(x + c.sink_shift));  // bf16-exact: fp32 == bf16 copy
  const SegmentIds seg = case_segments(Case{c.B, c.T, c.nh, c.nkv, c.D, c.window, c.seg_mode}, rng);
  const std::string name = sink_name(c);
  // CPU reference: fp32 copies, fp64 accumulation.
  const Reference ref = cpu_reference(p, in, seg, &sinks, true);
  const std::vector<double> dsink_scale = dsink_scales(p, ref, in.dout, sinks);

  // ---- device ----
  const DeviceInputs d = upload_inputs(in, p);
  Tensor dsinks_t = upload_as(sinks, {nh}, c.bf16_sinks ? DType::BF16 : DType::F32);
  const am::AttnParams dp = device_params(p, seg, &dsinks_t);
  Tensor out = dev_empty(s.o, DType::BF16), lse = dev_empty(s.lse, DType::F32);
  // Rows that see no key (padding) ignore the sink: out 0, lse -inf (check_forward).
  for (int fv : variants("AM_ATTN_FWD_VARIANTS", 5)) {
    std::vector<float> got;
    ASSERT_NO_FATAL_FAILURE(check_flash_forward(fv, d, dp, out, lse, ref, name, 52, worst_fwd, &got));
  }

  // Backward from the device forward's out / lse (what training does); dsinks starts at kInit and must come back
  // as kInit + ref, with the same bits from every variant and split.
  forward_for_backward(d, dp, out, lse);
  constexpr float kInit = 0.25f;
  const std::vector<float> init(static_cast<size_t>(nh), kInit);
  Tensor gdq = dev_empty(s.q, DType::BF16), gdk = dev_empty(s.k, DType::BF16), gdv = dev_empty(s.v, DType::BF16);
  Tensor gds = dev_empty({nh}, DType::F32);
  std::vector<float> first_dsinks;
  for (int bv : variants("AM_ATTN_BWD_VARIANTS", 4))
    for (int sp : bwd_splits(c.nh, c.nkv)) {
      ASSERT_EQ(cudaMemcpy(gds.raw(), init.data(), init.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
      GradErrors e;
      const std::string tag = name + " bwd variant " + std::to_string(bv) + " split " + std::to_string(sp);
      ASSERT_NO_FATAL_FAILURE(check_flash_backward(bv, sp, d, dp, out, lse, gdq, gdk, gdv, &gds, ref, tag, &e));
      const auto ds = download_f32(gds);
      const double e_sink = check_dsinks(ds, kInit, ref, dsink_scale, tag, 2e-2);
      if (first_dsinks.empty())
        first_dsinks = ds;
      else
        EXPECT_EQ(std::memcmp(ds.data(), first_dsinks.data(), ds.size() * 4), 0)
            << tag << ": dsinks differ from the first backward variant (the reduction must be deterministic)";
      *worst_bwd = std::max({*worst_bwd, e.dq, e.dk, e.dv, e_sink});
      std::printf("  %-52s bwd v%d split %d: dq %.2e dk %.2e dv %.2e dsinks %.2e\n", name.c_str(), bv, sp, e.dq, e.dk,
                  e.dv, e_sink);
    }

  // Without dsinks the backward still takes the sinked lse (no sink gradient wanted, e.g. frozen sinks).
  am::cuda::attention_tuning().bwd_variant = 0;
  am::cuda::attention_tuning().bwd_split = 0;
  poison(gdq);
  am::cuda::attention_bwd(d.q, d.k, d.v, out, lse, d.dout, dp, gdq, gdk, gdv, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << name << " bwd without dsinks";
  EXPECT_LT(rel_err(download_bf16(gdq), ref.dq), 2e-2) << name << " bwd without dsinks";
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
  run_cases(cases, 4321, "CudaAttention flash + sinks", run_sink_case);
}

// Sinks of -inf add e^(-inf) = 0 to every normaliser: the forward must give the no-sink result bit for bit (the
// sink epilogue then reduces to the plain one exactly: max(m, -inf) = m, 2^0 = 1), and dsinks must not move.
// Guards the sink path's arithmetic against drifting from the no-sink path, on every forward variant.
TEST_F(CudaAttention, FlashSinksOfMinusInfinityChangeNothing) {
  const Case c{2, 200, 8, 2, 64, 64, 3};
  const int64_t nh = c.nh;
  std::mt19937 rng(99);
  const am::AttnParams p0 = attn_params(c.B, c.T, c.nh, c.nkv, c.D, 0, c.window);
  const AttnShapes s = attn_shapes(p0);
  const DeviceInputs d = upload_inputs(random_inputs(p0, rng), p0);
  const SegmentIds seg = case_segments(c, rng);
  Tensor sinks = upload_as(std::vector<float>(nh, -std::numeric_limits<float>::infinity()), {nh}, DType::F32);
  const am::AttnParams p = device_params(p0, seg, nullptr), ps = device_params(p0, seg, &sinks);
  Tensor o1 = dev_empty(s.o, DType::BF16), o2 = dev_empty(s.o, DType::BF16), l1 = dev_empty(s.lse, DType::F32),
         l2 = dev_empty(s.lse, DType::F32);
  for (int fv : variants("AM_ATTN_FWD_VARIANTS", 5)) {
    am::cuda::attention_tuning().fwd_variant = fv;
    poison(o2);
    poison(l2);
    am::cuda::attention_fwd(d.q, d.k, d.v, p, o1, l1);
    am::cuda::attention_fwd(d.q, d.k, d.v, ps, o2, l2);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << "fwd variant " << fv;
    const auto a = download_bf16(o1), b = download_bf16(o2), la = download_f32(l1), lb = download_f32(l2);
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0) << "fwd variant " << fv << ": out";
    EXPECT_EQ(std::memcmp(la.data(), lb.data(), la.size() * 4), 0) << "fwd variant " << fv << ": lse";
  }
  forward_for_backward(d, ps, o2, l2);
  Tensor dq = dev_empty(s.q, DType::BF16), dk = dev_empty(s.k, DType::BF16), dv = dev_empty(s.v, DType::BF16);
  const std::vector<float> init{0.5f, -1.f, 2.f, 0.f, 3.f, -0.25f, 1.f, 7.f};
  Tensor ds = upload_as(init, {nh}, DType::F32);
  am::cuda::attention_bwd(d.q, d.k, d.v, o2, l2, d.dout, ps, dq, dk, dv, &ds);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(download_f32(ds), init) << "sinks of -inf must leave dsinks as they were";
}

// ops:: routes sinks to the flash kernels (verified on a device on 2026-12-06; before that only with
// AM_ALLOW_UNVERIFIED_CUDA): its results equal the flash path's bit for bit, whatever the variable says.
TEST_F(CudaAttention, FlashSinksRouteThroughOps) {
  std::mt19937 rng(7);
  am::AttnParams p = attn_params(1, 150, 8, 2, 64, 0, 128);
  const AttnShapes s = attn_shapes(p);
  const int64_t nh = p.n_heads;
  const DeviceInputs d = upload_inputs(random_inputs(p, rng), p);
  Tensor sinks = upload_as(randn_bf16(nh, rng, 1.5f), {nh}, DType::BF16);  // the model's working copy
  p.sinks = &sinks;
  const bool flash = true;
  am::cuda::attention_tuning().fwd_variant = 0;
  Tensor o_ops, l_ops;
  ASSERT_NO_FATAL_FAILURE(expect_ops_forward_follows_gate(d, p, flash, "", &o_ops, &l_ops));

  Tensor dq = dev_empty(s.q, DType::BF16), dk = dev_empty(s.k, DType::BF16), dv = dev_empty(s.v, DType::BF16);
  Tensor ds_ops = upload_as(std::vector<float>(nh, 0.f), {nh}, DType::F32),
         ds_dir = upload_as(std::vector<float>(nh, 0.f), {nh}, DType::F32);
  am::ops::attention_bwd(d.q, d.k, d.v, o_ops, l_ops, d.dout, p, dq, dk, dv, &ds_ops);
  gated_backward(flash, d, o_ops, l_ops, p, dq, dk, dv, &ds_dir);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto da = download_f32(ds_ops), db = download_f32(ds_dir);
  if (flash)  // the flash dsinks reduction has a fixed order; the generic one adds per-block atomics
    EXPECT_EQ(da, db) << "ops:: dsinks is not the flash path's";
  else
    for (int64_t h = 0; h < nh; ++h) EXPECT_NEAR(da[h], db[h], 1e-4f * (1.f + std::fabs(db[h])));
}

// ---------------- flash kernels: soft-capping, head dims 96 and 256 (first passed on an H100 on 2026-12-06) --------
// Gemma 2 soft-capping (score = cap tanh(scale q.k / cap); the kernels take tanh of the raw scores right after Q K^T
// and multiply dS by 1 - tanh^2) on D 64 / 128 (mma.sync variant 1 and the wgmma kernels; the other tile variants
// run those) and on the new head dims; Phi-3's 96 and Gemma's 256 on the mma.sync kernels (every variant; wgmma
// variants fall back to 1 for them). Called through am::cuda::attention_fwd/bwd, so the flash kernels run. Same checks and budgets as FlashSinks*: out / lse from every forward variant, dq /
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
  const am::AttnParams p = attn_params(c.B, c.T, c.nh, c.nkv, c.D, c.Dv > 0 ? c.Dv : c.D, c.window, c.softcap);
  const AttnShapes s = attn_shapes(p);
  // sd 2: raw scores of a few units, so a small cap actually bends them (tanh far from linear).
  const HostInputs in = random_inputs(p, rng, c.softcap > 0.f ? 2.f : 1.f);
  const std::vector<float> sinks = randn_bf16(c.nh, rng, 1.5f);
  const SegmentIds seg = case_segments(Case{c.B, c.T, c.nh, c.nkv, c.D, c.window, c.seg_mode}, rng);
  const std::string name = flash_name(c);
  const Reference ref = cpu_reference(p, in, seg, c.sinks ? &sinks : nullptr);

  // ---- device ----
  const DeviceInputs d = upload_inputs(in, p);
  Tensor dsinks_t = upload_as(sinks, {c.nh}, DType::F32);
  const am::AttnParams dp = device_params(p, seg, c.sinks ? &dsinks_t : nullptr);
  Tensor out = dev_empty(s.o, DType::BF16), lse = dev_empty(s.lse, DType::F32);
  for (int fv : variants("AM_ATTN_FWD_VARIANTS", 5)) {
    std::vector<float> got;
    ASSERT_NO_FATAL_FAILURE(check_flash_forward(fv, d, dp, out, lse, ref, name, 52, worst_fwd, &got));
    if (fv == 1)
      ASSERT_NO_FATAL_FAILURE(expect_forward_repeatable(d, dp, got, name + " fwd variant " + std::to_string(fv)));
  }
  forward_for_backward(d, dp, out, lse);
  check_flash_backwards(d, dp, out, lse, ref, name, 52, worst_bwd);
}

void run_flash_cases(const std::vector<FlashCase>& cases, uint32_t seed, const char* what) {
  run_cases(cases, seed, std::string("CudaAttention flash ") + what, run_flash_case);
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

// The forwards are deterministic: compared bit for bit; the backward's dq uses atomics on the flash path, so the
// gradients are compared within a bf16 budget.
// ops:: routes soft-capping, D 96, D 256 and D 192 / Dv 128 to the flash kernels (verified on a device on
// 2026-12-06; before that only with AM_ALLOW_UNVERIFIED_CUDA), whatever the variable says.
TEST_F(CudaAttention, FlashNewVariantsRouteThroughOps) {
  const bool flash = true;
  struct R {
    int64_t D, Dv;
    float cap;
  };
  for (const R r : {R{64, 64, 5.f}, R{96, 96, 0.f}, R{256, 256, 0.f}, R{256, 256, 50.f}, R{192, 128, 0.f}}) {
    const int64_t B = 1, T = 150, nh = 8, nkv = 2, D = r.D, Dv = r.Dv;
    std::mt19937 rng(static_cast<uint32_t>(D));
    const am::AttnParams p = attn_params(B, T, nh, nkv, D, Dv, 100, r.cap);
    const AttnShapes s = attn_shapes(p);
    const DeviceInputs d = upload_inputs(random_inputs(p, rng), p);
    const std::string tag = "D" + std::to_string(D) + " Dv" + std::to_string(Dv) + " cap" + std::to_string(r.cap);
    am::cuda::attention_tuning().fwd_variant = 0;
    am::cuda::attention_tuning().bwd_variant = 0;
    Tensor o_ops, l_ops;
    ASSERT_NO_FATAL_FAILURE(expect_ops_forward_follows_gate(d, p, flash, tag, &o_ops, &l_ops));
    Tensor dq1 = dev_empty(s.q, DType::BF16), dk1 = dev_empty(s.k, DType::BF16), dv1 = dev_empty(s.v, DType::BF16),
           dq2 = dev_empty(s.q, DType::BF16), dk2 = dev_empty(s.k, DType::BF16), dv2 = dev_empty(s.v, DType::BF16);
    am::ops::attention_bwd(d.q, d.k, d.v, o_ops, l_ops, d.dout, p, dq1, dk1, dv1);
    gated_backward(flash, d, o_ops, l_ops, p, dq2, dk2, dv2, nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << tag;
    // dk / dv: no atomics on either path when the whole GQA group is one block (B 1, nkv 2: bwd_split may split
    // it on a large GPU, hence the tolerance rather than bits).
    EXPECT_LT(rel_err(download_bf16(dq1), download_bf16(dq2)), 1e-2) << tag << ": dq";
    EXPECT_LT(rel_err(download_bf16(dk1), download_bf16(dk2)), 1e-2) << tag << ": dk";
    EXPECT_LT(rel_err(download_bf16(dv1), download_bf16(dv2)), 1e-2) << tag << ": dv";
  }
}

}  // namespace
