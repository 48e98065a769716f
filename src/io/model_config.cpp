// config.json -> ModelConfig. Defaults are those of transformers' config classes (LlamaConfig, MistralConfig,
// Qwen2Config, Qwen3Config) for a key that is absent, so a config that loads in transformers means the same
// model here. Other model types get the llama rules (the model registry decides whether it can build them).
#include "io/model_config.h"

#include "io/config_keys.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "io/json_bounded.h"

namespace am::io {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

enum class Family { Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2Moe, Qwen3Moe, Olmoe, Gemma2, Gemma3, Phi3, GptOss };

// Sanity caps on config.json sizes (the largest public models are far below each).
constexpr int64_t kMaxVocab = int64_t(1) << 24;         // 16.7M tokens
constexpr int64_t kMaxHidden = int64_t(1) << 17;        // 131072
constexpr int64_t kMaxIntermediate = int64_t(1) << 20;  // 1048576
constexpr int64_t kMaxLayers = int64_t(1) << 14;        // 16384
constexpr int64_t kMaxHeads = int64_t(1) << 14;
constexpr int64_t kMaxHeadDim = int64_t(1) << 14;
constexpr int64_t kMaxExperts = int64_t(1) << 16;
constexpr double kMaxParams = 1e12;

Family family_of(const std::string& t) {
  if (t == "mistral") return Family::Mistral;
  if (t == "qwen2") return Family::Qwen2;
  if (t == "qwen3") return Family::Qwen3;
  if (t == "mixtral") return Family::Mixtral;
  if (t == "qwen2_moe") return Family::Qwen2Moe;
  if (t == "qwen3_moe") return Family::Qwen3Moe;
  if (t == "olmoe") return Family::Olmoe;
  if (t == "gemma3_text") return Family::Gemma3;
  if (t == "gemma2") return Family::Gemma2;
  if (t == "phi3") return Family::Phi3;
  if (t == "gpt_oss") return Family::GptOss;
  return Family::Llama;
}

bool is_qwen(Family f) {
  return f == Family::Qwen2 || f == Family::Qwen3 || f == Family::Qwen2Moe || f == Family::Qwen3Moe;
}

using Keys = ConfigKeys;  // io/config_keys.h

RopeParams parse_rope_object(const Keys& top, const json& dict, const std::string& prefix, int64_t max_pos,
                             double theta_fallback);

// The RoPE dict: transformers v5 `rope_parameters` (plain, or per layer type: we take full_attention) wins
// over the v4 `rope_scaling`; rope_theta and partial_rotary_factor may sit inside it or at the top level.
RopeParams parse_rope(const Keys& top, int64_t max_pos, double theta_default) {
  const json& j = top.j;
  const std::string& file = top.file;
  static const json kEmpty = json::object();
  const json* rp = &kEmpty;
  std::string prefix = "rope_scaling.";
  if (top.present("rope_parameters")) {
    prefix = "rope_parameters.";
    rp = &j.at("rope_parameters");
    if (!rp->is_object()) top.bad("rope_parameters", "an object");
    if (rp->contains("full_attention") || rp->contains("sliding_attention")) {
      if (!rp->contains("full_attention") || !rp->at("full_attention").is_object())
        throw FormatError(file + ": key 'rope_parameters' is per layer type but has no 'full_attention' object");
      rp = &rp->at("full_attention");
      prefix = "rope_parameters.full_attention.";
    }
  } else if (top.present("rope_scaling")) {
    rp = &j.at("rope_scaling");
    if (!rp->is_object()) top.bad("rope_scaling", "an object or null");
  }
  return parse_rope_object(top, *rp, prefix, max_pos, top.num("rope_theta", theta_default));
}

// One RoPE dict (v5 rope_parameters[...] or v4 rope_scaling; may be empty). rope_theta: the dict's, else
// theta_fallback.
RopeParams parse_rope_object(const Keys& top, const json& dict, const std::string& prefix, int64_t max_pos,
                             double theta_fallback) {
  const std::string& file = top.file;
  Keys r{dict, file, prefix};
  RopeParams p;
  p.rope_theta = r.present("rope_theta") ? r.num("rope_theta") : theta_fallback;
  p.rope_type = r.present("rope_type") ? r.str("rope_type", "default") : r.str("type", "default");
  p.partial_rotary_factor =
      r.present("partial_rotary_factor") ? r.num("partial_rotary_factor") : top.num("partial_rotary_factor", 1.0);
  if (!(p.rope_theta > 0)) r.bad("rope_theta", "a positive number");
  if (!(p.partial_rotary_factor > 0 && p.partial_rotary_factor <= 1))
    throw FormatError(file + ": partial_rotary_factor must be in (0, 1]");

  const std::string& t = p.rope_type;
  // v5 moves the pre-extension context length into the rope dict; a top-level key (Phi-3 style) wins.
  auto original_max = [&] {
    if (top.present("original_max_position_embeddings")) return top.positive("original_max_position_embeddings");
    return r.positive("original_max_position_embeddings", max_pos);
  };
  if (t == "default" || t == "dynamic") {
    // "dynamic" (NTK) only changes inv_freq past max_position_embeddings; at training lengths it is default.
    p.factor = r.num("factor", 1.0);
  } else if (t == "linear") {
    p.factor = r.num("factor");
  } else if (t == "llama3") {
    p.factor = r.num("factor");
    p.low_freq_factor = r.num("low_freq_factor");
    p.high_freq_factor = r.num("high_freq_factor");
    p.original_max_position_embeddings = original_max();
    if (p.high_freq_factor == p.low_freq_factor)
      throw FormatError(file + ": " + prefix + "high_freq_factor must differ from low_freq_factor");
  } else if (t == "yarn") {
    p.original_max_position_embeddings = original_max();
    // No factor: the ratio of the extended to the original context (DeepSeek-V3 style).
    p.factor = r.present("factor") ? r.num("factor")
                                   : static_cast<double>(max_pos) / p.original_max_position_embeddings;
    p.attention_factor = r.opt_num("attention_factor");
    p.mscale = r.opt_num("mscale");
    p.mscale_all_dim = r.opt_num("mscale_all_dim");
    // transformers reads these with `or`: null and 0 both mean the default.
    double bf = r.num("beta_fast", 0.0), bs = r.num("beta_slow", 0.0);
    p.beta_fast = bf != 0 ? bf : 32.0;
    p.beta_slow = bs != 0 ? bs : 1.0;
    p.truncate = r.boolean("truncate", true);
  } else if (t == "longrope" || t == "su") {  // "su": the name of Phi-3's first hub configs
    p.rope_type = "longrope";
    p.original_max_position_embeddings = original_max();
    p.factor = r.present("factor") ? r.num("factor")
                                   : static_cast<double>(max_pos) / p.original_max_position_embeddings;
    p.attention_factor = r.opt_num("attention_factor");
    for (auto [key, out] : {std::pair{"short_factor", &p.short_factor}, std::pair{"long_factor", &p.long_factor}}) {
      if (!r.present(key) || !r.j.at(key).is_array()) r.bad_or_missing(key, "a list of numbers");
      for (const json& v : r.j.at(key)) {
        if (!v.is_number()) r.bad(key, "a list of numbers");
        out->push_back(v.get<double>());
      }
    }
  } else {
    throw FormatError(file + ": RoPE type '" + t + "' (key '" + prefix +
                      "rope_type') is not supported; supported: default, linear, dynamic, llama3, yarn, longrope");
  }
  if (!(p.factor > 0)) throw FormatError(file + ": key '" + prefix + "factor' must be positive");
  return p;
}

// Gemma 3's local RoPE: v5 rope_parameters.sliding_attention, else (v4) the default RoPE at
// rope_local_base_freq (the v4 rope_scaling applies to the global layers only).
RopeParams parse_rope_sliding(const Keys& top, int64_t max_pos) {
  static const json kEmpty = json::object();
  const double local_theta = top.num("rope_local_base_freq", 10000.0);
  if (top.present("rope_parameters")) {
    const json& rp = top.j.at("rope_parameters");
    if (rp.is_object() && rp.contains("sliding_attention") && rp.at("sliding_attention").is_object())
      return parse_rope_object(top, rp.at("sliding_attention"), "rope_parameters.sliding_attention.", max_pos,
                               local_theta);
  }
  return parse_rope_object(top, kEmpty, "", max_pos, local_theta);
}

// Per-layer window: transformers decides it from layer_types when present, else per family.
std::vector<int64_t> parse_sliding(const Keys& k, Family fam, int64_t n_layers) {
  std::vector<int64_t> out(static_cast<size_t>(n_layers), 0);
  if (fam == Family::Llama || fam == Family::Olmoe) return out;
  auto window_key = [&]() -> int64_t {
    // Absent -> the class default (4096; Mixtral and Qwen3-MoE: none); null or 0 -> no window.
    if (!k.j.contains("sliding_window"))
      return (fam == Family::Mixtral || fam == Family::Qwen3Moe) ? 0 : fam == Family::GptOss ? 128 : 4096;
    if (k.j.at("sliding_window").is_number_integer() && k.j.at("sliding_window").get<int64_t>() == 0) return 0;
    if (k.j.at("sliding_window").is_null()) return 0;
    return k.positive("sliding_window");
  };
  int64_t window = 0;
  const bool mistral_like = fam == Family::Mistral || fam == Family::Mixtral;
  if (fam == Family::Phi3) {  // Phi3Model: one window (sliding_window; null: none) on every layer
    window = k.j.contains("sliding_window") && !k.j.at("sliding_window").is_null() ? k.positive("sliding_window") : 0;
    std::fill(out.begin(), out.end(), window);
    return out;
  }
  if (fam == Family::Gemma2) {
    // Gemma2Config: sliding_window 4096 by default; without layer_types the even layers (0, 2, ...) slide.
    window = k.j.contains("sliding_window") ? (k.j.at("sliding_window").is_null() ? 0 : k.positive("sliding_window")) : 4096;
    if (!k.present("layer_types")) {
      for (int64_t i = 0; i < n_layers; ++i) out[static_cast<size_t>(i)] = (i + 1) % 2 ? window : 0;
      return out;
    }
  } else if (fam == Family::Gemma3) {
    // Gemma3TextConfig: sliding_window 4096 by default; without layer_types every
    // sliding_window_pattern-th layer (1-based; 6) is global, the others slide.
    window = k.j.contains("sliding_window") ? (k.j.at("sliding_window").is_null() ? 0 : k.positive("sliding_window")) : 4096;
    if (!k.present("layer_types")) {
      const int64_t pattern = k.positive("sliding_window_pattern", 6);
      for (int64_t i = 0; i < n_layers; ++i) out[static_cast<size_t>(i)] = (i + 1) % pattern ? window : 0;
      return out;
    }
  } else if (mistral_like || fam == Family::GptOss) window = window_key();
  else window = k.boolean("use_sliding_window", false) ? window_key() : 0;  // qwen2/qwen3 (+ MoE)
  if (k.present("layer_types")) {
    const json& lt = k.j.at("layer_types");
    if (!lt.is_array() || static_cast<int64_t>(lt.size()) != n_layers)
      k.bad("layer_types", "a list of " + std::to_string(n_layers) + " layer types (one per layer)");
    for (int64_t i = 0; i < n_layers; ++i) {
      const json& v = lt[static_cast<size_t>(i)];
      if (v == "sliding_attention") out[static_cast<size_t>(i)] = window;
      else if (v != "full_attention")
        throw FormatError(k.file + ": layer_types[" + std::to_string(i) + "] = " + v.dump() +
                          " is not supported (full_attention or sliding_attention)");
    }
    return out;
  }
  if (fam == Family::GptOss) {
    // GptOssConfig's default layer_types: sliding_attention on even layers, full_attention on odd ones.
    for (int64_t i = 0; i < n_layers; i += 2) out[static_cast<size_t>(i)] = window;
  } else if (mistral_like) {
    std::fill(out.begin(), out.end(), window);
  } else {
    int64_t from = k.integer("max_window_layers", 28);
    for (int64_t i = std::max<int64_t>(from, 0); i < n_layers; ++i) out[static_cast<size_t>(i)] = window;
  }
  return out;
}

// MoE keys with the defaults of Qwen3MoeConfig / Qwen2MoeConfig / MixtralConfig / OlmoeConfig
// (transformers 5.17; tests/fixtures/golden/moe_config_defaults.json). Which layers are sparse follows the
// decoder layers' constructors: Qwen: not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0;
// Mixtral and OLMoE: every layer.
void parse_moe(const Keys& k, Family fam, ModelConfig& c) {
  if (fam != Family::Mixtral && fam != Family::Qwen2Moe && fam != Family::Qwen3Moe && fam != Family::Olmoe &&
      fam != Family::GptOss)
    return;
  const char* n_key = k.present("num_experts") ? "num_experts" : "num_local_experts";
  int64_t n_def = fam == Family::Mixtral ? 8 : fam == Family::Qwen2Moe ? 60 : fam == Family::Olmoe ? 64 : 128;
  c.num_experts = k.present(n_key) ? k.size(n_key, kMaxExperts) : n_def;
  c.num_experts_per_tok = k.size("num_experts_per_tok",
                                 fam == Family::Mixtral ? 2 : (fam == Family::Qwen2Moe || fam == Family::GptOss) ? 4 : 8,
                                 kMaxExperts);
  if (c.num_experts_per_tok > c.num_experts)
    throw FormatError(k.file + ": num_experts_per_tok (" + std::to_string(c.num_experts_per_tok) +
                      ") is larger than the number of experts (" + std::to_string(c.num_experts) + ")");
  // Mixtral, OLMoE and GPT-OSS size their experts with intermediate_size.
  if (fam == Family::Mixtral || fam == Family::Olmoe || fam == Family::GptOss) c.moe_intermediate_size = c.intermediate_size;
  else c.moe_intermediate_size = k.size("moe_intermediate_size", fam == Family::Qwen2Moe ? 1408 : 768, kMaxIntermediate);
  if (fam == Family::Qwen2Moe)
    c.shared_expert_intermediate_size = k.size("shared_expert_intermediate_size", 5632, kMaxIntermediate);
  // GPT-OSS: softmax over the k selected router logits = the full softmax's top-k renormalised.
  c.norm_topk_prob = (fam == Family::Mixtral || fam == Family::GptOss) ? true : k.boolean("norm_topk_prob", false);
  c.output_router_logits = k.boolean("output_router_logits", false);
  c.router_aux_loss_coef = k.num("router_aux_loss_coef", fam == Family::Olmoe ? 0.01 : 0.001);
  if (fam == Family::Mixtral && k.num("router_jitter_noise", 0.0) != 0.0)
    throw FormatError(k.file + ": key 'router_jitter_noise' > 0 (random router noise in training) is not supported");
  c.moe_layer.assign(static_cast<size_t>(c.num_hidden_layers), true);
  if (fam == Family::Qwen2Moe || fam == Family::Qwen3Moe) {
    int64_t step = k.positive("decoder_sparse_step", 1);
    std::vector<int64_t> dense_only;
    if (k.present("mlp_only_layers")) {
      const json& v = k.j.at("mlp_only_layers");
      if (!v.is_array()) k.bad("mlp_only_layers", "a list of layer indices");
      for (const json& e : v) {
        if (!e.is_number_integer()) k.bad("mlp_only_layers", "a list of layer indices");
        dense_only.push_back(e.get<int64_t>());
      }
    }
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
      bool listed = std::find(dense_only.begin(), dense_only.end(), i) != dense_only.end();
      c.moe_layer[static_cast<size_t>(i)] = !listed && (i + 1) % step == 0;
    }
  }
}

