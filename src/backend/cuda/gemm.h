// cuBLASLt GEMM with cached plans.
//
// Column-major, cuBLAS convention:  D[m, n] = alpha * op(A)[m, k] * op(B)[k, n] + beta * D  (+ bias[m])
// where op(X) = X^T when trans_x. A row-major [R, C] tensor is the column-major [C, R] matrix with
// leading dimension C, so the row-major products of the ops map onto this without copies (see linear.cu).
// Compute is fp32 (CUBLAS_COMPUTE_32F) for every dtype combination; D may be bf16 (activations) or fp32
// (parameter gradients accumulated with beta = 1).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "backend/cuda/context.h"
#include "core/dtype.h"

namespace am::cuda {

struct GemmDesc {
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  DType a_type = DType::BF16;
  int64_t lda = 0;
  const void* b = nullptr;
  DType b_type = DType::BF16;
  int64_t ldb = 0;
  void* d = nullptr;  // also C (read when beta != 0)
  DType d_type = DType::BF16;
  int64_t ldd = 0;
  float alpha = 1.f, beta = 0.f;
  const void* bias = nullptr;  // [m] or null: fused bias epilogue
  DType bias_type = DType::BF16;
};

// Runs the GEMM on ctx's stream. Plans (descriptors + heuristic algorithm) are cached per shape, dtypes,
// epilogue and pointer alignment. Throws DeviceError if cuBLASLt has no algorithm for the combination.
// Returns false (and does nothing) only when a bias epilogue is unsupported, so the caller can add the
// bias itself; every other failure throws.
bool gemm(CudaContext& ctx, const GemmDesc& g);

// Micro-benchmarks (bench/gpu/bench_gemm_algos.cu): the heuristic's first max_algos algorithms for g (index 0 is
// the one gemm() uses), each run on g's own buffers (D is overwritten; with beta != 0 it accumulates) once to warm
// up and then reps times; the mean time of one run and the algorithm's configuration.
struct GemmCandidate {
  int id = -1, tile = -1, splitk = -1, reduction = -1;  // CUBLASLT_ALGO_CONFIG_* (-1: not reported)
  double ms = 0;
};
std::vector<GemmCandidate> gemm_candidates(CudaContext& ctx, const GemmDesc& g, int max_algos, int reps);

// Opaque plan cache owned by the context.
class GemmPlanCache {
 public:
  GemmPlanCache();
  ~GemmPlanCache();
  struct Impl;
  Impl& impl() { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace am::cuda
