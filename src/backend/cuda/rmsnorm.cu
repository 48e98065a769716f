// RMSNorm (HF LlamaRMSNorm): y = (x * rstd) * w, rstd = 1 / sqrt(mean(x^2) + eps), fp32 math.
//
// Layout: one block per row; thread t owns the CH column vectors (c * blockDim + t) * VEC .. + VEC, so a
// row is read once into registers (VEC = 16 bytes of T), reduced across the block, and written once.
// W1: H = 2048 bf16 -> 128 threads, VEC 8, CH 2 (two 16-byte loads in flight per thread; the first version
// with 256 threads x 1 load reached 62% / 47% of the copy bandwidth forward / backward).
//
// Backward with r = rstd, xh = x r:
//   dx = r w dy - (r^3 / H) x sum_j(dy_j w_j x_j)       (assigned)
//   dw += sum_rows dy xh                                 (accumulated)
// dw without atomics: a persistent grid of G blocks walks the rows (row = b, b + G, ...); each thread keeps
// the dw partial of its own columns in registers, writes it to partial [G, H] fp32 at the end, and a second
// kernel sums the G partials in a fixed order into dw. Deterministic for a given grid size.
// A frozen weight (dw undefined) launches the same row kernels with partial = nullptr: no partials are
// accumulated or written and the column-sum kernel does not run (dx only).
//
// Rows too long for registers (the shape search finds no block that holds the row: on sm_90 the fp32
// backward above H = 8192, the bf16 backward above 16384, the forward above ~30K fp32 / ~40K bf16) take the
// looped path: a block walks its row in chunks of kLoopThreads x VEC x unroll columns, twice (sum of squares
// or dot, then the outputs; the second pass re-reads the row from L1/L2). The backward keeps the dw partial
// of a thread's columns in the block's row of `partial` in global memory (read-modify-write per row; only
// that thread touches those columns), then the same fixed-order column sum: deterministic, any H.
//
// Mixed dtypes (the fp32 residual stream of ExecContext::residual_dtype): forward x fp32 -> y bf16 (the next
// matmul's input), backward x fp32, dy bf16 (that matmul's input gradient) -> dx fp32. The kernels take the
// output / gradient types as template parameters; the same-dtype instances are the ones used before.
//
// The fused residual add (add_rmsnorm.cu, ops.h add_rmsnorm_bwd): the backward instances with ADD = true also read
// dres [N, H] (dx's dtype) and store dx = dres + (the dx above), rounded to dx's dtype first as rmsnorm_bwd + add_
// round, with the grid, block shape and reduction order the plain backward picks for the same tensors (the shape is
// chosen with the plain instances' limits): bit-identical to those two kernels, one [N, H] write and read fewer.
#include <algorithm>
#include <mutex>
#include <type_traits>
#include <unordered_map>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/kernel_utils.cuh"
#include "backend/cuda/rmsnorm_internal.h"
#include "backend/cuda/tuning.h"

namespace am::cuda {
namespace {

template <typename T, typename TW, typename TY, int VEC, int CH>
__global__ void rmsnorm_fwd_kernel(const T* __restrict__ x, const TW* __restrict__ w, float eps,
                                   TY* __restrict__ y, float* __restrict__ rstd, int64_t h) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * h;
  TY* yr = y + row * h;
  float xv[CH][VEC];
  float ss = 0.f;
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const int64_t col = (static_cast<int64_t>(c) * blockDim.x + threadIdx.x) * VEC;
    if (col < h) {
      const Vec<T, VEC> v = load_vec<T, VEC>(xr + col);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        xv[c][k] = to_f(v.v[k]);
        ss += xv[c][k] * xv[c][k];
      }
    }
  }
  ss = block_sum(ss, scratch);
  const float r = 1.0f / sqrtf(ss / static_cast<float>(h) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const int64_t col = (static_cast<int64_t>(c) * blockDim.x + threadIdx.x) * VEC;
    if (col < h) {
      const Vec<TW, VEC> wv = load_vec<TW, VEC>(w + col);
      Vec<TY, VEC> o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) o.v[k] = from_f<TY>((xv[c][k] * r) * to_f(wv.v[k]));
      store_vec<TY, VEC>(yr + col, o);
    }
  }
}

