// gpt_oss on CUDA against the CPU reference (docs/gpt_oss.md):
//   ops     the clamped interleaved SwiGLU (src/backend/cuda/gpt_oss_moe.cu) forward and backward on both sides of
//           both clamps (and exactly on them), fp32 and bf16, vector and scalar paths, in place; the per-expert
//           bias add / bias gradient with empty experts, skewed counts, mixed bias dtypes, += on dbias;
//   block   moe_forward / moe_backward (models/blocks/moe.cpp) of a gpt_oss layer (biased router, biased
//           experts, clamps on both sides) on the device vs the host, same bf16-exact weights and inputs, with
//           router logits exact in bf16 so that both sides route identically; the backward against the fp32
//           host run (A, with bounded exceptions where bf16 forward activations move the host's own answer) and
//           against the host backward fed the device's bf16 gu / yg (B, strict): docs/gpt_oss.md;
//   model   the tiny fixture (tests/fixtures/gpt_oss_torch_ref: sinks, sliding + full layers, YaRN, biased router
//           and experts, aux loss): every parameter's gradient of one forward_backward, then 4 AdamW steps through
//           the Trainer (and again with activation checkpointing): per-step loss within 1%, grad norm within 5%
//           of the fp32 CPU run (bf16 activations on the device, as tests/gpu/test_cuda_lora.cpp).
// Outputs are poisoned with NaN before each op call; parameter gradients start from random values (+= contract).
// Runs only where a CUDA device is visible (GTEST_SKIP otherwise). Not run yet: written on a machine without a GPU.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "../common/tolerance.h"
#include "gpu_test_util.h"
#include "backend/cuda/cuda_ops.h"
#include "config/recipe.h"
#include "core/error.h"
#include "core/tensor.h"
#include "data/dataset.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "models/blocks/moe.h"
#include "models/decoder.h"
#include "models/hf_weights.h"
#include "ops/gpt_oss_ops.h"
#include "ops/moe_ops.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
using namespace am;
namespace cu = am::cuda;

