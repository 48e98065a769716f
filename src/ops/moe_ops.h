// Mixture-of-Experts op front-ends (the contract; bodies in moe_ops.cpp dispatch to backend/cpu/moe.cpp,
// the reference, and backend/cuda/moe*.cu). Conventions as ops.h: row-major, weights [out, in],
// parameter gradients ACCUMULATE (+=), activation gradients ASSIGN (=). Index tensors are int32 and live
// on the same device as the data.
//
// One MoE layer, N tokens, E experts, top-k, hidden H, expert intermediate I (HF Qwen3MoeSparseMoeBlock,
// MixtralSparseMoeBlock, OlmoeSparseMoeBlock, Qwen2MoeSparseMoeBlock semantics):
//   logits = x Wr^T                              [N, E]   (a plain linear_fwd)
//   probs  = softmax(logits) in fp32              [N, E]
//   topk_idx, topk_w = topk(probs, k)             [N, k]   (descending; optionally w /= sum(w))
//   plan: the N*k (token, slot) pairs sorted by expert, stable in t*k+s order -> offsets [E+1]
//   xg = x[perm / k]                              [N*k, H] rows grouped by expert
//   gu = grouped_linear(xg, W_gate_up[e])         [N*k, 2I]  (W_gate_up [E, 2I, H]: gate rows first)
//   h  = silu(gu[:, :I]) * gu[:, I:]              [N*k, I]
//   yg = grouped_linear(h, W_down[e])             [N*k, H]   (W_down [E, H, I])
//   y[t] = sum_s topk_w[t, s] * yg[inv[t*k + s]]  [N, H]
// (gpt_oss differs in the activation, gate/up rows interleaved, and per-expert biases: ops/gpt_oss_ops.h.)
#pragma once
#include <cstdint>
#include <vector>

#include "core/linear_out.h"
#include "core/router_options.h"
#include "core/tensor.h"

