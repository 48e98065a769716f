// The decoder-only causal LM shared by every family: llama, mistral, qwen2, qwen3, gemma3_text (dense) and
// qwen3_moe, qwen2_moe, mixtral, olmoe (MoE). Their differences are config flags: q/k/v/o biases, q/k norm
// (per head or over the whole projection), sliding windows, tied embeddings, RoPE type (and a second RoPE
// for the sliding layers), the MLP activation, Gemma's norms, and which layers are sparse:
//   x0 = embed(ids)                                  [N, H]   (gemma: * sqrt(H))
//   per layer: x = x + attn(RMSNorm(x)); x = x + ffn(RMSNorm(x))   ffn = gated MLP or MoE block
//   (gemma, sandwich_norm: x = x + RMSNorm(attn(RMSNorm(x))); x = x + RMSNorm(ffn(RMSNorm(x))), every norm
//    y = x_hat * (1 + w))
//   loss = CE(RMSNorm(x) W_lm^T, targets)             fused + chunked, never the full [N, V] logits
// x (the residual stream) is in ExecContext::residual_dtype; RMSNorm outputs and block outputs in act_dtype.
//        (+ router_aux_loss_coef * load-balancing loss when the config sets output_router_logits)
#pragma once
#include <memory>
#include <vector>

#include <deque>

#include "models/blocks/attention.h"
#include "models/blocks/lora.h"
#include "models/blocks/mla.h"
#include "models/blocks/mlp.h"
#include "models/blocks/moe.h"
#include "models/kv_cache.h"
#include "models/model.h"

namespace am {

class DecoderLM : public CausalLM {
 public:
  explicit DecoderLM(const io::ModelConfig& cfg, const ModelParallel& mp = {});
  const io::ModelConfig& config() const override { return cfg_; }
  ParamStore& params() override { return ps_; }
  std::vector<std::vector<Param*>> param_units() override;
  void set_param_hooks(ParamHooks* hooks) override { hooks_ = hooks; }
  void to_device(const ExecContext& ex) override;
  const ExecContext& exec() const override { return ex_; }
  double forward_backward(const Batch& b, float grad_scale, const ForwardOptions& opt) override;
  double forward_loss(const Batch& b, const ForwardOptions& opt) override;
  Tensor forward_logits(const Batch& b) override;
  int64_t matmul_params_per_token() const override;
  double take_aux_loss() override;
  nlohmann::json take_step_metrics() override;
  std::vector<const LoraAdapter*> enable_lora(const LoraSpec& spec, uint64_t seed, std::vector<std::string>* warnings) override;
  std::vector<const LoraAdapter*> lora_adapters() const override;

  // ---- inference with a KV cache (automodel generate: models/generate.h) ----
  // Runs `ids`, the next n >= 1 tokens of the sequence held by `cache` (positions cache.length() .. + n - 1),
  // through the same layers as training (layer_forward / trunk_forward with the cache), appends their keys
  // and values to the cache and advances it by n. Returns logits [1, V] of the last token, or [n, V] of every
  // new token with all_logits, in the activation dtype on the model's device. The cache must have been made
  // for this model's config and exec().
  Tensor forward_incremental(const std::vector<int32_t>& ids, KvCache& cache, bool all_logits = false);
  // to_device for inference only: frees the gradients and, on CUDA, keeps only the working copies (plus the
  // fp32 norm / embedding weights an fp32 residual stream reads), not the fp32 master weights. Training
  // is not possible afterwards.
  void to_device_inference(const ExecContext& ex);

