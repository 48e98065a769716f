// CUDA MoE ops (src/backend/cuda/moe*.cu, reached through the am::ops front-ends of src/ops/moe_ops.h)
// against the CPU reference on host fp32 copies of the same (bf16-rounded where the device is bf16) inputs.
// Random shapes including widths that are not multiples of the vector width (scalar fallbacks), experts with no
// rows, every grouped-GEMM implementation (grouped API, per-expert, padded strided-batched, persistent, Auto) including
// skewed counts, and the W2 shape (N = 4096 tokens, E = 128, k = 8, H = 2048, I = 768).
// Outputs are poisoned with NaN before each call; parameter gradients start from random values (+= contract).
// Runs only where a CUDA device is visible (GTEST_SKIP otherwise).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../common/tolerance.h"
#include "gpu_test_util.h"
#include "moe_test_util.h"
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/moe.h"
#include "core/error.h"
#include "core/tensor.h"
#include "ops/moe_ops.h"
#include "ops/ops.h"

namespace {

namespace cu = am::cuda;
namespace ops = am::ops;
using namespace am::moe_test;
using am::gpu_test::kNaN;
#define REQUIRE_DEVICE() AM_REQUIRE_DEVICE()

std::vector<int32_t> ivals(const Tensor& t) {
  Tensor h = t.device() == am::DeviceType::CUDA ? cu::to_host(t) : t;
  return std::vector<int32_t>(h.data<int32_t>(), h.data<int32_t>() + h.numel());
}
const char* dname(DType d) { return am::dtype_name(d); }

// Router-like top-k ids: distinct per row, drawn with skewed expert popularity (some experts get no rows).
Tensor skewed_topk(int64_t n, int64_t e, int64_t k, std::mt19937& rng) {
  Tensor t = Tensor::empty({n, k}, DType::I32);
  std::vector<double> weight(static_cast<size_t>(e));
  for (int64_t j = 0; j < e; ++j) weight[j] = (j % 7 == 3) ? 0.0 : std::pow(1.0 + j % 5, 2.0);
  int64_t positive = 0;
  for (double w : weight) positive += w > 0;
  if (positive < k) std::fill(weight.begin(), weight.end(), 1.0);
  for (int64_t r = 0; r < n; ++r) {
    std::vector<double> w = weight;
    for (int64_t s = 0; s < k; ++s) {
      std::discrete_distribution<int> d(w.begin(), w.end());
      const int pick = d(rng);
      t.data<int32_t>()[r * k + s] = pick;
      w[pick] = 0.0;
    }
  }
  return t;
}

struct HostPlan {
  Tensor offsets, perm, inv;
  std::vector<int64_t> counts;
};
HostPlan cpu_plan(const Tensor& idx, int64_t e) {
  HostPlan p{Tensor::empty({e + 1}, DType::I32), Tensor::empty({idx.numel()}, DType::I32),
             Tensor::empty({idx.numel()}, DType::I32), {}};
  ops::moe_dispatch_plan(idx, e, p.offsets, p.perm, p.inv, &p.counts);
  return p;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
TEST(CudaMoe, RouterForwardMatchesCpu) {
  REQUIRE_DEVICE();
  struct Case {
    int64_t n, e, k;
  };
  const Case cases[] = {{1, 1, 1}, {37, 60, 4}, {300, 128, 8}, {64, 8, 2}, {33, 256, 16}, {5, 1000, 32}, {4096, 128, 8}};
  std::mt19937 rng(1);
  for (const Case& c : cases)
    for (DType dt : {DType::F32, DType::BF16})
      for (bool norm : {false, true}) {
        const std::string tag = "n=" + std::to_string(c.n) + " e=" + std::to_string(c.e) + " k=" + std::to_string(c.k) +
                                " " + dname(dt) + " norm=" + std::to_string(norm);
        Tensor lh = rand_host({c.n, c.e}, rng, dt, -3.f, 3.f);
        Tensor probs = poisoned({c.n, c.e}, DType::F32), idx = poisoned({c.n, c.k}, DType::I32),
               w = poisoned({c.n, c.k}, DType::F32);
        ops::moe_router_fwd(up(lh, dt), c.k, norm, probs, idx, w);
        Tensor rp = Tensor::empty({c.n, c.e}, DType::F32), ri = Tensor::empty({c.n, c.k}, DType::I32),
               rw = Tensor::empty({c.n, c.k}, DType::F32);
        ops::moe_router_fwd(lh, c.k, norm, rp, ri, rw);
        expect_close(probs, rp, am::test::tolerance(DType::F32), 1e-5, "probs " + tag);
        // The device's top-k must be exactly the stable descending order of the device's probabilities.
        Tensor hp = down(probs);
        const std::vector<int32_t> gi = ivals(idx);
        Tensor want_w = Tensor::empty({c.n, c.k}, DType::F32);
        int wrong = 0;
        for (int64_t t = 0; t < c.n; ++t) {
          std::vector<int32_t> order(static_cast<size_t>(c.e));
          std::iota(order.begin(), order.end(), 0);
          const float* p = hp.f32() + t * c.e;
          std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return p[a] > p[b]; });
          double s = 0;
          for (int64_t j = 0; j < c.k; ++j) s += p[order[j]];
          for (int64_t j = 0; j < c.k; ++j) {
            if (gi[t * c.k + j] != order[j] && ++wrong <= 3)
              ADD_FAILURE() << tag << " row " << t << " slot " << j << ": " << gi[t * c.k + j] << " vs " << order[j];
            want_w.f32()[t * c.k + j] = static_cast<float>(norm ? p[order[j]] / s : p[order[j]]);
          }
        }
        EXPECT_EQ(wrong, 0) << tag;
        expect_close(w, want_w, am::test::tolerance(DType::F32), 1e-5, "topk_w " + tag);
      }
}

