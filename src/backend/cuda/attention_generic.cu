// Generic CUDA attention (contract: attention_generic.h; semantics: src/backend/cpu/attention.cpp). Plain
// fp32 CUDA-core arithmetic, written to be obviously the CPU reference's math first and reasonably fast
// second: it serves the head dims and features the tensor-core flash kernels lack (Gemma 3's 256, Phi-3's 96,
// DeepSeek MLA's 192 / 128, gpt_oss sinks, Gemma 2 soft-capping).
//
// Visibility of key j to query i (as the CPU reference):
//   j <= i  and  (window == 0 or i - j < window)  and  seg_i >= 0 and seg_j == seg_i
// Scores: s_ij = scale q_i.k_j, then c tanh(s_ij / c) when softcap c > 0, then the mask.
//
// Layout shared by the three main kernels: a block of kWarps warps owns a tile of rows (query rows for the
// forward and dq, key rows for dk/dv); each warp owns R of them ("my rows", kept in registers: softmax
// state and output accumulators, lane l holding features l, l + 32, ... so D, Dv <= 32 * kMaxC). The other
// side (keys, resp. queries) streams through shared memory in tiles of 32 rows, one per lane:
//   1. every lane computes the full dot products of its streamed row with the warp's R rows (the streamed
//      rows sit in shared memory with a padded stride, so lanes reading different rows hit different
//      banks; the warp's own rows are read as broadcasts);
//   2. the per-row results (probabilities, dS) go to a small per-warp shared buffer;
//   3. lanes switch to features: for each of the 32 streamed rows, my_acc[r][f] += w[r][row] * row[f].
// Before loading a tile, a ballot + __syncthreads_or says whether any (my row, streamed row) pair of the
// block is visible; tiles that are masked out entirely (beyond the causal diagonal or the window, other
// segments, padding) are skipped without being loaded.
//
// Forward (one block per (b, h, 4R query rows)): online softmax per query row over the visible keys,
// m = running max, l = running normaliser, acc = running sum of e^(s - m) v; at the end the sink (if any)
// joins m and l as one more value-less column, out = acc / l, lse = m + log l. Rows that saw no key: out 0,
// lse -inf.
// Backward: dsum_i = dout_i . out_i (a pre-pass that also accumulates dsinks[h] -= e^(sink_h - lse_i) dsum_i
// with one fp32 atomic per block), then with P_ij = e^(s_ij - lse_i), dP_ij = dout_i . v_j and
// dS_ij = P_ij (dP_ij - dsum_i) (1 - tanh^2 with soft-capping):
//   dq_i = scale sum_j dS_ij k_j                (query-row kernel, one block per (b, h, 4R queries))
//   dk_j = scale sum_{h in group, i} dS_ij q_i,  dv_j = sum_{h in group, i} P_ij dout_i
//                                               (key-row kernel, one block per (b, kv head, 4R keys))
// Each output row is owned by one warp, so dq/dk/dv need no atomics and are deterministic.
//
// Shared memory is fp32 (converted on load). With D = Dv = 256 and R = 4 the backward kernels take about
// 100 KB of it per block; the host picks R in {4, 2, 1} so that the block fits the device's opt-in limit.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <initializer_list>
#include <string>
#include <utility>

#include "backend/cuda/attention_generic.h"
#include "backend/cuda/kernel_utils.cuh"

namespace am::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTile = 32;  // streamed rows per shared-memory tile: one per lane
constexpr int kMaxC = 8;   // features per lane: D, Dv <= 32 * kMaxC = 256
constexpr int kPad = 4;    // padding (floats) of the lane-per-row tiles: row stride D + 4 keeps float4 reads
                           // of 8 consecutive rows on distinct banks and 16-byte aligned
constexpr int kDsumRows = 64;  // query rows per block of the dsum pre-pass (8 warps)
constexpr unsigned kFull = 0xffffffffu;
static_assert(kGenericAttnMaxHeadDim == 32 * kMaxC, "lanes x features per lane must cover the largest head dim");

// Everything the kernels need besides the data pointers.
struct Dims {
  int B = 0, T = 0, nh = 0, nkv = 0, D = 0, Dv = 0;
  int window = 0;              // 0: none
  float scale = 0.f, softcap = 0.f;
  const int32_t* seg = nullptr;  // [B, T] or null
  const void* sinks = nullptr;   // [nh] fp32 or bf16, or null
  bool sinks_bf16 = false;
  bool vec = false;  // every base pointer is aligned to 4 elements: rows load as 4-element vectors
};

__device__ __forceinline__ float sink_of(const Dims& d, int h) {
  return d.sinks_bf16 ? __bfloat162float(static_cast<const bf16*>(d.sinks)[h]) : static_cast<const float*>(d.sinks)[h];
}

// Segment of position t of batch row `segb` (null: one segment), for a query (out of range: -1, sees
// nothing) or a key (out of range: INT_MIN, matches no query).
__device__ __forceinline__ int query_seg(const int32_t* segb, int t, int T) { return t < T ? (segb ? segb[t] : 0) : -1; }
__device__ __forceinline__ int key_seg(const int32_t* segb, int t, int T) { return t < T ? (segb ? segb[t] : 0) : INT_MIN; }

