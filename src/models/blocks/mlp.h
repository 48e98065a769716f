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
  Tensor h;         // [N, I] silu(gate) * up
};

MlpWeights register_mlp(ParamStore& ps, const std::string& prefix, int64_t hidden, int64_t inter, bool bias);
Tensor mlp_forward(const ExecContext& ex, const MlpWeights& w, const Tensor& x, MlpSaved* saved);
Tensor mlp_backward(const ExecContext& ex, const MlpWeights& w, const MlpSaved& s, const Tensor& dy);

}  // namespace am
