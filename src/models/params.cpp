#include "models/params.h"

#include <cstdint>
#include <set>
#include <utility>
#include <vector>

#include "core/error.h"
#include "io/nf4.h"
#include "models/exec.h"
#include "ops/device.h"
#include "ops/nf4_ops.h"
#include "ops/ops.h"

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
    if (host_grads_) p.grad = Tensor::zeros(shape, DType::F32);
    p.work = p.value;
  }
  p.source_dtype = source_dtype;
  p.layouts = {SourceLayout{SourceSlice{name, 0, shape}}};
  params_.push_back(std::move(p));
  return params_.back();
}

namespace {
// [outer, A, B] <-> [outer, B, A] in fp32: dst[o, b, a] = src[o, a, b].
void transpose_last2(const float* src, float* dst, const Shape& shape) {
  const int64_t A = shape.at(shape.size() - 2), B = shape.back();
  const int64_t outer = A * B != 0 ? shape_numel(shape) / (A * B) : 0;
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t a = 0; a < A; ++a)
      for (int64_t b = 0; b < B; ++b) dst[(o * B + b) * A + a] = src[(o * A + a) * B + b];
}
}  // namespace

void copy_slice_in(const SourceSlice& s, const Tensor& src, float* dst) {
  if (!s.transposed) {
    Tensor d = Tensor::wrap(dst + s.offset, s.shape, DType::F32, nullptr);
    d.copy_from(src);
    return;
  }
  if (s.shape.size() < 2) throw ShapeError("transposed slice '" + s.name + "' needs at least 2 dims");
  if (src.shape() != s.shape)
    throw ShapeError("transposed slice '" + s.name + "': source " + shape_str(src.shape()) + ", expected " + shape_str(s.shape));
  // Row by row (one [B] row converted to fp32 at a time, then scattered as a column): no full-size temporary,
  // which for a 120B layer's experts would be gigabytes.
  const int64_t A = s.shape.at(s.shape.size() - 2), B = s.shape.back();
  const int64_t rows = B ? shape_numel(s.shape) / B : 0;
  const size_t esz = dtype_size(src.dtype());
  std::vector<float> row(static_cast<size_t>(B));
  const auto* in = static_cast<const uint8_t*>(src.raw());
  float* out = dst + s.offset;
  for (int64_t r = 0; r < rows; ++r) {
    convert_floats(in + static_cast<size_t>(r * B) * esz, src.dtype(), row.data(), DType::F32, static_cast<size_t>(B));
    const int64_t o = r / A, a = r % A;
    for (int64_t b = 0; b < B; ++b) out[(o * B + b) * A + a] = row[static_cast<size_t>(b)];
  }
}