// ADD: dx = dres + (the RMSNorm dx), dres [N, H] TD (not overlapping dx); unused (null) otherwise.
template <typename T, typename TW, typename TG, typename TD, int VEC, int CH, bool PF, bool ADD = false>
__global__ void rmsnorm_bwd_kernel(const T* __restrict__ x, const TW* __restrict__ w, const float* __restrict__ rstd,
                                   const TG* __restrict__ dy, TD* __restrict__ dx, const TD* __restrict__ dres,
                                   float* __restrict__ partial, int64_t n, int64_t h) {
  __shared__ float scratch[32];
  const bool want_dw = partial != nullptr;  // null: frozen weight (dx only)
  float wv[CH][VEC], dwacc[CH][VEC];
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const int64_t col = (static_cast<int64_t>(c) * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      wv[c][k] = 0.f;
      dwacc[c][k] = 0.f;
    }
    if (col < h) {
      const Vec<TW, VEC> v = load_vec<TW, VEC>(w + col);
#pragma unroll
      for (int k = 0; k < VEC; ++k) wv[c][k] = to_f(v.v[k]);
    }
  }
  const float inv_h = 1.0f / static_cast<float>(h);
  // Raw 16-byte vectors of the row being processed. With PF (prefetch) the next row's loads are issued
  // right after the current row is converted, so they are in flight during the block reduction and the
  // stores of the current row.
  Vec<T, VEC> xa[CH];
  Vec<TG, VEC> ga[CH];
  auto load_row = [&](int64_t row) {
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      const int64_t col = (static_cast<int64_t>(c) * blockDim.x + threadIdx.x) * VEC;
      if (col < h) {
        xa[c] = load_vec<T, VEC>(x + row * h + col);
        ga[c] = load_vec<TG, VEC>(dy + row * h + col);
      }
    }
  };
  if (PF && static_cast<int64_t>(blockIdx.x) < n) load_row(blockIdx.x);
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    if (!PF) load_row(row);
    const float r = rstd[row];
    float xv[CH][VEC], gv[CH][VEC];
    float dot = 0.f;
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      const int64_t col = (static_cast<int64_t>(c) * blockDim.x + threadIdx.x) * VEC;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        xv[c][k] = col < h ? to_f(xa[c].v[k]) : 0.f;
        gv[c][k] = col < h ? to_f(ga[c].v[k]) : 0.f;
        dot += gv[c][k] * wv[c][k] * xv[c][k];
      }
    }
    if (PF && row + gridDim.x < n) load_row(row + gridDim.x);
    dot = block_sum(dot, scratch);
    const float coef = r * r * r * dot * inv_h;
    TD* dxr = dx + row * h;
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      const int64_t col = (static_cast<int64_t>(c) * blockDim.x + threadIdx.x) * VEC;
      if (col < h) {
        Vec<TD, VEC> o, rv;
        if constexpr (ADD) rv = load_vec<TD, VEC>(dres + row * h + col);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          o.v[k] = from_f<TD>(r * wv[c][k] * gv[c][k] - coef * xv[c][k]);
          if constexpr (ADD) o.v[k] = from_f<TD>(to_f(o.v[k]) + to_f(rv.v[k]));  // add_'s rounding
          if (want_dw) dwacc[c][k] += gv[c][k] * xv[c][k] * r;
        }
        store_vec<TD, VEC>(dxr + col, o);
      }
    }
  }
  if (!want_dw) return;
  float* pr = partial + static_cast<int64_t>(blockIdx.x) * h;
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const int64_t col = (static_cast<int64_t>(c) * blockDim.x + threadIdx.x) * VEC;
    if (col < h) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) pr[col + k] = dwacc[c][k];
    }
  }
}

// ---- looped path (any H) ----
constexpr int kLoopThreads = 512;  // threads per row block
// Vectors per thread in flight per chunk, as many as fit without spilling: forward at <= 64 registers (2
// blocks per SM), backward (4 arrays per vector: x, dy, w and the fp32 dw partial) at <= 128.
template <int VEC>
constexpr int loop_unroll_fwd() { return VEC >= 8 ? 2 : 4; }
template <int VEC>
constexpr int loop_unroll_bwd() { return VEC >= 8 ? 1 : 2; }

