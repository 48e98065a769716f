// Micro-benchmark of the fused residual add + RMSNorm (ops.h add_rmsnorm_fwd / _bwd, backend/cuda/add_rmsnorm.cu,
// the decoder's AM_FUSED_ADD_NORM) at the W1 shape: H 2048, N = 8192 tokens (W1's micro-batch, 4 x 2048) and 16384.
//   forward,  W1 (fp32 residual stream, bf16 block output, fp32 norm weight, bf16 norm output):
//             copy_ + add_ + rmsnorm_fwd (the decoder without the switch)  against  add_rmsnorm_fwd
//   backward, W1 (fp32 residual gradient, bf16 norm-output gradient):
//             rmsnorm_bwd + add_                                           against  add_rmsnorm_bwd
//   the same with a bf16 residual stream (pure bf16 / residual_dtype bfloat16), where the decoder keeps its forward
//   adds in the output GEMMs and only the backward and the MoE / sandwich-norm sites can use the fusion.
// Each row: median ms (CUDA events, 3 warm-ups, 20 runs) of both, the saving, the bytes each moves (counted per
// element, + rstd) and the fused kernel's share of the measured copy bandwidth. Last line: the W1 step estimate
// (16 layers x 2 sites, forward + backward; activation checkpointing would add a forward).
//
//   am_gpu_microbench add_norm [--tokens N]   (default: both 8192 and 16384)
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#include "backend/cuda/cuda_ops.h"
#include "bench_util.cuh"
#include "core/tensor.h"

using am::DType;
using am::Tensor;
namespace cu = am::cuda;

namespace {

constexpr am::bench::Filler dev = am::bench::filled_fmix64;

double ms(const std::function<void()>& fn) { return am::bench::median_ms(fn, 20); }

double g_bw = 0;  // measured copy ceiling, GB/s

// bytes: per element of [N, H], each side; rows: N (rstd, 4 bytes, read or written once either way).
double row(const char* what, int64_t N, int64_t H, double sep_ms, double sep_bytes, double fus_ms, double fus_bytes) {
  const double e = double(N) * H;
  const double sb = sep_bytes * e + 4.0 * N, fb = fus_bytes * e + 4.0 * N;
  std::printf("  %-30s separate %7.3f ms (%5.1f MB)  fused %7.3f ms (%5.1f MB, %6.1f GB/s = %4.1f%% of copy)"
              "  saves %6.1f us (bytes predict %5.1f us)\n",
              what, sep_ms, sb / 1e6, fus_ms, fb / 1e6, fb / (fus_ms * 1e-3) / 1e9,
              100.0 * fb / (fus_ms * 1e-3) / 1e9 / g_bw, 1e3 * (sep_ms - fus_ms), 1e6 * (sb - fb) / (g_bw * 1e9));
  std::fflush(stdout);
  return sep_ms - fus_ms;
}

void run(int64_t N) {
  const int64_t H = 2048;
  const float eps = 1e-5f;
  std::printf("\nN = %lld tokens, H = %lld\n", (long long)N, (long long)H);
  double step_saving = 0;
  // ---- W1: fp32 residual, bf16 block output / norm output / norm-output gradient ----
  {
    Tensor x = dev({N, H}, DType::F32, 1, -2.f, 2.f), a = dev({N, H}, DType::BF16, 2);
    Tensor w = dev({H}, DType::F32, 3, 0.5f, 1.5f), dw = dev({H}, DType::F32, 4, -1e-3f, 1e-3f);
    Tensor x1 = cu::empty({N, H}, DType::F32), y = cu::empty({N, H}, DType::BF16), r = cu::empty({N}, DType::F32);
    // copy 4 + 4, add 4 + 2 + 4, norm 4 + 2 = 24 B / element; fused: x 4 + a 2, x1 4 + y 2 = 12.
    const double fwd = row("fwd, fp32 residual (W1)", N, H, ms([&] {
                             cu::copy_(x1, x);
                             cu::add_(x1, a);
                             cu::rmsnorm_fwd(x1, w, eps, y, r);
                           }),
                           24, ms([&] { cu::add_rmsnorm_fwd(x, a, w, eps, x1, y, r); }), 12);
    Tensor dy = dev({N, H}, DType::BF16, 5), dres = dev({N, H}, DType::F32, 6), dx = cu::empty({N, H}, DType::F32);
    // norm bwd x 4 + dy 2 + dx 4, add dx 4 + dres 4 + dx 4 = 22; fused: x 4 + dy 2 + dres 4 + dx 4 = 14 (+ dw).
    const double bwd = row("bwd, fp32 residual (W1)", N, H, ms([&] {
                             cu::rmsnorm_bwd(x1, w, r, dy, dx, dw);
                             cu::add_(dx, dres);
                           }),
                           22, ms([&] { cu::add_rmsnorm_bwd(x1, w, r, dy, dres, dx, dw); }), 14);
    step_saving = 16 * 2 * (fwd + bwd);
  }
  // ---- bf16 residual stream ----
  {
    Tensor x = dev({N, H}, DType::BF16, 11, -2.f, 2.f), a = dev({N, H}, DType::BF16, 12);
    Tensor w = dev({H}, DType::BF16, 13, 0.5f, 1.5f), dw = dev({H}, DType::F32, 14, -1e-3f, 1e-3f);
    Tensor x1 = cu::empty({N, H}, DType::BF16), y = cu::empty({N, H}, DType::BF16), r = cu::empty({N}, DType::F32);
    row("fwd, bf16 residual", N, H, ms([&] {
          cu::copy_(x1, x);
          cu::add_(x1, a);
          cu::rmsnorm_fwd(x1, w, eps, y, r);
        }),
        12, ms([&] { cu::add_rmsnorm_fwd(x, a, w, eps, x1, y, r); }), 8);
    Tensor dy = dev({N, H}, DType::BF16, 15), dres = dev({N, H}, DType::BF16, 16), dx = cu::empty({N, H}, DType::BF16);
    row("bwd, bf16 residual", N, H, ms([&] {
          cu::rmsnorm_bwd(x1, w, r, dy, dx, dw);
          cu::add_(dx, dres);
        }),
        12, ms([&] { cu::add_rmsnorm_bwd(x1, w, r, dy, dres, dx, dw); }), 8);
  }
  std::printf("  W1 estimate (16 layers x 2 sites, fwd + bwd, fp32 residual): %.2f ms saved per micro-batch of %lld"
              " tokens\n",
              step_saving, (long long)N);
}

}  // namespace

int add_norm_bench_main(int argc, char** argv) {
  std::vector<int64_t> tokens = {8192, 16384};
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], "--tokens") == 0 && i + 1 < argc) tokens = {std::atoll(argv[++i])};
  try {
    const auto& pr = cu::default_context().props();
    std::printf("fused residual add + RMSNorm: device %s, %d SMs\n", pr.name, pr.multiProcessorCount);
    g_bw = am::bench::copy_bandwidth_gbs(dev({am::bench::kCopyElems}, DType::F32, 99));
    for (int64_t n : tokens) run(n);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "add_norm bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
