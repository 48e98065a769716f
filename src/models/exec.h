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
  // The decoder's residual stream (embedding output, each layer's input / mid / output, the final norm's
  // input and their gradients). act_dtype (the default) or F32: with F32 under bf16 compute the model
  // follows HF's fp32-params + bf16-autocast numerics: the residual adds, RMSNorm's input and weight, and
  // the embedding lookup stay fp32; only matmul inputs (RMSNorm's output) are bf16. The factories below set
  // it to act_dtype unless asked (the recipe's model.backend.residual_dtype, src/train/trainer.cpp).
  DType residual_dtype = DType::F32;

  static ExecContext cpu() { return {}; }
  static ExecContext cuda_bf16(DType residual = DType::BF16) { return {DeviceType::CUDA, DType::BF16, residual}; }
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
