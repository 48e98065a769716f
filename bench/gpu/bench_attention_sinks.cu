// gpt_oss attention with sinks: the flash (tensor-core) kernels with sinks against the generic CUDA-core kernels
// that ops:: uses for sinks unless AM_ALLOW_UNVERIFIED_CUDA=1 (src/ops/ops_cuda.cpp), at gpt-oss-20b's attention
// shape (B 1, T 4096, nh 64, nkv 8, D 64, causal), full and with its sliding window of 128, bf16 tensors and
// bf16 sinks (the model's CUDA working copy), forward and backward (with dsinks). Also the flash kernels without
// sinks on the same inputs (the sinks' own cost: the forward epilogue and the dsinks reduction), and the auto
// and mma.sync (variant 1) flash kernels. Timed with CUDA events after warm-up, median of the repeats.
// TFLOP/s count the visible (query, key) pairs only: forward 4 D per pair (QK^T and PV), backward 2.5x.
// The "vs generic" column: relative L2 difference of the flash result from the generic one on the same inputs
// (out for the forward; the worst of dq, dk, dv and dsinks for the backward): a large-shape agreement check on
// top of tests/gpu (CudaAttention.FlashSinks*), expected at bf16 rounding (~1e-2 or below).
//
//   am_gpu_microbench attention_sinks [reps=10]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "backend/cuda/attention.h"
#include "backend/cuda/attention_generic.h"
#include "bench_registry.h"
#include "attention_bench_util.h"
#include "bench_util.cuh"
#include "core/tensor.h"

namespace {

using namespace am::bench::attn;  // randomize(t, seed, scale = 3.4641f): variance (scale^2 / 12) = 1

// Visible (query, key) pairs of one (batch, head): sum over i of min(i + 1, window).
double visible_pairs(int64_t T, int64_t window) {
  double n = 0;
  for (int64_t i = 0; i < T; ++i) n += static_cast<double>(window > 0 ? std::min<int64_t>(i + 1, window) : i + 1);
  return n;
}

struct SinkShape {
  const char* name;
  int64_t B, T, nh, nkv, D, window;
};

}  // namespace