TEST(CudaMoe, RouterTiesPickLowerIndex) {
  REQUIRE_DEVICE();
  Tensor lh = Tensor::empty({2, 40}, DType::F32);
  for (int i = 0; i < 80; ++i) lh.f32()[i] = (i % 40) % 3 == 1 ? 2.f : 0.f;  // experts 1, 4, 7, ... tie
  Tensor probs = cu::empty({2, 40}, DType::F32), idx = cu::empty({2, 5}, DType::I32), w = cu::empty({2, 5}, DType::F32);
  ops::moe_router_fwd(up(lh, DType::F32), 5, true, probs, idx, w);
  EXPECT_EQ(ivals(idx), (std::vector<int32_t>{1, 4, 7, 10, 13, 1, 4, 7, 10, 13}));
}

TEST(CudaMoe, RouterBackwardMatchesCpu) {
  REQUIRE_DEVICE();
  std::mt19937 rng(2);
  struct Case {
    int64_t n, e, k;
  };
  for (const Case& c : {Case{19, 60, 4}, Case{256, 128, 8}, Case{7, 1000, 32}, Case{3, 2, 1}})
    for (bool norm : {false, true})
      for (bool extra : {false, true})
        for (DType dt : {DType::F32, DType::BF16}) {
          const std::string tag = "e=" + std::to_string(c.e) + " k=" + std::to_string(c.k) + " norm=" +
                                  std::to_string(norm) + " extra=" + std::to_string(extra) + " " + dname(dt);
          Tensor lh = rand_host({c.n, c.e}, rng, DType::F32, -2.f, 2.f);
          Tensor rp = Tensor::empty({c.n, c.e}, DType::F32), ri = Tensor::empty({c.n, c.k}, DType::I32),
                 rw = Tensor::empty({c.n, c.k}, DType::F32);
          ops::moe_router_fwd(lh, c.k, norm, rp, ri, rw);
          Tensor dw = rand_host({c.n, c.k}, rng), dpe = rand_host({c.n, c.e}, rng, DType::F32, -0.1f, 0.1f);
          Tensor want = Tensor::empty({c.n, c.e}, DType::F32);
          ops::moe_router_bwd(rp, ri, rw, norm, dw, extra ? &dpe : nullptr, want);
          Tensor dl = poisoned({c.n, c.e}, dt);
          Tensor dpe_d = up(dpe, DType::F32);
          ops::moe_router_bwd(up(rp, DType::F32), up(ri, DType::I32), up(rw, DType::F32), norm, up(dw, DType::F32),
                              extra ? &dpe_d : nullptr, dl);
          // fp32 math on both sides; the bf16 output is compared at bf16 tolerance.
          expect_close(dl, want, dt == DType::F32 ? am::test::Tolerance{1e-4, 1e-6} : am::test::tolerance(dt),
                       dt == DType::F32 ? 1e-4 : 1e-2, "dlogits " + tag);
        }
}

