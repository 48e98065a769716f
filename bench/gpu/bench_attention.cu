// Flash attention micro-benchmark: W1's attention (B 4, T 2048, nh 32, nkv 8, D 64, causal) and W2's
// (B 1, T 4096, nh 32, nkv 4, D 128, causal), every kernel variant, forward and backward, timed with CUDA
// events after warm-up (median of the repeats). TFLOP/s use the causal count: forward 4 * B * nh * T^2 * D / 2,
// backward 2.5 x forward. The ceiling is a cuBLASLt bf16 8192^3 GEMM timed in the same run.
// Variants as in AttnTuning (0 = auto). Also checks that the variants agree with the first one listed on
// these large shapes (catches index overflow / races that the small-shape tests would miss).
//
//   am_gpu_microbench attention [reps=20] [forward variants, e.g. 0,1,4,5] [backward variants, e.g. 0,1,4]
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "backend/cuda/attention.h"
#include "bench_registry.h"
#include "attention_bench_util.h"
#include "bench_util.cuh"
#include "core/tensor.h"

namespace {

// Inputs and timing: attention_bench_util.h's (variance-1 centered fill, legacy default stream).
using namespace am::bench::attn;

double gemm_tflops(int reps) {
  const int64_t M = 8192, N = 8192, K = 8192;
  am::Tensor A = dev({M, K}, am::DType::BF16), B = dev({N, K}, am::DType::BF16), C = dev({M, N}, am::DType::BF16);
  randomize(A, 1);
  randomize(B, 2);
  cublasLtHandle_t lt;
  if (cublasLtCreate(&lt) != CUBLAS_STATUS_SUCCESS) return 0;
  cublasLtMatmulDesc_t op;
  cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F);
  cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
  cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
  cublasLtMatrixLayout_t la, lb, lc;
  cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, K, M, K);
  cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, K, N, K);
  cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, M, N, M);
  size_t ws_bytes = size_t(32) << 20;
  void* ws = nullptr;
  AM_CUDA_CHECK(cudaMalloc(&ws, ws_bytes));
  cublasLtMatmulPreference_t pref;
  cublasLtMatmulPreferenceCreate(&pref);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes, sizeof ws_bytes);
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  double tf = 0;
  if (cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, 1, &res, &found) == CUBLAS_STATUS_SUCCESS &&
      found > 0) {
    const float alpha = 1.f, beta = 0.f;
    bool ok = true;
    const double ms = median_ms(
        [&] {
          ok &= cublasLtMatmul(lt, op, &alpha, A.raw(), la, B.raw(), lb, &beta, C.raw(), lc, C.raw(), lc, &res.algo,
                               ws, ws_bytes, nullptr) == CUBLAS_STATUS_SUCCESS;
        },
        reps, 3);
    if (ok) tf = 2.0 * M * N * K / (ms * 1e-3) / 1e12;
  }
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(lc);
  cublasLtMatmulDescDestroy(op);
  cublasLtDestroy(lt);
  cudaFree(ws);
  return tf;
}

std::vector<int> parse_list(const char* s, int n) {
  std::vector<int> v;
  for (const char* p = s; p && *p;) {
    char* end = nullptr;
    const long x = std::strtol(p, &end, 10);
    if (end == p) break;
    v.push_back(static_cast<int>(x));
    p = *end ? end + 1 : end;
  }
  if (v.empty())
    for (int i = 0; i <= n; ++i) v.push_back(i);
  return v;
}

struct Shape {
  const char* name;
  int64_t B, T, nh, nkv, D;
};

}  // namespace

