// Linear layer through cuBLASLt (fp32 compute).
//
// Row-major [R, C] is column-major [C, R] (leading dimension C). With x [N, K], w [M, K], y [N, M]
// (row-major), the column-major matrices are x: K x N, w: K x M, y: M x N, and
//   forward   y(M x N)    = op_T(w)(M x K) * x(K x N)                      m=M n=N k=K  (bf16, beta 0 / 1)
//   dx        dx(K x N)   = w(K x M) * dy(M x N)                            m=K n=N k=M  (bf16, beta 0 / 1)
//   dw        dw(K x M)  += x(K x N) * op_T(dy)(N x M)                     m=K n=M k=N  (fp32, beta 1)
// (each left-hand side is the column-major view of the row-major result). The dw GEMM reads and writes
// the fp32 gradient directly with beta = 1: no temporary, no separate accumulate pass; an undefined dw (frozen
// weight) skips it. y and dx take LinearOut (core/linear_out.h): its alpha is the GEMM's alpha and accumulate is
// beta = 1 with C = D (the LoRA branch's y += and dx +=, its scale s, and the blocks' dx += of parallel
// projections, without separate scale / add kernels).
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/kernel_utils.cuh"

namespace am::cuda {
namespace {

// y [N, M] += bias [M]: only used when cuBLASLt has no bias epilogue for the dtype combination.
template <typename TY, typename TB>
__global__ void add_bias_kernel(TY* __restrict__ y, const TB* __restrict__ bias, int64_t n, int64_t m) {
  const int64_t total = n * m;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] = from_f<TY>(to_f(y[i]) + to_f(bias[i % m]));
}

// dbias [M] += sum over rows of dy [N, M]. Block (32, 8): x picks a column of a 32-column tile (coalesced
// 32-wide row segments), y strides the rows; a fixed-order shared-memory reduction over y keeps the
// result deterministic.
template <typename TD>
__global__ void bias_grad_kernel(const TD* __restrict__ dy, float* __restrict__ dbias, int64_t n, int64_t m) {
  __shared__ float part[8][33];
  const int64_t col = blockIdx.x * 32 + threadIdx.x;
  float acc = 0.f;
  if (col < m)
    for (int64_t r = threadIdx.y; r < n; r += 8) acc += to_f(dy[r * m + col]);
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < m) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) s += part[k][threadIdx.x];
    dbias[col] += s;
  }
}

struct LinDims {
  int64_t n, k, m;
};
LinDims check(const char* op, const Tensor& x, const Tensor& w, const char* y_name, const Tensor& y) {
  need_cuda(op, "x", x);
  need_cuda(op, "w", w);
  need_cuda(op, y_name, y);
  need_float(op, "x", x);
  need_float(op, "w", w);
  need_float(op, y_name, y);
  if (w.ndim() != 2) op_error(op, describe("w", w) + ": expected [M, K]");
  const int64_t m = w.dim(0), k = w.dim(1);
  if (x.ndim() < 2 || x.dim(-1) != k) op_error(op, describe("x", x) + ": expected [N, K = " + std::to_string(k) + "]");
  if (y.ndim() < 2 || y.dim(-1) != m)
    op_error(op, describe(y_name, y) + ": expected [N, M = " + std::to_string(m) + "]");
  const int64_t n = k ? x.numel() / k : 0;
  if (y.numel() != n * m) op_error(op, describe("x", x) + " and " + describe(y_name, y) + " have different row counts");
  if (x.dtype() != w.dtype())
    op_error(op, describe("x", x) + " and " + describe("w", w) + ": x and w must have the same dtype");
  return {n, k, m};
}

}  // namespace

void linear_fwd(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y, CudaContext& ctx) {
  linear_fwd(x, w, bias, y, LinearOut{}, ctx);
}

