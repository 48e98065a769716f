// DeepSeek's grouped routers on CUDA (contract in src/ops/moe_ops.h, moe_router_grouped_fwd / _bwd; the CPU
// reference is src/ops/moe_router_grouped.cpp). One warp per token, E <= 1024 experts, any k <= E.
// Dtypes: logits bf16 / fp32, bias (v3 e_score_correction_bias [E]) bf16 / fp32 or null, scores [N, E] fp32,
// topk_idx [N, k] int32, topk_w / dtopk_w [N, k] fp32, dlogits [N, E] bf16 / fp32 (assigned).
// Numerics follow the reference operation by operation (double sigmoid / softmax rounded to fp32, fp32 choice and
// group sums, sequential fp32 weight sums, double backward; every operation explicitly rounded, no FMA
// contraction), so the selection and the weights equal the host's; the only possible difference is the device's
// double exp (max 1 ulp) landing on the other side of an fp32 rounding boundary. NaN logits give an unspecified
// selection. Asynchronous on the context's stream; an expert index outside [0, E) in the backward is skipped and
// reported through the context's error slot.
#pragma once
#include "backend/cuda/context.h"
#include "core/tensor.h"
#include "core/router_options.h"

namespace am::cuda {

void moe_router_grouped_fwd(const Tensor& logits, const Tensor* bias, int64_t k, const GroupedRouterOptions& o,
                            Tensor& scores, Tensor& topk_idx, Tensor& topk_w, CudaContext& ctx = default_context());
void moe_router_grouped_bwd(const Tensor& scores, const Tensor& topk_idx, const GroupedRouterOptions& o,
                            const Tensor& dtopk_w, Tensor& dlogits, CudaContext& ctx = default_context());

}  // namespace am::cuda