// Routing statistics over several layers (counts exact, psum within fp32 rounding) and the aux loss: dprobs bitwise
// the host's (exact counts, the same double formula), aux bitwise too when both devices see the same psum.
TEST(CudaMoe, RoutingStatsAndAuxLossMatchCpu) {
  REQUIRE_DEVICE();
  std::mt19937 rng(9);
  struct Case {
    int64_t b, t, e, k, layers;
    bool all_pad;
  };
  for (const Case& c : {Case{1, 1, 2, 1, 1, false}, Case{2, 77, 60, 4, 3, false}, Case{4, 300, 128, 8, 2, false},
                        Case{3, 129, 8, 2, 4, false}, Case{1, 50, 1000, 32, 1, false}, Case{2, 40, 16, 2, 2, true},
                        Case{2, 2048, 128, 8, 2, false}}) {
    const int64_t n = c.b * c.t, e = c.e, k = c.k;
    const std::string tag = "n=" + std::to_string(n) + " e=" + std::to_string(e) + " k=" + std::to_string(k) +
                            " L=" + std::to_string(c.layers) + (c.all_pad ? " all padding" : "");
    // Right-padded rows of packed samples (segment ids >= 0), then -1.
    Tensor seg = Tensor::empty({c.b, c.t}, DType::I32);
    for (int64_t r = 0; r < c.b; ++r) {
      const int64_t real = c.all_pad ? 0 : rint(rng, 0, c.t);
      for (int64_t i = 0; i < c.t; ++i) seg.data<int32_t>()[r * c.t + i] = i < real ? static_cast<int32_t>(i / 17) : -1;
    }
    const Tensor seg_d = up(seg, DType::I32);
    Tensor counts = Tensor::zeros({c.layers, e}, DType::I32), f = Tensor::zeros({e}, DType::I32),
           p = Tensor::zeros({e}, DType::F32);
    Tensor counts_d = up(counts, DType::I32), f_d = up(f, DType::I32), p_d = up(p, DType::F32);
    for (int64_t l = 0; l < c.layers; ++l) {
      const Tensor idx = skewed_topk(n, e, k, rng), probs = rand_host({n, e}, rng, DType::F32, 0.f, 1.f);
      Tensor row = counts.slice_rows(l, l + 1), row_d = counts_d.slice_rows(l, l + 1);
      ops::moe_routing_stats(idx, probs, seg, &row, &p, &f);
      ops::moe_routing_stats(up(idx, DType::I32), up(probs, DType::F32), seg_d, &row_d, &p_d, &f_d);
    }
    EXPECT_EQ(ivals(counts_d), ivals(counts)) << tag;
    EXPECT_EQ(ivals(f_d), ivals(f)) << tag;
    expect_close(p_d, p, am::test::tolerance(DType::F32), 1e-5, "psum " + tag);
    const float scale = 0.02f / 3.f;
    Tensor aux = Tensor::empty({1}, DType::F32), dprobs = Tensor::empty({n, e}, DType::F32);
    ops::moe_aux_loss(f, p, seg, c.layers, scale, aux, &dprobs);
    Tensor aux_d = poisoned({1}, DType::F32), dprobs_d = poisoned({n, e}, DType::F32);
    ops::moe_aux_loss(f_d, p_d, seg_d, c.layers, scale, aux_d, &dprobs_d);
    const Tensor dh = down(dprobs_d);
    int64_t differ = 0;
    for (int64_t i = 0; i < n * e; ++i) differ += dh.f32()[i] != dprobs.f32()[i];
    EXPECT_EQ(differ, 0) << "dprobs " << tag;
    const double a = down(aux_d).f32()[0], want = aux.f32()[0];
    EXPECT_NEAR(a, want, 1e-5 * std::max(1.0, std::abs(want))) << "aux " << tag;
    // The same psum on both devices: the same aux, bit for bit.
    Tensor aux_same = poisoned({1}, DType::F32);
    ops::moe_aux_loss(f_d, up(p, DType::F32), seg_d, c.layers, scale, aux_same, nullptr);
    EXPECT_EQ(down(aux_same).f32()[0], aux.f32()[0]) << "aux (same psum) " << tag;
  }
}

TEST(CudaMoe, DispatchPlanMatchesCpuExactly) {
  REQUIRE_DEVICE();
  std::mt19937 rng(3);
  struct Case {
    int64_t n, e, k;
  };
  for (const Case& c : {Case{1, 1, 1}, Case{5, 4, 2}, Case{300, 60, 4}, Case{4096, 128, 8}, Case{1000, 1024, 3},
                        Case{0, 8, 2}, Case{777, 16, 16}}) {
    const std::string tag = "n=" + std::to_string(c.n) + " e=" + std::to_string(c.e) + " k=" + std::to_string(c.k);
    Tensor idx = skewed_topk(c.n, c.e, c.k, rng);
    HostPlan want = cpu_plan(idx, c.e);
    Tensor off = poisoned({c.e + 1}, DType::I32), perm = poisoned({c.n * c.k}, DType::I32),
           inv = poisoned({c.n * c.k}, DType::I32);
    Tensor idx_d = up(idx, DType::I32);
    std::vector<int64_t> counts;
    ops::moe_dispatch_plan(idx_d, c.e, off, perm, inv, &counts);
    EXPECT_EQ(counts, want.counts) << tag;
    EXPECT_EQ(ivals(off), ivals(want.offsets)) << tag;
    EXPECT_EQ(ivals(perm), ivals(want.perm)) << tag;
    EXPECT_EQ(ivals(inv), ivals(want.inv)) << tag;
    // Without host counts: the same plan, no sync needed.
    Tensor perm2 = poisoned({c.n * c.k}, DType::I32);
    ops::moe_dispatch_plan(idx_d, c.e, off, perm2, inv, nullptr);
    EXPECT_EQ(ivals(perm2), ivals(want.perm)) << tag;
  }
}

