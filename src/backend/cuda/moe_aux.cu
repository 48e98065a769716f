// MoE routing statistics and HF's load-balancing aux loss on CUDA (contracts in src/ops/moe_ops.h; entry points in
// moe_aux.h; the host reference is src/backend/cpu/moe_aux.cpp). Replaces the host download of every sparse
// layer's top-k indices and router probabilities: nothing here synchronises with the host.
//
//   stats    one block per 128-row chunk (256 threads): the chunk's real-token flags in shared memory; its (t, s)
//            selections counted in a shared-memory histogram (E ints), added to counts / counts2 with integer
//            atomics (exact, order-free); psum: one thread per expert sums the chunk's real rows in row order
//            (fp32, coalesced across experts) into partial[chunk, e], then one thread per expert adds the
//            partials in chunk order to psum (a single chunk adds straight to psum). Deterministic.
//   aux      one block: n = #real tokens (integer), then per expert g[e] = fp32((scale * E) * (f[e] / D) / D) in
//            double, and thread 0 sums aux = E * sum_e (f / D) (psum / D) in expert order in double: every
//            operation explicitly rounded (__dmul_rn, ...: no FMA contraction), as the host evaluates it.
//   dprobs   elementwise: dprobs[t, e] = seg[t] >= 0 ? g[e] : 0.
// Sizes: the router tensors are [N, E] with E in the hundreds, a few MB per layer; these are memory-bound
// kernels far below the expert GEMMs (bench/gpu/bench_moe.cu, "router stats + aux").
#include <algorithm>
#include <climits>
#include <string>
#include <tuple>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/kernel_utils.cuh"
#include "backend/cuda/moe_aux.h"

namespace am::cuda {
namespace {

constexpr int kRows = 128;          // rows per stats block (one psum partial per chunk and expert)
constexpr int kThreads = 256;
constexpr int kMaxExperts = 8192;   // the stats histogram: E ints of dynamic shared memory (32 KiB)

__global__ void stats_kernel(const int32_t* __restrict__ idx, const float* __restrict__ probs,
                             const int32_t* __restrict__ seg, int64_t n, int e, int k, int32_t* __restrict__ counts,
                             int32_t* __restrict__ counts2, float* __restrict__ out, bool add_to_out) {
  extern __shared__ int hist[];  // [e] when counts are wanted
  __shared__ int real[kRows];
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kRows), n - t0));
  for (int r = threadIdx.x; r < kRows; r += blockDim.x) real[r] = r < rows && seg[t0 + r] >= 0;
  const bool want_counts = counts || counts2;
  if (want_counts)
    for (int j = threadIdx.x; j < e; j += blockDim.x) hist[j] = 0;
  __syncthreads();
  if (want_counts) {
    const int pairs = rows * k;
    const int32_t* ib = idx + t0 * k;
    for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
      if (!real[i / k]) continue;
      const int j = ib[i];
      if (j >= 0 && j < e) atomicAdd(&hist[j], 1);
    }
    __syncthreads();
    for (int j = threadIdx.x; j < e; j += blockDim.x) {
      const int c = hist[j];
      if (c == 0) continue;
      if (counts) atomicAdd(counts + j, c);
      if (counts2) atomicAdd(counts2 + j, c);
    }
  }
  if (out) {
    const float* pb = probs + t0 * e;
    for (int j = threadIdx.x; j < e; j += blockDim.x) {
      float acc = 0.f;
      for (int r = 0; r < rows; ++r)
        if (real[r]) acc += pb[static_cast<int64_t>(r) * e + j];
      if (add_to_out) out[j] += acc;
      else out[static_cast<int64_t>(blockIdx.x) * e + j] = acc;
    }
  }
}

__global__ void psum_reduce_kernel(const float* __restrict__ partial, int64_t chunks, int e, float* __restrict__ psum) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= e) return;
  float acc = 0.f;
  for (int64_t c = 0; c < chunks; ++c) acc += partial[c * e + j];
  psum[j] += acc;
}

__global__ void aux_kernel(const int32_t* __restrict__ f, const float* __restrict__ psum,
                           const int32_t* __restrict__ seg, int64_t n, int e, int64_t num_layers, float se,
                           float* __restrict__ aux, float* __restrict__ g) {
  __shared__ unsigned long long cnt;
  if (threadIdx.x == 0) cnt = 0;
  __syncthreads();
  unsigned long long local = 0;
  for (int64_t t = threadIdx.x; t < n; t += blockDim.x) local += seg[t] >= 0;
  if (local) atomicAdd(&cnt, local);
  __syncthreads();
  const unsigned long long n_real = cnt;
  if (n_real == 0) {
    if (threadIdx.x == 0) aux[0] = 0.f;
    if (g)
      for (int j = threadIdx.x; j < e; j += blockDim.x) g[j] = 0.f;
    return;
  }
  const double d = __dmul_rn(static_cast<double>(num_layers), static_cast<double>(n_real));
  if (g)
    for (int j = threadIdx.x; j < e; j += blockDim.x)
      g[j] = static_cast<float>(__ddiv_rn(__dmul_rn(static_cast<double>(se), __ddiv_rn(static_cast<double>(f[j]), d)), d));
  if (threadIdx.x == 0) {
    double a = 0.0;
    for (int j = 0; j < e; ++j)
      a = __dadd_rn(a, __dmul_rn(__ddiv_rn(static_cast<double>(f[j]), d), __ddiv_rn(static_cast<double>(psum[j]), d)));
    aux[0] = static_cast<float>(__dmul_rn(a, static_cast<double>(e)));
  }
}

