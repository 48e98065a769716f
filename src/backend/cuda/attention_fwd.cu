// Flash attention forward (FlashAttention-2 scheme on mma.sync tensor cores).
//
// One block = one (batch b, query head h, tile of BM query rows). Warp w owns WM = 16 * MT consecutive
// query rows; its Q fragments stay in registers for the whole loop. The block walks the key/value tiles
// (BN rows) that the causal / sliding-window / segment structure lets it see, double-buffered with cp.async:
// tile n+1 is copied while tile n is multiplied.
//   S = Q K^T          (WM x BN per warp, fp32 in registers, never stored)
//   mask (only on tiles that cross the diagonal, the window edge, the end of the sequence, or with segments)
//   online softmax     m = running max (log2 units), l = running sum, O rescaled by 2^(m_old - m_new)
//   O += P V           (P packed to bf16 straight from the S accumulators: C layout == A layout)
// At the end out = O / l (bf16) and lse = ln 2 * (m + log2 l). Rows that saw nothing: out = 0, lse = -inf.
// gpt_oss sinks (a.sinks [nh] fp32, nullptr = none) touch only that epilogue (finish_row in
// attention_common.cuh): the row's normaliser gains 2^(sink_h log2 e - m), after rescaling to the larger of m
// and the sink, so out and lse include the sink. The key loop is the same with or without them.
//
// Grid (nh, ceil(T / BM), B); blockIdx.y runs the query tiles from the last (the most keys) to the first,
// so the long blocks start first and the short ones fill the tail.
// Template variants of the mma.sync kernel: CAP (Gemma 2 soft-capping: S -> tanh(scale S / cap) right after Q K^T),
// D > 128 (Q's fragments re-read from shared memory per k-step instead of held in registers), DV != D (DeepSeek
// MLA: V / O 128 wide next to q / k 192). The wgmma kernel has CAP only.
#include <cmath>

#include "backend/cuda/attention_common.cuh"
#include "backend/cuda/attention_wgmma.cuh"
#include "backend/cuda/attention_internal.h"
#include "core/error.h"

namespace am::cuda::attn {
namespace {

struct FwdArgs {
  const bf16* q;
  const bf16* k;
  const bf16* v;
  bf16* out;
  float* lse;
  const int32_t* seg;    // [B, T] or null
  const int2* segtab;    // [B, ne] or null (set iff seg is)
  int64_t q_rs, k_rs, v_rs, o_rs;
  int T, nh, group, window, ne;
  float sl2;  // scale * log2(e)
  const float* sinks;  // [nh] fp32 sink logits or null (no sinks: the epilogue is the one before sinks). Last,
                       // so the other fields keep their offsets in the kernel parameter block
  float cap2;          // soft-capping (CAP kernels only): 2 scale log2(e) / cap; sl2 is then cap * log2(e)
};

template <int D, int NW, int MT, int BN, int DV = D>
struct FwdCfg {
  static constexpr int NT = NW * 32;
  static constexpr int WM = 16 * MT;  // query rows per warp
  static constexpr int BM = WM * NW;  // query rows per block
  static constexpr int LD = D + 8;    // padded smem pitch (elements)
  static constexpr int LDV = DV + 8;  // ... of the V tiles
  static constexpr size_t smem_bytes = size_t(BM + 2 * BN) * LD * sizeof(bf16) + size_t(2 * BN) * LDV * sizeof(bf16);
};

// CAP: Gemma 2 soft-capping (each raw score becomes softcap_tanh(.) right after Q K^T; a.sl2 = cap log2(e)).
// Q's fragments stay in registers for D <= 128; for larger D (256: 64 more registers next to O's 128) they are
// re-read from shared memory at every k-step instead. D 64 / 128 without CAP compile to the code they had before
// either existed (every addition is behind if constexpr). DV: the v / out head dim when it differs from D's
// (DeepSeek MLA: D 192, DV 128); V tiles then have their own pitch LDV.
template <int D, int NW, int MT, int BN, bool CAP = false, int DV = D>
__global__ void __launch_bounds__(NW * 32) attn_fwd_kernel(const FwdArgs a) {
  using C = FwdCfg<D, NW, MT, BN, DV>;
  constexpr int NT = C::NT, WM = C::WM, BM = C::BM, LD = C::LD, LDV = C::LDV;
  constexpr int KD = D / 16;  // k-steps over the head dim
  constexpr int NB = BN / 8;  // 8-wide key tiles of S
  constexpr int ND = DV / 8;  // 8-wide column tiles of O
  constexpr bool QREG = D <= 128;  // Q fragments held in registers for the whole key loop
  static_assert(D % 16 == 0 && BN % 16 == 0, "tile shapes");
  const float kNegInf = -INFINITY;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);  // [BM][LD]
  bf16* sK = sQ + BM * LD;                         // [2][BN][LD]
  bf16* sV = sK + 2 * BN * LD;                     // [2][BN][LDV]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int h = blockIdx.x, b = blockIdx.z;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * BM;
  const int T = a.T;
  const int wq0 = q0 + warp * WM;
  const int kvh = h / a.group;
  const bf16* qg = a.q + static_cast<int64_t>(b) * T * a.q_rs + static_cast<int64_t>(h) * D;
  const bf16* kg = a.k + static_cast<int64_t>(b) * T * a.k_rs + static_cast<int64_t>(kvh) * D;
  const bf16* vg = a.v + static_cast<int64_t>(b) * T * a.v_rs + static_cast<int64_t>(kvh) * DV;
  const int32_t* seg = a.seg ? a.seg + static_cast<int64_t>(b) * T : nullptr;
  const int2* segtab = a.segtab ? a.segtab + static_cast<int64_t>(b) * a.ne : nullptr;

