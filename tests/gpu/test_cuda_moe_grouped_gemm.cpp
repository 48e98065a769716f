// The persistent grouped GEMM (src/backend/cuda/moe_grouped_gemm.cu) against the CPU reference of the same grouped
// products (ops::grouped_linear_* on host fp32 copies of the bf16 inputs): forward y = x w_e^T, dx = dy w_e and
// dw_e += dy_e^T x_e, reached through cuda::grouped_linear_* with GroupedGemm::Persistent and no host counts (the
// kernel schedules from the device offsets). Cases: random counts with experts without rows, E = 8 / 64 / 128,
// counts that are not multiples of the 128-row tile, one expert with ~90% of the rows, widths that are multiples
// of 8 but not of the tile, alpha / accumulate (beta = 1), fp32 outputs (the kernel called directly), the W2 shapes
// (H 2048, I 768, E 128, 4096 x 8 rows; uniform and skewed routing), a whole MoE block under AM_MOE_GEMM=persistent
// (dispatch plan without host counts) and a CUDA-graph capture of the products (any host sync would break it).
// Outputs are poisoned with NaN first; dw starts from random values (+= contract; experts without rows must keep
// them bit for bit). Runs only where a CUDA device is visible (GTEST_SKIP otherwise).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../common/tolerance.h"
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/moe.h"
#include "backend/cuda/moe_grouped_gemm.h"
#include "core/tensor.h"
#include "gpu_test_util.h"
#include "moe_test_util.h"
#include "ops/moe_ops.h"
#include "ops/ops.h"

