// Sparse Mixture-of-Experts block shared by qwen3_moe, qwen2_moe, mixtral and olmoe (HF's *SparseMoeBlock):
//   logits = x Wr^T                       [N, E]
//   probs = softmax(logits) (fp32); top-k experts per token, weights w [N, k] (renormalised if
//   norm_topk_prob; Mixtral always)
//   y[t] = sum_s w[t, s] * down_e( silu(gate_e x[t]) * up_e x[t] ),  e = topk_idx[t, s]
//   (qwen2_moe) y += sigmoid(x Wsg^T) * shared_mlp(x)
//   (gpt_oss) logits = x Wr^T + br; top-k of the logits, softmax over those k (= norm_topk_prob); each expert
//   y_e = gpt_oss_glu(x W_gu[e]^T + b_gu[e]) W_down[e]^T + b_down[e] (ops/gpt_oss_ops.h), gate/up columns
//   interleaved as on the hub. Hub tensors mlp.experts.gate_up_proj [E, H, 2I] / down_proj [E, I, H] are the
//   transposes of the internal [E, 2I, H] / [E, H, I] (SourceSlice::transposed).
//   (deepseek) the router is ops::moe_router_grouped_fwd (sigmoid / softmax scores, e_score_correction_bias,
//   group-limited top-k, routed_scaling_factor) and y += shared_experts(x), ungated
// The experts of a layer live in two fused parameters, as transformers 5 holds them:
//   mlp.experts.gate_up_proj [E, 2I, H] (gate rows first), mlp.experts.down_proj [E, H, I];
// the hub's per-expert tensors are slices of them (Param::layouts), so checkpoints load and save either way.
// Tokens are grouped by expert (dispatch plan) and each projection is one grouped GEMM over all experts.
// Expert parallelism (MoeOptions::ep, P ranks): each rank holds E/P experts ([E/P, 2I, H], [E/P, H, I]);
// the grouped rows for rank j's experts go to rank j by all-to-all (dispatch), come back the same way after
// the expert MLPs (combine), and in backward the two exchanges swap roles.
#pragma once
#include <string>
#include <vector>

#include "io/model_config.h"
#include "models/blocks/mlp.h"
#include "models/exec.h"
#include "models/params.h"
#include "ops/moe_ops.h"

namespace am {

namespace dist {
class Communicator;
}

struct MoeWeights {
  Param* router = nullptr;   // [E, H]
  Param* gate_up = nullptr;  // [E, 2I, H]
  Param* down = nullptr;     // [E, H, I]
  bool has_shared = false;   // qwen2_moe, deepseek
  MlpWeights shared{};       // [Is, H], [Is, H], [H, Is]
  Param* shared_gate = nullptr;  // [1, H] (qwen2_moe; deepseek's shared experts are ungated)
  Param* score_bias = nullptr;   // [E] deepseek_v3 mlp.gate.e_score_correction_bias: a frozen fp32 buffer
                                 // (selection only; loaded and saved, never trained)
  // gpt_oss
  Param* router_bias = nullptr;   // [E]
  Param* gate_up_bias = nullptr;  // [E, 2I] interleaved (gate = even, up = odd)
  Param* down_bias = nullptr;     // [E, H]
  bool gpt_oss_glu = false;       // clamped SwiGLU on interleaved columns (else silu(gate) * up, gate first)
  float glu_alpha = 1.702f, glu_limit = 7.f;
};

struct MoeSaved {
  Tensor x;                    // [N, H] block input (aliases the caller's tensor)
  Tensor probs;                // [N, E] fp32 softmax of the router logits
  Tensor topk_idx, topk_w;     // [N, k] int32, fp32
  Tensor offsets, perm, inv;   // dispatch plan: [E+1], [N*k], [N*k] int32
  std::vector<int64_t> counts; // [E] rows per expert (host)
  Tensor gu, yg;               // [N*k, 2I], [N*k, H] (xg = gather(x) and h = SwiGLU(gu) [N*k, I] are
                               // recomputed in backward instead of kept)
  // Expert parallelism: what this rank's experts computed on the rows it received.
  std::vector<int64_t> send_rows, recv_rows;  // [P] rows sent to / received from each rank
  std::vector<int64_t> local_counts;          // [E/P] received rows per local expert (host)
  Tensor local_offsets;        // [E/P + 1] int32
  Tensor to_expert, from_expert;  // [R] int32: received (rank, expert) order <-> grouped (expert, rank) order
  Tensor xe;                   // [R, H] received rows in expert order (the experts' input)
  MlpSaved shared;             // qwen2_moe
  Tensor shared_y, shared_logit;  // [N, H], [N, 1]
};

struct MoeOptions {
  int64_t top_k = 0;
  bool norm_topk_prob = false;
  bool fake_balanced_gate = false;  // tokens -> experts round-robin, weights 1/k, no router gradient
  dist::Communicator* ep = nullptr;  // expert-parallel group (nullptr: every expert is local)
  const ops::GroupedRouterOptions* grouped = nullptr;  // deepseek's router (nullptr: softmax top-k)
};

// prefix: "model.layers.{i}." Registers the router, the fused experts (+ shared expert) with the hub's
// per-expert layout first and transformers 5's fused layout as the alternative. With ep_size > 1 only
// experts [ep_rank * E/ep_size, (ep_rank + 1) * E/ep_size) are registered (and so loaded and saved).
MoeWeights register_moe(ParamStore& ps, const std::string& layer_prefix, const io::ModelConfig& cfg,
                        int ep_rank = 0, int ep_size = 1);

// x [N, H] -> y [N, H]. `s` is always filled (the routing is needed for the aux loss and the metrics);
// callers that do not need backward drop it.
Tensor moe_forward(const ExecContext& ex, const MoeWeights& w, const MoeOptions& o, const Tensor& x, MoeSaved& s);
// dy [N, H] -> dx [N, H] (assigned); parameter grads accumulated. dprobs_extra [N, E] fp32 (or nullptr): the
// aux loss's gradient on the router probabilities.
Tensor moe_backward(const ExecContext& ex, const MoeWeights& w, const MoeOptions& o, const MoeSaved& s,
                    const Tensor& dy, const Tensor* dprobs_extra);

}  // namespace am
