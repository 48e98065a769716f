// The tensors and hyper-parameters of one fused AdamW / Adam step over many parameters, shared by the op front
// door (ops/device.h) and the CUDA backend (backend/cuda/cuda_ops.h adamw_step), so neither includes the other.
// The arithmetic is torch.optim.AdamW's, as src/train/optimizer.cpp does it on the host.
#pragma once
#include <cstdint>

#include "core/tensor.h"

namespace am {

struct AdamWTensors {
  Tensor* master;      // fp32 [n], updated
  const Tensor* grad;  // fp32 [n]
  Tensor* exp_avg;     // fp32 [n]
  Tensor* exp_avg_sq;  // fp32 [n]
  Tensor* working;     // bf16 (or fp32/f16) [n] copy written after the update; nullable
};

struct AdamWHyper {
  double lr = 1e-5, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  int64_t step = 1;       // the step being taken, counting from 1 (bias corrections)
  bool decoupled = true;  // false: torch.optim.Adam (L2 added to the gradient)
};

// model.dtype: bfloat16 (train/pure_bf16.h): parameters, gradients and state in bf16 (on the host the parameter
// is an fp32 tensor holding bf16 values, as the CPU computes in fp32). The update is backend/cpu/adamw_bf16.h's.
struct AdamWBf16Tensors {
  Tensor* value;             // bf16 [n] (CUDA) or fp32 holding bf16 values (host), updated
  const Tensor* grad;        // bf16 [n]
  Tensor* exp_avg;           // bf16 [n]
  Tensor* exp_avg_sq;        // bf16 [n]
  uint64_t salt = 0;         // names the tensor in the stochastic-rounding stream (a hash of its key)
};

struct AdamWBf16Hyper : AdamWHyper {
  bool stochastic = false;  // stochastic rounding of the new parameter (optimizer.stochastic_rounding)
  uint64_t seed = 0;
};

}  // namespace am
