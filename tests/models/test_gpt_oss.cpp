// gpt_oss beyond the (future) HF golden: GptOssConfig defaults, checkpoints in the hub layout ([E, H, 2I]
// interleaved gate/up, [E, I, H]) round-trip bit for bit through the engine's [E, out, in] experts, MXFP4
// checkpoints dequantise at load and export unquantised, the whole model's gradients (sinks, router and
// expert biases, experts) against finite differences of its loss, and LoRA on the experts is refused.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
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
#include "models/lora.h"
#include "models/mxfp4.h"
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

// The tools/make_hf_goldens.py "gpt_oss" case's sizes: hidden 64, 2 layers, 4 heads / 2 kv, head_dim 16,
// 4 experts top-2, intermediate 32, sliding window 8.
json tiny_config() {
  return json{{"model_type", "gpt_oss"},
              {"architectures", {"GptOssForCausalLM"}},
              {"vocab_size", 96},
              {"hidden_size", 64},
              {"intermediate_size", 32},
              {"num_hidden_layers", 2},
              {"num_attention_heads", 4},
              {"num_key_value_heads", 2},
              {"head_dim", 16},
              {"num_local_experts", 4},
              {"num_experts_per_tok", 2},
              {"sliding_window", 8},
              {"max_position_embeddings", 256},
              {"rope_theta", 150000.0},
              {"rope_scaling",
               {{"rope_type", "yarn"}, {"factor", 4.0}, {"beta_fast", 32.0}, {"beta_slow", 1.0},
                {"original_max_position_embeddings", 64}, {"truncate", false}}},
              {"router_aux_loss_coef", 0.01},
              {"output_router_logits", true},
              {"torch_dtype", "float32"}};
}

io::ModelConfig parse(const json& j) { return io::parse_model_config(j, "config.json"); }

// A random model with every gpt_oss-specific tensor (sinks, biases) nonzero, so that each matters.
std::unique_ptr<CausalLM> random_model(const json& j, uint64_t seed) {
  auto m = build_model(parse(j));
  init_random_weights(*m, seed, DType::F32);
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::normal_distribution<float> nd(0.f, 0.5f);
  for (Param& p : m->params().all()) {
    const bool special = p.name.find("sinks") != std::string::npos || p.name.find("bias") != std::string::npos;
    if (!special) continue;
    for (int64_t i = 0; i < p.value.numel(); ++i) p.value.f32()[i] = nd(rng);
  }
  return m;
}

void write_config(const fs::path& dir, const json& j) {
  std::ofstream f(dir / "config.json");
  f << j.dump(2);
}

std::unique_ptr<CausalLM> load(const fs::path& dir) {
  auto m = build_model(io::load_model_config((dir / "config.json").string()));
  load_hf_weights(*m, dir.string());
  return m;
}

std::vector<char> file_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::vector<char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

Batch batch(int64_t vocab, int len0, int len1) {
  std::vector<Sample> s(2);
  for (int i = 0; i < len0; ++i) s[0].input_ids.push_back(1 + (i * 7) % static_cast<int>(vocab - 1));
  for (int i = 0; i < len1; ++i) s[1].input_ids.push_back(1 + (i * 13) % static_cast<int>(vocab - 1));
  for (auto& x : s) x.labels = x.input_ids;
  return collate({&s[0], &s[1]});
}

}  // namespace

TEST(GptOssConfig, ClassDefaultsForAbsentKeys) {
  json j = {{"model_type", "gpt_oss"}, {"vocab_size", 100}, {"hidden_size", 128}, {"intermediate_size", 64},
            {"num_hidden_layers", 5}, {"num_attention_heads", 16}};
  const io::ModelConfig c = parse(j);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.num_experts, 128);
  EXPECT_EQ(c.num_experts_per_tok, 4);
  EXPECT_EQ(c.moe_intermediate_size, 64);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_TRUE(c.attention_bias && c.o_proj_bias && c.attn_sinks && c.router_bias && c.expert_bias && c.gpt_oss_glu);
  EXPECT_DOUBLE_EQ(c.swiglu_alpha, 1.702);
  EXPECT_DOUBLE_EQ(c.swiglu_limit, 7.0);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.router_aux_loss_coef, 0.001);
  EXPECT_FALSE(c.output_router_logits);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.max_position_embeddings, 131072);
  EXPECT_EQ(c.sliding_window, (std::vector<int64_t>{128, 0, 128, 0, 128}));  // even layers slide
  EXPECT_EQ(c.rope.rope_type, "yarn");
  EXPECT_DOUBLE_EQ(c.rope.rope_theta, 150000.0);
  EXPECT_DOUBLE_EQ(c.rope.factor, 32.0);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 4096);
  EXPECT_FALSE(c.rope.truncate);
  for (bool moe : c.moe_layer) EXPECT_TRUE(moe);
}

