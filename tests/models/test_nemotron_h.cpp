// nemotron_h: config.json reading (NemotronHConfig keys, defaults, refusals), packing (a packed row equals
// its samples run one by one through the whole hybrid model), activation checkpointing (the same gradients), the
// refusals (CUDA without a device; bf16 on the CPU), generate against the full forward's argmax, and a finite-
// difference check of the whole model's backward on the fixture tests/fixtures/ref_torch/nemotron_h (whose
// 4-step training run test_hf_golden compares against the independent torch reference).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/dataset.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "models/hf_weights.h"
#include "models/generate.h"
#include "models/inference.h"
#include "models/model.h"
#include "ops/device.h"

using namespace am;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

fs::path case_dir() { return fs::path(AM_SOURCE_DIR) / "tests/fixtures/ref_torch/nemotron_h/model"; }

std::unique_ptr<CausalLM> load_fixture() {
  auto cfg = io::load_model_config((case_dir() / "config.json").string());
  auto m = build_model(cfg);
  load_hf_weights(*m, case_dir().string());
  return m;
}

}  // namespace

TEST(NemotronHConfig, ReadsFixtureWithPythonInfinity) {
  // config.json as Python writes it: "time_step_limit": [0.0, Infinity]
  auto c = io::load_model_config((case_dir() / "config.json").string());
  EXPECT_TRUE(c.nemotron_h);
  EXPECT_EQ(c.nh.pattern, "ME*-M");
  EXPECT_EQ(c.num_hidden_layers, 5);
  EXPECT_DOUBLE_EQ(c.nh.time_step_min, 0.03);  // (time_step_limit [0, Infinity] read, unused by the torch path)
  EXPECT_EQ(c.nh.conv_dim(), 32 + 2 * 2 * 8);
  EXPECT_EQ(c.num_experts, 4);
  EXPECT_EQ(c.nh.moe_shared_expert_intermediate_size, 48);
  EXPECT_FLOAT_EQ(static_cast<float>(c.nh.routed_scaling_factor), 2.5f);
}

TEST(NemotronHConfig, PatternAndDefaults) {
  json j = {{"model_type", "nemotron_h"}, {"hybrid_override_pattern", "M-*E"}, {"hidden_size", 64}, {"vocab_size", 100}};
  auto c = io::parse_model_config(j, "config.json");
  EXPECT_EQ(c.nh.pattern, "M-*E");
  EXPECT_EQ(c.nh.mamba_num_heads, 128);  // NemotronHConfig defaults
  EXPECT_EQ(c.nh.n_groups, 8);
  EXPECT_EQ(c.nh.ssm_state_size, 128);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_DOUBLE_EQ(c.nh.time_step_min, 0.001);
  j.erase("hybrid_override_pattern");
  j["layers_block_type"] = {"linear_attention", "full_attention", "moe", "mlp", "mamba", "attention"};
  EXPECT_EQ(io::parse_model_config(j, "config.json").nh.pattern, "M*E-M*");
  j.erase("layers_block_type");
  EXPECT_EQ(io::parse_model_config(j, "config.json").nh.pattern, "ME*-");  // the class default
}

TEST(NemotronHConfig, RefusesWhatIsNotImplemented) {
  auto expect_key = [](json j, const std::string& key) {
    try {
      io::parse_model_config(j, "config.json");
      FAIL() << "accepted " << key;
    } catch (const FormatError& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find("config.json"), std::string::npos) << m;
      EXPECT_NE(m.find(key), std::string::npos) << m;
    }
  };
  const json base = {{"model_type", "nemotron_h"}, {"hybrid_override_pattern", "ME"}};
  json j = base;
  j["moe_latent_size"] = 16;
  expect_key(j, "moe_latent_size");
  j = base;
  j["mlp_hidden_act"] = "silu";
  expect_key(j, "mlp_hidden_act");
  j = base;
  j["hybrid_override_pattern"] = "MX";
  expect_key(j, "hybrid_override_pattern");
  j = base;
  j["num_nextn_predict_layers"] = 1;
  expect_key(j, "num_nextn_predict_layers");
  j = base;
  j["n_groups"] = 3;
  expect_key(j, "n_groups");
}

