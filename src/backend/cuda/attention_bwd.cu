// Flash attention backward (FlashAttention-2 scheme on mma.sync tensor cores).
//
// Three launches (four with sink gradients):
//  1. pre:  Dsum[b, h, i] = dout_i . out_i (fp32) and dq_acc = 0 (fp32 [B, T, nh, D]).
//     sinks (gpt_oss; a.dsinks set): dsinks[h] += -sum_{b, i} e^(sink_h - lse[b, h, i]) Dsum[b, h, i], one block
//     per head (attn_dsink_kernel). Nothing else changes with sinks: the forward put them into lse, so the
//     P = exp(S - lse) recomputed below is already the sinked softmax and dS = P (dP - Dsum) holds as is
//     (the sink column has no value, hence no dP, and its dS only reaches the sink logit).
//  2. main: one block = one (batch b, kv head, tile of BN = 16 * NW keys) and the query heads of its GQA
//     group (or 1/split of them). K and V of the tile stay in shared memory; the block walks the
//     (head, query tile of BM rows) pairs that can see the tile, double-buffering Q, dO, lse and Dsum
//     with cp.async. Warp w owns keys [16w, 16w + 16) of the tile; per step it computes, transposed so
//     that its keys are the rows:
//        S^T  = K Q^T,   P^T = exp2(S^T * scale * log2 e - lse * log2 e)   (masked entries 0)
//        dP^T = V dO^T,  dS^T = P^T * (dP^T - Dsum)
//        dV  += P^T dO,  dK += dS^T Q      (fp32 accumulators in registers for the whole walk)
//     dS^T goes to shared memory (bf16); after a barrier the warps split dQ_tile = dS K (BM x D) by
//     16-row x (D / CG)-column pieces and add it to dq_acc with 8-byte fp32 atomics.
//     At the end dK (times scale) and dV are written as bf16 (split == 1), or added to fp32 buffers
//     with atomics when the group is split over `split` blocks (few kv heads: more blocks for the SMs).
//  3. post: dq = bf16(scale * dq_acc) (and dk/dv from their fp32 buffers when split > 1).
// Variants of the main kernel (template parameters, see attn_bwd_kernel): CAP (Gemma 2 soft-capping: P from
// t = tanh(scale s / cap), dS times 1 - t^2), DS (D 256 and MLA: the warps split dK / dV's columns in DS groups and
// each group recomputes S^T / dP^T), DV (MLA: v / dout / dv Dv = 128 wide next to D = 192).
#include <cmath>

#include "backend/cuda/attention_common.cuh"
#include "backend/cuda/attention_wgmma.cuh"
#include "backend/cuda/attention_internal.h"
#include "core/error.h"

