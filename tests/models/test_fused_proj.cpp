// Fused projections (models/blocks/fused_proj.h, docs/fused_projections.md): q | k | v and gate | up
// colocated in the parameter store so that one GEMM on a stacked weight view replaces three (two), with HF's
// separate tensors kept.
//   - the store lays each group's values, gradients and working copies back to back, and pack_groups restores that
//     after per-parameter reallocation; names, shapes and checkpoint layouts are those of before;
//   - the stacking check: the CPU stacks only in mode All; LoRA, 4-bit, non-adjacent or mixed frozen/trainable
//     parts fall back; forward needs no gradients (pure bf16 keeps them apart between passes);
//   - with the fused path forced on the CPU (mode All) every family trains to the same loss and gradients as the
//     per-weight GEMMs (mode Off) within fp32 summation-order noise; LoRA on a part falls back and still trains.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/dataset.h"
#include "io/model_config.h"
#include "models/blocks/attention.h"
#include "models/blocks/fused_proj.h"
#include "models/blocks/mlp.h"
#include "models/hf_weights.h"
#include "models/lora.h"
#include "models/model.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace am;

namespace {

fs::path golden(const std::string& c) { return fs::path(AM_SOURCE_DIR) / "tests/fixtures/golden" / c; }

// Restores the process-wide mode at the end of a test.
struct ModeGuard {
  FusedProjMode saved = fused_proj_mode();
  explicit ModeGuard(FusedProjMode m) { set_fused_proj_mode(m); }
  ~ModeGuard() { set_fused_proj_mode(saved); }
};

std::unique_ptr<CausalLM> load(const std::string& c) {
  auto m = build_model(io::load_model_config((golden(c) / "model/config.json").string()));
  load_hf_weights(*m, (golden(c) / "model").string());
  return m;
}

Batch first_rows(const std::string& c, size_t n) {
  std::vector<Sample> s;
  std::ifstream in(golden(c) / "data.jsonl");
  std::string line;
  while (s.size() < n && std::getline(in, line)) {
    if (line.empty()) continue;
    const json j = json::parse(line);
    Sample x;
    x.input_ids = j.at("input_ids").get<std::vector<int32_t>>();
    x.labels = j.contains("labels") ? j["labels"].get<std::vector<int32_t>>() : x.input_ids;
    s.push_back(std::move(x));
  }
  std::vector<const Sample*> ptrs;
  for (auto& x : s) ptrs.push_back(&x);
  return upload_batch(collate(ptrs), ExecContext::cpu());
}

bool back_to_back(const Tensor& a, const Tensor& b) {
  return static_cast<const char*>(a.raw()) + a.nbytes() == static_cast<const char*>(b.raw());
}

std::string layer0(const std::string& rest) { return "model.layers.0." + rest; }

TEST(FusedProj, StoreColocatesQkvAndGateUp) {
  ModeGuard g(FusedProjMode::Cuda);
  auto m = load("qwen2");  // biases too
  ParamStore& ps = m->params();
  for (const char* part : {"weight", "bias"}) {
    const Param &q = ps.get(layer0("self_attn.q_proj.") + part), &k = ps.get(layer0("self_attn.k_proj.") + part),
                &v = ps.get(layer0("self_attn.v_proj.") + part);
    EXPECT_TRUE(back_to_back(q.value, k.value) && back_to_back(k.value, v.value)) << part;
    EXPECT_TRUE(back_to_back(q.grad, k.grad) && back_to_back(k.grad, v.grad)) << part;
    EXPECT_EQ(q.work.raw(), q.value.raw()) << "the CPU computes with the values";
    // Names, shapes and checkpoint layouts are HF's own.
    EXPECT_EQ(q.source().size(), 1u);
    EXPECT_EQ(q.source().front().name, q.name);
  }
  const Param &gate = ps.get(layer0("mlp.gate_proj.weight")), &up = ps.get(layer0("mlp.up_proj.weight"));
  EXPECT_TRUE(back_to_back(gate.value, up.value) && back_to_back(gate.grad, up.grad));
  EXPECT_EQ(gate.shape, up.shape);
  // The default mode keeps the CPU on per-weight GEMMs; All stacks there too.
  EXPECT_FALSE(stack_proj({&gate, &up}, {}, true).ok);
  set_fused_proj_mode(FusedProjMode::All);
  const StackedProj s = stack_proj({&gate, &up}, {}, true);
  ASSERT_TRUE(s.ok);
  EXPECT_EQ(s.w.shape(), (Shape{2 * gate.shape[0], gate.shape[1]}));
  EXPECT_EQ(s.w.raw(), gate.value.raw());
  EXPECT_EQ(s.dw.raw(), gate.grad.raw());
  const Param &q = ps.get(layer0("self_attn.q_proj.weight")), &k = ps.get(layer0("self_attn.k_proj.weight")),
              &v = ps.get(layer0("self_attn.v_proj.weight"));
  const Param &qb = ps.get(layer0("self_attn.q_proj.bias")), &kb = ps.get(layer0("self_attn.k_proj.bias")),
              &vb = ps.get(layer0("self_attn.v_proj.bias"));
  const StackedProj a = stack_proj({&q, &k, &v}, {&qb, &kb, &vb}, true);
  ASSERT_TRUE(a.ok);
  EXPECT_EQ(a.w.dim(0), q.shape[0] + k.shape[0] + v.shape[0]);
  EXPECT_EQ(a.b.numel(), a.w.dim(0));
  EXPECT_TRUE(a.db.defined());
  // Out of order, or a missing bias: not one GEMM.
  EXPECT_FALSE(stack_proj({&q, &v, &k}, {}, true).ok);
  EXPECT_FALSE(stack_proj({&q, &k, &v}, {&qb, &kb}, true).ok);
}

TEST(FusedProj, FallbacksAreDecidedPerUse) {
  ModeGuard g(FusedProjMode::All);
  auto m = load("llama");
  ParamStore& ps = m->params();
  Param &q = ps.get(layer0("self_attn.q_proj.weight")), &k = ps.get(layer0("self_attn.k_proj.weight")),
        &v = ps.get(layer0("self_attn.v_proj.weight"));
  ASSERT_TRUE(stack_proj({&q, &k, &v}, {}, true).ok);
  // A gradient elsewhere (pure bf16's accumulators between passes): forward still stacks, backward does not.
  Tensor kept = q.grad;
  q.grad = Tensor::zeros(q.shape, DType::F32);
  EXPECT_TRUE(stack_proj({&q, &k, &v}, {}, false).ok);
  EXPECT_FALSE(stack_proj({&q, &k, &v}, {}, true).ok);
  // Frozen and trainable parts mixed: no one dW GEMM.
  q.grad = Tensor();
  EXPECT_FALSE(stack_proj({&q, &k, &v}, {}, true).ok);
  // All frozen (a LoRA base without adapters on these parts): one GEMM, no dW.
  k.grad = Tensor();
  Tensor vg = v.grad;
  v.grad = Tensor();
  const StackedProj frozen = stack_proj({&q, &k, &v}, {}, true);
  EXPECT_TRUE(frozen.ok);
  EXPECT_FALSE(frozen.dw.defined());
  // Reallocated one by one (e.g. a device move made per parameter): pack_groups puts them back to back.
  q.grad = kept;
  k.grad = Tensor::zeros(k.shape, DType::F32);
  v.grad = vg;
  q.value = q.value.clone();
  q.work = q.value;
  EXPECT_FALSE(stack_proj({&q, &k, &v}, {}, false).ok);
  const Tensor q_before = q.value.clone();
  ps.pack_groups();
  EXPECT_TRUE(stack_proj({&q, &k, &v}, {}, true).ok);
  EXPECT_EQ(q.work.raw(), q.value.raw());
  EXPECT_EQ(std::memcmp(q.value.raw(), q_before.raw(), q_before.nbytes()), 0);
}

TEST(FusedProj, OffColocatesNothing) {
  ModeGuard g(FusedProjMode::Off);
  const io::ModelConfig cfg = io::load_model_config((golden("llama") / "model/config.json").string());
  ParamStore ps;
  const AttentionWeights a = register_attention(ps, "model.layers.0.self_attn.", cfg);
  const MlpWeights w = register_mlp(ps, "model.layers.0.mlp.", cfg.hidden_size, cfg.intermediate_size, false);
  EXPECT_FALSE(a.fuse_qkv);
  EXPECT_FALSE(w.fuse_gate_up);
  EXPECT_FALSE(stack_proj({a.q, a.k, a.v}, {}, false).ok);
  set_fused_proj_mode(FusedProjMode::Cuda);
  ParamStore ps2;
  EXPECT_TRUE(register_attention(ps2, "model.layers.0.self_attn.", cfg).fuse_qkv);
  EXPECT_TRUE(register_mlp(ps2, "model.layers.0.mlp.", cfg.hidden_size, cfg.intermediate_size, false).fuse_gate_up);
}

struct Run {
  double loss = 0;
  std::map<std::string, Tensor> grads;
};

Run train_step(const std::string& c, FusedProjMode mode, const LoraSpec* lora = nullptr) {
  ModeGuard g(mode);
  auto m = load(c);
  if (lora) m->enable_lora(*lora, 1, nullptr);
  if (mode == FusedProjMode::All && !lora) {
    // Not vacuous: the blocks' projections do stack (attention's q | k | v with their biases if any;
    // every gate_proj with its up_proj sibling: the dense MLP or a MoE layer's shared expert).
    ParamStore& ps = m->params();
    int stacked = 0;
    for (const Param& p : ps.all()) {
      const std::string& n = p.name;
      const size_t at = n.find("q_proj.weight");
      if (n.rfind("model.layers.", 0) == 0 && at != std::string::npos && at + 13 == n.size()) {
        const std::string pre = n.substr(0, at);
        const bool bias = ps.has(pre + "q_proj.bias");
        EXPECT_TRUE(stack_proj({&p, &ps.get(pre + "k_proj.weight"), &ps.get(pre + "v_proj.weight")},
                               {bias ? &ps.get(pre + "q_proj.bias") : nullptr, bias ? &ps.get(pre + "k_proj.bias") : nullptr,
                                bias ? &ps.get(pre + "v_proj.bias") : nullptr},
                               true)
                        .ok)
            << c << ": " << n;
        ++stacked;
      }
      const size_t gt = n.find("gate_proj.weight");
      if (n.rfind("model.layers.", 0) == 0 && gt != std::string::npos && gt + 16 == n.size() &&
          ps.has(n.substr(0, gt) + "up_proj.weight")) {
        EXPECT_TRUE(stack_proj({&p, &ps.get(n.substr(0, gt) + "up_proj.weight")}, {}, true).ok) << c << ": " << n;
        ++stacked;
      }
    }
    if (c != "phi3") EXPECT_GT(stacked, 0) << c;  // phi3: its own fused tensors
  }
  const Batch b = first_rows(c, 2);
  m->params().zero_grad();
  Run r;
  r.loss = m->forward_backward(b, 0.05f);
  for (Param& p : m->params().all())
    if (p.grad.defined()) r.grads[p.name] = p.grad.clone();
  return r;
}

void expect_same_training(const Run& fused, const Run& plain, const std::string& what) {
  EXPECT_NEAR(fused.loss, plain.loss, 1e-6 * std::abs(plain.loss)) << what;
  ASSERT_EQ(fused.grads.size(), plain.grads.size()) << what;
  for (const auto& [name, gp] : plain.grads) {
    const Tensor& gf = fused.grads.at(name);
    double num = 0, den = 0;
    for (int64_t i = 0; i < gp.numel(); ++i) {
      const double d = double(gf.f32()[i]) - double(gp.f32()[i]);
      num += d * d;
      den += double(gp.f32()[i]) * gp.f32()[i];
    }
    EXPECT_LE(std::sqrt(num), 1e-5 * std::sqrt(den) + 1e-9) << what << ": " << name;
  }
}

class FusedProjFamilies : public ::testing::TestWithParam<std::string> {};

// Every family that runs attention / the gated MLP through the blocks: the fused path (forced on the CPU) against
// the per-weight GEMMs, one training micro-batch.
TEST_P(FusedProjFamilies, TrainsLikePerWeightGemms) {
  const std::string c = GetParam();
  expect_same_training(train_step(c, FusedProjMode::All), train_step(c, FusedProjMode::Off), c);
}

INSTANTIATE_TEST_SUITE_P(Families, FusedProjFamilies,
                         ::testing::Values("llama", "qwen2", "qwen3", "olmoe", "gemma2", "gemma3_text", "qwen2_moe",
                                           "mixtral", "phi3", "gpt_oss", "nemotron_h"));

TEST(FusedProj, LoraOnAPartFallsBackAndTrains) {
  LoraSpec s;
  s.target_modules = {"q_proj", "up_proj"};
  s.dim = 4;
  s.alpha = 8;
  s.lora_A_init = "kaiming";
  {
    ModeGuard g(FusedProjMode::All);
    auto m = load("llama");
    m->enable_lora(s, 1, nullptr);
    ParamStore& ps = m->params();
    EXPECT_FALSE(stack_proj({&ps.get(layer0("self_attn.q_proj.weight")), &ps.get(layer0("self_attn.k_proj.weight")),
                             &ps.get(layer0("self_attn.v_proj.weight"))},
                            {}, true)
                     .ok);
    EXPECT_FALSE(stack_proj({&ps.get(layer0("mlp.gate_proj.weight")), &ps.get(layer0("mlp.up_proj.weight"))}, {}, true).ok);
  }
  expect_same_training(train_step("llama", FusedProjMode::All, &s), train_step("llama", FusedProjMode::Off, &s),
                       "llama + LoRA on q_proj, up_proj");
  // LoRA elsewhere: the frozen q/k/v and gate/up still stack (no dW GEMM).
  LoraSpec o = s;
  o.target_modules = {"o_proj", "down_proj"};
  expect_same_training(train_step("llama", FusedProjMode::All, &o), train_step("llama", FusedProjMode::Off, &o),
                       "llama + LoRA on o_proj, down_proj");
}

}  // namespace
