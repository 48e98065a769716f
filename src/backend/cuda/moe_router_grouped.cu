// DeepSeek's grouped routers on CUDA (contract in src/ops/moe_ops.h; entry points and numerics in
// moe_router_grouped.h; the host reference is src/ops/moe_router_grouped.cpp, which this file follows step by step).
//
//   fwd  one warp per token. Shared memory per warp: the fp32 scores p[E] and choices c[E], a double scratch ex[E]
//        (softmax exponentials), the group scores gs[G] and kept-group flags keep[G].
//        1. lanes: p = sigmoid (double, rounded to fp32) or softmax (double exps; lane 0 sums them in expert order,
//           as the host does, so the denominator is the same double);
//        2. lanes: c = p + bias (fp32);
//        3. grouped: lane g scores group g (sum of its top-2 choices, or its max) by the host's sequential scan;
//           lane 0 picks the topk_group best groups (the host's selection loop); lanes zero the other groups;
//        4. k rounds of warp arg-max over c (lane-local scan in expert order with a strict '>', then a butterfly
//           reduction preferring the larger value and, on ties, the lower index: the host's first-maximum rule),
//           a per-lane bit mask marking the experts taken;
//        5. lane 0: weights = p[idx], fp32 sum in slot order, / (sum + 1e-20), * routed_scaling_factor.
//   bwd  one warp per token: lane 0 forms S, c and scatters du (double, in slot order) into shared memory; lanes
//        apply sigmoid' or the softmax Jacobian (lane 0 sums <p, du> in expert order).
// Router tensors are small ([N, E] with E in the hundreds), so the serial lane-0 parts cost little next to the
// expert GEMMs; they buy equality with the host reference.
#include <algorithm>
#include <string>

#include "backend/cuda/kernel_utils.cuh"
#include "backend/cuda/moe_router_grouped.h"

