// Mamba2's selective scan by the chunked SSD ("state space duality") algorithm: the contract is ops/mamba2_ops.h's
// mamba_ssm_scan_fwd / _bwd; the sequential recurrence in mamba2.cu and the CPU loops are its oracles.
//
// Per (batch row b, head h), with a_t = dt_t A_h, the recurrence state_t = e^{a_t} state_{t-1} + dt_t x_t B_t^T,
// y_t = state_t C_t + D x_t is cut into chunks of kL = 64 tokens. Within chunk c (n <= kL rows, local index i):
//   Dm[i][k]  = exp(sum_{tau=k..i} a_tau) when i >= k - 1 and rows k-1..i are one segment, else 0
//             (k = j + 1 for a source row j; k = 0 means "the state entering the chunk", so Dm[i][0] = e^{l_i})
//   intra     y_i += sum_{j <= i} Dm[i][j+1] (C_i . B_j) dt_j x_j           [L x L] products, K = S then K = L
//   inter     y_i += Dm[i][0] Hin_c C_i                                     [L x P], K = S
//   state     S_c = sum_j Dm[n-1][j+1] dt_j x_j B_j^T                       [P x S], K = L
//   passing   Hin_{c+1} = g_c Hin_c + S_c,  g_c = Dm[n-1][0] (0 when a segment starts inside the chunk)
// Segment ids (packing): a row starts a segment where its id differs from the previous row's (or at t = 0); st[i]
// is the chunk-local start of row i's segment (-1: it began before the chunk), and the masks in Dm are st[i] <= j.
// Dm is built per column by running sums of a (no difference of long cumulative sums, so no cancellation).
//
// Backward (dy given; dx, ddt, dB, dC assigned, dA, dD accumulated): recompute S_c / Hin; the gradient reaching
// each chunk's entering state dHout_c = sum_i Dm[i][0] dy_i C_i^T; reverse passing gives dS_c = dHfull_c (the
// gradient of the state at the end of chunk c) and dg_c = <dHfull_c, Hin_c>; then one kernel per (b, c, h) forms
//   W = (C B^T) o Dm,  dW = dy (dt o x)^T,  dCB = dW o Dm
//   dC = dCB B + Dm[:,0] o (dy Hin),  dB = dCB^T C + w o (x dS) (w_j = Dm[n-1][j+1] dt_j)
//   dx = D dy + dt o (W^T dy + e_last o (B dS^T)),  ddt (direct) = rows of x o (...)
// and the decay's gradient: every term above that carries exp(sum_{tau in (j, i]} a) adds its value G to the
// (i, j) entry of an [L x (L+1)] matrix (intra: dW o W; inter: column 0; state and g: row n-1), and then
//   dL/da_tau = sum_{i >= tau} sum_{k <= tau} G[i][k]    (row prefix sums, then column sums: no cancellation)
// gives ddt += A dL/da and dA += sum dt dL/da. The math was checked against the CPU recurrence in a CPU mirror
// of these exact phases before the kernels were written (see docs/mamba2.md).
//
// Every chunk product is a block-wide tile product out of shared memory (BlockAcc): on tensor cores for bf16
// activations (wmma, TF32 inputs, fp32 accumulation: the operands already carry bf16 rounding, and the decay-weighted
// ones keep 10 mantissa bits instead of bf16's 7), with fp32 FMAs for fp32 activations (and for the backward when
// P > 64, whose tensor-core tiles would not fit in shared memory). Elementwise work, the decay matrix and every
// reduction are fp32 either way.
// Kernels (256 threads):
//   chunk_state   grid (B nc nh, P/64, S/64)   S_c (forward) or dHout_c (backward) into [B, nc, nh, P, S] fp32
//   pass_fwd/bwd  grid (B nh, P S / 256)       sequential over the nc chunks (batches of 16 loads), in place;
//                                              bwd also dg_c partials per block
//   scan_fwd      grid (B nc nh, P/64)         y
//   scan_bwd      grid (B nc nh)               dx, ddt, dB / dC (fp32 atomics over the group's heads), dA / dD
//                                              partials, summed per head in a fixed order by reduce_parts
// Workspace: two [B, nc, nh, P, S] fp32 buffers in the backward (one in the forward), from the context's
// allocator and released when the call returns (~134 MB each at B 1, T 4096, nh 64, P 64, S 128).
#include <mma.h>

#include <algorithm>
#include <string>
#include <type_traits>

#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/kernel_utils.cuh"
#include "backend/cuda/mamba2_ssd.h"

namespace am::cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kL = 64;          // chunk length (rows)
constexpr int kST = 32;         // S columns per streamed tile
constexpr int kThreads = 256;   // 16 x 16: thread (ty, tx) owns rows ty + 16 r and columns tx + 16 q of a tile

struct SsdArgs {
  const void* x;       // [B, T, nh, P] T
  const float* dt;     // [B, T, nh]
  const float* A;      // [nh]
  const void* Bm;      // [B, T, G, S] T
  const void* Cm;      // [B, T, G, S] T
  const float* D;      // [nh]
  const int32_t* seg;  // [B, T] or null
  const void* dy;      // [B, T, nh, P] T (backward)
  void* out;           // y (forward) or dx (backward) [B, T, nh, P] T
  float* H;            // [B, nc, nh, P, S]: S_c, then (after pass_fwd) the state entering chunk c
  float* dH;           // [B, nc, nh, P, S]: dHout_c, then (after pass_bwd) dS_c
  float* g;            // [B, nc, nh] chunk decay g_c
  float* dgpart;       // [B, nh, nc, nslab] partial sums of <dS_c, Hin_c> (nslab = passing blocks per (b, h))
  float* dB32;         // [B, T, G, S] fp32, zeroed
  float* dC32;         // [B, T, G, S] fp32, zeroed
  float* ddt;          // [B, T, nh]
  float* part;         // [B, nc, nh, 2]: dA, dD partial sums of one chunk
  int Tn, nh, P, G, S, nc, nslab;
};