// Query i (segment si) sees key j (segment sj).
__device__ __forceinline__ bool visible(int i, int j, int si, int sj, int window) {
  return si >= 0 && sj == si && j <= i && (window <= 0 || i - j < window);
}

// dst[r * dst_ld + c] = src[(row0 + r) * src_ld + c] as fp32 for r < nrows, c < width (a multiple of 4);
// rows at or beyond T are zero (so a masked lane multiplies zeros, never uninitialised memory). All threads
// of the block take part.
template <typename T>
__device__ void load_rows(float* __restrict__ dst, int dst_ld, const T* __restrict__ src, int64_t src_ld, int row0,
                          int nrows, int T_, int width, bool vec) {
  const int w4 = width / 4;
  for (int e = threadIdx.x; e < nrows * w4; e += blockDim.x) {
    const int r = e / w4, c = (e - r * w4) * 4;
    float4 f = make_float4(0.f, 0.f, 0.f, 0.f);
    if (row0 + r < T_) {
      const T* s = src + static_cast<int64_t>(row0 + r) * src_ld + c;
      if (vec) {
        const Vec<T, 4> x = load_vec<T, 4>(s);
        f = make_float4(to_f(x.v[0]), to_f(x.v[1]), to_f(x.v[2]), to_f(x.v[3]));
      } else {
        f = make_float4(to_f(s[0]), to_f(s[1]), to_f(s[2]), to_f(s[3]));
      }
    }
    *reinterpret_cast<float4*>(dst + r * dst_ld + c) = f;
  }
}

__device__ __forceinline__ float dot4(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }

// The score as the softmax sees it and d(score)/d(raw): the soft-cap's 1 - tanh^2 (1 without it).
__device__ __forceinline__ float capped(float raw, float cap, float* grad) {
  if (cap > 0.f) {
    const float t = tanhf(raw / cap);
    if (grad) *grad = 1.f - t * t;
    return cap * t;
  }
  if (grad) *grad = 1.f;
  return raw;
}

