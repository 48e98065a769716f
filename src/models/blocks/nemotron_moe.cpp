#include "models/blocks/nemotron_moe.h"

#include "core/error.h"
#include "models/blocks/lora.h"
#include "models/blocks/mamba2.h"
#include "ops/ops.h"

namespace am {

NemotronMoeWeights register_nemotron_moe(ParamStore& ps, const std::string& pre, const std::string& hub,
                                         const io::ModelConfig& c) {
  const int64_t E = c.num_experts, H = c.hidden_size, I = c.moe_intermediate_size;
  NemotronMoeWeights w;
  // NemotronHMoE's state_dict order: experts, gate (weight, e_score_correction_bias), shared_experts.
  w.up = &ps.add(pre + "experts.up_proj", {E, I, H});
  w.down = &ps.add(pre + "experts.down_proj", {E, H, I});
  SourceLayout up, dn;
  for (int64_t e = 0; e < E; ++e) {
    const std::string pe = hub + "experts." + std::to_string(e) + ".";
    up.push_back({pe + "up_proj.weight", e * I * H, {I, H}});
    dn.push_back({pe + "down_proj.weight", e * H * I, {H, I}});
  }
  w.up->layouts.insert(w.up->layouts.begin(), up);  // the hub's per-expert layout first (what save_pretrained writes)
  w.down->layouts.insert(w.down->layouts.begin(), dn);
  w.router = &ps.add(pre + "gate.weight", {E, H});
  add_hub_layout(*w.router, hub + "gate.weight");
  w.score_bias = &ps.add(pre + "gate.e_score_correction_bias", {E});
  add_hub_layout(*w.score_bias, hub + "gate.e_score_correction_bias");
  ParamStore::freeze(*w.score_bias);  // a buffer: selection only, never trained
  w.shared = register_mlp_ungated(ps, pre + "shared_experts.", H, c.nh.moe_shared_expert_intermediate_size);
  add_hub_layout(*w.shared.up, hub + "shared_experts.up_proj.weight");
  add_hub_layout(*w.shared.down, hub + "shared_experts.down_proj.weight");
  w.router_opt.sigmoid = true;
  w.router_opt.group = ops::GroupedRouterOptions::Group::Top2Sum;
  w.router_opt.n_group = c.nh.n_group;
  w.router_opt.topk_group = c.nh.topk_group;
  w.router_opt.norm_topk_prob = c.norm_topk_prob;
  w.router_opt.routed_scaling_factor = static_cast<float>(c.nh.routed_scaling_factor);
  return w;
}

Tensor nemotron_moe_forward(const ExecContext& ex, const NemotronMoeWeights& w, const io::ModelConfig& c, const Tensor& x,
                            NemotronMoeSaved* s) {
  if (ex.on_cuda()) throw DeviceError("nemotron_h MoE mixer: not implemented on CUDA yet (run on the CPU)");
  const int64_t N = x.dim(0), H = c.hidden_size, E = c.num_experts, I = c.moe_intermediate_size, k = c.num_experts_per_tok;
  Tensor logits = Tensor::empty({N, E}, DType::F32);
  ops::linear_fwd(x, w.router->work, nullptr, logits);
  Tensor scores = Tensor::empty({N, E}, DType::F32), idx = Tensor::empty({N, k}, DType::I32), tw = Tensor::empty({N, k}, DType::F32);
  ops::moe_router_grouped_fwd(logits, &w.score_bias->work, k, w.router_opt, scores, idx, tw);
  Tensor u = Tensor::empty({N, k, I}, DType::F32);
  Tensor y = Tensor::zeros({N, H}, DType::F32);
  const float *px = x.f32(), *pup = w.up->work.f32(), *pdn = w.down->work.f32();
  std::vector<float> a(static_cast<size_t>(I));
  for (int64_t t = 0; t < N; ++t)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = idx.data<int32_t>()[t * k + j];
      float* ut = u.f32() + (t * k + j) * I;
      for (int64_t i = 0; i < I; ++i) {  // u = x W_up[e]^T
        const float* wr = pup + (e * I + i) * H;
        float acc = 0.f;
        for (int64_t h = 0; h < H; ++h) acc += px[t * H + h] * wr[h];
        ut[i] = acc;
        const float r = acc > 0.f ? acc : 0.f;
        a[static_cast<size_t>(i)] = r * r;
      }
      const float wt = tw.f32()[t * k + j];
      for (int64_t h = 0; h < H; ++h) {  // y += w * relu2(u) W_down[e]^T
        const float* wr = pdn + (e * H + h) * I;
        float acc = 0.f;
        for (int64_t i = 0; i < I; ++i) acc += a[static_cast<size_t>(i)] * wr[i];
        y.f32()[t * H + h] += acc * wt;
      }
    }
  MlpSaved sh;
  Tensor ys = mlp_forward(ex, w.shared, x, s ? &sh : nullptr);
  ops::add_(y, ys);
  if (s) {
    *s = NemotronMoeSaved{x, scores, idx, tw, u, sh};
  }
  return y;
}

