// Micro-benchmarks of the CPU reference ops (Google Benchmark). Counters: FLOP/s for the compute-bound
// ops (linear, attention), bytes/s for the memory-bound ones (rmsnorm, cross-entropy); Google Benchmark
// prints them with SI prefixes (e.g. "12.3G/s"). Rates are per wall-clock second (UseRealTime): the ops
// are multithreaded, so the main thread's CPU time would overstate them.
//
//   ./build/bin/am_microbench --benchmark_filter=Cpu
#include <benchmark/benchmark.h>

#include <random>

#include "core/tensor.h"
#include "ops/ops.h"

using namespace am;

namespace {

Tensor randn(const Shape& shape, uint32_t seed, float stddev = 1.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.f, stddev);
  Tensor t = Tensor::empty(shape, DType::F32);
  for (int64_t i = 0; i < t.numel(); ++i) t.f32()[i] = d(rng);
  return t;
}

void set_rate(benchmark::State& st, const char* name, double per_iter) {
  st.counters[name] = benchmark::Counter(per_iter, benchmark::Counter::kIsIterationInvariantRate,
                                         benchmark::Counter::kIs1000);
}

// ---- linear: x [N, K] w [M, K]; fwd 2NMK flops, bwd 4NMK (dx and dw) ----
void BM_CpuLinearFwd(benchmark::State& st) {
  const int64_t N = st.range(0), K = st.range(1), M = st.range(2);
  Tensor x = randn({N, K}, 1), w = randn({M, K}, 2), y = Tensor::empty({N, M}, DType::F32);
  for (auto _ : st) ops::linear_fwd(x, w, nullptr, y);
  set_rate(st, "FLOP/s", 2.0 * N * M * K);
}
void BM_CpuLinearBwd(benchmark::State& st) {
  const int64_t N = st.range(0), K = st.range(1), M = st.range(2);
  Tensor x = randn({N, K}, 1), w = randn({M, K}, 2), dy = randn({N, M}, 3);
  Tensor dx = Tensor::empty({N, K}, DType::F32), dw = Tensor::zeros({M, K}, DType::F32);
  for (auto _ : st) ops::linear_bwd(x, w, dy, &dx, dw, nullptr);
  set_rate(st, "FLOP/s", 4.0 * N * M * K);
}
BENCHMARK(BM_CpuLinearFwd)
    ->Args({512, 512, 512})
    ->Args({1024, 1024, 2816})
    ->Args({256, 2048, 256})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_CpuLinearBwd)
    ->Args({512, 512, 512})
    ->Args({1024, 1024, 2816})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// ---- attention: causal, so about half of the 4 B nh T^2 D flops of the forward are done; the backward
// recomputes the scores twice and does about 2.5x the forward's work ----
struct AttnSetup {
  Tensor q, k, v, out, lse, dout, dq, dk, dv;
  ops::AttnParams p;
  AttnSetup(int64_t B, int64_t T, int64_t nh, int64_t nkv, int64_t D, int64_t window) {
    q = randn({B, T, nh, D}, 1);
    k = randn({B, T, nkv, D}, 2);
    v = randn({B, T, nkv, D}, 3);
    dout = randn({B, T, nh, D}, 4);
    out = Tensor::empty({B, T, nh, D}, DType::F32);
    lse = Tensor::empty({B, nh, T}, DType::F32);
    dq = Tensor::empty({B, T, nh, D}, DType::F32);
    dk = Tensor::empty({B, T, nkv, D}, DType::F32);
    dv = Tensor::empty({B, T, nkv, D}, DType::F32);
    p = ops::AttnParams{.batch = B,
                        .seq = T,
                        .n_heads = nh,
                        .n_kv_heads = nkv,
                        .head_dim = D,
                        .scale = 1.f / 8.f,
                        .sliding_window = window};
  }
  double fwd_flops() const { return 2.0 * p.batch * p.n_heads * p.seq * p.seq * p.head_dim; }
};
void BM_CpuAttentionFwd(benchmark::State& st) {
  AttnSetup a(st.range(0), st.range(1), st.range(2), st.range(3), 64, 0);
  for (auto _ : st) ops::attention_fwd(a.q, a.k, a.v, a.p, a.out, a.lse);
  set_rate(st, "FLOP/s", a.fwd_flops());
}
void BM_CpuAttentionBwd(benchmark::State& st) {
  AttnSetup a(st.range(0), st.range(1), st.range(2), st.range(3), 64, 0);
  ops::attention_fwd(a.q, a.k, a.v, a.p, a.out, a.lse);
  for (auto _ : st) ops::attention_bwd(a.q, a.k, a.v, a.out, a.lse, a.dout, a.p, a.dq, a.dk, a.dv);
  set_rate(st, "FLOP/s", 2.0 * a.fwd_flops());  // the useful flops: dq, dk, dv, dP
}
BENCHMARK(BM_CpuAttentionFwd)
    ->Args({1, 256, 8, 2})
    ->Args({1, 1024, 8, 8})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_CpuAttentionBwd)
    ->Args({1, 256, 8, 2})
    ->Args({1, 1024, 8, 8})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// ---- rmsnorm: reads x, writes y (fwd); reads x, dy, writes dx (bwd) ----