TEST(GptOssConfig, ExplicitKeysAndErrors) {
  json j = tiny_config();
  j["layer_types"] = {"full_attention", "sliding_attention"};
  j["attention_bias"] = false;
  j["swiglu_limit"] = 3.5;
  io::ModelConfig c = parse(j);
  EXPECT_EQ(c.sliding_window, (std::vector<int64_t>{0, 8}));
  EXPECT_FALSE(c.attention_bias || c.o_proj_bias);
  EXPECT_DOUBLE_EQ(c.swiglu_limit, 3.5);
  EXPECT_DOUBLE_EQ(c.rope.factor, 4.0);
  json bad = tiny_config();
  bad["layer_types"] = {"full_attention", "chunked_attention"};
  EXPECT_THROW(parse(bad), FormatError);
  bad = tiny_config();
  bad["attention_dropout"] = 0.1;
  try {
    parse(bad);
    FAIL();
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("config.json"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("attention_dropout"), std::string::npos);
  }
  bad = tiny_config();
  bad["swiglu_limit"] = 0;
  EXPECT_THROW(parse(bad), FormatError);
}

TEST(GptOssCheckpoint, HubLayoutRoundTripsBitForBit) {
  const json j = tiny_config();
  auto m = random_model(j, 11);
  const fs::path a = fresh_dir("gpt_oss_rt_a"), b = fresh_dir("gpt_oss_rt_b");
  for (auto& p : m->params().all()) p.source_dtype = DType::BF16;
  save_hf_model(*m, a.string(), "");
  // The file holds the hub's names and shapes.
  auto st = io::SafeTensors::open(a.string());
  EXPECT_EQ(st.info("model.layers.0.mlp.experts.gate_up_proj").shape, (Shape{4, 64, 64}));  // [E, H, 2I]
  EXPECT_EQ(st.info("model.layers.0.mlp.experts.down_proj").shape, (Shape{4, 32, 64}));     // [E, I, H]
  EXPECT_EQ(st.info("model.layers.0.mlp.experts.gate_up_proj_bias").shape, (Shape{4, 64}));
  EXPECT_EQ(st.info("model.layers.1.mlp.router.bias").shape, (Shape{4}));
  EXPECT_EQ(st.info("model.layers.1.self_attn.sinks").shape, (Shape{4}));
  EXPECT_EQ(st.info("model.layers.1.self_attn.o_proj.bias").shape, (Shape{64}));
  auto m2 = load(a);
  // Internal [E, 2I, H] is the hub's [E, H, 2I] transposed: hub[e, h, c] == param[e, c, h].
  const Tensor hub = st.get("model.layers.0.mlp.experts.gate_up_proj").to(DType::F32);
  const Param& gu = m2->params().get("model.layers.0.mlp.experts.gate_up_proj");
  ASSERT_EQ(gu.shape, (Shape{4, 64, 64}));
  for (int64_t e : {0, 3})
    for (int64_t h : {0, 5, 63})
      for (int64_t c : {0, 1, 17, 63}) EXPECT_EQ(hub.f32()[(e * 64 + h) * 64 + c], gu.value.f32()[(e * 64 + c) * 64 + h]);
  const Tensor dhub = st.get("model.layers.1.mlp.experts.down_proj").to(DType::F32);  // [E, I=32, H=64]
  const Param& dn = m2->params().get("model.layers.1.mlp.experts.down_proj");         // [E, H, I]
  EXPECT_EQ(dhub.f32()[(2 * 32 + 7) * 64 + 9], dn.value.f32()[(2 * 64 + 9) * 32 + 7]);
  save_hf_model(*m2, b.string(), "");
  EXPECT_EQ(file_bytes(a / "model.safetensors"), file_bytes(b / "model.safetensors"));
}

