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
#include "core/tensor.h"

namespace {

#define GCK(x)                                                                                       \
  do {                                                                                               \
    cudaError_t e_ = (x);                                                                            \
    if (e_ != cudaSuccess) {                                                                         \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));        \
      std::exit(1);                                                                                  \
    }                                                                                                \
  } while (0)

// Uniform values of variance `var` (hash of the index), bf16.
__global__ void fill_uniform(__nv_bfloat16* p, int64_t n, uint32_t seed, float var) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  uint32_t x = static_cast<uint32_t>(i) * 2654435761u ^ seed;
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  const float u = (x >> 8) * (1.f / 16777216.f);
  p[i] = __float2bfloat16((u - 0.5f) * sqrtf(12.f * var));
}

am::Tensor dev(const am::Shape& s, am::DType dt) {
  void* p = nullptr;
  GCK(cudaMalloc(&p, std::max<size_t>(16, static_cast<size_t>(am::shape_numel(s)) * am::dtype_size(dt))));
  std::shared_ptr<void> keep(p, [](void* q) { cudaFree(q); });
  return am::Tensor::wrap(p, s, dt, keep, am::DeviceType::CUDA);
}

void randomize(am::Tensor& t, uint32_t seed) {
  const int64_t n = t.numel();
  fill_uniform<<<static_cast<unsigned>((n + 255) / 256), 256>>>(static_cast<__nv_bfloat16*>(t.raw()), n, seed, 1.f);
  GCK(cudaGetLastError());
}

double median_ms(const std::function<void()>& f, int warm, int reps) {
  for (int i = 0; i < warm; ++i) f();
  GCK(cudaDeviceSynchronize());
  cudaEvent_t a, b;
  GCK(cudaEventCreate(&a));
  GCK(cudaEventCreate(&b));
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) {
    GCK(cudaEventRecord(a));
    f();
    GCK(cudaEventRecord(b));
    GCK(cudaEventSynchronize(b));
    float t = 0;
    GCK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

struct GenShape {
  const char* name;
  int64_t B, T, nh, nkv, D, Dv, window;
  float softcap;
  bool sinks;
  bool flash;  // also time the flash kernels on it
};

}  // namespace

int attention_generic_bench_main(int argc, char** argv) {
  const int reps = argc > 1 ? std::max(1, std::atoi(argv[1])) : 10;
  int devc = 0;
  if (cudaGetDeviceCount(&devc) != cudaSuccess || devc == 0) {
    std::printf("attention_generic bench: no CUDA device\n");
    return 0;
  }
  cudaDeviceProp prop{};
  GCK(cudaGetDeviceProperties(&prop, 0));
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
    GCK(cudaMemset(sinks.raw(), 0, sinks.nbytes()));
    GCK(cudaMemset(dsinks.raw(), 0, dsinks.nbytes()));
    if (s.sinks) p.sinks = &sinks;
    const double fwd_flop = 4.0 * s.B * s.nh * static_cast<double>(s.T) * s.T * (s.D + s.Dv) / 4;
    const double bwd_flop = 2.5 * fwd_flop;
    const size_t wsb = am::cuda::attention_generic_bwd_workspace_bytes(p);
    void* ws = nullptr;
    GCK(cudaMalloc(&ws, std::max<size_t>(wsb, 16)));
    auto row = [&](const char* pass, double ms, double flop) {
      std::printf("%-20s %-8s %10.3f %10.2f\n", s.name, pass, ms, flop / (ms * 1e-3) / 1e12);
    };
    row("fwd", median_ms([&] { am::cuda::attention_generic_fwd(q, k, v, p, out, lse); }, 3, reps), fwd_flop);
    am::cuda::attention_generic_fwd(q, k, v, p, out, lse);
    row("bwd",
        median_ms(
            [&] {
              am::cuda::attention_generic_bwd(q, k, v, out, lse, dout, p, dq, dk, dv, s.sinks ? &dsinks : nullptr,
                                              nullptr, ws, wsb);
            },
            2, reps),
        bwd_flop);
    if (s.flash) {
      row("fwd fl", median_ms([&] { am::cuda::attention_fwd(q, k, v, p, out, lse); }, 3, reps), fwd_flop);
      am::cuda::attention_fwd(q, k, v, p, out, lse);
      const size_t fwsb = am::cuda::attention_bwd_workspace_bytes(p);
      void* fws = nullptr;
      GCK(cudaMalloc(&fws, std::max<size_t>(fwsb, 16)));
      row("bwd fl",
          median_ms([&] { am::cuda::attention_bwd(q, k, v, out, lse, dout, p, dq, dk, dv, nullptr, fws, fwsb); }, 2,
                    reps),
          bwd_flop);
      GCK(cudaFree(fws));
    }
    GCK(cudaDeviceSynchronize());
    GCK(cudaFree(ws));
  }
  return 0;
}
