#ifdef AM_WITH_CUDA
#include "ops/ops_cuda.h"

namespace am::ops {

static Tensor workspace(size_t bytes) {
  return cuda::empty({static_cast<int64_t>((bytes + 3) / 4)}, DType::F32);
}

// The flash kernels cover head_dim 64 and 128 (every W1/W2 shape and most real models). Other head dims
// (the tiny golden models use 16 and 32) run the CPU reference on host copies: correct, slow, and only
// meant for small models.
// (A v head dim that differs from the q/k one, DeepSeek MLA, runs through the host fallback below.)
static bool flash_supports(const AttnParams& p) {
  return (p.head_dim == 64 || p.head_dim == 128) && p.dv() == p.head_dim;
}

static Tensor host_f32(const Tensor& t) {
  Tensor h = cuda::to_host(t);
  return h.dtype() == DType::F32 ? h : h.to(DType::F32);
}

static void store(Tensor& dev, const Tensor& host_f32) {
  Tensor h = dev.dtype() == DType::F32 ? host_f32 : host_f32.to(dev.dtype());
  Tensor d = cuda::to_device(h);
  cuda::copy_(dev, d);
}

static AttnParams host_params(const AttnParams& p, Tensor& seg_host) {
  AttnParams hp = p;
  if (p.segment_ids) {
    seg_host = cuda::to_host(*p.segment_ids);
    hp.segment_ids = &seg_host;
  }
  return hp;
}

void cuda_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const AttnParams& p, Tensor& out,
                        Tensor& lse) {
  if (!flash_supports(p)) {
    Tensor seg;
    AttnParams hp = host_params(p, seg);
    Tensor o = Tensor::empty(out.shape(), DType::F32), l = Tensor::empty(lse.shape(), DType::F32);
    attention_fwd(host_f32(q), host_f32(k), host_f32(v), hp, o, l);
    store(out, o);
    store(lse, l);
    return;
  }
  auto& ctx = cuda::default_context();
  size_t ws = cuda::attention_fwd_workspace_bytes(p);
  Tensor w = ws ? workspace(ws) : Tensor();
  cuda::attention_fwd(q, k, v, p, out, lse, ctx.stream(), ws ? w.raw() : nullptr, ws);
}

void cuda_attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                        const Tensor& dout, const AttnParams& p, Tensor& dq, Tensor& dk, Tensor& dv) {
  if (!flash_supports(p)) {
    Tensor seg;
    AttnParams hp = host_params(p, seg);
    Tensor a = Tensor::empty(dq.shape(), DType::F32), b = Tensor::empty(dk.shape(), DType::F32),
           c = Tensor::empty(dv.shape(), DType::F32);
    attention_bwd(host_f32(q), host_f32(k), host_f32(v), host_f32(out), host_f32(lse), host_f32(dout), hp, a, b, c);
    store(dq, a);
    store(dk, b);
    store(dv, c);
    return;
  }
  auto& ctx = cuda::default_context();
  size_t ws = cuda::attention_bwd_workspace_bytes(p);
  Tensor w = ws ? workspace(ws) : Tensor();
  cuda::attention_bwd(q, k, v, out, lse, dout, p, dq, dk, dv, ctx.stream(), ws ? w.raw() : nullptr, ws);
}

}  // namespace am::ops
#endif
