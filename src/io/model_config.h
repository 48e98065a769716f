// HF config.json -> ModelConfig for the dense families (llama, mistral, qwen2, qwen3) and, later, MoE.
// Reads both the hub (transformers v4) layout (`rope_theta`, `rope_scaling`) and transformers v5's
// (`rope_parameters`). The raw JSON is kept so the exported config.json is the source's, unchanged.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace am::io {

struct RopeParams {
  std::string rope_type = "default";  // default | linear | llama3 | yarn | longrope (Phi-3; v4 "su")
                                      // (dynamic: treated as default for training lengths)
  double rope_theta = 10000.0;
  double factor = 1.0;
  // llama3
  double low_freq_factor = 1.0, high_freq_factor = 4.0;
  // llama3, yarn; resolved at parse time: top-level key, else the rope dict's, else max_position_embeddings
  int64_t original_max_position_embeddings = 0;
  // yarn (`factor` is resolved too: absent -> max_position_embeddings / original_max_position_embeddings)
  double beta_fast = 32.0, beta_slow = 1.0;
  std::optional<double> attention_factor;
  std::optional<double> mscale, mscale_all_dim;
  bool truncate = true;
  double partial_rotary_factor = 1.0;
  // longrope: per-frequency divisors for sequences up to original_max_position_embeddings (short) and beyond
  // (long); `factor` resolved (absent: max_position_embeddings / original), attention_factor as for yarn.
  std::vector<double> short_factor, long_factor;
};

struct ModelConfig {
  std::string model_type;                 // llama | mistral | qwen2 | qwen3 | ...
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;                   // explicit `head_dim`, else hidden_size / num_attention_heads
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  RopeParams rope;
  bool tie_word_embeddings = false;
  bool attention_bias = false;            // qwen2: true (q/k/v only); llama: `attention_bias` (q/k/v/o)
  bool o_proj_bias = false;               // llama attention_bias also puts a bias on o_proj
  bool mlp_bias = false;
  bool qk_norm = false;                   // qwen3 (per head, weight [head_dim]); olmoe (see qk_norm_full)
  bool qk_norm_full = false;              // olmoe: RMSNorm over the whole q / k projection ([nh*D], [nkv*D])
  std::string hidden_act = "silu";
  std::vector<int64_t> sliding_window;    // per layer: 0 = full attention, else the window
  std::string torch_dtype;                // "bfloat16", "float32", ... ("" when absent)
  std::optional<int64_t> bos_token_id, eos_token_id, pad_token_id;  // eos: the first when a list is given
  std::vector<int64_t> eos_token_ids;     // every end-of-sequence id (config.json may give a list)
  // Mixture of experts (num_experts == 0: dense). moe_layer[i]: layer i has a sparse MoE block (else the
  // dense MLP with intermediate_size).
  int64_t num_experts = 0, num_experts_per_tok = 0;
  int64_t moe_intermediate_size = 0;            // each expert's intermediate size
  int64_t shared_expert_intermediate_size = 0;  // qwen2_moe: the sigmoid-gated shared expert
  bool norm_topk_prob = false;                  // renormalise the top-k routing weights to sum to 1
  bool output_router_logits = false;            // add router_aux_loss_coef * load-balancing loss
  double router_aux_loss_coef = 0.0;
  std::vector<bool> moe_layer;
  // Gemma 3 (gemma3_text):
  bool norm_plus_one = false;     // zero-centred RMSNorm weights: y = x_hat * (1 + w), every norm incl. q/k norms
  bool sandwich_norm = false;     // + post_attention_layernorm on the attention output and pre_/post_feedforward_
                                  //   layernorm around the MLP (post norms before each residual add)
  bool scale_embeddings = false;  // x0 = embed(ids) * sqrt(hidden_size), the factor rounded to the embedding dtype
  std::optional<double> query_pre_attn_scalar;  // attention scale query_pre_attn_scalar^-0.5 (else head_dim^-0.5)
  std::optional<RopeParams> rope_sliding;       // RoPE of the sliding-window layers, when it is not `rope`
  // Gemma 2 (both) and Gemma 3 (final only: its attention ignores attn_logit_softcapping, as HF's does):
  // x -> cap * tanh(x / cap) on the attention scores / the LM-head logits; 0 = off. CPU only.
  double attn_logit_softcapping = 0.0, final_logit_softcapping = 0.0;
  // Phi-3: fused projections in the checkpoint, kept fused (one GEMM each; LoRA targets them as PEFT does)
  bool fused_qkv = false;      // self_attn.qkv_proj [(nh + 2 nkv) D, H], rows q | k | v
  bool fused_gate_up = false;  // mlp.gate_up_proj [2 I, H], rows gate | up
  // Training-time dropout the config asks for and the engine does not apply (e.g. Phi-3's resid_pdrop > 0):
  // "key=value" each; the model warns once.
  std::vector<std::string> unapplied_dropout;
  // gpt_oss (GptOssConfig): a learned per-head attention sink logit (self_attn.sinks [nh]), a bias on the
  // router and on every expert projection, and the clamped SwiGLU on interleaved gate/up columns:
  //   gate = min(g, limit), up = clamp(u, -limit, limit), h = (up + 1) * gate * sigmoid(alpha * gate)
  bool attn_sinks = false;
  bool router_bias = false;
  bool expert_bias = false;
  bool gpt_oss_glu = false;
  double swiglu_alpha = 1.702, swiglu_limit = 7.0;
  // DeepSeek (deepseek_v2 / deepseek_v3; model_config_deepseek.cpp): multi-head latent attention (MLA),
  // sigmoid or softmax routing with group-limited top-k, and an ungated shared expert. head_dim is then
  // qk_rope_head_dim (the rotary dimension, as HF sets config.head_dim).
  struct Deepseek {
    int64_t q_lora_rank = 0;              // 0: q_proj [nh*dq, H]; else q_a_proj -> RMSNorm -> q_b_proj
    int64_t kv_lora_rank = 0, qk_nope_head_dim = 0, qk_rope_head_dim = 0, v_head_dim = 0;
    bool rope_interleave = true;          // rope dims stored as adjacent pairs
    double softmax_scale = 0.0;           // qk_head_dim^-0.5, times yarn mscale(factor, mscale_all_dim)^2
    bool sigmoid_scores = false;          // v3: sigmoid router scores; v2: softmax
    std::string topk_method = "greedy";   // greedy | group_limited_greedy (group max) | noaux_tc (group top-2 sum,
                                          // selection on score + e_score_correction_bias)
    int64_t n_group = 1, topk_group = 1;
    double routed_scaling_factor = 1.0;
    int64_t n_shared_experts = 0;         // shared expert intermediate = n_shared_experts * moe_intermediate_size
    int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  };
  bool deepseek = false;
  Deepseek ds;
  // nemotron_h (NemotronHConfig; model_config_nemotron_h.cpp): a hybrid stack of single-mixer blocks
  // x = x + mixer(RMSNorm(x)), the mixer per layer from `layers_block_type` / `hybrid_override_pattern`:
  //   'M' Mamba2 (linear_attention), '*' attention without RoPE (full_attention), '-' ungated relu2 MLP,
  //   'E' MoE (sigmoid router + e_score_correction_bias, ungated relu2 experts, one relu2 shared expert).
  struct NemotronH {
    std::string pattern;                  // one char per layer: M * - E
    int64_t mamba_num_heads = 128, mamba_head_dim = 64, ssm_state_size = 128, n_groups = 8, conv_kernel = 4;
    bool use_conv_bias = true;            // conv1d.bias
    bool use_bias = false;                // in_proj / out_proj biases of the Mamba2 mixer
    // dt = max(softplus(dt + dt_bias), time_step_min) (HF's torch path; time_step_max: no upper clamp there)
    double time_step_min = 0.001, time_step_max = 1e300;
    int64_t moe_shared_expert_intermediate_size = 7688;
    double routed_scaling_factor = 1.0;
    int64_t n_group = 1, topk_group = 1;
    int64_t mamba_inner() const { return mamba_num_heads * mamba_head_dim; }
    int64_t conv_dim() const { return mamba_inner() + 2 * n_groups * ssm_state_size; }
  };
  bool nemotron_h = false;
  NemotronH nh;
  nlohmann::json raw;                     // the file as read

