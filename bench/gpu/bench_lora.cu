// Micro-benchmark of the LoRA branch's scale / add folded into its GEMMs (LinearOut, core/linear_out.h;
// models/blocks/lora.cpp, docs/lora.md "Speed") at the W5 shapes: Llama-3.2-1B (H 2048, q/o 2048, k/v 512, I 8192),
// N = 8192 tokens (4 x 2048), rank 8, frozen bf16 base (no base dW), fp32 A / B gradients.
//   "add": the [N, out] add alone, as the branch's last GEMM + ops::add_ vs that GEMM with beta = 1.
//   "fwd": u = x A^T, scale_(u), z = u B^T, add_(y, z)          vs  u = s x A^T (alpha), y += u B^T (beta = 1)
//   "bwd": u recomputed + scaled, dB / du GEMMs, scale_(du), dA / dxin GEMMs, add_(dx, dxin)
//          vs alpha in the u and du GEMMs, beta = 1 in the dxin GEMM
//   "block dx": a block's summed input gradient (k, v after q; up after gate): the base dX GEMM into a temporary +
//          add_ vs the dX GEMM with beta = 1 (models/blocks/attention.cpp, mlp.cpp; proj_bwd accumulate_dx).
//   "residual": o_proj / down_proj into the bf16 residual stream (models/decoder.cpp): x1 = x, GEMM into a
//          temporary + add_ vs the GEMM with beta = 1 into x1 (the copy of x stays in both).
// Each row: median ms (CUDA events, 3 warm-ups, 20 runs) old / new and the difference; the end prints the W5 step
// estimate (16 layers x the 7 adapted projections, forward + backward, + the 3 block dx adds per layer).
//
//   am_gpu_microbench lora [--tokens N] [--rank R]
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>

#include "backend/cuda/cuda_ops.h"
#include "bench_util.cuh"
#include "core/linear_out.h"
#include "core/tensor.h"

using am::DType;
using am::LinearOut;
using am::Tensor;
namespace cu = am::cuda;

namespace {

constexpr am::bench::Filler dev = am::bench::filled_fmix64;

double ms(const std::function<void()>& fn) { return am::bench::median_ms(fn, 20); }

double row(const std::string& what, double old_ms, double new_ms) {
  std::printf("  %-40s old %8.3f ms  new %8.3f ms  saved %7.3f ms (%5.1f%%)\n", what.c_str(), old_ms, new_ms,
              old_ms - new_ms, old_ms > 0 ? 100.0 * (old_ms - new_ms) / old_ms : 0.0);
  std::fflush(stdout);
  return old_ms - new_ms;
}

struct Saved {
  double add = 0, fwd = 0, bwd = 0;
};

// One adapted projection [out, in] with rank r.
Saved projection(const char* name, int64_t N, int64_t in, int64_t out, int64_t r, float s) {
  std::printf("%s: in %lld, out %lld, r %lld\n", name, (long long)in, (long long)out, (long long)r);
  Tensor x = dev({N, in}, DType::BF16, 1), A = dev({r, in}, DType::BF16, 2, -0.02f, 0.02f),
         B = dev({out, r}, DType::BF16, 3, -0.02f, 0.02f);
  Tensor dA = dev({r, in}, DType::F32, 4, -1e-3f, 1e-3f), dB = dev({out, r}, DType::F32, 5, -1e-3f, 1e-3f);
  Tensor y = dev({N, out}, DType::BF16, 6), z = cu::empty({N, out}, DType::BF16), u = cu::empty({N, r}, DType::BF16);
  Tensor g = dev({N, out}, DType::BF16, 7), du = cu::empty({N, r}, DType::BF16);
  Tensor dx = dev({N, in}, DType::BF16, 8), dxin = cu::empty({N, in}, DType::BF16);
  cu::linear_fwd(x, A, nullptr, u);
  Saved sv;
  sv.add = row(std::string(name) + " add (u B^T + add_ vs beta 1)", ms([&] {
                 cu::linear_fwd(u, B, nullptr, z);
                 cu::add_(y, z);
               }),
               ms([&] { cu::linear_fwd(u, B, nullptr, y, LinearOut{.accumulate = true}); }));
  sv.fwd = row(std::string(name) + " fwd branch", ms([&] {
                 cu::linear_fwd(x, A, nullptr, u);
                 cu::scale_(u, s);
                 cu::linear_fwd(u, B, nullptr, z);
                 cu::add_(y, z);
               }),
               ms([&] {
                 cu::linear_fwd(x, A, nullptr, u, LinearOut{.alpha = s});
                 cu::linear_fwd(u, B, nullptr, y, LinearOut{.accumulate = true});
               }));
  sv.bwd = row(std::string(name) + " bwd branch", ms([&] {
                 cu::linear_fwd(x, A, nullptr, u);
                 cu::scale_(u, s);
                 cu::linear_bwd(u, B, g, &du, dB, nullptr);
                 cu::scale_(du, s);
                 cu::linear_bwd(x, A, du, &dxin, dA, nullptr);
                 cu::add_(dx, dxin);
               }),
               ms([&] {
                 cu::linear_fwd(x, A, nullptr, u, LinearOut{.alpha = s});
                 cu::linear_bwd(u, B, g, &du, dB, nullptr, LinearOut{.alpha = s});
                 cu::linear_bwd(x, A, du, &dx, dA, nullptr, LinearOut{.accumulate = true});
               }));
  return sv;
}

// A block's dx += dy_p W_p for a frozen base projection [out, in].
double block_dx(const char* name, int64_t N, int64_t in, int64_t out) {
  Tensor x = dev({N, in}, DType::BF16, 11), W = dev({out, in}, DType::BF16, 12, -0.02f, 0.02f);
  Tensor dy = dev({N, out}, DType::BF16, 13), dx = dev({N, in}, DType::BF16, 14), tmp = cu::empty({N, in}, DType::BF16);
  Tensor frozen;
  return row(std::string(name) + " block dx += dy W", ms([&] {
               cu::linear_bwd(x, W, dy, &tmp, frozen, nullptr);
               cu::add_(dx, tmp);
             }),
             ms([&] { cu::linear_bwd(x, W, dy, &dx, frozen, nullptr, LinearOut{.accumulate = true}); }));
}

// The forward residual add of a base projection [out, in] (o_proj, down_proj) with a bf16 stream.
double residual(const char* name, int64_t N, int64_t in, int64_t out) {
  Tensor h = dev({N, in}, DType::BF16, 21), W = dev({out, in}, DType::BF16, 22, -0.02f, 0.02f);
  Tensor x = dev({N, out}, DType::BF16, 23);
  Tensor x1 = cu::empty({N, out}, DType::BF16), a = cu::empty({N, out}, DType::BF16);
  return row(std::string(name) + " residual x1 = x + h W^T", ms([&] {
               cu::linear_fwd(h, W, nullptr, a);
               cu::copy_(x1, x);
               cu::add_(x1, a);
             }),
             ms([&] {
               cu::copy_(x1, x);
               cu::linear_fwd(h, W, nullptr, x1, LinearOut{.accumulate = true});
             }));
}

}  // namespace