namespace am::cuda::attn {
namespace {

struct BwdArgs {
  const bf16* q;
  const bf16* k;
  const bf16* v;
  const bf16* dout;
  const float* lse;   // [B, nh, T]
  const float* dsum;  // [B, nh, T]
  float* dq_acc;      // [B, T, nh, D]
  bf16* dk;
  bf16* dv;
  float* dk_acc;  // [B, T, nkv, D] when split > 1
  float* dv_acc;
  const int32_t* seg;
  const int2* segtab;
  int64_t q_rs, k_rs, v_rs, do_rs, dk_rs, dv_rs;
  int T, nh, nkv, group, split, window, ne;
  float sl2, scale;  // sl2: scale log2(e), or cap log2(e) for the soft-capped (CAP) kernels
  float cap2;        // CAP kernels only: 2 scale log2(e) / cap (softcap_tanh)
};

template <int D, int NW, int BM, int DS = 1, int DV = D>
struct BwdCfg {
  static constexpr int NT = NW * 32;
  static constexpr int BN = 16 * NW / DS;  // keys per block
  static constexpr int LD = D + 8;
  static constexpr int LDV = DV + 8;  // pitch of the V and dO tiles
  static constexpr int LDS = BM + 8;  // pitch of the dS^T tile
  static constexpr size_t smem_bytes =
      size_t(BN * LD + BN * LDV + 2 * BM * LD + 2 * BM * LDV + BN * LDS) * sizeof(bf16) + size_t(4 * BM) * sizeof(float);
};

// DS > 1 (D 256: a warp's dK and dV for all D columns would take 256 registers): the warps form DS groups of
// NW / DS; warp w owns keys [16 (w % (NW / DS)), +16) and the dK / dV columns [(w / (NW / DS)) D / DS, + D / DS).
// Warps of different groups with the same keys each compute the full S^T and dP^T (over all of D): the two
// products are done DS times, in exchange for dK / dV accumulators of D / DS columns. Only group 0 writes dS^T.
// CAP: Gemma 2 soft-capping; the recomputed scores are t = softcap_tanh(raw) (a.sl2 = cap log2(e)) and dS gains
// the factor 1 - t^2 (d(cap tanh(u)) / du), the scale being applied at the end as without it.
// DV: the v / dout / dv head dim when it differs from D (DeepSeek MLA: 192 / 128): V and dO tiles get their own
// pitch, dP^T's product runs over DV, dV has DV / DS columns per warp.
// DS == 1, DV == D without CAP compile to the kernel as it was before (if constexpr / constant folds).
template <int D, int NW, int BM, int DS = 1, bool CAP = false, int DV = D>
__global__ void __launch_bounds__(NW * 32, 1) attn_bwd_kernel(const BwdArgs a) {
  using C = BwdCfg<D, NW, BM, DS, DV>;
  constexpr int NT = C::NT, BN = C::BN, LD = C::LD, LDV = C::LDV, LDS = C::LDS;
  constexpr int KD = D / 16;   // k-steps over the head dim
  constexpr int NQ = BM / 8;   // 8-wide query tiles of S^T
  constexpr int DH = D / DS;   // dK columns per warp
  constexpr int ND = DH / 8;   // 8-wide column tiles of dK (per warp)
  constexpr int DHV = DV / DS;  // dV columns per warp
  constexpr int NDV = DHV / 8;  // 8-wide column tiles of dV (per warp)
  constexpr int RT = BM / 16;  // dQ: 16-row pieces ...
  constexpr int CG = NW / RT;  // ... times CG column groups = one piece per warp
  constexpr int DC = D / CG;
  static_assert(NW % RT == 0 && DC % 16 == 0, "dQ split over the warps");
  static_assert(NW % DS == 0 && DH % 16 == 0 && DHV % 16 == 0, "dK / dV column split over the warps");
  const float kNegInf = -INFINITY, kInf = INFINITY;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sK = reinterpret_cast<bf16*>(smem_raw);  // [BN][LD]
  bf16* sV = sK + BN * LD;                         // [BN][LDV]
  bf16* sQ = sV + BN * LDV;                        // [2][BM][LD]
  bf16* sdO = sQ + 2 * BM * LD;                    // [2][BM][LDV]
  bf16* sdS = sdO + 2 * BM * LDV;                  // [BN][LDS]  (dS^T: keys x queries)
  float* sL = reinterpret_cast<float*>(sdS + BN * LDS);  // [2][BM] lse
  float* sDs = sL + 2 * BM;                              // [2][BM] Dsum

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int kw = DS == 1 ? warp : warp % (NW / DS);  // this warp's 16 keys (tile rows 16 kw ..)
  const int dc0 = DS == 1 ? 0 : (warp / (NW / DS)) * DH;  // ... and its first dK column
  const int dcv0 = DS == 1 ? 0 : (warp / (NW / DS)) * DHV;  // ... and dV column
  const int T = a.T;
  const int kvh = blockIdx.x / a.split, sp = blockIdx.x % a.split;
  const int hps = a.group / a.split;
  const int h_first = kvh * a.group + sp * hps;
  const int j0 = blockIdx.y * BN, b = blockIdx.z;
  const int j_end = min(j0 + BN, T);
  const int wj0 = j0 + kw * 16;

  const int32_t* seg = a.seg ? a.seg + static_cast<int64_t>(b) * T : nullptr;
  const int2* segtab = a.segtab ? a.segtab + static_cast<int64_t>(b) * a.ne : nullptr;

  // Query tiles that can see a key of this tile: from the one holding j0 (causal) to the one holding the
  // last query inside the window of the last key.
  const int qt_lo = j0 / BM;
  int qt_hi = (T - 1) / BM;
  if (a.window > 0) qt_hi = min(qt_hi, (j_end - 1 + a.window - 1) / BM);
  const int nq = qt_hi - qt_lo + 1;
  const int total = hps * nq;  // steps: (head, query tile) pairs, heads outer
  const int2 kspan = segtab ? seg_span(segtab, j0, j_end) : make_int2(0, 0);
  auto next_live = [&](int s) {
    if (segtab)
      while (s < total) {
        const int q0 = (qt_lo + s % nq) * BM;
        if (spans_meet(kspan, seg_span(segtab, q0, min(q0 + BM, T)))) break;
        ++s;
      }
    return s;
  };
  auto issue = [&](int s, int buf) {
    const int h = h_first + s / nq, q0 = (qt_lo + s % nq) * BM;
    const int64_t qoff = static_cast<int64_t>(b) * T;
    load_tile_async<BM, D, LD, NT>(sQ + buf * BM * LD, a.q + qoff * a.q_rs + static_cast<int64_t>(h) * D, a.q_rs,
                                   q0, T, tid);
    load_tile_async<BM, DV, LDV, NT>(sdO + buf * BM * LDV, a.dout + qoff * a.do_rs + static_cast<int64_t>(h) * DV,
                                   a.do_rs, q0, T, tid);
    const int64_t roff = (static_cast<int64_t>(b) * a.nh + h) * T;
    for (int r = tid; r < BM; r += NT) {
      const bool valid = q0 + r < T;
      cp_async4(smem_addr(sL + buf * BM + r), valid ? a.lse + roff + q0 + r : a.lse, valid);
      cp_async4(smem_addr(sDs + buf * BM + r), valid ? a.dsum + roff + q0 + r : a.dsum, valid);
    }
  };

  load_tile_async<BN, D, LD, NT>(sK, a.k + static_cast<int64_t>(b) * T * a.k_rs + static_cast<int64_t>(kvh) * D,
                                 a.k_rs, j0, T, tid);
  load_tile_async<BN, DV, LDV, NT>(sV, a.v + static_cast<int64_t>(b) * T * a.v_rs + static_cast<int64_t>(kvh) * DV,
                                 a.v_rs, j0, T, tid);
  int s = next_live(0);
  if (s < total) issue(s, 0);
  cp_async_commit();

  float dk[ND][4], dv[NDV][4];
  if constexpr (DV == D) {
#pragma unroll
    for (int nd = 0; nd < ND; ++nd)
#pragma unroll
      for (int x = 0; x < 4; ++x) dk[nd][x] = dv[nd][x] = 0.f;
  } else {
#pragma unroll
    for (int nd = 0; nd < ND; ++nd)
#pragma unroll
      for (int x = 0; x < 4; ++x) dk[nd][x] = 0.f;
#pragma unroll
    for (int nd = 0; nd < NDV; ++nd)
#pragma unroll
      for (int x = 0; x < 4; ++x) dv[nd][x] = 0.f;
  }
  int kseg[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int j = wj0 + g + 8 * hh;
    kseg[hh] = (seg && j < T) ? __ldg(seg + j) : -1;
  }

  int buf = 0;
  while (s < total) {
    const int sn = next_live(s + 1);
    if (sn < total) issue(sn, buf ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int h = h_first + s / nq, q0 = (qt_lo + s % nq) * BM;
    const bf16* cQ = sQ + buf * BM * LD;
    const bf16* cdO = sdO + buf * BM * LDV;
    const float* cL = sL + buf * BM;
    const float* cDs = sDs + buf * BM;

    // ---- S^T = K Q^T and dP^T = V dO^T (this warp's 16 keys x BM queries) ----
    float st[NQ][4], dpt[NQ][4];
#pragma unroll
    for (int nb = 0; nb < NQ; ++nb)
#pragma unroll
      for (int x = 0; x < 4; ++x) st[nb][x] = dpt[nb][x] = 0.f;
    if constexpr (DV == D) {
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
        uint32_t ka[4], va[4];
        ldsm_x4(ka, lda_addr<LD>(sK, kw * 16, kk * 16, lane));
        ldsm_x4(va, lda_addr<LD>(sV, kw * 16, kk * 16, lane));
#pragma unroll
        for (int nb2 = 0; nb2 < NQ / 2; ++nb2) {
          uint32_t bq[4], bo[4];
          ldsm_x4(bq, ldbT_addr<LD>(cQ, nb2 * 16, kk * 16, lane));
          mma16816(st[2 * nb2], ka, bq[0], bq[1]);
          mma16816(st[2 * nb2 + 1], ka, bq[2], bq[3]);
          ldsm_x4(bo, ldbT_addr<LD>(cdO, nb2 * 16, kk * 16, lane));
          mma16816(dpt[2 * nb2], va, bo[0], bo[1]);
          mma16816(dpt[2 * nb2 + 1], va, bo[2], bo[3]);
        }
      }
    } else {  // S^T over D, dP^T over DV
#pragma unroll
      for (int kk = 0; kk < KD; ++kk) {
        uint32_t ka[4];
        ldsm_x4(ka, lda_addr<LD>(sK, kw * 16, kk * 16, lane));
#pragma unroll
        for (int nb2 = 0; nb2 < NQ / 2; ++nb2) {
          uint32_t bq[4];
          ldsm_x4(bq, ldbT_addr<LD>(cQ, nb2 * 16, kk * 16, lane));
          mma16816(st[2 * nb2], ka, bq[0], bq[1]);
          mma16816(st[2 * nb2 + 1], ka, bq[2], bq[3]);
        }
      }
#pragma unroll
      for (int kk = 0; kk < DV / 16; ++kk) {
        uint32_t va[4];
        ldsm_x4(va, lda_addr<LDV>(sV, kw * 16, kk * 16, lane));
#pragma unroll
        for (int nb2 = 0; nb2 < NQ / 2; ++nb2) {
          uint32_t bo[4];
          ldsm_x4(bo, ldbT_addr<LDV>(cdO, nb2 * 16, kk * 16, lane));
          mma16816(dpt[2 * nb2], va, bo[0], bo[1]);
          mma16816(dpt[2 * nb2 + 1], va, bo[2], bo[3]);
        }
      }
    }

    // ---- P^T, dS^T (masks only where the tile pair needs them) ----
    const bool need_mask = (wj0 + 15 > q0) || (q0 + BM > T) || (wj0 + 16 > T) || (seg != nullptr) ||
                           (a.window > 0 && q0 + BM - 1 - wj0 >= a.window);
#pragma unroll
    for (int nb = 0; nb < NQ; ++nb)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int qc = nb * 8 + 2 * t4 + e;
        const float lraw = cL[qc];
        const float l2 = lraw == kNegInf ? kInf : lraw * kLog2e;  // rows that saw nothing: P = 0
        const float dsv = cDs[qc];
        const int i = q0 + qc;
        int qs = 0;
        if (need_mask && seg) qs = i < T ? __ldg(seg + i) : -1;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          float x = st[nb][2 * hh + e];
          if constexpr (CAP) x = softcap_tanh(x, a.cap2);
          float p = fast_exp2(fmaf(x, a.sl2, -l2));
          if (need_mask) {
            const int j = wj0 + g + 8 * hh;
            bool vis = j <= i && i < T && j < T && (a.window <= 0 || i - j < a.window);
            if (seg) vis = vis && qs >= 0 && qs == kseg[hh];
            if (!vis) p = 0.f;
          }
          st[nb][2 * hh + e] = p;
          if constexpr (CAP)
            dpt[nb][2 * hh + e] = p * (dpt[nb][2 * hh + e] - dsv) * fmaf(-x, x, 1.f);
          else
            dpt[nb][2 * hh + e] = p * (dpt[nb][2 * hh + e] - dsv);
        }
      }

