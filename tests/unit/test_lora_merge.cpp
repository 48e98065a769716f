// merge-lora: tiny base folders and PEFT adapters built here with our safetensors writer; every merged tensor
// is checked bit for bit against a reference computed independently in this file (a plain triple loop in
// double, k ascending, then the fp32 and base-dtype roundings of PEFT's merge rule, io/lora_adapter.h).
// The summation order (double, k = 0..r-1) is the one documented in lora_adapter.h, so fp32 results are
// compared for exact equality; bf16 results are the bf16 rounding of the same fp32 values.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/tensor.h"
#include "io/lora_adapter.h"
#include "io/lora_merge.h"
#include "io/safetensors.h"

using namespace am;
namespace fs = std::filesystem;
using nlohmann::json;
using ojson = nlohmann::ordered_json;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path = fs::temp_directory_path() /
           ("am_lora_" + std::to_string(::getpid()) + "_" + info->test_suite_name() + "_" + info->name());
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string operator/(const std::string& f) const { return (path / f).string(); }
};

std::string slurp(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}
void spit(const std::string& p, const std::string& s) {
  fs::create_directories(fs::path(p).parent_path());
  std::ofstream(p, std::ios::binary | std::ios::trunc) << s;
}

// Deterministic values in [-1, 1) (seeded per tensor), stored in `dt`.
Tensor rnd(const Shape& shape, DType dt, uint32_t seed, float amp = 1.f) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> u(-amp, amp);
  Tensor t = Tensor::empty(shape, DType::F32);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = u(g);
  return dt == DType::F32 ? t : t.to(dt);
}
std::vector<float> vals(const Tensor& t) {
  Tensor f = t.dtype() == DType::F32 ? t : t.to(DType::F32);
  return std::vector<float>(f.f32(), f.f32() + f.numel());
}
float rnd_to(float v, DType d) {
  if (d == DType::BF16) return bf16_to_f32(f32_to_bf16(v));
  if (d == DType::F16) return f16_to_f32(f32_to_f16(v));
  return v;
}

enum class Rule { Linear, Embedding };

// The reference: W' = D(W + fp32(fp32(B@A) * fp32(scale))) (Linear) or D(W + D(delta)) (Embedding), with
// (B@A)[o][i] = sum_k B[o][k] * A[k][i] in double, k ascending. W is [out, in], or [in, out] when
// `transposed` (fan_in_fan_out / embedding). Returns the values of the merged D tensor.
std::vector<float> reference(const Tensor& W, const Tensor& A, const Tensor& B, double scale, bool transposed,
                             Rule rule, DType D) {
  const int64_t r = A.dim(0), in = A.dim(1), out = B.dim(0);
  std::vector<float> w = vals(W), a = vals(A), b = vals(B), res(w.size());
  const float s32 = static_cast<float>(scale);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) {
      double acc = 0.0;
      for (int64_t k = 0; k < r; ++k) acc += static_cast<double>(b[o * r + k]) * static_cast<double>(a[k * in + i]);
      float ba = static_cast<float>(acc);
      float d = ba * s32;
      if (rule == Rule::Embedding) d = rnd_to(d, D);
      const size_t idx = transposed ? static_cast<size_t>(i * out + o) : static_cast<size_t>(o * in + i);
      float sum = w[idx] + d;
      res[idx] = rnd_to(sum, D);
    }
  return res;
}

// Compares a merged tensor bit for bit with reference values.
void expect_equal(const Tensor& got, const std::vector<float>& want, const std::string& what) {
  std::vector<float> g = vals(got);
  ASSERT_EQ(g.size(), want.size()) << what;
  size_t bad = 0;
  for (size_t i = 0; i < g.size(); ++i)
    if (std::memcmp(&g[i], &want[i], 4) != 0 && bad++ < 3)
      ADD_FAILURE() << what << "[" << i << "]: got " << g[i] << " want " << want[i];
  EXPECT_EQ(bad, 0u) << what;
}

using Named = std::vector<std::pair<std::string, Tensor>>;

