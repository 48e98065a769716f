// gpt_oss on CUDA against the CPU reference (docs/gpt_oss.md):
//   ops     the clamped interleaved SwiGLU (src/backend/cuda/gpt_oss_moe.cu) forward and backward on both sides of
//           both clamps (and exactly on them), fp32 and bf16, vector and scalar paths, in place; the per-expert
//           bias add / bias gradient with empty experts, skewed counts, mixed bias dtypes, += on dbias;
//   block   moe_forward / moe_backward (models/blocks/moe.cpp) of a gpt_oss layer (biased router, biased
//           experts, clamps on both sides) on the device vs the host, same bf16-exact weights and inputs, with
//           router logits exact in bf16 so that both sides route identically;
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

}  // namespace

TEST(CudaGptOss, MoeBlockForwardBackwardMatchesCpu) {
  REQUIRE_DEVICE();
  std::mt19937 rng(13);
  const io::ModelConfig cfg = block_config();
  const int64_t n = 200, h = cfg.hidden_size, e = cfg.num_experts, k = cfg.num_experts_per_tok;
  ParamStore cpu_ps, gpu_ps;
  const MoeWeights wc = register_moe(cpu_ps, "model.layers.0.", cfg, 0, 1);
  const MoeWeights wg = register_moe(gpu_ps, "model.layers.0.", cfg, 0, 1);
  ASSERT_TRUE(wc.gpt_oss_glu && wc.router_bias && wc.gate_up_bias && wc.down_bias);
  fill_block({&cpu_ps, &gpu_ps}, wc, e, rng);
  const ExecContext cx = ExecContext::cpu(), gx = ExecContext::cuda_bf16();
  gpu_ps.to_device(gx);  // fp32 master + zero fp32 grads + bf16 working copies; the host store's grads are zero too
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
  // Same routing (exact logits), so the rest compares at bf16 tolerance.
  const Tensor idx_g = ExecContext::download(sg.topk_idx);
  for (int64_t i = 0; i < n * k; ++i)
    ASSERT_EQ(idx_g.data<int32_t>()[i], sc.topk_idx.data<int32_t>()[i]) << "routing differs at " << i;
  EXPECT_EQ(sg.counts, sc.counts);
  // The pre-activations really cross the clamps on both sides.
  int64_t gate_clamped = 0, up_low = 0, up_high = 0;
  for (int64_t i = 0; i < sc.gu.numel(); ++i) {
    const float v = sc.gu.f32()[i];
    if (i % 2 == 0) {
      gate_clamped += v > cfg.swiglu_limit;
    } else {
      up_low += v < -cfg.swiglu_limit;
      up_high += v > cfg.swiglu_limit;
    }
  }
  EXPECT_GT(gate_clamped, 0);
  EXPECT_GT(up_low, 0);
  EXPECT_GT(up_high, 0);
  const test::Tolerance tol{3e-2, 3e-2};  // bf16 intermediates on the device: a few bf16 roundings deep
  expect_close(sg.gu, sc.gu, tol, 2e-2, "block gu (biased gate_up)");
  expect_close(yg, yc, tol, 2e-2, "block y");
  const Tensor dxc = moe_backward(cx, wc, opt, sc, dy, nullptr);
  const Tensor dxg = moe_backward(gx, wg, opt, sg, gx.upload_as(dy, DType::BF16), nullptr);
  expect_close(dxg, dxc, tol, 2e-2, "block dx");
  for (const Param* p : {wc.router, wc.router_bias, wc.gate_up, wc.gate_up_bias, wc.down, wc.down_bias})
    expect_close(gpu_ps.get(p->name).grad, cpu_ps.get(p->name).grad, tol, 2e-2, "block d " + p->name);
}

// ---------------------------------------------------------------------------------------------------------
// One forward_backward of the fixture model (two rows of 40 and 23 tokens, the aux loss on) on both devices from
// the same fp32 weights: the CE sum, and every parameter's gradient (sinks, biases, experts, router) to bf16 noise.
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
  const Batch host_batch = collate({&s[0], &s[1]});
  const io::ModelConfig cfg = io::load_model_config((dir / "model/config.json").string());
  auto cpu = build_model(cfg), gpu = build_model(cfg);
  load_hf_weights(*cpu, (dir / "model").string());
  load_hf_weights(*gpu, (dir / "model").string());
  ASSERT_NO_THROW(gpu->to_device(ExecContext::cuda_bf16()));  // no gpt_oss refusal left
  cpu->params().zero_grad();
  gpu->params().zero_grad();
  ForwardOptions fo;
  const double ce_c = cpu->forward_backward(host_batch, 1.0f, fo);
  const double ce_g = gpu->forward_backward(upload_batch(host_batch, gpu->exec()), 1.0f, fo);
  const double aux_c = cpu->take_aux_loss(), aux_g = gpu->take_aux_loss();
  std::printf("[gpt_oss cuda] ce_sum cpu %.6f cuda %.6f (rel %.2e); coef*aux cpu %.6f cuda %.6f\n", ce_c, ce_g,
              std::abs(ce_g - ce_c) / ce_c, aux_c, aux_g);
  EXPECT_NEAR(ce_g, ce_c, 1e-2 * ce_c);
  EXPECT_NEAR(aux_g, aux_c, 2e-2 * std::abs(aux_c) + 1e-6);
  std::vector<std::pair<double, std::string>> per_param;  // worst first
  const double rel_all = gpu_test::grad_distance(*cpu, *gpu, &per_param);
  // A per-parameter budget loose enough for a bf16-near-tie token routed to another expert on one side.
  for (const auto& [rel, name] : per_param) EXPECT_LT(rel, 0.1) << name << ": relative L2 error of the gradient";
  const double worst = per_param.empty() ? 0.0 : per_param.front().first;
  const std::string worst_name = per_param.empty() ? std::string() : per_param.front().second;
  std::printf("[gpt_oss cuda] gradients: relative L2 over all parameters %.3e, worst %.3e (%s)\n", rel_all, worst,
              worst_name.c_str());
  EXPECT_LT(rel_all, 3e-2);
  for (const char* n : {"model.layers.0.self_attn.sinks", "model.layers.1.mlp.experts.gate_up_proj_bias",
                        "model.layers.0.mlp.router.bias"}) {
    double mx = 0;
    const Tensor g = ExecContext::download(gpu->params().get(n).grad);
    for (int64_t i = 0; i < g.numel(); ++i) mx = std::max(mx, double(std::abs(g.f32()[i])));
    EXPECT_GT(mx, 0.0) << n << ": no gradient reached the device copy";
  }
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
