// MoE kernels on CUDA (contracts in src/ops/moe_ops.h; entry points in moe.h; design and measurements in
// docs/moe_kernels.md). The grouped GEMMs live in moe_gemm.cu.
//
//   router fwd   one warp per token: E <= 1024 logits in registers (E/32 per lane), fp32 softmax, k rounds of
//                warp arg-max (ties: lower index), lane s keeps slot s (k <= 32), optional renormalisation.
//   router bwd   one warp per token: dprobs = dprobs_extra + scatter of the (renormalisation-adjusted) dtopk_w,
//                dlogits = p * (dprobs - <p, dprobs>).
//   plan         counting sort on the device in three launches, no host sync: (1) per-chunk (256 pairs)
//                expert histograms H[e][c] (shared-memory atomics), (2) one-block exclusive scan of H in
//                expert-major order, which is at once the expert offsets and each chunk's base position per
//                expert, (3) stable scatter: rank inside a warp by __match_any_sync, plus the counts of earlier
//                warps of the chunk (shared memory). Only host_counts copies anything back.
//   gather / gather_bwd / combine / combine_bwd: row kernels with 16-byte vectors (scalar fallback for odd
//                widths or misaligned views), fp32 math, fixed summation order over the k slots (deterministic).
//   swiglu_fused (declared in moe.h) is gated_act.cu's fused gated-activation kernel, shared with geglu_fused.
#include <algorithm>
#include <climits>
#include <string>
#include <type_traits>
#include <utility>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/kernel_utils.cuh"
#include "backend/cuda/moe.h"

namespace am::cuda {
namespace {

constexpr int kMaxExperts = 1024;  // router registers (32 per lane) and the plan's shared-memory tables
constexpr int kMaxTopk = 32;       // one slot per lane
constexpr int kChunk = 256;        // pairs per plan block (8 warps)
constexpr int kErrMoeExpert = 3;   // DeviceErrorSlot code: expert index outside [0, E)

// ---------------------------------------------------------------- router
template <typename TL, int VPL>
__global__ void router_fwd_kernel(const TL* __restrict__ logits, int64_t n, int e, int k, bool norm,
                                  float* __restrict__ probs, int32_t* __restrict__ topk_idx,
                                  float* __restrict__ topk_w) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t >= n) return;  // warp-uniform
  const TL* l = logits + t * e;
  float v[VPL];
  float mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const int c = lane + 32 * j;
    v[j] = c < e ? to_f(l[c]) : -INFINITY;
    mx = fmaxf(mx, v[j]);
  }
  mx = warp_max(mx);
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const int c = lane + 32 * j;
    v[j] = c < e ? expf(v[j] - mx) : 0.f;
    s += v[j];
  }
  s = warp_sum(s);
  float* p = probs + t * e;
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const int c = lane + 32 * j;
    v[j] = v[j] / s;
    if (c < e) p[c] = v[j];
    if (c >= e) v[j] = -2.f;  // never selected (k <= e); taken experts become -1
  }
  float my_val = 0.f;
  int my_idx = 0;
  for (int slot = 0; slot < k; ++slot) {
    float bv = -3.f;
    int bi = INT_MAX;
#pragma unroll
    for (int j = 0; j < VPL; ++j)
      if (v[j] > bv) {  // indices increase with j: strict '>' keeps the lower index
        bv = v[j];
        bi = lane + 32 * j;
      }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
      }
    }
    if (lane == slot) {
      my_val = bv;
      my_idx = bi;
    }
#pragma unroll
    for (int j = 0; j < VPL; ++j)
      if (lane + 32 * j == bi) v[j] = -1.f;
  }
  const float tot = warp_sum(lane < k ? my_val : 0.f);
  if (lane < k) {
    topk_idx[t * k + lane] = my_idx;
    topk_w[t * k + lane] = norm ? my_val / tot : my_val;
  }
}

