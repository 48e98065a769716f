// Nemotron-H / Mamba2 kernels (contracts in src/ops/mamba2_ops.h; entry points and the scan's scheme in mamba2.h).
// Written for correctness against the CPU reference (ops/mamba2_ops.cpp) first:
//
//   conv fwd        one thread per output (b, t, c): the window's first position s0 is found by walking back over
//                   the segment ids (at most K - 1 steps), then pre = bias + sum_{s0 <= s <= t} w[c, K-1-(t-s)] x[s],
//                   y = silu(pre), accumulated in the CPU's order (s increasing).
//   conv bwd dx     one thread per input (b, s, c): sum over the outputs t = s .. s+K-1 whose window holds s (the run
//                   s..t stays in one segment) of w[c, K-1-(t-s)] * dy[t] silu'(pre[t]), t increasing as the CPU.
//   conv bwd dw/db  column sums: block (32 channels, 16 row lanes), each thread sums its rows (b, t) strided by 16
//                   for the K taps and the bias, then a fixed-order shared-memory reduction: deterministic.
//   scan            see mamba2.h. Block = one (batch row, head) with NW = min(P, 16) warps; warp w holds rows
//                   p = w + NW r (r < RPW), lane l holds states s = l + 32 j (j < SPL); padded rows / states read
//                   zeros and stay zero. Each step's inputs (B_t, C_t, x_t, dy_t, dt_t, seg) are loaded one step
//                   ahead so that the loads overlap the previous step's arithmetic. The backward's per-step sums
//                   over p (dC, dB, r_t, <x, g B>) go through shared memory (double-buffered: one barrier a step);
//                   its sums over the heads of a group are fp32 atomics into zeroed fp32 buffers.
//   gated norm      one warp per (row, group): sum of squares, rstd, output; backward likewise, dw by column sums.
//   dt / A / relu2  elementwise (grid-stride); dt_bias's gradient by column sums (deterministic).
#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <string>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/kernel_utils.cuh"
#include "backend/cuda/mamba2.h"
#include "backend/cuda/mamba2_ssd.h"

namespace am::cuda {
namespace {

constexpr int kMaxConvK = 8;     // conv taps held in registers by the dw kernel
constexpr int kMaxScanP = 128;   // NW (<= 16) warps x RPW (<= 8) rows
constexpr int kMaxScanS = 256;   // 32 lanes x SPL (<= 8) states
constexpr int kMaxScanWarps = 16;

__device__ __forceinline__ float sigmoid_f(float v) { return 1.f / (1.f + expf(-v)); }
// torch.nn.functional.softplus (beta 1, threshold 20) and its derivative, as the CPU reference
__device__ __forceinline__ float softplus_f(float v) { return v > 20.f ? v : log1pf(expf(v)); }
__device__ __forceinline__ float softplus_grad_f(float v) { return v > 20.f ? 1.f : 1.f / (1.f + expf(-v)); }

__device__ __forceinline__ int64_t gtid() { return blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; }
__device__ __forceinline__ int64_t gstride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// ================================================================ column sums (deterministic)
// out[col] += sum_{row < rows} f(row, col). Block (32, 16): x = a column of the tile, y = a row lane.
constexpr int kColRows = 16;
template <class F>
__global__ void col_sum_kernel(F f, int64_t rows, int64_t cols, float* __restrict__ out) {
  __shared__ float part[kColRows][33];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float acc = 0.f;
  if (col < cols)
    for (int64_t r = threadIdx.y; r < rows; r += kColRows) acc += f(r, col);
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < kColRows; ++k) s += part[k][threadIdx.x];
    out[col] += s;
  }
}
template <class F>
void launch_col_sum(const F& f, int64_t rows, int64_t cols, float* out, cudaStream_t st) {
  if (rows == 0 || cols == 0) return;
  col_sum_kernel<<<static_cast<unsigned>((cols + 31) / 32), dim3(32, kColRows), 0, st>>>(f, rows, cols, out);
  AM_CUDA_CHECK_LAUNCH();
}

// ================================================================ conv1d + SiLU
// First position of t's window that is still in t's segment (K - 1 positions back at most).
__device__ __forceinline__ int64_t window_start(const int32_t* __restrict__ seg, int64_t row0, int64_t t, int K) {
  if (!seg) return t - (K - 1) > 0 ? t - (K - 1) : 0;
  const int32_t id = seg[row0 + t];
  int64_t s0 = t;
  while (s0 > 0 && t - s0 < K - 1 && seg[row0 + s0 - 1] == id) --s0;
  return s0;
}

template <typename T, typename TW>
__global__ void conv_fwd_kernel(const T* __restrict__ x, const TW* __restrict__ w, const TW* __restrict__ bias,
                                const int32_t* __restrict__ seg, int64_t B, int64_t Tn, int64_t C, int K,
                                T* __restrict__ pre, T* __restrict__ y) {
  const int64_t total = B * Tn * C;
  for (int64_t i = gtid(); i < total; i += gstride()) {
    const int64_t c = i % C, bt = i / C, t = bt % Tn, row0 = bt - t;  // row0 = b * Tn
    const int64_t s0 = window_start(seg, row0, t, K);
    float acc = bias ? to_f(bias[c]) : 0.f;
    for (int64_t s = s0; s <= t; ++s) acc += to_f(w[c * K + (K - 1 - (t - s))]) * to_f(x[(row0 + s) * C + c]);
    pre[i] = from_f<T>(acc);
    y[i] = from_f<T>(acc * sigmoid_f(acc));
  }
}

// g_t = dy_t * silu'(pre_t)
template <typename T>
__device__ __forceinline__ float silu_grad_at(const T* __restrict__ pre, const T* __restrict__ dy, int64_t i) {
  const float a = to_f(pre[i]), s = sigmoid_f(a);
  return to_f(dy[i]) * s * (1.f + a * (1.f - s));
}

template <typename T, typename TW>
__global__ void conv_bwd_dx_kernel(const TW* __restrict__ w, const T* __restrict__ pre, const int32_t* __restrict__ seg,
                                   const T* __restrict__ dy, int64_t B, int64_t Tn, int64_t C, int K, T* __restrict__ dx) {
  const int64_t total = B * Tn * C;
  for (int64_t i = gtid(); i < total; i += gstride()) {
    const int64_t c = i % C, bs = i / C, s = bs % Tn, row0 = bs - s;
    const int32_t id = seg ? seg[row0 + s] : 0;
    float acc = 0.f;
    for (int64_t t = s; t < Tn && t < s + K; ++t) {
      if (seg && seg[row0 + t] != id) break;  // t's window (and every later one) no longer reaches back to s
      acc += to_f(w[c * K + (K - 1 - (t - s))]) * silu_grad_at(pre, dy, (row0 + t) * C + c);
    }
    dx[i] = from_f<T>(acc);
  }
}

