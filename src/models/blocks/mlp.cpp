#include "models/blocks/mlp.h"

#include "ops/ops.h"

namespace am {

MlpWeights register_mlp(ParamStore& ps, const std::string& pre, int64_t H, int64_t I, bool bias) {
  MlpWeights w;
  w.gate = &ps.add(pre + "gate_proj.weight", {I, H});
  if (bias) w.gate_bias = &ps.add(pre + "gate_proj.bias", {I});
  w.up = &ps.add(pre + "up_proj.weight", {I, H});
  if (bias) w.up_bias = &ps.add(pre + "up_proj.bias", {I});
  w.down = &ps.add(pre + "down_proj.weight", {H, I});
  if (bias) w.down_bias = &ps.add(pre + "down_proj.bias", {H});
  return w;
}

static const Tensor* b_of(const Param* p) { return p ? &p->value : nullptr; }
static Tensor* db_of(Param* p) { return p ? &p->grad : nullptr; }

Tensor mlp_forward(const MlpWeights& w, const Tensor& x, MlpSaved* s) {
  const int64_t N = x.dim(0), I = w.gate->value.dim(0), H = w.down->value.dim(0);
  Tensor gate = Tensor::empty({N, I}, DType::F32), up = Tensor::empty({N, I}, DType::F32),
         h = Tensor::empty({N, I}, DType::F32), y = Tensor::empty({N, H}, DType::F32);
  ops::linear_fwd(x, w.gate->value, b_of(w.gate_bias), gate);
  ops::linear_fwd(x, w.up->value, b_of(w.up_bias), up);
  ops::swiglu_fwd(gate, up, h);
  ops::linear_fwd(h, w.down->value, b_of(w.down_bias), y);
  if (s) *s = MlpSaved{x, gate, up, h};
  return y;
}

Tensor mlp_backward(const MlpWeights& w, const MlpSaved& s, const Tensor& dy) {
  const int64_t N = dy.dim(0), I = w.gate->value.dim(0), H = w.down->value.dim(0);
  Tensor dh = Tensor::empty({N, I}, DType::F32);
  ops::linear_bwd(s.h, w.down->value, dy, &dh, w.down->grad, db_of(w.down_bias));
  Tensor dgate = Tensor::empty({N, I}, DType::F32), dup = Tensor::empty({N, I}, DType::F32);
  ops::swiglu_bwd(s.gate, s.up, dh, dgate, dup);
  Tensor dx = Tensor::empty({N, H}, DType::F32), tmp = Tensor::empty({N, H}, DType::F32);
  ops::linear_bwd(s.x, w.gate->value, dgate, &dx, w.gate->grad, db_of(w.gate_bias));
  ops::linear_bwd(s.x, w.up->value, dup, &tmp, w.up->grad, db_of(w.up_bias));
  ops::add_(dx, tmp);
  return dx;
}

}  // namespace am