int attention_bench_main(int argc, char** argv) try {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 20;
  const std::vector<int> fvs = parse_list(argc > 2 ? argv[2] : nullptr, 5);
  const std::vector<int> bvs = parse_list(argc > 3 ? argv[3] : nullptr, 4);
  if (!have_device("attention")) return 0;
  const cudaDeviceProp prop = device_props();
  const double gemm = gemm_tflops(reps);
  std::printf("device %s, %d SMs; cuBLASLt bf16 8192^3 GEMM: %.1f TFLOP/s\n", prop.name, prop.multiProcessorCount,
              gemm);
  const double ceiling = gemm > 0 ? gemm : 795.0;

  const Shape shapes[] = {{"W1", 4, 2048, 32, 8, 64}, {"W2", 1, 4096, 32, 4, 128}};
  auto& tune = am::cuda::attention_tuning();
  const am::cuda::AttnTuning saved = tune;
  std::printf("%-4s %-5s %-8s %10s %10s %8s %10s\n", "shape", "pass", "variant", "ms", "TFLOP/s", "%gemm",
              "vs first");
  for (const auto& s : shapes) {
    const am::AttnParams p = attn_params(s.B, s.T, s.nh, s.nkv, s.D);
    const am::Shape qs{s.B, s.T, s.nh, s.D}, ks{s.B, s.T, s.nkv, s.D};
    am::Tensor q = dev(qs, am::DType::BF16), k = dev(ks, am::DType::BF16), v = dev(ks, am::DType::BF16),
               out = dev(qs, am::DType::BF16), dout = dev(qs, am::DType::BF16), dq = dev(qs, am::DType::BF16),
               dk = dev(ks, am::DType::BF16), dv = dev(ks, am::DType::BF16),
               lse = dev({s.B, s.nh, s.T}, am::DType::F32);
    randomize_inputs(q, k, v, dout, 11);
    const double fwd_flop = causal_fwd_flop(s.B, s.T, s.nh, s.D);
    const double bwd_flop = 2.5 * fwd_flop;

    std::vector<float> ref_out;
    for (int fv : fvs) {
      tune.fwd_variant = fv;
      const double ms = median_ms([&] { am::cuda::attention_fwd(q, k, v, p, out, lse); }, reps, 5);
      AM_CUDA_CHECK(cudaDeviceSynchronize());
      const auto o = download(out);
      if (ref_out.empty()) ref_out = o;
      const double tf = tflops(fwd_flop, ms);
      std::printf("%-4s %-5s v%-7d %10.3f %10.1f %7.1f%% %10.2e\n", s.name, "fwd", fv, ms, tf, 100 * tf / ceiling,
                  rel(o, ref_out));
    }
    tune.fwd_variant = 0;
    am::cuda::attention_fwd(q, k, v, p, out, lse);
    std::vector<float> r_dq, r_dk, r_dv;
    for (int bv : bvs) {
      for (int split : {0, 1}) {
        tune.bwd_variant = bv;
        tune.bwd_split = split;
        if (split == 1 && bv != bvs.front()) continue;
        const size_t wsb = am::cuda::attention_bwd_workspace_bytes(p);
        void* ws = nullptr;
        AM_CUDA_CHECK(cudaMalloc(&ws, wsb));
        const double ms = median_ms(
            [&] { am::cuda::attention_bwd(q, k, v, out, lse, dout, p, dq, dk, dv, nullptr, nullptr, ws, wsb); },
            reps, 3);
        AM_CUDA_CHECK(cudaDeviceSynchronize());
        AM_CUDA_CHECK(cudaFree(ws));
        const auto a = download(dq), b = download(dk), c = download(dv);
        if (r_dq.empty()) r_dq = a, r_dk = b, r_dv = c;
        const double d = std::max({rel(a, r_dq), rel(b, r_dk), rel(c, r_dv)});
        const double tf = tflops(bwd_flop, ms);
        char tag[32];
        std::snprintf(tag, sizeof tag, "v%d/s%s", bv, split == 0 ? "auto" : "1");
        std::printf("%-4s %-5s %-8s %10.3f %10.1f %7.1f%% %10.2e\n", s.name, "bwd", tag, ms, tf, 100 * tf / ceiling,
                    d);
      }
    }
  }
  tune = saved;
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "attention bench: %s\n", e.what());
  return 1;
}

// Fallback entry point: weak, so a benchmark file that defines its own `main` takes precedence at link
// time (that main should dispatch `am_gpu_microbench attention ...` through bench_registry.h). Without one,
// this runs the registered benchmark named by argv[1], or all of them.
__attribute__((weak)) int main(int argc, char** argv) {
  if (argc >= 2)
    for (const auto& b : kGpuBenches)
      if (std::string(argv[1]) == b.name) return b.run(argc - 1, argv + 1);
  int rc = 0;
  for (const auto& b : kGpuBenches) {
    char* args[] = {const_cast<char*>(b.name), nullptr};
    rc |= b.run(1, args);
  }
  return rc;
}
