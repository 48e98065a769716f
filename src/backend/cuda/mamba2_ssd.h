// The chunked SSD selective scan (mamba2_ssd.cu): what mamba2.cu's mamba_ssm_scan_fwd / _bwd run unless the caller
// asks for the per-step states or AM_MAMBA_SCAN=sequential. Arguments are checked by those entry points.
#pragma once

#include "backend/cuda/context.h"
#include "core/tensor.h"

namespace am::cuda {

// y [B, T, nh, P] (x's dtype) assigned.
void ssd_scan_fwd(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                  const Tensor& D, const Tensor* seg, Tensor& y, CudaContext& ctx);
// dx (x's dtype), ddt (fp32) assigned; dB32 / dC32 [B, T, G, S] fp32 must be zeroed (sums over a group's heads);
// dA, dD [nh] fp32 accumulated.
void ssd_scan_bwd(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                  const Tensor& D, const Tensor* seg, const Tensor& dy, Tensor& dx, Tensor& ddt, Tensor& dA,
                  Tensor& dB32, Tensor& dC32, Tensor& dD, CudaContext& ctx);

}  // namespace am::cuda
