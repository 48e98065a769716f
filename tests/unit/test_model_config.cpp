// config.json parsing (v4 and v5 layouts, per-family defaults, errors), RoPE tables against the HF formulas,
// and the hub-cache lookup.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "io/model_config.h"

using namespace am;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

io::ModelConfig parse(const json& j) { return io::parse_model_config(j, "test/config.json"); }

// Every parsed field except `raw`.
void expect_same(const io::ModelConfig& a, const io::ModelConfig& b) {
  EXPECT_EQ(a.model_type, b.model_type);
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.hidden_size, b.hidden_size);
  EXPECT_EQ(a.intermediate_size, b.intermediate_size);
  EXPECT_EQ(a.num_hidden_layers, b.num_hidden_layers);
  EXPECT_EQ(a.num_attention_heads, b.num_attention_heads);
  EXPECT_EQ(a.num_key_value_heads, b.num_key_value_heads);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.max_position_embeddings, b.max_position_embeddings);
  EXPECT_EQ(a.rms_norm_eps, b.rms_norm_eps);
  EXPECT_EQ(a.tie_word_embeddings, b.tie_word_embeddings);
  EXPECT_EQ(a.attention_bias, b.attention_bias);
  EXPECT_EQ(a.o_proj_bias, b.o_proj_bias);
  EXPECT_EQ(a.mlp_bias, b.mlp_bias);
  EXPECT_EQ(a.qk_norm, b.qk_norm);
  EXPECT_EQ(a.hidden_act, b.hidden_act);
  EXPECT_EQ(a.sliding_window, b.sliding_window);
  EXPECT_EQ(a.torch_dtype, b.torch_dtype);
  EXPECT_EQ(a.bos_token_id, b.bos_token_id);
  EXPECT_EQ(a.eos_token_id, b.eos_token_id);
  EXPECT_EQ(a.eos_token_ids, b.eos_token_ids);
  EXPECT_EQ(a.pad_token_id, b.pad_token_id);
  const auto &r = a.rope, &s = b.rope;
  EXPECT_EQ(r.rope_type, s.rope_type);
  EXPECT_EQ(r.rope_theta, s.rope_theta);
  EXPECT_EQ(r.factor, s.factor);
  EXPECT_EQ(r.low_freq_factor, s.low_freq_factor);
  EXPECT_EQ(r.high_freq_factor, s.high_freq_factor);
  EXPECT_EQ(r.original_max_position_embeddings, s.original_max_position_embeddings);
  EXPECT_EQ(r.beta_fast, s.beta_fast);
  EXPECT_EQ(r.beta_slow, s.beta_slow);
  EXPECT_EQ(r.attention_factor, s.attention_factor);
  EXPECT_EQ(r.mscale, s.mscale);
  EXPECT_EQ(r.mscale_all_dim, s.mscale_all_dim);
  EXPECT_EQ(r.truncate, s.truncate);
  EXPECT_EQ(r.partial_rotary_factor, s.partial_rotary_factor);
  EXPECT_EQ(compute_rope(a).inv_freq, compute_rope(b).inv_freq);
}

// Meta-Llama-3.1-8B as published (transformers v4 layout).
json llama31_v4() {
  return json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": false, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": true, "vocab_size": 128256})");
}

// The same model as transformers v5 saves it: rope_parameters holds rope_theta and rope_type; `dtype`.
json llama31_v5() {
  json j = llama31_v4();
  j.erase("rope_scaling");
  j.erase("rope_theta");
  j.erase("torch_dtype");
  j["dtype"] = "bfloat16";
  j["rope_parameters"] = {{"rope_type", "llama3"}, {"rope_theta", 500000.0}, {"factor", 8.0},
                          {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
                          {"original_max_position_embeddings", 8192}};
  j["transformers_version"] = "5.0.0";
  return j;
}

json minimal(const std::string& type) {
  return {{"model_type", type}, {"vocab_size", 1000}, {"hidden_size", 64}, {"intermediate_size", 128},
          {"num_hidden_layers", 4}, {"num_attention_heads", 4}, {"num_key_value_heads", 2}};
}

template <typename Fn>
std::string error_of(Fn fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

struct TempDir {
  fs::path path;
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path = fs::temp_directory_path() / ("am_cfg_" + std::to_string(::getpid()) + "_" + info->name());
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
};

void write(const fs::path& p, const std::string& s) {
  fs::create_directories(p.parent_path());
  std::ofstream(p) << s;
}

// Relative closeness for float32 results against double math.
void expect_rel(float got, double want, double rel, const std::string& what) {
  EXPECT_LE(std::fabs(got - want), rel * std::fabs(want)) << what << ": got " << got << " want " << want;
}

}  // namespace

// ---------------------------------------------------------------- config.json

TEST(ModelConfig, Llama31) {
  auto c = parse(llama31_v4());
  EXPECT_EQ(c.model_type, "llama");
  EXPECT_EQ(c.vocab_size, 128256);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.n_rep(), 4);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_EQ(c.rope.rope_type, "llama3");
  EXPECT_EQ(c.rope.rope_theta, 500000.0);
  EXPECT_EQ(c.rope.factor, 8.0);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 8192);
  EXPECT_EQ(c.torch_dtype, "bfloat16");
  EXPECT_EQ(c.bos_token_id, 128000);
  EXPECT_EQ(c.eos_token_id, 128001);
  EXPECT_FALSE(c.attention_bias || c.o_proj_bias || c.mlp_bias || c.qk_norm || c.tie_word_embeddings);
  EXPECT_EQ(c.sliding_window, std::vector<int64_t>(32, 0));
  EXPECT_EQ(c.raw["transformers_version"], "4.43.0.dev0");
}

