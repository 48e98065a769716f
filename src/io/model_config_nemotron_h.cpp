// nemotron_h config.json (transformers 5 NemotronHConfig): every key the engine reads, with that class's
// defaults for absent ones. The block pattern comes from `layers_block_type` (transformers 5 names
// linear_attention / full_attention / moe / mlp, or the hub's legacy mamba / attention), else the hub's
// `hybrid_override_pattern` string (M = Mamba2, * = attention, - = MLP, E = MoE). Legacy mamba_* aliases
// (mamba_n_groups, mamba_d_conv, mamba_dt_limit, mamba_conv_bias) are read as __post_init__ does. Values
// this engine cannot run (latent MoE, MTP layers, non-relu2 MLPs, non-silu Mamba) stop with a FormatError
// naming config.json and the key.
#include <cmath>
#include <limits>

#include "core/error.h"
#include "io/config_keys.h"
#include "io/model_config.h"

namespace am::io {

using nlohmann::json;

namespace {


std::optional<int64_t> token(const ConfigKeys& k, const char* key, std::optional<int64_t> def, std::vector<int64_t>* all) {
  if (!k.j.contains(key)) {
    if (all && def) all->push_back(*def);
    return def;
  }
  const json& v = k.j.at(key);
  if (v.is_null()) return std::nullopt;
  if (v.is_array()) {
    for (const json& e : v) {
      if (!e.is_number_integer()) k.bad(key, "an integer or a list of integers");
      if (all) all->push_back(e.get<int64_t>());
    }
    return v.empty() ? std::nullopt : std::optional<int64_t>(v[0].get<int64_t>());
  }
  const int64_t id = k.bounded(key, 0, 0);
  if (all) all->push_back(id);
  return id;
}

std::string block_pattern(const ConfigKeys& k) {
  const char* list_key = k.present("layers_block_type") ? "layers_block_type" : k.present("layer_types") ? "layer_types" : nullptr;
  std::string pat;
  if (list_key) {
    const json& v = k.j.at(list_key);
    if (!v.is_array() || v.empty()) k.bad(list_key, "a non-empty list of block types");
    for (const json& e : v) {
      const std::string t = e.is_string() ? e.get<std::string>() : "";
      if (t == "mamba" || t == "linear_attention") pat += 'M';
      else if (t == "attention" || t == "full_attention") pat += '*';
      else if (t == "mlp") pat += '-';
      else if (t == "moe") pat += 'E';
      else k.bad(list_key, "a list of 'linear_attention' / 'mamba', 'full_attention' / 'attention', 'mlp', 'moe'");
    }
    return pat;
  }
  if (k.present("hybrid_override_pattern")) {
    pat = k.str("hybrid_override_pattern", "");
    if (pat.empty() || pat.find_first_not_of("M*-E") != std::string::npos)
      k.bad("hybrid_override_pattern", "a non-empty string of M, *, -, E");
    return pat;
  }
  return "ME*-";  // NemotronHConfig's default: linear_attention, moe, full_attention, mlp
}

}  // namespace

ModelConfig parse_nemotron_h_config(const json& j, const std::string& file) {
  ConfigKeys k{j, file};
  ModelConfig c;
  c.raw = j;
  c.model_type = "nemotron_h";
  c.nemotron_h = true;
  auto& n = c.nh;
  n.pattern = block_pattern(k);
  c.num_hidden_layers = static_cast<int64_t>(n.pattern.size());
  c.vocab_size = k.bounded("vocab_size", 131072);
  c.hidden_size = k.bounded("hidden_size", 4096);
  c.intermediate_size = k.bounded("intermediate_size", 21504);
  c.num_attention_heads = k.bounded("num_attention_heads", 32);
  c.num_key_value_heads = k.present("num_key_value_heads") ? k.bounded("num_key_value_heads", 8) : j.contains("num_key_value_heads") ? c.num_attention_heads : 8;
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    k.bad("num_key_value_heads", "a divisor of num_attention_heads (" + std::to_string(c.num_attention_heads) + ")");
  c.head_dim = k.bounded("head_dim", 128);
  c.max_position_embeddings = k.bounded("max_position_embeddings", 4096);
  c.rms_norm_eps = k.num("layer_norm_epsilon", 1e-5);
  c.tie_word_embeddings = k.boolean("tie_word_embeddings", false);
  if (k.boolean("attention_bias", false)) k.bad("attention_bias", "false (NemotronHAttention has no biases)");
  c.mlp_bias = k.boolean("mlp_bias", false);
  if (c.mlp_bias) k.bad("mlp_bias", "false (biases on the relu2 MLPs are not implemented)");
  c.hidden_act = k.str("mlp_hidden_act", "relu2");
  if (c.hidden_act != "relu2") k.bad("mlp_hidden_act", "\"relu2\"");
  if (k.str("mamba_hidden_act", "silu") != "silu") k.bad("mamba_hidden_act", "\"silu\"");
  if (k.present("sliding_window")) k.bad("sliding_window", "null (sliding attention is not implemented for nemotron_h)");
  if (k.bounded("num_nextn_predict_layers", 0, 0) != 0) k.bad("num_nextn_predict_layers", "0 (MTP layers are not implemented)");
  if (k.present("moe_latent_size")) k.bad("moe_latent_size", "null (latent MoE projections are not implemented yet)");
  for (const char* d : {"attention_dropout", "hidden_dropout"})
    if (k.num(d, 0.0) != 0.0) c.unapplied_dropout.push_back(std::string(d) + "=" + j.at(d).dump());

  n.mamba_num_heads = k.bounded("mamba_num_heads", 128);
  n.mamba_head_dim = k.bounded("mamba_head_dim", 64);
  n.ssm_state_size = k.bounded("ssm_state_size", 128);
  n.n_groups = k.bounded(k.either("n_groups", "mamba_n_groups"), 8);
  n.conv_kernel = k.bounded(k.either("conv_kernel", "mamba_d_conv"), 4);
  n.use_conv_bias = k.boolean(k.either("use_conv_bias", "mamba_conv_bias"), true);
  n.use_bias = k.boolean("use_bias", false);
  if (n.mamba_num_heads % n.n_groups != 0) k.bad("n_groups", "a divisor of mamba_num_heads (" + std::to_string(n.mamba_num_heads) + ")");
  // HF's torch path (Zamba2MambaMixer.torch_forward) clamps dt = softplus(dt + dt_bias) from below at
  // time_step_min only; time_step_limit is read by the CUDA kernels' path alone, so it is not used here.
  n.time_step_min = k.num(k.either("time_step_min", "mamba_dt_min"), 0.001);
  if (!(n.time_step_min >= 0.0)) k.bad("time_step_min", "a number >= 0");
  n.time_step_max = std::numeric_limits<double>::infinity();

  c.num_experts = n.pattern.find('E') != std::string::npos ? k.bounded(k.either("n_routed_experts", "num_local_experts"), 8) : 0;
  c.moe_layer.assign(n.pattern.size(), false);
  for (size_t i = 0; i < n.pattern.size(); ++i) c.moe_layer[i] = n.pattern[i] == 'E';
  c.num_experts_per_tok = k.bounded("num_experts_per_tok", 2);
  c.moe_intermediate_size = k.bounded("moe_intermediate_size", 7688);
  n.moe_shared_expert_intermediate_size = k.bounded("moe_shared_expert_intermediate_size", 7688);
  if (k.bounded("n_shared_experts", 1, 0) != 1) k.bad("n_shared_experts", "1 (NemotronHMoE has one shared expert)");
  c.norm_topk_prob = k.boolean("norm_topk_prob", true);
  n.routed_scaling_factor = k.num("routed_scaling_factor", 1.0);
  n.n_group = k.bounded("n_group", 1);
  n.topk_group = k.bounded("topk_group", 1);
  if (c.num_experts > 0) {
    if (c.num_experts % n.n_group != 0) k.bad("n_group", "a divisor of n_routed_experts");
    if (n.topk_group > n.n_group) k.bad("topk_group", "at most n_group");
    if (c.num_experts_per_tok > c.num_experts) k.bad("num_experts_per_tok", "at most n_routed_experts");
    if (c.num_experts / n.n_group < 2) k.bad("n_group", "at most n_routed_experts / 2 (group score = top-2 sum)");
  }

  std::string dt = k.present("dtype") ? k.str("dtype", "") : k.str("torch_dtype", "");
  if (dt.rfind("torch.", 0) == 0) dt = dt.substr(6);
  c.torch_dtype = dt;
  c.bos_token_id = token(k, "bos_token_id", 1, nullptr);
  c.eos_token_id = token(k, "eos_token_id", 2, &c.eos_token_ids);
  c.pad_token_id = token(k, "pad_token_id", 0, nullptr);
  c.rope.rope_type = "default";  // NoPE: no rotary embedding anywhere
  return c;
}

}  // namespace am::io
