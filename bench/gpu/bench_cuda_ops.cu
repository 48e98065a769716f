// Micro-benchmark of the CUDA backend ops at the W1 shapes (BENCH.md: Llama-3.2-1B, 4 x 2048 tokens):
// tokens 8192, hidden 2048, intermediate 8192, vocab 128256, 32 heads / 8 KV heads / head_dim 64.
//
// Method (METHOD.md): the two ceilings are measured first in the same run (a 8192^3 bf16 cuBLASLt GEMM,
// and a 2 GiB device-to-device copy counting bytes read + written); every op is timed with CUDA events
// after warm-up, median of several repetitions, on random (never zero) data. Each row prints the achieved
// TFLOP/s or GB/s, the percentage of the measured ceiling, and the percentage predicted before the run.
//
//   am_gpu_microbench [--quick]     (--quick: fewer repetitions)
//   am_gpu_microbench NAME [args]   (a benchmark of bench_registry.h: attention, moe, ...)
//   am_gpu_microbench --help        (lists them; needs no GPU)
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/tuning.h"
#include "bench_registry.h"
#include "bench_util.cuh"
#include "core/tensor.h"

using am::DType;
using am::Tensor;
namespace cu = am::cuda;

namespace {

// Inputs: bench_util.cuh's fmix64 fill; token ids from the same hash.
constexpr am::bench::Filler dev = am::bench::filled_fmix64;
__global__ void rand_ids_kernel(int32_t* p, int64_t n, uint64_t seed, int32_t vocab) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    p[i] = static_cast<int32_t>(am::bench::hash_fmix64(i, seed) % vocab);
}

int g_reps = 20;

// bench_util.cuh's median_ms (3 warm-up runs), by default over g_reps runs (--quick: 5).
double time_ms(const std::function<void()>& fn, int reps = -1) {
  return am::bench::median_ms(fn, reps < 0 ? g_reps : reps);
}

double g_gemm_peak = 0, g_bw_peak = 0;  // TFLOP/s, GB/s

struct Row {
  std::string name, shape;
  double ms, rate;  // TFLOP/s or GB/s
  bool flops;
  double pct, predicted;
};
std::vector<Row> g_rows;

void report_flops(const std::string& name, const std::string& shape, double flops, double ms, double predicted) {
  const double tf = flops / (ms * 1e-3) / 1e12;
  g_rows.push_back({name, shape, ms, tf, true, 100.0 * tf / g_gemm_peak, predicted});
  std::printf("  %-28s %-30s %9.3f ms %8.1f TFLOP/s %6.1f%% (pred %3.0f%%)\n", name.c_str(), shape.c_str(), ms, tf,
              100.0 * tf / g_gemm_peak, predicted);
  std::fflush(stdout);
}
void report_bytes(const std::string& name, const std::string& shape, double bytes, double ms, double predicted) {
  const double gbs = bytes / (ms * 1e-3) / 1e9;
  g_rows.push_back({name, shape, ms, gbs, false, 100.0 * gbs / g_bw_peak, predicted});
  std::printf("  %-28s %-30s %9.3f ms %8.1f GB/s    %6.1f%% (pred %3.0f%%)\n", name.c_str(), shape.c_str(), ms, gbs,
              100.0 * gbs / g_bw_peak, predicted);
  std::fflush(stdout);
}

std::string dims(std::initializer_list<int64_t> d) {
  std::string s = "[";
  bool first = true;
  for (int64_t v : d) {
    s += (first ? "" : ", ") + std::to_string(v);
    first = false;
  }
  return s + "]";
}

}  // namespace