TEST(GptOssCheckpoint, Mxfp4ExpertsDequantiseAtLoadAndExportUnquantised) {
  // Start from an exported model, then replace every expert weight by hand-made MXFP4 blocks and scales.
  const json j = tiny_config();
  auto m = random_model(j, 12);
  const fs::path plain = fresh_dir("gpt_oss_mx_plain"), q = fresh_dir("gpt_oss_mx_q"), out = fresh_dir("gpt_oss_mx_out");
  save_hf_model(*m, plain.string(), "");
  auto st = io::SafeTensors::open(plain.string());
  struct Entry {
    std::string name, dtype;
    Shape shape;
    std::vector<uint8_t> bytes;
  };
  std::vector<Entry> entries;
  std::mt19937 rng(3);
  std::map<std::string, std::pair<std::vector<uint8_t>, std::vector<uint8_t>>> made;  // name -> blocks, scales
  for (const std::string& n : st.names()) {
    auto ends = [&](const std::string& suf) { return n.size() >= suf.size() && n.compare(n.size() - suf.size(), suf.size(), suf) == 0; };
    const bool expert_w = ends("experts.gate_up_proj") || ends("experts.down_proj");
    if (!expert_w) {
      Tensor t = st.get(n);
      entries.push_back({n, "F32", t.shape(), std::vector<uint8_t>((uint8_t*)t.raw(), (uint8_t*)t.raw() + t.nbytes())});
      continue;
    }
    const Shape hub = st.info(n).shape;  // [E, C, R]; the blocks dequantise to [E, R, C]
    const int64_t E = hub[0], C = hub[1], R = hub[2], G = C / 32;
    std::vector<uint8_t> blocks(static_cast<size_t>(E * R * G * 16)), scales(static_cast<size_t>(E * R * G));
    for (auto& b : blocks) b = static_cast<uint8_t>(rng() & 0xFF);
    for (auto& s : scales) s = static_cast<uint8_t>(120 + rng() % 6);
    entries.push_back({n + "_blocks", "U8", {E, R, G, 16}, blocks});
    entries.push_back({n + "_scales", "U8", {E, R, G}, scales});
    made[n] = {blocks, scales};
  }
  {  // a safetensors file by hand (the engine's writer has no U8)
    json header = json::object();
    size_t off = 0;
    for (auto& e : entries) {
      header[e.name] = {{"dtype", e.dtype}, {"shape", e.shape}, {"data_offsets", {off, off + e.bytes.size()}}};
      off += e.bytes.size();
    }
    std::string h = header.dump();
    while (h.size() % 8) h += ' ';
    std::ofstream f(q / "model.safetensors", std::ios::binary);
    const uint64_t n = h.size();
    f.write(reinterpret_cast<const char*>(&n), 8);
    f << h;
    for (auto& e : entries) f.write(reinterpret_cast<const char*>(e.bytes.data()), static_cast<std::streamsize>(e.bytes.size()));
  }
  json jq = j;
  jq["quantization_config"] = {{"quant_method", "mxfp4"}, {"modules_to_not_convert", {"model.layers.*.self_attn", "lm_head"}}};
  write_config(q, jq);
  const io::ModelConfig cq = io::load_model_config((q / "config.json").string());
  ASSERT_TRUE(is_mxfp4_checkpoint(cq));
  check_hf_weights_against_config(q.string(), cq);  // the pre-check understands the pairs
  auto mq = load(q);
  for (auto& [name, bs] : made) {
    const Param& p = mq->params().get(name);  // [E, R, C] internal = the dequantised blocks as they are
    std::vector<float> want(static_cast<size_t>(p.value.numel()));
    mxfp4_dequantize(bs.first.data(), bs.second.data(), static_cast<int64_t>(bs.second.size()), want.data());
    EXPECT_EQ(std::memcmp(want.data(), p.value.f32(), want.size() * 4), 0) << name;
    EXPECT_EQ(p.source_dtype, DType::BF16) << name;
  }
  save_hf_model(*mq, out.string(), "");
  std::ifstream cf(out / "config.json");
  const json saved = json::parse(cf);
  EXPECT_FALSE(saved.contains("quantization_config"));
  auto so = io::SafeTensors::open(out.string());
  EXPECT_FALSE(so.has("model.layers.0.mlp.experts.gate_up_proj_blocks"));
  EXPECT_EQ(so.info("model.layers.0.mlp.experts.gate_up_proj").dtype, DType::BF16);
  EXPECT_EQ(so.info("model.layers.0.mlp.experts.gate_up_proj").shape, (Shape{4, 64, 64}));
  // Exported unquantised, the values are the same (MXFP4 values are exact in bf16): reloads to the same model.
  auto mr = load(out);
  for (auto& [name, bs] : made) {
    const Param& a = mq->params().get(name);
    const Param& b = mr->params().get(name);
    EXPECT_EQ(std::memcmp(a.value.raw(), b.value.raw(), a.value.nbytes()), 0) << name;
  }
  // A broken pair names the tensor.
  jq["intermediate_size"] = 64;  // 2I = 128: the blocks no longer fit
  write_config(q, jq);
  try {
    check_hf_weights_against_config(q.string(), io::load_model_config((q / "config.json").string()));
    FAIL();
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("_blocks"), std::string::npos) << e.what();
  }
}

