// cuDNN fused attention (backend/cuda/cudnn_attention.h) against the CPU reference
// (am::ops::attention_fwd/bwd on fp32 copies of the same bf16 inputs): forward out / lse and backward dq / dk / dv
// for random shapes with GQA ratios 1 / 4 / 8, T not a multiple of 64 (77, 257, 1000, ...), B > 1, head dims
// 64 and 128, and sliding windows. Outputs are poisoned with NaN before each call, so an unwritten element fails.
// Errors are ||got - ref|| / ||ref||, with the budgets of tests/gpu/test_cuda_attention.cpp (out 1e-2, lse max abs
// 2e-3, gradients 2e-2). Also: the ops:: front-end's choice (AM_ATTENTION cudnn / flash / auto, where auto takes
// cuDNN from a shape's third call on), and what cuDNN does not take (segment ids, soft-capping, sinks, other head dims / dtypes) still gives the right answer
// through the built-in kernels with the variable set.
// Skips (GTEST_SKIP, with the reason) without a CUDA device, in a build without cuDNN, or when libcudnn.so.9
// cannot be loaded. A plan that cuDNN refuses for a shape supports() accepted is a FAILURE, with cuDNN's message.
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
#include "backend/cuda/cudnn_attention.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/tensor.h"
#include "ops/ops.h"
#include "attention_test_util.h"

namespace {

using namespace am::attn_test;
using am::gpu_test::ScopedEnv;

double max_abs(const std::vector<float>& got, const std::vector<float>& ref) {
  double m = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) return std::numeric_limits<double>::infinity();
    m = std::max(m, std::fabs(static_cast<double>(got[i]) - ref[i]));
  }
  return m;
}

struct Case {
  int B, T, nh, nkv, D, window;
};
std::string case_name(const Case& c) {
  char buf[128];
  std::snprintf(buf, sizeof buf, "B%d T%d nh%d nkv%d D%d win%d", c.B, c.T, c.nh, c.nkv, c.D, c.window);
  return buf;
}

// One problem: bf16 inputs on the device, the CPU reference's outputs and gradients.
struct Problem {
  am::AttnParams p;  // device segment ids
  Shape qs, ks, ls;
  Tensor q, k, v, dout;
  SegmentIds seg{{}, 0, 0};
  Reference ref;
};

// seg: packed documents with a padding tail (only for the fallback test: cuDNN does not take segments).
// softcap: Gemma 2 soft-capping (likewise).
std::unique_ptr<Problem> make_problem(const Case& c, uint32_t seed, bool seg = false, float softcap = 0.f) {
  auto pr = std::make_unique<Problem>();
  std::mt19937 rng(seed);
  const int64_t B = c.B, T = c.T;
  const am::AttnParams p = attn_params(c.B, c.T, c.nh, c.nkv, c.D, 0, c.window, softcap);
  const AttnShapes s = attn_shapes(p);
  pr->qs = s.q;
  pr->ks = s.k;
  pr->ls = s.lse;
  const auto in = random_inputs(p, rng);
  std::vector<int32_t> segv;
  if (seg) {
    segv.assign(static_cast<size_t>(B * T), 0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t)
        segv[static_cast<size_t>(b * T + t)] = t >= T - T / 5 ? -1 : static_cast<int32_t>(t / std::max<int64_t>(1, T / 3));
  }
  pr->seg = SegmentIds(segv, B, T);
  pr->ref = cpu_reference(p, in, pr->seg);
  const DeviceInputs d = upload_inputs(in, p);
  pr->q = d.q;
  pr->k = d.k;
  pr->v = d.v;
  pr->dout = d.dout;
  pr->p = device_params(p, pr->seg, nullptr);  // the device calls read it; the reference is done
  return pr;
}

// ops::attention_fwd, then ops::attention_bwd from its out / lse (the path AM_ATTENTION and supports() pick), into new
// buffers: out and dq poisoned first, dk and dv too with poison_dkv.
struct OpsRun {
  Tensor out, lse, dq, dk, dv;
};
OpsRun run_ops(const Problem& pr, bool poison_dkv) {
  OpsRun r{dev_empty(pr.qs, DType::BF16), dev_empty(pr.ls, DType::F32), dev_empty(pr.qs, DType::BF16),
           dev_empty(pr.ks, DType::BF16), dev_empty(pr.ks, DType::BF16)};
  poison(r.out);
  am::ops::attention_fwd(pr.q, pr.k, pr.v, pr.p, r.out, r.lse);
  poison(r.dq);
  if (poison_dkv) {
    poison(r.dk);
    poison(r.dv);
  }
  am::ops::attention_bwd(pr.q, pr.k, pr.v, r.out, r.lse, pr.dout, pr.p, r.dq, r.dk, r.dv);
  return r;
}

