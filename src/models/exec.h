// Where and in what precision a model computes. CPU: everything fp32 on the host (the reference).
// CUDA: activations and working weights bf16 on the device, master weights / grads / optimizer state fp32
// on the device (BENCH.md numerics). Model code allocates only through this, so one forward/backward
// implementation serves both backends.
#pragma once
#include "core/tensor.h"

namespace am {

struct ExecContext {
  DeviceType device = DeviceType::CPU;
  DType act_dtype = DType::F32;  // activations and working weights

  static ExecContext cpu() { return {}; }
  static ExecContext cuda_bf16() { return {DeviceType::CUDA, DType::BF16}; }
  bool on_cuda() const { return device == DeviceType::CUDA; }

  Tensor empty(const Shape& s) const { return empty(s, act_dtype); }
  Tensor empty(const Shape& s, DType dt) const;
  Tensor zeros(const Shape& s, DType dt) const;
  Tensor clone(const Tensor& t) const;             // same dtype, this device
  Tensor upload(const Tensor& host) const;         // host -> this device (same dtype); CPU: as is
  Tensor upload_as(const Tensor& host, DType dt) const;  // host -> this device, converted
  static Tensor download(const Tensor& t);         // -> host (same dtype)
  void synchronize() const;
};

}  // namespace am
