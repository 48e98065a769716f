// Micro-benchmark of the gpt_oss expert kernels (src/backend/cuda/gpt_oss_moe.cu) at a gpt-oss-20b layer:
// N = 4096 tokens, E = 32 experts, top-k = 4 (R = 16384 grouped rows), H = 2880, I = 2880 (gu [R, 5760]).
// All of them are memory-bound: each reports GB/s of the bytes it must move and the share of a device-to-device
// copy's bandwidth measured first in the same run. The clamped SwiGLU is shown next to the plain fused SwiGLU
// (moe.cu) on the same shape, which is what it should cost. Timed with CUDA events after warm-up, median of 20,
// bf16 activations, fp32 dbias.
//
//   am_gpu_microbench gpt_oss [--tokens N] [--skew]   (--skew: one expert takes half the rows)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/gpt_oss_moe.h"
#include "backend/cuda/moe.h"
#include "bench_registry.h"
#include "bench_util.cuh"
#include "core/tensor.h"

using am::DType;
using am::Tensor;
namespace cu = am::cuda;

namespace {

// Inputs: bench_util.cuh's lowbias32 fill (the gates and ups then cross the clamps at +-7); median of 20 after 3.
using am::bench::filled;
using am::bench::median_ms;

double g_bw = 0;  // GB/s of the device-to-device copy (read + write)

void report(const char* name, const std::string& shape, double bytes, double ms) {
  const double gbs = bytes / (ms * 1e-3) / 1e9;
  std::printf("  %-30s %-22s %9.3f ms %8.1f GB/s %6.1f%% of copy\n", name, shape.c_str(), ms, gbs, 100.0 * gbs / g_bw);
  std::fflush(stdout);
}

}  // namespace

int gpt_oss_bench_main(int argc, char** argv) {
  int64_t n = 4096;
  bool skew = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--tokens") == 0 && i + 1 < argc) n = std::atoll(argv[++i]);
    if (std::strcmp(argv[i], "--skew") == 0) skew = true;
  }
  const int64_t e = 32, k = 4, h = 2880, inner = 2880, rows = n * k;
  try {
    auto& ctx = cu::default_context();
    const auto& pr = ctx.props();
    std::printf("gpt_oss expert kernels: device %s, %d SMs; N=%lld E=%lld k=%lld H=%lld I=%lld, %s rows per expert\n",
                pr.name, pr.multiProcessorCount, (long long)n, (long long)e, (long long)k, (long long)h,
                (long long)inner, skew ? "skewed" : "equal");
    g_bw = am::bench::copy_bandwidth_gbs(filled({am::bench::kCopyElems}, DType::F32, 4));
    // Offsets [E+1]: equal counts, or (--skew) half the rows on expert 0 and the rest spread evenly.
    std::vector<int32_t> off(static_cast<size_t>(e + 1), 0);
    for (int64_t j = 0; j < e; ++j) {
      const int64_t c = skew ? (j == 0 ? rows / 2 : (rows - rows / 2) / (e - 1)) : rows / e;
      off[static_cast<size_t>(j + 1)] = off[static_cast<size_t>(j)] + static_cast<int32_t>(c);
    }
    off[static_cast<size_t>(e)] = static_cast<int32_t>(rows);  // the remainder goes to the last expert
    Tensor oh = Tensor::empty({e + 1}, DType::I32);
    std::copy(off.begin(), off.end(), oh.data<int32_t>());
    Tensor od = cu::to_device(oh);

    const DType bf = DType::BF16;
    Tensor gu = filled({rows, 2 * inner}, bf, 1, -12.f, 12.f), dh = filled({rows, inner}, bf, 2);
    Tensor hh = cu::empty({rows, inner}, bf), dgu = cu::empty({rows, 2 * inner}, bf);
    Tensor y = filled({rows, h}, bf, 3), dy = filled({rows, h}, bf, 4);
    Tensor b_gu = filled({e, 2 * inner}, bf, 5), b_d = filled({e, h}, bf, 6);
    Tensor db_gu = cu::empty({e, 2 * inner}, DType::F32), db_d = cu::empty({e, h}, DType::F32);
    cu::zero_(db_gu);
    cu::zero_(db_d);
    const double el = 2.0;  // bytes per bf16
    const std::string gush = "[" + std::to_string(rows) + ", " + std::to_string(2 * inner) + "]";
    const std::string ysh = "[" + std::to_string(rows) + ", " + std::to_string(h) + "]";
    std::printf("\nactivation (gu %s -> h [%lld, %lld])\n", gush.c_str(), (long long)rows, (long long)inner);
    report("gpt_oss_glu fwd", gush, rows * inner * el * 3,
           median_ms([&] { cu::gpt_oss_glu_fwd(gu, 1.702f, 7.f, hh); }));
    report("gpt_oss_glu bwd", gush, rows * inner * el * 5,
           median_ms([&] { cu::gpt_oss_glu_bwd(gu, dh, 1.702f, 7.f, dgu); }));
    report("swiglu_fused fwd (reference)", gush, rows * inner * el * 3, median_ms([&] { cu::swiglu_fused_fwd(gu, hh); }));
    report("swiglu_fused bwd (reference)", gush, rows * inner * el * 5,
           median_ms([&] { cu::swiglu_fused_bwd(gu, dh, dgu); }));
    std::printf("\nper-expert biases (bias [E, C] bf16, dbias fp32 +=)\n");
    report("grouped_bias_add gate_up", gush, rows * 2 * inner * el * 2,
           median_ms([&] { cu::grouped_bias_add(gu, b_gu, od); }));
    report("grouped_bias_add down", ysh, rows * h * el * 2, median_ms([&] { cu::grouped_bias_add(y, b_d, od); }));
    report("grouped_bias_bwd gate_up", gush, rows * 2 * inner * el,
           median_ms([&] { cu::grouped_bias_bwd(dgu, od, db_gu); }));
    report("grouped_bias_bwd down", ysh, rows * h * el, median_ms([&] { cu::grouped_bias_bwd(dy, od, db_d); }));
    AM_CUDA_CHECK(cudaStreamSynchronize(ctx.stream()));
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "gpt_oss bench: %s\n", ex.what());
    return 1;
  }
  return 0;
}