template <typename T, typename TW, typename TY, int VEC>
__global__ void __launch_bounds__(kLoopThreads, 2) rmsnorm_fwd_looped_kernel(const T* __restrict__ x,
                                                                          const TW* __restrict__ w, float eps,
                                                                          TY* __restrict__ y,
                                                                          float* __restrict__ rstd, int64_t h) {
  __shared__ float scratch[32];
  constexpr int kLoopUnroll = loop_unroll_fwd<VEC>();
  const int64_t row = blockIdx.x;
  const T* xr = x + row * h;
  TY* yr = y + row * h;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * VEC;
  float ss = 0.f;
  for (int64_t base = static_cast<int64_t>(threadIdx.x) * VEC; base < h; base += kLoopUnroll * stride) {
    Vec<T, VEC> v[kLoopUnroll];
#pragma unroll
    for (int u = 0; u < kLoopUnroll; ++u)
      if (base + u * stride < h) v[u] = load_vec<T, VEC>(xr + base + u * stride);
#pragma unroll
    for (int u = 0; u < kLoopUnroll; ++u)
      if (base + u * stride < h) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float f = to_f(v[u].v[k]);
          ss += f * f;
        }
      }
  }
  ss = block_sum(ss, scratch);
  const float r = 1.0f / sqrtf(ss / static_cast<float>(h) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int64_t base = static_cast<int64_t>(threadIdx.x) * VEC; base < h; base += kLoopUnroll * stride) {
    Vec<T, VEC> v[kLoopUnroll];
    Vec<TW, VEC> wv[kLoopUnroll];
#pragma unroll
    for (int u = 0; u < kLoopUnroll; ++u)
      if (base + u * stride < h) {
        v[u] = load_vec<T, VEC>(xr + base + u * stride);
        wv[u] = load_vec<TW, VEC>(w + base + u * stride);
      }
#pragma unroll
    for (int u = 0; u < kLoopUnroll; ++u)
      if (base + u * stride < h) {
        Vec<TY, VEC> o;
#pragma unroll
        for (int k = 0; k < VEC; ++k) o.v[k] = from_f<TY>((to_f(v[u].v[k]) * r) * to_f(wv[u].v[k]));
        store_vec<TY, VEC>(yr + base + u * stride, o);
      }
  }
}

