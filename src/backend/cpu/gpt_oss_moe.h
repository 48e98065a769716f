// CPU reference of the GPT-OSS expert ops (contracts in src/ops/gpt_oss_ops.h): raw fp32 host pointers,
// shapes checked by the front-end.
#pragma once
#include <cstdint>

namespace am::cpu {

// gu [m, 2i] interleaved -> h [m, i]
void gpt_oss_glu_fwd(const float* gu, int64_t m, int64_t i, float alpha, float limit, float* h);
// dgu [m, 2i] assigned
void gpt_oss_glu_bwd(const float* gu, const float* dh, int64_t m, int64_t i, float alpha, float limit, float* dgu);
// y [rows, c] += bias[e] per expert block (offsets [e+1])
void grouped_bias_add(float* y, const float* bias, const int32_t* offsets, int64_t n_experts, int64_t c);
// dbias[e] += column sums of dy's rows of expert e (double accumulation)
void grouped_bias_bwd(const float* dy, const int32_t* offsets, int64_t n_experts, int64_t c, float* dbias);

}  // namespace am::cpu