  // Key tiles this query tile can see: causal bounds the top, the window the bottom, segments any tile.
  const int q_end = min(q0 + BM, T);
  const int kt_lo = a.window > 0 ? max(0, q0 - a.window + 1) / BN : 0;
  const int kt_hi = (q_end - 1) / BN;
  const int2 qspan = segtab ? seg_span(segtab, q0, q_end) : make_int2(0, 0);
  auto next_live = [&](int kt) {
    if (segtab)
      while (kt <= kt_hi && !spans_meet(qspan, seg_span(segtab, kt * BN, min(kt * BN + BN, T)))) ++kt;
    return kt;
  };
  auto load_kv = [&](int kt, int buf) {
    load_tile_async<BN, D, LD, NT>(sK + buf * BN * LD, kg, a.k_rs, kt * BN, T, tid);
    load_tile_async<BN, DV, LDV, NT>(sV + buf * BN * LDV, vg, a.v_rs, kt * BN, T, tid);
  };

  int kt = next_live(kt_lo);
  load_tile_async<BM, D, LD, NT>(sQ, qg, a.q_rs, q0, T, tid);
  if (kt <= kt_hi) load_kv(kt, 0);
  cp_async_commit();

  float o[MT][ND][4];
  float m[MT][2], l[MT][2];
  int qseg[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nd = 0; nd < ND; ++nd)
#pragma unroll
      for (int x = 0; x < 4; ++x) o[mt][nd][x] = 0.f;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      m[mt][hh] = kNegInf;
      l[mt][hh] = 0.f;
      const int i = wq0 + mt * 16 + g + 8 * hh;
      qseg[mt][hh] = (seg && i < T) ? __ldg(seg + i) : -1;
    }
  }

  cp_async_wait<0>();
  __syncthreads();
  uint32_t qf[MT][QREG ? KD : 1][4];
  if constexpr (QREG) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) ldsm_x4(qf[mt][kk], lda_addr<LD>(sQ, warp * WM + mt * 16, kk * 16, lane));
  }

  int buf = 0;
  while (kt <= kt_hi) {
    const int nxt = next_live(kt + 1);
    if (nxt <= kt_hi) load_kv(nxt, buf ^ 1);
    cp_async_commit();  // possibly empty: keeps "all but the newest group" == the current tile
    cp_async_wait<1>();
    __syncthreads();
    const bf16* cK = sK + buf * BN * LD;
    const bf16* cV = sV + buf * BN * LDV;

    // ---- S = Q K^T ----
    float s[MT][NB][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int x = 0; x < 4; ++x) s[mt][nb][x] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      if constexpr (!QREG) {  // this k-step's Q fragments from shared memory
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) ldsm_x4(qf[mt][0], lda_addr<LD>(sQ, warp * WM + mt * 16, kk * 16, lane));
      }
