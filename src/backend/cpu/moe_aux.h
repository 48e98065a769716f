// CPU reference of the MoE routing statistics and the load-balancing aux loss (contracts in src/ops/moe_ops.h,
// moe_routing_stats / moe_aux_loss): raw host pointers, shapes checked by the front-end (src/ops/moe_ops.cpp).
#pragma once
#include <cstdint>

namespace am::cpu {

// topk_idx [n, k], probs [n, e], seg [n] (token t real iff seg[t] >= 0). counts / counts2 [e] int32 += the real
// tokens' selections (indices outside [0, e) skipped); psum [e] fp32 += the real tokens' probs (one double running
// sum per expert starting from psum[e], rounded once at the store). Any output may be null.
void moe_routing_stats(const int32_t* topk_idx, const float* probs, const int32_t* seg, int64_t n, int64_t e,
                       int64_t k, int32_t* counts, int32_t* counts2, float* psum);
// f [e] int32, psum [e] fp32 (summed over num_layers layers), seg [n] -> aux[0], dprobs [n, e] (null: not wanted);
// math in double (see moe_ops.h).
void moe_aux_loss(const int32_t* f, const float* psum, const int32_t* seg, int64_t n, int64_t e, int64_t num_layers,
                  float scale, float* aux, float* dprobs);

}  // namespace am::cpu
