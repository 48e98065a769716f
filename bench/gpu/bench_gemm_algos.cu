// What choosing among cuBLASLt's algorithms could give at W1's GEMMs (issue 14: the GEMMs run at 84% of the
// measured limit, 91.9 of W1's 136.7 ms step). For every GEMM a W1 step issues (per layer: the fused q|k|v,
// o_proj, the fused gate|up and down_proj, each forward, dx and dw with its fp32 +=; the LM head's three GEMMs
// per 2,048-row chunk), the heuristic's first 16 algorithms are timed on the op's own shapes, dtypes and
// alignment (src/backend/cuda/gemm.h gemm_candidates). Each row: the heuristic's pick (what gemm() runs) against
// the fastest candidate, its configuration (id, tile, split-K, reduction scheme), and whether the fastest one
// writes the same bits as the pick on beta = 0 GEMMs (a faster algorithm that changes the numbers between runs
// would have to be pinned). Last line: the step time the fastest candidates would save, counted per step.
//
//   am_gpu_microbench gemm_algos [--reps R]
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <string>
#include <vector>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/gemm.h"
#include "bench_util.cuh"
#include "core/tensor.h"

using am::DType;
using am::Tensor;
namespace cu = am::cuda;

namespace {

constexpr am::bench::Filler dev = am::bench::filled_fmix64;

struct Op {
  std::string name;
  cu::GemmDesc g;
  int per_step;  // how many a W1 step runs
};

// y [N, M] = x [N, K] w[M, K]^T, as linear.cu issues it (column-major D = op(A) B).
cu::GemmDesc fwd(const Tensor& x, const Tensor& w, Tensor& y) {
  cu::GemmDesc g;
  g.trans_a = true;
  g.m = w.dim(0);
  g.n = x.dim(0);
  g.k = w.dim(1);
  g.a = w.raw();
  g.a_type = w.dtype();
  g.lda = g.k;
  g.b = x.raw();
  g.b_type = x.dtype();
  g.ldb = g.k;
  g.d = y.raw();
  g.d_type = y.dtype();
  g.ldd = g.m;
  return g;
}
// dx [N, K] = dy [N, M] w [M, K]
cu::GemmDesc dx_of(const Tensor& dy, const Tensor& w, Tensor& dx) {
  cu::GemmDesc g;
  g.m = w.dim(1);
  g.n = dy.dim(0);
  g.k = w.dim(0);
  g.a = w.raw();
  g.a_type = w.dtype();
  g.lda = g.m;
  g.b = dy.raw();
  g.b_type = dy.dtype();
  g.ldb = g.k;
  g.d = dx.raw();
  g.d_type = dx.dtype();
  g.ldd = g.m;
  return g;
}
// dw [M, K] (fp32) += dy^T x
cu::GemmDesc dw_of(const Tensor& x, const Tensor& dy, Tensor& dw, float beta) {
  cu::GemmDesc g;
  g.trans_b = true;
  g.m = x.dim(1);
  g.n = dy.dim(1);
  g.k = x.dim(0);
  g.a = x.raw();
  g.a_type = x.dtype();
  g.lda = g.m;
  g.b = dy.raw();
  g.b_type = dy.dtype();
  g.ldb = g.n;
  g.d = dw.raw();
  g.d_type = DType::F32;
  g.ldd = g.m;
  g.beta = beta;
  return g;
}

}  // namespace