// dw[c, j] += sum_{b,t} g_t x[t - (K-1-j)], dbias[c] += sum_{b,t} g_t. Block (32 channels, 16 row lanes).
template <typename T>
__global__ void conv_bwd_dw_kernel(const T* __restrict__ x, const T* __restrict__ pre, const int32_t* __restrict__ seg,
                                   const T* __restrict__ dy, int64_t B, int64_t Tn, int64_t C, int K,
                                   float* __restrict__ dw, float* __restrict__ dbias) {
  __shared__ float part[kMaxConvK + 1][kColRows][33];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float acc[kMaxConvK + 1];
#pragma unroll
  for (int j = 0; j <= kMaxConvK; ++j) acc[j] = 0.f;
  if (c < C)
    for (int64_t bt = threadIdx.y; bt < B * Tn; bt += kColRows) {
      const int64_t t = bt % Tn, row0 = bt - t;
      const int64_t s0 = window_start(seg, row0, t, K);
      const float g = silu_grad_at(pre, dy, bt * C + c);
      acc[kMaxConvK] += g;
#pragma unroll
      for (int j = 0; j < kMaxConvK; ++j) {
        const int64_t s = t - (K - 1 - j);
        if (j < K && s >= s0) acc[j] += g * to_f(x[(row0 + s) * C + c]);
      }
    }
#pragma unroll
  for (int j = 0; j <= kMaxConvK; ++j) part[j][threadIdx.y][threadIdx.x] = acc[j];
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int j = 0; j <= kMaxConvK; ++j) {
      if (j < kMaxConvK && j >= K) continue;
      float s = 0.f;
#pragma unroll
      for (int k = 0; k < kColRows; ++k) s += part[j][k][threadIdx.x];
      if (j == kMaxConvK) {
        if (dbias) dbias[c] += s;
      } else if (dw) {
        dw[c * K + j] += s;
      }
    }
  }
}

// ================================================================ selective scan
struct ScanArgs {
  const void* x;    // [B, T, nh, P] T
  const float* dt;  // [B, T, nh]
  const float* A;   // [nh]
  const void* Bm;   // [B, T, G, S] T
  const void* Cm;   // [B, T, G, S] T
  const float* D;   // [nh]
  const int32_t* seg;  // [B, T] or null
  const void* dy;   // [B, T, nh, P] T (backward)
  void* out;        // forward: y; backward: dx   [B, T, nh, P] T
  float* states;    // forward, optional: [B, T, nh, P, S]
  float* dB32;      // backward: [B, T, G, S] fp32, zeroed
  float* dC32;      // backward: [B, T, G, S] fp32, zeroed
  float* rbuf;      // backward: r_t [B, T, nh]
  float* ddt;       // backward: [B, T, nh]
  float* dA;        // backward: [nh] +=
  float* dD;        // backward: [nh] +=
  int Tn, nh, P, G, S;
};

// One step's inputs as seen by one lane.
template <int SPL, int RPW>
struct StepIn {
  float Bv[SPL], Cv[SPL];  // B_t[s], C_t[s] for the lane's states (0 past S)
  float xv[RPW], dyv[RPW];  // x_t[p], dy_t[p] for the warp's rows (0 past P)
  float dt, r;             // dt_t; r_t (backward pass 2)
  int seg;                 // segment id (0 without packing)
};

template <typename T, int SPL, int RPW, bool kDy, bool kR>
__device__ __forceinline__ void load_step(const ScanArgs& a, int64_t b, int h, int g, int t, int warp, int lane, int NW,
                                          StepIn<SPL, RPW>& in) {
  const int64_t bt = b * a.Tn + t;
  const T* Bt = static_cast<const T*>(a.Bm) + (bt * a.G + g) * a.S;
  const T* Ct = static_cast<const T*>(a.Cm) + (bt * a.G + g) * a.S;
#pragma unroll
  for (int j = 0; j < SPL; ++j) {
    const int s = lane + 32 * j;
    in.Bv[j] = s < a.S ? to_f(Bt[s]) : 0.f;
    in.Cv[j] = s < a.S ? to_f(Ct[s]) : 0.f;
  }
  const int64_t row = (bt * a.nh + h) * a.P;
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int p = warp + NW * r;
    in.xv[r] = p < a.P ? to_f(static_cast<const T*>(a.x)[row + p]) : 0.f;
    if constexpr (kDy) in.dyv[r] = p < a.P ? to_f(static_cast<const T*>(a.dy)[row + p]) : 0.f;
  }
  in.dt = a.dt[bt * a.nh + h];
  if constexpr (kR) in.r = a.rbuf[bt * a.nh + h];
  in.seg = a.seg ? a.seg[bt] : 0;
}

// Forward: y_t[p] = sum_s state_t[p, s] C_t[s] + D x_t[p]; states written when asked for. Grid B * nh.
template <typename T, int SPL, int RPW>
__global__ void __launch_bounds__(kMaxScanWarps * 32) scan_fwd_kernel(ScanArgs a) {
  const int64_t b = blockIdx.x / a.nh;
  const int h = blockIdx.x % a.nh, g = h / (a.nh / a.G);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, NW = blockDim.x >> 5;
  const float Ah = a.A[h], Dh = a.D[h];
  float st[RPW][SPL];
#pragma unroll
  for (int r = 0; r < RPW; ++r)
#pragma unroll
    for (int j = 0; j < SPL; ++j) st[r][j] = 0.f;
  StepIn<SPL, RPW> cur, nxt;
  if (a.Tn > 0) load_step<T, SPL, RPW, false, false>(a, b, h, g, 0, warp, lane, NW, nxt);
  int prev_seg = 0;
  for (int t = 0; t < a.Tn; ++t) {
    cur = nxt;
    if (t + 1 < a.Tn) load_step<T, SPL, RPW, false, false>(a, b, h, g, t + 1, warp, lane, NW, nxt);
    const bool start = t == 0 || cur.seg != prev_seg;  // a new segment forgets the old state
    prev_seg = cur.seg;
    const float dec = start ? 0.f : expf(cur.dt * Ah);
    const int64_t bt = b * a.Tn + t, row = (bt * a.nh + h) * a.P;
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const int p = warp + NW * r;  // warp-uniform
      const float dtx = cur.dt * cur.xv[r];
      float part = 0.f;
#pragma unroll
      for (int j = 0; j < SPL; ++j) {
        st[r][j] = dec * st[r][j] + dtx * cur.Bv[j];
        part += st[r][j] * cur.Cv[j];
      }
      part = warp_sum(part);
      if (p < a.P) {
        if (lane == 0) static_cast<T*>(a.out)[row + p] = from_f<T>(part + Dh * cur.xv[r]);
        if (a.states) {
#pragma unroll
          for (int j = 0; j < SPL; ++j) {
            const int s = lane + 32 * j;
            if (s < a.S) a.states[(row + p) * a.S + s] = st[r][j];
          }
        }
      }
    }
  }
}

