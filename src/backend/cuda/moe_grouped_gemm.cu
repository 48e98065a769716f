// Persistent grouped GEMM for the MoE expert products (contract in moe_grouped_gemm.h).
//
// One kernel template covers the three products. In GEMM terms C[m, n] = sum_k A[m, k] B[k, n] per expert:
//   fwd  (rows grouped)    A = x_e [cnt, K] (K contiguous)      B = w_e^T: w_e [N, K] (K contiguous)   C = y_e
//   dx   (rows grouped)    A = dy_e [cnt, N] (K contiguous)     B = w_e [N, K] (N contiguous)          C = dx_e
//   dw   (K grouped)       A = dy_e^T: dy_e [cnt, N] (M contig)  B = x_e [cnt, K] (N contiguous)        C = dw_e
// "Rows grouped": M = the expert's row count, N and K fixed; "K grouped": the reduction runs over the expert's
// rows, M and N fixed.
//
// Tiles: 128 x 128 outputs per CTA, BK = 32, 4 stages of cp.async (16-byte chunks, out-of-range chunks
// zero-filled: rows past the expert's count, k past K or past the expert's rows), 8 warps as 2 (m) x 4 (n), each
// 64 x 32 outputs = 4 x 4 mma.sync m16n8k16 tiles (bf16 in, fp32 accumulate). Shared tiles are row-major with 8
// elements of padding per row (K-major rows of 80 bytes, MN-major rows of 272 bytes): the 8 row addresses of every
// ldmatrix phase fall in distinct bank quads. ldmatrix without .trans reads K-major operands, with .trans MN-major
// ones.
//
// Scheduling: "units" are the experts' m-tiles (rows grouped: ceil(cnt / 128) per expert) or the experts with rows
// (K grouped: one unit = all (m, n) tiles of one expert's dW). At the start each CTA's first warp turns the offsets
// into the prefix sum of units per expert in shared memory (E <= 4096); tile t is unit t / tiles_per_unit, its
// expert found by binary search in the prefix sum. Grid = SMs x resident CTAs per SM (occupancy query), each CTA
// taking tiles blockIdx.x, + gridDim.x, ... in order: consecutive CTAs share the expert (its weights) and, rows
// grouped, the m-tile (its rows), so the concurrently running tiles reuse their operands from L2, and every SM
// stays busy whatever the distribution of rows over experts. A CTA's tiles form one flattened sequence of k-steps
// for the copies: the next tile's first stages load during the current tile's last k-steps and epilogue.
#include "backend/cuda/moe_grouped_gemm.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/kernel_utils.cuh"
#include "backend/cuda/mma_sm80.cuh"