// Persistent grid as in the fast backward; the dw partial of the block is its row of `partial` [G, H],
// assigned by the block's first row and accumulated by the next ones (each column by one thread only);
// partial = nullptr (frozen weight): dx only.
// ADD: as rmsnorm_bwd_kernel's.
template <typename T, typename TW, typename TG, typename TD, int VEC, bool ADD = false>
__global__ void __launch_bounds__(kLoopThreads) rmsnorm_bwd_looped_kernel(
    const T* __restrict__ x, const TW* __restrict__ w, const float* __restrict__ rstd, const TG* __restrict__ dy,
    TD* __restrict__ dx, const TD* __restrict__ dres, float* __restrict__ partial, int64_t n, int64_t h) {
  __shared__ float scratch[32];
  constexpr int kLoopUnrollBwd = loop_unroll_bwd<VEC>();
  const int64_t stride = static_cast<int64_t>(blockDim.x) * VEC;
  const float inv_h = 1.0f / static_cast<float>(h);
  const bool want_dw = partial != nullptr;
  float* pr = want_dw ? partial + static_cast<int64_t>(blockIdx.x) * h : nullptr;
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const bool first = row == static_cast<int64_t>(blockIdx.x);
    const T* xr = x + row * h;
    const TG* gr = dy + row * h;
    TD* dxr = dx + row * h;
    const float r = rstd[row];
    float dot = 0.f;
    for (int64_t base = static_cast<int64_t>(threadIdx.x) * VEC; base < h; base += kLoopUnrollBwd * stride) {
      Vec<T, VEC> xv[kLoopUnrollBwd];
      Vec<TG, VEC> gv[kLoopUnrollBwd];
      Vec<TW, VEC> wv[kLoopUnrollBwd];
#pragma unroll
      for (int u = 0; u < kLoopUnrollBwd; ++u)
        if (base + u * stride < h) {
          xv[u] = load_vec<T, VEC>(xr + base + u * stride);
          gv[u] = load_vec<TG, VEC>(gr + base + u * stride);
          wv[u] = load_vec<TW, VEC>(w + base + u * stride);
        }
#pragma unroll
      for (int u = 0; u < kLoopUnrollBwd; ++u)
        if (base + u * stride < h) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) dot += to_f(gv[u].v[k]) * to_f(wv[u].v[k]) * to_f(xv[u].v[k]);
        }
    }
    dot = block_sum(dot, scratch);
    const float coef = r * r * r * dot * inv_h;
    for (int64_t base = static_cast<int64_t>(threadIdx.x) * VEC; base < h; base += kLoopUnrollBwd * stride) {
      Vec<T, VEC> xv[kLoopUnrollBwd];
      Vec<TG, VEC> gv[kLoopUnrollBwd];
      Vec<TW, VEC> wv[kLoopUnrollBwd];
      Vec<float, VEC> pv[kLoopUnrollBwd];
      Vec<TD, VEC> rv[kLoopUnrollBwd];
#pragma unroll
      for (int u = 0; u < kLoopUnrollBwd; ++u)
        if (base + u * stride < h) {
          xv[u] = load_vec<T, VEC>(xr + base + u * stride);
          gv[u] = load_vec<TG, VEC>(gr + base + u * stride);
          wv[u] = load_vec<TW, VEC>(w + base + u * stride);
          if (want_dw && !first) pv[u] = load_vec<float, VEC>(pr + base + u * stride);
          if constexpr (ADD) rv[u] = load_vec<TD, VEC>(dres + row * h + base + u * stride);
        }
#pragma unroll
      for (int u = 0; u < kLoopUnrollBwd; ++u)
        if (base + u * stride < h) {
          Vec<TD, VEC> o;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const float xf = to_f(xv[u].v[k]), gf = to_f(gv[u].v[k]);
            o.v[k] = from_f<TD>(r * to_f(wv[u].v[k]) * gf - coef * xf);
            if constexpr (ADD) o.v[k] = from_f<TD>(to_f(o.v[k]) + to_f(rv[u].v[k]));  // add_'s rounding
            const float c = gf * xf * r;
            if (want_dw) pv[u].v[k] = first ? c : pv[u].v[k] + c;
          }
          store_vec<TD, VEC>(dxr + base + u * stride, o);
          if (want_dw) store_vec<float, VEC>(pr + base + u * stride, pv[u]);
        }
    }
  }
}

// dw [H] += sum over g of partial [G, H]; block (32, LANES): 32 columns, LANES row lanes each summing
// every LANES-th partial row (4 loads in flight), then a fixed-order sum over the lanes: deterministic.
template <int LANES>
__global__ void column_sum_add_kernel(const float* __restrict__ partial, float* __restrict__ dw, int64_t g,
                                      int64_t h) {
  __shared__ float part[LANES][33];
  const int64_t col = blockIdx.x * 32 + threadIdx.x;
  float acc = 0.f;
  if (col < h) {
    float a[4] = {0.f, 0.f, 0.f, 0.f};
    int64_t r = threadIdx.y;
    for (; r + 3 * LANES < g; r += 4 * LANES) {
#pragma unroll
      for (int u = 0; u < 4; ++u) a[u] += partial[(r + u * LANES) * h + col];
    }
    for (; r < g; r += LANES) a[0] += partial[r * h + col];
    acc = (a[0] + a[1]) + (a[2] + a[3]);
  }
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < h) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < LANES; ++k) s += part[k][threadIdx.x];
    dw[col] += s;
  }
}

// Launch shape: VEC from the dtype (16 bytes) when H and every pointer allow it, else 1. CH (column
// vectors per thread, in {1, 2, 4, 8}) is the fewest that keep the block at <= `target` threads, so each
// thread has CH independent 16-byte loads in flight before the row reduction (memory-level parallelism;
// W1 H = 2048 bf16: 128 threads x 2 vectors). max_ch caps CH while the block can still grow (the backward
// keeps 6 row arrays per thread: CH 8 spills). `limit(vec, ch)` is the most threads the kernel instance
// can launch with (its register count decides: e.g. the bf16 backward with CH 2 uses 122 registers, so at
// most 512 threads).
using rms::Shape;
using rms::with_shape;
using rms::kernel_max_threads;
// Returns false when no block holds the row (then the caller takes the looped path).
template <typename Limit>
bool pick(Shape& s, int64_t h, int natural_vec, bool vec_ok, int64_t target, int max_ch, Limit&& limit) {
  s.vec = vec_ok && h % natural_vec == 0 ? natural_vec : 1;
  const int64_t vecs = (h + s.vec - 1) / s.vec;
  for (s.ch = 1; s.ch <= 8; s.ch *= 2) {
    const int64_t raw = (vecs + s.ch - 1) / s.ch;
    const int64_t t = (raw + 31) / 32 * 32;
    if (t > std::min(1024, limit(s.vec, s.ch))) continue;
    if (raw <= target || s.ch >= max_ch || s.ch == 8) {
      s.threads = static_cast<int>(t);
      return true;
    }
  }
  return false;
}

