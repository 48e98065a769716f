// Nemotron-H / NVIDIA-Nemotron-3-Nano (HF NemotronHForCausalLM): a hybrid stack of single-mixer blocks
//   x0 = embed(ids)                                   [N, H]   model.embeddings (hub: backbone.embedding)
//   per layer i: x = x + mixer_i(RMSNorm(x))          model.layers.{i}.norm / .mixer
//     mixer = Mamba2 ('M', blocks/mamba2.h) | attention without RoPE ('*', blocks/attention.h with identity
//             rotary tables) | relu2 MLP ('-', blocks/mlp.h) | MoE ('E', blocks/nemotron_moe.h)
//   loss = CE(RMSNorm(x) W_lm^T, targets)             model.norm_f, lm_head
// Parameter names are transformers 5's (model.*); the hub's / save_pretrained's (backbone.*, per-expert
// tensors) are each parameter's first checkpoint layout. Runs on the CPU (fp32 reference) and on CUDA (bf16
// activations and working weights, fp32 master weights / gradients, fp32 or bf16 residual stream; the Mamba2 kernels
// of backend/cuda/mamba2.h, the MoE through the shared grouped-GEMM ops). Activation checkpointing keeps each
// layer's input only and recomputes the layer in backward. Incremental decode (automodel generate) on the CPU:
// forward_incremental with a NemotronHCache (Mamba2 conv / SSM states + the attention layers' KV cache); on CUDA
// generate recomputes the sequence per token. No LoRA, no expert parallelism.
#pragma once
#include <vector>

#include "models/blocks/attention.h"
#include "models/blocks/mamba2.h"
#include "models/blocks/mlp.h"
#include "models/blocks/nemotron_moe.h"
#include "models/kv_cache.h"
#include "models/model.h"

namespace am {

// The decode state of one sequence (HF's hybrid cache): per Mamba2 layer its conv window and SSM state, per
// attention layer its keys and values. Made by NemotronHLM::make_cache; every forward_incremental step extends it.
struct NemotronHCache {
  KvCache kv;                      // the attention ('*') layers only, in layer order (Layer::attn_slot); its length()
                                   // is the number of tokens the whole cache has seen
  std::vector<Mamba2State> mamba;  // [num_hidden_layers]; defined for the 'M' layers only
  int64_t length() const { return kv.length(); }
};

class NemotronHLM : public CausalLM {
 public:
  explicit NemotronHLM(const io::ModelConfig& cfg, const ModelParallel& mp = {});
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

  // ---- incremental decode (automodel generate: models/generate.h), CPU only ----
  // An empty cache with room for `capacity` tokens in the attention layers (grown with cache.kv.reserve).
  NemotronHCache make_cache(int64_t capacity) const;
  // Runs `ids`, the next n >= 1 tokens of the sequence held by `cache`, through every layer with the cached states
  // (Mamba2: blocks/mamba2.h mamba2_forward_cached; attention: attention_forward_cached; MLP / MoE: per token as in
  // training), extends the cache by n and returns the logits [1, V] of the last token ([n, V] of every new token with
  // all_logits), fp32 on the host. Each row equals the full forward's for that position (up to the BLAS blocking of
  // GEMMs over fewer rows). Throws DeviceError on CUDA (generate recomputes there), DataError for no tokens.
  Tensor forward_incremental(const std::vector<int32_t>& ids, NemotronHCache& cache, bool all_logits = false);

 private:
  struct Layer {
    char kind;  // 'M', '*', '-', 'E'
    int64_t attn_slot = -1;  // '*': this layer's index in NemotronHCache::kv (the attention layers counted in order)
    Param* norm;
    Mamba2Weights mamba;
    AttentionWeights attn;
    MlpWeights mlp;
    NemotronMoeWeights moe;
  };
  struct Saved {
    Tensor x, h, rstd;  // layer input [N, H] (residual dtype), RMSNorm(x) [N, H] (activation dtype), rstd [N] fp32
    Mamba2Saved mamba;
    AttentionSaved attn;
    MlpSaved mlp;
    NemotronMoeSaved moe;
  };
  // saved != nullptr: keep what backward needs (recompute: only each layer's input, Saved::x).
  // cache (inference, one sequence: b.B == 1, no segments): the mixers read and extend it (layer i: cache->mamba[i]
  // or slot attn_slot of cache->kv); the caller advances cache->kv once every layer is done.
  Tensor trunk_forward(const Batch& b, std::vector<Saved>* saved, Tensor* x_pre, Tensor* rstd_f, bool recompute = false,
                       NemotronHCache* cache = nullptr);
  // x_out = x + mixer(RMSNorm(x)) [N, H] in the residual dtype; s (when non-null) gets what backward needs.
  Tensor layer_forward(const Layer& L, const Batch& b, const Tensor& x, Saved* s, NemotronHCache* cache = nullptr,
                       size_t layer = 0);
  Tensor mixer_forward(const Layer& L, const Batch& b, const Tensor& h, Saved* s, NemotronHCache* cache = nullptr,
                       size_t layer = 0);
  Tensor mixer_backward(const Layer& L, const Batch& b, const Saved& s, const Tensor& dy);
  ops::AttnParams attn_params(const Batch& b) const;
  void nope_tables(int64_t N);
  Param& lm_head() { return lm_head_ ? *lm_head_ : *embed_; }
  // The weight of an RMSNorm / the embedding: its fp32 master copy under an fp32 residual stream with bf16 compute
  // (HF's fp32 params + autocast), else the working copy (on the CPU they are one tensor).
  const Tensor& wide_weight(const Param& p) const {
    return ex_.residual_dtype != ex_.act_dtype && p.value.defined() ? p.value : p.work;
  }
  Tensor to_act(const Tensor& t) const;  // t in the activation dtype (t itself when it already is)
  void hook_use(int unit, bool backward) { if (hooks_) hooks_->before_use(unit, backward); }
  void hook_fwd_done(int unit) { if (hooks_) hooks_->after_forward(unit); }
  void hook_bwd_done(int unit) { if (hooks_) hooks_->after_backward(unit); }

  io::ModelConfig cfg_;
  ParamHooks* hooks_ = nullptr;
  ExecContext ex_;
  ParamStore ps_;
  Param* embed_ = nullptr;    // [V, H]
  Param* norm_f_ = nullptr;   // [H]
  Param* lm_head_ = nullptr;  // [V, H]; nullptr when tied
  std::vector<Layer> layers_;
  Tensor cos_, sin_;  // [N, D/2] fp32 identity rotary tables (cos 1, sin 0) on the compute device: no RoPE
};

}  // namespace am
