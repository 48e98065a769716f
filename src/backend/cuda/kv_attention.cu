// Attention of a few new queries over a KV cache (decode steps of `automodel generate`).
//
// One block of kWarps warps per query row (b, i, h). Warp w takes the visible keys j0 + w, j0 + w + kWarps,
// ... and keeps an online softmax of them: its lanes split the features (lane owns d = lane + 32 c, at most
// 8 of them, so D, Dv <= 256), a warp sum gives each score, and the running max m, normaliser l and output
// accumulator acc[Dv] are rescaled as keys arrive (as flash attention does). The kWarps partial results are
// merged through shared memory: M = max m_w, out = sum_w e^(m_w - M) acc_w / sum_w e^(m_w - M) l_w.
// Everything is fp32 whatever the storage dtype; q is read once into shared memory.
// As the training kernels: soft-capping (Gemma 2) turns each score s into c tanh(s / c); a sink (gpt_oss)
// joins the merge as one more value-less column (M = max(M, s_h), denominator + e^(s_h - M)); v / out rows
// may be Dv wide with Dv != D (DeepSeek MLA).
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

// Sink logit of head h: [nh] fp32 or bf16 (the model's CUDA working copy), or none.
struct KvSinks {
  const void* p = nullptr;
  bool bf16 = false;
};
__device__ __forceinline__ float sink_at(const KvSinks& s, int h) {
  return s.bf16 ? __bfloat162float(static_cast<const bf16*>(s.p)[h]) : static_cast<const float*>(s.p)[h];
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32)
    attention_kv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
                        int64_t Tq, int64_t Tk, int nh, int nkv, int D, int Dv, float scale, int64_t window,
                        float softcap, KvSinks sinks) {
  extern __shared__ float smem[];
  float* qs = smem;                        // [D]
  float* part_acc = qs + D;                // [kWarps, Dv]
  float* part_ml = part_acc + kWarps * Dv;  // [kWarps, 2]
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
    const T* vj = v + ((b * Tk + j) * nkv + kh) * Dv;
    float part = 0.f;
#pragma unroll
    for (int c = 0; c < kMaxPerLane; ++c) {
      const int d = lane + 32 * c;
      if (d < D) part += qs[d] * to_f(kj[d]);
    }
    float s = warp_sum(part) * scale;
    if (softcap > 0.f) s = softcap * tanhf(s / softcap);
    const float m_new = fmaxf(m, s);
    const float corr = __expf(m - m_new), e = __expf(s - m_new);  // m = -inf on the first key: corr = 0
    l = l * corr + e;
#pragma unroll
    for (int c = 0; c < kMaxPerLane; ++c) {
      const int d = lane + 32 * c;
      if (d < Dv) acc[c] = acc[c] * corr + e * to_f(vj[d]);
    }
    m = m_new;
  }
#pragma unroll
  for (int c = 0; c < kMaxPerLane; ++c) {
    const int d = lane + 32 * c;
    if (d < Dv) part_acc[warp * Dv + d] = acc[c];
  }
  if (lane == 0) {
    part_ml[2 * warp] = m;
    part_ml[2 * warp + 1] = l;
  }
  __syncthreads();
  // Merge the warps' partial softmaxes. A warp that saw no key has m = -inf and weight 0; key pos is always
  // visible, so at least one warp saw one and M is finite.
  // The sink (if any) is one more column of the merge, with no value.
  float M = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) M = fmaxf(M, part_ml[2 * w]);
  const float sk = sinks.p ? sink_at(sinks, h) : -INFINITY;
  M = fmaxf(M, sk);
  float wgt[kWarps], L = sinks.p ? __expf(sk - M) : 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    wgt[w] = part_ml[2 * w] == -INFINITY ? 0.f : __expf(part_ml[2 * w] - M);
    L += wgt[w] * part_ml[2 * w + 1];
  }
  const float inv = 1.f / L;
  for (int d = threadIdx.x; d < Dv; d += blockDim.x) {
    float o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += wgt[w] * part_acc[w * Dv + d];
    out[row * Dv + d] = from_f<T>(o * inv);
  }
}

}  // namespace

void attention_kv_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const AttnParams& p, Tensor& out,
                      CudaContext& ctx) {
  const char* op = "attention_kv_fwd";
  need_cuda(op, "q", q);
  need_cuda(op, "k", k);
  need_cuda(op, "v", v);
  need_cuda(op, "out", out);
  // Shapes and the common dtype are checked by the front-end (src/ops/kv_attention.cpp).
  if (p.head_dim > 32 * kMaxPerLane || p.dv() > 32 * kMaxPerLane)
    throw DeviceError(std::string("cuda op ") + op + ": head dims " + std::to_string(p.head_dim) + " / " +
                      std::to_string(p.dv()) + " (q-k / v): at most " + std::to_string(32 * kMaxPerLane) +
                      " is supported");
  KvSinks sinks;
  if (p.sinks) {
    need_cuda(op, "sinks", *p.sinks);
    if (p.sinks->dtype() != DType::F32 && p.sinks->dtype() != DType::BF16)
      op_error(op, describe("sinks", *p.sinks) + ": expected float32 or bfloat16");
    if (p.sinks->numel() != p.n_heads) op_error(op, describe("sinks", *p.sinks) + ": expected [n_heads]");
    sinks.p = p.sinks->raw();
    sinks.bf16 = p.sinks->dtype() == DType::BF16;
  }
  const int64_t rows = p.batch * p.seq * p.n_heads;
  if (rows == 0) return;
  if (rows > 0x7fffffff) op_error(op, "too many query rows for one launch");
  const int64_t Tk = k.dim(1);
  const size_t shmem = sizeof(float) * static_cast<size_t>(p.head_dim + kWarps * p.dv() + 2 * kWarps);
  AM_DISPATCH_FLOAT(q.dtype(), op, T, {
    attention_kv_kernel<T><<<static_cast<unsigned>(rows), kWarps * 32, shmem, ctx.stream()>>>(
        q.data<T>(), k.data<T>(), v.data<T>(), out.data<T>(), p.seq, Tk, static_cast<int>(p.n_heads),
        static_cast<int>(p.n_kv_heads), static_cast<int>(p.head_dim), static_cast<int>(p.dv()), p.scale,
        p.sliding_window, p.softcap, sinks);
  });
  AM_CUDA_CHECK_LAUNCH();
}

}  // namespace am::cuda
