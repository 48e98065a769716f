// The CUDA side of the op dispatch in ops.cpp (only with AM_WITH_CUDA): most ops map 1:1 onto
// am::cuda:: functions; attention also needs a workspace, allocated here from the context's allocator, and
// picks its kernels (flash: attention.h, or generic: attention_generic.h).
#pragma once
#ifdef AM_WITH_CUDA
#include "backend/cuda/attention.h"
#include "backend/cuda/attention_generic.h"
#include "backend/cuda/cuda_ops.h"
#include "ops/ops.h"

namespace am::ops {
void cuda_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const AttnParams& p, Tensor& out,
                        Tensor& lse);
void cuda_attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                        const Tensor& dout, const AttnParams& p, Tensor& dq, Tensor& dk, Tensor& dv,
                        Tensor* dsinks);
}  // namespace am::ops
#endif