template <typename TD, int VPL>
__global__ void router_bwd_kernel(const float* __restrict__ probs, const int32_t* __restrict__ topk_idx,
                                  const float* __restrict__ topk_w, bool norm, const float* __restrict__ dtopk_w,
                                  const float* __restrict__ dprobs_extra, int64_t n, int e, int k,
                                  TD* __restrict__ dlogits) {
  const int lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (t >= n) return;
  const float* p_row = probs + t * e;
  float p[VPL], dp[VPL];
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const int c = lane + 32 * j;
    p[j] = c < e ? p_row[c] : 0.f;
    dp[j] = (dprobs_extra && c < e) ? dprobs_extra[t * e + c] : 0.f;
  }
  int my_i = -1;
  float my_g = 0.f;
  if (lane < k) {
    my_i = topk_idx[t * k + lane];
    my_g = dtopk_w[t * k + lane];
  }
  if (norm) {
    const bool ok = lane < k && my_i >= 0 && my_i < e;
    const float S = warp_sum(ok ? p_row[my_i] : 0.f);
    const float c = warp_sum(lane < k ? my_g * topk_w[t * k + lane] : 0.f);
    my_g = (my_g - c) / S;
  }
  for (int slot = 0; slot < k; ++slot) {
    const int i = __shfl_sync(0xffffffffu, my_i, slot);
    const float g = __shfl_sync(0xffffffffu, my_g, slot);
#pragma unroll
    for (int j = 0; j < VPL; ++j)
      if (lane + 32 * j == i) dp[j] += g;
  }
  float dot = 0.f;
#pragma unroll
  for (int j = 0; j < VPL; ++j) dot += p[j] * dp[j];
  dot = warp_sum(dot);
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const int c = lane + 32 * j;
    if (c < e) dlogits[t * e + c] = from_f<TD>(p[j] * (dp[j] - dot));
  }
}

// Calls body with `constexpr int VPL` = the power of two >= ceil(e / 32).
template <typename F>
void with_vpl(int e, F&& body) {
  const int need = (e + 31) / 32;
  if (need <= 1) body(std::integral_constant<int, 1>{});
  else if (need <= 2) body(std::integral_constant<int, 2>{});
  else if (need <= 4) body(std::integral_constant<int, 4>{});
  else if (need <= 8) body(std::integral_constant<int, 8>{});
  else if (need <= 16) body(std::integral_constant<int, 16>{});
  else body(std::integral_constant<int, 32>{});
}

// ---------------------------------------------------------------- dispatch plan
// meta[0] = number of out-of-range ids, meta[1] = first such position (initialised to a large value).
__global__ void plan_count_kernel(const int32_t* __restrict__ idx, int64_t nk, int e, int64_t chunks,
                                  int32_t* __restrict__ hist_out, int32_t* __restrict__ meta, DeviceErrorSlot* slot) {
  extern __shared__ int hist[];
  for (int i = threadIdx.x; i < e; i += blockDim.x) hist[i] = 0;
  __syncthreads();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kChunk + threadIdx.x;
  if (i < nk) {
    const int v = idx[i];
    if (v >= 0 && v < e) {
      atomicAdd(&hist[v], 1);
    } else {
      atomicAdd(&meta[0], 1);
      atomicMin(&meta[1], static_cast<int>(i));
      report_device_error(slot, kErrMoeExpert, i, v);
    }
  }
  __syncthreads();
  for (int j = threadIdx.x; j < e; j += blockDim.x) hist_out[static_cast<int64_t>(j) * chunks + blockIdx.x] = hist[j];
}