struct ChunkId {
  int64_t b;
  int c, h, g, n;  // chunk, head, its group, rows in the chunk
  int64_t t0;      // first token of the chunk
};
__device__ __forceinline__ ChunkId chunk_id(const SsdArgs& a, int64_t bch) {
  ChunkId id;
  id.h = static_cast<int>(bch % a.nh);
  const int64_t bc = bch / a.nh;
  id.c = static_cast<int>(bc % a.nc);
  id.b = bc / a.nc;
  id.g = id.h / (a.nh / a.G);
  id.t0 = static_cast<int64_t>(id.c) * kL;
  id.n = static_cast<int>(a.Tn - id.t0 < kL ? a.Tn - id.t0 : kL);
  return id;
}
__device__ __forceinline__ int64_t state_base(const SsdArgs& a, const ChunkId& id) {
  return ((id.b * a.nc + id.c) * a.nh + id.h) * static_cast<int64_t>(a.P) * a.S;
}

// dts[i] = dt of row i (0 past n); st[i] = chunk-local start of row i's segment, -1 if it began before the chunk.
// Ends with a barrier.
__device__ void chunk_rows(const SsdArgs& a, const ChunkId& id, float* dts, int* st) {
  const int i = threadIdx.x;
  if (i < kL) {
    const int64_t t = id.t0 + i;
    dts[i] = i < id.n ? a.dt[(id.b * a.Tn + t) * a.nh + id.h] : 0.f;
    st[i] = i < id.n && (t == 0 || (a.seg && a.seg[id.b * a.Tn + t] != a.seg[id.b * a.Tn + t - 1])) ? i : -1;
  }
  __syncthreads();
  if (i == 0) {
    int cur = -1;
    for (int r = 0; r < kL; ++r) {
      if (st[r] >= 0) cur = st[r];
      st[r] = cur;
    }
  }
  __syncthreads();
}

// Dm [kL x LD] (see the top; columns 0..kL used): column k by thread k. Ends with a barrier.
template <int LD>
__device__ void decay_matrix(const ChunkId& id, float Ah, const float* dts, const int* st, float* Dm) {
  for (int k = threadIdx.x; k <= kL; k += blockDim.x) {
    float acc = 0.f;
    for (int i = 0; i < kL; ++i) {
      float v = 0.f;
      if (i < id.n) {
        if (i >= k) acc += dts[i] * Ah;
        if (k <= id.n && i >= k - 1 && st[i] <= k - 1) v = expf(acc);
      }
      Dm[i * LD + k] = v;
    }
  }
  __syncthreads();
}

// dst[r * ld + cc] = src row r, column cc (scaled by scale[r] when given), for r < rows, cc < cols; zero where
// r >= rows_valid or cc >= cols_valid. Row r of the source starts at src + r * stride.
template <typename T>
__device__ __forceinline__ void load_tile(float* dst, int ld, int rows, int cols, int rows_valid, int cols_valid,
                                          const T* src, int64_t stride, const float* scale = nullptr) {
  for (int e = threadIdx.x; e < rows * cols; e += blockDim.x) {
    const int r = e / cols, cc = e % cols;
    float v = 0.f;
    if (r < rows_valid && cc < cols_valid) {
      v = to_f(src[r * stride + cc]);
      if (scale) v *= scale[r];
    }
    dst[r * ld + cc] = v;
  }
}

// acc[r][q] += sum_{k < K} A(ty + 16 r, k) * B(k, tx + 16 q), A(m, k) = A[m am + k ak], B(k, n) = B[k bk + n bn]:
// a block-wide tile product out of shared memory (strides make the transposes free).
template <int RM, int RN>
__device__ __forceinline__ void tile_fma(float (&acc)[RM][RN], int K, const float* A, int am, int ak, const float* Bp,
                                         int bk, int bn, int ty, int tx) {
#pragma unroll 4
  for (int k = 0; k < K; ++k) {
    float av[RM], bv[RN];
#pragma unroll
    for (int r = 0; r < RM; ++r) av[r] = A[(ty + 16 * r) * am + k * ak];
#pragma unroll
    for (int q = 0; q < RN; ++q) bv[q] = Bp[k * bk + (tx + 16 * q) * bn];
#pragma unroll
    for (int r = 0; r < RM; ++r)
#pragma unroll
      for (int q = 0; q < RN; ++q) acc[r][q] = fmaf(av[r], bv[q], acc[r][q]);
  }
}

template <int RM, int RN>
__device__ __forceinline__ void zero_acc(float (&acc)[RM][RN]) {
#pragma unroll
  for (int r = 0; r < RM; ++r)
#pragma unroll
    for (int q = 0; q < RN; ++q) acc[r][q] = 0.f;
}

// An M x N block-wide accumulator (M = 64; N = 64 or 32) of products out of shared memory:
//   mma<kAcol, kBcol>(K, A, lda, B, ldb):  acc(m, n) += sum_{k < K} A(m, k) B(k, n)
//     A(m, k) = kAcol ? A[m + k lda] : A[m lda + k];   B(k, n) = kBcol ? B[k + n ldb] : B[k ldb + n]
//   store(out, ldo): out[m ldo + n] = acc(m, n) (every thread of the block calls it; a barrier must separate it
//   from readers of `out` and from an mma still reading `out`).
// kTC false: fp32 FMAs, thread (ty, tx) of 16 x 16 owning rows ty + 16 r, columns tx + 16 q.
// kTC true: tensor cores, TF32 inputs (10-bit mantissa) and fp32 accumulation (wmma m16n16k8); warp w owns the
// 16 x 16 tiles w, w + 8, ...; K a multiple of 8, leading dims multiples of 4 floats, 32-byte-aligned tiles.
template <int M, int N, bool kTC>
struct BlockAcc;

