// CUDA side of ops::moe_shared_gate_* (contract in src/ops/moe_ops.h). sy/dy/y/dsy bf16 or fp32, g/dg any float.
#pragma once
#include "backend/cuda/context.h"
#include "core/tensor.h"

namespace am::cuda {
void moe_shared_gate_fwd(const Tensor& sy, const Tensor& g, Tensor& y, CudaContext& ctx = default_context());
void moe_shared_gate_bwd(const Tensor& sy, const Tensor& g, const Tensor& dy, Tensor& dsy, Tensor& dg,
                         CudaContext& ctx = default_context());
}  // namespace am::cuda