    // ---- dV += P^T dO, dK += dS^T Q (k = queries) ----
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t pa[4], da[4];
      pa[0] = pack_bf16(st[2 * kk][0], st[2 * kk][1]);
      pa[1] = pack_bf16(st[2 * kk][2], st[2 * kk][3]);
      pa[2] = pack_bf16(st[2 * kk + 1][0], st[2 * kk + 1][1]);
      pa[3] = pack_bf16(st[2 * kk + 1][2], st[2 * kk + 1][3]);
      da[0] = pack_bf16(dpt[2 * kk][0], dpt[2 * kk][1]);
      da[1] = pack_bf16(dpt[2 * kk][2], dpt[2 * kk][3]);
      da[2] = pack_bf16(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
      da[3] = pack_bf16(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
      if constexpr (DV == D) {
#pragma unroll
        for (int nd2 = 0; nd2 < DH / 16; ++nd2) {
          uint32_t bo[4], bq[4];
          ldsm_x4_t(bo, ldb_addr<LD>(cdO, kk * 16, dc0 + nd2 * 16, lane));
          mma16816(dv[2 * nd2], pa, bo[0], bo[1]);
          mma16816(dv[2 * nd2 + 1], pa, bo[2], bo[3]);
          ldsm_x4_t(bq, ldb_addr<LD>(cQ, kk * 16, dc0 + nd2 * 16, lane));
          mma16816(dk[2 * nd2], da, bq[0], bq[1]);
          mma16816(dk[2 * nd2 + 1], da, bq[2], bq[3]);
        }
      } else {
#pragma unroll
        for (int nd2 = 0; nd2 < DHV / 16; ++nd2) {
          uint32_t bo[4];
          ldsm_x4_t(bo, ldb_addr<LDV>(cdO, kk * 16, dcv0 + nd2 * 16, lane));
          mma16816(dv[2 * nd2], pa, bo[0], bo[1]);
          mma16816(dv[2 * nd2 + 1], pa, bo[2], bo[3]);
        }
#pragma unroll
        for (int nd2 = 0; nd2 < DH / 16; ++nd2) {
          uint32_t bq[4];
          ldsm_x4_t(bq, ldb_addr<LD>(cQ, kk * 16, dc0 + nd2 * 16, lane));
          mma16816(dk[2 * nd2], da, bq[0], bq[1]);
          mma16816(dk[2 * nd2 + 1], da, bq[2], bq[3]);
        }
      }
    }

    // ---- dS^T to shared memory, then dQ_tile = dS K ----
    if (DS == 1 || warp < NW / DS) {
#pragma unroll
      for (int nb = 0; nb < NQ; ++nb)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh)
          *reinterpret_cast<uint32_t*>(sdS + (kw * 16 + g + 8 * hh) * LDS + nb * 8 + 2 * t4) =
              pack_bf16(dpt[nb][2 * hh], dpt[nb][2 * hh + 1]);
    }
    __syncthreads();
    {
      const int rt = warp % RT, cg = warp / RT;
      float dq[DC / 8][4];
#pragma unroll
      for (int nd = 0; nd < DC / 8; ++nd)
#pragma unroll
        for (int x = 0; x < 4; ++x) dq[nd][x] = 0.f;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t af[4];
        ldsm_x4_t(af, ldaT_addr<LDS>(sdS, kk * 16, rt * 16, lane));
#pragma unroll
        for (int nd2 = 0; nd2 < DC / 16; ++nd2) {
          uint32_t bk[4];
          ldsm_x4_t(bk, ldb_addr<LD>(sK, kk * 16, cg * DC + nd2 * 16, lane));
          mma16816(dq[2 * nd2], af, bk[0], bk[1]);
          mma16816(dq[2 * nd2 + 1], af, bk[2], bk[3]);
        }
      }
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int i = q0 + rt * 16 + g + 8 * hh;
        if (i < T) {
          float* dst = a.dq_acc + ((static_cast<int64_t>(b) * T + i) * a.nh + h) * D + cg * DC + 2 * t4;
#pragma unroll
          for (int nd = 0; nd < DC / 8; ++nd)
            atomicAdd(reinterpret_cast<float2*>(dst + nd * 8), make_float2(dq[nd][2 * hh], dq[nd][2 * hh + 1]));
        }
      }
    }
    buf ^= 1;
    s = sn;
  }
  cp_async_wait<0>();

  // ---- dK, dV ----
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int j = wj0 + g + 8 * hh;
    if (j >= T) continue;
    if constexpr (DV != D) {  // dK and dV rows of different widths
      if (a.split == 1) {
        bf16* dkr = a.dk + (static_cast<int64_t>(b) * T + j) * a.dk_rs + static_cast<int64_t>(kvh) * D + dc0 + 2 * t4;
        bf16* dvr = a.dv + (static_cast<int64_t>(b) * T + j) * a.dv_rs + static_cast<int64_t>(kvh) * DV + dcv0 + 2 * t4;
#pragma unroll
        for (int nd = 0; nd < ND; ++nd)
          *reinterpret_cast<uint32_t*>(dkr + nd * 8) =
              pack_bf16(dk[nd][2 * hh] * a.scale, dk[nd][2 * hh + 1] * a.scale);
#pragma unroll
        for (int nd = 0; nd < NDV; ++nd)
          *reinterpret_cast<uint32_t*>(dvr + nd * 8) = pack_bf16(dv[nd][2 * hh], dv[nd][2 * hh + 1]);
      } else {
        const int64_t row = (static_cast<int64_t>(b) * T + j) * a.nkv + kvh;
#pragma unroll
        for (int nd = 0; nd < ND; ++nd)
          atomicAdd(reinterpret_cast<float2*>(a.dk_acc + row * D + dc0 + 2 * t4 + nd * 8),
                    make_float2(dk[nd][2 * hh] * a.scale, dk[nd][2 * hh + 1] * a.scale));
#pragma unroll
        for (int nd = 0; nd < NDV; ++nd)
          atomicAdd(reinterpret_cast<float2*>(a.dv_acc + row * DV + dcv0 + 2 * t4 + nd * 8),
                    make_float2(dv[nd][2 * hh], dv[nd][2 * hh + 1]));
      }
      continue;
    }
    if (a.split == 1) {
      bf16* dkr = a.dk + (static_cast<int64_t>(b) * T + j) * a.dk_rs + static_cast<int64_t>(kvh) * D + dc0 + 2 * t4;
      bf16* dvr = a.dv + (static_cast<int64_t>(b) * T + j) * a.dv_rs + static_cast<int64_t>(kvh) * D + dc0 + 2 * t4;
#pragma unroll
      for (int nd = 0; nd < ND; ++nd) {
        *reinterpret_cast<uint32_t*>(dkr + nd * 8) =
            pack_bf16(dk[nd][2 * hh] * a.scale, dk[nd][2 * hh + 1] * a.scale);
        *reinterpret_cast<uint32_t*>(dvr + nd * 8) = pack_bf16(dv[nd][2 * hh], dv[nd][2 * hh + 1]);
      }
    } else {
      const int64_t off = ((static_cast<int64_t>(b) * T + j) * a.nkv + kvh) * D + dc0 + 2 * t4;
#pragma unroll
      for (int nd = 0; nd < ND; ++nd) {
        atomicAdd(reinterpret_cast<float2*>(a.dk_acc + off + nd * 8),
                  make_float2(dk[nd][2 * hh] * a.scale, dk[nd][2 * hh + 1] * a.scale));
        atomicAdd(reinterpret_cast<float2*>(a.dv_acc + off + nd * 8), make_float2(dv[nd][2 * hh], dv[nd][2 * hh + 1]));
      }
    }
  }
}