int64_t check_common(const char* op, const Tensor& x, const Tensor& w) {
  need_cuda(op, "x", x);
  need_cuda(op, "w", w);
  if (w.ndim() != 1) op_error(op, describe("w", w) + ": expected [H]");
  const int64_t h = w.dim(0);
  if (x.ndim() < 2 || x.dim(-1) != h) op_error(op, describe("x", x) + ": expected [N, H = " + std::to_string(h) + "]");
  return h;
}

// The forward's row shape for x T, w TW, y TY (false: looped path).
template <typename T, typename TW, typename TY>
bool fwd_pick(const Tensor& x, const Tensor& w, const Tensor& y, int64_t h, const RmsNormTuning& tu, Shape& s) {
  constexpr int NV = 16 / sizeof(T);
  const bool ok = aligned_to(x.raw(), 16) && aligned_to(y.raw(), sizeof(TY) * NV) && aligned_to(w.raw(), sizeof(TW) * NV);
  return pick(s, h, NV, ok, tu.fwd_threads, 8, [&](int vec, int ch) {
    int m = 1024;
    with_shape<NV>(Shape{vec, ch, 0}, [&](auto vc, auto cc) {
      constexpr int V = decltype(vc)::value, C = decltype(cc)::value;
      m = kernel_max_threads(reinterpret_cast<const void*>(&rmsnorm_fwd_kernel<T, TW, TY, V, C>));
    });
    return m;
  });
}

// Forward launch for x T, w TW, y TY (TY = T, or bf16 for an fp32 x: the fp32 residual stream feeding a bf16
// matmul). The vector width comes from x (16 bytes of T); y and w move VEC elements of their own size.
template <typename T, typename TW, typename TY>
void fwd_launch(const Tensor& x, const Tensor& w, float eps, Tensor& y, Tensor& rstd, int64_t n, int64_t h,
                const RmsNormTuning& tu, CudaContext& ctx) {
  constexpr int NV = 16 / sizeof(T);
  Shape s;
  if (!fwd_pick<T, TW, TY>(x, w, y, h, tu, s)) {  // looped path
    if (s.vec == NV)
      rmsnorm_fwd_looped_kernel<T, TW, TY, NV><<<static_cast<unsigned>(n), kLoopThreads, 0, ctx.stream()>>>(
          x.data<T>(), w.data<TW>(), eps, y.data<TY>(), rstd.data<float>(), h);
    else
      rmsnorm_fwd_looped_kernel<T, TW, TY, 1><<<static_cast<unsigned>(n), kLoopThreads, 0, ctx.stream()>>>(
          x.data<T>(), w.data<TW>(), eps, y.data<TY>(), rstd.data<float>(), h);
  } else {
    with_shape<NV>(s, [&](auto vc, auto cc) {
      constexpr int V = decltype(vc)::value, C = decltype(cc)::value;
      rmsnorm_fwd_kernel<T, TW, TY, V, C><<<static_cast<unsigned>(n), s.threads, 0, ctx.stream()>>>(
          x.data<T>(), w.data<TW>(), eps, y.data<TY>(), rstd.data<float>(), h);
    });
  }
}