TEST(CudaMoe, DispatchPlanOutOfRangeExpert) {
  REQUIRE_DEVICE();
  Tensor idx = Tensor::empty({3, 2}, DType::I32);
  const int32_t v[] = {0, 1, 2, 9, 3, 1};
  std::copy(v, v + 6, idx.data<int32_t>());
  Tensor idx_d = up(idx, DType::I32), off = cu::empty({5}, DType::I32), perm = cu::empty({6}, DType::I32),
         inv = cu::empty({6}, DType::I32);
  std::vector<int64_t> counts;
  try {
    ops::moe_dispatch_plan(idx_d, 4, off, perm, inv, &counts);
    ADD_FAILURE() << "expected DataError";
  } catch (const am::DataError& e) {
    EXPECT_NE(std::string(e.what()).find("9"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("position 3"), std::string::npos) << e.what();
  }
  ops::moe_dispatch_plan(idx_d, 4, off, perm, inv, nullptr);  // reported through the context's error slot
  EXPECT_THROW(cu::default_context().check_device_errors(), am::DataError);
  cu::default_context().check_device_errors();  // cleared
}

TEST(CudaMoe, GatherCombineAndBackwardMatchCpu) {
  REQUIRE_DEVICE();
  std::mt19937 rng(4);
  struct Case {
    int64_t n, e, k, h;
  };
  for (const Case& c : {Case{7, 4, 2, 5}, Case{100, 16, 4, 96}, Case{33, 8, 3, 2050}, Case{4096, 128, 8, 2048}})
    for (DType dt : {DType::F32, DType::BF16}) {
      const std::string tag = "n=" + std::to_string(c.n) + " k=" + std::to_string(c.k) + " h=" + std::to_string(c.h) +
                              " " + dname(dt);
      HostPlan p = cpu_plan(skewed_topk(c.n, c.e, c.k, rng), c.e);
      Tensor perm = up(p.perm, DType::I32), inv = up(p.inv, DType::I32);
      const int64_t rows = c.n * c.k;
      Tensor x = rand_host({c.n, c.h}, rng, dt);
      Tensor xg = poisoned({rows, c.h}, dt), want_xg = Tensor::empty({rows, c.h}, DType::F32);
      ops::moe_gather(up(x, dt), perm, c.k, xg);
      ops::moe_gather(x, p.perm, c.k, want_xg);
      expect_close(xg, want_xg, am::test::Tolerance{0, 0}, 0, "gather " + tag);  // a copy: exact

      Tensor dxg = rand_host({rows, c.h}, rng, dt);
      Tensor dx = poisoned({c.n, c.h}, dt), want_dx = Tensor::empty({c.n, c.h}, DType::F32);
      ops::moe_gather_bwd(up(dxg, dt), inv, c.k, dx);
      ops::moe_gather_bwd(dxg, p.inv, c.k, want_dx);
      expect_close_dt(dx, want_dx, dt, "gather_bwd " + tag);

      Tensor yg = rand_host({rows, c.h}, rng, dt), tw = rand_host({c.n, c.k}, rng, DType::F32, 0.f, 1.f);
      Tensor y = poisoned({c.n, c.h}, dt), want_y = Tensor::empty({c.n, c.h}, DType::F32);
      Tensor yg_d = up(yg, dt), tw_d = up(tw, DType::F32);
      ops::moe_combine(yg_d, inv, tw_d, y);
      ops::moe_combine(yg, p.inv, tw, want_y);
      expect_close_dt(y, want_y, dt, "combine " + tag);

      Tensor dy = rand_host({c.n, c.h}, rng, dt);
      Tensor dyg = poisoned({rows, c.h}, dt), dtw = poisoned({c.n, c.k}, DType::F32);
      Tensor want_dyg = Tensor::empty({rows, c.h}, DType::F32), want_dtw = Tensor::empty({c.n, c.k}, DType::F32);
      ops::moe_combine_bwd(yg_d, inv, tw_d, up(dy, dt), dyg, dtw);
      ops::moe_combine_bwd(yg, p.inv, tw, dy, want_dyg, want_dtw);
      expect_close_dt(dyg, want_dyg, dt, "combine_bwd dyg " + tag);
      // fp32 dot products of length H: relative error ~ sqrt(H) * 2^-24 (fp32 in and out even for bf16 data).
      expect_close(dtw, want_dtw, am::test::Tolerance{1e-4, 1e-5}, 1e-5, "combine_bwd dtopk_w " + tag);
    }
}

TEST(CudaMoe, SwigluFusedMatchesCpu) {
  REQUIRE_DEVICE();
  std::mt19937 rng(5);
  for (auto [m, i] : {std::pair<int64_t, int64_t>{1, 1}, {17, 13}, {64, 768}, {5, 1000}})
    for (DType dt : {DType::F32, DType::BF16}) {
      const std::string tag = "m=" + std::to_string(m) + " i=" + std::to_string(i) + " " + dname(dt);
      Tensor gu = rand_host({m, 2 * i}, rng, dt, -4.f, 4.f), dh = rand_host({m, i}, rng, dt);
      Tensor h = poisoned({m, i}, dt), want_h = Tensor::empty({m, i}, DType::F32);
      Tensor gu_d = up(gu, dt);
      ops::swiglu_fused_fwd(gu_d, h);
      ops::swiglu_fused_fwd(gu, want_h);
      expect_close_dt(h, want_h, dt, "swiglu_fused_fwd " + tag);
      Tensor dgu = poisoned({m, 2 * i}, dt), want = Tensor::empty({m, 2 * i}, DType::F32);
      ops::swiglu_fused_bwd(gu_d, up(dh, dt), dgu);
      ops::swiglu_fused_bwd(gu, dh, want);
      expect_close_dt(dgu, want, dt, "swiglu_fused_bwd " + tag);
      ops::swiglu_fused_bwd(gu_d, up(dh, dt), gu_d);  // in place (dgu aliasing gu)
      expect_close_dt(gu_d, want, dt, "swiglu_fused_bwd in place " + tag);
    }
}

namespace {
using Opt = cu::GroupedLinearOptions;
std::string impl_name(const Opt& o) {
  switch (o.impl) {
    case cu::GroupedGemm::Auto: return "auto";
    case cu::GroupedGemm::Grouped: return "grouped";
    case cu::GroupedGemm::PerExpert: return "per-expert";
    case cu::GroupedGemm::Padded: return o.pad_rows ? "padded cap " + std::to_string(o.pad_rows) : "padded";
    case cu::GroupedGemm::Persistent: return "persistent";
  }
  return "?";
}
const Opt kAuto{cu::GroupedGemm::Auto}, kGrouped{cu::GroupedGemm::Grouped}, kPerExpert{cu::GroupedGemm::PerExpert},
    kPadded{cu::GroupedGemm::Padded}, kPersistent{cu::GroupedGemm::Persistent};
Opt padded_cap(int64_t rows) { return Opt{cu::GroupedGemm::Padded, rows}; }

// Grouped linear on the device, each given implementation in turn, against one CPU reference.
void check_grouped(int64_t e, int64_t k_dim, int64_t nout, const std::vector<int64_t>& counts, DType dt,
                   const std::vector<Opt>& impls, std::mt19937& rng, const std::string& tag0, bool pass_counts = true,
                   bool twice_check = true) {
  const int64_t m = std::accumulate(counts.begin(), counts.end(), int64_t{0});
  Tensor off = Tensor::empty({e + 1}, DType::I32);
  off.data<int32_t>()[0] = 0;
  for (int64_t j = 0; j < e; ++j) off.data<int32_t>()[j + 1] = off.data<int32_t>()[j] + static_cast<int32_t>(counts[j]);
  const float ws = 1.f / std::sqrt(static_cast<float>(k_dim));
  Tensor x = rand_host({m, k_dim}, rng, dt), w = rand_host({e, nout, k_dim}, rng, dt, -ws, ws),
         dy = rand_host({m, nout}, rng, dt), dw0 = rand_host({e, nout, k_dim}, rng, DType::F32, -0.01f, 0.01f);
  Tensor xd = up(x, dt), wd = up(w, dt), dyd = up(dy, dt), offd = up(off, DType::I32);
  Tensor want_y = Tensor::empty({m, nout}, DType::F32), want_dx = Tensor::empty({m, k_dim}, DType::F32),
         want_dw = dw0.clone();
  ops::grouped_linear_fwd(x, w, off, want_y, &counts);
  ops::grouped_linear_bwd(x, w, off, dy, &want_dx, want_dw, &counts);
  Tensor twice = want_dw.clone();
  for (int64_t i = 0; i < twice.numel(); ++i) twice.f32()[i] = 2 * want_dw.f32()[i] - dw0.f32()[i];
  for (const Opt& opt : impls) {
    const std::string tag = impl_name(opt) + " " + tag0;
    Tensor y = poisoned({m, nout}, dt), dx = poisoned({m, k_dim}, dt), dw = up(dw0, DType::F32);
    cu::grouped_linear_fwd(xd, wd, offd, y, pass_counts ? &counts : nullptr, cu::default_context(), opt);
    cu::grouped_linear_bwd(xd, wd, offd, dyd, &dx, dw, pass_counts ? &counts : nullptr, cu::default_context(), opt);
    expect_close_dt(y, want_y, dt, "grouped fwd " + tag);
    expect_close_dt(dx, want_dx, dt, "grouped dx " + tag);
    // dw: fp32 accumulation of exact bf16 products on both sides (order differs).
    expect_close(dw, want_dw, am::test::Tolerance{1e-3, 1e-4}, 1e-4, "grouped dw " + tag);
    // Empty experts' gradients untouched (the padded path adds exactly 0 to them).
    Tensor got_dw = down(dw);
    for (int64_t j = 0; j < e; ++j) {
      if (counts[j] != 0) continue;
      for (int64_t i = 0; i < nout * k_dim; ++i) {
        ASSERT_EQ(got_dw.f32()[j * nout * k_dim + i], dw0.f32()[j * nout * k_dim + i]) << tag << " expert " << j;
      }
    }
    // Frozen experts (dw undefined): dx only, the same as with dw; with neither dx nor dw, nothing to do.
    {
      Tensor dx2 = poisoned({m, k_dim}, dt), frozen;
      cu::grouped_linear_bwd(xd, wd, offd, dyd, &dx2, frozen, pass_counts ? &counts : nullptr, cu::default_context(),
                             opt);
      EXPECT_FALSE(frozen.defined());
      expect_close_dt(dx2, want_dx, dt, "grouped dx, frozen dw " + tag);
      cu::grouped_linear_bwd(xd, wd, offd, dyd, nullptr, frozen, pass_counts ? &counts : nullptr,
                             cu::default_context(), opt);
    }
    // dx == nullptr: dw only, accumulated again.
    if (!twice_check) continue;
    cu::grouped_linear_bwd(xd, wd, offd, dyd, nullptr, dw, &counts, cu::default_context(), opt);
    expect_close(dw, twice, am::test::Tolerance{1e-3, 1e-4}, 1e-4, "grouped dw twice " + tag);
  }
}
// Uniform routing: k distinct experts per token, uniformly at random (the balanced case Auto pads).
Tensor uniform_topk(int64_t n, int64_t e, int64_t k, std::mt19937& rng) {
  Tensor t = Tensor::empty({n, k}, DType::I32);
  std::vector<int32_t> ids(static_cast<size_t>(e));
  std::iota(ids.begin(), ids.end(), 0);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t s = 0; s < k; ++s) std::swap(ids[s], ids[rint(rng, s, e - 1)]);
    std::copy(ids.begin(), ids.begin() + k, t.data<int32_t>() + r * k);
  }
  return t;
}
}  // namespace