#pragma unroll
      for (int nb2 = 0; nb2 < NB / 2; ++nb2) {
        uint32_t bk[4];
        ldsm_x4(bk, ldbT_addr<LD>(cK, nb2 * 16, kk * 16, lane));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816(s[mt][2 * nb2], qf[mt][QREG ? kk : 0], bk[0], bk[1]);
          mma16816(s[mt][2 * nb2 + 1], qf[mt][QREG ? kk : 0], bk[2], bk[3]);
        }
      }
    }
    if constexpr (CAP) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nb = 0; nb < NB; ++nb)
#pragma unroll
          for (int x = 0; x < 4; ++x) s[mt][nb][x] = softcap_tanh(s[mt][nb][x], a.cap2);
    }

    // ---- mask (warp-uniform test; most tiles skip it) ----
    const int j0 = kt * BN;
    const bool need_mask = (j0 + BN - 1 > wq0) || (j0 + BN > T) || (seg != nullptr) ||
                           (a.window > 0 && wq0 + WM - 1 - j0 >= a.window);
    if (need_mask) {
      int kseg[NB][2];
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = j0 + nb * 8 + 2 * t4 + e;
          kseg[nb][e] = (seg && j < T) ? __ldg(seg + j) : -1;
        }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int i = wq0 + mt * 16 + g + 8 * hh;
#pragma unroll
          for (int nb = 0; nb < NB; ++nb)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int j = j0 + nb * 8 + 2 * t4 + e;
              bool vis = j <= i && j < T && (a.window <= 0 || i - j < a.window);
              if (seg) vis = vis && qseg[mt][hh] >= 0 && kseg[nb][e] == qseg[mt][hh];
              if (!vis) s[mt][nb][2 * hh + e] = kNegInf;
            }
        }
    }

    // ---- online softmax (the 4 lanes of a quad share a row: reduce the max over them) ----
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        float mx = kNegInf;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) mx = fmaxf(mx, fmaxf(s[mt][nb][2 * hh], s[mt][nb][2 * hh + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[mt][hh], mx * a.sl2);
        const float m_use = m_new == kNegInf ? 0.f : m_new;  // a row with nothing visible yet: keep 0s
        const float alpha = fast_exp2(m[mt][hh] - m_use);
        m[mt][hh] = m_new;
        float rs = 0.f;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pv = fast_exp2(fmaf(s[mt][nb][2 * hh + e], a.sl2, -m_use));
            s[mt][nb][2 * hh + e] = pv;
            rs += pv;
          }
        l[mt][hh] = l[mt][hh] * alpha + rs;
#pragma unroll
        for (int nd = 0; nd < ND; ++nd) {
          o[mt][nd][2 * hh] *= alpha;
          o[mt][nd][2 * hh + 1] *= alpha;
        }
      }

    // ---- O += P V ----
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        pa[mt][0] = pack_bf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[mt][1] = pack_bf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[mt][2] = pack_bf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[mt][3] = pack_bf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int nd2 = 0; nd2 < DV / 16; ++nd2) {
        uint32_t bv[4];
        ldsm_x4_t(bv, ldb_addr<LDV>(cV, kk * 16, nd2 * 16, lane));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816(o[mt][2 * nd2], pa[mt], bv[0], bv[1]);
          mma16816(o[mt][2 * nd2 + 1], pa[mt], bv[2], bv[3]);
        }
      }
    }
    __syncthreads();  // everyone is done with this buffer before the next prefetch overwrites it
    buf ^= 1;
    kt = nxt;
  }
  cp_async_wait<0>();

  // ---- epilogue: out = O / l, lse (both with the sink, if any) ----
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float lt = l[mt][hh];
      lt += __shfl_xor_sync(0xffffffffu, lt, 1);
      lt += __shfl_xor_sync(0xffffffffu, lt, 2);
      const int i = wq0 + mt * 16 + g + 8 * hh;
      if (i < T) {
        float inv, lse;
        finish_row(m[mt][hh], lt, a.sinks, h, inv, lse);
        bf16* orow = a.out + (static_cast<int64_t>(b) * T + i) * a.o_rs + static_cast<int64_t>(h) * DV;
#pragma unroll
        for (int nd = 0; nd < ND; ++nd)
          *reinterpret_cast<uint32_t*>(orow + nd * 8 + 2 * t4) =
              pack_bf16(o[mt][nd][2 * hh] * inv, o[mt][nd][2 * hh + 1] * inv);
        if (t4 == 0) a.lse[(static_cast<int64_t>(b) * a.nh + h) * T + i] = lse;
      }
    }
}


