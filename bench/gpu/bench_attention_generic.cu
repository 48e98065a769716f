// Generic (CUDA-core) attention micro-benchmark (src/backend/cuda/attention_generic.h): the shapes real models
// send there, at B 1, T 2048, causal, bf16, forward and backward, timed with CUDA events after warm-up (median
// of the repeats). TFLOP/s use the causal count (forward 4 B nh T^2 (D + Dv) / 4, backward 2.5 x forward),
// ignoring windows. The last two rows run the generic kernels on W2-like flash shapes and the flash kernels
// on the same inputs, to show the gap to tensor cores.
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
#include "bench_util.cuh"
#include "core/tensor.h"

namespace {

// Inputs: bench_util.cuh's centered lowbias32 fill, variance 1 ((u - 0.5) * sqrt(12)), each tensor on its own
// cudaMalloc. Timing: its timer on the legacy default stream (where these kernels run), device sync after warm-up.
constexpr auto& dev = am::bench::cuda_malloc_tensor;
void randomize(am::Tensor& t, uint32_t seed) { am::bench::fill_centered_bf16(t, seed, std::sqrt(12.f)); }
constexpr auto& median_ms = am::bench::median_ms_legacy_stream;

struct GenShape {
  const char* name;
  int64_t B, T, nh, nkv, D, Dv, window;
  float softcap;
  bool sinks;
  bool flash;  // also time the flash kernels on it
};

}  // namespace

int attention_generic_bench_main(int argc, char** argv) try {
  const int reps = argc > 1 ? std::max(1, std::atoi(argv[1])) : 10;
  int devc = 0;
  if (cudaGetDeviceCount(&devc) != cudaSuccess || devc == 0) {
    std::printf("attention_generic bench: no CUDA device\n");
    return 0;
  }
  cudaDeviceProp prop{};
  AM_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device %s, %d SMs; generic attention (CUDA cores, fp32 math), bf16, causal\n", prop.name,
              prop.multiProcessorCount);
  const GenShape shapes[] = {
      {"phi3 D96", 1, 2048, 32, 32, 96, 96, 0, 0.f, false, false},
      {"gemma3 D256", 1, 2048, 8, 4, 256, 256, 0, 0.f, false, false},
      {"gemma2 D256 cap", 1, 2048, 8, 4, 256, 256, 0, 50.f, false, false},
      {"gptoss D64 sinks", 1, 2048, 64, 8, 64, 64, 0, 0.f, true, false},
      {"gptoss D64 s win128", 1, 2048, 64, 8, 64, 64, 128, 0.f, true, false},
      {"mla D192/128", 1, 2048, 16, 16, 192, 128, 0, 0.f, false, false},
      {"W2-like D128", 1, 2048, 32, 4, 128, 128, 0, 0.f, false, true},
  };
  std::printf("%-20s %-8s %10s %10s\n", "shape", "pass", "ms", "TFLOP/s");
  for (const auto& s : shapes) {
    am::AttnParams p;
    p.batch = s.B;
    p.seq = s.T;
    p.n_heads = s.nh;
    p.n_kv_heads = s.nkv;
    p.head_dim = s.D;
    p.v_head_dim = s.Dv == s.D ? 0 : s.Dv;
    p.scale = 1.f / std::sqrt(static_cast<float>(s.D));
    p.sliding_window = s.window;
    p.softcap = s.softcap;
    const am::Shape qs{s.B, s.T, s.nh, s.D}, ks{s.B, s.T, s.nkv, s.D}, vs{s.B, s.T, s.nkv, s.Dv},
        os{s.B, s.T, s.nh, s.Dv};
    am::Tensor q = dev(qs, am::DType::BF16), k = dev(ks, am::DType::BF16), v = dev(vs, am::DType::BF16),
               out = dev(os, am::DType::BF16), dout = dev(os, am::DType::BF16), dq = dev(qs, am::DType::BF16),
               dk = dev(ks, am::DType::BF16), dv = dev(vs, am::DType::BF16),
               lse = dev({s.B, s.nh, s.T}, am::DType::F32), sinks = dev({s.nh}, am::DType::F32),
               dsinks = dev({s.nh}, am::DType::F32);
    randomize(q, 21);
    randomize(k, 22);
    randomize(v, 23);
    randomize(dout, 24);
    AM_CUDA_CHECK(cudaMemset(sinks.raw(), 0, sinks.nbytes()));
    AM_CUDA_CHECK(cudaMemset(dsinks.raw(), 0, dsinks.nbytes()));
    if (s.sinks) p.sinks = &sinks;
    const double fwd_flop = 4.0 * s.B * s.nh * static_cast<double>(s.T) * s.T * (s.D + s.Dv) / 4;
    const double bwd_flop = 2.5 * fwd_flop;
    const size_t wsb = am::cuda::attention_generic_bwd_workspace_bytes(p);
    void* ws = nullptr;
    AM_CUDA_CHECK(cudaMalloc(&ws, std::max<size_t>(wsb, 16)));
    auto row = [&](const char* pass, double ms, double flop) {
      std::printf("%-20s %-8s %10.3f %10.2f\n", s.name, pass, ms, flop / (ms * 1e-3) / 1e12);
    };
    row("fwd", median_ms([&] { am::cuda::attention_generic_fwd(q, k, v, p, out, lse); }, reps, 3), fwd_flop);
    am::cuda::attention_generic_fwd(q, k, v, p, out, lse);
    row("bwd",
        median_ms(
            [&] {
              am::cuda::attention_generic_bwd(q, k, v, out, lse, dout, p, dq, dk, dv, s.sinks ? &dsinks : nullptr,
                                              nullptr, ws, wsb);
            },
            reps, 2),
        bwd_flop);
    if (s.flash) {
      row("fwd fl", median_ms([&] { am::cuda::attention_fwd(q, k, v, p, out, lse); }, reps, 3), fwd_flop);
      am::cuda::attention_fwd(q, k, v, p, out, lse);
      const size_t fwsb = am::cuda::attention_bwd_workspace_bytes(p);
      void* fws = nullptr;
      AM_CUDA_CHECK(cudaMalloc(&fws, std::max<size_t>(fwsb, 16)));
      row("bwd fl",
          median_ms(
              [&] {
                am::cuda::attention_bwd(q, k, v, out, lse, dout, p, dq, dk, dv, nullptr, nullptr, fws, fwsb);
              },
              reps, 2),
          bwd_flop);
      AM_CUDA_CHECK(cudaFree(fws));
    }
    AM_CUDA_CHECK(cudaDeviceSynchronize());
    AM_CUDA_CHECK(cudaFree(ws));
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "attention_generic bench: %s\n", e.what());
  return 1;
}