TEST(CudaMoe, GroupedLinearMatchesCpu) {
  REQUIRE_DEVICE();
  std::mt19937 rng(6);
  const std::vector<Opt> impls = {kAuto, kGrouped, kPerExpert, kPadded, padded_cap(8), padded_cap(24), kPersistent};
  for (DType dt : {DType::BF16, DType::F32})
    for (int rep = 0; rep < 4; ++rep) {
      // rep 3: row widths of 26 / 24 bytes (bf16) and 52 / 48 bytes (fp32): the padding copies' 2-, 4- and 8-byte
      // paths; only on the padded path (the others take cuBLASLt / grouped-API alignment rules as they come).
      const int64_t e = rint(rng, 2, 12), kd = rep == 3 ? 13 : 8 * rint(rng, 1, 40),
                    nout = rep == 3 ? 12 : 8 * rint(rng, 1, 40);
      std::vector<int64_t> counts(static_cast<size_t>(e));
      for (auto& c : counts) c = rng() % 3 == 0 ? 0 : rint(rng, 1, 70);
      counts[0] = 0;
      const std::string tag = std::string(dname(dt)) + " E=" + std::to_string(e) + " K=" + std::to_string(kd) +
                              " Nout=" + std::to_string(nout);
      check_grouped(e, kd, nout, counts, dt, rep == 3 ? std::vector<Opt>{kPadded, padded_cap(8)} : impls, rng, tag,
                    rep != 1);
    }
}