namespace am::cuda {
namespace {

constexpr int kBM = 128, kBN = 128, kBK = 32, kStages = 4, kThreads = 256;
constexpr int kPitchK = kBK + 8;  // elements per row of a K-major tile (rows = M or N index)
constexpr int kMaxExperts = 4096;

// Elements of one stage's tile of an operand: K-major [R][kPitchK], MN-major [kBK][R + 8].
template <bool KMAJ, int R>
constexpr int tile_elems() {
  return KMAJ ? R * kPitchK : kBK * (R + 8);
}

struct Params {
  const bf16* a;
  const bf16* b;
  void* c;
  const int32_t* offsets;
  int e;
  int m_fixed;  // K grouped: M (rows grouped: the expert's count)
  int n;        // N
  int k_fixed;  // rows grouped: K (K grouped: the expert's count)
  int64_t lda, ldb, ldc;
  int64_t b_estride;  // rows grouped: elements from one expert's B to the next
  int64_t c_estride;  // K grouped: elements from one expert's C to the next
  float alpha, beta;
};

// smem_addr, cp_async16, cp_async_commit / wait, ldsm_x4(_t), mma16816 (fragment layouts there): mma_sm80.cuh.
using namespace am::cuda::ptx;

// One stage of one operand into shared memory at s.
//   KMAJ: tile [R][kPitchK] = rows r0 .. r0 + R (the M or N index) x k0 .. k0 + kBK of a matrix whose row i starts
//         at g + i * ld (K contiguous);
//   MN-major: tile [kBK][R + 8] = k-rows k0 .. k0 + kBK x columns r0 .. r0 + R of a matrix whose k-row i starts at
//         g + i * ld (M or N contiguous).
// Chunks with a row >= rvalid or a k >= kvalid are zero-filled (rvalid and, K-major, kvalid multiples of 8 where
// they are widths, so a 16-byte chunk is wholly in or out).
template <bool KMAJ, int R>
__device__ __forceinline__ void load_stage(uint32_t s, const bf16* g, int64_t ld, int r0, int rvalid, int k0,
                                           int kvalid, int tid) {
  if constexpr (KMAJ) {
    constexpr int kCpr = kBK / 8;  // 16-byte chunks per row
    static_assert((R * kCpr) % kThreads == 0, "the tile copy must split evenly over the threads");
#pragma unroll
    for (int it = 0; it < R * kCpr / kThreads; ++it) {
      const int c = tid + it * kThreads, row = c / kCpr, cc = c % kCpr;
      const int r = r0 + row, k = k0 + cc * 8;
      const bool v = r < rvalid && k < kvalid;
      const bf16* src = v ? g + static_cast<int64_t>(r) * ld + k : g;
      cp_async16(s + static_cast<uint32_t>((row * kPitchK + cc * 8) * 2), src, v);
    }
  } else {
    constexpr int kCpr = R / 8;
    static_assert((kBK * kCpr) % kThreads == 0, "the tile copy must split evenly over the threads");
#pragma unroll
    for (int it = 0; it < kBK * kCpr / kThreads; ++it) {
      const int c = tid + it * kThreads, row = c / kCpr, cc = c % kCpr;
      const int k = k0 + row, r = r0 + cc * 8;
      const bool v = k < kvalid && r < rvalid;
      const bf16* src = v ? g + static_cast<int64_t>(k) * ld + r : g;
      cp_async16(s + static_cast<uint32_t>((row * (R + 8) + cc * 8) * 2), src, v);
    }
  }
}

// A fragment of the 16 x 16 block at (m_off, kk) of the stage's A tile.
template <bool KMAJ>
__device__ __forceinline__ void load_frag_a(uint32_t (&a)[4], uint32_t s, int m_off, int kk, int lane) {
  if constexpr (KMAJ) {  // matrices: (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15)
    const int r = m_off + (lane & 7) + ((lane >> 3) & 1) * 8, c = kk + (lane >> 4) * 8;
    ldsm_x4(a, s + static_cast<uint32_t>((r * kPitchK + c) * 2));
  } else {  // stored [k][m], transposed on load: the same four matrices
    const int r = kk + (lane & 7) + (lane >> 4) * 8, c = m_off + ((lane >> 3) & 1) * 8;
    ldsm_x4_t(a, s + static_cast<uint32_t>((r * (kBM + 8) + c) * 2));
  }
}
// B fragments of the two 16 (k) x 8 (n) blocks at (kk, n_off) and (kk, n_off + 8): {b0, b1} of the first in
// b[0..1], of the second in b[2..3].
template <bool KMAJ>
__device__ __forceinline__ void load_frag_b2(uint32_t (&b)[4], uint32_t s, int n_off, int kk, int lane) {
  if constexpr (KMAJ) {  // stored [n][k]: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
    const int r = n_off + (lane & 7) + (lane >> 4) * 8, c = kk + ((lane >> 3) & 1) * 8;
    ldsm_x4(b, s + static_cast<uint32_t>((r * kPitchK + c) * 2));
  } else {  // stored [k][n], transposed on load: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
    const int r = kk + (lane & 7) + ((lane >> 3) & 1) * 8, c = n_off + (lane >> 4) * 8;
    ldsm_x4_t(b, s + static_cast<uint32_t>((r * (kBN + 8) + c) * 2));
  }
}

template <typename OutT>
__device__ __forceinline__ void store_pair(OutT* dst, float v0, float v1, float beta) {
  if constexpr (sizeof(OutT) == 4) {
    float2* d = reinterpret_cast<float2*>(dst);
    if (beta != 0.f) {
      const float2 o = *d;
      v0 += beta * o.x;
      v1 += beta * o.y;
    }
    *d = make_float2(v0, v1);
  } else {
    __nv_bfloat162* d = reinterpret_cast<__nv_bfloat162*>(dst);
    if (beta != 0.f) {
      const __nv_bfloat162 o = *d;
      v0 += beta * __bfloat162float(o.x);
      v1 += beta * __bfloat162float(o.y);
    }
    *d = __floats2bfloat162_rn(v0, v1);  // v0 in the low half: the lower address
  }
}

// One output tile: where its operands and outputs start, its extent and its k-steps.
struct TileInfo {
  const bf16* a;
  const bf16* b;
  int64_t c_off;  // elements from p.c to the tile's row 0
  int m0, n0, mvalid, kvalid, ktiles;
};

// Tile t of the CTA's sequence -> its expert (binary search in the prefix sum of units) and position.
template <bool KGROUPED>
__device__ __forceinline__ TileInfo decode_tile(const Params& p, const int* s_prefix, int tile, int per_unit, int nt) {
  const int u = tile / per_unit, rem = tile - u * per_unit;
  int lo = 0, hi = p.e;  // the expert: the largest e with prefix[e] <= u (prefix[E] > u)
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (s_prefix[mid] <= u) lo = mid;
    else hi = mid;
  }
  const int e = lo;
  const int r0 = __ldg(p.offsets + e), cnt = __ldg(p.offsets + e + 1) - r0;
  TileInfo t;
  t.a = p.a + static_cast<int64_t>(r0) * p.lda;
  if constexpr (!KGROUPED) {
    t.m0 = (u - s_prefix[e]) * kBM;
    t.n0 = rem * kBN;
    t.mvalid = cnt;
    t.kvalid = p.k_fixed;
    t.b = p.b + static_cast<int64_t>(e) * p.b_estride;
    t.c_off = static_cast<int64_t>(r0) * p.ldc;
  } else {
    t.m0 = (rem / nt) * kBM;
    t.n0 = (rem % nt) * kBN;
    t.mvalid = p.m_fixed;
    t.kvalid = cnt;
    t.b = p.b + static_cast<int64_t>(r0) * p.ldb;
    t.c_off = static_cast<int64_t>(e) * p.c_estride;
  }
  t.ktiles = max((t.kvalid + kBK - 1) / kBK, 1);  // (>= 1 by construction; a k-step of zeros otherwise)
  return t;
}

// The CTA runs its tiles blockIdx.x, + gridDim.x, ... as one flattened sequence of k-steps: the copies run
// kStages - 1 k-steps ahead of the MMAs across tile boundaries, so the next tile's first stages load during the
// current tile's last k-steps and its epilogue (no pipeline drain per tile). Load cursor: tile `lt` at k-step
// `lkt` (decoded in `L`); compute cursor: tile `ct` (decoded in `C`). Copy group i (one per k-step, empty past the
// last tile) fills stage i % kStages, which k-step i reads.
template <bool A_KMAJ, bool B_KMAJ, bool KGROUPED, typename OutT>
__global__ void __launch_bounds__(kThreads, 2) persistent_grouped_kernel(const Params p) {
  constexpr int kAElems = tile_elems<A_KMAJ, kBM>(), kBElems = tile_elems<B_KMAJ, kBN>();
  constexpr int kStageBytes = (kAElems + kBElems) * 2;
  static_assert(kStageBytes % 128 == 0 && (kAElems * 2) % 128 == 0, "stage tiles stay 128-byte aligned");
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t s_tiles = smem_addr(smem);
  int* s_prefix = reinterpret_cast<int*>(smem + kStages * kStageBytes);  // [E + 1] units before expert e
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3;  // 2 x 4 warps of 64 x 32 outputs
  const int ne = p.e;

  // Prefix sum of the experts' units (warp 0, 32 experts per step).
  if (warp == 0) {
    int run = 0;
    for (int base = 0; base < ne; base += 32) {
      const int j = base + lane;
      int u = 0;
      if (j < ne) {
        const int cnt = max(__ldg(p.offsets + j + 1) - __ldg(p.offsets + j), 0);
        u = KGROUPED ? (cnt > 0 ? 1 : 0) : (cnt + kBM - 1) / kBM;
      }
      int incl = u;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int t = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += t;
      }
      if (j < ne) s_prefix[j + 1] = run + incl;
      run += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) s_prefix[0] = 0;
  }
  __syncthreads();