// The parameter count the sizes imply (in double: no overflow) must be plausible, so that a config whose
// every key is within its cap but whose product is absurd fails before the model is allocated.
void check_param_count(const ModelConfig& c, const std::string& file) {
  const double V = double(c.vocab_size), H = double(c.hidden_size), D = double(c.head_dim);
  const double nh = double(c.num_attention_heads), nkv = double(c.num_key_value_heads);
  double n = V * H * (c.tie_word_embeddings ? 1 : 2) + H;
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    n += 2 * H * nh * D + 2 * H * nkv * D + 2 * H;
    if (c.layer_is_moe(i))
      n += double(c.num_experts) * (H + 3 * H * double(c.moe_intermediate_size)) +
           3 * H * double(c.shared_expert_intermediate_size) + H;
    else
      n += 3 * H * double(c.intermediate_size);
  }
  if (n > kMaxParams) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.3g", n);
    throw FormatError(file + ": these sizes imply " + buf + " parameters (vocab_size " +
                      std::to_string(c.vocab_size) + ", hidden_size " + std::to_string(c.hidden_size) +
                      ", num_hidden_layers " + std::to_string(c.num_hidden_layers) + ", head_dim " +
                      std::to_string(c.head_dim) + ", intermediate_size " + std::to_string(c.intermediate_size) +
                      (c.is_moe() ? ", num_experts " + std::to_string(c.num_experts) + ", moe_intermediate_size " +
                                        std::to_string(c.moe_intermediate_size)
                                  : std::string()) +
                      "), more than the 1e12 this engine accepts");
  }
}