// Dsum[b, h, t] = sum_d dout * out, and zeroes the row of dq_acc. D / 8 threads per (b, t, h) row, 16 bytes
// each; rows enumerated in [B, T, nh] order so that a warp reads contiguous memory.
template <int D>
__global__ void attn_bwd_pre_kernel(const bf16* __restrict__ out, int64_t o_rs, const bf16* __restrict__ dout,
                                    int64_t do_rs, float* __restrict__ dsum, float* __restrict__ dq_acc, int T,
                                    int nh, int64_t rows) {
  constexpr int TPR = D / 8;
  const int64_t gt = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t r = gt / TPR;
  const int c = static_cast<int>(gt % TPR);
  const bool valid = r < rows;
  float acc = 0.f;
  int64_t bt = 0;
  int h = 0;
  if (valid) {
    h = static_cast<int>(r % nh);
    bt = r / nh;
    const uint4 ov = *reinterpret_cast<const uint4*>(out + bt * o_rs + static_cast<int64_t>(h) * D + c * 8);
    const uint4 gv = *reinterpret_cast<const uint4*>(dout + bt * do_rs + static_cast<int64_t>(h) * D + c * 8);
    const __nv_bfloat162* o2 = reinterpret_cast<const __nv_bfloat162*>(&ov);
    const __nv_bfloat162* g2 = reinterpret_cast<const __nv_bfloat162*>(&gv);
#pragma unroll
    for (int x = 0; x < 4; ++x) {
      const float2 of = __bfloat1622float2(o2[x]), gf = __bfloat1622float2(g2[x]);
      acc = fmaf(of.x, gf.x, acc);
      acc = fmaf(of.y, gf.y, acc);
    }
    float4* z = reinterpret_cast<float4*>(dq_acc + r * D + c * 8);
    z[0] = make_float4(0.f, 0.f, 0.f, 0.f);
    z[1] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
#pragma unroll
  for (int off = TPR / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (valid && c == 0) {
    const int64_t bb = bt / T, t = bt % T;
    dsum[(bb * nh + h) * T + t] = acc;
  }
}

// attn_bwd_pre_kernel for head dims whose D / 8 chunks do not fill a power-of-two lane group (96: 12 chunks):
// TPR = D / 8 / CPT threads per row (a power of two), CPT chunks each. Same results as the kernel above. ZERO =
// false (DeepSeek MLA, where dq_acc's rows are D = 192 wide, not the Dv = 128 of out / dout): Dsum only, dq_acc is
// zeroed by a memset.
template <int D, int CPT, bool ZERO = true>
__global__ void attn_bwd_pre_multi_kernel(const bf16* __restrict__ out, int64_t o_rs, const bf16* __restrict__ dout,
                                          int64_t do_rs, float* __restrict__ dsum, float* __restrict__ dq_acc, int T,
                                          int nh, int64_t rows) {
  constexpr int TPR = D / 8 / CPT;
  static_assert(TPR * CPT * 8 == D && (TPR & (TPR - 1)) == 0 && TPR <= 32, "row split");
  const int64_t gt = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t r = gt / TPR;
  const int c = static_cast<int>(gt % TPR);
  const bool valid = r < rows;
  float acc = 0.f;
  int64_t bt = 0;
  int h = 0;
  if (valid) {
    h = static_cast<int>(r % nh);
    bt = r / nh;
#pragma unroll
    for (int x8 = 0; x8 < CPT; ++x8) {
      const int col = (c * CPT + x8) * 8;
      const uint4 ov = *reinterpret_cast<const uint4*>(out + bt * o_rs + static_cast<int64_t>(h) * D + col);
      const uint4 gv = *reinterpret_cast<const uint4*>(dout + bt * do_rs + static_cast<int64_t>(h) * D + col);
      const __nv_bfloat162* o2 = reinterpret_cast<const __nv_bfloat162*>(&ov);
      const __nv_bfloat162* g2 = reinterpret_cast<const __nv_bfloat162*>(&gv);
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const float2 of = __bfloat1622float2(o2[x]), gf = __bfloat1622float2(g2[x]);
        acc = fmaf(of.x, gf.x, acc);
        acc = fmaf(of.y, gf.y, acc);
      }
      if constexpr (ZERO) {
        float4* z = reinterpret_cast<float4*>(dq_acc + r * D + col);
        z[0] = make_float4(0.f, 0.f, 0.f, 0.f);
        z[1] = make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
  }
#pragma unroll
  for (int off = TPR / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (valid && c == 0) {
    const int64_t bb = bt / T, t = bt % T;
    dsum[(bb * nh + h) * T + t] = acc;
  }
}

// Sink gradient: dsinks[h] += -sum over the B * T rows of head h of e^(sink_h - lse) * Dsum, skipping rows with
// lse = -inf (they saw no key: no sink either, as in the CPU reference). lse, dsum [B, nh, T]; sinks, dsinks
// [nh] fp32. Grid nh blocks of kSinkThreads: thread t sums rows t, t + kSinkThreads, ... of each batch row in
// order, then a fixed shared-memory tree: bit-for-bit repeatable, and each head has a single writer (no
// atomics), so the += is safe. e^(sink - lse) <= 1 because lse includes the sink. fp32 accumulation; the
// reduction reads 8 bytes per row (gpt_oss B1 T4096 nh64: 2 MB, a few microseconds next to the main kernel).
constexpr int kSinkThreads = 256;
__global__ void __launch_bounds__(kSinkThreads)
    attn_dsink_kernel(const float* __restrict__ lse, const float* __restrict__ dsum, const float* __restrict__ sinks,
                      float* __restrict__ dsinks, int B, int T, int nh) {
  __shared__ float red[kSinkThreads];
  const int h = blockIdx.x;
  const float sk = sinks[h];
  float acc = 0.f;
  for (int b = 0; b < B; ++b) {
    const int64_t base = (static_cast<int64_t>(b) * nh + h) * T;
    for (int i = threadIdx.x; i < T; i += kSinkThreads) {
      const float L = lse[base + i];
      if (L != -INFINITY) acc -= expf(sk - L) * dsum[base + i];
    }
  }
  red[threadIdx.x] = acc;
  __syncthreads();
#pragma unroll
  for (int w = kSinkThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) dsinks[h] += red[0];
}

// dst (bf16, rows of `heads` x D at pitch rs) = mul * acc (fp32, contiguous [rows, heads, D]); 8 per thread.
__global__ void attn_bwd_post_kernel(const float* __restrict__ acc, bf16* __restrict__ dst, int64_t rs, float mul,
                                     int heads, int D, int64_t n8) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n8) return;
  const int64_t e = i * 8;
  const int64_t r = e / D;
  const int d = static_cast<int>(e % D);
  const int64_t bt = r / heads;
  const int h = static_cast<int>(r % heads);
  const float4 x0 = *reinterpret_cast<const float4*>(acc + e);
  const float4 x1 = *reinterpret_cast<const float4*>(acc + e + 4);
  uint4 o;
  o.x = pack_bf16(x0.x * mul, x0.y * mul);
  o.y = pack_bf16(x0.z * mul, x0.w * mul);
  o.z = pack_bf16(x1.x * mul, x1.y * mul);
  o.w = pack_bf16(x1.z * mul, x1.w * mul);
  *reinterpret_cast<uint4*>(dst + bt * rs + static_cast<int64_t>(h) * D + d) = o;
}


// ---------------------------------------------------------------------------------------------------------
// Hopper variant (sm_90a): one warpgroup per block owns 64 keys (warp w: keys 16w..16w+15) and walks the
// query tiles (64 rows) like the mma.sync kernel, with warpgroup MMAs on 128B-swizzled tiles:
//   S^T  = K Q^T, dP^T = V dO^T         (A = K / V, B = Q / dO, all K-major)
//   dV  += P^T dO, dK += dS^T Q         (A = P^T / dS^T from registers, B = dO / Q as MN-major operands)
//   dQ   = dS K                         (A = dS^T tile in shared memory read transposed, B = K MN-major)
// dQ goes to the fp32 accumulator with atomics as before.
template <int D>
struct BwdSm90Cfg {
  static constexpr int NT = 128, BN = 64, BM = 64;
  static constexpr uint32_t KB = BN * D * 2, QB = BM * D * 2, SB = BN * BM * 2;
  static constexpr size_t smem_bytes = 2 * size_t(KB) + 4 * size_t(QB) + SB + 4 * BM * sizeof(float) + 1024;
};

template <int D, bool CAP = false>
__global__ void __launch_bounds__(128, 1) attn_bwd_sm90_kernel(const BwdArgs a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = BwdSm90Cfg<D>;
  constexpr int NT = C::NT, BN = C::BN, BM = C::BM;
  constexpr int KD = D / 16, NQ = BM / 8, ND = D / 8;
  constexpr uint32_t KB = C::KB, QB = C::QB, SB = C::SB;
  const float kNegInf = -INFINITY, kInf = INFINITY;

  extern __shared__ __align__(16) unsigned char smem_sm90[];
  const uint32_t raw = smem_addr(smem_sm90);
  const uint32_t sK = (raw + 1023u) & ~1023u;  // swizzle atoms need 1024-byte alignment
  const uint32_t sV = sK + KB;
  const uint32_t sQ = sV + KB;        // [2] stages
  const uint32_t sdO = sQ + 2 * QB;   // [2] stages
  const uint32_t sdS = sdO + 2 * QB;  // dS^T [64 keys][64 queries]
  float* sL = reinterpret_cast<float*>(smem_sm90 + (sdS + SB - raw));  // [2][BM]
  float* sDs = sL + 2 * BM;                                           // [2][BM]
  const uint32_t sLa = sdS + SB, sDsa = sLa + 2 * BM * 4;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int T = a.T;
  const int kvh = blockIdx.x / a.split, sp = blockIdx.x % a.split;
  const int hps = a.group / a.split;
  const int h_first = kvh * a.group + sp * hps;
  const int j0 = blockIdx.y * BN, b = blockIdx.z;
  const int j_end = min(j0 + BN, T);
  const int wj0 = j0 + warp * 16;

  const int32_t* seg = a.seg ? a.seg + static_cast<int64_t>(b) * T : nullptr;
  const int2* segtab = a.segtab ? a.segtab + static_cast<int64_t>(b) * a.ne : nullptr;

  const int qt_lo = j0 / BM;
  int qt_hi = (T - 1) / BM;
  if (a.window > 0) qt_hi = min(qt_hi, (j_end - 1 + a.window - 1) / BM);
  const int nq = qt_hi - qt_lo + 1;
  const int total = hps * nq;
  const int2 kspan = segtab ? seg_span(segtab, j0, j_end) : make_int2(0, 0);
  auto next_live = [&](int s) {
    if (segtab)
      while (s < total) {
        const int q0 = (qt_lo + s % nq) * BM;
        if (spans_meet(kspan, seg_span(segtab, q0, min(q0 + BM, T)))) break;
        ++s;
      }
    return s;
  };
  auto issue = [&](int s, int buf) {
    const int h = h_first + s / nq, q0 = (qt_lo + s % nq) * BM;
    const int64_t qoff = static_cast<int64_t>(b) * T;
    load_tile_sw128<BM, D, NT>(sQ + buf * QB, a.q + qoff * a.q_rs + static_cast<int64_t>(h) * D, a.q_rs, q0, T, tid);
    load_tile_sw128<BM, D, NT>(sdO + buf * QB, a.dout + qoff * a.do_rs + static_cast<int64_t>(h) * D, a.do_rs, q0,
                               T, tid);
    const int64_t roff = (static_cast<int64_t>(b) * a.nh + h) * T;
    for (int r = tid; r < BM; r += NT) {
      const bool valid = q0 + r < T;
      cp_async4(sLa + (buf * BM + r) * 4, valid ? a.lse + roff + q0 + r : a.lse, valid);
      cp_async4(sDsa + (buf * BM + r) * 4, valid ? a.dsum + roff + q0 + r : a.dsum, valid);
    }
  };

  load_tile_sw128<BN, D, NT>(sK, a.k + static_cast<int64_t>(b) * T * a.k_rs + static_cast<int64_t>(kvh) * D, a.k_rs,
                             j0, T, tid);
  load_tile_sw128<BN, D, NT>(sV, a.v + static_cast<int64_t>(b) * T * a.v_rs + static_cast<int64_t>(kvh) * D, a.v_rs,
                             j0, T, tid);
  int s = next_live(0);
  if (s < total) issue(s, 0);
  cp_async_commit();

  float dk[ND * 4], dv[ND * 4];
#pragma unroll
  for (int x = 0; x < ND * 4; ++x) dk[x] = dv[x] = 0.f;
  int kseg[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int j = wj0 + g + 8 * hh;
    kseg[hh] = (seg && j < T) ? __ldg(seg + j) : -1;
  }

  int buf = 0;
  while (s < total) {
    const int sn = next_live(s + 1);
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();
    if (sn < total) issue(sn, buf ^ 1);
    cp_async_commit();
    const int h = h_first + s / nq, q0 = (qt_lo + s % nq) * BM;
    const uint32_t cQ = sQ + buf * QB, cdO = sdO + buf * QB;
    const float* cL = sL + buf * BM;
    const float* cDs = sDs + buf * BM;

    // ---- S^T = K Q^T, dP^T = V dO^T (64 keys x 64 queries) ----
    float st[NQ * 4], dpt[NQ * 4];
#pragma unroll
    for (int x = 0; x < NQ * 4; ++x) st[x] = dpt[x] = 0.f;
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
      const uint32_t ko = (kk >> 2) * BN * 128 + (kk & 3) * 32, qo = (kk >> 2) * BM * 128 + (kk & 3) * 32;
      wgmma_ss_n64<0, 0>(st, sw128_desc(sK + ko, 16, 1024), sw128_desc(cQ + qo, 16, 1024), kk > 0);
      wgmma_ss_n64<0, 0>(dpt, sw128_desc(sV + ko, 16, 1024), sw128_desc(cdO + qo, 16, 1024), kk > 0);
    }
    wg_commit();
    wg_wait<0>();
    reg_fence(st);
    reg_fence(dpt);

    // ---- P^T, dS^T ----
    const bool need_mask = (wj0 + 15 > q0) || (q0 + BM > T) || (wj0 + 16 > T) || (seg != nullptr) ||
                           (a.window > 0 && q0 + BM - 1 - wj0 >= a.window);
#pragma unroll
    for (int nb = 0; nb < NQ; ++nb)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int qc = nb * 8 + 2 * t4 + e;
        const float lraw = cL[qc];
        const float l2 = lraw == kNegInf ? kInf : lraw * kLog2e;
        const float dsv = cDs[qc];
        const int i = q0 + qc;
        int qs = 0;
        if (need_mask && seg) qs = i < T ? __ldg(seg + i) : -1;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int x = nb * 4 + 2 * hh + e;
          float sv = st[x];
          if constexpr (CAP) sv = softcap_tanh(sv, a.cap2);
          float p = fast_exp2(fmaf(sv, a.sl2, -l2));
          if (need_mask) {
            const int j = wj0 + g + 8 * hh;
            bool vis = j <= i && i < T && j < T && (a.window <= 0 || i - j < a.window);
            if (seg) vis = vis && qs >= 0 && qs == kseg[hh];
            if (!vis) p = 0.f;
          }
          st[x] = p;
          if constexpr (CAP)
            dpt[x] = p * (dpt[x] - dsv) * fmaf(-sv, sv, 1.f);
          else
            dpt[x] = p * (dpt[x] - dsv);
        }
      }
    uint32_t pa[BM / 16][4], da[BM / 16][4];
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        // r: 0 = (tile 2kk, row g), 1 = (2kk, g+8), 2 = (2kk+1, g), 3 = (2kk+1, g+8)
        const int x = (2 * kk + (r >> 1)) * 4 + (r & 1) * 2;
        pa[kk][r] = pack_bf16(st[x], st[x + 1]);
        da[kk][r] = pack_bf16(dpt[x], dpt[x + 1]);
      }
    }
    // dS^T (bf16) to shared memory for dQ; the tensor cores read it: fence the generic-proxy stores.
