// cuDNN fused attention (backend/cuda/cudnn_attention.h, the opt-in AM_ATTENTION=cudnn path) against the engine's
// flash kernels (attention.h, auto variant) at W1's attention (B 4, T 2048, nh 32, nkv 8, D 64, causal), the same
// with D 128, and W2's (B 1, T 4096, nh 32, nkv 4, D 128). Forward and backward (dq, dk, dv), timed with CUDA events
// on the legacy default stream after warm-up (median of the repeats), inputs as bench_attention.cu's. TFLOP/s with
// bench_attention.cu's causal count: forward 4 * B * nh * T^2 * D / 2, backward 2.5 x forward. The last column is the
// relative difference ||cudnn - flash|| / ||flash|| of out (forward) and of dq, dk, dv (backward, the largest).
// cuDNN's plan is built (and cached) before the timing, so the times are steady-state cudnnBackendExecute calls;
// its workspace comes from one cudaMalloc, as the flash backward's does.
//
//   am_gpu_microbench attention_cudnn [reps=20]
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "backend/cuda/attention.h"
#include "backend/cuda/cudnn_attention.h"
#include "bench_registry.h"
#include "attention_bench_util.h"
#include "bench_util.cuh"
#include "core/tensor.h"

namespace {

using namespace am::bench::attn;

struct BenchShape {
  const char* name;
  int64_t B, T, nh, nkv, D;
};

void* malloc_ws(size_t bytes) {
  void* p = nullptr;
  if (bytes) AM_CUDA_CHECK(cudaMalloc(&p, bytes));
  return p;
}

}  // namespace

