// DeepSeek MLA's column ops (models/blocks/mla.cpp): moving the rope dims of each head between the projections'
// wide rows and a narrow [R, w] block that RoPE rotates, on either device. Conventions as ops.h.
//
//   wide   [R, G, C] (or [R, C], G = 1): R rows of G blocks (heads) of C columns, e.g. q [N, nh*dq] viewed as
//          [N*nh, dq], the keys K [N, nh*dq] viewed as [N, nh, dq], kv_a's output [N, rkv + dr]
//   narrow [R, w] (any view whose last dimension is w and whose rows number R): the w rope dims in rotation order
//   perm(j) = interleave ? (j < w/2 ? 2j : 2(j - w/2) + 1) : j     (HF rope_interleave: [x0, x2, .., x1, x3, ..])
//
// The two ops are each other's transpose:
//   mla_gather_cols:  narrow[r, j] = sum_g wide[r, g, col + perm(j)]       (assigned)
//       G = 1: the rope dims of a head, permuted;  G > 1: the gradient of k_pe, summed over the heads it feeds.
//       The sum is fp32 in increasing g (one rounding at the store), starting from head 0: G = 1 copies exactly.
//   mla_scatter_cols: wide[r, g, col + perm(j)] = narrow[r, j] for every g  (assigned; other columns untouched)
//       G = 1: the rope dims' gradient back to their stored columns;  G > 1: k_pe broadcast to every head.
// Requirements: col >= 0, col + w <= C, w even when interleave; wide and narrow of one dtype and device.
// Dtypes: CPU float32 (backend/cpu/mla_cols.cpp, the reference); CUDA any float dtype (backend/cuda/mla_cols.cu,
// fp32 math, bit-identical to the reference in fp32).
#pragma once
#include <cstdint>

#include "core/tensor.h"

namespace am::ops {

void mla_gather_cols(const Tensor& wide, int64_t col, bool interleave, Tensor& narrow);
void mla_scatter_cols(const Tensor& narrow, bool interleave, Tensor& wide, int64_t col);

}  // namespace am::ops