// ---------------------------------------------------------------------------------------------------------
// Hopper variant (sm_90a): the same algorithm with warpgroup MMAs. A block = NWG warpgroups x 64 query
// rows; Q, K and V tiles sit in 128B-swizzled shared memory (cp.async, K/V double-buffered) and feed wgmma
// through descriptors: S = Q K^T (both K-major), O += P V (P from registers in the A-fragment layout, V as
// the transposed, MN-major B operand). Softmax, masking and the sink epilogue are the mma.sync kernel's, per
// warp (16 rows).
template <int D, int BN, int NWG>
struct FwdSm90Cfg {
  static constexpr int NT = NWG * 128;
  static constexpr int BM = 64 * NWG;
  static constexpr uint32_t QB = BM * D * 2, KB = BN * D * 2;  // tile bytes
  static constexpr size_t smem_bytes = size_t(QB) + 4 * size_t(KB) + 1024;  // + alignment slack
};

template <int D, int BN, int NWG, bool CAP = false>
__global__ void __launch_bounds__(NWG * 128, 1) attn_fwd_sm90_kernel(const FwdArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = FwdSm90Cfg<D, BN, NWG>;
  constexpr int NT = C::NT, BM = C::BM;
  constexpr int KD = D / 16, NB = BN / 8, ND = D / 8;
  constexpr uint32_t QB = C::QB, KB = C::KB;
  static_assert(BN == 64 || BN == 128, "wgmma N for S");
  static_assert(D == 64 || D == 128, "wgmma N for O");
  const float kNegInf = -INFINITY;

  extern __shared__ __align__(16) unsigned char smem_sm90[];
  const uint32_t sQ = (smem_addr(smem_sm90) + 1023u) & ~1023u;  // swizzle atoms need 1024-byte alignment
  const uint32_t sK = sQ + QB;      // [2] stages
  const uint32_t sV = sK + 2 * KB;  // [2] stages

  const int tid = threadIdx.x, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int wg = tid >> 7, wiw = (tid >> 5) & 3;
  const int h = blockIdx.x, b = blockIdx.z;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * BM;
  const int T = a.T;
  const int wq0 = q0 + wg * 64 + wiw * 16;  // this warp's 16 rows
  const int kvh = h / a.group;
  const bf16* qg = a.q + static_cast<int64_t>(b) * T * a.q_rs + static_cast<int64_t>(h) * D;
  const bf16* kg = a.k + static_cast<int64_t>(b) * T * a.k_rs + static_cast<int64_t>(kvh) * D;
  const bf16* vg = a.v + static_cast<int64_t>(b) * T * a.v_rs + static_cast<int64_t>(kvh) * D;
  const int32_t* seg = a.seg ? a.seg + static_cast<int64_t>(b) * T : nullptr;
  const int2* segtab = a.segtab ? a.segtab + static_cast<int64_t>(b) * a.ne : nullptr;

  const int q_end = min(q0 + BM, T);
  const int kt_lo = a.window > 0 ? max(0, q0 - a.window + 1) / BN : 0;
  const int kt_hi = (q_end - 1) / BN;
  const int2 qspan = segtab ? seg_span(segtab, q0, q_end) : make_int2(0, 0);
  auto next_live = [&](int kt) {
    if (segtab)
      while (kt <= kt_hi && !spans_meet(qspan, seg_span(segtab, kt * BN, min(kt * BN + BN, T)))) ++kt;
    return kt;
  };
  auto load_kv = [&](int kt, int buf) {
    load_tile_sw128<BN, D, NT>(sK + buf * KB, kg, a.k_rs, kt * BN, T, tid);
    load_tile_sw128<BN, D, NT>(sV + buf * KB, vg, a.v_rs, kt * BN, T, tid);
  };

  int kt = next_live(kt_lo);
  load_tile_sw128<BM, D, NT>(sQ, qg, a.q_rs, q0, T, tid);
  if (kt <= kt_hi) load_kv(kt, 0);
  cp_async_commit();

  float o[ND * 4];
  float m[2], l[2];
  int qseg[2];
#pragma unroll
  for (int x = 0; x < ND * 4; ++x) o[x] = 0.f;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    m[hh] = kNegInf;
    l[hh] = 0.f;
    const int i = wq0 + g + 8 * hh;
    qseg[hh] = (seg && i < T) ? __ldg(seg + i) : -1;
  }

  int buf = 0;
  while (kt <= kt_hi) {
    const int nxt = next_live(kt + 1);
    cp_async_wait<0>();  // this tile (and Q on the first pass) landed
    fence_proxy_async();
    __syncthreads();     // ... for every thread; and every warpgroup is done with the other stage
    if (nxt <= kt_hi) load_kv(nxt, buf ^ 1);
    cp_async_commit();

    // ---- S = Q K^T (64 x BN per warpgroup) ----
    float s[NB * 4];
#pragma unroll
    for (int x = 0; x < NB * 4; ++x) s[x] = 0.f;
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      const uint64_t dq = sw128_desc(sQ + (kk >> 2) * BM * 128 + wg * 64 * 128 + (kk & 3) * 32, 16, 1024);
      const uint64_t dk = sw128_desc(sK + buf * KB + (kk >> 2) * BN * 128 + (kk & 3) * 32, 16, 1024);
      if constexpr (BN == 64)
        wgmma_ss_n64<0, 0>(s, dq, dk, kk > 0);
      else
        wgmma_ss_n128<0, 0>(s, dq, dk, kk > 0);
    }
    wg_commit();
    wg_wait<0>();
    reg_fence(s);
    if constexpr (CAP) {
#pragma unroll
      for (int x = 0; x < NB * 4; ++x) s[x] = softcap_tanh(s[x], a.cap2);
    }

    // ---- mask ----
    const int j0 = kt * BN;
    const bool need_mask = (j0 + BN - 1 > wq0) || (j0 + BN > T) || (seg != nullptr) ||
                           (a.window > 0 && wq0 + 15 - j0 >= a.window);
    if (need_mask) {
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = j0 + nb * 8 + 2 * t4 + e;
          const int ks = (seg && j < T) ? __ldg(seg + j) : -1;
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int i = wq0 + g + 8 * hh;
            bool vis = j <= i && j < T && (a.window <= 0 || i - j < a.window);
            if (seg) vis = vis && qseg[hh] >= 0 && ks == qseg[hh];
            if (!vis) s[nb * 4 + 2 * hh + e] = kNegInf;
          }
        }
    }

    // ---- online softmax ----
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float mx = kNegInf;
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) mx = fmaxf(mx, fmaxf(s[nb * 4 + 2 * hh], s[nb * 4 + 2 * hh + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[hh], mx * a.sl2);
      const float m_use = m_new == kNegInf ? 0.f : m_new;
      const float alpha = fast_exp2(m[hh] - m_use);
      m[hh] = m_new;
      float rs = 0.f;
#pragma unroll
      for (int nb = 0; nb < NB; ++nb)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pv = fast_exp2(fmaf(s[nb * 4 + 2 * hh + e], a.sl2, -m_use));
          s[nb * 4 + 2 * hh + e] = pv;
          rs += pv;
        }
      l[hh] = l[hh] * alpha + rs;
#pragma unroll
      for (int nd = 0; nd < ND; ++nd) {
        o[nd * 4 + 2 * hh] *= alpha;
        o[nd * 4 + 2 * hh + 1] *= alpha;
      }
    }

    // ---- O += P V (all of P packed first: register operands must be final before the fence) ----
    uint32_t pa[BN / 16][4];
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      pa[kk][0] = pack_bf16(s[(2 * kk) * 4 + 0], s[(2 * kk) * 4 + 1]);
      pa[kk][1] = pack_bf16(s[(2 * kk) * 4 + 2], s[(2 * kk) * 4 + 3]);
      pa[kk][2] = pack_bf16(s[(2 * kk + 1) * 4 + 0], s[(2 * kk + 1) * 4 + 1]);
      pa[kk][3] = pack_bf16(s[(2 * kk + 1) * 4 + 2], s[(2 * kk + 1) * 4 + 3]);
    }
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint64_t dv = sw128_desc(sV + buf * KB + kk * 2048, BN * 128, 1024);
      if constexpr (D == 64)
        wgmma_rs_n64<1>(o, pa[kk], dv, 1);
      else
        wgmma_rs_n128<1>(o, pa[kk], dv, 1);
    }
    wg_commit();
    wg_wait<0>();
    reg_fence(o);
    buf ^= 1;
    kt = nxt;
  }
  cp_async_wait<0>();

  // ---- epilogue ----
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    float lt = l[hh];
    lt += __shfl_xor_sync(0xffffffffu, lt, 1);
    lt += __shfl_xor_sync(0xffffffffu, lt, 2);
    const int i = wq0 + g + 8 * hh;
    if (i < T) {
      float inv, lse;
      finish_row(m[hh], lt, a.sinks, h, inv, lse);  // + the sink, if any
      bf16* orow = a.out + (static_cast<int64_t>(b) * T + i) * a.o_rs + static_cast<int64_t>(h) * D;
#pragma unroll
      for (int nd = 0; nd < ND; ++nd)
        *reinterpret_cast<uint32_t*>(orow + nd * 8 + 2 * t4) =
            pack_bf16(o[nd * 4 + 2 * hh] * inv, o[nd * 4 + 2 * hh + 1] * inv);
      if (t4 == 0) a.lse[(static_cast<int64_t>(b) * a.nh + h) * T + i] = lse;
    }
  }
