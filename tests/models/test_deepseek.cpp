// deepseek_v3 / deepseek_v2 beyond the HF golden (tools/make_hf_goldens.py case deepseek_v3, run by
// test_hf_golden.cpp once its fixture exists): config.json keys and defaults, the whole model's gradients
// against finite differences of its own loss, a hub-layout checkpoint (hand-named tensors, an MTP layer to
// skip) that loads and exports bit for bit, a tiny FP8 (e4m3 + block scales) checkpoint, and cached decode.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include <nlohmann/json.hpp>

#include "config/recipe.h"
#include "core/error.h"
#include "data/dataset.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "models/decoder.h"
#include "models/hf_weights.h"
#include "models/kv_cache.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace am;

namespace {

fs::path fresh_dir(const std::string& name) {
  fs::path d = fs::path(AM_BINARY_DIR) / "test_out" / name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// The golden case's shapes (tools/make_hf_goldens.py deepseek_v3).
json tiny_v3() {
  return json{{"model_type", "deepseek_v3"},
              {"vocab_size", 300},
              {"hidden_size", 64},
              {"intermediate_size", 128},
              {"moe_intermediate_size", 32},
              {"num_hidden_layers", 3},
              {"num_attention_heads", 4},
              {"num_key_value_heads", 4},
              {"n_shared_experts", 1},
              {"n_routed_experts", 8},
              {"routed_scaling_factor", 2.5},
              {"kv_lora_rank", 16},
              {"q_lora_rank", 32},
              {"qk_rope_head_dim", 8},
              {"v_head_dim", 16},
              {"qk_nope_head_dim", 16},
              {"n_group", 4},
              {"topk_group", 2},
              {"num_experts_per_tok", 2},
              {"first_k_dense_replace", 1},
              {"norm_topk_prob", true},
              {"max_position_embeddings", 256},
              {"rms_norm_eps", 1e-6},
              {"tie_word_embeddings", false},
              {"rope_parameters",
               {{"rope_type", "yarn"}, {"rope_theta", 10000.0}, {"factor", 4.0}, {"original_max_position_embeddings", 64},
                {"mscale", 1.0}, {"mscale_all_dim", 0.8}}}};
}

Batch batch_of(std::vector<std::vector<int32_t>> rows) {
  std::vector<Sample> s(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) s[i].input_ids = s[i].labels = rows[i];
  std::vector<const Sample*> p;
  for (auto& x : s) p.push_back(&x);
  return collate(p);
}

// Random weights with non-trivial norms, a spread-out router and a correction bias that matters.
std::unique_ptr<CausalLM> random_model(const json& cfg_json, uint64_t seed) {
  auto m = build_model(io::parse_model_config(cfg_json, "config.json"));
  init_random_weights(*m, seed, DType::F32);
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::normal_distribution<float> n(0.f, 1.f);
  for (auto& p : m->params().all()) {
    float* v = p.value.f32();
    const std::string& nm = p.name;
    for (int64_t i = 0; i < p.value.numel(); ++i) {
      if (nm.find("norm.weight") != std::string::npos) v[i] = 1.f + 0.2f * n(rng);
      else if (nm.find("mlp.gate.weight") != std::string::npos) v[i] = 0.3f * n(rng);
      else if (nm.find("e_score_correction_bias") != std::string::npos) v[i] = 0.1f * n(rng);
      else if (nm.find("kv_b_proj") != std::string::npos || nm.find("q_b_proj") != std::string::npos ||
               nm.find("kv_a_proj") != std::string::npos)
        v[i] *= 10.f;  // attention scores far from uniform
    }
  }
  return m;
}

}  // namespace

TEST(DeepseekConfig, V3KeysAndDefaults) {
  auto c = io::parse_model_config(tiny_v3(), "config.json");
  EXPECT_TRUE(c.deepseek);
  EXPECT_EQ(c.head_dim, 8);  // = qk_rope_head_dim, as HF sets config.head_dim
  EXPECT_EQ(c.ds.qk_head_dim(), 24);
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.ds.topk_method, "noaux_tc");
  EXPECT_TRUE(c.ds.sigmoid_scores);
  EXPECT_EQ(c.bos_token_id.value(), 0);  // DeepseekV3Config's bos/eos when absent
  EXPECT_EQ(c.eos_token_id.value(), 1);
  EXPECT_EQ(std::vector<bool>(c.moe_layer), (std::vector<bool>{false, true, true}));
  // 24^-0.5 * (0.1 * 0.8 * ln 4 + 1)^2
  const double m = 0.1 * 0.8 * std::log(4.0) + 1.0;
  EXPECT_NEAR(c.ds.softmax_scale, m * m / std::sqrt(24.0), 1e-12);
  EXPECT_FALSE(c.output_router_logits);
  // class defaults for absent keys
  json j = tiny_v3();
  for (const char* k : {"n_group", "topk_group", "routed_scaling_factor", "first_k_dense_replace", "q_lora_rank"}) j.erase(k);
  j["n_routed_experts"] = 16;
  j["num_experts_per_tok"] = 4;
  auto d = io::parse_model_config(j, "config.json");
  EXPECT_EQ(d.ds.n_group, 8);
  EXPECT_EQ(d.ds.topk_group, 4);
  EXPECT_DOUBLE_EQ(d.ds.routed_scaling_factor, 2.5);
  EXPECT_EQ(d.ds.q_lora_rank, 1536);
  j["q_lora_rank"] = nullptr;
  EXPECT_EQ(io::parse_model_config(j, "config.json").ds.q_lora_rank, 0);  // null: a plain q_proj
  // DeepseekV3Config() itself: every size from the class (DeepSeek-V3 671B), raw kept as given
  const json bare = {{"model_type", "deepseek_v3"}};
  auto v = io::parse_model_config(bare, "config.json");
  EXPECT_EQ(v.vocab_size, 129280);
  EXPECT_EQ(v.hidden_size, 7168);
  EXPECT_EQ(v.num_hidden_layers, 61);
  EXPECT_EQ(v.num_attention_heads, 128);
  EXPECT_EQ(v.num_key_value_heads, 128);
  EXPECT_EQ(v.num_experts, 256);
  EXPECT_EQ(v.ds.kv_lora_rank, 512);
  EXPECT_EQ(v.max_position_embeddings, 4096);
  EXPECT_EQ(std::count(v.moe_layer.begin(), v.moe_layer.end(), true), 58);
  EXPECT_EQ(v.raw, bare);
}

