// Generic (CUDA-core) attention micro-benchmark (src/backend/cuda/attention_generic.h): the shapes real models
// send there, at B 1, T 2048 / 4096, causal, bf16, forward and backward, timed with CUDA events after warm-up
// (median of the repeats). TFLOP/s use the causal count (forward 4 B nh T^2 (D + Dv) / 4, backward 2.5 x forward),
// ignoring windows. Rows marked flash also run the tensor-core flash kernels (attention.h, called directly, so
// whatever AM_ALLOW_UNVERIFIED_CUDA says) on the same inputs: the variant ops:: picks ("fl", variant 0) and, for
// the head dims and soft-capping added on 2026-12-06 (D 96 / 256, D 192 / Dv 128, softcap), each mma.sync tile
// variant 1-3 ("fl vN"), to pick the defaults; with a flash-vs-generic speed-up line per shape. Model shapes:
// Gemma-2-2B (nh 8, nkv 4, D 256, soft-cap 50, window 4096), Phi-3-mini (nh 32, D 96), DeepSeek-V2-Lite MLA
// (nh 16, D 192 / Dv 128).
//
//   am_gpu_microbench attention_generic [reps=10]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <vector>

#include "backend/cuda/attention.h"
#include "backend/cuda/attention_generic.h"
#include "bench_registry.h"
#include "attention_bench_util.h"
#include "bench_util.cuh"
#include "core/tensor.h"

namespace {

// Inputs: attention_bench_util.h's centered fill, variance 1 ((u - 0.5) * sqrt(12)), each tensor on its own
// cudaMalloc. Timing: its timer on the legacy default stream (where these kernels run), device sync after warm-up.
using am::bench::attn::attn_params;
using am::bench::attn::dev;
using am::bench::attn::device_props;
using am::bench::attn::have_device;
using am::bench::attn::median_ms;
using am::bench::attn::randomize_inputs;  // with scale sqrt(12)
using am::bench::attn::tflops;

struct GenShape {
  const char* name;
  int64_t B, T, nh, nkv, D, Dv, window;
  float softcap;
  bool sinks;
  bool flash;  // also time the flash kernels on it
  bool flash_variants = false;  // ... and each mma.sync variant 1-3
};

}  // namespace

