// Mixture-of-Experts ops on CUDA tensors (the same names and semantics as src/ops/moe_ops.h; run on the
// context's stream; design and measurements in docs/moe_kernels.md).
//
// Dtypes: router logits bf16/fp32, probs / topk_w / dtopk_w / dprobs_extra fp32, dlogits bf16/fp32;
// index tensors int32; activations (x, xg, yg, y, gu, h and their gradients) bf16 or fp32 (one dtype per
// call); grouped-linear weights the dtype of x, dw fp32 (accumulated in the GEMM with beta = 1).
// Host synchronisation: only moe_dispatch_plan with host_counts (copies the E counts) and grouped_linear_*
// called without host_counts (reads the offsets back), except on the persistent path (below), which reads the
// offsets on the device and needs no host counts at all.
#pragma once
#include <cstdint>
#include <vector>

#include "backend/cuda/context.h"
#include "core/linear_out.h"
#include "core/tensor.h"

namespace am::cuda {

void moe_router_fwd(const Tensor& logits, int64_t k, bool norm_topk_prob, Tensor& probs, Tensor& topk_idx,
                    Tensor& topk_w, CudaContext& ctx = default_context());
void moe_router_bwd(const Tensor& probs, const Tensor& topk_idx, const Tensor& topk_w, bool norm_topk_prob,
                    const Tensor& dtopk_w, const Tensor* dprobs_extra, Tensor& dlogits,
                    CudaContext& ctx = default_context());
// Out-of-range expert ids: with host_counts, DataError here; without, the context's error slot (code
// kErrMoeExpert = 3, raised by ctx.check_device_errors()).
void moe_dispatch_plan(const Tensor& topk_idx, int64_t num_experts, Tensor& offsets, Tensor& perm, Tensor& inv_perm,
                       std::vector<int64_t>* host_counts, CudaContext& ctx = default_context());
void moe_gather(const Tensor& x, const Tensor& perm, int64_t k, Tensor& xg, CudaContext& ctx = default_context());
void moe_gather_bwd(const Tensor& dxg, const Tensor& inv_perm, int64_t k, Tensor& dx,
                    CudaContext& ctx = default_context());
void moe_combine(const Tensor& yg, const Tensor& inv_perm, const Tensor& topk_w, Tensor& y,
                 CudaContext& ctx = default_context());
void moe_combine_bwd(const Tensor& yg, const Tensor& inv_perm, const Tensor& topk_w, const Tensor& dy, Tensor& dyg,
                     Tensor& dtopk_w, CudaContext& ctx = default_context());
// Grouped linear. Grouped: one cublasGemmGroupedBatchedEx launch per product (one problem per expert with rows,
// empty experts left out, the device pointer arrays built on the device from the offsets by a one-warp kernel),
// where cuBLAS offers the dtype combination: it does not for bf16 A/B with an fp32 C (cuBLAS 13.1), so the dW
// product (fp32 +=) always runs per expert. PerExpert: one cuBLASLt GEMM per expert with rows (gemm.h).
// Padded: each expert's first Mpad rows copied into a zero-padded scratch [E, Mpad, *] from the caching allocator,
// one cublasGemmStridedBatchedEx over all E experts per product (dW: bf16 A/B, fp32 C, beta = 1 into dw), y / dx
// rows copied back; scratch freed at the end of the call. Mpad = pad_rows when set, else the largest count rounded
// up to 64 (to 8 below 64); rows beyond Mpad (the overflow) run as Auto's grouped / per-expert products.
// Auto: Padded (largest count) when E * Mpad <= 1.5 M (balanced routing: the padding wastes at most half the rows
// again); otherwise grouped for y and dx and per-expert for dW (the faster ones at the W2 shape,
// docs/moe_kernels.md). AM_MOE_GEMM_LOG=1 prints each call's routing statistics and choice (first 64 calls).
// Persistent: the persistent grouped GEMM of moe_grouped_gemm.h (one launch per product, tiles of all experts
// scheduled on the device from the offsets; host_counts ignored, no host sync), where it applies: bf16 x / w, K and
// Nout multiples of 8, 16-byte aligned tensors; elsewhere Auto. Auto itself takes the persistent path when the
// environment sets AM_MOE_GEMM=persistent (read at every call; opt-in, the default is unchanged).
// Without host_counts the offsets are read back (a sync), except on the persistent path. grouped_linear_bwd with dw
// undefined (frozen experts) runs no dW product (and pads no x); with neither dx nor dw it returns at once.
enum class GroupedGemm { Auto, Grouped, PerExpert, Padded, Persistent };
struct GroupedLinearOptions {
  GroupedGemm impl = GroupedGemm::Auto;
  int64_t pad_rows = 0;  // Padded only: rows per expert in the scratch (0: the largest count, rounded up)
};
// yo / dxo (core/linear_out.h): y = yo.alpha * x w[e]^T (+ y), dx = dxo.alpha * dy w[e] (+ dx), alpha and beta = 1
// in every path's GEMMs (Padded with accumulate also pads the old y / dx rows into the scratch that the strided GEMM
// reads as C, then copies them back as before).
void grouped_linear_fwd(const Tensor& x, const Tensor& w, const Tensor& offsets, Tensor& y,
                        const std::vector<int64_t>* host_counts, CudaContext& ctx = default_context(),
                        const GroupedLinearOptions& opt = {}, const LinearOut& yo = {});
void grouped_linear_bwd(const Tensor& x, const Tensor& w, const Tensor& offsets, const Tensor& dy, Tensor* dx,
                        Tensor& dw, const std::vector<int64_t>* host_counts, CudaContext& ctx = default_context(),
                        const GroupedLinearOptions& opt = {}, const LinearOut& dxo = {});
// AM_MOE_GEMM=persistent in the environment: Auto runs the persistent grouped GEMM, so callers need not fetch the
// host counts (moe_dispatch_plan with host_counts = nullptr keeps the whole dispatch free of host syncs).
bool grouped_linear_persistent_default();
void swiglu_fused_fwd(const Tensor& gu, Tensor& h, CudaContext& ctx = default_context());
void swiglu_fused_bwd(const Tensor& gu, const Tensor& dh, Tensor& dgu, CudaContext& ctx = default_context());

}  // namespace am::cuda