TEST(ModelConfig, V4AndV5LayoutsAgree) {
  expect_same(parse(llama31_v4()), parse(llama31_v5()));

  // v4 `rope_scaling.type` (the oldest spelling) vs v5 rope_parameters, for linear and yarn.
  json v4 = minimal("qwen2"), v5 = minimal("qwen2");
  v4["rope_theta"] = 1000000.0;
  v4["rope_scaling"] = {{"type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 32768}};
  v4["torch_dtype"] = "float32";
  v5["rope_parameters"] = {{"rope_type", "yarn"}, {"rope_theta", 1000000.0}, {"factor", 4.0},
                           {"original_max_position_embeddings", 32768}};
  v5["dtype"] = "float32";
  expect_same(parse(v4), parse(v5));
  EXPECT_EQ(parse(v5).rope.rope_type, "yarn");

  v4 = minimal("mistral");
  v5 = minimal("mistral");
  v4["rope_theta"] = 1e6;
  v4["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 2}};
  v4["sliding_window"] = nullptr;
  v5["rope_parameters"] = {{"rope_type", "linear"}, {"rope_theta", 1e6}, {"factor", 2.0}};
  v5["sliding_window"] = nullptr;
  expect_same(parse(v4), parse(v5));

  // v5 per-layer-type rope_parameters: full_attention's is the one used.
  v4 = minimal("qwen3");
  v4["rope_theta"] = 5e5;
  v5 = minimal("qwen3");
  v5["rope_parameters"] = {{"full_attention", {{"rope_type", "default"}, {"rope_theta", 5e5}}},
                           {"sliding_attention", {{"rope_type", "default"}, {"rope_theta", 1e4}}}};
  expect_same(parse(v4), parse(v5));
  // No rope key at all: default with theta 10000.
  EXPECT_EQ(parse(minimal("llama")).rope.rope_theta, 10000.0);
  EXPECT_EQ(parse(minimal("llama")).rope.rope_type, "default");
}

// The defaults, biases and sliding windows below were checked against transformers 5.17.0: AutoConfig.for_model
// on the same dicts, and the attention modules of AutoModelForCausalLM.from_config (bias presence, q_norm,
// per-layer sliding_window).
TEST(ModelConfig, FamilyDefaultsAsTransformers) {
  json lj = minimal("llama");
  lj.erase("num_key_value_heads");
  auto l = parse(lj);
  EXPECT_EQ(l.num_key_value_heads, 4);  // None -> num_attention_heads
  EXPECT_EQ(l.head_dim, 16);            // hidden_size // num_attention_heads
  EXPECT_EQ(l.max_position_embeddings, 2048);
  EXPECT_EQ(l.bos_token_id, 1);
  EXPECT_EQ(l.eos_token_id, 2);
  EXPECT_FALSE(l.tie_word_embeddings);
  EXPECT_EQ(l.rms_norm_eps, 1e-6);
  EXPECT_EQ(l.hidden_act, "silu");
  EXPECT_EQ(l.torch_dtype, "");

  json m = minimal("mistral");
  m.erase("num_key_value_heads");
  m["num_attention_heads"] = 8;
  auto mc = parse(m);
  EXPECT_EQ(mc.num_key_value_heads, 8);  // MistralConfig default 8
  EXPECT_EQ(mc.max_position_embeddings, 131072);
  EXPECT_EQ(mc.sliding_window, std::vector<int64_t>(4, 4096));  // MistralConfig default sliding_window=4096
  EXPECT_EQ(mc.eos_token_id, 2);

  json q2 = minimal("qwen2");
  q2.erase("num_key_value_heads");
  q2["num_attention_heads"] = 32;
  q2["hidden_size"] = 512;
  auto q2c = parse(q2);
  EXPECT_EQ(q2c.num_key_value_heads, 32);  // Qwen2Config default 32
  EXPECT_EQ(q2c.head_dim, 16);
  EXPECT_EQ(q2c.max_position_embeddings, 32768);
  EXPECT_FALSE(q2c.bos_token_id.has_value());
  EXPECT_FALSE(q2c.eos_token_id.has_value());
  EXPECT_FALSE(q2c.tie_word_embeddings);

  json q3 = minimal("qwen3");
  auto q3c = parse(q3);
  EXPECT_EQ(q3c.head_dim, 128);  // Qwen3Config head_dim default 128, not hidden_size // heads
  EXPECT_TRUE(q3c.qk_norm);
  EXPECT_FALSE(q3c.tie_word_embeddings);
  q3["num_key_value_heads"] = nullptr;  // explicit null -> num_attention_heads
  EXPECT_EQ(parse(q3).num_key_value_heads, 4);
  // A default that does not divide the heads is reported, naming the default.
  q2 = minimal("qwen2");
  q2.erase("num_key_value_heads");
  EXPECT_NE(error_of([&] { parse(q2); }).find("num_key_value_heads"), std::string::npos);
}

TEST(ModelConfig, BiasesPerFamily) {
  json j = minimal("qwen2");
  auto c = parse(j);
  EXPECT_TRUE(c.attention_bias);
  EXPECT_FALSE(c.o_proj_bias);
  j["attention_bias"] = false;  // Qwen2 ignores the key: q/k/v always have a bias
  EXPECT_TRUE(parse(j).attention_bias);

  j = minimal("qwen3");
  EXPECT_FALSE(parse(j).attention_bias);
  j["attention_bias"] = true;
  EXPECT_TRUE(parse(j).attention_bias);
  EXPECT_TRUE(parse(j).o_proj_bias);

  j = minimal("llama");
  j["attention_bias"] = true;
  j["mlp_bias"] = true;
  c = parse(j);
  EXPECT_TRUE(c.attention_bias && c.o_proj_bias && c.mlp_bias);

  j = minimal("mistral");
  j["attention_bias"] = true;  // not a MistralConfig key
  c = parse(j);
  EXPECT_FALSE(c.attention_bias || c.o_proj_bias || c.mlp_bias || c.qk_norm);
}

TEST(ModelConfig, SlidingWindowPerLayer) {
  json j = minimal("mistral");
  j["sliding_window"] = nullptr;
  EXPECT_EQ(parse(j).sliding_window, std::vector<int64_t>(4, 0));
  j["sliding_window"] = 128;
  EXPECT_EQ(parse(j).sliding_window, std::vector<int64_t>(4, 128));

  for (const char* t : {"qwen2", "qwen3"}) {
    j = minimal(t);
      j["sliding_window"] = 64;
    j["max_window_layers"] = 2;
    EXPECT_EQ(parse(j).sliding_window, std::vector<int64_t>(4, 0)) << t;  // use_sliding_window defaults false
    j["use_sliding_window"] = true;
    EXPECT_EQ(parse(j).sliding_window, (std::vector<int64_t>{0, 0, 64, 64})) << t;
    j.erase("max_window_layers");  // default 28: no layer of 4 slides
    EXPECT_EQ(parse(j).sliding_window, std::vector<int64_t>(4, 0)) << t;
    // v5 layer_types decides which layers slide.
    j["layer_types"] = {"sliding_attention", "full_attention", "sliding_attention", "full_attention"};
    EXPECT_EQ(parse(j).sliding_window, (std::vector<int64_t>{64, 0, 64, 0})) << t;
    j["use_sliding_window"] = false;  // ... but the window is still null unless use_sliding_window
    EXPECT_EQ(parse(j).sliding_window, std::vector<int64_t>(4, 0)) << t;
  }
  j["layer_types"] = {"full_attention"};
  EXPECT_NE(error_of([&] { parse(j); }).find("layer_types"), std::string::npos);
  j["layer_types"] = {"full_attention", "linear_attention", "full_attention", "full_attention"};
  EXPECT_NE(error_of([&] { parse(j); }).find("layer_types[1]"), std::string::npos);
}

TEST(ModelConfig, TokenIdsAndDtype) {
  json j = minimal("llama");
  j["eos_token_id"] = {128001, 128008, 128009};
  j["bos_token_id"] = nullptr;
  j["pad_token_id"] = 0;
  j["torch_dtype"] = "torch.float16";
  auto c = parse(j);
  EXPECT_EQ(c.eos_token_id, 128001);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{128001, 128008, 128009}));
  EXPECT_FALSE(c.bos_token_id.has_value());
  EXPECT_EQ(c.pad_token_id, 0);
  EXPECT_EQ(c.torch_dtype, "float16");
  j["dtype"] = "bfloat16";  // v5 key wins
  EXPECT_EQ(parse(j).torch_dtype, "bfloat16");
}

TEST(ModelConfig, ToleratesUnknownKeysAndTypes) {
  json j = minimal("llama");
  j["some_future_key"] = {{"nested", true}};
  j["quantization_config"] = nullptr;
  j["hidden_size"] = 64.0;  // integral float accepted
  EXPECT_EQ(parse(j).hidden_size, 64);
  j["model_type"] = "my_llama_variant";  // llama rules; the registry decides if it can build it
  EXPECT_EQ(parse(j).model_type, "my_llama_variant");
}

TEST(ModelConfig, ErrorsNameFileAndKey) {
  TempDir d;
  const fs::path cfg = d.path / "config.json";
  for (const char* key : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "model_type"}) {
    json j = minimal("llama");
    j.erase(key);
    write(cfg, j.dump());
    std::string msg = error_of([&] { io::load_model_config(cfg.string()); });
    EXPECT_NE(msg.find(cfg.string()), std::string::npos) << msg;
    EXPECT_NE(msg.find(std::string("'") + key + "'"), std::string::npos) << msg;
    EXPECT_THROW(io::load_model_config(cfg.string()), FormatError);
  }
  json j = minimal("llama");
  j["hidden_size"] = "big";
  write(cfg, j.dump());
  std::string msg = error_of([&] { io::load_model_config(d.path.string()); });  // a folder works too
  EXPECT_NE(msg.find(cfg.string()), std::string::npos) << msg;
  EXPECT_NE(msg.find("'hidden_size'"), std::string::npos) << msg;
  j = minimal("llama");
  j["num_hidden_layers"] = -1;
  EXPECT_NE(error_of([&] { parse(j); }).find("'num_hidden_layers'"), std::string::npos);
  j = minimal("llama");
  j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}};
  EXPECT_NE(error_of([&] { parse(j); }).find("rope_scaling.low_freq_factor"), std::string::npos);
  j["rope_scaling"] = {{"rope_type", "longrope"}};  // supported (phi3), but its factor lists are required
  EXPECT_NE(error_of([&] { parse(j); }).find("rope_scaling.short_factor"), std::string::npos);
  j["rope_scaling"] = {{"rope_type", "proportional"}};
  EXPECT_NE(error_of([&] { parse(j); }).find("proportional"), std::string::npos);
  j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", "2"}};
  EXPECT_NE(error_of([&] { parse(j); }).find("rope_scaling.factor"), std::string::npos);

  write(cfg, "{\"model_type\": ");
  msg = error_of([&] { io::load_model_config(cfg.string()); });
  EXPECT_NE(msg.find(cfg.string()), std::string::npos);
  EXPECT_NE(msg.find("JSON"), std::string::npos);
  EXPECT_THROW(io::load_model_config((d.path / "nope.json").string()), IoError);
  EXPECT_THROW(parse(json::array()), FormatError);
}