TEST(DeepseekConfig, V2KeysAndDefaults) {
  json j = tiny_v3();
  j["model_type"] = "deepseek_v2";
  for (const char* k : {"n_group", "topk_group", "routed_scaling_factor", "first_k_dense_replace", "rope_parameters"})
    j.erase(k);
  auto c = io::parse_model_config(j, "config.json");
  EXPECT_FALSE(c.ds.sigmoid_scores);
  EXPECT_EQ(c.ds.topk_method, "greedy");
  EXPECT_FALSE(c.norm_topk_prob);  // DeepseekV2Moe never renormalises
  EXPECT_DOUBLE_EQ(c.ds.routed_scaling_factor, 1.0);
  EXPECT_EQ(std::vector<bool>(c.moe_layer), (std::vector<bool>{true, true, true}));  // first_k_dense_replace 0
  EXPECT_EQ(c.bos_token_id.value(), 1);
  EXPECT_NEAR(c.ds.softmax_scale, 1.0 / std::sqrt(24.0), 1e-12);
  j.erase("num_experts_per_tok");  // DeepseekV2Config's default is None
  EXPECT_THROW(io::parse_model_config(j, "config.json"), FormatError);
}

TEST(DeepseekConfig, UnsupportedValuesNameTheKey) {
  auto expect_key = [](json j, const std::string& key) {
    try {
      io::parse_model_config(j, "config.json");
      ADD_FAILURE() << "no error for " << key;
    } catch (const FormatError& e) {
      EXPECT_NE(std::string(e.what()).find("config.json"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(key), std::string::npos) << e.what();
    }
  };
  json j = tiny_v3();
  j["n_group"] = 3;  // does not divide 8 experts
  expect_key(j, "n_group");
  j = tiny_v3();
  j["num_key_value_heads"] = 2;
  expect_key(j, "num_key_value_heads");
  j = tiny_v3();
  j["topk_group"] = 5;
  expect_key(j, "topk_group");
  j = tiny_v3();
  j["num_experts_per_tok"] = 5;  // more than topk_group (2) groups of 2 experts hold
  expect_key(j, "num_experts_per_tok");
  j = tiny_v3();
  j["model_type"] = "deepseek_v2";
  j["scoring_func"] = "sigmoid";
  expect_key(j, "scoring_func");
  j["scoring_func"] = "softmax";
  j["topk_method"] = "noaux_tc";
  expect_key(j, "topk_method");
  j["topk_method"] = "group_limited_greedy";
  j.erase("topk_group");
  expect_key(j, "topk_group");
}

// d(sum CE)/d(theta) from forward_backward against central differences of forward_loss, on a sample of
// elements of every kind of parameter (MLA projections and norms, router, experts, shared expert, dense MLP).
TEST(DeepseekModel, GradientsMatchFiniteDifferences) {
  for (int variant = 0; variant < 3; ++variant) {
    const bool q_lora = variant == 0;
    json j = tiny_v3();
    if (!q_lora) j["q_lora_rank"] = nullptr;
    if (variant == 2) {  // deepseek_v2: softmax scores, group-limited greedy (group max), biased MLPs
      j["model_type"] = "deepseek_v2";
      j["topk_method"] = "group_limited_greedy";
      j["routed_scaling_factor"] = 3.0;
      j["mlp_bias"] = true;
    }
    j["vocab_size"] = 64;
    auto m = random_model(j, 5);
    Batch b = batch_of({{1, 5, 9, 17, 33, 2, 40, 11, 7}, {1, 60, 3, 8, 21}});
    m->params().zero_grad();
    m->forward_backward(b, 1.f, ForwardOptions{});
    auto loss = [&]() { return m->forward_loss(b, ForwardOptions{}); };
    std::mt19937 rng(3);
    int checked = 0;
    for (auto& p : m->params().all()) {
      if (!p.trainable) {
        EXPECT_FALSE(p.grad.defined()) << p.name;  // the correction bias: a buffer, no gradient
        continue;
      }
      for (int r = 0; r < 3; ++r) {
        const int64_t i = std::uniform_int_distribution<int64_t>(0, p.value.numel() - 1)(rng);
        float* v = p.value.f32() + i;
        const float x = *v, eps = 3e-3f * std::max(1.f, std::abs(x));
        *v = x + eps;
        const double lp = loss();
        *v = x - eps;
        const double lm = loss();
        *v = x;
        const double fd = (lp - lm) / (2 * eps), g = p.grad.f32()[i];
        EXPECT_NEAR(g, fd, 2e-3 + 2e-2 * std::abs(fd)) << "variant " << variant << " " << p.name << "[" << i << "]";
        ++checked;
      }
    }
    EXPECT_GT(checked, 60);
  }
}

// Activation checkpointing (recompute each layer in backward) gives bit-identical gradients: the MLA and
// router recomputation sees the same inputs and kernels.
TEST(DeepseekModel, RecomputeGivesTheSameGradients) {
  json j = tiny_v3();
  j["vocab_size"] = 64;
  auto a = random_model(j, 12), b = random_model(j, 12);
  Batch bt = batch_of({{1, 5, 9, 17, 33, 2, 40, 11, 7}, {1, 60, 3, 8, 21}});
  ForwardOptions plain, recompute;
  recompute.activation_checkpointing = true;
  a->params().zero_grad();
  b->params().zero_grad();
  const double la = a->forward_backward(bt, 0.1f, plain), lb = b->forward_backward(bt, 0.1f, recompute);
  EXPECT_EQ(la, lb);
  for (auto& p : a->params().all()) {
    if (!p.trainable) continue;
    const Param& q = b->params().get(p.name);
    EXPECT_EQ(std::memcmp(p.grad.raw(), q.grad.raw(), p.grad.nbytes()), 0) << p.name;
  }
}

// rope_interleave: HF permutes the rope dims [x0, x1, ..] to [x0, x2, .., x1, x3, ..] (view(d/2, 2).transpose)
// before rotate_half, in q and k alike. So a model with rope_interleave true equals one with false whose
// q_b_proj rows and kv_a_proj_with_mqa rows of the rope dims are permuted that way: same logits, bit for bit
// (and different ones when they are not permuted: the flag is live).
TEST(DeepseekModel, InterleavedRopeIsAPermutationOfTheRopeRows) {
  json ji = tiny_v3();
  ji["vocab_size"] = 64;
  json jn = ji;
  jn["rope_interleave"] = false;
  auto a = random_model(ji, 8);
  auto b = build_model(io::parse_model_config(jn, "config.json"));
  auto c = build_model(io::parse_model_config(jn, "config.json"));
  const int64_t nh = 4, dn = 16, dr = 8, dq = 24, rkv = 16;
  auto src = [&](int64_t j) { return j < dr / 2 ? 2 * j : 2 * (j - dr / 2) + 1; };
  for (auto& p : a->params().all()) {
    Param& q = b->params().get(p.name);
    std::memcpy(q.value.raw(), p.value.raw(), p.value.nbytes());
    std::memcpy(c->params().get(p.name).value.raw(), p.value.raw(), p.value.nbytes());
    const int64_t cols = p.shape.size() == 2 ? p.shape[1] : 1;
    auto permute_rows = [&](int64_t row0) {  // rows [row0, row0 + dr) of a [rows, cols] weight
      for (int64_t j = 0; j < dr; ++j)
        std::memcpy(q.value.f32() + (row0 + j) * cols, p.value.f32() + (row0 + src(j)) * cols,
                    static_cast<size_t>(cols) * sizeof(float));
    };
    if (p.name.find("q_b_proj.weight") != std::string::npos)
      for (int64_t h = 0; h < nh; ++h) permute_rows(h * dq + dn);
    if (p.name.find("kv_a_proj_with_mqa.weight") != std::string::npos) permute_rows(rkv);
  }
  Batch bt = batch_of({{1, 5, 9, 17, 33, 2, 40, 11, 7, 3, 8, 50}, {1, 60, 3, 8, 21}});
  Tensor la = a->forward_logits(bt), lb = b->forward_logits(bt), lc = c->forward_logits(bt);
  EXPECT_EQ(std::memcmp(la.raw(), lb.raw(), la.nbytes()), 0);
  EXPECT_NE(std::memcmp(la.raw(), lc.raw(), la.nbytes()), 0);
}

// automodel generate's path: a prefill then one token at a time through the KV cache (per-head MLA keys of
// qk_nope + qk_rope dims, values of v_head_dim) gives the full causal forward's logits.
TEST(DeepseekModel, CachedDecodeMatchesFullForward) {
  json j = tiny_v3();
  j["vocab_size"] = 64;
  auto m = random_model(j, 6);
  auto* lm = dynamic_cast<DecoderLM*>(m.get());
  ASSERT_NE(lm, nullptr);
  const std::vector<int32_t> ids = {1, 5, 9, 17, 33, 2, 40, 11, 7, 3};
  Tensor full = m->forward_logits(batch_of({ids}));  // [T, V]
  const int64_t V = 64;
  KvCache cache(m->config(), lm->exec(), 2);
  cache.reserve(4);
  Tensor pre = lm->forward_incremental({ids[0], ids[1], ids[2]}, cache, true);  // [3, V]
  double worst = 0;
  for (int64_t t = 0; t < 3; ++t)
    for (int64_t v = 0; v < V; ++v) worst = std::max(worst, double(std::abs(pre.f32()[t * V + v] - full.f32()[t * V + v])));
  for (size_t t = 3; t < ids.size(); ++t) {
    if (cache.length() == cache.capacity()) cache.reserve(2 * cache.capacity());
    Tensor step = lm->forward_incremental({ids[t]}, cache);  // [1, V]
    for (int64_t v = 0; v < V; ++v)
      worst = std::max(worst, double(std::abs(step.f32()[v] - full.f32()[static_cast<int64_t>(t) * V + v])));
  }
  EXPECT_EQ(cache.length(), static_cast<int64_t>(ids.size()));
  EXPECT_LT(worst, 1e-5);
}

// A hub-layout file with hand-written HF names (per-expert experts, shared_experts, the correction bias,
// an MTP layer 3 to be skipped) loads, and the export writes back the same names, shapes, dtypes and bytes.
TEST(DeepseekCheckpoint, HubLayoutLoadsAndExportsBitForBit) {
  const json cfg = tiny_v3();
  const fs::path src = fresh_dir("dsv3_hub"), out = fresh_dir("dsv3_hub_out");
  std::ofstream(src / "config.json") << cfg.dump(2);
  std::mt19937 rng(9);
  std::normal_distribution<float> n(0.f, 0.05f);
  std::vector<std::pair<std::string, Tensor>> t;
  auto add = [&](const std::string& name, Shape s, DType dt = DType::BF16) {
    Tensor x = Tensor::empty(s, DType::F32);
    for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] = n(rng);
    t.emplace_back(name, x.to(dt));
  };
  add("model.embed_tokens.weight", {300, 64});
  for (int l = 0; l < 4; ++l) {  // layer 3 = num_hidden_layers: the MTP layer
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "self_attn.q_a_proj.weight", {32, 64});
    add(p + "self_attn.q_a_layernorm.weight", {32});
    add(p + "self_attn.q_b_proj.weight", {4 * 24, 32});
    add(p + "self_attn.kv_a_proj_with_mqa.weight", {16 + 8, 64});
    add(p + "self_attn.kv_a_layernorm.weight", {16});
    add(p + "self_attn.kv_b_proj.weight", {4 * 32, 16});
    add(p + "self_attn.o_proj.weight", {64, 64});
    if (l == 0) {
      add(p + "mlp.gate_proj.weight", {128, 64});
      add(p + "mlp.up_proj.weight", {128, 64});
      add(p + "mlp.down_proj.weight", {64, 128});
    } else {
      for (int e = 0; e < 8; ++e) {
        const std::string q = p + "mlp.experts." + std::to_string(e) + ".";
        add(q + "gate_proj.weight", {32, 64});
        add(q + "up_proj.weight", {32, 64});
        add(q + "down_proj.weight", {64, 32});
      }
      add(p + "mlp.gate.weight", {8, 64});
      add(p + "mlp.gate.e_score_correction_bias", {8}, DType::F32);  // transformers keeps it fp32
      add(p + "mlp.shared_experts.gate_proj.weight", {32, 64});
      add(p + "mlp.shared_experts.up_proj.weight", {32, 64});
      add(p + "mlp.shared_experts.down_proj.weight", {64, 32});
    }
    add(p + "input_layernorm.weight", {64});
    add(p + "post_attention_layernorm.weight", {64});
  }
  add("model.norm.weight", {64});
  add("lm_head.weight", {300, 64});
  io::save_safetensors_file((src / "model.safetensors").string(), t);
  check_hf_weights_against_config(src.string(), io::parse_model_config(cfg, "config.json"));
  auto m = build_model(io::load_model_config((src / "config.json").string()));
  load_hf_weights(*m, src.string());
  save_hf_model(*m, out.string(), "");
  auto a = io::SafeTensors::open(src.string()), b = io::SafeTensors::open(out.string());
  size_t same = 0;
  for (auto& name : a.names()) {
    if (name.rfind("model.layers.3.", 0) == 0) {
      EXPECT_FALSE(b.has(name)) << "the MTP layer is not exported: " << name;
      continue;
    }
    ASSERT_TRUE(b.has(name)) << name;
    Tensor x = a.get(name), y = b.get(name);
    ASSERT_EQ(x.shape(), y.shape()) << name;
    ASSERT_EQ(x.dtype(), y.dtype()) << name;
    EXPECT_EQ(std::memcmp(x.raw(), y.raw(), x.nbytes()), 0) << "bytes differ: " << name;
    ++same;
  }
  EXPECT_EQ(same, b.names().size());
  EXPECT_FALSE(m->params().get("model.layers.1.mlp.gate.e_score_correction_bias").trainable);
}

