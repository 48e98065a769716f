// Micro-benchmark of the fused projections (models/blocks/fused_proj.h, docs/fused_projections.md) at the W1 shape
// (Llama-3.2-1B: H 2048, 32 heads / 8 KV heads of 64, I 8192), for N = 8192 tokens (4 x 2048) and N = 512:
//   attention: q, k, v as three GEMMs ([N, 2048], [N, 512], [N, 512]) + RoPE on q and k, against one GEMM into
//              [N, 3072] + qkv_split_rope; backward: three linear_bwd (dx, dW) + two dx adds + two rope_bwd, against
//              qkv_merge_rope_bwd + one linear_bwd;
//   MLP:       gate, up as two GEMMs + swiglu, against one GEMM into [N, 16384] + swiglu_fused; backward likewise;
//              and the GeGLU activation on separate tensors vs the fused [gate | up] layout.
// The separate weights are row slices of one buffer, as ParamStore::colocate lays them out. Each row: median ms
// (CUDA events, 3 warm-ups, 20 runs), GEMM-only and whole-part times, and the fused/separate ratio.
//
//   am_gpu_microbench fused_proj [--tokens N]   (default: both 8192 and 512)
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/moe.h"
#include "bench_util.cuh"
#include "core/tensor.h"

using am::DType;
using am::Tensor;
namespace cu = am::cuda;

