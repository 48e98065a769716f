#include "models/params.h"

#include "core/error.h"
#include "io/nf4.h"
#include "models/exec.h"
#include "ops/nf4_ops.h"
#ifdef AM_WITH_CUDA
#include "backend/cuda/cuda_ops.h"
#endif

namespace am {

Param& ParamStore::add(const std::string& name, const Shape& shape, DType source_dtype) {
  if (index_.count(name)) throw ShapeError("parameter registered twice: " + name);
  index_[name] = params_.size();
  Param p;
  p.name = name;
  p.shape = shape;
  p.global_numel = shape_numel(shape);
  if (!shapes_only_) {
    p.value = Tensor::zeros(shape, DType::F32);
    p.grad = Tensor::zeros(shape, DType::F32);
    p.work = p.value;
  }
  p.source_dtype = source_dtype;
  p.layouts = {SourceLayout{SourceSlice{name, 0, shape}}};
  params_.push_back(std::move(p));
  return params_.back();
}

Param& ParamStore::add_expert(const std::string& name, const Shape& shape, int64_t row_begin, int64_t global_rows) {
  Param& p = add(name, shape);
  const int64_t row = shape.empty() || shape[0] == 0 ? 0 : shape_numel(shape) / shape[0];
  p.expert = true;
  p.global_offset = row_begin * row;
  p.global_numel = global_rows * row;
  return p;
}

Param& ParamStore::get(const std::string& name) {
  auto it = index_.find(name);
  if (it == index_.end()) throw ShapeError("no parameter named " + name);
  return params_[it->second];
}
const Param& ParamStore::get(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) throw ShapeError("no parameter named " + name);
  return params_[it->second];
}

void ParamStore::zero_grad() {
  for (auto& p : params_) {
    if (!p.grad.defined()) continue;  // fsdp2: the gradient buffers belong to dist/data_parallel
    if (p.grad.device() == DeviceType::CPU) {
      p.grad.zero_();
    } else {
#ifdef AM_WITH_CUDA
      cuda::zero_(p.grad);
#endif
    }
  }
}

void ParamStore::freeze(Param& p) {
  p.trainable = false;
  p.grad = Tensor();
}

namespace {

ops::Nf4QuantizeOptions quant_opts(const ParamStore::Quant4Options& q) {
  ops::Nf4QuantizeOptions o;
  o.blocksize = q.blocksize;
  o.double_quant = q.double_quant;
  o.type = q.fp4 ? Quant4Type::FP4 : Quant4Type::NF4;
  return o;
}

}  // namespace

void ParamStore::quantize_marked() {
  for (auto& p : params_) {
    if (!p.quantize_4bit || p.nf4) continue;
    // bitsandbytes quantises the checkpoint-dtype weight (bf16 for a bf16 model): round first.
    Tensor src = p.value.dtype() == p.source_dtype ? p.value : p.value.to(p.source_dtype);
    p.nf4 = std::make_shared<const Nf4Weight>(ops::nf4_quantize(src, quant_opts(quant4)));
    p.value = p.work = p.grad = Tensor();
  }
}

void ParamStore::to_device(const ExecContext& ex) {
  if (!ex.on_cuda()) return;
  for (auto& p : params_) {
    if (p.nf4) {  // already 4-bit (read as bitsandbytes saved it)
      p.nf4 = std::make_shared<const Nf4Weight>(ops::nf4_to_device(*p.nf4, ex.device));
      continue;
    }
    Tensor host = ExecContext::download(p.value);
    if (p.quantize_4bit) {
      // QLoRA: quantised on the device one weight at a time, so only one bf16 weight is ever there at once.
      Tensor dev = ex.upload_as(host, p.source_dtype == DType::F32 ? DType::F32 : p.source_dtype);
      p.nf4 = std::make_shared<const Nf4Weight>(ops::nf4_quantize(dev, quant_opts(quant4)));
      p.value = p.work = p.grad = Tensor();
      continue;
    }
    if (!p.trainable) {
      // Frozen (LoRA base): the matmuls read the bf16 working copy; no fp32 master and no gradient. 1-D
      // weights (RMSNorm, biases: tiny) keep their fp32 value for the fp32 residual stream's norms.
      p.work = ex.upload_as(host, ex.act_dtype);
      p.value = p.shape.size() == 1 ? ex.upload(host) : Tensor();
      p.grad = Tensor();
      continue;
    }
    p.value = ex.upload(host);
    p.grad = ex.zeros(host.shape(), DType::F32);
    p.work = ex.upload_as(host, ex.act_dtype);
  }
}

int64_t ParamStore::numel() const {  // (4-bit weights count their elements, not their bytes)
  int64_t n = 0;
  for (auto& p : params_) n += shape_numel(p.shape);
  return n;
}

int64_t ParamStore::global_numel() const {
  int64_t n = 0;
  for (auto& p : params_) n += p.global_numel;
  return n;
}

}  // namespace am