int gemm_algos_bench_main(int argc, char** argv) {
  int reps = 10;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--reps") == 0) reps = std::atoi(argv[i + 1]);
  auto& ctx = cu::default_context();
  const int64_t N = 8192, H = 2048, I = 8192, V = 128256, QKV = 2048 + 2 * 512, C = 2048, L = 16;
  std::printf("cuBLASLt algorithms at W1's GEMMs (N = %lld tokens), %d runs each\n", (long long)N, reps);
  std::deque<Tensor> keep;  // stable references
  auto T = [&](std::vector<int64_t> s, DType dt, uint64_t seed) -> Tensor& {
    keep.push_back(dev(am::Shape(s.begin(), s.end()), dt, seed, -0.05f, 0.05f));
    return keep.back();
  };
  std::vector<Op> ops;
  struct Lin {
    const char* name;
    int64_t k, m;
  };
  for (const Lin& l : {Lin{"qkv", H, QKV}, Lin{"o_proj", H, H}, Lin{"gate_up", H, 2 * I}, Lin{"down", I, H}}) {
    Tensor &x = T({N, l.k}, DType::BF16, 1), &w = T({l.m, l.k}, DType::BF16, 2);
    Tensor &y = T({N, l.m}, DType::BF16, 3), &dy = T({N, l.m}, DType::BF16, 4);
    Tensor &dx = T({N, l.k}, DType::BF16, 5), &dw = T({l.m, l.k}, DType::F32, 6);
    ops.push_back({std::string(l.name) + " fwd", fwd(x, w, y), int(L)});
    ops.push_back({std::string(l.name) + " dx", dx_of(dy, w, dx), int(L)});
    ops.push_back({std::string(l.name) + " dw +=", dw_of(x, dy, dw, 1.f), int(L)});
    ops.push_back({std::string(l.name) + " dw (beta 0)", dw_of(x, dy, dw, 0.f), 0});
  }
  {  // LM head, one chunk of C rows (cross_entropy.cu): logits = x W^T, dx = dlogits W, dW += dlogits^T x
    Tensor &x = T({C, H}, DType::BF16, 7), &w = T({V, H}, DType::BF16, 8);
    Tensor &lg = T({C, V}, DType::BF16, 9), &dx = T({C, H}, DType::BF16, 10), &dw = T({V, H}, DType::F32, 11);
    const int chunks = int(N / C);
    ops.push_back({"lm_head logits", fwd(x, w, lg), chunks});
    ops.push_back({"lm_head dx", dx_of(lg, w, dx), chunks});
    ops.push_back({"lm_head dW +=", dw_of(x, lg, dw, 1.f), chunks});
  }
  double pick_total = 0, best_total = 0;
  std::printf("%-20s %4s %9s %9s %8s  %-28s %-28s %s\n", "GEMM", "x", "pick ms", "best ms", "TFLOP/s", "pick (id tile sk red)",
              "best (id tile sk red)", "best bits");
  for (Op& o : ops) {
    const auto c = cu::gemm_candidates(ctx, o.g, 16, reps);
    if (c.empty()) {
      std::printf("%-20s no algorithm\n", o.name.c_str());
      continue;
    }
    size_t b = 0;
    for (size_t i = 1; i < c.size(); ++i)
      if (c[i].ms < c[b].ms) b = i;
    // Same bits? Rerun the pick and the best from the same D (beta 0 only: D is then a pure function of A, B).
    std::string same = "-";
    if (o.g.beta == 0.f && b != 0) {
      const size_t bytes = size_t(o.g.ldd) * o.g.n * am::dtype_size(o.g.d_type);
      std::vector<char> h0(bytes), h1(bytes);
      cu::gemm(ctx, o.g);  // the pick
      cudaMemcpy(h0.data(), o.g.d, bytes, cudaMemcpyDeviceToHost);
      cu::gemm_candidates(ctx, o.g, int(b) + 1, 1);  // runs candidates 0..b; the last one written is b's
      cudaMemcpy(h1.data(), o.g.d, bytes, cudaMemcpyDeviceToHost);
      same = std::memcmp(h0.data(), h1.data(), bytes) == 0 ? "equal" : "DIFFER";
    }
    const double fl = 2.0 * o.g.m * o.g.n * o.g.k;
    char pick[64], best[64];
    std::snprintf(pick, sizeof pick, "%d %d %d %d", c[0].id, c[0].tile, c[0].splitk, c[0].reduction);
    std::snprintf(best, sizeof best, "%d %d %d %d", c[b].id, c[b].tile, c[b].splitk, c[b].reduction);
    std::printf("%-20s %4d %9.3f %9.3f %8.1f  %-28s %-28s %s (%zu candidates)\n", o.name.c_str(), o.per_step, c[0].ms,
                c[b].ms, fl / (c[0].ms * 1e-3) / 1e12, pick, best, same.c_str(), c.size());
    std::fflush(stdout);
    pick_total += o.per_step * c[0].ms;
    best_total += o.per_step * c[b].ms;
  }
  std::printf("W1 step GEMMs: heuristic picks %.1f ms, fastest candidates %.1f ms: %.1f ms (%.1f%%) to gain\n", pick_total,
              best_total, pick_total - best_total, 100.0 * (pick_total - best_total) / pick_total);
  return 0;
}