class CudnnAttention : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!have_device()) GTEST_SKIP() << "no CUDA device visible";
    if (!am::cuda::kCudnnAttentionCompiled) GTEST_SKIP() << "built without cuDNN (cudnn.h not found at configure time)";
    std::string why;
    if (!am::cuda::cudnn_attention_available(&why)) GTEST_SKIP() << "cuDNN not usable: " << why;
    std::printf("cuDNN runtime version %zu\n", am::cuda::cudnn_attention_runtime_version());
  }
};

// Direct calls: forward, then the backward from the cuDNN forward's out / lse (what training does).
void check_case(const Case& c, uint32_t seed, double* worst_fwd, double* worst_bwd) {
  auto pr = make_problem(c, seed);
  const am::AttnParams& p = pr->p;
  const std::string name = case_name(c);
  ASSERT_TRUE(am::cuda::cudnn_attention_supports(p, DType::BF16)) << name;
  size_t wsf = 0, wsb = 0;
  ASSERT_TRUE(am::cuda::cudnn_attention_fwd_workspace(p, &wsf))
      << name << ": forward plan: " << am::cuda::cudnn_attention_last_error();
  ASSERT_TRUE(am::cuda::cudnn_attention_bwd_workspace(p, &wsb))
      << name << ": backward plan: " << am::cuda::cudnn_attention_last_error();

  Tensor out = dev_empty(pr->qs, DType::BF16), lse = dev_empty(pr->ls, DType::F32);
  poison(out);
  poison(lse);
  // Caller-provided workspace for the forward, stream-ordered cudaMallocAsync for the backward: both paths.
  Tensor ws = dev_empty({static_cast<int64_t>(std::max<size_t>(wsf, 16))}, DType::BF16);
  ASSERT_TRUE(am::cuda::cudnn_attention_fwd(pr->q, pr->k, pr->v, p, out, lse, nullptr, ws.raw(), ws.nbytes()))
      << name << ": " << am::cuda::cudnn_attention_last_error();
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << name;
  const double e_out = rel_err(download_bf16(out), pr->ref.out);
  const double e_lse = max_abs(download_f32(lse), pr->ref.lse);
  EXPECT_LT(e_out, 1e-2) << name << " forward out";
  EXPECT_LT(e_lse, 2e-3) << name << " forward lse (natural log, scaled scores)";

  Tensor dq = dev_empty(pr->qs, DType::BF16), dk = dev_empty(pr->ks, DType::BF16), dv = dev_empty(pr->ks, DType::BF16);
  poison(dq);
  poison(dk);
  poison(dv);
  ASSERT_TRUE(am::cuda::cudnn_attention_bwd(pr->q, pr->k, pr->v, out, lse, pr->dout, p, dq, dk, dv))
      << name << ": " << am::cuda::cudnn_attention_last_error();
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << name;
  const double edq = rel_err(download_bf16(dq), pr->ref.dq), edk = rel_err(download_bf16(dk), pr->ref.dk),
               edv = rel_err(download_bf16(dv), pr->ref.dv);
  EXPECT_LT(edq, 2e-2) << name << " dq";
  EXPECT_LT(edk, 2e-2) << name << " dk";
  EXPECT_LT(edv, 2e-2) << name << " dv";

  // A second backward into the same buffers must give the same answer (dQ accumulator reset between calls).
  Tensor dq2 = dev_empty(pr->qs, DType::BF16);
  poison(dq2);
  ASSERT_TRUE(am::cuda::cudnn_attention_bwd(pr->q, pr->k, pr->v, out, lse, pr->dout, p, dq2, dk, dv)) << name;
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << name;
  EXPECT_LT(rel_err(download_bf16(dq2), pr->ref.dq), 2e-2) << name << " dq, second call";

  *worst_fwd = std::max(*worst_fwd, e_out);
  *worst_bwd = std::max({*worst_bwd, edq, edk, edv});
  std::printf("  %-36s out %.2e lse %.2e | dq %.2e dk %.2e dv %.2e | ws fwd %zu bwd %zu\n", name.c_str(), e_out,
              e_lse, edq, edk, edv, wsf, wsb);
}

