#include "models/exec.h"

#include "core/error.h"
#include "ops/ops.h"
#ifdef AM_WITH_CUDA
#include "backend/cuda/cuda_ops.h"
#endif

namespace am {

#ifdef AM_WITH_CUDA
#define AM_CUDA_ONLY(expr) return expr
#else
#define AM_CUDA_ONLY(expr) throw DeviceError("this build has no CUDA backend")
#endif

Tensor ExecContext::empty(const Shape& s, DType dt) const {
  if (!on_cuda()) return Tensor::empty(s, dt);
  AM_CUDA_ONLY(cuda::empty(s, dt));
}

Tensor ExecContext::zeros(const Shape& s, DType dt) const {
  if (!on_cuda()) return Tensor::zeros(s, dt);
#ifdef AM_WITH_CUDA
  Tensor t = cuda::empty(s, dt);
  cuda::zero_(t);
  return t;
#else
  throw DeviceError("this build has no CUDA backend");
#endif
}

Tensor ExecContext::clone(const Tensor& t) const {
  Tensor c = empty(t.shape(), t.dtype());
  ops::copy_(c, t);
  return c;
}

Tensor ExecContext::upload(const Tensor& host) const {
  if (!on_cuda()) return host;
  AM_CUDA_ONLY(cuda::to_device(host));
}

Tensor ExecContext::upload_as(const Tensor& host, DType dt) const {
  if (host.dtype() == dt) return upload(host);
  return upload(host.to(dt));
}

Tensor ExecContext::download(const Tensor& t) {
  if (t.device() == DeviceType::CPU) return t;
  AM_CUDA_ONLY(cuda::to_host(t));
}

void ExecContext::synchronize() const {
#ifdef AM_WITH_CUDA
  if (on_cuda()) cuda::default_context().synchronize();
#endif
}

}  // namespace am
