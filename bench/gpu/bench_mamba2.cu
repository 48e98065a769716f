// Micro-benchmark of the Nemotron-H Mamba2 kernels (src/backend/cuda/mamba2.cu) at a Nemotron-H-like mixer:
// B = 1, T = 4096 tokens, 128 heads x head dim 64 (Din = 8192), state 128, 8 groups, conv kernel 4 over
// Cd = Din + 2 G S = 10240 channels, gated norm groups of Din / G = 1024. bf16 activations, fp32 dt / A / D and
// parameter gradients, with and without packing (4 segments per row).
//
// The conv, the gated norm and the dt chain are memory-bound: GB/s of the bytes each must move. The scan runs both
// CUDA implementations (backend/cuda/mamba2.h): the chunked SSD one (64-token chunks; its chunk products are fp32
// SIMT tile FMAs, so its limit is the fp32 FMA rate, ~67 TFLOP/s on H100 / H200 SXM, not the tensor cores), reported
// as TFLOP/s of those products, and the sequential recurrence (one dependent step per token), reported as its
// elementwise state updates per second (B T nh P S per pass; its backward makes two passes over T).
// Timed with CUDA events after warm-up, median of 10.
//
//   am_gpu_microbench mamba2 [--tokens T] [--batch B] [--heads nh] [--headdim P] [--state S] [--groups G]
//                            [--profile-scan: skip the conv; run one chunked scan forward + backward, untimed, for ncu]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/mamba2.h"
#include "bench_registry.h"
#include "bench_util.cuh"
#include "core/tensor.h"

using am::DType;
using am::Tensor;
namespace cu = am::cuda;

namespace {

// Inputs: bench_util.cuh's lowbias32 fill. Timing: its median_ms, here median of 10 after 2 warm-up runs.
using am::bench::filled;
double median_ms(const std::function<void()>& fn) { return am::bench::median_ms(fn, 10, 2); }

void report_bw(const char* name, const std::string& shape, double bytes, double ms) {
  std::printf("  %-28s %-26s %9.3f ms %8.1f GB/s\n", name, shape.c_str(), ms, bytes / (ms * 1e-3) / 1e9);
  std::fflush(stdout);
}
void report_flops(const char* name, const std::string& shape, double flops, double ms) {
  std::printf("  %-28s %-26s %9.3f ms %8.1f TFLOP/s\n", name, shape.c_str(), ms, flops / (ms * 1e-3) / 1e12);
  std::fflush(stdout);
}
void report_scan(const char* name, const std::string& shape, double updates, double ms) {
  std::printf("  %-28s %-26s %9.3f ms %8.1f G state updates/s\n", name, shape.c_str(), ms, updates / (ms * 1e-3) / 1e9);
  std::fflush(stdout);
}

}  // namespace

