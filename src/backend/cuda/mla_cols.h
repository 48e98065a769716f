// MLA's rope-column gather / scatter on CUDA (contract in src/ops/mla_ops.h): wide [R, C] or [R, G, C], narrow
// [R, w] (any view with last dimension w), one float dtype (bf16 / fp32 / fp16), fp32 math. Asynchronous on the
// context's stream.
#pragma once
#include <cstdint>

#include "backend/cuda/context.h"
#include "core/tensor.h"

namespace am::cuda {

// narrow[r, j] = sum_g wide[r, g, col + perm(j)] (fp32, increasing g, one rounding at the store)
void mla_gather_cols(const Tensor& wide, int64_t col, bool interleave, Tensor& narrow,
                     CudaContext& ctx = default_context());
// wide[r, g, col + perm(j)] = narrow[r, j] for every g
void mla_scatter_cols(const Tensor& narrow, bool interleave, Tensor& wide, int64_t col,
                      CudaContext& ctx = default_context());

}  // namespace am::cuda
