// LoRA training beyond the HF PEFT goldens (test_lora_golden.cpp runs those): module selection as
// AutoModel/PEFT name it, gradients of A and B against finite differences (with and without dropout, pre and
// post), a frozen base (no gradients, unchanged), the adapted model equal to the merged one, adapters written
// and read back as PEFT's files, adapter/section disagreements refused, and exact resume with dropout.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <regex>

#include <nlohmann/json.hpp>

#include "config/recipe.h"
#include "core/error.h"
#include "data/dataset.h"
#include "io/lora_adapter.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "models/blocks/lora.h"
#include "models/hf_weights.h"
#include "models/lora.h"
#include "ops/nf4_ops.h"
#include "io/nf4.h"
#include "train/peft.h"
#include "train/trainer.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace am;

namespace {

fs::path golden(const std::string& c) { return fs::path(AM_SOURCE_DIR) / "tests/fixtures/golden" / c; }

fs::path fresh_dir(const std::string& name) {
  fs::path d = fs::path(AM_BINARY_DIR) / "test_out" / name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

std::unique_ptr<CausalLM> load(const std::string& c) {
  auto m = build_model(io::load_model_config((golden(c) / "model/config.json").string()));
  load_hf_weights(*m, (golden(c) / "model").string());
  return m;
}

LoraSpec spec_all(int64_t r = 4, double alpha = 8) {
  LoraSpec s;
  s.target_modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  s.dim = r;
  s.alpha = alpha;
  s.lora_A_init = "kaiming";
  return s;
}

// B is zero after init (the adapted model starts as the base): give it values so gradients reach A.
void randomize_b(CausalLM& m, uint64_t seed, float std_dev = 0.05f) {
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::normal_distribution<float> n(0.f, std_dev);
  for (const LoraAdapter* a : m.lora_adapters())
    for (int64_t i = 0; i < a->B->value.numel(); ++i) a->B->value.f32()[i] = n(rng);
}

Batch batch_of(int64_t vocab) {
  std::vector<Sample> s(2);
  for (int i = 0; i < 11; ++i) s[0].input_ids.push_back(1 + (i * 7 + 3) % static_cast<int>(vocab - 1));
  for (int i = 0; i < 6; ++i) s[1].input_ids.push_back(1 + (i * 13 + 5) % static_cast<int>(vocab - 1));
  for (auto& x : s) x.labels = x.input_ids;
  s[1].labels[0] = s[1].labels[1] = -100;
  return upload_batch(collate({&s[0], &s[1]}), ExecContext::cpu());
}

double loss_of(CausalLM& m, const Batch& b, const ForwardOptions& o, bool training) {
  if (!training) return m.forward_loss(b, o);
  m.params().zero_grad();
  return m.forward_backward(b, 0.f, o);
}

// d(sum CE)/d theta for a few elements of every adapter's A and B against central differences.
void grad_check(const std::string& c, float dropout, bool post) {
  auto m = load(c);
  LoraSpec s = spec_all();
  s.dropout = dropout;
  s.dropout_post = post;
  m->enable_lora(s, 11, nullptr);
  randomize_b(*m, 5);
  const Batch b = batch_of(m->config().vocab_size);
  ForwardOptions o;
  o.dropout_seed = 1234;
  // MoE: a finite step can flip a top-k choice (a jump in the loss); fixed round-robin routing keeps the
  // function smooth while the adapted attention / dense layers are checked.
  o.fake_balanced_gate = m->config().is_moe();
  const bool training = dropout > 0.f;  // dropout is on only in forward_backward
  m->params().zero_grad();
  m->forward_backward(b, 1.f, o);
  for (const Param& p : m->params().all()) {
    if (p.trainable) continue;
    EXPECT_FALSE(p.grad.defined()) << p.name << ": a frozen weight has a gradient";
  }
  std::vector<std::pair<Param*, Tensor>> grads;
  for (const LoraAdapter* a : m->lora_adapters())
    for (Param* p : {a->A, a->B}) grads.emplace_back(p, p->grad.clone());
  int checked = 0;
  double worst = 0;
  for (size_t k = 0; k < grads.size(); k += 3) {  // every third tensor, 2 elements each
    Param* p = grads[k].first;
    for (int64_t i : {int64_t(0), p->value.numel() / 2 + 1}) {
      float& v = p->value.f32()[i];
      const float v0 = v, h = 1e-2f;
      v = v0 + h;
      const double lp = loss_of(*m, b, o, training);
      v = v0 - h;
      const double lm = loss_of(*m, b, o, training);
      v = v0;
      const double fd = (lp - lm) / (2.0 * h), an = grads[k].second.f32()[i];
      const double err = std::abs(fd - an) / std::max(0.05, std::abs(fd));
      worst = std::max(worst, err);
      EXPECT_LT(err, 2e-2) << c << " " << p->name << "[" << i << "]: analytic " << an << " vs fd " << fd;
      ++checked;
    }
  }
  EXPECT_GT(checked, 8);
  ::testing::Test::RecordProperty("worst_rel_err_" + c, std::to_string(worst));
}

}  // namespace

TEST(LoraSelect, PatternsAsAutoModelAndPeftName) {
  EXPECT_TRUE(lora_pattern_matches("*_proj", "model.layers.0.self_attn.q_proj"));
  EXPECT_TRUE(lora_pattern_matches("*.q_proj", "model.layers.3.self_attn.q_proj"));
  EXPECT_FALSE(lora_pattern_matches("*.q_proj", "model.layers.3.self_attn.k_proj"));
  EXPECT_TRUE(lora_pattern_matches("q_proj", "model.layers.3.self_attn.q_proj"));   // PEFT's list rule
  EXPECT_FALSE(lora_pattern_matches("proj", "model.layers.3.self_attn.q_proj"));    // whole components only
  EXPECT_TRUE(lora_pattern_matches("*.layers.0.*", "model.layers.0.mlp.up_proj"));
  EXPECT_FALSE(lora_pattern_matches("*.layers.0.*", "model.layers.10.mlp.up_proj"));
  EXPECT_TRUE(lora_pattern_matches("model.layers.1.mlp.down_proj", "model.layers.1.mlp.down_proj"));
  EXPECT_FALSE(lora_pattern_matches("*_proj", "model.layers.0.mlp.experts"));
  EXPECT_FALSE(lora_pattern_matches("*_proj", "lm_head"));
}

TEST(LoraSelect, ModulesOfEachFamilyAndRefusals) {
  {
    auto m = load("llama");
    LoraSpec s;  // no targets: AutoModel's default "*_proj"
    auto ad = m->enable_lora(s, 1, nullptr);
    EXPECT_EQ(ad.size(), 14u);  // 2 layers x (q, k, v, o, gate, up, down)
  }
  {
    // HF PEFT on transformers 5: gate/up/down_proj name the experts (fused parameters, one pair each per expert;
    // gate_up at rank 2r), and no Linear of those names is adapted (layer 1's dense MLP).
    auto m = load("qwen3_moe");
    std::vector<std::string> w;
    auto ad = m->enable_lora(spec_all(), 1, &w);
    int linear = 0, grouped = 0;
    for (const LoraAdapter* a : ad) {
      EXPECT_EQ(a->module.find("layers.1.mlp"), std::string::npos) << a->module;
      if (!a->grouped) { ++linear; continue; }
      ++grouped;
      EXPECT_EQ(a->rank, a->param == "gate_up_proj" ? 8 : 4) << a->A->name;
      EXPECT_FLOAT_EQ(a->scale, 2.f);
    }
    EXPECT_EQ(linear, 12);   // q, k, v, o of 3 layers
    EXPECT_EQ(grouped, 4);   // gate_up + down of the 2 sparse layers
    EXPECT_TRUE(m->params().has("base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"));  // PEFT's nesting
    EXPECT_TRUE(m->params().has("base_model.model.model.layers.0.mlp.experts.lora_B.weight"));
    ASSERT_EQ(w.size(), 1u);
    EXPECT_NE(w[0].find("model.layers.1.mlp"), std::string::npos) << w[0];
  }
  {
    auto m = load("qwen3_moe");  // AutoModel's name for the grouped experts: both parameters at rank r
    LoraSpec s;
    s.target_modules = {"*.experts"};
    auto ad = m->enable_lora(s, 1, nullptr);
    ASSERT_EQ(ad.size(), 4u);
    for (const LoraAdapter* a : ad) EXPECT_EQ(a->rank, 8);  // AutoModel's default dim
  }
  {
    auto m = load("qwen3_moe");  // gate without up cannot be expressed on the fused gate_up_proj (PEFT refuses too)
    LoraSpec s;
    s.target_modules = {"gate_proj"};
    EXPECT_THROW(m->enable_lora(s, 1, nullptr), UsageError);
  }
  {
    auto m = load("qwen2_moe");  // experts adapted; the shared expert's projections are not (as PEFT)
    auto ad = m->enable_lora(spec_all(), 1, nullptr);
    bool shared = false, experts = false;
    for (const LoraAdapter* a : ad) {
      shared = shared || a->module.find("shared_expert") != std::string::npos;
      experts = experts || a->grouped;
    }
    EXPECT_FALSE(shared);
    EXPECT_TRUE(experts);
  }
  {
    auto m = load("llama");
    LoraSpec s;
    s.match_all_linear = true;  // lm_head is left out with a warning
    std::vector<std::string> w;
    auto ad = m->enable_lora(s, 1, &w);
    EXPECT_EQ(ad.size(), 14u);
    ASSERT_EQ(w.size(), 1u);
    EXPECT_NE(w[0].find("lm_head"), std::string::npos);
  }
  {
    auto m = load("llama");
    LoraSpec s;
    s.target_modules = {"*.nothing_here"};
    EXPECT_THROW(m->enable_lora(s, 1, nullptr), UsageError);
    LoraSpec t;
    t.target_modules = {"*_proj"};
    t.exclude_modules = {"*.q_proj"};
    auto m2 = load("llama");
    EXPECT_THROW(m2->enable_lora(t, 1, nullptr), UsageError);
  }
  {
    auto m = load("llama");
    LoraSpec s;
    s.exclude_modules = {"*.q_proj", "*.down_proj"};
    auto ad = m->enable_lora(s, 1, nullptr);
    EXPECT_EQ(ad.size(), 10u);
  }
}

TEST(LoraGrad, MatchesFiniteDifferencesLlama) { grad_check("llama", 0.f, false); }
TEST(LoraGrad, MatchesFiniteDifferencesQwen3Moe) { grad_check("qwen3_moe", 0.f, false); }
TEST(LoraGrad, MatchesFiniteDifferencesDropoutPre) { grad_check("qwen3", 0.3f, false); }
TEST(LoraGrad, MatchesFiniteDifferencesDropoutPost) { grad_check("qwen2", 0.3f, true); }

TEST(LoraModel, InitIsTheBaseAndAdaptedEqualsMerged) {
  auto base = load("qwen3");
  auto m = load("qwen3");
  m->enable_lora(spec_all(4, 8), 3, nullptr);
  const Batch b = batch_of(m->config().vocab_size);
  const Tensor l0 = base->forward_logits(b), l1 = m->forward_logits(b);
  for (int64_t i = 0; i < l0.numel(); ++i) ASSERT_EQ(l0.f32()[i], l1.f32()[i]) << "B = 0 must leave the base";
  randomize_b(*m, 9, 0.2f);
  // Merge the adapters into the plain model: W' = W + scale * B @ A (io/lora_adapter.h, PEFT's rule).
  for (const LoraAdapter* a : m->lora_adapters()) {
    io::LoraWeights w;
    w.A = a->A->value;
    w.B = a->B->value;
    w.scale = 2.0;
    Param& p = base->params().get(a->module + ".weight");
    Tensor merged = io::merge_lora_weight(p.value, w, DType::F32);
    p.value.copy_from(merged);
  }
  const Tensor lm = base->forward_logits(b), la = m->forward_logits(b);
  double worst = 0, scale = 0;
  for (int64_t i = 0; i < lm.numel(); ++i) {
    worst = std::max(worst, double(std::abs(lm.f32()[i] - la.f32()[i])));
    scale = std::max(scale, double(std::abs(lm.f32()[i])));
  }
  EXPECT_LT(worst, 1e-5 * std::max(1.0, scale));
}

TEST(LoraAdapterFiles, WrittenAsPeftAndReadBack) {
  const fs::path out = fresh_dir("lora_adapter_rt");
  auto m = load("llama");
  LoraSpec s = spec_all(4, 8);
  m->enable_lora(s, 3, nullptr);
  randomize_b(*m, 2);
  write_lora_adapter(out.string(), s, m->lora_adapters(), lora_tensors(*m), "base");
  // What PEFT reads: the config keys and the tensor names.
  std::ifstream f(out / "adapter_config.json");
  const json cfg = json::parse(f);
  EXPECT_EQ(cfg["peft_type"], "LORA");
  EXPECT_EQ(cfg["task_type"], "CAUSAL_LM");
  EXPECT_EQ(cfg["r"], 4);
  EXPECT_EQ(cfg["lora_alpha"], 8);
  EXPECT_EQ(cfg["target_modules"].size(), 14u);
  auto st = io::SafeTensors::open((out / "adapter_model.safetensors").string());
  EXPECT_TRUE(st.has("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
  EXPECT_EQ(st.metadata().at("format"), "pt");
  // Read back into a fresh model: same values.
  auto m2 = load("llama");
  m2->enable_lora(s, 99, nullptr);
  load_lora_adapter(*m2, s, out.string(), "peft.adapter_path");
  auto a1 = m->lora_adapters(), a2 = m2->lora_adapters();
  ASSERT_EQ(a1.size(), a2.size());
  for (size_t i = 0; i < a1.size(); ++i)
    for (int64_t j = 0; j < a1[i]->B->value.numel(); ++j) ASSERT_EQ(a1[i]->B->value.f32()[j], a2[i]->B->value.f32()[j]);
  // Disagreements stop the run (exit 2): another rank, another alpha, other targets.
  {
    auto m3 = load("llama");
    LoraSpec r8 = spec_all(8, 8);
    m3->enable_lora(r8, 1, nullptr);
    EXPECT_THROW(load_lora_adapter(*m3, r8, out.string(), "peft.adapter_path"), UsageError);
  }
  {
    auto m3 = load("llama");
    LoraSpec a32 = spec_all(4, 32);
    m3->enable_lora(a32, 1, nullptr);
    EXPECT_THROW(load_lora_adapter(*m3, a32, out.string(), "peft.adapter_path"), UsageError);
  }
  {
    auto m3 = load("llama");
    LoraSpec q;
    q.target_modules = {"*.q_proj"};
    q.dim = 4;
    q.alpha = 8;
    m3->enable_lora(q, 1, nullptr);
    EXPECT_THROW(load_lora_adapter(*m3, q, out.string(), "peft.adapter_path"), UsageError);
  }
}

namespace {

Recipe lora_recipe(const fs::path& ck, int64_t max_steps, bool restore = false) {
  const fs::path g = golden("llama");
  std::string y = "seed: 7\ndevice: cpu\nmodel: {pretrained_model_name_or_path: " + (g / "model").string() +
                  "}\nstep_scheduler: {global_batch_size: 4, local_batch_size: 2, max_steps: " + std::to_string(max_steps) +
                  ", ckpt_every_steps: 2}\ndataset: {_target_: tokenized_jsonl, path_or_dataset: " + (g / "data.jsonl").string() +
                  "}\noptimizer: {lr: 1.0e-2, weight_decay: 0.1}\nclip_grad_norm: {max_norm: 1.0}\n"
                  "checkpoint: {checkpoint_dir: " + ck.string() + ", save_consolidated: final" +
                  (restore ? ", restore_from: LATEST" : "") + "}\n"
                  "peft: {target_modules: '*_proj', dim: 4, alpha: 16, dropout: 0.2}\n";
  return Recipe::from_string(y, "lora.yaml");
}

}  // namespace

TEST(LoraTrainer, BaseFrozenAdapterWrittenAndResumeExactWithDropout) {
  const fs::path a = fresh_dir("lora_tr_a"), b = fresh_dir("lora_tr_b");
  std::vector<StepStats> straight;
  {
    Trainer t(lora_recipe(a, 4), TrainerOptions{.quiet = true});
    straight = t.train();
  }
  ASSERT_EQ(straight.size(), 4u);
  for (const auto& s : straight) EXPECT_GT(s.grad_norm, 0.0);
  // model/: the PEFT adapter; model/consolidated: the merged model in the base's names and dtype.
  const fs::path last = a / "LATEST" / "model";
  ASSERT_TRUE(fs::exists(last / "adapter_config.json"));
  ASSERT_TRUE(fs::exists(last / "adapter_model.safetensors"));
  auto base = io::SafeTensors::open((golden("llama") / "model").string());
  auto cons = io::SafeTensors::open((last / "consolidated").string());
  EXPECT_EQ(base.names(), cons.names());
  auto same = [&](const std::string& n) {
    Tensor x = base.get(n), y = cons.get(n);
    return x.nbytes() == y.nbytes() && std::memcmp(x.raw(), y.raw(), x.nbytes()) == 0;
  };
  EXPECT_TRUE(same("model.norm.weight"));  // not adapted: the base's bytes
  EXPECT_TRUE(same("model.embed_tokens.weight"));
  EXPECT_FALSE(same("model.layers.0.mlp.up_proj.weight"));  // adapted: merged
  // The checkpoint's state holds only the trained weights (the base is the source folder's).
  auto state = io::SafeTensors::open((a / "LATEST" / "state").string());
  for (const auto& n : state.names()) EXPECT_EQ(n.find("base_model.model."), n.find('/') + 1) << n;
  // Resume: 2 steps, then 2 more from the step-2 checkpoint: the same losses and grad norms, dropout included.
  {
    Trainer t1(lora_recipe(b, 2), TrainerOptions{.quiet = true});
    t1.train();
  }
  Trainer t2(lora_recipe(b, 4, true), TrainerOptions{.quiet = true});
  auto rest = t2.train();
  ASSERT_EQ(rest.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(rest[i].loss, straight[i + 2].loss) << "step " << i + 3;
    EXPECT_EQ(rest[i].grad_norm, straight[i + 2].grad_norm) << "step " << i + 3;
  }
  auto fa = io::SafeTensors::open((a / "LATEST/model/adapter_model.safetensors").string());
  auto fb = io::SafeTensors::open((b / "LATEST/model/adapter_model.safetensors").string());
  for (const auto& n : fa.names()) {
    Tensor x = fa.get(n), y = fb.get(n);
    ASSERT_EQ(std::memcmp(x.raw(), y.raw(), x.nbytes()), 0) << n;
  }
}

TEST(Qlora, EqualsLoraOnTheDequantisedBase) {
  // QLoRA's model is LoRA over the base as the 4-bit codes represent it: quantise the projections (NF4,
  // double quant), and separately replace the same weights by their dequantised values: same logits and
  // the same LoRA gradients, bit for bit (the CPU dequantises to fp32 and runs the same GEMMs).
  auto q = load("qwen3"), ref = load("qwen3");
  q->enable_lora(spec_all(), 5, nullptr);
  ref->enable_lora(spec_all(), 5, nullptr);
  randomize_b(*q, 3);
  randomize_b(*ref, 3);
  int marked = 0;
  for (Param& p : q->params().all())
    if (p.lora && !p.lora->grouped) {
      p.quantize_4bit = true;
      ++marked;
    }
  ASSERT_GT(marked, 0);
  q->params().quantize_marked();
  for (Param& p : q->params().all()) {
    if (!p.quantize_4bit) continue;
    ASSERT_TRUE(p.nf4) << p.name;
    EXPECT_FALSE(p.value.defined()) << p.name << ": the fp32 copy must be gone";
    Param& r = ref->params().get(p.name);
    Tensor deq = ops::nf4_dequantize(*p.nf4, DType::F32);
    // NF4 is lossy but close: every element within half a code step of its block's absmax.
    double worst = 0, amax = 0;
    for (int64_t i = 0; i < deq.numel(); ++i) {
      worst = std::max(worst, double(std::abs(deq.f32()[i] - r.value.f32()[i])));
      amax = std::max(amax, double(std::abs(r.value.f32()[i])));
    }
    EXPECT_LT(worst, 0.15 * amax) << p.name;
    r.value.copy_from(deq);
  }
  const Batch b = batch_of(q->config().vocab_size);
  const Tensor lq = q->forward_logits(b), lr = ref->forward_logits(b);
  for (int64_t i = 0; i < lq.numel(); ++i) ASSERT_EQ(lq.f32()[i], lr.f32()[i]) << i;
  q->params().zero_grad();
  ref->params().zero_grad();
  EXPECT_EQ(q->forward_backward(b, 1.f), ref->forward_backward(b, 1.f));
  for (const LoraAdapter* a : q->lora_adapters()) {
    const Param& ra = ref->params().get(a->A->name);
    for (int64_t i = 0; i < a->A->grad.numel(); ++i) ASSERT_EQ(a->A->grad.f32()[i], ra.grad.f32()[i]) << a->A->name;
  }
}

TEST(Qlora, ReadsABitsandbytesCheckpointLikeQuantisingAtLoad) {
  // A base saved 4-bit in bitsandbytes' layout (W, W.absmax, W.quant_map, W.nested_*, W.quant_state.*) trains
  // exactly as the same base quantised at load time (same codes, same dequantisation).
  const fs::path g = golden("qwen3"), out = fresh_dir("qlora_bnb_ckpt");
  const fs::path base = out / "bnb_base";
  fs::create_directories(base);
  {
    auto m = load("qwen3");
    std::vector<io::OwnedRawTensor> all;
    const std::regex lin(R"(model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight)");
    for (const Param& p : m->params().all()) {
      if (std::regex_match(p.name, lin)) {
        ops::Nf4QuantizeOptions o;
        o.double_quant = true;
        for (auto& t : io::bnb_4bit_state_dict(ops::nf4_quantize(p.value, o), p.name)) all.push_back(std::move(t));
        continue;
      }
      io::OwnedRawTensor t{p.name, "F32", p.shape, {}};
      t.bytes.assign(reinterpret_cast<const uint8_t*>(p.value.f32()),
                     reinterpret_cast<const uint8_t*>(p.value.f32() + p.value.numel()));
      all.push_back(std::move(t));
    }
    io::save_raw_safetensors((base / "model.safetensors").string(), all);
    std::ifstream cf(g / "model/config.json");
    json cfg = json::parse(cf);
    cfg["quantization_config"] = {{"quant_method", "bitsandbytes"}, {"load_in_4bit", true},
                                  {"bnb_4bit_quant_type", "nf4"}, {"bnb_4bit_use_double_quant", true}};
    std::ofstream(base / "config.json") << cfg.dump(2);
  }
  const fs::path lg = fs::path(AM_SOURCE_DIR) / "tests/fixtures/lora_golden/qwen3/recipe.yaml";
  auto run = [&](const std::vector<std::string>& extra, const std::string& ck) {
    std::vector<std::string> o = extra;
    o.push_back("checkpoint.checkpoint_dir=" + (out / ck).string());
    Trainer t(Recipe::load(lg.string(), o), TrainerOptions{.quiet = true});
    return t.train();
  };
  const auto a = run({"quantization.load_in_4bit=true"}, "a");
  const auto b = run({"model.pretrained_model_name_or_path=" + base.string()}, "b");
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].loss, b[i].loss) << "step " << i + 1;
    EXPECT_EQ(a[i].grad_norm, b[i].grad_norm) << "step " << i + 1;
  }
  // The merged model of a 4-bit base goes into the dequantised weights, without the quantization_config.
  std::ifstream cc(out / "b/LATEST/model/consolidated/config.json");
  EXPECT_FALSE(json::parse(cc).contains("quantization_config"));
  auto cons = io::SafeTensors::open((out / "b/LATEST/model/consolidated").string());
  EXPECT_TRUE(cons.has("model.layers.0.self_attn.q_proj.weight"));
  // Without a peft section such a checkpoint is refused (exit 2).
  EXPECT_THROW(Trainer(Recipe::from_string("device: cpu\nmodel: {pretrained_model_name_or_path: " + base.string() +
                                           "}\ndataset: {_target_: mock, seq_len: 8, num_samples: 4}\n", "x.yaml"),
                       TrainerOptions{.quiet = true}),
               UsageError);
}