namespace {

namespace cu = am::cuda;
namespace ops = am::ops;
using namespace am::moe_test;
using am::gpu_test::ScopedEnv;

const cu::GroupedLinearOptions kPersistent{cu::GroupedGemm::Persistent};

Tensor offsets_of(const std::vector<int64_t>& counts) {
  const int64_t e = static_cast<int64_t>(counts.size());
  Tensor off = Tensor::empty({e + 1}, DType::I32);
  off.data<int32_t>()[0] = 0;
  for (int64_t j = 0; j < e; ++j) off.data<int32_t>()[j + 1] = off.data<int32_t>()[j] + static_cast<int32_t>(counts[j]);
  return off;
}

struct Check {
  bool fwd = true, bwd = true;
  am::LinearOut lo{};
};

// The three products on the device (persistent, no host counts) against the CPU reference.
void check_persistent(const std::vector<int64_t>& counts, int64_t k_dim, int64_t nout, std::mt19937& rng,
                      const std::string& tag, const Check& c = {}) {
  const DType dt = DType::BF16;
  const int64_t e = static_cast<int64_t>(counts.size());
  const int64_t m = std::accumulate(counts.begin(), counts.end(), int64_t{0});
  const Tensor off = offsets_of(counts);
  const float ws = 1.f / std::sqrt(static_cast<float>(k_dim));
  Tensor x = rand_host({m, k_dim}, rng, dt), w = rand_host({e, nout, k_dim}, rng, dt, -ws, ws);
  Tensor xd = up(x, dt), wd = up(w, dt), offd = up(off, DType::I32);
  const bool acc = c.lo.accumulate;
  if (c.fwd) {
    Tensor y0 = rand_host({m, nout}, rng, dt);
    Tensor want = acc ? y0.clone() : Tensor::empty({m, nout}, DType::F32);
    ops::grouped_linear_fwd(x, w, off, want, &counts, c.lo);
    Tensor y = acc ? up(y0, dt) : poisoned({m, nout}, dt);
    cu::grouped_linear_fwd(xd, wd, offd, y, nullptr, cu::default_context(), kPersistent, c.lo);
    expect_close_dt(y, want, dt, "persistent fwd " + tag);
  }
  if (c.bwd) {
    Tensor dy = rand_host({m, nout}, rng, dt), dx0 = rand_host({m, k_dim}, rng, dt),
           dw0 = rand_host({e, nout, k_dim}, rng, DType::F32, -0.01f, 0.01f);
    Tensor want_dx = acc ? dx0.clone() : Tensor::empty({m, k_dim}, DType::F32), want_dw = dw0.clone();
    ops::grouped_linear_bwd(x, w, off, dy, &want_dx, want_dw, &counts, c.lo);
    Tensor dyd = up(dy, dt);
    Tensor dx = acc ? up(dx0, dt) : poisoned({m, k_dim}, dt), dw = up(dw0, DType::F32);
    cu::grouped_linear_bwd(xd, wd, offd, dyd, &dx, dw, nullptr, cu::default_context(), kPersistent, c.lo);
    expect_close_dt(dx, want_dx, dt, "persistent dx " + tag);
    // dw: fp32 accumulation of exact bf16 products on both sides (order differs).
    expect_close(dw, want_dw, am::test::Tolerance{1e-3, 1e-4}, 1e-4, "persistent dw " + tag);
    Tensor got_dw = down(dw);
    for (int64_t j = 0; j < e; ++j) {
      if (counts[static_cast<size_t>(j)] != 0) continue;
      for (int64_t i = 0; i < nout * k_dim; ++i)
        ASSERT_EQ(got_dw.f32()[j * nout * k_dim + i], dw0.f32()[j * nout * k_dim + i]) << tag << " expert " << j;
    }
    // Frozen experts (dw undefined): dx alone.
    Tensor dx2 = acc ? up(dx0, dt) : poisoned({m, k_dim}, dt), frozen;
    cu::grouped_linear_bwd(xd, wd, offd, dyd, &dx2, frozen, nullptr, cu::default_context(), kPersistent, c.lo);
    expect_close_dt(dx2, want_dx, dt, "persistent dx, frozen dw " + tag);
  }
}

std::vector<int64_t> random_counts(int64_t e, int64_t max_rows, std::mt19937& rng) {
  std::vector<int64_t> counts(static_cast<size_t>(e));
  for (auto& c : counts) c = rng() % 4 == 0 ? 0 : rint(rng, 1, max_rows);
  counts[0] = 0;
  return counts;
}
// About `share` of `rows` in expert `hot`, the rest spread at random (some experts empty).
std::vector<int64_t> skewed_counts(int64_t e, int64_t rows, double share, int64_t hot, std::mt19937& rng) {
  std::vector<int64_t> counts(static_cast<size_t>(e), 0);
  counts[static_cast<size_t>(hot)] = static_cast<int64_t>(share * static_cast<double>(rows));
  for (int64_t r = counts[static_cast<size_t>(hot)]; r < rows; ++r) {
    const int64_t j = rint(rng, 0, e - 1);
    if (j % 5 == 2 && j != hot) {
      --r;  // every fifth expert stays empty
      continue;
    }
    ++counts[static_cast<size_t>(j)];
  }
  return counts;
}
// Router-like top-k ids with the skew the model's own routing shows: expert 0 in ~88% of the tokens' top-k
// (3,600 of 4,096 at W2), the other slots uniformly over the rest, distinct per token.
Tensor realistic_skew_topk(int64_t n, int64_t e, int64_t k, double hot_share, std::mt19937& rng) {
  Tensor t = Tensor::empty({n, k}, DType::I32);
  std::vector<int32_t> ids(static_cast<size_t>(e));
  std::iota(ids.begin(), ids.end(), 0);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (int64_t r = 0; r < n; ++r) {
    const bool hot = u(rng) < hot_share;
    int64_t s0 = 0;
    if (hot) t.data<int32_t>()[r * k + s0++] = 0;
    for (int64_t s = 1; s <= k; ++s) std::swap(ids[s], ids[rint(rng, s, e - 1)]);  // ids[0] = 0 stays
    for (int64_t s = 1; s0 < k; ++s) t.data<int32_t>()[r * k + s0++] = ids[s];
  }
  return t;
}

}  // namespace