// A tiny llama-like base: embeddings, 2 layers of attention + MLP (+ two per-expert Linears), norm, lm_head.
Named llama_base(DType dt, bool q_bias = false) {
  Named t;
  uint32_t seed = 1;
  auto add = [&](const std::string& n, Shape s) { t.emplace_back(n, rnd(s, dt, seed++)); };
  add("model.embed_tokens.weight", {40, 16});
  for (int l = 0; l < 2; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {16});
    add(p + "self_attn.q_proj.weight", {16, 16});
    if (q_bias) add(p + "self_attn.q_proj.bias", {16});
    add(p + "self_attn.k_proj.weight", {8, 16});
    add(p + "self_attn.v_proj.weight", {8, 16});
    add(p + "self_attn.o_proj.weight", {16, 16});
    add(p + "post_attention_layernorm.weight", {16});
    add(p + "mlp.gate_proj.weight", {24, 16});
    add(p + "mlp.up_proj.weight", {24, 16});
    add(p + "mlp.down_proj.weight", {16, 24});
    add(p + "mlp.experts.1.w1.weight", {12, 16});
  }
  add("model.norm.weight", {16});
  add("lm_head.weight", {40, 16});
  return t;
}

const Tensor& find(const Named& n, const std::string& name) {
  for (const auto& [k, v] : n)
    if (k == name) return v;
  throw std::runtime_error("test: no tensor " + name);
}

void write_base(const std::string& dir, const Named& tensors, size_t max_shard_bytes = size_t(5) << 30) {
  io::SaveOptions so;
  so.max_shard_bytes = max_shard_bytes;
  io::save_safetensors_dir(dir, tensors, so);
  spit(dir + "/config.json", "{\"model_type\": \"llama\", \"hidden_size\": 16}\n");
  spit(dir + "/generation_config.json", "{\"eos_token_id\": 2}\n");
  spit(dir + "/tokenizer.json", "{\"model\": {\"type\": \"BPE\"}}\n");
  spit(dir + "/tokenizer_config.json", "{}\n");
  spit(dir + "/pytorch_model.bin", "stale pickle weights");  // must not be copied
  spit(dir + "/original/consolidated.00.pth", "stale");      // nor subfolders
}

void write_adapter(const std::string& dir, const ojson& cfg, const Named& tensors) {
  fs::create_directories(dir);
  spit(dir + "/adapter_config.json", cfg.dump(2));
  io::save_safetensors_file(dir + "/adapter_model.safetensors", tensors);
}

ojson lora_config(int r, double alpha) {
  ojson c = ojson::object();
  c["peft_type"] = "LORA";
  c["task_type"] = "CAUSAL_LM";
  c["r"] = r;
  c["lora_alpha"] = alpha;
  c["target_modules"] = {"q_proj", "v_proj", "down_proj", "w1"};
  c["base_model_name_or_path"] = "base";
  return c;
}

std::string K(const std::string& module, const std::string& what) { return "base_model.model." + module + "." + what; }

Tensor read(const std::string& dir, const std::string& name) { return io::SafeTensors::open(dir).get(name).clone(); }

io::LoraMergeResult run(const TempDir& t, const std::string& out = "out") {
  return io::merge_lora({.base = t / "base", .adapter = t / "adapter", .out = t / out});
}

// Runs the merge expecting an am::Error; returns (exit code, message).
std::pair<int, std::string> fails(const TempDir& t, const std::string& out = "out") {
  try {
    run(t, out);
  } catch (const Error& e) {
    return {e.exit_code(), e.what()};
  }
  return {0, "no error"};
}

bool no_tmp_left(const TempDir& t) {
  for (const auto& e : fs::directory_iterator(t.path))
    if (e.path().filename().string().find(".tmp-") != std::string::npos) return false;
  return true;
}

}  // namespace

