// GPT-OSS expert kernels (contracts in src/ops/gpt_oss_ops.h; entry points in gpt_oss_moe.h). The expert GEMMs
// are the shared grouped ones (moe_gemm.cu); gpt_oss adds, as separate memory-bound passes:
//
//   glu fwd / bwd   elementwise over [M, I]: each thread reads VEC interleaved (gate, up) pairs as one 16-byte
//                   vector (8 bf16 / 4 fp32 of a row of gu [M, 2I]) and writes VEC outputs (8 bytes); the bwd
//                   reads dh too and writes the VEC pairs of dgu in place of gu's. Scalar fallback for an odd I
//                   or misaligned views. Arithmetic as the CPU reference (backend/cpu/gpt_oss_moe.cpp), in fp32
//                   with expf (not __expf): g = min(gate, L), u = clamp(up, -L, L), s = sigmoid(alpha g),
//                   h = (u + 1) (g s); dgate = dh (u + 1) (s + alpha g s (1 - s)) if gate <= L else 0,
//                   dup = dh g s if -L <= up <= L else 0.
//   bias add        one block per grouped row (grid-stride): the row's expert is found by a binary search of the
//                   device offsets [E+1] (log2 E cached loads; empty experts share their offset with the next
//                   one, so "the last e with offsets[e] <= r" is the owner), then y[r, :] += bias[e, :].
//   bias bwd        grid (C / 32 column tiles, E experts), block (32, 16): x a column of the tile (coalesced row
//                   segments), y strides the expert's rows; a fixed-order shared-memory reduction over y, then
//                   dbias[e, col] += sum (deterministic, no atomics). Experts without rows are not touched.
// Offsets come from the dispatch plan on the device and are not read back (no host sync); the kernels clamp them
// to [0, R] so that malformed offsets cannot make them read or write outside the tensors.
#include <algorithm>
#include <string>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/gpt_oss_moe.h"
#include "backend/cuda/kernel_utils.cuh"

namespace am::cuda {
namespace {

// ---------------------------------------------------------------- activation
struct GluOut {
  float dgate, dup;
};

__device__ __forceinline__ float glu_fwd_value(float gate, float up, float alpha, float limit) {
  const float g = fminf(gate, limit);
  const float u = fmaxf(fminf(up, limit), -limit);
  const float s = 1.f / (1.f + expf(-(g * alpha)));
  return (u + 1.f) * (g * s);
}

__device__ __forceinline__ GluOut glu_bwd_value(float gate, float up, float d, float alpha, float limit) {
  const float g = fminf(gate, limit);
  const float u = fmaxf(fminf(up, limit), -limit);
  const float s = 1.f / (1.f + expf(-(g * alpha)));
  const float dg = d * (u + 1.f) * (s + alpha * g * s * (1.f - s));
  const float du = d * g * s;
  // NaN inputs fail both comparisons: no gradient, as the CPU reference.
  return {gate <= limit ? dg : 0.f, (up >= -limit && up <= limit) ? du : 0.f};
}

// VEC outputs per thread (VEC = 8 / sizeof(T): the 2 VEC inputs are one 16-byte vector); VEC = 1: scalar accesses.
template <typename T, int VEC>
__global__ void glu_fwd_kernel(const T* __restrict__ gu, int64_t m, int64_t inner, float alpha, float limit,
                               T* __restrict__ h) {
  const int64_t per_row = inner / VEC, total = m * per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row, c = (i - r * per_row) * VEC;
    const T* src = gu + r * 2 * inner + 2 * c;
    if constexpr (VEC == 1) {
      h[r * inner + c] = from_f<T>(glu_fwd_value(to_f(src[0]), to_f(src[1]), alpha, limit));
    } else {
      const Vec<T, 2 * VEC> in = load_vec<T, 2 * VEC>(src);
      Vec<T, VEC> o;
#pragma unroll
      for (int q = 0; q < VEC; ++q) o.v[q] = from_f<T>(glu_fwd_value(to_f(in.v[2 * q]), to_f(in.v[2 * q + 1]), alpha, limit));
      store_vec<T, VEC>(h + r * inner + c, o);
    }
  }
}

// dgu may alias gu: each thread loads its elements before storing them (no __restrict__ on either).
template <typename T, int VEC>
__global__ void glu_bwd_kernel(const T* gu, const T* __restrict__ dh, int64_t m, int64_t inner, float alpha,
                               float limit, T* dgu) {
  const int64_t per_row = inner / VEC, total = m * per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / per_row, c = (i - r * per_row) * VEC;
    const int64_t at = r * 2 * inner + 2 * c;
    if constexpr (VEC == 1) {
      const GluOut g = glu_bwd_value(to_f(gu[at]), to_f(gu[at + 1]), to_f(dh[r * inner + c]), alpha, limit);
      dgu[at] = from_f<T>(g.dgate);
      dgu[at + 1] = from_f<T>(g.dup);
    } else {
      const Vec<T, 2 * VEC> in = load_vec<T, 2 * VEC>(gu + at);
      const Vec<T, VEC> d = load_vec<T, VEC>(dh + r * inner + c);
      Vec<T, 2 * VEC> o;
#pragma unroll
      for (int q = 0; q < VEC; ++q) {
        const GluOut g = glu_bwd_value(to_f(in.v[2 * q]), to_f(in.v[2 * q + 1]), to_f(d.v[q]), alpha, limit);
        o.v[2 * q] = from_f<T>(g.dgate);
        o.v[2 * q + 1] = from_f<T>(g.dup);
      }
      store_vec<T, 2 * VEC>(dgu + at, o);
    }
  }
}

