// Op front-ends (contracts in ops.h). Each op
//   1. validates its arguments (defined, dtype, shapes, one device) and throws ShapeError /
//      DataError / DeviceError naming the op and the offending shapes or values, before touching data;
//   2. hands the raw pointers to the backend through dispatch() below, the single place where a device
//      is mapped to a backend.
//
// Shapes: where ops.h writes [N, X], any tensor whose last dimension is X is accepted and its leading
// dimensions are flattened into N (so [B, T, H] activations need no view); the element counts must then
// agree. Attention checks the trailing [heads, D] of q/k/v and the exact lse shape.
//
// Extension beyond ops.h: rope accepts cos/sin [N, R/2] with R < D (partial rotary): only the first R
// features of each head rotate.
#include "ops/ops.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <initializer_list>
#include <string>
#include <utility>

#include "backend/cpu/cpu_ops.h"
#ifdef AM_WITH_CUDA
#include "ops/ops_cuda.h"
// CUDA tensors go to src/backend/cuda (which checks its own shapes and dtypes: bf16 activations, fp32
// master weights and gradients); everything below the route is the CPU reference path.
#endif
#define AM_ROUTE_CUDA(call) AM_OP_ROUTE_CUDA(call)
#include "core/error.h"
#include "ops/op_checks.h"

