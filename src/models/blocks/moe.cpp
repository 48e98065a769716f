#include "models/blocks/moe.h"

#include "core/error.h"
#include "dist/communicator.h"
#include "models/blocks/lora.h"
#include "ops/gpt_oss_ops.h"
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

// GPT-OSS (GptOssMLP): router (weight + bias) and the experts' four fused tensors, in HF's state_dict order.
// One layout per tensor, the hub's: the experts' weights transposed into the engine's [E, out, in].
static MoeWeights register_gpt_oss_moe(ParamStore& ps, const std::string& pre, const io::ModelConfig& c, int ep_size) {
  const int64_t E = c.num_experts, H = c.hidden_size, I = c.moe_intermediate_size;
  if (ep_size > 1)
    throw UsageError("distributed.ep_size " + std::to_string(ep_size) +
                     ": expert parallelism is not implemented for gpt_oss yet (its fused expert tensors are not split)");
  MoeWeights w;
  w.router = &ps.add(pre + "mlp.router.weight", {E, H});
  w.router_bias = &ps.add(pre + "mlp.router.bias", {E});
  w.gate_up = &ps.add_expert(pre + "mlp.experts.gate_up_proj", {E, 2 * I, H}, 0, E);
  w.gate_up->layouts = {SourceLayout{SourceSlice{pre + "mlp.experts.gate_up_proj", 0, {E, H, 2 * I}, true}}};
  w.gate_up_bias = &ps.add(pre + "mlp.experts.gate_up_proj_bias", {E, 2 * I});
  w.down = &ps.add_expert(pre + "mlp.experts.down_proj", {E, H, I}, 0, E);
  w.down->layouts = {SourceLayout{SourceSlice{pre + "mlp.experts.down_proj", 0, {E, I, H}, true}}};
  w.down_bias = &ps.add(pre + "mlp.experts.down_proj_bias", {E, H});
  w.gpt_oss_glu = true;
  w.glu_alpha = static_cast<float>(c.swiglu_alpha);
  w.glu_limit = static_cast<float>(c.swiglu_limit);
  return w;
}