// Backward launch for x T, w TW, dy TG, dx TD (TG = TD = T, or for an fp32 x: dy bf16 (a matmul's input
// gradient), dx fp32 (the residual gradient)). Returns the dw partials [G, H] and sets g; with want_dw false
// (frozen weight) no partials are allocated or written and the returned tensor is undefined.
// ADD (dres non-null): dx = dres + ...; the shape and the grid are those of the plain instances (their register
// limits and occupancy), so the result is the plain backward's plus add_. When the ADD instance cannot launch that
// many threads, nothing is launched and `launched` is false.
template <typename T, typename TW, typename TG, typename TD, bool ADD>
Tensor bwd_launch(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, const Tensor* dres,
                  Tensor& dx, int64_t n, int64_t h, const RmsNormTuning& tu, CudaContext& ctx, int64_t& g,
                  bool want_dw, bool& launched) {
  constexpr int NV = 16 / sizeof(T);
  const bool ok = aligned_to(x.raw(), 16) && aligned_to(dy.raw(), sizeof(TG) * NV) &&
                  aligned_to(dx.raw(), sizeof(TD) * NV) && aligned_to(w.raw(), sizeof(TW) * NV);
  const TD* pres = ADD ? dres->data<TD>() : nullptr;
  Tensor partial;
  launched = true;
  auto pp = [&]() -> float* { return want_dw ? partial.data<float>() : nullptr; };
  // The ADD instances always run without prefetch: it changes when loads are issued, never the arithmetic.
  const bool pf = tu.prefetch && !ADD;
  Shape s;
  const bool fits = pick(s, h, NV, ok, tu.bwd_threads, 2, [&](int vec, int ch) {
    int m = 1024;
    with_shape<NV>(Shape{vec, ch, 0}, [&](auto vc, auto cc) {
      constexpr int V = decltype(vc)::value, C = decltype(cc)::value;
      m = tu.prefetch
              ? kernel_max_threads(reinterpret_cast<const void*>(&rmsnorm_bwd_kernel<T, TW, TG, TD, V, C, true>))
              : kernel_max_threads(reinterpret_cast<const void*>(&rmsnorm_bwd_kernel<T, TW, TG, TD, V, C, false>));
    });
    return m;
  });
  if (!fits) {
    // Looped path: as many blocks as are resident at once (one wave), with the partial buffer kept under
    // ~256 MiB for very long rows. The grid comes from the plain instance's occupancy.
    auto launch = [&](auto plain, auto kernel) {
      int per_sm = 0;
      AM_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, plain, kLoopThreads, 0));
      const int64_t cap = std::max<int64_t>(1, (int64_t(64) << 20) / h);
      g = std::min<int64_t>({n, static_cast<int64_t>(ctx.sm_count()) * std::max(1, per_sm), cap});
      if (want_dw) partial = Tensor::empty({g, h}, DType::F32, ctx.allocator());
      kernel<<<static_cast<unsigned>(g), kLoopThreads, 0, ctx.stream()>>>(
          x.data<T>(), w.data<TW>(), rstd.data<float>(), dy.data<TG>(), dx.data<TD>(), pres, pp(), n, h);
    };
    if (s.vec == NV)
      launch(rmsnorm_bwd_looped_kernel<T, TW, TG, TD, NV>, rmsnorm_bwd_looped_kernel<T, TW, TG, TD, NV, ADD>);
    else
      launch(rmsnorm_bwd_looped_kernel<T, TW, TG, TD, 1>, rmsnorm_bwd_looped_kernel<T, TW, TG, TD, 1, ADD>);
  } else {
    if constexpr (ADD) {
      with_shape<NV>(s, [&](auto vc, auto cc) {
        constexpr int V = decltype(vc)::value, C = decltype(cc)::value;
        launched = kernel_max_threads(reinterpret_cast<const void*>(
                       &rmsnorm_bwd_kernel<T, TW, TG, TD, V, C, false, true>)) >= s.threads;
      });
      if (!launched) return partial;
    }
    const int per_sm = tu.bwd_blocks_per_sm > 0 ? tu.bwd_blocks_per_sm : std::max(1, 1024 / s.threads);
    g = std::min<int64_t>(n, static_cast<int64_t>(ctx.sm_count()) * per_sm);
    if (want_dw) partial = Tensor::empty({g, h}, DType::F32, ctx.allocator());
    with_shape<NV>(s, [&](auto vc, auto cc) {
      constexpr int V = decltype(vc)::value, C = decltype(cc)::value;
      if (pf)
        rmsnorm_bwd_kernel<T, TW, TG, TD, V, C, true><<<static_cast<unsigned>(g), s.threads, 0, ctx.stream()>>>(
            x.data<T>(), w.data<TW>(), rstd.data<float>(), dy.data<TG>(), dx.data<TD>(), nullptr, pp(), n, h);
      else
        rmsnorm_bwd_kernel<T, TW, TG, TD, V, C, false, ADD><<<static_cast<unsigned>(g), s.threads, 0, ctx.stream()>>>(
            x.data<T>(), w.data<TW>(), rstd.data<float>(), dy.data<TG>(), dx.data<TD>(), pres, pp(), n, h);
    });
  }
  return partial;
}

}  // namespace