  const int nt = (p.n + kBN - 1) / kBN;
  const int mt = KGROUPED ? (p.m_fixed + kBM - 1) / kBM : 1;
  const int per_unit = nt * mt;
  const int total = s_prefix[ne] * per_unit;
  const int g = lane >> 2, t4 = lane & 3;
  if (static_cast<int>(blockIdx.x) >= total) return;  // (uniform over the CTA)

  int lt = blockIdx.x, lkt = 0, lstage = 0;
  TileInfo L = decode_tile<KGROUPED>(p, s_prefix, lt, per_unit, nt);
  // Issues the copies of the load cursor's k-step into stage lstage (nothing past the last tile), one commit group.
  auto issue = [&]() {
    if (lt < total) {
      const uint32_t sa = s_tiles + static_cast<uint32_t>(lstage * kStageBytes), sb = sa + kAElems * 2;
      load_stage<A_KMAJ, kBM>(sa, L.a, p.lda, L.m0, L.mvalid, lkt * kBK, L.kvalid, tid);
      load_stage<B_KMAJ, kBN>(sb, L.b, p.ldb, L.n0, p.n, lkt * kBK, L.kvalid, tid);
      if (++lkt == L.ktiles) {
        lkt = 0;
        lt += gridDim.x;
        if (lt < total) L = decode_tile<KGROUPED>(p, s_prefix, lt, per_unit, nt);
      }
    }
    cp_async_commit();  // (empty groups keep the count uniform)
    lstage = lstage + 1 == kStages ? 0 : lstage + 1;
  };
#pragma unroll 1
  for (int s = 0; s < kStages - 1; ++s) issue();

