// Fail fast: config.json sanity caps and the checkpoint-header pre-check run before the model is allocated,
// so a config/checkpoint mismatch or an absurd size is reported in well under a second, naming the tensor
// (and both shapes) or the config key.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/model_config.h"
#include "models/hf_weights.h"
#include "config/recipe.h"
#include "train/trainer.h"

using namespace am;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

std::string golden(const std::string& name) { return std::string(AM_SOURCE_DIR) + "/tests/fixtures/golden/" + name; }

fs::path tmp_root() {
  static fs::path d = [] {
    fs::path p = fs::temp_directory_path() / ("am_hf_precheck_" + std::to_string(::getpid()));
    fs::create_directories(p);
    return p;
  }();
  return d;
}

json read_json(const fs::path& p) { return json::parse(std::ifstream(p)); }

// A copy of golden `name`'s model folder whose config.json is changed by `edit`.
std::string bad_copy(const std::string& name, const std::string& tag, const std::function<void(json&)>& edit) {
  fs::path d = tmp_root() / (name + "_" + tag);
  fs::create_directories(d);
  fs::copy_file(golden(name) + "/model/model.safetensors", d / "model.safetensors", fs::copy_options::overwrite_existing);
  json c = read_json(golden(name) + "/model/config.json");
  edit(c);
  std::ofstream(d / "config.json") << c.dump(2);
  return d.string();
}

double seconds(const std::function<void()>& fn) {
  auto t0 = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The FormatError message of the header pre-check on `dir` ("" when it passes), and its time.
std::string precheck_error(const std::string& dir, double* secs = nullptr) {
  std::string msg;
  double s = seconds([&] {
    try {
      auto cfg = io::load_model_config(dir + "/config.json");
      check_hf_weights_against_config(dir, cfg);
    } catch (const FormatError& e) {
      msg = e.what();
    }
  });
  if (secs) *secs = s;
  return msg;
}

// The error of constructing a Trainer on model folder `dir` (the dataset is the llama golden's).
std::string trainer_error(const std::string& dir, double* secs) {
  const std::string yaml = "seed: 1\ndevice: cpu\nmodel: {pretrained_model_name_or_path: " + dir +
                           "}\nstep_scheduler: {global_batch_size: 2, local_batch_size: 2, max_steps: 1}\n"
                           "dataset: {_target_: tokenized_jsonl, path_or_dataset: " + golden("llama") + "/data.jsonl}\n"
                           "checkpoint: {enabled: false, checkpoint_dir: " + (tmp_root() / "ck").string() + "}\n";
  std::string msg;
  *secs = seconds([&] {
    try {
      Recipe r = Recipe::from_string(yaml, "precheck.yaml");
      Trainer t(r, {.quiet = true});
    } catch (const Error& e) {
      msg = e.what();
    }
  });
  return msg;
}

// A safetensors file whose one tensor's header says `shape` (BF16), with its data as a sparse hole: a
// checkpoint of a large model that costs no disk and no time to write.
void write_sparse_safetensors(const fs::path& path, const std::string& name, const std::vector<int64_t>& shape) {
  uint64_t bytes = 2;
  for (int64_t d : shape) bytes *= static_cast<uint64_t>(d);
  json h = {{name, {{"dtype", "BF16"}, {"shape", shape}, {"data_offsets", {0, bytes}}}}};
  std::string hs = h.dump();
  while (hs.size() % 8) hs += ' ';
  {
    std::ofstream f(path, std::ios::binary);
    uint64_t n = hs.size();
    for (int i = 0; i < 8; ++i) f.put(static_cast<char>((n >> (8 * i)) & 0xff));
    f << hs;
  }
  fs::resize_file(path, 8 + hs.size() + bytes);
}

}  // namespace

TEST(HfPrecheck, EveryGoldenCheckpointPasses) {
  for (const char* name : {"llama", "llama_yarn_sched", "mistral", "mixtral", "olmoe", "qwen2", "qwen2_moe", "qwen3",
                           "qwen3_moe", "qwen3_moe_aux"}) {
    EXPECT_EQ(precheck_error(golden(name) + "/model"), "") << name;
  }
}

TEST(HfPrecheck, VocabMismatchNamesTensorAndBothShapes) {
  auto dir = bad_copy("llama", "vocab", [](json& c) { c["vocab_size"] = 301; });
  double s = 0;
  std::string e = precheck_error(dir, &s);
  EXPECT_NE(e.find("'model.embed_tokens.weight'"), std::string::npos) << e;
  EXPECT_NE(e.find("[300, 64]"), std::string::npos) << e;
  EXPECT_NE(e.find("[301, 64]"), std::string::npos) << e;
  EXPECT_LT(s, 2.0);
  // Untied: the lm_head too (the embedding is checked first, so break only the head).
  auto d2 = bad_copy("mistral", "tied", [](json& c) { c["tie_word_embeddings"] = true; });
  EXPECT_EQ(precheck_error(d2), "");  // a stored lm_head with tied embeddings is only unused
}

