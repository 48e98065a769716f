// The weight an RMSNorm multiplies by. Llama-style norms use the parameter itself; Gemma's are zero-centred,
// y = x_hat * (1 + w), and Gemma3RMSNorm forms (1 + w) in float32 whatever the weights' dtype. Passing
// 1 + w to the ordinary RMSNorm op gives that forward, and its backward is unchanged: dL/dw = dL/d(1 + w).
#pragma once
#include "models/exec.h"

namespace am {

// w [H] -> w itself, or (plus_one) a new float32 [H] = 1 + w on w's device.
Tensor norm_weight(const ExecContext& ex, const Tensor& w, bool plus_one);

}  // namespace am