namespace am::ops {

// ---------------- router ----------------
// logits [N, E] (fp32 or bf16) -> probs [N, E] fp32 = softmax(logits) (computed in fp32),
// topk_idx [N, k] int32 = indices of the k largest probs in descending order (ties: lower index first, as
// torch.topk on CPU), topk_w [N, k] fp32 = probs at those indices, divided by their sum when
// norm_topk_prob.
void moe_router_fwd(const Tensor& logits, int64_t k, bool norm_topk_prob, Tensor& probs, Tensor& topk_idx,
                    Tensor& topk_w);
// Backward of the above w.r.t. logits (assigned; dtype of dlogits fp32 or bf16). dtopk_w [N, k] fp32 is the
// gradient of the routing weights. dprobs_extra [N, E] fp32 (nullptr: none) is an extra gradient on probs
// (the auxiliary load-balancing loss), added before the softmax backward:
//   dprobs = scatter(topk_idx, d(topk_w before normalisation)) + dprobs_extra
//   dlogits = probs * (dprobs - sum_e(probs * dprobs))
void moe_router_bwd(const Tensor& probs, const Tensor& topk_idx, const Tensor& topk_w, bool norm_topk_prob,
                    const Tensor& dtopk_w, const Tensor* dprobs_extra, Tensor& dlogits);

// ---------------- DeepSeek routers (moe_router_grouped.cpp; CUDA: backend/cuda/moe_router_grouped.cu) ----------------
// HF DeepseekV3MoE.route_tokens_to_experts / DeepseekV2Moe.route_tokens_to_experts, on logits [N, E] (host: fp32;
// CUDA: fp32 or bf16, and the bias fp32 or bf16; E <= 1024 there):
//   scores = sigmoid(logits) (v3) or softmax(logits) (v2)                          [N, E] fp32 (saved)
//   choice = scores + bias (v3's e_score_correction_bias [E]; none for v2)         selection only, no gradient
//   group-limited (group != None): the E experts form n_group groups of E / n_group; a group's score is the
//     sum of its top-2 choices (Top2Sum, v3) or its max (Max, v2 group_limited_greedy); the topk_group best
//     groups are kept and every other expert's choice becomes 0.0 (HF masked_fill(..., 0.0), not -inf)
//   topk_idx = the k largest choices (ties: lower index first)                     [N, k] int32
//   topk_w = scores[topk_idx], / (sum + 1e-20) when norm_topk_prob, * routed_scaling_factor   [N, k] fp32
using am::GroupedRouterOptions;  // core/router_options.h (the backends take it without including ops/)
void moe_router_grouped_fwd(const Tensor& logits, const Tensor* bias, int64_t k, const GroupedRouterOptions& o,
                            Tensor& scores, Tensor& topk_idx, Tensor& topk_w);
// d logits [N, E] (assigned; fp32, on CUDA also bf16) from dtopk_w [N, k] (the selection is piecewise constant:
// no gradient through the choice, none to the bias):  du_j = (r / S) (dw_j - [norm] sum_s dw_s u_s / S) at the selected
// experts (u = scores, S = sum u + 1e-20 or 1), then sigmoid' = p (1 - p), or the softmax Jacobian.
void moe_router_grouped_bwd(const Tensor& scores, const Tensor& topk_idx, const GroupedRouterOptions& o,
                            const Tensor& dtopk_w, Tensor& dlogits);

// ---------------- routing statistics and the load-balancing aux loss (no host sync) ----------------
// HF's load_balancing_loss_func (with the attention mask) over the L sparse layers of one micro-batch, kept on the
// data's device: each layer's forward accumulates its statistics (moe_routing_stats), the aux loss and its gradient
// on the router probabilities come from the sums after the last layer (moe_aux_loss), before the backward. Token t
// is real iff seg[t] >= 0 (seg: Batch::segment_ids, [N] or [B, T] int32, -1 = padding); padding rows are routed
// (as in HF) but are not counted. CPU: backend/cpu/moe_aux.cpp; CUDA: backend/cuda/moe_aux.cu (no host sync).
//
// One layer, ACCUMULATED (+=) into buffers that the caller zeroes:
//   counts[e]  += #{(t, s) : seg[t] >= 0, topk_idx[t, s] == e}     [E] int32 (nullptr: not wanted)
//   counts2[e] += the same, into a second buffer (e.g. per-layer step totals next to the micro-batch's sum)
//   psum[e]    += sum_{t : seg[t] >= 0} probs[t, e]                  [E] fp32 (nullptr: not wanted)
// topk_idx [N, k] int32, probs [N, E] fp32 (read only for psum). Indices outside [0, E) are not counted (the
// dispatch plan reports them). psum rounding: CPU one double running sum per expert from the buffer's value, in
// token order, rounded once per call; CUDA fp32 partial sums over fixed 128-row chunks added in chunk order
// (deterministic, within fp32 rounding of the host's). The counts are exact on both.
void moe_routing_stats(const Tensor& topk_idx, const Tensor& probs, const Tensor& seg, Tensor* counts, Tensor* psum,
                       Tensor* counts2 = nullptr);
// From f [E] int32 (counts summed over the L = num_layers layers) and psum [E] fp32 (likewise):
//   n = #{t : seg[t] >= 0},  D = L * n  (double)
//   aux[0] = E * sum_e (f[e] / D) * (psum[e] / D)                    aux [1] fp32 (assigned)
//   dprobs[t, e] = (scale * E) * (f[e] / D) / D  for real t, else 0  dprobs [N, E] fp32 (assigned; nullptr: not
//                                                                    wanted), the same for every layer
// with scale * E rounded to fp32 and the rest in double (one rounding at each store), on both devices: dprobs is
// bitwise the host's on CUDA too (f and n are exact); aux differs only through psum. n == 0: aux = 0, dprobs = 0.
// (f is piecewise constant in the logits: the top-k selection has no gradient.)
void moe_aux_loss(const Tensor& f, const Tensor& psum, const Tensor& seg, int64_t num_layers, float scale, Tensor& aux,
                  Tensor* dprobs);

// ---------------- dispatch plan ----------------
// topk_idx [N, k] int32 (values in [0, E)) -> offsets [E+1] int32 (offsets[e]..offsets[e+1] are expert e's
// rows in grouped order), perm [N*k] int32 (perm[j] = t*k + s of grouped row j; within an expert the pairs
// keep increasing t*k+s order), inv_perm [N*k] int32 (inv_perm[t*k+s] = j). When host_counts is non-null it
// receives the E per-expert row counts on the host (on CUDA this is the one device->host sync of a layer;
// the grouped GEMM needs the sizes). Throws DataError if an index is outside [0, E).
void moe_dispatch_plan(const Tensor& topk_idx, int64_t num_experts, Tensor& offsets, Tensor& perm,
                       Tensor& inv_perm, std::vector<int64_t>* host_counts);
// Whether the grouped linear products on t's device want those host counts: false on CUDA under
// AM_MOE_GEMM=persistent (the persistent grouped GEMM schedules its tiles from the device offsets, so the dispatch
// can skip the host copy and its sync), true otherwise (CPU: the counts come for free).
bool moe_grouped_wants_host_counts(const Tensor& t);

// ---------------- permutation ----------------
// x [N, H] -> xg [N*k, H]: xg[j] = x[perm[j] / k]
void moe_gather(const Tensor& x, const Tensor& perm, int64_t k, Tensor& xg);
// Backward of moe_gather: dx[t] = sum_s dxg[inv_perm[t*k + s]]  (dx [N, H] assigned)
void moe_gather_bwd(const Tensor& dxg, const Tensor& inv_perm, int64_t k, Tensor& dx);
// yg [N*k, H], topk_w [N, k] fp32 -> y [N, H] (assigned): y[t] = sum_s topk_w[t, s] * yg[inv_perm[t*k + s]]
void moe_combine(const Tensor& yg, const Tensor& inv_perm, const Tensor& topk_w, Tensor& y);
// Backward of moe_combine: dyg[inv_perm[t*k+s]] = topk_w[t, s] * dy[t]  (dyg [N*k, H] assigned),
// dtopk_w[t, s] = <yg[inv_perm[t*k+s]], dy[t]>  (dtopk_w [N, k] fp32 assigned, fp32 accumulation).
void moe_combine_bwd(const Tensor& yg, const Tensor& inv_perm, const Tensor& topk_w, const Tensor& dy,
                     Tensor& dyg, Tensor& dtopk_w);

// ---------------- grouped linear (all experts, one call) ----------------
// x [M, K] with rows grouped by expert (offsets [E+1] int32, offsets[E] == M, on x's device), w [E, Nout, K]
// -> y [M, Nout] (assigned): y[r] = x[r] w[e]^T for offsets[e] <= r < offsets[e+1]. host_counts: the
// same per-expert row counts on the host (from moe_dispatch_plan), or nullptr to read them from offsets.
// yo (core/linear_out.h, as ops::linear_fwd's): y[r] = yo.alpha * x[r] w[e]^T (+ y[r] with yo.accumulate); CPU
// bit-identical to the separate ops::scale_ / ops::add_, CUDA alpha / beta = 1 inside the expert GEMMs.
void grouped_linear_fwd(const Tensor& x, const Tensor& w, const Tensor& offsets, Tensor& y,
                        const std::vector<int64_t>* host_counts = nullptr, const LinearOut& yo = {});
// dx = dy w[e] (assigned; skipped when dx is nullptr), dw[e] += dy_e^T x_e (fp32 accumulation; experts with
// no rows leave dw[e] unchanged; dw undefined: frozen experts, no dW GEMM runs, as in ops.h). dxo: dx =
// dxo.alpha * dy w[e] (+ dx with dxo.accumulate), as yo above.
void grouped_linear_bwd(const Tensor& x, const Tensor& w, const Tensor& offsets, const Tensor& dy, Tensor* dx,
                        Tensor& dw, const std::vector<int64_t>* host_counts = nullptr, const LinearOut& dxo = {});

// ---------------- SwiGLU on a fused [gate | up] tensor ----------------
// gu [M, 2I] (gate = columns [0, I), up = [I, 2I)) -> h [M, I] = silu(gate) * up
void swiglu_fused_fwd(const Tensor& gu, Tensor& h);
// dgu [M, 2I] assigned
void swiglu_fused_bwd(const Tensor& gu, const Tensor& dh, Tensor& dgu);

// ---------------- qwen2_moe's sigmoid-gated shared expert (src/ops/moe_shared_gate.cpp) ----------------
// sy [N, H] (shared expert output), g [N, 1] (x Wsg^T) -> y [N, H] += sigmoid(g) * sy
void moe_shared_gate_fwd(const Tensor& sy, const Tensor& g, Tensor& y);
// dsy [N, H] = sigmoid(g) * dy (assigned); dg [N, 1] = sigmoid(g) (1 - sigmoid(g)) <sy, dy> (assigned).
// dg is an activation gradient (of the gate logit), not a weight gradient: the gate weight Wsg's gradient
// comes from the linear_bwd that follows (an undefined dw there when Wsg is frozen).
void moe_shared_gate_bwd(const Tensor& sy, const Tensor& g, const Tensor& dy, Tensor& dsy, Tensor& dg);

}  // namespace am::ops