// d loss / d theta of the whole model (forward_backward) against central differences of forward_loss, for
// elements of every gpt_oss-specific parameter. 40-token rows make the sliding window (8) cut in.
TEST(GptOssModel, GradientsMatchFiniteDifferencesOfTheLoss) {
  json j = tiny_config();
  j["output_router_logits"] = false;  // the aux loss's top-k counts are piecewise constant: keep it out of FD
  auto m = random_model(j, 13);
  // Routers with well separated logits (std ~8), so that no perturbation below changes a top-k choice.
  std::mt19937 rr(5);
  std::normal_distribution<float> wide(0.f, 1.f);
  for (int l = 0; l < 2; ++l) {
    Param& r = m->params().get("model.layers." + std::to_string(l) + ".mlp.router.weight");
    for (int64_t i = 0; i < r.value.numel(); ++i) r.value.f32()[i] = wide(rr);
  }
  Batch b = batch(j["vocab_size"].get<int64_t>(), 40, 23);
  ForwardOptions fo;
  m->params().zero_grad();
  m->forward_backward(b, 1.0f, fo);
  const std::vector<std::string> names = {
      "model.layers.0.self_attn.sinks",          "model.layers.1.self_attn.sinks",
      "model.layers.0.mlp.router.bias",          "model.layers.1.mlp.router.weight",
      "model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.gate_up_proj_bias",
      "model.layers.0.mlp.experts.down_proj",    "model.layers.1.mlp.experts.down_proj_bias",
      "model.layers.0.self_attn.o_proj.bias",    "model.layers.1.self_attn.k_proj.weight"};
  std::mt19937 rng(1);
  int checked = 0;
  for (const std::string& n : names) {
    Param& p = m->params().get(n);
    for (int rep = 0; rep < 4; ++rep) {
      const int64_t i = static_cast<int64_t>(rng() % static_cast<uint32_t>(p.value.numel()));
      float* v = p.value.f32() + i;
      const float orig = *v;
      const float h = n.find("router") != std::string::npos ? 1e-3f : 1e-2f;  // routers: stay off top-k ties
      *v = orig + h;
      const double up = m->forward_loss(b, fo);
      *v = orig - h;
      const double dn = m->forward_loss(b, fo);
      *v = orig;
      const double num = (up - dn) / (2.0 * h), ana = p.grad.f32()[i];
      EXPECT_NEAR(ana, num, 2e-3 + 2e-2 * std::abs(num)) << n << "[" << i << "]";
      ++checked;
    }
  }
  EXPECT_EQ(checked, 40);
}

TEST(GptOssModel, LoraOnExpertsOrRouterIsAUsageError) {
  auto m = random_model(tiny_config(), 14);
  LoraSpec spec;
  spec.target_modules = {"experts"};
  EXPECT_THROW(m->enable_lora(spec, 1, nullptr), UsageError);
  auto m2 = random_model(tiny_config(), 14);
  LoraSpec att;
  att.target_modules = {"q_proj", "v_proj"};
  EXPECT_NO_THROW(m2->enable_lora(att, 1, nullptr));
}