#endif
}

template <int D, int BN, int NWG, bool CAP>
void run_fwd_sm90(const FwdArgs& fa, int B, cudaStream_t st) {
  using C = FwdSm90Cfg<D, BN, NWG>;
  auto kern = attn_fwd_sm90_kernel<D, BN, NWG, CAP>;
  check_cuda(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(C::smem_bytes)),
             "forward (sm90): raising the shared-memory limit");
  const dim3 grid(fa.nh, (fa.T + C::BM - 1) / C::BM, B);
  kern<<<grid, C::NT, C::smem_bytes, st>>>(fa);
  check_cuda(cudaGetLastError(), "forward (sm90) kernel launch");
}

template <int D, int NW, int MT, int BN, bool CAP, int DV = D>
void run_fwd(const FwdArgs& fa, int B, cudaStream_t st) {
  using C = FwdCfg<D, NW, MT, BN, DV>;
  auto kern = attn_fwd_kernel<D, NW, MT, BN, CAP, DV>;
  check_cuda(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(C::smem_bytes)),
             "forward: raising the shared-memory limit");
  const dim3 grid(fa.nh, (fa.T + C::BM - 1) / C::BM, B);
  kern<<<grid, C::NT, C::smem_bytes, st>>>(fa);
  check_cuda(cudaGetLastError(), "forward kernel launch");
}

