// deepseek_v3 / deepseek_v2 config.json keys (transformers 5 DeepseekV3Config / DeepseekV2Config), parsed
// over what parse_model_config already read (vocab, hidden, heads, rope, token ids). Absent keys take the
// class defaults; values this engine cannot run stop here with a FormatError naming config.json and the key.
//
// DeepseekV3 (modeling_deepseek_v3.py): MLA attention, sigmoid router scores, selection on score +
// e_score_correction_bias with group-limited top-k (group score = sum of its top-2 biased scores), weights
// from the unbiased scores (normalised when norm_topk_prob) times routed_scaling_factor, one ungated shared
// expert of n_shared_experts * moe_intermediate_size, dense MLPs for layers < first_k_dense_replace. The hub
// keys scoring_func / topk_method / moe_layer_freq / num_nextn_predict_layers are not read by that class
// (its routing is fixed), so they are ignored here too.
// DeepseekV2 (modular_deepseek_v2.py): softmax scores, topk_method greedy or group_limited_greedy (group
// score = max), no correction bias and no renormalisation (norm_topk_prob is not read), weights times
// routed_scaling_factor; no mscale in the softmax scale; dense layers below first_k_dense_replace only
// (moe_layer_freq is not read); mlp_bias applies to the dense MLP and the shared experts.
#include <cmath>

#include "core/error.h"
#include "io/config_keys.h"
#include "io/model_config.h"

