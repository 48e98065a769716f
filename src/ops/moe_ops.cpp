// MoE op front-ends (contracts in moe_ops.h). As in ops.cpp, each op
//   1. checks that its tensors are defined and on one device, then the shapes and dtypes the contract fixes
//      for every backend (index tensors int32, router probabilities and weights fp32), throwing ShapeError /
//      DeviceError naming the op;
//   2. routes CUDA tensors to am::cuda (src/backend/cuda/moe*.cu, which checks activation dtypes itself);
//   3. on the host, requires fp32 activations (the reference computes in float32; router logits and dlogits
//      may also be bf16, converted), checks the index data (DataError) and runs src/backend/cpu/moe.cpp.
// Where moe_ops.h writes [N, X], any tensor whose last dimension is X is accepted and its leading dimensions
// are flattened into N.
#include "ops/moe_ops.h"

#include <climits>
#include <initializer_list>
#include <string>

#include "backend/cpu/cpu_ops.h"
#include "backend/cpu/moe_aux.h"
#include "core/error.h"
#include "ops/op_checks.h"
#ifdef AM_WITH_CUDA
#include "backend/cuda/moe.h"
#include "backend/cuda/moe_aux.h"
#endif
#define AM_MOE_ROUTE_CUDA(call) AM_OP_ROUTE_CUDA(call)

