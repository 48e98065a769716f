#include "models/decoder.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/log.h"
#include "dist/communicator.h"
#include "models/blocks/norm.h"
#include "ops/device.h"
#include "ops/ops.h"
#include "ops/trace.h"

namespace am {

DecoderLM::DecoderLM(const io::ModelConfig& cfg, const ModelParallel& mp)
    : cfg_(cfg), mp_(mp), rope_(io::compute_rope(cfg)) {
  const int64_t H = cfg.hidden_size;
  ps_.set_shapes_only(mp.shapes_only);
  ps_.set_host_grads(mp.host_grads);
  const MlpAct act = mlp_act_from_config(cfg.hidden_act, cfg.norm_plus_one ? "hidden_activation" : "hidden_act");
  if (cfg.is_moe() && act != MlpAct::Silu)
    throw FormatError("config.json: hidden_act '" + cfg.hidden_act + "' is not supported for MoE experts (only silu)");
  if (cfg.fused_gate_up && act != MlpAct::Silu)
    throw FormatError("config.json: hidden_act '" + cfg.hidden_act + "' with a fused gate_up_proj is not supported (only silu)");
  if (!cfg.unapplied_dropout.empty() && !mp.shapes_only) {
    std::string keys;
    for (const auto& d : cfg.unapplied_dropout) keys += (keys.empty() ? "" : ", ") + d;
    log::warn("config.json: " + keys + ": training dropout of the base model is not applied (only LoRA dropout is)");
  }
  if (cfg.rope_sliding) {
    io::ModelConfig local = cfg;
    local.rope = *cfg.rope_sliding;
    rope_sliding_ = io::compute_rope(local);
  }
  if (cfg.num_attention_heads % cfg.num_key_value_heads != 0)
    throw FormatError("config.json: num_attention_heads must be a multiple of num_key_value_heads");
  if (cfg.head_dim % 2 != 0) throw FormatError("config.json: head_dim must be even for RoPE");
  // Registration order = HF state_dict order, so the export writes tensors in the source's order.
  embed_ = &ps_.add("model.embed_tokens.weight", {cfg.vocab_size, H});
  for (int64_t i = 0; i < cfg.num_hidden_layers; ++i) {
    std::string pre = "model.layers." + std::to_string(i) + ".";
    Layer L;
    if (cfg.deepseek) {
      L.is_mla = true;
      L.mla = register_mla(ps_, pre + "self_attn.", cfg);
    } else {
      L.attn = register_attention(ps_, pre + "self_attn.", cfg);
    }
    if (cfg.layer_is_moe(i)) {
      L.is_moe = true;
      L.moe = register_moe(ps_, pre, cfg, mp.ep_rank, mp.ep_size);
      L.moe_index = n_moe_layers_++;
    } else {
      L.mlp = cfg.fused_gate_up ? register_mlp_fused(ps_, pre + "mlp.", H, cfg.intermediate_size)
                                : register_mlp(ps_, pre + "mlp.", H, cfg.intermediate_size, cfg.mlp_bias, act);
    }
    L.ln1 = &ps_.add(pre + "input_layernorm.weight", {H});
    if (cfg.sandwich_norm) {  // Gemma3DecoderLayer's four norms, in its registration order
      L.post_attn_norm = &ps_.add(pre + "post_attention_layernorm.weight", {H});
      L.ln2 = &ps_.add(pre + "pre_feedforward_layernorm.weight", {H});
      L.post_ffn_norm = &ps_.add(pre + "post_feedforward_layernorm.weight", {H});
    } else {
      L.ln2 = &ps_.add(pre + "post_attention_layernorm.weight", {H});
    }
    L.window = i < static_cast<int64_t>(cfg.sliding_window.size()) ? cfg.sliding_window[i] : 0;
    L.sliding_rope = cfg.rope_sliding.has_value() && L.window > 0;
    layers_.push_back(L);
  }
  norm_ = &ps_.add("model.norm.weight", {H});
  if (!cfg.tie_word_embeddings) lm_head_ = &ps_.add("lm_head.weight", {cfg.vocab_size, H});
  if (cfg.deepseek) {
    using G = ops::GroupedRouterOptions::Group;
    ds_router_.sigmoid = cfg.ds.sigmoid_scores;
    ds_router_.group = cfg.ds.topk_method == "noaux_tc"               ? G::Top2Sum
                       : cfg.ds.topk_method == "group_limited_greedy" ? G::Max
                                                                      : G::None;
    ds_router_.n_group = cfg.ds.n_group;
    ds_router_.topk_group = cfg.ds.topk_group;
    ds_router_.norm_topk_prob = cfg.norm_topk_prob;
    ds_router_.routed_scaling_factor = static_cast<float>(cfg.ds.routed_scaling_factor);
  }
}

Param& DecoderLM::lm_head() { return lm_head_ ? *lm_head_ : *embed_; }

std::vector<std::vector<Param*>> DecoderLM::param_units() {
  // Unit of each parameter by name: "model.layers.{i}." -> i + 1, everything else -> the root (0). LoRA
  // pairs ("base_model.model.model.layers.{i}....lora_A.weight") belong to their layer's unit.
  std::vector<std::vector<Param*>> units(layers_.size() + 1);
  const std::string peft = "base_model.model.";
  for (Param& p : ps_.all()) {
    size_t u = 0;
    const std::string n = p.name.rfind(peft, 0) == 0 ? p.name.substr(peft.size()) : p.name;
    if (n.rfind("model.layers.", 0) == 0) u = std::stoul(n.substr(13)) + 1;
    units.at(u).push_back(&p);
  }
  return units;
}

// What every move to a device checks first (to_device, to_device_inference): the residual dtype. Every decoder family
// runs on CUDA, with nothing behind ops::require_verified_cuda any more. gpt_oss: its sinks through the flash
// attention kernels, its biased experts and clamped SwiGLU through backend/cuda/gpt_oss_moe.cu; its model-level
// gradient check is bounded by the fixture's own bf16 sensitivity (tests/gpu/test_cuda_gpt_oss.cpp, docs/gpt_oss.md).
// Gemma 2's soft-capping: the flash kernels and the chunked LM-head loss. DeepSeek: MLA's column ops (ops/mla_ops.h)
// and the grouped router on CUDA. A family whose CUDA code has not yet passed its GPU tests calls
// ops::require_verified_cuda here.
static void check_exec(const ExecContext& ex) {
  if (ex.residual_dtype != ex.act_dtype && ex.residual_dtype != DType::F32)
    throw DeviceError(std::string("residual dtype ") + dtype_name(ex.residual_dtype) +
                      ": expected the activation dtype or float32");
}

void DecoderLM::to_device(const ExecContext& ex) {
  check_exec(ex);
  ps_.to_device(ex);
  ex_ = ex;
  for (RopeCache& c : rope_cache_) c = RopeCache{};  // cached tables live on the old device
  expert_counts_ = aux_term_dev_ = aux_raw_dev_ = Tensor();  // so do the MoE statistics (ensure_moe_stats)
}

int64_t DecoderLM::matmul_params_per_token() const {
  const int64_t H = cfg_.hidden_size, D = cfg_.head_dim, nh = cfg_.num_attention_heads,
                nkv = cfg_.num_key_value_heads, I = cfg_.intermediate_size;
  const int64_t attn = H * nh * D * 2 + H * nkv * D * 2;
  // A sparse layer's active parameters: the router, k experts, and the shared expert with its gate.
  // (gpt_oss: gate_up [2I, H] + down [H, I] per expert = 3HI too; its biases are not matmul parameters.)
  const int64_t moe = cfg_.num_experts * H + cfg_.num_experts_per_tok * 3 * H * cfg_.moe_intermediate_size +
                      (cfg_.shared_expert_intermediate_size > 0 ? 3 * H * cfg_.shared_expert_intermediate_size + H : 0);
  int64_t total = 0;
  if (cfg_.deepseek) {
    // MLA: q (q_a + q_b, or q_proj), kv_a, kv_b, o; a sparse layer: the router, k routed experts and the
    // n_shared_experts-wide shared expert, all active for every token.
    const auto& d = cfg_.ds;
    const int64_t dq = d.qk_head_dim();
    const int64_t q = d.q_lora_rank ? H * d.q_lora_rank + d.q_lora_rank * nh * dq : H * nh * dq;
    const int64_t mla = q + H * (d.kv_lora_rank + d.qk_rope_head_dim) +
                        d.kv_lora_rank * nh * (d.qk_nope_head_dim + d.v_head_dim) + nh * d.v_head_dim * H;
    const int64_t ds_moe = cfg_.num_experts * H +
                           (cfg_.num_experts_per_tok + d.n_shared_experts) * 3 * H * cfg_.moe_intermediate_size;
    for (const Layer& L : layers_) total += mla + (L.is_moe ? ds_moe : 3 * H * I);
    return total + cfg_.vocab_size * H;
  }
  for (const Layer& L : layers_) total += attn + (L.is_moe ? moe : 3 * H * I);
  return total + cfg_.vocab_size * H;  // + lm_head (embedding is a gather)
}

void DecoderLM::rope_tables(const Batch& b, Tensor& cos, Tensor& sin, bool sliding) {
  // The tables depend only on the positions, which repeat from micro-batch to micro-batch (0..T-1 per row
  // unless packed): reuse the last ones instead of recomputing N x D/2 sin/cos on the host and uploading
  // them synchronously, twice per micro-batch (that was several ms of every W1 step).
  // half = rotary dims / 2: head_dim / 2, or less with a partial_rotary_factor (phi3, Phi-4-mini), where only
  // the first dims of each head rotate (the RoPE op reads R from the tables' width).
  const io::RopeTables& rt = sliding ? rope_sliding_ : rope_;
  const int64_t N = b.B * b.T, half = static_cast<int64_t>(rt.inv_freq.size());
  const int32_t* pos = b.positions.data<int32_t>();
  RopeCache& rc = rope_cache_[sliding ? 1 : 0];
  if (rc.cos.defined() && static_cast<int64_t>(rc.pos.size()) == N && std::equal(rc.pos.begin(), rc.pos.end(), pos)) {
    cos = rc.cos;
    sin = rc.sin;
    return;
  }
  Tensor c = Tensor::empty({N, half}, DType::F32), s = Tensor::empty({N, half}, DType::F32);
  io::rope_cos_sin(rt, pos, N, c.f32(), s.f32());
  cos = rc.cos = ex_.upload(c);
  sin = rc.sin = ex_.upload(s);
  rc.pos.assign(pos, pos + N);
}

Tensor DecoderLM::norm_w(const Param& p) const { return norm_weight(ex_, wide_weight(p), cfg_.norm_plus_one); }

float DecoderLM::embed_scale() const {
  if (!cfg_.scale_embeddings) return 1.0f;
  // HF: torch.tensor(hidden_size ** 0.5) (float32) .to(embedding weight dtype).
  const float s = static_cast<float>(std::sqrt(static_cast<double>(cfg_.hidden_size)));
  const DType dt = wide_weight(*embed_).dtype();
  if (dt == DType::F32) return s;
  Tensor t = Tensor::empty({1}, DType::F32), r = Tensor::empty({1}, dt);
  t.f32()[0] = s;
  ops::copy_(r, t);  // round to the weights' dtype (host tensors)
  ops::copy_(t, r);
  return t.f32()[0];
}

ops::AttnParams DecoderLM::attn_params(const Batch& b, int64_t window) const {
  ops::AttnParams p;
  p.batch = b.B;
  p.seq = b.T;
  p.n_heads = cfg_.num_attention_heads;
  p.n_kv_heads = cfg_.num_key_value_heads;
  p.head_dim = cfg_.head_dim;
  // gemma: query_pre_attn_scalar ** -0.5, a Python float rounded to float32 when it scales the scores
  p.scale = cfg_.query_pre_attn_scalar ? static_cast<float>(std::pow(*cfg_.query_pre_attn_scalar, -0.5))
                                       : 1.0f / std::sqrt(static_cast<float>(cfg_.head_dim));
  p.sliding_window = window;
  p.softcap = static_cast<float>(cfg_.attn_logit_softcapping);
  p.segment_ids = attention_segment_ids(b);
  if (cfg_.deepseek) {  // MLA: per-head q/k of qk_nope + qk_rope dims, v of v_head_dim, one key per head
    p.n_kv_heads = p.n_heads;
    p.head_dim = cfg_.ds.qk_head_dim();
    p.v_head_dim = cfg_.ds.v_head_dim;
    p.scale = static_cast<float>(cfg_.ds.softmax_scale);
  }
  return p;
}

void DecoderLM::stream_norm(const Stream& in, const Param& w, Tensor& x, Tensor& y, Tensor& rstd) const {
  const int64_t N = in.x.dim(0), H = cfg_.hidden_size;
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  y = ex_.empty({N, H});
  rstd = ex_.empty({N}, DType::F32);
  if (!in.delta.defined()) {
    x = in.x;
    ops::rmsnorm_fwd(x, norm_w(w), eps, y, rstd);
    return;
  }
  x = ex_.empty({N, H}, ex_.residual_dtype);
  ops::add_rmsnorm_fwd(in.x, in.delta, norm_w(w), eps, x, y, rstd);
  note_fused_add_norm();
}

DecoderLM::Stream DecoderLM::layer_forward(const Layer& L, const Stream& in, const Tensor& cos, const Tensor& sin,
                                           const ops::AttnParams& p, LayerSaved* s, KvCache* kv, int64_t layer,
                                           Tensor* x_in) {
  const int64_t N = in.x.dim(0), H = cfg_.hidden_size;
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  AttentionGeometry g{cfg_.num_attention_heads, cfg_.num_key_value_heads, cfg_.head_dim, H, eps, &ex_,
                      cfg_.norm_plus_one};
  // x, x1, out: residual dtype; h1, h2 (RMSNorm outputs, matmul inputs), a, m: activation dtype.
  // A block whose output goes straight into a residual stream of its own dtype (no sandwich norm) has its output
  // projection accumulate into the stream's copy instead (x1 = x, x1 += o Wo^T; out = x1, out += h Wd^T: beta = 1
  // on CUDA, no [N, H] block output and no add kernel; on the CPU the same temporary + add as before, bit for bit).
  // An fp32 stream under bf16 compute keeps the separate add: the block output is rounded to bf16 first (autocast).
  // Fused add + norm (AM_FUSED_ADD_NORM, blocks/norm.h): a separate add is not done here but handed to the RMSNorm
  // that reads its result, which forms the sum in its own pass (ops::add_rmsnorm_fwd): the attention output to norm2
  // below, the MLP output to the next layer's norm1 (or the final norm) through the returned stream. On CUDA a
  // stream of the activation dtype keeps the fold (the add inside the GEMM costs no pass at all); on the CPU the fold
  // is a temporary + add anyway, bit for bit the fused op's sum, so the fused path replaces it there.
  const bool fuse = fused_add_norm_enabled();
  const bool fold = ex_.residual_dtype == ex_.act_dtype && !(fuse && !ex_.on_cuda());
  Tensor x, h1, r1;
  stream_norm(in, *L.ln1, x, h1, r1);
  if (x_in) *x_in = x;
  // Sandwich norms (gemma): RMSNorm of a block's output before its residual add. y: activation dtype.
  auto post_norm = [&](const Param* w, Tensor& y, Tensor* saved_in, Tensor* saved_rstd) {
    if (!w) return;
    Tensor yn = ex_.empty({N, H}), r = ex_.empty({N}, DType::F32);
    ops::rmsnorm_fwd(y, norm_w(*w), eps, yn, r);
    if (saved_in) *saved_in = y, *saved_rstd = r;
    y = yn;
  };
  Stream mid;  // x + attention output
  if (fold && !L.is_mla && !kv && !L.post_attn_norm) {
    mid.x = ex_.clone(x);
    attention_forward(L.attn, g, h1, cos, sin, p, s ? &s->attn : nullptr, &mid.x);
  } else {
    Tensor a;
    if (L.is_mla) {
      const MlaGeometry mg = MlaGeometry::of(cfg_, &ex_);
      a = kv ? mla_forward_cached(L.mla, mg, h1, cos, sin, p, *kv, layer)
             : mla_forward(L.mla, mg, h1, cos, sin, p, s ? &s->mla : nullptr);
    } else {
      a = kv ? attention_forward_cached(L.attn, g, h1, cos, sin, p, *kv, layer)
             : attention_forward(L.attn, g, h1, cos, sin, p, s ? &s->attn : nullptr);
    }
    post_norm(L.post_attn_norm, a, s ? &s->a : nullptr, s ? &s->ra : nullptr);
    if (fuse) {
      mid = Stream{x, a};
    } else {
      mid.x = ex_.clone(x);
      ops::add_(mid.x, a);
    }
  }
  Tensor x1, h2, r2;
  stream_norm(mid, *L.ln2, x1, h2, r2);
  Stream out;  // x1 + MLP output
  if (!L.is_moe && fold && !L.post_ffn_norm) {
    out.x = ex_.clone(x1);
    mlp_forward(ex_, L.mlp, h2, s ? &s->mlp : nullptr, &out.x);
  } else {
    Tensor m;
    if (L.is_moe) {
      MoeSaved local;
      MoeSaved& ms = s ? s->moe : local;
      m = moe_forward(ex_, L.moe, moe_options(), h2, ms);
      record_routing(L, ms);
    } else {
      m = mlp_forward(ex_, L.mlp, h2, s ? &s->mlp : nullptr);
    }
    post_norm(L.post_ffn_norm, m, s ? &s->m : nullptr, s ? &s->rm : nullptr);
    if (fuse) {
      out = Stream{x1, m};
    } else {
      out.x = ex_.clone(x1);
      ops::add_(out.x, m);
    }
  }
  if (s) {
    s->x = x;
    s->h1 = h1;
    s->rstd1 = r1;
    s->x1 = x1;
    s->h2 = h2;
    s->rstd2 = r2;
  }
  return out;
}

Tensor DecoderLM::layer_backward(const Layer& L, const LayerSaved& s, const Tensor& cos, const Tensor& sin,
                                    const ops::AttnParams& p, const Tensor& dy, const Tensor* dprobs_extra) {
  const int64_t N = dy.dim(0), H = cfg_.hidden_size;
  AttentionGeometry g{cfg_.num_attention_heads, cfg_.num_key_value_heads, cfg_.head_dim, H,
                      static_cast<float>(cfg_.rms_norm_eps), &ex_, cfg_.norm_plus_one};
  // Through a sandwich post-norm (gemma): d(block output) from d(normalised output), activation dtype.
  auto post_norm_bwd = [&](Param* w, const Tensor& y, const Tensor& rstd, Tensor dyn) {
    if (!w) return dyn;
    Tensor dy_in = ex_.empty({N, H});
    ops::rmsnorm_bwd(y, norm_w(*w), rstd, dyn, dy_in, w->grad);
    return dy_in;
  };
  // dy, dx1, dx: residual dtype. The blocks take their output gradient in the activation dtype (an fp32
  // residual gradient is rounded to bf16 first, as autograd does for the bf16 block output under autocast)
  // and return the RMSNorm output gradient dh in it.
  // out = x1 + ffn(norm2(x1))  ->  dx1 = dy + norm2_bwd(ffn_bwd(dy))
  Tensor dh2;
  {
    const Tensor dy_a = post_norm_bwd(L.post_ffn_norm, s.m, s.rm, to_act(dy));
    dh2 = L.is_moe ? moe_backward(ex_, L.moe, moe_options(), s.moe, dy_a, dprobs_extra)
                   : mlp_backward(ex_, L.mlp, s.mlp, dy_a);
  }
  // The residual adds of the gradient run in the norms' backward passes when fused (ops::add_rmsnorm_bwd).
  const bool fuse = fused_add_norm_enabled();
  Tensor dx1 = ex_.empty({N, H}, ex_.residual_dtype);
  if (fuse) {
    ops::add_rmsnorm_bwd(s.x1, norm_w(*L.ln2), s.rstd2, dh2, dy, dx1, L.ln2->grad);
    note_fused_add_norm();
  } else {
    ops::rmsnorm_bwd(s.x1, norm_w(*L.ln2), s.rstd2, dh2, dx1, L.ln2->grad);
    ops::add_(dx1, dy);
  }
  dh2 = Tensor();
  // x1 = x + attn(norm1(x))  ->  dx = dx1 + norm1_bwd(attn_bwd(dx1))
  const Tensor da = post_norm_bwd(L.post_attn_norm, s.a, s.ra, to_act(dx1));
  Tensor dh1 = L.is_mla ? mla_backward(L.mla, MlaGeometry::of(cfg_, &ex_), s.mla, cos, sin, p, da)
                        : attention_backward(L.attn, g, s.attn, cos, sin, p, da);
  Tensor dx = ex_.empty({N, H}, ex_.residual_dtype);
  if (fuse) {
    ops::add_rmsnorm_bwd(s.x, norm_w(*L.ln1), s.rstd1, dh1, dx1, dx, L.ln1->grad);
    note_fused_add_norm();
  } else {
    ops::rmsnorm_bwd(s.x, norm_w(*L.ln1), s.rstd1, dh1, dx, L.ln1->grad);
    ops::add_(dx, dx1);
  }
  return dx;
}

Tensor DecoderLM::trunk_forward(const Batch& b, std::vector<LayerSaved>* saved, Tensor* xf_pre, Tensor* rstd_f,
                                   bool recompute, KvCache* kv) {
  const int64_t N = b.B * b.T, H = cfg_.hidden_size;
  Tensor cos, sin, cos_l, sin_l;
  rope_tables(b, cos, sin);
  if (cfg_.rope_sliding) rope_tables(b, cos_l, sin_l, true);
  hook_use(0, false);
  Stream x{ex_.empty({N, H}, ex_.residual_dtype), Tensor()};
  ops::embedding_fwd(b.input_ids, wide_weight(*embed_), x.x);
  if (cfg_.scale_embeddings) ops::scale_(x.x, embed_scale());
  if (saved) saved->resize(layers_.size());
  for (size_t i = 0; i < layers_.size(); ++i) {
    // Activation checkpointing keeps only each layer's input [N, H] (formed inside the layer when the previous
    // layer's last add is pending); backward recomputes the rest.
    Tensor* keep_in = saved && recompute ? &(*saved)[i].x : nullptr;
    LayerSaved* s = saved && !recompute ? &(*saved)[i] : nullptr;
    hook_use(static_cast<int>(i) + 1, false);
    ops::TimedRange tr("layer", static_cast<int64_t>(i), layers_[i].is_moe ? "fwd (moe)" : "fwd");
    const bool l = layers_[i].sliding_rope;
    x = layer_forward(layers_[i], x, l ? cos_l : cos, l ? sin_l : sin, attn_params(b, layers_[i].window), s, kv,
                      static_cast<int64_t>(i), keep_in);
    hook_fwd_done(static_cast<int>(i) + 1);
  }
  if (kv) kv->advance(N);
  Tensor x_last, xf, rf;
  stream_norm(x, *norm_, x_last, xf, rf);  // the final norm (with the last layer's pending add, if any)
  if (xf_pre) *xf_pre = x_last;
  if (rstd_f) *rstd_f = rf;
  return xf;
}

double DecoderLM::forward_backward(const Batch& b, float grad_scale, const ForwardOptions& opt) {
  const int64_t N = b.B * b.T, H = cfg_.hidden_size;
  std::vector<LayerSaved> saved;
  Tensor x_pre, rstd_f;
  const bool recompute = opt.activation_checkpointing;
  fake_balanced_gate_ = opt.fake_balanced_gate;
  lora_pass_ = LoraPass{true, opt.dropout_seed};  // LoRA dropout on, for this pass and its recomputations
  // MoE: every sparse layer's routing of the real tokens is counted on the device during the forward (no host
  // sync); the aux loss needs every layer's statistics, so it is computed between forward and backward.
  struct StatsOff {  // also when the pass throws: later forwards count nothing and never see this batch
    DecoderLM* m;
    ~StatsOff() {
      m->count_experts_ = m->aux_stats_ = false;
      m->seg_ = nullptr;
      m->aux_f_ = m->aux_p_ = Tensor();
    }
  } stats_off{this};
  count_experts_ = n_moe_layers_ > 0 && opt.count_metrics;
  aux_stats_ = count_experts_ && cfg_.output_router_logits && !fake_balanced_gate_;
  if (count_experts_) {
    ensure_moe_stats();
    seg_ = &b.segment_ids;
  }
  if (aux_stats_) {
    aux_f_ = ex_.zeros({cfg_.num_experts}, DType::I32);
    aux_p_ = ex_.zeros({cfg_.num_experts}, DType::F32);
  }
  Tensor xf = trunk_forward(b, &saved, &x_pre, &rstd_f, recompute);
  count_experts_ = false;  // backward's recomputed forwards (activation checkpointing) are not counted again
  seg_ = nullptr;
  Tensor dprobs;
  if (aux_stats_) {
    dprobs = aux_loss(b, static_cast<float>(cfg_.router_aux_loss_coef) * opt.aux_loss_scale, opt.aux_loss_scale);
    ++aux_calls_;
  }
  aux_stats_ = false;
  aux_f_ = aux_p_ = Tensor();
  Tensor dxf = ex_.empty({N, H});
  Param& head = lm_head();
  double loss = 0.0;
  {
    ops::TimedRange tr("lm_head+cross_entropy");
    loss = lm_head_cross_entropy(ex_, xf, head.work, b.targets, grad_scale, &dxf,
                                 head.grad.defined() ? &head.grad : nullptr, opt.loss_chunk_rows,
                                 static_cast<float>(cfg_.final_logit_softcapping));
  }
  Tensor dx = ex_.empty({N, H}, ex_.residual_dtype);
  ops::rmsnorm_bwd(x_pre, norm_w(*norm_), rstd_f, dxf, dx, norm_->grad);
  dxf = Tensor();
  Tensor cos_g, sin_g, cos_l, sin_l;
  rope_tables(b, cos_g, sin_g);
  if (cfg_.rope_sliding) rope_tables(b, cos_l, sin_l, true);
  for (size_t i = layers_.size(); i-- > 0;) {
    const ops::AttnParams p = attn_params(b, layers_[i].window);
    const Tensor& cos = layers_[i].sliding_rope ? cos_l : cos_g;
    const Tensor& sin = layers_[i].sliding_rope ? sin_l : sin_g;
    hook_use(static_cast<int>(i) + 1, true);
    ops::TimedRange tr("layer", static_cast<int64_t>(i),
                       layers_[i].is_moe ? (recompute ? "recompute+bwd (moe)" : "bwd (moe)") : (recompute ? "recompute+bwd" : "bwd"));
    if (recompute) {
      Tensor x_in = saved[i].x;
      // Same inputs, same kernels: the same activations (norm1 unfused here: bit-identical to the fused pass).
      layer_forward(layers_[i], Stream{x_in, Tensor()}, cos, sin, p, &saved[i]);
    }
    dx = layer_backward(layers_[i], saved[i], cos, sin, p, dx, dprobs.defined() ? &dprobs : nullptr);
    saved[i] = LayerSaved{};  // free this layer's activations as soon as they are consumed
    hook_bwd_done(static_cast<int>(i) + 1);
  }
  if (embed_->grad.defined()) {  // a frozen embedding (LoRA) takes no gradient
    if (cfg_.scale_embeddings) ops::scale_(dx, embed_scale());
    embedding_backward(b, dx);
  }
  hook_bwd_done(0);
  lora_pass_.training = false;
  return loss;
}

double DecoderLM::forward_loss(const Batch& b, const ForwardOptions& opt) {
  fake_balanced_gate_ = opt.fake_balanced_gate;
  lora_pass_.training = false;
  Tensor xf = trunk_forward(b, nullptr, nullptr, nullptr);
  const double loss = lm_head_cross_entropy(ex_, xf, lm_head().work, b.targets, 0.f, nullptr, nullptr, opt.loss_chunk_rows,
                                            static_cast<float>(cfg_.final_logit_softcapping));
  hook_fwd_done(0);
  return loss;
}

Tensor DecoderLM::forward_logits(const Batch& b) {
  lora_pass_.training = false;
  Tensor xf = trunk_forward(b, nullptr, nullptr, nullptr);
  Tensor logits = head_logits(xf);
  hook_fwd_done(0);
  return logits;
}

Tensor DecoderLM::head_logits(const Tensor& rows) {
  Tensor logits = ex_.empty({rows.dim(0), cfg_.vocab_size});
  ops::linear_fwd(rows, lm_head().work, nullptr, logits);
  if (cfg_.final_logit_softcapping > 0) ops::softcap_(logits, static_cast<float>(cfg_.final_logit_softcapping));
  return logits;
}

Tensor DecoderLM::forward_incremental(const std::vector<int32_t>& ids, KvCache& cache, bool all_logits) {
  const int64_t n = static_cast<int64_t>(ids.size()), past = cache.length();
  if (n == 0) throw DataError("forward_incremental: no tokens given");
  if (cache.num_layers() != static_cast<int64_t>(layers_.size()))
    throw ShapeError("forward_incremental: the KV cache has " + std::to_string(cache.num_layers()) +
                     " layers, the model " + std::to_string(layers_.size()));
  // One sequence of n tokens at positions past .. past + n - 1: a [1, n] batch without padding or segments.
  Batch b;
  b.B = 1;
  b.T = n;
  Tensor host_ids = Tensor::empty({n}, DType::I32), pos = Tensor::empty({n}, DType::I32);
  for (int64_t t = 0; t < n; ++t) {
    host_ids.data<int32_t>()[t] = ids[static_cast<size_t>(t)];
    pos.data<int32_t>()[t] = static_cast<int32_t>(past + t);
  }
  b.input_ids = ex_.upload(host_ids);
  b.positions = pos;  // host: the RoPE tables are built there
  b.num_real_tokens = n;
  fake_balanced_gate_ = false;  // inference routes with the real router
  lora_pass_.training = false;
  Tensor xf = trunk_forward(b, nullptr, nullptr, nullptr, false, &cache);
  Tensor rows = all_logits ? xf : xf.slice_rows(n - 1, n);  // [n or 1, H]
  Tensor logits = head_logits(rows);
  hook_fwd_done(0);
  return logits;
}

void DecoderLM::to_device_inference(const ExecContext& ex) {
  check_exec(ex);
  // wide_weight() reads `value` (fp32) for the RMSNorm and embedding weights under an fp32 residual stream.
  std::vector<const Param*> wide{embed_, norm_};
  for (const Layer& L : layers_)
    for (const Param* n : {L.ln1, L.ln2, L.post_attn_norm, L.post_ffn_norm})
      if (n) wide.push_back(n);
  const bool wide_res = ex.residual_dtype != ex.act_dtype;
  for (Param& p : ps_.all()) {
    p.grad = Tensor();
    if (!ex.on_cuda()) continue;  // CPU: value is the working copy
    Tensor host = ExecContext::download(p.value);
    p.work = ex.upload_as(host, ex.act_dtype);
    // Also kept: frozen 1-D buffers (DeepSeek's e_score_correction_bias, which HF keeps in fp32 and the router
    // reads from `value` when it is there), as ParamStore::to_device keeps them for training.
    const bool keep = (wide_res && std::find(wide.begin(), wide.end(), &p) != wide.end()) ||
                      (!p.trainable && p.shape.size() == 1);
    p.value = keep ? ex.upload(host) : Tensor();  // the host fp32 copy is released here
  }
  ps_.pack_groups();  // q | k | v and gate | up back to back again (blocks/fused_proj.h)
  ex_ = ex;
  for (RopeCache& c : rope_cache_) c = RopeCache{};
  expert_counts_ = aux_term_dev_ = aux_raw_dev_ = Tensor();
}

Tensor DecoderLM::to_act(const Tensor& t) const {
  if (t.dtype() == ex_.act_dtype) return t;
  Tensor c = ex_.empty(t.shape());
  ops::copy_(c, t);
  return c;
}

void DecoderLM::embedding_backward(const Batch& b, const Tensor& dx) {
  // HF builds nn.Embedding(vocab, hidden, padding_idx=pad_token_id): the lookup never sends gradient to the
  // pad token's row (OLMoE's pad is 1; other configs may set one too). Keep that row as it was before the
  // lookup's scatter-add, so a tied lm_head's contribution to it stays.
  const int64_t pad = cfg_.pad_token_id.value_or(-1);
  Tensor keep;
  if (pad >= 0 && pad < cfg_.vocab_size) keep = ex_.clone(embed_->grad.slice_rows(pad, pad + 1));
  ops::embedding_bwd(b.input_ids, dx, embed_->grad);
  if (keep.defined()) {
    Tensor row = embed_->grad.slice_rows(pad, pad + 1);
    ops::copy_(row, keep);
  }
}

MoeOptions DecoderLM::moe_options() const {
  return MoeOptions{cfg_.num_experts_per_tok, cfg_.norm_topk_prob, fake_balanced_gate_, mp_.ep_size > 1 ? mp_.ep : nullptr,
                    cfg_.deepseek ? &ds_router_ : nullptr};
}

void DecoderLM::ensure_moe_stats() {
  if (expert_counts_.defined()) return;
  expert_counts_ = ex_.zeros({n_moe_layers_, cfg_.num_experts}, DType::I32);
  aux_term_dev_ = ex_.zeros({1}, DType::F32);
  aux_raw_dev_ = ex_.zeros({1}, DType::F32);
}

void DecoderLM::record_routing(const Layer& L, const MoeSaved& s) {
  // Only forward_backward's forward counts (count_experts_): not validation / logits forwards, nor backward's
  // recompute (activation checkpointing), which sees the same routing again.
  if (!count_experts_ || !seg_) return;
  // Utilisation counts real tokens only (padding rows are routed too, as in HF, but are not tokens; the plan's
  // per-expert counts include them). On the device: no download of the top-k indices.
  Tensor row = expert_counts_.slice_rows(L.moe_index, L.moe_index + 1);  // [1, E]
  ops::moe_routing_stats(s.topk_idx, s.probs, *seg_, &row, aux_stats_ ? &aux_p_ : nullptr,
                         aux_stats_ ? &aux_f_ : nullptr);
}

Tensor DecoderLM::aux_loss(const Batch& b, float scale, float aux_loss_scale) {
  // HF load_balancing_loss_func with the attention mask, over the L sparse layers of this forward:
  //   F[e] = #{(l, t, s): real t, topk_idx = e} / (L * Nreal),  P[e] = sum_{l, real t} probs / (L * Nreal)
  //   aux = E * sum_e F[e] P[e];   d aux / d probs[l, t, e] = E * F[e] * [t real] / (L * Nreal)
  // (F is piecewise constant: the top-k selection has no gradient.) From the sums record_routing accumulated on
  // the device (aux_f_, aux_p_); the value stays there until take_aux_loss / take_step_metrics (step end).
  const int64_t N = b.B * b.T, E = cfg_.num_experts;
  Tensor aux = ex_.empty({1}, DType::F32), dprobs = ex_.empty({N, E}, DType::F32);
  ops::moe_aux_loss(aux_f_, aux_p_, b.segment_ids, n_moe_layers_, scale, aux, &dprobs);
  ops::add_(aux_raw_dev_, aux);
  ops::scale_(aux, static_cast<float>(cfg_.router_aux_loss_coef * aux_loss_scale));
  ops::add_(aux_term_dev_, aux);
  return dprobs;
}

double DecoderLM::take_aux_loss() {
  if (!aux_term_dev_.defined()) return 0.0;
  const double v = ExecContext::download(aux_term_dev_).f32()[0];  // step end: the trainer has synchronised
  ops::zero_(aux_term_dev_);
  return v;
}

nlohmann::json DecoderLM::take_step_metrics() {
  nlohmann::json j = nlohmann::json::object();
  if (n_moe_layers_ == 0) return j;
  // Expert utilisation over the step (every micro-batch, real tokens only), averaged over the sparse
  // layers: coefficient of variation of the per-expert token counts, and the fraction of experts that got
  // no token at all.
  // The device counts come back here, at step end (the only download of the routing statistics).
  const int64_t ne = cfg_.num_experts;
  std::vector<std::vector<int64_t>> counts(static_cast<size_t>(n_moe_layers_), std::vector<int64_t>(static_cast<size_t>(ne), 0));
  double aux_raw_sum = 0.0;
  if (expert_counts_.defined()) {
    const Tensor h = ExecContext::download(expert_counts_);
    for (int64_t l = 0; l < n_moe_layers_; ++l)
      for (int64_t e = 0; e < ne; ++e) counts[static_cast<size_t>(l)][static_cast<size_t>(e)] = h.data<int32_t>()[l * ne + e];
    ops::zero_(expert_counts_);
    aux_raw_sum = ExecContext::download(aux_raw_dev_).f32()[0];
    ops::zero_(aux_raw_dev_);
  }
  if (mp_.world && mp_.world->size() > 1) {
    // Every rank routed its own tokens: the step's utilisation is over all of them.
    for (auto& c : counts) mp_.world->all_reduce_host(c.data(), c.size());
    double a[2] = {aux_raw_sum, static_cast<double>(aux_calls_)};
    mp_.world->all_reduce_host(a, 2);
    aux_raw_sum = a[0];
    aux_calls_ = static_cast<int64_t>(a[1]);
  }
  double cv_sum = 0.0, dead_sum = 0.0;
  for (auto& c : counts) {
    const double E = static_cast<double>(c.size());
    double mean = 0.0, var = 0.0, dead = 0.0;
    for (int64_t v : c) mean += static_cast<double>(v) / E;
    for (int64_t v : c) {
      var += (static_cast<double>(v) - mean) * (static_cast<double>(v) - mean) / E;
      dead += v == 0;
    }
    cv_sum += mean > 0 ? std::sqrt(var) / mean : 0.0;
    dead_sum += dead / E;
  }
  j["moe_expert_cv"] = cv_sum / n_moe_layers_;
  j["moe_dead_expert_frac"] = dead_sum / n_moe_layers_;
  if (aux_calls_ > 0) j["router_aux_loss"] = aux_raw_sum / static_cast<double>(aux_calls_);
  aux_calls_ = 0;
  return j;
}

double lm_head_cross_entropy(const ExecContext& ex, const Tensor& x, const Tensor& W, const Tensor& targets,
                             float grad_scale, Tensor* dx, Tensor* dW, int64_t chunk_rows, float softcap) {
  // CUDA without soft-capping: the fused kernel (bf16 logits chunks, no host sync until the loss is read).
  if (ex.on_cuda() && !(softcap > 0.f)) return ops::lm_head_cross_entropy_cuda(x, W, targets, grad_scale, dx, dW);
  // The chunked op path: the CPU reference, and CUDA with final_logit_softcapping (Gemma 2 / 3), which the fused
  // kernel lacks. Per chunk of rows: logits [c, V] fp32 (on CUDA a bf16 x bf16 GEMM with an fp32 output) ->
  // softcap_ -> cross-entropy (dlogits fp32) -> softcap_bwd_ -> dx, dW GEMMs. One host sync per chunk (the loss).
  const int64_t N = x.dim(0), V = W.dim(0);
  if (ex.on_cuda()) {  // keep the fp32 logits chunk near the fused kernel's 512 MiB
    const int64_t cap_rows = std::max<int64_t>(1, (int64_t(512) << 20) / (std::max<int64_t>(V, 1) * 4));
    chunk_rows = std::min(chunk_rows, cap_rows);
  }
  const Tensor host_targets = ExecContext::download(targets);  // which chunks hold a label (CPU: no copy)
  const int32_t* t = host_targets.data<int32_t>();
  double total = 0.0;
  if (dx) ops::zero_(*dx);
  for (int64_t r0 = 0; r0 < N; r0 += chunk_rows) {
    int64_t r1 = std::min(N, r0 + chunk_rows);
    bool any = false;
    for (int64_t r = r0; r < r1 && !any; ++r) any = t[r] != -100;
    if (!any) continue;  // no label in this chunk: its logits have no effect on loss or gradients
    Tensor xc = x.slice_rows(r0, r1), tc = targets.slice_rows(r0, r1);
    Tensor logits = ex.empty({r1 - r0, V}, DType::F32);
    ops::linear_fwd(xc, W, nullptr, logits);
    if (softcap > 0.f) ops::softcap_(logits, softcap);
    if (!dx) {
      total += ops::cross_entropy_fwd_bwd(logits, tc, 0.f, nullptr);
      continue;
    }
    Tensor dlogits = ex.empty({r1 - r0, V}, DType::F32);
    total += ops::cross_entropy_fwd_bwd(logits, tc, grad_scale, &dlogits);
    if (softcap > 0.f) ops::softcap_bwd_(logits, dlogits, softcap);
    logits = Tensor();
    // CUDA's linear_bwd takes dy in x's dtype (bf16): round the fp32 gradient once, as autograd does when it
    // casts the loss gradient back to the bf16 logits.
    Tensor dy = dlogits;
    if (dy.dtype() != xc.dtype()) {
      dy = ex.empty({r1 - r0, V}, xc.dtype());
      ops::copy_(dy, dlogits);
      dlogits = Tensor();
    }
    Tensor dxc = dx->slice_rows(r0, r1);
    Tensor none;  // a frozen head (LoRA): dx only
    ops::linear_bwd(xc, W, dy, &dxc, dW ? *dW : none, nullptr);
  }
  return total;
}

}  // namespace am
