// Micro-benchmark of the kernels that put Gemma 2 and DeepSeek-V3 on CUDA:
//   - soft-capping (backend/cuda/softcap.cu) on one chunk of the soft-capped LM-head loss: [chunk, V] fp32 with
//     Gemma 2's V = 256000 and the chunk the loss picks (512 MiB of fp32 logits = 524 rows); also bf16 (generate);
//   - MLA's rope-column ops (backend/cuda/mla_cols.cu) at the DeepSeek-V3 layer shape, N = 4096 tokens: q's rope
//     tail gather (nh = 128 heads, dq = 192, dr = 64, interleaved), the k_pe broadcast to 128 heads and its
//     gradient's head sum, bf16;
//   - the grouped router (backend/cuda/moe_router_grouped.cu), N = 4096, E = 256, 8 groups keep 4, top-8, sigmoid
//     with bias (V3), and V2-Lite's softmax greedy router (E = 64, top-6).
// Method as bench_moe.cu: a device-to-device copy gives the bandwidth ceiling; each op is timed with CUDA events
// after warm-up, median of 20. Memory-bound ops report GB/s of the bytes they must move (read + write); the
// router reports time only (its serial per-token parts are latency, not bandwidth).
//
//   am_gpu_microbench gemma2_deepseek [--tokens N]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/mla_cols.h"
#include "backend/cuda/moe_router_grouped.h"
#include "bench_util.cuh"
#include "core/tensor.h"

using am::DType;
using am::Tensor;
namespace cu = am::cuda;

namespace {

Tensor host_uniform(const am::Shape& s, uint32_t seed, float lo, float hi) {
  Tensor t = Tensor::empty(s, DType::F32);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = u(rng);
  return t;
}
Tensor dev_uniform(const am::Shape& s, DType dt, uint32_t seed, float lo = -1.f, float hi = 1.f) {
  Tensor h = host_uniform(s, seed, lo, hi);
  return cu::to_device(dt == DType::F32 ? h : h.to(dt));
}

// Large tensors: a constant fill on the device (these maps cost the same whatever the values).
Tensor dev_const(const am::Shape& s, DType dt, float v) {
  Tensor t = cu::empty(s, dt);
  cu::fill_(t, v);
  return t;
}

// Timing: bench_util.cuh's median_ms, median of 20 after 3 warm-up runs.
using am::bench::median_ms;

double g_bw_peak = 0;

void report_bytes(const char* name, const std::string& shape, double bytes, double ms) {
  const double gbs = bytes / (ms * 1e-3) / 1e9;
  std::printf("  %-30s %-30s %9.3f ms %8.1f GB/s %6.1f%%\n", name, shape.c_str(), ms, gbs, 100.0 * gbs / g_bw_peak);
  std::fflush(stdout);
}
void report_time(const char* name, const std::string& shape, double ms) {
  std::printf("  %-30s %-30s %9.3f ms\n", name, shape.c_str(), ms);
  std::fflush(stdout);
}

}  // namespace