// Backward pass 1 (forward in time): re-runs the recurrence; per step dC_t += sum_p state_t[p] dy_t[p] (atomics over
// the heads of the group) and r_t = sum_s C_t[s] sum_p state_t[p, s] dy_t[p] = <dy_t, y_t - D x_t>.
// Dynamic shared memory: red [2][NW][S] + rpart [2][NW] floats.
template <typename T, int SPL, int RPW>
__global__ void __launch_bounds__(kMaxScanWarps * 32) scan_bwd_pass1_kernel(ScanArgs a) {
  extern __shared__ float smem[];
  const int64_t b = blockIdx.x / a.nh;
  const int h = blockIdx.x % a.nh, g = h / (a.nh / a.G);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, NW = blockDim.x >> 5;
  float* red = smem;                   // [2][NW][S]
  float* rpart = smem + 2 * NW * a.S;  // [2][NW]
  const float Ah = a.A[h];
  float st[RPW][SPL];
#pragma unroll
  for (int r = 0; r < RPW; ++r)
#pragma unroll
    for (int j = 0; j < SPL; ++j) st[r][j] = 0.f;
  StepIn<SPL, RPW> cur, nxt;
  if (a.Tn > 0) load_step<T, SPL, RPW, true, false>(a, b, h, g, 0, warp, lane, NW, nxt);
  int prev_seg = 0;
  for (int t = 0; t < a.Tn; ++t) {
    cur = nxt;
    if (t + 1 < a.Tn) load_step<T, SPL, RPW, true, false>(a, b, h, g, t + 1, warp, lane, NW, nxt);
    const bool start = t == 0 || cur.seg != prev_seg;
    prev_seg = cur.seg;
    const float dec = start ? 0.f : expf(cur.dt * Ah);
    float cpart[SPL];
#pragma unroll
    for (int j = 0; j < SPL; ++j) cpart[j] = 0.f;
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const float dtx = cur.dt * cur.xv[r];
#pragma unroll
      for (int j = 0; j < SPL; ++j) {
        st[r][j] = dec * st[r][j] + dtx * cur.Bv[j];
        cpart[j] += st[r][j] * cur.dyv[r];
      }
    }
    float rp = 0.f;
#pragma unroll
    for (int j = 0; j < SPL; ++j) rp += cpart[j] * cur.Cv[j];
    rp = warp_sum(rp);
    const int buf = t & 1;
    float* rb = red + buf * NW * a.S;
#pragma unroll
    for (int j = 0; j < SPL; ++j) {
      const int s = lane + 32 * j;
      if (s < a.S) rb[warp * a.S + s] = cpart[j];
    }
    if (lane == 0) rpart[buf * NW + warp] = rp;
    __syncthreads();  // (the buffer is rewritten two steps later, after the next step's barrier)
    const int64_t bt = b * a.Tn + t;
    for (int s = threadIdx.x; s < a.S; s += blockDim.x) {
      float v = 0.f;
      for (int w = 0; w < NW; ++w) v += rb[w * a.S + s];
      atomicAdd(a.dC32 + (bt * a.G + g) * a.S + s, v);
    }
    if (threadIdx.x == 0) {
      float v = 0.f;
      for (int w = 0; w < NW; ++w) v += rpart[buf * NW + w];
      a.rbuf[bt * a.nh + h] = v;
    }
  }
}