// ---------------------------------------------------------------- per-expert biases
__device__ __forceinline__ int64_t clamp_i64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Owner of grouped row r: the last e in [0, E) with offsets[e] <= r (offsets clamped to [0, rows]).
__device__ __forceinline__ int expert_of_row(const int32_t* __restrict__ offsets, int e, int64_t r) {
  int lo = 0, hi = e;  // offsets[lo] <= r < offsets[hi] for valid offsets
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (offsets[mid] <= r) lo = mid;
    else hi = mid;
  }
  return lo;
}

// y[r, :] += bias[expert(r), :]; VEC elements of y per access (VEC = 1: scalar), bias read element-wise (its
// rows are tiny and stay in cache).
template <typename T, typename TB, int VEC>
__global__ void grouped_bias_add_kernel(T* __restrict__ y, const TB* __restrict__ bias,
                                        const int32_t* __restrict__ offsets, int e, int64_t rows, int64_t c) {
  const int64_t first = clamp_i64(offsets[0], 0, rows), last = clamp_i64(offsets[e], 0, rows);
  for (int64_t r = first + blockIdx.x; r < last; r += gridDim.x) {
    const TB* b = bias + static_cast<int64_t>(expert_of_row(offsets, e, r)) * c;
    T* yr = y + r * c;
    for (int64_t col = static_cast<int64_t>(threadIdx.x) * VEC; col < c; col += static_cast<int64_t>(blockDim.x) * VEC) {
      Vec<T, VEC> v = load_vec<T, VEC>(yr + col);
#pragma unroll
      for (int q = 0; q < VEC; ++q) v.v[q] = from_f<T>(to_f(v.v[q]) + to_f(b[col + q]));
      store_vec<T, VEC>(yr + col, v);
    }
  }
}

constexpr int kBwdRowsPerBlock = 16;  // blockDim.y of the bias backward

template <typename T>
__global__ void grouped_bias_bwd_kernel(const T* __restrict__ dy, const int32_t* __restrict__ offsets, int64_t rows,
                                        int64_t c, float* __restrict__ dbias) {
  __shared__ float part[kBwdRowsPerBlock][33];
  const int ex = blockIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t r0 = clamp_i64(offsets[ex], 0, rows);
  const int64_t r1 = clamp_i64(offsets[ex + 1], r0, rows);
  if (r1 == r0) return;  // block-uniform: no rows, dbias[ex] untouched
  float acc = 0.f;
  if (col < c)
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kBwdRowsPerBlock) acc += to_f(dy[r * c + col]);
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < c) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < kBwdRowsPerBlock; ++k) s += part[k][threadIdx.x];
    dbias[static_cast<int64_t>(ex) * c + col] += s;
  }
}

