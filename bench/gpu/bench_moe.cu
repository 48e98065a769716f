// Micro-benchmark of the MoE ops (src/backend/cuda/moe*.cu) at the W2 shape (BENCH.md: Qwen3-30B-A3B-like
// layer): N = 4096 tokens, E = 128 experts, top-k = 8, hidden H = 2048, expert intermediate I = 768.
//
// Method (as bench_cuda_ops.cu): the ceilings are measured first in the same run (a 8192^3 bf16 cuBLASLt GEMM;
// a 2 GiB device-to-device copy counting bytes read + written); each op is timed with CUDA events after warm-up,
// median of 20, on random data with random (uniform, distinct per token) routing. Grouped GEMMs report TFLOP/s
// (useful FLOPs only) for every implementation (one cublasGemmGroupedBatchedEx launch; one cuBLASLt GEMM per
// expert; padded strided-batched; Auto) next to one dense cuBLASLt GEMM of the same total size and the bare
// strided-batched GEMMs at the padded shape and at perfect balance; memory-bound
// ops report GB/s of the bytes they must move. "pred" is the percentage predicted before the first run.
//
// The persistent grouped GEMM (moe_grouped_gemm.cu; opt-in through AM_MOE_GEMM=persistent) against the cuBLAS grouped
// API and Auto at both W2 projections, with exactly balanced routing and with the model's own skew (one expert in
// 3,600 of the 4,096 tokens' top-8, the other slots uniform): fwd, dx and dW separately, ms and TFLOP/s.
//
//   am_gpu_microbench moe [--tokens N] [--skew] [--persistent]   (--skew: Zipf-like expert popularity instead of
//   uniform; --persistent: only the ceilings and the persistent-vs-cuBLAS section)
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/moe.h"
#include "backend/cuda/moe_aux.h"
#include "bench_util.cuh"
#include "core/tensor.h"

using am::DType;
using am::Tensor;
namespace cu = am::cuda;

namespace {

// Inputs: bench_util.cuh's fmix64 fill (as bench_cuda_ops.cu). Timing: its median_ms, median of 20 after 3.
constexpr am::bench::Filler dev = am::bench::filled_fmix64;
using am::bench::median_ms;

double g_gemm_peak = 0, g_bw_peak = 0;

void report_flops(const char* name, const std::string& shape, double flops, double ms, double pred) {
  const double tf = flops / (ms * 1e-3) / 1e12;
  std::printf("  %-34s %-26s %9.3f ms %8.1f TFLOP/s %6.1f%% (pred %3.0f%%)\n", name, shape.c_str(), ms, tf,
              100.0 * tf / g_gemm_peak, pred);
  std::fflush(stdout);
}
void report_bytes(const char* name, const std::string& shape, double bytes, double ms, double pred) {
  const double gbs = bytes / (ms * 1e-3) / 1e9;
  std::printf("  %-34s %-26s %9.3f ms %8.1f GB/s    %6.1f%% (pred %3.0f%%)\n", name, shape.c_str(), ms, gbs,
              100.0 * gbs / g_bw_peak, pred);
  std::fflush(stdout);
}
void report_time(const char* name, const std::string& shape, double ms) {
  std::printf("  %-34s %-26s %9.3f ms\n", name, shape.c_str(), ms);
  std::fflush(stdout);
}

// cuBLASLt strided-batched dW (bf16 A/B, fp32 C += , column-major: C (kd x no) += A (kd x cap) * B^T (cap x no)),
// the heuristic's candidates timed one by one.
void lt_dw_sweep(const std::string& name, const std::string& shape, double flops, int kd, int no, int cap, int batch,
                 const void* a, const void* b, void* c) {
  auto& ctx = cu::default_context();
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  AM_CUDA_CHECK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t tn = CUBLAS_OP_N, tt = CUBLAS_OP_T;
  AM_CUDA_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &tn, sizeof(tn)));
  AM_CUDA_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tt, sizeof(tt)));
  AM_CUDA_CHECK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, kd, cap, kd));
  AM_CUDA_CHECK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, no, cap, no));
  AM_CUDA_CHECK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, kd, no, kd));
  const int64_t sa = int64_t(cap) * kd, sb = int64_t(cap) * no, sc = int64_t(no) * kd;
  for (auto [l, st] : {std::pair{la, sa}, std::pair{lb, sb}, std::pair{lc, sc}}) {
    AM_CUDA_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof(batch)));
    AM_CUDA_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &st, sizeof(st)));
  }
  cublasLtMatmulPreference_t pref = nullptr;
  AM_CUDA_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const size_t ws = ctx.workspace_bytes();
  AM_CUDA_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  cublasLtMatmulHeuristicResult_t res[16];
  int nres = 0;
  const cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(ctx.lt(), desc, la, lb, lc, lc, pref, 16, res, &nres);
  const float one = 1.f;
  double best = 1e30, first = 0;
  int best_i = -1;
  for (int i = 0; hs == CUBLAS_STATUS_SUCCESS && i < nres; ++i) {
    bool ok = true;
    const double ms = median_ms([&] {
      if (!ok) return;
      if (cublasLtMatmul(ctx.lt(), desc, &one, a, la, b, lb, &one, c, lc, c, lc, &res[i].algo, ctx.workspace(), ws,
                         ctx.stream()) != CUBLAS_STATUS_SUCCESS)
        ok = false;
    }, 10, 2);
    if (!ok) continue;
    if (i == 0) first = ms;
    if (ms < best) best = ms, best_i = i;
  }
  if (best_i >= 0) {
    report_flops((name + " heuristic #0").c_str(), shape, flops, first, 30);
    report_flops((name + " best of " + std::to_string(nres) + " (#" + std::to_string(best_i) + ")").c_str(), shape,
                 flops, best, 30);
  } else {
    std::printf("  %s: no cuBLASLt algorithm (status %d, %d candidates)\n", name.c_str(), int(hs), nres);
  }
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(lc);
  cublasLtMatmulDescDestroy(desc);
}

