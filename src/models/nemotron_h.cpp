#include "models/nemotron_h.h"

#include <cmath>

#include "core/error.h"
#include "core/log.h"
#include "models/decoder.h"  // lm_head_cross_entropy
#include "ops/ops.h"

namespace am {

NemotronHLM::NemotronHLM(const io::ModelConfig& cfg, const ModelParallel& mp) : cfg_(cfg), ex_(ExecContext::cpu()) {
  if (!cfg.nemotron_h) throw FormatError("config.json: model_type '" + cfg.model_type + "' is not nemotron_h");
  if (mp.ep_size > 1) throw UsageError("distributed.ep_size: expert parallelism is not implemented for nemotron_h");
  ps_.set_shapes_only(mp.shapes_only);
  const int64_t H = cfg.hidden_size;
  auto hub_of = [](const std::string& name) { return "backbone." + name.substr(6); };  // "model." -> "backbone."
  embed_ = &ps_.add("model.embeddings.weight", {cfg.vocab_size, H});
  add_hub_layout(*embed_, "backbone.embedding.weight");
  // (transformers 5 renames backbone. -> model. and embedding -> embeddings; accept the half-renamed name too)
  embed_->layouts.insert(embed_->layouts.begin() + 1, SourceLayout{SourceSlice{"backbone.embeddings.weight", 0, embed_->shape}});
  for (int64_t i = 0; i < cfg.num_hidden_layers; ++i) {
    const std::string pre = "model.layers." + std::to_string(i) + ".", hub = hub_of(pre);
    Layer L{};
    L.kind = cfg.nh.pattern[static_cast<size_t>(i)];
    L.norm = &ps_.add(pre + "norm.weight", {H});
    add_hub_layout(*L.norm, hub + "norm.weight");
    const std::string mp_ = pre + "mixer.", mh = hub + "mixer.";
    switch (L.kind) {
      case 'M': L.mamba = register_mamba2(ps_, mp_, mh, cfg); break;
      case '*':
        L.attn = register_attention(ps_, mp_, cfg);
        for (Param* p : {L.attn.q, L.attn.k, L.attn.v, L.attn.o}) add_hub_layout(*p, hub_of(p->name));
        break;
      case '-':
        L.mlp = register_mlp_ungated(ps_, mp_, H, cfg.intermediate_size);
        for (Param* p : {L.mlp.up, L.mlp.down}) add_hub_layout(*p, hub_of(p->name));
        break;
      case 'E': L.moe = register_nemotron_moe(ps_, mp_, mh, cfg); break;
      default: throw FormatError("config.json: layers_block_type: unknown block '" + std::string(1, L.kind) + "'");
    }
    layers_.push_back(L);
  }
  norm_f_ = &ps_.add("model.norm_f.weight", {H});
  add_hub_layout(*norm_f_, "backbone.norm_f.weight");
  if (!cfg.tie_word_embeddings) lm_head_ = &ps_.add("lm_head.weight", {cfg.vocab_size, H});
}

std::vector<std::vector<Param*>> NemotronHLM::param_units() {
  std::vector<std::vector<Param*>> units(layers_.size() + 1);
  for (Param& p : ps_.all()) {
    size_t u = 0;
    if (p.name.rfind("model.layers.", 0) == 0) u = std::stoul(p.name.substr(13)) + 1;
    units.at(u).push_back(&p);
  }
  return units;
}

void NemotronHLM::to_device(const ExecContext& ex) {
  // Every Nemotron-H mixer (Mamba2 scan and conv, relu2 MoE) has CPU kernels only: refuse before any weight moves.
  if (ex.on_cuda())
    throw DeviceError("model_type 'nemotron_h': the Mamba2 mixer, the relu2 MoE and the NoPE attention path are not "
                      "implemented on CUDA yet (run on the CPU: --device cpu)");
  if (ex.act_dtype != DType::F32 || ex.residual_dtype != DType::F32)
    throw DeviceError("model_type 'nemotron_h': only float32 compute is implemented (CPU reference kernels)");
  ps_.to_device(ex);
  ex_ = ex;
}

int64_t NemotronHLM::matmul_params_per_token() const {
  const auto& n = cfg_.nh;
  const int64_t H = cfg_.hidden_size, D = cfg_.head_dim;
  int64_t total = 0;
  for (const Layer& L : layers_) {
    switch (L.kind) {
      case 'M': total += H * (n.mamba_inner() + n.conv_dim() + n.mamba_num_heads) + n.mamba_inner() * H; break;
      case '*': total += H * D * (2 * cfg_.num_attention_heads + 2 * cfg_.num_key_value_heads); break;
      case '-': total += 2 * H * cfg_.intermediate_size; break;
      case 'E':
        total += cfg_.num_experts * H + cfg_.num_experts_per_tok * 2 * H * cfg_.moe_intermediate_size +
                 2 * H * n.moe_shared_expert_intermediate_size;
        break;
    }
  }
  return total + cfg_.vocab_size * H;
}

ops::AttnParams NemotronHLM::attn_params(const Batch& b) const {
  ops::AttnParams p;
  p.batch = b.B;
  p.seq = b.T;
  p.n_heads = cfg_.num_attention_heads;
  p.n_kv_heads = cfg_.num_key_value_heads;
  p.head_dim = cfg_.head_dim;
  p.scale = 1.0f / std::sqrt(static_cast<float>(cfg_.head_dim));  // NemotronHAttention: head_dim ** -0.5
  p.segment_ids = b.segment_ids.defined() ? &b.segment_ids : nullptr;
  return p;
}

void NemotronHLM::nope_tables(int64_t N) {
  // No RoPE: cos 1, sin 0 make the shared attention block's rotation the identity (x * 1 + rot(x) * 0 = x
  // exactly in fp32).
  const int64_t half = cfg_.head_dim / 2;
  if (cos_.defined() && cos_.dim(0) == N) return;
  cos_ = Tensor::empty({N, half}, DType::F32);
  sin_ = Tensor::zeros({N, half}, DType::F32);
  for (int64_t i = 0; i < N * half; ++i) cos_.f32()[i] = 1.f;
}

Tensor NemotronHLM::mixer_forward(const Layer& L, const Batch& b, const Tensor& h, Saved* s) {
  const Tensor* seg = b.segment_ids.defined() ? &b.segment_ids : nullptr;
  switch (L.kind) {
    case 'M': return mamba2_forward(ex_, L.mamba, cfg_, h, b.B, b.T, seg, s ? &s->mamba : nullptr);
    case '*': {
      const AttentionGeometry g{cfg_.num_attention_heads, cfg_.num_key_value_heads, cfg_.head_dim, cfg_.hidden_size,
                                static_cast<float>(cfg_.rms_norm_eps), &ex_};
      return attention_forward(L.attn, g, h, cos_, sin_, attn_params(b), s ? &s->attn : nullptr);
    }
    case '-': return mlp_forward(ex_, L.mlp, h, s ? &s->mlp : nullptr);
    default: return nemotron_moe_forward(ex_, L.moe, cfg_, h, s ? &s->moe : nullptr);
  }
}

Tensor NemotronHLM::mixer_backward(const Layer& L, const Batch& b, const Saved& s, const Tensor& dy) {
  const Tensor* seg = b.segment_ids.defined() ? &b.segment_ids : nullptr;
  switch (L.kind) {
    case 'M': return mamba2_backward(ex_, L.mamba, cfg_, s.mamba, b.B, b.T, seg, dy);
    case '*': {
      const AttentionGeometry g{cfg_.num_attention_heads, cfg_.num_key_value_heads, cfg_.head_dim, cfg_.hidden_size,
                                static_cast<float>(cfg_.rms_norm_eps), &ex_};
      return attention_backward(L.attn, g, s.attn, cos_, sin_, attn_params(b), dy);
    }
    case '-': return mlp_backward(ex_, L.mlp, s.mlp, dy);
    default: return nemotron_moe_backward(ex_, L.moe, cfg_, s.moe, dy);
  }
}

Tensor NemotronHLM::trunk_forward(const Batch& b, std::vector<Saved>* saved, Tensor* x_pre, Tensor* rstd_f) {
  if (ex_.on_cuda()) throw DeviceError("model_type 'nemotron_h': CPU only");
  const int64_t N = b.B * b.T, H = cfg_.hidden_size;
  nope_tables(N);
  hook_use(0, false);
  Tensor x = Tensor::empty({N, H}, DType::F32);
  ops::embedding_fwd(b.input_ids, embed_->work, x);
  if (saved) saved->assign(layers_.size(), Saved{});
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  for (size_t i = 0; i < layers_.size(); ++i) {
    hook_use(static_cast<int>(i) + 1, false);
    const Layer& L = layers_[i];
    Tensor h = Tensor::empty({N, H}, DType::F32), r = Tensor::empty({N}, DType::F32);
    ops::rmsnorm_fwd(x, L.norm->work, eps, h, r);
    Saved* s = saved ? &(*saved)[i] : nullptr;
    Tensor y = mixer_forward(L, b, h, s);
    if (s) {
      s->x = x;
      s->h = h;
      s->rstd = r;
    }
    Tensor xn = Tensor::empty({N, H}, DType::F32);  // a new tensor: the saved input stays intact
    ops::copy_(xn, x);
    ops::add_(xn, y);
    x = xn;
    hook_fwd_done(static_cast<int>(i) + 1);
  }
  Tensor xf = Tensor::empty({N, H}, DType::F32), rf = Tensor::empty({N}, DType::F32);
  ops::rmsnorm_fwd(x, norm_f_->work, eps, xf, rf);
  if (x_pre) *x_pre = x;
  if (rstd_f) *rstd_f = rf;
  return xf;
}

double NemotronHLM::forward_backward(const Batch& b, float grad_scale, const ForwardOptions& opt) {
  if (opt.activation_checkpointing && !warned_checkpointing_) {
    // Said once, not silently dropped: every layer's activations are kept for the backward.
    log::warn("distributed.activation_checkpointing: not implemented for nemotron_h; activations are kept");
    warned_checkpointing_ = true;
  }
  const int64_t N = b.B * b.T, H = cfg_.hidden_size;
  std::vector<Saved> saved;
  Tensor x_pre, rstd_f;
  Tensor xf = trunk_forward(b, &saved, &x_pre, &rstd_f);
  Tensor dxf = Tensor::empty({N, H}, DType::F32);
  Param& head = lm_head();
  const double loss = lm_head_cross_entropy(ex_, xf, head.work, b.targets, grad_scale, &dxf,
                                            head.grad.defined() ? &head.grad : nullptr, opt.loss_chunk_rows);
  Tensor dx = Tensor::empty({N, H}, DType::F32);
  ops::rmsnorm_bwd(x_pre, norm_f_->work, rstd_f, dxf, dx, norm_f_->grad);
  for (size_t i = layers_.size(); i-- > 0;) {
    hook_use(static_cast<int>(i) + 1, true);
    const Layer& L = layers_[i];
    // x_out = x + mixer(norm(x)):  dx = dx_out + norm_bwd(mixer_bwd(dx_out))
    Tensor dh = mixer_backward(L, b, saved[i], dx);
    Tensor dxi = Tensor::empty({N, H}, DType::F32);
    ops::rmsnorm_bwd(saved[i].x, L.norm->work, saved[i].rstd, dh, dxi, L.norm->grad);
    ops::add_(dxi, dx);
    dx = dxi;
    saved[i] = Saved{};
    hook_bwd_done(static_cast<int>(i) + 1);
  }
  if (embed_->grad.defined()) ops::embedding_bwd(b.input_ids, dx, embed_->grad);  // no padding_idx in NemotronH
  hook_bwd_done(0);
  return loss;
}

double NemotronHLM::forward_loss(const Batch& b, const ForwardOptions& opt) {
  Tensor xf = trunk_forward(b, nullptr, nullptr, nullptr);
  const double loss = lm_head_cross_entropy(ex_, xf, lm_head().work, b.targets, 0.f, nullptr, nullptr, opt.loss_chunk_rows);
  hook_fwd_done(0);
  return loss;
}

Tensor NemotronHLM::forward_logits(const Batch& b) {
  Tensor xf = trunk_forward(b, nullptr, nullptr, nullptr);
  Tensor logits = Tensor::empty({xf.dim(0), cfg_.vocab_size}, DType::F32);
  ops::linear_fwd(xf, lm_head().work, nullptr, logits);
  hook_fwd_done(0);
  return logits;
}

void register_nemotron_h() {
  register_model("nemotron_h", [](const io::ModelConfig& c, const ModelParallel& mp) { return std::make_unique<NemotronHLM>(c, mp); });
}

}  // namespace am