Tensor nemotron_moe_backward(const ExecContext& ex, const NemotronMoeWeights& w, const io::ModelConfig& c,
                             const NemotronMoeSaved& s, const Tensor& dy) {
  const int64_t N = dy.dim(0), H = c.hidden_size, E = c.num_experts, I = c.moe_intermediate_size, k = c.num_experts_per_tok;
  Tensor dx = mlp_backward(ex, w.shared, s.shared, dy);
  Tensor dtw = Tensor::empty({N, k}, DType::F32);
  const float *px = s.x.f32(), *pup = w.up->work.f32(), *pdn = w.down->work.f32(), *pdy = dy.f32();
  float* gup = w.up->grad.defined() ? w.up->grad.f32() : nullptr;
  float* gdn = w.down->grad.defined() ? w.down->grad.f32() : nullptr;
  std::vector<float> a(static_cast<size_t>(I)), da(static_cast<size_t>(I));
  for (int64_t t = 0; t < N; ++t)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = s.topk_idx.data<int32_t>()[t * k + j];
      const float* ut = s.u.f32() + (t * k + j) * I;
      for (int64_t i = 0; i < I; ++i) {
        const float r = ut[i] > 0.f ? ut[i] : 0.f;
        a[static_cast<size_t>(i)] = r * r;
      }
      const float wt = s.topk_w.f32()[t * k + j];
      double dw = 0.0;  // d topk_w = dy . expert output
      std::fill(da.begin(), da.end(), 0.f);
      for (int64_t h = 0; h < H; ++h) {
        const float* wr = pdn + (e * H + h) * I;
        float o = 0.f;
        for (int64_t i = 0; i < I; ++i) o += a[static_cast<size_t>(i)] * wr[i];
        dw += static_cast<double>(pdy[t * H + h]) * o;
        const float dout = pdy[t * H + h] * wt;
        for (int64_t i = 0; i < I; ++i) {
          da[static_cast<size_t>(i)] += dout * wr[i];
          if (gdn) gdn[(e * H + h) * I + i] += dout * a[static_cast<size_t>(i)];
        }
      }
      dtw.f32()[t * k + j] = static_cast<float>(dw);
      for (int64_t i = 0; i < I; ++i) {
        const float du = ut[i] > 0.f ? 2.f * ut[i] * da[static_cast<size_t>(i)] : 0.f;
        if (du == 0.f) continue;
        const float* wr = pup + (e * I + i) * H;
        for (int64_t h = 0; h < H; ++h) {
          dx.f32()[t * H + h] += du * wr[h];
          if (gup) gup[(e * I + i) * H + h] += du * px[t * H + h];
        }
      }
    }
  Tensor dlogits = Tensor::empty({N, E}, DType::F32);
  ops::moe_router_grouped_bwd(s.scores, s.topk_idx, w.router_opt, dtw, dlogits);
  Tensor dxr = Tensor::empty({N, H}, DType::F32), none;
  ops::linear_bwd(s.x, w.router->work, dlogits, &dxr, w.router->grad.defined() ? w.router->grad : none, nullptr);
  ops::add_(dx, dxr);
  return dx;
}

}  // namespace am