namespace am::cuda {
namespace {

constexpr int kMaxExperts = 1024;      // the per-lane "taken" mask holds E / 32 <= 32 bits
constexpr int kErrMoeExpert = 3;       // DeviceErrorSlot code (as moe.cu): expert index outside [0, E)
constexpr size_t kSmemBudget = 48 << 10;  // static shared-memory limit without opting in
constexpr int kMaxWarps = 4;

enum GroupMode : int { kNone = 0, kMax = 1, kTop2Sum = 2 };

struct FwdArgs {
  int E, k, G, per, topk_group, group;
  bool sigmoid, norm;
  float scale;  // routed_scaling_factor
};

size_t align8(size_t b) { return (b + 7) / 8 * 8; }
size_t fwd_smem_per_warp(int E, int G) { return align8(8 * size_t(E) + 4 * size_t(E) * 2 + 4 * size_t(G) * 2); }
size_t bwd_smem_per_warp(int E) { return 8 * size_t(E); }

template <typename TL, typename TB>
__global__ void grouped_router_fwd_kernel(const TL* __restrict__ logits, const TB* __restrict__ bias, int64_t n,
                                          FwdArgs a, size_t warp_bytes, float* __restrict__ scores,
                                          int32_t* __restrict__ topk_idx, float* __restrict__ topk_w) {
  extern __shared__ __align__(8) unsigned char smem[];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + wid;
  if (t >= n) return;  // warp-uniform; only __syncwarp below
  unsigned char* base = smem + wid * warp_bytes;
  double* ex = reinterpret_cast<double*>(base);
  float* p = reinterpret_cast<float*>(ex + a.E);
  float* c = p + a.E;
  float* gs = c + a.E;
  int* keep = reinterpret_cast<int*>(gs + a.G);
  const int E = a.E;
  const TL* l = logits + t * E;
  float* st = scores + t * E;

  // 1. scores
  if (a.sigmoid) {
    for (int e = lane; e < E; e += 32) {
      const double z = static_cast<double>(to_f(l[e]));
      const float pe = static_cast<float>(__ddiv_rn(1.0, __dadd_rn(1.0, exp(-z))));
      p[e] = pe;
      st[e] = pe;
    }
  } else {
    float mx = -INFINITY;
    for (int e = lane; e < E; e += 32) mx = fmaxf(mx, to_f(l[e]));
    mx = warp_max(mx);
    for (int e = lane; e < E; e += 32) ex[e] = exp(__dsub_rn(static_cast<double>(to_f(l[e])), static_cast<double>(mx)));
    __syncwarp();
    double sum = 0.0;
    if (lane == 0)
      for (int e = 0; e < E; ++e) sum = __dadd_rn(sum, ex[e]);
    sum = __shfl_sync(0xffffffffu, sum, 0);
    for (int e = lane; e < E; e += 32) {
      const float pe = static_cast<float>(__ddiv_rn(ex[e], sum));
      p[e] = pe;
      st[e] = pe;
    }
  }
  // 2. choice (selection only)
  for (int e = lane; e < E; e += 32) c[e] = bias ? __fadd_rn(p[e], to_f(bias[e])) : p[e];
  __syncwarp();

  // 3. group limit
  if (a.group != kNone) {
    const int per = a.per;
    for (int g = lane; g < a.G; g += 32) {
      const float* cg = c + g * per;
      if (a.group == kTop2Sum) {
        int b0 = 0;
        for (int j = 1; j < per; ++j)
          if (cg[j] > cg[b0]) b0 = j;
        int b1 = -1;
        for (int j = 0; j < per; ++j)
          if (j != b0 && (b1 < 0 || cg[j] > cg[b1])) b1 = j;
        gs[g] = __fadd_rn(cg[b0], cg[b1]);
      } else {
        float m = cg[0];
        for (int j = 1; j < per; ++j)
          if (m < cg[j]) m = cg[j];
        gs[g] = m;
      }
      keep[g] = 0;
    }
    __syncwarp();
    if (lane == 0) {
      for (int s = 0; s < a.topk_group; ++s) {
        int best = -1;
        for (int g = 0; g < a.G; ++g)
          if (!keep[g] && (best < 0 || gs[g] > gs[best])) best = g;
        keep[best] = 1;
      }
    }
    __syncwarp();
    for (int e = lane; e < E; e += 32)
      if (!keep[e / per]) c[e] = 0.0f;  // HF masked_fill(~mask, 0.0)
    __syncwarp();
  }

  // 4. top-k on the choice
  uint32_t taken = 0;  // bit j: expert lane + 32 j already selected
  int32_t* it = topk_idx + t * a.k;
  for (int slot = 0; slot < a.k; ++slot) {
    float bv = 0.f;
    int bi = -1;
    for (int j = 0, e = lane; e < E; ++j, e += 32) {
      if ((taken >> j) & 1u) continue;
      if (bi < 0 || c[e] > bv) {
        bv = c[e];
        bi = e;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) {
        bv = ov;
        bi = oi;
      }
    }
    if (bi >= 0 && lane == (bi & 31)) taken |= 1u << (bi >> 5);
    if (lane == 0) it[slot] = bi;
  }

  // 5. weights (lane 0 wrote it[]; it reads its own writes)
  if (lane == 0) {
    float* wt = topk_w + t * a.k;
    float sum = 0.f;
    for (int s = 0; s < a.k; ++s) sum = __fadd_rn(sum, p[it[s]]);
    const float den = __fadd_rn(sum, 1e-20f);
    for (int s = 0; s < a.k; ++s) {
      float w = p[it[s]];
      if (a.norm) w = __fdiv_rn(w, den);
      wt[s] = __fmul_rn(w, a.scale);
    }
  }
}

template <typename TD>
__global__ void grouped_router_bwd_kernel(const float* __restrict__ scores, const int32_t* __restrict__ topk_idx,
                                          const float* __restrict__ dtopk_w, int64_t n, int E, int k, bool sigmoid,
                                          bool norm, float scale, TD* __restrict__ dlogits, DeviceErrorSlot* slot) {
  extern __shared__ __align__(8) unsigned char smem[];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + wid;
  if (t >= n) return;
  double* du = reinterpret_cast<double*>(smem) + static_cast<size_t>(wid) * E;
  const float* pt = scores + t * E;
  const int32_t* it = topk_idx + t * k;
  const float* dwt = dtopk_w + t * k;
  for (int e = lane; e < E; e += 32) du[e] = 0.0;
  __syncwarp();
  if (lane == 0) {
    double S = 1.0, c = 0.0;
    if (norm) {
      S = 1e-20;
      for (int s = 0; s < k; ++s)
        if (it[s] >= 0 && it[s] < E) S = __dadd_rn(S, static_cast<double>(pt[it[s]]));
      for (int s = 0; s < k; ++s)
        if (it[s] >= 0 && it[s] < E)
          c = __dadd_rn(c, __dmul_rn(static_cast<double>(dwt[s]), static_cast<double>(pt[it[s]])));
      c = __ddiv_rn(c, S);
    }
    const double rs = __ddiv_rn(static_cast<double>(scale), S);
    for (int s = 0; s < k; ++s) {
      const int i = it[s];
      if (i < 0 || i >= E) {
        report_device_error(slot, kErrMoeExpert, t * k + s, i);
        continue;
      }
      du[i] = __dadd_rn(du[i], __dmul_rn(rs, __dsub_rn(static_cast<double>(dwt[s]), c)));
    }
  }
  __syncwarp();
  TD* dl = dlogits + t * E;
  if (sigmoid) {
    for (int e = lane; e < E; e += 32) {
      const double pe = pt[e];
      dl[e] = from_f<TD>(static_cast<float>(__dmul_rn(__dmul_rn(du[e], pe), __dsub_rn(1.0, pe))));
    }
  } else {
    double dot = 0.0;
    if (lane == 0)
      for (int e = 0; e < E; ++e) dot = __dadd_rn(dot, __dmul_rn(static_cast<double>(pt[e]), du[e]));
    dot = __shfl_sync(0xffffffffu, dot, 0);
    for (int e = lane; e < E; e += 32)
      dl[e] = from_f<TD>(static_cast<float>(__dmul_rn(static_cast<double>(pt[e]), __dsub_rn(du[e], dot))));
  }
}

// Warps per block so that their shared memory fits the static budget.
int warps_for(size_t per_warp) {
  return static_cast<int>(std::clamp<size_t>(kSmemBudget / std::max<size_t>(per_warp, 1), 1, kMaxWarps));
}

int group_mode(const GroupedRouterOptions& o) {
  using G = GroupedRouterOptions::Group;
  return o.group == G::Top2Sum ? kTop2Sum : o.group == G::Max ? kMax : kNone;
}

}  // namespace

void moe_router_grouped_fwd(const Tensor& logits, const Tensor* bias, int64_t k, const GroupedRouterOptions& o,
                            Tensor& scores, Tensor& topk_idx, Tensor& topk_w, CudaContext& ctx) {
  const char* op = "moe_router_grouped_fwd";
  need_cuda(op, "logits", logits);
  need_cuda(op, "scores", scores);
  need_cuda(op, "topk_idx", topk_idx);
  need_cuda(op, "topk_w", topk_w);
  need_dtype(op, "scores", scores, DType::F32);
  need_dtype(op, "topk_idx", topk_idx, DType::I32);
  need_dtype(op, "topk_w", topk_w, DType::F32);
  if (logits.ndim() != 2) op_error(op, describe("logits", logits) + ": expected [N, E]");
  const int64_t n = logits.dim(0), E = logits.dim(1);
  if (E < 1 || E > kMaxExperts) op_error(op, "E = " + std::to_string(E) + " must be in [1, 1024] on CUDA");
  if (k < 1 || k > E) op_error(op, "k = " + std::to_string(k) + " must be in [1, E = " + std::to_string(E) + "]");
  if (scores.numel() != n * E || topk_idx.numel() != n * k || topk_w.numel() != n * k)
    op_error(op, "scores / topk_idx / topk_w sizes do not match " + describe("logits", logits) + " and k = " +
                     std::to_string(k));
  if (bias) {
    need_cuda(op, "bias", *bias);
    if (bias->numel() != E) op_error(op, describe("bias", *bias) + ": expected [E = " + std::to_string(E) + "]");
  }
  const int mode = group_mode(o);
  const int64_t G = mode == kNone ? 1 : o.n_group;
  if (mode != kNone && (G < 1 || E % G != 0 || o.topk_group < 1 || o.topk_group > G ||
                        k > o.topk_group * (E / G) || (mode == kTop2Sum && E / G < 2)))
    op_error(op, "bad grouping: E = " + std::to_string(E) + ", n_group = " + std::to_string(o.n_group) +
                     ", topk_group = " + std::to_string(o.topk_group) + ", k = " + std::to_string(k));
  if (n == 0) return;
  FwdArgs a{static_cast<int>(E),         static_cast<int>(k), static_cast<int>(G), static_cast<int>(E / G),
            static_cast<int>(mode == kNone ? 1 : o.topk_group), mode, o.sigmoid, o.norm_topk_prob,
            o.routed_scaling_factor};
  const size_t per_warp = fwd_smem_per_warp(a.E, a.G);
  const int warps = warps_for(per_warp);
  const unsigned grid = static_cast<unsigned>((n + warps - 1) / warps);
  const size_t smem = per_warp * warps;
  AM_DISPATCH_BF16_F32(logits.dtype(), op, TL, {
    if (!bias) {
      grouped_router_fwd_kernel<TL, float><<<grid, 32 * warps, smem, ctx.stream()>>>(
          logits.data<TL>(), nullptr, n, a, per_warp, scores.data<float>(), topk_idx.data<int32_t>(),
          topk_w.data<float>());
    } else {
      AM_DISPATCH_BF16_F32(bias->dtype(), op, TB, {
        grouped_router_fwd_kernel<TL, TB><<<grid, 32 * warps, smem, ctx.stream()>>>(
            logits.data<TL>(), bias->data<TB>(), n, a, per_warp, scores.data<float>(), topk_idx.data<int32_t>(),
            topk_w.data<float>());
      });
    }
  });
  AM_CUDA_CHECK_LAUNCH();
}

void moe_router_grouped_bwd(const Tensor& scores, const Tensor& topk_idx, const GroupedRouterOptions& o,
                            const Tensor& dtopk_w, Tensor& dlogits, CudaContext& ctx) {
  const char* op = "moe_router_grouped_bwd";
  need_cuda(op, "scores", scores);
  need_cuda(op, "topk_idx", topk_idx);
  need_cuda(op, "dtopk_w", dtopk_w);
  need_cuda(op, "dlogits", dlogits);
  need_dtype(op, "scores", scores, DType::F32);
  need_dtype(op, "topk_idx", topk_idx, DType::I32);
  need_dtype(op, "dtopk_w", dtopk_w, DType::F32);
  if (scores.ndim() != 2 || topk_idx.ndim() != 2) op_error(op, "expected scores [N, E] and topk_idx [N, k]");
  const int64_t n = scores.dim(0), E = scores.dim(1), k = topk_idx.dim(1);
  if (E < 1 || E > kMaxExperts) op_error(op, "E = " + std::to_string(E) + " must be in [1, 1024] on CUDA");
  if (topk_idx.dim(0) != n || dtopk_w.numel() != n * k || dlogits.numel() != n * E)
    op_error(op, describe("scores", scores) + ", " + describe("topk_idx", topk_idx) + ", " +
                     describe("dtopk_w", dtopk_w) + ", " + describe("dlogits", dlogits) + ": shapes disagree");
  if (n == 0) return;
  const size_t per_warp = bwd_smem_per_warp(static_cast<int>(E));
  const int warps = warps_for(per_warp);
  const unsigned grid = static_cast<unsigned>((n + warps - 1) / warps);
  AM_DISPATCH_BF16_F32(dlogits.dtype(), op, TD, {
    grouped_router_bwd_kernel<TD><<<grid, 32 * warps, per_warp * warps, ctx.stream()>>>(
        scores.data<float>(), topk_idx.data<int32_t>(), dtopk_w.data<float>(), n, static_cast<int>(E),
        static_cast<int>(k), o.sigmoid, o.norm_topk_prob, o.routed_scaling_factor, dlogits.data<TD>(),
        ctx.error_slot());
  });
  AM_CUDA_CHECK_LAUNCH();
}

}  // namespace am::cuda