namespace {

using gpu_test::down;
using gpu_test::expect_close;
using gpu_test::expect_close_dt;
using gpu_test::kNaN;
using gpu_test::poisoned;
using gpu_test::rand_host;
using gpu_test::up;
#define REQUIRE_DEVICE() AM_REQUIRE_DEVICE()

const char* dname(DType d) { return dtype_name(d); }

// gu [M, 2I] spread over [-3 limit, 3 limit] (so about 2/3 of the gates and 2/3 of the ups are clamped), with
// some entries exactly at +-limit (the bound keeps its gradient) and just beyond it.
Tensor glu_input(int64_t m, int64_t inner, float limit, DType dt, std::mt19937& rng) {
  Tensor gu = rand_host({m, 2 * inner}, rng, dt, -3 * limit, 3 * limit);
  const float specials[] = {limit, -limit, limit * 1.0625f, -limit * 1.0625f, 0.f};  // exact in bf16 for 7 and 1.5
  for (int64_t i = 0; i < gu.numel(); i += 7) gu.f32()[i] = specials[(i / 7) % 5];
  return gu;
}

// Per-expert row counts: empty experts at the start, middle and end; one expert with `heavy` rows.
std::vector<int32_t> offsets_for(int64_t e, int64_t heavy, std::mt19937& rng) {
  std::vector<int32_t> o(static_cast<size_t>(e + 1), 0);
  for (int64_t j = 0; j < e; ++j) {
    int64_t c = std::uniform_int_distribution<int64_t>(1, 40)(rng);
    if (j == 0 || j == e / 2 || j == e - 1) c = 0;
    if (e > 3 && j == 1) c = heavy;
    o[static_cast<size_t>(j + 1)] = o[static_cast<size_t>(j)] + static_cast<int32_t>(c);
  }
  if (e == 1) o[1] = static_cast<int32_t>(heavy);
  return o;
}
Tensor i32_host(const std::vector<int32_t>& v) {
  Tensor t = Tensor::empty({static_cast<int64_t>(v.size())}, DType::I32);
  std::copy(v.begin(), v.end(), t.data<int32_t>());
  return t;
}

fs::path fixture_dir() {
  for (fs::path p : {fs::path("tests/fixtures/gpt_oss_torch_ref"), fs::path(AM_SOURCE_DIR) / "tests/fixtures/gpt_oss_torch_ref"})
    if (fs::exists(p / "recipe.yaml")) return p;
  return {};
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
TEST(CudaGptOss, ClampedGluMatchesCpuOnBothSidesOfTheClamps) {
  REQUIRE_DEVICE();
  std::mt19937 rng(11);
  // (1, 1), odd I (scalar path), vector path, gpt-oss-20b's I = 2880.
  for (auto [m, inner] : {std::pair<int64_t, int64_t>{1, 1}, {17, 13}, {64, 96}, {5, 1001}, {33, 2880}})
    for (float limit : {7.f, 1.5f})
      for (DType dt : {DType::F32, DType::BF16}) {
        const float alpha = 1.702f;
        const std::string tag = "m=" + std::to_string(m) + " i=" + std::to_string(inner) + " limit=" +
                                std::to_string(limit) + " " + dname(dt);
        Tensor gu = glu_input(m, inner, limit, dt, rng), dh = rand_host({m, inner}, rng, dt);
        Tensor gu_d = up(gu, dt), dh_d = up(dh, dt);
        Tensor h = poisoned({m, inner}, dt), want_h = Tensor::empty({m, inner}, DType::F32);
        ops::gpt_oss_glu_fwd(gu_d, alpha, limit, h);
        ops::gpt_oss_glu_fwd(gu, alpha, limit, want_h);
        expect_close_dt(h, want_h, dt, "gpt_oss_glu_fwd " + tag);
        Tensor dgu = poisoned({m, 2 * inner}, dt), want = Tensor::empty({m, 2 * inner}, DType::F32);
        ops::gpt_oss_glu_bwd(gu_d, dh_d, alpha, limit, dgu);
        ops::gpt_oss_glu_bwd(gu, dh, alpha, limit, want);
        expect_close_dt(dgu, want, dt, "gpt_oss_glu_bwd " + tag);
        // Clamped inputs get exactly no gradient; the bounds themselves keep theirs.
        const Tensor got = down(dgu);
        int64_t clamped = 0, bounds = 0;
        for (int64_t i = 0; i < gu.numel(); ++i) {
          const float x = gu.f32()[i];
          const bool is_gate = i % 2 == 0;
          if ((is_gate && x > limit) || (!is_gate && std::abs(x) > limit)) {
            ++clamped;
            ASSERT_EQ(got.f32()[i], 0.f) << tag << " clamped element " << i;
          } else if (std::abs(x) == limit) {
            ++bounds;
            EXPECT_EQ(got.f32()[i] == 0.f, want.f32()[i] == 0.f) << tag << " bound element " << i;
          }
        }
        if (m * inner >= 64) {
          EXPECT_GT(clamped, 0) << tag;
          EXPECT_GT(bounds, 0) << tag;
        }
        ops::gpt_oss_glu_bwd(gu_d, dh_d, alpha, limit, gu_d);  // in place (dgu aliasing gu)
        expect_close_dt(gu_d, want, dt, "gpt_oss_glu_bwd in place " + tag);
      }
}

TEST(CudaGptOss, GroupedBiasAddAndGradientMatchCpu) {
  REQUIRE_DEVICE();
  std::mt19937 rng(12);
  struct Case {
    int64_t e, c, heavy;
  };
  // C odd (scalar path), C = H and 2I of gpt-oss-20b (2880, 5760), one expert with many rows (long reductions).
  for (const Case k : {Case{1, 1, 5}, Case{4, 5, 9}, Case{8, 64, 300}, Case{32, 2880, 700}, Case{5, 5760, 2000}})
    for (DType dt : {DType::F32, DType::BF16})
      for (DType bt : {DType::F32, DType::BF16}) {
        const std::string tag = "E=" + std::to_string(k.e) + " C=" + std::to_string(k.c) + " y " + dname(dt) +
                                " bias " + dname(bt);
        const std::vector<int32_t> offs = offsets_for(k.e, k.heavy, rng);
        const int64_t rows = offs.back();
        Tensor o = i32_host(offs), od = cu::to_device(o);
        Tensor y = rand_host({rows, k.c}, rng, dt, -4.f, 4.f), bias = rand_host({k.e, k.c}, rng, bt, -2.f, 2.f);
        Tensor yd = up(y, dt);
        ops::grouped_bias_add(yd, up(bias, bt), od);
        ops::grouped_bias_add(y, bias, o);
        expect_close_dt(yd, y, dt, "grouped_bias_add " + tag);
        Tensor dy = rand_host({rows, k.c}, rng, dt);
        Tensor db = rand_host({k.e, k.c}, rng);  // += : starts from random values
        Tensor dbd = cu::to_device(db);
        ops::grouped_bias_bwd(up(dy, dt), od, dbd);
        ops::grouped_bias_bwd(dy, o, db);
        // fp32 sums of up to 2000 rows on the device vs double sums on the host.
        expect_close(dbd, db, test::Tolerance{1e-5, 2e-5}, 1e-5, "grouped_bias_bwd " + tag);
      }
}

TEST(CudaGptOss, OpsRefuseMixedDevicesAndBadDtypes) {
  REQUIRE_DEVICE();
  const int64_t e = 2, c = 8;
  Tensor host_off = i32_host({0, 3, 5});
  Tensor y = cu::empty({5, c}, DType::BF16), bias = cu::empty({e, c}, DType::BF16);
  EXPECT_THROW(ops::grouped_bias_add(y, bias, host_off), DeviceError);  // offsets must live with the data
  Tensor od = cu::to_device(host_off);
  Tensor db16 = cu::empty({e, c}, DType::BF16);
  EXPECT_THROW(ops::grouped_bias_bwd(y, od, db16), ShapeError);  // dbias is an fp32 parameter gradient
  Tensor gu = cu::empty({4, 6}, DType::BF16), h32 = cu::empty({4, 3}, DType::F32);
  EXPECT_THROW(ops::gpt_oss_glu_fwd(gu, 1.702f, 7.f, h32), ShapeError);  // one activation dtype per call
  Tensor h_bad = cu::empty({4, 4}, DType::BF16);
  EXPECT_THROW(ops::gpt_oss_glu_fwd(gu, 1.702f, 7.f, h_bad), ShapeError);
}

// ---------------------------------------------------------------------------------------------------------
namespace {

// A gpt_oss layer's MoE config: H 128, I 96, 8 experts, top-4.
io::ModelConfig block_config() {
  nlohmann::json j = {{"model_type", "gpt_oss"},     {"vocab_size", 64},        {"hidden_size", 128},
                      {"intermediate_size", 96},     {"num_hidden_layers", 1},  {"num_attention_heads", 2},
                      {"num_key_value_heads", 1},    {"head_dim", 64},          {"num_local_experts", 8},
                      {"num_experts_per_tok", 4},    {"torch_dtype", "float32"}};
  return io::parse_model_config(j, "config.json");
}

// Fills the layer's parameters (the same values in both stores, bf16-exact):
//   router: W[e, h] = 4 if h == e else 0 and a bias in multiples of 1/4, so that with x[:, e] in multiples of 1/16
//           the logits are multiples of 1/4 in [-5, 5], exact in bf16: both sides route identically (ties too);
//   experts: small weights (|gu - bias| < ~1) and gate_up biases in {-10.5, -3.5, 0, 3.5, 10.5}: pre-activations
//           clamped on both sides and unclamped, never within bf16 noise of +-7.
void fill_block(std::vector<ParamStore*> stores, const MoeWeights& w0, int64_t e, std::mt19937& rng) {
  const int64_t h = w0.router->shape[1];
  Tensor wr = Tensor::zeros({e, h}, DType::F32), br = Tensor::empty({e}, DType::F32);
  for (int64_t j = 0; j < e; ++j) {
    wr.f32()[j * h + j] = 4.f;
    br.f32()[j] = 0.25f * static_cast<float>(std::uniform_int_distribution<int>(-4, 4)(rng));
  }
  Tensor wgu = rand_host(w0.gate_up->shape, rng, DType::BF16, -0.05f, 0.05f);
  Tensor wd = rand_host(w0.down->shape, rng, DType::BF16, -0.1f, 0.1f);
  Tensor bgu = Tensor::empty(w0.gate_up_bias->shape, DType::F32);
  const float levels[] = {-10.5f, -3.5f, 0.f, 3.5f, 10.5f};
  for (int64_t i = 0; i < bgu.numel(); ++i) bgu.f32()[i] = levels[std::uniform_int_distribution<int>(0, 4)(rng)];
  Tensor bd = rand_host(w0.down_bias->shape, rng, DType::BF16);
  for (ParamStore* ps : stores) {
    ps->get(w0.router->name).value.copy_from(wr);
    ps->get(w0.router_bias->name).value.copy_from(br);
    ps->get(w0.gate_up->name).value.copy_from(wgu);
    ps->get(w0.down->name).value.copy_from(wd);
    ps->get(w0.gate_up_bias->name).value.copy_from(bgu);
    ps->get(w0.down_bias->name).value.copy_from(bd);
  }
}

// expect_close's per-element bound for each element of want: atol * max(1, rms(want)) + rtol * |want|.
std::vector<double> element_tolerance(const Tensor& want, test::Tolerance tol) {
  const int64_t n = want.numel();
  double den = 0;
  for (int64_t i = 0; i < n; ++i) den += double(want.f32()[i]) * want.f32()[i];
  const double atol = tol.atol * std::max(1.0, n ? std::sqrt(den / n) : 0.0);
  std::vector<double> b(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) b[static_cast<size_t>(i)] = atol + tol.rtol * std::abs(want.f32()[i]);
  return b;
}

// expect_close with bounded exceptions: an element outside its tolerance passes only where allowed[i], within
// cap x its tolerance, and at most max_exceptions of them; every element finite, the relative L2 error within
// the budget. Returns the number of exceptions taken (printed by the caller).
int64_t expect_close_except(const Tensor& got_any, const Tensor& want, test::Tolerance tol, double rel_l2_budget,
                            const std::vector<char>& allowed, int64_t max_exceptions, double cap,
                            const std::string& what) {
  const Tensor got = got_any.device() == DeviceType::CUDA ? down(got_any) : got_any;
  EXPECT_EQ(got.numel(), want.numel()) << what;
  if (got.numel() != want.numel() || static_cast<int64_t>(allowed.size()) != want.numel()) {
    ADD_FAILURE() << what << ": size mismatch";
    return 0;
  }
  const std::vector<double> bound = element_tolerance(want, tol);
  int64_t exceptions = 0, bad = 0, nonfinite = 0, first_bad = -1;
  double num = 0, den = 0, worst = 0;
  for (int64_t i = 0; i < want.numel(); ++i) {
    const double g = got.f32()[i], w = want.f32()[i], d = std::abs(g - w), b = bound[static_cast<size_t>(i)];
    den += w * w;
    if (!std::isfinite(g)) {
      ++nonfinite;
      continue;
    }
    num += d * d;
    if (d <= b) continue;
    worst = std::max(worst, d / b);
    if (allowed[static_cast<size_t>(i)] && d <= cap * b) {
      ++exceptions;
    } else if (++bad == 1) {
      first_bad = i;
    }
  }
  const double rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  EXPECT_EQ(nonfinite, 0) << what << ": non-finite elements";
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << want.numel() << " outside tolerance and not an allowed "
                    << "exception, first at " << first_bad << " (got " << (first_bad >= 0 ? got.f32()[first_bad] : 0.f)
                    << ", want " << (first_bad >= 0 ? want.f32()[first_bad] : 0.f) << ")";
  EXPECT_LE(exceptions, max_exceptions) << what << ": too many exceptions (worst " << worst << " x tolerance)";
  EXPECT_LE(rel, rel_l2_budget) << what << ": relative L2 error";
  std::printf("[gpt_oss block] %s: %lld exceptions of %lld (bound %lld, worst %.2f x tolerance), relative L2 %.2e\n",
              what.c_str(), static_cast<long long>(exceptions), static_cast<long long>(want.numel()),
              static_cast<long long>(max_exceptions), worst, rel);
  return exceptions;
}

}  // namespace

// The references for the backward (docs/gpt_oss.md, "The MoE block test"):
//   A  the fp32 CPU run end to end (cpu_ps);
//   B  the CPU backward fed the device's own bf16 forward activations gu and yg (ref_ps): the clamp decisions
//      and <yg, dy> (the routing weights' gradient) are then the device's, so the comparison measures only the
//      backward kernels. The device's gu / yg themselves are checked against A's forward.
// Against A, the routing weights' gradient dtopk_w = <yg, dy> (|terms| ~ 10, 128 of them) goes through the
// normalised-top-k softmax backward, where it cancels (the 4 slots' dtopk_w are tens to ~100, the centred values
// ~1), and the router weight (4 on the diagonal) puts it on dx[:, :E]: bf16 rounding of h and yg moves a few of
// those elements beyond the tensor's tolerance (a software emulation of the device's rounding points gives 6 of
// 25,600, worst 1.38x, max abs error 0.98, as the first device run). So dx is checked strictly against B, and
// against A with exceptions only where A itself moves by more than half a tolerance under the device's gu / yg.
TEST(CudaGptOss, MoeBlockForwardBackwardMatchesCpu) {
  REQUIRE_DEVICE();
  std::mt19937 rng(13);
  const io::ModelConfig cfg = block_config();
  const int64_t n = 200, h = cfg.hidden_size, e = cfg.num_experts, k = cfg.num_experts_per_tok;
  ParamStore cpu_ps, gpu_ps, ref_ps;
  const MoeWeights wc = register_moe(cpu_ps, "model.layers.0.", cfg, 0, 1);
  const MoeWeights wg = register_moe(gpu_ps, "model.layers.0.", cfg, 0, 1);
  const MoeWeights wr = register_moe(ref_ps, "model.layers.0.", cfg, 0, 1);
  ASSERT_TRUE(wc.gpt_oss_glu && wc.router_bias && wc.gate_up_bias && wc.down_bias);
  fill_block({&cpu_ps, &gpu_ps, &ref_ps}, wc, e, rng);  // one draw of the values, copied into each store
  const ExecContext cx = ExecContext::cpu(), gx = ExecContext::cuda_bf16();
  gpu_ps.to_device(gx);  // fp32 master + zero fp32 grads + bf16 working copies; the host stores' grads are zero too
  // x: the router's columns in multiples of 1/16 (exact logits), the rest any bf16 value.
  Tensor x = rand_host({n, h}, rng, DType::BF16);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t j = 0; j < e; ++j)
      x.f32()[t * h + j] = static_cast<float>(std::uniform_int_distribution<int>(-16, 16)(rng)) / 16.f;
  Tensor dy = rand_host({n, h}, rng, DType::BF16);
  const MoeOptions opt{k, cfg.norm_topk_prob};
  MoeSaved sc, sg;
  const Tensor yc = moe_forward(cx, wc, opt, x, sc);
  const Tensor yg = moe_forward(gx, wg, opt, gx.upload_as(x, DType::BF16), sg);
  // Same routing (exact logits) and the same grouped row order (both plans are stable), so the rest compares at
  // bf16 tolerance and the device's grouped rows can stand in for the host's.
  const Tensor idx_g = ExecContext::download(sg.topk_idx), perm_g = ExecContext::download(sg.perm);
  for (int64_t i = 0; i < n * k; ++i) {
    ASSERT_EQ(idx_g.data<int32_t>()[i], sc.topk_idx.data<int32_t>()[i]) << "routing differs at " << i;
    ASSERT_EQ(perm_g.data<int32_t>()[i], sc.perm.data<int32_t>()[i]) << "grouped order differs at " << i;
  }
  EXPECT_EQ(sg.counts, sc.counts);
  // The pre-activations really cross the clamps on both sides; the device's bf16 gu falls on the other side of
  // a clamp than the host's fp32 gu only within a few bf16 ulps of the bound (none expected with these biases).
  const Tensor gu_dev = down(sg.gu), yg_dev = down(sg.yg);
  const float limit = static_cast<float>(cfg.swiglu_limit);
  const float band = 4 * std::ldexp(1.f, std::ilogb(limit) - 7);  // 4 bf16 ulps at the limit (0.125 for 7)
  int64_t gate_clamped = 0, up_low = 0, up_high = 0, flips = 0, near = 0;
  for (int64_t i = 0; i < sc.gu.numel(); ++i) {
    const float v = sc.gu.f32()[i], vd = gu_dev.f32()[i];
    const bool is_gate = i % 2 == 0;
    if (is_gate) {
      gate_clamped += v > limit;
    } else {
      up_low += v < -limit;
      up_high += v > limit;
    }
    const float dist = is_gate ? std::abs(v - limit) : std::min(std::abs(v - limit), std::abs(v + limit));
    near += dist <= band;
    const bool clamped = is_gate ? v > limit : std::abs(v) > limit, clamped_dev = is_gate ? vd > limit : std::abs(vd) > limit;
    if (clamped != clamped_dev) {
      ++flips;
      EXPECT_LE(dist, band) << "gu element " << i << " (host " << v << ", device " << vd
                            << ") is clamped on one side only, away from the bound";
    }
  }
  std::printf("[gpt_oss block] gu within %.3f of a clamp bound: %lld of %lld; clamp-side flips host/device: %lld\n",
              band, static_cast<long long>(near), static_cast<long long>(sc.gu.numel()), static_cast<long long>(flips));
  EXPECT_GT(gate_clamped, 0);
  EXPECT_GT(up_low, 0);
  EXPECT_GT(up_high, 0);
  const test::Tolerance tol{3e-2, 3e-2};  // bf16 intermediates on the device: a few bf16 roundings deep
  expect_close(gu_dev, sc.gu, tol, 2e-2, "block gu (biased gate_up)");
  expect_close(yg_dev, sc.yg, tol, 2e-2, "block yg (expert outputs, biased)");
  expect_close(yg, yc, tol, 2e-2, "block y");
  const Tensor dxg = moe_backward(gx, wg, opt, sg, gx.upload_as(dy, DType::BF16), nullptr);
  const Tensor dxc = moe_backward(cx, wc, opt, sc, dy, nullptr);  // A
  MoeSaved sr = sc;
  sr.gu = gu_dev;
  sr.yg = yg_dev;
  const Tensor dxr = moe_backward(cx, wr, opt, sr, dy, nullptr);  // B
  expect_close(dxg, dxr, tol, 2e-2, "block dx against B (the CPU backward of the device's gu / yg)");
  // Against A: exceptions only where A itself moves by more than half a tolerance under the device's gu / yg.
  const std::vector<double> bound_a = element_tolerance(dxc, tol);
  std::vector<char> moved(static_cast<size_t>(dxc.numel()), 0);
  int64_t n_moved = 0;
  for (int64_t i = 0; i < dxc.numel(); ++i)
    if (std::abs(double(dxr.f32()[i]) - dxc.f32()[i]) > 0.5 * bound_a[static_cast<size_t>(i)]) {
      moved[static_cast<size_t>(i)] = 1;
      ++n_moved;
    }
  std::printf("[gpt_oss block] dx elements where A moves by > 1/2 tolerance under the device's gu / yg: %lld\n",
              static_cast<long long>(n_moved));
  expect_close_except(dxg, dxc, tol, 2e-2, moved, dxc.numel() / 1000, 4.0, "block dx against A (end to end)");
  // Parameter gradients: against B element-wise, a few elements (sums over ~100 rows with strong cancellation)
  // allowed up to 2x the tolerance (the emulation's worst: d gate_up_proj, 1 element at 1.2x); against A in L2.
  for (const Param* p : {wc.router, wc.router_bias, wc.gate_up, wc.gate_up_bias, wc.down, wc.down_bias}) {
    const Tensor& want_b = ref_ps.get(p->name).grad;
    const std::vector<char> any(static_cast<size_t>(want_b.numel()), 1);
    expect_close_except(gpu_ps.get(p->name).grad, want_b, tol, 2e-2, any, std::max<int64_t>(2, want_b.numel() / 10000),
                        2.0, "block d " + p->name + " against B");
    const Tensor got = down(gpu_ps.get(p->name).grad);
    const Tensor& want_a = cpu_ps.get(p->name).grad;
    double num = 0, den = 0;
    for (int64_t i = 0; i < want_a.numel(); ++i) {
      const double d = double(got.f32()[i]) - want_a.f32()[i];
      num += d * d;
      den += double(want_a.f32()[i]) * want_a.f32()[i];
    }
    EXPECT_LE(std::sqrt(num / std::max(den, 1e-30)), 2e-2) << "block d " << p->name << " against A: relative L2";
  }
}

// ---------------------------------------------------------------------------------------------------------
// One forward_backward of the fixture model (two rows of 40 and 23 tokens, the aux loss on) on both devices from
// the same fp32 weights: the CE sum, the aux loss, and every parameter's gradient (sinks, biases, experts, router).
//
// The bound is this fixture's own bf16 sensitivity, as in CudaGoldens.Step1GradientsMatchCpu. On the CPU, rounding
// only the weights to bf16 (fp32 compute) moves its gradients by 11.9% relative L2 over all parameters, layer 1's
// sinks by 50%, layer 0's by 16%, the routers' weights by 19% / 23% (measured 2026-12-06): the first layer routes near
// ties, and rounding any one of a dozen weight tensors alone moves the whole gradient by 1-5%. The H100 run of
// 2026-12-05/06 measured CUDA at 15% over all, sinks 30% / 50%, routers 19% / 23%: what the weight rounding alone
// does. A bound of 3% could not be met by any bf16 implementation, HF's included.
TEST(CudaGptOss, ModelGradientsMatchCpu) {
  REQUIRE_DEVICE();
  const fs::path dir = fixture_dir();
  if (dir.empty() || !fs::exists(dir / "reference.safetensors")) GTEST_SKIP() << "no tests/fixtures/gpt_oss_torch_ref";
  auto ref = io::SafeTensors::open((dir / "reference.safetensors").string());
  std::vector<Sample> s(2);
  for (int r = 0; r < 2; ++r) {
    Tensor ids = ref.get("ids" + std::to_string(r)), lab = ref.get("labels" + std::to_string(r));
    for (int64_t t = 0; t < ids.numel(); ++t) {
      s[r].input_ids.push_back(static_cast<int32_t>(ids.data<int64_t>()[t]));
      s[r].labels.push_back(static_cast<int32_t>(lab.data<int64_t>()[t]));
    }
  }
  const io::ModelConfig cfg = io::load_model_config((dir / "model/config.json").string());
  const gpu_test::Step1Gradients r = gpu_test::step1_gradients(cfg, dir / "model", collate({&s[0], &s[1]}));
  std::printf("[gpt_oss cuda] ce_sum cpu %.6f cuda %.6f (rel %.2e); coef*aux cpu %.6f cuda %.6f\n", r.ce_cpu, r.ce_gpu,
              std::abs(r.ce_gpu - r.ce_cpu) / r.ce_cpu, r.aux_cpu, r.aux_gpu);
  std::printf("[gpt_oss cuda] gradients, relative L2 over all parameters: cuda vs cpu %.3e; bf16-weights cpu vs cpu "
              "%.3e; cuda vs bf16-weights cpu %.3e\n", r.rel_all, r.sens_all, r.rel_rounded_all);
  for (const auto& [rel, name] : r.per_param)
    std::printf("[gpt_oss cuda]   %-50s cuda %.3e  weights-only %.3e\n", name.c_str(), rel, r.sens_of(name));
  std::fflush(stdout);
  EXPECT_NEAR(r.ce_gpu, r.ce_cpu, 1e-2 * r.ce_cpu);
  EXPECT_NEAR(r.aux_gpu, r.aux_cpu, 2e-2 * std::abs(r.aux_cpu) + 1e-6);
  EXPECT_LT(r.rel_all, std::max(3e-2, 3.0 * r.sens_all));
  EXPECT_LT(r.rel_rounded_all, std::max(3e-2, 3.0 * r.sens_all));
  // Per parameter: a sign error or a dropped term (relative error >= 1) still fails wherever the fixture's own
  // sensitivity is below 1/3; every parameter but layer 1's sinks (0.50) is.
  for (const auto& [rel, name] : r.per_param)
    EXPECT_LT(rel, std::max(0.1, 3.0 * r.sens_of(name))) << name << ": relative L2 error of the gradient";
}

namespace {

void compare_training(const std::vector<std::string>& extra, const std::string& tag) {
  const fs::path dir = fixture_dir();
  if (dir.empty()) GTEST_SKIP() << "no tests/fixtures/gpt_oss_torch_ref";
  gpu_test::compare_cpu_cuda_training(dir, extra, "gpt_oss " + tag);
}
}  // namespace

TEST(CudaGptOss, FourTrainingStepsMatchCpu) {
  REQUIRE_DEVICE();
  compare_training({}, "train");
}

TEST(CudaGptOss, FourTrainingStepsWithActivationCheckpointingMatchCpu) {
  REQUIRE_DEVICE();
  compare_training({"distributed.activation_checkpointing=true"}, "ckpt");
}