namespace am::ops {
namespace {

using detail::Arg;
using detail::describe;
using detail::device_of;
using detail::shape_error;

// ---- the dispatch point ----
// Every op ends here: CPU tensors run the reference kernels in src/backend/cpu. The CUDA backend plugs
// in at this one place: each op will pass its am::cuda:: call as a second callable, run under
// `#ifdef AM_WITH_CUDA` when dev == DeviceType::CUDA.
template <typename CpuFn>
auto dispatch(const char* op, DeviceType dev, CpuFn&& cpu_fn) {
  if (dev == DeviceType::CPU) return cpu_fn();
  throw DeviceError(std::string("op ") + op + ": CUDA backend not built");
}

bool is_float(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }

void need_dtype(const char* op, const char* name, const Tensor& t, DType want) {
  if (t.dtype() != want)
    shape_error(op, describe(name, t) + ": expected " + dtype_name(want) +
                        (want == DType::F32 ? " (the CPU reference computes in float32)" : ""));
}
void need_f32(const char* op, std::initializer_list<Arg> args) {
  for (const Arg& a : args)
    if (a.t) need_dtype(op, a.name, *a.t, DType::F32);
}

// Rows of `t` when read as [rows, last]: requires ndim >= 1 and last dimension == last (ndim >= 2
// unless the tensor is meant as a vector).
int64_t rows_of(const char* op, const char* name, const Tensor& t, int64_t last, const char* what) {
  if (t.ndim() < 2 || t.dim(-1) != last)
    shape_error(op, describe(name, t) + ": expected [N, " + what + " = " + std::to_string(last) + "]");
  return t.numel() / std::max<int64_t>(last, 1);
}

void need_numel(const char* op, const char* name, const Tensor& t, int64_t n, const std::string& why) {
  if (t.numel() != n)
    shape_error(op, describe(name, t) + ": expected " + std::to_string(n) + " elements (" + why + ")");
}

void need_shape(const char* op, const char* name, const Tensor& t, const Shape& s) {
  if (t.shape() != s) shape_error(op, describe(name, t) + ": expected shape " + shape_str(s));
}

void need_int_range(const char* op, std::initializer_list<std::pair<const char*, int64_t>> dims) {
  for (auto& [name, v] : dims)
    if (v > INT_MAX)
      shape_error(op, std::string(name) + " = " + std::to_string(v) + " exceeds the BLAS int range");
}

}  // namespace

// ---------------- elementwise ----------------

void add_(Tensor& a, const Tensor& b) {
  const char* op = "add_";
  DeviceType dev = device_of(op, {{"a", &a}, {"b", &b}});
  AM_ROUTE_CUDA(cuda::add_(a, b));
  if (!is_float(a.dtype()) || !is_float(b.dtype()))
    shape_error(op, describe("a", a) + ", " + describe("b", b) + ": expected float tensors");
  if (a.numel() != b.numel())
    shape_error(op, describe("a", a) + ", " + describe("b", b) + ": element counts differ");
  dispatch(op, dev, [&] { cpu::add(a.raw(), a.dtype(), b.raw(), b.dtype(), a.numel()); });
}

void scale_(Tensor& a, float s) {
  const char* op = "scale_";
  DeviceType dev = device_of(op, {{"a", &a}});
  AM_ROUTE_CUDA(cuda::scale_(a, s));
  if (!is_float(a.dtype())) shape_error(op, describe("a", a) + ": expected a float tensor");
  dispatch(op, dev, [&] { cpu::scale(a.raw(), a.dtype(), s, a.numel()); });
}

void add_scalar_(Tensor& a, float s) {
  const char* op = "add_scalar_";
  DeviceType dev = device_of(op, {{"a", &a}});
  AM_ROUTE_CUDA(cuda::add_scalar_(a, s));
  if (!is_float(a.dtype())) shape_error(op, describe("a", a) + ": expected a float tensor");
  dispatch(op, dev, [&] { cpu::add_scalar(a.raw(), a.dtype(), s, a.numel()); });
}

void copy_cols_(Tensor& dst, int64_t dst_col, const Tensor& src, int64_t src_col, int64_t n) {
  const char* op = "copy_cols_";
  DeviceType dev = device_of(op, {{"dst", &dst}, {"src", &src}});
  if (dst.ndim() != 2 || src.ndim() != 2 || dst.dim(0) != src.dim(0) || dst.dtype() != src.dtype())
    shape_error(op, describe("dst", dst) + ", " + describe("src", src) + ": expected 2-D tensors with the same rows and dtype");
  if (n < 0 || dst_col < 0 || src_col < 0 || dst_col + n > dst.dim(1) || src_col + n > src.dim(1))
    shape_error(op, "columns [" + std::to_string(src_col) + ", +" + std::to_string(n) + ") of " + describe("src", src) +
                        " to [" + std::to_string(dst_col) + ", +" + std::to_string(n) + ") of " + describe("dst", dst) +
                        ": out of range");
  const int64_t es = static_cast<int64_t>(dtype_size(dst.dtype()));
  char* d = static_cast<char*>(dst.raw()) + dst_col * es;
  const char* s = static_cast<const char*>(src.raw()) + src_col * es;
  AM_ROUTE_CUDA(cuda::copy_2d(d, dst.dim(1) * es, s, src.dim(1) * es, n * es, dst.dim(0)));
  dispatch(op, dev, [&] { cpu::copy_2d(d, dst.dim(1) * es, s, src.dim(1) * es, n * es, dst.dim(0)); });
}

void copy_(Tensor& dst, const Tensor& src) {
  const char* op = "copy_";
  DeviceType dev = device_of(op, {{"dst", &dst}, {"src", &src}});
  AM_ROUTE_CUDA(cuda::copy_(dst, src));
  if (dst.dtype() != src.dtype() && !(is_float(dst.dtype()) && is_float(src.dtype())))
    shape_error(op, describe("dst", dst) + ", " + describe("src", src) +
                        ": dtypes differ and are not both float (only float dtypes convert)");
  if (dst.numel() != src.numel())
    shape_error(op, describe("dst", dst) + ", " + describe("src", src) + ": element counts differ");
  dispatch(op, dev, [&] { cpu::copy(dst.raw(), dst.dtype(), src.raw(), src.dtype(), dst.numel()); });
}

void zero_(Tensor& a) {
  if (!a.defined()) return;
  const char* op = "zero_";
  DeviceType dev = device_of(op, {{"a", &a}});
  AM_ROUTE_CUDA(cuda::zero_(a));
  dispatch(op, dev, [&] { a.zero_(); });
}

void dropout_(Tensor& x, float p, uint64_t seed) {
  const char* op = "dropout_";
  DeviceType dev = device_of(op, {{"x", &x}});
  if (!(p >= 0.f && p < 1.f))
    throw UsageError(std::string("op ") + op + ": dropout probability p = " + std::to_string(p) +
                     " must be in [0, 1)");
  if (!is_float(x.dtype())) shape_error(op, describe("x", x) + ": expected a float tensor");
  if (p == 0.f || x.numel() == 0) return;
  AM_ROUTE_CUDA(cuda::dropout_(x, p, seed));
  const float scale = 1.0f / (1.0f - p);  // fp32, as the CUDA backend computes it
  dispatch(op, dev, [&] { cpu::dropout(x.raw(), x.dtype(), p, scale, seed, x.numel()); });
}

double sum_squares(const Tensor& a) {
  const char* op = "sum_squares";
  DeviceType dev = device_of(op, {{"a", &a}});
  AM_ROUTE_CUDA(cuda::sum_squares(a));
  if (!is_float(a.dtype())) shape_error(op, describe("a", a) + ": expected a float tensor");
  return dispatch(op, dev, [&] { return cpu::sum_squares(a.raw(), a.dtype(), a.numel()); });
}

// ---------------- embedding ----------------

namespace {
struct EmbDims {
  int64_t n, vocab, hidden;
};
EmbDims check_embedding(const char* op, const Tensor& ids, const Tensor& weight, const char* out_name,
                        const Tensor& out) {
  need_dtype(op, "ids", ids, DType::I32);
  need_f32(op, {{"weight", &weight}, {out_name, &out}});
  if (weight.ndim() != 2) shape_error(op, describe("weight", weight) + ": expected [V, H]");
  const int64_t n = ids.numel(), vocab = weight.dim(0), hidden = weight.dim(1);
  // out is [N, H] or ids.shape + [H].
  if (out.ndim() < 1 || out.dim(-1) != hidden || out.numel() != n * hidden)
    shape_error(op, describe(out_name, out) + ": expected [N = " + std::to_string(n) +
                        ", H = " + std::to_string(hidden) + "] for " + describe("ids", ids) + " and " +
                        describe("weight", weight));
  return {n, vocab, hidden};
}

void check_ids(const char* op, const Tensor& ids, int64_t vocab) {
  const int32_t* p = ids.data<int32_t>();
  const int64_t bad = cpu::first_out_of_range(p, ids.numel(), vocab);
  if (bad >= 0)
    throw DataError(std::string("op ") + op + ": token id " + std::to_string(p[bad]) + " at position " +
                    std::to_string(bad) + " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
}
}  // namespace

void embedding_fwd(const Tensor& ids, const Tensor& weight, Tensor& out) {
  const char* op = "embedding_fwd";
  DeviceType dev = device_of(op, {{"ids", &ids}, {"weight", &weight}, {"out", &out}});
  AM_ROUTE_CUDA(cuda::embedding_fwd(ids, weight, out));
  const EmbDims d = check_embedding(op, ids, weight, "out", out);
  dispatch(op, dev, [&] {
    check_ids(op, ids, d.vocab);
    cpu::embedding_fwd(ids.data<int32_t>(), d.n, weight.f32(), d.hidden, out.f32());
  });
}

void embedding_bwd(const Tensor& ids, const Tensor& dout, Tensor& dweight) {
  const char* op = "embedding_bwd";
  if (!dweight.defined()) {  // frozen embedding: nothing to compute; still check what was given
    device_of(op, {{"ids", &ids}, {"dout", &dout}});
    return;
  }
  DeviceType dev = device_of(op, {{"ids", &ids}, {"dout", &dout}, {"dweight", &dweight}});
  AM_ROUTE_CUDA(cuda::embedding_bwd(ids, dout, dweight));
  const EmbDims d = check_embedding(op, ids, dweight, "dout", dout);
  dispatch(op, dev, [&] {
    check_ids(op, ids, d.vocab);
    cpu::embedding_bwd(ids.data<int32_t>(), d.n, dout.f32(), d.hidden, dweight.f32());
  });
}

// ---------------- linear ----------------

namespace {
struct LinDims {
  int64_t n, k, m;
};
// bias_name/y_name: "bias"/"y" in the forward, "dbias"/"dy" in the backward.
LinDims check_linear(const char* op, const Tensor& x, const Tensor& w, const char* bias_name,
                     const Tensor* bias, const char* y_name, const Tensor& y) {
  need_f32(op, {{"x", &x}, {"w", &w}, {bias_name, bias}, {y_name, &y}});
  if (w.ndim() != 2) shape_error(op, describe("w", w) + ": expected [M, K]");
  const int64_t m = w.dim(0), k = w.dim(1);
  const int64_t n = rows_of(op, "x", x, k, "K");
  const int64_t ny = rows_of(op, y_name, y, m, "M");
  if (ny != n)
    shape_error(op, describe("x", x) + " and " + describe(y_name, y) + " have different row counts");
  if (bias && !(bias->ndim() == 1 && bias->dim(0) == m))
    shape_error(op, describe(bias_name, *bias) + ": expected [M = " + std::to_string(m) + "]");
  need_int_range(op, {{"N", n}, {"K", k}, {"M", m}});
  return {n, k, m};
}
}  // namespace

void linear_fwd(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y, const LinearOut& yo) {
  const char* op = "linear_fwd";
  DeviceType dev = device_of(op, {{"x", &x}, {"w", &w}, {"bias", bias}, {"y", &y}});
  AM_ROUTE_CUDA(cuda::linear_fwd(x, w, bias, y, yo));
  const LinDims d = check_linear(op, x, w, "bias", bias, "y", y);
  dispatch(op, dev, [&] {
    cpu::linear_fwd(x.f32(), w.f32(), bias ? bias->f32() : nullptr, y.f32(), d.n, d.k, d.m, yo);
  });
}

void linear_bwd(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor* dx, Tensor& dw, Tensor* dbias,
                const LinearOut& dxo) {
  const char* op = "linear_bwd";
  Tensor* dwp = dw.defined() ? &dw : nullptr;  // undefined: frozen weight, no dW GEMM
  DeviceType dev =
      device_of(op, {{"x", &x}, {"w", &w}, {"dy", &dy}, {"dx", dx}, {"dw", dwp}, {"dbias", dbias}});
  AM_ROUTE_CUDA(cuda::linear_bwd(x, w, dy, dx, dw, dbias, dxo));
  const LinDims d = check_linear(op, x, w, "dbias", dbias, "dy", dy);
  need_f32(op, {{"dx", dx}, {"dw", dwp}});
  if (dx && dx->shape() != x.shape())
    shape_error(op, describe("dx", *dx) + ": expected the shape of " + describe("x", x));
  if (dwp && dw.shape() != w.shape())
    shape_error(op, describe("dw", dw) + ": expected the shape of " + describe("w", w));
  dispatch(op, dev, [&] {
    cpu::linear_bwd(x.f32(), w.f32(), dy.f32(), dx ? dx->f32() : nullptr, dwp ? dw.f32() : nullptr,
                    dbias ? dbias->f32() : nullptr, d.n, d.k, d.m, dxo);
  });
}

// ---------------- RMSNorm ----------------

void rmsnorm_fwd(const Tensor& x, const Tensor& w, float eps, Tensor& y, Tensor& rstd) {
  const char* op = "rmsnorm_fwd";
  DeviceType dev = device_of(op, {{"x", &x}, {"w", &w}, {"y", &y}, {"rstd", &rstd}});
  AM_ROUTE_CUDA(cuda::rmsnorm_fwd(x, w, eps, y, rstd));
  need_f32(op, {{"x", &x}, {"w", &w}, {"y", &y}, {"rstd", &rstd}});
  if (w.ndim() != 1) shape_error(op, describe("w", w) + ": expected [H]");
  const int64_t h = w.dim(0);
  const int64_t n = rows_of(op, "x", x, h, "H");
  if (y.shape() != x.shape())
    shape_error(op, describe("y", y) + ": expected the shape of " + describe("x", x));
  need_numel(op, "rstd", rstd, n, "one per row of x");
  if (!(eps >= 0.f) || !std::isfinite(eps))
    shape_error(op, "eps = " + std::to_string(eps) + " must be finite and >= 0");
  dispatch(op, dev, [&] { cpu::rmsnorm_fwd(x.f32(), w.f32(), eps, y.f32(), rstd.f32(), n, h); });
}

void rmsnorm_bwd(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, Tensor& dx,
                 Tensor& dw) {
  const char* op = "rmsnorm_bwd";
  const Tensor* dwp = dw.defined() ? &dw : nullptr;  // undefined: frozen weight, no dw reduction
  DeviceType dev =
      device_of(op, {{"x", &x}, {"w", &w}, {"rstd", &rstd}, {"dy", &dy}, {"dx", &dx}, {"dw", dwp}});
  AM_ROUTE_CUDA(cuda::rmsnorm_bwd(x, w, rstd, dy, dx, dw));
  need_f32(op, {{"x", &x}, {"w", &w}, {"rstd", &rstd}, {"dy", &dy}, {"dx", &dx}, {"dw", dwp}});
  if (w.ndim() != 1) shape_error(op, describe("w", w) + ": expected [H]");
  const int64_t h = w.dim(0);
  const int64_t n = rows_of(op, "x", x, h, "H");
  if (dy.shape() != x.shape())
    shape_error(op, describe("dy", dy) + ": expected the shape of " + describe("x", x));
  if (dx.shape() != x.shape())
    shape_error(op, describe("dx", dx) + ": expected the shape of " + describe("x", x));
  if (dwp && dw.shape() != w.shape())
    shape_error(op, describe("dw", dw) + ": expected the shape of " + describe("w", w));
  need_numel(op, "rstd", rstd, n, "one per row of x");
  dispatch(op, dev, [&] {
    cpu::rmsnorm_bwd(x.f32(), w.f32(), rstd.f32(), dy.f32(), dx.f32(), dwp ? dw.f32() : nullptr, n, h);
  });
}

// ---------------- residual add + RMSNorm, fused ----------------

namespace {
bool overlaps(const Tensor& a, const Tensor& b) {
  const char *pa = static_cast<const char*>(a.raw()), *pb = static_cast<const char*>(b.raw());
  return pa < pb + b.nbytes() && pb < pa + a.nbytes();
}
}  // namespace

void add_rmsnorm_fwd(const Tensor& x, const Tensor& delta, const Tensor& w, float eps, Tensor& x_out, Tensor& y,
                     Tensor& rstd) {
  const char* op = "add_rmsnorm_fwd";
  DeviceType dev =
      device_of(op, {{"x", &x}, {"delta", &delta}, {"w", &w}, {"x_out", &x_out}, {"y", &y}, {"rstd", &rstd}});
  if (x_out.raw() != x.raw() && x.nbytes() > 0 && overlaps(x_out, x))
    shape_error(op, describe("x_out", x_out) + " overlaps " + describe("x", x) + " without being it");
  if (delta.nbytes() > 0 && overlaps(x_out, delta))
    shape_error(op, describe("x_out", x_out) + " overlaps " + describe("delta", delta));
  AM_ROUTE_CUDA(cuda::add_rmsnorm_fwd(x, delta, w, eps, x_out, y, rstd));
  need_f32(op, {{"x", &x}, {"w", &w}, {"x_out", &x_out}, {"y", &y}, {"rstd", &rstd}});
  if (!is_float(delta.dtype())) shape_error(op, describe("delta", delta) + ": expected a float tensor");
  if (w.ndim() != 1) shape_error(op, describe("w", w) + ": expected [H]");
  const int64_t h = w.dim(0);
  const int64_t n = rows_of(op, "x", x, h, "H");
  for (auto [name, t] : {std::pair<const char*, const Tensor*>{"delta", &delta}, {"x_out", &x_out}, {"y", &y}})
    if (t->shape() != x.shape()) shape_error(op, describe(name, *t) + ": expected the shape of " + describe("x", x));
  need_numel(op, "rstd", rstd, n, "one per row of x");
  if (!(eps >= 0.f) || !std::isfinite(eps))
    shape_error(op, "eps = " + std::to_string(eps) + " must be finite and >= 0");
  dispatch(op, dev, [&] {
    cpu::add_rmsnorm_fwd(x.f32(), delta.raw(), delta.dtype(), w.f32(), eps, x_out.f32(), y.f32(), rstd.f32(), n, h);
  });
}

void add_rmsnorm_bwd(const Tensor& x, const Tensor& w, const Tensor& rstd, const Tensor& dy, const Tensor& dres,
                     Tensor& dx, Tensor& dw) {
  const char* op = "add_rmsnorm_bwd";
  const Tensor* dwp = dw.defined() ? &dw : nullptr;  // undefined: frozen weight, no dw reduction
  DeviceType dev = device_of(
      op, {{"x", &x}, {"w", &w}, {"rstd", &rstd}, {"dy", &dy}, {"dres", &dres}, {"dx", &dx}, {"dw", dwp}});
  if (dres.nbytes() > 0 && overlaps(dx, dres))
    shape_error(op, describe("dx", dx) + " overlaps " + describe("dres", dres));
  AM_ROUTE_CUDA(cuda::add_rmsnorm_bwd(x, w, rstd, dy, dres, dx, dw));
  need_f32(op, {{"x", &x}, {"w", &w}, {"rstd", &rstd}, {"dy", &dy}, {"dres", &dres}, {"dx", &dx}, {"dw", dwp}});
  if (w.ndim() != 1) shape_error(op, describe("w", w) + ": expected [H]");
  const int64_t h = w.dim(0);
  const int64_t n = rows_of(op, "x", x, h, "H");
  for (auto [name, t] : {std::pair<const char*, const Tensor*>{"dy", &dy}, {"dres", &dres}, {"dx", &dx}})
    if (t->shape() != x.shape()) shape_error(op, describe(name, *t) + ": expected the shape of " + describe("x", x));
  if (dwp && dw.shape() != w.shape())
    shape_error(op, describe("dw", dw) + ": expected the shape of " + describe("w", w));
  need_numel(op, "rstd", rstd, n, "one per row of x");
  dispatch(op, dev, [&] {
    cpu::add_rmsnorm_bwd(x.f32(), w.f32(), rstd.f32(), dy.f32(), dres.f32(), dx.f32(), dwp ? dw.f32() : nullptr, n,
                         h);
  });
}

// ---------------- RoPE ----------------

namespace {
struct RopeDims {
  int64_t n, heads, d, half;
};
RopeDims check_rope(const char* op, const char* x_name, const Tensor& x, const Tensor& cos,
                    const Tensor& sin) {
  need_f32(op, {{x_name, &x}, {"cos", &cos}, {"sin", &sin}});
  if (x.ndim() < 3) shape_error(op, describe(x_name, x) + ": expected [N, heads, D]");
  const int64_t d = x.dim(-1), heads = x.dim(-2);
  const int64_t n = heads * d > 0 ? x.numel() / (heads * d) : 0;
  if (cos.ndim() < 1 || cos.shape() != sin.shape())
    shape_error(op,
                describe("cos", cos) + " and " + describe("sin", sin) + ": expected equal shapes [N, D/2]");
  const int64_t half = cos.dim(-1);
  if (2 * half > d || half == 0)
    shape_error(op, describe("cos", cos) + ": last dimension must be D/2 = " + std::to_string(d / 2) +
                        " (or less, for partial rotary) for " + describe(x_name, x));
  if (cos.numel() != n * half)
    shape_error(op, describe("cos", cos) + ": expected [N = " + std::to_string(n) + ", " +
                        std::to_string(half) + "], one row per token of " + describe(x_name, x));
  return {n, heads, d, half};
}
}  // namespace

void rope_fwd_(Tensor& x, const Tensor& cos, const Tensor& sin) {
  const char* op = "rope_fwd_";
  DeviceType dev = device_of(op, {{"x", &x}, {"cos", &cos}, {"sin", &sin}});
  AM_ROUTE_CUDA(cuda::rope_fwd_(x, cos, sin));
  const RopeDims d = check_rope(op, "x", x, cos, sin);
  dispatch(op, dev, [&] { cpu::rope_fwd(x.f32(), cos.f32(), sin.f32(), d.n, d.heads, d.d, d.half); });
}

void rope_bwd_(Tensor& dx, const Tensor& cos, const Tensor& sin) {
  const char* op = "rope_bwd_";
  DeviceType dev = device_of(op, {{"dx", &dx}, {"cos", &cos}, {"sin", &sin}});
  AM_ROUTE_CUDA(cuda::rope_bwd_(dx, cos, sin));
  const RopeDims d = check_rope(op, "dx", dx, cos, sin);
  dispatch(op, dev, [&] { cpu::rope_bwd(dx.f32(), cos.f32(), sin.f32(), d.n, d.heads, d.d, d.half); });
}

// ---------------- fused q/k/v projection output ----------------

namespace {
struct QkvDims {
  int64_t n, nh, nkv, d, half;
};
// packed [N, (nh + 2 nkv) D]; q [N, nh, D]; k, v [N, nkv, D]; cos / sin both or neither, [N, R/2] with R <= D.
QkvDims check_qkv_pack(const char* op, const char* pname, const Tensor& packed, const char* qn, const Tensor& q,
                       const char* kn, const Tensor& k, const char* vn, const Tensor& v, const Tensor* cos,
                       const Tensor* sin) {
  if (q.ndim() < 3 || k.ndim() < 3 || v.ndim() < 3)
    shape_error(op, describe(qn, q) + ", " + describe(kn, k) + ", " + describe(vn, v) + ": expected [N, heads, D]");
  const int64_t d = q.dim(-1), nh = q.dim(-2), nkv = k.dim(-2);
  const int64_t n = nh * d > 0 ? q.numel() / (nh * d) : 0;
  if (k.dim(-1) != d || v.dim(-1) != d || v.dim(-2) != nkv || k.numel() != n * nkv * d || v.numel() != k.numel())
    shape_error(op, describe(qn, q) + ", " + describe(kn, k) + ", " + describe(vn, v) +
                        ": expected q [N, nh, D], k and v [N, nkv, D] with one N and D");
  const int64_t w = (nh + 2 * nkv) * d;
  if (packed.ndim() < 2 || packed.dim(-1) != w || packed.numel() != n * w)
    shape_error(op, describe(pname, packed) + ": expected [N = " + std::to_string(n) + ", (nh + 2 nkv) D = " +
                        std::to_string(w) + "]");
  for (const Arg& a : {Arg{qn, &q}, Arg{kn, &k}, Arg{vn, &v}})
    if (a.t->dtype() != packed.dtype())
      shape_error(op, describe(a.name, *a.t) + ": expected the dtype of " + describe(pname, packed));
  if ((cos == nullptr) != (sin == nullptr)) shape_error(op, "cos and sin: give both or neither");
  int64_t half = 0;
  if (cos) {
    if (cos->ndim() < 1 || cos->shape() != sin->shape() || cos->dtype() != DType::F32 || sin->dtype() != DType::F32)
      shape_error(op, describe("cos", *cos) + " and " + describe("sin", *sin) + ": expected equal float32 [N, R/2]");
    half = cos->dim(-1);
    if (half == 0 || 2 * half > d || cos->numel() != n * half)
      shape_error(op, describe("cos", *cos) + ": expected [N = " + std::to_string(n) + ", R/2] with 0 < R <= D = " +
                          std::to_string(d));
  }
  return {n, nh, nkv, d, half};
}
}  // namespace

void qkv_split_rope(const Tensor& qkv, const Tensor* cos, const Tensor* sin, Tensor& q, Tensor& k, Tensor& v) {
  const char* op = "qkv_split_rope";
  DeviceType dev = device_of(op, {{"qkv", &qkv}, {"cos", cos}, {"sin", sin}, {"q", &q}, {"k", &k}, {"v", &v}});
  const QkvDims d = check_qkv_pack(op, "qkv", qkv, "q", q, "k", k, "v", v, cos, sin);
  AM_ROUTE_CUDA(cuda::qkv_split_rope(qkv, cos, sin, q, k, v));
  need_f32(op, {{"qkv", &qkv}, {"q", &q}, {"k", &k}, {"v", &v}});
  dispatch(op, dev, [&] {
    cpu::qkv_rope_pack(qkv.f32(), q.f32(), k.f32(), v.f32(), cos ? cos->f32() : nullptr,
                       sin ? sin->f32() : nullptr, d.n, d.nh, d.nkv, d.d, d.half, /*merge=*/false);
  });
}

void qkv_merge_rope_bwd(const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor* cos, const Tensor* sin,
                        Tensor& dqkv) {
  const char* op = "qkv_merge_rope_bwd";
  DeviceType dev = device_of(op, {{"dq", &dq}, {"dk", &dk}, {"dv", &dv}, {"cos", cos}, {"sin", sin}, {"dqkv", &dqkv}});
  const QkvDims d = check_qkv_pack(op, "dqkv", dqkv, "dq", dq, "dk", dk, "dv", dv, cos, sin);
  AM_ROUTE_CUDA(cuda::qkv_merge_rope_bwd(dq, dk, dv, cos, sin, dqkv));
  need_f32(op, {{"dq", &dq}, {"dk", &dk}, {"dv", &dv}, {"dqkv", &dqkv}});
  dispatch(op, dev, [&] {
    cpu::qkv_rope_pack(dqkv.f32(), dq.f32(), dk.f32(),
                       dv.f32(), cos ? cos->f32() : nullptr, sin ? sin->f32() : nullptr, d.n,
                       d.nh, d.nkv, d.d, d.half, /*merge=*/true);
  });
}

// ---------------- gated activations: SwiGLU, GeGLU ----------------

namespace {
void check_gated_fwd(const char* op, const Tensor& gate, const Tensor& up, const Tensor& h) {
  need_f32(op, {{"gate", &gate}, {"up", &up}, {"h", &h}});
  if (up.shape() != gate.shape() || h.shape() != gate.shape())
    shape_error(op, describe("gate", gate) + ", " + describe("up", up) + ", " + describe("h", h) +
                        ": expected equal shapes");
}
void check_gated_bwd(const char* op, const Tensor& gate, const Tensor& up, const Tensor& dh, const Tensor& dgate,
                     const Tensor& dup) {
  need_f32(op, {{"gate", &gate}, {"up", &up}, {"dh", &dh}, {"dgate", &dgate}, {"dup", &dup}});
  for (const Arg& a : {Arg{"up", &up}, Arg{"dh", &dh}, Arg{"dgate", &dgate}, Arg{"dup", &dup}})
    if (a.t->shape() != gate.shape())
      shape_error(op, describe(a.name, *a.t) + ": expected the shape of " + describe("gate", gate));
}
}  // namespace

void swiglu_fwd(const Tensor& gate, const Tensor& up, Tensor& h) {
  const char* op = "swiglu_fwd";
  DeviceType dev = device_of(op, {{"gate", &gate}, {"up", &up}, {"h", &h}});
  AM_ROUTE_CUDA(cuda::swiglu_fwd(gate, up, h));
  check_gated_fwd(op, gate, up, h);
  dispatch(op, dev, [&] { cpu::swiglu_fwd(gate.f32(), up.f32(), h.f32(), gate.numel()); });
}

void swiglu_bwd(const Tensor& gate, const Tensor& up, const Tensor& dh, Tensor& dgate, Tensor& dup) {
  const char* op = "swiglu_bwd";
  DeviceType dev =
      device_of(op, {{"gate", &gate}, {"up", &up}, {"dh", &dh}, {"dgate", &dgate}, {"dup", &dup}});
  AM_ROUTE_CUDA(cuda::swiglu_bwd(gate, up, dh, dgate, dup));
  check_gated_bwd(op, gate, up, dh, dgate, dup);
  dispatch(op, dev,
           [&] { cpu::swiglu_bwd(gate.f32(), up.f32(), dh.f32(), dgate.f32(), dup.f32(), gate.numel()); });
}

void softcap_(Tensor& x, float cap) {
  const char* op = "softcap_";
  DeviceType dev = device_of(op, {{"x", &x}});
  if (!(cap > 0.f) || !std::isfinite(cap)) shape_error(op, "cap = " + std::to_string(cap) + " must be positive");
  AM_ROUTE_CUDA(cuda::softcap_(x, cap));
  need_f32(op, {{"x", &x}});
  dispatch(op, dev, [&] { cpu::softcap(x.f32(), cap, x.numel()); });
}

void softcap_bwd_(const Tensor& y, Tensor& dy, float cap) {
  const char* op = "softcap_bwd_";
  DeviceType dev = device_of(op, {{"y", &y}, {"dy", &dy}});
  if (y.numel() != dy.numel()) shape_error(op, describe("y", y) + ", " + describe("dy", dy) + ": element counts differ");
  if (!(cap > 0.f) || !std::isfinite(cap)) shape_error(op, "cap = " + std::to_string(cap) + " must be positive");
  AM_ROUTE_CUDA(cuda::softcap_bwd_(y, dy, cap));
  need_f32(op, {{"y", &y}, {"dy", &dy}});
  dispatch(op, dev, [&] { cpu::softcap_bwd(y.f32(), dy.f32(), cap, y.numel()); });
}

void geglu_fwd(const Tensor& gate, const Tensor& up, Tensor& h) {
  const char* op = "geglu_fwd";
  DeviceType dev = device_of(op, {{"gate", &gate}, {"up", &up}, {"h", &h}});
  AM_ROUTE_CUDA(cuda::geglu_fwd(gate, up, h));
  check_gated_fwd(op, gate, up, h);
  dispatch(op, dev, [&] { cpu::geglu_fwd(gate.f32(), up.f32(), h.f32(), gate.numel()); });
}

void geglu_bwd(const Tensor& gate, const Tensor& up, const Tensor& dh, Tensor& dgate, Tensor& dup) {
  const char* op = "geglu_bwd";
  DeviceType dev =
      device_of(op, {{"gate", &gate}, {"up", &up}, {"dh", &dh}, {"dgate", &dgate}, {"dup", &dup}});
  AM_ROUTE_CUDA(cuda::geglu_bwd(gate, up, dh, dgate, dup));
  check_gated_bwd(op, gate, up, dh, dgate, dup);
  dispatch(op, dev,
           [&] { cpu::geglu_bwd(gate.f32(), up.f32(), dh.f32(), dgate.f32(), dup.f32(), gate.numel()); });
}

namespace {
// gu [M, 2I] -> (M, I), with `h_name` [M, I]
std::pair<int64_t, int64_t> check_gated_fused(const char* op, const Tensor& gu, const char* h_name, const Tensor& h) {
  if (gu.ndim() < 2 || gu.dim(-1) % 2 != 0)
    shape_error(op, describe("gu", gu) + ": expected [M, 2I] (an even last dimension)");
  const int64_t i = gu.dim(-1) / 2, m = i ? gu.numel() / (2 * i) : 0;
  if (h.ndim() < 2 || h.dim(-1) != i || h.numel() != m * i)
    shape_error(op, describe(h_name, h) + ": expected [M = " + std::to_string(m) + ", I = " + std::to_string(i) + "]");
  if (h.dtype() != gu.dtype()) shape_error(op, describe(h_name, h) + ": expected the dtype of " + describe("gu", gu));
  return {m, i};
}
}  // namespace

void geglu_fused_fwd(const Tensor& gu, Tensor& h) {
  const char* op = "geglu_fused_fwd";
  DeviceType dev = device_of(op, {{"gu", &gu}, {"h", &h}});
  const auto [m, i] = check_gated_fused(op, gu, "h", h);
  AM_ROUTE_CUDA(cuda::geglu_fused_fwd(gu, h));
  need_f32(op, {{"gu", &gu}, {"h", &h}});
  dispatch(op, dev, [&] { cpu::geglu_fused_fwd(gu.f32(), m, i, h.f32()); });
}

void geglu_fused_bwd(const Tensor& gu, const Tensor& dh, Tensor& dgu) {
  const char* op = "geglu_fused_bwd";
  DeviceType dev = device_of(op, {{"gu", &gu}, {"dh", &dh}, {"dgu", &dgu}});
  const auto [m, i] = check_gated_fused(op, gu, "dh", dh);
  if (dgu.shape() != gu.shape() || dgu.dtype() != gu.dtype())
    shape_error(op, describe("dgu", dgu) + ": expected the shape and dtype of " + describe("gu", gu));
  AM_ROUTE_CUDA(cuda::geglu_fused_bwd(gu, dh, dgu));
  need_f32(op, {{"gu", &gu}, {"dh", &dh}, {"dgu", &dgu}});
  dispatch(op, dev, [&] { cpu::geglu_fused_bwd(gu.f32(), dh.f32(), m, i, dgu.f32()); });
}

// ---------------- attention ----------------

namespace {
// Validates the parameters and a [B, T, heads, D] tensor (leading dims may be merged, e.g. [B*T, heads, D]).
// D is the q/k head dim, or p.dv() for v / out / dout / dv.
void check_attn_tensor(const char* op, const char* name, const Tensor& t, const AttnParams& p,
                       int64_t heads, int64_t D = 0) {
  if (D == 0) D = p.head_dim;
  if (t.ndim() < 3 || t.dim(-1) != D || t.dim(-2) != heads || t.numel() != p.batch * p.seq * heads * D)
    shape_error(op, describe(name, t) + ": expected [B = " + std::to_string(p.batch) +
                        ", T = " + std::to_string(p.seq) + ", heads = " + std::to_string(heads) +
                        ", D = " + std::to_string(D) + "]");
}

// CUDA attention tensors: q bf16 or fp32 (the flash kernels take bf16, the generic ones both) and the others
// in q's dtype.
void need_attn_float(const char* op, const Tensor& q, std::initializer_list<Arg> others) {
  if (q.dtype() != DType::BF16 && q.dtype() != DType::F32)
    shape_error(op, describe("q", q) + ": expected bfloat16 or float32");
  for (const Arg& a : others)
    if (a.t && a.t->dtype() != q.dtype())
      shape_error(op, describe(a.name, *a.t) + ": expected the dtype of " + describe("q", q));
}

// Shapes, parameters and dtypes of an attention call, on either device (the CUDA backend checks again what
// its kernels take: head dims, alignment). Returns the CPU kernel's dims.
cpu::AttnDims check_attention(const char* op, DeviceType dev, const AttnParams& p, const Tensor& q, const Tensor& k,
                              const Tensor& v, const Tensor& lse, const Tensor& out) {
  const std::string params = "B = " + std::to_string(p.batch) + ", T = " + std::to_string(p.seq) +
                             ", n_heads = " + std::to_string(p.n_heads) +
                             ", n_kv_heads = " + std::to_string(p.n_kv_heads) +
                             ", head_dim = " + std::to_string(p.head_dim);
  if (p.batch < 0 || p.seq < 0 || p.n_heads <= 0 || p.n_kv_heads <= 0 || p.head_dim <= 0 || p.v_head_dim < 0)
    shape_error(op, "bad attention parameters (" + params + ")");
  if (p.n_heads % p.n_kv_heads != 0)
    shape_error(op, "n_heads must be a multiple of n_kv_heads (" + params + ")");
  if (p.sliding_window < 0)
    shape_error(op, "sliding_window = " + std::to_string(p.sliding_window) + " must be >= 0");
  if (!std::isfinite(p.scale)) shape_error(op, "scale must be finite");
  if (dev == DeviceType::CPU) {
    need_f32(op, {{"q", &q}, {"k", &k}, {"v", &v}, {"out", &out}, {"lse", &lse}});
  } else {
    need_attn_float(op, q, {{"k", &k}, {"v", &v}, {"out", &out}});
    need_dtype(op, "lse", lse, DType::F32);
  }
  check_attn_tensor(op, "q", q, p, p.n_heads);
  check_attn_tensor(op, "k", k, p, p.n_kv_heads);
  check_attn_tensor(op, "v", v, p, p.n_kv_heads, p.dv());
  check_attn_tensor(op, "out", out, p, p.n_heads, p.dv());
  need_shape(op, "lse", lse, {p.batch, p.n_heads, p.seq});
  if (p.segment_ids) {
    need_dtype(op, "segment_ids", *p.segment_ids, DType::I32);
    need_shape(op, "segment_ids", *p.segment_ids, {p.batch, p.seq});
  }
  cpu::AttnDims d;
  d.batch = p.batch;
  d.seq = p.seq;
  d.n_heads = p.n_heads;
  d.n_kv_heads = p.n_kv_heads;
  d.head_dim = p.head_dim;
  d.v_head_dim = p.dv();
  d.scale = p.scale;
  d.sliding_window = p.sliding_window;
  return d;
}
// Sinks [nh] (and their gradient [nh] fp32, which needs the sinks) on the attention's device: fp32 on the host;
// fp32 or bf16 (the model's CUDA working copy) on CUDA.
void check_sinks(const char* op, DeviceType dev, const AttnParams& p, const Tensor* dsinks) {
  if (dsinks && dsinks->defined() && !p.sinks) shape_error(op, "dsinks given without p.sinks");
  if (p.sinks) {
    if (dev == DeviceType::CPU || p.sinks->dtype() != DType::BF16) need_f32(op, {{"sinks", p.sinks}});
    need_shape(op, "sinks", *p.sinks, {p.n_heads});
  }
  if (dsinks && dsinks->defined()) {
    need_f32(op, {{"dsinks", dsinks}});
    need_shape(op, "dsinks", *dsinks, {p.n_heads});
  }
}
}  // namespace

void attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const AttnParams& p, Tensor& out,
                   Tensor& lse) {
  const char* op = "attention_fwd";
  DeviceType dev = device_of(op, {{"q", &q},
                                  {"k", &k},
                                  {"v", &v},
                                  {"out", &out},
                                  {"lse", &lse},
                                  {"segment_ids", p.segment_ids},
                                  {"sinks", p.sinks}});
  cpu::AttnDims d = check_attention(op, dev, p, q, k, v, lse, out);
  check_sinks(op, dev, p, nullptr);
  AM_ROUTE_CUDA(cuda_attention_fwd(q, k, v, p, out, lse));
  dispatch(op, dev, [&] {
    d.segment_ids = p.segment_ids ? p.segment_ids->data<int32_t>() : nullptr;
    d.sinks = p.sinks ? p.sinks->f32() : nullptr;
    d.softcap = p.softcap;
    cpu::attention_fwd(q.f32(), k.f32(), v.f32(), d, out.f32(), lse.f32());
  });
}

void attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                   const Tensor& dout, const AttnParams& p, Tensor& dq, Tensor& dk, Tensor& dv, Tensor* dsinks) {
  const char* op = "attention_bwd";
  DeviceType dev = device_of(op, {{"q", &q},
                                  {"k", &k},
                                  {"v", &v},
                                  {"out", &out},
                                  {"lse", &lse},
                                  {"dout", &dout},
                                  {"dq", &dq},
                                  {"dk", &dk},
                                  {"dv", &dv},
                                  {"segment_ids", p.segment_ids},
                                  {"sinks", p.sinks},
                                  {"dsinks", dsinks && dsinks->defined() ? dsinks : nullptr}});
  cpu::AttnDims d = check_attention(op, dev, p, q, k, v, lse, out);
  check_sinks(op, dev, p, dsinks);
  if (dev == DeviceType::CPU)
    need_f32(op, {{"dout", &dout}, {"dq", &dq}, {"dk", &dk}, {"dv", &dv}});
  else
    need_attn_float(op, q, {{"dout", &dout}, {"dq", &dq}, {"dk", &dk}, {"dv", &dv}});
  check_attn_tensor(op, "dout", dout, p, p.n_heads, p.dv());
  check_attn_tensor(op, "dq", dq, p, p.n_heads);
  check_attn_tensor(op, "dk", dk, p, p.n_kv_heads);
  check_attn_tensor(op, "dv", dv, p, p.n_kv_heads, p.dv());
  AM_ROUTE_CUDA(cuda_attention_bwd(q, k, v, out, lse, dout, p, dq, dk, dv, dsinks));
  dispatch(op, dev, [&] {
    d.segment_ids = p.segment_ids ? p.segment_ids->data<int32_t>() : nullptr;
    d.sinks = p.sinks ? p.sinks->f32() : nullptr;
    d.softcap = p.softcap;
    cpu::attention_bwd(q.f32(), k.f32(), v.f32(), out.f32(), lse.f32(), dout.f32(), d, dq.f32(), dk.f32(),
                       dv.f32(), dsinks && dsinks->defined() ? dsinks->f32() : nullptr);
  });
}

