// Persistent grouped GEMM for the MoE expert products (bf16 operands, fp32 accumulation), scheduled on the device
// from the dispatch plan's offsets: no host counts, no host synchronisation, one launch per product.
//
// Row-major throughout. Expert e owns rows offsets[e] .. offsets[e+1] of the grouped activations (offsets [E+1]
// int32 on the device, as moe_dispatch_plan writes them; offsets[E] <= rows). The three products of
// grouped_linear (moe.h), for x [rows, K], w [E, N, K], y / dy [rows, N], dw [E, N, K]:
//   fwd  y[r]  = alpha * x[r] w_e^T + beta * y[r]        (y bf16 or fp32)
//   dx   dx[r] = alpha * dy[r] w_e + beta * dx[r]        (dx bf16 or fp32)
//   dw   dw_e += dy_e^T x_e                              (dw fp32; experts without rows untouched)
// The kernel (moe_grouped_gemm.cu): 128 x 128 output tiles, BK = 32, a 4-stage cp.async pipeline, 8 warps of
// mma.sync m16n8k16 (64 x 32 per warp); grid = SMs x resident CTAs per SM, each CTA looping over a global tile
// index that it maps to (expert, m-tile, n-tile) through a prefix sum of the experts' tile counts computed in
// shared memory from the offsets at the start of the kernel; the copies run ahead across tile boundaries (no
// pipeline drain per tile). Details and measurements: docs/cuda_kernels.md.
#pragma once
#include <cstdint>

#include "backend/cuda/context.h"
#include "core/dtype.h"

namespace am::cuda {

struct PersistentGroupedArgs {
  const int32_t* offsets = nullptr;  // [E+1] device
  int64_t e = 0;                     // experts
  int64_t rows = 0;                  // rows of x / y / dy (>= offsets[E]; bounds the grid)
  int64_t k = 0, n = 0;              // x / dx width K, y / dy width N (w is [E, N, K])
  const void* x = nullptr;           // fwd, dw: x [rows, K] bf16
  const void* w = nullptr;           // fwd, dx: w [E, N, K] bf16
  const void* dy = nullptr;          // dx, dw: dy [rows, N] bf16
  void* out = nullptr;               // fwd: y [rows, N]; dx: dx [rows, K]; dw: dw [E, N, K] fp32
  DType out_type = DType::BF16;      // fwd / dx: bf16 or fp32; dw: fp32
  float alpha = 1.f, beta = 0.f;     // fwd / dx (dw: 1, 1)
};

// Whether the persistent kernel takes this product: bf16 operands, K and N multiples of 8, 16-byte aligned base
// pointers, E in [1, 4096], sizes in int range. Callers fall back to the cuBLAS paths otherwise.
bool persistent_grouped_supported(const PersistentGroupedArgs& a, DType ab_type);
void persistent_grouped_fwd(const PersistentGroupedArgs& a, CudaContext& ctx);
void persistent_grouped_dx(const PersistentGroupedArgs& a, CudaContext& ctx);
void persistent_grouped_dw(const PersistentGroupedArgs& a, CudaContext& ctx);

}  // namespace am::cuda