namespace rms {

int kernel_max_threads(const void* fn) {
  static std::mutex mu;
  static std::unordered_map<const void*, int> cache;
  std::lock_guard<std::mutex> lk(mu);
  auto it = cache.find(fn);
  if (it != cache.end()) return it->second;
  cudaFuncAttributes a{};
  AM_CUDA_CHECK(cudaFuncGetAttributes(&a, fn));
  cache.emplace(fn, a.maxThreadsPerBlock);
  return a.maxThreadsPerBlock;
}

bool fwd_shape(const Tensor& x, const Tensor& w, const Tensor& y, const RmsNormTuning& tu, Shape& s) {
  const char* op = "rmsnorm_fwd";
  const int64_t h = w.dim(0);
  bool fits = false;
  const bool same = y.dtype() == x.dtype();
  AM_DISPATCH_BF16_F32(x.dtype(), op, T, {
    AM_DISPATCH_BF16_F32(w.dtype(), op, TW, {
      if (same) fits = fwd_pick<T, TW, T>(x, w, y, h, tu, s);
      else if constexpr (std::is_same_v<T, float>) fits = fwd_pick<float, TW, bf16>(x, w, y, h, tu, s);
    });
  });
  return fits;
}

bool bwd(const char* op, const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, const Tensor* dres,
         Tensor& dx, Tensor& dw, const RmsNormTuning& tu, CudaContext& ctx) {
  const int64_t h = check_common(op, x, w);
  const bool want_dw = dw.defined();  // undefined: frozen weight, no dw reduction
  for (auto [name, t] : {std::pair<const char*, const Tensor*>{"rstd", &rstd}, {"dy", &dy}, {"dx", &dx}})
    need_cuda(op, name, *t);
  need_dtype(op, "rstd", rstd, DType::F32);
  if (want_dw) {
    need_cuda(op, "dw", dw);
    need_dtype(op, "dw", dw, DType::F32);
    if (dw.shape() != w.shape()) op_error(op, describe("dw", dw) + ": expected the shape of " + describe("w", w));
  }
  // dy, dx: the dtype of x; or, for an fp32 x, dy bf16 and dx fp32.
  const bool widen = x.dtype() == DType::F32 && dy.dtype() == DType::BF16;
  if (dy.shape() != x.shape() || !(dy.dtype() == x.dtype() || widen))
    op_error(op, describe("dy", dy) + ": expected the shape of " + describe("x", x) +
                     " and its dtype (or bfloat16 for a float32 x)");
  if (dx.shape() != x.shape() || dx.dtype() != x.dtype())
    op_error(op, describe("dx", dx) + ": expected the shape and dtype of " + describe("x", x));
  if (dres) {
    need_cuda(op, "dres", *dres);
    if (dres->shape() != dx.shape() || dres->dtype() != dx.dtype())
      op_error(op, describe("dres", *dres) + ": expected the shape and dtype of " + describe("dx", dx));
    if (!aligned_to(dres->raw(), 16)) op_error(op, describe("dres", *dres) + ": expected 16-byte alignment");
  }
  const int64_t n = h ? x.numel() / h : 0;
  if (rstd.numel() != n) op_error(op, describe("rstd", rstd) + ": expected one element per row of x");
  if (n == 0 || h == 0) return true;
  // The launch shape depends on the dtype; the grid (and so the partial buffer) on the block size
  // (W1 default: 128 threads, 4 blocks per SM -> 528 blocks of ~16 rows, 4.3 MB of partials).
  Tensor partial;
  int64_t g = 0;
  bool launched = true;
  AM_DISPATCH_BF16_F32(x.dtype(), op, T, {
    AM_DISPATCH_BF16_F32(w.dtype(), op, TW, {
      if (!widen) {
        partial = dres ? bwd_launch<T, TW, T, T, true>(x, w, rstd, dy, dres, dx, n, h, tu, ctx, g, want_dw, launched)
                       : bwd_launch<T, TW, T, T, false>(x, w, rstd, dy, dres, dx, n, h, tu, ctx, g, want_dw, launched);
      } else if constexpr (std::is_same_v<T, float>) {
        partial = dres ? bwd_launch<float, TW, bf16, float, true>(x, w, rstd, dy, dres, dx, n, h, tu, ctx, g, want_dw,
                                                                  launched)
                       : bwd_launch<float, TW, bf16, float, false>(x, w, rstd, dy, dres, dx, n, h, tu, ctx, g, want_dw,
                                                                   launched);
      }
    });
  });
  if (!launched) return false;
  AM_CUDA_CHECK_LAUNCH();
  if (!want_dw) return true;
  const unsigned cols = static_cast<unsigned>((h + 31) / 32);
  if (tu.reduce_lanes >= 32)
    column_sum_add_kernel<32><<<cols, dim3(32, 32), 0, ctx.stream()>>>(partial.data<float>(), dw.data<float>(), g, h);
  else if (tu.reduce_lanes >= 16)
    column_sum_add_kernel<16><<<cols, dim3(32, 16), 0, ctx.stream()>>>(partial.data<float>(), dw.data<float>(), g, h);
  else
    column_sum_add_kernel<8><<<cols, dim3(32, 8), 0, ctx.stream()>>>(partial.data<float>(), dw.data<float>(), g, h);
  AM_CUDA_CHECK_LAUNCH();
  // `partial` returns to the cache here; stream order keeps the reduction ahead of any reuse.
  return true;
}

}  // namespace rms