void BM_CpuRmsNormFwd(benchmark::State& st) {
  const int64_t N = st.range(0), H = st.range(1);
  Tensor x = randn({N, H}, 1), w = randn({H}, 2), y = Tensor::empty({N, H}, DType::F32);
  Tensor rstd = Tensor::empty({N}, DType::F32);
  for (auto _ : st) ops::rmsnorm_fwd(x, w, 1e-6f, y, rstd);
  set_rate(st, "bytes/s", 2.0 * N * H * sizeof(float));
}
void BM_CpuRmsNormBwd(benchmark::State& st) {
  const int64_t N = st.range(0), H = st.range(1);
  Tensor x = randn({N, H}, 1), w = randn({H}, 2), dy = randn({N, H}, 3),
         y = Tensor::empty({N, H}, DType::F32);
  Tensor rstd = Tensor::empty({N}, DType::F32), dx = Tensor::empty({N, H}, DType::F32);
  Tensor dw = Tensor::zeros({H}, DType::F32);
  ops::rmsnorm_fwd(x, w, 1e-6f, y, rstd);
  for (auto _ : st) ops::rmsnorm_bwd(x, w, rstd, dy, dx, dw);
  set_rate(st, "bytes/s", 3.0 * N * H * sizeof(float));
}
BENCHMARK(BM_CpuRmsNormFwd)
    ->Args({4096, 1024})
    ->Args({1024, 4096})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_CpuRmsNormBwd)
    ->Args({4096, 1024})
    ->Args({1024, 4096})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

// ---- gated activations (MLP): reads gate, up, writes h (fwd); reads gate, up, dh, writes dgate, dup (bwd) ----
template <bool Gelu>
void BM_CpuGated(benchmark::State& st) {
  const int64_t N = st.range(0);
  Tensor g = randn({N}, 1), u = randn({N}, 2), h = Tensor::empty({N}, DType::F32);
  Tensor dg = Tensor::empty({N}, DType::F32), du = Tensor::empty({N}, DType::F32);
  const bool bwd = st.range(1) != 0;
  for (auto _ : st) {
    if (bwd) Gelu ? ops::geglu_bwd(g, u, h, dg, du) : ops::swiglu_bwd(g, u, h, dg, du);
    else Gelu ? ops::geglu_fwd(g, u, h) : ops::swiglu_fwd(g, u, h);
  }
  set_rate(st, "bytes/s", (bwd ? 5.0 : 3.0) * N * sizeof(float));
}
BENCHMARK(BM_CpuGated<false>)->Name("BM_CpuSwiGLU")->Args({1 << 22, 0})->Args({1 << 22, 1})->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_CpuGated<true>)->Name("BM_CpuGeGLU")->Args({1 << 22, 0})->Args({1 << 22, 1})->Unit(benchmark::kMicrosecond)->UseRealTime();

// ---- dropout_ in place (LoRA dropout): reads and writes x; a fixed seed, so every iteration drops the same
// elements (rescaling the survivors again: the values grow, the work does not change) ----
void BM_CpuDropout(benchmark::State& st) {
  const int64_t N = st.range(0);
  Tensor x = randn({N}, 1);
  for (auto _ : st) ops::dropout_(x, 0.1f, 1234);
  set_rate(st, "bytes/s", 2.0 * N * sizeof(float));
}
BENCHMARK(BM_CpuDropout)->Arg(1 << 16)->Arg(1 << 22)->Unit(benchmark::kMicrosecond)->UseRealTime();

// ---- cross-entropy with gradient: reads logits, writes dlogits ----
void BM_CpuCrossEntropy(benchmark::State& st) {
  const int64_t N = st.range(0), V = st.range(1);
  Tensor logits = randn({N, V}, 1, 2.f), dl = Tensor::empty({N, V}, DType::F32);
  Tensor targets = Tensor::empty({N}, DType::I32);
  for (int64_t i = 0; i < N; ++i) targets.data<int32_t>()[i] = static_cast<int32_t>((i * 7919) % V);
  for (auto _ : st) benchmark::DoNotOptimize(ops::cross_entropy_fwd_bwd(logits, targets, 1.f, &dl));
  set_rate(st, "bytes/s", 2.0 * N * V * sizeof(float));
}
BENCHMARK(BM_CpuCrossEntropy)
    ->Args({256, 32000})
    ->Args({64, 151936})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