Tensor copy_slice_out(const SourceSlice& s, const float* src) {
  if (!s.transposed) return Tensor::wrap(const_cast<float*>(src) + s.offset, s.shape, DType::F32, nullptr).clone();
  Shape t = s.shape;  // the parameter block's shape: the checkpoint's with the last two dims swapped
  std::swap(t[t.size() - 1], t[t.size() - 2]);
  Tensor out = Tensor::empty(s.shape, DType::F32);
  transpose_last2(src + s.offset, out.f32(), t);
  return out;
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
    ops::zero_(p.grad);
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

namespace {

// True when the tensors lie back to back in memory, in order (same dtype and device): one view spans them.
bool back_to_back(const std::vector<const Tensor*>& ts) {
  for (size_t i = 0; i + 1 < ts.size(); ++i) {
    const Tensor &a = *ts[i], &b = *ts[i + 1];
    if (a.dtype() != b.dtype() || a.device() != b.device() ||
        static_cast<const char*>(a.raw()) + a.nbytes() != static_cast<const char*>(b.raw()))
      return false;
  }
  return true;
}

// Re-lays out one field (value, grad or work) of a group's members into one allocation, when every member has
// it defined, with one dtype and device, and it is not back to back already. Returns the new views, or {}.
std::vector<Tensor> pack_field(const std::vector<Tensor*>& parts) {
  std::vector<const Tensor*> cp(parts.begin(), parts.end());
  for (const Tensor* t : cp)
    if (!t->defined() || t->dtype() != cp[0]->dtype() || t->device() != cp[0]->device()) return {};
  if (back_to_back(cp)) return {};
  int64_t total = 0;
  for (const Tensor* t : cp) total += t->numel();
  Tensor buf = ops::empty_on(cp[0]->device(), {total}, cp[0]->dtype());
  std::vector<Tensor> out;
  int64_t a = 0;
  for (const Tensor* t : cp) {
    Tensor d = buf.slice_rows(a, a + t->numel()).view(t->shape());
    ops::copy_(d, *t);
    out.push_back(d);
    a += t->numel();
  }
  return out;
}

void pack_group(const std::vector<Param*>& g) {
  // Working copies that alias their values (the CPU, where work is value) follow the values.
  bool work_is_value = true;
  for (Param* p : g) work_is_value = work_is_value && p->work.defined() && p->work.raw() == p->value.raw();
  std::vector<Tensor*> values, grads, works;
  for (Param* p : g) {
    values.push_back(&p->value);
    grads.push_back(&p->grad);
    works.push_back(&p->work);
  }
  std::vector<Tensor> v = pack_field(values), gr = pack_field(grads);
  for (size_t i = 0; i < v.size(); ++i) g[i]->value = v[i];
  for (size_t i = 0; i < gr.size(); ++i) g[i]->grad = gr[i];
  if (work_is_value) {
    for (Param* p : g) p->work = p->value;
  } else {
    std::vector<Tensor> w = pack_field(works);
    for (size_t i = 0; i < w.size(); ++i) g[i]->work = w[i];
  }
}

}  // namespace

void ParamStore::colocate(const std::vector<Param*>& group) {
  if (group.size() < 2) return;
  for (Param* p : group)
    if (!p || &get(p->name) != p) throw ShapeError("colocate: not a parameter of this store");
  groups_.push_back(group);
  if (!shapes_only_) pack_group(group);
}

void ParamStore::pack_groups() {
  for (const auto& g : groups_) pack_group(g);
}

void ParamStore::to_device(const ExecContext& ex) {
  if (!ex.on_cuda()) return;
  // Colocated groups whose members are moved the same way (all trainable or all frozen, none 4-bit) get one
  // allocation per field, filled member by member with exactly the bits the per-parameter path below makes.
  std::set<const Param*> done;
  for (const auto& g : groups_) {
    bool same = true;
    for (Param* p : g)
      same = same && !p->nf4 && !p->quantize_4bit && p->value.defined() && p->trainable == g[0]->trainable &&
             (p->shape.size() == 1) == (g[0]->shape.size() == 1) && !(p->trainable && defer_trainable_);
    if (!same) continue;
    const bool trainable = g[0]->trainable, keep_value = trainable || g[0]->shape.size() == 1;
    int64_t total = 0;
    for (Param* p : g) total += shape_numel(p->shape);
    Tensor value = keep_value ? ex.empty({total}, DType::F32) : Tensor();
    Tensor grad = trainable ? ex.zeros({total}, DType::F32) : Tensor();
    Tensor work = ex.empty({total}, ex.act_dtype);
    int64_t a = 0;
    for (Param* p : g) {
      const int64_t e = a + shape_numel(p->shape);
      Tensor host = ExecContext::download(p->value);
      Tensor w = work.slice_rows(a, e).view(p->shape);
      ops::copy_(w, ex.upload_as(host, ex.act_dtype));
      p->work = w;
      if (keep_value) {
        Tensor v = value.slice_rows(a, e).view(p->shape);
        ops::copy_(v, ex.upload(host));
        p->value = v;
      } else {
        p->value = Tensor();
      }
      p->grad = trainable ? grad.slice_rows(a, e).view(p->shape) : Tensor();
      done.insert(p);
      a = e;
    }
  }
  for (auto& p : params_) {
    if (done.count(&p)) continue;
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
    if (defer_trainable_) {  // data parallelism uploads the rank's part itself (dist/data_parallel.h)
      p.grad = Tensor();     // the host gradient is not needed either
      continue;
    }
    p.value = ex.upload(host);
    p.grad = ex.zeros(host.shape(), DType::F32);
    // The working copy is rounded from the uploaded master on the device (the same round-to-nearest-even as the
    // host's Tensor::to), not converted on one host thread and uploaded a second time: that was most of the 3.5 s
    // W4's 1.24 B parameters spent in "to cuda" (docs/performance.md, session 14).
    p.work = ex.empty(host.shape(), ex.act_dtype);
    ops::copy_(p.work, p.value);
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
