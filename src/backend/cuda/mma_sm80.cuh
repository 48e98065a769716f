// Warp-level tensor-core and async-copy primitives of sm_80+ (PTX inline assembly), shared by the kernels that run
// their own mma.sync main loops: the flash attention kernels (attention_common.cuh) and the persistent grouped MoE
// GEMM (moe_grouped_gemm.cu).
//
// Fragments of mma.m16n8k16 with .bf16 inputs and fp32 accumulators (lane l of a warp: g = l / 4, t = l % 4):
//   A (16 x 16, row-major)  a0 = A[g][2t..2t+1]  a1 = A[g+8][2t..]  a2 = A[g][2t+8..]  a3 = A[g+8][2t+8..]
//   B (16 x 8,  B[k][n])    b0 = B[2t..2t+1][g]  b1 = B[2t+8..2t+9][g]
//   C (16 x 8, fp32)        c0,c1 = C[g][2t..2t+1]  c2,c3 = C[g+8][2t..2t+1]
// Each 32-bit register holds two bf16, the lower column (or k) index in the low half.
//
// None of the asm statements has a "memory" clobber: the callers order shared-memory reuse with __syncthreads()
// after cp_async_wait, which is also a compiler barrier. (The attention kernels' machine code was tuned without
// clobbers; the MoE kernel had them and dropped them when it moved here.)
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace am::cuda::ptx {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1; src_bytes = 0 writes zeros (rows past T).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
// 4-byte variant (per-row fp32 statistics, whose rows need not be 16-byte aligned).
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a * b  (16x8x16, bf16 inputs, fp32 accumulate)
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo sits in the low 16 bits
  return *reinterpret_cast<uint32_t*>(&v);
}

}  // namespace am::cuda::ptx