// Backward pass 2 (backward in time): g_t = dy_t C_t^T + exp(dt_{t+1} A) g_{t+1} (reset past a segment start);
// dx_t[p] = dt_t (g_t B_t)[p] + D dy_t[p]; dB_t += dt_t sum_p g_t[p] x_t[p] (atomics over the group's heads);
// ddt_t = <x_t, g_t B_t> + A L_t and dA += dt_t L_t with L_t = dlog a_t = sum_{tau >= t in segment} (r_tau - dt_tau
// <x_tau, g_tau B_tau>) (0 at a segment start); dD += sum_t <dy_t, x_t>.
// Dynamic shared memory: red [2][NW][S] + spart [2][NW] floats.
template <typename T, int SPL, int RPW>
__global__ void __launch_bounds__(kMaxScanWarps * 32) scan_bwd_pass2_kernel(ScanArgs a) {
  extern __shared__ float smem[];
  const int64_t b = blockIdx.x / a.nh;
  const int h = blockIdx.x % a.nh, g = h / (a.nh / a.G);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, NW = blockDim.x >> 5;
  float* red = smem;                   // [2][NW][S]
  float* spart = smem + 2 * NW * a.S;  // [2][NW]
  const float Ah = a.A[h], Dh = a.D[h];
  float gh[RPW][SPL];
#pragma unroll
  for (int r = 0; r < RPW; ++r)
#pragma unroll
    for (int j = 0; j < SPL; ++j) gh[r][j] = 0.f;
  double R = 0.0, Q = 0.0, dA_acc = 0.0;  // thread 0 only
  float dD_acc = 0.f;                     // per warp (the same value in every lane)
  StepIn<SPL, RPW> cur, nxt;
  if (a.Tn > 0) load_step<T, SPL, RPW, true, true>(a, b, h, g, a.Tn - 1, warp, lane, NW, nxt);
  for (int t = a.Tn - 1; t >= 0; --t) {
    cur = nxt;
    int prev_seg = 0;  // segment id of t - 1
    if (t > 0) {
      load_step<T, SPL, RPW, true, true>(a, b, h, g, t - 1, warp, lane, NW, nxt);
      prev_seg = nxt.seg;
    }
    const bool start = t == 0 || cur.seg != prev_seg;
    const float dec = start ? 0.f : expf(cur.dt * Ah);
    const int64_t bt = b * a.Tn + t, row = (bt * a.nh + h) * a.P;
    float bpart[SPL];
#pragma unroll
    for (int j = 0; j < SPL; ++j) bpart[j] = 0.f;
    float sx = 0.f;  // sum over the warp's rows of x_t[p] (g_t B_t)[p]
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const int p = warp + NW * r;
      float gx = 0.f;
#pragma unroll
      for (int j = 0; j < SPL; ++j) {
        gh[r][j] += cur.dyv[r] * cur.Cv[j];
        gx += gh[r][j] * cur.Bv[j];
        bpart[j] += gh[r][j] * cur.xv[r];
      }
      gx = warp_sum(gx);
      if (p < a.P && lane == 0) static_cast<T*>(a.out)[row + p] = from_f<T>(cur.dt * gx + Dh * cur.dyv[r]);
      sx += cur.xv[r] * gx;
      dD_acc += cur.dyv[r] * cur.xv[r];
    }
    const int buf = t & 1;
    float* rb = red + buf * NW * a.S;
#pragma unroll
    for (int j = 0; j < SPL; ++j) {
      const int s = lane + 32 * j;
      if (s < a.S) rb[warp * a.S + s] = bpart[j];
    }
    if (lane == 0) spart[buf * NW + warp] = sx;
    __syncthreads();
    for (int s = threadIdx.x; s < a.S; s += blockDim.x) {
      float v = 0.f;
      for (int w = 0; w < NW; ++w) v += rb[w * a.S + s];
      atomicAdd(a.dB32 + (bt * a.G + g) * a.S + s, cur.dt * v);
    }
    if (threadIdx.x == 0) {
      float sxt = 0.f;
      for (int w = 0; w < NW; ++w) sxt += spart[buf * NW + w];
      R += static_cast<double>(cur.r);
      Q += static_cast<double>(cur.dt) * sxt;
      const double lam = start ? 0.0 : R - Q;  // dL / dlog a_t
      a.ddt[bt * a.nh + h] = sxt + static_cast<float>(lam * Ah);
      dA_acc += lam * cur.dt;
      if (start) R = Q = 0.0;  // t - 1 ends the previous segment
    }
#pragma unroll
    for (int r = 0; r < RPW; ++r)
#pragma unroll
      for (int j = 0; j < SPL; ++j) gh[r][j] *= dec;  // to g_{t-1} (0 at a segment start)
  }
  if (lane == 0) atomicAdd(a.dD + h, dD_acc);
  if (threadIdx.x == 0) atomicAdd(a.dA + h, static_cast<float>(dA_acc));
}

// Calls __VA_ARGS__ with constexpr SPL_ in {1, 2, 4, 8} and RPW_ in {1, 2, 4, 8}.
#define AM_SCAN_DISPATCH(spl, rpw, ...)                                                   \
  do {                                                                                    \
    switch ((spl) * 16 + (rpw)) {                                                         \
      case 17: { constexpr int SPL_ = 1, RPW_ = 1; __VA_ARGS__; } break;                  \
      case 18: { constexpr int SPL_ = 1, RPW_ = 2; __VA_ARGS__; } break;                  \
      case 20: { constexpr int SPL_ = 1, RPW_ = 4; __VA_ARGS__; } break;                  \
      case 24: { constexpr int SPL_ = 1, RPW_ = 8; __VA_ARGS__; } break;                  \
      case 33: { constexpr int SPL_ = 2, RPW_ = 1; __VA_ARGS__; } break;                  \
      case 34: { constexpr int SPL_ = 2, RPW_ = 2; __VA_ARGS__; } break;                  \
      case 36: { constexpr int SPL_ = 2, RPW_ = 4; __VA_ARGS__; } break;                  \
      case 40: { constexpr int SPL_ = 2, RPW_ = 8; __VA_ARGS__; } break;                  \
      case 65: { constexpr int SPL_ = 4, RPW_ = 1; __VA_ARGS__; } break;                  \
      case 66: { constexpr int SPL_ = 4, RPW_ = 2; __VA_ARGS__; } break;                  \
      case 68: { constexpr int SPL_ = 4, RPW_ = 4; __VA_ARGS__; } break;                  \
      case 72: { constexpr int SPL_ = 4, RPW_ = 8; __VA_ARGS__; } break;                  \
      case 129: { constexpr int SPL_ = 8, RPW_ = 1; __VA_ARGS__; } break;                 \
      case 130: { constexpr int SPL_ = 8, RPW_ = 2; __VA_ARGS__; } break;                 \
      case 132: { constexpr int SPL_ = 8, RPW_ = 4; __VA_ARGS__; } break;                 \
      case 136: { constexpr int SPL_ = 8, RPW_ = 8; __VA_ARGS__; } break;                 \
      default: throw ShapeError("mamba scan: no kernel for this state / head size");     \
    }                                                                                     \
  } while (0)