TEST(CudaMoeGroupedGemm, RandomCountsMatchCpu) {
  AM_REQUIRE_DEVICE();
  std::mt19937 rng(101);
  for (int64_t e : {8, 64, 128})
    for (int rep = 0; rep < 2; ++rep) {
      // Widths: multiples of 8, below, at and above the 128-wide tile; counts up to 300 (not multiples of 128).
      const int64_t kd = 8 * rint(rng, 1, 48), nout = 8 * rint(rng, 1, 48);
      const std::vector<int64_t> counts = random_counts(e, e >= 64 ? 150 : 300, rng);
      check_persistent(counts, kd, nout, rng,
                       "E=" + std::to_string(e) + " K=" + std::to_string(kd) + " Nout=" + std::to_string(nout));
    }
}

TEST(CudaMoeGroupedGemm, EdgeCountsMatchCpu) {
  AM_REQUIRE_DEVICE();
  std::mt19937 rng(102);
  // One expert only; all but one empty; exact tile multiples; one row; rows of 127 / 129; a long empty run.
  const std::vector<std::vector<int64_t>> cases = {
      {1}, {0, 0, 0, 77, 0, 0}, {128, 256, 0, 384}, {1, 0, 1, 0, 1}, {127, 129, 0, 255, 257}, {0, 0, 0, 0, 0, 0, 0, 0, 0, 3}};
  for (size_t ci = 0; ci < cases.size(); ++ci)
    for (const auto& [kd, nout] : std::vector<std::pair<int64_t, int64_t>>{{136, 72}, {8, 8}, {256, 264}})
      check_persistent(cases[ci], kd, nout, rng,
                       "case " + std::to_string(ci) + " K=" + std::to_string(kd) + " Nout=" + std::to_string(nout));
}

TEST(CudaMoeGroupedGemm, SkewedCountsMatchCpu) {
  AM_REQUIRE_DEVICE();
  std::mt19937 rng(103);
  // One expert with ~90% of the rows (the model's own routing), others few or none.
  for (int64_t e : {8, 64, 128}) {
    const std::vector<int64_t> counts = skewed_counts(e, 3000, 0.9, e / 3, rng);
    check_persistent(counts, 264, 200, rng, "skewed E=" + std::to_string(e));
  }
}

TEST(CudaMoeGroupedGemm, AlphaAccumulateMatchCpu) {
  AM_REQUIRE_DEVICE();
  std::mt19937 rng(104);
  const std::vector<int64_t> counts = {0, 5, 133, 1, 0, 19};
  for (const am::LinearOut lo : {am::LinearOut{.alpha = 0.5f}, am::LinearOut{.accumulate = true},
                                 am::LinearOut{.alpha = 2.f, .accumulate = true}})
    check_persistent(counts, 72, 40, rng,
                     "alpha=" + std::to_string(lo.alpha) + (lo.accumulate ? " accumulate" : ""), Check{true, true, lo});
}

