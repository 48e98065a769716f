// Fused projections (docs/fused_projections.md): Linear weights that read the same input and lie
// back to back in memory (ParamStore::colocate: attention's q | k | v, the gated MLP's gate | up) run as ONE
// GEMM on a [sum of out, in] view of their working copies, and their backward as one dX GEMM and one dW GEMM
// into their likewise adjacent gradients. The parameters stay separate: HF names, shapes, checkpoint layout,
// optimizer state, LoRA targeting. Only the compute is fused.
//
// When a block can fuse is decided twice: once when the model is built (the kill switch below, the family:
// phi3 keeps its own fused tensors, the rest colocate at registration) and, cheaply, on every use, because
// what comes after the build can break the layout (LoRA pairs on a part, 4-bit bases, data-parallel buckets
// with a bias registered between two parts): stack_proj checks pointers and falls back to one GEMM per weight.
#pragma once
#include <initializer_list>

#include "core/tensor.h"
#include "models/params.h"

namespace am {

// Where the fused projections run, from AM_FUSED_PROJ (read once, at the first call):
//   Cuda ("1" or "cuda")          on CUDA tensors. The CPU keeps one GEMM per weight: OpenBLAS' sgemm rounds an
//                                 element differently depending on the matrix's other dimension (measured: 2% to
//                                 57% of the outputs, by shape, differ in the last bits between a [N, 192] and a
//                                 [N, 128] + [N, 64] product), and the CPU is the bit-exact reference whose HF
//                                 goldens and bit-equality tests (a zero LoRA branch leaves the base model's
//                                 logits, pure bf16 vs fp32 gradients) must not move.
//   All ("all")                   on every device (tests of the CPU path; comparisons).
//   Off (default; "0")            nowhere: models built afterwards colocate nothing either, and every block runs
//                                 one GEMM per weight as before (the speed comparison's baseline).
enum class FusedProjMode { Off, Cuda, All };
FusedProjMode fused_proj_mode();
bool fused_proj_enabled();  // mode != Off: build-time colocation
// Tests: overrides the environment (colocation for models built afterwards; stacking from the next use on).
void set_fused_proj_mode(FusedProjMode m);

// The stacked view of `weights` (each [out_i, in]) and of their biases (all null, or one per weight).
struct StackedProj {
  bool ok = false;  // false: the parts cannot run as one GEMM (use them one by one)
  Tensor w;         // [sum out, in] working copies
  Tensor dw;        // [sum out, in] gradients; undefined: every part frozen (no dW GEMM)
  Tensor b, db;     // [sum out] bias working copies / gradients; undefined: no bias / frozen bias
};
// ok when the mode allows the weights' device, no part has a LoRA pair or a 4-bit weight, and every working copy
// (bias working copy; with for_backward also every gradient and bias gradient, all defined or all undefined) is
// back to back with the previous part's in one dtype and device. Forward needs no gradients: under pure bf16 they
// are separate accumulators between backward passes, which must not turn the forward GEMM off.
StackedProj stack_proj(std::initializer_list<const Param*> weights, std::initializer_list<const Param*> biases,
                       bool for_backward);
// y [N, sum out] = x W^T (+ b) (assigned)
void stacked_fwd(const StackedProj& s, const Tensor& x, Tensor& y);
// dx [N, in] = dy W (assigned; nullptr: not needed); dW += dy^T x and db += column sums of dy when defined.
void stacked_bwd(const StackedProj& s, const Tensor& x, const Tensor& dy, Tensor* dx);

}  // namespace am