  int cstage = 0;
  for (int ct = blockIdx.x; ct < total; ct += gridDim.x) {
    const TileInfo C = decode_tile<KGROUPED>(p, s_prefix, ct, per_unit, nt);
    float acc[4][4][4];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.f;

    for (int kt = 0; kt < C.ktiles; ++kt) {
      cp_async_wait<kStages - 2>();  // this k-step's stage landed (this thread's copies) ...
      __syncthreads();               // ... everyone's; and every warp is done with the previous k-step's stage
      issue();                       // into that previous stage: kStages - 1 k-steps ahead
      const uint32_t sa = s_tiles + static_cast<uint32_t>(cstage * kStageBytes), sb = sa + kAElems * 2;
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        uint32_t af[4][4], bfr[2][4];
#pragma unroll
        for (int mi = 0; mi < 4; ++mi) load_frag_a<A_KMAJ>(af[mi], sa, wm * 64 + mi * 16, kk, lane);
#pragma unroll
        for (int nj = 0; nj < 2; ++nj) load_frag_b2<B_KMAJ>(bfr[nj], sb, wn * 32 + nj * 16, kk, lane);
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
          for (int ni = 0; ni < 4; ++ni)
            mma16816(acc[mi][ni], af[mi], bfr[ni >> 1][(ni & 1) * 2], bfr[ni >> 1][(ni & 1) * 2 + 1]);
      }
      cstage = cstage + 1 == kStages ? 0 : cstage + 1;
    }

    // Epilogue straight from the accumulators (the next tile's first stages are loading meanwhile):
    // C = alpha * acc + beta * C on the rows and columns in range.
    OutT* gc = static_cast<OutT*>(p.c) + C.c_off;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int col = C.n0 + wn * 32 + ni * 8 + t4 * 2;
        if (col >= p.n) continue;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int m = C.m0 + wm * 64 + mi * 16 + g + h * 8;
          if (m >= C.mvalid) continue;
          store_pair<OutT>(gc + static_cast<int64_t>(m) * p.ldc + col, p.alpha * acc[mi][ni][2 * h],
                           p.alpha * acc[mi][ni][2 * h + 1], p.beta);
        }
      }
  }
  cp_async_wait<0>();  // (only empty groups are left)
}

// Resident CTAs per SM of `kernel` at `smem` bytes on `device`, after raising the kernel's dynamic shared memory
// limit there to `max_smem` (its need at kMaxExperts: one limit for every E, so a cached entry never meets a limit
// lowered for a smaller E); cached per (kernel, device, bytes) so that the host calls happen once.
int resident_ctas(const void* kernel, int device, size_t smem, size_t max_smem) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, size_t>, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(kernel, device, smem);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  AM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(max_smem)));
  int per_sm = 0;
  AM_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  cache.emplace(key, per_sm);
  return per_sm;
}

template <bool A_KMAJ, bool B_KMAJ, bool KGROUPED, typename OutT>
void launch(const Params& p, int64_t max_tiles, CudaContext& ctx) {
  if (max_tiles <= 0) return;
  constexpr int kStageBytes = (tile_elems<A_KMAJ, kBM>() + tile_elems<B_KMAJ, kBN>()) * 2;
  const size_t tiles_bytes = static_cast<size_t>(kStages) * kStageBytes;
  const size_t smem = tiles_bytes + static_cast<size_t>(p.e + 1) * sizeof(int),
               max_smem = tiles_bytes + static_cast<size_t>(kMaxExperts + 1) * sizeof(int);
  auto kernel = persistent_grouped_kernel<A_KMAJ, B_KMAJ, KGROUPED, OutT>;
  ctx.make_current();
  const int per_sm = resident_ctas(reinterpret_cast<const void*>(kernel), ctx.device(), smem, max_smem);
  const int64_t slots = static_cast<int64_t>(std::max(ctx.sm_count(), 1)) * std::max(per_sm, 1);
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(slots, max_tiles));
  kernel<<<grid, kThreads, smem, ctx.stream()>>>(p);
  AM_CUDA_CHECK_LAUNCH();
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows grouped: at most ceil(rows / 128) + E m-tiles over all experts (one partial tile per expert).
int64_t max_row_units(const PersistentGroupedArgs& a) { return cdiv(a.rows, kBM) + a.e; }

