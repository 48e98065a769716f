#include "models/nemotron_h.h"

#include <cmath>

#include "core/error.h"
#include "models/decoder.h"  // lm_head_cross_entropy
#include "ops/ops.h"
#include "ops/trace.h"

namespace am {

NemotronHLM::NemotronHLM(const io::ModelConfig& cfg, const ModelParallel& mp) : cfg_(cfg), ex_(ExecContext::cpu()) {
  if (!cfg.nemotron_h) throw FormatError("config.json: model_type '" + cfg.model_type + "' is not nemotron_h");
  if (mp.ep_size > 1) throw UsageError("distributed.ep_size: expert parallelism is not implemented for nemotron_h");
  ps_.set_shapes_only(mp.shapes_only);
  ps_.set_host_grads(mp.host_grads);
  const int64_t H = cfg.hidden_size;
  auto hub_of = [](const std::string& name) { return "backbone." + name.substr(6); };  // "model." -> "backbone."
  embed_ = &ps_.add("model.embeddings.weight", {cfg.vocab_size, H});
  add_hub_layout(*embed_, "backbone.embedding.weight");
  // (transformers 5 renames backbone. -> model. and embedding -> embeddings; accept the half-renamed name too)
  embed_->layouts.insert(embed_->layouts.begin() + 1, SourceLayout{SourceSlice{"backbone.embeddings.weight", 0, embed_->shape}});
  int64_t n_attn = 0;
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
        L.attn_slot = n_attn++;
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
  // CPU: the fp32 reference. CUDA: bf16 activations and working weights, fp32 master weights and gradients, the
  // residual stream in the activation dtype or fp32 (as DecoderLM). Still refused elsewhere: LoRA (enable_lora),
  // expert parallelism (the constructor), incremental decode on CUDA (no state-carrying scan kernel: generate
  // recomputes there).
  if (!ex.on_cuda() && (ex.act_dtype != DType::F32 || ex.residual_dtype != DType::F32))
    throw DeviceError("model_type 'nemotron_h': the CPU computes in float32 only (the reference kernels)");
  if (ex.on_cuda() && ex.residual_dtype != ex.act_dtype && ex.residual_dtype != DType::F32)
    throw DeviceError(std::string("model_type 'nemotron_h': residual dtype ") + dtype_name(ex.residual_dtype) +
                      ": expected the activation dtype or float32");
  ps_.to_device(ex);
  ex_ = ex;
  cos_ = sin_ = Tensor();  // the identity rotary tables live on the old device
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
  p.segment_ids = attention_segment_ids(b);
  return p;
}

void NemotronHLM::nope_tables(int64_t N) {
  // No RoPE: cos 1, sin 0 make the shared attention block's rotation the identity (x * 1 + rot(x) * 0 = x
  // exactly in fp32, and a bf16 x stores back unchanged).
  const int64_t half = cfg_.head_dim / 2;
  const DeviceType dev = ex_.on_cuda() ? DeviceType::CUDA : DeviceType::CPU;
  if (cos_.defined() && cos_.dim(0) == N && cos_.device() == dev) return;
  Tensor c = Tensor::empty({N, half}, DType::F32), z = Tensor::zeros({N, half}, DType::F32);
  for (int64_t i = 0; i < N * half; ++i) c.f32()[i] = 1.f;
  cos_ = ex_.upload(c);
  sin_ = ex_.upload(z);
}

Tensor NemotronHLM::to_act(const Tensor& t) const {
  if (t.dtype() == ex_.act_dtype) return t;
  Tensor a = ex_.empty(t.shape());
  ops::copy_(a, t);
  return a;
}

Tensor NemotronHLM::mixer_forward(const Layer& L, const Batch& b, const Tensor& h, Saved* s, NemotronHCache* cache,
                                  size_t layer) {
  const Tensor* seg = b.segment_ids.defined() ? &b.segment_ids : nullptr;
  switch (L.kind) {
    case 'M':
      if (cache) return mamba2_forward_cached(ex_, L.mamba, cfg_, h, cache->mamba.at(layer));
      return mamba2_forward(ex_, L.mamba, cfg_, h, b.B, b.T, seg, s ? &s->mamba : nullptr);
    case '*': {
      const AttentionGeometry g{cfg_.num_attention_heads, cfg_.num_key_value_heads, cfg_.head_dim, cfg_.hidden_size,
                                static_cast<float>(cfg_.rms_norm_eps), &ex_};
      // No RoPE: the identity tables make the cached path's positions irrelevant; the causal offset comes from the cache.
      if (cache) return attention_forward_cached(L.attn, g, h, cos_, sin_, attn_params(b), cache->kv, L.attn_slot);
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

Tensor NemotronHLM::layer_forward(const Layer& L, const Batch& b, const Tensor& x, Saved* s, NemotronHCache* cache,
                                  size_t layer) {
  const int64_t N = x.dim(0), H = cfg_.hidden_size;
  // h = RMSNorm(x) in the activation dtype (an fp32 residual feeds the bf16 matmuls through it), rstd fp32
  Tensor h = ex_.empty({N, H}), r = ex_.empty({N}, DType::F32);
  ops::rmsnorm_fwd(x, wide_weight(*L.norm), static_cast<float>(cfg_.rms_norm_eps), h, r);
  Tensor y = mixer_forward(L, b, h, s, cache, layer);
  if (s) {
    s->x = x;
    s->h = h;
    s->rstd = r;
  }
  Tensor xn = ex_.empty({N, H}, ex_.residual_dtype);  // a new tensor: the saved input stays intact
  ops::copy_(xn, x);
  ops::add_(xn, y);
  return xn;
}

Tensor NemotronHLM::trunk_forward(const Batch& b, std::vector<Saved>* saved, Tensor* x_pre, Tensor* rstd_f, bool recompute,
                                  NemotronHCache* cache) {
  const int64_t N = b.B * b.T, H = cfg_.hidden_size;
  nope_tables(N);
  hook_use(0, false);
  Tensor x = ex_.empty({N, H}, ex_.residual_dtype);
  ops::embedding_fwd(b.input_ids, wide_weight(*embed_), x);
  if (saved) saved->assign(layers_.size(), Saved{});
  for (size_t i = 0; i < layers_.size(); ++i) {
    hook_use(static_cast<int>(i) + 1, false);
    const char fwd_name[] = {layers_[i].kind, ' ', 'f', 'w', 'd', 0};  // "M fwd": the block kind in the name
    ops::TimedRange tr("layer", static_cast<int64_t>(i), fwd_name);
    // Activation checkpointing keeps only each layer's input [N, H]; backward recomputes the rest.
    if (saved && recompute) (*saved)[i].x = x;
    Saved* s = saved && !recompute ? &(*saved)[i] : nullptr;
    x = layer_forward(layers_[i], b, x, s, cache, i);
    hook_fwd_done(static_cast<int>(i) + 1);
  }
  Tensor xf = ex_.empty({N, H}), rf = ex_.empty({N}, DType::F32);
  ops::rmsnorm_fwd(x, wide_weight(*norm_f_), static_cast<float>(cfg_.rms_norm_eps), xf, rf);
  if (x_pre) *x_pre = x;
  if (rstd_f) *rstd_f = rf;
  return xf;
}

double NemotronHLM::forward_backward(const Batch& b, float grad_scale, const ForwardOptions& opt) {
  const int64_t N = b.B * b.T, H = cfg_.hidden_size;
  const bool recompute = opt.activation_checkpointing;
  std::vector<Saved> saved;
  Tensor x_pre, rstd_f;
  Tensor xf = trunk_forward(b, &saved, &x_pre, &rstd_f, recompute);
  Tensor dxf = ex_.empty({N, H});
  Param& head = lm_head();
  double loss = 0.0;
  {
    ops::TimedRange tr("lm_head+cross_entropy");
    loss = lm_head_cross_entropy(ex_, xf, head.work, b.targets, grad_scale, &dxf,
                                 head.grad.defined() ? &head.grad : nullptr, opt.loss_chunk_rows);
  }
  xf = Tensor();
  Tensor dx = ex_.empty({N, H}, ex_.residual_dtype);
  ops::rmsnorm_bwd(x_pre, wide_weight(*norm_f_), rstd_f, dxf, dx, norm_f_->grad);
  dxf = Tensor();
  for (size_t i = layers_.size(); i-- > 0;) {
    hook_use(static_cast<int>(i) + 1, true);
    const std::string bwd_name = std::string(1, layers_[i].kind) + (recompute ? " recompute+bwd" : " bwd");
    ops::TimedRange tr("layer", static_cast<int64_t>(i), bwd_name.c_str());
    const Layer& L = layers_[i];
    if (recompute) {
      const Tensor x_in = saved[i].x;
      layer_forward(L, b, x_in, &saved[i]);  // same inputs, same kernels: the same activations
    }
    // x_out = x + mixer(norm(x)):  dx = dx_out + norm_bwd(mixer_bwd(dx_out)). The mixer takes its output gradient
    // in the activation dtype (an fp32 residual gradient is rounded once, as autograd does for a bf16 block output).
    Tensor dh = mixer_backward(L, b, saved[i], to_act(dx));
    Tensor dxi = ex_.empty({N, H}, ex_.residual_dtype);
    ops::rmsnorm_bwd(saved[i].x, wide_weight(*L.norm), saved[i].rstd, dh, dxi, L.norm->grad);
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
  Tensor logits = ex_.empty({xf.dim(0), cfg_.vocab_size});  // the activation dtype, as the interface says
  ops::linear_fwd(xf, lm_head().work, nullptr, logits);
  hook_fwd_done(0);
  return logits;
}

NemotronHCache NemotronHLM::make_cache(int64_t capacity) const {
  // The KV cache over the attention layers only (a config with just those layers: KvCache allocates one k / v
  // pair per layer of its config; Mamba2 / MLP / MoE layers need none).
  io::ModelConfig attn_cfg = cfg_;
  attn_cfg.num_hidden_layers = 0;
  for (const Layer& L : layers_) attn_cfg.num_hidden_layers += L.kind == '*';
  NemotronHCache c;
  c.kv = KvCache(attn_cfg, ex_, capacity);
  c.mamba.resize(layers_.size());
  for (size_t i = 0; i < layers_.size(); ++i)
    if (layers_[i].kind == 'M') c.mamba[i] = mamba2_initial_state(ex_, cfg_);
  return c;
}

Tensor NemotronHLM::forward_incremental(const std::vector<int32_t>& ids, NemotronHCache& cache, bool all_logits) {
  const int64_t n = static_cast<int64_t>(ids.size());
  if (n == 0) throw DataError("forward_incremental: no tokens given");
  if (ex_.on_cuda())
    throw DeviceError("nemotron_h: the incremental decode (Mamba2 state cache) runs on the CPU only; on CUDA generate "
                      "recomputes the sequence");
  if (cache.mamba.size() != layers_.size())
    throw ShapeError("forward_incremental: the cache was not made by this model's make_cache");
  // Checked before any layer runs: a step that stopped half-way would leave the Mamba2 states ahead of the KV cache.
  if (cache.length() + n > cache.kv.capacity())
    throw DataError("forward_incremental: " + std::to_string(cache.length()) + " + " + std::to_string(n) +
                    " tokens exceed the cache's capacity of " + std::to_string(cache.kv.capacity()));
  // One sequence of n tokens: a [1, n] batch without padding or segments (positions are unused: no RoPE).
  Batch b;
  b.B = 1;
  b.T = n;
  Tensor host_ids = Tensor::empty({n}, DType::I32);
  for (int64_t t = 0; t < n; ++t) host_ids.data<int32_t>()[t] = ids[static_cast<size_t>(t)];
  b.input_ids = ex_.upload(host_ids);
  b.num_real_tokens = n;
  Tensor xf = trunk_forward(b, nullptr, nullptr, nullptr, false, &cache);  // [n, H]
  cache.kv.advance(n);
  const Tensor rows = all_logits ? xf : xf.slice_rows(n - 1, n);  // [n or 1, H]
  Tensor logits = ex_.empty({rows.dim(0), cfg_.vocab_size});
  ops::linear_fwd(rows, lm_head().work, nullptr, logits);
  hook_fwd_done(0);
  return logits;
}

void register_nemotron_h() {
  register_model("nemotron_h", [](const io::ModelConfig& c, const ModelParallel& mp) { return std::make_unique<NemotronHLM>(c, mp); });
}

}  // namespace am
