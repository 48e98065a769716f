#include "models/dense_decoder.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "ops/ops.h"
#ifdef AM_WITH_CUDA
#include "backend/cuda/cuda_ops.h"
#endif

namespace am {

DenseDecoder::DenseDecoder(const io::ModelConfig& cfg) : cfg_(cfg), rope_(io::compute_rope(cfg)) {
  const int64_t H = cfg.hidden_size;
  if (cfg.hidden_act != "silu" && cfg.hidden_act != "swish")
    throw FormatError("config.json: hidden_act '" + cfg.hidden_act + "' is not supported (only silu)");
  if (cfg.num_attention_heads % cfg.num_key_value_heads != 0)
    throw FormatError("config.json: num_attention_heads must be a multiple of num_key_value_heads");
  if (cfg.head_dim % 2 != 0) throw FormatError("config.json: head_dim must be even for RoPE");
  // Registration order = HF state_dict order, so the export writes tensors in the source's order.
  embed_ = &ps_.add("model.embed_tokens.weight", {cfg.vocab_size, H});
  for (int64_t i = 0; i < cfg.num_hidden_layers; ++i) {
    std::string pre = "model.layers." + std::to_string(i) + ".";
    Layer L;
    L.attn = register_attention(ps_, pre + "self_attn.", cfg);
    L.mlp = register_mlp(ps_, pre + "mlp.", H, cfg.intermediate_size, cfg.mlp_bias);
    L.ln1 = &ps_.add(pre + "input_layernorm.weight", {H});
    L.ln2 = &ps_.add(pre + "post_attention_layernorm.weight", {H});
    L.window = i < static_cast<int64_t>(cfg.sliding_window.size()) ? cfg.sliding_window[i] : 0;
    layers_.push_back(L);
  }
  norm_ = &ps_.add("model.norm.weight", {H});
  if (!cfg.tie_word_embeddings) lm_head_ = &ps_.add("lm_head.weight", {cfg.vocab_size, H});
}

Param& DenseDecoder::lm_head() { return lm_head_ ? *lm_head_ : *embed_; }

void DenseDecoder::to_device(const ExecContext& ex) {
  ps_.to_device(ex);
  ex_ = ex;
  rope_cos_ = rope_sin_ = Tensor();  // cached tables live on the old device
  rope_pos_.clear();
}

int64_t DenseDecoder::matmul_params_per_token() const {
  const int64_t H = cfg_.hidden_size, D = cfg_.head_dim, nh = cfg_.num_attention_heads,
                nkv = cfg_.num_key_value_heads, I = cfg_.intermediate_size;
  int64_t per_layer = H * nh * D * 2 + H * nkv * D * 2 + 3 * H * I;
  return per_layer * cfg_.num_hidden_layers + cfg_.vocab_size * H;  // + lm_head (embedding is a gather)
}

void DenseDecoder::rope_tables(const Batch& b, Tensor& cos, Tensor& sin) {
  // The tables depend only on the positions, which repeat from micro-batch to micro-batch (0..T-1 per row
  // unless packed): reuse the last ones instead of recomputing N x D/2 sin/cos on the host and uploading
  // them synchronously, twice per micro-batch (that was several ms of every W1 step).
  const int64_t N = b.B * b.T, half = cfg_.head_dim / 2;
  const int32_t* pos = b.positions.data<int32_t>();
  if (rope_cos_.defined() && static_cast<int64_t>(rope_pos_.size()) == N &&
      std::equal(rope_pos_.begin(), rope_pos_.end(), pos)) {
    cos = rope_cos_;
    sin = rope_sin_;
    return;
  }
  Tensor c = Tensor::empty({N, half}, DType::F32), s = Tensor::empty({N, half}, DType::F32);
  io::rope_cos_sin(rope_, pos, N, c.f32(), s.f32());
  cos = rope_cos_ = ex_.upload(c);
  sin = rope_sin_ = ex_.upload(s);
  rope_pos_.assign(pos, pos + N);
}

ops::AttnParams DenseDecoder::attn_params(const Batch& b, int64_t window) const {
  ops::AttnParams p;
  p.batch = b.B;
  p.seq = b.T;
  p.n_heads = cfg_.num_attention_heads;
  p.n_kv_heads = cfg_.num_key_value_heads;
  p.head_dim = cfg_.head_dim;
  p.scale = 1.0f / std::sqrt(static_cast<float>(cfg_.head_dim));
  p.sliding_window = window;
  p.segment_ids = b.segment_ids.defined() ? &b.segment_ids : nullptr;
  return p;
}

Tensor DenseDecoder::layer_forward(const Layer& L, const Tensor& x, const Tensor& cos, const Tensor& sin,
                                   const ops::AttnParams& p, LayerSaved* s) {
  const int64_t N = x.dim(0), H = cfg_.hidden_size;
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  AttentionGeometry g{cfg_.num_attention_heads, cfg_.num_key_value_heads, cfg_.head_dim, H, eps, &ex_};
  Tensor h1 = ex_.empty({N, H}), r1 = ex_.empty({N}, DType::F32);
  ops::rmsnorm_fwd(x, L.ln1->work, eps, h1, r1);
  Tensor a = attention_forward(L.attn, g, h1, cos, sin, p, s ? &s->attn : nullptr);
  Tensor x1 = ex_.clone(x);
  ops::add_(x1, a);
  Tensor h2 = ex_.empty({N, H}), r2 = ex_.empty({N}, DType::F32);
  ops::rmsnorm_fwd(x1, L.ln2->work, eps, h2, r2);
  Tensor m = mlp_forward(ex_, L.mlp, h2, s ? &s->mlp : nullptr);
  Tensor out = ex_.clone(x1);
  ops::add_(out, m);
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

Tensor DenseDecoder::layer_backward(const Layer& L, const LayerSaved& s, const Tensor& cos, const Tensor& sin,
                                    const ops::AttnParams& p, const Tensor& dy) {
  const int64_t N = dy.dim(0), H = cfg_.hidden_size;
  AttentionGeometry g{cfg_.num_attention_heads, cfg_.num_key_value_heads, cfg_.head_dim, H,
                      static_cast<float>(cfg_.rms_norm_eps), &ex_};
  // out = x1 + mlp(norm2(x1))  ->  dx1 = dy + norm2_bwd(mlp_bwd(dy))
  Tensor dh2 = mlp_backward(ex_, L.mlp, s.mlp, dy);
  Tensor dx1 = ex_.empty({N, H});
  ops::rmsnorm_bwd(s.x1, L.ln2->work, s.rstd2, dh2, dx1, L.ln2->grad);
  ops::add_(dx1, dy);
  // x1 = x + attn(norm1(x))  ->  dx = dx1 + norm1_bwd(attn_bwd(dx1))
  Tensor dh1 = attention_backward(L.attn, g, s.attn, cos, sin, p, dx1);
  Tensor dx = ex_.empty({N, H});
  ops::rmsnorm_bwd(s.x, L.ln1->work, s.rstd1, dh1, dx, L.ln1->grad);
  ops::add_(dx, dx1);
  return dx;
}

Tensor DenseDecoder::trunk_forward(const Batch& b, std::vector<LayerSaved>* saved, Tensor* xf_pre, Tensor* rstd_f,
                                   bool recompute) {
  const int64_t N = b.B * b.T, H = cfg_.hidden_size;
  Tensor cos, sin;
  rope_tables(b, cos, sin);
  Tensor x = ex_.empty({N, H});
  ops::embedding_fwd(b.input_ids, embed_->work, x);
  if (saved) saved->resize(layers_.size());
  for (size_t i = 0; i < layers_.size(); ++i) {
    // Activation checkpointing keeps only each layer's input [N, H]; backward recomputes the rest.
    if (saved && recompute) (*saved)[i].x = x;
    LayerSaved* s = saved && !recompute ? &(*saved)[i] : nullptr;
    x = layer_forward(layers_[i], x, cos, sin, attn_params(b, layers_[i].window), s);
  }
  Tensor xf = ex_.empty({N, H}), rf = ex_.empty({N}, DType::F32);
  ops::rmsnorm_fwd(x, norm_->work, static_cast<float>(cfg_.rms_norm_eps), xf, rf);
  if (xf_pre) *xf_pre = x;
  if (rstd_f) *rstd_f = rf;
  return xf;
}

double DenseDecoder::forward_backward(const Batch& b, float grad_scale, const ForwardOptions& opt) {
  const int64_t N = b.B * b.T, H = cfg_.hidden_size;
  std::vector<LayerSaved> saved;
  Tensor x_pre, rstd_f;
  const bool recompute = opt.activation_checkpointing;
  Tensor xf = trunk_forward(b, &saved, &x_pre, &rstd_f, recompute);
  Tensor dxf = ex_.empty({N, H});
  Param& head = lm_head();
  double loss = lm_head_cross_entropy(ex_, xf, head.work, b.targets, grad_scale, &dxf, &head.grad, opt.loss_chunk_rows);
  Tensor dx = ex_.empty({N, H});
  ops::rmsnorm_bwd(x_pre, norm_->work, rstd_f, dxf, dx, norm_->grad);
  Tensor cos, sin;
  rope_tables(b, cos, sin);
  for (size_t i = layers_.size(); i-- > 0;) {
    const ops::AttnParams p = attn_params(b, layers_[i].window);
    if (recompute) {
      Tensor x_in = saved[i].x;
      layer_forward(layers_[i], x_in, cos, sin, p, &saved[i]);  // same inputs, same kernels: same activations
    }
    dx = layer_backward(layers_[i], saved[i], cos, sin, p, dx);
    saved[i] = LayerSaved{};  // free this layer's activations as soon as they are consumed
  }
  ops::embedding_bwd(b.input_ids, dx, embed_->grad);
  return loss;
}

double DenseDecoder::forward_loss(const Batch& b, const ForwardOptions& opt) {
  Tensor xf = trunk_forward(b, nullptr, nullptr, nullptr);
  return lm_head_cross_entropy(ex_, xf, lm_head().work, b.targets, 0.f, nullptr, nullptr, opt.loss_chunk_rows);
}

Tensor DenseDecoder::forward_logits(const Batch& b) {
  Tensor xf = trunk_forward(b, nullptr, nullptr, nullptr);
  Tensor logits = ex_.empty({xf.dim(0), cfg_.vocab_size});
  ops::linear_fwd(xf, lm_head().work, nullptr, logits);
  return logits;
}

double lm_head_cross_entropy(const ExecContext& ex, const Tensor& x, const Tensor& W, const Tensor& targets,
                             float grad_scale, Tensor* dx, Tensor* dW, int64_t chunk_rows) {
#ifdef AM_WITH_CUDA
  if (ex.on_cuda()) {
    // Fused chunked GEMM + CE on the device; one host sync per micro-batch to read the loss sum.
    double* d_sum = cuda::alloc_device_scalar();
    cuda::lm_head_cross_entropy(x, W, targets, grad_scale, dx, dW, d_sum);
    double total = cuda::read_device_scalar(d_sum);
    cuda::free_device_scalar(d_sum);
    return total;
  }
#endif
  const int64_t N = x.dim(0), V = W.dim(0);
  const int32_t* t = targets.data<int32_t>();
  double total = 0.0;
  if (dx) dx->zero_();
  for (int64_t r0 = 0; r0 < N; r0 += chunk_rows) {
    int64_t r1 = std::min(N, r0 + chunk_rows);
    bool any = false;
    for (int64_t r = r0; r < r1 && !any; ++r) any = t[r] != -100;
    if (!any) continue;  // no label in this chunk: its logits have no effect on loss or gradients
    Tensor xc = x.slice_rows(r0, r1), tc = targets.slice_rows(r0, r1);
    Tensor logits = Tensor::empty({r1 - r0, V}, DType::F32);
    ops::linear_fwd(xc, W, nullptr, logits);
    if (!dx) {
      total += ops::cross_entropy_fwd_bwd(logits, tc, 0.f, nullptr);
      continue;
    }
    Tensor dlogits = Tensor::empty({r1 - r0, V}, DType::F32);
    total += ops::cross_entropy_fwd_bwd(logits, tc, grad_scale, &dlogits);
    Tensor dxc = dx->slice_rows(r0, r1);
    ops::linear_bwd(xc, W, dlogits, &dxc, *dW, nullptr);
  }
  return total;
}

}  // namespace am
