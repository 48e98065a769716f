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
#include <set>

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
  c["lora_bias"] = true;
  expect_fail(c, ok, 2, "ParamWrapper");
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

// ---------------------------------------------------------------------------------------------------------
// LoRA on fused MoE expert parameters (PEFT's lora.ParamWrapper, target_parameters).

namespace {

// PEFT's ParamWrapper.get_delta_weight, written from its formula: B3 = B.reshape(out, r, E), A3 = A.reshape(E, r,
// in), delta = einsum("o r e, e r i -> e o i", B3, A3) * scaling; each sum over r in double, k ascending, then
// fp32, then * fp32(scale). Returns delta[e] [out, in] for every e, flattened [E, out, in].
std::vector<float> ref_expert_delta(const Tensor& A, const Tensor& B, int64_t r, double scale) {
  const int64_t rE = A.dim(0), E = rE / r, in = A.dim(1), out = B.dim(0);
  const std::vector<float> a = vals(A), b = vals(B);
  auto B3 = [&](int64_t o, int64_t k, int64_t e) { return b[static_cast<size_t>(o * (r * E) + k * E + e)]; };  // reshape(out, r, E)
  auto A3 = [&](int64_t e, int64_t k, int64_t i) { return a[static_cast<size_t>((e * r + k) * in + i)]; };     // reshape(E, r, in)
  std::vector<float> d(static_cast<size_t>(E * out * in));
  for (int64_t e = 0; e < E; ++e)
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i) {
        double acc = 0.0;
        for (int64_t k = 0; k < r; ++k) acc += static_cast<double>(B3(o, k, e)) * static_cast<double>(A3(e, k, i));
        const float ba = static_cast<float>(acc);
        d[static_cast<size_t>((e * out + o) * in + i)] = ba * static_cast<float>(scale);
      }
  return d;
}

// W' = D(W + D(delta)) (ParamWrapper.merge: the delta is cast to the parameter's dtype, then added), for rows
// [row0, row0 + rows) of expert e (W: that block, [rows, in]).
std::vector<float> ref_expert_merge(const Tensor& W, const std::vector<float>& delta, int64_t out, int64_t in, int64_t e,
                                    int64_t row0, DType D) {
  const std::vector<float> w = vals(W);
  const int64_t rows = static_cast<int64_t>(w.size()) / in;
  std::vector<float> res(w.size());
  for (int64_t o = 0; o < rows; ++o)
    for (int64_t i = 0; i < in; ++i) {
      const float d = rnd_to(delta[static_cast<size_t>((e * out + row0 + o) * in + i)], D);
      const float x = rnd_to(w[static_cast<size_t>(o * in + i)], D);
      res[static_cast<size_t>(o * in + i)] = rnd_to(x + d, D);
    }
  return res;
}

Tensor slice_expert(const Tensor& fused, int64_t e, int64_t row0, int64_t rows) {  // fused [E, out, in] -> [rows, in]
  const int64_t out = fused.dim(1), in = fused.dim(2);
  Tensor f = fused.dtype() == DType::F32 ? fused : fused.to(DType::F32);
  Tensor t = Tensor::empty({rows, in}, DType::F32);
  std::memcpy(t.f32(), f.f32() + (e * out + row0) * in, static_cast<size_t>(rows * in) * 4);
  return fused.dtype() == DType::F32 ? t : t.to(fused.dtype());
}

constexpr int64_t kE = 4, kH = 16, kI = 6, kR = 2;