namespace am::io {

using nlohmann::json;

namespace {


double yarn_get_mscale(double scale, double mscale) { return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0; }

}  // namespace

json with_deepseek_defaults(const json& j) {
  if (!j.is_object() || !j.contains("model_type") || !j["model_type"].is_string()) return j;
  const std::string t = j["model_type"].get<std::string>();
  if (t != "deepseek_v3" && t != "deepseek_v2") return j;
  const bool v3 = t == "deepseek_v3";
  json out = j;
  auto def = [&](const char* k, int64_t v) {
    if (!out.contains(k)) out[k] = v;
  };
  def("vocab_size", v3 ? 129280 : 32000);
  def("hidden_size", v3 ? 7168 : 4096);
  def("intermediate_size", v3 ? 18432 : 11008);
  def("num_hidden_layers", v3 ? 61 : 32);
  def("num_attention_heads", v3 ? 128 : 32);
  return out;
}

void parse_deepseek_config(const json& j, const std::string& file, ModelConfig& c) {
  const bool v3 = c.model_type == "deepseek_v3";
  ConfigKeys k{j, file};
  constexpr int64_t kBig = int64_t(1) << 20;
  ModelConfig::Deepseek& d = c.ds;
  c.deepseek = true;
  // Token ids: DeepseekV3Config bos 0 / eos 1 (the generic parser used llama's 1 / 2, which are
  // DeepseekV2Config's, for absent keys).
  if (v3 && !j.contains("bos_token_id")) c.bos_token_id = 0;
  if (v3 && !j.contains("eos_token_id")) {
    c.eos_token_id = 1;
    c.eos_token_ids = {1};
  }
  if (v3) c.mlp_bias = false;  // DeepseekV3MLP has no biases (v2's LlamaMLP reads mlp_bias)
  // MLA sizes. q_lora_rank null: a plain q_proj (DeepSeek-V2-Lite).
  d.q_lora_rank = j.contains("q_lora_rank") ? (j.at("q_lora_rank").is_null() ? 0 : k.bounded("q_lora_rank", 0, 1, kBig))
                                            : 1536;
  d.kv_lora_rank = k.bounded("kv_lora_rank", 512, 1, kBig);
  d.qk_nope_head_dim = k.bounded("qk_nope_head_dim", 128, 0, kBig);
  d.qk_rope_head_dim = k.bounded("qk_rope_head_dim", 64, 2, kBig);
  d.v_head_dim = k.bounded("v_head_dim", 128, 1, kBig);
  if (d.qk_rope_head_dim % 2 != 0) k.bad("qk_rope_head_dim", "even (RoPE rotates pairs)");
  // HF sets config.head_dim = qk_rope_head_dim: the rotary embedding's dimension.
  if (k.present("head_dim") && k.bounded("head_dim", 0, 1, kBig) != d.qk_rope_head_dim)
    k.bad("head_dim", "qk_rope_head_dim (" + std::to_string(d.qk_rope_head_dim) + ") when present");
  c.head_dim = d.qk_rope_head_dim;
  if (c.rope.partial_rotary_factor != 1.0)
    throw FormatError(file + ": partial_rotary_factor is not supported for " + c.model_type +
                      " (qk_rope_head_dim is the rotary part)");
  // The keys are built per query head from kv_b_proj, so GQA grouping does not apply: HF's repeat_kv would
  // fail for num_key_value_heads != num_attention_heads.
  if (c.num_key_value_heads != c.num_attention_heads)
    k.bad("num_key_value_heads", "num_attention_heads (" + std::to_string(c.num_attention_heads) +
                                     "): MLA builds one key per query head");
  d.rope_interleave = v3 ? k.boolean("rope_interleave", true) : true;  // v2 rotates adjacent pairs (complex)
  // Softmax scale: qk_head_dim^-0.5, times mscale^2 when the RoPE is scaled and mscale_all_dim is set.
  d.softmax_scale = 1.0 / std::sqrt(static_cast<double>(d.qk_head_dim()));
  const char* rope_key = k.present("rope_parameters") ? "rope_parameters" : k.present("rope_scaling") ? "rope_scaling" : nullptr;
  if (v3 && rope_key && c.rope.rope_type != "default" && j.at(rope_key).is_object()) {
    const json& r = j.at(rope_key);
    const double all_dim = r.contains("mscale_all_dim") && r.at("mscale_all_dim").is_number() ? r.at("mscale_all_dim").get<double>() : 0.0;
    if (all_dim != 0.0) {
      const double m = yarn_get_mscale(c.rope.factor, all_dim);
      d.softmax_scale *= m * m;
    }
  }
  if (c.attention_bias) c.o_proj_bias = true;

  // MoE.
  const char* n_key = k.present("n_routed_experts") ? "n_routed_experts" : "num_local_experts";
  c.num_experts = k.bounded(n_key, v3 ? 256 : 64, 1, int64_t(1) << 16);
  if (!v3 && !k.present("num_experts_per_tok")) k.bad("num_experts_per_tok", "set (DeepseekV2Config has no default)");
  c.num_experts_per_tok = k.bounded("num_experts_per_tok", 8, 1, c.num_experts);
  c.moe_intermediate_size = k.bounded("moe_intermediate_size", v3 ? 2048 : 1407, 1, kBig);
  if (j.contains("n_shared_experts") && j.at("n_shared_experts").is_null())
    k.bad("n_shared_experts", "an integer (the model always adds its shared experts)");
  d.n_shared_experts = k.bounded("n_shared_experts", v3 ? 1 : 2, 1, 1 << 16);
  d.routed_scaling_factor = k.num("routed_scaling_factor", v3 ? 2.5 : 1.0);
  d.n_group = k.bounded("n_group", v3 ? 8 : 1, 1, c.num_experts);
  d.topk_group = k.bounded("topk_group", v3 ? 4 : 1, 1, d.n_group);
  c.norm_topk_prob = v3 ? k.boolean("norm_topk_prob", true) : false;
  const int64_t first_dense = k.bounded("first_k_dense_replace", v3 ? 3 : 0, 0, c.num_hidden_layers);
  if (v3) {
    d.sigmoid_scores = true;
    d.topk_method = "noaux_tc";
    if (c.num_experts / d.n_group < 2)
      k.bad("n_group", "at most n_routed_experts / 2 (a group's score is the sum of its top-2 experts)");
  } else {
    const std::string sf = k.str("scoring_func", "softmax");
    if (sf != "softmax") k.bad("scoring_func", "\"softmax\" (deepseek_v2)");
    d.topk_method = k.str("topk_method", "greedy");
    if (d.topk_method != "greedy" && d.topk_method != "group_limited_greedy")
      k.bad("topk_method", "\"greedy\" or \"group_limited_greedy\" (deepseek_v2)");
    if (d.topk_method == "group_limited_greedy")  // DeepseekV2Config defaults them to None: HF cannot route then
      for (const char* key : {"n_group", "topk_group"})
        if (!k.present(key)) k.bad(key, "set for topk_method group_limited_greedy");
  }
  if (d.topk_method != "greedy" && c.num_experts % d.n_group != 0)
    k.bad("n_group", "a divisor of n_routed_experts (" + std::to_string(c.num_experts) + ")");
  if (d.topk_method != "greedy" && c.num_experts_per_tok > d.topk_group * (c.num_experts / d.n_group))
    k.bad("num_experts_per_tok", "at most topk_group * n_routed_experts / n_group");
  // No load-balancing loss: DeepseekV3ForCausalLM (LlamaForCausalLM) adds none, and V2's aux_loss_alpha is
  // a training-time term transformers does not implement either.
  c.output_router_logits = false;
  c.router_aux_loss_coef = 0.0;
  c.moe_layer.assign(static_cast<size_t>(c.num_hidden_layers), false);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i)
    c.moe_layer[static_cast<size_t>(i)] = i >= first_dense;
}

}  // namespace am::io