// Kernel choice. Variants (AttnTuning::fwd_variant): 0 = the best for the device; 1-3 mma.sync tile shapes (any
// GPU); 4, 5 wgmma (sm_90a, D 64 / 128 only; elsewhere, and for other head dims, they fall back to 1).
//   D 64:  1 = 4 warps x 32 rows (BM 128), BN 64; 2 = 4 x 16, BN 64; 3 = 8 x 16, BN 64; 4 = wgmma BN 128; 5 = wgmma BN 64
//   D 128: 1 = 8 x 16 (BM 128), BN 64;  2 = 4 x 16, BN 64; 3 = 4 x 16, BN 128; 4 = wgmma BN 128; 5 = wgmma BN 64
//   D 96:  1 = 8 x 16 (BM 128), BN 64;  2 = 4 x 16, BN 64; 3 = 4 x 16, BN 128         (78 / 65 / 117 KB smem)
//   D 256: 1 = 8 x 16 (BM 128), BN 32;  2 = 4 x 16, BN 32; 3 = 8 x 16, BN 64          (132 / 99 / 198 KB smem;
//          ptxas: 3 spills ~100 bytes, 1 and 2 none)
//   D 192, DV 128 (DeepSeek MLA): 1 = 8 x 16 (BM 128), BN 64; 2 = 4 x 16, BN 64; 3 = 8 x 16, BN 32 (134 / 109 / 92 KB smem)
// Soft-capped (CAP) kernels exist for D 64 / 128 as variant 1 and the device's wgmma default only (any other
// variant runs those), and for D 96 / 256 as every variant; none for MLA (ops:: never sends soft-capped MLA here).
template <bool CAP>
void dispatch_fwd(const FwdArgs& fa, int B, int D, int DV, int variant, cudaStream_t st) {
  if (DV != D) {
    if constexpr (!CAP) {
      if (D == 192 && DV == 128) {
        switch (variant) {
          case 2: run_fwd<192, 4, 1, 64, false, 128>(fa, B, st); break;
          case 3: run_fwd<192, 8, 1, 32, false, 128>(fa, B, st); break;
          default: run_fwd<192, 8, 1, 64, false, 128>(fa, B, st); break;
        }
        return;
      }
    }
    throw DeviceError("attention_fwd: head dims " + std::to_string(D) + " / " + std::to_string(DV) +
                      (CAP ? " with soft-capping" : "") +
                      " are not supported by the CUDA flash kernels (a v head dim other than D: 192 / 128 only, "
                      "without soft-capping)");
  }
  if (D == 64) {
    if constexpr (CAP) {
      if (variant >= 4) run_fwd_sm90<64, 64, 2, true>(fa, B, st);
      else run_fwd<64, 4, 2, 64, true>(fa, B, st);
    } else {
      switch (variant) {
        case 4: run_fwd_sm90<64, 128, 2, false>(fa, B, st); break;
        case 5: run_fwd_sm90<64, 64, 2, false>(fa, B, st); break;
        case 2: run_fwd<64, 4, 1, 64, false>(fa, B, st); break;
        case 3: run_fwd<64, 8, 1, 64, false>(fa, B, st); break;
        default: run_fwd<64, 4, 2, 64, false>(fa, B, st); break;
      }
    }
  } else if (D == 128) {
    if constexpr (CAP) {
      if (variant >= 4) run_fwd_sm90<128, 128, 2, true>(fa, B, st);
      else run_fwd<128, 8, 1, 64, true>(fa, B, st);
    } else {
      switch (variant) {
        case 4: run_fwd_sm90<128, 128, 2, false>(fa, B, st); break;
        case 5: run_fwd_sm90<128, 64, 2, false>(fa, B, st); break;
        case 2: run_fwd<128, 4, 1, 64, false>(fa, B, st); break;
        case 3: run_fwd<128, 4, 1, 128, false>(fa, B, st); break;
        default: run_fwd<128, 8, 1, 64, false>(fa, B, st); break;
      }
    }
  } else if (D == 96) {
    switch (variant) {
      case 2: run_fwd<96, 4, 1, 64, CAP>(fa, B, st); break;
      case 3: run_fwd<96, 4, 1, 128, CAP>(fa, B, st); break;
      default: run_fwd<96, 8, 1, 64, CAP>(fa, B, st); break;
    }
  } else if (D == 256) {
    switch (variant) {
      case 2: run_fwd<256, 4, 1, 32, CAP>(fa, B, st); break;
      case 3: run_fwd<256, 8, 1, 64, CAP>(fa, B, st); break;
      default: run_fwd<256, 8, 1, 32, CAP>(fa, B, st); break;
    }
  } else {
    throw DeviceError("attention_fwd: head_dim " + std::to_string(D) +
                      " is not supported by the CUDA flash kernels (64, 96, 128 and 256 are)");
  }
}

}  // namespace