  bool is_moe() const { return num_experts > 0; }
  bool layer_is_moe(int64_t i) const { return is_moe() && moe_layer[static_cast<size_t>(i)]; }

  int64_t n_rep() const { return num_attention_heads / num_key_value_heads; }
};

// Parses config.json; throws IoError / FormatError naming the file and the key.
ModelConfig load_model_config(const std::string& path);
// The same with field overrides set on the file's top level first (HF's AutoConfig.from_pretrained(path,
// **overrides): a given value replaces the field, dicts included). `raw` holds the result, so an exported
// config.json carries the overrides. `overrides_from` names them in errors ("recipe.yaml: model.config").
ModelConfig load_model_config(const std::string& path, const nlohmann::json& overrides, const std::string& overrides_from);
ModelConfig parse_model_config(const nlohmann::json& j, const std::string& source_name);
// deepseek_v2 / deepseek_v3 (model_config_deepseek.cpp): parses DeepseekV2Config / DeepseekV3Config keys
// over a config the generic parser filled (sizes, rope, token ids), with those classes' defaults.
void parse_deepseek_config(const nlohmann::json& j, const std::string& source_name, ModelConfig& c);
// j itself, or (deepseek_v2 / deepseek_v3) a copy with those classes' defaults for the absent keys the
// generic parser requires (vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads).
nlohmann::json with_deepseek_defaults(const nlohmann::json& j);
// nemotron_h (model_config_nemotron_h.cpp): the whole config from NemotronHConfig keys and class defaults.
ModelConfig parse_nemotron_h_config(const nlohmann::json& j, const std::string& source_name);

// inv_freq [head_dim/2] exactly as transformers' ROPE_INIT_FUNCTIONS compute it (float32 arithmetic),
// plus the attention scaling applied to cos/sin (1.0 except yarn).
struct RopeTables {
  std::vector<float> inv_freq;
  float attention_scaling = 1.0f;
  // longrope: inv_freq holds the short factors' frequencies, these the long ones, used (as HF's
  // dynamic_rope_update does) for a call whose largest position + 1 exceeds long_after.
  std::vector<float> inv_freq_long;
  int64_t long_after = 0;
};
RopeTables compute_rope(const ModelConfig& cfg);
// cos/sin for given positions: out [N, D/2] each, as HF: (pos * inv_freq).cos() * attention_scaling
// (longrope: the long frequencies when max(positions) + 1 > long_after)
void rope_cos_sin(const RopeTables& t, const int32_t* positions, int64_t n, float* cos_out, float* sin_out);

// Resolves `pretrained_model_name_or_path`: a folder as is; else a hub id ("org/name") looked up in the
// local HF cache ($HF_HOME/hub or ~/.cache/huggingface/hub; $HF_HUB_CACHE wins), snapshot named by
// refs/main or the newest. Never downloads. Throws IoError naming what was tried.
std::string resolve_model_path(const std::string& name_or_path);

}  // namespace am::io
