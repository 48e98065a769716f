// Launch-shape knobs of kernels whose best shape was found by sweeping (bench/gpu/bench_cuda_ops.cu runs the
// sweep; tests/gpu/test_cuda_ops.cpp checks every swept shape against the CPU). The plain ops in
// cuda_ops.h use the defaults below.
#pragma once
#include "backend/cuda/context.h"
#include "core/tensor.h"

namespace am::cuda {

struct RmsNormTuning {
  // Defaults: best of the sweep on an H200 (2026-11-22, docs/cuda_kernels.md), W1 [8192, 2048] bf16.
  int fwd_threads = 128;      // target threads per row block, forward (fewer threads: more loads each)
  int bwd_threads = 128;      // same, backward
  int bwd_blocks_per_sm = 4;  // backward grid = SMs x this (0: 1024 / threads); one dw partial row per block
  int reduce_lanes = 32;      // row lanes of the final dw partial reduction: 8, 16 or 32
  bool prefetch = false;      // backward: load the block's next row during the current row's reduction
                              // (measured slower: 52 vs 46 us at the default shape)
};
RmsNormTuning default_rmsnorm_tuning();

void rmsnorm_fwd_tuned(const Tensor& x, const Tensor& w, float eps, Tensor& y, Tensor& rstd,
                       const RmsNormTuning& t, CudaContext& ctx);
// As rmsnorm_bwd: dw undefined (frozen weight) computes dx only (no partials, no reduction).
void rmsnorm_bwd_tuned(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, Tensor& dx,
                       Tensor& dw, const RmsNormTuning& t, CudaContext& ctx);

}  // namespace am::cuda