// Top-k ids [n, k]: balanced (expert (t * k + s) % e: every expert exactly n * k / e rows) or skewed (tokens
// t < hot_tokens have expert 0 in their top-k, every other slot uniform over experts 1..e-1, distinct per token).
Tensor bench_topk(int64_t n, int64_t e, int64_t k, bool skewed, int64_t hot_tokens) {
  Tensor t = Tensor::empty({n, k}, DType::I32);
  std::mt19937 rng(5);
  std::vector<int32_t> ids(static_cast<size_t>(e));
  std::iota(ids.begin(), ids.end(), 0);
  for (int64_t r = 0; r < n; ++r) {
    int32_t* row = t.data<int32_t>() + r * k;
    if (!skewed) {
      for (int64_t s = 0; s < k; ++s) row[s] = static_cast<int32_t>((r * k + s) % e);
      continue;
    }
    int64_t s0 = 0;
    if (r < hot_tokens) row[s0++] = 0;
    for (int64_t s = 1; s <= k; ++s) std::swap(ids[s], ids[std::uniform_int_distribution<int64_t>(s, e - 1)(rng)]);
    for (int64_t s = 1; s0 < k; ++s) row[s0++] = ids[s];
  }
  return t;
}

// Persistent grouped GEMM vs the cuBLAS grouped API (dW: its per-expert fallback) and Auto, per product.
void persistent_section(int64_t n, int64_t e, int64_t k, int64_t h, int64_t inner) {
  auto& ctx = cu::default_context();
  const int64_t rows = n * k;
  std::printf("\npersistent grouped GEMM vs cuBLAS (bf16 in, fp32 accumulate; dW fp32 +=), %lld rows over %lld experts\n",
              (long long)rows, (long long)e);
  for (bool skewed : {false, true}) {
    const int64_t hot = n * 3600 / 4096;
    Tensor idx = cu::to_device(bench_topk(n, e, k, skewed, hot));
    Tensor off = cu::empty({e + 1}, DType::I32), perm = cu::empty({rows}, DType::I32), inv = cu::empty({rows}, DType::I32);
    std::vector<int64_t> counts;
    cu::moe_dispatch_plan(idx, e, off, perm, inv, &counts);
    int64_t mx = 0, nz = 0;
    for (int64_t c : counts) mx = std::max(mx, c), nz += c > 0;
    std::printf("%s routing: max %lld rows (expert 0 %lld), mean %lld, %lld experts with rows\n",
                skewed ? "skewed" : "balanced", (long long)mx, (long long)counts[0], (long long)(rows / e), (long long)nz);
    struct Proj {
      const char* name;
      int64_t kd, nout;
    };
    for (const Proj& p : {Proj{"gate_up", h, 2 * inner}, Proj{"down", inner, h}}) {
      Tensor xin = dev({rows, p.kd}, DType::BF16, 40), w = dev({e, p.nout, p.kd}, DType::BF16, 41, -0.03f, 0.03f);
      Tensor yout = cu::empty({rows, p.nout}, DType::BF16), dyo = dev({rows, p.nout}, DType::BF16, 42);
      Tensor dxin = cu::empty({rows, p.kd}, DType::BF16), dw = dev({e, p.nout, p.kd}, DType::F32, 43, -1e-3f, 1e-3f);
      Tensor frozen;
      const double fl = 2.0 * rows * p.kd * p.nout;
      const std::string sh = std::string(skewed ? "skew " : "bal ") + "K=" + std::to_string(p.kd) +
                             " Nout=" + std::to_string(p.nout);
      struct Impl {
        cu::GroupedGemm impl;
        const char* name;
        double pred;
      };
      // Predictions (before the first run): persistent ~55% of the ceiling whatever the routing (mma.sync, 128x128
      // tiles, 4 stages); the grouped API ~30% under the skew (docs/performance.md W2) and ~60% balanced.
      const Impl impls[] = {{cu::GroupedGemm::Persistent, "persistent", 55},
                            {cu::GroupedGemm::Grouped, "cuBLAS grouped", skewed ? 30.0 : 60.0},
                            {cu::GroupedGemm::Auto, "auto", skewed ? 30.0 : 60.0}};
      for (const Impl& im : impls) {
        const cu::GroupedLinearOptions opt{im.impl};
        const std::string tag = std::string(p.name) + " " + im.name;
        report_flops((tag + " fwd").c_str(), sh, fl,
                     median_ms([&] { cu::grouped_linear_fwd(xin, w, off, yout, &counts, ctx, opt); }), im.pred);
        report_flops((tag + " dx").c_str(), sh, fl, median_ms([&] {
                       cu::grouped_linear_bwd(xin, w, off, dyo, &dxin, frozen, &counts, ctx, opt);
                     }),
                     im.pred);
        report_flops((tag + " dW").c_str(), sh, fl, median_ms([&] {
                       cu::grouped_linear_bwd(xin, w, off, dyo, nullptr, dw, &counts, ctx, opt);
                     }),
                     im.impl == cu::GroupedGemm::Persistent ? 45.0 : 20.0);
      }
    }
  }
}

}  // namespace