TEST(HfPrecheck, LayerAndMlpAndHeadMismatches) {
  std::string e = precheck_error(bad_copy("llama", "layers", [](json& c) { c["num_hidden_layers"] = 3; }));
  // Layer 2 does not exist in the file: its first registered tensor is named.
  EXPECT_NE(e.find("'model.layers.2."), std::string::npos) << e;
  EXPECT_NE(e.find("is missing"), std::string::npos) << e;
  e = precheck_error(bad_copy("llama", "inter", [](json& c) { c["intermediate_size"] = 96; }));
  EXPECT_NE(e.find("'model.layers.0.mlp.gate_proj.weight' has shape [128, 64] but config.json implies [96, 64]"),
            std::string::npos)
      << e;
  e = precheck_error(bad_copy("llama", "kv", [](json& c) { c["num_key_value_heads"] = 4; }));
  EXPECT_NE(e.find("'model.layers.0.self_attn.k_proj.weight'"), std::string::npos) << e;
  e = precheck_error(bad_copy("llama", "hd", [](json& c) { c["head_dim"] = 32; }));
  EXPECT_NE(e.find("'model.layers.0.self_attn.q_proj.weight' has shape [64, 64] but config.json implies [128, 64]"),
            std::string::npos)
      << e;
}

TEST(HfPrecheck, MoeExpertMismatches) {
  // mixtral: hub per-expert names; 4 experts in the file.
  std::string e = precheck_error(bad_copy("mixtral", "e", [](json& c) { c["num_local_experts"] = 5; }));
  EXPECT_NE(e.find("block_sparse_moe.gate.weight' has shape [4, 64] but config.json implies [5, 64]"), std::string::npos) << e;
  e = precheck_error(bad_copy("qwen2_moe", "mi", [](json& c) { c["moe_intermediate_size"] = 40; }));
  EXPECT_NE(e.find("experts"), std::string::npos) << e;
  EXPECT_NE(e.find("but config.json implies [40, "), std::string::npos) << e;
  e = precheck_error(bad_copy("qwen2_moe", "sh", [](json& c) { c["shared_expert_intermediate_size"] = 40; }));
  EXPECT_NE(e.find("shared_expert"), std::string::npos) << e;
}

TEST(HfPrecheck, AbsurdConfigSizesFailAtParse) {
  struct Case {
    const char* key;
    json value;
  };
  for (const Case& c : {Case{"head_dim", 1000000}, Case{"hidden_size", 10000000}, Case{"vocab_size", int64_t(1) << 40},
                        Case{"num_hidden_layers", 1000000}, Case{"intermediate_size", int64_t(1) << 33},
                        Case{"num_attention_heads", 0}, Case{"vocab_size", -5}}) {
    auto dir = bad_copy("llama", std::string("cap_") + c.key + "_" + c.value.dump(), [&](json& j) { j[c.key] = c.value; });
    double s = 0;
    std::string e = precheck_error(dir, &s);
    EXPECT_NE(e.find("config.json: key '" + std::string(c.key) + "'"), std::string::npos) << c.key << " -> " << e;
    EXPECT_LT(s, 2.0);
  }
  std::string e = precheck_error(bad_copy("qwen2_moe", "cap_experts", [](json& j) { j["num_experts"] = 10000000; }));
  EXPECT_NE(e.find("key 'num_experts'"), std::string::npos) << e;
  // Each key within its cap, but 2e13 parameters in all.
  e = precheck_error(bad_copy("llama", "cap_total", [](json& j) {
    j["hidden_size"] = 65536;
    j["num_attention_heads"] = 512;
    j["num_key_value_heads"] = 512;
    j["head_dim"] = 128;
    j["intermediate_size"] = 262144;
    j["num_hidden_layers"] = 4000;
  }));
  EXPECT_NE(e.find("parameters"), std::string::npos) << e;
  EXPECT_NE(e.find("config.json"), std::string::npos) << e;
}

TEST(HfPrecheck, TrainerFailsBeforeBuildingALargeModel) {
  // An 8B-parameter Llama config (building it would allocate ~64 GB of fp32 weights and gradients) whose
  // checkpoint's embedding has another vocabulary: the Trainer must stop on the headers, at once.
  fs::path d = tmp_root() / "big";
  fs::create_directories(d);
  json c = {{"model_type", "llama"},        {"vocab_size", 128256},        {"hidden_size", 4096},
            {"intermediate_size", 14336},   {"num_hidden_layers", 32},     {"num_attention_heads", 32},
            {"num_key_value_heads", 8},     {"max_position_embeddings", 8192}, {"tie_word_embeddings", false}};
  std::ofstream(d / "config.json") << c.dump(2);
  write_sparse_safetensors(d / "model.safetensors", "model.embed_tokens.weight", {128000, 4096});
  double s = 0;
  std::string e = trainer_error(d.string(), &s);
  EXPECT_NE(e.find("'model.embed_tokens.weight' has shape [128000, 4096] but config.json implies [128256, 4096]"),
            std::string::npos)
      << e;
  EXPECT_LT(s, 2.0);
  // The same folder with the right vocabulary: now the first missing tensor is named, still at once.
  c["vocab_size"] = 128000;
  std::ofstream(d / "config.json") << c.dump(2);
  e = trainer_error(d.string(), &s);
  EXPECT_NE(e.find("'model.layers.0."), std::string::npos) << e;  // the first tensor the file lacks
  EXPECT_NE(e.find("is missing"), std::string::npos) << e;
  EXPECT_LT(s, 2.0);
  // An absurd head_dim through the Trainer: the config's own check.
  c["head_dim"] = 1000000;
  std::ofstream(d / "config.json") << c.dump(2);
  e = trainer_error(d.string(), &s);
  EXPECT_NE(e.find("key 'head_dim'"), std::string::npos) << e;
  EXPECT_LT(s, 2.0);
  fs::remove_all(d);
}
