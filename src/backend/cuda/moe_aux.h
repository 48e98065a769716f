// MoE routing statistics and the load-balancing aux loss on CUDA (contracts in src/ops/moe_ops.h,
// moe_routing_stats / moe_aux_loss; the CPU reference is src/backend/cpu/moe_aux.cpp). Asynchronous on the
// context's stream, no host sync, deterministic (integer atomics for the counts; fixed-order fp32 sums for psum;
// the aux loss and dprobs in double as the reference, bitwise equal to it for the same f, psum and seg).
// Dtypes: topk_idx, seg, counts, counts2, f int32; probs, psum, aux, dprobs fp32. E <= 8192 (a shared-memory
// histogram per block).
#pragma once
#include "backend/cuda/context.h"
#include "core/tensor.h"

namespace am::cuda {

void moe_routing_stats(const Tensor& topk_idx, const Tensor& probs, const Tensor& seg, Tensor* counts, Tensor* psum,
                       Tensor* counts2, CudaContext& ctx = default_context());
void moe_aux_loss(const Tensor& f, const Tensor& psum, const Tensor& seg, int64_t num_layers, float scale, Tensor& aux,
                  Tensor* dprobs, CudaContext& ctx = default_context());

}  // namespace am::cuda