__global__ void dprobs_kernel(const float* __restrict__ g, const int32_t* __restrict__ seg, int64_t n, int e,
                              float* __restrict__ dprobs) {
  const int64_t total = n * e;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / e;
    dprobs[i] = seg[t] >= 0 ? g[i - t * e] : 0.f;
  }
}

}  // namespace

void moe_routing_stats(const Tensor& topk_idx, const Tensor& probs, const Tensor& seg, Tensor* counts, Tensor* psum,
                       Tensor* counts2, CudaContext& ctx) {
  const char* op = "moe_routing_stats";
  need_cuda(op, "topk_idx", topk_idx);
  need_cuda(op, "probs", probs);
  need_cuda(op, "seg", seg);
  need_dtype(op, "topk_idx", topk_idx, DType::I32);
  need_dtype(op, "probs", probs, DType::F32);
  need_dtype(op, "seg", seg, DType::I32);
  if (probs.ndim() < 2 || topk_idx.ndim() < 2) op_error(op, "expected probs [N, E] and topk_idx [N, k]");
  const int64_t e = probs.dim(-1), k = topk_idx.dim(-1), n = e ? probs.numel() / e : 0;
  if (e < 1 || e > kMaxExperts) op_error(op, "E = " + std::to_string(e) + " must be in [1, 8192] on CUDA");
  if (k < 1 || topk_idx.numel() != n * k || seg.numel() != n)
    op_error(op, describe("topk_idx", topk_idx) + ", " + describe("seg", seg) + ": expected [N, k] and N tokens for " +
                     describe("probs", probs));
  if (n * k > INT_MAX / 2) op_error(op, "N*k = " + std::to_string(n * k) + " exceeds the int32 range");
  for (auto [nm, t, dt] : {std::tuple<const char*, Tensor*, DType>{"counts", counts, DType::I32},
                           {"counts2", counts2, DType::I32}, {"psum", psum, DType::F32}}) {
    if (!t) continue;
    need_cuda(op, nm, *t);
    need_dtype(op, nm, *t, dt);
    if (t->numel() != e) op_error(op, describe(nm, *t) + ": expected E = " + std::to_string(e) + " elements");
  }
  if (n == 0 || (!counts && !counts2 && !psum)) return;
  const int64_t chunks = (n + kRows - 1) / kRows;
  Tensor partial;
  float* out = nullptr;
  if (psum) {
    if (chunks == 1) {
      out = psum->data<float>();
    } else {
      partial = empty({chunks * e}, DType::F32, ctx);
      out = partial.data<float>();
    }
  }
  const size_t smem = counts || counts2 ? static_cast<size_t>(e) * sizeof(int) : 0;
  stats_kernel<<<static_cast<unsigned>(chunks), kThreads, smem, ctx.stream()>>>(
      topk_idx.data<int32_t>(), probs.data<float>(), seg.data<int32_t>(), n, static_cast<int>(e), static_cast<int>(k),
      counts ? counts->data<int32_t>() : nullptr, counts2 ? counts2->data<int32_t>() : nullptr, out, chunks == 1);
  AM_CUDA_CHECK_LAUNCH();
  if (psum && chunks > 1) {
    psum_reduce_kernel<<<grid_for(e, kThreads), kThreads, 0, ctx.stream()>>>(partial.data<float>(), chunks,
                                                                             static_cast<int>(e), psum->data<float>());
    AM_CUDA_CHECK_LAUNCH();
  }
}

void moe_aux_loss(const Tensor& f, const Tensor& psum, const Tensor& seg, int64_t num_layers, float scale, Tensor& aux,
                  Tensor* dprobs, CudaContext& ctx) {
  const char* op = "moe_aux_loss";
  need_cuda(op, "f", f);
  need_cuda(op, "psum", psum);
  need_cuda(op, "seg", seg);
  need_cuda(op, "aux", aux);
  need_dtype(op, "f", f, DType::I32);
  need_dtype(op, "psum", psum, DType::F32);
  need_dtype(op, "seg", seg, DType::I32);
  need_dtype(op, "aux", aux, DType::F32);
  const int64_t e = f.numel(), n = seg.numel();
  if (e < 1 || e > INT_MAX || psum.numel() != e) op_error(op, "f and psum must both have E >= 1 elements");
  if (aux.numel() != 1) op_error(op, describe("aux", aux) + ": expected one element");
  if (num_layers < 1) op_error(op, "num_layers = " + std::to_string(num_layers) + " must be >= 1");
  if (dprobs) {
    need_cuda(op, "dprobs", *dprobs);
    need_dtype(op, "dprobs", *dprobs, DType::F32);
    if (dprobs->numel() != n * e) op_error(op, describe("dprobs", *dprobs) + ": expected [N, E]");
  }
  Tensor g = dprobs ? empty({e}, DType::F32, ctx) : Tensor();
  const float se = scale * static_cast<float>(e);
  aux_kernel<<<1, 1024, 0, ctx.stream()>>>(f.data<int32_t>(), psum.data<float>(), seg.data<int32_t>(), n, static_cast<int>(e),
                                           num_layers, se, aux.data<float>(), dprobs ? g.data<float>() : nullptr);
  AM_CUDA_CHECK_LAUNCH();
  if (dprobs && n > 0) {
    dprobs_kernel<<<grid_for(n * e, kThreads, 4096), kThreads, 0, ctx.stream()>>>(g.data<float>(), seg.data<int32_t>(), n,
                                                                                  static_cast<int>(e), dprobs->data<float>());
    AM_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace am::cuda