namespace am::ops {
namespace {

using detail::Arg;
using detail::describe;
using detail::device_of;
using detail::shape_error;

[[noreturn]] void data_error(const char* op, const std::string& msg) {
  throw DataError(std::string("op ") + op + ": " + msg);
}

void need_dtype(const char* op, const char* name, const Tensor& t, DType want, const char* why = nullptr) {
  if (t.dtype() != want)
    shape_error(op, describe(name, t) + ": expected " + dtype_name(want) + (why ? why : ""));
}
constexpr const char* kCpuF32 = " (the CPU reference computes in float32)";
void need_f32_cpu(const char* op, std::initializer_list<Arg> args) {
  for (const Arg& a : args)
    if (a.t) need_dtype(op, a.name, *a.t, DType::F32, kCpuF32);
}
void need_i32(const char* op, std::initializer_list<Arg> args) {
  for (const Arg& a : args)
    if (a.t) need_dtype(op, a.name, *a.t, DType::I32);
}
bool is_float(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }
void need_float(const char* op, const char* name, const Tensor& t) {
  if (!is_float(t.dtype())) shape_error(op, describe(name, t) + ": expected a float tensor");
}

// Rows of t read as [rows, last] (ndim >= 2, last dimension == last).
int64_t rows_of(const char* op, const char* name, const Tensor& t, int64_t last, const char* what) {
  if (t.ndim() < 2 || t.dim(-1) != last)
    shape_error(op, describe(name, t) + ": expected [N, " + what + " = " + std::to_string(last) + "]");
  return last > 0 ? t.numel() / last : 0;
}
void need_rows(const char* op, const char* name, const Tensor& t, int64_t rows, int64_t last, const char* what) {
  if (rows_of(op, name, t, last, what) != rows)
    shape_error(op, describe(name, t) + ": expected [" + std::to_string(rows) + ", " + what + " = " +
                        std::to_string(last) + "]");
}
void need_numel(const char* op, const char* name, const Tensor& t, int64_t n, const std::string& why) {
  if (t.numel() != n)
    shape_error(op, describe(name, t) + ": expected " + std::to_string(n) + " elements (" + why + ")");
}
void need_int_range(const char* op, const char* name, int64_t v) {
  if (v > INT_MAX) shape_error(op, std::string(name) + " = " + std::to_string(v) + " exceeds the int32 index range");
}

// ---- host data checks ----
// A permutation index tensor must hold values in [0, nk).
void check_perm(const char* op, const char* name, const Tensor& p, int64_t nk) {
  const int32_t* v = p.data<int32_t>();
  for (int64_t i = 0; i < p.numel(); ++i)
    if (v[i] < 0 || v[i] >= nk)
      data_error(op, std::string(name) + "[" + std::to_string(i) + "] = " + std::to_string(v[i]) +
                         " is outside [0, N*k = " + std::to_string(nk) + ")");
}
// offsets [E+1]: 0 = o[0] <= o[1] <= ... <= o[E] = rows; host_counts (if given) o[e+1] - o[e].
void check_offsets(const char* op, const Tensor& offsets, int64_t e, int64_t rows,
                   const std::vector<int64_t>* host_counts) {
  const int32_t* o = offsets.data<int32_t>();
  if (o[0] != 0) data_error(op, "offsets[0] = " + std::to_string(o[0]) + ", expected 0");
  for (int64_t j = 0; j < e; ++j)
    if (o[j + 1] < o[j])
      data_error(op, "offsets decrease at expert " + std::to_string(j) + " (" + std::to_string(o[j]) + " -> " +
                         std::to_string(o[j + 1]) + ")");
  if (o[e] != rows)
    data_error(op, "offsets[E] = " + std::to_string(o[e]) + " but x has " + std::to_string(rows) + " rows");
  if (host_counts)
    for (int64_t j = 0; j < e; ++j)
      if ((*host_counts)[static_cast<size_t>(j)] != o[j + 1] - o[j])
        data_error(op, "host_counts[" + std::to_string(j) + "] = " +
                           std::to_string((*host_counts)[static_cast<size_t>(j)]) + " but offsets give " +
                           std::to_string(o[j + 1] - o[j]));
}

Tensor as_f32(const Tensor& t) { return t.dtype() == DType::F32 ? t : t.to(DType::F32); }

// ---- shared shape checks ----
struct RouterDims {
  int64_t n, e, k;
};
RouterDims check_router(const char* op, const char* l_name, const Tensor& logits, const Tensor& probs,
                        const Tensor& topk_idx, const Tensor& topk_w) {
  need_float(op, l_name, logits);
  if (logits.ndim() < 2) shape_error(op, describe(l_name, logits) + ": expected [N, E]");
  const int64_t e = logits.dim(-1);
  if (e < 1) shape_error(op, describe(l_name, logits) + ": expected at least one expert");
  const int64_t n = logits.numel() / e;
  need_dtype(op, "probs", probs, DType::F32);
  need_rows(op, "probs", probs, n, e, "E");
  need_i32(op, {{"topk_idx", &topk_idx}});
  need_dtype(op, "topk_w", topk_w, DType::F32);
  if (topk_idx.ndim() < 2) shape_error(op, describe("topk_idx", topk_idx) + ": expected [N, k]");
  const int64_t k = topk_idx.dim(-1);
  need_rows(op, "topk_idx", topk_idx, n, k, "k");
  need_rows(op, "topk_w", topk_w, n, k, "k");
  return {n, e, k};
}

struct GroupDims {
  int64_t e, m, k, nout;
};
GroupDims check_grouped(const char* op, const Tensor& x, const Tensor& w, const Tensor& offsets, const char* y_name,
                        const Tensor& y, const std::vector<int64_t>* host_counts) {
  need_float(op, "x", x);
  need_float(op, "w", w);
  need_float(op, y_name, y);
  if (w.ndim() != 3) shape_error(op, describe("w", w) + ": expected [E, Nout, K]");
  const int64_t e = w.dim(0), nout = w.dim(1), k = w.dim(2);
  if (e < 1) shape_error(op, describe("w", w) + ": expected at least one expert");
  const int64_t m = rows_of(op, "x", x, k, "K");
  need_rows(op, y_name, y, m, nout, "Nout");
  need_i32(op, {{"offsets", &offsets}});
  need_numel(op, "offsets", offsets, e + 1, "E + 1 for " + describe("w", w));
  if (host_counts && static_cast<int64_t>(host_counts->size()) != e)
    shape_error(op, "host_counts has " + std::to_string(host_counts->size()) + " entries, expected E = " +
                        std::to_string(e));
  need_int_range(op, "M", m);
  need_int_range(op, "K", k);
  need_int_range(op, "Nout", nout);
  return {e, m, k, nout};
}

}  // namespace

// ---------------- router ----------------

void moe_router_fwd(const Tensor& logits, int64_t k, bool norm_topk_prob, Tensor& probs, Tensor& topk_idx,
                    Tensor& topk_w) {
  const char* op = "moe_router_fwd";
  DeviceType dev =
      device_of(op, {{"logits", &logits}, {"probs", &probs}, {"topk_idx", &topk_idx}, {"topk_w", &topk_w}});
  const RouterDims d = check_router(op, "logits", logits, probs, topk_idx, topk_w);
  if (k != d.k) shape_error(op, "k = " + std::to_string(k) + " but " + describe("topk_idx", topk_idx));
  if (k < 1 || k > d.e)
    shape_error(op, "k = " + std::to_string(k) + " must be in [1, E = " + std::to_string(d.e) + "]");
  AM_MOE_ROUTE_CUDA(cuda::moe_router_fwd(logits, k, norm_topk_prob, probs, topk_idx, topk_w));
  const Tensor l = as_f32(logits);
  cpu::moe_router_fwd(l.f32(), d.n, d.e, k, norm_topk_prob, probs.f32(), topk_idx.data<int32_t>(), topk_w.f32());
}

void moe_router_bwd(const Tensor& probs, const Tensor& topk_idx, const Tensor& topk_w, bool norm_topk_prob,
                    const Tensor& dtopk_w, const Tensor* dprobs_extra, Tensor& dlogits) {
  const char* op = "moe_router_bwd";
  DeviceType dev = device_of(op, {{"probs", &probs},
                                  {"topk_idx", &topk_idx},
                                  {"topk_w", &topk_w},
                                  {"dtopk_w", &dtopk_w},
                                  {"dprobs_extra", dprobs_extra},
                                  {"dlogits", &dlogits}});
  const RouterDims d = check_router(op, "dlogits", dlogits, probs, topk_idx, topk_w);
  if (d.k < 1 || d.k > d.e)
    shape_error(op, "k = " + std::to_string(d.k) + " must be in [1, E = " + std::to_string(d.e) + "]");
  need_dtype(op, "dtopk_w", dtopk_w, DType::F32);
  need_rows(op, "dtopk_w", dtopk_w, d.n, d.k, "k");
  if (dprobs_extra) {
    need_dtype(op, "dprobs_extra", *dprobs_extra, DType::F32);
    need_rows(op, "dprobs_extra", *dprobs_extra, d.n, d.e, "E");
  }
  AM_MOE_ROUTE_CUDA(
      cuda::moe_router_bwd(probs, topk_idx, topk_w, norm_topk_prob, dtopk_w, dprobs_extra, dlogits));
  const int64_t bad = cpu::moe_first_bad_expert(topk_idx.data<int32_t>(), d.n * d.k, d.e);
  if (bad >= 0)
    data_error(op, "topk_idx[" + std::to_string(bad) + "] = " + std::to_string(topk_idx.data<int32_t>()[bad]) +
                       " is outside [0, E = " + std::to_string(d.e) + ")");
  need_float(op, "dlogits", dlogits);
  if (dlogits.dtype() == DType::F32) {
    cpu::moe_router_bwd(probs.f32(), topk_idx.data<int32_t>(), topk_w.f32(), norm_topk_prob, dtopk_w.f32(),
                        dprobs_extra ? dprobs_extra->f32() : nullptr, d.n, d.e, d.k, dlogits.f32());
  } else {
    Tensor tmp = Tensor::empty(dlogits.shape(), DType::F32);
    cpu::moe_router_bwd(probs.f32(), topk_idx.data<int32_t>(), topk_w.f32(), norm_topk_prob, dtopk_w.f32(),
                        dprobs_extra ? dprobs_extra->f32() : nullptr, d.n, d.e, d.k, tmp.f32());
    dlogits.copy_from(tmp);
  }
}

// ---------------- routing statistics and the aux loss ----------------

void moe_routing_stats(const Tensor& topk_idx, const Tensor& probs, const Tensor& seg, Tensor* counts, Tensor* psum,
                       Tensor* counts2) {
  const char* op = "moe_routing_stats";
  DeviceType dev = device_of(op, {{"topk_idx", &topk_idx},
                                  {"probs", &probs},
                                  {"seg", &seg},
                                  {"counts", counts},
                                  {"psum", psum},
                                  {"counts2", counts2}});
  need_i32(op, {{"topk_idx", &topk_idx}, {"seg", &seg}, {"counts", counts}, {"counts2", counts2}});
  need_dtype(op, "probs", probs, DType::F32);
  if (psum) need_dtype(op, "psum", *psum, DType::F32);
  if (probs.ndim() < 2 || probs.dim(-1) < 1) shape_error(op, describe("probs", probs) + ": expected [N, E]");
  const int64_t e = probs.dim(-1), n = probs.numel() / e;
  if (topk_idx.ndim() < 2 || topk_idx.dim(-1) < 1) shape_error(op, describe("topk_idx", topk_idx) + ": expected [N, k]");
  const int64_t k = topk_idx.dim(-1);
  need_rows(op, "topk_idx", topk_idx, n, k, "k");
  need_numel(op, "seg", seg, n, "one per token of " + describe("probs", probs));
  for (const Arg& a : {Arg{"counts", counts}, Arg{"psum", psum}, Arg{"counts2", counts2}})
    if (a.t) need_numel(op, a.name, *a.t, e, "E for " + describe("probs", probs));
  need_int_range(op, "N*k", n * k);
  AM_MOE_ROUTE_CUDA(cuda::moe_routing_stats(topk_idx, probs, seg, counts, psum, counts2));
  cpu::moe_routing_stats(topk_idx.data<int32_t>(), probs.f32(), seg.data<int32_t>(), n, e, k,
                         counts ? counts->data<int32_t>() : nullptr, counts2 ? counts2->data<int32_t>() : nullptr,
                         psum ? psum->f32() : nullptr);
}

void moe_aux_loss(const Tensor& f, const Tensor& psum, const Tensor& seg, int64_t num_layers, float scale, Tensor& aux,
                  Tensor* dprobs) {
  const char* op = "moe_aux_loss";
  DeviceType dev =
      device_of(op, {{"f", &f}, {"psum", &psum}, {"seg", &seg}, {"aux", &aux}, {"dprobs", dprobs}});
  need_i32(op, {{"f", &f}, {"seg", &seg}});
  need_dtype(op, "psum", psum, DType::F32);
  need_dtype(op, "aux", aux, DType::F32);
  const int64_t e = f.numel(), n = seg.numel();
  if (e < 1) shape_error(op, describe("f", f) + ": expected [E] with at least one expert");
  need_numel(op, "psum", psum, e, "E for " + describe("f", f));
  need_numel(op, "aux", aux, 1, "the loss");
  if (num_layers < 1) shape_error(op, "num_layers = " + std::to_string(num_layers) + " must be >= 1");
  if (dprobs) {
    need_dtype(op, "dprobs", *dprobs, DType::F32);
    need_rows(op, "dprobs", *dprobs, n, e, "E");
  }
  AM_MOE_ROUTE_CUDA(cuda::moe_aux_loss(f, psum, seg, num_layers, scale, aux, dprobs));
  cpu::moe_aux_loss(f.data<int32_t>(), psum.f32(), seg.data<int32_t>(), n, e, num_layers, scale, aux.f32(),
                    dprobs ? dprobs->f32() : nullptr);
}

// ---------------- dispatch plan ----------------

void moe_dispatch_plan(const Tensor& topk_idx, int64_t num_experts, Tensor& offsets, Tensor& perm,
                       Tensor& inv_perm, std::vector<int64_t>* host_counts) {
  const char* op = "moe_dispatch_plan";
  DeviceType dev = device_of(
      op, {{"topk_idx", &topk_idx}, {"offsets", &offsets}, {"perm", &perm}, {"inv_perm", &inv_perm}});
  need_i32(op, {{"topk_idx", &topk_idx}, {"offsets", &offsets}, {"perm", &perm}, {"inv_perm", &inv_perm}});
  if (topk_idx.ndim() < 2) shape_error(op, describe("topk_idx", topk_idx) + ": expected [N, k]");
  if (num_experts < 1 || num_experts >= INT_MAX)
    shape_error(op, "num_experts = " + std::to_string(num_experts) + " must be in [1, INT_MAX)");
  const int64_t nk = topk_idx.numel();
  need_int_range(op, "N*k", nk);
  need_numel(op, "offsets", offsets, num_experts + 1, "num_experts + 1");
  need_numel(op, "perm", perm, nk, "N*k for " + describe("topk_idx", topk_idx));
  need_numel(op, "inv_perm", inv_perm, nk, "N*k for " + describe("topk_idx", topk_idx));
  AM_MOE_ROUTE_CUDA(cuda::moe_dispatch_plan(topk_idx, num_experts, offsets, perm, inv_perm, host_counts));
  const int32_t* idx = topk_idx.data<int32_t>();
  const int64_t bad = cpu::moe_first_bad_expert(idx, nk, num_experts);
  if (bad >= 0)
    data_error(op, "expert index " + std::to_string(idx[bad]) + " at position " + std::to_string(bad) +
                       " of topk_idx is outside [0, num_experts = " + std::to_string(num_experts) + ")");
  std::vector<int64_t> counts(static_cast<size_t>(num_experts));
  cpu::moe_dispatch_plan(idx, nk, num_experts, counts.data(), offsets.data<int32_t>(), perm.data<int32_t>(),
                         inv_perm.data<int32_t>());
  if (host_counts) *host_counts = std::move(counts);
}

bool moe_grouped_wants_host_counts(const Tensor& t) {
#ifdef AM_WITH_CUDA
  if (t.device() == DeviceType::CUDA) return !cuda::grouped_linear_persistent_default();
#endif
  (void)t;
  return true;
}

// ---------------- permutation ----------------

void moe_gather(const Tensor& x, const Tensor& perm, int64_t k, Tensor& xg) {
  const char* op = "moe_gather";
  DeviceType dev = device_of(op, {{"x", &x}, {"perm", &perm}, {"xg", &xg}});
  need_float(op, "x", x);
  need_float(op, "xg", xg);
  need_i32(op, {{"perm", &perm}});
  if (x.ndim() < 2) shape_error(op, describe("x", x) + ": expected [N, H]");
  if (k < 1) shape_error(op, "k = " + std::to_string(k) + " must be >= 1");
  const int64_t h = x.dim(-1), n = h ? x.numel() / h : 0;
  need_int_range(op, "N*k", n * k);
  need_numel(op, "perm", perm, n * k, "N*k");
  need_rows(op, "xg", xg, n * k, h, "H");
  AM_MOE_ROUTE_CUDA(cuda::moe_gather(x, perm, k, xg));
  need_f32_cpu(op, {{"x", &x}, {"xg", &xg}});
  check_perm(op, "perm", perm, n * k);
  cpu::moe_gather(x.f32(), perm.data<int32_t>(), n, k, h, xg.f32());
}

void moe_gather_bwd(const Tensor& dxg, const Tensor& inv_perm, int64_t k, Tensor& dx) {
  const char* op = "moe_gather_bwd";
  DeviceType dev = device_of(op, {{"dxg", &dxg}, {"inv_perm", &inv_perm}, {"dx", &dx}});
  need_float(op, "dxg", dxg);
  need_float(op, "dx", dx);
  need_i32(op, {{"inv_perm", &inv_perm}});
  if (dx.ndim() < 2) shape_error(op, describe("dx", dx) + ": expected [N, H]");
  if (k < 1) shape_error(op, "k = " + std::to_string(k) + " must be >= 1");
  const int64_t h = dx.dim(-1), n = h ? dx.numel() / h : 0;
  need_int_range(op, "N*k", n * k);
  need_numel(op, "inv_perm", inv_perm, n * k, "N*k");
  need_rows(op, "dxg", dxg, n * k, h, "H");
  AM_MOE_ROUTE_CUDA(cuda::moe_gather_bwd(dxg, inv_perm, k, dx));
  need_f32_cpu(op, {{"dxg", &dxg}, {"dx", &dx}});
  check_perm(op, "inv_perm", inv_perm, n * k);
  cpu::moe_gather_bwd(dxg.f32(), inv_perm.data<int32_t>(), n, k, h, dx.f32());
}

namespace {
struct CombineDims {
  int64_t n, k, h;
};
CombineDims check_combine(const char* op, const Tensor& yg, const Tensor& inv_perm, const Tensor& topk_w,
                          const char* y_name, const Tensor& y) {
  need_float(op, "yg", yg);
  need_float(op, y_name, y);
  need_i32(op, {{"inv_perm", &inv_perm}});
  need_dtype(op, "topk_w", topk_w, DType::F32);
  if (y.ndim() < 2) shape_error(op, describe(y_name, y) + ": expected [N, H]");
  const int64_t h = y.dim(-1), n = h ? y.numel() / h : 0;
  if (topk_w.ndim() < 2 || topk_w.dim(-1) < 1) shape_error(op, describe("topk_w", topk_w) + ": expected [N, k]");
  const int64_t k = topk_w.dim(-1);
  need_rows(op, "topk_w", topk_w, n, k, "k");
  need_int_range(op, "N*k", n * k);
  need_numel(op, "inv_perm", inv_perm, n * k, "N*k");
  need_rows(op, "yg", yg, n * k, h, "H");
  return {n, k, h};
}
}  // namespace

void moe_combine(const Tensor& yg, const Tensor& inv_perm, const Tensor& topk_w, Tensor& y) {
  const char* op = "moe_combine";
  DeviceType dev = device_of(op, {{"yg", &yg}, {"inv_perm", &inv_perm}, {"topk_w", &topk_w}, {"y", &y}});
  const CombineDims d = check_combine(op, yg, inv_perm, topk_w, "y", y);
  AM_MOE_ROUTE_CUDA(cuda::moe_combine(yg, inv_perm, topk_w, y));
  need_f32_cpu(op, {{"yg", &yg}, {"y", &y}});
  check_perm(op, "inv_perm", inv_perm, d.n * d.k);
  cpu::moe_combine(yg.f32(), inv_perm.data<int32_t>(), topk_w.f32(), d.n, d.k, d.h, y.f32());
}

void moe_combine_bwd(const Tensor& yg, const Tensor& inv_perm, const Tensor& topk_w, const Tensor& dy,
                     Tensor& dyg, Tensor& dtopk_w) {
  const char* op = "moe_combine_bwd";
  DeviceType dev = device_of(op, {{"yg", &yg},
                                  {"inv_perm", &inv_perm},
                                  {"topk_w", &topk_w},
                                  {"dy", &dy},
                                  {"dyg", &dyg},
                                  {"dtopk_w", &dtopk_w}});
  const CombineDims d = check_combine(op, yg, inv_perm, topk_w, "dy", dy);
  need_float(op, "dyg", dyg);
  need_rows(op, "dyg", dyg, d.n * d.k, d.h, "H");
  need_dtype(op, "dtopk_w", dtopk_w, DType::F32);
  need_rows(op, "dtopk_w", dtopk_w, d.n, d.k, "k");
  AM_MOE_ROUTE_CUDA(cuda::moe_combine_bwd(yg, inv_perm, topk_w, dy, dyg, dtopk_w));
  need_f32_cpu(op, {{"yg", &yg}, {"dy", &dy}, {"dyg", &dyg}});
  check_perm(op, "inv_perm", inv_perm, d.n * d.k);
  cpu::moe_combine_bwd(yg.f32(), inv_perm.data<int32_t>(), topk_w.f32(), dy.f32(), d.n, d.k, d.h, dyg.f32(),
                       dtopk_w.f32());
}

// ---------------- grouped linear ----------------

void grouped_linear_fwd(const Tensor& x, const Tensor& w, const Tensor& offsets, Tensor& y,
                        const std::vector<int64_t>* host_counts, const LinearOut& yo) {
  const char* op = "grouped_linear_fwd";
  DeviceType dev = device_of(op, {{"x", &x}, {"w", &w}, {"offsets", &offsets}, {"y", &y}});
  const GroupDims d = check_grouped(op, x, w, offsets, "y", y, host_counts);
  AM_MOE_ROUTE_CUDA(cuda::grouped_linear_fwd(x, w, offsets, y, host_counts, cuda::default_context(), {}, yo));
  need_f32_cpu(op, {{"x", &x}, {"w", &w}, {"y", &y}});
  check_offsets(op, offsets, d.e, d.m, host_counts);
  cpu::grouped_linear_fwd(x.f32(), w.f32(), offsets.data<int32_t>(), d.e, d.k, d.nout, y.f32(), yo);
}

void grouped_linear_bwd(const Tensor& x, const Tensor& w, const Tensor& offsets, const Tensor& dy, Tensor* dx,
                        Tensor& dw, const std::vector<int64_t>* host_counts, const LinearOut& dxo) {
  const char* op = "grouped_linear_bwd";
  const Tensor* dwp = dw.defined() ? &dw : nullptr;  // undefined: frozen experts, no dW GEMMs
  DeviceType dev = device_of(
      op, {{"x", &x}, {"w", &w}, {"offsets", &offsets}, {"dy", &dy}, {"dx", dx}, {"dw", dwp}});
  const GroupDims d = check_grouped(op, x, w, offsets, "dy", dy, host_counts);
  if (dx) {
    need_float(op, "dx", *dx);
    if (dx->shape() != x.shape()) shape_error(op, describe("dx", *dx) + ": expected the shape of " + describe("x", x));
  }
  if (dwp) {
    need_dtype(op, "dw", dw, DType::F32, " (parameter gradients are float32)");
    if (dw.shape() != w.shape())
      shape_error(op, describe("dw", dw) + ": expected the shape of " + describe("w", w));
  }
  AM_MOE_ROUTE_CUDA(
      cuda::grouped_linear_bwd(x, w, offsets, dy, dx, dw, host_counts, cuda::default_context(), {}, dxo));
  need_f32_cpu(op, {{"x", &x}, {"w", &w}, {"dy", &dy}, {"dx", dx}});
  check_offsets(op, offsets, d.e, d.m, host_counts);
  cpu::grouped_linear_bwd(x.f32(), w.f32(), offsets.data<int32_t>(), dy.f32(), d.e, d.k, d.nout,
                          dx ? dx->f32() : nullptr, dwp ? dw.f32() : nullptr, dxo);
}

// ---------------- SwiGLU on [gate | up] ----------------

namespace {
struct SwiDims {
  int64_t m, i;
};
SwiDims check_swiglu(const char* op, const Tensor& gu, const char* h_name, const Tensor& h) {
  need_float(op, "gu", gu);
  need_float(op, h_name, h);
  if (gu.ndim() < 2 || gu.dim(-1) % 2 != 0)
    shape_error(op, describe("gu", gu) + ": expected [M, 2I] (an even last dimension)");
  const int64_t i = gu.dim(-1) / 2, m = i ? gu.numel() / (2 * i) : 0;
  need_rows(op, h_name, h, m, i, "I");
  return {m, i};
}
}  // namespace

void swiglu_fused_fwd(const Tensor& gu, Tensor& h) {
  const char* op = "swiglu_fused_fwd";
  DeviceType dev = device_of(op, {{"gu", &gu}, {"h", &h}});
  const SwiDims d = check_swiglu(op, gu, "h", h);
  AM_MOE_ROUTE_CUDA(cuda::swiglu_fused_fwd(gu, h));
  need_f32_cpu(op, {{"gu", &gu}, {"h", &h}});
  cpu::swiglu_fused_fwd(gu.f32(), d.m, d.i, h.f32());
}

void swiglu_fused_bwd(const Tensor& gu, const Tensor& dh, Tensor& dgu) {
  const char* op = "swiglu_fused_bwd";
  DeviceType dev = device_of(op, {{"gu", &gu}, {"dh", &dh}, {"dgu", &dgu}});
  const SwiDims d = check_swiglu(op, gu, "dh", dh);
  need_float(op, "dgu", dgu);
  if (dgu.numel() != gu.numel() || dgu.dim(-1) != gu.dim(-1))
    shape_error(op, describe("dgu", dgu) + ": expected the shape of " + describe("gu", gu));
  AM_MOE_ROUTE_CUDA(cuda::swiglu_fused_bwd(gu, dh, dgu));
  need_f32_cpu(op, {{"gu", &gu}, {"dh", &dh}, {"dgu", &dgu}});
  cpu::swiglu_fused_bwd(gu.f32(), dh.f32(), d.m, d.i, dgu.f32());
}

}  // namespace am::ops