// A tiny MoE base: attention q_proj, then the experts of layer 0 in one of three layouts: transformers 5's
// fused parameters, the hub's per-expert Linears (qwen names), or Mixtral's hub names. The per-expert tensors
// are slices of the same fused values, so every layout holds the same weights.
enum class Layout { Fused, Hub, Mixtral };
Named moe_base(DType dt, Layout layout) {
  Named t;
  t.emplace_back("model.layers.0.self_attn.q_proj.weight", rnd({kH, kH}, dt, 1));
  t.emplace_back("model.layers.0.mlp.gate.weight", rnd({kE, kH}, dt, 2));
  const Tensor gu = rnd({kE, 2 * kI, kH}, dt, 3), dn = rnd({kE, kH, kI}, dt, 4);
  if (layout == Layout::Fused) {
    t.emplace_back("model.layers.0.mlp.experts.gate_up_proj", gu);
    t.emplace_back("model.layers.0.mlp.experts.down_proj", dn);
    return t;
  }
  const bool mx = layout == Layout::Mixtral;
  const std::string pre = mx ? "model.layers.0.block_sparse_moe.experts." : "model.layers.0.mlp.experts.";
  for (int64_t e = 0; e < kE; ++e) {
    const std::string pe = pre + std::to_string(e) + ".";
    t.emplace_back(pe + (mx ? "w1" : "gate_proj") + ".weight", slice_expert(gu, e, 0, kI));
    t.emplace_back(pe + (mx ? "w3" : "up_proj") + ".weight", slice_expert(gu, e, kI, kI));
    t.emplace_back(pe + (mx ? "w2" : "down_proj") + ".weight", slice_expert(dn, e, 0, kH));
  }
  return t;
}

// PEFT 0.21 + transformers 5's converted config for gate/up/down_proj + q_proj at rank r, alpha a:
// target_parameters [down_proj, gate_up_proj], gate_up_proj at rank 2r and alpha 2a.
ojson expert_config(int r, double alpha) {
  ojson c = lora_config(r, alpha);
  c["target_modules"] = {"q_proj"};
  c["target_parameters"] = {"down_proj", "gate_up_proj"};
  c["rank_pattern"] = ojson::object();
  c["rank_pattern"][".*\\.gate_up_proj"] = 2 * r;
  c["alpha_pattern"] = ojson::object();
  c["alpha_pattern"][".*\\.gate_up_proj"] = 2 * alpha;
  return c;
}

// The adapter tensors, in PEFT's nesting: gate_up_proj (wrapped first) inside, as "<experts>.base_layer.lora_*".
Named expert_adapter(DType adt = DType::F32) {
  const std::string ex = "model.layers.0.mlp.experts", q = "model.layers.0.self_attn.q_proj";
  return {{K(ex, "base_layer.lora_A.weight"), rnd({2 * kR * kE, kH}, adt, 11)},
          {K(ex, "base_layer.lora_B.weight"), rnd({2 * kI, 2 * kR * kE}, adt, 12)},
          {K(ex, "lora_A.weight"), rnd({kR * kE, kI}, adt, 13)},
          {K(ex, "lora_B.weight"), rnd({kH, kR * kE}, adt, 14)},
          {K(q, "lora_A.weight"), rnd({kR, kH}, adt, 15)},
          {K(q, "lora_B.weight"), rnd({kH, kR}, adt, 16)}};
}

void write_moe_base(const std::string& dir, const Named& tensors, const std::string& model_type = "qwen3_moe") {
  io::save_safetensors_dir(dir, tensors, io::SaveOptions{});
  spit(dir + "/config.json", "{\"model_type\": \"" + model_type + "\", \"hidden_size\": 16}\n");
}

}  // namespace

