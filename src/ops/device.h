// Device memory, device selection and the multi-tensor training ops, for models/ and train/.
//
// With ops.h this is the one door from the layers above to the backends: models/ and train/ include no
// backend/cuda header. A build without CUDA compiles all of it; a CUDA-only call then throws DeviceError
// naming what was asked for (never a link error, never a silent fallback).
//
// Conventions as in ops.h: parameter gradients ACCUMULATE, activation gradients ASSIGN; shapes in comments.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "backend/cuda/device_info.h"
#include "core/adamw_params.h"
#include "core/tensor.h"

namespace am::ops {

// ---------------- memory ----------------
// An uninitialised tensor on `dev` (CUDA: from the context's caching allocator).
Tensor empty_on(DeviceType dev, const Shape& shape, DType dtype);
// A zeroed tensor on `dev`.
Tensor zeros_on(DeviceType dev, const Shape& shape, DType dtype);
// Host -> CUDA copy (synchronous). Throws DeviceError in a build without CUDA.
Tensor to_cuda(const Tensor& host);
// Any device -> host copy (synchronous); a host tensor is returned as it is (no copy).
Tensor to_host(const Tensor& t);
// Pure bf16 on the host (train/pure_bf16.h, dist/data_parallel.h): an fp32 tensor's values rounded to the nearest
// bf16 (ties to even, as torch), kept in fp32 storage. Other dtypes are left as they are.
void round_to_bf16_values_(Tensor& t);
// Waits for the work queued on the default CUDA stream; no-op without CUDA.
void synchronize_cuda();

// ---------------- devices ----------------
// Visible GPUs (index, name, memory, compute capability); empty, with the reason in *why_none, when none, no
// driver, or no CUDA in this build. Never throws. (backend/cuda/device_info.h needs no CUDA headers.)
using GpuInfo = cuda::DeviceInfo;
inline std::vector<GpuInfo> list_gpus(std::string* why_none = nullptr) { return cuda::list_devices(why_none); }
// Makes GPU `index` the one every later CUDA call uses (before anything touches a device).
void use_gpu(int index);
// Peak bytes held by the CUDA caching allocator since the last reset (0 without CUDA), and its reset.
size_t gpu_peak_bytes();
void reset_gpu_peak();

// ---------------- CUDA paths not yet run on a GPU ----------------
// CUDA code whose GPU tests have not passed on a device is used only when the environment has
// AM_ALLOW_UNVERIFIED_CUDA=1: a wrong kernel must not train a model silently wrong. Without it a model that needs
// such code refuses CUDA with a DeviceError naming `what` and this variable. The GPU tests set the variable.
// A path leaves this gate once a device run has checked it (docs/performance.md records the run). Today no model
// path is behind it (gpt_oss left it on 2026-12-06; DecoderLM's check_device_support is where a new one would go).
bool unverified_cuda_allowed();
void require_verified_cuda(const std::string& what);  // DeviceError unless allowed

// cuDNN fused-attention execution plans built in this process and the host seconds their builds took (NVRTC
// compiles included; backend/cuda/cudnn_attention.h): the run summary reports them. Zero without CUDA or cuDNN.
struct AttentionPlanStats {
  int64_t plans = 0;
  double seconds = 0;
};
AttentionPlanStats attention_plan_stats();

// ---------------- multi-tensor training ops ----------------
// Sum of squares over many float tensors of one device, in double (the grad-norm of clip_grad_norm_).
// CUDA: one multi-tensor launch sequence and one sync; CPU: ops::sum_squares per tensor.
double sum_squares_multi(const std::vector<const Tensor*>& tensors);

// Sums of squares gathered over a step with one host sync in all (optimizer_in_bwd's per-layer grad norms):
// add() queues one multi-tensor sum of squares (CUDA: into its own device double, no sync; the host: at once),
// total() reads them back together, adds them in add() order in double, and starts over.
class SquareSums {
 public:
  void add(const std::vector<const Tensor*>& tensors);
  // CUDA: a fresh device double, summed by total() like add()'s (a fused optimizer writes its sum there:
  // AdamWFused::d_sumsq). Its writer must be queued before total() is called.
  double* device_slot();
  double total();

 private:
  double read_back();
  double host_ = 0.0;
  Tensor device_;     // CUDA: [capacity] 8-byte slots holding doubles (an I64 tensor as raw storage)
  int64_t used_ = 0;  // slots written since the last total()
};

// Fused multi-tensor torch.optim.AdamW / Adam over CUDA tensors (the CPU optimizer is train/optimizer.cpp;
// both do the same fp32 arithmetic in the same order, see backend/cuda/cuda_ops.h adamw_step).
// f: the clip scale and the gradients' sum of squares in the same pass (optimizer_in_bwd; core/adamw_params.h).
void adamw_step_cuda(const std::vector<AdamWTensors>& slots, const AdamWHyper& h, const AdamWFused& f = {});

// AdamW / Adam over bf16 parameters, gradients and state (model.dtype: bfloat16; train/pure_bf16.h), on the
// host or the GPU: torch's single-tensor rounding, or stochastic rounding of the parameter
// (backend/cpu/adamw_bf16.h, the element math both share, so CPU and CUDA agree bit for bit). Every tensor of a
// slot on one device; grad and state bf16; the value bf16 on CUDA, fp32 (holding bf16 values) or bf16 on the host.
// On CUDA the gradients may be fp32 (rounded to bf16 as they are read) and f fuses the clip scale and the sum of
// squares as for adamw_step_cuda; on the host f must be the default.
void adamw_bf16_step(const std::vector<AdamWBf16Tensors>& slots, const AdamWBf16Hyper& h, const AdamWFused& f = {});

// Fused chunked LM head + cross-entropy on CUDA: x [N, H] bf16, w [V, H], targets [N] int32 (-100 ignored).
// Returns the loss SUM (one host sync); dx [N, H] assigned and dw [V, H] fp32 accumulated when non-null,
// both scaled by grad_scale. The CPU path (with logit soft-capping) is models/decoder.cpp's
// lm_head_cross_entropy; this one has no soft-capping (the caller refuses it on CUDA).
double lm_head_cross_entropy_cuda(const Tensor& x, const Tensor& w, const Tensor& targets, float grad_scale,
                                  Tensor* dx, Tensor* dw);

}  // namespace am::ops