int lora_bench_main(int argc, char** argv) {
  int64_t N = 8192, r = 8;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--tokens") == 0 && i + 1 < argc) N = std::atoll(argv[++i]);
    else if (std::strcmp(argv[i], "--rank") == 0 && i + 1 < argc) r = std::atoll(argv[++i]);
  }
  try {
    const auto& pr = cu::default_context().props();
    std::printf("LoRA scale / add fused into the GEMMs: device %s, %d SMs; N = %lld, r = %lld, bf16, s = 2\n",
                pr.name, pr.multiProcessorCount, (long long)N, (long long)r);
    const int64_t H = 2048, KV = 512, I = 8192;
    const float s = 2.f;  // alpha 16 / r 8
    // q, o: [2048, 2048]; k, v: [512, 2048]; gate, up: [8192, 2048]; down: [2048, 8192]
    const Saved q = projection("q/o_proj", N, H, H, r, s);
    const Saved k = projection("k/v_proj", N, H, KV, r, s);
    const Saved gu = projection("gate/up_proj", N, H, I, r, s);
    const Saved dn = projection("down_proj", N, I, H, r, s);
    const double kv_dx = block_dx("k/v_proj", N, H, KV), up_dx = block_dx("up_proj", N, H, I);
    const double res = residual("o_proj", N, H, H) + residual("down_proj", N, I, H);
    const double layer_fwd = 2 * q.fwd + 2 * k.fwd + 2 * gu.fwd + dn.fwd;
    const double layer_bwd = 2 * q.bwd + 2 * k.bwd + 2 * gu.bwd + dn.bwd;
    const double layer_blk = 2 * kv_dx + up_dx;
    std::printf("W5 estimate per step (16 layers): LoRA fwd %.2f ms + LoRA bwd %.2f ms + block dx %.2f ms + residual"
                " %.2f ms = %.2f ms saved (without activation-checkpoint recomputation)\n",
                16 * layer_fwd, 16 * layer_bwd, 16 * layer_blk, 16 * res,
                16 * (layer_fwd + layer_bwd + layer_blk + res));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lora bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