namespace {

constexpr am::bench::Filler dev = am::bench::filled_fmix64;

double ms(const std::function<void()>& fn) { return am::bench::median_ms(fn, 20); }

void row(const char* what, double sep, double fused, double flops) {
  std::printf("  %-34s separate %8.3f ms  fused %8.3f ms  ratio %.3f  (%6.1f / %6.1f TFLOP/s)\n", what, sep, fused,
              fused / sep, flops / (sep * 1e-3) / 1e12, flops / (fused * 1e-3) / 1e12);
  std::fflush(stdout);
}

void run(int64_t N) {
  const int64_t H = 2048, NH = 32, NKV = 8, D = 64, I = 8192, Q = NH * D, KV = NKV * D, W = Q + 2 * KV;
  std::printf("\nN = %lld tokens (W1 layer: H %lld, q %lld, k/v %lld, I %lld; bf16, dW fp32)\n", (long long)N,
              (long long)H, (long long)Q, (long long)KV, (long long)I);
  Tensor x = dev({N, H}, DType::BF16, 1);
  // ---- attention q | k | v ----
  {
    Tensor w = dev({W, H}, DType::BF16, 2, -0.05f, 0.05f), dw = dev({W, H}, DType::F32, 3, -1e-3f, 1e-3f);
    Tensor wq = w.slice_rows(0, Q), wk = w.slice_rows(Q, Q + KV), wv = w.slice_rows(Q + KV, W);
    Tensor dwq = dw.slice_rows(0, Q), dwk = dw.slice_rows(Q, Q + KV), dwv = dw.slice_rows(Q + KV, W);
    Tensor cs = dev({N, D / 2}, DType::F32, 4), sn = dev({N, D / 2}, DType::F32, 5);
    Tensor q = cu::empty({N, Q}, DType::BF16), k = cu::empty({N, KV}, DType::BF16), v = cu::empty({N, KV}, DType::BF16);
    Tensor qkv = cu::empty({N, W}, DType::BF16);
    Tensor q3 = q.view({N, NH, D}), k3 = k.view({N, NKV, D}), v3 = v.view({N, NKV, D});
    const double fl = 2.0 * N * H * W;
    const double g_sep = ms([&] {
      cu::linear_fwd(x, wq, nullptr, q);
      cu::linear_fwd(x, wk, nullptr, k);
      cu::linear_fwd(x, wv, nullptr, v);
    });
    const double g_fus = ms([&] { cu::linear_fwd(x, w, nullptr, qkv); });
    row("qkv fwd GEMMs", g_sep, g_fus, fl);
    const double p_sep = ms([&] {
      cu::linear_fwd(x, wq, nullptr, q);
      cu::linear_fwd(x, wk, nullptr, k);
      cu::linear_fwd(x, wv, nullptr, v);
      cu::rope_fwd_(q3, cs, sn);
      cu::rope_fwd_(k3, cs, sn);
    });
    const double p_fus = ms([&] {
      cu::linear_fwd(x, w, nullptr, qkv);
      cu::qkv_split_rope(qkv, &cs, &sn, q3, k3, v3);
    });
    row("qkv fwd (+ RoPE / split)", p_sep, p_fus, fl);
    Tensor dq = dev({N, Q}, DType::BF16, 6), dk = dev({N, KV}, DType::BF16, 7), dv = dev({N, KV}, DType::BF16, 8);
    Tensor dqkv = dev({N, W}, DType::BF16, 9);
    Tensor dx = cu::empty({N, H}, DType::BF16), tmp = cu::empty({N, H}, DType::BF16);
    const double b_sep = ms([&] {
      cu::linear_bwd(x, wq, dq, &dx, dwq, nullptr);
      cu::linear_bwd(x, wk, dk, &tmp, dwk, nullptr);
      cu::add_(dx, tmp);
      cu::linear_bwd(x, wv, dv, &tmp, dwv, nullptr);
      cu::add_(dx, tmp);
    });
    const double b_fus = ms([&] { cu::linear_bwd(x, w, dqkv, &dx, dw, nullptr); });
    row("qkv bwd GEMMs (dx + dW, adds)", b_sep, b_fus, 2 * fl);
    Tensor dq3 = dq.view({N, NH, D}), dk3 = dk.view({N, NKV, D}), dv3 = dv.view({N, NKV, D});
    const double r_sep = ms([&] {
      cu::rope_bwd_(dq3, cs, sn);
      cu::rope_bwd_(dk3, cs, sn);
      cu::linear_bwd(x, wq, dq, &dx, dwq, nullptr);
      cu::linear_bwd(x, wk, dk, &tmp, dwk, nullptr);
      cu::add_(dx, tmp);
      cu::linear_bwd(x, wv, dv, &tmp, dwv, nullptr);
      cu::add_(dx, tmp);
    });
    const double r_fus = ms([&] {
      cu::qkv_merge_rope_bwd(dq3, dk3, dv3, &cs, &sn, dqkv);
      cu::linear_bwd(x, w, dqkv, &dx, dw, nullptr);
    });
    row("qkv bwd (+ RoPE bwd / merge)", r_sep, r_fus, 2 * fl);
    std::printf("  %-34s copies + 2 RoPE %8.3f ms  qkv_split_rope %8.3f ms\n", "split alone",
                ms([&] {
                  cu::copy_2d(q.raw(), Q * 2, qkv.raw(), W * 2, Q * 2, N);
                  cu::copy_2d(k.raw(), KV * 2, static_cast<char*>(qkv.raw()) + Q * 2, W * 2, KV * 2, N);
                  cu::copy_2d(v.raw(), KV * 2, static_cast<char*>(qkv.raw()) + (Q + KV) * 2, W * 2, KV * 2, N);
                  cu::rope_fwd_(q3, cs, sn);
                  cu::rope_fwd_(k3, cs, sn);
                }),
                ms([&] { cu::qkv_split_rope(qkv, &cs, &sn, q3, k3, v3); }));
  }
  // ---- MLP gate | up ----
  {
    Tensor w = dev({2 * I, H}, DType::BF16, 12, -0.05f, 0.05f), dw = dev({2 * I, H}, DType::F32, 13, -1e-3f, 1e-3f);
    Tensor wg = w.slice_rows(0, I), wu = w.slice_rows(I, 2 * I), dwg = dw.slice_rows(0, I), dwu = dw.slice_rows(I, 2 * I);
    Tensor g = cu::empty({N, I}, DType::BF16), u = cu::empty({N, I}, DType::BF16), h = cu::empty({N, I}, DType::BF16);
    Tensor gu = cu::empty({N, 2 * I}, DType::BF16);
    const double fl = 2.0 * N * H * 2 * I;
    row("gate_up fwd GEMMs", ms([&] {
          cu::linear_fwd(x, wg, nullptr, g);
          cu::linear_fwd(x, wu, nullptr, u);
        }),
        ms([&] { cu::linear_fwd(x, w, nullptr, gu); }), fl);
    row("gate_up fwd (+ SwiGLU)", ms([&] {
          cu::linear_fwd(x, wg, nullptr, g);
          cu::linear_fwd(x, wu, nullptr, u);
          cu::swiglu_fwd(g, u, h);
        }),
        ms([&] {
          cu::linear_fwd(x, w, nullptr, gu);
          cu::swiglu_fused_fwd(gu, h);
        }),
        fl);
    Tensor dh = dev({N, I}, DType::BF16, 14), dg = cu::empty({N, I}, DType::BF16), du = cu::empty({N, I}, DType::BF16);
    Tensor dgu = cu::empty({N, 2 * I}, DType::BF16);
    Tensor dx = cu::empty({N, H}, DType::BF16), tmp = cu::empty({N, H}, DType::BF16);
    row("gate_up bwd (SwiGLU bwd + GEMMs)", ms([&] {
          cu::swiglu_bwd(g, u, dh, dg, du);
          cu::linear_bwd(x, wg, dg, &dx, dwg, nullptr);
          cu::linear_bwd(x, wu, du, &tmp, dwu, nullptr);
          cu::add_(dx, tmp);
        }),
        ms([&] {
          cu::swiglu_fused_bwd(gu, dh, dgu);
          cu::linear_bwd(x, w, dgu, &dx, dw, nullptr);
        }),
        2 * fl);
    // The activations alone (Gemma's GeGLU has its own fused-layout kernels): bytes moved are the same, so the
    // fused layout should cost nothing.
    std::printf("  %-34s separate %8.3f ms  fused %8.3f ms   (fwd + bwd)\n", "geglu activation alone", ms([&] {
                  cu::geglu_fwd(g, u, h);
                  cu::geglu_bwd(g, u, dh, dg, du);
                }),
                ms([&] {
                  cu::geglu_fused_fwd(gu, h);
                  cu::geglu_fused_bwd(gu, dh, dgu);
                }));
  }
}

}  // namespace

int fused_proj_bench_main(int argc, char** argv) {
  std::vector<int64_t> tokens = {8192, 512};
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], "--tokens") == 0 && i + 1 < argc) tokens = {std::atoll(argv[++i])};
  try {
    const auto& pr = cu::default_context().props();
    std::printf("fused projections bench: device %s, %d SMs\n", pr.name, pr.multiProcessorCount);
    for (int64_t n : tokens) run(n);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fused_proj bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
