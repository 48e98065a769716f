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
#include "bench_util.cuh"
#include "core/tensor.h"

namespace {

constexpr auto& dev = am::bench::cuda_malloc_tensor;
void randomize(am::Tensor& t, uint32_t seed) { am::bench::fill_centered_bf16(t, seed, 3.4641f); }
constexpr auto& median_ms = am::bench::median_ms_legacy_stream;

std::vector<float> to_host(const am::Tensor& t) {
  std::vector<uint16_t> h(static_cast<size_t>(t.numel()));
  AM_CUDA_CHECK(cudaMemcpy(h.data(), t.raw(), h.size() * 2, cudaMemcpyDeviceToHost));
  std::vector<float> f(h.size());
  for (size_t i = 0; i < h.size(); ++i) f[i] = am::bf16_to_f32(h[i]);
  return f;
}
double rel(const std::vector<float>& a, const std::vector<float>& r) {
  double n = 0, d = 0;
  for (size_t i = 0; i < r.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    const double x = static_cast<double>(a[i]) - r[i];
    n += x * x;
    d += static_cast<double>(r[i]) * r[i];
  }
  return d > 0 ? std::sqrt(n / d) : std::sqrt(n);
}

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
  int devc = 0;
  if (cudaGetDeviceCount(&devc) != cudaSuccess || devc == 0) {
    std::printf("attention_cudnn bench: no CUDA device\n");
    return 0;
  }
  std::string why;
  if (!am::cuda::cudnn_attention_available(&why)) {
    std::printf("attention_cudnn bench: cuDNN not usable: %s\n", why.c_str());
    return 0;
  }
  cudaDeviceProp prop{};
  AM_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device %s, %d SMs; cuDNN %zu\n", prop.name, prop.multiProcessorCount,
              am::cuda::cudnn_attention_runtime_version());
  const BenchShape shapes[] = {
      {"W1", 4, 2048, 32, 8, 64}, {"W1-D128", 4, 2048, 32, 8, 128}, {"W2", 1, 4096, 32, 4, 128}};
  std::printf("%-8s %-5s %-6s %10s %10s %12s\n", "shape", "pass", "impl", "ms", "TFLOP/s", "vs flash");
  for (const auto& s : shapes) {
    am::AttnParams p;
    p.batch = s.B;
    p.seq = s.T;
    p.n_heads = s.nh;
    p.n_kv_heads = s.nkv;
    p.head_dim = s.D;
    p.scale = 1.f / std::sqrt(static_cast<float>(s.D));
    const am::Shape qs{s.B, s.T, s.nh, s.D}, ks{s.B, s.T, s.nkv, s.D}, ls{s.B, s.nh, s.T};
    am::Tensor q = dev(qs, am::DType::BF16), k = dev(ks, am::DType::BF16), v = dev(ks, am::DType::BF16),
               dout = dev(qs, am::DType::BF16), out_f = dev(qs, am::DType::BF16), lse_f = dev(ls, am::DType::F32),
               out_c = dev(qs, am::DType::BF16), lse_c = dev(ls, am::DType::F32), dq_f = dev(qs, am::DType::BF16),
               dk_f = dev(ks, am::DType::BF16), dv_f = dev(ks, am::DType::BF16), dq_c = dev(qs, am::DType::BF16),
               dk_c = dev(ks, am::DType::BF16), dv_c = dev(ks, am::DType::BF16);
    randomize(q, 11);
    randomize(k, 12);
    randomize(v, 13);
    randomize(dout, 14);
    const double fwd_flop = 4.0 * s.B * s.nh * static_cast<double>(s.T) * s.T * s.D / 2;
    const double bwd_flop = 2.5 * fwd_flop;
    auto row = [&](const char* pass, const char* impl, double ms, double flop, double diff) {
      std::printf("%-8s %-5s %-6s %10.3f %10.1f %12.2e\n", s.name, pass, impl, ms, flop / (ms * 1e-3) / 1e12, diff);
    };

    // ---- forward ----
    const size_t fws_f = am::cuda::attention_fwd_workspace_bytes(p);
    void* ws_ff = malloc_ws(fws_f);
    const double ms_ff = median_ms([&] { am::cuda::attention_fwd(q, k, v, p, out_f, lse_f, nullptr, ws_ff, fws_f); },
                                   reps, 5);
    AM_CUDA_CHECK(cudaDeviceSynchronize());
    const auto o_f = to_host(out_f);
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
      if (ok) row("fwd", "cudnn", ms_fc, fwd_flop, rel(to_host(out_c), o_f));
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
    const auto a = to_host(dq_f), b = to_host(dk_f), c = to_host(dv_f);
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
    const double d = std::max({rel(to_host(dq_c), a), rel(to_host(dk_c), b), rel(to_host(dv_c), c)});
    row("bwd", "cudnn", ms_bc, bwd_flop, d);
    std::printf("%-8s cudnn workspace: fwd %.1f MiB, bwd %.1f MiB (incl. fp32 dQ accumulator)\n", s.name,
                fws_c / 1048576.0, bws_c / 1048576.0);
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "attention_cudnn bench: %s\n", e.what());
  return 1;
}