// expert_delta against the einsum written out from PEFT's formula; the layout matters (B's column k·E + e, not
// e·r + k), and the in-memory struct works without a folder.
TEST(LoraMergeExperts, DeltaIsPeftEinsum) {
  io::LoraExpertParam p;
  p.module = "model.layers.0.mlp.experts";
  p.param = "down_proj";
  p.r = 3;
  p.num_experts = 5;
  p.scale = 1.7;
  p.A = rnd({15, 7}, DType::F32, 1);
  p.B = rnd({4, 15}, DType::BF16, 2);  // adapter tensors in bf16 are read exactly
  const std::vector<float> want = ref_expert_delta(p.A, p.B, 3, 1.7);
  for (int64_t e = 0; e < 5; ++e) {
    Tensor d = io::expert_delta(p, e);
    ASSERT_EQ(d.shape(), (Shape{4, 7}));
    expect_equal(d, std::vector<float>(want.begin() + e * 28, want.begin() + (e + 1) * 28), "delta[" + std::to_string(e) + "]");
  }
  // Reading B's columns as e·r + k instead (a plausible misreading) gives other values.
  const std::vector<float> b = vals(p.B), a = vals(p.A);
  double acc = 0;
  for (int64_t k = 0; k < 3; ++k) acc += static_cast<double>(b[1 * 3 + k]) * a[(1 * 3 + k) * 7];
  EXPECT_NE(static_cast<float>(static_cast<float>(acc) * static_cast<float>(1.7)), want[(1 * 4 + 0) * 7 + 0]);
  EXPECT_EQ(io::lora_expert_base_shape(p), (Shape{5, 4, 7}));
  // merge_lora_expert on the fused tensor and on one expert's rows.
  const Tensor W = rnd({5, 4, 7}, DType::BF16, 3);
  Tensor m = io::merge_lora_expert(W, p, -1, 0, DType::BF16);
  for (int64_t e = 0; e < 5; ++e)
    expect_equal(slice_expert(m, e, 0, 4), ref_expert_merge(slice_expert(W, e, 0, 4), want, 4, 7, e, 0, DType::BF16), "fused");
  Tensor w2 = slice_expert(W, 2, 1, 2);
  io::merge_lora_expert_inplace(w2, p, 2, 1);
  expect_equal(w2, ref_expert_merge(slice_expert(W, 2, 1, 2), want, 4, 7, 2, 1, DType::BF16), "rows 1..2 of expert 2");
  EXPECT_THROW(io::merge_lora_expert(W, p, 5, 0, DType::BF16), ShapeError);                 // no expert 5
  EXPECT_THROW(io::merge_lora_expert(slice_expert(W, 0, 0, 4), p, 0, 1, DType::BF16), ShapeError);  // rows 1..4 of 4
  EXPECT_THROW(io::merge_lora_expert(rnd({5, 7, 4}, DType::F32, 4), p, -1, 0, DType::F32), ShapeError);  // [E, in, out]
  p.num_experts = 4;  // 15 rows are not 3 x 4
  EXPECT_THROW(io::expert_delta(p, 0), ShapeError);
}