int attention_cudnn_bench_main(int argc, char** argv) try {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 20;
  if (!have_device("attention_cudnn")) return 0;
  std::string why;
  if (!am::cuda::cudnn_attention_available(&why)) {
    std::printf("attention_cudnn bench: cuDNN not usable: %s\n", why.c_str());
    return 0;
  }
  const cudaDeviceProp prop = device_props();
  std::printf("device %s, %d SMs; cuDNN %zu\n", prop.name, prop.multiProcessorCount,
              am::cuda::cudnn_attention_runtime_version());
  const BenchShape shapes[] = {
      {"W1", 4, 2048, 32, 8, 64}, {"W1-D128", 4, 2048, 32, 8, 128}, {"W2", 1, 4096, 32, 4, 128}};
  std::printf("%-8s %-5s %-6s %10s %10s %12s\n", "shape", "pass", "impl", "ms", "TFLOP/s", "vs flash");
  for (const auto& s : shapes) {
    const am::AttnParams p = attn_params(s.B, s.T, s.nh, s.nkv, s.D);
    const am::Shape qs{s.B, s.T, s.nh, s.D}, ks{s.B, s.T, s.nkv, s.D}, ls{s.B, s.nh, s.T};
    am::Tensor q = dev(qs, am::DType::BF16), k = dev(ks, am::DType::BF16), v = dev(ks, am::DType::BF16),
               dout = dev(qs, am::DType::BF16), out_f = dev(qs, am::DType::BF16), lse_f = dev(ls, am::DType::F32),
               out_c = dev(qs, am::DType::BF16), lse_c = dev(ls, am::DType::F32), dq_f = dev(qs, am::DType::BF16),
               dk_f = dev(ks, am::DType::BF16), dv_f = dev(ks, am::DType::BF16), dq_c = dev(qs, am::DType::BF16),
               dk_c = dev(ks, am::DType::BF16), dv_c = dev(ks, am::DType::BF16);
    randomize_inputs(q, k, v, dout, 11);
    const double fwd_flop = causal_fwd_flop(s.B, s.T, s.nh, s.D);
    const double bwd_flop = 2.5 * fwd_flop;
    auto row = [&](const char* pass, const char* impl, double ms, double flop, double diff) {
      std::printf("%-8s %-5s %-6s %10.3f %10.1f %12.2e\n", s.name, pass, impl, ms, tflops(flop, ms), diff);
    };

    // ---- forward ----
    const size_t fws_f = am::cuda::attention_fwd_workspace_bytes(p);
    void* ws_ff = malloc_ws(fws_f);
    const double ms_ff = median_ms([&] { am::cuda::attention_fwd(q, k, v, p, out_f, lse_f, nullptr, ws_ff, fws_f); },
                                   reps, 5);
    AM_CUDA_CHECK(cudaDeviceSynchronize());
    const auto o_f = download(out_f);
    row("fwd", "flash", ms_ff, fwd_flop, 0.0);
    size_t fws_c = 0;
    const bool fwd_ok = am::cuda::cudnn_attention_fwd_workspace(p, &fws_c);
    if (!fwd_ok) {
      std::printf("%-8s fwd   cudnn  plan failed: %s\n", s.name, am::cuda::cudnn_attention_last_error().c_str());
    } else {
      void* ws_fc = malloc_ws(fws_c);
      bool ok = true;
      const double ms_fc = median_ms(
          [&] { ok &= am::cuda::cudnn_attention_fwd(q, k, v, p, out_c, lse_c, nullptr, ws_fc, fws_c); }, reps, 5);
      AM_CUDA_CHECK(cudaDeviceSynchronize());
      if (ok) row("fwd", "cudnn", ms_fc, fwd_flop, rel(download(out_c), o_f));
      else std::printf("%-8s fwd   cudnn  execute failed: %s\n", s.name, am::cuda::cudnn_attention_last_error().c_str());
      if (ws_fc) AM_CUDA_CHECK(cudaFree(ws_fc));
    }
    if (ws_ff) AM_CUDA_CHECK(cudaFree(ws_ff));

    // ---- backward (both from the flash forward's out / lse) ----
    const size_t bws_f = am::cuda::attention_bwd_workspace_bytes(p);
    void* ws_bf = malloc_ws(bws_f);
    const double ms_bf = median_ms(
        [&] { am::cuda::attention_bwd(q, k, v, out_f, lse_f, dout, p, dq_f, dk_f, dv_f, nullptr, nullptr, ws_bf, bws_f); },
        reps, 3);
    AM_CUDA_CHECK(cudaDeviceSynchronize());
    if (ws_bf) AM_CUDA_CHECK(cudaFree(ws_bf));
    const auto a = download(dq_f), b = download(dk_f), c = download(dv_f);
    row("bwd", "flash", ms_bf, bwd_flop, 0.0);
    size_t bws_c = 0;
    if (!am::cuda::cudnn_attention_bwd_workspace(p, &bws_c)) {
      std::printf("%-8s bwd   cudnn  plan failed: %s\n", s.name, am::cuda::cudnn_attention_last_error().c_str());
      continue;
    }
    void* ws_bc = malloc_ws(bws_c);
    bool ok = true;
    const double ms_bc = median_ms(
        [&] {
          ok &= am::cuda::cudnn_attention_bwd(q, k, v, out_f, lse_f, dout, p, dq_c, dk_c, dv_c, nullptr, ws_bc, bws_c);
        },
        reps, 3);
    AM_CUDA_CHECK(cudaDeviceSynchronize());
    if (ws_bc) AM_CUDA_CHECK(cudaFree(ws_bc));
    if (!ok) {
      std::printf("%-8s bwd   cudnn  execute failed: %s\n", s.name, am::cuda::cudnn_attention_last_error().c_str());
      continue;
    }
    const double d = std::max({rel(download(dq_c), a), rel(download(dk_c), b), rel(download(dv_c), c)});
    row("bwd", "cudnn", ms_bc, bwd_flop, d);
    std::printf("%-8s cudnn workspace: fwd %.1f MiB, bwd %.1f MiB (incl. fp32 dQ accumulator)\n", s.name,
                fws_c / 1048576.0, bws_c / 1048576.0);
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "attention_cudnn bench: %s\n", e.what());
  return 1;
}
