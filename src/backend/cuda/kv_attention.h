// CUDA attention over a KV cache (contract: src/ops/kv_attention.h). q/k/v/out bf16, fp16 or fp32 (one
// dtype), CUDA, contiguous; head_dim and v head dim (p.dv(), may differ: DeepSeek MLA) <= 256 (else
// DeviceError); soft-capping (p.softcap) and sinks (p.sinks: [nh] fp32 or bf16 on the device) as the training
// attention. Queued on the context's stream; nothing synchronises.
#pragma once
#include "backend/cuda/context.h"
#include "core/tensor.h"
#include "core/attn_params.h"

namespace am::cuda {

void attention_kv_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const AttnParams& p, Tensor& out,
                      CudaContext& ctx = default_context());

}  // namespace am::cuda