template <int M, int N>
struct BlockAcc<M, N, false> {
  static constexpr int RM = M / 16, RN = N / 16;
  float acc[RM][RN];
  __device__ __forceinline__ BlockAcc() { zero_acc(acc); }
  template <bool kAcol, bool kBcol>
  __device__ __forceinline__ void mma(int K, const float* A, int lda, const float* Bp, int ldb) {
    tile_fma(acc, K, A, kAcol ? 1 : lda, kAcol ? lda : 1, Bp, kBcol ? 1 : ldb, kBcol ? ldb : 1, threadIdx.x / 16,
             threadIdx.x % 16);
  }
  __device__ __forceinline__ void store(float* out, int ldo) const {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int r = 0; r < RM; ++r)
#pragma unroll
      for (int q = 0; q < RN; ++q) out[(ty + 16 * r) * ldo + tx + 16 * q] = acc[r][q];
  }
};

template <int M, int N>
struct BlockAcc<M, N, true> {
  static constexpr int TN = N / 16, PER = (M / 16) * TN / (kThreads / 32);
  static_assert(PER >= 1 && (M / 16) * TN % (kThreads / 32) == 0, "tiles must split evenly over the warps");
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> c[PER];
  __device__ __forceinline__ BlockAcc() {
#pragma unroll
    for (int u = 0; u < PER; ++u) wmma::fill_fragment(c[u], 0.f);
  }
  __device__ __forceinline__ static int m0_of(int u) { return (static_cast<int>(threadIdx.x / 32) + 8 * u) / TN * 16; }
  __device__ __forceinline__ static int n0_of(int u) { return (static_cast<int>(threadIdx.x / 32) + 8 * u) % TN * 16; }
  template <bool kAcol, bool kBcol>
  __device__ __forceinline__ void mma(int K, const float* A, int lda, const float* Bp, int ldb) {
    using LA = std::conditional_t<kAcol, wmma::col_major, wmma::row_major>;
    using LB = std::conditional_t<kBcol, wmma::col_major, wmma::row_major>;
    for (int k0 = 0; k0 < K; k0 += 8) {
#pragma unroll
      for (int u = 0; u < PER; ++u) {
        const int m0 = m0_of(u), n0 = n0_of(u);
        wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, LA> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, LB> b;
        wmma::load_matrix_sync(a, kAcol ? A + m0 + k0 * lda : A + m0 * lda + k0, lda);
        wmma::load_matrix_sync(b, kBcol ? Bp + k0 + n0 * ldb : Bp + k0 * ldb + n0, ldb);
#pragma unroll
        for (int i = 0; i < a.num_elements; ++i) a.x[i] = wmma::__float_to_tf32(a.x[i]);
#pragma unroll
        for (int i = 0; i < b.num_elements; ++i) b.x[i] = wmma::__float_to_tf32(b.x[i]);
        wmma::mma_sync(c[u], a, b, c[u]);
      }
    }
  }
  __device__ __forceinline__ void store(float* out, int ldo) const {
#pragma unroll
    for (int u = 0; u < PER; ++u) wmma::store_matrix_sync(out + m0_of(u) * ldo + n0_of(u), c[u], ldo, wmma::mem_row_major);
  }
};

// Leading dimensions of the shared-memory tiles: odd for the fp32 path (column walks hit distinct banks), a multiple
// of 4 floats for the tensor-core path (wmma's requirement; every tile then starts 32-byte aligned).
template <bool kTC>
struct Lay {
  static constexpr int pad = kTC ? 4 : 1;
  static constexpr int LD = kL + pad;    // [kL x (kL + 1)] tiles (Dm, Gp use column kL)
  static constexpr int SLD = kST + pad;  // [rows x kST] tiles
};

// Sum over the 16 tx lanes of a half warp (every lane gets it).
__device__ __forceinline__ float row_sum16(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---------------------------------------------------------------- chunk states
// Forward (kBwd false): H[b, c, h] = S_c = sum_j Dm[n-1][j+1] dt_j x_j B_j^T, and g_c.
// Backward (kBwd true): dH[b, c, h] = dHout_c = sum_i Dm[i][0] dy_i C_i^T.
// Grid (B nc nh, ceil(P / 64), ceil(S / 64)); a 64 x 64 tile of [P x S] per block, K = the chunk's rows.
template <typename T, bool kBwd, bool kTC>
__global__ void __launch_bounds__(kThreads) chunk_state_kernel(SsdArgs a) {
  constexpr int LD = Lay<kTC>::LD;
  __shared__ __align__(128) float Us[kL * LD];
  __shared__ __align__(128) float Vs[kL * LD];
  __shared__ float w[kL], dts[kL];
  __shared__ int st[kL];
  const ChunkId id = chunk_id(a, blockIdx.x);
  const int p0 = blockIdx.y * 64, s0 = blockIdx.z * 64, tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  chunk_rows(a, id, dts, st);
  const float Ah = a.A[id.h];
  if (tid < kL) {
    const int j = tid, n = id.n;
    float v = 0.f;
    if (j < n) {
      if (!kBwd && st[n - 1] <= j) {  // e^{sum_{tau in (j, n-1]} a} dt_j: row j reaches the chunk's end state
        float acc = 0.f;
        for (int r = j + 1; r < n; ++r) acc += dts[r] * Ah;
        v = expf(acc) * dts[j];
      }
      if (kBwd && st[j] < 0) {  // e^{sum_{tau <= j} a}: the entering state reaches row j
        float acc = 0.f;
        for (int r = 0; r <= j; ++r) acc += dts[r] * Ah;
        v = expf(acc);
      }
    }
    w[j] = v;
  }
  if (!kBwd && blockIdx.y == 0 && blockIdx.z == 0 && tid == 0) {
    float acc = 0.f;
    for (int r = 0; r < id.n; ++r) acc += dts[r] * Ah;
    a.g[(id.b * a.nc + id.c) * a.nh + id.h] = st[id.n - 1] < 0 ? expf(acc) : 0.f;
  }
  __syncthreads();
  const int64_t row0 = id.b * a.Tn + id.t0;
  const T* U = static_cast<const T*>(kBwd ? a.dy : a.x) + (row0 * a.nh + id.h) * a.P + p0;
  const T* V = static_cast<const T*>(kBwd ? a.Cm : a.Bm) + (row0 * a.G + id.g) * a.S + s0;
  load_tile(Us, LD, kL, 64, id.n, a.P - p0, U, int64_t(a.nh) * a.P, w);
  load_tile(Vs, LD, kL, 64, id.n, a.S - s0, V, int64_t(a.G) * a.S);
  __syncthreads();
  BlockAcc<64, 64, kTC> acc;
  acc.template mma<true, false>(kL, Us, LD, Vs, LD);  // out[p][s] = sum_j Us[j][p] Vs[j][s]
  __syncthreads();
  acc.store(Us, LD);
  __syncthreads();
  float* out = (kBwd ? a.dH : a.H) + state_base(a, id);
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int pl = ty + 16 * r, sl = tx + 16 * q, p = p0 + pl, s = s0 + sl;
      if (p < a.P && s < a.S) out[static_cast<int64_t>(p) * a.S + s] = Us[pl * LD + sl];
    }
}