TEST(NemotronH, PackedRowEqualsSamplesOneByOne) {
  auto m = load_fixture();
  m->to_device(ExecContext::cpu());
  const std::vector<int32_t> a = {1, 17, 45, 200, 9, 33, 120}, b = {1, 250, 7, 88, 64, 5, 91, 150, 3};
  Sample sa{a, a, {}}, sb{b, b, {}};
  Sample packed;
  packed.input_ids = a;
  packed.input_ids.insert(packed.input_ids.end(), b.begin(), b.end());
  packed.labels = packed.input_ids;
  packed.seq_lens = {static_cast<int32_t>(a.size()), static_cast<int32_t>(b.size())};
  auto logits = [&](const Sample& s) {
    std::vector<const Sample*> ptrs{&s};
    return m->forward_logits(upload_batch(collate(ptrs), m->exec()));
  };
  Tensor la = logits(sa), lb = logits(sb), lp = logits(packed);
  const int64_t V = m->config().vocab_size;
  double worst = 0;
  for (int64_t t = 0; t < static_cast<int64_t>(a.size()); ++t)
    for (int64_t v = 0; v < V; ++v) worst = std::max(worst, double(std::fabs(lp.f32()[t * V + v] - la.f32()[t * V + v])));
  for (int64_t t = 0; t < static_cast<int64_t>(b.size()); ++t)
    for (int64_t v = 0; v < V; ++v)
      worst = std::max(worst, double(std::fabs(lp.f32()[(a.size() + t) * V + v] - lb.f32()[t * V + v])));
  EXPECT_LT(worst, 1e-5);
  // Without the segment boundary the second sample would see the first: the check can fail.
  Sample joined{packed.input_ids, packed.labels, {}};
  Tensor lj = logits(joined);
  double diff = 0;
  for (int64_t v = 0; v < V; ++v) diff = std::max(diff, double(std::fabs(lj.f32()[a.size() * V + v] - lb.f32()[v])));
  EXPECT_GT(diff, 1e-3);
}

TEST(NemotronH, GradientsMatchFiniteDifferences) {
  auto m = load_fixture();
  m->to_device(ExecContext::cpu());
  const std::vector<int32_t> a = {1, 17, 45, 200, 9, 33, 120, 250, 7};
  Sample s{a, a, {}};
  std::vector<const Sample*> ptrs{&s};
  Batch b = upload_batch(collate(ptrs), m->exec());
  m->params().zero_grad();
  m->forward_backward(b, 1.0f, {});
  // One element of every parameter (every mixer kind, its norms, the experts, A_log / D / dt_bias / conv).
  int checked = 0;
  for (Param& p : m->params().all()) {
    if (!p.grad.defined()) continue;  // e_score_correction_bias: frozen
    const int64_t i = (p.value.numel() * 7) / 13;
    const float v = p.value.f32()[i], h = 5e-3f;
    p.value.f32()[i] = v + h;
    const double lp = m->forward_loss(b, {});
    p.value.f32()[i] = v - h;
    const double lm = m->forward_loss(b, {});
    p.value.f32()[i] = v;
    const double num = (lp - lm) / (2 * h), got = p.grad.f32()[i];
    EXPECT_NEAR(got, num, 3e-2 * std::fabs(num) + 1e-3) << p.name;
    ++checked;
  }
  EXPECT_GT(checked, 30);
}

TEST(NemotronH, ActivationCheckpointingGivesTheSameGradients) {
  // Recomputing each layer in backward (only its input kept) runs the same kernels on the same inputs.
  auto m = load_fixture();
  m->to_device(ExecContext::cpu());
  const std::vector<int32_t> a = {1, 17, 45, 200, 9, 33, 120}, b = {1, 250, 7, 88, 64};
  Sample packed;
  packed.input_ids = a;
  packed.input_ids.insert(packed.input_ids.end(), b.begin(), b.end());
  packed.labels = packed.input_ids;
  packed.seq_lens = {static_cast<int32_t>(a.size()), static_cast<int32_t>(b.size())};
  std::vector<const Sample*> ptrs{&packed};
  Batch batch = upload_batch(collate(ptrs), m->exec());
  auto grads = [&](bool ckpt) {
    m->params().zero_grad();
    ForwardOptions o;
    o.activation_checkpointing = ckpt;
    const double loss = m->forward_backward(batch, 1.0f, o);
    std::vector<std::vector<float>> g;
    for (Param& p : m->params().all())
      if (p.grad.defined()) g.emplace_back(p.grad.f32(), p.grad.f32() + p.grad.numel());
    return std::make_pair(loss, g);
  };
  const auto plain = grads(false), ckpt = grads(true);
  EXPECT_EQ(plain.first, ckpt.first);
  ASSERT_EQ(plain.second.size(), ckpt.second.size());
  for (size_t i = 0; i < plain.second.size(); ++i) EXPECT_EQ(plain.second[i], ckpt.second[i]) << "parameter " << i;
}