MoeWeights register_moe(ParamStore& ps, const std::string& pre, const io::ModelConfig& c, int ep_rank, int ep_size) {
  if (c.gpt_oss_glu) return register_gpt_oss_moe(ps, pre, c, ep_size);
  const int64_t E = c.num_experts, H = c.hidden_size, I = c.moe_intermediate_size;
  const int64_t El = E / ep_size, e0 = El * ep_rank;  // this rank's experts [e0, e0 + El)
  const ExpertNames hub = hub_names(c);
  MoeWeights w;
  // Internal names are transformers 5's (mlp.gate.weight, mlp.experts.gate_up_proj, mlp.experts.down_proj);
  // layout 0 is the hub's, layout 1 transformers 5's fused one (= the internal names).
  w.router = &ps.add(pre + "mlp.gate.weight", {E, H});
  w.router->layouts.insert(w.router->layouts.begin(), SourceLayout{{pre + hub.block + "gate.weight", 0, {E, H}}});
  if (hub.block == "mlp.") w.router->layouts.pop_back();  // the same name twice
  w.gate_up = &ps.add_expert(pre + "mlp.experts.gate_up_proj", {El, 2 * I, H}, e0, E);
  w.down = &ps.add_expert(pre + "mlp.experts.down_proj", {El, H, I}, e0, E);
  SourceLayout gu, dn;
  const std::string ex = pre + hub.block + "experts.";
  for (int64_t e = e0; e < e0 + El; ++e) {
    const std::string pe = ex + std::to_string(e) + ".";
    const int64_t l = e - e0;  // offsets are into this rank's part
    gu.push_back({pe + hub.gate + ".weight", l * 2 * I * H, {I, H}});
    gu.push_back({pe + hub.up + ".weight", l * 2 * I * H + I * H, {I, H}});
    dn.push_back({pe + hub.down + ".weight", l * H * I, {H, I}});
  }
  if (ep_size > 1) {
    // transformers 5's fused tensors hold every expert: not a slice this rank can own alone (and the
    // loader reads slices only). Expert parallelism reads and writes the per-expert layout.
    w.gate_up->layouts.clear();
    w.down->layouts.clear();
  }
  w.gate_up->layouts.insert(w.gate_up->layouts.begin(), gu);
  w.down->layouts.insert(w.down->layouts.begin(), dn);
  if (c.deepseek) {
    // HF DeepseekV3TopkRouter holds the correction bias next to its weight (transformers keeps it fp32);
    // DeepseekV2's gate is a plain Linear. The shared experts: one ungated SwiGLU MLP.
    if (c.ds.topk_method == "noaux_tc") {
      w.score_bias = &ps.add(pre + "mlp.gate.e_score_correction_bias", {E});
      ParamStore::freeze(*w.score_bias);
    }
    w.has_shared = true;
    w.shared = register_mlp(ps, pre + "mlp.shared_experts.", H, c.ds.n_shared_experts * I, c.mlp_bias);
  } else if (c.shared_expert_intermediate_size > 0) {
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

namespace {

// Expert parallelism, token side -> expert side. The grouped rows xg [N*k, H] are ordered by global expert,
// so rank j's experts [j*El, (j+1)*El) own one contiguous block; that block goes to rank j. Each rank then
// receives, from every rank s in turn, rows ordered by its local experts: (s, e) order. The grouped GEMMs
// want (e, s) order, so the plan also builds the two row permutations between the orders.
void plan_exchange(const ExecContext& ex, dist::Communicator& ep, const std::vector<int64_t>& counts, MoeSaved& s) {
  const int P = ep.size();
  const int64_t E = static_cast<int64_t>(counts.size()), El = E / P;
  s.send_rows.assign(P, 0);
  for (int j = 0; j < P; ++j)
    for (int64_t e = 0; e < El; ++e) s.send_rows[j] += counts[j * El + e];
  // recv_counts[src * El + e]: rows rank src sends for local expert e
  std::vector<int64_t> recv_counts(static_cast<size_t>(E));
  ep.all_to_all_host(counts.data(), recv_counts.data(), static_cast<size_t>(El));
  s.recv_rows.assign(P, 0);
  s.local_counts.assign(static_cast<size_t>(El), 0);
  for (int src = 0; src < P; ++src)
    for (int64_t e = 0; e < El; ++e) {
      s.recv_rows[src] += recv_counts[src * El + e];
      s.local_counts[e] += recv_counts[src * El + e];
    }
  int64_t R = 0;
  for (int64_t c : s.local_counts) R += c;
  // start of block (src, e) in received order
  std::vector<int64_t> start(static_cast<size_t>(E));
  int64_t at = 0;
  for (int src = 0; src < P; ++src)
    for (int64_t e = 0; e < El; ++e) {
      start[src * El + e] = at;
      at += recv_counts[src * El + e];
    }
  Tensor to_e = Tensor::empty({R}, DType::I32), from_e = Tensor::empty({R}, DType::I32);
  Tensor offs = Tensor::empty({El + 1}, DType::I32);
  int64_t j = 0;
  for (int64_t e = 0; e < El; ++e) {
    offs.data<int32_t>()[e] = static_cast<int32_t>(j);
    for (int src = 0; src < P; ++src)
      for (int64_t r = 0; r < recv_counts[src * El + e]; ++r, ++j) {
        const int64_t i = start[src * El + e] + r;  // received row i is expert-ordered row j
        to_e.data<int32_t>()[j] = static_cast<int32_t>(i);
        from_e.data<int32_t>()[i] = static_cast<int32_t>(j);
      }
  }
  offs.data<int32_t>()[El] = static_cast<int32_t>(R);
  s.to_expert = ex.upload(to_e);
  s.from_expert = ex.upload(from_e);
  s.local_offsets = ex.upload(offs);
}

// rows[idx[j]] for every j (a row gather: moe_gather with k = 1); empty-safe.
Tensor gather_rows(const ExecContext& ex, const Tensor& rows, const Tensor& idx, DType dt) {
  Tensor out = ex.empty({idx.dim(0), rows.dim(1)}, dt);
  if (idx.dim(0) > 0) ops::moe_gather(rows, idx, 1, out);
  return out;
}

// The all-to-all of rows between the token side and the expert side (forward dispatch = backward of
// combine; forward combine = backward of dispatch).
Tensor exchange(const ExecContext& ex, dist::Communicator& ep, const Tensor& rows, const std::vector<int64_t>& send,
                const std::vector<int64_t>& recv) {
  int64_t n = 0;
  for (int64_t r : recv) n += r;
  Tensor out = ex.empty({n, rows.dim(1)}, rows.dtype());
  ep.all_to_all_v(rows, send, out, recv);
  return out;
}

bool expert_parallel(const MoeOptions& o) { return o.ep && o.ep->size() > 1; }

// The experts' activation on gu [R, 2I] -> h [R, I], and its backward.
void expert_act_fwd(const MoeWeights& w, const Tensor& gu, Tensor& h) {
  if (w.gpt_oss_glu) ops::gpt_oss_glu_fwd(gu, w.glu_alpha, w.glu_limit, h);
  else ops::swiglu_fused_fwd(gu, h);
}
void expert_act_bwd(const MoeWeights& w, const Tensor& gu, const Tensor& dh, Tensor& dgu) {
  if (w.gpt_oss_glu) ops::gpt_oss_glu_bwd(gu, dh, w.glu_alpha, w.glu_limit, dgu);
  else ops::swiglu_fused_bwd(gu, dh, dgu);
}

}  // namespace

Tensor moe_forward(const ExecContext& ex, const MoeWeights& w, const MoeOptions& o, const Tensor& x, MoeSaved& s) {
  const int64_t N = x.dim(0), H = x.dim(1), E = w.router->work.dim(0), k = o.top_k;
  const int64_t I = w.down->work.dim(2);
  s.x = x;
  // DeepSeek's router computes in fp32 (HF DeepseekV3TopkRouter: F.linear of fp32 casts): on CUDA the bf16 GEMM
  // writes fp32 logits, and the correction bias is read from its fp32 copy (`value`, which the device keeps for
  // frozen 1-D parameters; the bf16 working copy only where there is none).
  Tensor logits = o.grouped ? ex.empty({N, E}, DType::F32) : ex.empty({N, E});
  ops::linear_fwd(x, w.router->work, work_or_null(w.router_bias), logits);
  s.probs = ex.empty({N, E}, DType::F32);
  s.topk_idx = ex.empty({N, k}, DType::I32);
  s.topk_w = ex.empty({N, k}, DType::F32);
  if (o.grouped) {
    const Param* b = w.score_bias;
    const Tensor* sb = !b ? nullptr : b->value.defined() ? &b->value : &b->work;
    ops::moe_router_grouped_fwd(logits, sb, k, *o.grouped, s.probs, s.topk_idx, s.topk_w);
  } else {
    ops::moe_router_fwd(logits, k, o.norm_topk_prob, s.probs, s.topk_idx, s.topk_w);
  }
  if (o.fake_balanced_gate) fake_balanced_routing(ex, N, k, E, s.topk_idx, s.topk_w);
  s.offsets = ex.empty({E + 1}, DType::I32);
  s.perm = ex.empty({N * k}, DType::I32);
  s.inv = ex.empty({N * k}, DType::I32);
  // Host counts: for the expert-parallel exchange plan, and for the grouped GEMMs unless they schedule from the
  // device offsets (AM_MOE_GEMM=persistent on CUDA: no host sync in the dispatch; s.counts stays empty).
  const bool ep = expert_parallel(o);
  s.counts.clear();
  const bool want_counts = ep || ops::moe_grouped_wants_host_counts(x);
  ops::moe_dispatch_plan(s.topk_idx, E, s.offsets, s.perm, s.inv, want_counts ? &s.counts : nullptr);
  Tensor xg = ex.empty({N * k, H});
  ops::moe_gather(x, s.perm, k, xg);
  // The experts' rows: xg itself, or (expert parallel) what the other ranks sent for this rank's experts.
  Tensor xe = xg;
  const Tensor* offs = &s.offsets;
  const std::vector<int64_t>* counts = want_counts ? &s.counts : nullptr;
  if (ep) {
    plan_exchange(ex, *o.ep, s.counts, s);
    xe = gather_rows(ex, exchange(ex, *o.ep, xg, s.send_rows, s.recv_rows), s.to_expert, xg.dtype());
    s.xe = xe;
    offs = &s.local_offsets;
    counts = &s.local_counts;
  }
  xg = Tensor();  // no-EP: recomputed in backward ([N*k, H] is the largest activation of the block)
  const int64_t R = xe.dim(0);
  s.gu = ex.empty({R, 2 * I});
  Tensor ye = ex.empty({R, H});
  if (R > 0) {
    ops::grouped_linear_fwd(xe, w.gate_up->work, *offs, s.gu, counts);
    if (w.gate_up->lora) grouped_lora_fwd_add(ex, *w.gate_up->lora, xe, *offs, counts, s.gu);
    if (w.gate_up_bias) ops::grouped_bias_add(s.gu, w.gate_up_bias->work, *offs);
    xe = Tensor();
    Tensor h = ex.empty({R, I});
    expert_act_fwd(w, s.gu, h);
    ops::grouped_linear_fwd(h, w.down->work, *offs, ye, counts);
    if (w.down->lora) grouped_lora_fwd_add(ex, *w.down->lora, h, *offs, counts, ye);
    if (w.down_bias) ops::grouped_bias_add(ye, w.down_bias->work, *offs);  // before the routing weight, as HF
  }
  // Back to the token side in grouped order.
  s.yg = ep ? exchange(ex, *o.ep, gather_rows(ex, ye, s.from_expert, ye.dtype()), s.recv_rows, s.send_rows) : ye;
  Tensor y = ex.empty({N, H});
  ops::moe_combine(s.yg, s.inv, s.topk_w, y);
  if (w.has_shared && !w.shared_gate) {
    ops::add_(y, mlp_forward(ex, w.shared, x, &s.shared));
  } else if (w.has_shared) {
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
  const bool ep = expert_parallel(o);
  // y = combine(yg, w)
  Tensor dyg = ex.empty({N * k, H}), dtopk_w = ex.empty({N, k}, DType::F32);
  ops::moe_combine_bwd(s.yg, s.inv, s.topk_w, dy, dyg, dtopk_w);
  // Expert side: the output gradients of the rows this rank's experts computed (the combine's backward is
  // a dispatch).
  Tensor dye = ep ? gather_rows(ex, exchange(ex, *o.ep, dyg, s.send_rows, s.recv_rows), s.to_expert, dyg.dtype()) : dyg;
  dyg = Tensor();
  const Tensor& offs = ep ? s.local_offsets : s.offsets;
  const std::vector<int64_t>* counts = ep ? &s.local_counts : s.counts.empty() ? nullptr : &s.counts;
  const int64_t R = dye.dim(0);
  Tensor dxe = ex.empty({R, H});
  if (R > 0) {
    // ye = grouped(h, down), h = SwiGLU(gu) recomputed (same kernel, same inputs: bit-identical)
    Tensor h = ex.empty({R, I});
    expert_act_fwd(w, s.gu, h);
    Tensor dh = ex.empty({R, I});
    ops::grouped_linear_bwd(h, w.down->work, offs, dye, &dh, w.down->grad, counts);
    if (w.down->lora) grouped_lora_bwd_add(ex, *w.down->lora, h, offs, counts, dye, &dh);
    if (Tensor* db = grad_or_null(w.down_bias)) ops::grouped_bias_bwd(dye, offs, *db);
    dye = Tensor();
    h = Tensor();
    Tensor dgu = ex.empty({R, 2 * I});
    expert_act_bwd(w, s.gu, dh, dgu);
    dh = Tensor();
    if (Tensor* db = grad_or_null(w.gate_up_bias)) ops::grouped_bias_bwd(dgu, offs, *db);
    // gu = grouped(xe, gate_up); xe = gather(x) recomputed, or (EP) the rows received in forward
    Tensor xe;
    if (ep) {
      xe = s.xe;
    } else {
      xe = ex.empty({N * k, H});
      ops::moe_gather(s.x, s.perm, k, xe);
    }
    ops::grouped_linear_bwd(xe, w.gate_up->work, offs, dgu, &dxe, w.gate_up->grad, counts);
    if (w.gate_up->lora) grouped_lora_bwd_add(ex, *w.gate_up->lora, xe, offs, counts, dgu, &dxe);
  }
  // Back to the token side (the dispatch's backward is a combine), then to the tokens.
  Tensor dxg = ep ? exchange(ex, *o.ep, gather_rows(ex, dxe, s.from_expert, dxe.dtype()), s.recv_rows, s.send_rows) : dxe;
  dxe = Tensor();
  Tensor dx = ex.empty({N, H});
  ops::moe_gather_bwd(dxg, s.inv, k, dx);
  dxg = Tensor();
  // router: routing weights (and the aux loss) -> probs -> logits -> x, Wr
  if (!o.fake_balanced_gate) {
    Tensor dlogits = ex.empty({N, E});
    if (o.grouped)  // (no aux loss for deepseek: dprobs_extra is never set)
      ops::moe_router_grouped_bwd(s.probs, s.topk_idx, *o.grouped, dtopk_w, dlogits);
    else
      ops::moe_router_bwd(s.probs, s.topk_idx, s.topk_w, o.norm_topk_prob, dtopk_w, dprobs_extra, dlogits);
    // dx += dlogits Wr: the dX GEMM accumulates (beta = 1 on CUDA; CPU: temporary + add, as ops::add_ did)
    ops::linear_bwd(s.x, w.router->work, dlogits, &dx, w.router->grad, grad_or_null(w.router_bias),
                    {.accumulate = true});
  }
  if (w.has_shared && !w.shared_gate) {
    Tensor dsx = mlp_backward(ex, w.shared, s.shared, dy);
    ops::add_(dx, dsx);
  } else if (w.has_shared) {
    Tensor dsy = ex.empty({N, H}), dg = ex.empty({N, 1});
    ops::moe_shared_gate_bwd(s.shared_y, s.shared_logit, dy, dsy, dg);
    ops::linear_bwd(s.x, w.shared_gate->work, dg, &dx, w.shared_gate->grad, nullptr, {.accumulate = true});
    Tensor dsx = mlp_backward(ex, w.shared, s.shared, dsy);
    ops::add_(dx, dsx);
  }
  return dx;
}

}  // namespace am