int attention_sinks_bench_main(int argc, char** argv) try {
  const int reps = argc > 1 ? std::max(1, std::atoi(argv[1])) : 10;
  if (!have_device("attention_sinks")) return 0;
  const cudaDeviceProp prop = device_props();
  std::printf("device %s, %d SMs; gpt_oss attention with sinks: flash (tensor cores) vs generic (CUDA cores)\n",
              prop.name, prop.multiProcessorCount);
  const SinkShape shapes[] = {
      {"gptoss full", 1, 4096, 64, 8, 64, 0},
      {"gptoss win128", 1, 4096, 64, 8, 64, 128},
  };
  auto& tune = am::cuda::attention_tuning();
  const am::cuda::AttnTuning saved = tune;
  std::printf("%-14s %-5s %-22s %10s %10s %10s %12s\n", "shape", "pass", "kernels", "ms", "TFLOP/s", "x generic",
              "vs generic");
  for (const auto& s : shapes) {
    const am::AttnParams p = attn_params(s.B, s.T, s.nh, s.nkv, s.D, 0, s.window);
    const am::Shape qs{s.B, s.T, s.nh, s.D}, ks{s.B, s.T, s.nkv, s.D}, ls{s.B, s.nh, s.T};
    const am::DType bf = am::DType::BF16;
    am::Tensor q = dev(qs, bf), k = dev(ks, bf), v = dev(ks, bf), dout = dev(qs, bf), out = dev(qs, bf),
               dq = dev(qs, bf), dk = dev(ks, bf), dv = dev(ks, bf), lse = dev(ls, am::DType::F32),
               sinks = dev({s.nh}, bf), dsinks = dev({s.nh}, am::DType::F32);
    randomize_inputs(q, k, v, dout, 31);
    randomize(sinks, 35, 6.f);  // uniform in [-3, 3): around the rows' log-sum-exp, so the sinks matter
    const double fwd_flop = 4.0 * s.B * s.nh * s.D * visible_pairs(s.T, s.window);
    const double bwd_flop = 2.5 * fwd_flop;

    // One scratch buffer for every call: the largest of the generic and flash backward workspaces.
    am::AttnParams ps = p;
    ps.sinks = &sinks;
    const size_t wsb = std::max({am::cuda::attention_generic_bwd_workspace_bytes(ps),
                                 am::cuda::attention_fwd_workspace_bytes(ps), am::cuda::attention_bwd_workspace_bytes(ps),
                                 am::cuda::attention_bwd_workspace_bytes(p), size_t{16}});
    void* ws = nullptr;
    AM_CUDA_CHECK(cudaMalloc(&ws, wsb));
    auto zero_dsinks = [&] { AM_CUDA_CHECK(cudaMemset(dsinks.raw(), 0, dsinks.nbytes())); };

    // ---- generic (the default path for sinks today) ----
    const double g_fwd = median_ms([&] { am::cuda::attention_generic_fwd(q, k, v, ps, out, lse); }, reps, 3);
    am::cuda::attention_generic_fwd(q, k, v, ps, out, lse);
    AM_CUDA_CHECK(cudaDeviceSynchronize());
    const auto ref_out = download(out);
    const double g_bwd = median_ms(
        [&] { am::cuda::attention_generic_bwd(q, k, v, out, lse, dout, ps, dq, dk, dv, &dsinks, nullptr, ws, wsb); },
        reps, 2);
    zero_dsinks();
    am::cuda::attention_generic_bwd(q, k, v, out, lse, dout, ps, dq, dk, dv, &dsinks, nullptr, ws, wsb);
    AM_CUDA_CHECK(cudaDeviceSynchronize());
    const auto ref_dq = download(dq), ref_dk = download(dk), ref_dv = download(dv), ref_ds = download(dsinks);
    auto row = [&](const char* pass, const char* kern, double ms, double flop, double base_ms, double diff) {
      std::printf("%-14s %-5s %-22s %10.3f %10.1f %10.2f %12.2e\n", s.name, pass, kern, ms, tflops(flop, ms),
                  base_ms / ms, diff);
    };
    row("fwd", "generic + sinks", g_fwd, fwd_flop, g_fwd, 0.0);
    row("bwd", "generic + sinks", g_bwd, bwd_flop, g_bwd, 0.0);

    // ---- flash with sinks (auto = wgmma on sm_90a, and mma.sync), then without sinks ----
    struct Run {
      const char* name;
      int variant;  // fwd and bwd variant (0 = auto; 1 = mma.sync)
      bool sinks;
    };
    const Run runs[] = {{"flash + sinks (auto)", 0, true},
                        {"flash + sinks (v1)", 1, true},
                        {"flash, no sinks (auto)", 0, false}};
    for (const Run& r : runs) {
      const am::AttnParams& pr = r.sinks ? ps : p;
      tune.fwd_variant = r.variant;
      tune.bwd_variant = r.variant;
      tune.bwd_split = 0;
      const double f_ms = median_ms([&] { am::cuda::attention_fwd(q, k, v, pr, out, lse, nullptr, ws, wsb); }, reps, 3);
      am::cuda::attention_fwd(q, k, v, pr, out, lse, nullptr, ws, wsb);
      AM_CUDA_CHECK(cudaDeviceSynchronize());
      const double f_diff = r.sinks ? rel(download(out), ref_out) : NAN;
      am::Tensor* dsp = r.sinks ? &dsinks : nullptr;
      const double b_ms = median_ms(
          [&] { am::cuda::attention_bwd(q, k, v, out, lse, dout, pr, dq, dk, dv, dsp, nullptr, ws, wsb); }, reps, 2);
      double b_diff = NAN;
      if (r.sinks) {
        zero_dsinks();
        am::cuda::attention_bwd(q, k, v, out, lse, dout, pr, dq, dk, dv, dsp, nullptr, ws, wsb);
        AM_CUDA_CHECK(cudaDeviceSynchronize());
        b_diff = std::max({rel(download(dq), ref_dq), rel(download(dk), ref_dk), rel(download(dv), ref_dv),
                           rel(download(dsinks), ref_ds)});
      }
      row("fwd", r.name, f_ms, fwd_flop, g_fwd, f_diff);
      row("bwd", r.name, b_ms, bwd_flop, g_bwd, b_diff);
    }
    tune = saved;
    AM_CUDA_CHECK(cudaDeviceSynchronize());
    AM_CUDA_CHECK(cudaFree(ws));
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "attention_sinks bench: %s\n", e.what());
  return 1;
}