int pow2_at_least(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// The scan's launch geometry for head dim P and state size S.
struct ScanGeom {
  int nw, rpw, spl;
};
ScanGeom scan_geom(const char* op, int64_t P, int64_t S) {
  if (P < 1 || P > kMaxScanP)
    op_error(op, "head dim P = " + std::to_string(P) + " is outside the CUDA scan's 1.." + std::to_string(kMaxScanP));
  if (S < 1 || S > kMaxScanS)
    op_error(op, "state size S = " + std::to_string(S) + " is outside the CUDA scan's 1.." + std::to_string(kMaxScanS));
  ScanGeom g;
  g.nw = static_cast<int>(std::min<int64_t>(P, kMaxScanWarps));
  g.rpw = pow2_at_least(static_cast<int>((P + g.nw - 1) / g.nw));
  g.spl = pow2_at_least(static_cast<int>((S + 31) / 32));
  return g;
}

// ================================================================ gated RMSNorm
// One warp per (row, group) gi: the group's channels are [gi * group, (gi + 1) * group) of the flat tensors.
template <typename T, typename TW>
__global__ void gnorm_fwd_kernel(const T* __restrict__ y, const T* __restrict__ z, const TW* __restrict__ w,
                                 int64_t ngroups_total, int64_t group, int64_t ng, float eps, T* __restrict__ out,
                                 float* __restrict__ rstd) {
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = gstride() / 32;
  for (int64_t gi = gtid() / 32; gi < ngroups_total; gi += nwarps) {
    const int64_t o = gi * group, k = gi % ng;
    float ss = 0.f;
    for (int64_t i = lane; i < group; i += 32) {
      const float zv = to_f(z[o + i]), gv = to_f(y[o + i]) * (zv * sigmoid_f(zv));
      ss += gv * gv;
    }
    ss = warp_sum(ss);
    const float r = 1.f / sqrtf(ss / static_cast<float>(group) + eps);
    if (lane == 0) rstd[gi] = r;
    for (int64_t i = lane; i < group; i += 32) {
      const float zv = to_f(z[o + i]), gv = to_f(y[o + i]) * (zv * sigmoid_f(zv));
      out[o + i] = from_f<T>(to_f(w[k * group + i]) * (gv * r));
    }
  }
}

template <typename T, typename TW>
__global__ void gnorm_bwd_kernel(const T* __restrict__ y, const T* __restrict__ z, const TW* __restrict__ w,
                                 const float* __restrict__ rstd, const T* __restrict__ dout, int64_t ngroups_total,
                                 int64_t group, int64_t ng, T* __restrict__ dy, T* __restrict__ dz) {
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = gstride() / 32;
  for (int64_t gi = gtid() / 32; gi < ngroups_total; gi += nwarps) {
    const int64_t o = gi * group, k = gi % ng;
    const float r = rstd[gi];
    float dot = 0.f;  // sum_i dn_i n_i
    for (int64_t i = lane; i < group; i += 32) {
      const float zv = to_f(z[o + i]), nv = to_f(y[o + i]) * (zv * sigmoid_f(zv)) * r;
      dot += to_f(dout[o + i]) * to_f(w[k * group + i]) * nv;
    }
    const float mean = warp_sum(dot) / static_cast<float>(group);
    for (int64_t i = lane; i < group; i += 32) {
      const float zv = to_f(z[o + i]), yv = to_f(y[o + i]), s = sigmoid_f(zv), silu = zv * s;
      const float nv = yv * silu * r, dn = to_f(dout[o + i]) * to_f(w[k * group + i]);
      const float dg = r * (dn - nv * mean);
      dy[o + i] = from_f<T>(dg * silu);
      dz[o + i] = from_f<T>(dg * yv * s * (1.f + zv * (1.f - s)));
    }
  }
}

// dw[c] term of row n: dout[n, c] * y silu(z) [n, c] * rstd[n, c / group]
template <typename T>
struct GnormDwTerm {
  const T* y;
  const T* z;
  const T* dout;
  const float* rstd;
  int64_t din, group;
  __device__ float operator()(int64_t n, int64_t c) const {
    const int64_t i = n * din + c;
    const float zv = to_f(z[i]);
    return to_f(dout[i]) * (to_f(y[i]) * (zv * sigmoid_f(zv)) * rstd[i / group]);
  }
};

// ================================================================ dt chain, A, relu2
template <typename T, typename TW>
__global__ void dt_fwd_kernel(const T* __restrict__ raw, const TW* __restrict__ bias, int64_t n, int64_t nh, float lo,
                              float hi, float* __restrict__ dt_in, float* __restrict__ dt) {
  for (int64_t i = gtid(); i < n; i += gstride()) {
    const float v = to_f(raw[i]) + to_f(bias[i % nh]);
    dt_in[i] = v;
    dt[i] = fminf(fmaxf(softplus_f(v), lo), hi);
  }
}

__device__ __forceinline__ float dt_grad(float v, float d, float lo, float hi) {
  const float sp = softplus_f(v);
  return (sp >= lo && sp <= hi) ? d * softplus_grad_f(v) : 0.f;
}

template <typename T>
__global__ void dt_bwd_kernel(const float* __restrict__ dt_in, const float* __restrict__ ddt, int64_t n, float lo, float hi,
                              T* __restrict__ ddt_raw) {
  for (int64_t i = gtid(); i < n; i += gstride()) ddt_raw[i] = from_f<T>(dt_grad(dt_in[i], ddt[i], lo, hi));
}

struct DtBiasTerm {
  const float* dt_in;
  const float* ddt;
  int64_t nh;
  float lo, hi;
  __device__ float operator()(int64_t n, int64_t h) const { return dt_grad(dt_in[n * nh + h], ddt[n * nh + h], lo, hi); }
};

template <typename TW>
__global__ void a_log_fwd_kernel(const TW* __restrict__ a_log, int64_t n, float* __restrict__ A) {
  for (int64_t i = gtid(); i < n; i += gstride()) A[i] = -expf(to_f(a_log[i]));
}
__global__ void a_log_bwd_kernel(const float* __restrict__ A, const float* __restrict__ dA, int64_t n, float* __restrict__ g) {
  for (int64_t i = gtid(); i < n; i += gstride()) g[i] += dA[i] * A[i];
}

template <typename T>
__global__ void relu2_fwd_kernel(const T* __restrict__ x, int64_t n, T* __restrict__ y) {
  for (int64_t i = gtid(); i < n; i += gstride()) {
    const float v = to_f(x[i]), r = v > 0.f ? v : 0.f;
    y[i] = from_f<T>(r * r);
  }
}
// dx may alias dy (each element is read before it is written by the same thread).
template <typename T>
__global__ void relu2_bwd_kernel(const T* __restrict__ x, const T* dy, int64_t n, T* dx) {
  for (int64_t i = gtid(); i < n; i += gstride()) {
    const float v = to_f(x[i]);
    dx[i] = from_f<T>(v > 0.f ? 2.f * v * to_f(dy[i]) : 0.f);
  }
}

// ================================================================ host helpers
void need_bf16_or_f32(const char* op, const char* name, const Tensor& t) {
  if (t.dtype() != DType::BF16 && t.dtype() != DType::F32) op_error(op, describe(name, t) + ": expected bf16 or float32");
}
void need_same_dtype(const char* op, const char* a_name, const Tensor& a, const char* b_name, const Tensor& b) {
  if (a.dtype() != b.dtype()) op_error(op, describe(b_name, b) + ": expected the dtype of " + describe(a_name, a));
}
void need_seg(const char* op, const Tensor* seg) {
  if (!seg) return;
  need_cuda(op, "segment_ids", *seg);
  need_dtype(op, "segment_ids", *seg, DType::I32);
}
const int32_t* seg_ptr(const Tensor* seg) { return seg ? seg->data<int32_t>() : nullptr; }
unsigned elementwise_grid(const CudaContext& ctx, int64_t items) { return grid_for(items, 256, int64_t(ctx.sm_count()) * 16); }
// Checks a set of activation tensors: on the device, bf16 or fp32, all of the first one's dtype.
void need_acts(const char* op, std::initializer_list<std::pair<const char*, const Tensor*>> ts) {
  const std::pair<const char*, const Tensor*>* first = nullptr;
  for (const auto& p : ts) {
    need_cuda(op, p.first, *p.second);
    need_bf16_or_f32(op, p.first, *p.second);
    if (!first) first = &p;
    else need_same_dtype(op, first->first, *first->second, p.first, *p.second);
  }
}
void need_f32_dev(const char* op, const char* name, const Tensor& t) {
  need_cuda(op, name, t);
  need_dtype(op, name, t, DType::F32);
}
void need_weight(const char* op, const char* name, const Tensor& t) {
  need_cuda(op, name, t);
  need_bf16_or_f32(op, name, t);
}

}  // namespace