// Frozen experts through the am::ops front-end (LoRA: the expert weights have no gradient tensor): dx matches the
// CPU reference computed with an undefined dw as well.
TEST(CudaMoe, GroupedLinearFrozenExpertsThroughOps) {
  REQUIRE_DEVICE();
  std::mt19937 rng(12);
  for (DType dt : {DType::BF16, DType::F32}) {
    const int64_t e = 6, kd = 72, nout = 40;
    const std::vector<int64_t> counts = {5, 0, 33, 1, 0, 19};
    const int64_t m = std::accumulate(counts.begin(), counts.end(), int64_t{0});
    Tensor off = Tensor::empty({e + 1}, DType::I32);
    off.data<int32_t>()[0] = 0;
    for (int64_t j = 0; j < e; ++j) off.data<int32_t>()[j + 1] = off.data<int32_t>()[j] + static_cast<int32_t>(counts[j]);
    Tensor x = rand_host({m, kd}, rng, dt), w = rand_host({e, nout, kd}, rng, dt, -0.1f, 0.1f),
           dy = rand_host({m, nout}, rng, dt);
    Tensor want_dx = Tensor::empty({m, kd}, DType::F32), host_frozen;
    ops::grouped_linear_bwd(x, w, off, dy, &want_dx, host_frozen, &counts);
    Tensor xd = up(x, dt), wd = up(w, dt), dyd = up(dy, dt), offd = up(off, DType::I32);
    for (bool with_counts : {true, false}) {
      Tensor dx = poisoned({m, kd}, dt), frozen;
      ops::grouped_linear_bwd(xd, wd, offd, dyd, &dx, frozen, with_counts ? &counts : nullptr);
      expect_close_dt(dx, want_dx, dt, std::string("ops::grouped_linear_bwd frozen dx ") + dname(dt) +
                                           (with_counts ? "" : " (offsets read back)"));
    }
  }
}