std::optional<int64_t> token_id(const Keys& k, const char* key, std::optional<int64_t> def,
                                std::vector<int64_t>* all = nullptr) {
  if (!k.j.contains(key)) {
    if (all && def) all->push_back(*def);
    return def;
  }
  const json& v = k.j.at(key);
  if (v.is_null()) return std::nullopt;
  if (v.is_array()) {  // e.g. Llama 3.1 instruct lists several end-of-sequence ids
    for (const json& e : v) {
      if (!e.is_number_integer()) k.bad(key, "an integer or a list of integers");
      if (all) all->push_back(e.get<int64_t>());
    }
    return v.empty() ? std::nullopt : std::optional<int64_t>(v[0].get<int64_t>());
  }
  int64_t id = k.integer(key);
  if (all) all->push_back(id);
  return id;
}

}  // namespace

ModelConfig parse_model_config(const json& j_file, const std::string& source_name) {
  if (!j_file.is_object()) throw FormatError(source_name + ": config must be a JSON object");
  if (j_file.contains("model_type") && j_file["model_type"] == "nemotron_h") return parse_nemotron_h_config(j_file, source_name);
  // deepseek: DeepseekV3Config / DeepseekV2Config defaults for absent size keys (model_config_deepseek.cpp);
  // raw stays the file as read.
  const json j = with_deepseek_defaults(j_file);
  Keys k{j, source_name, ""};
  ModelConfig c;
  c.raw = j_file;
  c.model_type = k.str("model_type", "");
  if (c.model_type.empty()) k.missing("model_type");
  const Family fam = family_of(c.model_type);

  c.vocab_size = k.size("vocab_size", kMaxVocab);
  c.hidden_size = k.size("hidden_size", kMaxHidden);
  c.intermediate_size = k.size("intermediate_size", kMaxIntermediate);
  c.num_hidden_layers = k.size("num_hidden_layers", kMaxLayers);
  c.num_attention_heads = k.size("num_attention_heads", kMaxHeads);
  // Absent key -> the class default (mistral 8, qwen 32); null -> num_attention_heads, as transformers does.
  int64_t kv_default = 0;
  switch (fam) {
    case Family::Mistral: case Family::Mixtral: kv_default = 8; break;
    case Family::Qwen2: case Family::Qwen3: kv_default = 32; break;
    case Family::Qwen3Moe: kv_default = 4; break;
    case Family::Qwen2Moe: kv_default = 16; break;
    case Family::Gemma2: case Family::Gemma3: kv_default = 4; break;
    case Family::GptOss: kv_default = 8; break;
    default: break;
  }
  if (j.contains("num_key_value_heads") && !j.at("num_key_value_heads").is_null())
    c.num_key_value_heads = k.size("num_key_value_heads", kMaxHeads);
  else
    c.num_key_value_heads = (!j.contains("num_key_value_heads") && kv_default) ? kv_default : c.num_attention_heads;
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    throw FormatError(source_name + ": num_attention_heads (" + std::to_string(c.num_attention_heads) +
                      ") must be a multiple of num_key_value_heads (" + std::to_string(c.num_key_value_heads) +
                      (j.contains("num_key_value_heads") ? ")" : ", the " + c.model_type + " default)"));
  c.head_dim = k.size("head_dim", fam == Family::Qwen3 ? 128 : (fam == Family::Gemma2 || fam == Family::Gemma3) ? 256 : fam == Family::GptOss ? 64 : c.hidden_size / c.num_attention_heads,
                      kMaxHeadDim);
  if (fam == Family::Olmoe && c.head_dim * c.num_attention_heads != c.hidden_size)
    throw FormatError(source_name + ": olmoe needs head_dim * num_attention_heads == hidden_size (its q_norm spans hidden_size)");
  if (c.head_dim <= 0) throw FormatError(source_name + ": hidden_size is smaller than num_attention_heads");
  const bool deepseek = c.model_type == "deepseek_v3" || c.model_type == "deepseek_v2";  // model_config_deepseek.cpp
  const int64_t max_pos_default = (fam == Family::Mistral || fam == Family::Mixtral) ? 4096 * 32
                                  : is_qwen(fam)            ? 32768
                                  : fam == Family::Olmoe    ? 4096
                                  : fam == Family::Gemma3   ? 131072
                                  : fam == Family::Gemma2   ? 8192
                                  : fam == Family::Phi3     ? 4096
                                  : fam == Family::GptOss   ? 131072
                                  : c.model_type == "deepseek_v3" ? 4096
                                                            : 2048;
  c.max_position_embeddings = k.positive("max_position_embeddings", max_pos_default);
  c.rms_norm_eps = k.num("rms_norm_eps", (fam == Family::Mixtral || fam == Family::Olmoe || fam == Family::Phi3 || fam == Family::GptOss) ? 1e-5 : 1e-6);
  // Gemma's config classes name the MLP activation `hidden_activation` (and ignore `hidden_act`).
  const bool gemma_fam = fam == Family::Gemma2 || fam == Family::Gemma3;
  c.hidden_act = gemma_fam ? k.str("hidden_activation", "gelu_pytorch_tanh") : k.str("hidden_act", "silu");
  c.tie_word_embeddings = k.boolean("tie_word_embeddings", gemma_fam);

  switch (fam) {
    case Family::Llama:  // attention_bias: q, k, v and o; mlp_bias: gate, up, down
      c.attention_bias = c.o_proj_bias = k.boolean("attention_bias", false);
      c.mlp_bias = k.boolean("mlp_bias", false);
      break;
    case Family::Mistral:  // no biases anywhere
      break;
    case Family::Qwen2:  // q, k, v always biased; o never
      c.attention_bias = true;
      c.o_proj_bias = false;
      break;
    case Family::Qwen3:  // attention_bias applies to q, k, v and o; per-head RMSNorm on q and k
    case Family::Qwen3Moe:
      c.attention_bias = c.o_proj_bias = k.boolean("attention_bias", false);
      c.qk_norm = true;
      break;
    case Family::Mixtral:  // no biases anywhere
      break;
    case Family::Qwen2Moe:  // q, k, v biased unless qkv_bias: false; o never
      c.attention_bias = k.boolean("qkv_bias", true);
      c.o_proj_bias = false;
      break;
    case Family::Olmoe:  // attention_bias on q/k/v/o; RMSNorm over the whole q and k projections
      c.attention_bias = c.o_proj_bias = k.boolean("attention_bias", false);
      c.qk_norm = c.qk_norm_full = true;
      if (k.present("clip_qkv"))
        throw FormatError(source_name + ": key 'clip_qkv' (clamping q/k/v) is not supported; set it to null");
      break;
    case Family::Phi3:  // Phi3Config: fused qkv_proj and gate_up_proj, no biases
      c.fused_qkv = c.fused_gate_up = true;
      for (const char* d : {"resid_pdrop", "embd_pdrop", "attention_dropout"})
        if (k.num(d, 0.0) != 0.0) c.unapplied_dropout.push_back(std::string(d) + "=" + j.at(d).dump());
      break;
    case Family::Gemma2:  // Gemma2Config (transformers 5.17): Gemma 3 without q/k norms, with both soft-caps
    case Family::Gemma3:  // Gemma3TextConfig (transformers 5.17)
      c.attention_bias = c.o_proj_bias = k.boolean("attention_bias", false);
      c.qk_norm = fam == Family::Gemma3;  // per head, zero-centred like every Gemma norm
      c.norm_plus_one = c.sandwich_norm = c.scale_embeddings = true;
      c.query_pre_attn_scalar = k.num("query_pre_attn_scalar", 256.0);
      if (!(*c.query_pre_attn_scalar > 0)) k.bad("query_pre_attn_scalar", "a positive number");
      if (k.boolean("use_bidirectional_attention", false))
        throw FormatError(source_name + ": key 'use_bidirectional_attention' true (an encoder, e.g. EmbeddingGemma) "
                          "is not supported: this engine trains causal LMs");
      // null (or absent in Gemma 3) = off. Gemma3Attention never passes attn_logit_softcapping to its
      // attention function: HF ignores it there, and so do we.
      c.final_logit_softcapping = k.num("final_logit_softcapping", fam == Family::Gemma2 ? 30.0 : 0.0);
      if (fam == Family::Gemma2) c.attn_logit_softcapping = k.num("attn_logit_softcapping", 50.0);
      for (const char* cap : {"attn_logit_softcapping", "final_logit_softcapping"})
        if (k.present(cap) && !(k.num(cap) > 0)) k.bad(cap, "a positive number or null");
      break;
    case Family::GptOss:  // attention_bias (default true) on q/k/v/o; sinks; biased router and experts
      c.attention_bias = c.o_proj_bias = k.boolean("attention_bias", true);
      c.attn_sinks = c.router_bias = c.expert_bias = c.gpt_oss_glu = true;
      c.swiglu_alpha = k.num("swiglu_alpha", 1.702);
      c.swiglu_limit = k.num("swiglu_limit", 7.0);
      if (!(c.swiglu_limit > 0)) k.bad("swiglu_limit", "a positive number");
      if (!std::isfinite(c.swiglu_alpha)) k.bad("swiglu_alpha", "a finite number");
      if (k.num("attention_dropout", 0.0) != 0.0)
        throw FormatError(source_name + ": key 'attention_dropout' > 0 (dropout on the attention probabilities) is not supported");
      break;
  }
  parse_moe(k, fam, c);
  check_param_count(c, source_name);

  if (fam == Family::GptOss && !k.present("rope_parameters") && !k.present("rope_scaling")) {
    // GptOssConfig.__post_init__: no RoPE dict means its yarn default (theta: default_theta 150000).
    json with = j;
    with["rope_parameters"] = {{"rope_type", "yarn"}, {"factor", 32.0}, {"beta_fast", 32.0}, {"beta_slow", 1.0},
                               {"truncate", false}, {"original_max_position_embeddings", 4096}};
    c.rope = parse_rope(Keys{with, source_name, ""}, c.max_position_embeddings, 150000.0);
  } else {
    if (fam == Family::Gemma2 && k.j.contains("attn_logit_softcapping") && k.j.at("attn_logit_softcapping").is_null())
    c.attn_logit_softcapping = 0.0;  // explicit null: off (k.num's default applies only to an absent key)
  if (fam == Family::Gemma2 && k.j.contains("final_logit_softcapping") && k.j.at("final_logit_softcapping").is_null())
    c.final_logit_softcapping = 0.0;
  c.rope = parse_rope(k, c.max_position_embeddings,
                        (fam == Family::Mixtral || fam == Family::Gemma3) ? 1.0e6 : fam == Family::GptOss ? 150000.0 : 10000.0);
  }
  if (fam == Family::Gemma3) c.rope_sliding = parse_rope_sliding(k, c.max_position_embeddings);
  c.sliding_window = parse_sliding(k, fam, c.num_hidden_layers);

  std::string dt = k.present("dtype") ? k.str("dtype", "") : k.str("torch_dtype", "");
  if (dt.rfind("torch.", 0) == 0) dt = dt.substr(6);
  c.torch_dtype = dt;

  const bool llama_ids = fam == Family::Llama || fam == Family::Mistral || fam == Family::Mixtral;  // bos 1, eos 2
  const bool gemma = fam == Family::Gemma2 || fam == Family::Gemma3;  // bos 2, eos 1, pad 0
  const bool phi3 = fam == Family::Phi3;     // bos 1, eos 32000, pad 32000
  c.bos_token_id = token_id(k, "bos_token_id", (llama_ids || phi3) ? std::optional<int64_t>(1) : gemma ? std::optional<int64_t>(2) : std::nullopt);
  std::optional<int64_t> eos_def = llama_ids ? std::optional<int64_t>(2)
                                   : gemma ? std::optional<int64_t>(1)
                                   : phi3 ? std::optional<int64_t>(32000)
                                   : fam == Family::Olmoe ? std::optional<int64_t>(50279) : std::nullopt;
  c.eos_token_id = token_id(k, "eos_token_id", eos_def, &c.eos_token_ids);
  c.pad_token_id = token_id(k, "pad_token_id", fam == Family::Olmoe ? std::optional<int64_t>(1) : gemma ? std::optional<int64_t>(0)
                                                : phi3 ? std::optional<int64_t>(32000) : std::nullopt);
  if (deepseek) parse_deepseek_config(j, source_name, c);
  return c;
}

ModelConfig load_model_config(const std::string& path) {
  std::error_code ec;
  std::string file = fs::is_directory(path, ec) ? (fs::path(path) / "config.json").string() : path;
  std::ifstream in(file, std::ios::binary);
  if (!in) throw IoError(file + ": cannot open: " + std::strerror(errno));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const json j = parse_json_bounded(quote_nonfinite(text), file + ": not valid JSON");
  return parse_model_config(j, file);
}

ModelConfig load_model_config(const std::string& path, const json& overrides, const std::string& overrides_from) {
  if (overrides.empty()) return load_model_config(path);
  std::error_code ec;
  std::string file = fs::is_directory(path, ec) ? (fs::path(path) / "config.json").string() : path;
  std::ifstream in(file, std::ios::binary);
  if (!in) throw IoError(file + ": cannot open: " + std::strerror(errno));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  json j = parse_json_bounded(quote_nonfinite(text), file + ": not valid JSON");
  if (!j.is_object()) throw FormatError(file + ": expected a JSON object");
  for (auto it = overrides.begin(); it != overrides.end(); ++it) j[it.key()] = it.value();
  return parse_model_config(j, file + " with the overrides of " + overrides_from);
}

}  // namespace am::io