// ---------------------------------------------------------------- RoPE

TEST(Rope, DefaultFollowsTorchFloat32Recipe) {
  json j = minimal("llama");
  j["hidden_size"] = 512;  // head_dim 128
  auto t = compute_rope(parse(j));
  ASSERT_EQ(t.inv_freq.size(), 64u);
  EXPECT_EQ(t.attention_scaling, 1.0f);
  for (size_t i = 0; i < 64; ++i) {
    // 1.0 / (base ** (arange(0, dim, 2).float() / dim)): exponent and power in float32.
    float e = static_cast<float>(2 * i) / 128.0f;
    EXPECT_EQ(t.inv_freq[i], 1.0f / static_cast<float>(std::pow(10000.0, static_cast<double>(e)))) << i;
    expect_rel(t.inv_freq[i], std::pow(10000.0, -static_cast<double>(2 * i) / 128), 3e-7, "default");
  }
  // By hand: 10000^(-2/128) = exp(-ln(10000)/64) = 0.8659643233600653; 10000^(-126/128) = 1.1547819846894582e-4
  expect_rel(t.inv_freq[1], 0.8659643233600653, 2e-7, "inv_freq[1]");
  expect_rel(t.inv_freq[63], 1.1547819846894582e-4, 2e-7, "inv_freq[63]");
  // "dynamic" is default at training lengths; partial_rotary_factor shortens the table.
  j["rope_scaling"] = {{"rope_type", "dynamic"}, {"factor", 2.0}};
  EXPECT_EQ(compute_rope(parse(j)).inv_freq, t.inv_freq);
  j.erase("rope_scaling");
  j["partial_rotary_factor"] = 0.5;
  auto p = compute_rope(parse(j));
  ASSERT_EQ(p.inv_freq.size(), 32u);
  expect_rel(p.inv_freq[1], std::pow(10000.0, -2.0 / 64), 3e-7, "partial");
}

