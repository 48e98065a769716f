// Attention of a few new queries over a KV cache (decode steps of `automodel generate`).
//
// One block of kWarps warps per query row (b, i, h). Warp w takes the visible keys j0 + w, j0 + w + kWarps,
// ... and keeps an online softmax of them: its lanes split the D features (lane owns d = lane + 32 c, at most
// 8 of them, so D <= 256), a warp sum gives each score, and the running max m, normaliser l and output
// accumulator acc[D] are rescaled as keys arrive (as flash attention does). The kWarps partial results are
// merged through shared memory: M = max m_w, out = sum_w e^(m_w - M) acc_w / sum_w e^(m_w - M) l_w.
// Everything is fp32 whatever the storage dtype; q is read once into shared memory.
//
// A decode step (Tq = 1) launches B * nh blocks; each reads its kv head's Tk rows once. That is far from
// the bandwidth a split-K (flash-decoding) kernel reaches on long contexts, but a step of a 1B model is
// dominated by its GEMVs, not by this; prefill goes through the flash kernels instead (models/blocks).
#include <cmath>

#include "backend/cuda/kernel_utils.cuh"
#include "backend/cuda/kv_attention.h"

namespace am::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxPerLane = 8;  // D <= 32 * 8

template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
    attention_kv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
                        int64_t Tq, int64_t Tk, int nh, int nkv, int D, float scale, int64_t window) {
  extern __shared__ float smem[];
  float* qs = smem;                       // [D]
  float* part_acc = qs + D;               // [kWarps, D]
  float* part_ml = part_acc + kWarps * D;  // [kWarps, 2]
  const int64_t row = blockIdx.x;         // ((b * Tq) + i) * nh + h
  const int h = static_cast<int>(row % nh);
  const int64_t bi = row / nh, i = bi % Tq, b = bi / Tq;
  const int kh = h / (nh / nkv);
  const int64_t pos = Tk - Tq + i;
  const int64_t j0 = window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  for (int d = threadIdx.x; d < D; d += blockDim.x) qs[d] = to_f(q[row * D + d]);
  __syncthreads();

  float m = -INFINITY, l = 0.f, acc[kMaxPerLane];
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) acc[c] = 0.f;
  for (int64_t j = j0 + warp; j <= pos; j += kWarps) {
    const T* kj = k + ((b * Tk + j) * nkv + kh) * D;
    const T* vj = v + ((b * Tk + j) * nkv + kh) * D;
    float part = 0.f;
#pragma unroll
    for (int c = 0; c < kMaxPerLane; ++c) {
      const int d = lane + 32 * c;
      if (d < D) part += qs[d] * to_f(kj[d]);
    }
    const float s = warp_sum(part) * scale;
    const float m_new = fmaxf(m, s);
    const float corr = __expf(m - m_new), e = __expf(s - m_new);  // m = -inf on the first key: corr = 0
    l = l * corr + e;
#pragma unroll
    for (int c = 0; c < kMaxPerLane; ++c) {
      const int d = lane + 32 * c;
      if (d < D) acc[c] = acc[c] * corr + e * to_f(vj[d]);
    }
    m = m_new;
  }
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) {
    const int d = lane + 32 * c;
    if (d < D) part_acc[warp * D + d] = acc[c];
  }
  if (lane == 0) {
    part_ml[2 * warp] = m;
    part_ml[2 * warp + 1] = l;
  }
  __syncthreads();
  // Merge the warps' partial softmaxes. A warp that saw no key has m = -inf and weight 0; key pos is always
  // visible, so at least one warp saw one and M is finite.
  float M = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) M = fmaxf(M, part_ml[2 * w]);
  float wgt[kWarps], L = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    wgt[w] = part_ml[2 * w] == -INFINITY ? 0.f : __expf(part_ml[2 * w] - M);
    L += wgt[w] * part_ml[2 * w + 1];
  }
  const float inv = 1.f / L;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += wgt[w] * part_acc[w * D + d];
    out[row * D + d] = from_f<T>(o * inv);
  }
}

}  // namespace

void attention_kv_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const ops::AttnParams& p, Tensor& out,
                      CudaContext& ctx) {
  const char* op = "attention_kv_fwd";
  need_cuda(op, "q", q);
  need_cuda(op, "k", k);
  need_cuda(op, "v", v);
  need_cuda(op, "out", out);
  // Shapes and the common dtype are checked by the front-end (src/ops/kv_attention.cpp).
  if (p.head_dim > 32 * kMaxPerLane)
    op_error(op, "head_dim " + std::to_string(p.head_dim) + " > " + std::to_string(32 * kMaxPerLane) + " is not supported");
  const int64_t rows = p.batch * p.seq * p.n_heads;
  if (rows == 0) return;
  if (rows > 0x7fffffff) op_error(op, "too many query rows for one launch");
  const int64_t Tk = k.dim(1);
  const size_t shmem = sizeof(float) * static_cast<size_t>(p.head_dim * (1 + kWarps) + 2 * kWarps);
  AM_DISPATCH_FLOAT(q.dtype(), op, T, {
    attention_kv_kernel<T><<<static_cast<unsigned>(rows), kWarps * 32, shmem, ctx.stream()>>>(
        q.data<T>(), k.data<T>(), v.data<T>(), out.data<T>(), p.seq, Tk, static_cast<int>(p.n_heads),
        static_cast<int>(p.n_kv_heads), static_cast<int>(p.head_dim), p.scale, p.sliding_window);
  });
  AM_CUDA_CHECK_LAUNCH();
}

}  // namespace am::cuda