// The engine against tools/gpt_oss_torch_reference.py, an INDEPENDENT from-scratch torch implementation (not
// HF): logits of two rows (one padded), the summed shifted CE, the aux loss and every parameter's gradient of
// CE + coef * aux. Its output is tests/fixtures/gpt_oss_torch_ref (README there).
TEST(GptOssModel, MatchesIndependentTorchReference) {
  const fs::path dir = fs::path(AM_SOURCE_DIR) / "tests/fixtures/gpt_oss_torch_ref";
  if (!fs::exists(dir / "reference.safetensors")) GTEST_SKIP() << "no " << dir << " (see tools/gpt_oss_torch_reference.py)";
  auto ref = io::SafeTensors::open((dir / "reference.safetensors").string());
  auto m = load(dir / "model");
  std::vector<Sample> s(2);
  for (int r = 0; r < 2; ++r) {
    Tensor ids = ref.get("ids" + std::to_string(r)), lab = ref.get("labels" + std::to_string(r));
    for (int64_t t = 0; t < ids.numel(); ++t) {
      s[r].input_ids.push_back(static_cast<int32_t>(ids.data<int64_t>()[t]));
      s[r].labels.push_back(static_cast<int32_t>(lab.data<int64_t>()[t]));
    }
  }
  Batch b = collate({&s[0], &s[1]});
  const int64_t V = m->config().vocab_size, T = b.T;
  Tensor logits = m->forward_logits(b);
  double worst = 0, scale = 0;
  for (int r = 0; r < 2; ++r) {
    Tensor want = ref.get("logits" + std::to_string(r));
    for (int64_t t = 0; t < want.dim(0); ++t)
      for (int64_t v = 0; v < V; ++v) {
        const double w = want.f32()[t * V + v], g = logits.f32()[(r * T + t) * V + v];
        worst = std::max(worst, std::abs(w - g));
        scale = std::max(scale, std::abs(w));
      }
  }
  std::printf("[torch ref] logits: max abs diff %.3e (max |logit| %.3f)\n", worst, scale);
  EXPECT_LT(worst, 1e-4 * std::max(1.0, scale));
  m->params().zero_grad();
  ForwardOptions fo;
  const double ce = m->forward_backward(b, 1.0f, fo);
  const double aux_term = m->take_aux_loss();
  const double want_ce = ref.get("ce_sum").f32()[0], want_aux = ref.get("aux").f32()[0];
  std::printf("[torch ref] ce_sum %.8f vs %.8f (rel %.2e); coef*aux %.8f vs %.8f\n", ce, want_ce,
              std::abs(ce - want_ce) / want_ce, aux_term, 0.01 * want_aux);
  EXPECT_LT(std::abs(ce - want_ce) / want_ce, 1e-5);
  EXPECT_NEAR(aux_term, 0.01 * want_aux, 1e-6);
  double worst_rel = 0;
  std::string worst_name;
  for (Param& p : m->params().all()) {
    Tensor w = ref.get("grad." + p.name).to(DType::F32);
    Tensor g = p.grad;
    if (p.source().front().transposed) g = copy_slice_out(p.source().front(), p.grad.f32());  // HF's layout
    ASSERT_EQ(g.shape(), w.shape()) << p.name;
    double d = 0, sc = 0;
    for (int64_t i = 0; i < w.numel(); ++i) {
      d = std::max(d, std::abs(double(g.f32()[i]) - w.f32()[i]));
      sc = std::max(sc, std::abs(double(w.f32()[i])));
    }
    EXPECT_LT(d, 1e-6 + 1e-4 * sc) << p.name << " max |grad| " << sc;
    if (d / std::max(sc, 1e-12) > worst_rel) {
      worst_rel = d / std::max(sc, 1e-12);
      worst_name = p.name;
    }
  }
  std::printf("[torch ref] gradients: worst max-abs-diff / max|grad| %.3e (%s)\n", worst_rel, worst_name.c_str());
}