#pragma unroll
    for (int nb = 0; nb < NQ; ++nb)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r = warp * 16 + g + 8 * hh, c = nb * 8 + 2 * t4;
        const uint32_t v = pack_bf16(dpt[nb * 4 + 2 * hh], dpt[nb * 4 + 2 * hh + 1]);
        asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(sdS + sw128_elem<BN>(r, c)), "r"(v) : "memory");
      }
    fence_proxy_async();

    // ---- dV += P^T dO, dK += dS^T Q ----
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      const uint64_t bo = sw128_desc(cdO + kk * 2048, BM * 128, 1024);
      const uint64_t bq = sw128_desc(cQ + kk * 2048, BM * 128, 1024);
      if constexpr (D == 64) {
        wgmma_rs_n64<1>(dv, pa[kk], bo, 1);
        wgmma_rs_n64<1>(dk, da[kk], bq, 1);
      } else {
        wgmma_rs_n128<1>(dv, pa[kk], bo, 1);
        wgmma_rs_n128<1>(dk, da[kk], bq, 1);
      }
    }
    wg_commit();
    if constexpr (D == 128) wg_wait<0>();  // frees the P / dS fragments before dQ's accumulators (registers)
    __syncthreads();  // dS^T complete

    // ---- dQ = dS K (64 queries x D; A = dS^T read transposed, B = K MN-major) ----
    float dq[ND * 4];
