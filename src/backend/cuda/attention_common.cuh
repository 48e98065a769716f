// Device-side building blocks shared by attention_fwd.cu and attention_bwd.cu (included only by them).
//
// Tensor-core fragments (PTX ISA, mma.m16n8k16 with .bf16 inputs, fp32 accumulators). Lane l of a warp has
// g = l / 4 ("group", a row) and t = l % 4 (a column pair):
//   A (16 x 16, row-major)  a0 = A[g][2t..2t+1]  a1 = A[g+8][2t..]  a2 = A[g][2t+8..]  a3 = A[g+8][2t+8..]
//   B (16 x 8,  B[k][n])    b0 = B[2t..2t+1][g]  b1 = B[2t+8..2t+9][g]
//   C (16 x 8, fp32)        c0,c1 = C[g][2t..2t+1]  c2,c3 = C[g+8][2t..2t+1]
// Each 32-bit register holds two bf16, the lower column (or k) index in the low half. So the C fragments
// of two neighbouring 16x8 score tiles are exactly the A fragment of a 16x16 probability tile: the
// P @ V product needs no shuffles.
//
// ldmatrix .x4 loads four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i and every
// lane receives, per matrix, the pair M[g][2t..2t+1] (or with .trans the pair M[2t..2t+1][g]). Loading a
// row-major [rows][D] tile as A, as B = tile^T (non-trans) or as B = tile (trans) only changes which row
// each lane points at; the helpers below name the three cases.
//
// Shared-memory tiles are row-major with rows padded by 8 bf16 (16 bytes): eight lanes reading 16 bytes from
// eight consecutive rows then land in different bank quads (row pitch 144 or 272 bytes = 36 or 68 words).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/mma_sm80.cuh"

