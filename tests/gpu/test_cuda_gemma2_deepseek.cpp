// CUDA kernels and model paths of Gemma 2 and DeepSeek-V3/V2, against the CPU reference:
//   - logit soft-capping (ops::softcap_ / softcap_bwd_, backend/cuda/softcap.cu): bf16 / fp32 / mixed dtypes,
//     odd sizes and misaligned views (scalar fallbacks);
//   - MLA's rope-column gather / scatter (ops/mla_ops.h, backend/cuda/mla_cols.cu): one head and many heads
//     (the k_pe broadcast and its gradient's head sum), interleaved or not, bit for bit in fp32 and to one bf16
//     rounding of the fp32 result in bf16;
//   - DeepSeek's grouped routers (ops::moe_router_grouped_*, backend/cuda/moe_router_grouped.cu): the selection
//     equal to the host's for every token (ties included), weights and scores to fp32 rounding, the backward;
//   - the soft-capped chunked LM-head loss on CUDA (models/decoder.cpp lm_head_cross_entropy);
//   - whole models: the HF golden fixtures gemma2 and deepseek_v3 trained for their 4 steps on CUDA (bf16) and on
//     the CPU (fp32): per-step loss within 1% and grad norm within 5% (as test_cuda_lora / test_cuda_gpt_oss).
// Inputs are rounded to bf16 on the host where the device reads bf16, so both sides see the same values.
// Runs only where a CUDA device is visible (GTEST_SKIP otherwise).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "../common/tolerance.h"
#include "gpu_test_util.h"
#include "backend/cuda/cuda_ops.h"
#include "config/recipe.h"
#include "core/error.h"
#include "core/tensor.h"
#include "models/decoder.h"
#include "models/exec.h"
#include "ops/mla_ops.h"
#include "ops/moe_ops.h"
#include "ops/ops.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
using namespace am;
namespace cu = am::cuda;