// ================================================================ entry points

void mamba_conv1d_silu_fwd(const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor* seg, Tensor& pre, Tensor& y,
                           CudaContext& ctx) {
  const char* op = "mamba_conv1d_silu_fwd";
  need_acts(op, {{"x", &x}, {"pre", &pre}, {"y", &y}});
  need_weight(op, "w", w);
  if (bias) {
    need_weight(op, "bias", *bias);
    need_same_dtype(op, "w", w, "bias", *bias);
  }
  need_seg(op, seg);
  const int64_t B = x.dim(0), Tn = x.dim(1), C = x.dim(2), K = w.dim(-1);
  if (K < 1 || K > kMaxConvK) op_error(op, "conv kernel K = " + std::to_string(K) + " is outside 1.." + std::to_string(kMaxConvK));
  const int64_t n = B * Tn * C;
  if (n == 0) return;
  AM_DISPATCH_BF16_F32(x.dtype(), op, T, {
    AM_DISPATCH_BF16_F32(w.dtype(), op, TW, {
      conv_fwd_kernel<T, TW><<<elementwise_grid(ctx, n), 256, 0, ctx.stream()>>>(
          x.data<T>(), w.data<TW>(), bias ? bias->data<TW>() : nullptr, seg_ptr(seg), B, Tn, C, static_cast<int>(K),
          pre.data<T>(), y.data<T>());
    });
  });
  AM_CUDA_CHECK_LAUNCH();
}

void mamba_conv1d_silu_bwd(const Tensor& x, const Tensor& w, const Tensor& pre, const Tensor* seg, const Tensor& dy,
                           Tensor& dx, Tensor* dw, Tensor* dbias, CudaContext& ctx) {
  const char* op = "mamba_conv1d_silu_bwd";
  need_acts(op, {{"x", &x}, {"pre", &pre}, {"dy", &dy}, {"dx", &dx}});
  need_weight(op, "w", w);
  if (dw) need_f32_dev(op, "dw", *dw);
  if (dbias) need_f32_dev(op, "dbias", *dbias);
  need_seg(op, seg);
  const int64_t B = x.dim(0), Tn = x.dim(1), C = x.dim(2), K = w.dim(-1);
  if (K < 1 || K > kMaxConvK) op_error(op, "conv kernel K = " + std::to_string(K) + " is outside 1.." + std::to_string(kMaxConvK));
  const int64_t n = B * Tn * C;
  if (n == 0) return;
  AM_DISPATCH_BF16_F32(x.dtype(), op, T, {
    AM_DISPATCH_BF16_F32(w.dtype(), op, TW, {
      conv_bwd_dx_kernel<T, TW><<<elementwise_grid(ctx, n), 256, 0, ctx.stream()>>>(
          w.data<TW>(), pre.data<T>(), seg_ptr(seg), dy.data<T>(), B, Tn, C, static_cast<int>(K), dx.data<T>());
    });
    AM_CUDA_CHECK_LAUNCH();
    if (dw || dbias) {
      conv_bwd_dw_kernel<T><<<static_cast<unsigned>((C + 31) / 32), dim3(32, kColRows), 0, ctx.stream()>>>(
          x.data<T>(), pre.data<T>(), seg_ptr(seg), dy.data<T>(), B, Tn, C, static_cast<int>(K),
          dw ? dw->data<float>() : nullptr, dbias ? dbias->data<float>() : nullptr);
      AM_CUDA_CHECK_LAUNCH();
    }
  });
}

namespace {
ScanAlgorithm scan_algorithm_from_env() {
  const char* e = std::getenv("AM_MAMBA_SCAN");
  return e && std::strcmp(e, "sequential") == 0 ? ScanAlgorithm::Sequential : ScanAlgorithm::Chunked;
}
ScanAlgorithm g_scan_algorithm = scan_algorithm_from_env();

// The sequential scan's inputs and sizes, shared by its forward and backward (x [B, T, nh, P], Bm [B, T, G, S]).
ScanArgs scan_args(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                   const Tensor& D, const Tensor* seg) {
  ScanArgs a{};
  a.x = x.raw();
  a.dt = dt.data<float>();
  a.A = A.data<float>();
  a.Bm = Bm.raw();
  a.Cm = Cm.raw();
  a.D = D.data<float>();
  a.seg = seg_ptr(seg);
  a.Tn = static_cast<int>(x.dim(1));
  a.nh = static_cast<int>(x.dim(2));
  a.P = static_cast<int>(x.dim(3));
  a.G = static_cast<int>(Bm.dim(2));
  a.S = static_cast<int>(Bm.dim(3));
  return a;
}

// The sequential recurrence's two backward passes (see mamba2.h); dB32 / dC32 zeroed fp32 sums.
void sequential_scan_bwd(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                         const Tensor& D, const Tensor* seg, const Tensor& dy, Tensor& dx, Tensor& ddt, Tensor& dA,
                         Tensor& dB32, Tensor& dC32, Tensor& dD, const ScanGeom& geo, CudaContext& ctx) {
  const char* op = "mamba_ssm_scan_bwd";
  const int64_t B = x.dim(0), Tn = x.dim(1), nh = x.dim(2), S = Bm.dim(3);
  Tensor rbuf = empty({B, Tn, nh}, DType::F32, ctx);
  ScanArgs a = scan_args(x, dt, A, Bm, Cm, D, seg);
  a.dy = dy.raw();
  a.out = dx.raw();
  a.dB32 = dB32.data<float>();
  a.dC32 = dC32.data<float>();
  a.rbuf = rbuf.data<float>();
  a.ddt = ddt.data<float>();
  a.dA = dA.data<float>();
  a.dD = dD.data<float>();
  const size_t smem = (2 * static_cast<size_t>(geo.nw) * S + 2 * geo.nw) * sizeof(float);
  AM_DISPATCH_BF16_F32(x.dtype(), op, T, {
    AM_SCAN_DISPATCH(geo.spl, geo.rpw, {
      scan_bwd_pass1_kernel<T, SPL_, RPW_><<<static_cast<unsigned>(B * nh), geo.nw * 32, smem, ctx.stream()>>>(a);
      AM_CUDA_CHECK_LAUNCH();
      scan_bwd_pass2_kernel<T, SPL_, RPW_><<<static_cast<unsigned>(B * nh), geo.nw * 32, smem, ctx.stream()>>>(a);
      AM_CUDA_CHECK_LAUNCH();
    });
  });
}
}  // namespace