// Inference with a KV cache (automodel generate): prefill 5 tokens, then decode one at a time past the
// sliding window (8) of layer 0; every step's logits equal the full forward's row (sinks in both kernels).
TEST(GptOssModel, CachedDecodeMatchesFullForward) {
  const fs::path dir = fs::path(AM_SOURCE_DIR) / "tests/fixtures/gpt_oss_torch_ref/model";
  const io::ModelConfig cfg = io::load_model_config((dir / "config.json").string());
  auto owner = build_model(cfg);
  load_hf_weights(*owner, dir.string());
  auto* lm = dynamic_cast<DecoderLM*>(owner.get());
  ASSERT_NE(lm, nullptr);
  lm->to_device_inference(ExecContext::cpu());
  const int64_t V = cfg.vocab_size, P = 5, total = 20;
  std::vector<int32_t> seq;
  for (int64_t i = 0; i < total; ++i) seq.push_back(static_cast<int32_t>(3 + (i * 37) % (V - 3)));
  auto full = [&](int64_t n) {
    Sample s;
    s.input_ids.assign(seq.begin(), seq.begin() + n);
    s.labels = s.input_ids;
    Batch b = collate({&s});
    return lm->forward_logits(b);
  };
  KvCache cache(cfg, lm->exec(), total);
  std::vector<int32_t> prompt(seq.begin(), seq.begin() + P);
  Tensor pre = lm->forward_incremental(prompt, cache, /*all_logits=*/true);
  Tensor ref = full(P);
  for (int64_t i = 0; i < P * V; ++i) EXPECT_NEAR(pre.f32()[i], ref.f32()[i], 5e-6) << "prefill " << i;
  for (int64_t n = P; n < total; ++n) {
    Tensor step = lm->forward_incremental({seq[static_cast<size_t>(n)]}, cache);
    Tensor f = full(n + 1);
    double d = 0;
    for (int64_t v = 0; v < V; ++v) d = std::max(d, std::abs(double(step.f32()[v]) - f.f32()[n * V + v]));
    EXPECT_LT(d, 5e-6) << "decode step at position " << n;
  }
}

// 4 AdamW steps (micro-batches of 2, padding, ignored prompt prefixes, the aux loss, clipping, weight decay)
// against the independent torch reference's training loop (NOT HF; tests/fixtures/gpt_oss_torch_ref):
// per-step loss and grad norm, and the final weights in the hub layout.
TEST(GptOssModel, FourStepsMatchIndependentTorchReference) {
  const fs::path dir = fs::path(AM_SOURCE_DIR) / "tests/fixtures/gpt_oss_torch_ref";
  Recipe r = Recipe::load((dir / "recipe.yaml").string(), {});
  Trainer t(r, TrainerOptions{.quiet = true});
  auto steps = t.train();
  std::ifstream ef(dir / "expected_train.json");
  const json exp = json::parse(ef)["steps"];
  ASSERT_EQ(steps.size(), exp.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    const double el = exp[i]["loss"], eg = exp[i]["grad_norm"];
    EXPECT_EQ(steps[i].num_label_tokens, exp[i]["num_label_tokens"].get<int64_t>()) << "step " << i + 1;
    std::printf("[torch ref] step %zu: loss %.8f vs %.8f (rel %.1e), grad_norm %.8f vs %.8f (rel %.1e)\n", i + 1,
                steps[i].loss, el, std::abs(steps[i].loss - el) / el, steps[i].grad_norm, eg,
                std::abs(steps[i].grad_norm - eg) / eg);
    EXPECT_LT(std::abs(steps[i].loss - el) / el, 1e-5) << "step " << i + 1;
    EXPECT_LT(std::abs(steps[i].grad_norm - eg) / eg, 1e-4) << "step " << i + 1;
  }
  auto want = io::SafeTensors::open((dir / "expected_final.safetensors").string());
  double worst = 0;
  for (Param& p : t.model().params().all()) {
    Tensor w = want.get(p.name);
    Tensor g = copy_slice_out(p.source().front(), ExecContext::download(p.value).f32());
    ASSERT_EQ(g.shape(), w.shape()) << p.name;
    for (int64_t i = 0; i < w.numel(); ++i) worst = std::max(worst, std::abs(double(g.f32()[i]) - w.f32()[i]));
  }
  std::printf("[torch ref] final weights: max abs diff %.3e\n", worst);
  EXPECT_LT(worst, 1e-5);
}