void launch_fwd(const AttnRawArgs& a, const int2* segtab, int ne, int variant, cudaStream_t st) {
  FwdArgs fa;
  fa.q = static_cast<const bf16*>(a.q);
  fa.k = static_cast<const bf16*>(a.k);
  fa.v = static_cast<const bf16*>(a.v);
  fa.out = static_cast<bf16*>(const_cast<void*>(a.out));
  fa.lse = a.lse;
  fa.seg = a.segment_ids;
  fa.segtab = segtab;
  fa.sinks = a.sinks;
  fa.q_rs = a.q_rs;
  fa.k_rs = a.k_rs;
  fa.v_rs = a.v_rs;
  fa.o_rs = a.o_rs;
  fa.T = static_cast<int>(a.seq);
  fa.nh = static_cast<int>(a.n_heads);
  fa.group = static_cast<int>(a.n_heads / a.n_kv_heads);
  fa.window = static_cast<int>(a.sliding_window);
  fa.ne = ne;
  const bool cap = a.softcap > 0.f;
  // Soft-capped: the kernels turn each raw score into t = tanh(scale x / cap) (softcap_tanh) and the softmax
  // multiplies t by cap log2(e), so the capped score cap t enters in log2 units as the plain scale x log2(e) does.
  fa.sl2 = cap ? a.softcap * kLog2e : a.scale * kLog2e;
  fa.cap2 = cap ? 2.f * a.scale * kLog2e / a.softcap : 0.f;
  const int B = static_cast<int>(a.batch);
  const int D = static_cast<int>(a.head_dim);
  const int DV = static_cast<int>(a.v_head_dim > 0 ? a.v_head_dim : a.head_dim);
  // Variant 0 = the best for the device: sm_90a wgmma (BN 64 for D 64, BN 128 for D 128); else, and for the head
  // dims without wgmma kernels (96, 256), mma.sync variant 1.
  const bool sm90 = is_sm90();
  const bool has_wgmma = (D == 64 || D == 128) && DV == D;
  if (variant <= 0 || variant > 5) variant = sm90 && has_wgmma ? (D == 64 ? 5 : 4) : 1;
  if (variant >= 4 && !(sm90 && has_wgmma)) variant = 1;
  if (cap)
    dispatch_fwd<true>(fa, B, D, DV, variant, st);
  else
    dispatch_fwd<false>(fa, B, D, DV, variant, st);
}

}  // namespace am::cuda::attn
