// CPU kernel of the Mamba2 selective scan over the next n tokens of ONE sequence, starting from a carried state
// and leaving the state after the last token in place: the recurrent half of Nemotron-H's incremental decode
// (automodel generate; blocks/mamba2.h mamba2_forward_cached). Raw fp32 host pointers, shapes checked by the caller.
//
// Per head h (group g = h / (nh / G) supplies B and C):
//   a_t = exp(dt_t A_h);  state = a_t state + (dt_t x_t) B_t^T   state [P, S]
//   y_t = state C_t + D_h x_t                                    (the dot over S accumulated in double)
// The arithmetic is the op's CPU reference (ops/mamba2_ops.cpp, mamba_ssm_scan_fwd) term for term, so running
// tokens 0..T-1 in any split (the whole prompt, then one token at a time) gives bit for bit the full forward's y
// and its final state: the full forward's a_0 = 0 at the sequence start multiplies the zero initial state either way.
#pragma once
#include <cstdint>

namespace am::cpu {

struct SsmCarryDims {
  int64_t n = 0;   // new tokens
  int64_t nh = 0;  // heads
  int64_t P = 0;   // head dim
  int64_t G = 0;   // groups of B / C (divides nh)
  int64_t S = 0;   // state size
};

// x [n, nh, P], dt [n, nh] (after softplus / clamp), A [nh] (= -exp(A_log)), Bm / Cm [n, G, S], D [nh];
// state [nh, P, S] read and overwritten; y [n, nh, P] written.
void mamba_ssm_scan_carry(const float* x, const float* dt, const float* A, const float* Bm, const float* Cm,
                          const float* D, const SsmCarryDims& d, float* state, float* y);

}  // namespace am::cpu
