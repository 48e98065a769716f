#include "models/blocks/norm.h"

#include "ops/ops.h"

namespace am {

Tensor norm_weight(const ExecContext& ex, const Tensor& w, bool plus_one) {
  if (!plus_one) return w;
  Tensor w1 = ex.empty(w.shape(), DType::F32);
  ops::copy_(w1, w);  // widened first: 1 + w is rounded once, in float32, as in HF
  ops::add_scalar_(w1, 1.0f);
  return w1;
}

}  // namespace am