// In-place exclusive scan of h[0, len) by one block of 1024 threads; writes offsets[0..e] (offsets[j] = h[j *
// chunks] after the scan = first grouped row of expert j; offsets[e] = total).
__global__ void plan_scan_kernel(int32_t* __restrict__ h, int64_t len, int e, int64_t chunks,
                                 int32_t* __restrict__ offsets) {
  __shared__ int warp_tot[32];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t per = (len + blockDim.x - 1) / blockDim.x;
  const int64_t b = tid * per, end = min(len, b + per);
  int local = 0;
  for (int64_t i = b; i < end; ++i) local += h[i];
  int incl = local;  // inclusive scan over the warp
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) warp_tot[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = lane < static_cast<int>(blockDim.x >> 5) ? warp_tot[lane] : 0;
    int wi = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, wi, o);
      if (lane >= o) wi += y;
    }
    warp_tot[lane] = wi - w;  // exclusive prefix of the warps
  }
  __syncthreads();
  int run = warp_tot[warp] + incl - local;
  for (int64_t i = b; i < end; ++i) {
    const int v = h[i];
    h[i] = run;
    run += v;
  }
  if (tid == blockDim.x - 1) offsets[e] = run;  // the last thread's running sum is the total
  __syncthreads();
  for (int j = tid; j < e; j += blockDim.x) offsets[j] = h[static_cast<int64_t>(j) * chunks];
}

__global__ void plan_scatter_kernel(const int32_t* __restrict__ idx, int64_t nk, int e, int64_t chunks,
                                    const int32_t* __restrict__ base, int32_t* __restrict__ perm,
                                    int32_t* __restrict__ inv_perm) {
  extern __shared__ int wc[];  // [kChunk / 32][e]: pairs per expert in each warp of the chunk
  constexpr int kWarps = kChunk / 32;
  for (int i = threadIdx.x; i < kWarps * e; i += blockDim.x) wc[i] = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kChunk + threadIdx.x;
  int v = i < nk ? idx[i] : -1;
  const bool valid = v >= 0 && v < e;
  if (!valid) v = -1;
  const unsigned mask = __match_any_sync(0xffffffffu, v);
  const int rank = __popc(mask & ((1u << lane) - 1u));
  if (valid && rank == 0) wc[warp * e + v] = __popc(mask);
  __syncthreads();
  if (valid) {
    int pos = base[static_cast<int64_t>(v) * chunks + blockIdx.x] + rank;
    for (int w = 0; w < warp; ++w) pos += wc[w * e + v];
    perm[pos] = static_cast<int32_t>(i);
    inv_perm[i] = pos;
  }
}

// ---------------------------------------------------------------- row kernels
template <typename T>
constexpr int vec_of() {
  return 16 / static_cast<int>(sizeof(T));
}
int threads_for(int64_t vecs_per_row) {
  int64_t t = (vecs_per_row + 31) / 32 * 32;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(t, 32), 256));
}
unsigned rows_grid(const CudaContext& ctx, int64_t rows) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(rows, int64_t(ctx.sm_count()) * 32)));
}

// xg[j] = x[perm[j] / k]
template <typename T, int VEC>
__global__ void gather_kernel(const T* __restrict__ x, const int32_t* __restrict__ perm, int k, int64_t rows,
                              int64_t h, T* __restrict__ xg) {
  for (int64_t j = blockIdx.x; j < rows; j += gridDim.x) {
    const T* src = x + static_cast<int64_t>(perm[j] / k) * h;
    T* dst = xg + j * h;
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < h; c += static_cast<int64_t>(blockDim.x) * VEC)
      store_vec<T, VEC>(dst + c, load_vec<T, VEC>(src + c));
  }
}

// out[t] = sum_s (w ? w[t, s] : 1) * src[inv[t*k + s]]   (gather_bwd without w, combine with w)
template <typename T, int VEC>
__global__ void reduce_kernel(const T* __restrict__ src, const int32_t* __restrict__ inv, const float* __restrict__ w,
                              int k, int64_t n, int64_t h, T* __restrict__ out) {
  for (int64_t t = blockIdx.x; t < n; t += gridDim.x) {
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < h; c += static_cast<int64_t>(blockDim.x) * VEC) {
      float acc[VEC];
#pragma unroll
      for (int q = 0; q < VEC; ++q) acc[q] = 0.f;
      for (int s = 0; s < k; ++s) {
        const int64_t j = inv[t * k + s];
        const float ws = w ? w[t * k + s] : 1.f;
        const Vec<T, VEC> v = load_vec<T, VEC>(src + j * h + c);
#pragma unroll
        for (int q = 0; q < VEC; ++q) acc[q] += ws * to_f(v.v[q]);
      }
      Vec<T, VEC> o;
#pragma unroll
      for (int q = 0; q < VEC; ++q) o.v[q] = from_f<T>(acc[q]);
      store_vec<T, VEC>(out + t * h + c, o);
    }
  }
}