int attention_generic_bench_main(int argc, char** argv) try {
  const int reps = argc > 1 ? std::max(1, std::atoi(argv[1])) : 10;
  if (!have_device("attention_generic")) return 0;
  const cudaDeviceProp prop = device_props();
  std::printf("device %s, %d SMs; generic attention (CUDA cores, fp32 math), bf16, causal\n", prop.name,
              prop.multiProcessorCount);
  const GenShape shapes[] = {
      {"phi3 D96", 1, 2048, 32, 32, 96, 96, 0, 0.f, false, true},
      {"gemma3 D256", 1, 2048, 8, 4, 256, 256, 0, 0.f, false, true},
      {"gemma2 D256 cap", 1, 2048, 8, 4, 256, 256, 0, 50.f, false, true},
      {"gptoss D64 sinks", 1, 2048, 64, 8, 64, 64, 0, 0.f, true, true},
      {"gptoss D64 s win128", 1, 2048, 64, 8, 64, 64, 128, 0.f, true, true},
      {"mla D192/128", 1, 2048, 16, 16, 192, 128, 0, 0.f, false, true},
      {"W2-like D128", 1, 2048, 32, 4, 128, 128, 0, 0.f, false, true},
      // the model shapes at T 4096
      {"gemma2-2b T4k", 1, 4096, 8, 4, 256, 256, 4096, 50.f, false, true, true},
      {"phi3-mini T4k", 1, 4096, 32, 32, 96, 96, 0, 0.f, false, true, true},
      {"dsv2-lite T4k", 1, 4096, 16, 16, 192, 128, 0, 0.f, false, true, true},
      {"D128 cap T4k", 1, 4096, 32, 8, 128, 128, 0, 50.f, false, true, true},
  };
  std::printf("%-20s %-10s %10s %10s\n", "shape", "pass", "ms", "TFLOP/s");
  for (const auto& s : shapes) {
    am::AttnParams p = attn_params(s.B, s.T, s.nh, s.nkv, s.D, s.Dv, s.window, s.softcap);
    const am::Shape qs{s.B, s.T, s.nh, s.D}, ks{s.B, s.T, s.nkv, s.D}, vs{s.B, s.T, s.nkv, s.Dv},
        os{s.B, s.T, s.nh, s.Dv};
    am::Tensor q = dev(qs, am::DType::BF16), k = dev(ks, am::DType::BF16), v = dev(vs, am::DType::BF16),
               out = dev(os, am::DType::BF16), dout = dev(os, am::DType::BF16), dq = dev(qs, am::DType::BF16),
               dk = dev(ks, am::DType::BF16), dv = dev(vs, am::DType::BF16),
               lse = dev({s.B, s.nh, s.T}, am::DType::F32), sinks = dev({s.nh}, am::DType::F32),
               dsinks = dev({s.nh}, am::DType::F32);
    randomize_inputs(q, k, v, dout, 21, std::sqrt(12.f));
    AM_CUDA_CHECK(cudaMemset(sinks.raw(), 0, sinks.nbytes()));
    AM_CUDA_CHECK(cudaMemset(dsinks.raw(), 0, dsinks.nbytes()));
    if (s.sinks) p.sinks = &sinks;
    const double fwd_flop = 4.0 * s.B * s.nh * static_cast<double>(s.T) * s.T * (s.D + s.Dv) / 4;
    const double bwd_flop = 2.5 * fwd_flop;
    const size_t wsb = am::cuda::attention_generic_bwd_workspace_bytes(p);
    void* ws = nullptr;
    AM_CUDA_CHECK(cudaMalloc(&ws, std::max<size_t>(wsb, 16)));
    auto row = [&](const char* pass, double ms, double flop) {
      std::printf("%-20s %-10s %10.3f %10.2f\n", s.name, pass, ms, tflops(flop, ms));
    };
    const double g_fwd = median_ms([&] { am::cuda::attention_generic_fwd(q, k, v, p, out, lse); }, reps, 3);
    row("fwd", g_fwd, fwd_flop);
    am::cuda::attention_generic_fwd(q, k, v, p, out, lse);
    const double g_bwd = median_ms(
        [&] {
          am::cuda::attention_generic_bwd(q, k, v, out, lse, dout, p, dq, dk, dv, s.sinks ? &dsinks : nullptr, nullptr,
                                          ws, wsb);
        },
        reps, 2);
    row("bwd", g_bwd, bwd_flop);
    if (s.flash) {
      auto& tune = am::cuda::attention_tuning();
      const am::cuda::AttnTuning saved = tune;
      std::vector<int> vars{0};
      if (s.flash_variants) vars.insert(vars.end(), {1, 2, 3});
      for (int fv : vars) {
        tune = saved;
        tune.fwd_variant = fv;
        tune.bwd_variant = fv;
        char tag[16];
        if (fv == 0)
          std::snprintf(tag, sizeof tag, "fwd fl");
        else
          std::snprintf(tag, sizeof tag, "fwd fl v%d", fv);
        const size_t ffwsb = am::cuda::attention_fwd_workspace_bytes(p);
        void* ffws = nullptr;
        AM_CUDA_CHECK(cudaMalloc(&ffws, std::max<size_t>(ffwsb, 16)));
        const double f_fwd =
            median_ms([&] { am::cuda::attention_fwd(q, k, v, p, out, lse, nullptr, ffws, ffwsb); }, reps, 3);
        row(tag, f_fwd, fwd_flop);
        am::cuda::attention_fwd(q, k, v, p, out, lse, nullptr, ffws, ffwsb);
        const size_t fwsb = am::cuda::attention_bwd_workspace_bytes(p);
        void* fws = nullptr;
        AM_CUDA_CHECK(cudaMalloc(&fws, std::max<size_t>(fwsb, 16)));
        if (fv == 0)
          std::snprintf(tag, sizeof tag, "bwd fl");
        else
          std::snprintf(tag, sizeof tag, "bwd fl v%d", fv);
        const double f_bwd = median_ms(
            [&] {
              am::cuda::attention_bwd(q, k, v, out, lse, dout, p, dq, dk, dv, s.sinks ? &dsinks : nullptr, nullptr,
                                      fws, fwsb);
            },
            reps, 2);
        row(tag, f_bwd, bwd_flop);
        if (fv == 0)
          std::printf("%-20s flash vs generic: fwd %.2fx, bwd %.2fx faster\n", s.name, g_fwd / f_fwd, g_bwd / f_bwd);
        AM_CUDA_CHECK(cudaFree(fws));
        AM_CUDA_CHECK(cudaFree(ffws));
      }
      tune = saved;
    }
    AM_CUDA_CHECK(cudaDeviceSynchronize());
    AM_CUDA_CHECK(cudaFree(ws));
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "attention_generic bench: %s\n", e.what());
  return 1;
}
