#include "models/params.h"

#include "core/error.h"

namespace am {

Param& ParamStore::add(const std::string& name, const Shape& shape, DType source_dtype) {
  if (index_.count(name)) throw ShapeError("parameter registered twice: " + name);
  index_[name] = params_.size();
  Param p;
  p.name = name;
  p.value = Tensor::zeros(shape, DType::F32);
  p.grad = Tensor::zeros(shape, DType::F32);
  p.source_dtype = source_dtype;
  params_.push_back(std::move(p));
  return params_.back();
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
  for (auto& p : params_) p.grad.zero_();
}

int64_t ParamStore::numel() const {
  int64_t n = 0;
  for (auto& p : params_) n += p.value.numel();
  return n;
}

}  // namespace am
