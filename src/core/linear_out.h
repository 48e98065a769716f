// How a linear GEMM writes its output: ops::linear_fwd's y and ops::linear_bwd's dx (ops.h), and
// ops::grouped_linear_fwd / _bwd's y and dx (moe_ops.h), on every backend. In core/ so that backend headers
// need not include ops/ (as attn_params.h).
//
//   out = alpha * product (+ bias, forward only)            accumulate = false (the default: assigned)
//   out = alpha * product (+ bias) + out                    accumulate = true
//
// CPU (the bit-exact reference): exactly the separate passes the options replace, in the same order: the GEMM
// into out (accumulate: into a temporary), then out *= alpha as ops::scale_ does (skipped when alpha == 1, a
// no-op there too), then the bias as before, then out += temporary as ops::add_ does. Results are bit-identical
// to ops::linear_fwd / _bwd with the defaults followed by ops::scale_ and ops::add_.
// CUDA: one cuBLASLt GEMM, D = alpha * op(A) op(B) + beta * D (beta = 1 when accumulating, D read in place)
// with the bias epilogue after it: fp32 accumulation and ONE rounding to out's dtype, where the separate
// scale_ / add_ kernels rounded the bf16 product first and then again after the scale or add (so a bf16 out
// differs in the last bit now and then, and is slightly more accurate); no extra kernel launches, and the
// [N, out] temporary of an accumulation is never written.
#pragma once

namespace am {

struct LinearOut {
  float alpha = 1.f;        // scale of the product (not of the bias, not of the accumulated old value)
  bool accumulate = false;  // out += ... (beta = 1) instead of out = ...
};

}  // namespace am