RmsNormTuning default_rmsnorm_tuning() { return RmsNormTuning{}; }

void rmsnorm_fwd(const Tensor& x, const Tensor& w, float eps, Tensor& y, Tensor& rstd, CudaContext& ctx) {
  rmsnorm_fwd_tuned(x, w, eps, y, rstd, default_rmsnorm_tuning(), ctx);
}

void rmsnorm_bwd(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, Tensor& dx, Tensor& dw,
                 CudaContext& ctx) {
  rmsnorm_bwd_tuned(x, w, rstd, dy, dx, dw, default_rmsnorm_tuning(), ctx);
}

void rmsnorm_fwd_tuned(const Tensor& x, const Tensor& w, float eps, Tensor& y, Tensor& rstd, const RmsNormTuning& tu,
                       CudaContext& ctx) {
  const char* op = "rmsnorm_fwd";
  const int64_t h = check_common(op, x, w);
  need_cuda(op, "y", y);
  need_cuda(op, "rstd", rstd);
  need_dtype(op, "rstd", rstd, DType::F32);
  // y: the dtype of x, or bf16 for an fp32 x.
  const bool same = y.dtype() == x.dtype();
  const bool widen = x.dtype() == DType::F32 && y.dtype() == DType::BF16;
  if (y.shape() != x.shape() || !(same || widen))
    op_error(op, describe("y", y) + ": expected the shape of " + describe("x", x) +
                     " and its dtype (or bfloat16 for a float32 x)");
  const int64_t n = h ? x.numel() / h : 0;
  if (rstd.numel() != n) op_error(op, describe("rstd", rstd) + ": expected one element per row of x");
  if (n == 0 || h == 0) return;
  AM_DISPATCH_BF16_F32(x.dtype(), op, T, {
    AM_DISPATCH_BF16_F32(w.dtype(), op, TW, {
      if (same) fwd_launch<T, TW, T>(x, w, eps, y, rstd, n, h, tu, ctx);
      else if constexpr (std::is_same_v<T, float>) fwd_launch<float, TW, bf16>(x, w, eps, y, rstd, n, h, tu, ctx);
    });
  });
  AM_CUDA_CHECK_LAUNCH();
}

void rmsnorm_bwd_tuned(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, Tensor& dx,
                       Tensor& dw, const RmsNormTuning& tu, CudaContext& ctx) {
  rms::bwd("rmsnorm_bwd", x, w, rstd, dy, nullptr, dx, dw, tu, ctx);
}

}  // namespace am::cuda