// ---------------------------------------------------------------- state passing
// One thread per state element e of one (b, h), sequential over the chunks. The chunks go in batches of kPassBatch
// whose loads are all issued before any store (the first version loaded, stored and waited chunk by chunk:
// Nsight Compute measured 0.87 ms forward and 1.64 ms backward at nemo8's mixer, 1% of issue slots used).
// Grid (B nh, ceil(P S / 256)).
constexpr int kPassBatch = 16;

// In place: H[c] <- the state entering chunk c (0 for c = 0), H[c+1] = g_c H[c] + S_c.
__global__ void __launch_bounds__(kThreads) pass_fwd_kernel(SsdArgs a) {
  const int64_t b = blockIdx.x / a.nh;
  const int h = blockIdx.x % a.nh;
  const int64_t PS = int64_t(a.P) * a.S, e = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  if (e >= PS) return;  // no barriers below
  const int64_t cstride = int64_t(a.nh) * PS;  // H[b, c, h] -> H[b, c + 1, h]
  float* Hp = a.H + (b * a.nc * a.nh + h) * PS + e;
  const float* gp = a.g + b * a.nc * a.nh + h;
  float prev = 0.f;
  for (int c0 = 0; c0 < a.nc; c0 += kPassBatch) {
    const int m = a.nc - c0 < kPassBatch ? a.nc - c0 : kPassBatch;
    float v[kPassBatch], gv[kPassBatch];
#pragma unroll
    for (int i = 0; i < kPassBatch; ++i)
      if (i < m) {
        v[i] = Hp[(c0 + i) * cstride];
        gv[i] = gp[int64_t(c0 + i) * a.nh];
      }
#pragma unroll
    for (int i = 0; i < kPassBatch; ++i)
      if (i < m) {
        Hp[(c0 + i) * cstride] = prev;
        prev = gv[i] * prev + v[i];
      }
  }
}