ScanAlgorithm scan_algorithm() { return g_scan_algorithm; }
void set_scan_algorithm(ScanAlgorithm a) { g_scan_algorithm = a; }

void mamba_ssm_scan_fwd(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                        const Tensor& D, const Tensor* seg, Tensor& y, Tensor* states, CudaContext& ctx) {
  const char* op = "mamba_ssm_scan_fwd";
  need_acts(op, {{"x", &x}, {"B", &Bm}, {"C", &Cm}, {"y", &y}});
  need_f32_dev(op, "dt", dt);
  need_f32_dev(op, "A", A);
  need_f32_dev(op, "D", D);
  if (states) need_f32_dev(op, "states", *states);
  need_seg(op, seg);
  const int64_t B = x.dim(0), Tn = x.dim(1), nh = x.dim(2), P = x.dim(3), S = Bm.dim(3);
  const ScanGeom geo = scan_geom(op, P, S);
  if (B * nh == 0 || Tn == 0) return;
  if (Tn > INT_MAX || B * nh > INT_MAX) op_error(op, "too many tokens or heads for one launch");
  if (!states && g_scan_algorithm == ScanAlgorithm::Chunked) {
    ssd_scan_fwd(x, dt, A, Bm, Cm, D, seg, y, ctx);
    return;
  }
  ScanArgs a = scan_args(x, dt, A, Bm, Cm, D, seg);
  a.out = y.raw();
  a.states = states ? states->data<float>() : nullptr;
  AM_DISPATCH_BF16_F32(x.dtype(), op, T, {
    AM_SCAN_DISPATCH(geo.spl, geo.rpw, {
      scan_fwd_kernel<T, SPL_, RPW_><<<static_cast<unsigned>(B * nh), geo.nw * 32, 0, ctx.stream()>>>(a);
    });
  });
  AM_CUDA_CHECK_LAUNCH();
}

void mamba_ssm_scan_bwd(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                        const Tensor& D, const Tensor* seg, const Tensor& dy, Tensor& dx, Tensor& ddt, Tensor& dA,
                        Tensor& dB, Tensor& dC, Tensor& dD, CudaContext& ctx) {
  const char* op = "mamba_ssm_scan_bwd";
  need_acts(op, {{"x", &x}, {"B", &Bm}, {"C", &Cm}, {"dy", &dy}, {"dx", &dx}, {"dB", &dB}, {"dC", &dC}});
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"dt", &dt}, {"A", &A}, {"D", &D}, {"ddt", &ddt},
                                {"dA", &dA}, {"dD", &dD}})
    need_f32_dev(op, name, *t);
  need_seg(op, seg);
  const int64_t B = x.dim(0), Tn = x.dim(1), nh = x.dim(2), P = x.dim(3), S = Bm.dim(3);
  const ScanGeom geo = scan_geom(op, P, S);
  if (Tn > INT_MAX || B * nh > INT_MAX) op_error(op, "too many tokens or heads for one launch");
  // dB / dC are sums over the group's heads: fp32 accumulators, zeroed (the outputs themselves when fp32).
  const bool f32 = x.dtype() == DType::F32;
  Tensor dB32 = f32 ? dB : empty(Bm.shape(), DType::F32, ctx), dC32 = f32 ? dC : empty(Cm.shape(), DType::F32, ctx);
  zero_(dB32, ctx);
  zero_(dC32, ctx);
  if (B * nh == 0 || Tn == 0) {
    if (!f32) {
      copy_(dB, dB32, ctx);
      copy_(dC, dC32, ctx);
    }
    return;
  }
  if (g_scan_algorithm == ScanAlgorithm::Chunked) {
    ssd_scan_bwd(x, dt, A, Bm, Cm, D, seg, dy, dx, ddt, dA, dB32, dC32, dD, ctx);
  } else {
    sequential_scan_bwd(x, dt, A, Bm, Cm, D, seg, dy, dx, ddt, dA, dB32, dC32, dD, geo, ctx);
  }
  if (!f32) {
    copy_(dB, dB32, ctx);
    copy_(dC, dC32, ctx);
  }
}


void gated_rmsnorm_fwd(const Tensor& y, const Tensor& z, const Tensor& w, int64_t group, float eps, Tensor& out,
                       Tensor& rstd, CudaContext& ctx) {
  const char* op = "gated_rmsnorm_fwd";
  need_acts(op, {{"y", &y}, {"z", &z}, {"out", &out}});
  need_weight(op, "w", w);
  need_f32_dev(op, "rstd", rstd);
  const int64_t din = w.numel(), ng = din / group, total = y.numel() / group;
  if (total == 0) return;
  AM_DISPATCH_BF16_F32(y.dtype(), op, T, {
    AM_DISPATCH_BF16_F32(w.dtype(), op, TW, {
      gnorm_fwd_kernel<T, TW><<<grid_for(total * 32, 256, int64_t(ctx.sm_count()) * 16), 256, 0, ctx.stream()>>>(
          y.data<T>(), z.data<T>(), w.data<TW>(), total, group, ng, eps, out.data<T>(), rstd.data<float>());
    });
  });
  AM_CUDA_CHECK_LAUNCH();
}