int main(int argc, char** argv) {
  // `am_gpu_microbench NAME ...` runs the benchmark registered as NAME in bench_registry.h (argv[0] = NAME).
  if (argc > 1)
    for (const GpuBench& b : kGpuBenches)
      if (std::strcmp(argv[1], b.name) == 0) return b.run(argc - 1, argv + 1);
  if (argc > 1 && (std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0)) {
    std::printf("usage: am_gpu_microbench [--quick]     core CUDA ops at the W1 shapes\n"
                "       am_gpu_microbench NAME [args]   a registered benchmark, NAME one of:");
    for (const GpuBench& b : kGpuBenches) std::printf(" %s", b.name);
    std::printf("\n");
    return 0;
  }
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], "--quick") == 0) g_reps = 5;
  try {
    auto& ctx = cu::default_context();
    const auto& pr = ctx.props();
    std::printf("device: %s, %d SMs, %.1f GiB, cc %d.%d\n", pr.name, pr.multiProcessorCount,
                pr.totalGlobalMem / double(1ull << 30), pr.major, pr.minor);

    // ---------------- ceilings ----------------
    g_gemm_peak = am::bench::gemm_ceiling_tflops(g_reps);
    g_bw_peak = am::bench::copy_bandwidth_gbs(dev({am::bench::kCopyElems}, DType::F32, 4), g_reps);

    const int64_t N = 8192, H = 2048, I = 8192, V = 128256, NH = 32, NKV = 8, HD = 64;

    // ---------------- linears: forward, dx, dw ----------------
    std::printf("\nlinear layers (x [N, K] bf16, w [M, K] bf16; dw fp32 +=), N = %lld\n", (long long)N);
    struct Lin {
      const char* name;
      int64_t k, m;
      double pred_fwd, pred_dx, pred_dw;
    };
    const Lin lins[] = {
        {"q_proj/o_proj", H, H, 85, 85, 80},     {"k_proj/v_proj", H, NKV * HD, 65, 65, 60},
        {"qkv fused", H, H + 2 * NKV * HD, 85, 85, 80}, {"gate/up_proj", H, I, 90, 90, 85},
        {"gate_up fused", H, 2 * I, 90, 90, 85}, {"down_proj", I, H, 90, 90, 85},
    };
    for (const Lin& l : lins) {
      Tensor x = dev({N, l.k}, DType::BF16, 10), w = dev({l.m, l.k}, DType::BF16, 11, -0.05f, 0.05f);
      Tensor y = cu::empty({N, l.m}, DType::BF16), dy = dev({N, l.m}, DType::BF16, 12);
      Tensor dx = cu::empty({N, l.k}, DType::BF16), dw = dev({l.m, l.k}, DType::F32, 13, -1e-3f, 1e-3f);
      const double fl = 2.0 * N * l.k * l.m;
      const std::string sh = "K=" + std::to_string(l.k) + " M=" + std::to_string(l.m);
      report_flops(std::string(l.name) + " fwd", sh, fl, time_ms([&] { cu::linear_fwd(x, w, nullptr, y); }), l.pred_fwd);
      cu::GemmDesc g;  // dx = dy w, as linear_bwd issues it
      g.m = l.k;
      g.n = N;
      g.k = l.m;
      g.a = w.raw();
      g.lda = l.k;
      g.b = dy.raw();
      g.ldb = l.m;
      g.d = dx.raw();
      g.ldd = l.k;
      report_flops(std::string(l.name) + " bwd dx", sh, fl, time_ms([&] { cu::gemm(ctx, g); }), l.pred_dx);
      report_flops(std::string(l.name) + " bwd dw", sh, fl,
                   time_ms([&] { cu::linear_bwd(x, w, dy, nullptr, dw, nullptr); }), l.pred_dw);
    }
    {
      Tensor x = dev({N, H}, DType::BF16, 14), w = dev({H, H}, DType::BF16, 15, -0.05f, 0.05f);
      Tensor b = dev({H}, DType::BF16, 16), y = cu::empty({N, H}, DType::BF16);
      report_flops("q_proj fwd + bias epilogue", "K=2048 M=2048", 2.0 * N * H * H,
                   time_ms([&] { cu::linear_fwd(x, w, &b, y); }), 85);
    }

    // ---------------- memory-bound ops ----------------
    std::printf("\nmemory-bound ops (bf16 activations)\n");
    {
      Tensor x = dev({N, H}, DType::BF16, 20, -2.f, 2.f), w = dev({H}, DType::BF16, 21, 0.5f, 1.5f);
      Tensor y = cu::empty({N, H}, DType::BF16), r = cu::empty({N}, DType::F32);
      Tensor dy = dev({N, H}, DType::BF16, 22), dx = cu::empty({N, H}, DType::BF16);
      Tensor dw = dev({H}, DType::F32, 23);
      cu::rmsnorm_fwd(x, w, 1e-5f, y, r);
      const double e = double(N) * H * 2;
      report_bytes("rmsnorm fwd", dims({N, H}), 2 * e + N * 4,
                   time_ms([&] { cu::rmsnorm_fwd(x, w, 1e-5f, y, r); }), 80);
      report_bytes("rmsnorm bwd", dims({N, H}), 3 * e + N * 4,
                   time_ms([&] { cu::rmsnorm_bwd(x, w, r, dy, dx, dw); }), 70);
      Tensor frozen;  // LoRA base weight: no dw (no partials, no column reduction)
      report_bytes("rmsnorm bwd (frozen w, dx only)", dims({N, H}), 3 * e + N * 4,
                   time_ms([&] { cu::rmsnorm_bwd(x, w, r, dy, dx, frozen); }), 75);
      // Launch-shape sweep (numbered variants; the defaults in tuning.h come from here).
      struct Res {
        double ms;
        std::string cfg;
      };
      std::vector<Res> fwd_res, bwd_res;
      for (int th : {32, 64, 128, 256, 512}) {
        cu::RmsNormTuning t = cu::default_rmsnorm_tuning();
        t.fwd_threads = th;
        fwd_res.push_back({time_ms([&] { cu::rmsnorm_fwd_tuned(x, w, 1e-5f, y, r, t, ctx); }),
                           "fwd_threads=" + std::to_string(th)});
      }
      for (int th : {64, 128, 256})
        for (int bps : {2, 4, 8})
          for (int lanes : {8, 32})
            for (bool pf : {false, true}) {
              cu::RmsNormTuning t = cu::default_rmsnorm_tuning();
              t.bwd_threads = th;
              t.bwd_blocks_per_sm = bps;
              t.reduce_lanes = lanes;
              t.prefetch = pf;
              bwd_res.push_back({time_ms([&] { cu::rmsnorm_bwd_tuned(x, w, r, dy, dx, dw, t, ctx); }),
                                 "bwd_threads=" + std::to_string(th) + " blocks_per_sm=" + std::to_string(bps) +
                                     " lanes=" + std::to_string(lanes) + " prefetch=" + std::to_string(pf)});
            }
      auto by_ms = [](const Res& a, const Res& b) { return a.ms < b.ms; };
      std::sort(fwd_res.begin(), fwd_res.end(), by_ms);
      std::sort(bwd_res.begin(), bwd_res.end(), by_ms);
      std::printf("  rmsnorm sweep, forward (best first):");
      for (auto& q : fwd_res) std::printf(" [%s %.1f us]", q.cfg.c_str(), q.ms * 1e3);
      std::printf("\n  rmsnorm sweep, backward (best 8 of %zu, then worst):\n", bwd_res.size());
      for (size_t i = 0; i < bwd_res.size(); ++i)
        if (i < 8 || i + 1 == bwd_res.size())
          std::printf("    %-60s %.1f us = %.1f%% of copy\n", bwd_res[i].cfg.c_str(), bwd_res[i].ms * 1e3,
                      100.0 * (3 * e + N * 4) / (bwd_res[i].ms * 1e-3) / 1e9 / g_bw_peak);
    }
    {
      Tensor q = dev({N, NH, HD}, DType::BF16, 30), k = dev({N, NKV, HD}, DType::BF16, 31);
      Tensor cs = dev({N, HD / 2}, DType::F32, 32), sn = dev({N, HD / 2}, DType::F32, 33);
      const double bytes = 2.0 * (q.nbytes() + k.nbytes()) + 2.0 * cs.nbytes();
      report_bytes("rope fwd (q and k)", dims({N, NH + NKV, HD}), bytes, time_ms([&] {
                     cu::rope_fwd_(q, cs, sn);
                     cu::rope_fwd_(k, cs, sn);
                   }),
                   70);
      report_bytes("rope bwd (dq and dk)", dims({N, NH + NKV, HD}), bytes, time_ms([&] {
                     cu::rope_bwd_(q, cs, sn);
                     cu::rope_bwd_(k, cs, sn);
                   }),
                   70);
    }
    {
      Tensor g = dev({N, I}, DType::BF16, 40, -4.f, 4.f), u = dev({N, I}, DType::BF16, 41);
      Tensor h = cu::empty({N, I}, DType::BF16), dh = dev({N, I}, DType::BF16, 42);
      Tensor dg = cu::empty({N, I}, DType::BF16), du = cu::empty({N, I}, DType::BF16);
      const double e = double(N) * I * 2;
      report_bytes("swiglu fwd", dims({N, I}), 3 * e, time_ms([&] { cu::swiglu_fwd(g, u, h); }), 85);
      report_bytes("swiglu bwd", dims({N, I}), 5 * e, time_ms([&] { cu::swiglu_bwd(g, u, dh, dg, du); }), 85);
      report_bytes("geglu fwd (gemma)", dims({N, I}), 3 * e, time_ms([&] { cu::geglu_fwd(g, u, h); }), 85);
      report_bytes("geglu bwd (gemma)", dims({N, I}), 5 * e, time_ms([&] { cu::geglu_bwd(g, u, dh, dg, du); }), 85);
      report_bytes("dropout_ p=0.1 (in place)", dims({N, I}), 2 * e, time_ms([&] { cu::dropout_(dg, 0.1f, 1234); }),
                   85);
    }
    {
      Tensor ids = cu::empty({N}, DType::I32);
      rand_ids_kernel<<<64, 256, 0, ctx.stream()>>>(ids.data<int32_t>(), N, 50, static_cast<int32_t>(V));
      AM_CUDA_CHECK_LAUNCH();
      Tensor w = dev({V, H}, DType::BF16, 51), out = cu::empty({N, H}, DType::BF16);
      Tensor dout = dev({N, H}, DType::BF16, 52), dw = dev({V, H}, DType::F32, 53, -1e-3f, 1e-3f);
      report_bytes("embedding fwd", dims({N, H}), 2.0 * N * H * 2 + N * 4,
                   time_ms([&] { cu::embedding_fwd(ids, w, out); }), 70);
      // bytes: read dout (bf16) + read-modify-write of the touched fp32 rows
      report_bytes("embedding bwd (fp32 atomics)", dims({N, H}), N * H * 2.0 + N * H * 8.0,
                   time_ms([&] { cu::embedding_bwd(ids, dout, dw); }), 40);
      ctx.check_device_errors();
    }

    // ---------------- cross-entropy and fused LM head ----------------
    std::printf("\ncross-entropy / fused LM head (V = %lld)\n", (long long)V);
    {
      const int64_t rows = 2048;
      Tensor logits = dev({rows, V}, DType::BF16, 60, -4.f, 4.f), tg = cu::empty({rows}, DType::I32);
      rand_ids_kernel<<<16, 256, 0, ctx.stream()>>>(tg.data<int32_t>(), rows, 61, static_cast<int32_t>(V));
      AM_CUDA_CHECK_LAUNCH();
      Tensor g = cu::empty({rows, V}, DType::BF16);
      double* acc = cu::alloc_device_scalar();
      report_bytes("cross_entropy chunk (fwd+bwd)", dims({rows, V}), 3.0 * logits.nbytes(),
                   time_ms([&] { cu::cross_entropy_fwd_bwd_async(logits, tg, 1.f / N, &g, acc); }), 60);
      cu::free_device_scalar(acc);
    }
    {
      Tensor x = dev({N, H}, DType::BF16, 70), w = dev({V, H}, DType::BF16, 71, -0.05f, 0.05f);
      Tensor tg = cu::empty({N}, DType::I32);
      rand_ids_kernel<<<64, 256, 0, ctx.stream()>>>(tg.data<int32_t>(), N, 72, static_cast<int32_t>(V));
      AM_CUDA_CHECK_LAUNCH();
      Tensor dx = cu::empty({N, H}, DType::BF16), dw = dev({V, H}, DType::F32, 73, -1e-3f, 1e-3f);
      double* acc = cu::alloc_device_scalar();
      const double fl = 3 * 2.0 * N * H * V;
      report_flops("lm_head + CE fused (3 GEMMs)", dims({N, H}) + " V", fl,
                   time_ms([&] { cu::lm_head_cross_entropy(x, w, tg, 1.f / N, &dx, &dw, acc); }, std::min(g_reps, 10)),
                   80);
      for (int64_t chunk : {int64_t(1024), int64_t(4096)}) {
        cu::LmHeadCeOptions o;
        o.chunk_rows = chunk;
        report_flops("  same, chunk_rows " + std::to_string(chunk), dims({N, H}) + " V", fl,
                     time_ms([&] { cu::lm_head_cross_entropy(x, w, tg, 1.f / N, &dx, &dw, acc, ctx, o); }, 5), 80);
      }
      {  // where the fused time goes: one 2048-row chunk's three GEMMs and its CE, timed separately
        const int64_t c = 2048;
        Tensor lg = cu::empty({c, V}, DType::BF16);
        cu::GemmDesc g1;  // logits
        g1.trans_a = true;
        g1.m = V;
        g1.n = c;
        g1.k = H;
        g1.a = w.raw();
        g1.lda = H;
        g1.b = x.raw();
        g1.ldb = H;
        g1.d = lg.raw();
        g1.ldd = V;
        cu::GemmDesc g2;  // dx
        g2.m = H;
        g2.n = c;
        g2.k = V;
        g2.a = w.raw();
        g2.lda = H;
        g2.b = lg.raw();
        g2.ldb = V;
        g2.d = dx.raw();
        g2.ldd = H;
        cu::GemmDesc g3;  // dw += (fp32, beta 1)
        g3.trans_b = true;
        g3.m = H;
        g3.n = V;
        g3.k = c;
        g3.a = x.raw();
        g3.lda = H;
        g3.b = lg.raw();
        g3.ldb = V;
        g3.d = dw.raw();
        g3.d_type = DType::F32;
        g3.ldd = H;
        g3.beta = 1.f;
        const double fl = 2.0 * c * H * V;
        report_flops("  chunk logits GEMM", "m=V n=2048 k=2048", fl, time_ms([&] { cu::gemm(ctx, g1); }), 90);
        Tensor tgc = tg.slice_rows(0, c);
        report_bytes("  chunk CE in place", dims({c, V}), 3.0 * lg.nbytes(),
                     time_ms([&] { cu::cross_entropy_fwd_bwd_async(lg, tgc, 1.f / N, &lg, acc); }), 90);
        report_flops("  chunk dx GEMM", "m=2048 n=2048 k=V", fl, time_ms([&] { cu::gemm(ctx, g2); }), 85);
        report_flops("  chunk dw GEMM (fp32 +=)", "m=2048 n=V k=2048", fl, time_ms([&] { cu::gemm(ctx, g3); }), 80);
      }
      const double loss = cu::read_device_scalar(acc);
      std::printf("  (loss sum accumulated over all runs: %.3e, finite: %s)\n", loss, std::isfinite(loss) ? "yes" : "NO");
      cu::free_device_scalar(acc);
    }

    // ---------------- optimizer: sum_squares + AdamW over 1.24B parameters ----------------
    std::printf("\noptimizer (Llama-3.2-1B: 1,235,814,400 params in 18 flat buffers, fp32 master/grad/m/v + bf16 copy)\n");
    {
      std::vector<int64_t> sizes;
      sizes.push_back(V * H);  // tied embedding
      for (int l = 0; l < 16; ++l) sizes.push_back(60821504);
      sizes.push_back(H);  // final norm
      int64_t total = 0;
      for (int64_t s : sizes) total += s;
      struct P {
        Tensor w, g, m, v, work;
      };
      std::vector<P> ps(sizes.size());
      for (size_t i = 0; i < sizes.size(); ++i) {
        ps[i].w = dev({sizes[i]}, DType::F32, 100 + i);
        ps[i].g = dev({sizes[i]}, DType::F32, 200 + i, -1e-3f, 1e-3f);
        ps[i].m = dev({sizes[i]}, DType::F32, 300 + i, -1e-4f, 1e-4f);
        ps[i].v = dev({sizes[i]}, DType::F32, 400 + i, 0.f, 1e-6f);
        ps[i].work = cu::empty({sizes[i]}, DType::BF16);
      }
      std::vector<const Tensor*> grads;
      for (auto& p : ps) grads.push_back(&p.g);
      double* sq = cu::alloc_device_scalar();
      report_bytes("sum_squares (all grads)", std::to_string(total) + " fp32", 4.0 * total,
                   time_ms([&] { cu::sum_squares_multi_async(grads, sq); }), 85);
      std::vector<cu::AdamWTensors> list;
      for (auto& p : ps) list.push_back({&p.w, &p.g, &p.m, &p.v, &p.work});
      cu::AdamWConfig c;
      c.lr = 1e-5;
      c.weight_decay = 0.01;
      int64_t step = 0;
      report_bytes("adamw (fused, + bf16 copy)", std::to_string(total) + " params", 30.0 * total, time_ms([&] {
                     c.step = ++step;
                     cu::adamw_step(list, c);
                   }, std::min(g_reps, 10)),
                   85);
      float* coef = static_cast<float*>(ctx.allocator().allocate(4));
      cu::clip_coef_async(sq, 1.0, coef);
      c.d_grad_scale = coef;
      report_bytes("adamw with device clip scale", std::to_string(total) + " params", 30.0 * total, time_ms([&] {
                     c.step = ++step;
                     cu::adamw_step(list, c);
                   }, std::min(g_reps, 10)),
                   85);
      ctx.allocator().deallocate(coef, 4);
      cu::free_device_scalar(sq);
    }
    ctx.synchronize();

    // ---------------- table ----------------
    std::printf("\n| op | shape | median ms | achieved | %% of measured limit | predicted %% |\n|---|---|---|---|---|---|\n");
    std::printf("| bf16 GEMM 8192^3 (limit) | | | %.1f TFLOP/s | 100 | |\n", g_gemm_peak);
    std::printf("| D2D copy 2 GiB (limit) | | | %.1f GB/s | 100 | |\n", g_bw_peak);
    for (const Row& r : g_rows)
      std::printf("| %s | %s | %.3f | %.1f %s | %.1f | %.0f |\n", r.name.c_str(), r.shape.c_str(), r.ms, r.rate,
                  r.flops ? "TFLOP/s" : "GB/s", r.pct, r.predicted);
    std::printf("\nallocator: peak %.2f GiB allocated, %.2f GiB reserved\n",
                ctx.allocator().peak_bytes() / double(1ull << 30), ctx.allocator().peak_reserved_bytes() / double(1ull << 30));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "am_gpu_microbench: %s\n", e.what());
    return 1;
  }
  return 0;
}