TEST(Rope, LinearDividesByFactor) {
  json j = minimal("llama");
  j["rope_theta"] = 10000.0;
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 4.0}};
  auto t = compute_rope(parse(j));  // head_dim 16
  ASSERT_EQ(t.inv_freq.size(), 8u);
  for (size_t i = 0; i < 8; ++i) expect_rel(t.inv_freq[i], std::pow(10000.0, -(2.0 * i) / 16) / 4, 3e-7, "linear");
  EXPECT_EQ(t.inv_freq[0], 0.25f);
}

TEST(Rope, Llama3MatchesHFFormula) {
  auto c = parse(llama31_v4());
  auto t = compute_rope(c);
  ASSERT_EQ(t.inv_freq.size(), 64u);
  EXPECT_EQ(t.attention_scaling, 1.0f);
  // Independent double computation of _compute_llama3_parameters.
  const double theta = 500000, factor = 8, lf = 1, hf = 4, old = 8192;
  for (int i = 0; i < 64; ++i) {
    double inv = std::pow(theta, -(2.0 * i) / 128), wl = 2 * M_PI / inv, want;
    if (wl < old / hf) want = inv;
    else if (wl > old / lf) want = inv / factor;
    else {
      double s = (old / wl - lf) / (hf - lf);
      want = (1 - s) * inv / factor + s * inv;
    }
    expect_rel(t.inv_freq[i], want, 2e-6, "llama3 i=" + std::to_string(i));
  }
  // By hand from the HF formula (wavelen = 2*pi*500000^(2i/128)):
  //  i=0:  wavelen 6.28 < 2048, kept:                           1.0
  //  i=28: wavelen 1956.5 < 2048, kept: 500000^(-56/128)       = 0.003211445994752591
  //  i=30: wavelen 2948.3, smooth = (8192/2948.3 - 1)/3 = 0.5928; (1-s)*inv/8 + s*inv = 0.0013718935677611381
  //  i=35: wavelen 8218.7 > 8192, divided by 8:                 9.556212353964683e-05
  //  i=63: 500000^(-126/128)/8                                 = 3.068925988914511e-07
  EXPECT_EQ(t.inv_freq[0], 1.0f);
  expect_rel(t.inv_freq[28], 0.003211445994752591, 2e-6, "i=28");
  expect_rel(t.inv_freq[30], 0.0013718935677611381, 2e-6, "i=30");
  expect_rel(t.inv_freq[35], 9.556212353964683e-05, 2e-6, "i=35");
  expect_rel(t.inv_freq[63], 3.068925988914511e-07, 2e-6, "i=63");
}