// LinearOut on the grouped GEMMs (the grouped LoRA branch: u = s x A_e^T, y += u B_e^T, du = s g B_e, dx += du A_e):
// y = alpha x w_e^T (+ y) and dx = alpha dy w_e (+ dx) on every implementation (the padded one pads the old rows into
// its scratch; capped: the overflow rows through the grouped path), against the CPU reference with the same options
// (itself bit-identical to the separate scale_ / add_). dw is unaffected by the options.
TEST(CudaMoe, GroupedLinearAlphaAccumulateMatchCpu) {
  REQUIRE_DEVICE();
  std::mt19937 rng(31);
  const std::vector<Opt> impls = {kAuto, kGrouped, kPerExpert, kPadded, padded_cap(8), kPersistent};
  for (DType dt : {DType::BF16, DType::F32}) {
    const int64_t e = 6, kd = 72, nout = 40;
    const std::vector<int64_t> counts = {0, 5, 33, 1, 0, 19};
    const int64_t m = std::accumulate(counts.begin(), counts.end(), int64_t{0});
    Tensor off = Tensor::empty({e + 1}, DType::I32);
    off.data<int32_t>()[0] = 0;
    for (int64_t j = 0; j < e; ++j) off.data<int32_t>()[j + 1] = off.data<int32_t>()[j] + static_cast<int32_t>(counts[j]);
    Tensor x = rand_host({m, kd}, rng, dt), w = rand_host({e, nout, kd}, rng, dt, -0.1f, 0.1f),
           dy = rand_host({m, nout}, rng, dt), y0 = rand_host({m, nout}, rng, dt), dx0 = rand_host({m, kd}, rng, dt),
           dw0 = rand_host({e, nout, kd}, rng, DType::F32, -0.01f, 0.01f);
    Tensor xd = up(x, dt), wd = up(w, dt), dyd = up(dy, dt), offd = up(off, DType::I32);
    for (const am::LinearOut lo : {am::LinearOut{.alpha = 0.5f}, am::LinearOut{.accumulate = true},
                                   am::LinearOut{.alpha = 2.f, .accumulate = true},
                                   am::LinearOut{.alpha = 0.3f, .accumulate = true}}) {
      Tensor want_y = lo.accumulate ? y0.clone() : Tensor::empty({m, nout}, DType::F32);
      Tensor want_dx = lo.accumulate ? dx0.clone() : Tensor::empty({m, kd}, DType::F32), want_dw = dw0.clone();
      ops::grouped_linear_fwd(x, w, off, want_y, &counts, lo);
      ops::grouped_linear_bwd(x, w, off, dy, &want_dx, want_dw, &counts, lo);
      for (const Opt& opt : impls) {
        const std::string tag = impl_name(opt) + " " + dname(dt) + " alpha=" + std::to_string(lo.alpha) +
                                (lo.accumulate ? " accumulate" : "");
        Tensor y = lo.accumulate ? up(y0, dt) : poisoned({m, nout}, dt);
        Tensor dx = lo.accumulate ? up(dx0, dt) : poisoned({m, kd}, dt), dw = up(dw0, DType::F32);
        cu::grouped_linear_fwd(xd, wd, offd, y, &counts, cu::default_context(), opt, lo);
        cu::grouped_linear_bwd(xd, wd, offd, dyd, &dx, dw, &counts, cu::default_context(), opt, lo);
        expect_close_dt(y, want_y, dt, "grouped fwd " + tag);
        expect_close_dt(dx, want_dx, dt, "grouped dx " + tag);
        expect_close(dw, want_dw, am::test::Tolerance{1e-3, 1e-4}, 1e-4, "grouped dw " + tag);
      }
      // Through the am::ops front-end (the route the grouped LoRA branch takes), offsets read back.
      Tensor y = lo.accumulate ? up(y0, dt) : poisoned({m, nout}, dt);
      Tensor dx = lo.accumulate ? up(dx0, dt) : poisoned({m, kd}, dt), frozen;
      ops::grouped_linear_fwd(xd, wd, offd, y, nullptr, lo);
      ops::grouped_linear_bwd(xd, wd, offd, dyd, &dx, frozen, nullptr, lo);
      expect_close_dt(y, want_y, dt, std::string("ops::grouped_linear_fwd ") + dname(dt));
      expect_close_dt(dx, want_dx, dt, std::string("ops::grouped_linear_bwd frozen dx ") + dname(dt));
    }
  }
}