namespace {

// float -> float8_e4m3fn, round to nearest even over the representable values (test helper).
uint8_t to_e4m3(float f) {
  uint8_t best = 0;
  float bd = INFINITY;
  for (int b = 0; b < 256; ++b) {
    if ((b & 0x7F) == 0x7F) continue;
    const int s = b >> 7, e = (b >> 3) & 0xF, mm = b & 7;
    float v = e == 0 ? std::ldexp(mm / 8.f, -6) : std::ldexp(1.f + mm / 8.f, e - 7);
    if (s) v = -v;
    if (std::abs(v - f) < bd) {
      bd = std::abs(v - f);
      best = static_cast<uint8_t>(b);
    }
  }
  return best;
}

}  // namespace

// A checkpoint in DeepSeek's FP8 hub format: one Linear stored e4m3 with [ceil(out/bo), ceil(in/bi)] block
// scales (blocks 16 x 16 here, ragged at the edges), the rest bf16. Loading dequantises exactly
// (value * scale); the export is unquantised (bf16) without quantization_config.
TEST(DeepseekCheckpoint, Fp8BlockScalesDequantiseOnLoad) {
  json cfg = tiny_v3();
  cfg["torch_dtype"] = "bfloat16";
  cfg["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"}, {"activation_scheme", "dynamic"},
                                {"weight_block_size", {16, 16}}};
  const fs::path src = fresh_dir("dsv3_fp8"), out = fresh_dir("dsv3_fp8_out"), plain = fresh_dir("dsv3_fp8_plain");
  // Start from an (fp32) export of a random model, then replace one weight by its FP8 form.
  auto base = random_model(tiny_v3(), 4);
  save_hf_model(*base, plain.string(), "");
  auto st = io::SafeTensors::open(plain.string());
  const std::string wname = "model.layers.1.self_attn.kv_b_proj.weight";  // [128, 16]: 8 x 1 blocks
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (auto& n : st.names())
    if (n != wname) tensors.emplace_back(n, st.get(n).clone());
  const int64_t R = 128, C = 16, bo = 16, bi = 16;
  std::vector<uint8_t> bytes(static_cast<size_t>(R * C));
  Tensor scale = Tensor::empty({R / bo, (C + bi - 1) / bi}, DType::F32);
  std::vector<float> want(static_cast<size_t>(R * C));
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int64_t i = 0; i < scale.numel(); ++i) scale.f32()[i] = 0.01f * (1 + i);
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j < C; ++j) {
      const uint8_t b = to_e4m3(4.f * nd(rng));
      bytes[i * C + j] = b;
      const int s = b >> 7, e = (b >> 3) & 0xF, mm = b & 7;
      float v = e == 0 ? std::ldexp(mm / 8.f, -6) : std::ldexp(1.f + mm / 8.f, e - 7);
      want[i * C + j] = (s ? -v : v) * scale.f32()[(i / bo) * 1 + j / bi];
    }
  tensors.emplace_back(wname + "_scale_inv", scale);
  // F8 has no DType: write the file with a U8 stand-in, then patch the header's dtype string in place
  // ("U8" is not a DType either, so write I32 [R, C/4] and patch both the dtype and the shape).
  Tensor packed = Tensor::empty({R, C / 4}, DType::I32);
  std::memcpy(packed.raw(), bytes.data(), bytes.size());
  tensors.emplace_back(wname, packed);
  // (a metadata entry reserves header room for the longer dtype / shape strings; dropped by the patch)
  io::save_safetensors_file((src / "model.safetensors").string(), tensors,
                            {{"format", "pt"}, {"room", std::string(64, 'x')}});
  {
    std::fstream f(src / "model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    uint64_t hl = 0;
    f.read(reinterpret_cast<char*>(&hl), 8);
    std::string h(hl, ' ');
    f.read(h.data(), static_cast<std::streamsize>(hl));
    json hj = json::parse(h);
    hj[wname]["dtype"] = "F8_E4M3";
    hj[wname]["shape"] = {R, C};
    hj["__metadata__"].erase("room");
    std::string nh = hj.dump();
    ASSERT_LE(nh.size(), h.size());
    nh.resize(h.size(), ' ');
    f.seekp(8);
    f.write(nh.data(), static_cast<std::streamsize>(nh.size()));
  }
  std::ofstream(src / "config.json") << cfg.dump(2);
  const auto c = io::load_model_config((src / "config.json").string());
  check_hf_weights_against_config(src.string(), c);
  auto m = build_model(c);
  load_hf_weights(*m, src.string());
  const Param& w = m->params().get(wname);
  for (int64_t i = 0; i < R * C; ++i) ASSERT_EQ(w.value.f32()[i], want[static_cast<size_t>(i)]) << i;
  EXPECT_EQ(w.source_dtype, DType::BF16);
  // everything else as in the plain file
  auto other = build_model(io::parse_model_config(tiny_v3(), "config.json"));
  load_hf_weights(*other, plain.string());
  const Param& ref = other->params().get("model.layers.1.self_attn.q_b_proj.weight");
  EXPECT_EQ(std::memcmp(ref.value.raw(), m->params().get(ref.name).value.raw(), ref.value.nbytes()), 0);
  save_hf_model(*m, out.string(), "");
  auto o = io::SafeTensors::open(out.string());
  EXPECT_EQ(o.info(wname).dtype, DType::BF16);
  EXPECT_FALSE(o.has(wname + "_scale_inv"));
  std::ifstream cf(out / "config.json");
  EXPECT_FALSE(json::parse(cf).contains("quantization_config"));
}

// The whole model against HF itself: tests/fixtures/golden/deepseek_v3 in test_hf_golden.cpp and test_generate.cpp
// (tools/deepseek_v3_reference.py, the independent plain-torch reference used before HF's golden existed, can still
// regenerate a ref_torch fixture with tools/ref_torch_goldens.py).