// ---------------- cross-entropy ----------------

double cross_entropy_fwd_bwd(const Tensor& logits, const Tensor& targets, float grad_scale, Tensor* dlogits) {
  const char* op = "cross_entropy";
  DeviceType dev = device_of(op, {{"logits", &logits}, {"targets", &targets}, {"dlogits", dlogits}});
  AM_ROUTE_CUDA(cuda::cross_entropy_fwd_bwd(logits, targets, grad_scale, dlogits));
  need_f32(op, {{"logits", &logits}, {"dlogits", dlogits}});
  need_dtype(op, "targets", targets, DType::I32);
  if (logits.ndim() < 2) shape_error(op, describe("logits", logits) + ": expected [N, V]");
  const int64_t vocab = logits.dim(-1);
  const int64_t n = rows_of(op, "logits", logits, vocab, "V");
  need_numel(op, "targets", targets, n, "one per row of logits");
  if (dlogits && dlogits->shape() != logits.shape())
    shape_error(op, describe("dlogits", *dlogits) + ": expected the shape of " + describe("logits", logits));
  return dispatch(op, dev, [&] {
    const int32_t* t = targets.data<int32_t>();
    const int64_t bad = cpu::first_bad_target(t, n, vocab);
    if (bad >= 0)
      throw DataError(std::string("op ") + op + ": target " + std::to_string(t[bad]) + " at position " +
                      std::to_string(bad) + " is outside [0, " + std::to_string(vocab) +
                      ") and is not the ignore index -100");
    return cpu::cross_entropy(logits.f32(), t, n, vocab, grad_scale, dlogits ? dlogits->f32() : nullptr);
  });
}

}  // namespace am::ops
