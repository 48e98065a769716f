// Micro-benchmarks of the gpt_oss CPU ops: attention with sinks (against bench_ops_cpu.cpp's plain attention
// at the same shapes, the sink's cost is one exp per row), the clamped interleaved SwiGLU and the per-expert
// bias add (memory-bound: bytes/s).
//
//   ./build/bin/am_microbench --benchmark_filter=GptOss
#include <benchmark/benchmark.h>

#include <random>

#include "core/tensor.h"
#include "ops/gpt_oss_ops.h"
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

// args: T, nh, nkv, window (D = 64, B = 1)
void BM_GptOssSinkAttentionFwdBwd(benchmark::State& st) {
  const int64_t T = st.range(0), nh = st.range(1), nkv = st.range(2), D = 64;
  Tensor q = randn({1, T, nh, D}, 1), k = randn({1, T, nkv, D}, 2), v = randn({1, T, nkv, D}, 3),
         dout = randn({1, T, nh, D}, 4), sinks = randn({nh}, 5);
  Tensor out = Tensor::empty({1, T, nh, D}, DType::F32), lse = Tensor::empty({1, nh, T}, DType::F32);
  Tensor dq = Tensor::empty(q.shape(), DType::F32), dk = Tensor::empty(k.shape(), DType::F32),
         dv = Tensor::empty(v.shape(), DType::F32), ds = Tensor::zeros({nh}, DType::F32);
  ops::AttnParams p{.batch = 1, .seq = T, .n_heads = nh, .n_kv_heads = nkv, .head_dim = D, .scale = 0.125f,
                    .sliding_window = st.range(3), .sinks = &sinks};
  for (auto _ : st) {
    ops::attention_fwd(q, k, v, p, out, lse);
    ops::attention_bwd(q, k, v, out, lse, dout, p, dq, dk, dv, &ds);
  }
  set_rate(st, "FLOP/s", 3.0 * 2.0 * nh * T * T * D);  // fwd + about 2x for bwd (causal: half of T^2 each)
}
BENCHMARK(BM_GptOssSinkAttentionFwdBwd)
    ->Args({256, 8, 2, 0})
    ->Args({1024, 8, 2, 128})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// args: rows M, I
void BM_GptOssGluFwdBwd(benchmark::State& st) {
  const int64_t M = st.range(0), I = st.range(1);
  Tensor gu = randn({M, 2 * I}, 1, 5.f), dh = randn({M, I}, 2), h = Tensor::empty({M, I}, DType::F32),
         dgu = Tensor::empty({M, 2 * I}, DType::F32);
  for (auto _ : st) {
    ops::gpt_oss_glu_fwd(gu, 1.702f, 7.f, h);
    ops::gpt_oss_glu_bwd(gu, dh, 1.702f, 7.f, dgu);
  }
  set_rate(st, "bytes/s", 4.0 * (2 * M * I + M * I + 2 * M * I + M * I + 2 * M * I));
}
BENCHMARK(BM_GptOssGluFwdBwd)->Args({4096, 2880})->Unit(benchmark::kMillisecond)->UseRealTime();

// args: rows M, C, experts E
void BM_GptOssGroupedBias(benchmark::State& st) {
  const int64_t M = st.range(0), C = st.range(1), E = st.range(2);
  Tensor y = randn({M, C}, 1), b = randn({E, C}, 2), db = Tensor::zeros({E, C}, DType::F32);
  Tensor offs = Tensor::empty({E + 1}, DType::I32);
  for (int64_t e = 0; e <= E; ++e) offs.data<int32_t>()[e] = static_cast<int32_t>(e * M / E);
  for (auto _ : st) {
    ops::grouped_bias_add(y, b, offs);
    ops::grouped_bias_bwd(y, offs, db);
  }
  set_rate(st, "bytes/s", 4.0 * 3 * M * C);
}
BENCHMARK(BM_GptOssGroupedBias)->Args({4096, 2880, 32})->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
