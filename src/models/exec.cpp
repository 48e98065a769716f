#include "models/exec.h"

#include "ops/device.h"
#include "ops/ops.h"

namespace am {

namespace {
DeviceType dev_of(const ExecContext& ex) { return ex.on_cuda() ? DeviceType::CUDA : DeviceType::CPU; }
}  // namespace

Tensor ExecContext::empty(const Shape& s, DType dt) const { return ops::empty_on(dev_of(*this), s, dt); }

Tensor ExecContext::zeros(const Shape& s, DType dt) const { return ops::zeros_on(dev_of(*this), s, dt); }

Tensor ExecContext::clone(const Tensor& t) const {
  Tensor c = empty(t.shape(), t.dtype());
  ops::copy_(c, t);
  return c;
}

Tensor ExecContext::upload(const Tensor& host) const {
  if (!on_cuda()) return host;
  return ops::to_cuda(host);
}

Tensor ExecContext::upload_as(const Tensor& host, DType dt) const {
  if (host.dtype() == dt) return upload(host);
  return upload(host.to(dt));
}

Tensor ExecContext::download(const Tensor& t) { return ops::to_host(t); }

void ExecContext::synchronize() const {
  if (on_cuda()) ops::synchronize_cuda();
}

}  // namespace am
