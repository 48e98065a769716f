// The weight an RMSNorm multiplies by. Llama-style norms use the parameter itself; Gemma's are zero-centred,
// y = x_hat * (1 + w), and Gemma3RMSNorm forms (1 + w) in float32 whatever the weights' dtype. Passing
// 1 + w to the ordinary RMSNorm op gives that forward, and its backward is unchanged: dL/dw = dL/d(1 + w).
//
// And the switch of the fused residual add + RMSNorm (ops::add_rmsnorm_fwd / _bwd, docs/cuda_kernels.md).
#pragma once
#include "models/exec.h"

namespace am {

// w [H] -> w itself, or (plus_one) a new float32 [H] = 1 + w on w's device.
Tensor norm_weight(const ExecContext& ex, const Tensor& w, bool plus_one);

// Whether the decoder forms each residual add in the pass of the RMSNorm that reads its result (forward:
// x_out = x + block output; y = RMSNorm(x_out), ops::add_rmsnorm_fwd) and adds the norm's input gradient to the
// residual gradient in the norm's backward pass (ops::add_rmsnorm_bwd). From AM_FUSED_ADD_NORM, read once at the
// first call: on unless "0" / "off" / "false" (on by default since its W1 A/B on a GPU, +1.9%). The fused
// ops are bit-identical to the separate ones on each device, so on or off trains to the same bits
// (tests/models/test_add_norm.cpp); on CUDA a bf16 residual stream keeps its adds in the output GEMMs (beta = 1)
// either way.
bool fused_add_norm_enabled();
// Tests: overrides the environment from the next layer on.
void set_fused_add_norm(bool on);
// Fused add + norm passes (forward and backward) the decoder has run in this process: it calls
// note_fused_add_norm() at each; tests read the count to see that the switch is not vacuous.
void note_fused_add_norm();
int64_t fused_add_norm_count();

}  // namespace am