// dyg[inv[t*k+s]] = w[t, s] * dy[t];  dw[t, s] = <yg[inv[t*k+s]], dy[t]>
template <typename T, int VEC>
__global__ void combine_bwd_kernel(const T* __restrict__ yg, const int32_t* __restrict__ inv,
                                   const float* __restrict__ w, const T* __restrict__ dy, int k, int64_t n, int64_t h,
                                   T* __restrict__ dyg, float* __restrict__ dw) {
  __shared__ float scratch[32];
  for (int64_t t = blockIdx.x; t < n; t += gridDim.x) {
    for (int s = 0; s < k; ++s) {
      const int64_t j = inv[t * k + s];
      const float ws = w[t * k + s];
      float part = 0.f;
      for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < h; c += static_cast<int64_t>(blockDim.x) * VEC) {
        const Vec<T, VEC> d = load_vec<T, VEC>(dy + t * h + c);
        const Vec<T, VEC> y = load_vec<T, VEC>(yg + j * h + c);
        Vec<T, VEC> o;
#pragma unroll
        for (int q = 0; q < VEC; ++q) {
          const float dv = to_f(d.v[q]);
          part += to_f(y.v[q]) * dv;
          o.v[q] = from_f<T>(ws * dv);
        }
        store_vec<T, VEC>(dyg + j * h + c, o);
      }
      const float tot = block_sum(part, scratch);
      if (threadIdx.x == 0) dw[t * k + s] = tot;
    }
  }
}

// ---------------------------------------------------------------- host helpers
void need_same_dtype(const char* op, const char* a_name, const Tensor& a, const char* b_name, const Tensor& b) {
  if (a.dtype() != b.dtype())
    op_error(op, describe(b_name, b) + ": expected the dtype of " + describe(a_name, a));
}
int64_t rows_last(const char* op, const char* name, const Tensor& t, int64_t last) {
  if (t.ndim() < 2 || t.dim(-1) != last)
    op_error(op, describe(name, t) + ": expected [N, " + std::to_string(last) + "]");
  return last ? t.numel() / last : 0;
}
// Whether rows of width h of these tensors can move as 16-byte vectors.
bool vec_ok(int64_t h, size_t elem, std::initializer_list<const void*> ptrs) {
  if ((h * static_cast<int64_t>(elem)) % 16 != 0) return false;
  for (const void* p : ptrs)
    if (!aligned_to(p, 16)) return false;
  return true;
}

}  // namespace

// ================================================================ entry points

void moe_router_fwd(const Tensor& logits, int64_t k, bool norm_topk_prob, Tensor& probs, Tensor& topk_idx,
                    Tensor& topk_w, CudaContext& ctx) {
  const char* op = "moe_router_fwd";
  for (auto [n, t] : {std::pair<const char*, const Tensor*>{"logits", &logits}, {"probs", &probs},
                      {"topk_idx", &topk_idx}, {"topk_w", &topk_w}})
    need_cuda(op, n, *t);
  need_dtype(op, "probs", probs, DType::F32);
  need_dtype(op, "topk_idx", topk_idx, DType::I32);
  need_dtype(op, "topk_w", topk_w, DType::F32);
  if (logits.ndim() < 2) op_error(op, describe("logits", logits) + ": expected [N, E]");
  const int64_t e = logits.dim(-1), n = e ? logits.numel() / e : 0;
  if (e < 1 || e > kMaxExperts) op_error(op, "E = " + std::to_string(e) + " must be in [1, 1024] on CUDA");
  if (k < 1 || k > e || k > kMaxTopk) op_error(op, "k = " + std::to_string(k) + " must be in [1, min(E, 32)]");
  if (probs.numel() != n * e || topk_idx.numel() != n * k || topk_w.numel() != n * k)
    op_error(op, "probs/topk_idx/topk_w sizes do not match " + describe("logits", logits) + " and k");
  if (n == 0) return;
  constexpr int kWarps = 4;
  const unsigned grid = static_cast<unsigned>((n + kWarps - 1) / kWarps);
  AM_DISPATCH_BF16_F32(logits.dtype(), op, TL, {
    with_vpl(static_cast<int>(e), [&](auto vpl) {
      router_fwd_kernel<TL, decltype(vpl)::value><<<grid, 32 * kWarps, 0, ctx.stream()>>>(
          logits.data<TL>(), n, static_cast<int>(e), static_cast<int>(k), norm_topk_prob, probs.data<float>(),
          topk_idx.data<int32_t>(), topk_w.data<float>());
    });
  });
  AM_CUDA_CHECK_LAUNCH();
}