// ---------------------------------------------------------------- host helpers
void need_same_dtype(const char* op, const char* a_name, const Tensor& a, const char* b_name, const Tensor& b) {
  if (a.dtype() != b.dtype()) op_error(op, describe(b_name, b) + ": expected the dtype of " + describe(a_name, a));
}
void need_bf16_or_f32(const char* op, const char* name, const Tensor& t) {
  if (t.dtype() != DType::BF16 && t.dtype() != DType::F32) op_error(op, describe(name, t) + ": expected bf16 or float32");
}
// gu [M, 2I] and a [M, I] tensor (h or dh): returns {M, I}.
std::pair<int64_t, int64_t> glu_dims(const char* op, const Tensor& gu, const char* name, const Tensor& t) {
  if (gu.ndim() < 2 || gu.dim(-1) % 2) op_error(op, describe("gu", gu) + ": expected [M, 2I]");
  const int64_t inner = gu.dim(-1) / 2, m = inner ? gu.numel() / (2 * inner) : 0;
  if (t.ndim() < 2 || t.dim(-1) != inner || t.numel() != m * inner)
    op_error(op, describe(name, t) + ": expected [M, I] for " + describe("gu", gu));
  return {m, inner};
}
// offsets [E+1] int32 on the device, and a [E, C] bias (or dbias) for rows [R, C]: returns E.
int64_t bias_dims(const char* op, const Tensor& rows, const char* rname, const Tensor& bias, const char* bname,
                  const Tensor& offsets) {
  need_dtype(op, "offsets", offsets, DType::I32);
  if (offsets.ndim() != 1 || offsets.dim(0) < 2) op_error(op, describe("offsets", offsets) + ": expected [E+1], E >= 1");
  const int64_t e = offsets.dim(0) - 1;
  if (e > 65535) op_error(op, "E = " + std::to_string(e) + " exceeds the 65535 experts of one launch");
  if (bias.ndim() != 2 || bias.dim(0) != e) op_error(op, describe(bname, bias) + ": expected [E = " + std::to_string(e) + ", C]");
  if (rows.ndim() < 2 || rows.dim(-1) != bias.dim(1))
    op_error(op, describe(rname, rows) + ": expected [R, C = " + std::to_string(bias.dim(1)) + "]");
  return e;
}
unsigned elementwise_grid(const CudaContext& ctx, int64_t items) {
  return grid_for(items, 256, int64_t(ctx.sm_count()) * 16);
}

}  // namespace

// ================================================================ entry points

void gpt_oss_glu_fwd(const Tensor& gu, float alpha, float limit, Tensor& h, CudaContext& ctx) {
  const char* op = "gpt_oss_glu_fwd";
  need_cuda(op, "gu", gu);
  need_cuda(op, "h", h);
  need_bf16_or_f32(op, "gu", gu);
  need_same_dtype(op, "gu", gu, "h", h);
  const auto [m, inner] = glu_dims(op, gu, "h", h);
  if (m == 0 || inner == 0) return;
  AM_DISPATCH_BF16_F32(gu.dtype(), op, T, {
    constexpr int V = 8 / static_cast<int>(sizeof(T));
    if (inner % V == 0 && aligned_to(gu.raw(), 16) && aligned_to(h.raw(), 8))
      glu_fwd_kernel<T, V><<<elementwise_grid(ctx, m * inner / V), 256, 0, ctx.stream()>>>(gu.data<T>(), m, inner,
                                                                                           alpha, limit, h.data<T>());
    else
      glu_fwd_kernel<T, 1><<<elementwise_grid(ctx, m * inner), 256, 0, ctx.stream()>>>(gu.data<T>(), m, inner, alpha,
                                                                                       limit, h.data<T>());
  });
  AM_CUDA_CHECK_LAUNCH();
}

