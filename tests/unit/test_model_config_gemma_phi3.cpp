// Phi-3 config.json: Phi3Config's defaults, LongRoPE (v4 "su" and "longrope"), partial rotary, the window.
// Gemma 3 (gemma3_text) config.json: the hub's transformers-4 layout (rope_theta + rope_scaling for the global
// layers, rope_local_base_freq for the sliding ones, sliding_window_pattern) and transformers 5's (rope_parameters
// per layer type, layer_types) describe the same model; Gemma3TextConfig's defaults; what is refused.
#include <gtest/gtest.h>

#include <cmath>

#include "core/error.h"
#include "io/model_config.h"

using namespace am;
using nlohmann::json;

namespace {

io::ModelConfig parse(const json& j) { return io::parse_model_config(j, "test/config.json"); }

json base() {
  return json{{"model_type", "gemma3_text"}, {"vocab_size", 300}, {"hidden_size", 64}, {"intermediate_size", 128},
              {"num_hidden_layers", 7}, {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"head_dim", 16}};
}

}  // namespace

TEST(ModelConfigGemma3, DefaultsAreGemma3TextConfigs) {
  auto c = parse(base());
  EXPECT_TRUE(c.norm_plus_one);
  EXPECT_TRUE(c.sandwich_norm);
  EXPECT_TRUE(c.scale_embeddings);
  EXPECT_TRUE(c.qk_norm);
  EXPECT_FALSE(c.qk_norm_full);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.hidden_act, "gelu_pytorch_tanh");
  EXPECT_EQ(*c.query_pre_attn_scalar, 256.0);
  EXPECT_EQ(c.max_position_embeddings, 131072);
  EXPECT_EQ(*c.bos_token_id, 2);
  EXPECT_EQ(*c.eos_token_id, 1);
  EXPECT_EQ(*c.pad_token_id, 0);
  EXPECT_EQ(c.rope.rope_theta, 1.0e6);
  ASSERT_TRUE(c.rope_sliding.has_value());
  EXPECT_EQ(c.rope_sliding->rope_theta, 1.0e4);
  // sliding_window_pattern 6: layers 6, 12, ... (1-based) are global; window 4096 elsewhere.
  const std::vector<int64_t> want{4096, 4096, 4096, 4096, 4096, 0, 4096};
  EXPECT_EQ(c.sliding_window, want);
  auto d = base();
  d.erase("head_dim");
  EXPECT_EQ(parse(d).head_dim, 256);  // Gemma3TextConfig's head_dim default, not hidden / heads
}