void moe_router_bwd(const Tensor& probs, const Tensor& topk_idx, const Tensor& topk_w, bool norm_topk_prob,
                    const Tensor& dtopk_w, const Tensor* dprobs_extra, Tensor& dlogits, CudaContext& ctx) {
  const char* op = "moe_router_bwd";
  for (auto [nm, t] : {std::pair<const char*, const Tensor*>{"probs", &probs}, {"topk_idx", &topk_idx},
                       {"topk_w", &topk_w}, {"dtopk_w", &dtopk_w}, {"dlogits", &dlogits}})
    need_cuda(op, nm, *t);
  need_dtype(op, "probs", probs, DType::F32);
  need_dtype(op, "topk_idx", topk_idx, DType::I32);
  need_dtype(op, "topk_w", topk_w, DType::F32);
  need_dtype(op, "dtopk_w", dtopk_w, DType::F32);
  if (probs.ndim() < 2 || topk_idx.ndim() < 2) op_error(op, "expected probs [N, E] and topk_idx [N, k]");
  const int64_t e = probs.dim(-1), n = e ? probs.numel() / e : 0, k = topk_idx.dim(-1);
  if (e < 1 || e > kMaxExperts) op_error(op, "E = " + std::to_string(e) + " must be in [1, 1024] on CUDA");
  if (k < 1 || k > e || k > kMaxTopk) op_error(op, "k = " + std::to_string(k) + " must be in [1, min(E, 32)]");
  if (topk_idx.numel() != n * k || topk_w.numel() != n * k || dtopk_w.numel() != n * k || dlogits.numel() != n * e)
    op_error(op, "topk_idx/topk_w/dtopk_w/dlogits sizes do not match " + describe("probs", probs));
  if (dprobs_extra) {
    need_cuda(op, "dprobs_extra", *dprobs_extra);
    need_dtype(op, "dprobs_extra", *dprobs_extra, DType::F32);
    if (dprobs_extra->numel() != n * e) op_error(op, describe("dprobs_extra", *dprobs_extra) + ": expected [N, E]");
  }
  if (n == 0) return;
  constexpr int kWarps = 4;
  const unsigned grid = static_cast<unsigned>((n + kWarps - 1) / kWarps);
  AM_DISPATCH_BF16_F32(dlogits.dtype(), op, TD, {
    with_vpl(static_cast<int>(e), [&](auto vpl) {
      router_bwd_kernel<TD, decltype(vpl)::value><<<grid, 32 * kWarps, 0, ctx.stream()>>>(
          probs.data<float>(), topk_idx.data<int32_t>(), topk_w.data<float>(), norm_topk_prob, dtopk_w.data<float>(),
          dprobs_extra ? dprobs_extra->data<float>() : nullptr, n, static_cast<int>(e), static_cast<int>(k),
          dlogits.data<TD>());
    });
  });
  AM_CUDA_CHECK_LAUNCH();
}