TEST(NemotronH, GeneratesTheFullForwardsArgmaxAndRefusesCudaWithoutADevice) {
  auto m = load_fixture();
  // CUDA runs (tests/gpu/test_cuda_nemotron_h.cpp); without a GPU (or a CUDA build) moving there is a DeviceError.
  if (ops::list_gpus().empty()) EXPECT_THROW(m->to_device(ExecContext::cuda_bf16()), DeviceError);
  // the CPU reference computes in fp32 only
  ExecContext bf16_cpu = ExecContext::cpu();
  bf16_cpu.act_dtype = DType::BF16;
  EXPECT_THROW(load_fixture()->to_device(bf16_cpu), DeviceError);
  // generate decodes from the hybrid cache (KV + Mamba2 conv / SSM states; test_nemotron_h_generate.cpp). Its greedy
  // tokens equal the argmax of a full forward over the same sequence (HF's own tokens: GenerateHfGoldens).
  InferenceLoadOptions o;
  o.model = case_dir().string();
  o.device = "cpu";
  InferenceModel im = load_for_inference(o);
  EXPECT_EQ(im.lm, nullptr);
  GenerateOptions go;
  go.max_new_tokens = 6;
  const std::vector<int32_t> prompt{1, 17, 42, 5};
  const auto got = generate(*im.model, prompt, go).tokens;
  ASSERT_EQ(got.size(), 6u);
  std::vector<int32_t> seq = prompt;
  auto ref = load_fixture();
  for (int32_t t : got) {
    Sample s;
    s.input_ids = seq;
    s.labels.assign(seq.size(), -100);
    const Tensor lg = ref->forward_logits(collate({&s}));
    const int64_t V = lg.dim(1), last = lg.dim(0) - 1;
    int64_t best = 0;
    for (int64_t v = 1; v < V; ++v)
      if (lg.f32()[last * V + v] > lg.f32()[last * V + best]) best = v;
    EXPECT_EQ(t, best);
    seq.push_back(t);
  }
}

TEST(NemotronH, LoadsTransformers5FusedLayoutToo) {
  // The fixture holds the hub / save_pretrained names (backbone.*, per-expert experts.{e}.up_proj.weight);
  // the same weights under transformers 5's in-memory names (model.*, fused experts.up_proj [E, I, H]) load
  // to the same logits, and the export writes back the layout that was read.
  auto m = load_fixture();
  const fs::path dir = fs::path(AM_BINARY_DIR) / "test_out" / "nemotron_h_fused";
  fs::remove_all(dir);
  fs::create_directories(dir);
  fs::copy_file(case_dir() / "config.json", dir / "config.json");
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (Param& p : m->params().all()) tensors.emplace_back(p.name, p.value);
  io::save_safetensors_dir(dir.string(), tensors);
  auto cfg = io::load_model_config((dir / "config.json").string());
  auto m2 = build_model(cfg);
  load_hf_weights(*m2, dir.string());
  EXPECT_TRUE(io::SafeTensors::open(dir.string()).has("model.layers.1.mixer.experts.up_proj"));
  const std::vector<int32_t> a = {1, 17, 45, 200, 9, 33};
  Sample s{a, a, {}};
  std::vector<const Sample*> ptrs{&s};
  Batch b = collate(ptrs);
  Tensor l1 = m->forward_logits(b), l2 = m2->forward_logits(b);
  for (int64_t i = 0; i < l1.numel(); ++i) ASSERT_EQ(l1.f32()[i], l2.f32()[i]) << i;
  for (Param& p : m2->params().all()) EXPECT_EQ(p.source()[0].name.rfind("model.", 0) == 0 || p.name == "lm_head.weight", true) << p.name;
}