namespace {
// Independent double computation of _compute_yarn_parameters' inv_freq.
std::vector<double> yarn_ref(double theta, int dim, double factor, double orig, double bf, double bs, bool truncate) {
  auto cd = [&](double rot) { return (dim * std::log(orig / (rot * 2 * M_PI))) / (2 * std::log(theta)); };
  double lo = cd(bf), hi = cd(bs);
  if (truncate) lo = std::floor(lo), hi = std::ceil(hi);
  lo = std::max(lo, 0.0);
  hi = std::min(hi, dim - 1.0);
  if (lo == hi) hi += 0.001;
  std::vector<double> out;
  for (int i = 0; i < dim / 2; ++i) {
    double pf = std::pow(theta, (2.0 * i) / dim);
    double ramp = std::clamp((i - lo) / (hi - lo), 0.0, 1.0), keep = 1 - ramp;
    out.push_back(1 / (factor * pf) * (1 - keep) + 1 / pf * keep);
  }
  return out;
}
}  // namespace

TEST(Rope, YarnMatchesHFFormula) {
  // Qwen3's documented long-context setting.
  json j = minimal("qwen3");
  j["max_position_embeddings"] = 131072;
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 32768}};
  j["rope_theta"] = 1000000.0;
  auto c = parse(j);
  auto t = compute_rope(c);  // head_dim 128
  ASSERT_EQ(t.inv_freq.size(), 64u);
  auto want = yarn_ref(1e6, 128, 4, 32768, 32, 1, true);
  for (int i = 0; i < 64; ++i) expect_rel(t.inv_freq[i], want[i], 2e-6, "yarn i=" + std::to_string(i));
  // By hand: correction dims for 32 and 1 rotations over 32768 positions are 23.60 and 39.65 -> [23, 40].
  //  i<=23 kept (i=20: 1e6^(-40/128) = 0.01333521432163324), i>=40 divided by 4
  //  (i=63: 1e6^(-126/128)/4 = 3.102344401879299e-07); attention = 0.1*ln(4) + 1 = 1.138629436111989.
  expect_rel(t.inv_freq[20], 0.01333521432163324, 2e-6, "i=20");
  expect_rel(t.inv_freq[63], 3.102344401879299e-07, 2e-6, "i=63");
  EXPECT_EQ(t.attention_scaling, static_cast<float>(1.138629436111989));

  // truncate=false, explicit betas, DeepSeek-style mscale pair (equal -> attention 1).
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 40.0}, {"original_max_position_embeddings", 4096},
                       {"beta_fast", 16}, {"beta_slow", 2}, {"truncate", false}, {"mscale", 1.0},
                       {"mscale_all_dim", 1.0}};
  t = compute_rope(parse(j));
  want = yarn_ref(1e6, 128, 40, 4096, 16, 2, false);
  for (int i = 0; i < 64; ++i) expect_rel(t.inv_freq[i], want[i], 2e-6, "yarn2 i=" + std::to_string(i));
  EXPECT_EQ(t.attention_scaling, 1.0f);
  j["rope_scaling"]["mscale"] = 0.707;  // get_mscale(40, .707) / get_mscale(40, 1)
  EXPECT_FLOAT_EQ(compute_rope(parse(j)).attention_scaling,
                  static_cast<float>((0.1 * 0.707 * std::log(40.0) + 1) / (0.1 * std::log(40.0) + 1)));
  j["rope_scaling"]["attention_factor"] = 0.5;
  EXPECT_EQ(compute_rope(parse(j)).attention_scaling, 0.5f);

  // No factor: max_position_embeddings / original_max_position_embeddings (131072 / 32768 = 4).
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"original_max_position_embeddings", 32768}};
  c = parse(j);
  EXPECT_EQ(c.rope.factor, 4.0);
  EXPECT_EQ(c.rope.beta_fast, 32.0);
  // No original_max_position_embeddings: max_position_embeddings.
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 2.0}};
  EXPECT_EQ(parse(j).rope.original_max_position_embeddings, 131072);
}

