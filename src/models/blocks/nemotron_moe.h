// Nemotron-H's MoE mixer (HF NemotronHMoE), on the CPU and on CUDA:
//   logits = x Wr^T (fp32)                                   [N, E]   mixer.gate.weight [E, H]
//   idx, w = DeepSeek-V3 routing (ops::moe_router_grouped_fwd: sigmoid scores, selection on scores +
//            mixer.gate.e_score_correction_bias (frozen), group top-2-sum over n_group / topk_group,
//            norm_topk_prob (+1e-20), * routed_scaling_factor)   [N, k]
//   y[t] = sum_s w[t,s] * down_e( relu(up_e x[t])^2 ),  e = idx[t,s]     ungated experts:
//          mixer.experts.up_proj [E, I, H], mixer.experts.down_proj [E, H, I] (transformers 5's fused
//          tensors; the hub's mixer.experts.{e}.up_proj.weight / down_proj.weight are their slices)
//   y += shared_experts(x)   (relu2 MLP, moe_shared_expert_intermediate_size)
// The experts run as the other MoE families' do (ops/moe_ops.h): a dispatch plan groups the N*k (token, slot)
// pairs by expert, each projection is one grouped GEMM over all experts, relu2 (ops/mamba2_ops.h) in between, and a
// weighted combine. No expert parallelism.
#pragma once
#include <string>
#include <vector>

#include "io/model_config.h"
#include "models/blocks/mlp.h"
#include "models/exec.h"
#include "models/params.h"
#include "ops/moe_ops.h"

namespace am {

struct NemotronMoeWeights {
  Param* router = nullptr;      // [E, H]
  Param* score_bias = nullptr;  // [E] frozen buffer
  Param* up = nullptr;          // [E, I, H]
  Param* down = nullptr;        // [E, H, I]
  MlpWeights shared;            // up [Is, H], down [H, Is]
  ops::GroupedRouterOptions router_opt;
};

struct NemotronMoeSaved {
  Tensor x;                    // [N, H]
  Tensor scores;               // [N, E] fp32 sigmoid scores
  Tensor topk_idx, topk_w;     // [N, k] int32, fp32
  Tensor offsets, perm, inv;   // dispatch plan: [E+1], [N*k], [N*k] int32
  std::vector<int64_t> counts; // [E] rows per expert (host)
  Tensor u;                    // [N*k, I] expert pre-activations, rows grouped by expert
  Tensor yg;                   // [N*k, H] expert outputs before the routing weights
  MlpSaved shared;
};

// prefix "model.layers.{i}.mixer.", hub "backbone.layers.{i}.mixer."
NemotronMoeWeights register_nemotron_moe(ParamStore& ps, const std::string& prefix, const std::string& hub,
                                         const io::ModelConfig& cfg);
Tensor nemotron_moe_forward(const ExecContext& ex, const NemotronMoeWeights& w, const io::ModelConfig& cfg, const Tensor& x,
                            NemotronMoeSaved* s);
Tensor nemotron_moe_backward(const ExecContext& ex, const NemotronMoeWeights& w, const io::ModelConfig& cfg,
                             const NemotronMoeSaved& s, const Tensor& dy);

}  // namespace am