void gpt_oss_glu_bwd(const Tensor& gu, const Tensor& dh, float alpha, float limit, Tensor& dgu, CudaContext& ctx) {
  const char* op = "gpt_oss_glu_bwd";
  need_cuda(op, "gu", gu);
  need_cuda(op, "dh", dh);
  need_cuda(op, "dgu", dgu);
  need_bf16_or_f32(op, "gu", gu);
  need_same_dtype(op, "gu", gu, "dh", dh);
  need_same_dtype(op, "gu", gu, "dgu", dgu);
  const auto [m, inner] = glu_dims(op, gu, "dh", dh);
  if (dgu.numel() != gu.numel() || dgu.dim(-1) != gu.dim(-1))
    op_error(op, describe("dgu", dgu) + ": expected the shape of " + describe("gu", gu));
  if (m == 0 || inner == 0) return;
  AM_DISPATCH_BF16_F32(gu.dtype(), op, T, {
    constexpr int V = 8 / static_cast<int>(sizeof(T));
    if (inner % V == 0 && aligned_to(gu.raw(), 16) && aligned_to(dgu.raw(), 16) && aligned_to(dh.raw(), 8))
      glu_bwd_kernel<T, V><<<elementwise_grid(ctx, m * inner / V), 256, 0, ctx.stream()>>>(
          gu.data<T>(), dh.data<T>(), m, inner, alpha, limit, dgu.data<T>());
    else
      glu_bwd_kernel<T, 1><<<elementwise_grid(ctx, m * inner), 256, 0, ctx.stream()>>>(
          gu.data<T>(), dh.data<T>(), m, inner, alpha, limit, dgu.data<T>());
  });
  AM_CUDA_CHECK_LAUNCH();
}

void grouped_bias_add(Tensor& y, const Tensor& bias, const Tensor& offsets, CudaContext& ctx) {
  const char* op = "grouped_bias_add";
  need_cuda(op, "y", y);
  need_cuda(op, "bias", bias);
  need_cuda(op, "offsets", offsets);
  need_bf16_or_f32(op, "y", y);
  need_bf16_or_f32(op, "bias", bias);
  const int64_t e = bias_dims(op, y, "y", bias, "bias", offsets);
  const int64_t c = y.dim(-1), rows = c ? y.numel() / c : 0;
  if (rows == 0 || c == 0) return;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(rows, int64_t(ctx.sm_count()) * 32));
  auto threads = [](int64_t vecs) { return static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, (vecs + 31) / 32 * 32))); };
  AM_DISPATCH_BF16_F32(y.dtype(), op, T, {
    AM_DISPATCH_BF16_F32(bias.dtype(), op, TB, {
      constexpr int V = 16 / static_cast<int>(sizeof(T));
      if ((c * static_cast<int64_t>(sizeof(T))) % 16 == 0 && aligned_to(y.raw(), 16))
        grouped_bias_add_kernel<T, TB, V><<<grid, threads(c / V), 0, ctx.stream()>>>(
            y.data<T>(), bias.data<TB>(), offsets.data<int32_t>(), static_cast<int>(e), rows, c);
      else
        grouped_bias_add_kernel<T, TB, 1><<<grid, threads(c), 0, ctx.stream()>>>(
            y.data<T>(), bias.data<TB>(), offsets.data<int32_t>(), static_cast<int>(e), rows, c);
    });
  });
  AM_CUDA_CHECK_LAUNCH();
}

void grouped_bias_bwd(const Tensor& dy, const Tensor& offsets, Tensor& dbias, CudaContext& ctx) {
  const char* op = "grouped_bias_bwd";
  need_cuda(op, "dy", dy);
  need_cuda(op, "offsets", offsets);
  need_cuda(op, "dbias", dbias);
  need_bf16_or_f32(op, "dy", dy);
  need_dtype(op, "dbias", dbias, DType::F32);
  const int64_t e = bias_dims(op, dy, "dy", dbias, "dbias", offsets);
  const int64_t c = dy.dim(-1), rows = c ? dy.numel() / c : 0;
  if (rows == 0 || c == 0) return;
  const dim3 grid(static_cast<unsigned>((c + 31) / 32), static_cast<unsigned>(e));
  AM_DISPATCH_BF16_F32(dy.dtype(), op, T, {
    grouped_bias_bwd_kernel<T><<<grid, dim3(32, kBwdRowsPerBlock), 0, ctx.stream()>>>(
        dy.data<T>(), offsets.data<int32_t>(), rows, c, dbias.data<float>());
  });
  AM_CUDA_CHECK_LAUNCH();
}

}  // namespace am::cuda