TEST(Rope, CosSinAsHF) {
  auto c = parse(llama31_v4());
  auto t = compute_rope(c);
  const int32_t pos[4] = {0, 1, 7, 131071};
  std::vector<float> cs(4 * 64), sn(4 * 64);
  rope_cos_sin(t, pos, 4, cs.data(), sn.data());
  for (int p = 0; p < 4; ++p)
    for (int i = 0; i < 64; ++i) {
      float angle = t.inv_freq[i] * static_cast<float>(pos[p]);  // float32 product, as HF's matmul
      EXPECT_NEAR(cs[p * 64 + i], std::cos(static_cast<double>(angle)), 1e-7);
      EXPECT_NEAR(sn[p * 64 + i], std::sin(static_cast<double>(angle)), 1e-7);
    }
  EXPECT_EQ(cs[0], 1.0f);
  EXPECT_EQ(sn[5], 0.0f);
  // yarn: scaled by attention_scaling.
  json j = minimal("llama");
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 512}};
  auto ty = compute_rope(parse(j));
  std::vector<float> c2(2 * ty.inv_freq.size()), s2(c2.size());
  const int32_t p2[2] = {0, 3};
  rope_cos_sin(ty, p2, 2, c2.data(), s2.data());
  EXPECT_EQ(c2[0], ty.attention_scaling);
  EXPECT_NEAR(s2[ty.inv_freq.size()], std::sin(3.0) * ty.attention_scaling, 1e-6);
}

// ---------------------------------------------------------------- hub cache

TEST(ModelConfig, ResolveModelPathFromLocalCache) {
  TempDir d;
  const char* old = std::getenv("HF_HUB_CACHE");
  std::string saved = old ? old : "";
  setenv("HF_HUB_CACHE", (d.path / "hub").c_str(), 1);
  const fs::path repo = d.path / "hub" / "models--org--tiny-llama";
  fs::create_directories(repo / "snapshots" / "aaa");
  fs::create_directories(repo / "snapshots" / "bbb");
  write(repo / "refs" / "main", "aaa");
  EXPECT_EQ(io::resolve_model_path("org/tiny-llama"), (repo / "snapshots" / "aaa").string());
  fs::remove(repo / "refs" / "main");
  fs::last_write_time(repo / "snapshots" / "bbb", fs::file_time_type::clock::now() + std::chrono::hours(1));
  EXPECT_EQ(io::resolve_model_path("org/tiny-llama"), (repo / "snapshots" / "bbb").string());  // newest
  // A folder is returned as it is.
  EXPECT_EQ(io::resolve_model_path(d.path.string()), d.path.string());
  // Not found: IoError listing what was tried.
  std::string msg = error_of([] { io::resolve_model_path("org/absent-model"); });
  EXPECT_NE(msg.find("models--org--absent-model"), std::string::npos) << msg;
  EXPECT_NE(msg.find((d.path / "hub").string()), std::string::npos) << msg;
  EXPECT_THROW(io::resolve_model_path("org/absent-model"), IoError);
  EXPECT_THROW(io::resolve_model_path("./no/such/dir"), IoError);
  if (old) setenv("HF_HUB_CACHE", saved.c_str(), 1);
  else unsetenv("HF_HUB_CACHE");
}