int moe_bench_main(int argc, char** argv) {
  int64_t n = 4096;
  bool skew = false, persistent_only = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--tokens") == 0 && i + 1 < argc) n = std::atoll(argv[++i]);
    if (std::strcmp(argv[i], "--skew") == 0) skew = true;
    if (std::strcmp(argv[i], "--persistent") == 0) persistent_only = true;
  }
  const int64_t e = 128, k = 8, h = 2048, inner = 768, rows = n * k;
  try {
    auto& ctx = cu::default_context();
    const auto& pr = ctx.props();
    std::printf("moe bench: device %s, %d SMs; N=%lld E=%lld k=%lld H=%lld I=%lld, %s routing\n", pr.name,
                pr.multiProcessorCount, (long long)n, (long long)e, (long long)k, (long long)h, (long long)inner,
                skew ? "skewed" : "uniform");
    g_gemm_peak = am::bench::gemm_ceiling_tflops();
    g_bw_peak = am::bench::copy_bandwidth_gbs(dev({am::bench::kCopyElems}, DType::F32, 4));
    if (persistent_only) {
      persistent_section(n, e, k, h, inner);
      return 0;
    }

    // Routing: logits drawn on the host so that --skew can shape expert popularity.
    std::mt19937 rng(1);
    Tensor lh = Tensor::empty({n, e}, DType::F32);
    std::normal_distribution<float> nd(0.f, 1.f);
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = 0; j < e; ++j) lh.f32()[t * e + j] = nd(rng) + (skew ? -0.05f * static_cast<float>(j) : 0.f);
    Tensor logits = cu::to_device(lh.to(DType::BF16));
    Tensor probs = cu::empty({n, e}, DType::F32), idx = cu::empty({n, k}, DType::I32), tw = cu::empty({n, k}, DType::F32);
    Tensor off = cu::empty({e + 1}, DType::I32), perm = cu::empty({rows}, DType::I32), inv = cu::empty({rows}, DType::I32);
    std::vector<int64_t> counts;
    cu::moe_router_fwd(logits, k, true, probs, idx, tw);
    cu::moe_dispatch_plan(idx, e, off, perm, inv, &counts);
    const int64_t cmin = *std::min_element(counts.begin(), counts.end()),
                  cmax = *std::max_element(counts.begin(), counts.end());
    std::printf("expert rows: min %lld, mean %lld, max %lld\n", (long long)cmin, (long long)(rows / e), (long long)cmax);

    const std::string nh = "[" + std::to_string(n) + ", " + std::to_string(h) + "]";
    const std::string rh = "[" + std::to_string(rows) + ", " + std::to_string(h) + "]";
    std::printf("\nrouter and dispatch\n");
    {
      const double ms = median_ms([&] { cu::moe_router_fwd(logits, k, true, probs, idx, tw); });
      report_bytes("router fwd (softmax + top-k)", "[" + std::to_string(n) + ", 128]", n * e * (2.0 + 4.0) + n * k * 8.0,
                   ms, 30);
      Tensor dtw = dev({n, k}, DType::F32, 5), dpe = dev({n, e}, DType::F32, 6, -1e-3f, 1e-3f);
      Tensor dl = cu::empty({n, e}, DType::BF16);
      const double ms2 = median_ms([&] { cu::moe_router_bwd(probs, idx, tw, true, dtw, &dpe, dl); });
      report_bytes("router bwd (+ aux dprobs)", "[" + std::to_string(n) + ", 128]", n * e * (4.0 + 4.0 + 2.0) + n * k * 12.0,
                   ms2, 30);
      const double ms3 = median_ms([&] { cu::moe_dispatch_plan(idx, e, off, perm, inv, nullptr); });
      report_time("dispatch plan (device only)", "N*k = " + std::to_string(rows), ms3);
      const double ms4 = median_ms([&] { cu::moe_dispatch_plan(idx, e, off, perm, inv, &counts); });
      report_time("dispatch plan + host counts (sync)", "N*k = " + std::to_string(rows), ms4);
      // The router aux loss on the device (moe_aux.cu): one layer's statistics (counts into two buffers + prob
      // sums), then the loss and dprobs from the sums (48 layers). Every token real.
      Tensor seg = cu::to_device(Tensor::zeros({n}, DType::I32));
      Tensor cnt = cu::to_device(Tensor::zeros({e}, DType::I32)), f = cu::to_device(Tensor::zeros({e}, DType::I32));
      Tensor ps = cu::to_device(Tensor::zeros({e}, DType::F32)), aux = cu::empty({1}, DType::F32);
      Tensor dpr = cu::empty({n, e}, DType::F32);
      const double ms5 = median_ms([&] { cu::moe_routing_stats(idx, probs, seg, &cnt, &ps, &f); });
      report_bytes("router stats (counts + psum)", "[" + std::to_string(n) + ", 128]", n * e * 4.0 + n * k * 4.0 + n * 4.0,
                   ms5, 20);
      const double ms6 = median_ms([&] { cu::moe_aux_loss(f, ps, seg, 48, 1e-3f, aux, &dpr); });
      report_bytes("aux loss + dprobs", "[" + std::to_string(n) + ", 128]", n * e * 4.0 + n * 4.0, ms6, 30);
    }

    std::printf("\npermutation (bf16 rows; GB/s of rows read + written)\n");
    Tensor x = dev({n, h}, DType::BF16, 7), xg = cu::empty({rows, h}, DType::BF16);
    Tensor dxg = dev({rows, h}, DType::BF16, 8), dx = cu::empty({n, h}, DType::BF16);
    const double row_bytes = 2.0 * h;
    report_bytes("gather x -> xg", rh, 2.0 * rows * row_bytes, median_ms([&] { cu::moe_gather(x, perm, k, xg); }), 75);
    report_bytes("gather bwd (sum of k rows)", nh, (rows + n) * row_bytes,
                 median_ms([&] { cu::moe_gather_bwd(dxg, inv, k, dx); }), 70);
    Tensor yg = dev({rows, h}, DType::BF16, 9), y = cu::empty({n, h}, DType::BF16);
    report_bytes("combine (weighted sum of k rows)", nh, (rows + n) * row_bytes + n * k * 8.0,
                 median_ms([&] { cu::moe_combine(yg, inv, tw, y); }), 70);
    Tensor dy = dev({n, h}, DType::BF16, 10), dyg = cu::empty({rows, h}, DType::BF16), dtw = cu::empty({n, k}, DType::F32);
    report_bytes("combine bwd (dyg + dtopk_w)", rh, (2.0 * rows + n) * row_bytes,
                 median_ms([&] { cu::moe_combine_bwd(yg, inv, tw, dy, dyg, dtw); }), 65);

    std::printf("\nSwiGLU on [gate | up]\n");
    Tensor gu = dev({rows, 2 * inner}, DType::BF16, 11, -3.f, 3.f), hh = cu::empty({rows, inner}, DType::BF16);
    Tensor dh = dev({rows, inner}, DType::BF16, 12), dgu = cu::empty({rows, 2 * inner}, DType::BF16);
    const std::string gush = "[" + std::to_string(rows) + ", 2 x " + std::to_string(inner) + "]";
    report_bytes("swiglu_fused fwd", gush, rows * inner * 2.0 * 3, median_ms([&] { cu::swiglu_fused_fwd(gu, hh); }),
                 85);
    report_bytes("swiglu_fused bwd", gush, rows * inner * 2.0 * 5,
                 median_ms([&] { cu::swiglu_fused_bwd(gu, dh, dgu); }), 85);

    std::printf("\ngrouped GEMMs (bf16 in, fp32 accumulate; dW fp32 +=), %lld rows over %lld experts\n",
                (long long)rows, (long long)e);
    struct Proj {
      const char* name;
      int64_t kd, nout;
      double pred_grouped, pred_loop;
    };
    const Proj projs[] = {{"gate_up", h, 2 * inner, 65, 35}, {"down", inner, h, 60, 30}};
    const int64_t mpad = [&] {
      const int64_t mx = *std::max_element(counts.begin(), counts.end());
      const int64_t gr = mx >= 64 ? 64 : 8;
      return (mx + gr - 1) / gr * gr;
    }();
    // A capped scratch (Padded with pad_rows; not used by Auto): the count that at most E/8 experts exceed, rounded
    // up to 64; covered = rows under the cap, the rest runs as overflow on the grouped / per-expert path.
    std::vector<int64_t> sorted = counts;
    std::sort(sorted.begin(), sorted.end());
    const int64_t q = sorted[static_cast<size_t>(e - 1 - e / 8)], cap = (q + 63) / 64 * 64;
    int64_t covered = 0;
    for (int64_t c : counts) covered += std::min(c, cap);
    std::printf("padded path: Mpad = %lld (E * Mpad = %lld rows for %lld: %.2fx; Auto pads below 1.5x); cap %lld covers "
                "%lld rows (E * cap %.2fx of them)\n",
                (long long)mpad, (long long)(e * mpad), (long long)rows, double(e * mpad) / rows, (long long)cap,
                (long long)covered, double(e * cap) / double(std::max<int64_t>(covered, 1)));
    for (const Proj& p : projs) {
      Tensor xin = dev({rows, p.kd}, DType::BF16, 20), w = dev({e, p.nout, p.kd}, DType::BF16, 21, -0.03f, 0.03f);
      Tensor yout = cu::empty({rows, p.nout}, DType::BF16), dyo = dev({rows, p.nout}, DType::BF16, 22);
      Tensor dxin = cu::empty({rows, p.kd}, DType::BF16), dw = dev({e, p.nout, p.kd}, DType::F32, 23, -1e-3f, 1e-3f);
      const double fl = 2.0 * rows * p.kd * p.nout;
      const std::string sh = "K=" + std::to_string(p.kd) + " Nout=" + std::to_string(p.nout);
      struct Impl {
        cu::GroupedGemm impl;
        std::string name;
        double pred, pred_dw;
        int64_t pad_rows = 0;
      };
      // Padded predicted (before its first run): the strided-batched GEMM at E x Mpad rows (~1.25x the FLOPs at
      // ~80%) plus the padding copies (~0.1 ms at gate_up) -> ~55% for y and dx; dW ~ balanced strided-batched
      // dW (20%) less the copies -> 17%.
      const Impl impls[] = {{cu::GroupedGemm::Grouped, "grouped", p.pred_grouped, p.pred_loop},
                            {cu::GroupedGemm::PerExpert, "per-expert", p.pred_loop, p.pred_loop},
                            {cu::GroupedGemm::Padded, "padded", 55, 17},
                            {cu::GroupedGemm::Padded, "padded cap " + std::to_string(cap), 45, 17, cap},
                            {cu::GroupedGemm::Auto, "auto", 55, 17},
                            {cu::GroupedGemm::Persistent, "persistent", 55, 45}};
      for (const Impl& im : impls) {
        const cu::GroupedLinearOptions opt{im.impl, im.pad_rows};
        const std::string tag = std::string(p.name) + " " + im.name;
        report_flops((tag + " fwd").c_str(), sh, fl,
                     median_ms([&] { cu::grouped_linear_fwd(xin, w, off, yout, &counts, ctx, opt); }), im.pred);
        const double both = median_ms([&] { cu::grouped_linear_bwd(xin, w, off, dyo, &dxin, dw, &counts, ctx, opt); });
        const double dwo = median_ms([&] { cu::grouped_linear_bwd(xin, w, off, dyo, nullptr, dw, &counts, ctx, opt); });
        report_flops((tag + " dx+dw").c_str(), sh, 2 * fl, both, (im.pred + im.pred_dw) / 2);
        report_flops((tag + " dw only").c_str(), sh, fl, dwo, im.pred_dw);
        report_flops((tag + " dx (dx+dw - dw)").c_str(), sh, fl, std::max(both - dwo, 1e-6), im.pred);
      }
      // The same FLOPs as one dense GEMM (all rows against expert 0's weights): the no-grouping reference.
      cu::GemmDesc g;
      g.trans_a = true;
      g.m = p.nout;
      g.n = rows;
      g.k = p.kd;
      g.a = w.raw();
      g.lda = p.kd;
      g.b = xin.raw();
      g.ldb = p.kd;
      g.d = yout.raw();
      g.ldd = p.nout;
      report_flops((std::string(p.name) + " dense equivalent fwd").c_str(), sh, fl,
                   median_ms([&] { cu::gemm(ctx, g); }), 85);
      // References: the strided-batched GEMMs alone, at the padded path's shape (E x Mpad rows; the difference to
      // the padded rows above is the padding copies and the scratch) and perfectly balanced (E x rows / E).
      {
        cublasHandle_t hb = nullptr;
        AM_CUDA_CHECK(cublasCreate(&hb));
        AM_CUDA_CHECK(cublasSetStream(hb, ctx.stream()));
        AM_CUDA_CHECK(cublasSetWorkspace(hb, ctx.workspace(), ctx.workspace_bytes()));
        const float one = 1.f, zero = 0.f;
        const int kd = static_cast<int>(p.kd), no = static_cast<int>(p.nout);
        Tensor xs = dev({e, mpad, p.kd}, DType::BF16, 24), ys = cu::empty({e, mpad, p.nout}, DType::BF16);
        Tensor dys = dev({e, mpad, p.nout}, DType::BF16, 25);
        for (int cap : {static_cast<int>(mpad), static_cast<int>(rows / e)}) {
          const std::string tag = std::string(p.name) + " strided-batched " + std::to_string(e) + "x" +
                                  std::to_string(cap);
          // FLOPs counted for the useful rows only (rows), so the percentage compares with the paths above.
          report_flops((tag + " fwd").c_str(), sh, fl, median_ms([&] {
                         AM_CUDA_CHECK(cublasGemmStridedBatchedEx(
                             hb, CUBLAS_OP_T, CUBLAS_OP_N, no, cap, kd, &one, w.raw(), CUDA_R_16BF, kd,
                             int64_t(no) * kd, xs.raw(), CUDA_R_16BF, kd, int64_t(cap) * kd, &zero, ys.raw(),
                             CUDA_R_16BF, no, int64_t(cap) * no, static_cast<int>(e), CUBLAS_COMPUTE_32F,
                             CUBLAS_GEMM_DEFAULT));
                       }),
                       p.pred_grouped);
          report_flops((tag + " dx").c_str(), sh, fl, median_ms([&] {
                         AM_CUDA_CHECK(cublasGemmStridedBatchedEx(
                             hb, CUBLAS_OP_N, CUBLAS_OP_N, kd, cap, no, &one, w.raw(), CUDA_R_16BF, kd,
                             int64_t(no) * kd, dys.raw(), CUDA_R_16BF, no, int64_t(cap) * no, &zero, xs.raw(),
                             CUDA_R_16BF, kd, int64_t(cap) * kd, static_cast<int>(e), CUBLAS_COMPUTE_32F,
                             CUBLAS_GEMM_DEFAULT));
                       }),
                       p.pred_grouped);
          report_flops((tag + " dw").c_str(), sh, fl, median_ms([&] {
                         AM_CUDA_CHECK(cublasGemmStridedBatchedEx(
                             hb, CUBLAS_OP_N, CUBLAS_OP_T, kd, no, cap, &one, xs.raw(), CUDA_R_16BF, kd,
                             int64_t(cap) * kd, dys.raw(), CUDA_R_16BF, no, int64_t(cap) * no, &one, dw.raw(),
                             CUDA_R_32F, kd, int64_t(no) * kd, static_cast<int>(e), CUBLAS_COMPUTE_32F,
                             CUBLAS_GEMM_DEFAULT));
                       }),
                       p.pred_grouped);
        }
        // cuBLASLt on the padded dW product (batched layouts): its heuristic's first choice and the best of its
        // first 16 candidates, timed here (is cuBLAS's pick the limit of the fp32 += product?).
        lt_dw_sweep(std::string(p.name) + " dw cuBLASLt", sh, fl, kd, no, static_cast<int>(mpad),
                    static_cast<int>(e), xs.raw(), dys.raw(), dw.raw());
        cublasDestroy(hb);
      }
    }
    std::printf("\nwhole MoE layer (no router GEMM): fwd = gather, gate_up, swiglu, down, combine\n");
    {
      Tensor wgu = dev({e, 2 * inner, h}, DType::BF16, 30, -0.03f, 0.03f), wd = dev({e, h, inner}, DType::BF16, 31, -0.03f, 0.03f);
      Tensor dwgu = dev({e, 2 * inner, h}, DType::F32, 32, 0.f, 0.f), dwd = dev({e, h, inner}, DType::F32, 33, 0.f, 0.f);
      for (cu::GroupedGemm impl : {cu::GroupedGemm::Grouped, cu::GroupedGemm::Auto, cu::GroupedGemm::Persistent}) {
        const cu::GroupedLinearOptions opt{impl};
        auto fwd = [&] {
          cu::moe_gather(x, perm, k, xg);
          cu::grouped_linear_fwd(xg, wgu, off, gu, &counts, ctx, opt);
          cu::swiglu_fused_fwd(gu, hh);
          cu::grouped_linear_fwd(hh, wd, off, yg, &counts, ctx, opt);
          cu::moe_combine(yg, inv, tw, y);
        };
        auto bwd = [&] {
          cu::moe_combine_bwd(yg, inv, tw, dy, dyg, dtw);
          cu::grouped_linear_bwd(hh, wd, off, dyg, &dh, dwd, &counts, ctx, opt);
          cu::swiglu_fused_bwd(gu, dh, dgu);
          cu::grouped_linear_bwd(xg, wgu, off, dgu, &dxg, dwgu, &counts, ctx, opt);
          cu::moe_gather_bwd(dxg, inv, k, dx);
        };
        const double fl = 2.0 * rows * h * 3 * inner;
        const std::string nm = impl == cu::GroupedGemm::Auto         ? "auto"
                               : impl == cu::GroupedGemm::Persistent ? "persistent (AM_MOE_GEMM=persistent)"
                                                                     : "grouped (old Auto: grouped y/dx, per-expert dW)";
        report_flops(("layer fwd, " + nm).c_str(), "W2", fl, median_ms(fwd), 55);
        report_flops(("layer bwd, " + nm).c_str(), "W2", 2 * fl, median_ms(bwd), 55);
      }
    }
    persistent_section(n, e, k, h, inner);
  } catch (const std::exception& ex) {
    std::fprintf(stderr, "moe bench failed: %s\n", ex.what());
    return 1;
  }
  return 0;
}
