// Argument checks shared by the op front-ends (ops.cpp, moe_ops.cpp): every error names the op and the
// offending tensors' shapes and dtypes.
#pragma once
#include <initializer_list>
#include <string>

#include "core/error.h"
#include "core/tensor.h"

namespace am::ops::detail {

// A named argument, for error messages.
struct Arg {
  const char* name;
  const Tensor* t;  // null: an optional argument that was not given
};

inline std::string describe(const char* name, const Tensor& t) {
  return std::string(name) + " " + shape_str(t.shape()) + " " + dtype_name(t.dtype());
}

[[noreturn]] inline void shape_error(const char* op, const std::string& msg) {
  throw ShapeError(std::string("op ") + op + ": " + msg);
}

// Checks that every given tensor is defined and that all live on one device; returns that device.
inline DeviceType device_of(const char* op, std::initializer_list<Arg> args) {
  const Arg* first = nullptr;
  for (const Arg& a : args) {
    if (!a.t) continue;
    if (!a.t->defined()) shape_error(op, std::string(a.name) + " is an undefined (empty) tensor");
    if (!first) {
      first = &a;
    } else if (a.t->device() != first->t->device()) {
      throw DeviceError(std::string("op ") + op + ": " + first->name + " is on " +
                        (first->t->device() == DeviceType::CPU ? "cpu" : "cuda") + " but " + a.name +
                        " is on " + (a.t->device() == DeviceType::CPU ? "cpu" : "cuda"));
    }
  }
  return first ? first->t->device() : DeviceType::CPU;
}

}  // namespace am::ops::detail
