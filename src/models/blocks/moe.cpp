#include "models/blocks/moe.h"

#include "core/error.h"
#include "ops/moe_ops.h"
#include "ops/ops.h"

namespace am {

namespace {

// The hub's per-expert names (transformers 4, vLLM, the files on the Hub) for one projection of expert e.
struct ExpertNames {
  std::string block;             // "mlp." or (mixtral) "block_sparse_moe."
  std::string gate, up, down;    // "gate_proj" / "up_proj" / "down_proj" or (mixtral) "w1" / "w3" / "w2"
};

ExpertNames hub_names(const io::ModelConfig& c) {
  if (c.model_type == "mixtral") return {"block_sparse_moe.", "w1", "w3", "w2"};
  return {"mlp.", "gate_proj", "up_proj", "down_proj"};
}

}  // namespace

MoeWeights register_moe(ParamStore& ps, const std::string& pre, const io::ModelConfig& c) {
  const int64_t E = c.num_experts, H = c.hidden_size, I = c.moe_intermediate_size;
  const ExpertNames hub = hub_names(c);
  MoeWeights w;
  // Internal names are transformers 5's (mlp.gate.weight, mlp.experts.gate_up_proj, mlp.experts.down_proj);
  // layout 0 is the hub's, layout 1 transformers 5's fused one (= the internal names).
  w.router = &ps.add(pre + "mlp.gate.weight", {E, H});
  w.router->layouts.insert(w.router->layouts.begin(), SourceLayout{{pre + hub.block + "gate.weight", 0, {E, H}}});
  if (hub.block == "mlp.") w.router->layouts.pop_back();  // the same name twice
  w.gate_up = &ps.add(pre + "mlp.experts.gate_up_proj", {E, 2 * I, H});
  w.down = &ps.add(pre + "mlp.experts.down_proj", {E, H, I});
  SourceLayout gu, dn;
  const std::string ex = pre + hub.block + "experts.";
  for (int64_t e = 0; e < E; ++e) {
    const std::string pe = ex + std::to_string(e) + ".";
    gu.push_back({pe + hub.gate + ".weight", e * 2 * I * H, {I, H}});
    gu.push_back({pe + hub.up + ".weight", e * 2 * I * H + I * H, {I, H}});
    dn.push_back({pe + hub.down + ".weight", e * H * I, {H, I}});
  }
  w.gate_up->layouts.insert(w.gate_up->layouts.begin(), gu);
  w.down->layouts.insert(w.down->layouts.begin(), dn);
  if (c.shared_expert_intermediate_size > 0) {
    w.has_shared = true;
    w.shared = register_mlp(ps, pre + "mlp.shared_expert.", H, c.shared_expert_intermediate_size, false);
    w.shared_gate = &ps.add(pre + "mlp.shared_expert_gate.weight", {1, H});
  }
  return w;
}

// AutoModel's fake balanced gate: token t's slot s goes to expert (t*k + s) mod E with weight 1/k, so every
// expert gets the same load whatever the router says (for benchmarks; the router gets no gradient).
static void fake_balanced_routing(const ExecContext& ex, int64_t N, int64_t k, int64_t E, Tensor& idx, Tensor& w) {
  Tensor hi = Tensor::empty({N, k}, DType::I32), hw = Tensor::empty({N, k}, DType::F32);
  for (int64_t i = 0; i < N * k; ++i) {
    hi.data<int32_t>()[i] = static_cast<int32_t>(i % E);
    hw.f32()[i] = 1.0f / static_cast<float>(k);
  }
  idx = ex.upload(hi);
  w = ex.upload(hw);
}

Tensor moe_forward(const ExecContext& ex, const MoeWeights& w, const MoeOptions& o, const Tensor& x, MoeSaved& s) {
  const int64_t N = x.dim(0), H = x.dim(1), E = w.router->work.dim(0), k = o.top_k;
  const int64_t I = w.down->work.dim(2);
  s.x = x;
  Tensor logits = ex.empty({N, E});
  ops::linear_fwd(x, w.router->work, nullptr, logits);
  s.probs = ex.empty({N, E}, DType::F32);
  s.topk_idx = ex.empty({N, k}, DType::I32);
  s.topk_w = ex.empty({N, k}, DType::F32);
  ops::moe_router_fwd(logits, k, o.norm_topk_prob, s.probs, s.topk_idx, s.topk_w);
  if (o.fake_balanced_gate) fake_balanced_routing(ex, N, k, E, s.topk_idx, s.topk_w);
  s.offsets = ex.empty({E + 1}, DType::I32);
  s.perm = ex.empty({N * k}, DType::I32);
  s.inv = ex.empty({N * k}, DType::I32);
  ops::moe_dispatch_plan(s.topk_idx, E, s.offsets, s.perm, s.inv, &s.counts);
  Tensor xg = ex.empty({N * k, H});
  ops::moe_gather(x, s.perm, k, xg);
  s.gu = ex.empty({N * k, 2 * I});
  ops::grouped_linear_fwd(xg, w.gate_up->work, s.offsets, s.gu, &s.counts);
  xg = Tensor();  // recomputed in backward: [N*k, H] is the largest activation of the block
  Tensor h = ex.empty({N * k, I});
  ops::swiglu_fused_fwd(s.gu, h);
  s.yg = ex.empty({N * k, H});
  ops::grouped_linear_fwd(h, w.down->work, s.offsets, s.yg, &s.counts);
  Tensor y = ex.empty({N, H});
  ops::moe_combine(s.yg, s.inv, s.topk_w, y);
  if (w.has_shared) {
    s.shared_y = mlp_forward(ex, w.shared, x, &s.shared);
    s.shared_logit = ex.empty({N, 1});
    ops::linear_fwd(x, w.shared_gate->work, nullptr, s.shared_logit);
    ops::moe_shared_gate_fwd(s.shared_y, s.shared_logit, y);
  }
  return y;
}

Tensor moe_backward(const ExecContext& ex, const MoeWeights& w, const MoeOptions& o, const MoeSaved& s,
                    const Tensor& dy, const Tensor* dprobs_extra) {
  const int64_t N = dy.dim(0), H = dy.dim(1), E = w.router->work.dim(0), k = o.top_k;
  const int64_t I = w.down->work.dim(2);
  // y = combine(yg, w)
  Tensor dyg = ex.empty({N * k, H}), dtopk_w = ex.empty({N, k}, DType::F32);
  ops::moe_combine_bwd(s.yg, s.inv, s.topk_w, dy, dyg, dtopk_w);
  // yg = grouped(h, down), h = SwiGLU(gu) recomputed (same kernel, same inputs: bit-identical)
  Tensor h = ex.empty({N * k, I});
  ops::swiglu_fused_fwd(s.gu, h);
  Tensor dh = ex.empty({N * k, I});
  ops::grouped_linear_bwd(h, w.down->work, s.offsets, dyg, &dh, w.down->grad, &s.counts);
  dyg = Tensor();
  h = Tensor();
  Tensor dgu = ex.empty({N * k, 2 * I});
  ops::swiglu_fused_bwd(s.gu, dh, dgu);
  dh = Tensor();
  // gu = grouped(xg, gate_up), xg = gather(x)
  Tensor xg = ex.empty({N * k, H});
  ops::moe_gather(s.x, s.perm, k, xg);
  Tensor dxg = ex.empty({N * k, H});
  ops::grouped_linear_bwd(xg, w.gate_up->work, s.offsets, dgu, &dxg, w.gate_up->grad, &s.counts);
  xg = Tensor();
  dgu = Tensor();
  Tensor dx = ex.empty({N, H});
  ops::moe_gather_bwd(dxg, s.inv, k, dx);
  dxg = Tensor();
  // router: routing weights (and the aux loss) -> probs -> logits -> x, Wr
  if (!o.fake_balanced_gate) {
    Tensor dlogits = ex.empty({N, E});
    ops::moe_router_bwd(s.probs, s.topk_idx, s.topk_w, o.norm_topk_prob, dtopk_w, dprobs_extra, dlogits);
    Tensor tmp = ex.empty({N, H});
    ops::linear_bwd(s.x, w.router->work, dlogits, &tmp, w.router->grad, nullptr);
    ops::add_(dx, tmp);
  }
  if (w.has_shared) {
    Tensor dsy = ex.empty({N, H}), dg = ex.empty({N, 1});
    ops::moe_shared_gate_bwd(s.shared_y, s.shared_logit, dy, dsy, dg);
    Tensor tmp = ex.empty({N, H});
    ops::linear_bwd(s.x, w.shared_gate->work, dg, &tmp, w.shared_gate->grad, nullptr);
    ops::add_(dx, tmp);
    Tensor dsx = mlp_backward(ex, w.shared, s.shared, dsy);
    ops::add_(dx, dsx);
  }
  return dx;
}

}  // namespace am