void gated_rmsnorm_bwd(const Tensor& y, const Tensor& z, const Tensor& w, const Tensor& rstd, int64_t group,
                       const Tensor& dout, Tensor& dy, Tensor& dz, Tensor& dw, CudaContext& ctx) {
  const char* op = "gated_rmsnorm_bwd";
  need_acts(op, {{"y", &y}, {"z", &z}, {"dout", &dout}, {"dy", &dy}, {"dz", &dz}});
  need_weight(op, "w", w);
  need_f32_dev(op, "rstd", rstd);
  if (dw.defined()) need_f32_dev(op, "dw", dw);
  const int64_t din = w.numel(), ng = din / group, total = y.numel() / group, rows = din ? y.numel() / din : 0;
  if (total == 0) return;
  AM_DISPATCH_BF16_F32(y.dtype(), op, T, {
    AM_DISPATCH_BF16_F32(w.dtype(), op, TW, {
      gnorm_bwd_kernel<T, TW><<<grid_for(total * 32, 256, int64_t(ctx.sm_count()) * 16), 256, 0, ctx.stream()>>>(
          y.data<T>(), z.data<T>(), w.data<TW>(), rstd.data<float>(), dout.data<T>(), total, group, ng, dy.data<T>(),
          dz.data<T>());
    });
    AM_CUDA_CHECK_LAUNCH();
    if (dw.defined())
      launch_col_sum(GnormDwTerm<T>{y.data<T>(), z.data<T>(), dout.data<T>(), rstd.data<float>(), din, group}, rows, din,
                     dw.data<float>(), ctx.stream());
  });
}

void mamba_dt_fwd(const Tensor& dt_raw, const Tensor& dt_bias, float lo, float hi, Tensor& dt_in, Tensor& dt,
                  CudaContext& ctx) {
  const char* op = "mamba_dt_fwd";
  need_acts(op, {{"dt_raw", &dt_raw}});
  need_weight(op, "dt_bias", dt_bias);
  need_f32_dev(op, "dt_in", dt_in);
  need_f32_dev(op, "dt", dt);
  const int64_t n = dt_raw.numel(), nh = dt_bias.numel();
  if (n == 0) return;
  AM_DISPATCH_BF16_F32(dt_raw.dtype(), op, T, {
    AM_DISPATCH_BF16_F32(dt_bias.dtype(), op, TW, {
      dt_fwd_kernel<T, TW><<<elementwise_grid(ctx, n), 256, 0, ctx.stream()>>>(
          dt_raw.data<T>(), dt_bias.data<TW>(), n, nh, lo, hi, dt_in.data<float>(), dt.data<float>());
    });
  });
  AM_CUDA_CHECK_LAUNCH();
}

void mamba_dt_bwd(const Tensor& dt_in, const Tensor& ddt, float lo, float hi, Tensor& ddt_raw, Tensor* ddt_bias,
                  CudaContext& ctx) {
  const char* op = "mamba_dt_bwd";
  need_f32_dev(op, "dt_in", dt_in);
  need_f32_dev(op, "ddt", ddt);
  need_acts(op, {{"ddt_raw", &ddt_raw}});
  if (ddt_bias) need_f32_dev(op, "ddt_bias", *ddt_bias);
  const int64_t n = dt_in.numel(), nh = dt_in.dim(-1);
  if (n == 0) return;
  AM_DISPATCH_BF16_F32(ddt_raw.dtype(), op, T, {
    dt_bwd_kernel<T><<<elementwise_grid(ctx, n), 256, 0, ctx.stream()>>>(dt_in.data<float>(), ddt.data<float>(), n, lo,
                                                                         hi, ddt_raw.data<T>());
  });
  AM_CUDA_CHECK_LAUNCH();
  if (ddt_bias)
    launch_col_sum(DtBiasTerm{dt_in.data<float>(), ddt.data<float>(), nh, lo, hi}, n / nh, nh, ddt_bias->data<float>(),
                   ctx.stream());
}

void mamba_a_log_fwd(const Tensor& A_log, Tensor& A, CudaContext& ctx) {
  const char* op = "mamba_a_log_fwd";
  need_weight(op, "A_log", A_log);
  need_f32_dev(op, "A", A);
  const int64_t n = A.numel();
  if (n == 0) return;
  AM_DISPATCH_BF16_F32(A_log.dtype(), op, TW, {
    a_log_fwd_kernel<TW><<<elementwise_grid(ctx, n), 256, 0, ctx.stream()>>>(A_log.data<TW>(), n, A.data<float>());
  });
  AM_CUDA_CHECK_LAUNCH();
}

void mamba_a_log_bwd(const Tensor& A, const Tensor& dA, Tensor& dA_log, CudaContext& ctx) {
  const char* op = "mamba_a_log_bwd";
  need_f32_dev(op, "A", A);
  need_f32_dev(op, "dA", dA);
  need_f32_dev(op, "dA_log", dA_log);
  const int64_t n = A.numel();
  if (n == 0) return;
  a_log_bwd_kernel<<<elementwise_grid(ctx, n), 256, 0, ctx.stream()>>>(A.data<float>(), dA.data<float>(), n,
                                                                       dA_log.data<float>());
  AM_CUDA_CHECK_LAUNCH();
}

void relu2_fwd(const Tensor& x, Tensor& y, CudaContext& ctx) {
  const char* op = "relu2_fwd";
  need_acts(op, {{"x", &x}, {"y", &y}});
  const int64_t n = x.numel();
  if (n == 0) return;
  AM_DISPATCH_BF16_F32(x.dtype(), op, T, {
    relu2_fwd_kernel<T><<<elementwise_grid(ctx, n), 256, 0, ctx.stream()>>>(x.data<T>(), n, y.data<T>());
  });
  AM_CUDA_CHECK_LAUNCH();
}

void relu2_bwd(const Tensor& x, const Tensor& dy, Tensor& dx, CudaContext& ctx) {
  const char* op = "relu2_bwd";
  need_acts(op, {{"x", &x}, {"dy", &dy}, {"dx", &dx}});
  const int64_t n = x.numel();
  if (n == 0) return;
  AM_DISPATCH_BF16_F32(x.dtype(), op, T, {
    relu2_bwd_kernel<T><<<elementwise_grid(ctx, n), 256, 0, ctx.stream()>>>(x.data<T>(), dy.data<T>(), n, dx.data<T>());
  });
  AM_CUDA_CHECK_LAUNCH();
}

}  // namespace am::cuda