// ---------------------------------------------------------------- goldens from transformers itself
// Bit patterns of float32 values produced by transformers 5.17.0 / torch 2.11.0 (CPU) for the configs below:
// `model.model.rotary_emb` (or the family's RotaryEmbedding for the 8B config) .inv_freq, and the first half of
// the cos/sin it returns for positions [0, 1, 7, 4095, 131071]. Regenerate with, for each config dict d:
//   cfg = AutoConfig.for_model(d.pop("model_type"), **d); rot = LlamaRotaryEmbedding(config=cfg)
//   bits = rot.inv_freq.float().view(torch.int32).tolist(); cos, sin = rot(torch.zeros(1, 5, 8), pos)
// Our pipeline repeats torch's float32 operations; the only allowed difference is torch's vectorised powf,
// which is within 1 ulp of the correctly rounded power we use (it shows once, at i = 37 for theta 1e6).
namespace {

const uint32_t kHfLlama31InvFreq[64] = {
    0x3f800000, 0x3f508ac1, 0x3f29e1c6, 0x3f0a6384, 0x3ee177bc, 0x3eb7ab7d, 0x3e959ee3, 0x3e73c461,
    0x3e4693b0, 0x3e21c3a0, 0x3e03c6a0, 0x3dd6b19c, 0x3daee4ad, 0x3d8e7898, 0x3d681e67, 0x3d3d1684,
    0x3d1a08c8, 0x3cfaf53f, 0x3ccc6f49, 0x3ca68939, 0x3c87a9c3, 0x3c5d06ec, 0x3c340d6d, 0x3c12ac7f,
    0x3beef74f, 0x3bc2aa76, 0x3b9e9402, 0x3b812e35, 0x3b527720, 0x3b0dfd06, 0x3ab3d11d, 0x3a60979e,
    0x3a0995d2, 0x39a3f108, 0x393b2dd2, 0x38c86886, 0x38a3418d, 0x3884fdbf, 0x3858ac81, 0x38308199,
    0x380fc8f8, 0x37ea426f, 0x37bed4f4, 0x379b7475, 0x377d45c3, 0x374e51f5, 0x3728126b, 0x3708ea0f,
    0x36df10c4, 0x36b5b687, 0x369406cb, 0x36712b80, 0x36447610, 0x36200a69, 0x36025f34, 0x35d46808,
    0x35ad07a7, 0x358cf400, 0x3565a54d, 0x353b12c7, 0x351864a7, 0x34f848c2, 0x34ca41b0, 0x34a4c2ff,
};
const uint32_t kHfYarnQwen3InvFreq[64] = {
    0x3f800000, 0x3f4e4bad, 0x3f263de0, 0x3f05f6ef, 0x3ed7e89b, 0x3eadfcff, 0x3e8c3504, 0x3e61f835,
    0x3e361887, 0x3e12bd91, 0x3dec7fd6, 0x3dbe94c6, 0x3d99940d, 0x3d778513, 0x3d47763f, 0x3d20bc1d,
    0x3d0186e3, 0x3cd0c1a8, 0x3ca8398b, 0x3c879008, 0x3c5a7bf2, 0x3c301052, 0x3c0de12d, 0x3be4aa46,
    0x3bb02377, 0x3b876388, 0x3b4fa550, 0x3b1ed248, 0x3af241df, 0x3ab82bc0, 0x3a8b8207, 0x3a527db8,
    0x3a1e0eb2, 0x39ec1968, 0x39af3d02, 0x39811c3e, 0x393c93be, 0x39083e38, 0x38c23e9a, 0x38881d0a,
    0x383a7753, 0x38164324, 0x37f22ce2, 0x37c327b5, 0x379d43a4, 0x377d75d4, 0x374c3fbe, 0x372497ab,
    0x3704a2b2, 0x36d5c441, 0x36ac431d, 0x368ad0ed, 0x365fba4f, 0x36344a0e, 0x361148e3, 0x35ea2732,
    0x35bcb0c1, 0x35980e02, 0x35751070, 0x35457bab, 0x351f23e4, 0x35003dec, 0x34ceaf79, 0x34a68e4c,
};
const uint32_t kHfYarn2InvFreq[64] = {
    0x3f800000, 0x3f4e4bad, 0x3f263de0, 0x3f05f6ef, 0x3ed7e89b, 0x3eadfcff, 0x3e8c3504, 0x3e61f835,
    0x3e361887, 0x3e12bd91, 0x3dec7fd6, 0x3dbe94c6, 0x3d99940d, 0x3d778513, 0x3d47763f, 0x3d20bc1d,
    0x3d0186e3, 0x3cd0c1a8, 0x3c9a2900, 0x3c5d03fd, 0x3c1bfd64, 0x3bd7c408, 0x3b912706, 0x3b3ba6b8,
    0x3ae3d4f4, 0x3a76f4fc, 0x39cc3bec, 0x389a489e, 0x3878a815, 0x384860c1, 0x38217916, 0x38021f2b,
    0x37d1b717, 0x37a8ff53, 0x37882f69, 0x375b7cd1, 0x3730df51, 0x370e87fd, 0x36e5b71d, 0x36b91d41,
    0x36952c42, 0x36706b6d, 0x3641bd81, 0x361c1fc4, 0x35fb9f6c, 0x35cac4a9, 0x35a36631, 0x3583ac89,
    0x35543784, 0x352b0367, 0x3509cf4a, 0x34de1b16, 0x34b2fb72, 0x34903b3f, 0x3468749d, 0x343b528e,
    0x3416f3cd, 0x33f3499d, 0x33c40d26, 0x339dfc88, 0x337e9fd3, 0x334d2fe0, 0x3325592e, 0x33053ea3,
};
const uint32_t kHfLlama31Cos4095[64] = {
    0xbd871e6c, 0x3f5eec85, 0xbf7fe1c2, 0xbed41f46, 0x3f7fe7be, 0x3e9a14db, 0xbf767653, 0x3f17acdd,
    0xbf4244c3, 0x3f76c414, 0x3f30020f, 0xbee12a31, 0xbf0dab8e, 0xbf07a43c, 0x3f6a30be, 0x3f5abfa2,
    0xbf7f8f52, 0x3f7a1657, 0xbdb95ec4, 0x3b944370, 0x3e88f111, 0x3e864b7f, 0x3f060526, 0x3f01ad98,
    0x3c962f56, 0x3f315a7d, 0x3f112a49, 0xbf68167f, 0x3f55802f, 0xbf59e357, 0x3f496807, 0xbf6ef86b,
    0xbf0bf630, 0x3e928fff, 0x3f3e987c, 0x3f6ca5ba, 0x3f731a2a, 0x3f776aa3, 0x3f7a4b11, 0x3f7c354e,
    0x3f7d7b4f, 0x3f7e53f2, 0x3f7ee3d7, 0x3f7f4362, 0x3f7f82d0, 0x3f7faceb, 0x3f7fc8dd, 0x3f7fdb69,
    0x3f7fe7b8, 0x3f7fefe3, 0x3f7ff54e, 0x3f7ff8e7, 0x3f7ffb4a, 0x3f7ffce0, 0x3f7ffded, 0x3f7ffea0,
    0x3f7fff16, 0x3f7fff65, 0x3f7fff99, 0x3f7fffbc, 0x3f7fffd3, 0x3f7fffe2, 0x3f7fffec, 0x3f7ffff3,
};
const uint32_t kHfLlama31Sin4095[64] = {
    0xbf7f7136, 0xbefbb8b6, 0x3cf8d51d, 0x3f68feed, 0x3cdedd32, 0xbf7421f2, 0x3e8a7441, 0x3f4e3ac3,
    0x3f26b870, 0xbe8845db, 0xbf39e545, 0x3f65ea68, 0xbf553a01, 0x3f591c86, 0xbececb0e, 0x3f04fc36,
    0xbd70167e, 0xbe5acf4e, 0x3f7ef2fe, 0x3f7fff54, 0xbf76ac61, 0xbf770971, 0x3f5a1db5, 0xbf5cb9a3,
    0xbf7ff4fc, 0xbf389cc8, 0x3f52dcd9, 0xbed8111a, 0x3f0d41b4, 0x3f0663f6, 0xbf1e060f, 0xbeb79ef1,
    0x3f565a15, 0x3f75498d, 0x3f2ae844, 0x3ec348de, 0x3ea07741, 0x3e837829, 0x3e570247, 0x3e2f974f,
    0x3e0f473b, 0x3de9b133, 0x3dbe826a, 0x3d9b4491, 0x3d7d0ca8, 0x3d4e2ebf, 0x3d27fbda, 0x3d08dafa,
    0x3cdefbc6, 0x3cb5a75c, 0x3c93fb7b, 0x3c711a33, 0x3c446895, 0x3c1fffc1, 0x3c0256b4, 0x3bd45a60,
    0x3bacfca2, 0x3b8ceb15, 0x3b6596d4, 0x3b3b0705, 0x3b185b18, 0x3af83933, 0x3aca3507, 0x3aa4b8b0,
};
const uint32_t kHfYarnSmallCos7[8] = {
    0x3f5bc11b, 0xbe83a0be, 0x3f840476, 0x3f910fc7, 0x3f91b8e5, 0x3f91be0a, 0x3f91be8d, 0x3f91be9b,
};
const uint32_t kHfYarnSmallSin7[8] = {
    0x3f3f8124, 0x3f8dfb24, 0x3ef6fe7a, 0x3de17b0f, 0x3ca339bf, 0x3bce79b0, 0x3b02964a, 0x3a252e5e,
};


int ulp_diff(float a, uint32_t b) {
  int32_t ia, ib = static_cast<int32_t>(b);
  std::memcpy(&ia, &a, 4);
  return std::abs(ia - ib);
}

// Returns how many entries differ, and checks none differs by more than `max_ulp`.
int compare_bits(const float* got, const uint32_t* want, size_t n, int max_ulp, const std::string& what) {
  int differ = 0;
  for (size_t i = 0; i < n; ++i) {
    int u = ulp_diff(got[i], want[i]);
    differ += u != 0;
    EXPECT_LE(u, max_ulp) << what << "[" << i << "]";
  }
  return differ;
}

}  // namespace