int gemma2_deepseek_bench_main(int argc, char** argv) {
  int64_t n = 4096;
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], "--tokens") == 0 && i + 1 < argc) n = std::atoll(argv[++i]);
  try {
    auto& ctx = cu::default_context();
    std::printf("gemma2/deepseek bench: device %s, %d SMs, N=%lld\n", ctx.props().name, ctx.props().multiProcessorCount,
                (long long)n);
    {
      Tensor src = cu::empty({am::bench::kCopyElems}, DType::F32);
      cu::zero_(src);
      g_bw_peak = am::bench::copy_bandwidth_gbs(src);
    }

    // ---- soft-capping: one LM-head chunk of Gemma 2 (V = 256000) ----
    {
      const int64_t V = 256000, rows = (int64_t(512) << 20) / (V * 4);
      const std::string shape = "[" + std::to_string(rows) + ", " + std::to_string(V) + "]";
      for (DType dt : {DType::F32, DType::BF16}) {
        Tensor x = dev_const({rows, V}, dt, 12.5f), g = dev_const({rows, V}, dt, 0.25f);
        const double es = static_cast<double>(am::dtype_size(dt)), el = static_cast<double>(rows * V);
        const double f = median_ms([&] { cu::softcap_(x, 30.f); });
        report_bytes((std::string("softcap_ ") + am::dtype_name(dt)).c_str(), shape, 2 * es * el, f);
        const double b = median_ms([&] { cu::softcap_bwd_(x, g, 30.f); });
        report_bytes((std::string("softcap_bwd_ ") + am::dtype_name(dt)).c_str(), shape, 3 * es * el, b);
      }
    }

    // ---- MLA rope columns, DeepSeek-V3: nh = 128, dq = 192 (128 nope + 64 rope), kv_a width 576 ----
    {
      const int64_t nh = 128, dq = 192, dn = 128, dr = 64, ckw = 576, rkv = 512;
      const DType dt = DType::BF16;
      Tensor q = dev_const({n * nh, dq}, dt, 0.5f), qr = cu::empty({n * nh, dr}, dt);
      Tensor K = dev_const({n, nh, dq}, dt, 0.25f), kr = dev_const({n, dr}, dt, 1.f), ckv = dev_const({n, ckw}, dt, 2.f);
      const double rope_bytes = 2.0 * n * nh * dr * 2;  // read + write of the rope block, bf16
      report_bytes("gather q rope (interleaved)", "[" + std::to_string(n * nh) + ", 192] -> 64", rope_bytes,
                   median_ms([&] { cu::mla_gather_cols(q, dn, true, qr); }));
      report_bytes("scatter dq rope (interleaved)", "64 -> [" + std::to_string(n * nh) + ", 192]", rope_bytes,
                   median_ms([&] { cu::mla_scatter_cols(qr, true, q, dn); }));
      report_bytes("broadcast k_pe to 128 heads", "[" + std::to_string(n) + ", 64] -> 128 heads",
                   2.0 * (n * dr + n * nh * dr), median_ms([&] { cu::mla_scatter_cols(kr, false, K, dn); }));
      report_bytes("sum dk_pe over 128 heads", "128 heads -> [" + std::to_string(n) + ", 64]",
                   2.0 * (n * dr + n * nh * dr), median_ms([&] { cu::mla_gather_cols(K, dn, false, kr); }));
      report_bytes("gather k_pe from kv_a", "[" + std::to_string(n) + ", 576] -> 64", 2.0 * 2 * n * dr,
                   median_ms([&] { cu::mla_gather_cols(ckv, rkv, true, kr); }));
      // the column splits the block does with copy_cols_ (cudaMemcpy2DAsync), for scale: k_nope out of kv_b's output
      Tensor kv = dev_const({n * nh, 256}, dt, 3.f), kn = cu::empty({n * nh, dq}, dt);
      report_bytes("copy_2d k_nope (memcpy2D)", "[" + std::to_string(n * nh) + ", 256] -> 128", 2.0 * 2 * n * nh * dn,
                   median_ms([&] {
                     cu::copy_2d(kn.raw(), dq * 2, kv.raw(), 256 * 2, dn * 2, n * nh);
                   }));
    }

    // ---- grouped routers ----
    {
      using G = am::GroupedRouterOptions::Group;
      struct Case {
        const char* name;
        int64_t E, k;
        am::GroupedRouterOptions o;
        bool bias;
      };
      const Case cases[] = {{"v3 sigmoid top2-sum groups", 256, 8, {true, G::Top2Sum, 8, 4, true, 2.5f}, true},
                            {"v2-lite softmax greedy", 64, 6, {false, G::None, 1, 1, false, 1.f}, false}};
      for (const Case& c : cases) {
        const std::string shape = "N=" + std::to_string(n) + " E=" + std::to_string(c.E) + " k=" + std::to_string(c.k);
        Tensor logits = dev_uniform({n, c.E}, DType::F32, 8, -4.f, 4.f);
        Tensor bias = dev_uniform({c.E}, DType::F32, 9, -0.1f, 0.1f);
        Tensor scores = cu::empty({n, c.E}, DType::F32), idx = cu::empty({n, c.k}, DType::I32),
               w = cu::empty({n, c.k}, DType::F32), dw = dev_uniform({n, c.k}, DType::F32, 10),
               dl = cu::empty({n, c.E}, DType::BF16);
        report_time((std::string(c.name) + " fwd").c_str(), shape, median_ms([&] {
                      cu::moe_router_grouped_fwd(logits, c.bias ? &bias : nullptr, c.k, c.o, scores, idx, w);
                    }));
        report_time((std::string(c.name) + " bwd").c_str(), shape,
                    median_ms([&] { cu::moe_router_grouped_bwd(scores, idx, c.o, dw, dl); }));
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gemma2_deepseek bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