// The converted PEFT config: nesting (gate_up_proj inner = ".base_layer", down_proj outer), rank / alpha patterns
// matched against the parameter's full name, and the base names both layouts resolve to.
TEST(LoraMergeExperts, LoadNestingAndPatterns) {
  TempDir t;
  write_adapter(t / "adapter", expert_config(kR, 3), expert_adapter());
  const io::LoraAdapter ad = io::LoraAdapter::load(t / "adapter");
  ASSERT_EQ(ad.expert_params.size(), 2u);
  ASSERT_EQ(ad.modules.size(), 1u);
  const io::LoraExpertParam& gu = ad.expert_params.at("model.layers.0.mlp.experts.gate_up_proj");
  const io::LoraExpertParam& dn = ad.expert_params.at("model.layers.0.mlp.experts.down_proj");
  EXPECT_EQ(gu.module, "model.layers.0.mlp.experts");
  EXPECT_EQ(gu.param, "gate_up_proj");
  EXPECT_EQ(gu.depth, 1);
  EXPECT_EQ(gu.key_a, K("model.layers.0.mlp.experts", "base_layer.lora_A.weight"));
  EXPECT_EQ(gu.r, 2 * kR);
  EXPECT_EQ(gu.alpha, 6);
  EXPECT_EQ(gu.num_experts, kE);
  EXPECT_DOUBLE_EQ(gu.scale, 1.5);
  EXPECT_EQ(dn.depth, 0);
  EXPECT_EQ(dn.key_b, K("model.layers.0.mlp.experts", "lora_B.weight"));
  EXPECT_EQ(dn.r, kR);
  EXPECT_EQ(dn.alpha, 3);
  EXPECT_EQ(dn.num_experts, kE);
  EXPECT_EQ(io::lora_expert_base_shape(gu), (Shape{kE, 2 * kI, kH}));
  EXPECT_EQ(io::lora_expert_base_shape(dn), (Shape{kE, kH, kI}));

  // Base names: fused, hub per-expert, Mixtral's hub names; not the router, the shared expert or a dense MLP.
  auto sl = ad.expert_slice("model.layers.0.mlp.experts.3.up_proj.weight");
  ASSERT_TRUE(sl);
  EXPECT_EQ(sl->param, &gu);
  EXPECT_EQ(sl->expert, 3);
  EXPECT_EQ(sl->row0, kI);
  EXPECT_EQ(sl->rows, kI);
  sl = ad.expert_slice("model.layers.0.block_sparse_moe.experts.1.w1.weight");
  ASSERT_TRUE(sl);
  EXPECT_EQ(sl->param, &gu);
  EXPECT_EQ(sl->row0, 0);
  sl = ad.expert_slice("model.layers.0.mlp.experts.2.down_proj.weight");
  ASSERT_TRUE(sl);
  EXPECT_EQ(sl->param, &dn);
  EXPECT_EQ(sl->rows, kH);
  sl = ad.expert_slice("model.layers.0.mlp.experts.down_proj");
  ASSERT_TRUE(sl);
  EXPECT_EQ(sl->expert, -1);
  for (const char* n : {"model.layers.0.mlp.gate.weight", "model.layers.0.mlp.shared_expert.gate_proj.weight",
                        "model.layers.1.mlp.experts.0.gate_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                        "model.layers.0.mlp.experts.x.gate_proj.weight", "model.layers.0.mlp.experts.0.gate_proj.bias"})
    EXPECT_FALSE(ad.touches(n)) << n;
  EXPECT_TRUE(ad.touches("model.layers.0.mlp.experts.gate_up_proj"));
  EXPECT_TRUE(ad.touches("model.layers.0.mlp.experts.9.gate_proj.weight"));  // then check_base_tensor refuses it

  // touched(): fused names; touched(base_has): the base's own layout.
  auto tt = ad.touched();
  EXPECT_EQ(tt.size(), 3u);
  EXPECT_TRUE(tt.count("model.layers.0.mlp.experts.gate_up_proj"));
  for (Layout l : {Layout::Hub, Layout::Mixtral}) {
    std::set<std::string> names;
    for (const auto& [n, v] : moe_base(DType::F32, l)) names.insert(n);
    auto th = ad.touched([&](const std::string& n) { return names.count(n) > 0; });
    EXPECT_EQ(th.size(), 1u + 3 * kE);
    for (const auto& [n, key] : th) {
      EXPECT_TRUE(names.count(n)) << n;
      EXPECT_TRUE(ad.touches(n)) << n;
    }
  }
}

// The same adapter merged into the three layouts of the same weights gives the same merged weights, equal to the
// reference (fp32 and bf16: the bf16 rule rounds the delta first, unlike the Linear rule).
TEST(LoraMergeExperts, LayoutsAgreeWithReference) {
  for (DType dt : {DType::F32, DType::BF16}) {
    TempDir t;
    const Named ad = expert_adapter(dt == DType::BF16 ? DType::BF16 : DType::F32);
    write_adapter(t / "adapter", expert_config(kR, 3), ad);
    const Named fused = moe_base(dt, Layout::Fused), hub = moe_base(dt, Layout::Hub), mx = moe_base(dt, Layout::Mixtral);
    write_moe_base(t / "fused", fused);
    write_moe_base(t / "hub", hub);
    write_moe_base(t / "mixtral", mx, "mixtral");
    io::LoraMergeResult rf = io::merge_lora({.base = t / "fused", .adapter = t / "adapter", .out = t / "out_fused"});
    io::LoraMergeResult rh = io::merge_lora({.base = t / "hub", .adapter = t / "adapter", .out = t / "out_hub"});
    io::LoraMergeResult rm = io::merge_lora({.base = t / "mixtral", .adapter = t / "adapter", .out = t / "out_mixtral"});
    EXPECT_EQ(rf.merged, 3u);
    EXPECT_EQ(rh.merged, 1u + 3 * kE);
    EXPECT_EQ(rm.merged, 1u + 3 * kE);

    const std::vector<float> dgu = ref_expert_delta(ad[0].second, ad[1].second, 2 * kR, 1.5);
    const std::vector<float> ddn = ref_expert_delta(ad[2].second, ad[3].second, kR, 1.5);
    const Tensor gu = find(fused, "model.layers.0.mlp.experts.gate_up_proj"), dn = find(fused, "model.layers.0.mlp.experts.down_proj");
    const Tensor ogu = read(t / "out_fused", "model.layers.0.mlp.experts.gate_up_proj");
    const Tensor odn = read(t / "out_fused", "model.layers.0.mlp.experts.down_proj");
    EXPECT_EQ(ogu.dtype(), dt);
    bool rule_matters = false;
    for (int64_t e = 0; e < kE; ++e) {
      const std::string ps = "model.layers.0.mlp.experts." + std::to_string(e) + ".";
      const std::string pm = "model.layers.0.block_sparse_moe.experts." + std::to_string(e) + ".";
      const auto wg = ref_expert_merge(slice_expert(gu, e, 0, kI), dgu, 2 * kI, kH, e, 0, dt);
      const auto wu = ref_expert_merge(slice_expert(gu, e, kI, kI), dgu, 2 * kI, kH, e, kI, dt);
      const auto wd = ref_expert_merge(slice_expert(dn, e, 0, kH), ddn, kH, kI, e, 0, dt);
      expect_equal(slice_expert(ogu, e, 0, kI), wg, "fused gate " + std::to_string(e));
      expect_equal(slice_expert(ogu, e, kI, kI), wu, "fused up " + std::to_string(e));
      expect_equal(slice_expert(odn, e, 0, kH), wd, "fused down " + std::to_string(e));
      expect_equal(read(t / "out_hub", ps + "gate_proj.weight"), wg, ps + "gate_proj");
      expect_equal(read(t / "out_hub", ps + "up_proj.weight"), wu, ps + "up_proj");
      expect_equal(read(t / "out_hub", ps + "down_proj.weight"), wd, ps + "down_proj");
      expect_equal(read(t / "out_mixtral", pm + "w1.weight"), wg, pm + "w1");
      expect_equal(read(t / "out_mixtral", pm + "w3.weight"), wu, pm + "w3");
      expect_equal(read(t / "out_mixtral", pm + "w2.weight"), wd, pm + "w2");
      // The Linear rule (no rounding of the delta before the add) would differ somewhere in bf16.
      const std::vector<float> w = vals(slice_expert(gu, e, 0, kI));
      for (size_t i = 0; i < w.size(); ++i)
        rule_matters |= rnd_to(w[i] + dgu[static_cast<size_t>(e * 2 * kI * kH) + i], dt) != wg[i];
    }
    EXPECT_EQ(rule_matters, dt == DType::BF16);
    // q_proj: the Linear rule; the router is untouched.
    const std::string q = "model.layers.0.self_attn.q_proj.weight";
    const auto wq = reference(find(fused, q), ad[4].second, ad[5].second, 1.5, false, Rule::Linear, dt);
    for (const char* o : {"out_fused", "out_hub", "out_mixtral"}) {
      expect_equal(read(t / o, q), wq, std::string(o) + " q_proj");
      const Tensor g = read(t / o, "model.layers.0.mlp.gate.weight");
      EXPECT_EQ(0, std::memcmp(g.raw(), find(fused, "model.layers.0.mlp.gate.weight").raw(), g.nbytes())) << o;
    }

    // The in-memory path (generate --adapter): merged(name) per base tensor equals the streamed output.
    const io::LoraAdapter la = io::LoraAdapter::load(t / "adapter");
    for (const auto& [n, w] : hub) {
      if (!la.touches(n)) continue;
      la.check_base_tensor(n, dtype_safetensors_name(w.dtype()), w.shape(), "hub");
      Tensor m = la.merged(n, w);
      Tensor o = read(t / "out_hub", n);
      EXPECT_EQ(0, std::memcmp(m.raw(), o.raw(), o.nbytes())) << n;
    }
  }
}

// Errors: each names the adapter tensors and, for the base, the base tensor.
TEST(LoraMergeExperts, Errors) {
  TempDir t;
  write_moe_base(t / "base", moe_base(DType::F32, Layout::Hub));
  auto expect_fail = [&](const ojson& cfg, const Named& tensors, int code, const std::string& needle) {
    fs::remove_all(t.path / "adapter");
    write_adapter(t / "adapter", cfg, tensors);
    auto [c, msg] = fails(t);
    EXPECT_EQ(c, code) << msg;
    EXPECT_NE(msg.find(needle), std::string::npos) << needle << " not in: " << msg;
    EXPECT_FALSE(fs::exists(t / "out"));
  };
  const Named ok = expert_adapter();
  // Nesting swapped (down_proj's pair saved as the inner one): the shapes do not fit PEFT's order.
  Named swapped = ok;
  std::swap(swapped[0].second, swapped[2].second);
  std::swap(swapped[1].second, swapped[3].second);
  ojson c = expert_config(kR, 3);
  c["rank_pattern"] = ojson::object();
  c["alpha_pattern"] = ojson::object();
  c["rank_pattern"][".*\\.down_proj"] = 2 * kR;  // so that the ranks themselves fit the swapped tensors
  expect_fail(c, swapped, 1, "the nesting is swapped");
  // The rank from the config does not divide lora_A's rows.
  c = expert_config(kR, 3);
  c["rank_pattern"][".*\\.gate_up_proj"] = 3;
  expect_fail(c, ok, 1, "rank 3 (rank_pattern)");
  // Nested pairs, but target_parameters names only one parameter (or none) of the module.
  c = expert_config(kR, 3);
  c["target_parameters"] = {"down_proj"};
  expect_fail(c, ok, 1, "cannot tell which pair");
  c["target_parameters"] = {"other.w9"};
  expect_fail(c, ok, 1, "names none of its parameters");
  // PEFT's ParamWrapper refuses DoRA / lora_bias / fan_in_fan_out.
  c = expert_config(kR, 3);
  c["use_dora"] = true;
  expect_fail(c, ok, 2, "ParamWrapper");
  // A base whose experts do not match: other sizes, too few experts, neither layout.
  c = expert_config(kR, 3);
  Named wrong = ok;
  wrong[2].second = rnd({kR * kE, kI + 1}, DType::F32, 1);  // down_proj A [r·E, I+1]: its in is not I
  wrong[1].second = rnd({2 * kI + 2, 2 * kR * kE}, DType::F32, 2);
  expect_fail(c, wrong, 1, "experts.0.down_proj.weight");
  Named more = ok;  // 5 experts in the adapter, 4 in the base: expert 4's tensors are missing
  more[0].second = rnd({2 * kR * 5, kH}, DType::F32, 1);
  more[1].second = rnd({2 * kI, 2 * kR * 5}, DType::F32, 2);
  more[2].second = rnd({kR * 5, kI}, DType::F32, 3);
  more[3].second = rnd({kH, kR * 5}, DType::F32, 4);
  expect_fail(c, more, 1, "has 5 experts in the adapter");
  Named fewer = ok;  // 3 experts in the adapter, 4 in the base: expert 3 is refused before anything is written
  fewer[0].second = rnd({2 * kR * 3, kH}, DType::F32, 1);
  fewer[1].second = rnd({2 * kI, 2 * kR * 3}, DType::F32, 2);
  fewer[2].second = rnd({kR * 3, kI}, DType::F32, 3);
  fewer[3].second = rnd({kH, kR * 3}, DType::F32, 4);
  expect_fail(c, fewer, 1, "have 3 experts");
  Named other = ok;  // an experts module the base does not have
  for (auto& [k, v] : other) {
    const size_t at = k.find("layers.0.mlp.experts");
    if (at != std::string::npos) k.replace(at, 8, "layers.5");
  }
  expect_fail(c, other, 1, "neither it nor per-expert tensors");
  // Both a per-expert Linear pair and the fused pair on the same weight.
  Named both = ok;
  both.emplace_back(K("model.layers.0.mlp.experts.1.gate_proj", "lora_A.weight"), rnd({kR, kH}, DType::F32, 5));
  both.emplace_back(K("model.layers.0.mlp.experts.1.gate_proj", "lora_B.weight"), rnd({kI, kR}, DType::F32, 6));
  c["target_modules"] = {"q_proj", "gate_proj"};
  expect_fail(c, both, 1, "both adapt base tensor");
  // Experts stored [E, in, out] (gpt-oss, llama4): refused by model type.
  fs::remove_all(t.path / "base");
  write_moe_base(t / "base", moe_base(DType::F32, Layout::Fused), "gpt_oss");
  expect_fail(expert_config(kR, 3), ok, 2, "gpt_oss");
  EXPECT_TRUE(no_tmp_left(t));
}

// A single targeted parameter (no nesting), target_modules null, an adapter whose keys carry ".default".
TEST(LoraMergeExperts, SingleParameterNoNesting) {
  TempDir t;
  const Named fused = moe_base(DType::F32, Layout::Fused);
  write_moe_base(t / "base", fused);
  ojson c = lora_config(kR, 4);
  c["target_modules"] = nullptr;
  c["target_parameters"] = {"mlp.experts.down_proj"};
  const std::string ex = "model.layers.0.mlp.experts";
  const Named ad = {{K(ex, "lora_A.default.weight"), rnd({kR * kE, kI}, DType::F32, 1)},
                    {K(ex, "lora_B.default.weight"), rnd({kH, kR * kE}, DType::F32, 2)}};
  write_adapter(t / "adapter", c, ad);
  const io::LoraAdapter la = io::LoraAdapter::load(t / "adapter");
  ASSERT_EQ(la.expert_params.size(), 1u);
  EXPECT_EQ(la.expert_params.begin()->first, ex + ".down_proj");
  EXPECT_EQ(la.expert_params.begin()->second.depth, 0);
  io::LoraMergeResult r = run(t);
  EXPECT_EQ(r.merged, 1u);
  const auto d = ref_expert_delta(ad[0].second, ad[1].second, kR, 2.0);
  const Tensor out = read(t / "out", ex + ".down_proj");
  for (int64_t e = 0; e < kE; ++e)
    expect_equal(slice_expert(out, e, 0, kH),
                 ref_expert_merge(slice_expert(find(fused, ex + ".down_proj"), e, 0, kH), d, kH, kI, e, 0, DType::F32), "down");
  const Tensor gu = read(t / "out", ex + ".gate_up_proj");
  EXPECT_EQ(0, std::memcmp(gu.raw(), find(fused, ex + ".gate_up_proj").raw(), gu.nbytes()));
}

// The adapter PEFT 0.21.0 + transformers 5.17.0 wrote for the qwen3_moe golden model (E=8, H=64, I=32, r=4; the
// config converted from target_modules q/k/v/o/gate/up/down_proj): loaded as PEFT's lora_modules list says, and
// merged into the golden base (hub per-expert layout, fp32).
TEST(LoraMergeExperts, PeftQwen3MoeAdapter) {
  const std::string src = AM_SOURCE_DIR;
  const std::string adir = src + "/tests/fixtures/lora_peft_experts/qwen3_moe", base = src + "/tests/fixtures/golden/qwen3_moe/model";
  const io::LoraAdapter la = io::LoraAdapter::load(adir);
  ASSERT_EQ(la.expert_params.size(), 4u);
  EXPECT_EQ(la.modules.size(), 12u);  // q/k/v/o_proj of 3 layers; the dense layer 1 MLP has no LoRA
  for (int l : {0, 2}) {
    const std::string ex = "model.layers." + std::to_string(l) + ".mlp.experts";
    const io::LoraExpertParam& gu = la.expert_params.at(ex + ".gate_up_proj");
    const io::LoraExpertParam& dn = la.expert_params.at(ex + ".down_proj");
    EXPECT_EQ(gu.key_a, "base_model.model." + ex + ".base_layer.lora_A.weight");
    EXPECT_EQ(gu.r, 8);
    EXPECT_EQ(gu.alpha, 16);
    EXPECT_EQ(gu.scale, 2.0);
    EXPECT_EQ(gu.num_experts, 8);
    EXPECT_EQ(io::lora_expert_base_shape(gu), (Shape{8, 64, 64}));
    EXPECT_EQ(dn.key_a, "base_model.model." + ex + ".lora_A.weight");
    EXPECT_EQ(dn.r, 4);
    EXPECT_EQ(dn.alpha, 8);
    EXPECT_EQ(dn.num_experts, 8);
    EXPECT_EQ(io::lora_expert_base_shape(dn), (Shape{8, 64, 32}));
  }
  TempDir t;
  io::LoraMergeResult r = io::merge_lora({.base = base, .adapter = adir, .out = t / "out"});
  EXPECT_EQ(r.merged, 12u + 2 * 8 * 3);
  const io::SafeTensors bs = io::SafeTensors::open(base), os = io::SafeTensors::open(t / "out");
  for (int l : {0, 2}) {
    const std::string ex = "model.layers." + std::to_string(l) + ".mlp.experts";
    const io::LoraExpertParam& gu = la.expert_params.at(ex + ".gate_up_proj");
    const io::LoraExpertParam& dn = la.expert_params.at(ex + ".down_proj");
    const auto dgu = ref_expert_delta(gu.A, gu.B, 8, 2.0), ddn = ref_expert_delta(dn.A, dn.B, 4, 2.0);
    for (int64_t e = 0; e < 8; ++e) {
      const std::string pe = ex + "." + std::to_string(e) + ".";
      expect_equal(os.get(pe + "gate_proj.weight"), ref_expert_merge(bs.get(pe + "gate_proj.weight"), dgu, 64, 64, e, 0, DType::F32), pe + "gate_proj");
      expect_equal(os.get(pe + "up_proj.weight"), ref_expert_merge(bs.get(pe + "up_proj.weight"), dgu, 64, 64, e, 32, DType::F32), pe + "up_proj");
      expect_equal(os.get(pe + "down_proj.weight"), ref_expert_merge(bs.get(pe + "down_proj.weight"), ddn, 64, 32, e, 0, DType::F32), pe + "down_proj");
    }
  }
  for (const char* n : {"model.layers.1.mlp.gate_proj.weight", "model.layers.0.mlp.gate.weight"}) {
    const Tensor a = bs.get(n), b = os.get(n);
    EXPECT_EQ(0, std::memcmp(a.raw(), b.raw(), a.nbytes())) << n;
  }
  // The golden run generated with its own copy of the adapter, when present (tests/fixtures/lora_golden).
  const std::string golden = src + "/tests/fixtures/lora_golden/qwen3_moe/adapter_init/adapter_model.safetensors";
  if (fs::exists(golden)) {
    EXPECT_EQ(slurp(golden), slurp(adir + "/adapter_model.safetensors"));
  }
}