Params base_params(const PersistentGroupedArgs& a) {
  Params p{};
  p.offsets = a.offsets;
  p.e = static_cast<int>(a.e);
  p.alpha = a.alpha;
  p.beta = a.beta;
  return p;
}

void need(bool ok, const char* op) {
  if (!ok) throw ShapeError(std::string("cuda op ") + op + ": arguments the persistent grouped GEMM does not take");
}

}  // namespace

bool persistent_grouped_supported(const PersistentGroupedArgs& a, DType ab_type) {
  if (ab_type != DType::BF16) return false;
  if (a.e < 1 || a.e > kMaxExperts || !a.offsets) return false;
  if (a.k <= 0 || a.n <= 0 || a.k % 8 != 0 || a.n % 8 != 0) return false;
  if (a.rows < 0 || a.rows >= INT_MAX || a.k >= INT_MAX / 2 || a.n >= INT_MAX / 2) return false;
  if (a.out_type != DType::BF16 && a.out_type != DType::F32) return false;
  // Tile indices in int: units x tiles per unit below 2^31.
  const int64_t tiles_rows = max_row_units(a) * cdiv(std::max(a.k, a.n), kBN),
                tiles_dw = a.e * cdiv(a.n, kBM) * cdiv(a.k, kBN);
  if (tiles_rows >= INT_MAX || tiles_dw >= INT_MAX) return false;
  for (const void* ptr : {a.x, a.w, a.dy, static_cast<const void*>(a.out)})
    if (ptr && reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  return true;
}

void persistent_grouped_fwd(const PersistentGroupedArgs& a, CudaContext& ctx) {
  need(persistent_grouped_supported(a, DType::BF16) && a.x && a.w && a.out, "persistent_grouped_fwd");
  if (a.rows == 0) return;
  Params p = base_params(a);
  p.a = static_cast<const bf16*>(a.x);
  p.b = static_cast<const bf16*>(a.w);
  p.c = a.out;
  p.n = static_cast<int>(a.n);
  p.k_fixed = static_cast<int>(a.k);
  p.lda = a.k;
  p.ldb = a.k;
  p.ldc = a.n;
  p.b_estride = a.n * a.k;
  const int64_t tiles = max_row_units(a) * cdiv(a.n, kBN);
  if (a.out_type == DType::F32) launch<true, true, false, float>(p, tiles, ctx);
  else launch<true, true, false, bf16>(p, tiles, ctx);
}

void persistent_grouped_dx(const PersistentGroupedArgs& a, CudaContext& ctx) {
  need(persistent_grouped_supported(a, DType::BF16) && a.dy && a.w && a.out, "persistent_grouped_dx");
  if (a.rows == 0) return;
  Params p = base_params(a);
  p.a = static_cast<const bf16*>(a.dy);
  p.b = static_cast<const bf16*>(a.w);
  p.c = a.out;
  p.n = static_cast<int>(a.k);        // output columns: x's width
  p.k_fixed = static_cast<int>(a.n);  // reduction over dy's width
  p.lda = a.n;
  p.ldb = a.k;
  p.ldc = a.k;
  p.b_estride = a.n * a.k;
  const int64_t tiles = max_row_units(a) * cdiv(a.k, kBN);
  if (a.out_type == DType::F32) launch<true, false, false, float>(p, tiles, ctx);
  else launch<true, false, false, bf16>(p, tiles, ctx);
}

void persistent_grouped_dw(const PersistentGroupedArgs& a, CudaContext& ctx) {
  need(persistent_grouped_supported(a, DType::BF16) && a.dy && a.x && a.out && a.out_type == DType::F32,
       "persistent_grouped_dw");
  if (a.rows == 0) return;
  Params p = base_params(a);
  p.a = static_cast<const bf16*>(a.dy);
  p.b = static_cast<const bf16*>(a.x);
  p.c = a.out;
  p.m_fixed = static_cast<int>(a.n);
  p.n = static_cast<int>(a.k);
  p.lda = a.n;
  p.ldb = a.k;
  p.ldc = a.k;
  p.c_estride = a.n * a.k;
  p.alpha = 1.f;
  p.beta = 1.f;
  const int64_t tiles = std::min(a.e, a.rows) * cdiv(a.n, kBM) * cdiv(a.k, kBN);
  launch<false, false, true, float>(p, tiles, ctx);
}

}  // namespace am::cuda