// fp32 base in one file: q_proj / v_proj / down_proj / per-expert w1 adapted (r=4, alpha=8 -> scale 2),
// checked exactly; every other tensor, the header and the side files byte-identical; weights in other
// formats and subfolders not copied.
TEST(LoraMerge, Fp32SingleFileExact) {
  TempDir t;
  Named base = llama_base(DType::F32);
  write_base(t / "base", base);
  Named ad;
  const std::vector<std::string> mods = {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
                                         "model.layers.0.mlp.down_proj", "model.layers.1.mlp.experts.1.w1"};
  uint32_t seed = 100;
  for (const auto& m : mods) {
    const Shape ws = find(base, m + ".weight").shape();
    ad.emplace_back(K(m, "lora_A.weight"), rnd({4, ws[1]}, DType::F32, seed++));
    ad.emplace_back(K(m, "lora_B.weight"), rnd({ws[0], 4}, DType::F32, seed++));
  }
  write_adapter(t / "adapter", lora_config(4, 8), ad);
  io::LoraMergeResult r = run(t);
  EXPECT_EQ(r.merged, 4u);
  EXPECT_EQ(r.tensors, base.size());

  for (size_t i = 0; i < mods.size(); ++i) {
    const Tensor& W = find(base, mods[i] + ".weight");
    auto want = reference(W, ad[2 * i].second, ad[2 * i + 1].second, 2.0, false, Rule::Linear, DType::F32);
    expect_equal(read(t / "out", mods[i] + ".weight"), want, mods[i]);
  }
  // Unchanged tensors and the header: the whole file equals the base outside the adapted tensors' bytes.
  std::string a = slurp(t / "base/model.safetensors"), b = slurp(t / "out/model.safetensors");
  ASSERT_EQ(a.size(), b.size());
  uint64_t hn = 0;
  for (int i = 7; i >= 0; --i) hn = (hn << 8) | static_cast<unsigned char>(a[i]);
  EXPECT_EQ(a.substr(0, 8 + hn), b.substr(0, 8 + hn));
  auto st = io::SafeTensors::open(t / "out");
  for (const auto& [name, w] : base) {
    bool adapted = false;
    for (const auto& m : mods) adapted |= name == m + ".weight";
    if (!adapted) {
      Tensor o = st.get(name);
      EXPECT_EQ(0, std::memcmp(o.raw(), w.raw(), w.nbytes())) << name;
    }
  }
  for (const char* f : {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"})
    EXPECT_EQ(slurp(t / ("base/" + std::string(f))), slurp(t / ("out/" + std::string(f)))) << f;
  EXPECT_FALSE(fs::exists(t / "out/pytorch_model.bin"));
  EXPECT_FALSE(fs::exists(t / "out/original"));
  EXPECT_TRUE(no_tmp_left(t));
}

// bf16 base split into shards with an index; adapter A in fp32, B in bf16 (read exactly, computed in fp32),
// keys in the ".lora_A.default.weight" form. Same shard files, index byte-identical, merged = bf16(fp32 ref).
TEST(LoraMerge, Bf16ShardedExact) {
  TempDir t;
  Named base = llama_base(DType::BF16);
  write_base(t / "base", base, 2000);
  ASSERT_TRUE(fs::exists(t / "base/model.safetensors.index.json"));
  Named ad;
  const std::string m = "model.layers.1.self_attn.q_proj", m2 = "model.layers.0.mlp.down_proj";
  ad.emplace_back(K(m, "lora_A.default.weight"), rnd({8, 16}, DType::F32, 7, 0.5f));
  ad.emplace_back(K(m, "lora_B.default.weight"), rnd({16, 8}, DType::BF16, 8, 0.5f));
  ad.emplace_back(K(m2, "lora_A.weight"), rnd({8, 24}, DType::BF16, 9));
  ad.emplace_back(K(m2, "lora_B.weight"), rnd({16, 8}, DType::F32, 10));
  write_adapter(t / "adapter", lora_config(8, 16), ad);
  run(t);

  for (const auto& e : fs::directory_iterator(t.path / "base"))
    if (e.path().extension() == ".safetensors") EXPECT_TRUE(fs::exists(t.path / "out" / e.path().filename())) << e.path();
  EXPECT_EQ(slurp(t / "base/model.safetensors.index.json"), slurp(t / "out/model.safetensors.index.json"));
  EXPECT_FALSE(fs::exists(t / "out/model.safetensors"));
  Tensor got = read(t / "out", m + ".weight");
  EXPECT_EQ(got.dtype(), DType::BF16);
  expect_equal(got, reference(find(base, m + ".weight"), ad[0].second, ad[1].second, 2.0, false, Rule::Linear, DType::BF16), m);
  expect_equal(read(t / "out", m2 + ".weight"),
               reference(find(base, m2 + ".weight"), ad[2].second, ad[3].second, 2.0, false, Rule::Linear, DType::BF16), m2);
  // The rule rounds once: merging in bf16 arithmetic (delta rounded first) differs somewhere.
  auto twice = reference(find(base, m + ".weight"), ad[0].second, ad[1].second, 2.0, false, Rule::Embedding, DType::BF16);
  EXPECT_NE(vals(got), twice);
}

// use_rslora, rank_pattern and alpha_pattern (first key in file order whose regex (.*\.)?(key)$ matches).
TEST(LoraMerge, RsloraRankAndAlphaPatterns) {
  TempDir t;
  Named base = llama_base(DType::F32);
  write_base(t / "base", base);
  ojson c = lora_config(4, 6);
  c["use_rslora"] = true;
  c["rank_pattern"] = ojson::object();
  c["rank_pattern"]["model.layers.0.self_attn.q_proj"] = 2;  // listed first: wins for layer 0
  c["rank_pattern"]["q_proj"] = 3;
  c["alpha_pattern"] = ojson::object();
  c["alpha_pattern"]["layers\\.1\\..*q_proj"] = 5;
  const Named ad = {{K("model.layers.0.self_attn.q_proj", "lora_A.weight"), rnd({2, 16}, DType::F32, 1)},
                    {K("model.layers.0.self_attn.q_proj", "lora_B.weight"), rnd({16, 2}, DType::F32, 2)},
                    {K("model.layers.1.self_attn.q_proj", "lora_A.weight"), rnd({3, 16}, DType::F32, 3)},
                    {K("model.layers.1.self_attn.q_proj", "lora_B.weight"), rnd({16, 3}, DType::F32, 4)},
                    {K("model.layers.1.self_attn.v_proj", "lora_A.weight"), rnd({4, 16}, DType::F32, 5)},
                    {K("model.layers.1.self_attn.v_proj", "lora_B.weight"), rnd({8, 4}, DType::F32, 6)}};
  write_adapter(t / "adapter", c, ad);
  io::LoraAdapter la = io::LoraAdapter::load(t / "adapter");
  EXPECT_EQ(la.modules.at("model.layers.0.self_attn.q_proj.weight").r, 2);
  EXPECT_EQ(la.modules.at("model.layers.1.self_attn.q_proj.weight").r, 3);
  EXPECT_EQ(la.modules.at("model.layers.1.self_attn.q_proj.weight").alpha, 5);
  EXPECT_EQ(la.modules.at("model.layers.1.self_attn.v_proj.weight").alpha, 6);
  run(t);
  // scale = alpha / sqrt(r) with the pattern's r and alpha
  const std::vector<std::pair<std::string, double>> cases = {{"model.layers.0.self_attn.q_proj", 6 / std::sqrt(2.0)},
                                                             {"model.layers.1.self_attn.q_proj", 5 / std::sqrt(3.0)},
                                                             {"model.layers.1.self_attn.v_proj", 6 / std::sqrt(4.0)}};
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string& m = cases[i].first;
    auto want = reference(find(base, m + ".weight"), ad[2 * i].second, ad[2 * i + 1].second, cases[i].second, false,
                          Rule::Linear, DType::F32);
    expect_equal(read(t / "out", m + ".weight"), want, m);
  }
}

// fan_in_fan_out (GPT-2 Conv1D: the weight is stored [in, out], the delta is transposed).
TEST(LoraMerge, FanInFanOut) {
  TempDir t;
  Named base = {{"transformer.h.0.attn.c_attn.weight", rnd({16, 48}, DType::BF16, 1)},
                {"transformer.h.0.attn.c_attn.bias", rnd({48}, DType::BF16, 2)},
                {"transformer.wte.weight", rnd({30, 16}, DType::BF16, 3)}};
  write_base(t / "base", base);
  ojson c = lora_config(4, 4);
  c["fan_in_fan_out"] = true;
  c["target_modules"] = {"c_attn"};
  Tensor A = rnd({4, 16}, DType::F32, 4), B = rnd({48, 4}, DType::F32, 5);
  write_adapter(t / "adapter", c, {{K("transformer.h.0.attn.c_attn", "lora_A.weight"), A},
                                   {K("transformer.h.0.attn.c_attn", "lora_B.weight"), B}});
  run(t);
  expect_equal(read(t / "out", "transformer.h.0.attn.c_attn.weight"),
               reference(base[0].second, A, B, 1.0, true, Rule::Linear, DType::BF16), "c_attn");
}

// LoRA on an embedding (lora_embedding_A [r, vocab], lora_embedding_B [dim, r]): delta = (B@A)^T, rounded to
// the base dtype before the add (Embedding.merge); bf16 base.
TEST(LoraMerge, EmbeddingRoundsDeltaFirst) {
  TempDir t;
  Named base = llama_base(DType::BF16);
  write_base(t / "base", base);
  ojson c = lora_config(4, 32);
  c["target_modules"] = {"embed_tokens"};
  Tensor A = rnd({4, 40}, DType::F32, 11), B = rnd({16, 4}, DType::F32, 12);
  write_adapter(t / "adapter", c, {{K("model.embed_tokens", "lora_embedding_A"), A}, {K("model.embed_tokens", "lora_embedding_B"), B}});
  run(t);
  const Tensor& W = find(base, "model.embed_tokens.weight");
  Tensor got = read(t / "out", "model.embed_tokens.weight");
  expect_equal(got, reference(W, A, B, 8.0, true, Rule::Embedding, DType::BF16), "embed_tokens");
  EXPECT_NE(vals(got), reference(W, A, B, 8.0, true, Rule::Linear, DType::BF16));  // the rules do differ here
}

// modules_to_save (both key forms) replace the base tensor, cast to the base dtype; lora_bias adds
// scale * lora_B.bias to the base bias.
TEST(LoraMerge, ModulesToSaveAndLoraBias) {
  TempDir t;
  Named base = llama_base(DType::BF16, /*q_bias=*/true);
  write_base(t / "base", base);
  ojson c = lora_config(2, 2);
  c["modules_to_save"] = {"lm_head", "norm"};
  c["lora_bias"] = true;
  const std::string m = "model.layers.0.self_attn.q_proj";
  Tensor head = rnd({40, 16}, DType::F32, 21), norm = rnd({16}, DType::F32, 22);
  Tensor A = rnd({2, 16}, DType::F32, 23), B = rnd({16, 2}, DType::F32, 24), lb = rnd({16}, DType::F32, 25);
  write_adapter(t / "adapter", c,
                {{"base_model.model.lm_head.weight", head},
                 {"base_model.model.model.norm.modules_to_save.default.weight", norm},
                 {K(m, "lora_A.weight"), A},
                 {K(m, "lora_B.weight"), B},
                 {K(m, "lora_B.bias"), lb}});
  io::LoraMergeResult r = run(t);
  EXPECT_EQ(r.replaced, 2u);
  EXPECT_EQ(r.merged, 2u);
  expect_equal(read(t / "out", "lm_head.weight"), vals(head.to(DType::BF16)), "lm_head");
  expect_equal(read(t / "out", "model.norm.weight"), vals(norm.to(DType::BF16)), "norm");
  expect_equal(read(t / "out", m + ".weight"), reference(find(base, m + ".weight"), A, B, 1.0, false, Rule::Linear, DType::BF16), m);
  std::vector<float> b = vals(find(base, m + ".bias")), l = vals(lb), want(16);
  for (int i = 0; i < 16; ++i) {
    float add = l[i] * 1.0f;
    float s = b[i] + add;
    want[i] = rnd_to(s, DType::BF16);
  }
  expect_equal(read(t / "out", m + ".bias"), want, "q_proj.bias");
}

// DoRA: W' = D(m / ||W + delta||_row * (W + delta)), norm over the input dimension (double here, as in
// lora_adapter.cpp, rounded to fp32).
TEST(LoraMerge, Dora) {
  TempDir t;
  Named base = llama_base(DType::F32);
  write_base(t / "base", base);
  ojson c = lora_config(4, 8);
  c["use_dora"] = true;
  const std::string m = "model.layers.0.mlp.down_proj";
  Tensor A = rnd({4, 24}, DType::F32, 31), B = rnd({16, 4}, DType::F32, 32), mag = rnd({16}, DType::F32, 33);
  write_adapter(t / "adapter", c, {{K(m, "lora_A.weight"), A}, {K(m, "lora_B.weight"), B}, {K(m, "lora_magnitude_vector"), mag}});
  run(t);
  const Tensor& W = find(base, m + ".weight");
  // W + delta (the Linear reference with an fp32 "base dtype" gives exactly fp32(W + delta)).
  std::vector<float> s = reference(W, A, B, 2.0, false, Rule::Linear, DType::F32), mv = vals(mag), want(s.size());
  for (int o = 0; o < 16; ++o) {
    double n2 = 0;
    for (int i = 0; i < 24; ++i) n2 += static_cast<double>(s[o * 24 + i]) * s[o * 24 + i];
    float f = mv[o] / static_cast<float>(std::sqrt(n2));
    for (int i = 0; i < 24; ++i) want[o * 24 + i] = f * s[o * 24 + i];
  }
  expect_equal(read(t / "out", m + ".weight"), want, "dora down_proj");
}

// The in-memory API (what generate --adapter and the trainer call): a bf16 base merged to fp32 output is the
// base upcast, merged without rounding; an fp32 base merged to bf16 is rounded to bf16 first.
TEST(LoraMerge, InMemoryApi) {
  io::LoraWeights w;
  w.A = rnd({3, 10}, DType::F32, 1);
  w.B = rnd({6, 3}, DType::F32, 2);
  w.scale = 1.5;
  Tensor Wb = rnd({6, 10}, DType::BF16, 3);
  expect_equal(io::merge_lora_weight(Wb, w, DType::F32), reference(Wb, w.A, w.B, 1.5, false, Rule::Linear, DType::F32), "bf16->f32");
  Tensor Wf = rnd({6, 10}, DType::F32, 4);
  expect_equal(io::merge_lora_weight(Wf, w, DType::BF16),
               reference(Wf.to(DType::BF16), w.A, w.B, 1.5, false, Rule::Linear, DType::BF16), "f32->bf16");
  Tensor bad = rnd({10, 6}, DType::F32, 5);
  EXPECT_THROW(io::merge_lora_weight(bad, w, DType::F32), ShapeError);
}

// A base with tensors of dtypes this engine does not compute with (U8, F8) is still copied byte for byte.
TEST(LoraMerge, CopiesUnknownDtypesVerbatim) {
  TempDir t;
  // raw safetensors: q [4, 4] F32 (adapted), scales [8] U8, f8 [4] F8_E4M3
  json h;
  h["q.weight"] = {{"dtype", "F32"}, {"shape", {4, 4}}, {"data_offsets", {0, 64}}};
  h["scales"] = {{"dtype", "U8"}, {"shape", {8}}, {"data_offsets", {64, 72}}};
  h["f8"] = {{"dtype", "F8_E4M3"}, {"shape", {4}}, {"data_offsets", {72, 76}}};
  std::string hs = h.dump();
  hs.append((8 - hs.size() % 8) % 8, ' ');
  std::string file(8, '\0');
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>((hs.size() >> (8 * i)) & 0xff);
  Tensor W = rnd({4, 4}, DType::F32, 1);
  file += hs + std::string(static_cast<const char*>(W.raw()), 64) + "\x01\x02\x03\x04\x05\x06\x07\x08" + "\x10\x20\x30\x40";
  spit(t / "base/model.safetensors", file);
  spit(t / "base/config.json", "{}");
  Tensor A = rnd({2, 4}, DType::F32, 2), B = rnd({4, 2}, DType::F32, 3);
  write_adapter(t / "adapter", lora_config(2, 2), {{K("q", "lora_A.weight"), A}, {K("q", "lora_B.weight"), B}});
  run(t);
  std::string out = slurp(t / "out/model.safetensors");
  ASSERT_EQ(out.size(), file.size());
  EXPECT_EQ(out.substr(0, 8 + hs.size()), file.substr(0, 8 + hs.size()));
  EXPECT_EQ(out.substr(out.size() - 12), file.substr(file.size() - 12));
  Tensor got = Tensor::empty({4, 4}, DType::F32);
  std::memcpy(got.raw(), out.data() + 8 + hs.size(), 64);
  expect_equal(got, reference(W, A, B, 1.0, false, Rule::Linear, DType::F32), "q");
}

// --out: absent or empty is fine (an empty folder is replaced); anything else is refused (exit 2).
TEST(LoraMerge, OutputFolderRules) {
  TempDir t;
  Named base = llama_base(DType::F32);
  write_base(t / "base", base);
  write_adapter(t / "adapter", lora_config(2, 2),
                {{K("model.layers.0.self_attn.q_proj", "lora_A.weight"), rnd({2, 16}, DType::F32, 1)},
                 {K("model.layers.0.self_attn.q_proj", "lora_B.weight"), rnd({16, 2}, DType::F32, 2)}});
  fs::create_directories(t / "empty");
  run(t, "empty");
  EXPECT_TRUE(fs::exists(t / "empty/model.safetensors"));
  run(t, "nested/deeper/out");
  EXPECT_TRUE(fs::exists(t / "nested/deeper/out/config.json"));
  run(t, "slash/");
  EXPECT_TRUE(fs::exists(t / "slash/model.safetensors"));
  auto [code, msg] = fails(t, "empty");  // now non-empty
  EXPECT_EQ(code, 2);
  EXPECT_NE(msg.find("not empty"), std::string::npos) << msg;
  spit(t / "afile", "x");
  EXPECT_EQ(fails(t, "afile").first, 2);
  EXPECT_TRUE(no_tmp_left(t));
}

// ---- errors: one clear message naming the tensors and files; exit 1 for bad files, 2 for unsupported features

TEST(LoraMergeErrors, MissingFiles) {
  TempDir t;
  write_base(t / "base", llama_base(DType::F32));
  auto [c1, m1] = fails(t);
  EXPECT_EQ(c1, 1);
  EXPECT_NE(m1.find("adapter folder not found"), std::string::npos) << m1;
  fs::create_directories(t / "adapter");
  auto [c2, m2] = fails(t);
  EXPECT_EQ(c2, 1);
  EXPECT_NE(m2.find("adapter_config.json: not found"), std::string::npos) << m2;
  spit(t / "adapter/adapter_config.json", lora_config(2, 2).dump());
  auto [c3, m3] = fails(t);
  EXPECT_NE(m3.find("adapter_model.safetensors: not found"), std::string::npos) << m3;
  // bin-only adapter: refused with the reason
  spit(t / "adapter/adapter_model.bin", "pickle");
  auto [c4, m4] = fails(t);
  EXPECT_EQ(c4, 1);
  EXPECT_NE(m4.find("adapter_model.bin"), std::string::npos) << m4;
  EXPECT_NE(m4.find("pickle"), std::string::npos) << m4;
  // base with pickle weights only
  fs::remove(t / "base/model.safetensors");
  write_adapter(t / "adapter", lora_config(2, 2),
                {{K("model.layers.0.self_attn.q_proj", "lora_A.weight"), rnd({2, 16}, DType::F32, 1)},
                 {K("model.layers.0.self_attn.q_proj", "lora_B.weight"), rnd({16, 2}, DType::F32, 2)}});
  auto [c5, m5] = fails(t);
  EXPECT_EQ(c5, 1);
  EXPECT_NE(m5.find("pytorch_model.bin"), std::string::npos) << m5;
  EXPECT_FALSE(fs::exists(t / "out"));
  EXPECT_TRUE(no_tmp_left(t));
}

TEST(LoraMergeErrors, ShapeMismatchNamesBothTensorsAndFiles) {
  TempDir t;
  write_base(t / "base", llama_base(DType::F32));
  const std::string m = "model.layers.0.self_attn.k_proj";  // [8, 16]
  write_adapter(t / "adapter", lora_config(2, 2),
                {{K(m, "lora_A.weight"), rnd({2, 16}, DType::F32, 1)}, {K(m, "lora_B.weight"), rnd({16, 2}, DType::F32, 2)}});
  auto [code, msg] = fails(t);
  EXPECT_EQ(code, 1);
  for (const std::string& s : {K(m, "lora_A.weight"), K(m, "lora_B.weight"), m + ".weight", std::string("[8, 16]"),
                               std::string("adapter_model.safetensors"), std::string("model.safetensors")})
    EXPECT_NE(msg.find(s), std::string::npos) << s << " not in: " << msg;
  EXPECT_FALSE(fs::exists(t / "out"));
}

TEST(LoraMergeErrors, UnknownModule) {
  TempDir t;
  write_base(t / "base", llama_base(DType::F32));
  const std::string m = "model.layers.0.self_attn.x_proj";
  write_adapter(t / "adapter", lora_config(2, 2),
                {{K(m, "lora_A.weight"), rnd({2, 16}, DType::F32, 1)}, {K(m, "lora_B.weight"), rnd({16, 2}, DType::F32, 2)}});
  auto [code, msg] = fails(t);
  EXPECT_EQ(code, 1);
  EXPECT_NE(msg.find(K(m, "lora_A.weight")), std::string::npos) << msg;
  EXPECT_NE(msg.find("'" + m + ".weight'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("base/model.safetensors"), std::string::npos) << msg;
  // a tied lm_head: named, with the reason
  Named base = llama_base(DType::F32);
  base.pop_back();
  fs::remove_all(t / "base");
  write_base(t / "base", base);
  write_adapter(t / "adapter", lora_config(2, 2),
                {{K("lm_head", "lora_A.weight"), rnd({2, 16}, DType::F32, 1)}, {K("lm_head", "lora_B.weight"), rnd({40, 2}, DType::F32, 2)}});
  auto [c2, m2] = fails(t);
  EXPECT_NE(m2.find("tied"), std::string::npos) << m2;
}

TEST(LoraMergeErrors, MalformedAdapters) {
  TempDir t;
  write_base(t / "base", llama_base(DType::F32));
  const std::string m = "model.layers.0.self_attn.q_proj";
  auto expect_fail = [&](const ojson& cfg, const Named& tensors, int code, const std::string& needle) {
    write_adapter(t / "adapter", cfg, tensors);
    auto [c, msg] = fails(t);
    EXPECT_EQ(c, code) << msg;
    EXPECT_NE(msg.find(needle), std::string::npos) << needle << " not in: " << msg;
    EXPECT_FALSE(fs::exists(t / "out"));
  };
  const Named ok = {{K(m, "lora_A.weight"), rnd({2, 16}, DType::F32, 1)}, {K(m, "lora_B.weight"), rnd({16, 2}, DType::F32, 2)}};
  expect_fail(lora_config(2, 2), {ok[0]}, 1, "no lora_B tensor");
  expect_fail(lora_config(4, 2), ok, 1, "rank 4 (r)");
  ojson c = lora_config(2, 2);
  c["peft_type"] = "ADALORA";
  expect_fail(c, ok, 2, "peft_type");
  c = lora_config(2, 2);
  c.erase("peft_type");
  expect_fail(c, ok, 1, "peft_type");
  c = lora_config(2, 2);
  c["target_parameters"] = {"mlp.experts.gate_up_proj"};
  expect_fail(c, ok, 2, "target_parameters");
  c = lora_config(2, 2);
  c["use_dora"] = true;
  expect_fail(c, ok, 1, "lora_magnitude_vector");
  expect_fail(c, {{K("model.embed_tokens", "lora_embedding_A"), rnd({2, 40}, DType::F32, 1)},
                  {K("model.embed_tokens", "lora_embedding_B"), rnd({16, 2}, DType::F32, 2)}}, 2, "DoRA on an embedding");
  c = lora_config(2, 2);
  c["use_alora"] = true;
  expect_fail(c, ok, 2, "aLoRA");
  c = lora_config(2, 2);
  c["kasa_config"] = {{"r", 2}};
  expect_fail(c, ok, 2, "KaSA");
  expect_fail(lora_config(2, 2), {ok[0], ok[1], {K(m, "lora_E"), rnd({2, 1}, DType::F32, 3)}}, 2, "unknown LoRA tensor");
  expect_fail(lora_config(2, 2), {ok[0], ok[1], {K(m, "lora_B.bias"), rnd({16}, DType::F32, 3)}}, 1, "lora_bias");
  expect_fail(lora_config(2, 2), {{"base_model.model.lm_head.weight", rnd({41, 16}, DType::F32, 3)}}, 1, "resized");
  spit(t / "adapter/adapter_config.json", "{\"peft_type\": \"LORA\", ");
  auto [cj, mj] = fails(t);
  EXPECT_EQ(cj, 1);
  EXPECT_NE(mj.find("adapter_config.json"), std::string::npos) << mj;
  EXPECT_TRUE(no_tmp_left(t));
}

// base_model_name_or_path that names another model: a warning, not an error.
TEST(LoraMerge, BaseNameMismatchWarns) {
  TempDir t;
  write_base(t / "base", llama_base(DType::F32));
  ojson c = lora_config(2, 2);
  c["base_model_name_or_path"] = "org/other-model";
  write_adapter(t / "adapter", c,
                {{K("model.layers.0.self_attn.q_proj", "lora_A.weight"), rnd({2, 16}, DType::F32, 1)},
                 {K("model.layers.0.self_attn.q_proj", "lora_B.weight"), rnd({16, 2}, DType::F32, 2)}});
  io::LoraMergeResult r = run(t);
  ASSERT_EQ(r.warnings.size(), 1u);
  EXPECT_NE(r.warnings[0].find("org/other-model"), std::string::npos) << r.warnings[0];
  // tensors for a module target_modules does not select: merged, with a warning
  c["base_model_name_or_path"] = nullptr;
  c["target_modules"] = {"k_proj"};
  spit(t / "adapter/adapter_config.json", c.dump());
  io::LoraMergeResult r2 = run(t, "out2");
  ASSERT_EQ(r2.warnings.size(), 1u);
  EXPECT_NE(r2.warnings[0].find("target_modules"), std::string::npos) << r2.warnings[0];
  EXPECT_EQ(r2.merged, 1u);
}