// fp32 outputs of the forward and dx products (the kernel entry points directly; grouped_linear keeps y in x's
// dtype): y = alpha x w_e^T + beta y, dx = alpha dy w_e + beta dx.
TEST(CudaMoeGroupedGemm, Fp32OutputsMatchCpu) {
  AM_REQUIRE_DEVICE();
  std::mt19937 rng(105);
  const std::vector<int64_t> counts = {40, 0, 300, 7, 129};
  const int64_t e = 5, kd = 96, nout = 144, m = 476;
  const Tensor off = offsets_of(counts);
  Tensor x = rand_host({m, kd}, rng, DType::BF16), w = rand_host({e, nout, kd}, rng, DType::BF16, -0.1f, 0.1f),
         dy = rand_host({m, nout}, rng, DType::BF16), y0 = rand_host({m, nout}, rng), dx0 = rand_host({m, kd}, rng);
  Tensor want_y = y0.clone(), want_dx = dx0.clone(), frozen;
  const am::LinearOut lo{.alpha = 0.75f, .accumulate = true};
  ops::grouped_linear_fwd(x, w, off, want_y, &counts, lo);
  ops::grouped_linear_bwd(x, w, off, dy, &want_dx, frozen, &counts, lo);
  Tensor xd = up(x, DType::BF16), wd = up(w, DType::BF16), dyd = up(dy, DType::BF16), offd = up(off, DType::I32);
  Tensor y = up(y0, DType::F32), dx = up(dx0, DType::F32);
  cu::PersistentGroupedArgs a;
  a.offsets = offd.data<int32_t>();
  a.e = e;
  a.rows = m;
  a.k = kd;
  a.n = nout;
  a.x = xd.raw();
  a.w = wd.raw();
  a.dy = dyd.raw();
  a.out_type = DType::F32;
  a.alpha = lo.alpha;
  a.beta = 1.f;
  a.out = y.raw();
  ASSERT_TRUE(cu::persistent_grouped_supported(a, DType::BF16));
  cu::persistent_grouped_fwd(a, cu::default_context());
  a.out = dx.raw();
  cu::persistent_grouped_dx(a, cu::default_context());
  expect_close(y, want_y, am::test::Tolerance{1e-4, 1e-4}, 1e-5, "persistent fwd fp32 out");
  expect_close(dx, want_dx, am::test::Tolerance{1e-4, 1e-4}, 1e-5, "persistent dx fp32 out");
  // Widths that are not multiples of 8 and misaligned pointers are not taken (the callers fall back).
  cu::PersistentGroupedArgs b = a;
  b.k = 13;
  EXPECT_FALSE(cu::persistent_grouped_supported(b, DType::BF16));
  b = a;
  b.x = static_cast<const char*>(a.x) + 2;
  EXPECT_FALSE(cu::persistent_grouped_supported(b, DType::BF16));
  EXPECT_FALSE(cu::persistent_grouped_supported(a, DType::F32));
}

// Products the kernel does not take (fp32, widths not multiples of 8) fall back to the cuBLAS paths under
// GroupedGemm::Persistent and still match.
TEST(CudaMoeGroupedGemm, UnsupportedFallsBack) {
  AM_REQUIRE_DEVICE();
  std::mt19937 rng(106);
  const std::vector<int64_t> counts = {3, 0, 50, 17};
  const int64_t e = 4, m = 70;
  const Tensor off = offsets_of(counts);
  using Case = std::tuple<DType, int64_t, int64_t>;
  for (const auto& [dt, kd, nout] : std::vector<Case>{{DType::F32, 64, 40}, {DType::BF16, 12, 20}}) {
    Tensor x = rand_host({m, kd}, rng, dt), w = rand_host({e, nout, kd}, rng, dt, -0.2f, 0.2f),
           dy = rand_host({m, nout}, rng, dt), dw0 = rand_host({e, nout, kd}, rng, DType::F32, -0.01f, 0.01f);
    Tensor want_y = Tensor::empty({m, nout}, DType::F32), want_dx = Tensor::empty({m, kd}, DType::F32),
           want_dw = dw0.clone();
    ops::grouped_linear_fwd(x, w, off, want_y, &counts);
    ops::grouped_linear_bwd(x, w, off, dy, &want_dx, want_dw, &counts);
    Tensor xd = up(x, dt), wd = up(w, dt), dyd = up(dy, dt), offd = up(off, DType::I32);
    Tensor y = poisoned({m, nout}, dt), dx = poisoned({m, kd}, dt), dw = up(dw0, DType::F32);
    cu::grouped_linear_fwd(xd, wd, offd, y, nullptr, cu::default_context(), kPersistent);
    cu::grouped_linear_bwd(xd, wd, offd, dyd, &dx, dw, nullptr, cu::default_context(), kPersistent);
    const std::string tag = std::string(am::dtype_name(dt)) + " K=" + std::to_string(kd);
    expect_close_dt(y, want_y, dt, "fallback fwd " + tag);
    expect_close_dt(dx, want_dx, dt, "fallback dx " + tag);
    expect_close(dw, want_dw, am::test::Tolerance{1e-3, 1e-4}, 1e-4, "fallback dw " + tag);
  }
}

