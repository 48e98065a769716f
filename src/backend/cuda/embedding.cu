// Token embedding: out[i] = weight[ids[i]] (gather) and dweight[ids[i]] += dout[i] (scatter-add).
// One block per token row, threads striding over H in 16-byte vectors. The backward adds with fp32
// vector atomics (red.global.add.v4.f32 on sm_90): repeated tokens in a batch collide only on the same
// row, and the scatter is a tiny fraction of a step (N x H = 16M adds for W1), so a sort-based
// deterministic reduction is not worth its extra pass. Summation order, and thus the last bits of
// dweight, can differ between runs.
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/kernel_utils.cuh"

namespace am::cuda {
namespace {

template <typename TW, typename TO, int VEC>
__global__ void embedding_fwd_kernel(const int32_t* __restrict__ ids, const TW* __restrict__ w,
                                     TO* __restrict__ out, int64_t vocab, int64_t hidden,
                                     DeviceErrorSlot* err) {
  const int64_t row = blockIdx.x;
  const int32_t id = ids[row];
  TO* o = out + row * hidden;
  const bool ok = id >= 0 && id < vocab;
  if (!ok && threadIdx.x == 0) report_device_error(err, kErrTokenId, row, id);
  const TW* src = w + static_cast<int64_t>(ok ? id : 0) * hidden;
#pragma unroll 4
  for (int64_t j = threadIdx.x * static_cast<int64_t>(VEC); j < hidden; j += blockDim.x * VEC) {
    Vec<TO, VEC> v;
    if (ok) {
      const Vec<TW, VEC> s = load_vec<TW, VEC>(src + j);
#pragma unroll
      for (int k = 0; k < VEC; ++k) v.v[k] = from_f<TO>(to_f(s.v[k]));
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) v.v[k] = from_f<TO>(0.f);
    }
    store_vec<TO, VEC>(o + j, v);
  }
}

template <typename TD, int VEC>
__global__ void embedding_bwd_kernel(const int32_t* __restrict__ ids, const TD* __restrict__ dout,
                                     float* __restrict__ dw, int64_t vocab, int64_t hidden, DeviceErrorSlot* err) {
  const int64_t row = blockIdx.x;
  const int32_t id = ids[row];
  if (id < 0 || id >= vocab) {
    if (threadIdx.x == 0) report_device_error(err, kErrTokenId, row, id);
    return;
  }
  const TD* g = dout + row * hidden;
  float* d = dw + static_cast<int64_t>(id) * hidden;
  for (int64_t j = threadIdx.x * static_cast<int64_t>(VEC); j < hidden; j += blockDim.x * VEC) {
    const Vec<TD, VEC> s = load_vec<TD, VEC>(g + j);
    if constexpr (VEC == 4) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      atomicAdd(reinterpret_cast<float4*>(d + j), make_float4(to_f(s.v[0]), to_f(s.v[1]), to_f(s.v[2]), to_f(s.v[3])));
#else
#pragma unroll
      for (int k = 0; k < 4; ++k) atomicAdd(d + j + k, to_f(s.v[k]));
#endif
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) atomicAdd(d + j + k, to_f(s.v[k]));
    }
  }
}

// Threads per row block: one per vector up to `cap`. The gather uses cap 64 so that each thread issues
// several independent 16-byte loads (W1: 64 threads x 4 vectors); the scatter keeps 256.
int threads_for(int64_t hidden, int vec, int64_t cap = 256) {
  int64_t t = (hidden / vec + 31) / 32 * 32;
  if (t < 32) t = 32;
  if (t > cap) t = cap;
  return static_cast<int>(t);
}

struct EmbDims {
  int64_t n, vocab, hidden;
};
EmbDims check(const char* op, const Tensor& ids, const Tensor& weight, const char* out_name, const Tensor& out) {
  need_cuda(op, "ids", ids);
  need_cuda(op, "weight", weight);
  need_cuda(op, out_name, out);
  need_dtype(op, "ids", ids, DType::I32);
  if (weight.ndim() != 2) op_error(op, describe("weight", weight) + ": expected [V, H]");
  const int64_t n = ids.numel(), vocab = weight.dim(0), hidden = weight.dim(1);
  if (out.ndim() < 1 || out.dim(-1) != hidden || out.numel() != n * hidden)
    op_error(op, describe(out_name, out) + ": expected [N = " + std::to_string(n) + ", H = " +
                     std::to_string(hidden) + "]");
  return {n, vocab, hidden};
}

}  // namespace

void embedding_fwd(const Tensor& ids, const Tensor& weight, Tensor& out, CudaContext& ctx) {
  const char* op = "embedding_fwd";
  const EmbDims d = check(op, ids, weight, "out", out);
  need_float(op, "weight", weight);
  need_float(op, "out", out);
  if (d.n == 0 || d.hidden == 0) return;
  AM_DISPATCH_FLOAT(weight.dtype(), op, TW, {
    AM_DISPATCH_FLOAT(out.dtype(), op, TO, {
      const TW* pw = weight.data<TW>();
      TO* po = out.data<TO>();
      // 16 bytes of the narrower type per access, when rows stay aligned.
      constexpr int V = (sizeof(TW) == 2 && sizeof(TO) == 2) ? 8 : 4;
      if (d.hidden % V == 0 && aligned_to(pw, sizeof(TW) * V) && aligned_to(po, sizeof(TO) * V))
        embedding_fwd_kernel<TW, TO, V><<<static_cast<unsigned>(d.n), threads_for(d.hidden, V, 64), 0, ctx.stream()>>>(
            ids.data<int32_t>(), pw, po, d.vocab, d.hidden, ctx.error_slot());
      else
        embedding_fwd_kernel<TW, TO, 1><<<static_cast<unsigned>(d.n), threads_for(d.hidden, 1), 0, ctx.stream()>>>(
            ids.data<int32_t>(), pw, po, d.vocab, d.hidden, ctx.error_slot());
    });
  });
  AM_CUDA_CHECK_LAUNCH();
}

void embedding_bwd(const Tensor& ids, const Tensor& dout, Tensor& dweight, CudaContext& ctx) {
  const char* op = "embedding_bwd";
  const EmbDims d = check(op, ids, dweight, "dout", dout);
  need_dtype(op, "dweight", dweight, DType::F32);
  need_float(op, "dout", dout);
  if (d.n == 0 || d.hidden == 0) return;
  float* pw = dweight.data<float>();
  AM_DISPATCH_FLOAT(dout.dtype(), op, TD, {
    const TD* pd = dout.data<TD>();
    if (d.hidden % 4 == 0 && aligned_to(pw, 16) && aligned_to(pd, sizeof(TD) * 4))
      embedding_bwd_kernel<TD, 4><<<static_cast<unsigned>(d.n), threads_for(d.hidden, 4), 0, ctx.stream()>>>(
          ids.data<int32_t>(), pd, pw, d.vocab, d.hidden, ctx.error_slot());
    else
      embedding_bwd_kernel<TD, 1><<<static_cast<unsigned>(d.n), threads_for(d.hidden, 1), 0, ctx.stream()>>>(
          ids.data<int32_t>(), pd, pw, d.vocab, d.hidden, ctx.error_slot());
  });
  AM_CUDA_CHECK_LAUNCH();
}

}  // namespace am::cuda
