// Nemotron-H / Mamba2 ops on CUDA tensors: the same names and semantics as src/ops/mamba2_ops.h (the contract and
// the CPU reference), run on the context's stream with no host synchronisation.
//
// Dtypes: activations ("T" in mamba2_ops.h) bf16 or fp32, one dtype per call; weights ("W") bf16 or fp32; dt, A,
// D, rstd and parameter gradients fp32; segment ids int32 on the device. Math fp32, one rounding at each store.
// Shapes are checked by the front-ends (ops/mamba2_ops.cpp); these check devices, dtypes and their own limits
// (ShapeError naming the op): conv kernel K <= 8, scan head dim P <= 128 and state size S <= 256.
//
// The selective scan runs the chunked SSD algorithm (mamba2_ssd.cu: chunks of 64 tokens, intra-chunk products
// plus state passing between chunks). The plain sequential recurrence below stays as the second implementation:
// it runs when the forward is asked for the per-step states (tests), or for the whole process with
// AM_MAMBA_SCAN=sequential (or set_scan_algorithm), e.g. to compare the two.
//
// The sequential recurrence over T: one thread block per
// (batch row, head), one warp per head-dim row p (a warp takes up to 8 rows when P > 16), the S-vector of each
// row's state spread over the warp's lanes in registers. It is not the chunked SSD algorithm of mamba_ssm (no
// tensor cores); its time grows with T at ~ one dependent step per token. The backward never stores per-step
// states: pass 1 re-runs the forward recurrence and reduces dC_t = sum_p state_t[p] dy_t[p] and
// r_t = <dy_t, y_t - D x_t> on the way; pass 2 runs the adjoint recurrence backwards
// (g_t = exp(dt_{t+1} A) g_{t+1} + dy_t C_t^T) and gets the decay's gradient from the identity
//   dL/dlog a_t = <g_t, a_t state_{t-1}> = sum_{tau >= t} (r_tau - dt_tau <x_tau, g_tau B_tau>)
// (sums within the segment; 0 at a segment start, where a_t = 0 is not a function of dt), so no state_{t-1} is
// needed there. dB / dC of a group sum over its heads with fp32 atomics (one add per (b, t, head, s)).
#pragma once

#include "backend/cuda/context.h"
#include "core/tensor.h"

namespace am::cuda {

enum class ScanAlgorithm { Chunked, Sequential };
ScanAlgorithm scan_algorithm();  // AM_MAMBA_SCAN=sequential at start-up, else Chunked
void set_scan_algorithm(ScanAlgorithm a);

void mamba_conv1d_silu_fwd(const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor* seg, Tensor& pre, Tensor& y,
                           CudaContext& ctx = default_context());
void mamba_conv1d_silu_bwd(const Tensor& x, const Tensor& w, const Tensor& pre, const Tensor* seg, const Tensor& dy,
                           Tensor& dx, Tensor* dw, Tensor* dbias, CudaContext& ctx = default_context());

void mamba_ssm_scan_fwd(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                        const Tensor& D, const Tensor* seg, Tensor& y, Tensor* states, CudaContext& ctx = default_context());
// Recomputes the states (see above); dB / dC bf16 go through fp32 scratch from the context's allocator.
void mamba_ssm_scan_bwd(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& Bm, const Tensor& Cm,
                        const Tensor& D, const Tensor* seg, const Tensor& dy, Tensor& dx, Tensor& ddt, Tensor& dA,
                        Tensor& dB, Tensor& dC, Tensor& dD, CudaContext& ctx = default_context());

void gated_rmsnorm_fwd(const Tensor& y, const Tensor& z, const Tensor& w, int64_t group, float eps, Tensor& out,
                       Tensor& rstd, CudaContext& ctx = default_context());
void gated_rmsnorm_bwd(const Tensor& y, const Tensor& z, const Tensor& w, const Tensor& rstd, int64_t group,
                       const Tensor& dout, Tensor& dy, Tensor& dz, Tensor& dw, CudaContext& ctx = default_context());

void mamba_dt_fwd(const Tensor& dt_raw, const Tensor& dt_bias, float lo, float hi, Tensor& dt_in, Tensor& dt,
                  CudaContext& ctx = default_context());
void mamba_dt_bwd(const Tensor& dt_in, const Tensor& ddt, float lo, float hi, Tensor& ddt_raw, Tensor* ddt_bias,
                  CudaContext& ctx = default_context());
void mamba_a_log_fwd(const Tensor& A_log, Tensor& A, CudaContext& ctx = default_context());
void mamba_a_log_bwd(const Tensor& A, const Tensor& dA, Tensor& dA_log, CudaContext& ctx = default_context());

void relu2_fwd(const Tensor& x, Tensor& y, CudaContext& ctx = default_context());
void relu2_bwd(const Tensor& x, const Tensor& dy, Tensor& dx, CudaContext& ctx = default_context());

}  // namespace am::cuda