// MFU's model FLOPs under LoRA (Trainer::flops_per_token): the frozen base runs forward + input gradient
// (4 per weight, no weight gradient), the adapters all three (6); attention is unchanged.
TEST(LoraFlops, FrozenBaseCountsFourPerWeightAdaptersSix) {
  const std::string recipe = (fs::path(AM_SOURCE_DIR) / "tests/fixtures/golden/llama/recipe.yaml").string();
  Recipe full_r = Recipe::load(recipe, {"checkpoint.enabled=false"});
  Recipe lora_r = Recipe::load(recipe, {"checkpoint.enabled=false", "peft.target_modules=[q_proj]", "peft.dim=4", "peft.alpha=8"});
  Trainer full(full_r, {.quiet = true}), lora(lora_r, {.quiet = true});
  // full: 6P + a * seq
  const double f0 = full.flops_per_token(0), f10 = full.flops_per_token(10);
  const double P = f0 / 6.0, a = (f10 - f0) / 10.0;
  // tiny llama: 2 layers, H 64, q_proj [4 * 16, 64]: A [4, 64] + B [64, 4] per layer
  const double L = 2.0 * (4 * 64 + 64 * 4);
  EXPECT_DOUBLE_EQ(lora.flops_per_token(0), 4.0 * P + 6.0 * L);
  EXPECT_DOUBLE_EQ(lora.flops_per_token(10) - lora.flops_per_token(0), 10.0 * a);
}