TEST(CudaMoe, GroupedLinearSkewedCountsMatchCpu) {
  REQUIRE_DEVICE();
  // One expert with most of the rows, experts with none (Auto: not padded), one expert only, all balanced (Auto:
  // padded), a few popular experts among balanced ones, and caps forced below the largest count (overflow rows on
  // the grouped path for y / dx, per expert for dW).
  std::mt19937 rng(9);
  const std::vector<Opt> impls = {kAuto, kGrouped, kPerExpert, kPadded, padded_cap(64), padded_cap(200), kPersistent};
  std::vector<std::vector<int64_t>> cases = {
      {0, 500, 3, 0, 1, 0, 0, 17}, {0, 0, 0, 77, 0, 0}, {200, 190, 211, 205, 199, 0, 208, 203}, {1}, {130, 0, 1, 64}};
  std::vector<int64_t> popular(16, 100);
  popular[3] = 700;
  popular[11] = 420;
  cases.push_back(popular);
  for (DType dt : {DType::BF16, DType::F32})
    for (size_t ci = 0; ci < cases.size(); ++ci) {
      const std::vector<int64_t>& counts = cases[ci];
      const int64_t e = static_cast<int64_t>(counts.size());
      check_grouped(e, 136, 72, counts, dt, impls, rng, std::string(dname(dt)) + " case " + std::to_string(ci));
    }
}

TEST(CudaMoe, GroupedLinearW2ShapesMatchCpu) {
  REQUIRE_DEVICE();
  // W2: N = 4096 tokens, E = 128, k = 8 -> 32768 grouped rows; gate_up [128, 1536, 2048], down [128, 2048, 768].
  // Uniform routing (Auto pads) on the padded, grouped and per-expert paths; skewed routing (experts without rows)
  // on Auto and padded with a cap (overflow rows on the grouped / per-expert path). The dw-only repeat is left to
  // the small cases (host time).
  std::mt19937 rng(7);
  const int64_t n = 4096, e = 128, k = 8, h = 2048, i = 768;
  const std::vector<int64_t> uni = counts_of(uniform_topk(n, e, k, rng), e);
  const std::vector<Opt> three = {kPadded, kGrouped, kPerExpert};
  check_grouped(e, h, 2 * i, uni, DType::BF16, three, rng, "W2 uniform gate_up", true, false);
  check_grouped(e, i, h, uni, DType::BF16, three, rng, "W2 uniform down", true, false);
  HostPlan p = cpu_plan(skewed_topk(n, e, k, rng), e);
  const std::vector<Opt> two = {kAuto, padded_cap(256)};
  check_grouped(e, h, 2 * i, p.counts, DType::BF16, two, rng, "W2 skewed gate_up", true, false);
  check_grouped(e, i, h, p.counts, DType::BF16, two, rng, "W2 skewed down", true, false);
}

TEST(CudaMoe, WholeBlockMatchesCpu) {
  REQUIRE_DEVICE();
  // The forward and backward chain the model composes, on ops:: front-ends, bf16 on the device vs fp32 on the host
  // (same bf16-rounded inputs; routing taken from the device so both sides route identically).
  std::mt19937 rng(8);
  const int64_t n = 256, e = 16, k = 4, h = 128, inner = 64;
  const DType dt = DType::BF16;
  Tensor x = rand_host({n, h}, rng, dt), wr = rand_host({e, h}, rng, dt, -0.3f, 0.3f),
         wgu = rand_host({e, 2 * inner, h}, rng, dt, -0.1f, 0.1f), wd = rand_host({e, h, inner}, rng, dt, -0.1f, 0.1f),
         dy = rand_host({n, h}, rng, dt);
  // Device.
  Tensor xd = up(x, dt), wrd = up(wr, dt), wgud = up(wgu, dt), wdd = up(wd, dt), dyd = up(dy, dt);
  Tensor logits = cu::empty({n, e}, dt), probs = cu::empty({n, e}, DType::F32), idx = cu::empty({n, k}, DType::I32),
         tw = cu::empty({n, k}, DType::F32);
  ops::linear_fwd(xd, wrd, nullptr, logits);
  ops::moe_router_fwd(logits, k, true, probs, idx, tw);
  Tensor off = cu::empty({e + 1}, DType::I32), perm = cu::empty({n * k}, DType::I32), inv = cu::empty({n * k}, DType::I32);
  std::vector<int64_t> counts;
  ops::moe_dispatch_plan(idx, e, off, perm, inv, &counts);
  const ExpertPath got = run_expert_path(xd, wgud, wdd, dyd, off, perm, inv, tw, k, &counts);
  Tensor dlogits = cu::empty({n, e}, DType::F32);
  ops::moe_router_bwd(probs, idx, tw, true, got.dtw, nullptr, dlogits);
  // Host, with the device's routing.
  Tensor hidx = cu::to_host(idx), htw = down(tw);
  HostPlan p = cpu_plan(hidx, e);
  EXPECT_EQ(p.counts, counts);
  // bf16 intermediates on the device: a few bf16 roundings deep.
  expect_expert_path_close(got, run_expert_path(x, wgu, wd, dy, p.offsets, p.perm, p.inv, htw, k, &p.counts));
}