TEST(ModelConfigGemma3, V4AndV5LayoutsAgree) {
  json v4 = base();
  v4["rope_theta"] = 1.0e6;
  v4["rope_local_base_freq"] = 10000.0;
  v4["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 8.0}};
  v4["sliding_window"] = 512;
  v4["sliding_window_pattern"] = 3;
  json v5 = base();
  v5["rope_parameters"] = {{"full_attention", {{"rope_type", "linear"}, {"factor", 8.0}, {"rope_theta", 1.0e6}}},
                           {"sliding_attention", {{"rope_type", "default"}, {"rope_theta", 10000.0}}}};
  v5["sliding_window"] = 512;
  v5["layer_types"] = {"sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                       "sliding_attention", "full_attention", "sliding_attention"};
  auto a = parse(v4), b = parse(v5);
  EXPECT_EQ(a.sliding_window, b.sliding_window);
  EXPECT_EQ(a.sliding_window, (std::vector<int64_t>{512, 512, 0, 512, 512, 0, 512}));
  EXPECT_EQ(a.rope.rope_type, "linear");
  EXPECT_EQ(b.rope.rope_type, "linear");
  EXPECT_EQ(a.rope.factor, b.rope.factor);
  EXPECT_EQ(a.rope.rope_theta, b.rope.rope_theta);
  ASSERT_TRUE(a.rope_sliding && b.rope_sliding);
  EXPECT_EQ(a.rope_sliding->rope_type, "default");  // the v4 rope_scaling is the global layers' only
  EXPECT_EQ(b.rope_sliding->rope_type, "default");
  EXPECT_EQ(a.rope_sliding->rope_theta, b.rope_sliding->rope_theta);
  auto ta = io::compute_rope(a), tb = io::compute_rope(b);
  EXPECT_EQ(ta.inv_freq, tb.inv_freq);
}

TEST(ModelConfigGemma3, RefusesWhatIsNotImplemented) {
  json j = base();
  j["attn_logit_softcapping"] = nullptr;  // null is HF's "off"
  EXPECT_NO_THROW(parse(j));
  j["use_bidirectional_attention"] = true;
  EXPECT_THROW(parse(j), FormatError);
  json bad = base();
  bad["layer_types"] = {"sliding_attention", "chunked_attention", "full_attention", "full_attention",
                        "full_attention", "full_attention", "full_attention"};
  EXPECT_THROW(parse(bad), FormatError);
}

namespace {
json phi3_base() {
  return json{{"model_type", "phi3"}, {"vocab_size", 300}, {"hidden_size", 64}, {"intermediate_size", 96},
              {"num_hidden_layers", 2}, {"num_attention_heads", 4}};
}
}  // namespace

TEST(ModelConfigPhi3, DefaultsAndLongRope) {
  auto c = parse(phi3_base());
  EXPECT_TRUE(c.fused_qkv);
  EXPECT_TRUE(c.fused_gate_up);
  EXPECT_EQ(c.num_key_value_heads, 4);  // None -> num_attention_heads
  EXPECT_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_EQ(c.max_position_embeddings, 4096);
  EXPECT_EQ(*c.eos_token_id, 32000);
  EXPECT_EQ(*c.pad_token_id, 32000);
  EXPECT_EQ(c.sliding_window, (std::vector<int64_t>{0, 0}));
  EXPECT_TRUE(c.unapplied_dropout.empty());

  json j = phi3_base();
  j["max_position_embeddings"] = 131072;
  j["original_max_position_embeddings"] = 4096;  // top level, as the hub's Phi-3 configs have it
  j["partial_rotary_factor"] = 0.75;
  j["sliding_window"] = 2047;
  j["resid_pdrop"] = 0.1;
  std::vector<double> sf(6), lf(6);
  for (int i = 0; i < 6; ++i) sf[static_cast<size_t>(i)] = 1.0 + i, lf[static_cast<size_t>(i)] = 2.0 + i;
  j["rope_scaling"] = {{"type", "su"}, {"short_factor", sf}, {"long_factor", lf}};
  auto p = parse(j);
  EXPECT_EQ(p.rope.rope_type, "longrope");
  EXPECT_EQ(p.rope.original_max_position_embeddings, 4096);
  EXPECT_EQ(p.rope.factor, 32.0);
  EXPECT_EQ(p.sliding_window, (std::vector<int64_t>{2047, 2047}));
  EXPECT_EQ(p.unapplied_dropout, (std::vector<std::string>{"resid_pdrop=0.1"}));
  const auto t = io::compute_rope(p);
  ASSERT_EQ(t.inv_freq.size(), 6u);  // 16 x 0.75 = 12 rotary dims
  ASSERT_EQ(t.inv_freq_long.size(), 6u);
  EXPECT_FLOAT_EQ(t.inv_freq[0], 1.0f);
  EXPECT_FLOAT_EQ(t.inv_freq_long[0], 0.5f);
  EXPECT_NEAR(t.attention_scaling, std::sqrt(1.0 + std::log(32.0) / std::log(4096.0)), 1e-6);
  // short frequencies up to position 4095, long ones once a position reaches 4096
  int32_t pos[2] = {0, 4095};
  float c1[12], s1[12];
  io::rope_cos_sin(t, pos, 2, c1, s1);
  EXPECT_NEAR(c1[6], std::cos(4095.0 * t.inv_freq[0]) * t.attention_scaling, 1e-4);
  pos[1] = 4096;
  io::rope_cos_sin(t, pos, 2, c1, s1);
  EXPECT_NEAR(c1[6], std::cos(4096.0 * t.inv_freq_long[0]) * t.attention_scaling, 1e-4);

  j["rope_scaling"]["long_factor"] = std::vector<double>{1.0};
  EXPECT_THROW(io::compute_rope(parse(j)), FormatError);  // wrong length, named
  j["rope_scaling"].erase("long_factor");
  EXPECT_THROW(parse(j), FormatError);
}

TEST(ModelConfigGemma2, DefaultsSoftcapsAndAlternatingWindows) {
  json j = base();
  j["model_type"] = "gemma2";
  j["num_hidden_layers"] = 4;
  auto c = parse(j);
  EXPECT_FALSE(c.qk_norm);  // Gemma 2 has no q/k norms
  EXPECT_TRUE(c.norm_plus_one && c.sandwich_norm && c.scale_embeddings && c.tie_word_embeddings);
  EXPECT_FALSE(c.rope_sliding.has_value());
  EXPECT_EQ(c.attn_logit_softcapping, 50.0);
  EXPECT_EQ(c.final_logit_softcapping, 30.0);
  EXPECT_EQ(c.max_position_embeddings, 8192);
  EXPECT_EQ(c.sliding_window, (std::vector<int64_t>{4096, 0, 4096, 0}));
  j["attn_logit_softcapping"] = nullptr;  // null: off
  j["final_logit_softcapping"] = nullptr;
  auto off = parse(j);
  EXPECT_EQ(off.attn_logit_softcapping, 0.0);
  EXPECT_EQ(off.final_logit_softcapping, 0.0);
  j["final_logit_softcapping"] = -1.0;
  EXPECT_THROW(parse(j), FormatError);
  // Gemma 3: the final soft-cap applies; its attention ignores attn_logit_softcapping (as HF's does).
  json g3 = base();
  g3["final_logit_softcapping"] = 30.0;
  g3["attn_logit_softcapping"] = 50.0;
  auto c3 = parse(g3);
  EXPECT_EQ(c3.final_logit_softcapping, 30.0);
  EXPECT_EQ(c3.attn_logit_softcapping, 0.0);
}
