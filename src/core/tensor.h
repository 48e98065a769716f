// A dense, contiguous, row-major tensor on one device. Storage is reference counted so tensors can be
// shared (tied embeddings) and views (row slices) are cheap. dtype is a run-time property.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "core/allocator.h"
#include "core/dtype.h"

namespace am {

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);  // "[2, 3]"
int64_t shape_numel(const Shape& s);

struct Storage {
  void* data = nullptr;
  size_t bytes = 0;
  Allocator* alloc = nullptr;  // null: not owned (e.g. an mmapped file region)
  std::shared_ptr<void> keepalive;  // keeps a mapping alive for non-owned storage
  ~Storage();
};

class Tensor {
 public:
  Tensor() = default;
  // Uninitialised tensor from an allocator (default: host).
  static Tensor empty(const Shape& shape, DType dtype, Allocator& alloc = cpu_allocator());
  static Tensor zeros(const Shape& shape, DType dtype, Allocator& alloc = cpu_allocator());
  // Wraps memory owned elsewhere; `keepalive` holds it alive.
  static Tensor wrap(void* data, const Shape& shape, DType dtype, std::shared_ptr<void> keepalive,
                     DeviceType dev = DeviceType::CPU);

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_.at(i < 0 ? shape_.size() + i : i); }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  DeviceType device() const { return device_; }

  void* raw() const { return static_cast<char*>(storage_->data) + offset_; }
  template <typename T>
  T* data() const { return static_cast<T*>(raw()); }
  float* f32() const;  // checked: dtype must be F32 on the host

  // Same storage, new shape (numel must match).
  Tensor view(const Shape& shape) const;
  // Rows [begin, end) of dimension 0, sharing storage.
  Tensor slice_rows(int64_t begin, int64_t end) const;
  // Deep copy on the host.
  Tensor clone() const;
  // Host copy converted to dtype (float types only).
  Tensor to(DType dtype) const;
  void zero_();
  void copy_from(const Tensor& src);  // same numel; converts float dtypes on the host

 private:
  std::shared_ptr<Storage> storage_;
  size_t offset_ = 0;
  Shape shape_;
  DType dtype_ = DType::F32;
  DeviceType device_ = DeviceType::CPU;
};

}  // namespace am
