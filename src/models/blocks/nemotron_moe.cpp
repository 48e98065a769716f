#include "models/blocks/nemotron_moe.h"

#include "core/error.h"
#include "models/blocks/lora.h"
#include "models/blocks/mamba2.h"
#include "ops/mamba2_ops.h"
#include "ops/moe_ops.h"
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
  const int64_t N = x.dim(0), H = c.hidden_size, E = c.num_experts, I = c.moe_intermediate_size, k = c.num_experts_per_tok;
  NemotronMoeSaved tmp;
  NemotronMoeSaved& sv = s ? *s : tmp;
  sv = NemotronMoeSaved{};
  sv.x = x;
  // Router in fp32 (HF: F.linear of fp32 casts): on CUDA the bf16 GEMM writes fp32 logits. The correction bias is
  // read from its fp32 copy (`value`, kept on the device for frozen 1-D parameters).
  Tensor logits = ex.empty({N, E}, DType::F32);
  ops::linear_fwd(x, w.router->work, nullptr, logits);
  sv.scores = ex.empty({N, E}, DType::F32);
  sv.topk_idx = ex.empty({N, k}, DType::I32);
  sv.topk_w = ex.empty({N, k}, DType::F32);
  const Param* sb = w.score_bias;
  ops::moe_router_grouped_fwd(logits, sb->value.defined() ? &sb->value : &sb->work, k, w.router_opt, sv.scores, sv.topk_idx,
                              sv.topk_w);
  logits = Tensor();
  // Tokens grouped by expert: xg [N*k, H] -> u = xg W_up[e]^T [N*k, I] -> relu2 -> yg = h W_down[e]^T [N*k, H]
  sv.offsets = ex.empty({E + 1}, DType::I32);
  sv.perm = ex.empty({N * k}, DType::I32);
  sv.inv = ex.empty({N * k}, DType::I32);
  // Host counts only where the grouped GEMMs want them (not under AM_MOE_GEMM=persistent on CUDA: no host sync).
  const bool want_counts = ops::moe_grouped_wants_host_counts(x);
  ops::moe_dispatch_plan(sv.topk_idx, E, sv.offsets, sv.perm, sv.inv, want_counts ? &sv.counts : nullptr);
  const std::vector<int64_t>* counts = want_counts ? &sv.counts : nullptr;
  Tensor y = ex.empty({N, H});
  sv.u = ex.empty({N * k, I});
  sv.yg = ex.empty({N * k, H});
  if (N * k > 0) {
    Tensor xg = ex.empty({N * k, H});
    ops::moe_gather(x, sv.perm, k, xg);
    ops::grouped_linear_fwd(xg, w.up->work, sv.offsets, sv.u, counts);
    xg = Tensor();  // recomputed in backward
    Tensor h = ex.empty({N * k, I});
    ops::relu2_fwd(sv.u, h);
    ops::grouped_linear_fwd(h, w.down->work, sv.offsets, sv.yg, counts);
  }
  ops::moe_combine(sv.yg, sv.inv, sv.topk_w, y);  // y[t] = sum_s w[t, s] * yg[inv[t*k + s]]
  Tensor ys = mlp_forward(ex, w.shared, x, s ? &sv.shared : nullptr);
  ops::add_(y, ys);
  return y;
}

Tensor nemotron_moe_backward(const ExecContext& ex, const NemotronMoeWeights& w, const io::ModelConfig& c,
                             const NemotronMoeSaved& s, const Tensor& dy) {
  const int64_t N = dy.dim(0), H = c.hidden_size, E = c.num_experts, I = c.moe_intermediate_size, k = c.num_experts_per_tok;
  Tensor dx = mlp_backward(ex, w.shared, s.shared, dy);
  // y = combine(yg, topk_w): dyg [N*k, H], dtopk_w [N, k] fp32 (= dy . expert output)
  Tensor dyg = ex.empty({N * k, H}), dtw = ex.empty({N, k}, DType::F32);
  ops::moe_combine_bwd(s.yg, s.inv, s.topk_w, dy, dyg, dtw);
  if (N * k > 0) {
    // yg = grouped(h, down), h = relu2(u) recomputed (same kernel, same input: bit-identical)
    Tensor h = ex.empty({N * k, I});
    ops::relu2_fwd(s.u, h);
    Tensor dh = ex.empty({N * k, I});
    const std::vector<int64_t>* counts = s.counts.empty() ? nullptr : &s.counts;
    ops::grouped_linear_bwd(h, w.down->work, s.offsets, dyg, &dh, w.down->grad, counts);
    h = Tensor();
    dyg = Tensor();
    Tensor du = ex.empty({N * k, I});
    ops::relu2_bwd(s.u, dh, du);
    dh = Tensor();
    // u = grouped(xg, up), xg = gather(x) recomputed
    Tensor xg = ex.empty({N * k, H});
    ops::moe_gather(s.x, s.perm, k, xg);
    Tensor dxg = ex.empty({N * k, H});
    ops::grouped_linear_bwd(xg, w.up->work, s.offsets, du, &dxg, w.up->grad, counts);
    xg = du = Tensor();
    Tensor dxe = ex.empty({N, H});
    ops::moe_gather_bwd(dxg, s.inv, k, dxe);
    ops::add_(dx, dxe);
  }
  // router: routing weights -> scores -> logits -> x, Wr (the selection has no gradient; the bias none)
  Tensor dlogits = ex.empty({N, E});
  ops::moe_router_grouped_bwd(s.scores, s.topk_idx, w.router_opt, dtw, dlogits);
  Tensor none;  // dx += dlogits Wr (the dX GEMM accumulates: beta = 1 on CUDA; CPU: temporary + add as before)
  ops::linear_bwd(s.x, w.router->work, dlogits, &dx, w.router->grad.defined() ? w.router->grad : none, nullptr,
                  {.accumulate = true});
  return dx;
}

}  // namespace am
