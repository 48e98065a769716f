// MoE config.json defaults: a config that leaves a key out must mean what transformers' config class means.
// tests/fixtures/golden/moe_config_defaults.json holds each class's defaults as transformers 5.17 dumped them
// (tools/make_hf_goldens.py); here a minimal config per model_type (only the keys the reader requires) is
// parsed and every resolved MoE / attention default compared with that dump.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "io/model_config.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace am;

namespace {

json defaults_of(const std::string& cls) {
  std::ifstream f(fs::path(AM_SOURCE_DIR) / "tests/fixtures/golden/moe_config_defaults.json");
  return json::parse(f).at(cls);
}

// Only the keys the reader cannot default, taken from the class defaults.
io::ModelConfig parse_minimal(const json& d, const std::string& model_type) {
  json j = {{"model_type", model_type}};
  for (const char* k : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"})
    j[k] = d.at(k);
  return io::parse_model_config(j, model_type + "/config.json");
}

int64_t experts_of(const json& d) {
  return d.contains("num_experts") && !d["num_experts"].is_null() ? d["num_experts"].get<int64_t>()
                                                                   : d["num_local_experts"].get<int64_t>();
}

void expect_common(const io::ModelConfig& c, const json& d, const char* cls) {
  EXPECT_EQ(c.num_experts, experts_of(d)) << cls;
  EXPECT_EQ(c.num_experts_per_tok, d["num_experts_per_tok"].get<int64_t>()) << cls;
  EXPECT_EQ(c.output_router_logits, d["output_router_logits"].get<bool>()) << cls;
  EXPECT_DOUBLE_EQ(c.router_aux_loss_coef, d["router_aux_loss_coef"].get<double>()) << cls;
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, d["rms_norm_eps"].get<double>()) << cls;
  EXPECT_EQ(c.max_position_embeddings, d["max_position_embeddings"].get<int64_t>()) << cls;
  const int64_t kv = d["num_key_value_heads"].is_null() ? d["num_attention_heads"].get<int64_t>()
                                                         : d["num_key_value_heads"].get<int64_t>();
  EXPECT_EQ(c.num_key_value_heads, kv) << cls;
  EXPECT_DOUBLE_EQ(c.rope.rope_theta, d["rope_parameters"]["rope_theta"].get<double>()) << cls;
  EXPECT_EQ(c.tie_word_embeddings, d["tie_word_embeddings"].get<bool>()) << cls;
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) EXPECT_EQ(c.sliding_window[static_cast<size_t>(i)], 0) << cls;
}

TEST(MoeConfigDefaults, Qwen3Moe) {
  const json d = defaults_of("Qwen3MoeConfig");
  auto c = parse_minimal(d, "qwen3_moe");
  expect_common(c, d, "Qwen3MoeConfig");
  EXPECT_EQ(c.moe_intermediate_size, d["moe_intermediate_size"].get<int64_t>());
  EXPECT_EQ(c.norm_topk_prob, d["norm_topk_prob"].get<bool>());
  EXPECT_EQ(c.attention_bias, d["attention_bias"].get<bool>());
  EXPECT_TRUE(c.qk_norm);
  EXPECT_FALSE(c.qk_norm_full);
  EXPECT_EQ(c.head_dim, c.hidden_size / c.num_attention_heads);  // no head_dim in the class defaults
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) EXPECT_TRUE(c.layer_is_moe(i));  // sparse step 1, no dense
}

TEST(MoeConfigDefaults, Qwen2Moe) {
  const json d = defaults_of("Qwen2MoeConfig");
  auto c = parse_minimal(d, "qwen2_moe");
  expect_common(c, d, "Qwen2MoeConfig");
  EXPECT_EQ(c.moe_intermediate_size, d["moe_intermediate_size"].get<int64_t>());
  EXPECT_EQ(c.shared_expert_intermediate_size, d["shared_expert_intermediate_size"].get<int64_t>());
  EXPECT_EQ(c.norm_topk_prob, d["norm_topk_prob"].get<bool>());
  EXPECT_EQ(c.attention_bias, d["qkv_bias"].get<bool>());
  EXPECT_FALSE(c.o_proj_bias);
}

TEST(MoeConfigDefaults, Mixtral) {
  const json d = defaults_of("MixtralConfig");
  auto c = parse_minimal(d, "mixtral");
  expect_common(c, d, "MixtralConfig");
  EXPECT_EQ(c.moe_intermediate_size, c.intermediate_size);  // Mixtral sizes experts with intermediate_size
  EXPECT_TRUE(c.norm_topk_prob);                             // always renormalised
  EXPECT_EQ(c.bos_token_id, d["bos_token_id"].get<int64_t>());
  EXPECT_EQ(c.eos_token_id, d["eos_token_id"].get<int64_t>());
}

TEST(MoeConfigDefaults, Olmoe) {
  const json d = defaults_of("OlmoeConfig");
  auto c = parse_minimal(d, "olmoe");
  expect_common(c, d, "OlmoeConfig");
  EXPECT_EQ(c.moe_intermediate_size, c.intermediate_size);
  EXPECT_EQ(c.norm_topk_prob, d["norm_topk_prob"].get<bool>());
  EXPECT_TRUE(c.qk_norm_full);
  EXPECT_EQ(c.eos_token_id, d["eos_token_id"].get<int64_t>());
  EXPECT_EQ(c.pad_token_id, d["pad_token_id"].get<int64_t>());
}

TEST(MoeConfigDefaults, DenseLayersFromSparseStepAndMlpOnlyLayers) {
  json j = {{"model_type", "qwen3_moe"}, {"vocab_size", 10}, {"hidden_size", 8}, {"intermediate_size", 16},
            {"num_hidden_layers", 6}, {"num_attention_heads", 2}, {"num_key_value_heads", 1},
            {"num_experts", 4}, {"num_experts_per_tok", 2}, {"decoder_sparse_step", 2}, {"mlp_only_layers", {3}}};
  auto c = io::parse_model_config(j, "config.json");
  // HF: sparse iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0
  const bool want[] = {false, true, false, false, false, true};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(c.layer_is_moe(i), want[i]) << "layer " << i;
}

TEST(MoeConfigDefaults, BadMoeKeysAreNamed) {
  json j = {{"model_type", "mixtral"}, {"vocab_size", 10}, {"hidden_size", 8}, {"intermediate_size", 16},
            {"num_hidden_layers", 2}, {"num_attention_heads", 2}, {"num_key_value_heads", 1}, {"num_local_experts", 2},
            {"num_experts_per_tok", 3}};
  try {
    io::parse_model_config(j, "m/config.json");
    FAIL() << "expected an error";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("num_experts_per_tok"), std::string::npos) << e.what();
  }
  j["num_experts_per_tok"] = 2;
  j["router_jitter_noise"] = 0.1;
  EXPECT_THROW(io::parse_model_config(j, "m/config.json"), std::exception);
}

}  // namespace