void moe_dispatch_plan(const Tensor& topk_idx, int64_t num_experts, Tensor& offsets, Tensor& perm, Tensor& inv_perm,
                       std::vector<int64_t>* host_counts, CudaContext& ctx) {
  const char* op = "moe_dispatch_plan";
  for (auto [nm, t] : {std::pair<const char*, const Tensor*>{"topk_idx", &topk_idx}, {"offsets", &offsets},
                       {"perm", &perm}, {"inv_perm", &inv_perm}}) {
    need_cuda(op, nm, *t);
    need_dtype(op, nm, *t, DType::I32);
  }
  const int64_t e = num_experts, nk = topk_idx.numel();
  if (e < 1 || e > kMaxExperts) op_error(op, "num_experts = " + std::to_string(e) + " must be in [1, 1024] on CUDA");
  if (nk > INT_MAX) op_error(op, "N*k = " + std::to_string(nk) + " exceeds the int32 range");
  if (offsets.numel() != e + 1 || perm.numel() != nk || inv_perm.numel() != nk)
    op_error(op, "offsets must have E + 1 elements and perm/inv_perm N*k");
  if (nk == 0) {
    AM_CUDA_CHECK(cudaMemsetAsync(offsets.raw(), 0, offsets.nbytes(), ctx.stream()));
    if (host_counts) host_counts->assign(static_cast<size_t>(e), 0);
    return;
  }
  const int64_t chunks = (nk + kChunk - 1) / kChunk;
  Tensor scratch = empty({e * chunks + 2}, DType::I32, ctx);
  int32_t* hist = scratch.data<int32_t>();
  int32_t* meta = hist + e * chunks;
  AM_CUDA_CHECK(cudaMemsetAsync(meta, 0x7f, 2 * sizeof(int32_t), ctx.stream()));  // meta[1] = 0x7f7f7f7f
  AM_CUDA_CHECK(cudaMemsetAsync(meta, 0, sizeof(int32_t), ctx.stream()));
  const size_t smem_count = static_cast<size_t>(e) * sizeof(int);
  const size_t smem_scatter = static_cast<size_t>(kChunk / 32) * e * sizeof(int);
  plan_count_kernel<<<static_cast<unsigned>(chunks), kChunk, smem_count, ctx.stream()>>>(
      topk_idx.data<int32_t>(), nk, static_cast<int>(e), chunks, hist, meta, host_counts ? nullptr : ctx.error_slot());
  AM_CUDA_CHECK_LAUNCH();
  plan_scan_kernel<<<1, 1024, 0, ctx.stream()>>>(hist, e * chunks, static_cast<int>(e), chunks,
                                                  offsets.data<int32_t>());
  AM_CUDA_CHECK_LAUNCH();
  plan_scatter_kernel<<<static_cast<unsigned>(chunks), kChunk, smem_scatter, ctx.stream()>>>(
      topk_idx.data<int32_t>(), nk, static_cast<int>(e), chunks, hist, perm.data<int32_t>(), inv_perm.data<int32_t>());
  AM_CUDA_CHECK_LAUNCH();
  if (!host_counts) return;
  std::vector<int32_t> off(static_cast<size_t>(e + 1));
  int32_t m[2] = {0, 0};
  AM_CUDA_CHECK(cudaMemcpyAsync(off.data(), offsets.raw(), off.size() * sizeof(int32_t), cudaMemcpyDeviceToHost,
                                ctx.stream()));
  AM_CUDA_CHECK(cudaMemcpyAsync(m, meta, sizeof m, cudaMemcpyDeviceToHost, ctx.stream()));
  AM_CUDA_CHECK(cudaStreamSynchronize(ctx.stream()));
  if (m[0] > 0) {
    int32_t bad = 0;
    AM_CUDA_CHECK(cudaMemcpy(&bad, topk_idx.data<int32_t>() + m[1], sizeof bad, cudaMemcpyDeviceToHost));
    throw DataError(std::string("cuda op ") + op + ": expert index " + std::to_string(bad) + " at position " +
                    std::to_string(m[1]) + " of topk_idx is outside [0, num_experts = " + std::to_string(e) + ")");
  }
  host_counts->resize(static_cast<size_t>(e));
  for (int64_t j = 0; j < e; ++j) (*host_counts)[static_cast<size_t>(j)] = off[j + 1] - off[j];
}

