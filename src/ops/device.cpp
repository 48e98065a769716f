// Device memory, selection and multi-tensor ops (contracts in device.h): the CPU side here, the CUDA side
// through backend/cuda, and a DeviceError naming the call in a build without CUDA.
#include "ops/device.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/error.h"
#include "ops/ops.h"
#include "backend/cpu/adamw_bf16.h"
#ifdef AM_WITH_CUDA
#include "backend/cuda/context.h"
#include "backend/cuda/cuda_ops.h"
#include "backend/cuda/cudnn_attention.h"
#endif

namespace am::ops {

namespace {
[[noreturn]] void no_cuda(const char* what) {
  throw DeviceError(std::string(what) + ": CUDA tensor or device asked for, but this build has no CUDA backend");
}
}  // namespace

Tensor empty_on(DeviceType dev, const Shape& shape, DType dtype) {
  if (dev == DeviceType::CPU) return Tensor::empty(shape, dtype);
#ifdef AM_WITH_CUDA
  return cuda::empty(shape, dtype);
#else
  no_cuda("empty_on");
#endif
}

Tensor zeros_on(DeviceType dev, const Shape& shape, DType dtype) {
  if (dev == DeviceType::CPU) return Tensor::zeros(shape, dtype);
#ifdef AM_WITH_CUDA
  Tensor t = cuda::empty(shape, dtype);
  cuda::zero_(t);
  return t;
#else
  no_cuda("zeros_on");
#endif
}

Tensor to_cuda(const Tensor& host) {
#ifdef AM_WITH_CUDA
  return cuda::to_device(host);
#else
  (void)host;
  no_cuda("to_cuda");
#endif
}

Tensor to_host(const Tensor& t) {
  if (t.device() == DeviceType::CPU) return t;
#ifdef AM_WITH_CUDA
  return cuda::to_host(t);
#else
  no_cuda("to_host");
#endif
}

void synchronize_cuda() {
#ifdef AM_WITH_CUDA
  cuda::default_context().synchronize();
#endif
}

void use_gpu(int index) {
#ifdef AM_WITH_CUDA
  cuda::set_default_device(index);
#else
  (void)index;
  no_cuda("use_gpu");
#endif
}

size_t gpu_peak_bytes() {
#ifdef AM_WITH_CUDA
  return cuda::default_context().allocator().peak_bytes();
#else
  return 0;
#endif
}

void reset_gpu_peak() {
#ifdef AM_WITH_CUDA
  cuda::default_context().allocator().reset_peak();
#endif
}

bool unverified_cuda_allowed() {
  static const bool allowed = [] {
    const char* e = std::getenv("AM_ALLOW_UNVERIFIED_CUDA");
    return e && std::string(e) == "1";
  }();
  return allowed;
}

void require_verified_cuda(const std::string& what) {
  if (unverified_cuda_allowed()) return;
  throw DeviceError(what + ": its CUDA kernels are written and tested against the CPU reference but have not yet "
                    "run on a GPU, so they are off by default; use --device cpu, or set AM_ALLOW_UNVERIFIED_CUDA=1 "
                    "to run them anyway (docs/architecture.md)");
}

void round_to_bf16_values_(Tensor& t) {
  if (t.dtype() != DType::F32) return;
  Tensor b = empty_on(t.device(), t.shape(), DType::BF16);
  copy_(b, t);
  copy_(t, b);
}

double sum_squares_multi(const std::vector<const Tensor*>& tensors) {
  if (tensors.empty()) return 0.0;
  const DeviceType dev = tensors.front()->device();
  for (const Tensor* t : tensors)
    if (t->device() != dev) throw DeviceError("op sum_squares_multi: the tensors are on different devices");
  if (dev == DeviceType::CPU) {
    double sq = 0.0;
    for (const Tensor* t : tensors) sq += sum_squares(*t);
    return sq;
  }
#ifdef AM_WITH_CUDA
  return cuda::sum_squares_multi(tensors);
#else
  no_cuda("op sum_squares_multi");
#endif
}

void SquareSums::add(const std::vector<const Tensor*>& tensors) {
  if (tensors.empty()) return;
  if (tensors.front()->device() == DeviceType::CPU) {
    host_ += sum_squares_multi(tensors);
    return;
  }
#ifdef AM_WITH_CUDA
  for (const Tensor* t : tensors)
    if (t->device() != DeviceType::CUDA) throw DeviceError("op SquareSums::add: the tensors are on different devices");
  cuda::sum_squares_multi_async(tensors, device_slot());
#else
  no_cuda("op SquareSums::add");
#endif
}

double* SquareSums::device_slot() {
#ifdef AM_WITH_CUDA
  if (!device_.defined() || used_ == device_.numel()) {
    // Grow (the first step only, in practice): what is written so far is read back first (one sync).
    const int64_t cap = std::max<int64_t>(64, 2 * used_);
    host_ += read_back();
    device_ = empty_on(DeviceType::CUDA, {cap}, DType::I64);
  }
  static_assert(sizeof(double) == sizeof(int64_t), "a device slot holds one double");
  return reinterpret_cast<double*>(device_.data<int64_t>()) + used_++;
#else
  no_cuda("op SquareSums::device_slot");
#endif
}

// The device slots written since the last read, summed in write order (one sync); none: 0, no sync.
double SquareSums::read_back() {
  double sq = 0.0;
  if (used_ == 0) return sq;
  Tensor h = to_host(device_.slice_rows(0, used_));
  for (int64_t i = 0; i < used_; ++i) {
    double v;
    std::memcpy(&v, h.data<int64_t>() + i, sizeof v);
    sq += v;
  }
  used_ = 0;
  return sq;
}

double SquareSums::total() {
  double sq = host_ + read_back();
  host_ = 0.0;
  return sq;
}

AttentionPlanStats attention_plan_stats() {
#ifdef AM_WITH_CUDA
  const cuda::CudnnPlanStats s = cuda::cudnn_attention_plan_stats();
  return {s.plans, s.seconds};
#else
  return {};
#endif
}

void adamw_step_cuda(const std::vector<AdamWTensors>& slots, const AdamWHyper& h, const AdamWFused& f) {
#ifdef AM_WITH_CUDA
  for (const AdamWTensors& s : slots)
    for (const Tensor* t : {static_cast<const Tensor*>(s.master), s.grad, static_cast<const Tensor*>(s.exp_avg),
                            static_cast<const Tensor*>(s.exp_avg_sq)})
      if (t->device() != DeviceType::CUDA) throw DeviceError("op adamw_step_cuda: a parameter or state tensor is on the host");
  cuda::AdamWConfig c;
  static_cast<AdamWHyper&>(c) = h;
  c.grad_scale = f.grad_scale;
  c.d_sumsq = f.d_sumsq;
  cuda::adamw_step(slots, c);
#else
  (void)slots;
  (void)h;
  (void)f;
  no_cuda("op adamw_step_cuda");
#endif
}

void adamw_bf16_step(const std::vector<AdamWBf16Tensors>& slots, const AdamWBf16Hyper& h, const AdamWFused& f) {
  const char* op = "op adamw_bf16_step";
  if (slots.empty()) return;
  const DeviceType dev = slots.front().value->device();
  for (const AdamWBf16Tensors& s : slots) {
    if (!s.value || !s.grad || !s.exp_avg || !s.exp_avg_sq) throw ShapeError(std::string(op) + ": null tensor");
    const int64_t n = s.value->numel();
    for (const Tensor* t : {static_cast<const Tensor*>(s.value), s.grad, static_cast<const Tensor*>(s.exp_avg),
                            static_cast<const Tensor*>(s.exp_avg_sq)}) {
      if (t->device() != dev) throw DeviceError(std::string(op) + ": the tensors of a step are on different devices");
      if (t->numel() != n) throw ShapeError(std::string(op) + ": a gradient or state tensor differs in size from its parameter");
    }
    for (const Tensor* t : {s.grad, static_cast<const Tensor*>(s.exp_avg), static_cast<const Tensor*>(s.exp_avg_sq)})
      if (t->dtype() != DType::BF16 && !(t == s.grad && dev == DeviceType::CUDA && t->dtype() == DType::F32))
        throw ShapeError(std::string(op) + ": gradients and state must be bfloat16 (CUDA gradients: or float32)");
    const DType vd = s.value->dtype();
    if (vd != DType::BF16 && !(dev == DeviceType::CPU && vd == DType::F32))
      throw ShapeError(std::string(op) + ": parameters must be bfloat16 (or float32 holding bf16 values on the host)");
  }
  if (h.step < 1) throw ShapeError(std::string(op) + ": step must be >= 1");
  if (dev == DeviceType::CPU) {
    if (f.d_sumsq || f.grad_scale != 1.f) throw DeviceError(std::string(op) + ": the fused sum of squares and scale are CUDA's");
    return cpu::adamw_bf16(slots, h);
  }
#ifdef AM_WITH_CUDA
  cuda::adamw_bf16_step(slots, h, f);
#else
  no_cuda(op);
#endif
}

double lm_head_cross_entropy_cuda(const Tensor& x, const Tensor& w, const Tensor& targets, float grad_scale,
                                  Tensor* dx, Tensor* dw) {
#ifdef AM_WITH_CUDA
  // Fused chunked GEMM + CE on the device; one host sync per call to read the loss sum.
  double* d_sum = cuda::alloc_device_scalar();
  try {
    cuda::lm_head_cross_entropy(x, w, targets, grad_scale, dx, dw, d_sum);
  } catch (...) {
    cuda::free_device_scalar(d_sum);
    throw;
  }
  const double total = cuda::read_device_scalar(d_sum);
  cuda::free_device_scalar(d_sum);
  return total;
#else
  (void)x, (void)w, (void)targets, (void)grad_scale, (void)dx, (void)dw;
  no_cuda("op lm_head_cross_entropy_cuda");
#endif
}

}  // namespace am::ops