#pragma unroll
    for (int x = 0; x < ND * 4; ++x) dq[x] = 0.f;
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint64_t ad = sw128_desc(sdS + kk * 2048, BM * 128, 1024);
      const uint64_t bk = sw128_desc(sK + kk * 2048, BN * 128, 1024);
      if constexpr (D == 64)
        wgmma_ss_n64<1, 1>(dq, ad, bk, kk > 0);
      else
        wgmma_ss_n128<1, 1>(dq, ad, bk, kk > 0);
    }
    wg_commit();
    wg_wait<0>();
    reg_fence(dq);
    reg_fence(dk);
    reg_fence(dv);
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int i = q0 + warp * 16 + g + 8 * hh;
      if (i < T) {
        float* dst = a.dq_acc + ((static_cast<int64_t>(b) * T + i) * a.nh + h) * D + 2 * t4;
#pragma unroll
        for (int nd = 0; nd < ND; ++nd)
          atomicAdd(reinterpret_cast<float2*>(dst + nd * 8), make_float2(dq[nd * 4 + 2 * hh], dq[nd * 4 + 2 * hh + 1]));
      }
    }
    buf ^= 1;
    s = sn;
  }
  cp_async_wait<0>();

  // ---- dK, dV ----
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int j = wj0 + g + 8 * hh;
    if (j >= T) continue;
    if (a.split == 1) {
      bf16* dkr = a.dk + (static_cast<int64_t>(b) * T + j) * a.dk_rs + static_cast<int64_t>(kvh) * D + 2 * t4;
      bf16* dvr = a.dv + (static_cast<int64_t>(b) * T + j) * a.dv_rs + static_cast<int64_t>(kvh) * D + 2 * t4;
#pragma unroll
      for (int nd = 0; nd < ND; ++nd) {
        *reinterpret_cast<uint32_t*>(dkr + nd * 8) =
            pack_bf16(dk[nd * 4 + 2 * hh] * a.scale, dk[nd * 4 + 2 * hh + 1] * a.scale);
        *reinterpret_cast<uint32_t*>(dvr + nd * 8) = pack_bf16(dv[nd * 4 + 2 * hh], dv[nd * 4 + 2 * hh + 1]);
      }
    } else {
      const int64_t off = ((static_cast<int64_t>(b) * T + j) * a.nkv + kvh) * D + 2 * t4;
#pragma unroll
      for (int nd = 0; nd < ND; ++nd) {
        atomicAdd(reinterpret_cast<float2*>(a.dk_acc + off + nd * 8),
                  make_float2(dk[nd * 4 + 2 * hh] * a.scale, dk[nd * 4 + 2 * hh + 1] * a.scale));
        atomicAdd(reinterpret_cast<float2*>(a.dv_acc + off + nd * 8),
                  make_float2(dv[nd * 4 + 2 * hh], dv[nd * 4 + 2 * hh + 1]));
      }
    }
  }