void moe_gather(const Tensor& x, const Tensor& perm, int64_t k, Tensor& xg, CudaContext& ctx) {
  const char* op = "moe_gather";
  need_cuda(op, "x", x);
  need_cuda(op, "perm", perm);
  need_cuda(op, "xg", xg);
  need_dtype(op, "perm", perm, DType::I32);
  need_same_dtype(op, "x", x, "xg", xg);
  if (x.ndim() < 2 || k < 1) op_error(op, describe("x", x) + ": expected [N, H] and k >= 1");
  const int64_t h = x.dim(-1), n = h ? x.numel() / h : 0, rows = n * k;
  if (perm.numel() != rows || rows_last(op, "xg", xg, h) != rows) op_error(op, "perm/xg do not have N*k rows");
  if (rows == 0 || h == 0) return;
  AM_DISPATCH_BF16_F32(x.dtype(), op, T, {
    constexpr int V = vec_of<T>();
    if (vec_ok(h, sizeof(T), {x.raw(), xg.raw()}))
      gather_kernel<T, V><<<rows_grid(ctx, rows), threads_for(h / V), 0, ctx.stream()>>>(
          x.data<T>(), perm.data<int32_t>(), static_cast<int>(k), rows, h, xg.data<T>());
    else
      gather_kernel<T, 1><<<rows_grid(ctx, rows), threads_for(h), 0, ctx.stream()>>>(
          x.data<T>(), perm.data<int32_t>(), static_cast<int>(k), rows, h, xg.data<T>());
  });
  AM_CUDA_CHECK_LAUNCH();
}

namespace {
void launch_reduce(const char* op, const Tensor& src, const Tensor& inv, const float* w, int64_t k, Tensor& out,
                   CudaContext& ctx) {
  const int64_t h = out.dim(-1), n = h ? out.numel() / h : 0;
  if (n == 0 || h == 0) return;
  AM_DISPATCH_BF16_F32(src.dtype(), op, T, {
    constexpr int V = vec_of<T>();
    if (vec_ok(h, sizeof(T), {src.raw(), out.raw()}))
      reduce_kernel<T, V><<<rows_grid(ctx, n), threads_for(h / V), 0, ctx.stream()>>>(
          src.data<T>(), inv.data<int32_t>(), w, static_cast<int>(k), n, h, out.data<T>());
    else
      reduce_kernel<T, 1><<<rows_grid(ctx, n), threads_for(h), 0, ctx.stream()>>>(
          src.data<T>(), inv.data<int32_t>(), w, static_cast<int>(k), n, h, out.data<T>());
  });
  AM_CUDA_CHECK_LAUNCH();
}
}  // namespace

void moe_gather_bwd(const Tensor& dxg, const Tensor& inv_perm, int64_t k, Tensor& dx, CudaContext& ctx) {
  const char* op = "moe_gather_bwd";
  need_cuda(op, "dxg", dxg);
  need_cuda(op, "inv_perm", inv_perm);
  need_cuda(op, "dx", dx);
  need_dtype(op, "inv_perm", inv_perm, DType::I32);
  need_same_dtype(op, "dxg", dxg, "dx", dx);
  if (dx.ndim() < 2 || k < 1) op_error(op, describe("dx", dx) + ": expected [N, H] and k >= 1");
  const int64_t h = dx.dim(-1), n = h ? dx.numel() / h : 0;
  if (inv_perm.numel() != n * k || rows_last(op, "dxg", dxg, h) != n * k)
    op_error(op, "inv_perm/dxg do not have N*k rows");
  launch_reduce(op, dxg, inv_perm, nullptr, k, dx, ctx);
}

