// The dense decoder-only causal LM shared by llama, mistral, qwen2 and qwen3 (their differences are
// config flags: q/k/v/o biases, q/k norm, sliding windows, tied embeddings, RoPE type):
//   x0 = embed(ids)                                  [N, H]
//   per layer: x = x + attn(RMSNorm(x)); x = x + mlp(RMSNorm(x))
//   loss = CE(RMSNorm(x) W_lm^T, targets)             fused + chunked, never the full [N, V] logits
#pragma once
#include <memory>
#include <vector>

#include "models/blocks/attention.h"
#include "models/blocks/mlp.h"
#include "models/model.h"

namespace am {

class DenseDecoder : public CausalLM {
 public:
  explicit DenseDecoder(const io::ModelConfig& cfg);
  const io::ModelConfig& config() const override { return cfg_; }
  ParamStore& params() override { return ps_; }
  void to_device(const ExecContext& ex) override;
  const ExecContext& exec() const override { return ex_; }
  double forward_backward(const Batch& b, float grad_scale, const ForwardOptions& opt) override;
  double forward_loss(const Batch& b, const ForwardOptions& opt) override;
  Tensor forward_logits(const Batch& b) override;
  int64_t matmul_params_per_token() const override;

 protected:
  struct Layer {
    Param* ln1;
    Param* ln2;
    AttentionWeights attn;
    MlpWeights mlp;
    int64_t window;  // 0 = full attention
  };
  struct LayerSaved {
    Tensor x;      // [N, H] layer input
    Tensor h1;     // [N, H] RMSNorm(x)
    Tensor rstd1;  // [N]
    AttentionSaved attn;
    Tensor x1;     // [N, H] after the attention residual
    Tensor h2, rstd2;
    MlpSaved mlp;
  };
  // Runs embedding + all layers + final norm. Fills saved (per layer) when non-null.
  // recompute: keep only each layer's input in saved[i].x (activation checkpointing).
  Tensor trunk_forward(const Batch& b, std::vector<LayerSaved>* saved, Tensor* xf_pre, Tensor* rstd_f,
                       bool recompute = false);
  Tensor layer_forward(const Layer& L, const Tensor& x, const Tensor& cos, const Tensor& sin,
                       const ops::AttnParams& p, LayerSaved* s);
  Tensor layer_backward(const Layer& L, const LayerSaved& s, const Tensor& cos, const Tensor& sin,
                        const ops::AttnParams& p, const Tensor& dy);
  void rope_tables(const Batch& b, Tensor& cos, Tensor& sin);
  ops::AttnParams attn_params(const Batch& b, int64_t window) const;
  Param& lm_head();

  io::ModelConfig cfg_;
  ExecContext ex_;
  io::RopeTables rope_;
  std::vector<int32_t> rope_pos_;  // positions of the cached tables below
  Tensor rope_cos_, rope_sin_;     // [N, D/2] fp32 on the model's device
  ParamStore ps_;
  Param* embed_ = nullptr;  // [V, H]
  Param* norm_ = nullptr;   // [H]
  Param* lm_head_ = nullptr;  // [V, H]; nullptr when tied to embed_
  std::vector<Layer> layers_;
};

// Fused lm_head + cross-entropy over row chunks: x [N, H], W [V, H]. Returns sum CE; when dx is non-null
// also assigns dx [N, H] and accumulates dW for loss * grad_scale.
double lm_head_cross_entropy(const ExecContext& ex, const Tensor& x, const Tensor& W, const Tensor& targets,
                             float grad_scale, Tensor* dx, Tensor* dW, int64_t chunk_rows);

}  // namespace am