TEST(Rope, MatchesTransformersBitForBit) {
  // Llama 3.1 8B (llama3 rope): every inv_freq bit-exact, cos/sin within torch's cosf/sinf error (1 ulp).
  auto t = compute_rope(parse(llama31_v4()));
  EXPECT_EQ(compare_bits(t.inv_freq.data(), kHfLlama31InvFreq, 64, 0, "llama31 inv_freq"), 0);
  const int32_t pos4095 = 4095;
  std::vector<float> c(64), s(64);
  rope_cos_sin(t, &pos4095, 1, c.data(), s.data());
  compare_bits(c.data(), kHfLlama31Cos4095, 64, 1, "llama31 cos@4095");
  compare_bits(s.data(), kHfLlama31Sin4095, 64, 1, "llama31 sin@4095");

  // Qwen3 with yarn x4 over 32768.
  json j = minimal("qwen3");
  j["max_position_embeddings"] = 131072;
  j["rope_theta"] = 1e6;
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 32768}};
  t = compute_rope(parse(j));
  EXPECT_LE(compare_bits(t.inv_freq.data(), kHfYarnQwen3InvFreq, 64, 1, "yarn inv_freq"), 1);
  EXPECT_EQ(t.attention_scaling, static_cast<float>(1.138629436111989));  // HF's attention_scaling, in float32

  // yarn with explicit betas, truncate=false and the mscale pair: attention 0.9210423553163399.
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 40.0}, {"original_max_position_embeddings", 4096},
                       {"beta_fast", 16}, {"beta_slow", 2}, {"truncate", false}, {"mscale", 0.707},
                       {"mscale_all_dim", 1.0}};
  t = compute_rope(parse(j));
  EXPECT_LE(compare_bits(t.inv_freq.data(), kHfYarn2InvFreq, 64, 2, "yarn2 inv_freq"), 1);
  EXPECT_EQ(t.attention_scaling, static_cast<float>(0.9210423553163399));

  // Small llama with yarn (head_dim 16): cos/sin carry attention_scaling, as HF's do.
  j = minimal("llama");
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 512}};
  t = compute_rope(parse(j));
  const int32_t pos7 = 7;
  std::vector<float> c8(8), s8(8);
  rope_cos_sin(t, &pos7, 1, c8.data(), s8.data());
  compare_bits(c8.data(), kHfYarnSmallCos7, 8, 2, "yarn cos@7");
  compare_bits(s8.data(), kHfYarnSmallSin7, 8, 2, "yarn sin@7");
}