TEST(CudaMoeGroupedGemm, W2ShapesMatchCpu) {
  AM_REQUIRE_DEVICE();
  // W2: N = 4096 tokens, E = 128, k = 8 -> 32768 grouped rows; gate_up [128, 1536, 2048], down [128, 2048, 768].
  // Uniform routing and the model's skew (one expert in ~88% of the tokens). Forward for both projections; the
  // backward (dx + dW) at the skewed down projection (host time of the reference).
  std::mt19937 rng(107);
  const int64_t n = 4096, e = 128, k = 8, h = 2048, i = 768;
  const std::vector<int64_t> skew = counts_of(realistic_skew_topk(n, e, k, 0.88, rng), e);
  std::vector<int64_t> uni(static_cast<size_t>(e), n * k / e);
  EXPECT_GT(*std::max_element(skew.begin(), skew.end()), 3400);
  check_persistent(uni, h, 2 * i, rng, "W2 uniform gate_up", Check{true, false});
  check_persistent(skew, h, 2 * i, rng, "W2 skewed gate_up", Check{true, false});
  check_persistent(skew, i, h, rng, "W2 skewed down", Check{true, true});
}

// The chain the model composes (as CudaMoe.WholeBlockMatchesCpu) under AM_MOE_GEMM=persistent: the dispatch plan
// fetches no host counts, every grouped product gets nullptr, and the results match the CPU block.
TEST(CudaMoeGroupedGemm, WholeBlockPersistentMatchesCpu) {
  AM_REQUIRE_DEVICE();
  ScopedEnv env("AM_MOE_GEMM", "persistent");
  std::mt19937 rng(108);
  const int64_t n = 384, e = 16, k = 4, h = 128, inner = 64;
  const DType dt = DType::BF16;
  // x with a positive mean and expert 2's router row constant: expert 2 in nearly every token's top-k (skewed
  // routing; some experts get no rows).
  Tensor x = rand_host({n, h}, rng, dt, -0.5f, 1.f), wr = rand_host({e, h}, rng, dt, -0.3f, 0.3f),
         wgu = rand_host({e, 2 * inner, h}, rng, dt, -0.1f, 0.1f), wd = rand_host({e, h, inner}, rng, dt, -0.1f, 0.1f),
         dy = rand_host({n, h}, rng, dt);
  for (int64_t j = 0; j < h; ++j) wr.f32()[2 * h + j] = 0.125f;
  Tensor xd = up(x, dt), wrd = up(wr, dt), wgud = up(wgu, dt), wdd = up(wd, dt), dyd = up(dy, dt);
  EXPECT_FALSE(ops::moe_grouped_wants_host_counts(xd));
  EXPECT_TRUE(ops::moe_grouped_wants_host_counts(x));
  Tensor logits = cu::empty({n, e}, dt), probs = cu::empty({n, e}, DType::F32), idx = cu::empty({n, k}, DType::I32),
         tw = cu::empty({n, k}, DType::F32);
  ops::linear_fwd(xd, wrd, nullptr, logits);
  ops::moe_router_fwd(logits, k, true, probs, idx, tw);
  Tensor off = cu::empty({e + 1}, DType::I32), perm = cu::empty({n * k}, DType::I32), inv = cu::empty({n * k}, DType::I32);
  ops::moe_dispatch_plan(idx, e, off, perm, inv, nullptr);
  const ExpertPath got = run_expert_path(xd, wgud, wdd, dyd, off, perm, inv, tw, k, nullptr);
  cu::default_context().check_device_errors();
  // Host, with the device's routing.
  Tensor hidx = cu::to_host(idx), htw = down(tw);
  Tensor hoff = Tensor::empty({e + 1}, DType::I32), hperm = Tensor::empty({n * k}, DType::I32),
         hinv = Tensor::empty({n * k}, DType::I32);
  std::vector<int64_t> counts;
  ops::moe_dispatch_plan(hidx, e, hoff, hperm, hinv, &counts);
  EXPECT_GT(*std::max_element(counts.begin(), counts.end()), n / 2) << "the biased router should prefer expert 2";
  expect_expert_path_close(got, run_expert_path(x, wgu, wd, dy, hoff, hperm, hinv, htw, k, &counts));
}

