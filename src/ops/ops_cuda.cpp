#ifdef AM_WITH_CUDA
#include "ops/ops_cuda.h"

#include "ops/device.h"

namespace am::ops {

static Tensor workspace(size_t bytes) {
  return cuda::empty({static_cast<int64_t>((bytes + 3) / 4)}, DType::F32);
}

// The flash kernels (tensor cores) cover bf16 with head_dim 64 and 128, Dv == D, no sinks and no
// soft-capping: every W1/W2 shape and most real models. Everything else (Gemma 3's 256, Phi-3's 96, DeepSeek
// MLA's 192 / 128, gpt_oss sinks, Gemma 2 soft-capping, fp32 tensors, the tiny golden models' 16 and 32)
// runs the generic CUDA-core kernels (attention_generic.h: any head dim up to 256 that is a multiple of 4;
// beyond that a DeviceError naming the limit) -- once they have run on a GPU. Until then (ops/device.h
// unverified_cuda_allowed) those shapes run the CPU reference on host copies: correct and slow.
static bool flash_supports(const AttnParams& p, const Tensor& q) {
  return (p.head_dim == 64 || p.head_dim == 128) && p.dv() == p.head_dim && !p.sinks && !(p.softcap > 0.f) &&
         q.dtype() == DType::BF16;
}

// ---- host fallback: the CPU reference on fp32 host copies ----
static Tensor host_f32(const Tensor& t) {
  Tensor h = cuda::to_host(t);
  return h.dtype() == DType::F32 ? h : h.to(DType::F32);
}
static void store(Tensor& dev, const Tensor& host_f32) {
  Tensor d = cuda::to_device(dev.dtype() == DType::F32 ? host_f32 : host_f32.to(dev.dtype()));
  cuda::copy_(dev, d);
}
// p with its device tensors (segment ids, sinks) replaced by host copies held in seg / sinks.
static AttnParams host_params(const AttnParams& p, Tensor& seg, Tensor& sinks) {
  AttnParams hp = p;
  if (p.segment_ids) {
    seg = cuda::to_host(*p.segment_ids);
    hp.segment_ids = &seg;
  }
  if (p.sinks) {
    sinks = host_f32(*p.sinks);
    hp.sinks = &sinks;
  }
  return hp;
}

void cuda_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const AttnParams& p, Tensor& out,
                        Tensor& lse) {
  auto& ctx = cuda::default_context();
  if (!flash_supports(p, q) && !unverified_cuda_allowed()) {
    Tensor seg, sinks;
    const AttnParams hp = host_params(p, seg, sinks);
    Tensor o = Tensor::empty(out.shape(), DType::F32), l = Tensor::empty(lse.shape(), DType::F32);
    attention_fwd(host_f32(q), host_f32(k), host_f32(v), hp, o, l);
    store(out, o);
    store(lse, l);
    return;
  }
  if (!flash_supports(p, q)) {
    cuda::attention_generic_fwd(q, k, v, p, out, lse, ctx.stream());
    return;
  }
  size_t ws = cuda::attention_fwd_workspace_bytes(p);
  Tensor w = ws ? workspace(ws) : Tensor();
  cuda::attention_fwd(q, k, v, p, out, lse, ctx.stream(), ws ? w.raw() : nullptr, ws);
}

void cuda_attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                        const Tensor& dout, const AttnParams& p, Tensor& dq, Tensor& dk, Tensor& dv,
                        Tensor* dsinks) {
  auto& ctx = cuda::default_context();
  if (!flash_supports(p, q) && !unverified_cuda_allowed()) {
    Tensor seg, sinks;
    const AttnParams hp = host_params(p, seg, sinks);
    Tensor a = Tensor::empty(dq.shape(), DType::F32), b = Tensor::empty(dk.shape(), DType::F32),
           c = Tensor::empty(dv.shape(), DType::F32);
    Tensor ds = dsinks && dsinks->defined() ? Tensor::zeros(dsinks->shape(), DType::F32) : Tensor();
    attention_bwd(host_f32(q), host_f32(k), host_f32(v), host_f32(out), host_f32(lse), host_f32(dout), hp, a, b, c,
                  ds.defined() ? &ds : nullptr);
    store(dq, a);
    store(dk, b);
    store(dv, c);
    if (ds.defined()) cuda::add_(*dsinks, cuda::to_device(ds));  // dsinks accumulates (ops.h)
    return;
  }
  if (!flash_supports(p, q)) {
    const size_t ws = cuda::attention_generic_bwd_workspace_bytes(p);
    Tensor w = ws ? workspace(ws) : Tensor();
    cuda::attention_generic_bwd(q, k, v, out, lse, dout, p, dq, dk, dv, dsinks, ctx.stream(),
                                ws ? w.raw() : nullptr, ws);
    return;
  }
  size_t ws = cuda::attention_bwd_workspace_bytes(p);
  Tensor w = ws ? workspace(ws) : Tensor();
  cuda::attention_bwd(q, k, v, out, lse, dout, p, dq, dk, dv, ctx.stream(), ws ? w.raw() : nullptr, ws);
}

}  // namespace am::ops
#endif
