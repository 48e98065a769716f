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
  const Tensor* grad;        // bf16 [n]; on CUDA also fp32 [n], rounded to bf16 as it is read (= a copy_ to bf16)
  Tensor* exp_avg;           // bf16 [n]
  Tensor* exp_avg_sq;        // bf16 [n]
  uint64_t salt = 0;         // names the tensor in the stochastic-rounding stream (a hash of its key)
};

// What a fused step on CUDA also does for optimizer_in_bwd (train/optimizer_in_bwd.h), in the pass that reads the
// gradients anyway instead of passes of its own: their sum of squares (the step's grad norm) and the clip scale.
struct AdamWFused {
  // Every gradient is multiplied by this as it is loaded: one fp32 product (bf16 gradients: rounded to bf16), what
  // a separate ops::scale_ pass over the gradient would store.
  float grad_scale = 1.f;
  // Non-null (a device double): set to the sum of squares of the gradients as read, before grad_scale (bf16 update:
  // of the bf16-rounded gradients), with ops::sum_squares_multi's chunks and order, so the same value it returns.
  double* d_sumsq = nullptr;
};

struct AdamWBf16Hyper : AdamWHyper {
  bool stochastic = false;  // stochastic rounding of the new parameter (optimizer.stochastic_rounding)
  uint64_t seed = 0;
};

}  // namespace am