int mamba2_bench_main(int argc, char** argv) {
  int64_t B = 1, T = 4096, nh = 128, P = 64, S = 128, G = 8;
  const int64_t K = 4;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--tokens") == 0) T = std::atoll(argv[++i]);
    else if (std::strcmp(argv[i], "--batch") == 0) B = std::atoll(argv[++i]);
    else if (std::strcmp(argv[i], "--heads") == 0) nh = std::atoll(argv[++i]);
    else if (std::strcmp(argv[i], "--headdim") == 0) P = std::atoll(argv[++i]);
    else if (std::strcmp(argv[i], "--state") == 0) S = std::atoll(argv[++i]);
    else if (std::strcmp(argv[i], "--groups") == 0) G = std::atoll(argv[++i]);
  }
  bool profile_scan = false;
  for (int i = 1; i < argc; ++i) profile_scan = profile_scan || std::strcmp(argv[i], "--profile-scan") == 0;
  const int64_t Din = nh * P, Cd = Din + 2 * G * S, N = B * T;
  try {
    auto& ctx = cu::default_context();
    const auto& pr = ctx.props();
    std::printf("mamba2 kernels: device %s, %d SMs; B=%lld T=%lld nh=%lld P=%lld S=%lld G=%lld (Din %lld, conv %lld x K%lld)\n",
                pr.name, pr.multiProcessorCount, (long long)B, (long long)T, (long long)nh, (long long)P, (long long)S,
                (long long)G, (long long)Din, (long long)Cd, (long long)K);
    const DType bf = DType::BF16, f32 = DType::F32;
    // packed rows: 4 equal segments per row
    Tensor seg_h = Tensor::empty({B, T}, DType::I32);
    for (int64_t i = 0; i < N; ++i) seg_h.data<int32_t>()[i] = static_cast<int32_t>((i % T) * 4 / T);
    Tensor seg = cu::to_device(seg_h);
    const double el = 2.0;  // bytes per bf16
    const std::string tok = "[" + std::to_string(N) + ", ";

    // ---- conv1d + SiLU over [B, T, Cd]
    Tensor x = filled({B, T, Cd}, bf, 1), w = filled({Cd, 1, K}, f32, 2, -0.5f, 0.5f), bias = filled({Cd}, f32, 3);
    Tensor pre = cu::empty({B, T, Cd}, bf), y = cu::empty({B, T, Cd}, bf), dy = filled({B, T, Cd}, bf, 4),
           dx = cu::empty({B, T, Cd}, bf), dw = cu::empty({Cd, K}, f32), db = cu::empty({Cd}, f32);
    cu::zero_(dw);
    cu::zero_(db);
    const std::string csh = tok + std::to_string(Cd) + "]";
    if (!profile_scan) std::printf("\nconv1d + SiLU (x, pre, y bf16; w, bias fp32)\n");
    for (const Tensor* sg : std::initializer_list<const Tensor*>{nullptr, &seg}) {
      if (profile_scan) break;
      const char* tag = sg ? " packed" : "";
      report_bw((std::string("conv fwd") + tag).c_str(), csh, N * Cd * el * 3,
                median_ms([&] { cu::mamba_conv1d_silu_fwd(x, w, &bias, sg, pre, y); }));
      report_bw((std::string("conv bwd (dx, dw, dbias)") + tag).c_str(), csh, N * Cd * el * 4,
                median_ms([&] { cu::mamba_conv1d_silu_bwd(x, w, pre, sg, dy, dx, &dw, &db); }));
    }
    x = pre = y = dy = dx = Tensor();

    // ---- selective scan
    Tensor xs = filled({B, T, nh, P}, bf, 5), dt = filled({B, T, nh}, f32, 6, 0.001f, 0.1f), A = filled({nh}, f32, 7, -8.f, -1.f),
           Bm = filled({B, T, G, S}, bf, 8), Cm = filled({B, T, G, S}, bf, 9), D = filled({nh}, f32, 10);
    Tensor ys = cu::empty({B, T, nh, P}, bf), dys = filled({B, T, nh, P}, bf, 11), dxs = cu::empty({B, T, nh, P}, bf),
           ddt = cu::empty({B, T, nh}, f32), dA = cu::empty({nh}, f32), dD = cu::empty({nh}, f32),
           dB = cu::empty({B, T, G, S}, bf), dC = cu::empty({B, T, G, S}, bf);
    cu::zero_(dA);
    cu::zero_(dD);
    const double updates = static_cast<double>(N) * nh * P * S;
    const std::string ssh = "x " + tok + std::to_string(nh) + "x" + std::to_string(P) + "] S" + std::to_string(S);
    // FLOPs of the chunked scan's products, per (row, chunk of L = 64, head): see backend/cuda/mamba2_ssd.cu
    const double Lc = 64, nck = static_cast<double>(B) * ((T + 63) / 64) * nh, Pd = static_cast<double>(P),
                 Sd = static_cast<double>(S);
    const double fwd_flops = 2 * nck * (Pd * Sd * Lc + Lc * Lc * Sd + Lc * Pd * Sd + Lc * Lc * Pd);
    const double bwd_flops =
        2 * nck * (3 * Pd * Sd * Lc + Lc * Lc * Sd + 2 * Lc * Lc * Pd + Lc * Pd * Sd + 2 * Lc * Sd * Lc + 2 * Lc * Sd * Pd);
    if (profile_scan) {  // for Nsight Compute: one chunked forward and backward, nothing else
      cu::set_scan_algorithm(cu::ScanAlgorithm::Chunked);
      cu::mamba_ssm_scan_fwd(xs, dt, A, Bm, Cm, D, nullptr, ys, nullptr);
      cu::mamba_ssm_scan_bwd(xs, dt, A, Bm, Cm, D, nullptr, dys, dxs, ddt, dA, dB, dC, dD);
      AM_CUDA_CHECK(cudaDeviceSynchronize());
      std::printf("profiled one chunked scan forward + backward\n");
      return 0;
    }
    std::printf("\nselective scan (x, B, C, y bf16)\n");
    const cu::ScanAlgorithm saved = cu::scan_algorithm();
    for (const Tensor* sg : std::initializer_list<const Tensor*>{nullptr, &seg}) {
      const char* tag = sg ? " packed" : "";
      double ms[2][2];
      for (int k = 0; k < 2; ++k) {
        cu::set_scan_algorithm(k == 0 ? cu::ScanAlgorithm::Chunked : cu::ScanAlgorithm::Sequential);
        ms[k][0] = median_ms([&] { cu::mamba_ssm_scan_fwd(xs, dt, A, Bm, Cm, D, sg, ys, nullptr); });
        ms[k][1] = median_ms([&] { cu::mamba_ssm_scan_bwd(xs, dt, A, Bm, Cm, D, sg, dys, dxs, ddt, dA, dB, dC, dD); });
      }
      report_flops((std::string("chunked fwd") + tag).c_str(), ssh, fwd_flops, ms[0][0]);
      report_flops((std::string("chunked bwd") + tag).c_str(), ssh, bwd_flops, ms[0][1]);
      report_scan((std::string("sequential fwd") + tag).c_str(), ssh, updates, ms[1][0]);
      report_scan((std::string("sequential bwd (2 passes)") + tag).c_str(), ssh, 2 * updates, ms[1][1]);
      std::printf("  chunked / sequential speed-up%s: fwd %.1fx, bwd %.1fx\n", tag, ms[1][0] / ms[0][0], ms[1][1] / ms[0][1]);
    }
    cu::set_scan_algorithm(saved);
    xs = ys = dys = dxs = Tensor();

    // ---- gated RMSNorm over [N, Din], groups of Din / G
    Tensor gy = filled({N, Din}, bf, 12), gz = filled({N, Din}, bf, 13), gw = filled({Din}, f32, 14, 0.5f, 1.5f),
           go = cu::empty({N, Din}, bf), rstd = cu::empty({N * G}, f32), gdo = filled({N, Din}, bf, 15),
           gdy = cu::empty({N, Din}, bf), gdz = cu::empty({N, Din}, bf), gdw = cu::empty({Din}, f32);
    cu::zero_(gdw);
    const std::string nsh = tok + std::to_string(Din) + "] /" + std::to_string(Din / G);
    std::printf("\ngated RMSNorm (bf16, fp32 weight and rstd)\n");
    report_bw("gated norm fwd", nsh, N * Din * el * 3,
              median_ms([&] { cu::gated_rmsnorm_fwd(gy, gz, gw, Din / G, 1e-5f, go, rstd); }));
    report_bw("gated norm bwd (dy, dz, dw)", nsh, N * Din * el * 5,
              median_ms([&] { cu::gated_rmsnorm_bwd(gy, gz, gw, rstd, Din / G, gdo, gdy, gdz, gdw); }));

    // ---- dt chain
    Tensor raw = filled({N, nh}, bf, 16, -6.f, 6.f), dtb = filled({nh}, f32, 17), din = cu::empty({N, nh}, f32),
           dto = cu::empty({N, nh}, f32), draw = cu::empty({N, nh}, bf), ddtb = cu::empty({nh}, f32);
    cu::zero_(ddtb);
    const std::string dsh = tok + std::to_string(nh) + "]";
    std::printf("\ndt chain (softplus + clamp)\n");
    report_bw("dt fwd", dsh, N * nh * (2.0 + 8.0), median_ms([&] { cu::mamba_dt_fwd(raw, dtb, 0.001f, INFINITY, din, dto); }));
    report_bw("dt bwd (+ dt_bias)", dsh, N * nh * (8.0 + 2.0),
              median_ms([&] { cu::mamba_dt_bwd(din, ddt.view({N, nh}), 0.001f, INFINITY, draw, &ddtb); }));
    AM_CUDA_CHECK(cudaStreamSynchronize(ctx.stream()));
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "mamba2 bench: %s\n", ex.what());
    return 1;
  }
  return 0;
}