namespace {

using gpu_test::down;
using gpu_test::kNaN;
using gpu_test::poisoned;
using gpu_test::rand_host;
using gpu_test::up;
#define REQUIRE_DEVICE() AM_REQUIRE_DEVICE()
// The host value as the device stores it (fp32 -> dt -> fp32).
Tensor rounded(const Tensor& host_f32, DType dt) { return dt == DType::F32 ? host_f32 : host_f32.to(dt).to(DType::F32); }

// Element-wise |got - want| <= atol * max(1, rms(want)) + rtol * |want|, and no non-finite value (no L2 budget).
void expect_close(const Tensor& got, const Tensor& want, test::Tolerance tol, const std::string& what) {
  gpu_test::expect_close(got, want, tol, std::numeric_limits<double>::infinity(), what);
}
void expect_bitwise(const Tensor& got, const Tensor& want, const std::string& what) {
  ASSERT_EQ(got.numel(), want.numel()) << what;
  for (int64_t i = 0; i < want.numel(); ++i)
    if (std::memcmp(got.f32() + i, want.f32() + i, sizeof(float)) != 0) {
      ADD_FAILURE() << what << ": element " << i << " got " << got.f32()[i] << " want " << want.f32()[i];
      return;
    }
}

int64_t rint(std::mt19937& rng, int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }

// =============================================================================================== soft-capping

TEST(CudaSoftcap, ForwardAndBackwardMatchCpu) {
  REQUIRE_DEVICE();
  for (int seed = 1; seed <= 3; ++seed) {
    std::mt19937 rng(seed);
    for (float cap : {0.8f, 30.f, 50.f}) {
      for (int64_t n : {int64_t(1), int64_t(7), int64_t(4096), rint(rng, 2, 20000)}) {
        for (DType dt : {DType::F32, DType::BF16}) {
          const std::string what = std::string(dtype_name(dt)) + " n=" + std::to_string(n) + " cap=" + std::to_string(cap);
          Tensor x = rand_host({n}, rng, dt, -4 * cap, 4 * cap);
          Tensor want = x.clone();
          ops::softcap_(want, cap);
          // aligned, and a misaligned view one element in (the scalar path)
          Tensor big = up(rand_host({n + 1}, rng, dt), dt);
          for (int off : {0, 1}) {
            Tensor xd = off ? big.slice_rows(1, n + 1) : up(x, dt);
            if (off) cu::copy_(xd, up(x, dt));
            ops::softcap_(xd, cap);
            expect_close(down(xd), rounded(want, dt), test::tolerance(dt),
                         "softcap_ " + what + " offset " + std::to_string(off));
          }
          // backward from the capped values y (stored in dt) and a gradient in each dtype
          const Tensor y = rounded(want, dt);
          for (DType gdt : {DType::F32, DType::BF16}) {
            Tensor g = rand_host({n}, rng, gdt);
            Tensor want_g = g.clone();
            ops::softcap_bwd_(y, want_g, cap);
            Tensor gd = up(g, gdt);
            ops::softcap_bwd_(up(y, dt), gd, cap);
            const std::string w2 = "softcap_bwd_ y " + what + " dy " + dtype_name(gdt);
            if (gdt == DType::F32) expect_bitwise(down(gd), want_g, w2);  // no transcendental: the same fp32 ops
            else expect_close(down(gd), rounded(want_g, gdt), test::Tolerance{0, 0}, w2);  // one rounding of the same
          }
        }
      }
    }
  }
  Tensor x = cu::empty({4}, DType::F32);
  EXPECT_THROW(ops::softcap_(x, 0.f), ShapeError);
  Tensor y = cu::empty({5}, DType::F32);
  EXPECT_THROW(ops::softcap_bwd_(y, x, 1.f), ShapeError);
}

// The chunked soft-capped LM-head loss on the device (fp32 logits chunks) against the same function on the host.
TEST(CudaSoftcap, LmHeadLossMatchesCpu) {
  REQUIRE_DEVICE();
  for (int seed = 1; seed <= 3; ++seed) {
    std::mt19937 rng(seed);
    const int64_t n = rint(rng, 1, 200), h = 8 * rint(rng, 1, 16), vocab = rint(rng, 50, 3000);
    const int64_t chunk = seed == 1 ? 1024 : rint(rng, 1, 64);
    const float cap = seed == 2 ? 0.8f : 30.f;
    const std::string what = "N=" + std::to_string(n) + " H=" + std::to_string(h) + " V=" + std::to_string(vocab) +
                             " chunk=" + std::to_string(chunk) + " cap=" + std::to_string(cap);
    Tensor x = rand_host({n, h}, rng, DType::BF16), w = rand_host({vocab, h}, rng, DType::BF16, -2.f, 2.f);
    Tensor tg = Tensor::empty({n}, DType::I32);
    for (int64_t r = 0; r < n; ++r)
      tg.data<int32_t>()[r] = rint(rng, 0, 4) == 0 ? -100 : static_cast<int32_t>(rint(rng, 0, vocab - 1));
    const float scale = 1.f / static_cast<float>(n);
    Tensor dx = Tensor::empty({n, h}, DType::F32), dw0 = rand_host({vocab, h}, rng, DType::F32, -0.01f, 0.01f);
    Tensor dw = dw0.clone();
    const double want = lm_head_cross_entropy(ExecContext::cpu(), x, w, tg, scale, &dx, &dw, chunk, cap);
    const ExecContext ex = ExecContext::cuda_bf16();
    Tensor gx = poisoned({n, h}, DType::BF16), gw = up(dw0, DType::F32);
    const double got = lm_head_cross_entropy(ex, up(x, DType::BF16), up(w, DType::BF16), cu::to_device(tg), scale, &gx,
                                             &gw, chunk, cap);
    EXPECT_NEAR(got, want, 1e-4 * std::max(1.0, std::abs(want))) << "loss " << what;  // fp32 logits on both sides
    expect_close(down(gx), dx, test::Tolerance{2e-2, 2e-2}, "dx " + what);            // bf16 dlogits and dx
    Tensor got_dw = down(gw);
    for (int64_t i = 0; i < got_dw.numel(); ++i) got_dw.f32()[i] -= dw0.f32()[i], dw.f32()[i] -= dw0.f32()[i];
    expect_close(got_dw, dw, test::Tolerance{2e-2, 2e-2}, "dW increment " + what);
    const double loss_only = lm_head_cross_entropy(ex, up(x, DType::BF16), up(w, DType::BF16), cu::to_device(tg), 0.f,
                                                   nullptr, nullptr, chunk, cap);
    EXPECT_NEAR(loss_only, want, 1e-4 * std::max(1.0, std::abs(want))) << "loss only " << what;
  }
}

// =============================================================================================== MLA columns

TEST(CudaMlaCols, GatherScatterMatchCpu) {
  REQUIRE_DEVICE();
  struct Case {
    int64_t R, G, C, col, w;
    bool il;
  };
  std::mt19937 rng(5);
  // q's rope tail (one head per row), kv_a's k_pe, the k_pe broadcast / head sum (G = heads), DeepSeek-V3's sizes.
  const Case cases[] = {{300, 1, 24, 16, 8, true},   {77, 1, 24, 16, 8, false}, {129, 1, 72, 64, 8, true},
                        {50, 4, 24, 16, 8, false},   {33, 128, 192, 128, 64, false}, {1000, 1, 192, 128, 64, true},
                        {257, 1, 576, 512, 64, true}, {9, 3, 10, 2, 6, true}};
  for (const Case& c : cases)
    for (DType dt : {DType::F32, DType::BF16}) {
      const std::string what = std::string(dtype_name(dt)) + " R=" + std::to_string(c.R) + " G=" + std::to_string(c.G) +
                               " C=" + std::to_string(c.C) + " col=" + std::to_string(c.col) + " w=" +
                               std::to_string(c.w) + (c.il ? " interleaved" : "");
      const Shape ws = c.G == 1 ? Shape{c.R, c.C} : Shape{c.R, c.G, c.C};
      Tensor wide = rand_host(ws, rng, dt, -2.f, 2.f);
      Tensor want = Tensor::empty({c.R, c.w}, DType::F32);
      ops::mla_gather_cols(wide, c.col, c.il, want);
      Tensor got = poisoned({c.R, c.w}, dt);
      ops::mla_gather_cols(up(wide, dt), c.col, c.il, got);
      // fp32: the same fp32 sums; bf16: one rounding of them (G = 1: exact copies either way)
      expect_bitwise(down(got), rounded(want, dt), "gather " + what);
      Tensor narrow = rand_host({c.R, c.w}, rng, dt), base = rand_host(ws, rng, dt);
      Tensor want_w = base.clone();
      ops::mla_scatter_cols(narrow, c.il, want_w, c.col);
      Tensor got_w = up(base, dt);
      ops::mla_scatter_cols(up(narrow, dt), c.il, got_w, c.col);
      expect_bitwise(down(got_w), want_w, "scatter " + what);
    }
  Tensor wide = cu::empty({4, 10}, DType::BF16), narrow = cu::empty({4, 6}, DType::F32);
  EXPECT_THROW(ops::mla_gather_cols(wide, 0, false, narrow), ShapeError);  // dtypes differ
  Tensor host = Tensor::empty({4, 6}, DType::BF16);
  EXPECT_THROW(ops::mla_gather_cols(wide, 0, false, host), DeviceError);   // devices differ
}

// =============================================================================================== grouped router

struct RouterCase {
  const char* name;
  int64_t E, k;
  ops::GroupedRouterOptions o;
  bool bias;
};
std::vector<RouterCase> router_cases() {
  using G = ops::GroupedRouterOptions::Group;
  return {
      {"tiny_v3", 8, 2, {true, G::Top2Sum, 4, 2, true, 2.5f}, true},
      {"v3_671b", 256, 8, {true, G::Top2Sum, 8, 4, true, 2.5f}, true},
      {"kimi_k2", 384, 8, {true, G::Top2Sum, 1, 1, true, 2.827f}, true},
      {"v3_no_norm", 64, 6, {true, G::Top2Sum, 8, 3, false, 1.5f}, true},
      {"v2_lite_greedy", 64, 6, {false, G::None, 1, 1, false, 1.f}, false},
      {"v2_group_limited", 160, 6, {false, G::Max, 8, 3, false, 16.f}, false},
      {"v3_k_above_32", 1024, 40, {true, G::Top2Sum, 16, 8, true, 1.f}, true},
  };
}

// Logits drawn either continuous or from a few levels (many exact ties in the scores, choices and group scores).
Tensor router_logits(int64_t n, int64_t e, std::mt19937& rng, DType dt, bool ties) {
  if (!ties) return rand_host({n, e}, rng, dt, -4.f, 4.f);
  Tensor t = Tensor::empty({n, e}, DType::F32);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = static_cast<float>(rint(rng, -2, 2)) * 0.5f;
  return t;
}

TEST(CudaGroupedRouter, ForwardMatchesCpu) {
  REQUIRE_DEVICE();
  std::mt19937 rng(11);
  for (const RouterCase& rc : router_cases())
    for (DType ldt : {DType::F32, DType::BF16})
      for (DType bdt : {DType::F32, DType::BF16})
        for (bool ties : {false, true}) {
          if (!rc.bias && bdt == DType::BF16) continue;
          const int64_t n = rint(rng, 1, 300), E = rc.E, k = rc.k;
          const std::string what = std::string(rc.name) + " logits " + dtype_name(ldt) + " bias " + dtype_name(bdt) +
                                   (ties ? " ties" : "") + " N=" + std::to_string(n);
          Tensor logits = router_logits(n, E, rng, ldt, ties);
          Tensor bias = ties ? Tensor::zeros({E}, DType::F32) : rand_host({E}, rng, bdt, -0.3f, 0.3f);
          Tensor scores = Tensor::empty({n, E}, DType::F32), idx = Tensor::empty({n, k}, DType::I32),
                 w = Tensor::empty({n, k}, DType::F32);
          ops::moe_router_grouped_fwd(logits, rc.bias ? &bias : nullptr, k, rc.o, scores, idx, w);
          Tensor bd = up(bias, bdt);
          Tensor ds = poisoned({n, E}, DType::F32), di = cu::empty({n, k}, DType::I32), dw = poisoned({n, k}, DType::F32);
          ops::moe_router_grouped_fwd(up(logits, ldt), rc.bias ? &bd : nullptr, k, rc.o, ds, di, dw);
          const Tensor gi = cu::to_host(di), gw = down(dw), gs = down(ds);
          int64_t diff_idx = 0, first = -1;
          for (int64_t i = 0; i < n * k; ++i)
            if (gi.data<int32_t>()[i] != idx.data<int32_t>()[i] && diff_idx++ == 0) first = i;
          EXPECT_EQ(diff_idx, 0) << what << ": selection differs at " << first << " (token " << first / k << ", slot "
                                 << first % k << "): got " << (first >= 0 ? gi.data<int32_t>()[first] : 0) << ", want "
                                 << (first >= 0 ? idx.data<int32_t>()[first] : 0);
          // Scores and weights: the same operations; the device's double exp may differ in its last bit.
          expect_close(gs, scores, test::Tolerance{1e-6, 0}, "scores " + what);
          expect_close(gw, w, test::Tolerance{2e-6, 0}, "weights " + what);
        }
}

TEST(CudaGroupedRouter, BackwardMatchesCpu) {
  REQUIRE_DEVICE();
  std::mt19937 rng(12);
  for (const RouterCase& rc : router_cases())
    for (DType gdt : {DType::F32, DType::BF16}) {
      const int64_t n = rint(rng, 1, 200), E = rc.E, k = rc.k;
      const std::string what = std::string(rc.name) + " dlogits " + dtype_name(gdt) + " N=" + std::to_string(n);
      Tensor logits = rand_host({n, E}, rng, DType::F32, -3.f, 3.f), bias = rand_host({E}, rng, DType::F32, -0.3f, 0.3f);
      Tensor scores = Tensor::empty({n, E}, DType::F32), idx = Tensor::empty({n, k}, DType::I32),
             w = Tensor::empty({n, k}, DType::F32);
      ops::moe_router_grouped_fwd(logits, rc.bias ? &bias : nullptr, k, rc.o, scores, idx, w);
      Tensor dtw = rand_host({n, k}, rng);
      Tensor want = Tensor::empty({n, E}, DType::F32);
      ops::moe_router_grouped_bwd(scores, idx, rc.o, dtw, want);
      Tensor got = poisoned({n, E}, gdt);
      ops::moe_router_grouped_bwd(up(scores, DType::F32), cu::to_device(idx), rc.o, up(dtw, DType::F32), got);
      cu::default_context().check_device_errors();
      if (gdt == DType::F32) expect_close(down(got), want, test::Tolerance{1e-6, 1e-9}, "router bwd " + what);
      else expect_close(down(got), rounded(want, gdt), test::Tolerance{0, 1e-9}, "router bwd " + what);
    }
}

TEST(CudaGroupedRouter, RejectsWhatItCannotRun) {
  REQUIRE_DEVICE();
  using G = ops::GroupedRouterOptions::Group;
  const ops::GroupedRouterOptions o{true, G::Top2Sum, 4, 2, true, 1.f};
  Tensor l = cu::empty({3, 2048}, DType::F32), s = cu::empty({3, 2048}, DType::F32), i = cu::empty({3, 2}, DType::I32),
         w = cu::empty({3, 2}, DType::F32);
  EXPECT_THROW(ops::moe_router_grouped_fwd(l, nullptr, 2, o, s, i, w), ShapeError);  // E > 1024 on CUDA
  Tensor l2 = cu::empty({3, 10}, DType::F32), s2 = cu::empty({3, 10}, DType::F32);
  EXPECT_THROW(ops::moe_router_grouped_fwd(l2, nullptr, 2, o, s2, i, w), ShapeError);  // 4 groups do not divide 10
}

// =============================================================================================== whole models

fs::path golden(const std::string& c) {
  for (fs::path p : {fs::path("tests/fixtures/golden") / c, fs::path(AM_SOURCE_DIR) / "tests/fixtures/golden" / c})
    if (fs::exists(p / "recipe.yaml")) return p;
  return {};
}


void compare_training(const std::string& c, const std::vector<std::string>& extra, const std::string& tag) {
  const fs::path dir = golden(c);
  if (dir.empty()) GTEST_SKIP() << "no tests/fixtures/golden/" << c;
  gpu_test::compare_cpu_cuda_training(dir, extra, tag);
}

TEST(CudaFamilies, Gemma2TrainsLikeCpu) {
  REQUIRE_DEVICE();
  compare_training("gemma2", {}, "gemma2");
}
TEST(CudaFamilies, Gemma2Bf16ResidualTrainsLikeCpu) {
  REQUIRE_DEVICE();
  compare_training("gemma2", {"model.backend.residual_dtype=bfloat16"}, "gemma2 bf16 residual");
}
TEST(CudaFamilies, DeepseekV3TrainsLikeCpu) {
  REQUIRE_DEVICE();
  compare_training("deepseek_v3", {}, "deepseek_v3");
}
TEST(CudaFamilies, DeepseekV3ActivationCheckpointingTrainsLikeCpu) {
  REQUIRE_DEVICE();
  compare_training("deepseek_v3", {"distributed.activation_checkpointing=true"}, "deepseek_v3 ckpt");
}

}  // namespace