TEST_F(CudnnAttention, MatchesCpuReference) {
  const std::vector<Case> cases = {
      {2, 77, 4, 4, 64, 0},    {1, 200, 8, 2, 64, 0},   {2, 130, 8, 1, 128, 0},  {1, 1000, 8, 2, 128, 0},
      {3, 1000, 4, 1, 64, 0},  {2, 257, 8, 2, 64, 0},   {1, 1, 2, 2, 64, 0},     {1, 513, 4, 4, 128, 0},
      {2, 384, 8, 1, 64, 0},   {1, 1100, 4, 1, 128, 0},
  };
  run_cases(cases, 4321, "CudnnAttention", check_case);
}

TEST_F(CudnnAttention, SlidingWindowMatchesCpuReference) {
  const std::vector<Case> cases = {
      {1, 300, 4, 1, 128, 50}, {2, 999, 8, 2, 64, 256}, {1, 64, 2, 1, 64, 1}, {2, 1000, 4, 4, 128, 128},
  };
  run_cases(cases, 777, "CudnnAttention (window)", check_case);
}

// ops::attention_fwd/bwd's choice (src/ops/ops_cuda.cpp): AM_ATTENTION=cudnn takes cuDNN at once, =flash never,
// and unset (auto) from a shape's third call on when it has 1,024 positions or more; a shorter one never. The
// forward is bit-for-bit the direct cuDNN call's or the flash kernels' (both deterministic), and every path matches
// the reference.
TEST_F(CudnnAttention, OpsRouteThroughCudnnAsAsked) {
  {  // a short shape (T 1000): auto keeps the flash kernels however often it is seen
    const Case cs{2, 1000, 8, 2, 64, 0};
    auto ps = make_problem(cs, 98);
    Tensor out_flash = dev_empty(ps->qs, DType::BF16), lse_flash = dev_empty(ps->ls, DType::F32);
    am::cuda::attention_fwd(ps->q, ps->k, ps->v, ps->p, out_flash, lse_flash);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const auto of = download_bf16(out_flash);
    for (int call = 1; call <= 4; ++call) {
      ScopedEnv env("AM_ATTENTION", nullptr);
      const auto [out, lse, dq, dk, dv] = run_ops(*ps, false);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      const auto o = download_bf16(out);
      EXPECT_EQ(std::memcmp(o.data(), of.data(), o.size() * 4), 0) << "auto, T 1000, call " << call << ": not the flash kernels";
    }
  }
  const Case c{2, 1040, 8, 2, 64, 0};
  auto pr = make_problem(c, 99);
  const am::AttnParams& p = pr->p;
  Tensor out_cudnn = dev_empty(pr->qs, DType::BF16), lse_cudnn = dev_empty(pr->ls, DType::F32);
  ASSERT_TRUE(am::cuda::cudnn_attention_fwd(pr->q, pr->k, pr->v, p, out_cudnn, lse_cudnn))
      << am::cuda::cudnn_attention_last_error();
  Tensor out_flash = dev_empty(pr->qs, DType::BF16), lse_flash = dev_empty(pr->ls, DType::F32);
  am::cuda::attention_fwd(pr->q, pr->k, pr->v, p, out_flash, lse_flash);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto oc = download_bf16(out_cudnn), of = download_bf16(out_flash);
  ASSERT_NE(std::memcmp(oc.data(), of.data(), oc.size() * 4), 0) << "the two paths must differ for this test to tell";

  struct Run {
    const char* mode;
    bool want_cudnn;
    const char* tag;
  };
  // This shape is seen here for the first time in auto mode (the direct calls above do not count).
  const Run runs[] = {{"cudnn", true, "AM_ATTENTION=cudnn"}, {"flash", false, "AM_ATTENTION=flash"},
                      {nullptr, false, "auto, first call"},  {nullptr, false, "auto, second call"},
                      {nullptr, true, "auto, third call"},   {"auto", true, "AM_ATTENTION=auto, fourth call"},
                      {"flash", false, "AM_ATTENTION=flash after auto took cuDNN"}};
  for (const Run& r : runs) {
    ScopedEnv env("AM_ATTENTION", r.mode);
    const auto [out, lse, dq, dk, dv] = run_ops(*pr, false);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << r.tag;
    const auto o = download_bf16(out);
    EXPECT_EQ(std::memcmp(o.data(), (r.want_cudnn ? oc : of).data(), o.size() * 4), 0)
        << r.tag << ": the forward did not take the expected path (" << (r.want_cudnn ? "cuDNN" : "flash") << ")";
    EXPECT_LT(rel_err(o, pr->ref.out), 1e-2) << r.tag;
    EXPECT_LT(rel_err(download_bf16(dq), pr->ref.dq), 2e-2) << r.tag;
    EXPECT_LT(rel_err(download_bf16(dk), pr->ref.dk), 2e-2) << r.tag;
    EXPECT_LT(rel_err(download_bf16(dv), pr->ref.dv), 2e-2) << r.tag;
  }
  // cuDNN's forward and the flash backward pair up (same lse convention), and the other way round.
  Tensor dq = dev_empty(pr->qs, DType::BF16), dk = dev_empty(pr->ks, DType::BF16), dv = dev_empty(pr->ks, DType::BF16);
  am::cuda::attention_bwd(pr->q, pr->k, pr->v, out_cudnn, lse_cudnn, pr->dout, p, dq, dk, dv);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_LT(rel_err(download_bf16(dq), pr->ref.dq), 2e-2) << "flash backward from the cuDNN forward";
  ASSERT_TRUE(am::cuda::cudnn_attention_bwd(pr->q, pr->k, pr->v, out_flash, lse_flash, pr->dout, p, dq, dk, dv));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_LT(rel_err(download_bf16(dq), pr->ref.dq), 2e-2) << "cuDNN backward from the flash forward";
  EXPECT_LT(rel_err(download_bf16(dk), pr->ref.dk), 2e-2) << "cuDNN backward from the flash forward";
}