 protected:
  struct Layer {
    Param* ln1;  // input_layernorm
    Param* ln2;  // the norm before the MLP: post_attention_layernorm (pre_feedforward_layernorm in gemma)
    Param* post_attn_norm = nullptr;  // gemma: post_attention_layernorm, on the attention output
    Param* post_ffn_norm = nullptr;   // gemma: post_feedforward_layernorm, on the MLP output
    AttentionWeights attn;
    bool is_mla = false;  // deepseek: multi-head latent attention instead of attn
    MlaWeights mla;
    bool is_moe = false;
    MlpWeights mlp;  // dense layers
    MoeWeights moe;  // sparse layers
    int moe_index = -1;  // among the sparse layers
    int64_t window;  // 0 = full attention
    bool sliding_rope = false;  // uses rope_sliding_ (gemma3: the local base on sliding layers)
  };
  struct LayerSaved {
    Tensor x;      // [N, H] layer input (residual dtype, as x1)
    Tensor h1;     // [N, H] RMSNorm(x)
    Tensor rstd1;  // [N]
    AttentionSaved attn;
    MlaSaved mla;
    Tensor x1;     // [N, H] after the attention residual
    Tensor h2, rstd2;
    MlpSaved mlp;
    MoeSaved moe;
    Tensor a, ra;  // sandwich norms: attention output before post_attention_layernorm [N, H], its rstd [N]
    Tensor m, rm;  // MLP output before post_feedforward_layernorm, its rstd
  };
  // The residual stream between layers: x, or x + delta while that add is pending (AM_FUSED_ADD_NORM,
  // blocks/norm.h): the next RMSNorm forms the sum in its own pass (ops::add_rmsnorm_fwd).
  struct Stream {
    Tensor x;      // [N, H] residual dtype
    Tensor delta;  // [N, H] activation dtype (a block's output, to be added to x); undefined: nothing pending
  };
  // x = in.x (+ in.delta, fused into the norm's pass), y = RMSNorm(x) with w's weight (activation dtype), rstd [N].
  void stream_norm(const Stream& in, const Param& w, Tensor& x, Tensor& y, Tensor& rstd) const;
  // Runs embedding + all layers + final norm. Fills saved (per layer) when non-null.
  // recompute: keep only each layer's input in saved[i].x (activation checkpointing).
  // kv (inference, one sequence: b.B == 1): attention reads and extends the cache (layer i uses its layer
  // i), which is advanced by b.T at the end.
  Tensor trunk_forward(const Batch& b, std::vector<LayerSaved>* saved, Tensor* xf_pre, Tensor* rstd_f,
                       bool recompute = false, KvCache* kv = nullptr);
  // One layer on the stream `in`; returns its output stream (with the MLP output still pending when the add is fused
  // into the next norm). x_in (non-null): receives the layer's input x as formed (activation checkpointing keeps it).
  Stream layer_forward(const Layer& L, const Stream& in, const Tensor& cos, const Tensor& sin,
                       const ops::AttnParams& p, LayerSaved* s, KvCache* kv = nullptr, int64_t layer = -1,
                       Tensor* x_in = nullptr);
  Tensor layer_backward(const Layer& L, const LayerSaved& s, const Tensor& cos, const Tensor& sin,
                        const ops::AttnParams& p, const Tensor& dy, const Tensor* dprobs_extra);
  // During forward_backward's forward: adds a sparse layer's routing of the real tokens to the utilisation counts
  // and (aux loss on) to the micro-batch's aux statistics, on the model's device (ops::moe_routing_stats).
  void record_routing(const Layer& L, const MoeSaved& s);
  // HF's load_balancing_loss_func over this micro-batch's sparse layers, padding excluded, from the statistics
  // record_routing accumulated (ops::moe_aux_loss): adds coef * aux * aux_loss_scale to aux_term_ and aux to
  // aux_raw_ (device scalars, no host sync) and returns d(scale * aux)/d probs [N, E] fp32 on the model's device
  // (the same for every layer).
  Tensor aux_loss(const Batch& b, float scale, float aux_loss_scale);
  // The device buffers of the MoE statistics (allocated on the model's device at first use).
  void ensure_moe_stats();
  MoeOptions moe_options() const;
  void embedding_backward(const Batch& b, const Tensor& dx);
  // fp32 residual stream under bf16 compute (ExecContext::residual_dtype != act_dtype): HF autocast numerics.
  bool wide_residual() const { return ex_.residual_dtype != ex_.act_dtype; }
  // RMSNorm and embedding weights: the fp32 master in that mode (as HF's fp32 params under autocast), else the
  // working copy.
  // (A frozen embedding under LoRA has no fp32 value on CUDA: its bf16 working copy is read instead.)
  const Tensor& wide_weight(const Param& p) const { return wide_residual() && p.value.defined() ? p.value : p.work; }
  // t in the activation dtype (the blocks' matmuls take bf16 gradients): t itself or a converted copy.
  Tensor to_act(const Tensor& t) const;
  // cos/sin [N, D/2] of the batch's positions, for the global RoPE or (sliding) the sliding layers' one.
  void rope_tables(const Batch& b, Tensor& cos, Tensor& sin, bool sliding = false);
  // The weight an RMSNorm of this model multiplies by (wide_weight, plus one when zero-centred).
  Tensor norm_w(const Param& p) const;
  // Embedding scale (gemma: sqrt(H) rounded to the embedding weight's dtype), 1 otherwise.
  float embed_scale() const;
  ops::AttnParams attn_params(const Batch& b, int64_t window) const;
  Param& lm_head();
  // logits [n, V] = rows [n, H] lm_head^T, soft-capped when the config asks (generate, eval logits)
  Tensor head_logits(const Tensor& rows);