void linear_fwd(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y, const LinearOut& yo,
                CudaContext& ctx) {
  const char* op = "linear_fwd";
  const LinDims d = check(op, x, w, "y", y);
  if (bias) {
    need_cuda(op, "bias", *bias);
    need_float(op, "bias", *bias);
    if (!(bias->ndim() == 1 && bias->dim(0) == d.m))
      op_error(op, describe("bias", *bias) + ": expected [M = " + std::to_string(d.m) + "]");
  }
  GemmDesc g;
  g.trans_a = true;
  g.trans_b = false;
  g.m = d.m;
  g.n = d.n;
  g.k = d.k;
  g.a = w.raw();
  g.a_type = w.dtype();
  g.lda = d.k;
  g.b = x.raw();
  g.b_type = x.dtype();
  g.ldb = d.k;
  g.d = y.raw();
  g.d_type = y.dtype();
  g.ldd = d.m;
  g.alpha = yo.alpha;
  g.beta = yo.accumulate ? 1.f : 0.f;  // accumulate: C = D = y, read in place
  if (bias) {
    g.bias = bias->raw();
    g.bias_type = bias->dtype();
  }
  if (gemm(ctx, g)) return;
  // No fused epilogue for this combination: plain GEMM, then the bias pass.
  g.bias = nullptr;
  gemm(ctx, g);
  AM_DISPATCH_FLOAT(y.dtype(), op, TY, {
    AM_DISPATCH_FLOAT(bias->dtype(), op, TB, {
      add_bias_kernel<TY, TB><<<grid_for(d.n * d.m, 256, ctx.sm_count() * 8), 256, 0, ctx.stream()>>>(
          y.data<TY>(), bias->data<TB>(), d.n, d.m);
    });
  });
  AM_CUDA_CHECK_LAUNCH();
}

void linear_bwd(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor* dx, Tensor& dw, Tensor* dbias,
                CudaContext& ctx) {
  linear_bwd(x, w, dy, dx, dw, dbias, LinearOut{}, ctx);
}

void linear_bwd(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor* dx, Tensor& dw, Tensor* dbias,
                const LinearOut& dxo, CudaContext& ctx) {
  const char* op = "linear_bwd";
  const LinDims d = check(op, x, w, "dy", dy);
  const bool want_dw = dw.defined();  // undefined: frozen weight, no dW GEMM
  if (want_dw) {
    need_cuda(op, "dw", dw);
    need_dtype(op, "dw", dw, DType::F32);
    if (dw.shape() != w.shape()) op_error(op, describe("dw", dw) + ": expected the shape of " + describe("w", w));
  }
  if (dy.dtype() != x.dtype()) op_error(op, describe("dy", dy) + ": expected the dtype of " + describe("x", x));
  if (dx) {
    need_cuda(op, "dx", *dx);
    need_float(op, "dx", *dx);
    if (dx->numel() != x.numel()) op_error(op, describe("dx", *dx) + ": expected the shape of " + describe("x", x));
  }
  if (dbias) {
    need_cuda(op, "dbias", *dbias);
    need_dtype(op, "dbias", *dbias, DType::F32);
    if (!(dbias->ndim() == 1 && dbias->dim(0) == d.m))
      op_error(op, describe("dbias", *dbias) + ": expected [M = " + std::to_string(d.m) + "]");
  }
  if (dx) {
    GemmDesc g;
    g.m = d.k;
    g.n = d.n;
    g.k = d.m;
    g.a = w.raw();
    g.a_type = w.dtype();
    g.lda = d.k;
    g.b = dy.raw();
    g.b_type = dy.dtype();
    g.ldb = d.m;
    g.d = dx->raw();
    g.d_type = dx->dtype();
    g.ldd = d.k;
    g.alpha = dxo.alpha;
    g.beta = dxo.accumulate ? 1.f : 0.f;  // accumulate: C = D = dx, read in place
    gemm(ctx, g);
  }
  if (want_dw) {
    GemmDesc g;
    g.trans_b = true;
    g.m = d.k;
    g.n = d.m;
    g.k = d.n;
    g.a = x.raw();
    g.a_type = x.dtype();
    g.lda = d.k;
    g.b = dy.raw();
    g.b_type = dy.dtype();
    g.ldb = d.m;
    g.d = dw.raw();
    g.d_type = DType::F32;
    g.ldd = d.k;
    g.beta = 1.f;
    gemm(ctx, g);
  }
  if (dbias && d.n > 0 && d.m > 0) {
    AM_DISPATCH_FLOAT(dy.dtype(), op, TD, {
      bias_grad_kernel<TD><<<static_cast<unsigned>((d.m + 31) / 32), dim3(32, 8), 0, ctx.stream()>>>(
          dy.data<TD>(), dbias->data<float>(), d.n, d.m);
    });
    AM_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace am::cuda
