// Gated MLP shared by the dense families (and each MoE expert):
//   y = down( act(x Wg^T) * (x Wu^T) )      x [N, H], gate/up [N, I], y [N, H]
//   act = silu (SwiGLU; every family but Gemma) or gelu_pytorch_tanh (GeGLU; Gemma)
//   (phi3) [gate | up] = x Wgu^T: one fused GEMM [N, 2I], gate the first half
//   (the other gated MLPs, by default) the same single GEMM on the row-stacked view of the separate gate/up
//   weights when they lie back to back (blocks/fused_proj.h; AM_FUSED_PROJ=0: two GEMMs), and
//   act on the halves of each row (swiglu_fused_* / geglu_fused_*)
//   (nemotron_h, ungated) y = down( relu(x Wu^T)^2 ): no gate_proj (gate and gate_up are null)
#pragma once
#include <string>

#include "io/model_config.h"
#include "models/exec.h"
#include "models/params.h"

namespace am {

enum class MlpAct { Silu, GeluTanh, Relu2 };  // Relu2: ungated MLPs only

struct MlpWeights {
  Param *gate = nullptr, *up = nullptr, *down = nullptr;  // [I, H], [I, H], [H, I]
  Param* gate_up = nullptr;  // fused (phi3) [2I, H], rows gate | up; gate and up are then null
  Param *gate_bias = nullptr, *up_bias = nullptr, *down_bias = nullptr;
  MlpAct act = MlpAct::Silu;
  // gate and up (and their biases) colocated at build (ParamStore::colocate): one GEMM for both when they are
  // still back to back at use (fused_proj.h stack_proj); false: AM_FUSED_PROJ=0, ungated, or phi3's gate_up.
  bool fuse_gate_up = false;
};

// config.json's activation name -> MlpAct; FormatError naming `key` for anything else.
MlpAct mlp_act_from_config(const std::string& name, const std::string& key);

struct MlpSaved {
  Tensor x;         // [N, H]
  Tensor gate, up;  // [N, I] pre-activation (ungated: up only)
  Tensor gate_up;   // fused (phi3's gate_up, or the stacked gate/up view): [N, 2I] instead
  // h = act(gate) * up [N, I] is NOT kept: backward recomputes it from gate and up (one elementwise pass,
  // ~0.1 ms per W1 layer) instead of holding N x I per layer (2 GiB over W1's 16 layers).
};

MlpWeights register_mlp(ParamStore& ps, const std::string& prefix, int64_t hidden, int64_t inter, bool bias,
                        MlpAct act = MlpAct::Silu);
// Phi3MLP: gate_up_proj [2I, H] then down_proj [H, I], no biases, SwiGLU.
// NemotronHMLP: up_proj [I, H] -> relu2 -> down_proj [H, I], no gate, no biases.
MlpWeights register_mlp_ungated(ParamStore& ps, const std::string& prefix, int64_t hidden, int64_t inter);
MlpWeights register_mlp_fused(ParamStore& ps, const std::string& prefix, int64_t hidden, int64_t inter);
// x [N, H] -> y [N, H]. residual non-null ([N, H], the activation dtype): the down projection accumulates into it
// instead (*residual += y: proj_fwd's accumulate, beta = 1 on CUDA, no add kernel), and *residual is returned.
Tensor mlp_forward(const ExecContext& ex, const MlpWeights& w, const Tensor& x, MlpSaved* saved,
                   Tensor* residual = nullptr);
Tensor mlp_backward(const ExecContext& ex, const MlpWeights& w, const MlpSaved& s, const Tensor& dy);

}  // namespace am