// Reverse, in place: dH[c] <- dS_c = dHfull_c (the gradient of the state at the end of chunk c), with
// dHfull_{nc-1} = 0, dHfull_{c-1} = dHout_c + g_c dHfull_c; dgpart[b, h, c, blockIdx.y] = this block's share of
// <dHfull_c, Hin_c> (warp sums, then the 8 warps in a fixed order).
__global__ void __launch_bounds__(kThreads) pass_bwd_kernel(SsdArgs a) {
  __shared__ float red[kThreads / 32][kPassBatch];
  const int64_t b = blockIdx.x / a.nh;
  const int h = blockIdx.x % a.nh, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t PS = int64_t(a.P) * a.S, e = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  const bool live = e < PS;
  const int64_t cstride = int64_t(a.nh) * PS, base = (b * a.nc * a.nh + h) * PS + (live ? e : 0);
  float* dHp = a.dH + base;
  const float* Hp = a.H + base;
  const float* gp = a.g + b * a.nc * a.nh + h;
  float cur = 0.f;
  for (int c1 = a.nc; c1 > 0; c1 -= kPassBatch) {  // chunks c1 - 1 down to c1 - m
    const int m = c1 < kPassBatch ? c1 : kPassBatch;
    float v[kPassBatch], hv[kPassBatch], gv[kPassBatch], prod[kPassBatch];
#pragma unroll
    for (int i = 0; i < kPassBatch; ++i) {
      v[i] = hv[i] = gv[i] = 0.f;
      if (i < m) {
        const int64_t c = c1 - 1 - i;
        gv[i] = gp[c * a.nh];
        if (live) {
          v[i] = dHp[c * cstride];
          hv[i] = Hp[c * cstride];
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kPassBatch; ++i) {
      prod[i] = 0.f;
      if (i < m) {
        if (live) dHp[(c1 - 1 - i) * cstride] = cur;
        prod[i] = cur * hv[i];
        cur = v[i] + gv[i] * cur;
      }
    }
#pragma unroll
    for (int i = 0; i < kPassBatch; ++i) {
      const float sw = warp_sum(prod[i]);
      if (lane == 0) red[warp][i] = sw;
    }
    __syncthreads();
    if (threadIdx.x < m) {
      float sb = 0.f;
      for (int w = 0; w < kThreads / 32; ++w) sb += red[w][threadIdx.x];
      const int64_t c = c1 - 1 - threadIdx.x;
      a.dgpart[((b * a.nh + h) * a.nc + c) * a.nslab + blockIdx.y] = sb;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------- forward output
// y_i = sum_j W[i][j] dt_j x_j + Dm[i][0] Hin C_i + D x_i, W = (C B^T) o Dm. Grid (B nc nh, ceil(P / 64)).
// Dynamic shared memory: Dm, CBW, Xs, HC [kL x LD]; Bt, Ct, Ht [64 x SLD] (then the y tile, [kL x LD], over them).
template <bool kTC>
constexpr size_t scan_fwd_smem() {
  return (4 * size_t(kL) * Lay<kTC>::LD + 3 * size_t(kL) * Lay<kTC>::SLD) * sizeof(float);
}

template <typename T, bool kTC>
__global__ void __launch_bounds__(kThreads) scan_fwd_kernel(SsdArgs a) {
  constexpr int LD = Lay<kTC>::LD, SLD = Lay<kTC>::SLD;
  static_assert(kL * LD <= 3 * kL * SLD, "the y tile reuses the S tiles' space");
  extern __shared__ __align__(128) float sm[];
  float *Dm = sm, *CBW = Dm + kL * LD, *Xs = CBW + kL * LD, *HC = Xs + kL * LD, *Bt = HC + kL * LD, *Ct = Bt + kL * SLD,
        *Ht = Ct + kL * SLD, *Ysc = Bt;
  __shared__ float dts[kL];
  __shared__ int st[kL];
  const ChunkId id = chunk_id(a, blockIdx.x);
  const int p0 = blockIdx.y * 64, tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  chunk_rows(a, id, dts, st);
  decay_matrix<LD>(id, a.A[id.h], dts, st, Dm);
  const int64_t row0 = id.b * a.Tn + id.t0;
  const T* Bsrc = static_cast<const T*>(a.Bm) + (row0 * a.G + id.g) * a.S;
  const T* Csrc = static_cast<const T*>(a.Cm) + (row0 * a.G + id.g) * a.S;
  const T* Xsrc = static_cast<const T*>(a.x) + (row0 * a.nh + id.h) * a.P;
  const float* Hin = a.H + state_base(a, id) + static_cast<int64_t>(p0) * a.S;
  BlockAcc<64, 64, kTC> cb, hc;  // cb[i][j] = C_i . B_j; hc[i][p] = (Hin C_i)[p]
  for (int s0 = 0; s0 < a.S; s0 += kST) {
    load_tile(Bt, SLD, kL, kST, id.n, a.S - s0, Bsrc + s0, int64_t(a.G) * a.S);
    load_tile(Ct, SLD, kL, kST, id.n, a.S - s0, Csrc + s0, int64_t(a.G) * a.S);
    load_tile(Ht, SLD, 64, kST, a.P - p0, a.S - s0, Hin + s0, int64_t(a.S));
    __syncthreads();
    cb.template mma<false, true>(kST, Ct, SLD, Bt, SLD);
    hc.template mma<false, true>(kST, Ct, SLD, Ht, SLD);
    __syncthreads();
  }
  cb.store(CBW, LD);
  hc.store(HC, LD);
  load_tile(Xs, LD, kL, 64, id.n, a.P - p0, Xsrc + p0, int64_t(a.nh) * a.P, dts);
  __syncthreads();
  for (int e = tid; e < kL * kL; e += kThreads) {
    const int i = e / kL, j = e % kL;
    CBW[i * LD + j] *= Dm[i * LD + j + 1];
  }
  __syncthreads();
  BlockAcc<64, 64, kTC> yacc;
  yacc.template mma<false, false>(kL, CBW, LD, Xs, LD);
  yacc.store(Ysc, LD);
  __syncthreads();
  const float Dh = a.D[id.h];
  T* y = static_cast<T*>(a.out) + (row0 * a.nh + id.h) * a.P;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int i = ty + 16 * r;
    if (i >= id.n) continue;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int pl = tx + 16 * q, p = p0 + pl;
      if (p >= a.P) continue;
      const int64_t o = static_cast<int64_t>(i) * a.nh * a.P + p;
      y[o] = from_f<T>(Ysc[i * LD + pl] + Dm[i * LD] * HC[i * LD + pl] + Dh * to_f(Xsrc[o]));
    }
  }
}

// ---------------------------------------------------------------- backward, one chunk of one head
// Dynamic shared memory (Pp = P rounded up to 64, ldx = Pp + pad): Dm, W, dCB, Gp [kL x LD]; Xs, dYs [kL x ldx];
// Bt, Ct [kL x SLD]; Ht, St [Pp x SLD]; scratch for the products' results: max(2 [kL x LD], 4 [kL x SLD]).
template <bool kTC>
size_t scan_bwd_smem(int Pp) {
  constexpr size_t LD = Lay<kTC>::LD, SLD = Lay<kTC>::SLD;
  const size_t scratch = std::max(2 * kL * LD, 4 * kL * SLD);
  return (4 * kL * LD + 2 * kL * (Pp + Lay<kTC>::pad) + 2 * kL * SLD + 2 * size_t(Pp) * SLD + scratch) * sizeof(float);
}

template <typename T, bool kTC>
__global__ void __launch_bounds__(kThreads) scan_bwd_kernel(SsdArgs a, int Pp) {
  constexpr int LD = Lay<kTC>::LD, SLD = Lay<kTC>::SLD;
  extern __shared__ __align__(128) float sm[];
  const int ldx = Pp + Lay<kTC>::pad;
  float *Dm = sm, *W = Dm + kL * LD, *dCB = W + kL * LD, *Gp = dCB + kL * LD, *Xs = Gp + kL * LD,
        *dYs = Xs + kL * ldx, *Bt = dYs + kL * ldx, *Ct = Bt + kL * SLD, *Ht = Ct + kL * SLD, *St = Ht + Pp * SLD,
        *scr = St + Pp * SLD;
  __shared__ float dts[kL], ddt_dir[kL], zsum[kL], scratch[32];
  __shared__ int st[kL];
  const ChunkId id = chunk_id(a, blockIdx.x);
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16, n = id.n;
  const float Ah = a.A[id.h], Dh = a.D[id.h];
  chunk_rows(a, id, dts, st);
  decay_matrix<LD>(id, Ah, dts, st, Dm);
  const int64_t row0 = id.b * a.Tn + id.t0, xstride = int64_t(a.nh) * a.P, bstride = int64_t(a.G) * a.S;
  const T* Xsrc = static_cast<const T*>(a.x) + (row0 * a.nh + id.h) * a.P;
  const T* dYsrc = static_cast<const T*>(a.dy) + (row0 * a.nh + id.h) * a.P;
  const T* Bsrc = static_cast<const T*>(a.Bm) + (row0 * a.G + id.g) * a.S;
  const T* Csrc = static_cast<const T*>(a.Cm) + (row0 * a.G + id.g) * a.S;
  const float* Hin = a.H + state_base(a, id);
  const float* dS = a.dH + state_base(a, id);
  load_tile(Xs, ldx, kL, Pp, n, a.P, Xsrc, xstride);
  load_tile(dYs, ldx, kL, Pp, n, a.P, dYsrc, xstride);
  for (int e = tid; e < kL * LD; e += kThreads) Gp[e] = 0.f;
  if (tid < kL) ddt_dir[tid] = zsum[tid] = 0.f;
  __syncthreads();

  // 1. cb[i][j] = C_i . B_j over S tiles (into W); 2. dy_i . x_j (into dCB)
  {
    BlockAcc<64, 64, kTC> cb;
    for (int s0 = 0; s0 < a.S; s0 += kST) {
      load_tile(Bt, SLD, kL, kST, n, a.S - s0, Bsrc + s0, bstride);
      load_tile(Ct, SLD, kL, kST, n, a.S - s0, Csrc + s0, bstride);
      __syncthreads();
      cb.template mma<false, true>(kST, Ct, SLD, Bt, SLD);
      __syncthreads();
    }
    cb.store(W, LD);
    BlockAcc<64, 64, kTC> dw;
    dw.template mma<false, true>(Pp, dYs, ldx, Xs, ldx);
    dw.store(dCB, LD);
  }
  __syncthreads();
  // W = cb o Dm, dW = dt_j (dy_i . x_j), dCB = dW o Dm, Gp[i][j+1] = dW W
  for (int e = tid; e < kL * kL; e += kThreads) {
    const int i = e / kL, j = e % kL;
    const float dm = Dm[i * LD + j + 1], wv = W[i * LD + j] * dm, dwv = dCB[i * LD + j] * dts[j];
    W[i * LD + j] = wv;
    dCB[i * LD + j] = dwv * dm;
    Gp[i * LD + j + 1] = dwv * wv;
  }
  __syncthreads();
  // 3. per P tile: e = W^T dy [j][p], u = B dS^T [j][p]; dx, the direct ddt, z_j = x_j . u_j
  T* dx = static_cast<T*>(a.out) + (row0 * a.nh + id.h) * a.P;
  float *scE = scr, *scU = scr + kL * LD;
  for (int pt = 0; pt < Pp; pt += 64) {
    BlockAcc<64, 64, kTC> ev, uv;
    ev.template mma<true, false>(kL, W, LD, dYs + pt, ldx);
    for (int s0 = 0; s0 < a.S; s0 += kST) {
      load_tile(Bt, SLD, kL, kST, n, a.S - s0, Bsrc + s0, bstride);
      load_tile(St, SLD, 64, kST, a.P - pt, a.S - s0, dS + static_cast<int64_t>(pt) * a.S + s0, int64_t(a.S));
      __syncthreads();
      uv.template mma<false, true>(kST, Bt, SLD, St, SLD);
      __syncthreads();
    }
    ev.store(scE, LD);
    uv.store(scU, LD);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int j = ty + 16 * r;
      const float el = Dm[(n - 1) * LD + j + 1];  // 0 for j >= n and for rows not in the last segment
      float rd = 0.f, z = 0.f;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int pl = tx + 16 * q, p = pt + pl;
        if (j < n && p < a.P) {
          const float u = scU[j * LD + pl], xv = Xs[j * ldx + p], tot = scE[j * LD + pl] + el * u;
          dx[static_cast<int64_t>(j) * xstride + p] = from_f<T>(Dh * dYs[j * ldx + p] + dts[j] * tot);
          rd = fmaf(xv, tot, rd);
          z = fmaf(xv, u, z);
        }
      }
      rd = row_sum16(rd);
      z = row_sum16(z);
      if (tx == 0 && j < n) {
        ddt_dir[j] += rd;
        zsum[j] += z;
      }
    }
    __syncthreads();  // before the next tile's products overwrite the scratch
  }
  if (tid < n) Gp[(n - 1) * LD + tid + 1] += Dm[(n - 1) * LD + tid + 1] * dts[tid] * zsum[tid];
  // 4. per S tile: dC = dCB B + Dm[:,0] o (dy Hin), dB = dCB^T C + w o (x dS); the inter term's decay gradient
  float dl[4] = {0.f, 0.f, 0.f, 0.f};
  float* dC32 = a.dC32 + (row0 * a.G + id.g) * a.S;
  float* dB32 = a.dB32 + (row0 * a.G + id.g) * a.S;
  float *s_dc = scr, *s_dci = scr + kL * SLD, *s_db = s_dci + kL * SLD, *s_dbs = s_db + kL * SLD;
  for (int s0 = 0; s0 < a.S; s0 += kST) {
    __syncthreads();  // the previous tile's readers (and step 3's Gp / zsum use) are done
    load_tile(Bt, SLD, kL, kST, n, a.S - s0, Bsrc + s0, bstride);
    load_tile(Ct, SLD, kL, kST, n, a.S - s0, Csrc + s0, bstride);
    load_tile(Ht, SLD, Pp, kST, a.P, a.S - s0, Hin + s0, int64_t(a.S));
    load_tile(St, SLD, Pp, kST, a.P, a.S - s0, dS + s0, int64_t(a.S));
    __syncthreads();
    {
      BlockAcc<64, kST, kTC> dc, dci, db, dbs;
      dc.template mma<false, false>(kL, dCB, LD, Bt, SLD);    // sum_j dCB[i][j] B[j][s]
      dci.template mma<false, false>(Pp, dYs, ldx, Ht, SLD);  // sum_p dy[i][p] Hin[p][s]
      db.template mma<true, false>(kL, dCB, LD, Ct, SLD);     // sum_i dCB[i][j] C[i][s]
      dbs.template mma<false, false>(Pp, Xs, ldx, St, SLD);   // sum_p x[j][p] dS[p][s]
      dc.store(s_dc, SLD);
      dci.store(s_dci, SLD);
      db.store(s_db, SLD);
      dbs.store(s_dbs, SLD);
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int i = ty + 16 * r;  // also the source row j of dB
      if (i >= n) continue;
      const float ef = Dm[i * LD], wj = Dm[(n - 1) * LD + i + 1] * dts[i];
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int sc = tx + 16 * q, s = s0 + sc;
        if (s >= a.S) continue;
        const int64_t o = static_cast<int64_t>(i) * bstride + s;
        const float vci = s_dci[i * SLD + sc];
        atomicAdd(dC32 + o, s_dc[i * SLD + sc] + ef * vci);
        atomicAdd(dB32 + o, s_db[i * SLD + sc] + wj * s_dbs[i * SLD + sc]);
        dl[r] = fmaf(ef * Ct[i * SLD + sc], vci, dl[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const float v = row_sum16(dl[r]);
    const int i = ty + 16 * r;
    if (tx == 0 && i < n) Gp[i * LD] = v;
  }
  __syncthreads();
  // 5. the chunk decay's gradient, then dL/da_tau = sum_{i >= tau} sum_{k <= tau} Gp[i][k]
  if (tid == 0) {
    const float gc = a.g[(id.b * a.nc + id.c) * a.nh + id.h];
    if (gc != 0.f) {
      const float* dg = a.dgpart + ((id.b * a.nh + id.h) * a.nc + id.c) * a.nslab;
      float s = 0.f;
      for (int k = 0; k < a.nslab; ++k) s += dg[k];
      Gp[(n - 1) * LD] += gc * s;
    }
  }
  __syncthreads();
  if (tid < n)
    for (int k = 1; k <= n; ++k) Gp[tid * LD + k] += Gp[tid * LD + k - 1];
  __syncthreads();
  float dA_part = 0.f, dD_part = 0.f;
  if (tid < n) {
    float da = 0.f;
    for (int i = tid; i < n; ++i) da += Gp[i * LD + tid];
    a.ddt[(row0 + tid) * a.nh + id.h] = ddt_dir[tid] + Ah * da;
    dA_part = dts[tid] * da;
  }
  for (int e = tid; e < n * Pp; e += kThreads) {
    const int i = e / Pp, p = e % Pp;
    if (p < a.P) dD_part = fmaf(dYs[i * ldx + p], Xs[i * ldx + p], dD_part);
  }
  dA_part = block_sum(dA_part, scratch);
  dD_part = block_sum(dD_part, scratch);
  if (tid == 0) {
    float* pp = a.part + ((id.b * a.nc + id.c) * a.nh + id.h) * 2;
    pp[0] = dA_part;
    pp[1] = dD_part;
  }
}

// dA[h] += sum over (b, c) of the chunk partials, dD likewise, in a fixed order.
__global__ void reduce_parts_kernel(const float* part, int64_t nbc, int nh, float* dA, float* dD) {
  const int h = blockIdx.x * blockDim.x + threadIdx.x;
  if (h >= nh) return;
  float sa = 0.f, sd = 0.f;
  for (int64_t k = 0; k < nbc; ++k) {
    sa += part[(k * nh + h) * 2];
    sd += part[(k * nh + h) * 2 + 1];
  }
  dA[h] += sa;
  dD[h] += sd;
}

template <typename Kernel>
void allow_smem(Kernel kern, size_t smem) {
  if (smem > 48 * 1024)
    AM_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
}

struct Dims {
  int64_t B, T, nh, P, G, S, nc;
};
Dims dims_of(const Tensor& x, const Tensor& Bm) {
  Dims d{x.dim(0), x.dim(1), x.dim(2), x.dim(3), Bm.dim(2), Bm.dim(3), 0};
  d.nc = (d.T + kL - 1) / kL;
  return d;
}
SsdArgs args_of(const Dims& d, const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                const Tensor& D, const Tensor* seg) {
  SsdArgs a{};
  a.x = x.raw();
  a.dt = dt.data<float>();
  a.A = A.data<float>();
  a.Bm = Bm.raw();
  a.Cm = Cm.raw();
  a.D = D.data<float>();
  a.seg = seg ? seg->data<int32_t>() : nullptr;
  a.Tn = static_cast<int>(d.T);
  a.nh = static_cast<int>(d.nh);
  a.P = static_cast<int>(d.P);
  a.G = static_cast<int>(d.G);
  a.S = static_cast<int>(d.S);
  a.nc = static_cast<int>(d.nc);
  a.nslab = static_cast<int>((d.P * d.S + kThreads - 1) / kThreads);  // the passing kernels' blocks per (b, h)
  return a;
}
dim3 state_grid(const Dims& d) {
  return dim3(static_cast<unsigned>(d.B * d.nc * d.nh), static_cast<unsigned>((d.P + 63) / 64),
              static_cast<unsigned>((d.S + 63) / 64));
}
dim3 pass_grid(const SsdArgs& a, const Dims& d) { return dim3(static_cast<unsigned>(d.B * d.nh), static_cast<unsigned>(a.nslab)); }

// S_c for every chunk, then the state entering each chunk (a.H, a.g filled).
template <typename T, bool kTC>
void chunk_states(SsdArgs& a, const Dims& d, CudaContext& ctx) {
  chunk_state_kernel<T, false, kTC><<<state_grid(d), kThreads, 0, ctx.stream()>>>(a);
  AM_CUDA_CHECK_LAUNCH();
  pass_fwd_kernel<<<pass_grid(a, d), kThreads, 0, ctx.stream()>>>(a);
  AM_CUDA_CHECK_LAUNCH();
}

// The chunk products run on tensor cores (TF32 in, fp32 accumulation) for bf16 activations, whose own rounding is
// coarser than TF32's; fp32 activations keep fp32 FMAs (their tests compare at fp32 tolerance). The backward's
// tensor-core variant needs P <= 64 to fit its shared memory (Nemotron-H and the Mamba2 models use P = 64).
template <typename T>
constexpr bool kUseTC = std::is_same_v<T, bf16>;

template <typename T, bool kTC>
void run_fwd(SsdArgs& a, const Dims& d, CudaContext& ctx) {
  chunk_states<T, kTC>(a, d, ctx);
  constexpr size_t smem = scan_fwd_smem<kTC>();
  allow_smem(scan_fwd_kernel<T, kTC>, smem);
  scan_fwd_kernel<T, kTC><<<dim3(static_cast<unsigned>(d.B * d.nc * d.nh), static_cast<unsigned>((d.P + 63) / 64)),
                            kThreads, smem, ctx.stream()>>>(a);
  AM_CUDA_CHECK_LAUNCH();
}

template <typename T, bool kTC>
void run_bwd(SsdArgs& a, const Dims& d, int Pp, CudaContext& ctx) {
  chunk_states<T, kTC>(a, d, ctx);
  chunk_state_kernel<T, true, kTC><<<state_grid(d), kThreads, 0, ctx.stream()>>>(a);
  AM_CUDA_CHECK_LAUNCH();
  pass_bwd_kernel<<<pass_grid(a, d), kThreads, 0, ctx.stream()>>>(a);
  AM_CUDA_CHECK_LAUNCH();
  const size_t smem = scan_bwd_smem<kTC>(Pp);
  allow_smem(scan_bwd_kernel<T, kTC>, smem);
  scan_bwd_kernel<T, kTC><<<static_cast<unsigned>(d.B * d.nc * d.nh), kThreads, smem, ctx.stream()>>>(a, Pp);
  AM_CUDA_CHECK_LAUNCH();
}

}  // namespace

void ssd_scan_fwd(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                  const Tensor& D, const Tensor* seg, Tensor& y, CudaContext& ctx) {
  const Dims d = dims_of(x, Bm);
  if (d.B * d.nh == 0 || d.T == 0) return;
  SsdArgs a = args_of(d, x, dt, A, Bm, Cm, D, seg);
  Tensor H = empty({d.B, d.nc, d.nh, d.P, d.S}, DType::F32, ctx), g = empty({d.B, d.nc, d.nh}, DType::F32, ctx);
  a.H = H.data<float>();
  a.g = g.data<float>();
  a.out = y.raw();
  AM_DISPATCH_BF16_F32(x.dtype(), "mamba_ssm_scan_fwd", T, { run_fwd<T, kUseTC<T>>(a, d, ctx); });
}

void ssd_scan_bwd(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                  const Tensor& D, const Tensor* seg, const Tensor& dy, Tensor& dx, Tensor& ddt, Tensor& dA,
                  Tensor& dB32, Tensor& dC32, Tensor& dD, CudaContext& ctx) {
  const Dims d = dims_of(x, Bm);
  if (d.B * d.nh == 0 || d.T == 0) return;
  SsdArgs a = args_of(d, x, dt, A, Bm, Cm, D, seg);
  const Shape sshape{d.B, d.nc, d.nh, d.P, d.S};
  Tensor H = empty(sshape, DType::F32, ctx), dH = empty(sshape, DType::F32, ctx),
         g = empty({d.B, d.nc, d.nh}, DType::F32, ctx), dgpart = empty({d.B, d.nh, d.nc, int64_t(a.nslab)}, DType::F32, ctx),
         part = empty({d.B, d.nc, d.nh, 2}, DType::F32, ctx);
  a.H = H.data<float>();
  a.dH = dH.data<float>();
  a.g = g.data<float>();
  a.dgpart = dgpart.data<float>();
  a.part = part.data<float>();
  a.dy = dy.raw();
  a.out = dx.raw();
  a.dB32 = dB32.data<float>();
  a.dC32 = dC32.data<float>();
  a.ddt = ddt.data<float>();
  const int Pp = static_cast<int>((d.P + 63) / 64 * 64);
  AM_DISPATCH_BF16_F32(x.dtype(), "mamba_ssm_scan_bwd", T, {
    if (kUseTC<T> && Pp == 64) run_bwd<T, kUseTC<T>>(a, d, Pp, ctx);
    else run_bwd<T, false>(a, d, Pp, ctx);
  });
  reduce_parts_kernel<<<static_cast<unsigned>((d.nh + 127) / 128), 128, 0, ctx.stream()>>>(
      a.part, d.B * d.nc, static_cast<int>(d.nh), dA.data<float>(), dD.data<float>());
  AM_CUDA_CHECK_LAUNCH();
}

}  // namespace am::cuda