// ---------------------------------------------------------------------------------------------------------
// Forward: grid (ceil(T / (kWarps R)), nh, B). Shared: Qs [QT][D], Ks [32][D + 4], Vs [32][Dv],
// Ps [kWarps][R][32].
template <typename T, int R>
__global__ void __launch_bounds__(kThreads)
    gen_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
                   float* __restrict__ lse, Dims d) {
  constexpr int QT = kWarps * R;
  extern __shared__ float4 smem4[];
  const int D = d.D, Dv = d.Dv, kld = D + kPad;
  float* Qs = reinterpret_cast<float*>(smem4);
  float* Ks = Qs + QT * D;
  float* Vs = Ks + kTile * kld;
  float* Ps = Vs + kTile * Dv;
  const int i0 = blockIdx.x * QT, h = blockIdx.y, b = blockIdx.z;
  const int kh = h / (d.nh / d.nkv);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t q_ld = static_cast<int64_t>(d.nh) * D, k_ld = static_cast<int64_t>(d.nkv) * D,
                v_ld = static_cast<int64_t>(d.nkv) * Dv, o_ld = static_cast<int64_t>(d.nh) * Dv;
  const int64_t bt = static_cast<int64_t>(b) * d.T;
  const T* kb = k + bt * k_ld + static_cast<int64_t>(kh) * D;
  const T* vb = v + bt * v_ld + static_cast<int64_t>(kh) * Dv;
  const int32_t* segb = d.seg ? d.seg + bt : nullptr;

  load_rows(Qs, D, q + bt * q_ld + static_cast<int64_t>(h) * D, q_ld, i0, QT, d.T, D, d.vec);
  // (Qs is published by the first __syncthreads_or below.)

  int qi[R], qseg[R];
  float m[R], l[R], acc[R][kMaxC];
  bool any[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    qi[r] = i0 + warp * R + r;
    qseg[r] = query_seg(segb, qi[r], d.T);
    m[r] = -INFINITY;
    l[r] = 0.f;
    any[r] = false;
#pragma unroll
    for (int c = 0; c < kMaxC; ++c) acc[r][c] = 0.f;
  }
  const float* myq = Qs + warp * R * D;
  float* myp = Ps + warp * R * kTile;

  const int i_end = min(d.T, i0 + QT);  // one past the block's last query
  const int j_lo = d.window > 0 ? max(0, i0 - d.window + 1) : 0;
  for (int j0 = j_lo; j0 < i_end; j0 += kTile) {
    const int j = j0 + lane;
    const int kseg = key_seg(segb, j, d.T);
    unsigned vis[R];
    bool mine = false;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      vis[r] = __ballot_sync(kFull, visible(qi[r], j, qseg[r], kseg, d.window));
      mine |= vis[r] != 0u;
    }
    // Also the barrier that keeps the previous tile's readers ahead of this tile's loads.
    if (!__syncthreads_or(mine)) continue;
    load_rows(Ks, kld, kb, k_ld, j0, kTile, d.T, D, d.vec);
    load_rows(Vs, Dv, vb, v_ld, j0, kTile, d.T, Dv, d.vec);
    __syncthreads();
    if (!mine) continue;  // warp-uniform: this warp's rows see none of these keys

    // 1. lane = key j: raw dot products with the warp's R query rows.
    float s[R];
#pragma unroll
    for (int r = 0; r < R; ++r) s[r] = 0.f;
    const float4* krow = reinterpret_cast<const float4*>(Ks + lane * kld);
#pragma unroll 4
    for (int x = 0; x < D / 4; ++x) {
      const float4 kk = krow[x];
#pragma unroll
      for (int r = 0; r < R; ++r) s[r] += dot4(reinterpret_cast<const float4*>(myq + r * D)[x], kk);
    }
    // 2. online softmax update per row; the tile's probabilities go to Ps.
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (vis[r] == 0u) {  // warp-uniform
        myp[r * kTile + lane] = 0.f;
        continue;
      }
      any[r] = true;
      const bool seen = (vis[r] >> lane) & 1u;
      const float sc = seen ? capped(d.scale * s[r], d.softcap, nullptr) : -INFINITY;
      const float mn = fmaxf(m[r], warp_max(sc));  // finite: at least one lane sees its key
      const float corr = expf(m[r] - mn);           // the row's first visible tile: m = -inf, corr = 0
      const float p = seen ? expf(sc - mn) : 0.f;
      l[r] = l[r] * corr + warp_sum(p);
#pragma unroll
      for (int c = 0; c < kMaxC; ++c) acc[r][c] *= corr;
      m[r] = mn;
      myp[r * kTile + lane] = p;
    }
    __syncwarp();
    // 3. lane = feature: acc[r] += sum_j P_rj v_j (masked keys have P = 0 and are skipped, so whatever
    // their values hold never reaches the output, as in the CPU reference).
    for (int jj = 0; jj < kTile; ++jj) {
      float vv[kMaxC];
#pragma unroll
      for (int c = 0; c < kMaxC; ++c) {
        const int f = lane + 32 * c;
        vv[c] = f < Dv ? Vs[jj * Dv + f] : 0.f;
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float p = myp[r * kTile + jj];
        if (p != 0.f) {
#pragma unroll
          for (int c = 0; c < kMaxC; ++c) acc[r][c] += p * vv[c];
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (qi[r] >= d.T) continue;
    T* orow = out + (bt + qi[r]) * o_ld + static_cast<int64_t>(h) * Dv;
    float L = -INFINITY, inv = 0.f;  // a row that saw no key: out = 0, lse = -inf
    if (any[r]) {
      if (d.sinks) {  // the sink: one more softmax column without a value
        const float sk = sink_of(d, h);
        const float mn = fmaxf(m[r], sk);
        const float corr = expf(m[r] - mn);
        l[r] = l[r] * corr + expf(sk - mn);
#pragma unroll
        for (int c = 0; c < kMaxC; ++c) acc[r][c] *= corr;
        m[r] = mn;
      }
      inv = 1.f / l[r];
      L = m[r] + logf(l[r]);
    }
#pragma unroll
    for (int c = 0; c < kMaxC; ++c) {
      const int f = lane + 32 * c;
      if (f < Dv) orow[f] = from_f<T>(acc[r][c] * inv);
    }
    if (lane == 0) lse[(static_cast<int64_t>(b) * d.nh + h) * d.T + qi[r]] = L;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward pre-pass: dsum [B, nh, T] = dout . out per query row; with dsinks, also
// dsinks[h] += -sum_i e^(sink_h - lse_i) dsum_i over rows that saw a key. Grid (ceil(T / 64), nh, B), 256
// threads, one warp per row.
template <typename T>
__global__ void __launch_bounds__(256)
    gen_dsum_kernel(const T* __restrict__ out, const T* __restrict__ dout, const float* __restrict__ lse,
                    float* __restrict__ dsum, float* __restrict__ dsinks, Dims d) {
  __shared__ float scratch[32];
  const int h = blockIdx.y, b = blockIdx.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int64_t o_ld = static_cast<int64_t>(d.nh) * d.Dv;
  const float sk = dsinks ? sink_of(d, h) : 0.f;
  float sink_part = 0.f;
  for (int r = warp; r < kDsumRows; r += nwarps) {
    const int i = blockIdx.x * kDsumRows + r;
    if (i >= d.T) break;
    const int64_t off = (static_cast<int64_t>(b) * d.T + i) * o_ld + static_cast<int64_t>(h) * d.Dv;
    float a = 0.f;
    for (int f = lane; f < d.Dv; f += 32) a += to_f(out[off + f]) * to_f(dout[off + f]);
    a = warp_sum(a);
    const int64_t row = (static_cast<int64_t>(b) * d.nh + h) * d.T + i;
    if (lane == 0) dsum[row] = a;
    if (dsinks && lane == 0) {
      const float L = lse[row];
      if (L != -INFINITY) sink_part -= expf(sk - L) * a;
    }
  }
  if (dsinks) {
    const float tot = block_sum(sink_part, scratch);
    if (threadIdx.x == 0) atomicAdd(dsinks + h, tot);
  }
}

// ---------------------------------------------------------------------------------------------------------
// dq: grid (ceil(T / (kWarps R)), nh, B). Shared: Qs [QT][D], Os [QT][Dv] (dout rows), Ks [32][D + 4],
// Vs [32][Dv + 4], Ss [kWarps][R][32] (dS).
template <typename T, int R>
__global__ void __launch_bounds__(kThreads)
    gen_bwd_dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                      const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ dsum,
                      T* __restrict__ dq, Dims d) {
  constexpr int QT = kWarps * R;
  extern __shared__ float4 smem4[];
  const int D = d.D, Dv = d.Dv, kld = D + kPad, vld = Dv + kPad;
  float* Qs = reinterpret_cast<float*>(smem4);
  float* Os = Qs + QT * D;
  float* Ks = Os + QT * Dv;
  float* Vs = Ks + kTile * kld;
  float* Ss = Vs + kTile * vld;
  const int i0 = blockIdx.x * QT, h = blockIdx.y, b = blockIdx.z;
  const int kh = h / (d.nh / d.nkv);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t q_ld = static_cast<int64_t>(d.nh) * D, k_ld = static_cast<int64_t>(d.nkv) * D,
                v_ld = static_cast<int64_t>(d.nkv) * Dv, o_ld = static_cast<int64_t>(d.nh) * Dv;
  const int64_t bt = static_cast<int64_t>(b) * d.T;
  const T* kb = k + bt * k_ld + static_cast<int64_t>(kh) * D;
  const T* vb = v + bt * v_ld + static_cast<int64_t>(kh) * Dv;
  const int32_t* segb = d.seg ? d.seg + bt : nullptr;
  const int64_t lrow0 = (static_cast<int64_t>(b) * d.nh + h) * d.T;

  load_rows(Qs, D, q + bt * q_ld + static_cast<int64_t>(h) * D, q_ld, i0, QT, d.T, D, d.vec);
  load_rows(Os, Dv, dout + bt * o_ld + static_cast<int64_t>(h) * Dv, o_ld, i0, QT, d.T, Dv, d.vec);

  int qi[R], qseg[R];
  float L[R], Dr[R], acc[R][kMaxC];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    qi[r] = i0 + warp * R + r;
    L[r] = qi[r] < d.T ? lse[lrow0 + qi[r]] : -INFINITY;
    Dr[r] = qi[r] < d.T ? dsum[lrow0 + qi[r]] : 0.f;
    // A row whose lse is -inf saw no key in the forward: it contributes no gradient.
    qseg[r] = L[r] == -INFINITY ? -1 : query_seg(segb, qi[r], d.T);
#pragma unroll
    for (int c = 0; c < kMaxC; ++c) acc[r][c] = 0.f;
  }
  const float* myq = Qs + warp * R * D;
  const float* myo = Os + warp * R * Dv;
  float* mys = Ss + warp * R * kTile;

  const int i_end = min(d.T, i0 + QT);
  const int j_lo = d.window > 0 ? max(0, i0 - d.window + 1) : 0;
  for (int j0 = j_lo; j0 < i_end; j0 += kTile) {
    const int j = j0 + lane;
    const int kseg = key_seg(segb, j, d.T);
    unsigned vis[R];
    bool mine = false;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      vis[r] = __ballot_sync(kFull, visible(qi[r], j, qseg[r], kseg, d.window));
      mine |= vis[r] != 0u;
    }
    if (!__syncthreads_or(mine)) continue;
    load_rows(Ks, kld, kb, k_ld, j0, kTile, d.T, D, d.vec);
    load_rows(Vs, vld, vb, v_ld, j0, kTile, d.T, Dv, d.vec);
    __syncthreads();
    if (!mine) continue;

    // lane = key j: s_rj = q_r . k_j and dP_rj = dout_r . v_j.
    float s[R], dp[R];
#pragma unroll
    for (int r = 0; r < R; ++r) s[r] = dp[r] = 0.f;
    const float4* krow = reinterpret_cast<const float4*>(Ks + lane * kld);
#pragma unroll 4
    for (int x = 0; x < D / 4; ++x) {
      const float4 kk = krow[x];
#pragma unroll
      for (int r = 0; r < R; ++r) s[r] += dot4(reinterpret_cast<const float4*>(myq + r * D)[x], kk);
    }
    const float4* vrow = reinterpret_cast<const float4*>(Vs + lane * vld);
#pragma unroll 4
    for (int x = 0; x < Dv / 4; ++x) {
      const float4 vv = vrow[x];
#pragma unroll
      for (int r = 0; r < R; ++r) dp[r] += dot4(reinterpret_cast<const float4*>(myo + r * Dv)[x], vv);
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float ds = 0.f;
      if ((vis[r] >> lane) & 1u) {
        float g;
        const float sc = capped(d.scale * s[r], d.softcap, &g);
        const float P = expf(sc - L[r]);
        ds = P * (dp[r] - Dr[r]) * g;
      }
      mys[r * kTile + lane] = ds;
    }
    __syncwarp();
    // lane = feature: acc[r] += sum_j dS_rj k_j.
    for (int jj = 0; jj < kTile; ++jj) {
      float kk[kMaxC];
#pragma unroll
      for (int c = 0; c < kMaxC; ++c) {
        const int f = lane + 32 * c;
        kk[c] = f < D ? Ks[jj * kld + f] : 0.f;
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float ds = mys[r * kTile + jj];
        if (ds != 0.f) {
#pragma unroll
          for (int c = 0; c < kMaxC; ++c) acc[r][c] += ds * kk[c];
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (qi[r] >= d.T) continue;
    T* row = dq + (bt + qi[r]) * q_ld + static_cast<int64_t>(h) * D;
#pragma unroll
    for (int c = 0; c < kMaxC; ++c) {
      const int f = lane + 32 * c;
      if (f < D) row[f] = from_f<T>(d.scale * acc[r][c]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// dk, dv: grid (ceil(T / (kWarps R)), nkv, B); the block's keys stay put while the queries of every head
// of the GQA group stream past. Shared: Ks [KT][D], Vs [KT][Dv], Qs [32][D + 4], Os [32][Dv + 4] (dout),
// Ps and Ss [kWarps][R][32] (P and dS).
template <typename T, int R>
__global__ void __launch_bounds__(kThreads)
    gen_bwd_dkv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ dsum,
                       T* __restrict__ dk, T* __restrict__ dv, Dims d) {
  constexpr int KT = kWarps * R;
  extern __shared__ float4 smem4[];
  const int D = d.D, Dv = d.Dv, qld = D + kPad, old = Dv + kPad;
  float* Ks = reinterpret_cast<float*>(smem4);
  float* Vs = Ks + KT * D;
  float* Qs = Vs + KT * Dv;
  float* Os = Qs + kTile * qld;
  float* Ps = Os + kTile * old;
  float* Ss = Ps + kWarps * R * kTile;
  const int j0 = blockIdx.x * KT, kh = blockIdx.y, b = blockIdx.z;
  const int group = d.nh / d.nkv;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t q_ld = static_cast<int64_t>(d.nh) * D, k_ld = static_cast<int64_t>(d.nkv) * D,
                v_ld = static_cast<int64_t>(d.nkv) * Dv, o_ld = static_cast<int64_t>(d.nh) * Dv;
  const int64_t bt = static_cast<int64_t>(b) * d.T;
  const int32_t* segb = d.seg ? d.seg + bt : nullptr;

  load_rows(Ks, D, k + bt * k_ld + static_cast<int64_t>(kh) * D, k_ld, j0, KT, d.T, D, d.vec);
  load_rows(Vs, Dv, v + bt * v_ld + static_cast<int64_t>(kh) * Dv, v_ld, j0, KT, d.T, Dv, d.vec);

  int kj[R], kseg[R];
  float ak[R][kMaxC], av[R][kMaxC];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    kj[r] = j0 + warp * R + r;
    kseg[r] = key_seg(segb, kj[r], d.T);
#pragma unroll
    for (int c = 0; c < kMaxC; ++c) ak[r][c] = av[r][c] = 0.f;
  }
  const float* myk = Ks + warp * R * D;
  const float* myv = Vs + warp * R * Dv;
  float* myp = Ps + warp * R * kTile;
  float* mys = Ss + warp * R * kTile;

  const int j_last = min(d.T, j0 + KT) - 1;
  // One past the last query that may see one of the block's keys (queries i >= j see key j).
  const int64_t w_end = static_cast<int64_t>(j_last) + d.window;
  const int i_end = d.window > 0 && w_end < d.T ? static_cast<int>(w_end) : d.T;
  for (int h = kh * group; h < (kh + 1) * group; ++h) {
    const int64_t lrow0 = (static_cast<int64_t>(b) * d.nh + h) * d.T;
    const T* qb = q + bt * q_ld + static_cast<int64_t>(h) * D;
    const T* ob = dout + bt * o_ld + static_cast<int64_t>(h) * Dv;
    for (int i0 = j0; i0 < i_end; i0 += kTile) {
      // lane = query i
      const int i = i0 + lane;
      const float Li = i < d.T ? lse[lrow0 + i] : -INFINITY;
      const float Di = i < d.T ? dsum[lrow0 + i] : 0.f;
      const int qseg = Li == -INFINITY ? -1 : query_seg(segb, i, d.T);
      unsigned vis[R];
      bool mine = false;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        vis[r] = __ballot_sync(kFull, visible(i, kj[r], qseg, kseg[r], d.window));
        mine |= vis[r] != 0u;
      }
      if (!__syncthreads_or(mine)) continue;
      load_rows(Qs, qld, qb, q_ld, i0, kTile, d.T, D, d.vec);
      load_rows(Os, old, ob, o_ld, i0, kTile, d.T, Dv, d.vec);
      __syncthreads();
      if (!mine) continue;

      // lane = query i: s_ir = q_i . k_r and dP_ir = dout_i . v_r for the warp's R keys.
      float s[R], dp[R];
#pragma unroll
      for (int r = 0; r < R; ++r) s[r] = dp[r] = 0.f;
      const float4* qrow = reinterpret_cast<const float4*>(Qs + lane * qld);
#pragma unroll 4
      for (int x = 0; x < D / 4; ++x) {
        const float4 qq = qrow[x];
#pragma unroll
        for (int r = 0; r < R; ++r) s[r] += dot4(qq, reinterpret_cast<const float4*>(myk + r * D)[x]);
      }
      const float4* orow = reinterpret_cast<const float4*>(Os + lane * old);
#pragma unroll 4
      for (int x = 0; x < Dv / 4; ++x) {
        const float4 oo = orow[x];
#pragma unroll
        for (int r = 0; r < R; ++r) dp[r] += dot4(oo, reinterpret_cast<const float4*>(myv + r * Dv)[x]);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float P = 0.f, ds = 0.f;
        if ((vis[r] >> lane) & 1u) {
          float g;
          const float sc = capped(d.scale * s[r], d.softcap, &g);
          P = expf(sc - Li);
          ds = P * (dp[r] - Di) * g;
        }
        myp[r * kTile + lane] = P;
        mys[r * kTile + lane] = ds;
      }
      __syncwarp();
      // lane = feature: dk_r += sum_i dS_ir q_i, dv_r += sum_i P_ir dout_i.
      for (int ii = 0; ii < kTile; ++ii) {
        float qv[kMaxC], ov[kMaxC];
#pragma unroll
        for (int c = 0; c < kMaxC; ++c) {
          const int f = lane + 32 * c;
          qv[c] = f < D ? Qs[ii * qld + f] : 0.f;
          ov[c] = f < Dv ? Os[ii * old + f] : 0.f;
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float P = myp[r * kTile + ii], ds = mys[r * kTile + ii];
          if (ds != 0.f) {
#pragma unroll
            for (int c = 0; c < kMaxC; ++c) ak[r][c] += ds * qv[c];
          }
          if (P != 0.f) {
#pragma unroll
            for (int c = 0; c < kMaxC; ++c) av[r][c] += P * ov[c];
          }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (kj[r] >= d.T) continue;
    T* krow = dk + (bt + kj[r]) * k_ld + static_cast<int64_t>(kh) * D;
    T* vrow = dv + (bt + kj[r]) * v_ld + static_cast<int64_t>(kh) * Dv;
#pragma unroll
    for (int c = 0; c < kMaxC; ++c) {
      const int f = lane + 32 * c;
      if (f < D) krow[f] = from_f<T>(d.scale * ak[r][c]);
      if (f < Dv) vrow[f] = from_f<T>(av[r][c]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side.

constexpr size_t kDefaultSmem = 48 * 1024;  // what a block gets without opting in

[[noreturn]] void fail(const char* op, const std::string& m) { throw DeviceError(std::string(op) + " (CUDA generic): " + m); }

void check_launch(const char* op, cudaError_t e) {
  if (e == cudaSuccess) return;
  cudaGetLastError();
  fail(op, std::string("CUDA error '") + cudaGetErrorString(e) + "' (" + cudaGetErrorName(e) + ")");
}

size_t max_smem_optin() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&n, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    cudaGetLastError();
    return kDefaultSmem;
  }
  return static_cast<size_t>(n);
}

// Shared-memory bytes of each kernel for R rows per warp.
size_t fwd_smem(int R, int D, int Dv) {
  return sizeof(float) * static_cast<size_t>(kWarps * R * D + kTile * (D + kPad) + kTile * Dv + kWarps * R * kTile);
}
size_t dq_smem(int R, int D, int Dv) {
  return sizeof(float) * static_cast<size_t>(kWarps * R * (D + Dv) + kTile * (D + kPad) + kTile * (Dv + kPad) +
                                             kWarps * R * kTile);
}
size_t dkv_smem(int R, int D, int Dv) {
  return sizeof(float) * static_cast<size_t>(kWarps * R * (D + Dv) + kTile * (D + kPad) + kTile * (Dv + kPad) +
                                             2 * kWarps * R * kTile);
}

// The largest R in {4, 2, 1} whose block fits the device (R = 1 always does up to D = Dv = 256: ~75 KB,
// within every opt-in limit since sm_70).
int pick_rows(size_t (*smem)(int, int, int), int D, int Dv, const char* op) {
  const size_t cap = max_smem_optin();
  for (int R : {4, 2, 1})
    if (smem(R, D, Dv) <= cap) return R;
  fail(op, "head dims " + std::to_string(D) + " / " + std::to_string(Dv) + " need " +
               std::to_string(smem(1, D, Dv)) + " bytes of shared memory, the device allows " + std::to_string(cap));
}

// Launches kernel `kern` with `smem` dynamic shared bytes (opting in above 48 KB).
template <typename Kernel, typename... Args>
void launch(const char* op, Kernel kern, dim3 grid, size_t smem, cudaStream_t st, Args... args) {
  if (smem > kDefaultSmem)
    check_launch(op, cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kern<<<grid, kThreads, smem, st>>>(args...);
  check_launch(op, cudaGetLastError());
}

void need_t(const char* op, const char* name, const Tensor& t, int64_t numel) {
  if (!t.defined()) fail(op, std::string(name) + " is undefined");
  if (t.device() != DeviceType::CUDA) fail(op, describe(name, t) + " must be a CUDA tensor");
  if (t.numel() != numel)
    fail(op, describe(name, t) + ": expected " + std::to_string(numel) + " elements");
}

using Named = std::pair<const char*, const Tensor*>;

// Shared argument checks and the kernels' Dims. `grads` (the backward's dout, dq, dk, dv) must share q's dtype.
Dims make_dims(const char* op, const AttnParams& p, const Tensor& q, const Tensor& k, const Tensor& v,
               const Tensor& out, const Tensor& lse, std::initializer_list<Named> grads) {
  std::string why;
  if (p.batch < 0 || p.seq < 0 || p.n_heads <= 0 || p.n_kv_heads <= 0 || p.head_dim <= 0 || p.v_head_dim < 0)
    fail(op, "bad attention dimensions");
  if (p.n_heads % p.n_kv_heads != 0) fail(op, "n_heads must be a multiple of n_kv_heads");
  if (!attention_generic_supports(p, &why)) fail(op, why);
  if (!std::isfinite(p.scale)) fail(op, "scale must be finite");
  if (p.sliding_window < 0) fail(op, "sliding_window must be >= 0");
  if (p.seq > INT_MAX / 2 || p.batch > 65535 || p.n_heads > 65535)
    fail(op, "sizes beyond the kernels' index range (T < 2^30, B and n_heads <= 65535)");
  const int64_t B = p.batch, T = p.seq, nh = p.n_heads, nkv = p.n_kv_heads, D = p.head_dim, Dv = p.dv();
  need_t(op, "q", q, B * T * nh * D);
  need_t(op, "k", k, B * T * nkv * D);
  need_t(op, "v", v, B * T * nkv * Dv);
  need_t(op, "out", out, B * T * nh * Dv);
  need_t(op, "lse", lse, B * nh * T);
  if (q.dtype() != DType::BF16 && q.dtype() != DType::F32)
    fail(op, describe("q", q) + ": expected bfloat16 or float32");
  for (const Named& a : {Named{"k", &k}, Named{"v", &v}, Named{"out", &out}})
    if (a.second->dtype() != q.dtype()) fail(op, describe(a.first, *a.second) + ": expected the dtype of " + describe("q", q));
  for (auto [name, t] : grads)
    if (t->dtype() != q.dtype()) fail(op, describe(name, *t) + ": expected the dtype of " + describe("q", q));
  if (lse.dtype() != DType::F32) fail(op, describe("lse", lse) + ": expected float32");
  if (p.segment_ids) {
    need_t(op, "segment_ids", *p.segment_ids, B * T);
    if (p.segment_ids->dtype() != DType::I32) fail(op, describe("segment_ids", *p.segment_ids) + ": expected int32");
  }
  if (p.sinks) {
    need_t(op, "sinks", *p.sinks, nh);
    if (p.sinks->dtype() != DType::F32 && p.sinks->dtype() != DType::BF16)
      fail(op, describe("sinks", *p.sinks) + ": expected float32 or bfloat16");
  }
  Dims d;
  d.B = static_cast<int>(B);
  d.T = static_cast<int>(T);
  d.nh = static_cast<int>(nh);
  d.nkv = static_cast<int>(nkv);
  d.D = static_cast<int>(D);
  d.Dv = static_cast<int>(Dv);
  d.window = static_cast<int>(std::min<int64_t>(p.sliding_window, INT_MAX));  // >= T behaves as none
  d.scale = p.scale;
  d.softcap = p.softcap;
  d.seg = p.segment_ids ? p.segment_ids->data<int32_t>() : nullptr;
  d.sinks = p.sinks ? p.sinks->raw() : nullptr;
  d.sinks_bf16 = p.sinks && p.sinks->dtype() == DType::BF16;
  const size_t vec_bytes = 4 * dtype_size(q.dtype());
  bool vec = aligned_to(q.raw(), vec_bytes) && aligned_to(k.raw(), vec_bytes) && aligned_to(v.raw(), vec_bytes) &&
             aligned_to(out.raw(), vec_bytes);
  for (auto [name, t] : grads) vec = vec && aligned_to(t->raw(), vec_bytes);
  d.vec = vec;
  return d;
}

unsigned blocks_for(int64_t rows, int per_block) { return static_cast<unsigned>((rows + per_block - 1) / per_block); }

template <typename T>
void run_fwd(const Dims& d, const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, Tensor& lse,
             cudaStream_t st) {
  const char* op = "attention_fwd";
  const int R = pick_rows(fwd_smem, d.D, d.Dv, op);
  const dim3 grid(blocks_for(d.T, kWarps * R), static_cast<unsigned>(d.nh), static_cast<unsigned>(d.B));
  const size_t smem = fwd_smem(R, d.D, d.Dv);
  auto go = [&](auto kern) {
    launch(op, kern, grid, smem, st, q.data<T>(), k.data<T>(), v.data<T>(), out.data<T>(), lse.data<float>(), d);
  };
  if (R == 4)
    go(gen_fwd_kernel<T, 4>);
  else if (R == 2)
    go(gen_fwd_kernel<T, 2>);
  else
    go(gen_fwd_kernel<T, 1>);
}

template <typename T>
void run_bwd(const Dims& d, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
             const Tensor& dout, Tensor& dq, Tensor& dk, Tensor& dv, float* dsinks, float* dsum, cudaStream_t st) {
  const char* op = "attention_bwd";
  {
    const dim3 grid(blocks_for(d.T, kDsumRows), static_cast<unsigned>(d.nh), static_cast<unsigned>(d.B));
    gen_dsum_kernel<T><<<grid, 256, 0, st>>>(out.data<T>(), dout.data<T>(), lse.data<float>(), dsum, dsinks, d);
    check_launch(op, cudaGetLastError());
  }
  {
    const int R = pick_rows(dq_smem, d.D, d.Dv, op);
    const dim3 grid(blocks_for(d.T, kWarps * R), static_cast<unsigned>(d.nh), static_cast<unsigned>(d.B));
    const size_t smem = dq_smem(R, d.D, d.Dv);
    auto go = [&](auto kern) {
      launch(op, kern, grid, smem, st, q.data<T>(), k.data<T>(), v.data<T>(), dout.data<T>(), lse.data<float>(),
             static_cast<const float*>(dsum), dq.data<T>(), d);
    };
    if (R == 4)
      go(gen_bwd_dq_kernel<T, 4>);
    else if (R == 2)
      go(gen_bwd_dq_kernel<T, 2>);
    else
      go(gen_bwd_dq_kernel<T, 1>);
  }
  {
    const int R = pick_rows(dkv_smem, d.D, d.Dv, op);
    const dim3 grid(blocks_for(d.T, kWarps * R), static_cast<unsigned>(d.nkv), static_cast<unsigned>(d.B));
    const size_t smem = dkv_smem(R, d.D, d.Dv);
    auto go = [&](auto kern) {
      launch(op, kern, grid, smem, st, q.data<T>(), k.data<T>(), v.data<T>(), dout.data<T>(), lse.data<float>(),
             static_cast<const float*>(dsum), dk.data<T>(), dv.data<T>(), d);
    };
    if (R == 4)
      go(gen_bwd_dkv_kernel<T, 4>);
    else if (R == 2)
      go(gen_bwd_dkv_kernel<T, 2>);
    else
      go(gen_bwd_dkv_kernel<T, 1>);
  }
}

size_t align_up(size_t x) { return (x + 255) & ~size_t(255); }

}  // namespace

bool attention_generic_supports(const AttnParams& p, std::string* why) {
  const int64_t D = p.head_dim, Dv = p.dv();
  auto no = [&](const std::string& m) {
    if (why) *why = m;
    return false;
  };
  if (D <= 0 || D > kGenericAttnMaxHeadDim || D % 4 != 0)
    return no("head_dim " + std::to_string(D) + " is not supported (the generic kernels take head dims up to " +
              std::to_string(kGenericAttnMaxHeadDim) + " that are multiples of 4)");
  if (Dv <= 0 || Dv > kGenericAttnMaxHeadDim || Dv % 4 != 0)
    return no("v head dim " + std::to_string(Dv) + " is not supported (the generic kernels take head dims up to " +
              std::to_string(kGenericAttnMaxHeadDim) + " that are multiples of 4)");
  return true;
}

size_t attention_generic_bwd_workspace_bytes(const AttnParams& p) {
  if (p.batch <= 0 || p.seq <= 0 || p.n_heads <= 0) return 0;
  return align_up(static_cast<size_t>(p.batch * p.n_heads * p.seq) * sizeof(float));
}

void attention_generic_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const AttnParams& p, Tensor& out,
                           Tensor& lse, CUstream_st* stream) {
  const char* op = "attention_fwd";
  const Dims d = make_dims(op, p, q, k, v, out, lse, {});
  if (d.B == 0 || d.T == 0) return;
  if (q.dtype() == DType::BF16)
    run_fwd<bf16>(d, q, k, v, out, lse, stream);
  else
    run_fwd<float>(d, q, k, v, out, lse, stream);
}

void attention_generic_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                           const Tensor& dout, const AttnParams& p, Tensor& dq, Tensor& dk, Tensor& dv,
                           Tensor* dsinks, CUstream_st* stream, void* workspace, size_t workspace_bytes) {
  const char* op = "attention_bwd";
  const Dims d = make_dims(op, p, q, k, v, out, lse, {{"dout", &dout}, {"dq", &dq}, {"dk", &dk}, {"dv", &dv}});
  const int64_t B = p.batch, T = p.seq, nh = p.n_heads, nkv = p.n_kv_heads, D = p.head_dim, Dv = p.dv();
  need_t(op, "dout", dout, B * T * nh * Dv);
  need_t(op, "dq", dq, B * T * nh * D);
  need_t(op, "dk", dk, B * T * nkv * D);
  need_t(op, "dv", dv, B * T * nkv * Dv);
  float* ds = nullptr;
  if (dsinks && dsinks->defined()) {
    if (!p.sinks) fail(op, "dsinks given without p.sinks");
    need_t(op, "dsinks", *dsinks, nh);
    if (dsinks->dtype() != DType::F32) fail(op, describe("dsinks", *dsinks) + ": expected float32");
    ds = dsinks->data<float>();
  }
  if (B == 0 || T == 0) return;
  cudaStream_t st = stream;
  const size_t need = attention_generic_bwd_workspace_bytes(p);
  void* dsum = workspace;
  bool owned = false;
  if (workspace) {
    if (workspace_bytes < need)
      fail(op, "workspace of " + std::to_string(workspace_bytes) + " bytes, need " + std::to_string(need));
  } else {
    check_launch(op, cudaMallocAsync(&dsum, need, st));
    owned = true;
  }
  try {
    if (q.dtype() == DType::BF16)
      run_bwd<bf16>(d, q, k, v, out, lse, dout, dq, dk, dv, ds, static_cast<float*>(dsum), st);
    else
      run_bwd<float>(d, q, k, v, out, lse, dout, dq, dk, dv, ds, static_cast<float*>(dsum), st);
  } catch (...) {
    if (owned) cudaFreeAsync(dsum, st);
    throw;
  }
  if (owned) check_launch(op, cudaFreeAsync(dsum, st));
}

}  // namespace am::cuda
