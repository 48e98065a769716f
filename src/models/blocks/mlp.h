// SwiGLU MLP shared by the dense families (and each MoE expert):
//   y = down( silu(x Wg^T) * (x Wu^T) )     x [N, H], gate/up [N, I], y [N, H]
#pragma once
#include <string>

#include "io/model_config.h"
#include "models/exec.h"
#include "models/params.h"

namespace am {

struct MlpWeights {
  Param *gate, *up, *down;  // [I, H], [I, H], [H, I]
  Param *gate_bias = nullptr, *up_bias = nullptr, *down_bias = nullptr;
};

struct MlpSaved {
  Tensor x;         // [N, H]
  Tensor gate, up;  // [N, I] pre-activation
  // h = silu(gate) * up [N, I] is NOT kept: backward recomputes it from gate and up (one elementwise pass,
  // ~0.1 ms per W1 layer) instead of holding N x I per layer (2 GiB over W1's 16 layers).
};

MlpWeights register_mlp(ParamStore& ps, const std::string& prefix, int64_t hidden, int64_t inter, bool bias);
Tensor mlp_forward(const ExecContext& ex, const MlpWeights& w, const Tensor& x, MlpSaved* saved);
Tensor mlp_backward(const ExecContext& ex, const MlpWeights& w, const MlpSaved& s, const Tensor& dy);

}  // namespace am