namespace am::cuda::attn {

using bf16 = __nv_bfloat16;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kSegGran = 32;  // rows per entry of the segment-range table (tiles are multiples of it)

// smem_addr, cp_async16 / 4, cp_async_commit / wait, ldsm_x4(_t), mma16816, pack_bf16: mma_sm80.cuh.
using namespace am::cuda::ptx;

// 2^x on the special-function unit; ex2.approx(-inf) = +0, which the masking relies on.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Gemma 2 soft-capping of one raw score x = q.k (before the scale): returns t = tanh(x * scale / cap), as
// 1 - 2 / (2^(x c2) + 1) with c2 = 2 scale log2(e) / cap (two special-function ops; absolute error ~1e-7, so
// cap * t stays accurate at Gemma 2's cap of 50, unlike tanh.approx's 2^-11 relative error). The capped score is
// cap * t: the kernels fold cap * log2(e) into their softmax multiplier (sl2), so t takes the raw score's place.
// Saturates to +-1 for |x c2| large (2^x = inf or 0); NaN stays NaN.
__device__ __forceinline__ float softcap_tanh(float x, float c2) {
  const float e = fast_exp2(x * c2);
  return 1.f - __fdividef(2.f, e + 1.f);
}

// End of one forward softmax row (both forward kernels' epilogue). In: m = the row's running max of the scaled
// scores in log2 units, lt = its normaliser sum_j 2^(x_j - m) (summed over the quad), sinks = the per-head sink
// logits [nh] (natural log; nullptr: none), h = the head. Out: inv, the factor that turns the accumulated O into
// out, and the row's lse (natural log). A row that saw no key (lt == 0) gets inv 0 and lse -inf, sink or not
// (the CPU reference: padding rows see nothing, not even the sink).
// The sink sk = sinks[h] * log2(e) is one more column without a value: with mf = max(m, sk) the normaliser
// becomes lf = lt 2^(m - mf) + 2^(sk - mf) and O's factor 2^(m - mf) / lf (taking the max keeps both exponents
// <= 0, so a sink far above the scores cannot overflow). Without sinks the expressions are exactly the ones the
// kernels had before sinks existed (same operations, same order: bit-identical results).
__device__ __forceinline__ void finish_row(float m, float lt, const float* __restrict__ sinks, int h, float& inv,
                                           float& lse) {
  if (sinks == nullptr) {
    inv = lt > 0.f ? 1.f / lt : 0.f;
    lse = lt > 0.f ? (m + log2f(lt)) * kLn2 : -INFINITY;
    return;
  }
  if (!(lt > 0.f)) {
    inv = 0.f;
    lse = -INFINITY;
    return;
  }
  const float sk = __ldg(sinks + h) * kLog2e;
  const float mf = fmaxf(m, sk);
  const float corr = exp2f(m - mf);  // accurate exp2: once per row, off the hot loop
  const float lf = lt * corr + exp2f(sk - mf);
  inv = corr / lf;
  lse = (mf + log2f(lf)) * kLn2;
}

// ---- ldmatrix row addresses for a row-major bf16 tile with pitch LD (elements) ----
// A operand = tile rows [r0, r0+16) x cols [c0, c0+16).
template <int LD>
__device__ __forceinline__ uint32_t lda_addr(const bf16* tile, int r0, int c0, int lane) {
  const int r = r0 + (lane & 7) + ((lane >> 3) & 1) * 8, c = c0 + (lane >> 4) * 8;
  return smem_addr(tile + r * LD + c);
}
// B = tile^T for two n-tiles: tile rows [n0, n0+16) are the n index, cols [k0, k0+16) the k index
// (non-trans ldmatrix). Gives {b0, b1} of n-tile n0 in r[0..1] and of n-tile n0+8 in r[2..3].
template <int LD>
__device__ __forceinline__ uint32_t ldbT_addr(const bf16* tile, int n0, int k0, int lane) {
  const int r = n0 + (lane & 7) + (lane >> 4) * 8, c = k0 + ((lane >> 3) & 1) * 8;
  return smem_addr(tile + r * LD + c);
}
// B = tile for two n-tiles: tile rows [k0, k0+16) are the k index, cols [n0, n0+16) the n index
// (.trans ldmatrix). Gives {b0, b1} of n-tile n0 in r[0..1] and of n-tile n0+8 in r[2..3].
template <int LD>
__device__ __forceinline__ uint32_t ldb_addr(const bf16* tile, int k0, int n0, int lane) {
  const int r = k0 + (lane & 7) + ((lane >> 3) & 1) * 8, c = n0 + (lane >> 4) * 8;
  return smem_addr(tile + r * LD + c);
}
// A = tile^T (.trans ldmatrix): tile rows [k0, k0+16) are the k index, cols [m0, m0+16) the m index.
template <int LD>
__device__ __forceinline__ uint32_t ldaT_addr(const bf16* tile, int k0, int m0, int lane) {
  const int r = k0 + (lane & 7) + (lane >> 4) * 8, c = m0 + ((lane >> 3) & 1) * 8;
  return smem_addr(tile + r * LD + c);
}

// Copies rows [row0, row0 + R) x D of a strided bf16 matrix into a padded shared tile (pitch LD), zero
// filling rows >= nrows. NT threads cooperate, 16 bytes per copy.
template <int R, int D, int LD, int NT>
__device__ __forceinline__ void load_tile_async(bf16* tile, const bf16* g, int64_t row_stride, int row0,
                                                int nrows, int tid) {
  constexpr int CPR = D / 8;  // 16-byte chunks per row
  static_assert((R * CPR) % NT == 0, "tile copy must split evenly over the threads");
#pragma unroll
  for (int it = 0; it < R * CPR / NT; ++it) {
    const int c = tid + it * NT;
    const int r = c / CPR, cc = c % CPR;
    const bool valid = row0 + r < nrows;
    const bf16* src = valid ? g + static_cast<int64_t>(row0 + r) * row_stride + cc * 8 : g;
    cp_async16(smem_addr(tile + r * LD + cc * 8), src, valid);
  }
}

// Segment-id range of rows [r0, r1) (r1 > r0) from the table built by seg_range_kernel: x = min, y = max
// over the non-negative ids; an all-padding span gives x > y.
__device__ __forceinline__ int2 seg_span(const int2* table, int r0, int r1) {
  int2 s = make_int2(0x7fffffff, -1);
  for (int e = r0 / kSegGran; e <= (r1 - 1) / kSegGran; ++e) {
    const int2 v = __ldg(table + e);
    s.x = min(s.x, v.x);
    s.y = max(s.y, v.y);
  }
  return s;
}
__device__ __forceinline__ bool spans_meet(int2 a, int2 b) { return a.x <= a.y && b.x <= b.y && a.x <= b.y && b.x <= a.y; }

}  // namespace am::cuda::attn