void moe_combine(const Tensor& yg, const Tensor& inv_perm, const Tensor& topk_w, Tensor& y, CudaContext& ctx) {
  const char* op = "moe_combine";
  need_cuda(op, "yg", yg);
  need_cuda(op, "inv_perm", inv_perm);
  need_cuda(op, "topk_w", topk_w);
  need_cuda(op, "y", y);
  need_dtype(op, "inv_perm", inv_perm, DType::I32);
  need_dtype(op, "topk_w", topk_w, DType::F32);
  need_same_dtype(op, "yg", yg, "y", y);
  if (y.ndim() < 2 || topk_w.ndim() < 2) op_error(op, "expected y [N, H] and topk_w [N, k]");
  const int64_t h = y.dim(-1), n = h ? y.numel() / h : 0, k = topk_w.dim(-1);
  if (k < 1 || topk_w.numel() != n * k || inv_perm.numel() != n * k || rows_last(op, "yg", yg, h) != n * k)
    op_error(op, "topk_w/inv_perm/yg do not match " + describe("y", y));
  launch_reduce(op, yg, inv_perm, topk_w.data<float>(), k, y, ctx);
}

void moe_combine_bwd(const Tensor& yg, const Tensor& inv_perm, const Tensor& topk_w, const Tensor& dy, Tensor& dyg,
                     Tensor& dtopk_w, CudaContext& ctx) {
  const char* op = "moe_combine_bwd";
  for (auto [nm, t] : {std::pair<const char*, const Tensor*>{"yg", &yg}, {"inv_perm", &inv_perm},
                       {"topk_w", &topk_w}, {"dy", &dy}, {"dyg", &dyg}, {"dtopk_w", &dtopk_w}})
    need_cuda(op, nm, *t);
  need_dtype(op, "inv_perm", inv_perm, DType::I32);
  need_dtype(op, "topk_w", topk_w, DType::F32);
  need_dtype(op, "dtopk_w", dtopk_w, DType::F32);
  need_same_dtype(op, "yg", yg, "dy", dy);
  need_same_dtype(op, "yg", yg, "dyg", dyg);
  if (dy.ndim() < 2 || topk_w.ndim() < 2) op_error(op, "expected dy [N, H] and topk_w [N, k]");
  const int64_t h = dy.dim(-1), n = h ? dy.numel() / h : 0, k = topk_w.dim(-1);
  if (k < 1 || topk_w.numel() != n * k || dtopk_w.numel() != n * k || inv_perm.numel() != n * k ||
      rows_last(op, "yg", yg, h) != n * k || rows_last(op, "dyg", dyg, h) != n * k)
    op_error(op, "topk_w/dtopk_w/inv_perm/yg/dyg do not match " + describe("dy", dy));
  if (n == 0) return;
  if (h == 0) {
    AM_CUDA_CHECK(cudaMemsetAsync(dtopk_w.raw(), 0, dtopk_w.nbytes(), ctx.stream()));
    return;
  }
  AM_DISPATCH_BF16_F32(yg.dtype(), op, T, {
    constexpr int V = vec_of<T>();
    if (vec_ok(h, sizeof(T), {yg.raw(), dy.raw(), dyg.raw()}))
      combine_bwd_kernel<T, V><<<rows_grid(ctx, n), threads_for(h / V), 0, ctx.stream()>>>(
          yg.data<T>(), inv_perm.data<int32_t>(), topk_w.data<float>(), dy.data<T>(), static_cast<int>(k), n, h,
          dyg.data<T>(), dtopk_w.data<float>());
    else
      combine_bwd_kernel<T, 1><<<rows_grid(ctx, n), threads_for(h), 0, ctx.stream()>>>(
          yg.data<T>(), inv_perm.data<int32_t>(), topk_w.data<float>(), dy.data<T>(), static_cast<int>(k), n, h,
          dyg.data<T>(), dtopk_w.data<float>());
  });
  AM_CUDA_CHECK_LAUNCH();
}

}  // namespace am::cuda