#endif
}

template <int D, bool CAP>
void run_bwd_sm90(const BwdArgs& ba, int B, cudaStream_t st) {
  using C = BwdSm90Cfg<D>;
  auto kern = attn_bwd_sm90_kernel<D, CAP>;
  check_cuda(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(C::smem_bytes)),
             "backward (sm90): raising the shared-memory limit");
  const dim3 grid(ba.nkv * ba.split, (ba.T + C::BN - 1) / C::BN, B);
  kern<<<grid, C::NT, C::smem_bytes, st>>>(ba);
  check_cuda(cudaGetLastError(), "backward (sm90) kernel launch");
}

template <int D, int NW, int BM, int DS, bool CAP, int DV = D>
void run_bwd(const BwdArgs& ba, int B, cudaStream_t st) {
  using C = BwdCfg<D, NW, BM, DS, DV>;
  auto kern = attn_bwd_kernel<D, NW, BM, DS, CAP, DV>;
  check_cuda(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(C::smem_bytes)),
             "backward: raising the shared-memory limit");
  const dim3 grid(ba.nkv * ba.split, (ba.T + C::BN - 1) / C::BN, B);
  kern<<<grid, C::NT, C::smem_bytes, st>>>(ba);
  check_cuda(cudaGetLastError(), "backward kernel launch");
}

void launch_post(const float* acc, void* dst, int64_t rs, float mul, int64_t rows, int heads, int D,
                 cudaStream_t st) {
  const int64_t n8 = rows * heads * D / 8;
  if (n8 == 0) return;
  const int threads = 256;
  attn_bwd_post_kernel<<<static_cast<unsigned>((n8 + threads - 1) / threads), threads, 0, st>>>(
      acc, static_cast<bf16*>(dst), rs, mul, heads, D, n8);
  check_cuda(cudaGetLastError(), "backward post-pass launch");
}

}  // namespace

// Variants: 0 = the best for the device (sm_90a: 4 for D 64 / 128, else 1); 1-3 mma.sync tile shapes; 4 wgmma
// (sm_90a, D 64 / 128 only; elsewhere, and for other head dims, it falls back to 1). BN keys per block:
//   D 64:  1 = 4 warps, BM 64 (BN 64); 2 = 8 warps, BM 64 (BN 128); 3 = 4 warps, BM 32 (BN 64); 4 = wgmma (BN 64)
//   D 128: 1 = 8 warps, BM 64 (BN 128); 2 = 4 warps, BM 64 (BN 64); 3 = 8 warps, BM 32 (BN 128); 4 = wgmma (BN 64)
//   D 96:  1 = 4 warps, BM 64 (BN 64);  2 = 8 warps, BM 64 (BN 128); 3 = 4 warps, BM 32 (BN 64)
//   D 256: 1 = 8 warps, BM 32, dK / dV columns split in 2 (BN 64, 138 KB smem); 2 = the same with BM 64 (208 KB;
//          ptxas spills 20-70 bytes there, 1 at most 4); 3 = 1
//   D 192, DV 128 (DeepSeek MLA): 1 = 8 warps, BM 64, columns split in 2 (BN 64, 136 KB); 2 = BM 32 (90 KB); 3 = 1
// Soft-capped (CAP) kernels exist for D 64 / 128 as variants 1 and 4 only (the others run 1), and for D 96 / 256
// as every variant.
int resolve_bwd_variant(int head_dim, int variant) {
  const bool wg = is_sm90() && (head_dim == 64 || head_dim == 128);
  if (variant <= 0 || variant > 4) return wg ? 4 : 1;
  if (variant == 4 && !wg) return 1;  // the wgmma kernel exists for sm_90a and D 64 / 128 only
  if ((head_dim == 256 || head_dim == 192) && variant == 3) return 1;
  return variant;
}

int bwd_block_kv_rows(int head_dim, int variant) {
  const int v = resolve_bwd_variant(head_dim, variant);
  if (head_dim == 96) return v == 2 ? 128 : 64;
  if (head_dim == 256 || head_dim == 192) return 64;
  switch (v) {
    case 2: return head_dim == 64 ? 128 : 64;
    case 3: return head_dim == 64 ? 64 : 128;
    case 4: return 64;
    default: return head_dim == 64 ? 64 : 128;
  }
}

namespace {
template <bool CAP>
void dispatch_bwd(const BwdArgs& ba, int B, int D, int DV, int variant, cudaStream_t st) {
  if (DV != D) {  // DeepSeek MLA 192 / 128 only, without soft-capping (launch_bwd checked)
    if constexpr (!CAP) {
      switch (variant) {
        case 2: run_bwd<192, 8, 32, 2, false, 128>(ba, B, st); break;
        default: run_bwd<192, 8, 64, 2, false, 128>(ba, B, st); break;
      }
    }
    return;
  }
  if (D == 64) {
    if constexpr (CAP) {
      if (variant == 4) run_bwd_sm90<64, true>(ba, B, st);
      else run_bwd<64, 4, 64, 1, true>(ba, B, st);
    } else {
      switch (variant) {
        case 4: run_bwd_sm90<64, false>(ba, B, st); break;
        case 3: run_bwd<64, 4, 32, 1, false>(ba, B, st); break;
        case 2: run_bwd<64, 8, 64, 1, false>(ba, B, st); break;
        default: run_bwd<64, 4, 64, 1, false>(ba, B, st); break;
      }
    }
  } else if (D == 128) {
    if constexpr (CAP) {
      if (variant == 4) run_bwd_sm90<128, true>(ba, B, st);
      else run_bwd<128, 8, 64, 1, true>(ba, B, st);
    } else {
      switch (variant) {
        case 4: run_bwd_sm90<128, false>(ba, B, st); break;
        case 3: run_bwd<128, 8, 32, 1, false>(ba, B, st); break;
        case 2: run_bwd<128, 4, 64, 1, false>(ba, B, st); break;
        default: run_bwd<128, 8, 64, 1, false>(ba, B, st); break;
      }
    }
  } else if (D == 96) {
    switch (variant) {
      case 3: run_bwd<96, 4, 32, 1, CAP>(ba, B, st); break;
      case 2: run_bwd<96, 8, 64, 1, CAP>(ba, B, st); break;
      default: run_bwd<96, 4, 64, 1, CAP>(ba, B, st); break;
    }
  } else {  // 256
    switch (variant) {
      case 2: run_bwd<256, 8, 64, 2, CAP>(ba, B, st); break;
      default: run_bwd<256, 8, 32, 2, CAP>(ba, B, st); break;
    }
  }
}
}  // namespace