// The persistent products under CUDA-graph capture of the context's stream (relaxed mode): a host sync or a
// device-to-host copy inside them would invalidate the capture. The replayed graph gives the eager results.
TEST(CudaMoeGroupedGemm, CapturesWithoutHostSync) {
  AM_REQUIRE_DEVICE();
  std::mt19937 rng(109);
  const std::vector<int64_t> counts = {0, 300, 5, 0, 1000, 77, 1, 0};
  const int64_t e = 8, kd = 192, nout = 128;
  const int64_t m = std::accumulate(counts.begin(), counts.end(), int64_t{0});
  const Tensor off = offsets_of(counts);
  Tensor xd = up(rand_host({m, kd}, rng, DType::BF16), DType::BF16),
         wd = up(rand_host({e, nout, kd}, rng, DType::BF16, -0.1f, 0.1f), DType::BF16),
         dyd = up(rand_host({m, nout}, rng, DType::BF16), DType::BF16), offd = up(off, DType::I32);
  Tensor dw0 = rand_host({e, nout, kd}, rng, DType::F32, -0.01f, 0.01f);
  auto& ctx = cu::default_context();
  Tensor y1 = poisoned({m, nout}, DType::BF16), dx1 = poisoned({m, kd}, DType::BF16), dw1 = up(dw0, DType::F32);
  cu::grouped_linear_fwd(xd, wd, offd, y1, nullptr, ctx, kPersistent);
  cu::grouped_linear_bwd(xd, wd, offd, dyd, &dx1, dw1, nullptr, ctx, kPersistent);
  Tensor y2 = poisoned({m, nout}, DType::BF16), dx2 = poisoned({m, kd}, DType::BF16), dw2 = up(dw0, DType::F32);
  ASSERT_EQ(cudaStreamSynchronize(ctx.stream()), cudaSuccess);
  cudaGraph_t graph = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(ctx.stream(), cudaStreamCaptureModeRelaxed), cudaSuccess);
  bool threw = false;
  try {
    cu::grouped_linear_fwd(xd, wd, offd, y2, nullptr, ctx, kPersistent);
    cu::grouped_linear_bwd(xd, wd, offd, dyd, &dx2, dw2, nullptr, ctx, kPersistent);
  } catch (const std::exception& ex) {
    threw = true;
    ADD_FAILURE() << "under capture: " << ex.what();
  }
  const cudaError_t end = cudaStreamEndCapture(ctx.stream(), &graph);
  ASSERT_FALSE(threw);
  ASSERT_EQ(end, cudaSuccess) << cudaGetErrorString(end);
  cudaGraphExec_t exec = nullptr;
  ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
  ASSERT_EQ(cudaGraphLaunch(exec, ctx.stream()), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(ctx.stream()), cudaSuccess);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  // Same kernels, same inputs: bit-identical.
  using Pair = std::tuple<const Tensor*, const Tensor*, const char*>;
  for (const auto& [a, b, what] : std::vector<Pair>{{&y1, &y2, "y"}, {&dx1, &dx2, "dx"}, {&dw1, &dw2, "dw"}}) {
    const Tensor ha = down(*a), hb = down(*b);
    for (int64_t i = 0; i < ha.numel(); ++i) ASSERT_EQ(ha.f32()[i], hb.f32()[i]) << what << " element " << i;
  }
}
