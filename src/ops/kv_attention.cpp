// Front-end of ops::attention_kv_fwd (contract in kv_attention.h): checks, then the CPU reference
// (src/backend/cpu/kv_attention.cpp) or the CUDA kernel (src/backend/cuda/kv_attention.cu).
#include "ops/kv_attention.h"

#include <cmath>
#include <string>

#include "backend/cpu/kv_attention.h"
#include "core/error.h"
#include "ops/op_checks.h"
#ifdef AM_WITH_CUDA
#include "backend/cuda/kv_attention.h"
#endif

namespace am::ops {

namespace {
using detail::describe;
using detail::shape_error;

void need_4d(const char* op, const char* name, const Tensor& t, int64_t B, int64_t T, int64_t heads, int64_t D) {
  if (t.ndim() != 4 || t.dim(0) != B || t.dim(1) != T || t.dim(2) != heads || t.dim(3) != D)
    shape_error(op, describe(name, t) + ": expected [B = " + std::to_string(B) + ", T = " + std::to_string(T) +
                        ", heads = " + std::to_string(heads) + ", D = " + std::to_string(D) + "]");
}
}  // namespace

void attention_kv_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const AttnParams& p, Tensor& out) {
  const char* op = "attention_kv_fwd";
  const DeviceType dev = detail::device_of(op, {{"q", &q}, {"k", &k}, {"v", &v}, {"out", &out}});
  if (p.batch < 0 || p.seq < 0 || p.n_heads <= 0 || p.n_kv_heads <= 0 || p.head_dim <= 0 ||
      p.n_heads % p.n_kv_heads != 0)
    shape_error(op, "bad attention parameters (B = " + std::to_string(p.batch) + ", Tq = " + std::to_string(p.seq) +
                        ", n_heads = " + std::to_string(p.n_heads) + ", n_kv_heads = " +
                        std::to_string(p.n_kv_heads) + ", head_dim = " + std::to_string(p.head_dim) + ")");
  if (p.sliding_window < 0) shape_error(op, "sliding_window must be >= 0");
  if (!std::isfinite(p.scale)) shape_error(op, "scale must be finite");
  if (p.segment_ids) shape_error(op, "segment ids are not supported (one sequence per batch row)");
  if (k.ndim() != 4) shape_error(op, describe("k", k) + ": expected [B, Tk, nkv, D]");
  const int64_t Tk = k.dim(1);
  if (Tk < p.seq)
    shape_error(op, describe("k", k) + ": the cache holds fewer keys (" + std::to_string(Tk) + ") than there are queries (" +
                        std::to_string(p.seq) + ")");
  need_4d(op, "q", q, p.batch, p.seq, p.n_heads, p.head_dim);
  need_4d(op, "k", k, p.batch, Tk, p.n_kv_heads, p.head_dim);
  need_4d(op, "v", v, p.batch, Tk, p.n_kv_heads, p.dv());
  need_4d(op, "out", out, p.batch, p.seq, p.n_heads, p.dv());
  for (const Tensor* t : {&k, &v, static_cast<const Tensor*>(&out)})
    if (t->dtype() != q.dtype())
      shape_error(op, describe("q", q) + ", " + describe("k", k) + ", " + describe("v", v) + ", " +
                          describe("out", out) + ": expected one dtype");
  // Sinks [nh] on the attention's device: fp32 on the host; fp32 or bf16 (the model's working copy) on CUDA.
  if (p.sinks) {
    const bool dtype_ok = p.sinks->defined() && (p.sinks->dtype() == DType::F32 ||
                                                  (dev == DeviceType::CUDA && p.sinks->dtype() == DType::BF16));
    if (!dtype_ok || p.sinks->numel() != p.n_heads)
      shape_error(op, "sinks: expected [n_heads = " + std::to_string(p.n_heads) + "] float32" +
                          (dev == DeviceType::CUDA ? " or bfloat16" : ""));
    if (p.sinks->device() != dev)
      throw DeviceError(std::string("op ") + op + ": sinks must live on the device of q");
  }
  if (dev == DeviceType::CUDA) {
#ifdef AM_WITH_CUDA
    cuda::attention_kv_fwd(q, k, v, p, out);
    return;
#else
    throw DeviceError(std::string("op ") + op + ": CUDA tensor given but the CUDA backend is not built");
#endif
  }
  if (q.dtype() != DType::F32)
    shape_error(op, describe("q", q) + ": expected float32 (the CPU reference computes in float32)");
  cpu::KvAttnDims d;
  d.batch = p.batch;
  d.q_len = p.seq;
  d.kv_len = Tk;
  d.n_heads = p.n_heads;
  d.n_kv_heads = p.n_kv_heads;
  d.head_dim = p.head_dim;
  d.v_head_dim = p.dv();
  d.scale = p.scale;
  d.sliding_window = p.sliding_window;
  d.sinks = p.sinks ? p.sinks->f32() : nullptr;
  d.softcap = p.softcap;
  cpu::attention_kv_fwd(q.f32(), k.f32(), v.f32(), d, out.f32());
}

}  // namespace am::ops