// What cuDNN does not take is refused by supports() and, with AM_ATTENTION=cudnn, still computed right by the
// built-in kernels.
TEST_F(CudnnAttention, UnsupportedFeaturesFallBack) {
  {
    am::AttnParams p;
    p.batch = 1, p.seq = 64, p.n_heads = 4, p.n_kv_heads = 2, p.head_dim = 64, p.scale = 0.125f;
    EXPECT_TRUE(am::cuda::cudnn_attention_supports(p, DType::BF16));
    EXPECT_FALSE(am::cuda::cudnn_attention_supports(p, DType::F32));
    am::AttnParams q = p;
    q.head_dim = 96;
    EXPECT_FALSE(am::cuda::cudnn_attention_supports(q, DType::BF16));
    q = p;
    q.softcap = 50.f;
    EXPECT_FALSE(am::cuda::cudnn_attention_supports(q, DType::BF16));
    q = p;
    q.v_head_dim = 128;
    EXPECT_FALSE(am::cuda::cudnn_attention_supports(q, DType::BF16));
    Tensor seg = Tensor::empty({1, 64}, DType::I32), sinks = Tensor::empty({4}, DType::F32);
    q = p;
    q.segment_ids = &seg;
    EXPECT_FALSE(am::cuda::cudnn_attention_supports(q, DType::BF16));
    q = p;
    q.sinks = &sinks;
    EXPECT_FALSE(am::cuda::cudnn_attention_supports(q, DType::BF16));
    q = p;
    q.n_kv_heads = 3;
    EXPECT_FALSE(am::cuda::cudnn_attention_supports(q, DType::BF16));
  }
  ScopedEnv env("AM_ATTENTION", "cudnn");
  struct Fallback {
    Case c;
    bool seg;
    float softcap;
  };
  const std::vector<Fallback> cases = {{{2, 300, 8, 2, 64, 0}, true, 0.f},
                                       {{1, 257, 4, 1, 128, 64}, true, 0.f},
                                       {{1, 200, 4, 2, 64, 0}, false, 30.f}};
  uint32_t seed = 55;
  for (const auto& f : cases) {
    auto pr = make_problem(f.c, seed++, f.seg, f.softcap);
    const am::AttnParams& p = pr->p;
    const std::string tag = case_name(f.c) + (f.seg ? " segments" : "") + (f.softcap > 0 ? " softcap" : "");
    EXPECT_FALSE(am::cuda::cudnn_attention_supports(p, DType::BF16)) << tag;
    const auto [out, lse, dq, dk, dv] = run_ops(*pr, true);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess) << tag;
    const double eo = rel_err(download_bf16(out), pr->ref.out), edq = rel_err(download_bf16(dq), pr->ref.dq),
                 edk = rel_err(download_bf16(dk), pr->ref.dk), edv = rel_err(download_bf16(dv), pr->ref.dv);
    EXPECT_LT(eo, 1e-2) << tag;
    EXPECT_LT(edq, 2e-2) << tag;
    EXPECT_LT(edk, 2e-2) << tag;
    EXPECT_LT(edv, 2e-2) << tag;
    std::printf("  fallback %-40s out %.2e dq %.2e dk %.2e dv %.2e\n", tag.c_str(), eo, edq, edk, edv);
  }
}

}  // namespace