  // ParamHooks calls (no-ops without data parallelism).
  void hook_use(int unit, bool backward) { if (hooks_) hooks_->before_use(unit, backward); }
  void hook_fwd_done(int unit) { if (hooks_) hooks_->after_forward(unit); }
  void hook_bwd_done(int unit) { if (hooks_) hooks_->after_backward(unit); }

  io::ModelConfig cfg_;
  ModelParallel mp_;
  ParamHooks* hooks_ = nullptr;
  ExecContext ex_;
  io::RopeTables rope_, rope_sliding_;
  struct RopeCache {
    std::vector<int32_t> pos;  // positions of the cached tables
    Tensor cos, sin;           // [N, D/2] fp32 on the model's device
  };
  RopeCache rope_cache_[2];  // global, sliding
  ParamStore ps_;
  Param* embed_ = nullptr;  // [V, H]
  Param* norm_ = nullptr;   // [H]
  Param* lm_head_ = nullptr;  // [V, H]; nullptr when tied to embed_
  std::vector<Layer> layers_;
  int n_moe_layers_ = 0;
  bool fake_balanced_gate_ = false;
  ops::GroupedRouterOptions ds_router_;  // deepseek's router (cfg_.deepseek)
  bool count_experts_ = false;                       // true during forward_backward's forward
  bool aux_stats_ = false;                           // ... and the aux loss wants this micro-batch's statistics
  const Tensor* seg_ = nullptr;                      // that micro-batch's segment_ids (real token: >= 0)
  // MoE statistics on the model's device (read by the host only in take_aux_loss / take_step_metrics):
  Tensor expert_counts_;     // [L_moe, E] int32: real tokens routed to each expert per sparse layer, since take_step_metrics()
  Tensor aux_f_, aux_p_;     // [E] int32, fp32: this micro-batch's selections / prob sums over its sparse layers
  Tensor aux_term_dev_;      // [1] fp32: sum of coef * aux * scale since take_aux_loss()
  Tensor aux_raw_dev_;       // [1] fp32: sum of aux since take_step_metrics()
  std::deque<LoraAdapter> lora_;  // deque: Param::lora pointers stay valid
  LoraPass lora_pass_;             // what the current forward is (training dropout or not)
  int64_t aux_calls_ = 0;  // aux losses since take_step_metrics()
};

// Fused lm_head + cross-entropy over row chunks: x [N, H], W [V, H]. Returns sum CE; when dx is non-null
// also assigns dx [N, H] and accumulates dW for loss * grad_scale.
// softcap > 0 (Gemma's final_logit_softcapping): the loss sees cap * tanh(logits / cap); on CUDA it runs the
// chunked op path (fp32 logits chunks) instead of the fused kernel.
double lm_head_cross_entropy(const ExecContext& ex, const Tensor& x, const Tensor& W, const Tensor& targets,
                             float grad_scale, Tensor* dx, Tensor* dW, int64_t chunk_rows, float softcap = 0.f);

}  // namespace am
