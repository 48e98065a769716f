#include "core/tensor.h"

#include <cstring>
#include <sstream>

#include "core/error.h"

namespace am {

std::string shape_str(const Shape& s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}

Storage::~Storage() {
  if (alloc && data) alloc->deallocate(data, bytes);
}

Tensor Tensor::empty(const Shape& shape, DType dtype, Allocator& alloc) {
  for (auto d : shape)
    if (d < 0) throw ShapeError("negative dimension in shape " + shape_str(shape));
  Tensor t;
  t.storage_ = std::make_shared<Storage>();
  t.storage_->bytes = static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype);
  t.storage_->data = alloc.allocate(t.storage_->bytes);
  t.storage_->alloc = &alloc;
  t.shape_ = shape;
  t.dtype_ = dtype;
  t.device_ = alloc.device_type();
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Allocator& alloc) {
  Tensor t = empty(shape, dtype, alloc);
  t.zero_();
  return t;
}

Tensor Tensor::wrap(void* data, const Shape& shape, DType dtype, std::shared_ptr<void> keepalive,
                    DeviceType dev) {
  Tensor t;
  t.storage_ = std::make_shared<Storage>();
  t.storage_->data = data;
  t.storage_->bytes = static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype);
  t.storage_->keepalive = std::move(keepalive);
  t.shape_ = shape;
  t.dtype_ = dtype;
  t.device_ = dev;
  return t;
}

float* Tensor::f32() const {
  if (dtype_ != DType::F32 || device_ != DeviceType::CPU)
    throw ShapeError(std::string("expected a float32 host tensor, got ") + dtype_name(dtype_));
  return data<float>();
}

Tensor Tensor::view(const Shape& shape) const {
  if (shape_numel(shape) != numel())
    throw ShapeError("cannot view " + shape_str(shape_) + " as " + shape_str(shape));
  Tensor t = *this;
  t.shape_ = shape;
  return t;
}

Tensor Tensor::slice_rows(int64_t begin, int64_t end) const {
  if (shape_.empty() || begin < 0 || end > shape_[0] || begin > end)
    throw ShapeError("bad row slice [" + std::to_string(begin) + ", " + std::to_string(end) + ") of " +
                     shape_str(shape_));
  Tensor t = *this;
  int64_t row = shape_[0] ? numel() / shape_[0] : 0;
  t.offset_ += static_cast<size_t>(begin * row) * dtype_size(dtype_);
  t.shape_[0] = end - begin;
  return t;
}

Tensor Tensor::clone() const {
  Tensor t = empty(shape_, dtype_);
  std::memcpy(t.raw(), raw(), nbytes());
  return t;
}

Tensor Tensor::to(DType dtype) const {
  Tensor t = empty(shape_, dtype);
  convert_floats(raw(), dtype_, t.raw(), dtype, static_cast<size_t>(numel()));
  return t;
}

void Tensor::zero_() {
  if (device_ != DeviceType::CPU) throw DeviceError("zero_() on a device tensor: use the backend");
  std::memset(raw(), 0, nbytes());
}

void Tensor::copy_from(const Tensor& src) {
  if (src.numel() != numel())
    throw ShapeError("copy_from: " + shape_str(src.shape()) + " into " + shape_str(shape_));
  convert_floats(src.raw(), src.dtype(), raw(), dtype_, static_cast<size_t>(numel()));
}

}  // namespace am