void launch_bwd(const AttnRawArgs& a, const BwdWork& w, int variant, cudaStream_t st) {
  const int D = static_cast<int>(a.head_dim);
  const int DV = static_cast<int>(a.v_head_dim > 0 ? a.v_head_dim : a.head_dim);
  const bool cap = a.softcap > 0.f;
  variant = resolve_bwd_variant(D, variant);
  if (DV != D) {
    if (!(D == 192 && DV == 128) || cap)
      throw DeviceError("attention_bwd: head dims " + std::to_string(D) + " / " + std::to_string(DV) +
                        (cap ? " with soft-capping" : "") +
                        " are not supported by the CUDA flash kernels (a v head dim other than D: 192 / 128 only, "
                        "without soft-capping)");
  } else if (D != 64 && D != 128 && D != 96 && D != 256) {
    throw DeviceError("attention_bwd: head_dim " + std::to_string(a.head_dim) +
                      " is not supported by the CUDA flash kernels (64, 96, 128 and 256 are)");
  }
  const int B = static_cast<int>(a.batch), T = static_cast<int>(a.seq), nh = static_cast<int>(a.n_heads);
  const int nkv = static_cast<int>(a.n_kv_heads);

  // 1. Dsum and dq_acc = 0
  {
    const int64_t rows = static_cast<int64_t>(B) * T * nh;
    const int threads = 256;
    const bf16* out = static_cast<const bf16*>(a.out);
    const bf16* dout = static_cast<const bf16*>(a.dout);
    if (DV != D) {  // MLA: Dsum over Dv = 128 (16 threads per row), dq_acc (D wide) zeroed separately
      check_cuda(cudaMemsetAsync(w.dq_acc, 0, static_cast<size_t>(rows) * D * sizeof(float), st),
                 "backward: zeroing the dq accumulator");
      const unsigned blocks = static_cast<unsigned>((rows * 16 + threads - 1) / threads);
      attn_bwd_pre_multi_kernel<128, 1, false>
          <<<blocks, threads, 0, st>>>(out, a.o_rs, dout, a.do_rs, w.dsum, w.dq_acc, T, nh, rows);
    } else if (D == 96) {  // 4 threads per row, 3 chunks each
      const unsigned blocks = static_cast<unsigned>((rows * 4 + threads - 1) / threads);
      attn_bwd_pre_multi_kernel<96, 3>
          <<<blocks, threads, 0, st>>>(out, a.o_rs, dout, a.do_rs, w.dsum, w.dq_acc, T, nh, rows);
    } else {
      const int64_t threads_total = rows * (D / 8);
      const unsigned blocks = static_cast<unsigned>((threads_total + threads - 1) / threads);
      if (D == 64)
        attn_bwd_pre_kernel<64><<<blocks, threads, 0, st>>>(out, a.o_rs, dout, a.do_rs, w.dsum, w.dq_acc, T, nh, rows);
      else if (D == 128)
        attn_bwd_pre_kernel<128><<<blocks, threads, 0, st>>>(out, a.o_rs, dout, a.do_rs, w.dsum, w.dq_acc, T, nh, rows);
      else
        attn_bwd_pre_kernel<256><<<blocks, threads, 0, st>>>(out, a.o_rs, dout, a.do_rs, w.dsum, w.dq_acc, T, nh, rows);
    }
    check_cuda(cudaGetLastError(), "backward pre-pass launch");
  }
  // 1b. sink gradients, from the forward's lse (which includes the sinks) and the Dsum just written
  if (a.dsinks) {
    attn_dsink_kernel<<<static_cast<unsigned>(nh), kSinkThreads, 0, st>>>(a.lse, w.dsum, a.sinks, a.dsinks, B, T, nh);
    check_cuda(cudaGetLastError(), "backward sink-gradient launch");
  }
  if (w.split > 1) {
    const size_t rows_kv = static_cast<size_t>(B) * T * nkv;
    check_cuda(cudaMemsetAsync(w.dk_acc, 0, rows_kv * D * sizeof(float), st), "backward: zeroing dk accumulator");
    check_cuda(cudaMemsetAsync(w.dv_acc, 0, rows_kv * DV * sizeof(float), st), "backward: zeroing dv accumulator");
  }

  // 2. main
  BwdArgs ba;
  ba.q = static_cast<const bf16*>(a.q);
  ba.k = static_cast<const bf16*>(a.k);
  ba.v = static_cast<const bf16*>(a.v);
  ba.dout = static_cast<const bf16*>(a.dout);
  ba.lse = a.lse;
  ba.dsum = w.dsum;
  ba.dq_acc = w.dq_acc;
  ba.dk = static_cast<bf16*>(a.dk);
  ba.dv = static_cast<bf16*>(a.dv);
  ba.dk_acc = w.dk_acc;
  ba.dv_acc = w.dv_acc;
  ba.seg = a.segment_ids;
  ba.segtab = w.segtab;
  ba.q_rs = a.q_rs;
  ba.k_rs = a.k_rs;
  ba.v_rs = a.v_rs;
  ba.do_rs = a.do_rs;
  ba.dk_rs = a.dk_rs;
  ba.dv_rs = a.dv_rs;
  ba.T = T;
  ba.nh = nh;
  ba.nkv = nkv;
  ba.group = nh / nkv;
  ba.split = w.split;
  ba.window = static_cast<int>(a.sliding_window);
  ba.ne = w.ne;
  // Soft-capped: P = 2^(t cap log2(e) - lse log2(e)) with t = softcap_tanh(raw) (see attention_fwd.cu).
  ba.sl2 = cap ? a.softcap * kLog2e : a.scale * kLog2e;
  ba.scale = a.scale;
  ba.cap2 = cap ? 2.f * a.scale * kLog2e / a.softcap : 0.f;
  if (cap)
    dispatch_bwd<true>(ba, B, D, DV, variant, st);
  else
    dispatch_bwd<false>(ba, B, D, DV, variant, st);

  // 3. bf16 outputs
  const int64_t bt = static_cast<int64_t>(B) * T;
  launch_post(w.dq_acc, a.dq, a.dq_rs, a.scale, bt, nh, D, st);
  if (w.split > 1) {
    launch_post(w.dk_acc, a.dk, a.dk_rs, 1.f, bt, nkv, D, st);
    launch_post(w.dv_acc, a.dv, a.dv_rs, 1.f, bt, nkv, DV, st);
  }
}

}  // namespace am::cuda::attn
